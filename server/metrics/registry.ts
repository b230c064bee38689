/**
 * keytrack's Prometheus metrics: one prom-client Registry per app (tests start
 * several servers in one process), holding
 *
 * - the database-derived series (dbMetrics.ts), read at scrape time;
 * - keytrack_database_up: did the database answer that read;
 * - keytrack_spool_depth: rows in this process's durable spool;
 * - keytrack_record_buffered: rows held in memory (neither the database nor
 *   the spool could take them);
 * - keytrack_record_dropped_total{reason}: rows not in the ledger, by reason
 *   (every reason exported, 0 included, so increase() works from the start);
 * - keytrack_auth_stale_total: requests let in on a key's last known good
 *   answer while the database could not be asked;
 * - keytrack_worker_jobs_total{task, outcome}: this process's worker jobs;
 * - http_request_duration_seconds{method, route, status_code};
 * - the default process and Node.js metrics.
 *
 * When the database does not answer (error or timeout), the database-derived
 * series are left out of the scrape and keytrack_database_up is 0. Not zeros:
 * a counter falling to 0 is a counter reset to Prometheus, and the next real
 * value would read as a burst of every event since the ledger began; a rate
 * of 0 would page. Not the last values: they would hide the outage and keep
 * alerts quiet on data that is no longer true. Absent series go stale in
 * Prometheus, rate() over the gap stays right, and KeytrackDatabaseUnreachable
 * says why they are missing.
 */
import client from "prom-client";

import type { AppContext } from "../context.js";
import { DROP_REASONS } from "../recording/types.js";
import { DB_COLUMNS, DB_METRICS, type DbMetricName, mapAttributionMetrics } from "./dbMetrics.js";
import { DbMetricsSource, type DbSourceOptions, type MetricsPool } from "./dbSource.js";
import type { ReadRouter } from "../db/readRouter.js";
import type { WorkerJobCounts } from "./workerJobs.js";

/** A histogram whose cumulative buckets, sum and count are read from SQL at scrape time. */
class DbHistogram {
  readonly type = "histogram";
  readonly aggregator = "sum";
  constructor(
    readonly name: string,
    readonly help: string,
    private readonly source: DbMetricsSource,
  ) {}

  async get() {
    const snapshot = await this.source.get();
    const values: Array<{ metricName: string; labels: Record<string, string | number>; value: number }> = [];
    if (snapshot.ok && snapshot.rows.length > 0) {
      for (const r of snapshot.rows) {
        const le = Number(r.le);
        values.push({ metricName: `${this.name}_bucket`, labels: { le: le === Infinity ? "+Inf" : le }, value: Number(r.cumulative) });
      }
      const last = snapshot.rows[snapshot.rows.length - 1]!;
      values.push({ metricName: `${this.name}_sum`, labels: {}, value: Number(last.sum_seconds) });
      values.push({ metricName: `${this.name}_count`, labels: {}, value: Number(last.cumulative) });
    }
    return { name: this.name, help: this.help, type: this.type, values, aggregator: this.aggregator };
  }

  reset(): void {}
}

/** prom-client takes any object with name, help, type and get() as a metric; its types say Metric. */
const dbHistogram = (name: string, help: string, source: DbMetricsSource) => new DbHistogram(name, help, source) as unknown as client.Metric;

/** Seconds; chat requests stream for a long time, so the buckets reach 2 minutes. */
export const HTTP_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120];

export interface KeytrackMetrics {
  registry: client.Registry;
  httpDuration: client.Histogram<"method" | "route" | "status_code">;
  db: DbMetricsSource;
  /** Exports a worker's job counts (once; later calls are ignored). */
  addWorkerJobs(counts: WorkerJobCounts): void;
}

export interface CreateMetricsOptions extends DbSourceOptions {
  /** Where attribution_metrics() is read; default ctx.pools.read. */
  pool?: MetricsPool;
  /** Register the default process metrics (default true). */
  defaultMetrics?: boolean;
}

