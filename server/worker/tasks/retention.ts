// chat_completion_requests__apply_retention: with RETENTION_DAYS set, drops the
// raw monthly partitions older than that, daily. Rollups are refreshed first so
// the dropped hours' counts are settled and then frozen (reports keep history).
import type { Task } from "graphile-worker";

export const APPLY_RETENTION = "chat_completion_requests__apply_retention";

export function makeApplyRetention(retentionDays: number | null): Task {
  return async (_payload, helpers) => {
    if (retentionDays === null) return; // RETENTION_DAYS unset: keep everything
    await helpers.query("select app_private.refresh_attribution_rollups()");
    const { rows } = await helpers.query<{ dropped: number }>(
      "select app_private.drop_expired_partitions($1 * interval '1 day') as dropped",
      [retentionDays],
    );
    if (rows[0]!.dropped > 0) {
      helpers.logger.info(`retention: dropped ${rows[0]!.dropped} monthly partitions older than ${retentionDays} days`);
    }
  };
}
