// chat_completion_requests__create_partitions: keeps monthly partitions made
// ahead (and moves rows the default partition caught). Daily by cron, and once
// at worker start.
import type { Task } from "graphile-worker";

export const CREATE_PARTITIONS = "chat_completion_requests__create_partitions";

export const createPartitions: Task = async (_payload, helpers) => {
  const { rows } = await helpers.query<{ created: number }>("select app_private.create_partitions(3) as created");
  if (rows[0]!.created > 0) helpers.logger.info(`created ${rows[0]!.created} partitions of chat_completion_requests`);
};
