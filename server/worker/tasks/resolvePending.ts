// chat_completion_requests__resolve_pending: re-resolves pending rows (a key
// hash that matched no key at insert) until they resolve or fail. The SQL does
// the work set-based (woken rows first, FOR UPDATE SKIP LOCKED, backoff per
// row) and reschedules this task for the next due row; here we only drain what
// is due now.
//
// A batch that fails on a transient database error (a killed connection, a
// restart, a deadlock) is tried again here, a few times with short waits: each
// batch is one transaction and idempotent. Left to graphile-worker, the job
// would fail and wait exp(attempts) seconds (54 s after four kills), holding up
// every row whose key was just imported.
import type { Task } from "graphile-worker";
import type { Config } from "../../config.js";
import { describeError, isTransientError, sleep } from "../../recording/retry.js";

export const RESOLVE_PENDING = "chat_completion_requests__resolve_pending";

export interface RetryResult {
  examined: number;
  resolved: number;
  failed: number;
  still_pending: number;
  next_attempt_at: Date | null;
}

type RetrySettings = Pick<Config, "attributionRetryBatchSize" | "attributionRetryMaxAttempts" | "attributionRetryBaseMs" | "attributionRetryMaxMs">;

/** At most this many batches per run, so one run never holds a worker for long. */
const MAX_BATCHES_PER_RUN = 50;
/** Tries per batch on transient errors, and the first wait (doubling): 0.1, 0.2, 0.4, 0.8 s. */
const BATCH_TRIES = 5;
const BATCH_RETRY_BASE_MS = 100;

export function makeResolvePending(settings: RetrySettings): Task {
  return async (_payload, helpers) => {
    const total = { examined: 0, resolved: 0, failed: 0 };
    const runBatch = async (): Promise<RetryResult> => {
      for (let attempt = 1; ; attempt++) {
        try {
          const { rows } = await helpers.query<RetryResult>(
            `select * from app_private.resolve_pending_attributions($1, $2, $3 * interval '1 millisecond', $4 * interval '1 millisecond')`,
            [settings.attributionRetryBatchSize, settings.attributionRetryMaxAttempts, settings.attributionRetryBaseMs, settings.attributionRetryMaxMs],
          );
          return rows[0]!;
        } catch (err) {
          if (attempt >= BATCH_TRIES || !isTransientError(err)) throw err;
          helpers.logger.warn(`attribution retry: batch failed (${describeError(err)}), trying again (${attempt} of ${BATCH_TRIES - 1} retries)`);
          await sleep(BATCH_RETRY_BASE_MS * 2 ** (attempt - 1));
        }
      }
    };
    for (let i = 0; i < MAX_BATCHES_PER_RUN; i++) {
      const r = await runBatch();
      total.examined += r.examined;
      total.resolved += r.resolved;
      total.failed += r.failed;
      if (r.examined < settings.attributionRetryBatchSize) break;
    }
    if (total.examined > 0) {
      helpers.logger.info(`attribution retry: ${total.examined} examined, ${total.resolved} resolved, ${total.failed} failed`);
    }
  };
}
