/**
 * The metrics whose source of truth is the database: what
 * `app_private.attribution_metrics()` returns, and how each of its columns
 * becomes one Prometheus series. THE TABLE BELOW IS THE ONLY PLACE THAT KNOWS
 * THE FUNCTION'S COLUMN NAMES.
 *
 * The counters are cumulative in the database (rows written by any path, the
 * service, another gateway's SQL insert, the retry worker, backfill), so they
 * are exported as Prometheus counters carrying the database's total: the same
 * on every replica, and never reset by a restart of the service.
 */

/** What the metrics scrape runs (read pool). */
export const ATTRIBUTION_METRICS_SQL = "select * from app_private.attribution_metrics()";

export type DbMetricType = "counter" | "gauge";

export interface DbMetricDef {
  type: DbMetricType;
  help: string;
  /** The label names of the metric (the table below gives their values). */
  labelNames: readonly string[];
}

/** The Prometheus side: names, types and labels (the spec's four, then keytrack's own). */
export const DB_METRICS = {
  api_key_lookup_attempts_total: {
    type: "counter",
    help: "API key lookups (at insert, by the retry worker, by the backfill) by outcome: success (the key was found), retry (no key, the row stays pending for another try), failed (no key, given up); counted in the database.",
    labelNames: ["status"],
  },
  api_key_tracking_success_total: {
    type: "counter",
    help: "Requests attributed to an API key, by how (authenticated: at insert; retry: by the retry worker; backfill; dev: the development key), counted in the database.",
    labelNames: ["request_type"],
  },
  api_key_tracking_failures_total: {
    type: "counter",
    help: "Requests not attributed to an API key, by reason (anonymous is intended, not an error), counted in the database.",
    labelNames: ["reason"],
  },
  api_key_tracking_rate: {
    type: "gauge",
    help: "Share (0..1) of authenticated requests of the last hour that are attributed to an API key. Absent when there were none.",
    labelNames: [],
  },
  keytrack_pending_attributions: {
    type: "gauge",
    help: "Request rows whose key is not resolved yet (attribution_status = pending), waiting for the retry worker.",
    labelNames: [],
  },
  keytrack_failed_attributions: {
    type: "gauge",
    help: "Request rows that could not be attributed (attribution_status = failed).",
    labelNames: [],
  },
} as const satisfies Record<string, DbMetricDef>;

export type DbMetricName = keyof typeof DB_METRICS;

export interface DbColumnMapping {
  /** The column of attribution_metrics()'s (single) result row. */
  column: string;
  metric: DbMetricName;
  labels: Record<string, string>;
}

const col = (column: string, metric: DbMetricName, labels: Record<string, string> = {}): DbColumnMapping => ({
  column,
  metric,
  labels,
});

/**
 * attribution_metrics() column -> series. Every label value listed here is
 * exported (0 included), so rate() works from the first scrape.
 */
export const DB_COLUMNS: readonly DbColumnMapping[] = [
  col("lookup_attempts_success", "api_key_lookup_attempts_total", { status: "success" }),
  col("lookup_attempts_failed", "api_key_lookup_attempts_total", { status: "failed" }),
  col("lookup_attempts_retry", "api_key_lookup_attempts_total", { status: "retry" }),

  col("tracking_success_authenticated", "api_key_tracking_success_total", { request_type: "authenticated" }),
  col("tracking_success_retry", "api_key_tracking_success_total", { request_type: "retry" }),
  col("tracking_success_backfill", "api_key_tracking_success_total", { request_type: "backfill" }),
  col("tracking_success_dev", "api_key_tracking_success_total", { request_type: "dev" }),

  col("tracking_failures_anonymous", "api_key_tracking_failures_total", { reason: "anonymous" }),
  col("tracking_failures_not_found", "api_key_tracking_failures_total", { reason: "not_found" }),
  col("tracking_failures_lookup_failed", "api_key_tracking_failures_total", { reason: "lookup_failed" }),
  col("tracking_failures_dev_bypass", "api_key_tracking_failures_total", { reason: "dev_bypass" }),
  col("tracking_failures_no_key", "api_key_tracking_failures_total", { reason: "no_key" }),
  col("tracking_failures_ambiguous", "api_key_tracking_failures_total", { reason: "ambiguous" }),

  col("pending_attributions", "keytrack_pending_attributions"),
  col("failed_attributions", "keytrack_failed_attributions"),
  col("authenticated_tracking_rate", "api_key_tracking_rate"),
];

/**
 * One result row -> values per mapping (null: the series is left out, e.g. no
 * authenticated traffic in the last hour for the rate). Columns named in the
 * table but missing from the row are reported, so a renamed column is loud.
 */
export function mapAttributionMetrics(row: Record<string, unknown>): {
  values: Array<{ mapping: DbColumnMapping; value: number | null }>;
  missing: string[];
} {
  const values: Array<{ mapping: DbColumnMapping; value: number | null }> = [];
  const missing: string[] = [];
  for (const mapping of DB_COLUMNS) {
    if (!(mapping.column in row)) {
      missing.push(mapping.column);
      continue;
    }
    const raw = row[mapping.column];
    // bigint and numeric arrive as strings from pg.
    const value = raw === null || raw === undefined ? null : Number(raw);
    values.push({ mapping, value: value !== null && Number.isFinite(value) ? value : null });
  }
  return { values, missing };
}
