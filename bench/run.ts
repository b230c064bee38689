// `npm run bench [-- --quick] [--only a,b,c,d,e] [--json PATH] [--<size> N ...]`
//
// keytrack's benchmark suite, the issue's targets measured side by side with
// their baselines in one run:
//   a  SQL ingestion with full attribution vs plain (triggers off): single-row and 100-row batches, two key mixes
//   b  monitoring reads (the spec's view, quality 168 h, trend 30 days, /metrics' reads) vs the raw scan, at N rows,
//      then again after a backfill rewrote a day and one rollup refresh ran
//   c  HTTP: recorded requests/s through /v1/chat/completions vs the upstream directly; added p50/p99 at a fixed rate
//   d  start-up: spawn to /health 200, first start (initdb) and on an existing data folder
//   e  attribution: pending rows resolved after a bulk key import (retry worker); backfill rows/s and insert p99 beside it
//
// PostgreSQL: BENCH_DATABASE_URL (a superuser URL), else an embedded
// PostgreSQL in a temporary folder. Each benchmark works in a database of its
// own (kt_bench_<pid>_<name>, cloned from a migrated template), all dropped at
// the end. Processes are the compiled service (dist/, as `npm start` runs
// it; built first when stale, not timed). --quick (about a minute) proves the
// benchmarks complete, not their speed. Prints one table (figure, baseline,
// ratio, target, met) and writes JSON to bench/results/ (or --json PATH).
import { chmod, mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";

import { startEmbeddedPostgres } from "../server/db/embedded.js";
import { projectRoot } from "../server/db/projectRoot.js";
import { redactUrl } from "../server/db/urls.js";
import { withClient } from "../server/db/prepare.js";

import { attribution } from "./attribution.js";
import { calibrate } from "./calibrate.js";
import { http } from "./http.js";
import { ingest } from "./ingest.js";
import { Databases, dropLeftovers, ensureBuilt, say, table, type Benchmark, type ResultRow } from "./lib.js";
import { reads } from "./reads.js";
import { startup } from "./startup.js";

/** Sizes and options: full default, --quick default. */
const SIZES: Record<string, { full: number; quick: number; help: string }> = {
  "ingest-clients": { full: 8, quick: 8, help: "a: concurrent clients" },
  "ingest-seconds": { full: 8, quick: 1, help: "a: seconds per round and side" },
  "ingest-rounds": { full: 3, quick: 1, help: "a: rounds per side (best counts)" },
  "ingest-batch": { full: 100, quick: 100, help: "a: rows per batch statement" },
  "reads-rows": { full: 10_000_000, quick: 20_000, help: "b: history rows (before the current hour)" },
  "reads-current-hour-rows": { full: 1_000_000, quick: 5_000, help: "b: rows in the current hour" },
  "reads-days": { full: 30, quick: 30, help: "b: days the history spans" },
  "reads-repeat": { full: 7, quick: 2, help: "b: timed runs of each read (median counts)" },
  "http-seconds": { full: 15, quick: 1, help: "c: seconds of the throughput runs" },
  "http-connections": { full: 16, quick: 16, help: "c: autocannon connections" },
  "http-rate": { full: 500, quick: 200, help: "c: fixed rate for the latency runs, requests/s" },
  "http-rate-seconds": { full: 20, quick: 1, help: "c: seconds of each fixed-rate run" },
  "startup-runs": { full: 3, quick: 1, help: "d: starts on an existing data folder (median counts)" },
  "startup-tsc-baseline": { full: 1, quick: 0, help: "d: 1 = also time the old start (tsc, then start) as the baseline" },
  "pending-rows": { full: 100_000, quick: 2_000, help: "e: pending rows" },
  "pending-keys": { full: 200, quick: 20, help: "e: keys, unknown at insert, then imported in bulk" },
  "backfill-rows": { full: 1_000_000, quick: 20_000, help: "e: legacy rows backfilled" },
  "backfill-clients": { full: 4, quick: 2, help: "e: concurrent single-row inserters beside the backfill" },
};

const BENCHMARKS: Record<string, { name: string; run: Benchmark }> = {
  a: { name: "ingest", run: ingest },
  b: { name: "reads", run: reads },
  c: { name: "http", run: http },
  d: { name: "startup", run: startup },
  e: { name: "attribution", run: attribution },
};

function usage(): string {
  const lines = [
    "npm run bench -- [--quick] [--only a,b,c,d,e] [--json PATH] [--<size> N ...]",
    "  BENCH_DATABASE_URL: a superuser connection (default: an embedded PostgreSQL in a temporary folder)",
    ...Object.entries(BENCHMARKS).map(([k, b]) => `  ${k}: ${b.name}`),
  ];
  for (const [name, s] of Object.entries(SIZES)) lines.push(`  --${name} N  ${s.help} (full ${s.full}, --quick ${s.quick})`);
  return lines.join("\n");
}

function parse() {
  const options: Record<string, { type: "string" | "boolean" }> = { quick: { type: "boolean" }, only: { type: "string" }, json: { type: "string" }, help: { type: "boolean" } };
  for (const name of Object.keys(SIZES)) options[name] = { type: "string" };
  let values: Record<string, string | boolean | undefined>;
  try {
    values = parseArgs({ options, strict: true, allowPositionals: false }).values as typeof values;
  } catch (err) {
    process.stderr.write(`bench: ${(err as Error).message}\n${usage()}\n`);
    process.exit(2);
  }
  if (values.help) {
    process.stdout.write(usage() + "\n");
    process.exit(0);
  }
  const quick = values.quick === true;
  const opts: Record<string, number> = {};
  for (const [name, s] of Object.entries(SIZES)) {
    const raw = values[name];
    const n = raw === undefined ? (quick ? s.quick : s.full) : Number(raw);
    if (!Number.isInteger(n) || n < 0) {
      process.stderr.write(`bench: --${name} must be a whole number, got "${String(raw)}"\n`);
      process.exit(2);
    }
    opts[name] = n;
  }
  const only = typeof values.only === "string" ? values.only.split(",").map((s) => s.trim()).filter(Boolean) : Object.keys(BENCHMARKS);
  for (const k of only) {
    if (!BENCHMARKS[k]) {
      process.stderr.write(`bench: --only takes letters among ${Object.keys(BENCHMARKS).join(",")}, got "${k}"\n`);
      process.exit(2);
    }
  }
  return { quick, opts, only, json: typeof values.json === "string" ? path.resolve(values.json) : null };
}

async function main(): Promise<number> {
  const { quick, opts, only, json } = parse();
  const startedAt = new Date();
  const loadAtStart = os.loadavg();
  const t0 = performance.now();
  const tmp = await mkdtemp(path.join(os.tmpdir(), "keytrack-bench-"));
  await chmod(tmp, 0o755); // as root, PostgreSQL runs as the postgres user
  const undo: Array<() => Promise<unknown>> = [async () => rm(tmp, { recursive: true, force: true })];
  let cleaning: Promise<void> | null = null;
  const cleanup = () => (cleaning ??= (async () => {
    while (undo.length) await undo.pop()!().catch((err) => say(`cleanup: ${(err as Error).message}`));
  })());
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    process.once(signal, () => void cleanup().then(() => process.exit(130)));
  }

  try {
    let rootUrl = process.env.BENCH_DATABASE_URL;
    let where: string;
    if (rootUrl) {
      where = `BENCH_DATABASE_URL ${redactUrl(rootUrl)}`;
    } else {
      const port = 30000 + Math.floor(Math.random() * 10000);
      const pg = await startEmbeddedPostgres({ dataDir: path.join(tmp, "pg"), port });
      undo.push(() => pg.stop());
      rootUrl = pg.rootUrl;
      where = `an embedded PostgreSQL in ${tmp} (port ${port})`;
    }
    const version = await withClient(rootUrl, async (c) => (await c.query("select current_setting('server_version') as v")).rows[0].v as string);
    say(`keytrack bench${quick ? " --quick" : ""}: ${only.map((k) => `${k} ${BENCHMARKS[k]!.name}`).join(", ")}; PostgreSQL ${version} (${where}); ${os.cpus().length} cores, ${(os.totalmem() / 2 ** 30).toFixed(0)} GiB, Node ${process.version}`);
    const calibration = await calibrate(rootUrl, quick);
    await ensureBuilt();
    await dropLeftovers(rootUrl);
    const dbs = new Databases(rootUrl, `kt_bench_${process.pid}`);
    say(`databases ${dbs.prefix}_* (cloned from ${dbs.template}; dropped at the end)`);
    undo.push(() => dbs.dropAll());
    await dbs.prepareTemplate();

    const all: ResultRow[] = [];
    const results: Record<string, unknown> = {};
    const failures: string[] = [];
    for (const k of only) {
      const b = BENCHMARKS[k]!;
      const started = performance.now();
      say(`${k}. ${b.name}: running`);
      try {
        const { rows, details } = await b.run({ quick, dbs, opts, tmp });
        const seconds = (performance.now() - started) / 1000;
        all.push(...rows);
        results[b.name] = { seconds: Number(seconds.toFixed(1)), rows, details };
        process.stdout.write(`\n${table(rows, quick)}\n\n`);
        say(`${k}. ${b.name}: done in ${seconds.toFixed(1)} s`);
      } catch (err) {
        failures.push(`${k}. ${b.name}: ${(err as Error).stack ?? err}`);
        results[b.name] = { error: String((err as Error).message ?? err) };
        say(`${k}. ${b.name}: FAILED: ${(err as Error).stack ?? err}`);
      }
    }
    const seconds = (performance.now() - t0) / 1000;
    process.stdout.write(`\n## keytrack bench${quick ? " --quick" : ""}: all results (${seconds.toFixed(0)} s)\n\n${table(all, quick)}\n\n`);
    const report = {
      suite: "keytrack bench",
      mode: quick ? "quick" : "full",
      startedAt: startedAt.toISOString(),
      seconds: Number(seconds.toFixed(1)),
      machine: { cores: os.cpus().length, cpu: os.cpus()[0]?.model, memoryGiB: Number((os.totalmem() / 2 ** 30).toFixed(1)), node: process.version, postgres: version, database: where, loadAverageAtStart: loadAtStart, loadAverageAtEnd: os.loadavg(), calibration },
      options: opts,
      benchmarks: only.map((k) => BENCHMARKS[k]!.name),
      rows: all,
      results,
      failures,
    };
    const file = json ?? path.join(projectRoot, "bench", "results", `${startedAt.toISOString().replace(/[:.]/g, "-")}-${quick ? "quick" : "full"}.json`);
    await mkdir(path.dirname(file), { recursive: true });
    await writeFile(file, JSON.stringify(report, null, 2) + "\n");
    say(`results written to ${path.relative(process.cwd(), file) || file}`);
    if (failures.length) {
      say(`${failures.length} benchmark(s) failed: ${failures.map((f) => f.split("\n")[0]).join("; ")}`);
      return 1;
    }
    return 0;
  } finally {
    await cleanup();
  }
}

main().then(
  (code) => process.exit(code),
  (err) => {
    process.stderr.write(`bench: ${(err as Error).stack ?? err}\n`);
    process.exit(1);
  },
);
