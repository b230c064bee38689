// What the drills (scripts/drills/outage.ts, load.ts, attribution.ts) share:
// a temporary folder, a PostgreSQL cluster of their own in it (the embedded
// one: Unix socket only, random port; never the machine's shared server), the
// keytrack service as a child process on a loopback port, steady chat traffic
// at a fixed rate, users and keys made in SQL, /metrics, the drain (spool
// empty and every served request id in the ledger), the ledger check (lost,
// duplicates, attribution), the printed summary and the cleanup that runs on
// every exit (success, failed assertion, exception, signal, time limit).
import { spawn, type ChildProcess } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { createWriteStream, type WriteStream } from "node:fs";
import { chmod, mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";

import pg from "pg";

import { socketDirFor, socketUrl, startEmbeddedPostgres, EMBEDDED_DATABASE, EMBEDDED_OWNER, type EmbeddedPostgres } from "../../server/db/embedded.js";
import { projectRoot } from "../../server/db/projectRoot.js";

// ---------------------------------------------------------------------------
// Small things

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** Seconds since `from` (ms), one decimal. */
export const secondsSince = (from: number, to = Date.now()) => Math.round((to - from) / 100) / 10;

export function say(line: string): void {
  process.stdout.write(`# ${line}\n`);
}

/** How long the service caches a key lookup: passed to it explicitly, so the drills know it. */
export const AUTH_CACHE_TTL_MS = 5000;

// ---------------------------------------------------------------------------
// Options

export interface OptionSpec {
  /** Default for the full run, and for --quick. */
  full: number;
  quick: number;
  min: number;
  max: number;
  help: string;
  /** Whole numbers only. */
  integer?: boolean;
}

export interface ParsedOptions<K extends string> {
  values: Record<K, number>;
  quick: boolean;
  json: string | null;
  serviceLog: string | null;
  verbose: boolean;
}

/**
 * --quick, --json PATH, --service-log PATH, --verbose, and one numeric option
 * per spec entry (--name N). Exits with code 2 on a bad option.
 */
export function parseDrillArgs<K extends string>(drill: string, specs: Record<K, OptionSpec>, argv = process.argv.slice(2)): ParsedOptions<K> {
  const options: Record<string, { type: "string" | "boolean" }> = {
    quick: { type: "boolean" },
    json: { type: "string" },
    "service-log": { type: "string" },
    verbose: { type: "boolean" },
    help: { type: "boolean" },
  };
  for (const name of Object.keys(specs)) options[name] = { type: "string" };
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options, allowPositionals: false, strict: true });
  } catch (err) {
    process.stderr.write(`drill ${drill}: ${(err as Error).message}\n`);
    process.exit(2);
  }
  const v = parsed.values as Record<string, string | boolean | undefined>;
  if (v.help) {
    const lines = [`npm run drill:${drill} -- [--quick] [--json PATH] [--service-log PATH] [--verbose]`];
    for (const [name, s] of Object.entries(specs) as Array<[string, OptionSpec]>) {
      lines.push(`  --${name} N  ${s.help} (default ${s.full}; --quick ${s.quick}; ${s.min}..${s.max})`);
    }
    process.stdout.write(lines.join("\n") + "\n");
    process.exit(0);
  }
  const quick = v.quick === true;
  const values = {} as Record<K, number>;
  for (const [name, s] of Object.entries(specs) as Array<[K, OptionSpec]>) {
    const raw = v[name];
    if (raw === undefined) {
      values[name] = quick ? s.quick : s.full;
      continue;
    }
    const n = Number(raw);
    if (typeof raw !== "string" || raw.trim() === "" || !Number.isFinite(n) || n < s.min || n > s.max || (s.integer && !Number.isInteger(n))) {
      process.stderr.write(`drill ${drill}: --${name} must be ${s.integer ? "an integer" : "a number"} ${s.min}..${s.max}, got "${String(raw)}"\n`);
      process.exit(2);
    }
    values[name] = n;
  }
  return {
    values,
    quick,
    json: typeof v.json === "string" ? path.resolve(v.json) : null,
    serviceLog: typeof v["service-log"] === "string" ? path.resolve(v["service-log"]) : null,
    verbose: v.verbose === true,
  };
}

// ---------------------------------------------------------------------------
// The drill's life: one temporary folder, undo steps run in reverse on every exit

