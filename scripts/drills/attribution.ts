// `npm run drill:attribution [-- --quick] [--json PATH] [--seconds N] [--outage-seconds N] [--late-rows N] [--late-keys N] ...`
//
// Attribution under every fault at once, on loopback only: a PostgreSQL
// cluster of its own (temporary folder, random port, Unix socket; never the
// machine's shared server), the keytrack service as a child process (echo
// model, worker, anonymous requests allowed), and at the same time:
//
// - steady chat traffic over HTTP with known keys, and anonymous requests;
// - a SQL writer (the owner, like another gateway) inserting rows in batches
//   that present the hashes of keys that do not exist yet ("late" keys: the
//   rows are pending), of keys that never will (never registered), and no
//   key at all (anonymous); each wave of late keys is imported in bulk by
//   hash (app_public.import_api_keys) a few seconds after its rows are in;
// - every few seconds, pg_terminate_backend of every backend of the service
//   (the drill's own connections are spared: they carry its application_name);
// - a database outage (cluster stopped, started again on the same folder and
//   port) ending with a SIGKILL of the service while its spool holds rows,
//   and a restart on the same KEYTRACK_DATA_DIR;
// - then the retry window: a bounded wait until no row presenting an existing
//   key is pending.
//
// Waves of late keys: some are written and imported before the outage (the
// outage waits until --import-guard-seconds after the last of these imports,
// so that their import-to-attribution time measures the retry worker, not the
// outage), one is written as the outage begins and imported after the
// restart (its rows wait through the outage, the SIGKILL and the restart), the
// rest are written and imported after the restart.
//
// Asserts: of the rows presenting a key that exists (HTTP known keys, late
// keys once imported), 100.00% attributed to that key; 0 rows lost (every
// served 2xx and every committed SQL insert has its row); 0 duplicate
// request_ids; rows of never-registered keys pending or failed with reason
// not_found; anonymous rows anonymous; 0 completeness gaps; no exit of the
// service the drill did not cause (a service that exits anyway is restarted on
// the same data folder, as a supervisor would, so the drill goes on and
// measures the rest); and, in the full run only, p99 of (attributed_at - the
// import's commit time) over the late rows at most --target-p99-seconds
// (printed, not asserted, with --quick).
// The import's commit time is exact: the drill turns track_commit_timestamp
// on in its cluster and reads pg_xact_commit_timestamp of the imported keys.
//
// Exit code 0 when every assertion holds, 1 otherwise; everything it started
// is stopped and removed on every exit.
import { createHash, randomBytes } from "node:crypto";
import path from "node:path";

import type pg from "pg";

import { EMBEDDED_DATABASE } from "../../server/db/embedded.js";
import {
  checkLedger, Cluster, clusterPool, completenessGaps, conclude, createKeys, createUsers, drain, DRILL_APPLICATION_NAME, formatCounts,
  newKeySecret, ownerPool, parseDrillArgs, printSection, readLedger, runDrill, say, secondsSince, Service, sleep, statusCounts, Traffic,
  Verdict, waitForSpool, type Exit, type Expected, type LedgerCheck, type LedgerRow, type Target,
} from "./harness.js";

const opts = parseDrillArgs("attribution", {
  seconds: { full: 30, quick: 10, min: 1, max: 3600, help: "traffic before the outage, seconds, at least (the outage also waits --import-guard-seconds after the last import before it)" },
  "outage-seconds": { full: 20, quick: 3, min: 1, max: 3600, help: "how long PostgreSQL is stopped, seconds (the service is SIGKILLed at its end)" },
  "after-seconds": { full: 30, quick: 10, min: 1, max: 3600, help: "traffic after the service restarted, seconds, at least (it goes on until the last wave is imported)" },
  rate: { full: 40, quick: 20, min: 1, max: 2000, help: "HTTP requests per second", integer: true },
  concurrency: { full: 64, quick: 32, min: 1, max: 1024, help: "most HTTP requests in flight at once", integer: true },
  "late-rows": { full: 100_000, quick: 5_000, min: 1, max: 2_000_000, help: "rows the SQL writer inserts with keys that do not exist yet", integer: true },
  "late-keys": { full: 200, quick: 60, min: 3, max: 100_000, help: "late keys those rows are spread over, imported in bulk in waves", integer: true },
  waves: { full: 5, quick: 3, min: 3, max: 100, help: "waves of late keys (before the outage, one across it, after it)", integer: true },
  "never-rows": { full: 2_000, quick: 200, min: 0, max: 1_000_000, help: "rows with keys that are never registered", integer: true },
  "never-keys": { full: 20, quick: 5, min: 1, max: 10_000, help: "never-registered keys", integer: true },
  "anonymous-rows": { full: 2_000, quick: 200, min: 0, max: 1_000_000, help: "anonymous rows from the SQL writer (no key, no user)", integer: true },
  "batch-rows": { full: 1_000, quick: 500, min: 1, max: 100_000, help: "rows per INSERT of the SQL writer", integer: true },
  "import-delay-seconds": { full: 3, quick: 2, min: 0, max: 600, help: "wait between a wave's last committed row and its import" },
  "import-guard-seconds": { full: 10, quick: 3, min: 0, max: 600, help: "the outage starts at least this long after the last import before it" },
  "kill-every-seconds": { full: 3, quick: 2, min: 0, max: 600, help: "pg_terminate_backend of the service's backends this often (0: never)" },
  "target-p99-seconds": { full: 5, quick: 5, min: 0.01, max: 3600, help: "p99 of import commit to attribution, late rows (asserted in full runs only)" },
  "retry-seconds": { full: 180, quick: 120, min: 5, max: 3600, help: "longest wait, after the traffic, until no row presenting an existing key is pending" },
  "drain-seconds": { full: 120, quick: 60, min: 5, max: 3600, help: "longest wait for the drain" },
});
const o = opts.values;
const SECONDS = o.seconds, OUTAGE = o["outage-seconds"], AFTER = o["after-seconds"], RATE = o.rate;
const LATE_ROWS = o["late-rows"], LATE_KEYS = o["late-keys"], WAVES = Math.min(o.waves, LATE_KEYS), BATCH = o["batch-rows"];
const IMPORT_DELAY_MS = o["import-delay-seconds"] * 1000, GUARD_MS = o["import-guard-seconds"] * 1000, KILL_EVERY_MS = o["kill-every-seconds"] * 1000;
const TARGET_P99 = o["target-p99-seconds"];
const DRAIN_MS = o["drain-seconds"] * 1000, RETRY_MS = o["retry-seconds"] * 1000;
/** The wave across the outage starts writing this long before PostgreSQL stops, so a batch is in flight when it does. */
const ACROSS_LEAD_MS = 500;
/** The SQL writer and the importer give up after this long without a success (the database should be back long before). */
const SQL_GIVE_UP_MS = (OUTAGE + 120) * 1000;
/** A verified key must be served for the whole outage. */
const AUTH_STALE_MAX_MS = Math.max(900_000, (OUTAGE + 60) * 1000);

