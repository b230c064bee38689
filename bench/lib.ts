// What the benchmarks of `npm run bench` share: the PostgreSQL they run on
// (BENCH_DATABASE_URL, or an embedded one in a temporary folder), a migrated
// template database and one database per benchmark cloned from it (all named
// kt_bench_<pid>_*, dropped at the end), the keytrack processes they start
// (the compiled service in dist/, as `npm start` runs it), the result rows
// (figure, baseline from the same run, ratio, target) and small statistics.
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import net from "node:net";
import path from "node:path";

import pg from "pg";

import { prepareDatabase, withClient } from "../server/db/prepare.js";
import { projectRoot } from "../server/db/projectRoot.js";
import { withDatabaseName, withUser } from "../server/db/urls.js";

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

export function say(line: string): void {
  process.stdout.write(`# ${line}\n`);
}

// ---------------------------------------------------------------------------
// Results

/** One line of a benchmark's table: a figure, the baseline it is compared with (same run), their ratio, the target. */
export interface ResultRow {
  benchmark: string;
  measure: string;
  figure: number;
  unit: string;
  baseline: number | null;
  baselineLabel: string | null;
  /** figure / baseline (or baseline / figure when `ratioOf` says so); null without a baseline. */
  ratio: number | null;
  /** e.g. ">= 0.90x", "<= 20 ms"; null for a figure reported without a target. */
  target: string | null;
  /** Whether the target is met; null without a target, or in --quick (sizes too small to judge). */
  met: boolean | null;
  note?: string;
}

export interface Target {
  /** What is compared with `limit`: the ratio or the figure itself. */
  on: "ratio" | "figure";
  op: ">=" | "<=";
  limit: number;
  text: string;
}

export function row(
  benchmark: string,
  measure: string,
  figure: number,
  unit: string,
  baseline: { value: number; label: string; ratio?: "figure/baseline" | "baseline/figure" } | null,
  target: Target | null,
  note?: string,
): ResultRow {
  const ratio = baseline && baseline.value > 0 && figure > 0
    ? (baseline.ratio === "baseline/figure" ? baseline.value / figure : figure / baseline.value)
    : null;
  let met: boolean | null = null;
  if (target) {
    const x = target.on === "ratio" ? ratio : figure;
    met = x === null ? false : target.op === ">=" ? x >= target.limit : x <= target.limit;
  }
  return { benchmark, measure, figure, unit, baseline: baseline?.value ?? null, baselineLabel: baseline?.label ?? null, ratio, target: target?.text ?? null, met, ...(note ? { note } : {}) };
}

const fmt = (n: number | null, unit = "") => {
  if (n === null || !Number.isFinite(n)) return "-";
  const digits = Math.abs(n) >= 100 ? 0 : Math.abs(n) >= 10 ? 1 : 2;
  return `${n.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits })}${unit ? ` ${unit}` : ""}`;
};

