// (d) Start-up: the time from spawning `npm start` (npm itself, then its start
// script: node, the stat-only dist/ check, dist/server/index.js) to GET
// /health answering 200, in development on the embedded PostgreSQL
// (DATABASE_URL unset) as a fresh clone meets it: a first start on an empty
// data folder (initdb, roles, database, migrations) and then starts on the
// existing data folder (median of --startup-runs). Targets: <= 15 s and <= 3 s.
// Each start is stopped with SIGINT to its process group (Ctrl-C) before the
// next. The baseline (full mode; --startup-tsc-baseline 1) is the old start:
// tsc -p tsconfig.build.json (into a scratch folder), then the same start.
// This benchmark does not use BENCH_DATABASE_URL: npm start's own embedded
// PostgreSQL is what is timed.
import { spawnSync } from "node:child_process";
import { chmod, mkdir } from "node:fs/promises";
import path from "node:path";

import { projectRoot } from "../server/db/projectRoot.js";

import { cleanEnv, ensureBuilt, freePort, median, Proc, row, say, startCommand, untilHealthy, type Benchmark, type ResultRow } from "./lib.js";

export const startup: Benchmark = async (ctx) => {
  const runs = Math.max(1, ctx.opts["startup-runs"]!);
  const dataDir = path.join(ctx.tmp, "startup-data");
  await mkdir(dataDir, { recursive: true });
  await chmod(dataDir, 0o755);
  const pgPort = String(40000 + Math.floor(Math.random() * 20000));
  // npm as the user runs it: the npm that runs this suite (npm_execpath), else the one on PATH.
  const npm = process.env.npm_execpath ? { cmd: process.execPath, args: [process.env.npm_execpath, "start", "--silent"] } : { cmd: "npm", args: ["start", "--silent"] };
  const args = startCommand();

  const once = async (): Promise<number> => {
    const port = await freePort();
    const env = cleanEnv({ KEYTRACK_DATA_DIR: dataDir, EMBEDDED_PG_PORT: pgPort, PORT: String(port), HOST: "127.0.0.1", LOG_LEVEL: "warn" });
    await ensureBuilt(); // another change to the sources since: rebuilt here, not timed
    const t = performance.now();
    const proc = Proc.spawn("npm start", npm.cmd, npm.args, env);
    try {
      return await untilHealthy(proc, `http://127.0.0.1:${port}`, 120_000, t);
    } finally {
      await proc.stop(20_000, true); // Ctrl-C: SIGINT to npm, its shell and the service at once
      if (proc.exit?.code !== 0) say(`startup: the service stopped with code ${proc.exit?.code}: ${proc.tail(5)}`);
    }
  };

  const first = await once();
  say(`startup: first start (initdb) ${(first / 1000).toFixed(2)} s`);
  const existing: number[] = [];
  for (let i = 0; i < runs; i++) {
    existing.push(await once());
    say(`startup: existing data folder ${(existing.at(-1)! / 1000).toFixed(2)} s`);
  }
  const existingMedian = median(existing);

  let tscMs: number | null = null;
  if (ctx.opts["startup-tsc-baseline"]) {
    const t = performance.now();
    const r = spawnSync(process.execPath, [path.join(projectRoot, "node_modules/typescript/bin/tsc"), "-p", "tsconfig.build.json", "--outDir", path.join(ctx.tmp, "tsc-out")], { cwd: projectRoot, stdio: "ignore" });
    if (r.status === 0) tscMs = performance.now() - t;
    say(`startup: baseline tsc ${tscMs === null ? "failed" : `${(tscMs / 1000).toFixed(1)} s`}`);
  }
  const baseline = (start: number) => tscMs === null ? null : { value: (tscMs + start) / 1000, label: "old start: tsc, then start", ratio: "baseline/figure" as const };
  const rows: ResultRow[] = [
    row("d. start-up", "npm start to /health 200, existing data folder", existingMedian / 1000, "s", baseline(existingMedian), { on: "figure", op: "<=", limit: 3, text: "<= 3 s" }),
    row("d. start-up", "npm start to /health 200, first start (initdb)", first / 1000, "s", baseline(first), { on: "figure", op: "<=", limit: 15, text: "<= 15 s" }),
  ];
  return { rows, details: { command: `npm start: node ${args.join(" ")}`, firstMs: first, existingMs: existing, tscMs } };
};
