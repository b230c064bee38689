/**
 * graphile-worker job outcomes, counted in this process from the runner's
 * events. The counts live outside any registry because the worker starts
 * before the app (and its registry) exists; the metrics endpoint exports them
 * as keytrack_worker_jobs_total{task, outcome}.
 *
 * outcome: `success`; `error` (this attempt threw, the job will be retried);
 * `failed` (it threw on its last attempt: failed for good). Each job run
 * counts exactly once.
 */
import { EventEmitter } from "node:events";

import type { WorkerEvents } from "graphile-worker";

export type JobOutcome = "success" | "error" | "failed";

export class WorkerJobCounts {
  /** Pass to startWorker (graphile-worker's `events` option) before the worker starts. */
  readonly events: WorkerEvents = new EventEmitter() as WorkerEvents;
  private readonly counts = new Map<string, { task: string; outcome: JobOutcome; count: number }>();

  constructor() {
    this.events.on("job:success", ({ job }) => this.add(job.task_identifier, "success"));
    this.events.on("job:error", ({ job }) => {
      // The last attempt is also reported as job:failed, counted there.
      if (job.attempts < job.max_attempts) this.add(job.task_identifier, "error");
    });
    this.events.on("job:failed", ({ job }) => this.add(job.task_identifier, "failed"));
  }

  add(task: string, outcome: JobOutcome): void {
    const key = `${task}\u0000${outcome}`;
    const entry = this.counts.get(key);
    if (entry) entry.count++;
    else this.counts.set(key, { task, outcome, count: 1 });
  }

  entries(): Array<{ task: string; outcome: JobOutcome; count: number }> {
    return [...this.counts.values()];
  }
}
