// A promise rejection nobody handles (graphile-worker 0.18 fails a job without
// awaiting that call when the job's connection has just died) must not exit the
// process: before, Node's default exited the service and lost the rows being
// recorded. The service and the worker install the same handler.
import { spawn } from "node:child_process";
import { readFile } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import test from "ava";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

/** Runs a script with tsx; resolves with its exit code and output. */
function run(script: string): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ["--import=tsx", "--input-type=module", "-e", script], { cwd: root, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    child.stdout.on("data", (c) => (out += c));
    child.stderr.on("data", (c) => (out += c));
    child.on("error", reject);
    child.on("close", (code) => resolve({ code, out }));
  });
}

const rejectThenContinue = `
  await new Promise((r) => setTimeout(r, 20));
  Promise.reject(new Error("job failed on a dead connection"));
  await new Promise((r) => setTimeout(r, 50));
  console.log("still serving");
`;

test("an unhandled rejection is logged with its stack and the process keeps running", async (t) => {
  const { code, out } = await run(`
    import { createLogger } from "./server/log.ts";
    import { keepRunningOnUnhandledRejections } from "./server/unhandled.ts";
    keepRunningOnUnhandledRejections(createLogger({ json: true, level: "info" }));
    ${rejectThenContinue}`);
  t.is(code, 0, out);
  t.regex(out, /still serving/);
  const line = out.split("\n").find((l) => l.includes("unhandled promise rejection"));
  t.truthy(line, out);
  const entry = JSON.parse(line!);
  t.is(entry.level, "error");
  t.is(entry.error.message, "job failed on a dead connection");
  t.regex(entry.error.stack, /^Error: job failed on a dead connection\n\s+at /);
});

test("without the handler the same script exits (the check above can fail)", async (t) => {
  const { code, out } = await run(rejectThenContinue);
  t.not(code, 0);
  t.notRegex(out, /still serving/);
});

test("the service and the worker entry points both install the handler", async (t) => {
  for (const file of ["server/index.ts", "server/worker/index.ts"]) {
    const source = await readFile(path.join(root, file), "utf8");
    t.regex(source, /keepRunningOnUnhandledRejections\(log\)/, file);
  }
});
