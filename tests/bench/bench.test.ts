// `npm run bench -- --quick` against the test PostgreSQL (BENCH_DATABASE_URL =
// the run's superuser URL), as a child process: it must complete every
// benchmark, print the table (figure, baseline, ratio, target) and write valid
// JSON. Its speed is not judged here (the quick sizes are too small, and the
// test machine is busy): docs/benchmarks.md holds the measured figures.
import { spawn } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";

import test from "ava";
import pg from "pg";

import { projectRoot } from "../../server/db/projectRoot.js";

const BENCHMARKS = ["ingest", "reads", "http", "startup", "attribution"];

test("npm run bench -- --quick completes every benchmark, prints the table and writes valid JSON", async (t) => {
  t.timeout(15 * 60_000);
  const rootUrl = process.env.KEYTRACK_TEST_ROOT_URL;
  if (!rootUrl) throw new Error("KEYTRACK_TEST_ROOT_URL is unset: run through npm test");
  const dir = await mkdtemp(path.join(os.tmpdir(), "keytrack-bench-test-"));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const json = path.join(dir, "results.json");
  const npm = process.platform === "win32" ? "npm.cmd" : "npm";
  const child = spawn(npm, ["run", "--silent", "bench", "--", "--quick", "--json", json], {
    cwd: projectRoot,
    env: { ...process.env, BENCH_DATABASE_URL: rootUrl },
    stdio: ["ignore", "pipe", "pipe"],
  });
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
  });
  let stdout = "", stderr = "";
  child.stdout.on("data", (c: Buffer) => (stdout += c.toString("utf8")));
  child.stderr.on("data", (c: Buffer) => (stderr += c.toString("utf8")));
  const code = await new Promise<number | null>((resolve, reject) => {
    child.once("error", reject);
    child.once("close", (c) => resolve(c));
  });
  const output = `stdout:\n${stdout}\nstderr:\n${stderr}`;
  t.is(code, 0, `npm run bench -- --quick exited with code ${code}\n${output}`);

  // The table: its header, and a line for each benchmark's letter.
  t.regex(stdout, /^\| benchmark +\| measure +\| figure +\| baseline \(same run\) +\| ratio +\| target +\| met/m, output);
  for (const prefix of ["a. SQL ingestion", "b. monitoring reads", "c. HTTP", "d. start-up", "e. attribution"]) {
    t.regex(stdout, new RegExp(`^\\| ${prefix.replace(/[.]/g, "\\.")} `, "m"), `no table line for ${prefix}\n${output}`);
  }

  // The JSON: every benchmark ran, no failure, every row a finite figure.
  const report = JSON.parse(await readFile(json, "utf8")) as {
    mode: string; failures: string[]; benchmarks: string[]; machine: { calibration?: Record<string, unknown> }; rows: Array<{ benchmark: string; measure: string; figure: number; baseline: number | null; ratio: number | null; target: string | null }>;
    results: Record<string, { seconds?: number; error?: string }>;
  };
  t.is(report.mode, "quick");
  t.deepEqual(report.failures, []);
  t.deepEqual(report.benchmarks, BENCHMARKS);
  for (const name of BENCHMARKS) t.is(typeof report.results[name]?.seconds, "number", `${name} has no result`);
  // The machine's own speed, measured first (bench/calibrate.ts): every figure positive and finite.
  t.regex(stdout, /^# machine: JS loop \d+ M\/s, SHA-256 \d+k\/s, loopback HTTP round trip p50 [\d.]+ ms/m, output);
  const calibration = report.machine.calibration ?? {};
  t.deepEqual(Object.keys(calibration).sort(), ["jsLoopMops", "loopbackHttpP50Ms", "loopbackHttpP99Ms", "postgresCommitP50Ms", "postgresRoundTripP50Ms", "sha256KPerSecond"]);
  for (const [k, v] of Object.entries(calibration)) t.true(typeof v === "number" && Number.isFinite(v) && v > 0, `calibration ${k}: ${String(v)}`);
  t.true(report.rows.length >= 10, `only ${report.rows.length} rows`);
  for (const r of report.rows) {
    t.true(Number.isFinite(r.figure), `${r.benchmark} / ${r.measure}: figure ${r.figure}`);
    t.true(r.ratio === null || Number.isFinite(r.ratio), `${r.benchmark} / ${r.measure}: ratio ${r.ratio}`);
  }
  t.true(report.rows.some((r) => r.baseline !== null && r.ratio !== null), "some rows compare with a baseline");

  // Its databases (named in its first lines) are gone.
  const prefix = /databases (kt_bench_\d+)_\*/.exec(stdout)?.[1];
  t.truthy(prefix, `the run does not name its databases\n${output}`);
  const c = new pg.Client({ connectionString: rootUrl });
  await c.connect();
  try {
    const { rows } = await c.query<{ datname: string }>("select datname from pg_database where starts_with(datname, $1)", [`${prefix}_`]);
    t.deepEqual(rows.map((r) => r.datname), [], "the run dropped its databases");
  } finally {
    await c.end();
  }
});
