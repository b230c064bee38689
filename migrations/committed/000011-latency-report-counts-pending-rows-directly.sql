--! Previous: sha1:cf28be4070095eebf545541de7a8ffe86ab462d1
--! Hash: sha1:41d26dee0d3fd76c380678f5e89d8a18be0dcef9
--! Message: Latency report counts pending rows directly

--! split: 1-current.sql
--------------------------------------------------------------------------------
-- The attribution latency part of the quality endpoint: the rows still pending
-- are counted from the ledger's pending rows themselves (the pending-only
-- partial indexes), in the same scan that finds the oldest one, instead of
-- summing the rollups of the whole history (every hour ever settled, the
-- current hour's minutes and the unsettled rows): the quality endpoint's
-- cost no longer grows with the length of the history. The count is the same
-- (the rollups are exact at every moment); it is now proportional to the rows
-- pending, which the same function already scanned for the oldest.
--------------------------------------------------------------------------------

create or replace function app_public.attribution_latency_report(hours integer default 24)
returns table (
  attributed_after_retry bigint,
  p50_seconds double precision,
  p99_seconds double precision,
  max_seconds double precision,
  pending bigint,
  oldest_pending_seconds double precision
)
  language plpgsql stable
  set search_path = pg_catalog, public, pg_temp
  set jit = off
  as $$
declare
  v_since timestamptz;
  v_pending bigint;
  v_oldest timestamptz;
begin
  if hours is null or hours < 1 or hours > 168 then
    raise exception 'hours must be between 1 and 168, got %', hours using errcode = '22023';
  end if;
  v_since := now() - make_interval(hours => hours);
  select count(*), min(p.created_at) into v_pending, v_oldest
    from app_public.chat_completion_requests p
   where p.attribution_status = 'pending';
  return query
  select count(*),
         percentile_cont(0.5) within group (order by extract(epoch from l.attributed_at - l.created_at))::double precision,
         percentile_cont(0.99) within group (order by extract(epoch from l.attributed_at - l.created_at))::double precision,
         max(extract(epoch from l.attributed_at - l.created_at))::double precision,
         v_pending,
         extract(epoch from now() - v_oldest)::double precision
    from app_public.attribution_retry_latencies l
   where l.created_at >= v_since;
end;
$$;
comment on function app_public.attribution_latency_report(integer) is
  'How long attribution took for the rows that arrived in the last `hours` hours (1..168) and were resolved by the retry worker: how many, p50, p99 and max seconds from arrival to attribution (from attribution_retry_latencies); and the rows still pending (counted from the pending rows themselves, in the same scan as the oldest), with how long the oldest has waited.';