/** The table of one benchmark (or of all), as printed. */
export function table(rows: ResultRow[], quick: boolean): string {
  const head = ["benchmark", "measure", "figure", "baseline (same run)", "ratio", "target", quick ? "met (--quick: not judged)" : "met"];
  const body = rows.map((r) => [
    r.benchmark,
    r.measure,
    fmt(r.figure, r.unit),
    r.baseline === null ? "-" : `${fmt(r.baseline, r.unit)} (${r.baselineLabel})`,
    r.ratio === null ? "-" : `${r.ratio.toFixed(r.ratio >= 100 ? 0 : 2)}x`,
    r.target ?? "-",
    r.met === null ? "-" : quick ? `(${r.met ? "yes" : "no"})` : r.met ? "yes" : "NO",
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i]!.length)));
  const line = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i]!)).join(" | ")} |`;
  return [line(head), `|${widths.map((w) => "-".repeat(w + 2)).join("|")}|`, ...body.map(line)].join("\n");
}

// ---------------------------------------------------------------------------
// Statistics

export function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i]!;
}

export function median(values: number[]): number {
  return percentile([...values].sort((a, b) => a - b), 50);
}

// ---------------------------------------------------------------------------
// Databases

export class Databases {
  private readonly names: string[] = [];
  readonly template: string;

  constructor(
    /** A superuser connection (any database of the cluster). */
    readonly rootUrl: string,
    readonly prefix: string,
  ) {
    this.template = `${prefix}_template`;
  }

  /** Roles, a database, graphile-worker's schema and the committed migrations: the template the benchmarks clone. */
  async prepareTemplate(): Promise<void> {
    const owner = withUser(withDatabaseName(this.rootUrl, this.template), "keytrack_owner");
    this.names.push(this.template);
    await prepareDatabase({ rootUrl: this.rootUrl, databaseUrl: owner });
    await withClient(this.rootUrl, (c) => c.query(`alter database ${pg.escapeIdentifier(this.template)} is_template true`));
  }

  /** A fresh database cloned from the template: its superuser and owner URLs. */
  async create(suffix: string): Promise<{ name: string; rootUrl: string; ownerUrl: string }> {
    const name = `${this.prefix}_${suffix}`;
    this.names.push(name);
    await withClient(this.rootUrl, async (c) => {
      await c.query(`drop database if exists ${pg.escapeIdentifier(name)} with (force)`);
      await c.query(`create database ${pg.escapeIdentifier(name)} template ${pg.escapeIdentifier(this.template)} owner keytrack_owner`);
    });
    const rootUrl = withDatabaseName(this.rootUrl, name);
    // Privileges on the database itself are not cloned (afterReset.sql).
    const { applyDatabasePrivileges } = await import("../server/db/prepare.js");
    const ownerUrl = withUser(rootUrl, "keytrack_owner");
    await applyDatabasePrivileges(this.rootUrl, ownerUrl);
    return { name, rootUrl, ownerUrl };
  }

  async drop(name: string): Promise<void> {
    await withClient(this.rootUrl, async (c) => {
      await c.query(`alter database ${pg.escapeIdentifier(name)} is_template false`).catch(() => {});
      await c.query(`drop database if exists ${pg.escapeIdentifier(name)} with (force)`);
    });
  }

  async dropAll(): Promise<void> {
    for (const name of this.names.reverse()) await this.drop(name).catch((err) => say(`could not drop ${name}: ${(err as Error).message}`));
  }
}

/** Drops kt_bench_<pid>_* databases left by runs whose process is gone (killed before their cleanup). */
export async function dropLeftovers(rootUrl: string): Promise<void> {
  await withClient(rootUrl, async (c) => {
    const { rows } = await c.query<{ datname: string }>("select datname from pg_database where datname ~ '^kt_bench_[0-9]+_'");
    for (const { datname } of rows) {
      const pid = Number(/^kt_bench_(\d+)_/.exec(datname)![1]);
      let alive = pid === process.pid;
      try {
        process.kill(pid, 0);
        alive = true;
      } catch { /* gone */ }
      if (alive) continue;
      await c.query(`alter database ${pg.escapeIdentifier(datname)} is_template false`);
      await c.query(`drop database if exists ${pg.escapeIdentifier(datname)} with (force)`);
    }
  });
}

// ---------------------------------------------------------------------------
// keytrack processes: the compiled code in dist/, as `npm start` runs it

/** Settings the bench's own environment must not leak into the processes it starts. */
const INHERITED_SETTING = /^(PG[A-Z]+|KEYTRACK_.*|DATABASE_URL|[A-Z]+_DATABASE_URL|EMBEDDED_PG_PORT|PORT|HOST|APP_ENV|ADMIN_API_KEY|ALLOW_ANONYMOUS|UPSTREAM_.*|METRICS_TOKEN|RETENTION_DAYS|WORKER|WORKER_CONCURRENCY|ATTRIBUTION_.*|BACKFILL_.*|LOG_LEVEL|BODY_LIMIT|AUTH_.*|RECORD_.*|ECHO_MODEL|GRAPHIQL|GRAPHQL_.*|MAX_LIVE_KEYS_PER_USER|COMPLETENESS_.*)$/;

export function cleanEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!INHERITED_SETTING.test(k)) env[k] = v;
  return { ...env, ...extra };
}

/** Builds dist/ when it is missing or stale (the same check `npm start` makes), so that timings never include tsc. */
export async function ensureBuilt(): Promise<void> {
  const build = (await import(path.join(projectRoot, "scripts/build.mjs"))) as { staleness: () => string | null; build: () => number };
  const why = build.staleness();
  if (!why) return;
  say(`${why}: building dist/ first (not timed)`);
  const code = build.build();
  if (code === 2) say("dist/ built with type errors (emitted all the same)");
  else if (code !== 0) throw new Error("dist/ could not be built");
}

/** The command `npm start` runs (package.json's start script, which must start with `node `), with `entry` in place of its entry file. */
export function startCommand(entry = "dist/server/index.js"): string[] {
  const script = (JSON.parse(readFileSync(path.join(projectRoot, "package.json"), "utf8")) as { scripts: Record<string, string> }).scripts.start!;
  const words = script.split(/\s+/);
  if (words[0] !== "node") throw new Error(`the start script is not "node ...": ${script}`);
  const args = words.slice(1);
  const i = args.findIndex((a) => a.endsWith(".js"));
  if (i >= 0) args[i] = entry;
  return args;
}

export class Proc {
  private out = "";
  exit: { code: number | null; signal: NodeJS.Signals | null } | null = null;
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;

  constructor(readonly child: ChildProcess, readonly name: string) {
    const onData = (c: Buffer) => {
      this.out += c.toString("utf8");
      if (this.out.length > 200_000) this.out = this.out.slice(-100_000);
    };
    child.stdout?.on("data", onData);
    child.stderr?.on("data", onData);
    this.exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve((this.exit = { code, signal }))));
  }

  /** Starts node with args in the project folder, in a process group of its own (so that stop() reaches its children). */
  static node(name: string, args: string[], env: NodeJS.ProcessEnv): Proc {
    return Proc.spawn(name, process.execPath, args, env);
  }

  static spawn(name: string, command: string, args: string[], env: NodeJS.ProcessEnv): Proc {
    const child = spawn(command, args, { cwd: projectRoot, env, stdio: ["ignore", "pipe", "pipe"], detached: true });
    return new Proc(child, name);
  }

  get output(): string {
    return this.out;
  }
  get alive(): boolean {
    return this.exit === null;
  }

  /**
   * SIGINT (the service stops everything it started), SIGKILL to the group after graceMs. To the
   * whole group (Ctrl-C: npm, its shell and the service each get one), or to the process alone
   * (then what it leaves running gets one after it exits). Returns when the group is gone.
   */
  async stop(graceMs = 20_000, group = true): Promise<void> {
    if (!this.alive) return;
    const deadline = Date.now() + graceMs;
    try { process.kill(group ? -this.child.pid! : this.child.pid!, "SIGINT"); } catch { /* gone */ }
    const timer = setTimeout(() => { try { process.kill(-this.child.pid!, "SIGKILL"); } catch { /* gone */ } }, graceMs);
    await this.exited;
    clearTimeout(timer);
    // npm 11 exits on SIGINT without waiting for its script (`sh -c node ...`), which goes on
    // shutting down (or, signalled alone, keeps running), holding its port, data folder and spool:
    // the caller's next start waits until the group is gone. Never a second SIGINT to a process
    // that had one (the service exits at once on the second, leaving its PostgreSQL running).
    const groupAlive = () => { try { process.kill(-this.child.pid!, 0); return true; } catch { return false; } };
    if (!groupAlive()) return;
    if (!group) try { process.kill(-this.child.pid!, "SIGINT"); } catch { /* gone */ }
    while (groupAlive() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    if (groupAlive()) {
      try { process.kill(-this.child.pid!, "SIGKILL"); } catch { /* gone */ }
      while (groupAlive()) await new Promise((r) => setTimeout(r, 50));
    }
  }

  tail(lines = 20): string {
    return this.out.trim().split("\n").slice(-lines).join("\n");
  }
}

/** bench/upstream.mjs, a process of its own: a trivial OpenAI-compatible upstream on a free loopback port. */
export async function startUpstream(): Promise<{ proc: Proc; url: string }> {
  const child = spawn(process.execPath, [path.join(projectRoot, "bench/upstream.mjs")], { stdio: ["ignore", "pipe", "pipe"], detached: true });
  const proc = new Proc(child, "upstream");
  for (let i = 0; i < 200; i++) {
    const m = /listening (\d+)/.exec(proc.output);
    if (m) return { proc, url: `http://127.0.0.1:${m[1]}` };
    if (!proc.alive) break;
    await sleep(25);
  }
  throw new Error(`the upstream did not start: ${proc.output}`);
}

