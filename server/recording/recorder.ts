// The one recording path. record() queues the row; rows from concurrent
// requests are written together (group commit): one multi-row INSERT, one
// transaction, one WAL flush per batch. A batch is flushed as soon as a flush
// slot is free (at most `concurrency` first tries at once), so under load rows
// gather while the previous flush commits, and when idle a row is written at
// once: no timer, no added wait. Every row keeps its own fate: a batch that
// the database refuses (a permanent error) is split in halves until the bad
// row stands alone, so one bad row never takes the others down; a batch that
// fails transiently is retried whole (rows it may have committed come back as
// already recorded, request_id makes that exact), and when the budget is spent
// every row of it goes to the spool. A failing batch gives up its slot after
// its first try, so rows behind it are not held by its retries.
//
// Per row, as before: a transient failure
// (connection lost, timeout, serialization failure, too many connections) is
// retried with exponential backoff; when the budget is spent the row goes to
// the durable local spool (server/recording/spool.ts) and record() resolves
// "spooled", so the service keeps answering while the database is down. The
// spool is replayed in order on a timer and right after any successful write;
// replayed rows carry spooled_at. request_id makes every re-insert a no-op, so
// retries and replays never duplicate a row.
//
// Every row is made storable first (storable.ts: no NUL, lengths within the
// columns' bounds), so the database refuses nothing the gateway produces.
// Permanent errors (the row itself is bad) are not retried: the row is kept in
// the spool's rejected.jsonl, counted (dropped, rejected_by_database), and
// record() rejects with a PermanentRecordError.
//
// When neither the database nor the spool can take a row (database down and
// disk full), it is held in memory (at most MAX_BUFFERED_ROWS rows and
// MAX_BUFFERED_BYTES) and retried, database first, then the spool, on the
// replay timer until one takes it; record() resolves "buffered". While any row
// is held, accepting() is false and the gateway refuses new requests (503)
// before serving them. A row that does not fit in the buffer is the one way a
// row is lost: it is logged and counted (memory_full).
import type pg from "pg";

import type { Logger } from "../log.js";
import { backoffDelay, describeError, isTransientError, mayHaveCommitted, sleep, sqlStateOf, type RetryPolicy } from "./retry.js";
import { Spool, type SpoolEntry, type SpoolOptions, type ReplayVerdict } from "./spool.js";
import { storableRecord } from "./storable.js";
import { PermanentRecordError, type DropReason, type RecordOutcome, type Recorder, type RequestRecord } from "./types.js";

export interface RecorderOptions {
  /** The owner pool, or a function returning the pool to use now (lets tests and failover swap it). */
  pool: pg.Pool | (() => pg.Pool);
  /** Folder for the durable spool (KEYTRACK_DATA_DIR): <dataDir>/spool/. */
  dataDir: string;
  log: Logger;
  /** Tries per row before spooling it (RECORD_RETRY_ATTEMPTS). Default 3. */
  attempts?: number;
  /** Wait after the first failed try, doubled after each further one (RECORD_RETRY_BASE_MS). Default 100. */
  baseDelayMs?: number;
  /**
   * Longest wait for one try (connecting included) before it counts as a
   * transient failure: a database that hangs rather than refuses must not hold
   * record() for minutes. The abandoned statement may still commit later;
   * request_id makes that harmless. Default 5000.
   */
  attemptTimeoutMs?: number;
  /** Pause between replays while the spool is not empty. Default 2000. */
  replayIntervalMs?: number;
  /** The clock for spooled_at. */
  now?: () => Date;
  /** Tests only: simulated write failures of the spool (e.g. ENOSPC), see SpoolOptions.fault. */
  spoolFault?: SpoolOptions["fault"];
  /** Rows written at most by one INSERT (RECORD_BATCH_SIZE). Default 500. */
  batchSize?: number;
  /** Batches on their first try at once (RECORD_CONCURRENCY); each holds one pooled connection. Default 2. */
  concurrency?: number;
  /** Tests only: smaller bounds for the in-memory buffer (default MAX_BUFFERED_ROWS, MAX_BUFFERED_BYTES). */
  bufferLimits?: { rows?: number; bytes?: number };
}

