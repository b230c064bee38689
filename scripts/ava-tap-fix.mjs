// Preloaded into ava's main process by scripts/test.ts (node --import).
//
// ava 7's TAP reporter crashes when its inactivity timeout fires, or when a test
// file calls process.exit(): it hands a native Error to a function that expects
// ava's serialised form ("Cannot set properties of undefined (setting 'name')"
// in reporters/tap.js). The run then ends without naming the tests that were
// still running, and without its closing counts. This turns such an Error into
// the serialised shape the reporter handles, so each of those tests is printed
// as `not ok N - <title>` with the reason.
const { default: TapReporter } = await import(new URL("../node_modules/ava/lib/reporters/tap.js", import.meta.url).href);

const writeTest = TapReporter.prototype.writeTest;
TapReporter.prototype.writeTest = function (evt, flags) {
  if (evt.err instanceof Error) {
    evt = { ...evt, err: { type: "unknown", formattedError: evt.err.message } };
  }
  return writeTest.call(this, evt, flags);
};
