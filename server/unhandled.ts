/**
 * A promise rejection nobody handles must not take the service down. The known
 * source: graphile-worker 0.18 fails a job without awaiting that call when the
 * job's connection has just died (a killed backend, a database restart), and
 * Node's default for an unhandled rejection is to exit, which lost the rows
 * being recorded at that moment. Such a rejection is logged (with its stack)
 * and the process keeps serving: its pools replace dead connections, and the
 * worker retries the job.
 */
import type { Logger } from "./log.js";

export function keepRunningOnUnhandledRejections(log: Logger): void {
  process.on("unhandledRejection", (reason) => {
    log.error("unhandled promise rejection (keytrack keeps running)", { error: reason });
  });
}
