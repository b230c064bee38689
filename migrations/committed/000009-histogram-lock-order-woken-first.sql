--! Previous: sha1:5990f60bb2b0315b0033d16e167f6572c43f7ae4
--! Hash: sha1:ce0b81bc72bc85c6b592287341be27b9e20cb6c6
--! Message: Latency histogram lock order; woken rows first, per hash

--! split: 1-latency-histogram-lock-order.sql
--------------------------------------------------------------------------------
-- Two retry batches committing at once deadlocked on the latency histogram
-- ("deadlock detected ... while rechecking updated tuple in relation
-- attribution_latency", seen in CI and reproduced with 8 concurrent callers:
-- 10-20% of calls failed). Its UPDATE ... FROM locked the bucket rows in the
-- order the join produced them, which follows their physical place in the
-- heap, and every update moves a row. An INSERT ... ON CONFLICT DO UPDATE
-- takes its rows in the order of its ordered SELECT: every batch locks the
-- buckets in ascending le, so concurrent batches wait, never deadlock.
--------------------------------------------------------------------------------

create or replace function app_private.observe_attribution_latency(seconds double precision[]) returns void
  language sql volatile security definer
  set search_path = pg_catalog, public, pg_temp
  as $$
  insert into app_private.attribution_latency as l (le, observations, sum_seconds, updated_at)
  select c.le, c.n, c.total, now()
    from (
      select b.le, count(s) as n, coalesce(sum(s), 0) as total
        from (select h.le, lag(h.le) over (order by h.le) as above from app_private.attribution_latency h) b
        join unnest(seconds) s on s <= b.le and (b.above is null or s > b.above)
       group by b.le
    ) c
   order by c.le
  on conflict (le) do update
    set observations = l.observations + excluded.observations,
        sum_seconds = l.sum_seconds + excluded.sum_seconds,
        updated_at = excluded.updated_at
$$;
comment on function app_private.observe_attribution_latency(double precision[]) is
  'Adds latencies (seconds) to the attribution latency histogram; one call per retry batch. Locks the buckets in ascending le (an ordered upsert), so concurrent batches never deadlock.';

--! split: 2-woken-rows-first.sql
--------------------------------------------------------------------------------
-- The retry worker, v4: rows whose key was imported resolve at the speed of
-- an UPDATE. Measured before (drill:attribution, 100,000 late rows imported
-- in bulk): p99 from import to attribution 18.9 s, because
-- - a batch took at most batch_size rows (500) and, of those, only about half
--   were woken rows: the rest were rows still due with unknown keys;
-- - the woken rows were found by scanning the pending rows, not per hash;
-- - every batch removed finished wakes with an anti-join against every
--   pending row (about 180 ms, spilling to disk).
-- Now: woken rows are taken per hash through the pending-hash index, up to
-- woken_batch_size (default 5000) at a time, and first; rows due by their
-- schedule only fill what is left of batch_size. Only the wakes this batch
-- looked at are checked (one index probe each) and removed when no pending
-- row presents them any more. Locks: ledger rows and wakes are taken with
-- SKIP LOCKED, counters in a fixed order: concurrent workers never wait on
-- each other's rows and never deadlock.
--------------------------------------------------------------------------------

drop function if exists app_private.resolve_pending_attributions(integer, integer, interval, interval, timestamptz);
drop function if exists app_private.resolve_pending_attributions(integer, integer, interval, interval, timestamptz, integer);

create function app_private.resolve_pending_attributions(
  batch_size integer default 500,
  max_attempts integer default 10,
  base_delay interval default interval '1 second',
  max_delay interval default interval '10 minutes',
  as_of timestamptz default now(),
  woken_batch_size integer default 5000
) returns app_private.attribution_retry_result
  language plpgsql volatile security definer
  set search_path = pg_catalog, public, pg_temp
  as $$
declare
  v_result app_private.attribution_retry_result;
  v_latencies double precision[];
  v_ids bigint[];
  v_created timestamptz[];
  v_more_ids bigint[];
  v_more_created timestamptz[];
  v_wakes bytea[];
  v_hash bytea;
  v_room integer;