export const DEFAULT_RECORD_ATTEMPTS = 3;
export const DEFAULT_RECORD_BASE_DELAY_MS = 100;
export const DEFAULT_ATTEMPT_TIMEOUT_MS = 5000;
export const DEFAULT_REPLAY_INTERVAL_MS = 2000;
export const DEFAULT_RECORD_BATCH_SIZE = 500;
export const DEFAULT_RECORD_CONCURRENCY = 2;
/** 16 parameters a row would allow 4095 rows in one statement; arrays have no such bound, this keeps statements short. */
export const MAX_RECORD_BATCH_SIZE = 5000;
/** Rows held in memory at most while neither the database nor the spool can take them. */
export const MAX_BUFFERED_ROWS = 100_000;
/** ...and bytes at most (an estimate of their size in memory). */
export const MAX_BUFFERED_BYTES = 64 * 1024 * 1024;

export const INSERT_REQUEST_SQL = `
  insert into app_public.chat_completion_requests
    (request_id, created_at, api_key_hash, api_key_id, user_id, model, provider, input_tokens,
     output_tokens, processing_time_ms, status, error_message, attribution_reason, spooled_at, process_id, process_seq)
  values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)`;

/**
 * Parameters of INSERT_REQUEST_SQL, every value made storable (storable.ts);
 * spooledAt is set for rows replayed from the spool or held in memory.
 */
export function insertValues(row: RequestRecord, spooledAt: Date | null = null): unknown[] {
  const r = storableRecord(row);
  return [
    r.requestId, r.createdAt, r.apiKeyHash, r.apiKeyId ?? null, r.userId ?? null, r.model, r.provider,
    r.inputTokens, r.outputTokens, r.processingTimeMs, r.status, r.errorMessage, r.attributionReason ?? null,
    spooledAt, r.processId ?? null, r.processSeq ?? null,
  ];
}

/**
 * Many rows in one statement: one array per column (all of the same length),
 * recorded by app_private.record_requests() (migration 000012): set-based, the
 * same rows the row trigger would store, at less than half the cost the
 * trigger adds per row (docs/benchmarks.md, Session 5). A
 * constant text, so it is prepared once per connection (BATCH_STATEMENT_NAME).
 * It returns the request ids recorded; a row whose request_id is already
 * recorded (or given twice) is not returned.
 */
export const RECORD_REQUESTS_SQL = `
  select r as request_id
    from app_private.record_requests($1::text[], $2::timestamptz[], $3::bytea[], $4::uuid[], $5::uuid[], $6::text[], $7::text[], $8::int4[],
                                     $9::int4[], $10::int4[], $11::text[], $12::text[], $13::text[], $14::timestamptz[], $15::uuid[], $16::int8[]) r`;
const BATCH_STATEMENT_NAME = "keytrack_record_requests_v2";

/** The 16 column arrays of RECORD_REQUESTS_SQL for rows already made storable. */
export function batchValues(rows: readonly RequestRecord[], spooledAt: Date | null = null): unknown[][] {
  const columns: unknown[][] = Array.from({ length: 16 }, () => new Array<unknown>(rows.length));
  for (let i = 0; i < rows.length; i++) {
    const r = rows[i]!;
    columns[0]![i] = r.requestId;
    columns[1]![i] = r.createdAt;
    columns[2]![i] = r.apiKeyHash;
    columns[3]![i] = r.apiKeyId ?? null;
    columns[4]![i] = r.userId ?? null;
    columns[5]![i] = r.model;
    columns[6]![i] = r.provider;
    columns[7]![i] = r.inputTokens;
    columns[8]![i] = r.outputTokens;
    columns[9]![i] = r.processingTimeMs;
    columns[10]![i] = r.status;
    columns[11]![i] = r.errorMessage;
    columns[12]![i] = r.attributionReason ?? null;
    columns[13]![i] = spooledAt;
    columns[14]![i] = r.processId ?? null;
    columns[15]![i] = r.processSeq ?? null;
  }
  return columns;
}

