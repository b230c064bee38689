// Loaded before the compiled entry point by the start scripts
// (`node --import ./scripts/start-check.mjs dist/server/index.js`): a stat-only
// check (a few ms) that dist/ is at least as new as the sources. Up to date:
// nothing happens, nothing is compiled. Stale or missing (a `git pull` without
// `npm ci`, an edited file): one line saying why, then dist/ is rebuilt once
// before the service starts; without TypeScript installed, the start is
// refused (exit 1) rather than running stale code.
import { build, staleness } from "./build.mjs";

const why = staleness();
if (why) {
  process.stderr.write(`keytrack: ${why}: rebuilding dist/ (tsc, once) before starting\n`);
  const code = build();
  if (code === 2) process.stderr.write("keytrack: dist/ rebuilt with the type errors above (emitted all the same); starting\n");
  else if (code !== 0) {
    process.stderr.write(`keytrack: not started: dist/ could not be built (tsc exit code ${code}); fix the error above, or run \`npm run build\`\n`);
    process.exit(1);
  }
}
