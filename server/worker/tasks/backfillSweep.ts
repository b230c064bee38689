// attribution_backfills__sweep (every minute): queues the next batch of a
// running backfill that has not moved for a while. A backfill advances by
// chaining one job per batch; when the worker holding that job dies (SIGKILL,
// a lost machine), graphile-worker 0.18 leaves the job locked for four hours
// and the backfill would stall that long. Queuing the batch again is safe: a
// batch locks its run row and advances the saved cursor, so a batch run twice
// at once runs one after the other, each on rows the other did not take.
import type { Task } from "graphile-worker";
import { BACKFILL_BATCH } from "./backfillBatch.js";

export const BACKFILL_SWEEP = "attribution_backfills__sweep";

/** A running backfill whose last batch is older than this is queued again (a batch takes well under a second). */
export const BACKFILL_STALL_MS = 30_000;

export const backfillSweep: Task = async (_payload, helpers) => {
  const { rows } = await helpers.query<{ id: string; updated_at: Date }>(
    `select b.id, b.updated_at from app_public.attribution_backfills b
      where b.status = 'running' and b.updated_at < now() - $1 * interval '1 millisecond'`,
    [BACKFILL_STALL_MS],
  );
  for (const run of rows) {
    helpers.logger.warn(`attribution backfill ${run.id} has not moved since ${run.updated_at.toISOString()}: queuing its next batch again`);
    await helpers.addJob(BACKFILL_BATCH, { id: run.id }, { jobKey: BACKFILL_BATCH });
  }
};