export class Drill {
  private readonly undo: Array<{ what: string; fn: () => Promise<unknown> }> = [];
  private cleaning: Promise<void> | null = null;

  private constructor(
    readonly name: string,
    /** The temporary folder: the cluster (cluster/pg) and the service's KEYTRACK_DATA_DIR (service/). */
    readonly dir: string,
    readonly startedAt: number,
  ) {}

  static async create(name: string): Promise<Drill> {
    const dir = await mkdtemp(path.join(os.tmpdir(), `keytrack-drill-${name}-`));
    // As root, PostgreSQL runs as the postgres user, who must reach cluster/ inside it.
    await chmod(dir, 0o755);
    const drill = new Drill(name, dir, Date.now());
    drill.defer(`remove ${dir}`, () => rm(dir, { recursive: true, force: true }));
    return drill;
  }

  /** Runs fn at cleanup, after everything deferred later (LIFO). */
  defer(what: string, fn: () => Promise<unknown>): void {
    this.undo.push({ what, fn });
  }

  cleanup(): Promise<void> {
    this.cleaning ??= (async () => {
      while (this.undo.length) {
        const step = this.undo.pop()!;
        try {
          await step.fn();
        } catch (err) {
          process.stderr.write(`drill ${this.name}: cleanup step "${step.what}" failed: ${(err as Error).message}\n`);
        }
      }
    })();
    return this.cleaning;
  }
}

/**
 * Runs a drill: body returns whether every assertion held. Exit code 0 when
 * it did, 1 on a failed assertion, an exception or the time limit (maxMs),
 * 130/143 on SIGINT/SIGTERM. Cleanup runs in every case.
 */
export function runDrill(name: string, maxMs: number, body: (drill: Drill) => Promise<boolean>): void {
  let drill: Drill | null = null;
  let exiting = false;
  const finish = async (code: number, message?: string) => {
    if (exiting) return;
    exiting = true;
    if (message) process.stderr.write(`drill ${name}: ${message}\n`);
    await drill?.cleanup();
    process.exit(code);
  };
  const watchdog = setTimeout(() => {
    void finish(1, `FAIL: did not finish within ${Math.round(maxMs / 1000)} s (the drill's time limit): stopped`);
  }, maxMs);
  watchdog.unref();
  process.once("SIGINT", () => void finish(130, "interrupted (SIGINT): cleaning up"));
  process.once("SIGTERM", () => void finish(143, "terminated (SIGTERM): cleaning up"));
  process.on("uncaughtException", (err) => void finish(1, `FAIL: uncaught exception: ${err.stack ?? err}`));
  process.on("unhandledRejection", (err) => void finish(1, `FAIL: unhandled rejection: ${(err as Error)?.stack ?? err}`));

  (async () => {
    drill = await Drill.create(name);
    const passed = await body(drill);
    await finish(passed ? 0 : 1);
  })().catch((err: unknown) => finish(1, `FAIL: ${(err as Error)?.stack ?? String(err)}`));
}

// ---------------------------------------------------------------------------
// PostgreSQL: the embedded cluster in the drill's folder

export class Cluster {
  private handle: EmbeddedPostgres | null = null;
  private readonly lines: string[] = [];

  constructor(
    readonly dataDir: string,
    readonly port: number,
    private readonly verbose: boolean,
  ) {}

  /** Starts a cluster in <drill>/cluster on a random port (the socket's name; no TCP listener). */
  static async start(drill: Drill, verbose = false): Promise<Cluster> {
    const cluster = new Cluster(path.join(drill.dir, "cluster"), 20_000 + Math.floor(Math.random() * 40_000), verbose);
    drill.defer("stop PostgreSQL", () => cluster.stop());
    drill.defer("remove the socket folder", () => rm(socketDirFor(cluster.dataDir), { recursive: true, force: true }));
    await cluster.restart();
    return cluster;
  }

  get socketDir(): string {
    return socketDirFor(this.dataDir);
  }
  get rootUrl(): string {
    return socketUrl("postgres", "postgres", this.socketDir, this.port);
  }
  get ownerUrl(): string {
    return socketUrl(EMBEDDED_OWNER, EMBEDDED_DATABASE, this.socketDir, this.port);
  }
  get running(): boolean {
    return this.handle !== null;
  }
  /** The server's last log lines (warnings, errors, and everything with --verbose). */
  get logTail(): string[] {
    return [...this.lines];
  }

