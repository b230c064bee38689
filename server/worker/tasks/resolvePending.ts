// chat_completion_requests__resolve_pending: re-resolves pending rows (a key
// hash that matched no key at insert) until they resolve or fail. The SQL does
// the work set-based (FOR UPDATE SKIP LOCKED, backoff per row) and reschedules
// this task for the next due row; here we only drain what is due now.
import type { Task } from "graphile-worker";
import type { Config } from "../../config.js";

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

export function makeResolvePending(settings: RetrySettings): Task {
  return async (_payload, helpers) => {
    const total = { examined: 0, resolved: 0, failed: 0 };
    for (let i = 0; i < MAX_BATCHES_PER_RUN; i++) {
      const { rows } = await helpers.query<RetryResult>(
        `select * from app_private.resolve_pending_attributions($1, $2, $3 * interval '1 millisecond', $4 * interval '1 millisecond')`,
        [settings.attributionRetryBatchSize, settings.attributionRetryMaxAttempts, settings.attributionRetryBaseMs, settings.attributionRetryMaxMs],
      );
      const r = rows[0]!;
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