const sha256hex = (secret: string) => createHash("sha256").update(secret, "utf8").digest("hex");
const pct = (part: number, whole: number) => (whole === 0 ? "n/a" : `${(Math.floor((part / whole) * 10_000) / 100).toFixed(2)}%`);
const fmt = (x: number | null | undefined, digits = 2) => (x === null || x === undefined || !Number.isFinite(x) ? "n/a" : x.toFixed(digits));

// ---------------------------------------------------------------------------
// What the SQL writer inserts

type SqlKind = "late" | "never" | "anonymous";

interface SqlRow {
  requestId: string;
  kind: SqlKind;
  /** Hex SHA-256 of the key presented; null for anonymous rows. */
  hashHex: string | null;
  /** The late key's index (kind late). */
  lateKey?: number;
}

interface LateKey {
  index: number;
  wave: number;
  secret: string;
  hashHex: string;
  userId: string;
  /** Its id once imported. */
  id: string | null;
}

type Placement = "before" | "across" | "after";

interface Wave {
  index: number;
  placement: Placement;
  keys: LateKey[];
  rows: SqlRow[];
  insertStartedAt: number;
  insertDoneAt: number;
  /** Rows committed before PostgreSQL was asked to stop. */
  rowsBeforeOutage: number;
  importSentAt: number;
  /** When the drill saw the import's answer (its commit is a little earlier: importCommittedAt). */
  importSeenAt: number;
  /** The import's commit time, from pg_xact_commit_timestamp (ms since the epoch). */
  importCommittedAt: number | null;
  importAttempts: number;
  importOutcomes: Record<string, number>;
}

/** Shuffles in place (Fisher-Yates), so a batch mixes late, never-registered and anonymous rows. */
function shuffle<T>(xs: T[]): T[] {
  for (let i = xs.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [xs[i], xs[j]] = [xs[j]!, xs[i]!];
  }
  return xs;
}

/** n split into `parts` near-equal whole parts. */
const split = (n: number, parts: number) => Array.from({ length: parts }, (_, i) => Math.floor((n * (i + 1)) / parts) - Math.floor((n * i) / parts));

const INSERT_SQL = `
  insert into app_public.chat_completion_requests
    (request_id, api_key_hash, model, provider, input_tokens, output_tokens, processing_time_ms, status)
  select t.request_id, decode(t.hash_hex, 'hex'), 'gpt-4o-mini', 'other-gateway', 12, 34, 850, 'completed'
    from unnest($1::text[], $2::text[]) as t(request_id, hash_hex)`;

/** A gateway of its own writing through SQL: each batch retried until it commits (request_id makes a retry harmless). */
class SqlWriter {
  /** Request ids of every committed row, with what it is. */
  readonly committed = new Map<string, SqlRow>();
  batches = 0;
  failedAttempts = 0;
  retriedBatches = 0;
  /** Rows a retried batch found already there (its earlier attempt had committed after all). */
  alreadyCommittedOnRetry = 0;
  lastError: string | null = null;

  constructor(private readonly pool: pg.Pool) {}

  /** Inserts the rows in batches; resolves once every batch has committed. */
  async insert(rows: SqlRow[], onCommit?: (n: number) => void): Promise<void> {
    for (let i = 0; i < rows.length; i += BATCH) {
      const batch = rows.slice(i, i + BATCH);
      await this.insertBatch(batch);
      onCommit?.(batch.length);
    }
  }

  private async insertBatch(batch: SqlRow[]): Promise<void> {
    const failingSince = Date.now();
    for (let attempt = 1; ; attempt++) {
      try {
        const res = await this.pool.query(INSERT_SQL, [batch.map((r) => r.requestId), batch.map((r) => r.hashHex)]);
        this.batches++;
        if (attempt > 1) {
          this.retriedBatches++;
          this.alreadyCommittedOnRetry += batch.length - (res.rowCount ?? 0);
        }
        for (const r of batch) this.committed.set(r.requestId, r);
        return;
      } catch (err) {
        this.failedAttempts++;
        this.lastError = (err as Error).message;
        if (Date.now() - failingSince > SQL_GIVE_UP_MS) throw new Error(`the SQL writer could not insert a batch for ${SQL_GIVE_UP_MS / 1000} s: ${this.lastError}`);
        await sleep(Math.min(2000, 100 * 2 ** Math.min(attempt, 5)));
      }
    }
  }
}

/** Runs a query until it succeeds (the database may be away for a while). */
async function persist<T extends pg.QueryResultRow>(pool: pg.Pool, what: string, sql: string, params: unknown[], attempts?: { n: number }): Promise<pg.QueryResult<T>> {
  const failingSince = Date.now();
  for (let attempt = 1; ; attempt++) {
    if (attempts) attempts.n = attempt;
    try {
      return await pool.query<T>(sql, params);
    } catch (err) {
      if (Date.now() - failingSince > SQL_GIVE_UP_MS) throw new Error(`${what} failed for ${SQL_GIVE_UP_MS / 1000} s: ${(err as Error).message}`);
      await sleep(Math.min(2000, 100 * 2 ** Math.min(attempt, 5)));
    }
  }
}

// ---------------------------------------------------------------------------
// Connection kills

const KILL_SQL = `
  select count(*) filter (where pg_terminate_backend(a.pid))::int as killed,
         count(*) filter (where a.state = 'active')::int as active
    from pg_stat_activity a
   where a.datname = $1 and a.backend_type = 'client backend' and a.pid <> pg_backend_pid()
     and a.application_name is distinct from $2`;