  /** Starts it (again) on the same folder and port; resolves once it accepts connections. */
  async restart(): Promise<void> {
    if (this.handle) return;
    this.handle = await startEmbeddedPostgres({
      dataDir: this.dataDir,
      port: this.port,
      verbose: this.verbose,
      log: (line) => {
        this.lines.push(line);
        if (this.lines.length > 100) this.lines.shift();
        if (this.verbose) process.stdout.write(`# [postgres] ${line}\n`);
      },
    });
  }

  /** Fast shutdown (open transactions rolled back, connections closed); resolves once it exited. */
  async stop(): Promise<void> {
    const handle = this.handle;
    this.handle = null;
    await handle?.stop();
  }
}

/**
 * The application_name of every connection the drills open themselves, so
 * that a drill can tell its own backends from the service's in pg_stat_activity
 * (the service sets none).
 */
export const DRILL_APPLICATION_NAME = "keytrack-drill";

/** A pool on the cluster (url: cluster.ownerUrl or cluster.rootUrl); survives the cluster going away and coming back. */
export function clusterPool(drill: Drill, url: string, what: string, max = 4): pg.Pool {
  const pool = new pg.Pool({ connectionString: url, max, connectionTimeoutMillis: 5000, application_name: DRILL_APPLICATION_NAME });
  pool.on("error", () => {}); // an idle connection lost while the cluster is stopped: the next query reconnects
  drill.defer(`close the ${what} pool`, () => pool.end());
  return pool;
}

/** A pool on the drill's database as its owner; survives the cluster going away and coming back. */
export function ownerPool(drill: Drill, cluster: Cluster): pg.Pool {
  return clusterPool(drill, cluster.ownerUrl, "owner");
}

// ---------------------------------------------------------------------------
// The service: `node --import tsx server/index.ts`, a child process

/** Settings of the service the drill's environment must not leak into it (they are set explicitly or left at their defaults). */
const INHERITED_SETTING = /^(PG[A-Z]+|KEYTRACK_.*|DATABASE_URL|[A-Z]+_DATABASE_URL|EMBEDDED_PG_PORT|PORT|HOST|APP_ENV|ADMIN_API_KEY|ALLOW_ANONYMOUS|UPSTREAM_.*|METRICS_TOKEN|RETENTION_DAYS|WORKER|WORKER_CONCURRENCY|ATTRIBUTION_.*|BACKFILL_.*|LOG_LEVEL|BODY_LIMIT|AUTH_.*|RECORD_.*|ECHO_MODEL|GRAPHIQL|GRAPHQL_.*|MAX_LIVE_KEYS_PER_USER)$/;

