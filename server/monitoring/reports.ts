/**
 * The two reports, computed in SQL (app_public.api_key_tracking_quality_report,
 * app_public.api_key_tracking_trend: the same functions GraphQL and psql use)
 * and shaped here into the spec's JSON. to_jsonb gives numbers as JSON numbers
 * and dates as YYYY-MM-DD.
 */
import type pg from "pg";

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

export async function qualityReport(pool: pg.Pool, hours: number) {
  const { rows } = await pool.query<{ r: QualityRow }>(
    "select to_jsonb(q) as r from app_public.api_key_tracking_quality_report($1) q",
    [hours],
  );
  const r = rows[0]!.r;
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
  };
}

export async function trendReport(pool: pg.Pool, days: number) {
  const { rows } = await pool.query<{ r: TrendRow }>(
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