class Killer {
  rounds = 0;
  backends = 0;
  /** Of those, busy with a statement when killed. */
  active = 0;
  errors = 0;
  private stopped = false;
  private loop: Promise<void> | null = null;

  constructor(
    private readonly root: pg.Pool,
    /** Whether to kill now (not while PostgreSQL is down, nor while the service starts: its migrations). */
    private readonly shouldKill: () => boolean,
  ) {}

  start(): void {
    if (KILL_EVERY_MS <= 0) return;
    this.loop = (async () => {
      while (!this.stopped) {
        const next = Date.now() + KILL_EVERY_MS;
        while (!this.stopped && Date.now() < next) await sleep(Math.min(200, next - Date.now()));
        if (this.stopped || !this.shouldKill()) continue;
        try {
          const { rows } = await this.root.query<{ killed: number; active: number }>(KILL_SQL, [EMBEDDED_DATABASE, DRILL_APPLICATION_NAME]);
          this.rounds++;
          this.backends += rows[0]!.killed;
          this.active += rows[0]!.active;
        } catch {
          this.errors++;
        }
      }
    })();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await this.loop;
  }
}

// ---------------------------------------------------------------------------
// The service, supervised: restarted on the same data folder when it exits
// unexpectedly, as systemd or Kubernetes would, so the drill goes on and
// measures the rest; every such exit is recorded and fails the drill.

interface Crash {
  at: number;
  pid: number;
  code: number | null;
  signal: string | null;
  /** The service's last output lines before it exited (its stack trace, when it printed one). */
  lastLines: string[];
}

class Supervisor {
  readonly services: Service[] = [];
  readonly crashes: Crash[] = [];
  current!: Service;
  /** True while a service is starting. */
  starting = false;
  stopping = false;
  private readonly planned = new Set<Service>();
  private recovering: Promise<void> | null = null;

  constructor(
    private readonly startOne: () => Promise<Service>,
    private readonly cluster: Cluster,
    /** Told of every new service (the traffic follows it). */
    private readonly onStart: (service: Service) => void,
  ) {}

  async start(): Promise<Service> {
    this.starting = true;
    let service: Service;
    try {
      service = await this.startOne();
    } finally {
      this.starting = false;
    }
    this.services.push(service);
    this.current = service;
    this.onStart(service);
    void service.exited.then((exit) => {
      if (this.planned.has(service) || this.stopping) return;
      const tail = service.logTail;
      const firstStackLine = tail.findIndex((l) => /^\S.*\.js:\d+$/.test(l) || /^(Error|TypeError|RangeError)\b/.test(l));
      this.crashes.push({
        at: Date.now(), pid: service.pid, code: exit.code, signal: exit.signal,
        lastLines: (firstStackLine >= 0 ? tail.slice(firstStackLine) : tail.slice(-12)).slice(0, 16),
      });
      say(`the service (pid ${service.pid}) exited unexpectedly (code ${exit.code}, signal ${exit.signal}); restarting it on the same data folder`);
      const recovering: Promise<void> = (async () => {
        // Bounded by the drill's time limit. A start can fail when PostgreSQL stops meanwhile (the outage): then again.
        for (;;) {
          while (!this.cluster.running && !this.stopping) await sleep(200);
          if (this.stopping) return;
          try {
            await this.start();
            return;
          } catch (err) {
            say(`restarting the service failed (${(err as Error).message.split("\n")[0]}); trying again`);
            await sleep(1000);
          }
        }
      })().finally(() => {
        if (this.recovering === recovering) this.recovering = null;
      });
      this.recovering = recovering;
    });
    return service;
  }

  /** Resolves once no restart after a crash is under way. */
  async settled(): Promise<void> {
    while (this.recovering) await this.recovering;
  }

  /** SIGKILL of the current service, on purpose (null: it was not running). */
  async kill(): Promise<Exit | null> {
    const service = this.current;
    if (!service.alive) return null;
    this.planned.add(service);
    return service.kill();
  }

  /** After kill(): a new service on the same data folder (or the one a crash restart under way brings up). */
  async restart(): Promise<Service> {
    await this.settled();
    if (this.current.alive) return this.current;
    return this.start();
  }

  /** SIGTERM of the current service, at the end. */
  async stop(): Promise<Exit> {
    this.stopping = true;
    await this.settled();
    return this.current.stop();
  }
}

// ---------------------------------------------------------------------------
// SQL read at the end

const PENDING_KNOWN_SQL = `
  select count(*)::int as n from app_public.chat_completion_requests r
   where r.attribution_status = 'pending'
     and exists (select 1 from app_private.api_key_secrets s where s.key_hash = r.api_key_hash)`;

/** Per wave (and all waves: wave null): late rows, attributed, p50/p99/max/min of attributed_at - the import's commit, the span. */
const LATENCY_SQL = `
  with keys as (
    select decode(t.h, 'hex') as key_hash, t.w from unnest($1::text[], $2::int[]) as t(h, w)
  ), imported as (
    select k.w, k.key_hash, pg_xact_commit_timestamp(s.xmin) as committed_at
      from keys k join app_private.api_key_secrets s on s.key_hash = k.key_hash
  ), lat as (
    select i.w, i.committed_at, r.attributed_at, extract(epoch from r.attributed_at - i.committed_at)::float8 as s
      from app_public.chat_completion_requests r
      join imported i on i.key_hash = r.api_key_hash
     where r.request_id like 'sql-late-%'
  )
  select w, count(*)::int as rows, count(attributed_at)::int as attributed,
         percentile_cont(0.5) within group (order by s) as p50,
         percentile_cont(0.99) within group (order by s) as p99,
         max(s) as max, min(s) as min,
         extract(epoch from min(committed_at))::float8 * 1000 as committed_ms,
         extract(epoch from max(committed_at))::float8 * 1000 as last_committed_ms,
         extract(epoch from max(attributed_at))::float8 * 1000 as last_attributed_ms
    from lat group by rollup (w) order by w nulls last`;

interface LatencyRow {
  w: number | null;
  rows: number;
  attributed: number;
  p50: number | null;
  p99: number | null;
  max: number | null;
  min: number | null;
  committed_ms: number | null;
  last_committed_ms: number | null;
  last_attributed_ms: number | null;
}