export interface ServiceOptions {
  drill: Drill;
  cluster: Cluster;
  /** KEYTRACK_DATA_DIR (the spool lives in <dataDir>/spool). */
  dataDir: string;
  adminApiKey: string;
  /** Every output line of the service is appended here too. */
  logFile?: string | null;
  /** Extra settings. */
  env?: Record<string, string>;
  /** Longest wait for GET /health 200. */
  readyTimeoutMs?: number;
}

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export class Service {
  private readonly lines: string[] = [];
  /** Lines at level warn or error, by level. */
  readonly levels = { warn: 0, error: 0, other: 0 };
  exit: Exit | null = null;
  readonly exited: Promise<Exit>;

  private constructor(
    readonly child: ChildProcess,
    readonly port: number,
    private readonly log: WriteStream | null,
  ) {
    this.exited = new Promise((resolve) => {
      child.once("exit", (code, signal) => {
        this.exit = { code, signal };
        resolve(this.exit);
      });
    });
    let buffer = "";
    const onData = (chunk: Buffer) => {
      this.log?.write(chunk);
      buffer += chunk.toString("utf8");
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        this.onLine(buffer.slice(0, nl));
        buffer = buffer.slice(nl + 1);
      }
    };
    child.stdout!.on("data", onData);
    child.stderr!.on("data", onData);
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }
  get pid(): number {
    return this.child.pid!;
  }
  get alive(): boolean {
    return this.exit === null;
  }
  /** The service's last output lines. */
  get logTail(): string[] {
    return [...this.lines];
  }

  private onLine(line: string): void {
    if (!line.trim()) return;
    this.lines.push(line);
    if (this.lines.length > 200) this.lines.shift();
    const level = /"level":"(\w+)"/.exec(line)?.[1];
    if (level === "warn") this.levels.warn++;
    else if (level === "error" || level === "fatal") this.levels.error++;
    else this.levels.other++;
  }

  /**
   * Starts the service on a free loopback port with the drill's settings and
   * waits for GET /health 200. Deferred: stopped (SIGTERM, then SIGKILL) at cleanup.
   */
  static async start(o: ServiceOptions): Promise<Service> {
    await mkdir(o.dataDir, { recursive: true });
    const log = o.logFile ? createWriteStream(o.logFile, { flags: "a" }) : null;
    let lastError: Error | null = null;
    // A free port can be taken between our probe and the service's listen: try another.
    for (let attempt = 1; attempt <= 3; attempt++) {
      const port = await freeLoopbackPort();
      const env: NodeJS.ProcessEnv = {};
      for (const [k, v] of Object.entries(process.env)) if (!INHERITED_SETTING.test(k)) env[k] = v;
      Object.assign(env, {
        DATABASE_URL: o.cluster.ownerUrl,
        ROOT_DATABASE_URL: o.cluster.rootUrl,
        APP_ENV: "production",
        ADMIN_API_KEY: o.adminApiKey,
        ECHO_MODEL: "true",
        ALLOW_ANONYMOUS: "true",
        HOST: "127.0.0.1",
        PORT: String(port),
        KEYTRACK_DATA_DIR: o.dataDir,
        LOG_LEVEL: "warn",
        WORKER: "true",
        AUTH_CACHE_TTL_MS: String(AUTH_CACHE_TTL_MS),
        ...o.env,
      });
      const child = spawn(process.execPath, ["--import", "tsx", "server/index.ts"], {
        cwd: projectRoot,
        env,
        stdio: ["ignore", "pipe", "pipe"],
      });
      const service = new Service(child, port, log);
      const stopOnCleanup = () => service.stop();
      o.drill.defer(`stop the service (pid ${child.pid})`, stopOnCleanup);
      try {
        await service.waitHealthy(o.readyTimeoutMs ?? 120_000);
        return service;
      } catch (err) {
        lastError = err as Error;
        await service.kill();
        const inUse = service.logTail.some((l) => l.includes("EADDRINUSE"));
        if (!inUse) break;
      }
    }
    log?.end();
    throw lastError!;
  }

  /** Polls GET /health until 200; fails if the process exits or time runs out. */
  async waitHealthy(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (!this.alive) {
        throw new Error(`the service exited before it was healthy (code ${this.exit!.code}, signal ${this.exit!.signal}); its last lines:\n${this.logTail.slice(-30).join("\n")}`);
      }
      try {
        const res = await fetch(`${this.url}/health`, { signal: AbortSignal.timeout(3000) });
        await res.arrayBuffer();
        if (res.status === 200) return;
      } catch {
        // not listening yet
      }
      if (Date.now() > deadline) {
        throw new Error(`GET /health did not answer 200 within ${Math.round(timeoutMs / 1000)} s; the service's last lines:\n${this.logTail.slice(-30).join("\n")}`);
      }
      await sleep(200);
    }
  }

  /** SIGTERM (graceful: in-flight requests finish, the spool is closed), SIGKILL after graceMs. */
  async stop(graceMs = 20_000): Promise<Exit> {
    if (!this.alive) return this.exit!;
    this.child.kill("SIGTERM");
    const timer = setTimeout(() => this.child.kill("SIGKILL"), graceMs);
    const exit = await this.exited;
    clearTimeout(timer);
    return exit;
  }

  /** SIGKILL: no shutdown at all (a crash). */
  async kill(): Promise<Exit> {
    if (!this.alive) return this.exit!;
    this.child.kill("SIGKILL");
    return this.exited;
  }

  async metrics(): Promise<Metrics> {
    const res = await fetch(`${this.url}/metrics`, { signal: AbortSignal.timeout(10_000) });
    const text = await res.text();
    if (res.status !== 200) throw new Error(`GET /metrics answered ${res.status}: ${text.slice(0, 200)}`);
    return new Metrics(text);
  }
}

/** A port nobody listens on at 127.0.0.1 right now (the OS picks it). */
export function freeLoopbackPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

