// The one recording path. record() inserts the row; a transient failure
// (connection lost, timeout, serialization failure, too many connections) is
// retried with exponential backoff; when the budget is spent the row goes to
// the durable local spool (server/recording/spool.ts) and record() resolves
// "spooled", so the service keeps answering while the database is down. The
// spool is replayed in order on a timer and right after any successful write;
// replayed rows carry spooled_at. request_id makes every re-insert a no-op, so
// retries and replays never duplicate a row. Permanent errors (the row itself
// is bad) are not retried: record() rejects with a PermanentRecordError.
import type pg from "pg";

import type { Logger } from "../log.js";
import { backoffDelay, describeError, isTransientError, mayHaveCommitted, sleep, sqlStateOf, type RetryPolicy } from "./retry.js";
import { Spool, type SpoolEntry, type ReplayVerdict } from "./spool.js";
import { PermanentRecordError, type RecordOutcome, type Recorder, type RequestRecord } from "./types.js";

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
}

export const DEFAULT_RECORD_ATTEMPTS = 3;
export const DEFAULT_RECORD_BASE_DELAY_MS = 100;
export const DEFAULT_ATTEMPT_TIMEOUT_MS = 5000;
export const DEFAULT_REPLAY_INTERVAL_MS = 2000;

export const INSERT_REQUEST_SQL = `
  insert into app_public.chat_completion_requests
    (request_id, created_at, api_key_hash, api_key_id, user_id, model, provider, input_tokens,
     output_tokens, processing_time_ms, status, error_message, attribution_reason, spooled_at)
  values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)`;

/** Parameters of INSERT_REQUEST_SQL; spooledAt is set for rows replayed from the spool. */
export function insertValues(r: RequestRecord, spooledAt: Date | null = null): unknown[] {
  return [
    r.requestId, r.createdAt, r.apiKeyHash, r.apiKeyId ?? null, r.userId ?? null, r.model, r.provider,
    r.inputTokens, r.outputTokens, r.processingTimeMs, r.status, r.errorMessage, r.attributionReason ?? null,
    spooledAt,
  ];
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

/** Opens the spool under dataDir (throws if another live process holds it) and starts replaying it. */
export function createRecorder(options: RecorderOptions): Recorder {
  const log = options.log;
  const policy: RetryPolicy = {
    attempts: positiveInt("attempts", options.attempts, DEFAULT_RECORD_ATTEMPTS),
    baseDelayMs: positiveInt("baseDelayMs", options.baseDelayMs, DEFAULT_RECORD_BASE_DELAY_MS),
  };
  const attemptTimeoutMs = positiveInt("attemptTimeoutMs", options.attemptTimeoutMs, DEFAULT_ATTEMPT_TIMEOUT_MS);
  const replayIntervalMs = positiveInt("replayIntervalMs", options.replayIntervalMs, DEFAULT_REPLAY_INTERVAL_MS);
  const now = options.now ?? (() => new Date());
  const poolOption = options.pool;
  const currentPool = typeof poolOption === "function" ? poolOption : () => poolOption;

  const spool = Spool.open(options.dataDir, log);

  let closed = false;
  let closing: Promise<void> | null = null;
  const inFlight = new Set<Promise<unknown>>();
  let replayRun: Promise<number> | null = null;
  let timer: NodeJS.Timeout | null = null;
  /** True from the first spooled row until the spool is drained: one warning per outage, not one per row. */
  let degraded = spool.depth > 0;

  /** One try: true when a row was inserted, false when its request_id was already recorded. */
  async function insertOnce(row: RequestRecord, spooledAt: Date | null): Promise<boolean> {
    const pending = Promise.resolve().then(() => currentPool().query(INSERT_REQUEST_SQL, insertValues(row, spooledAt)));
    pending.catch(() => {}); // an abandoned (timed out) try must not become an unhandled rejection
    const result = await withTimeout(pending, attemptTimeoutMs);
    return (result.rowCount ?? 0) > 0;
  }

  async function recordRow(row: RequestRecord): Promise<RecordOutcome> {
    let lastError: unknown;
    let maybeWritten = false;
    for (let attempt = 1; attempt <= policy.attempts; attempt++) {
      try {
        const inserted = await insertOnce(row, null);
        if (spool.depth > 0) kickReplay();
        // 0 rows after a try that may have committed: that try wrote it, not someone before us.
        return { outcome: inserted || maybeWritten ? "recorded" : "duplicate", attempts: attempt };
      } catch (err) {
        if (!isTransientError(err)) {
          const permanent = permanentError(row, err);
          log.error("request row refused by the database (not retried)", { requestId: row.requestId, code: permanent.code, error: permanent.message });
          throw permanent;
        }
        lastError = err;
        maybeWritten ||= mayHaveCommitted(err);
        if (attempt < policy.attempts) {
          const delayMs = backoffDelay(policy, attempt);
          log.debug("recording a request failed, retrying", { requestId: row.requestId, attempt, delayMs, error: describeError(err) });
          await sleep(delayMs);
        }
      }
    }
    const error = describeError(lastError);
    await spool.append({ row, spooledAt: now() });
    if (!degraded) {
      degraded = true;
      log.warn("database unavailable: spooling request rows to disk, they will be replayed", { error, spool: spool.paths.requests });
    }
    log.debug("request row spooled", { requestId: row.requestId, attempts: policy.attempts, error, spoolDepth: spool.depth });
    scheduleReplay();
    return { outcome: "spooled", attempts: policy.attempts, error };
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
    const counts = { written: 0, duplicates: 0, stopError: null as string | null };
    const pass = await spool.replay((entry) => replayEntry(entry, counts), () => closed);
    if (pass.processed > 0) {
      log.info("spooled request rows replayed", {
        written: counts.written, alreadyRecorded: counts.duplicates, rejected: pass.rejected, remaining: spool.depth,
      });
    }
    if (counts.stopError) log.debug("spool replay stopped: database still unavailable", { error: counts.stopError, remaining: spool.depth });
    if (degraded && spool.depth === 0) {
      degraded = false;
      log.info("database available again: spool drained");
    }
    return counts.written;
  }

  function replay(): Promise<number> {
    if (closed) return Promise.resolve(0);
    if (replayRun) {
      // A pass is running: wait for it, then go again for what it may have left.
      return replayRun.then(async (n) => n + (spool.depth > 0 ? await replay() : 0));
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
    if (closed || timer || replayRun || spool.depth === 0) return;
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
    replay,
    close(): Promise<void> {
      closing ??= (async () => {
        closed = true;
        if (timer) clearTimeout(timer);
        timer = null;
        // Rows being recorded still reach the database or the spool; a replay stops after its current row.
        await Promise.allSettled([...inFlight]);
        if (replayRun) await replayRun.catch(() => {});
        await spool.close();
      })();
      return closing;
    },
  };
}