/** Seconds covered by the union of the intervals [from, to] (ms). */
function unionSeconds(intervals: Array<[number, number]>): number {
  const sorted = intervals.filter(([a, b]) => b >= a).sort(([a], [b]) => a - b);
  let total = 0;
  let cur: [number, number] | null = null;
  for (const [a, b] of sorted) {
    if (cur && a <= cur[1]) cur[1] = Math.max(cur[1], b);
    else {
      if (cur) total += cur[1] - cur[0];
      cur = [a, b];
    }
  }
  if (cur) total += cur[1] - cur[0];
  return total / 1000;
}

// ---------------------------------------------------------------------------

runDrill("attribution", (SECONDS + OUTAGE + AFTER) * 1000 + DRAIN_MS + RETRY_MS + 15 * 60_000, async (drill) => {
  const verdict = new Verdict();
  say(`attribution drill in ${drill.dir}: ${LATE_ROWS} late rows over ${LATE_KEYS} late keys in ${WAVES} waves, ${o["never-rows"]} never-registered and ${o["anonymous-rows"]} anonymous SQL rows, ` +
    `${RATE} HTTP requests/s, connection kills every ${o["kill-every-seconds"]} s, ${OUTAGE} s outage then SIGKILL${opts.quick ? " (--quick)" : ""}`);

  // ---- the cluster, with commit timestamps (the exact commit time of each import) ----
  const cluster = await Cluster.start(drill, opts.verbose);
  const root = clusterPool(drill, cluster.rootUrl, "root", 2);
  await root.query("alter system set track_commit_timestamp = on");
  await cluster.stop();
  await cluster.restart();
  const tct = await persist<{ track_commit_timestamp: string }>(root, "show track_commit_timestamp", "show track_commit_timestamp", []);
  if (tct.rows[0]!.track_commit_timestamp !== "on") throw new Error("track_commit_timestamp did not turn on");
  say(`PostgreSQL running (socket ${cluster.socketDir}, port ${cluster.port}, track_commit_timestamp on)`);

  const serviceDataDir = path.join(drill.dir, "service");
  const adminApiKey = randomBytes(20).toString("hex");
  const startService = () =>
    Service.start({
      drill, cluster, dataDir: serviceDataDir, adminApiKey, logFile: opts.serviceLog,
      env: { ECHO_MODEL: "true", WORKER: "true", ALLOW_ANONYMOUS: "true", AUTH_STALE_MAX_MS: String(AUTH_STALE_MAX_MS) },
    });
  let traffic: Traffic | null = null;
  let outage = false;
  const supervisor = new Supervisor(startService, cluster, (s) => {
    if (traffic) traffic.url = s.url;
  });
  const service = await supervisor.start();
  say(`service running (pid ${service.pid}, ${service.url})`);
  const pool = ownerPool(drill, cluster);

  // ---- keys and rows ----
  const users = await createUsers(pool, 5, "attr");
  const keys = await createKeys(pool, users.slice(0, 3), 2, "key");
  const keyIdByName = new Map(keys.map((k) => [k.name, k.id]));
  const lateKeys: LateKey[] = Array.from({ length: LATE_KEYS }, (_, index) => {
    const secret = newKeySecret();
    return { index, wave: Math.floor((index * WAVES) / LATE_KEYS), secret, hashHex: sha256hex(secret), userId: users[index % users.length]!, id: null };
  });
  const neverHashes = Array.from({ length: o["never-keys"] }, () => sha256hex(newKeySecret()));
  const lateRowsPerWave = split(LATE_ROWS, WAVES);
  const neverPerWave = split(o["never-rows"], WAVES);
  const anonPerWave = split(o["anonymous-rows"], WAVES);
  const counters = { late: 0, never: 0, anonymous: 0 };
  const beforeCount = Math.floor((WAVES - 1) / 2);
  const waves: Wave[] = Array.from({ length: WAVES }, (_, w) => {
    const wKeys = lateKeys.filter((k) => k.wave === w);
    const rows: SqlRow[] = [];
    for (let i = 0; i < lateRowsPerWave[w]!; i++) {
      const key = wKeys[i % wKeys.length]!;
      rows.push({ requestId: `sql-late-${++counters.late}`, kind: "late", hashHex: key.hashHex, lateKey: key.index });
    }
    for (let i = 0; i < neverPerWave[w]!; i++) rows.push({ requestId: `sql-never-${++counters.never}`, kind: "never", hashHex: neverHashes[counters.never % neverHashes.length]! });
    for (let i = 0; i < anonPerWave[w]!; i++) rows.push({ requestId: `sql-anon-${++counters.anonymous}`, kind: "anonymous", hashHex: null });
    const placement: Placement = w < beforeCount ? "before" : w === beforeCount ? "across" : "after";
    return {
      index: w, placement, keys: wKeys, rows: shuffle(rows), insertStartedAt: 0, insertDoneAt: 0, rowsBeforeOutage: 0,
      importSentAt: 0, importSeenAt: 0, importCommittedAt: null, importAttempts: 0, importOutcomes: {},
    };
  });

  const writer = new SqlWriter(pool);
  let pgStopRequestedAt = Infinity;
  const insertWave = async (wave: Wave) => {
    wave.insertStartedAt = Date.now();
    await writer.insert(wave.rows, (n) => {
      if (Date.now() < pgStopRequestedAt) wave.rowsBeforeOutage += n;
    });
    wave.insertDoneAt = Date.now();
    say(`wave ${wave.index + 1} (${wave.placement}): ${wave.rows.length} SQL rows committed in ${secondsSince(wave.insertStartedAt, wave.insertDoneAt)} s`);
  };
  const importWave = async (wave: Wave) => {
    const entries = wave.keys.map((k) => ({ key_hash: k.hashHex, user_id: k.userId, name: `late-${k.index + 1}` }));
    wave.importSentAt = Date.now();
    const attempts = { n: 0 };
    const { rows } = await persist<{ position: number; outcome: string; reason: string | null; api_key_id: string | null }>(
      pool, `import of wave ${wave.index + 1}`, "select position, outcome, reason, api_key_id from app_public.import_api_keys($1::jsonb)", [JSON.stringify(entries)], attempts);
    wave.importSeenAt = Date.now();
    wave.importAttempts = attempts.n;
    for (const r of rows) {
      wave.importOutcomes[r.outcome] = (wave.importOutcomes[r.outcome] ?? 0) + 1;
      const key = wave.keys[r.position - 1]!;
      if (r.api_key_id && (r.outcome === "imported" || r.outcome === "already_present")) key.id = r.api_key_id;
    }
    const { rows: ts } = await persist<{ ms: number | null }>(pool, "commit time", `
      select extract(epoch from max(pg_xact_commit_timestamp(s.xmin)))::float8 * 1000 as ms
        from app_private.api_key_secrets s where s.key_hash = any(array(select decode(h, 'hex') from unnest($1::text[]) h))`,
      [wave.keys.map((k) => k.hashHex)]);
    wave.importCommittedAt = ts[0]?.ms ?? null;
    say(`wave ${wave.index + 1}: ${wave.keys.length} late keys imported (${formatCounts(wave.importOutcomes)}), ${secondsSince(wave.insertDoneAt, wave.importSeenAt)} s after its last row`);
  };

  // ---- HTTP traffic and connection kills ----
  let nextKey = 0;
  const pick = (seq: number): Target => {
    if (seq % 10 >= 8) return { kind: "anonymous", keyName: null, secret: null };
    const key = keys[nextKey++ % keys.length]!;
    return { kind: "key", keyName: key.name, secret: key.secret };
  };
  traffic = new Traffic(service.url, RATE, o.concurrency, pick);
  const killer = new Killer(root, () => !outage && cluster.running && !supervisor.starting);
  const trafficStartedAt = Date.now();
  traffic.start();
  killer.start();
  say(`traffic started: ${RATE} requests/s; connection kills every ${o["kill-every-seconds"]} s`);

  // ---- before the outage: waves written, then imported ----
  for (const wave of waves.filter((w) => w.placement === "before")) {
    await insertWave(wave);
    await sleep(IMPORT_DELAY_MS);
    await importWave(wave);
  }
  const lastImportBefore = Math.max(0, ...waves.filter((w) => w.placement === "before").map((w) => w.importSeenAt));
  const outageAt = Math.max(trafficStartedAt + SECONDS * 1000, lastImportBefore + GUARD_MS);
  const across = waves.find((w) => w.placement === "across")!;
  const acrossInsert = (async () => {
    await sleep(Math.max(0, outageAt - ACROSS_LEAD_MS - Date.now()));
    await insertWave(across);
  })();
  acrossInsert.catch(() => {}); // awaited below; a failure is reported there
  await sleep(Math.max(0, outageAt - Date.now()));

  // ---- the outage, ending with a SIGKILL while the spool holds rows ----
  pgStopRequestedAt = Date.now();
  outage = true; // no connection kills from here until the service runs again after the SIGKILL
  await cluster.stop();
  const pgStoppedAt = Date.now();
  say(`PostgreSQL stopped (took ${secondsSince(pgStopRequestedAt)} s); traffic and the SQL writer go on for ${OUTAGE} s`);
  await sleep(Math.max(0, pgStoppedAt + OUTAGE * 1000 - Date.now()));
  await traffic.pause();
  const servedDuringOutage = traffic.answers.filter((a) => typeof a.status === "number" && a.status >= 200 && a.status < 300 && a.doneAt >= pgStoppedAt).length;
  const victim = supervisor.current;
  const spoolAtKill = victim.alive ? await waitForSpool(victim, Math.max(1, servedDuringOutage), 30_000) : null;
  const killedExit = await supervisor.kill();
  const killedAt = Date.now();
  say(killedExit
    ? `service SIGKILLed with ${spoolAtKill} rows in its spool (exit signal ${killedExit.signal})`
    : "the service was not running at the planned SIGKILL (it had exited unexpectedly)");
  await cluster.restart();
  const pgStartedAt = Date.now();
  const service2 = await supervisor.restart();
  const restartedAt = Date.now();
  outage = false;
  traffic.resume(service2.url);
  say(`PostgreSQL started again, service restarted on the same data folder (pid ${service2.pid}, healthy ${secondsSince(pgStartedAt, restartedAt)} s after PostgreSQL)`);

  // ---- after: the wave across the outage, then the others ----
  await acrossInsert;
  await sleep(IMPORT_DELAY_MS);
  await importWave(across);
  for (const wave of waves.filter((w) => w.placement === "after")) {
    await insertWave(wave);
    await sleep(IMPORT_DELAY_MS);
    await importWave(wave);
  }
  await sleep(Math.max(0, restartedAt + AFTER * 1000 - Date.now()));
  await traffic.stop();
  await killer.stop();
  const trafficStoppedAt = Date.now();
  say(`traffic stopped: ${traffic.sent} sent, ${traffic.answers.length} answered; ${killer.rounds} kill rounds, ${killer.backends} backends terminated; draining`);

  // ---- drain, then the retry window ----
  const answers = traffic.answers;
  const served = answers.filter((a) => typeof a.status === "number" && a.status >= 200 && a.status < 300 && a.requestId);
  // Drain the service running now (after a crash during the drain, the one that replaced it).
  const drainStartedAt = Date.now();
  let drained;
  do {
    await supervisor.settled();
    drained = await drain(supervisor.current, pool, served.map((a) => a.requestId!), Math.min(10_000, Math.max(0, DRAIN_MS - (Date.now() - drainStartedAt))));
  } while (!drained.drained && Date.now() - drainStartedAt < DRAIN_MS);
  drained.seconds = secondsSince(drainStartedAt);
  say(drained.drained ? `drained in ${drained.seconds} s` : `NOT drained after ${drained.seconds} s: spool depth ${drained.spoolDepth}, ${drained.present} of ${drained.expected} served ids in the ledger`);
  const retryStartedAt = Date.now();
  let pendingKnown: number | null = null;
  for (;;) {
    pendingKnown = (await persist<{ n: number }>(pool, "pending rows of existing keys", PENDING_KNOWN_SQL, [])).rows[0]!.n;
    if (pendingKnown === 0 || Date.now() - retryStartedAt > RETRY_MS) break;
    await sleep(500);
  }
  const retrySeconds = secondsSince(retryStartedAt);
  const lastImportSeenAt = Math.max(...waves.map((w) => w.importSeenAt));
  say(pendingKnown === 0 ? `no row presenting an existing key is pending (${retrySeconds} s after the drain, ${secondsSince(lastImportSeenAt)} s after the last import)` : `${pendingKnown} rows presenting an existing key still pending after ${retrySeconds} s`);
  await supervisor.settled();
  const metrics2 = await supervisor.current.metrics().catch(() => null);

  // ---- the ledger ----
  const ledger = await readLedger(pool);
  const expectations = {
    httpKey: new Map<string, Expected>(),
    httpAnonymous: new Map<string, Expected>(),
    late: new Map<string, Expected>(),
    never: new Map<string, Expected>(),
    sqlAnonymous: new Map<string, Expected>(),
  };
  for (const a of served) {
    if (a.keyName) expectations.httpKey.set(a.requestId!, { apiKeyId: keyIdByName.get(a.keyName)! });
    else expectations.httpAnonymous.set(a.requestId!, { anonymous: true });
  }
  for (const [id, row] of writer.committed) {
    if (row.kind === "late") expectations.late.set(id, { apiKeyId: lateKeys[row.lateKey!]!.id ?? "(not imported)" });
    else if (row.kind === "never") expectations.never.set(id, { notFound: true });
    else expectations.sqlAnonymous.set(id, { anonymous: true });
  }
  const all = new Map<string, Expected>(Object.values(expectations).flatMap((m) => [...m]));
  const checkAll = checkLedger(ledger, all);
  const check = Object.fromEntries(Object.entries(expectations).map(([k, m]) => [k, checkLedger(ledger, m)])) as Record<keyof typeof expectations, LedgerCheck>;
  const keyedTotal = expectations.httpKey.size + expectations.late.size;
  const keyedRight = keyedTotal - (check.httpKey.misattributed + check.httpKey.lost + check.late.misattributed + check.late.lost);
  const right = (c: LedgerCheck, n: number) => `${pct(n - c.misattributed - c.lost, n)} (${n - c.misattributed - c.lost} of ${n})`;
  const neverReasons: Record<string, number> = {};
  for (const id of expectations.never.keys()) {
    const row: LedgerRow | undefined = ledger.get(id);
    if (row) neverReasons[`${row.attributionStatus} ${row.attributionReason ?? "(no reason)"}`] = (neverReasons[`${row.attributionStatus} ${row.attributionReason ?? "(no reason)"}`] ?? 0) + 1;
  }
  const lateWithoutKey = lateKeys.filter((k) => !k.id).length;

  // ---- import to attribution, per late row ----
  const { rows: latency } = await pool.query<LatencyRow>(LATENCY_SQL, [lateKeys.map((k) => k.hashHex), lateKeys.map((k) => k.wave)]);
  const overall = latency.find((r) => r.w === null) ?? null;
  const perWave = latency.filter((r) => r.w !== null);
  const busySeconds = unionSeconds(perWave.map((r) => [r.committed_ms ?? 0, r.last_attributed_ms ?? 0]));
  const throughput = overall && busySeconds > 0 ? overall.attributed / busySeconds : null;
  const { rows: [report] } = await pool.query<{ attributed_after_retry: string; p50_seconds: number | null; p99_seconds: number | null; max_seconds: number | null; pending: string; oldest_pending_seconds: number | null }>(
    "select * from app_public.attribution_latency_report(1)");
  const clientLagMs = Math.max(0, ...waves.map((w) => (w.importCommittedAt === null ? 0 : w.importSeenAt - w.importCommittedAt)));

  // ---- stop, then completeness ----
  const stopped = await supervisor.stop();
  const gaps = await completenessGaps(pool);
  // What completeness can see: per serving process, the numbers it reported handing out (heartbeat or clean stop) and the highest it recorded.
  const { rows: processes } = await pool.query<{ pid: number; state: string; accepted_seq: string; last_seq: string | null; max_seq: string | null; rows: number }>(`
    select p.pid, app_public.serving_process_state(p) as state, p.accepted_seq, p.last_seq,
           (select max(r.process_seq) from app_public.chat_completion_requests r where r.process_id = p.id) as max_seq,
           (select count(*) from app_public.chat_completion_requests r where r.process_id = p.id)::int as rows
      from app_public.serving_processes p order by p.started_at`);
  const dropped = metrics2?.value("keytrack_record_dropped_total") ?? null;
  const p99 = overall?.p99 ?? null;
  const targetMet = p99 !== null && p99 <= TARGET_P99;

  verdict.check(supervisor.crashes.length === 0, `the service exited unexpectedly ${supervisor.crashes.length} time(s) (restarted by the drill each time): ${supervisor.crashes.map((c) => `pid ${c.pid} at ${secondsSince(drill.startedAt, c.at)} s, code ${c.code}, signal ${c.signal}`).join("; ")}; the first one's last lines:\n      ${supervisor.crashes[0]?.lastLines.join("\n      ") ?? ""}`);
  verdict.check(drained.drained, `not drained within ${DRAIN_MS / 1000} s (spool depth ${drained.spoolDepth}, ${drained.present} of ${drained.expected} served ids in the ledger)`);
  verdict.check(killedExit !== null && (spoolAtKill ?? 0) > 0, killedExit === null
    ? "there was no service to SIGKILL at the end of the outage (it had exited unexpectedly): the crash with rows in the spool was not tested"
    : `the spool was empty at the SIGKILL (depth ${spoolAtKill}): the crash was not tested with rows in it`);
  verdict.check(pendingKnown === 0, `${pendingKnown} rows presenting an existing key still pending ${retrySeconds} s after the drain (retry window ${RETRY_MS / 1000} s)`);
  verdict.check(lateWithoutKey === 0, `${lateWithoutKey} late keys have no id after their import: ${waves.map((w) => formatCounts(w.importOutcomes)).join("; ")}`);
  verdict.check(checkAll.lost === 0, `${checkAll.lost} rows lost (served 2xx or committed SQL inserts without a row), e.g. ${checkAll.lostIds.slice(0, 5).join(", ")}`);
  verdict.check(checkAll.duplicates === 0, `${checkAll.duplicates} request ids have more than one row`);
  verdict.check(checkAll.unknownRows === 0, `${checkAll.unknownRows} rows whose request id the drill never saw served or committed`);
  verdict.check(keyedRight === keyedTotal, `${keyedTotal - keyedRight} of ${keyedTotal} rows presenting an existing key are not attributed to it (lost ${check.httpKey.lost + check.late.lost}, attributed otherwise ${check.httpKey.misattributed + check.late.misattributed}): ${[...check.httpKey.misattributedExamples, ...check.late.misattributedExamples].slice(0, 5).join("; ")}`);
  verdict.check(check.never.misattributed === 0, `${check.never.misattributed} rows of never-registered keys are not pending or failed with reason not_found: ${check.never.misattributedExamples.join("; ")}`);
  verdict.check(check.httpAnonymous.misattributed + check.sqlAnonymous.misattributed === 0, `${check.httpAnonymous.misattributed + check.sqlAnonymous.misattributed} anonymous rows are not anonymous: ${[...check.httpAnonymous.misattributedExamples, ...check.sqlAnonymous.misattributedExamples].slice(0, 5).join("; ")}`);
  verdict.check(gaps.missing === 0, `completeness_gaps() reports ${gaps.missing} accepted requests without a row: ${gaps.ranges.join("; ")}`);
  verdict.check(dropped === null || dropped === 0, `keytrack_record_dropped_total is ${dropped} on the restarted service`);
  verdict.check(overall !== null && overall.attributed === overall.rows && overall.rows === expectations.late.size, `import-to-attribution figures cover ${overall?.attributed ?? 0} attributed of ${overall?.rows ?? 0} late rows, expected ${expectations.late.size}`);
  if (!opts.quick) {
    verdict.check(targetMet, `p99 from a late key's import to its rows' attribution is ${fmt(p99)} s, over the target of ${TARGET_P99} s (${overall?.rows ?? 0} late rows)`);
  }

  // ---- printed summary ----
  const t = (ms: number) => `${secondsSince(drill.startedAt, ms)} s`;
  printSection(`attribution drill: faults (${opts.quick ? "--quick" : "full run"})`, [
    ["HTTP traffic", `${RATE} requests/s, ${t(trafficStartedAt)} to ${t(trafficStoppedAt)} (paused from the SIGKILL to the restart)`],
    ["connection kills (pg_terminate_backend)", `${killer.rounds} rounds every ${o["kill-every-seconds"]} s, ${killer.backends} service backends terminated (${killer.active} busy), ${killer.errors} rounds failed`],
    ["PostgreSQL outage", `stopped at ${t(pgStopRequestedAt)} for ${secondsSince(pgStoppedAt, pgStartedAt)} s (asked for ${OUTAGE} s, plus the SIGKILL and the restart)`],
    ["SIGKILL of the service", killedExit
      ? `at ${t(killedAt)} with ${spoolAtKill ?? "unknown"} rows in its spool (${servedDuringOutage} requests served while PostgreSQL was down)`
      : `not done at ${t(killedAt)}: the service had exited unexpectedly (${servedDuringOutage} requests served while PostgreSQL was down)`],
    ["restart on the same KEYTRACK_DATA_DIR", `healthy at ${t(restartedAt)}, ${secondsSince(pgStartedAt, restartedAt)} s after PostgreSQL`],
    ["service exits not asked for (crashes)", supervisor.crashes.length === 0 ? "0" : `${supervisor.crashes.length}, each restarted by the drill: ${supervisor.crashes.map((c) => `${t(c.at)} (code ${c.code}${c.signal ? `, ${c.signal}` : ""})`).join(", ")}`],
    ["SQL writer", `${writer.committed.size} rows in ${writer.batches} batches of up to ${BATCH}; ${writer.failedAttempts} failed attempts, ${writer.retriedBatches} batches retried, ${writer.alreadyCommittedOnRetry} rows already committed on retry`],
    ["waves of late keys", waves.map((w) => `${w.index + 1} ${w.placement}: ${w.rows.length} rows (${w.rowsBeforeOutage} before the outage), ${w.keys.length} keys, written ${t(w.insertStartedAt)}..${t(w.insertDoneAt)}, imported ${t(w.importSeenAt)}${w.importAttempts > 1 ? ` (${w.importAttempts} tries)` : ""}`).join(" | ")],
    ["retry window", `${retrySeconds} s after the drain (${secondsSince(lastImportSeenAt, retryStartedAt + retrySeconds * 1000)} s after the last import); rows of existing keys still pending: ${pendingKnown}`],
  ]);

  printSection("attribution drill: the ledger", [
    ["HTTP sent", traffic.sent],
    ["HTTP not sent (concurrency bound)", traffic.shed],
    ["HTTP answered by status", formatCounts(statusCounts(answers))],
    ["HTTP served (2xx)", served.length],
    ["SQL rows committed", `${writer.committed.size} (late ${expectations.late.size}, never-registered ${expectations.never.size}, anonymous ${expectations.sqlAnonymous.size})`],
    ["rows", checkAll.rows],
    ["lost", checkAll.lost],
    ["duplicate request_ids", checkAll.duplicates],
    ["rows the drill never saw served or committed", checkAll.unknownRows],
    ["rows through the spool", checkAll.spooled],
    ["keytrack_record_dropped_total", dropped ?? "absent"],
    ["completeness gaps (SQL)", gaps.missing],
    ["serving processes (completeness)", processes.map((p) => `pid ${p.pid} ${p.state}${p.last_seq === null ? ", no clean stop" : ""}: numbers reported ${p.last_seq ?? p.accepted_seq}, highest recorded ${p.max_seq ?? 0}, rows ${p.rows}`).join(" | ")],
    ["service stop (SIGTERM)", `exit code ${stopped.code}${stopped.signal ? `, signal ${stopped.signal}` : ""}`],
    ["service processes", supervisor.services.length],
    ["service warnings, errors logged", `${supervisor.services.reduce((n, x) => n + x.levels.warn, 0)}, ${supervisor.services.reduce((n, x) => n + x.levels.error, 0)}`],
  ]);

  printSection("attribution drill: attribution", [
    ["rows presenting an existing key", keyedTotal],
    ["attributed to the right key", `${pct(keyedRight, keyedTotal)} (${keyedRight} of ${keyedTotal})`],
    ["  HTTP, known keys", right(check.httpKey, expectations.httpKey.size)],
    ["  SQL, late keys (imported)", right(check.late, expectations.late.size)],
    ["never-registered keys (SQL)", `${expectations.never.size} rows: ${formatCounts(neverReasons)}; not pending/failed not_found: ${check.never.misattributed}`],
    ["anonymous, HTTP", `${expectations.httpAnonymous.size} rows: ${formatCounts(check.httpAnonymous.attribution)}; not anonymous: ${check.httpAnonymous.misattributed}`],
    ["anonymous, SQL", `${expectations.sqlAnonymous.size} rows: ${formatCounts(check.sqlAnonymous.attribution)}; not anonymous: ${check.sqlAnonymous.misattributed}`],
    ["all rows by status", formatCounts(checkAll.attribution)],
  ]);

  printSection(`attribution drill: a late key's import to its rows' attribution (${expectations.late.size} late rows, ${LATE_KEYS} keys)`, [
    ["late rows attributed", `${overall?.attributed ?? 0} of ${overall?.rows ?? 0}`],
    ["p50 / p99 / max, seconds", `${fmt(overall?.p50)} / ${fmt(p99)} / ${fmt(overall?.max)} (min ${fmt(overall?.min, 3)})`],
    [`p99 target (<= ${TARGET_P99} s)`, opts.quick
      ? `${targetMet ? "met" : "NOT met"}: not asserted in --quick (a short run on a busy machine); the full run asserts it`
      : targetMet ? "met (asserted)" : "NOT met (asserted: the drill fails)"],
    ...perWave.map((r): [string, string] => {
      const w = waves[r.w!]!;
      const span = r.committed_ms !== null && r.last_attributed_ms !== null ? (r.last_attributed_ms - r.committed_ms) / 1000 : null;
      return [`  wave ${r.w! + 1} (${w.placement})`, `${r.attributed} of ${r.rows} rows; p50 / p99 / max ${fmt(r.p50)} / ${fmt(r.p99)} / ${fmt(r.max)} s; all attributed ${fmt(span)} s after the import, ${span ? Math.round(r.attributed / span) : "n/a"} rows/s`];
    }),
    ["resolution throughput", `${throughput === null ? "n/a" : Math.round(throughput)} late rows/s (rows over the ${fmt(busySeconds, 1)} s from each import's commit to its wave's last attribution)`],
    ["import commit time", `pg_xact_commit_timestamp of the imported keys (track_commit_timestamp on); the drill saw the answers at most ${Math.round(clientLagMs)} ms later`],
    ["attribution_latency_report(1)", report
      ? `attributed_after_retry ${report.attributed_after_retry}, p50 ${fmt(report.p50_seconds)} s, p99 ${fmt(report.p99_seconds)} s, max ${fmt(report.max_seconds)} s (from arrival, not import), pending ${report.pending}, oldest pending ${fmt(report.oldest_pending_seconds, 1)} s`
      : "no row"],
  ]);

  return conclude(drill, verdict, {
    options: {
      quick: opts.quick, seconds: SECONDS, outageSeconds: OUTAGE, afterSeconds: AFTER, rate: RATE, concurrency: o.concurrency, lateRows: LATE_ROWS, lateKeys: LATE_KEYS,
      waves: WAVES, neverRows: o["never-rows"], neverKeys: o["never-keys"], anonymousRows: o["anonymous-rows"], batchRows: BATCH,
      importDelaySeconds: o["import-delay-seconds"], importGuardSeconds: o["import-guard-seconds"], killEverySeconds: o["kill-every-seconds"], targetP99Seconds: TARGET_P99,
    },
    faults: {
      crashes: supervisor.crashes.map((c) => ({ ...c, at: secondsSince(drill.startedAt, c.at) })),
      killRounds: killer.rounds, backendsKilled: killer.backends, backendsKilledBusy: killer.active, killErrors: killer.errors,
      outage: { stopRequested: secondsSince(drill.startedAt, pgStopRequestedAt), stopped: secondsSince(drill.startedAt, pgStoppedAt), started: secondsSince(drill.startedAt, pgStartedAt) },
      sigkill: { at: secondsSince(drill.startedAt, killedAt), spoolDepth: spoolAtKill, servedDuringOutage, restartedHealthy: secondsSince(drill.startedAt, restartedAt) },
    },
    http: { sent: traffic.sent, shed: traffic.shed, answeredByStatus: statusCounts(answers), served: served.length, drain: drained },
    sqlWriter: { committed: writer.committed.size, batches: writer.batches, failedAttempts: writer.failedAttempts, retriedBatches: writer.retriedBatches, alreadyCommittedOnRetry: writer.alreadyCommittedOnRetry, lastError: writer.lastError },
    waves: waves.map((w) => ({
      wave: w.index + 1, placement: w.placement, rows: w.rows.length, rowsBeforeOutage: w.rowsBeforeOutage, keys: w.keys.length, importOutcomes: w.importOutcomes, importAttempts: w.importAttempts,
      insertStarted: secondsSince(drill.startedAt, w.insertStartedAt), insertDone: secondsSince(drill.startedAt, w.insertDoneAt), importSeen: secondsSince(drill.startedAt, w.importSeenAt),
      latency: perWave.find((r) => r.w === w.index) ?? null,
    })),
    ledger: {
      rows: checkAll.rows, lost: checkAll.lost, lostIds: checkAll.lostIds, duplicates: checkAll.duplicates, unknownRows: checkAll.unknownRows, spooled: checkAll.spooled,
      attribution: checkAll.attribution, completenessGaps: gaps.missing, servingProcesses: processes, recordDroppedTotal: dropped,
    },
    attribution: {
      keyedRows: keyedTotal, keyedRight, rightPercent: pct(keyedRight, keyedTotal),
      byCategory: Object.fromEntries(Object.entries(check).map(([k, c]) => [k, { rows: expectations[k as keyof typeof expectations].size, lost: c.lost, wrong: c.misattributed, outcomes: c.attribution, examples: c.misattributedExamples }])),
      neverRegistered: neverReasons, pendingKnownAfterRetryWindow: pendingKnown, retryWindowSeconds: retrySeconds,
    },
    latency: {
      lateRows: overall?.rows ?? 0, attributed: overall?.attributed ?? 0, p50Seconds: overall?.p50 ?? null, p99Seconds: p99, maxSeconds: overall?.max ?? null, minSeconds: overall?.min ?? null,
      targetP99Seconds: TARGET_P99, targetMet, asserted: !opts.quick, throughputRowsPerSecond: throughput, busySeconds, clientLagMs, report: report ?? null,
    },
  }, { json: opts.json, services: supervisor.services, cluster });
});
