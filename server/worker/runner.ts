// graphile-worker, in the web process (WORKER=true, the default) or on its own
// (`npm run worker`). Tasks are small files under tasks/; cron items carry
// explicit ids so renaming a task never runs a job twice.
import { Logger as WorkerLogger, parseCronItems, run, type Runner, type TaskList, type WorkerEvents } from "graphile-worker";
import type pg from "pg";
import type { Config } from "../config.js";
import type { LogFields, Logger } from "../log.js";
import { BACKFILL_BATCH, backfillBatch } from "./tasks/backfillBatch.js";
import { BACKFILL_SWEEP, backfillSweep } from "./tasks/backfillSweep.js";
import { CREATE_PARTITIONS, createPartitions } from "./tasks/createPartitions.js";
import { makeResolvePending, RESOLVE_PENDING } from "./tasks/resolvePending.js";
import { APPLY_RETENTION, makeApplyRetention } from "./tasks/retention.js";
import { REFRESH_ROLLUPS, refreshRollups } from "./tasks/rollups.js";

export interface WorkerHandle {
  runner: Runner;
  stop(): Promise<void>;
}

export function makeTaskList(config: Config): TaskList {
  return {
    [RESOLVE_PENDING]: makeResolvePending(config),
    [BACKFILL_BATCH]: backfillBatch,
    [BACKFILL_SWEEP]: backfillSweep,
    [CREATE_PARTITIONS]: createPartitions,
    [REFRESH_ROLLUPS]: refreshRollups,
    [APPLY_RETENTION]: makeApplyRetention(config.retentionDays),
  };
}

const cronItems = parseCronItems([
  // A sweep in case a wake-up was missed (e.g. a job lost with a crashed worker).
  { task: RESOLVE_PENDING, match: "* * * * *", identifier: "resolve_pending_sweep", options: { backfillPeriod: 0, jobKey: RESOLVE_PENDING, jobKeyMode: "preserve_run_at" } },
  // A backfill whose batch job died with its worker goes on (see tasks/backfillSweep.ts).
  { task: BACKFILL_SWEEP, match: "* * * * *", identifier: "backfill_sweep_every_minute", options: { backfillPeriod: 0, jobKey: BACKFILL_SWEEP, jobKeyMode: "preserve_run_at" } },
  { task: CREATE_PARTITIONS, match: "17 3 * * *", identifier: "create_partitions_daily", options: { backfillPeriod: 0 } },
  // With RETENTION_DAYS set, drops whole expired monthly partitions (their rollups settled and frozen first).
  { task: APPLY_RETENTION, match: "41 3 * * *", identifier: "apply_retention_daily", options: { backfillPeriod: 0 } },
  // Settles ended hours into the attribution rollups and recomputes dirty ones.
  { task: REFRESH_ROLLUPS, match: "* * * * *", identifier: "refresh_rollups_every_minute", options: { backfillPeriod: 0, jobKey: REFRESH_ROLLUPS, jobKeyMode: "preserve_run_at" } },
]);

/** Log fields from graphile-worker's scope and meta: ids, numbers, errors; never whole job rows or payloads. */
function workerLogFields(
  scope: { workerId?: string; taskIdentifier?: string; jobId?: string },
  meta: Record<string, unknown> | undefined): LogFields {
  const fields: LogFields = {};
  if (scope.workerId !== undefined) fields.workerId = scope.workerId;
  if (scope.taskIdentifier !== undefined) fields.taskIdentifier = scope.taskIdentifier;
  if (scope.jobId !== undefined) fields.jobId = scope.jobId;
  for (const [key, value] of Object.entries(meta ?? {})) {
    if (key === "job" && value && typeof value === "object") {
      // "Completed task"/"Failed task" lines come from the worker's scope (workerId only): the job is in meta.
      const job = value as { id?: unknown; task_identifier?: unknown; attempts?: unknown; max_attempts?: unknown };
      if (job.id !== undefined) fields.jobId = String(job.id);
      if (typeof job.task_identifier === "string") fields.taskIdentifier = job.task_identifier;
      if (typeof job.attempts === "number") fields.attempt = job.attempts;
      if (typeof job.max_attempts === "number") fields.maxAttempts = job.max_attempts;
    } else if (["string", "number", "boolean"].includes(typeof value) || value instanceof Error) {
      fields[key] = value;
    }
  }
  return fields;
}

/** graphile-worker's logger, forwarding to ours with its task and job ids (taskIdentifier, jobId, workerId) as fields. */
export function workerLogger(log: Logger): WorkerLogger {
  return new WorkerLogger((scope) => (level, message, meta) => {
    const fields = workerLogFields(scope, meta);
    // Messages that carry an error often repeat its stack; the error field has it.
    const text = fields.error instanceof Error ? message.split("\n", 1)[0]!.replace(/:$/, "") : message;
    if (level === "error") log.error(text, fields);
    else if (level === "warning") log.warn(text, fields);
    // One line per job a minute would drown the log: routine job completions are debug.
    else if (level === "info" && meta?.success !== true && !/^Completed task/.test(message)) log.info(text, fields);
    else log.debug(text, fields);
  });
}

export async function startWorker(options: {
  config: Config;
  pool: pg.Pool;
  log: Logger;
  /** Where graphile-worker emits its events (job outcomes for /metrics); its own emitter when unset. */
  events?: WorkerEvents;
}): Promise<WorkerHandle> {
  const { config, pool, log, events } = options;
  const runner = await run({
    pgPool: pool,
    taskList: makeTaskList(config),
    parsedCronItems: cronItems,
    concurrency: config.workerConcurrency,
    noHandleSignals: true,
    pollInterval: 2000,
    logger: workerLogger(log),
    ...(events ? { events } : {}),
  });
  // Partitions ahead, a first sweep of pending rows and a first rollup refresh, now rather than at the next cron tick.
  await runner.addJob(CREATE_PARTITIONS, {}, { jobKey: CREATE_PARTITIONS });
  await runner.addJob(RESOLVE_PENDING, {}, { jobKey: RESOLVE_PENDING, jobKeyMode: "preserve_run_at" });
  await runner.addJob(REFRESH_ROLLUPS, {}, { jobKey: REFRESH_ROLLUPS, jobKeyMode: "preserve_run_at" });
  let stopped: Promise<void> | null = null;
  return {
    runner,
    stop: () => (stopped ??= runner.stop()),
  };
}