function positiveInt(name: string, value: number | undefined, fallback: number): number {
  const v = value ?? fallback;
  if (!Number.isInteger(v) || v < 1) throw new TypeError(`createRecorder: ${name} must be a positive integer, got ${v}`);
  return v;
}

function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => {
      reject(Object.assign(new Error(`no answer from the database within ${ms} ms`), { code: "KT_ATTEMPT_TIMEOUT" }));
    }, ms);
    promise.then(
      (value) => {
        clearTimeout(timer);
        resolve(value);
      },
      (err) => {
        clearTimeout(timer);
        reject(err);
      },
    );
  });
}

function permanentError(row: RequestRecord, err: unknown): PermanentRecordError {
  const code = sqlStateOf(err);
  const e = err as { message?: string; constraint?: string; column?: string };
  const where = [e.constraint && `constraint ${e.constraint}`, e.column && `column ${e.column}`].filter(Boolean).join(", ");
  return new PermanentRecordError(
    `request ${row.requestId} cannot be recorded, the database refuses the row` +
      `${code ? ` (SQLSTATE ${code}${where ? `, ${where}` : ""})` : ""}: ${e.message ?? String(err)}`,
    code,
    { cause: err },
  );
}

/** A row held in memory: to be inserted or spooled, or (rejection set) to be written to rejected.jsonl. */
interface Held {
  entry: SpoolEntry;
  /** Rough size in memory, for MAX_BUFFERED_BYTES. */
  bytes: number;
  rejection: { error: string; code?: string } | null;
}

function heldSize(row: RequestRecord): number {
  return 600 + 2 * ((row.model?.length ?? 0) + (row.provider?.length ?? 0) + (row.errorMessage?.length ?? 0) + row.requestId.length);
}