// ---------------------------------------------------------------------------
// /metrics (Prometheus text format)

export class Metrics {
  /** Samples by metric name: labels text (`{a="b"}` or "") and value. */
  private readonly samples = new Map<string, Array<{ labels: string; value: number }>>();

  constructor(text: string) {
    for (const line of text.split("\n")) {
      if (!line || line.startsWith("#")) continue;
      const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)/.exec(line);
      if (!m) continue;
      const list = this.samples.get(m[1]!) ?? [];
      list.push({ labels: m[2] ?? "", value: Number(m[3]) });
      this.samples.set(m[1]!, list);
    }
  }

  has(name: string): boolean {
    return this.samples.has(name);
  }

  /** The sum over every label set (one sample for a label-less metric); null when the metric is absent. */
  value(name: string): number | null {
    const list = this.samples.get(name);
    return list ? list.reduce((sum, s) => sum + s.value, 0) : null;
  }
}

// ---------------------------------------------------------------------------
// Chat traffic at a fixed rate (POST /v1/chat/completions, model echo)

export interface Target {
  /** What kind of request this is, for the drill's own accounting (e.g. "key", "anonymous"). */
  kind: string;
  /** The key's name (DrillKey.name), null when anonymous. */
  keyName: string | null;
  secret: string | null;
}

export interface Answer {
  seq: number;
  kind: string;
  keyName: string | null;
  sentAt: number;
  doneAt: number;
  /** HTTP status, or "error" (no answer: socket error or timeout). */
  status: number | "error";
  requestId: string | null;
  error?: string;
}

/** Longest wait for one chat request's answer. */
export const REQUEST_TIMEOUT_MS = 15_000;

const chatBody = (seq: number) => JSON.stringify({ model: "echo", messages: [{ role: "user", content: `drill request ${seq}` }] });

/** One chat request; a 200 must carry a chat completion. Never throws. */
export async function send(url: string, seq: number, target: Target): Promise<Answer> {
  const sentAt = Date.now();
  const headers: Record<string, string> = { "content-type": "application/json" };
  if (target.secret) headers.authorization = `Bearer ${target.secret}`;
  try {
    const res = await fetch(`${url}/v1/chat/completions`, {
      method: "POST", headers, body: chatBody(seq), signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
    });
    const text = await res.text();
    let status: number | "error" = res.status;
    let error: string | undefined;
    if (res.status === 200) {
      try {
        if (!Array.isArray((JSON.parse(text) as { choices?: unknown }).choices)) throw new Error("no choices");
      } catch {
        status = "error";
        error = `200 without a chat completion: ${text.slice(0, 120)}`;
      }
    }
    return { seq, kind: target.kind, keyName: target.keyName, sentAt, doneAt: Date.now(), status, requestId: res.headers.get("x-request-id"), error };
  } catch (err) {
    return { seq, kind: target.kind, keyName: target.keyName, sentAt, doneAt: Date.now(), status: "error", requestId: null, error: (err as Error).message };
  }
}

/**
 * A fixed rate of requests (rate per second), at most maxInFlight at once:
 * what cannot be sent then is counted, not queued. pause() and resume() (e.g.
 * around a restart of the service, on another URL) leave the paused time out:
 * nothing is sent for it afterwards.
 */
export class Traffic {
  readonly answers: Answer[] = [];
  /** When each request that could not be sent (maxInFlight reached) was due. */
  readonly shedAt: number[] = [];
  private readonly inFlight = new Set<Promise<void>>();
  private timer: NodeJS.Timeout | null = null;
  private scheduled = 0;
  private scheduledAtStart = 0;
  private startedAt = 0;

  constructor(
    /** The service's base URL; resume() may change it. */
    public url: string,
    private readonly rate: number,
    private readonly maxInFlight: number,
    private readonly pick: (seq: number) => Target,
  ) {}

  get shed(): number {
    return this.shedAt.length;
  }

  get sent(): number {
    return this.scheduled - this.shed;
  }

  start(): void {
    if (this.timer) return;
    this.startedAt = Date.now();
    this.scheduledAtStart = this.scheduled;
    this.timer = setInterval(() => this.tick(), 5);
  }