export function createMetrics(
  ctx: Pick<AppContext, "pools" | "log" | "recorder" | "auth" | "servingProcess">,
  options: CreateMetricsOptions = {},
): KeytrackMetrics {
  const registry = new client.Registry();
  if (options.defaultMetrics !== false) client.collectDefaultMetrics({ register: registry });

  const db = new DbMetricsSource(options.pool ?? ctx.pools.read, ctx.log.child({ component: "metrics" }), options);

  // Every database-derived metric reads the same (cached) snapshot at scrape time.
  for (const [name, def] of Object.entries(DB_METRICS) as Array<[DbMetricName, (typeof DB_METRICS)[DbMetricName]]>) {
    const mappings = DB_COLUMNS.filter((m) => m.metric === name);
    const config = {
      name,
      help: def.help,
      labelNames: [...def.labelNames],
      registers: [registry],
    };
    if (def.type === "counter") {
      new client.Counter({
        ...config,
        async collect() {
          const snapshot = await db.get();
          this.reset();
          if (!snapshot.ok) return;
          for (const { mapping, value } of mapAttributionMetrics(snapshot.row).values) {
            if (mapping.metric === name && value !== null) this.inc(mapping.labels, value);
          }
        },
      });
    } else {
      new client.Gauge({
        ...config,
        async collect() {
          const snapshot = await db.get();
          this.reset();
          // remove(): no sample at all (a label-less gauge would otherwise read 0).
          for (const m of mappings) this.remove(m.labels);
          if (!snapshot.ok) return;
          for (const { mapping, value } of mapAttributionMetrics(snapshot.row).values) {
            if (mapping.metric === name && value !== null) this.set(mapping.labels, value);
          }
        },
      });
    }
  }

  let warnedMissing = false;
  new client.Gauge({
    name: "keytrack_database_up",
    help: "1 when the database answered the metrics query of this scrape (app_private.attribution_metrics()), else 0; the database-derived series are left out while it is 0.",
    registers: [registry],
    async collect() {
      const snapshot = await db.get();
      this.set(snapshot.ok ? 1 : 0);
      if (snapshot.ok && !warnedMissing) {
        const { missing } = mapAttributionMetrics(snapshot.row);
        if (missing.length) {
          warnedMissing = true;
          ctx.log.warn("metrics: attribution_metrics() lacks columns; their series are left out", { missing });
        }
      }
    },
  });

  new client.Gauge({
    name: "keytrack_spool_depth",
    help: "Request rows waiting in this process's durable spool (written while the database was unreachable, replayed when it is back).",
    registers: [registry],
    collect() {
      this.set(ctx.recorder.spoolDepth());
    },
  });

  new client.Gauge({
    name: "keytrack_record_buffered",
    help: "Request rows this process holds in memory because neither the database nor its spool could take them (database down and disk full); retried until one does. New chat requests are refused (503) while it is above 0.",
    registers: [registry],
    collect() {
      this.set(ctx.recorder.bufferedRows());
    },
  });

  new client.Counter({
    name: "keytrack_record_dropped_total",
    help: "Served requests whose row is not in the ledger, by reason: rejected_by_database (refused for good; kept in the spool's rejected.jsonl), corrupt_spool_line (kept raw in rejected.jsonl), memory_full and shutdown (lost: neither the database, the spool nor memory could keep them).",
    labelNames: ["reason"],
    registers: [registry],
    collect() {
      this.reset();
      const dropped = ctx.recorder.dropped();
      for (const reason of DROP_REASONS) this.inc({ reason }, dropped[reason] ?? 0);
    },
  });

  new client.Counter({
    name: "keytrack_auth_stale_total",
    help: "Requests let in on an API key's last known good answer (AUTH_STALE_MAX_MS) while the database could not be asked, since this process started.",
    registers: [registry],
    collect() {
      this.reset();
      // A context without the authenticator (tests of the registry alone) exports 0.
      this.inc(ctx.auth?.staleServed() ?? 0);
    },
  });

  // Completeness (migration 000007): this process's own count, and every recent process's rows and gaps from SQL.
  new client.Counter({
    name: "keytrack_requests_accepted_total",
    help: "Requests this serving process accepted (authenticated, valid, numbered for completeness) since it started; each must end as one ledger row.",
    labelNames: ["process"],
    registers: [registry],
    collect() {
      this.reset();
      const p = ctx.servingProcess;
      if (p) this.inc({ process: p.id }, p.accepted());
    },
  });
  const completeness = new DbMetricsSource(options.pool ?? ctx.pools.read, ctx.log.child({ component: "metrics" }), {
    ...options,
    sql: "select process_id, host, state, accepted_seq, recorded, missing from app_private.completeness_metrics()",
  });
  const perProcess = (name: string, help: string, column: "accepted_seq" | "recorded" | "missing") =>
    new client.Gauge({
      name,
      help,
      labelNames: ["process", "host", "state"],
      registers: [registry],
      async collect() {
        this.reset();
        const snapshot = await completeness.get();
        if (!snapshot.ok) return;
        for (const r of snapshot.rows) {
          this.set({ process: String(r.process_id), host: String(r.host), state: String(r.state) }, Number(r[column]));
        }
      },
    });
  perProcess("keytrack_process_requests_accepted", "Requests each serving process (alive within the last day) reported accepting, from the database (its heartbeat or clean stop).", "accepted_seq");
  perProcess("keytrack_process_rows_recorded", "Ledger rows each serving process (alive within the last day) wrote, from the database.", "recorded");
  perProcess("keytrack_completeness_missing_requests", "Requests each serving process accepted that have no ledger row past the spool's replay window (app_public.completeness_gaps()): must be 0.", "missing");

  // Attribution latency (migration 000008): a histogram kept in SQL, exported as it is.
  const latency = new DbMetricsSource(options.pool ?? ctx.pools.read, ctx.log.child({ component: "metrics" }), {
    ...options,
    sql: "select le, cumulative, sum_seconds, oldest_pending_seconds from app_private.attribution_latency_metrics()",
  });
  registry.registerMetric(dbHistogram("keytrack_attribution_latency_seconds",
    "Seconds from a pending row's arrival to its final attribution by the retry worker (resolved, or failed at the attempt limit), counted in the database.", latency));
  new client.Gauge({
    name: "keytrack_oldest_pending_attribution_seconds",
    help: "How long the oldest row still pending attribution has waited (0 when none).",
    registers: [registry],
    async collect() {
      this.reset();
      const snapshot = await latency.get();
      if (!snapshot.ok) return this.remove();
      this.set(Number(snapshot.row.oldest_pending_seconds ?? 0));
    },
  });

  // The read side (READ_DATABASE_URL): where reads went, why they fell back to the primary, the replica's lag.
  // (Contexts built by unit tests may have no router: no replica, nothing counted.)
  const reads = ctx.pools.reads as ReadRouter | undefined;
  new client.Counter({
    name: "keytrack_reads_total",
    help: "Database reads for monitoring, GraphQL queries, the console and /metrics, by the node that served them (primary, replica).",
    labelNames: ["node"],
    registers: [registry],
    collect() {
      this.reset();
      for (const [node, n] of reads?.servedCounts ?? []) this.inc({ node }, n);
    },
  });
  new client.Counter({
    name: "keytrack_read_replica_fallbacks_total",
    help: "Reads that went to the primary although READ_DATABASE_URL names a replica, by reason (unreachable, lagging: more than READ_MAX_LAG_MS behind, not_standby, failed: its connection failed during the read).",
    labelNames: ["reason"],
    registers: [registry],
    collect() {
      this.reset();
      for (const [reason, n] of reads?.fallbackCounts ?? []) this.inc({ reason }, n);
    },
  });
  new client.Gauge({
    name: "keytrack_read_replica_lag_seconds",
    help: "How far the read replica's replay was behind the primary at its last check (absent without a replica or when it did not answer).",
    registers: [registry],
    collect() {
      this.reset();
      const lag = reads?.hasReplica ? reads.replicaState.lagSeconds : null;
      if (lag === null) this.remove();
      else this.set(lag);
    },
  });
  new client.Gauge({
    name: "keytrack_read_replica_healthy",
    help: "1 while reads go to the read replica, 0 while they go to the primary instead (absent without READ_DATABASE_URL).",
    registers: [registry],
    collect() {
      this.reset();
      if (!reads?.hasReplica) this.remove();
      else this.set(reads.replicaState.healthy ? 1 : 0);
    },
  });

  let jobCounts: WorkerJobCounts | null = null;
  new client.Counter({
    name: "keytrack_worker_jobs_total",
    help: "graphile-worker jobs run by this process, by task and outcome (success; error: failed this attempt, will be retried; failed: failed its last attempt).",
    labelNames: ["task", "outcome"],
    registers: [registry],
    collect() {
      this.reset();
      for (const { task, outcome, count } of jobCounts?.entries() ?? []) this.inc({ task, outcome }, count);
    },
  });

  const httpDuration = new client.Histogram({
    name: "http_request_duration_seconds",
    help: "HTTP requests served, by method, route pattern (not the raw URL) and status code; `unmatched` for requests no route matched, status_code 499 when the client went away first.",
    labelNames: ["method", "route", "status_code"],
    buckets: HTTP_BUCKETS,
    registers: [registry],
  });

  return {
    registry,
    httpDuration,
    db,
    addWorkerJobs(counts) {
      jobCounts ??= counts;
    },
  };
}
