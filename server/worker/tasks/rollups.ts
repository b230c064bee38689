// chat_completion_requests__refresh_rollups: settles ended hours into the
// hourly rollups and recomputes the hours marked dirty (late rows, retry,
// backfill). Every minute by cron. Reads are exact without it; it keeps them
// cheap. The SQL (app_private.refresh_attribution_rollups) does all the work.
import type { Task } from "graphile-worker";

export const REFRESH_ROLLUPS = "chat_completion_requests__refresh_rollups";

export interface RefreshResult {
  settled_through: Date | null;
  settled_hours: number | null;
  recomputed_hours: number | null;
  waiting_since: Date | null;
}

/** A fence older than this means a long transaction holds settlement back: worth a warning. */
const STUCK_FENCE_MS = 15 * 60_000;

export const refreshRollups: Task = async (_payload, helpers) => {
  const { rows } = await helpers.query<RefreshResult>("select * from app_private.refresh_attribution_rollups()");
  const r = rows[0]!;
  if (r.settled_through === null) return; // another refresh was running
  if ((r.settled_hours ?? 0) > 0 || (r.recomputed_hours ?? 0) > 0) {
    helpers.logger.debug(
      `attribution rollups: ${r.settled_hours} hours settled, ${r.recomputed_hours} recomputed, settled through ${r.settled_through.toISOString()}`,
    );
  }
  if (r.waiting_since && Date.now() - r.waiting_since.getTime() > STUCK_FENCE_MS) {
    helpers.logger.warn(
      `attribution rollups wait since ${r.waiting_since.toISOString()} for transactions older than that to end; reads stay exact but scan more raw rows`,
    );
  }
};
