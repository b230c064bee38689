// attribution_backfills__run_batch: runs one batch of a backfill run, then
// queues the next, so every batch is its own short transaction and a crash
// loses at most one batch of work (the cursor is saved with each batch).
import type { Task } from "graphile-worker";

export const BACKFILL_BATCH = "attribution_backfills__run_batch";

export interface BackfillRun {
  id: string;
  status: "running" | "finished" | "cancelled";
  examined: string;
  filled: string;
  ambiguous: string;
  no_key: string;
  anonymized: string;
}

function assertPayload(payload: unknown): asserts payload is { id: number | string } {
  const id = (payload as { id?: unknown } | null)?.id;
  if (!(typeof id === "number" || (typeof id === "string" && /^\d+$/.test(id)))) {
    throw new Error(`${BACKFILL_BATCH} needs a payload {"id": <backfill id>}, got ${JSON.stringify(payload)}`);
  }
}

export const backfillBatch: Task = async (payload, helpers) => {
  assertPayload(payload);
  const { rows } = await helpers.query<BackfillRun>("select * from app_private.run_attribution_backfill_batch($1)", [payload.id]);
  const run = rows[0]!;
  if (run.status === "running") {
    await helpers.addJob(BACKFILL_BATCH, { id: run.id }, { jobKey: BACKFILL_BATCH });
  } else {
    helpers.logger.info(
      `attribution backfill ${run.id} ${run.status}: ${run.examined} examined, ${run.filled} filled, ${run.ambiguous} ambiguous, ${run.no_key} without a key, ${run.anonymized} flagged anonymous`,
    );
  }
};
