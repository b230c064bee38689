/**
 * The two reports, computed in SQL (app_public.api_key_tracking_quality_report,
 * app_public.api_key_tracking_trend: the same functions GraphQL and psql use)
 * and shaped here into the spec's JSON. to_jsonb gives numbers as JSON numbers
 * and dates as YYYY-MM-DD.
 */
import type pg from "pg";

/** A pool or one of its clients: the reports run one statement each. */
type Queryable = Pick<pg.Pool | pg.PoolClient, "query">;

interface QualityRow {
  hours: number;
  start_time: string;
  end_time: string;
  total_requests: number;
  requests_with_api_key: number;
  requests_without_api_key: number;
  tracking_rate_percent: number;
  null_key_with_valid_user: number;
  both_null_likely_anonymous: number;
  null_key_with_valid_user_percent: number;
  both_null_percent: number;
  anonymous_requests: number;
  authenticated_requests: number;
  authenticated_tracking_rate_percent: number | null;
  pending_attributions: number;
  failed_attributions: number;
  alert_status: "ok" | "warning" | "critical" | "no_data";
  recommendations: string[];
}

interface TrendRow {
  period_days: number;
  start_date: string;
  end_date: string;
  total_requests: number;
  requests_with_api_key: number;
  average_tracking_rate_percent: number;
  trend_data: Array<{ date: string; total_requests: number; requests_with_api_key: number; tracking_rate_percent: number }>;
}

const iso = (timestamp: string) => new Date(timestamp).toISOString();

interface CompletenessRow {
  processes: number;
  accepted: number;
  recorded: number;
  missing: number;
}

interface LatencyRow {
  attributed_after_retry: number;
  p50_seconds: number | null;
  p99_seconds: number | null;
  max_seconds: number | null;
  pending: number;
  oldest_pending_seconds: number | null;
}

/**
 * The spec's quality report, plus what keytrack measures beside it (fields the
 * spec does not have, so clients that know only the spec's keep working):
 * `completeness` (requests accepted by keytrack's serving processes that have
 * a row: app_public.completeness_by_hour) and `attribution_latency` (how long
 * the retry worker took: app_public.attribution_latency_report).
 */
export async function qualityReport(db: Queryable, hours: number) {
  // One statement: one round trip, and its three parts read one snapshot (a
  // pool client given by the read router runs one query at a time anyway).
  const { rows: [{ r, c, l }] } = await db.query<{ r: QualityRow; c: CompletenessRow; l: LatencyRow }>(
    `select to_jsonb(q) as r, cx.c, ly.l from app_public.api_key_tracking_quality_report($1) q,
       lateral (select to_jsonb(x) as c from (
                  select count(distinct process_id)::int as processes, coalesce(sum(accepted), 0)::bigint::int as accepted,
                         coalesce(sum(recorded), 0)::bigint::int as recorded, coalesce(sum(missing), 0)::bigint::int as missing
                    from app_public.completeness_by_hour($1)) x) cx,
       lateral (select to_jsonb(y) as l from app_public.attribution_latency_report($1) y) ly`,
    [hours],
  );
  return {
    total_requests: r.total_requests,
    requests_with_api_key: r.requests_with_api_key,
    requests_without_api_key: r.requests_without_api_key,
    tracking_rate_percent: r.tracking_rate_percent,
    breakdown: {
      null_key_with_valid_user: r.null_key_with_valid_user,
      both_null_likely_anonymous: r.both_null_likely_anonymous,
      null_key_with_valid_user_percent: r.null_key_with_valid_user_percent,
      both_null_percent: r.both_null_percent,
    },
    anonymous_requests: r.anonymous_requests,
    authenticated_tracking_rate_percent: r.authenticated_tracking_rate_percent,
    pending_attributions: r.pending_attributions,
    failed_attributions: r.failed_attributions,
    time_window: { hours: r.hours, start_time: iso(r.start_time), end_time: iso(r.end_time) },
    alert_status: r.alert_status,
    recommendations: r.recommendations,
    completeness: {
      serving_processes: c.processes,
      requests_accepted: c.accepted,
      rows_recorded: c.recorded,
      rows_missing: c.missing,
      completeness_percent: c.accepted > 0 ? Math.round((10000 * c.recorded) / c.accepted) / 100 : null,
    },
    attribution_latency: {
      attributed_after_retry: Number(l.attributed_after_retry),
      p50_seconds: l.p50_seconds,
      p99_seconds: l.p99_seconds,
      max_seconds: l.max_seconds,
      pending: Number(l.pending),
      oldest_pending_seconds: l.oldest_pending_seconds,
    },
  };
}

export async function trendReport(db: Queryable, days: number) {
  const { rows } = await db.query<{ r: TrendRow }>(
    "select to_jsonb(t) as r from app_public.api_key_tracking_trend($1) t",
    [days],
  );
  const r = rows[0]!.r;
  return {
    trend_data: r.trend_data.map((d) => ({
      date: d.date,
      total_requests: d.total_requests,
      requests_with_api_key: d.requests_with_api_key,
      tracking_rate_percent: d.tracking_rate_percent,
    })),
    summary: {
      period_days: r.period_days,
      total_requests: r.total_requests,
      requests_with_api_key: r.requests_with_api_key,
      average_tracking_rate_percent: r.average_tracking_rate_percent,
      start_date: r.start_date,
      end_date: r.end_date,
    },
  };
}