begin
  if batch_size is null or batch_size < 1 or batch_size > 100000 then
    raise exception 'batch_size must be between 1 and 100000, got %', batch_size using errcode = '22023';
  end if;
  if woken_batch_size is null or woken_batch_size < 1 or woken_batch_size > 100000 then
    raise exception 'woken_batch_size must be between 1 and 100000, got %', woken_batch_size using errcode = '22023';
  end if;
  if max_attempts is null or max_attempts < 1 or max_attempts > 1000 then
    raise exception 'max_attempts must be between 1 and 1000, got %', max_attempts using errcode = '22023';
  end if;
  if base_delay is null or base_delay <= interval '0' or max_delay is null or max_delay < base_delay then
    raise exception 'base_delay must be positive and max_delay at least base_delay' using errcode = '22023';
  end if;

  -- 1. Rows whose key was imported since they became pending, oldest wake
  -- first, found per hash through chat_completion_requests_pending_hash_idx.
  -- A wake whose rows are all taken (or gone) still comes out, with no row:
  -- step 4 checks it.
  select coalesce(array_agg(x.id) filter (where x.id is not null), '{}'),
         coalesce(array_agg(x.created_at) filter (where x.id is not null), '{}'),
         coalesce(array_agg(distinct x.key_hash), '{}')
    into v_ids, v_created, v_wakes
    from (
      select w.key_hash, p.id, p.created_at
        from (select aw.key_hash from app_private.attribution_wakes aw
               order by aw.woken_at, aw.key_hash limit 1000) w
        left join lateral (
          select r.id, r.created_at
            from app_public.chat_completion_requests r
           where r.api_key_hash = w.key_hash and r.attribution_status = 'pending'
           limit woken_batch_size
           for update of r skip locked
        ) p on true
       limit woken_batch_size
    ) x;

  -- 2. Rows due by their own schedule, in what is left of batch_size.
  v_room := batch_size - cardinality(v_ids);
  if v_room > 0 then
    select coalesce(array_agg(d.id), '{}'), coalesce(array_agg(d.created_at), '{}')
      into v_more_ids, v_more_created
      from (
        select r.id, r.created_at
          from app_public.chat_completion_requests r
         where r.attribution_status = 'pending' and r.attribution_next_attempt_at <= as_of
           and r.id <> all (v_ids)
         order by r.attribution_next_attempt_at
         limit v_room
         for update skip locked
      ) d;
    v_ids := v_ids || v_more_ids;
    v_created := v_created || v_more_created;
  end if;

  -- 3. Look every taken row's key up again.
  with looked_up as (
    select r.id, r.created_at, r.attribution_attempts + 1 as attempts, k.id as key_id, k.user_id as key_user_id
      from unnest(v_ids, v_created) as d(id, created_at)
      join app_public.chat_completion_requests r on r.id = d.id and r.created_at = d.created_at
      left join app_private.api_key_secrets s on s.key_hash = r.api_key_hash
      left join app_public.api_keys k on k.id = s.api_key_id
  ), updated as (
    update app_public.chat_completion_requests r set
      api_key_id = l.key_id,
      user_id = coalesce(l.key_user_id, r.user_id),
      attribution_attempts = l.attempts,
      attribution_status = case when l.key_id is not null then 'resolved'
                                when l.attempts >= max_attempts then 'failed'
                                else 'pending' end,
      attribution_method = case when l.key_id is not null then 'retry' end,
      attribution_reason = case when l.key_id is not null then null else 'not_found' end,
      attribution_error = case when l.key_id is null
                               then format('no key has this hash (attempt %s of %s)', l.attempts, max_attempts) end,
      attributed_at = case when l.key_id is not null then as_of end,
      attribution_next_attempt_at = case when l.key_id is null and l.attempts < max_attempts
        then as_of + least(max_delay, base_delay * power(2, least(l.attempts - 1, 30))) end
    from looked_up l
    where r.id = l.id and r.created_at = l.created_at
    returning r.attribution_status, greatest(extract(epoch from as_of - r.created_at), 0)::double precision as latency
  )
  select count(*)::int,
         count(*) filter (where attribution_status = 'resolved')::int,
         count(*) filter (where attribution_status = 'failed')::int,
         count(*) filter (where attribution_status = 'pending')::int,
         array_agg(latency) filter (where attribution_status <> 'pending')
    into v_result.examined, v_result.resolved, v_result.failed, v_result.still_pending, v_latencies
    from updated;

  if v_result.examined > 0 then
    perform app_private.count_attribution_events(
      array['retry_resolved', 'retry_still_pending', 'retry_failed'],
      array[v_result.resolved, v_result.still_pending, v_result.failed]::bigint[]);
  end if;
  if v_latencies is not null then
    perform app_private.observe_attribution_latency(v_latencies);
  end if;

  -- 4. A wake this batch looked at is done once no pending row presents it
  -- (rows another worker holds still count as pending here, so their wake
  -- stays until that worker's own check). In key_hash order, skipping a wake
  -- another worker is removing.
  foreach v_hash in array (select coalesce(array_agg(h order by h), '{}') from unnest(v_wakes) h) loop
    if not exists (select 1 from app_public.chat_completion_requests r
                    where r.api_key_hash = v_hash and r.attribution_status = 'pending') then
      delete from app_private.attribution_wakes w
       where w.key_hash = (select aw.key_hash from app_private.attribution_wakes aw
                            where aw.key_hash = v_hash for update skip locked);
    end if;
  end loop;

  if exists (select 1 from app_private.attribution_wakes) then
    v_result.next_attempt_at := now();
  else
    select min(r.attribution_next_attempt_at) into v_result.next_attempt_at
      from app_public.chat_completion_requests r
     where r.attribution_status = 'pending';
  end if;
  if v_result.next_attempt_at is not null then
    perform app_private.schedule_attribution_retry(greatest(v_result.next_attempt_at, now()));
  end if;
  return v_result;
end;
$$;
comment on function app_private.resolve_pending_attributions(integer, integer, interval, interval, timestamptz, integer) is
  'The retry worker''s body. Takes first the pending rows whose key was imported since (app_private.attribution_wakes, oldest wake first, per hash through the pending-hash index), up to woken_batch_size; then rows due by as_of, up to what is left of batch_size; all with FOR UPDATE SKIP LOCKED (workers run in parallel and never wait on a row). Looks their key hash up again: found -> resolved (method retry); not found -> pending again after base_delay * 2^(attempts-1) (capped at max_delay), or failed (reason not_found) at max_attempts. Counts the outcomes in app_private.attribution_events and the latency of every row it resolves or fails in app_private.attribution_latency (one ordered upsert each per batch), removes the wakes it looked at that no pending row presents any more, and reschedules the worker (at once while wakes remain). Idempotent; never deadlocks with another worker, an import or a backfill.';
revoke all on function app_private.resolve_pending_attributions(integer, integer, interval, interval, timestamptz, integer) from public;