/** Polls GET url/health until 200; returns when it answered (ms since `since`). */
export async function untilHealthy(proc: Proc, url: string, timeoutMs: number, since: number, pollMs = 20): Promise<number> {
  const deadline = since + timeoutMs;
  for (;;) {
    if (!proc.alive) throw new Error(`${proc.name} exited (code ${proc.exit!.code}) before /health answered:\n${proc.tail()}`);
    try {
      const res = await fetch(`${url}/health`, { signal: AbortSignal.timeout(2000) });
      await res.arrayBuffer();
      if (res.status === 200) return performance.now() - since;
    } catch { /* not listening yet */ }
    if (performance.now() > deadline) throw new Error(`${proc.name}: /health did not answer 200 within ${timeoutMs} ms:\n${proc.tail()}`);
    await sleep(pollMs);
  }
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

export const distExists = () => existsSync(path.join(projectRoot, "dist/server/index.js"));

// ---------------------------------------------------------------------------
// The context each benchmark gets

export interface BenchContext {
  quick: boolean;
  dbs: Databases;
  /** Sizes and options (arguments, with the mode's defaults). */
  opts: Record<string, number>;
  /** Where temporary folders go. */
  tmp: string;
}

export type Benchmark = (ctx: BenchContext) => Promise<{ rows: ResultRow[]; details: Record<string, unknown> }>;