  private tick(): void {
    const due = this.scheduledAtStart + Math.floor(((Date.now() - this.startedAt) * this.rate) / 1000);
    while (this.scheduled < due) {
      const seq = this.scheduled++;
      if (this.inFlight.size >= this.maxInFlight) {
        this.shedAt.push(Date.now());
        continue;
      }
      const p = send(this.url, seq, this.pick(seq)).then((a) => {
        this.answers.push(a);
      });
      this.inFlight.add(p);
      void p.finally(() => this.inFlight.delete(p));
    }
  }

  /** Stops sending; resolves once every request in flight has its answer (each is bounded by its timeout). */
  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    await Promise.allSettled([...this.inFlight]);
  }

  /** Like stop(); resume() carries on. */
  pause(): Promise<void> {
    return this.stop();
  }

  /** Sends again at the same rate (to url, when given) from now on. */
  resume(url?: string): void {
    if (url) this.url = url;
    this.start();
  }
}

/** Answers counted by HTTP status ("error": no answer). */
export function statusCounts(answers: Answer[]): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const a of answers) counts[String(a.status)] = (counts[String(a.status)] ?? 0) + 1;
  return counts;
}

// ---------------------------------------------------------------------------
// Users and keys, in SQL as the owner

export interface DrillKey {
  name: string;
  id: string;
  userId: string;
  secret: string;
}

export async function createUsers(pool: pg.Pool, count: number, tag: string): Promise<string[]> {
  const { rows } = await pool.query<{ id: string }>(
    "insert into app_public.users (email) select $1 || '-' || i || '@drill.example' from generate_series(1, $2::int) i returning id",
    [tag, count],
  );
  return rows.map((r) => r.id);
}

/** `perUser` keys for each user, with app_public.create_api_key (the secret comes back once). */
export async function createKeys(pool: pg.Pool, userIds: string[], perUser: number, tag: string): Promise<DrillKey[]> {
  const keys: DrillKey[] = [];
  for (const [u, userId] of userIds.entries()) {
    for (let k = 0; k < perUser; k++) {
      const name = `${tag}-${u + 1}-${k + 1}`;
      const { rows } = await pool.query<{ api_key_id: string; secret: string }>(
        "select api_key_id, secret from app_public.create_api_key($1, $2)",
        [userId, name],
      );
      keys.push({ name, id: rows[0]!.api_key_id, userId, secret: rows[0]!.secret });
    }
  }
  return keys;
}

/** A key secret in keytrack's format that does not exist yet (register it later with importKey). */
export function newKeySecret(): string {
  return `kt_live_${randomBytes(32).toString("hex")}`;
}

/** Registers a secret made by the drill by its hash (app_public.import_api_key): from now on it is a real key. */
export async function importKey(pool: pg.Pool, userId: string, secret: string, name: string): Promise<DrillKey> {
  const hash = createHash("sha256").update(secret, "utf8").digest();
  const { rows } = await pool.query<{ id: string }>(
    "select id from app_public.import_api_key($1, $2, $3, 'live', $4, $5)",
    [userId, hash, name, secret.slice(0, 12), secret.slice(-4)],
  );
  return { name, id: rows[0]!.id, userId, secret };
}

// ---------------------------------------------------------------------------
// Drain and the ledger

export interface DrainResult {
  drained: boolean;
  seconds: number;
  spoolDepth: number | null;
  present: number;
  expected: number;
}

/** How many of these request ids have at least one row. */
export async function countPresent(pool: pg.Pool, requestIds: string[]): Promise<number> {
  if (requestIds.length === 0) return 0;
  const { rows } = await pool.query<{ n: number }>(
    "select count(distinct request_id)::int as n from app_public.chat_completion_requests where request_id = any($1::text[])",
    [requestIds],
  );
  return rows[0]!.n;
}

/**
 * Waits (at most timeoutMs) until the service's spool is empty
 * (keytrack_spool_depth 0 on /metrics) and every request id is in the ledger.
 */
export async function drain(service: Service, pool: pg.Pool, requestIds: string[], timeoutMs: number): Promise<DrainResult> {
  const started = Date.now();
  let spoolDepth: number | null = null;
  let present = 0;
  for (;;) {
    try {
      spoolDepth = (await service.metrics()).value("keytrack_spool_depth");
      present = await countPresent(pool, requestIds);
    } catch {
      // the service or the database is still coming back
    }
    const drained = spoolDepth === 0 && present === requestIds.length;
    if (drained || Date.now() - started > timeoutMs) {
      return { drained, seconds: secondsSince(started), spoolDepth, present, expected: requestIds.length };
    }
    await sleep(250);
  }
}