/** Opens the spool under dataDir (throws if another live process holds it) and starts replaying it. */
export function createRecorder(options: RecorderOptions): Recorder {
  const log = options.log;
  const policy: RetryPolicy = {
    attempts: positiveInt("attempts", options.attempts, DEFAULT_RECORD_ATTEMPTS),
    baseDelayMs: positiveInt("baseDelayMs", options.baseDelayMs, DEFAULT_RECORD_BASE_DELAY_MS),
  };
  const attemptTimeoutMs = positiveInt("attemptTimeoutMs", options.attemptTimeoutMs, DEFAULT_ATTEMPT_TIMEOUT_MS);
  const replayIntervalMs = positiveInt("replayIntervalMs", options.replayIntervalMs, DEFAULT_REPLAY_INTERVAL_MS);
  const batchSize = positiveInt("batchSize", options.batchSize, DEFAULT_RECORD_BATCH_SIZE);
  if (batchSize > MAX_RECORD_BATCH_SIZE) throw new TypeError(`createRecorder: batchSize must be at most ${MAX_RECORD_BATCH_SIZE}, got ${batchSize}`);
  const concurrency = positiveInt("concurrency", options.concurrency, DEFAULT_RECORD_CONCURRENCY);
  const now = options.now ?? (() => new Date());
  const poolOption = options.pool;
  const currentPool = typeof poolOption === "function" ? poolOption : () => poolOption;

  const limits = {
    rows: positiveInt("bufferLimits.rows", options.bufferLimits?.rows, MAX_BUFFERED_ROWS),
    bytes: positiveInt("bufferLimits.bytes", options.bufferLimits?.bytes, MAX_BUFFERED_BYTES),
  };

  const spool = Spool.open(options.dataDir, log, { fault: options.spoolFault });

  let closed = false;
  let closing: Promise<void> | null = null;
  const inFlight = new Set<Promise<unknown>>();
  let replayRun: Promise<number> | null = null;
  let timer: NodeJS.Timeout | null = null;
  /** True from the first spooled row until the spool is drained: one warning per outage, not one per row. */
  let degraded = spool.depth > 0;

  /** Rows neither the database nor the spool could take, in arrival order (appended at the end only). */
  let heldRows: Held[] = [];
  /** Rows the database refused for good whose rejected.jsonl line could not be written yet. */
  let heldRejections: Held[] = [];
  let heldBytes = 0;
  /** True from the first row held until none is: one error per episode, not one per row. */
  let buffering = false;
  const lost = { memory_full: 0, shutdown: 0 };
  const heldCount = () => heldRows.length + heldRejections.length;

  /** Keeps a row in memory; false (the row is lost, counted and logged) when the buffer is full. */
  function hold(h: Held, error: string): boolean {
    if (heldCount() + 1 > limits.rows || heldBytes + h.bytes > limits.bytes) {
      lost.memory_full++;
      const r = h.entry.row;
      log.error("request row LOST: neither the database nor the spool can take it and the memory buffer is full", {
        requestId: r.requestId, createdAt: r.createdAt.toISOString(), model: r.model, status: r.status,
        inputTokens: r.inputTokens, outputTokens: r.outputTokens, buffered: heldCount(), error,
      });
      return false;
    }
    (h.rejection ? heldRejections : heldRows).push(h);
    heldBytes += h.bytes;
    if (!buffering) {
      buffering = true;
      log.error("neither the database nor the spool can take request rows: holding them in memory and retrying; new requests are refused (503) until one of them works", {
        error, spool: spool.paths.dir,
      });
    }
    scheduleReplay();
    return true;
  }

  /** Keeps a row the database refused for good in rejected.jsonl (or in memory until that file can be written). */
  async function rejectRow(entry: SpoolEntry, permanent: PermanentRecordError): Promise<void> {
    try {
      await spool.reject(entry, permanent.message, permanent.code);
      log.error("request row refused by the database (not retried): kept in rejected.jsonl", {
        requestId: entry.row.requestId, code: permanent.code, error: permanent.message, rejected: spool.paths.rejected,
      });
    } catch (err) {
      log.error("request row refused by the database (not retried); rejected.jsonl cannot be written: held in memory until it can", {
        requestId: entry.row.requestId, code: permanent.code, error: permanent.message, writeError: describeError(err),
      });
      hold({ entry, bytes: heldSize(entry.row), rejection: { error: permanent.message, code: permanent.code } }, describeError(err));
    }
  }

  /**
   * Retries the rows held in memory: refused rows to rejected.jsonl; the
   * others into the database, in order, until it fails, then what is left to
   * the spool. Resolves with the rows inserted. Runs inside a replay pass
   * (never two at once); hold() only appends meanwhile.
   */
  async function drainHeld(): Promise<number> {
    let written = 0;
    let n = 0;
    for (; n < heldRejections.length; n++) {
      const h = heldRejections[n]!;
      try {
        await spool.reject(h.entry, h.rejection!.error, h.rejection!.code);
      } catch {
        break;
      }
      heldBytes -= h.bytes;
    }
    heldRejections.splice(0, n);

    n = 0;
    let dbError: unknown = null;
    for (; n < heldRows.length; n++) {
      const h = heldRows[n]!;
      try {
        if (await insertOnce(h.entry.row, h.entry.spooledAt)) written++;
      } catch (err) {
        if (isTransientError(err)) {
          dbError = err;
          break;
        }
        await rejectRow(h.entry, permanentError(h.entry.row, err));
      }
      heldBytes -= h.bytes;
    }
    heldRows.splice(0, n);

    if (heldRows.length > 0) {
      // The database is still down: the spool then, all at once (one write, one fsync).
      const batch = heldRows.slice();
      const results = await Promise.allSettled(batch.map((h) => spool.append(h.entry)));
      const failed = batch.filter((_, i) => results[i]!.status === "rejected");
      for (const [i, h] of batch.entries()) if (results[i]!.status === "fulfilled") heldBytes -= h.bytes;
      heldRows = [...failed, ...heldRows.slice(batch.length)];
      if (failed.length < batch.length) {
        log.info("request rows held in memory moved to the spool", { rows: batch.length - failed.length, stillHeld: heldCount() });
        if (!degraded) {
          degraded = true;
          log.warn("database unavailable: spooling request rows to disk, they will be replayed", { error: describeError(dbError), spool: spool.paths.requests });
        }
      } else {
        log.debug("request rows held in memory: the database and the spool still fail", {
          held: heldCount(), database: describeError(dbError), spool: describeError((results[0] as PromiseRejectedResult).reason),
        });
      }
    }
    if (written > 0) log.info("request rows held in memory written to the database", { written, stillHeld: heldCount() });
    if (buffering && heldCount() === 0) {
      buffering = false;
      log.info("no request rows held in memory any more: accepting requests again");
    }
    return written;
  }

  /** One try: true when a row was inserted, false when its request_id was already recorded. */
  async function insertOnce(row: RequestRecord, spooledAt: Date | null): Promise<boolean> {
    const pending = Promise.resolve().then(() => currentPool().query(INSERT_REQUEST_SQL, insertValues(row, spooledAt)));
    pending.catch(() => {}); // an abandoned (timed out) try must not become an unhandled rejection
    const result = await withTimeout(pending, attemptTimeoutMs);
    return (result.rowCount ?? 0) > 0;
  }

  /** A row waiting for its batch, and its caller. */
  interface Queued {
    row: RequestRecord;
    resolve: (outcome: RecordOutcome) => void;
    reject: (err: unknown) => void;
    /** Set once its outcome is known (inserted, duplicate, refused): later tries of its batch leave it out. */
    settled: boolean;
  }
  /** Rows waiting for a flush slot, in arrival order. */
  let queue: Queued[] = [];
  /** Batches on their first try (a batch that failed once gives its slot up while it retries). */
  let flushing = 0;

  function recordRow(input: RequestRecord): Promise<RecordOutcome> {
    // What the spool, rejected.jsonl and memory keep is the row as it is inserted.
    const row = storableRecord(input);
    return new Promise<RecordOutcome>((resolve, reject) => {
      queue.push({ row, resolve, reject, settled: false });
      pump();
    });
  }

  /** Starts a flush of what is queued whenever a slot is free. */
  function pump(): void {
    while (flushing < concurrency && queue.length > 0) {
      const batch = queue.length <= batchSize ? queue : queue.slice(0, batchSize);
      queue = queue.length <= batchSize ? [] : queue.slice(batchSize);
      flushing++;
      let holdsSlot = true;
      const release = () => {
        if (!holdsSlot) return;
        holdsSlot = false;
        flushing--;
        pump();
      };
      flushBatch(batch, release)
        .catch((err) => {
          // Not expected (every row is settled inside); never leave a caller waiting.
          log.error("recording a batch of request rows failed unexpectedly", { rows: batch.length, error: err });
          for (const q of batch) if (!q.settled) (q.settled = true), q.reject(err);
        })
        .finally(release);
    }
  }

  /** One statement for `rows`: the request ids it inserted. */
  async function insertBatchOnce(rows: readonly RequestRecord[]): Promise<Set<string>> {
    const pending = Promise.resolve().then(() =>
      currentPool().query<{ request_id: string }>({ name: BATCH_STATEMENT_NAME, text: RECORD_REQUESTS_SQL, values: batchValues(rows) }),
    );
    pending.catch(() => {}); // an abandoned (timed out) try must not become an unhandled rejection
    const result = await withTimeout(pending, attemptTimeoutMs);
    return new Set(result.rows.map((r) => r.request_id));
  }

  /**
   * Writes `group` (unsettled rows of one batch) in one statement and settles
   * each row; a permanent error splits the group in halves, down to the one
   * row the database refuses (kept in rejected.jsonl, its caller rejected).
   * Throws a transient error: the rows not settled yet are to be tried again.
   */
  async function writeGroup(group: Queued[], attempt: number, maybeWritten: boolean): Promise<void> {
    let inserted: Set<string>;
    try {
      inserted = await insertBatchOnce(group.map((q) => q.row));
    } catch (err) {
      if (isTransientError(err)) throw err;
      if (group.length > 1) {
        const half = Math.ceil(group.length / 2);
        await writeGroup(group.slice(0, half), attempt, maybeWritten);
        await writeGroup(group.slice(half), attempt, maybeWritten);
        return;
      }
      const q = group[0]!;
      const permanent = permanentError(q.row, err);
      await rejectRow({ row: q.row, spooledAt: now() }, permanent);
      q.settled = true;
      q.reject(permanent);
      return;
    }
    for (const q of group) {
      // The first of two rows with one request id in a batch is the one recorded.
      const mine = inserted.delete(q.row.requestId);
      q.settled = true;
      // 0 rows after a try that may have committed: that try wrote it, not someone before us.
      q.resolve({ outcome: mine || maybeWritten ? "recorded" : "duplicate", attempts: attempt });
    }
  }

  async function flushBatch(batch: Queued[], releaseSlot: () => void): Promise<void> {
    let todo = batch;
    let lastError: unknown;
    let maybeWritten = false;
    for (let attempt = 1; attempt <= policy.attempts; attempt++) {
      try {
        await writeGroup(todo, attempt, maybeWritten);
        if (spool.depth > 0 || heldCount() > 0) kickReplay();
        return;
      } catch (err) {
        lastError = err;
        maybeWritten ||= mayHaveCommitted(err);
        todo = todo.filter((q) => !q.settled);
        // Rows behind this batch are not held by its retries.
        releaseSlot();
        if (attempt < policy.attempts) {
          const delayMs = backoffDelay(policy, attempt);
          log.debug("recording a request failed, retrying", {
            requestId: todo[0]?.row.requestId, rows: todo.length, attempt, delayMs, error: describeError(err),
          });
          await sleep(delayMs);
        }
      }
    }
    await spoolRows(todo, describeError(lastError));
  }

  /** The retry budget is spent: the rows go to the spool (one write, one fsync for them all), else to memory. */
  async function spoolRows(rows: Queued[], error: string): Promise<void> {
    const spooledAt = now();
    const entries = rows.map((q): SpoolEntry => ({ row: q.row, spooledAt }));
    const results = await Promise.allSettled(entries.map((entry) => spool.append(entry)));
    let spooled = 0;
    for (const [i, q] of rows.entries()) {
      const result = results[i]!;
      q.settled = true;
      if (result.status === "fulfilled") {
        spooled++;
        log.debug("request row spooled", { requestId: q.row.requestId, attempts: policy.attempts, error, spoolDepth: spool.depth });
        q.resolve({ outcome: "spooled", attempts: policy.attempts, error });
        continue;
      }
      const both = `${error}; spool: ${describeError(result.reason)}`;
      if (!hold({ entry: entries[i]!, bytes: heldSize(q.row), rejection: null }, both)) {
        q.reject(new Error(`request ${q.row.requestId} was not recorded: the database and the spool fail (${both}) and the memory buffer is full`, { cause: result.reason }));
        continue;
      }
      log.debug("request row held in memory", { requestId: q.row.requestId, error: both, buffered: heldCount() });
      q.resolve({ outcome: "buffered", attempts: policy.attempts, error: both });
    }
    if (spooled > 0) {
      if (!degraded) {
        degraded = true;
        log.warn("database unavailable: spooling request rows to disk, they will be replayed", { error, spool: spool.paths.requests });
      }
      scheduleReplay();
    }
  }

  async function replayEntry(entry: SpoolEntry, counts: { written: number; duplicates: number; stopError: string | null }): Promise<ReplayVerdict> {
    try {
      if (await insertOnce(entry.row, entry.spooledAt)) counts.written++;
      else counts.duplicates++;
      return "done";
    } catch (err) {
      if (isTransientError(err)) {
        counts.stopError = describeError(err);
        return "stop";
      }
      const permanent = permanentError(entry.row, err);
      log.error("spooled request row refused by the database: moved to rejected.jsonl", {
        requestId: entry.row.requestId, code: permanent.code, error: permanent.message, rejected: spool.paths.rejected,
      });
      return { reject: permanent.message, code: permanent.code };
    }
  }

  async function replayPass(): Promise<number> {
    const fromMemory = heldCount() > 0 ? await drainHeld() : 0;
    const counts = { written: 0, duplicates: 0, stopError: null as string | null };
    const pass = await spool.replay((entry) => replayEntry(entry, counts), () => closed);
    if (pass.processed > 0) {
      log.info("spooled request rows replayed", {
        written: counts.written, alreadyRecorded: counts.duplicates, rejected: pass.rejected, remaining: spool.depth,
      });
    }
    if (counts.stopError) log.debug("spool replay stopped: database still unavailable", { error: counts.stopError, remaining: spool.depth });
    if (pass.error) log.debug("spool replay stopped: a refused row could not be moved to rejected.jsonl", { error: pass.error, remaining: spool.depth });
    if (degraded && spool.depth === 0 && heldRows.length === 0) {
      degraded = false;
      log.info("database available again: spool drained");
    }
    return fromMemory + counts.written;
  }

  function replay(): Promise<number> {
    if (closed) return Promise.resolve(0);
    if (replayRun) {
      // A pass is running: wait for it, then go again for what it may have left.
      return replayRun.then(async (n) => n + (spool.depth > 0 || heldCount() > 0 ? await replay() : 0));
    }
    if (timer) {
      clearTimeout(timer);
      timer = null;
    }
    const run = replayPass().finally(() => {
      replayRun = null;
      scheduleReplay();
    });
    replayRun = run;
    return run;
  }

  function kickReplay(): void {
    if (closed || replayRun) return;
    replay().catch((err) => log.error("spool replay failed", { error: err }));
  }

  function scheduleReplay(): void {
    if (closed || timer || replayRun || (spool.depth === 0 && heldCount() === 0)) return;
    timer = setTimeout(() => {
      timer = null;
      kickReplay();
    }, replayIntervalMs);
    timer.unref();
  }

  // Rows left by an earlier run (and a spool to compact) are handled right away.
  setImmediate(kickReplay);

  return {
    record(row: RequestRecord): Promise<RecordOutcome> {
      if (closed) return Promise.reject(new Error(`the recorder is closed: request ${row.requestId} was not recorded`));
      const p = recordRow(row);
      inFlight.add(p);
      const done = () => inFlight.delete(p);
      p.then(done, done);
      return p;
    },
    spoolDepth: () => spool.depth,
    bufferedRows: heldCount,
    accepting: () => !closed && heldCount() === 0,
    dropped() {
      const rejected = spool.rejected;
      const counts: Record<DropReason, number> = {
        rejected_by_database: rejected.database,
        corrupt_spool_line: rejected.corrupt,
        memory_full: lost.memory_full,
        shutdown: lost.shutdown,
      };
      return Object.fromEntries(Object.entries(counts).filter(([, n]) => n > 0)) as Partial<Record<DropReason, number>>;
    },
    replay,
    close(): Promise<void> {
      closing ??= (async () => {
        closed = true;
        if (timer) clearTimeout(timer);
        timer = null;
        // Rows being recorded still reach the database or the spool; a replay stops after its current row.
        await Promise.allSettled([...inFlight]);
        if (replayRun) await replayRun.catch(() => {});
        // A last chance for rows held in memory.
        if (heldCount() > 0) await drainHeld().catch((err) => log.error("rows held in memory could not be retried at shutdown", { error: err }));
        const left = [...heldRows, ...heldRejections];
        if (left.length > 0) {
          lost.shutdown += left.length;
          log.error("request rows LOST at shutdown: neither the database nor the spool could take them", {
            rows: left.length, requestIds: left.slice(0, 100).map((h) => h.entry.row.requestId),
          });
          heldRows = [];
          heldRejections = [];
          heldBytes = 0;
        }
        await spool.close();
      })();
      return closing;
    },
  };
}
