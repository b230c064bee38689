// The drills (scripts/drills) in their short form (--quick), each as a child
// process like `npm run drill:outage -- --quick`: they start their own
// PostgreSQL and service, so they need nothing from the test database. A drill
// passes when it exits 0 and its printed summary says nothing was lost or
// recorded twice. Slow by nature (a minute or so each); nothing here measures time.
import { spawn } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";

import test, { type ExecutionContext } from "ava";

import { projectRoot } from "../../server/db/projectRoot.js";

interface DrillRun {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  summary: { passed?: boolean } | null;
}

async function runQuickDrill(t: ExecutionContext, name: "outage" | "load" | "attribution"): Promise<DrillRun> {
  const dir = await mkdtemp(path.join(os.tmpdir(), `keytrack-drill-test-${name}-`));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const json = path.join(dir, "summary.json");
  const child = spawn(process.execPath, ["--import=tsx", `scripts/drills/${name}.ts`, "--quick", "--json", json], {
    cwd: projectRoot,
    stdio: ["ignore", "pipe", "pipe"],
  });
  // A test that fails or times out stops its drill; the drill then cleans up after itself.
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
  });
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (chunk: Buffer) => (stdout += chunk.toString("utf8")));
  child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString("utf8")));
  const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve, reject) => {
    child.once("error", reject);
    child.once("close", (c, s) => resolve([c, s]));
  });
  const summary = await readFile(json, "utf8").then((text) => JSON.parse(text) as DrillRun["summary"], () => null);
  return { code, signal, stdout, stderr, summary };
}

/** The numbers printed on the summary lines starting with `label` (one per phase). */
function printed(stdout: string, label: string): number[] {
  const re = new RegExp(`^\\s+${label.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}\\s+(\\d+)\\s*$`, "gm");
  return [...stdout.matchAll(re)].map((m) => Number(m[1]));
}

function assertPassed(t: ExecutionContext, run: DrillRun): void {
  const output = `stdout:\n${run.stdout}\nstderr:\n${run.stderr}`;
  t.is(run.code, 0, `the drill exited with code ${run.code} (signal ${run.signal})\n${output}`);
  const lost = printed(run.stdout, "lost");
  const duplicates = printed(run.stdout, "duplicate request_ids");
  t.true(lost.length > 0, `no "lost" line in the summary\n${output}`);
  t.true(duplicates.length > 0, `no "duplicate request_ids" line in the summary\n${output}`);
  t.deepEqual(lost, lost.map(() => 0), `lost must be 0\n${output}`);
  t.deepEqual(duplicates, duplicates.map(() => 0), `duplicate request_ids must be 0\n${output}`);
  // Completeness, through the same SQL function a DBA uses (app_public.completeness_gaps).
  const gaps = [...printed(run.stdout, "completeness gaps (SQL)"), ...printed(run.stdout, "completeness gaps (SQL), phases 1 and 2")];
  t.true(gaps.length > 0, `no "completeness gaps (SQL)" line in the summary\n${output}`);
  t.deepEqual(gaps, gaps.map(() => 0), `completeness gaps must be 0\n${output}`);
  t.is(run.summary?.passed, true, `the JSON summary does not say passed\n${output}`);
}

test.serial("drill:outage --quick: a database outage and a crash lose no served request and record none twice", async (t) => {
  t.timeout(5 * 60_000);
  assertPassed(t, await runQuickDrill(t, "outage"));
});

test.serial("drill:load --quick: steady load is answered without errors and every answer is recorded once", async (t) => {
  t.timeout(5 * 60_000);
  assertPassed(t, await runQuickDrill(t, "load"));
});

test.serial("drill:attribution --quick: every fault at once loses no row and attributes every row of an existing key to it", async (t) => {
  t.timeout(5 * 60_000);
  const run = await runQuickDrill(t, "attribution");
  assertPassed(t, run);
  // Of the rows presenting a key that exists (HTTP known keys, late keys imported in bulk): all attributed to that key.
  const right = [...run.stdout.matchAll(/^\s+attributed to the right key\s+(\d+\.\d+)%/gm)].map((m) => m[1]);
  t.deepEqual(right, ["100.00"], `"attributed to the right key" must say 100.00%\nstdout:\n${run.stdout}\nstderr:\n${run.stderr}`);
});