/**
 * Waits (at most timeoutMs) until the service's spool holds at least atLeast
 * rows, it holds none in memory (keytrack_record_buffered 0) and the depth has
 * not changed for settleMs: every row it was still writing has reached the
 * spool, so a SIGKILL now loses nothing. Returns the last depth seen (null:
 * /metrics never answered).
 */
export async function waitForSpool(service: Service, atLeast: number, timeoutMs: number, settleMs = 1000): Promise<number | null> {
  const deadline = Date.now() + timeoutMs;
  let depth: number | null = null;
  let changedAt = Date.now();
  for (;;) {
    const m = await service.metrics().catch(() => null);
    const now = Date.now();
    const next = m?.value("keytrack_spool_depth") ?? null;
    if (next !== depth) changedAt = now;
    depth = next;
    if (depth !== null && depth >= atLeast && m?.value("keytrack_record_buffered") === 0 && now - changedAt >= settleMs) return depth;
    if (now > deadline) return depth;
    await sleep(200);
  }
}

export interface LedgerRow {
  count: number;
  apiKeyId: string | null;
  attributionStatus: string;
  attributionReason: string | null;
  spooled: boolean;
}

/** Every request id in the ledger, with how many rows it has. */
export async function readLedger(pool: pg.Pool): Promise<Map<string, LedgerRow>> {
  const { rows } = await pool.query<{ request_id: string; n: number; api_key_id: string | null; attribution_status: string; attribution_reason: string | null; spooled: boolean }>(
    `select request_id, count(*)::int as n, min(api_key_id::text) as api_key_id,
            min(attribution_status) as attribution_status, min(attribution_reason) as attribution_reason,
            bool_or(spooled_at is not null) as spooled
       from app_public.chat_completion_requests group by request_id`,
  );
  return new Map(rows.map((r) => [r.request_id, { count: r.n, apiKeyId: r.api_key_id, attributionStatus: r.attribution_status, attributionReason: r.attribution_reason, spooled: r.spooled }]));
}

/**
 * What a request's row must say: its key's id, anonymous, or (a key that was
 * never registered) pending or failed, with reason not_found.
 */
export type Expected = { apiKeyId: string } | { anonymous: true } | { notFound: true };

const describeExpected = (e: Expected) => ("apiKeyId" in e ? `key ${e.apiKeyId}` : "anonymous" in e ? "anonymous" : "pending or failed, not_found");

/** Whether a row says what was expected. */
export function rowMatches(row: LedgerRow, expected: Expected): boolean {
  if ("anonymous" in expected) return row.attributionStatus === "anonymous";
  if ("notFound" in expected) return (row.attributionStatus === "pending" || row.attributionStatus === "failed") && row.attributionReason === "not_found";
  return row.attributionStatus === "resolved" && row.apiKeyId === expected.apiKeyId;
}

export interface LedgerCheck {
  /** Rows in the whole ledger. */
  rows: number;
  /** Served (2xx) request ids without a row. */
  lost: number;
  lostIds: string[];
  /** Request ids with more than one row (whole ledger). */
  duplicates: number;
  /** Rows whose request id is not among the served ones (e.g. a request whose answer the drill never saw). */
  unknownRows: number;
  /** Rows of served requests that do not say what was expected (another key, not anonymous when no key was sent, ...). */
  misattributed: number;
  misattributedExamples: string[];
  /** Rows of served requests by attribution_status. */
  attribution: Record<string, number>;
  /** Rows of served requests that went through the spool (spooled_at set). */
  spooled: number;
}

export function checkLedger(ledger: Map<string, LedgerRow>, served: Map<string, Expected>): LedgerCheck {
  let rows = 0;
  let duplicates = 0;
  let unknownRows = 0;
  for (const [id, row] of ledger) {
    rows += row.count;
    if (row.count > 1) duplicates++;
    if (!served.has(id)) unknownRows += row.count;
  }
  const lostIds: string[] = [];
  const misattributedExamples: string[] = [];
  let misattributed = 0;
  let spooled = 0;
  const attribution: Record<string, number> = {};
  for (const [id, expected] of served) {
    const row = ledger.get(id);
    if (!row) {
      lostIds.push(id);
      continue;
    }
    attribution[row.attributionStatus] = (attribution[row.attributionStatus] ?? 0) + 1;
    if (row.spooled) spooled++;
    if (!rowMatches(row, expected)) {
      misattributed++;
      if (misattributedExamples.length < 5) {
        misattributedExamples.push(`${id}: expected ${describeExpected(expected)}, row says ${row.attributionStatus}${row.attributionReason ? ` (${row.attributionReason})` : ""} key ${row.apiKeyId}`);
      }
    }
  }
  return { rows, lost: lostIds.length, lostIds: lostIds.slice(0, 20), duplicates, unknownRows, misattributed, misattributedExamples, attribution, spooled };
}

/**
 * Requests the service's processes accepted (numbered) that have no row, by
 * app_public.completeness_gaps() with no replay window: the drill has drained,
 * so every row that will land has landed. Must be 0.
 */
export async function completenessGaps(pool: pg.Pool): Promise<{ missing: number; ranges: string[] }> {
  const { rows } = await pool.query<{ process_id: string; process_state: string; from_seq: string; to_seq: string; missing: string }>(
    "select process_id, process_state, from_seq, to_seq, missing from app_public.completeness_gaps('0 seconds')");
  return {
    missing: rows.reduce((n, r) => n + Number(r.missing), 0),
    ranges: rows.slice(0, 5).map((r) => `${r.process_id.slice(0, 8)} (${r.process_state}) ${r.from_seq}..${r.to_seq}`),
  };
}

// ---------------------------------------------------------------------------
// Assertions and the printed summary

export class Verdict {
  readonly failures: string[] = [];

  /** Records a failed assertion (printed at the end) unless ok. */
  check(ok: boolean, what: string): boolean {
    if (!ok) this.failures.push(what);
    return ok;
  }

  get passed(): boolean {
    return this.failures.length === 0;
  }
}

/** Prints `label  value` lines under a heading; the labels are what tests/drills match on. */
export function printSection(title: string, rows: Array<[string, string | number]>): void {
  const width = Math.max(...rows.map(([label]) => label.length));
  process.stdout.write(`\n${title}\n`);
  for (const [label, value] of rows) process.stdout.write(`  ${label.padEnd(width)}  ${value}\n`);
}

export function formatCounts(counts: Record<string, number>): string {
  const entries = Object.entries(counts).sort(([a], [b]) => a.localeCompare(b));
  return entries.length ? entries.map(([k, n]) => `${k}: ${n}`).join(", ") : "none";
}

/** Prints the verdict and the service's last lines on failure, writes the JSON summary; returns passed. */
export async function conclude(
  drill: Drill,
  verdict: Verdict,
  summary: Record<string, unknown>,
  opts: { json: string | null; services?: Service[]; cluster?: Cluster | null },
): Promise<boolean> {
  const full = { drill: drill.name, passed: verdict.passed, failures: verdict.failures, seconds: secondsSince(drill.startedAt), ...summary };
  if (opts.json) {
    await mkdir(path.dirname(opts.json), { recursive: true });
    await writeFile(opts.json, JSON.stringify(full, null, 2) + "\n");
  }
  if (!verdict.passed) {
    for (const service of opts.services ?? []) {
      const tail = service.logTail.slice(-40);
      if (tail.length) process.stdout.write(`\n# the service's (pid ${service.pid}) last ${tail.length} log lines:\n${tail.map((l) => `#   ${l}`).join("\n")}\n`);
    }
    const pgTail = opts.cluster?.logTail.slice(-20) ?? [];
    if (pgTail.length) process.stdout.write(`\n# PostgreSQL's last log lines:\n${pgTail.map((l) => `#   ${l}`).join("\n")}\n`);
  }
  process.stdout.write(
    verdict.passed
      ? `\ndrill ${drill.name}: PASS (${full.seconds} s)${opts.json ? `; summary in ${opts.json}` : ""}\n`
      : `\ndrill ${drill.name}: FAIL (${verdict.failures.length} failed assertion${verdict.failures.length === 1 ? "" : "s"}):\n${verdict.failures.map((f) => `  - ${f}`).join("\n")}\n`,
  );
  return verdict.passed;
}

/** Mean of a list (NaN when empty). */
export function mean(xs: number[]): number {
  return xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : Number.NaN;
}
