--! Previous: sha1:ce0b81bc72bc85c6b592287341be27b9e20cb6c6
--! Hash: sha1:cf28be4070095eebf545541de7a8ffe86ab462d1
--! Message: Rollups settled by id, minute rollups, change rows

--! split: 2-reads.sql
--------------------------------------------------------------------------------
-- Monitoring reads in a few milliseconds at any size, with a busy current hour
-- and right after a backfill, still exact at every moment.
--
-- 000003 settled rollups by hour: the current hour, and any hour a late row or
-- an attribution change touched, were scanned raw (~600 ms per million rows).
-- Now rows are settled by id: every refresh takes a fence (the last id drawn
-- from the ledger's identity sequence, and the transactions writing the ledger
-- at that moment), waits a moment for those transactions to end, and counts
-- every row up to that id into per-minute and per-hour rollups, whatever its
-- created_at. Reads add up rollups (hours, and minutes at the edges of their
-- window), the few changes not applied yet, and the rows not settled yet (by
-- id: the last minute or so of inserts), and subtract the settled rows of the
-- edge minutes that fall outside the window. Late rows need no mark at all;
-- retry, backfill and deletes record their changes per row (statement-level
-- triggers), so no hour is ever scanned raw because of them; only an explicit
-- invalidation (loads that bypassed triggers) makes an hour be recounted and
-- read raw until the next refresh. The insert path gains nothing.
--------------------------------------------------------------------------------

-- Idempotent: drop what this migration creates (newest first); the functions
-- of 000003 that it redefines are replaced in place (same signatures, grants kept).
drop function if exists app_public.ledger_last_id();
drop table if exists app_public.attribution_retry_latencies;
drop table if exists app_public.attribution_rollup_changes;
drop table if exists app_public.attribution_rollups_minutely;
alter table app_public.attribution_rollup_dirty_hours drop column if exists recount;
alter table app_public.attribution_rollup_state
  drop constraint if exists attribution_rollup_state_fence_id_check,
  drop column if exists settled_id,
  drop column if exists fence_id;

--------------------------------------------------------------------------------
-- State: how far rows are settled, by id. The rollups of 000003 counted rows by
-- hour; their meaning changes, so everything is counted again from the raw rows
-- by the first refresh (settled_through = -infinity means nothing is settled:
-- reads scan raw until then). Frozen hours keep their rollups.
--------------------------------------------------------------------------------

alter table app_public.attribution_rollup_state
  add column settled_id bigint not null default 0,
  add column fence_id bigint,
  add constraint attribution_rollup_state_fence_id_check check ((fence_id is null) = (fence_until is null));
comment on column app_public.attribution_rollup_state.settled_id is 'Every ledger row with id <= settled_id is counted in the rollups (its changes since are in attribution_rollup_changes); rows above it are read raw. Ids come from the ledger''s identity sequence (CACHE 1), which writers never override.';
comment on column app_public.attribution_rollup_state.fence_id is 'The pending fence''s id: the last id drawn when it was taken; rows up to it settle once every fence transaction has ended.';
comment on column app_public.attribution_rollup_state.settled_through is 'The UTC hour of the last fence that passed: rows whose ids were drawn before then are settled. -infinity: nothing is settled, reads scan raw rows only.';
comment on column app_public.attribution_rollup_state.fence_transactions is 'The transactions (virtual transaction ids, pg_locks.virtualtransaction) that held a write lock on chat_completion_requests or a partition when the pending fence was taken: rows up to fence_id settle once all of them have ended (a row''s id is drawn while its writer holds that lock). Transactions of other tables and databases never hold settlement back.';
comment on column app_public.attribution_rollup_state.fence_until is 'The UTC hour in which the pending fence was taken (settled_through once it passes).';
update app_public.attribution_rollup_state
   set settled_through = '-infinity', settled_id = 0, fence_id = null,
       fence_transactions = null, fence_until = null, fence_set_at = null;

-- Marks: only `recount` marks (explicit invalidations) change reads now; marks
-- of late inserts (written by older versions of the insert trigger) are
-- ignored, since settling by id counts late rows anyway, and just cleared.
alter table app_public.attribution_rollup_dirty_hours add column recount boolean not null default false;
comment on column app_public.attribution_rollup_dirty_hours.recount is 'True: the hour''s rollups are wrong (app_private.invalidate_attribution_rollups(): rows changed without triggers), reads scan it raw until the next refresh recounts it. False: a late insert (older insert triggers), which settling by id already counts: ignored, cleared by the next refresh.';
comment on table app_public.attribution_rollup_dirty_hours is E'@behavior -*\nUTC hours to recount from the raw rows (recount) because their rows changed without triggers: reads scan them raw until the next refresh recounts them and removes the marks. Marks without recount (late inserts, from older insert triggers) are ignored.';

--------------------------------------------------------------------------------
-- Minute rollups: the edges of a window that does not start or end on a whole
-- hour (the spec's view and the quality report start at now() minus N hours,
-- the metrics' tracking rate covers the last 60 minutes), and whole hours that
-- are not hours of the session's time zone (Asia/Kolkata), read 60 rows an
-- hour instead of every raw row.
--------------------------------------------------------------------------------

create table app_public.attribution_rollups_minutely (
  minute timestamptz not null check (minute = date_trunc('minute', minute, 'UTC')),
  attribution_status text not null,
  is_anonymous boolean not null,
  has_user boolean not null,
  initial_attribution text not null,
  requests bigint not null check (requests > 0),
  primary key (minute, attribution_status, is_anonymous, has_user, initial_attribution)
);
alter table app_public.attribution_rollups_minutely enable row level security;
comment on table app_public.attribution_rollups_minutely is E'@behavior -*\nRequest counts per minute and attribution outcome of the rows with id <= attribution_rollup_state.settled_id, kept by app_private.refresh_attribution_rollups() (the hourly rollups are their sums). Read through app_public.attribution_counts_by_hour().';
comment on column app_public.attribution_rollups_minutely.minute is 'The minute (date_trunc(''minute'', created_at, ''UTC'')).';
comment on column app_public.attribution_rollups_minutely.attribution_status is 'The rows'' attribution_status.';
comment on column app_public.attribution_rollups_minutely.is_anonymous is 'The rows'' is_anonymous.';
comment on column app_public.attribution_rollups_minutely.has_user is 'Whether the rows'' user_id is set.';
comment on column app_public.attribution_rollups_minutely.initial_attribution is 'The rows'' initial_attribution, `unknown` for rows recorded before it was kept.';
comment on column app_public.attribution_rollups_minutely.requests is 'How many rows.';
create policy select_admin on app_public.attribution_rollups_minutely for select to keytrack_admin, keytrack_analyst using (true);
comment on policy select_admin on app_public.attribution_rollups_minutely is 'Admins and analysts read the rollups (they see every request anyway); users read raw rows through their own policy.';
-- keytrack_user too: the spec's view (security_invoker) reads it; it sees no row of it.
grant select on app_public.attribution_rollups_minutely to keytrack_admin, keytrack_analyst, keytrack_user;

comment on table app_public.attribution_rollups_hourly is E'@behavior -*\nRequest counts per UTC hour and attribution outcome of the rows with id <= attribution_rollup_state.settled_id, kept by app_private.refresh_attribution_rollups(). Read through app_public.attribution_counts_by_hour(), which adds the changes not applied yet and the rows not settled yet.';

--------------------------------------------------------------------------------
-- Changes: what UPDATE and DELETE did to the rolled-up columns, one row per
-- ledger row and outcome (-1 for what it was, +1 for what it became), written
-- by the statement-level triggers with one INSERT per statement. Reads add the
-- changes of settled rows; the refresh applies them to the rollups and removes
-- them, in the same snapshot as it counts newly settled rows.
--------------------------------------------------------------------------------

create table app_public.attribution_rollup_changes (
  id bigint generated always as identity primary key,
  row_id bigint not null,
  created_at timestamptz not null,
  attribution_status text not null,
  is_anonymous boolean not null,
  has_user boolean not null,
  initial_attribution text not null,
  requests integer not null check (requests <> 0)
);
create index attribution_rollup_changes_created_at_idx on app_public.attribution_rollup_changes (created_at);
alter table app_public.attribution_rollup_changes enable row level security;
comment on table app_public.attribution_rollup_changes is E'@behavior -*\nChanges to the rolled-up columns of ledger rows (retry, backfill, deletes) not yet applied to the rollups: for each changed row, -1 for its old outcome and +1 for its new one (a deleted row: -1). Written by triggers on chat_completion_requests, consumed by app_private.refresh_attribution_rollups().';
comment on column app_public.attribution_rollup_changes.id is 'Primary key.';
comment on column app_public.attribution_rollup_changes.row_id is 'The ledger row''s id: its change counts only if the row is settled (id <= settled_id); a row not settled yet is read raw as it is.';
comment on column app_public.attribution_rollup_changes.created_at is 'The ledger row''s created_at (its bucket).';
comment on column app_public.attribution_rollup_changes.attribution_status is 'The outcome''s attribution_status.';
comment on column app_public.attribution_rollup_changes.is_anonymous is 'The outcome''s is_anonymous.';
comment on column app_public.attribution_rollup_changes.has_user is 'Whether the outcome''s user_id is set.';
comment on column app_public.attribution_rollup_changes.initial_attribution is 'The outcome''s initial_attribution (`unknown` when NULL).';
comment on column app_public.attribution_rollup_changes.requests is '-1 (the row left this outcome) or +1 (it entered it).';
create policy select_admin on app_public.attribution_rollup_changes for select to keytrack_admin, keytrack_analyst using (true);
comment on policy select_admin on app_public.attribution_rollup_changes is 'Admins and analysts read the pending changes with the rollups.';
grant select on app_public.attribution_rollup_changes to keytrack_admin, keytrack_analyst, keytrack_user;

--------------------------------------------------------------------------------
-- Retry latencies: the rows the retry worker resolved, with their arrival and
-- attribution times, for app_public.attribution_latency_report() (it scanned
-- every row of its window, ~4 s at 10M rows). Kept by the same statement-level
-- triggers (the retry worker's UPDATE sets attribution_method = 'retry'): no
-- cost on the insert path, which never writes `retry`.
--------------------------------------------------------------------------------

create table app_public.attribution_retry_latencies (
  row_id bigint not null,
  created_at timestamptz not null,
  attributed_at timestamptz,
  primary key (row_id, created_at)
);
create index attribution_retry_latencies_created_at_idx on app_public.attribution_retry_latencies (created_at) include (attributed_at);
alter table app_public.attribution_retry_latencies enable row level security;
comment on table app_public.attribution_retry_latencies is E'@behavior -*\nThe ledger rows whose attribution_method is `retry` (resolved by the retry worker), with their created_at and attributed_at: exactly those rows, kept by the UPDATE and DELETE triggers of chat_completion_requests (the insert trigger never sets `retry`). Read by app_public.attribution_latency_report().';
comment on column app_public.attribution_retry_latencies.row_id is 'The ledger row''s id.';
comment on column app_public.attribution_retry_latencies.created_at is 'The ledger row''s created_at (when the request arrived).';
comment on column app_public.attribution_retry_latencies.attributed_at is 'The ledger row''s attributed_at (when the retry worker resolved it).';
create policy select_admin on app_public.attribution_retry_latencies for select to keytrack_admin, keytrack_analyst using (true);
comment on policy select_admin on app_public.attribution_retry_latencies is 'Admins and analysts read the retry latencies (they see every request anyway).';
grant select on app_public.attribution_retry_latencies to keytrack_admin, keytrack_analyst;
-- The rows resolved by retry so far (rows loaded without triggers included).
insert into app_public.attribution_retry_latencies (row_id, created_at, attributed_at)
  select c.id, c.created_at, c.attributed_at from app_public.chat_completion_requests c where c.attribution_method = 'retry';

-- The hourly rollups get the same treatment as the minute ones from here on.
create or replace function app_private.tg_chat_completion_requests__mark_rollup_hours() returns trigger
  language plpgsql security definer
  set search_path = pg_catalog, public, pg_temp
  as $$
begin
  if tg_op = 'DELETE' then
    insert into app_public.attribution_rollup_changes (row_id, created_at, attribution_status, is_anonymous, has_user, initial_attribution, requests)
      select o.id, o.created_at, o.attribution_status, o.is_anonymous, o.user_id is not null, coalesce(o.initial_attribution, 'unknown'), -1
        from old_rows o;
    delete from app_public.attribution_retry_latencies l
     using old_rows o
     where o.attribution_method = 'retry' and l.row_id = o.id and l.created_at = o.created_at;
  else
    -- Retry latencies: rows that left `retry` (or whose times changed), then rows that entered it.
    delete from app_public.attribution_retry_latencies l
     using (select o.id, o.created_at, o.attributed_at from old_rows o where o.attribution_method = 'retry'
            except all
            select n.id, n.created_at, n.attributed_at from new_rows n where n.attribution_method = 'retry') o
     where l.row_id = o.id and l.created_at = o.created_at;
    insert into app_public.attribution_retry_latencies (row_id, created_at, attributed_at)
      select n.id, n.created_at, n.attributed_at from new_rows n where n.attribution_method = 'retry'
      except all
      select o.id, o.created_at, o.attributed_at from old_rows o where o.attribution_method = 'retry'
      on conflict (row_id, created_at) do update set attributed_at = excluded.attributed_at;
    -- Only rows whose rolled-up columns changed (a retry that leaves a row
    -- pending changes nothing a rollup counts): their -1 and +1 cancel out.
    insert into app_public.attribution_rollup_changes (row_id, created_at, attribution_status, is_anonymous, has_user, initial_attribution, requests)
      select x.id, x.created_at, x.attribution_status, x.is_anonymous, x.has_user, x.initial_attribution, sum(x.n)
        from (select o.id, o.created_at, o.attribution_status, o.is_anonymous, o.user_id is not null as has_user,
                     coalesce(o.initial_attribution, 'unknown') as initial_attribution, -1 as n
                from old_rows o
              union all
              select n.id, n.created_at, n.attribution_status, n.is_anonymous, n.user_id is not null,
                     coalesce(n.initial_attribution, 'unknown'), 1
                from new_rows n) x
       group by 1, 2, 3, 4, 5, 6
      having sum(x.n) <> 0;
  end if;
  return null;
end;
$$;
comment on function app_private.tg_chat_completion_requests__mark_rollup_hours() is
  'Trigger function (AFTER UPDATE/DELETE FOR EACH STATEMENT on chat_completion_requests, with transition tables): records in attribution_rollup_changes, with one INSERT per statement, the outcome each changed row left (-1) and entered (+1), for rows whose rolled-up columns changed (id, created_at, attribution_status, is_anonymous, whether user_id is set, initial_attribution), and -1 for each deleted row. Reads add these changes at once; the next refresh applies them to the rollups. Also keeps attribution_retry_latencies equal to the rows whose attribution_method is `retry`.';
comment on trigger _900_mark_rollup_hours_update on app_public.chat_completion_requests is 'Records attribution changes (retry, backfill) for the rollups (see app_private.tg_chat_completion_requests__mark_rollup_hours).';
comment on trigger _900_mark_rollup_hours_delete on app_public.chat_completion_requests is 'Records deleted rows for the rollups (see app_private.tg_chat_completion_requests__mark_rollup_hours).';

create or replace function app_private.invalidate_attribution_rollups(since timestamptz, until timestamptz) returns integer
  language plpgsql volatile
  set search_path = pg_catalog, public, pg_temp
  as $$
declare
  v_count integer;
begin
  if since is null or until is null or since >= until or since = '-infinity' or until = 'infinity' then
    raise exception 'since and until must be finite with since < until' using errcode = '22023';
  end if;
  insert into app_public.attribution_rollup_dirty_hours (hour, recount)
    select h, true from generate_series(date_trunc('hour', since, 'UTC'), until - interval '1 microsecond', interval '1 hour') h;
  get diagnostics v_count = row_count;
  return v_count;
end;
$$;
comment on function app_private.invalidate_attribution_rollups(timestamptz, timestamptz) is
  'Marks every UTC hour that overlaps [since, until) for a recount, so reads scan it raw and the next refresh counts it again from the raw rows. For changes that bypass triggers (UPDATE or DELETE with session_replication_role = replica, on a partition without triggers); rows inserted without triggers need nothing (they are settled by id). Returns how many hours it marked.';

--------------------------------------------------------------------------------
-- Settling (the worker, every minute).
--------------------------------------------------------------------------------

create or replace function app_private.refresh_attribution_rollups() returns app_private.attribution_rollup_refresh_result
  language plpgsql volatile
  set search_path = pg_catalog, public, pg_temp
  -- Over-estimated recounts would JIT-compile every minute; a generic plan
  -- would not know that `id > settled_id` is the last minute's rows.
  set jit = off
  set plan_cache_mode = force_custom_plan
  as $$
declare
  v_state app_public.attribution_rollup_state;
  v_seq regclass := pg_catalog.pg_get_serial_sequence('app_public.chat_completion_requests', 'id')::regclass;
  v_cache bigint;
  v_target timestamptz;
  v_last_id bigint;
  v_vxids text[];
  v_deadline timestamptz;
  v_from_scratch boolean;
  v_old bigint;
  v_new bigint;
  v_settled timestamptz;
  v_recount timestamptz[];
  v_minutes timestamptz[];
  v_statuses text[];
  v_anonymous boolean[];
  v_has_user boolean[];
  v_initial text[];
  v_counts bigint[];
  v_result app_private.attribution_rollup_refresh_result;
begin
  -- Each statement below needs a snapshot newer than the one before (the
  -- count must see the writers the fence waited for): READ COMMITTED only.
  if current_setting('transaction_isolation') <> 'read committed' then
    raise exception 'refresh_attribution_rollups() must run in a READ COMMITTED transaction, not %', current_setting('transaction_isolation')
      using errcode = '25001';
  end if;
  -- With a sequence cache, a session hands out ids below ones already drawn
  -- by others: settling by id would miss their rows.
  select s.cache_size into v_cache from pg_catalog.pg_sequences s
   where format('%I.%I', s.schemaname, s.sequencename)::regclass = v_seq;
  if v_cache is distinct from 1 then
    raise exception 'the ledger''s id sequence % must have CACHE 1 for the rollups to settle by id (it has %)', v_seq, v_cache
      using errcode = '55000';
  end if;
  -- One refresh at a time; a second one has nothing to add.
  select * into v_state from app_public.attribution_rollup_state for update skip locked;
  if not found then
    return v_result;
  end if;
  v_from_scratch := v_state.settled_through = '-infinity';
  v_old := case when v_from_scratch then 0 else v_state.settled_id end;
  v_new := v_old;
  v_settled := v_state.settled_through;

  -- A fence taken by an earlier run, once its transactions have ended.
  if v_state.fence_until is not null
     and not exists (select 1 from pg_catalog.pg_locks l where l.virtualtransaction = any(v_state.fence_transactions)) then
    v_new := greatest(v_new, v_state.fence_id);
    v_settled := greatest(v_settled, v_state.fence_until);
    v_state.fence_id := null;
    v_state.fence_transactions := null;
    v_state.fence_until := null;
    v_state.fence_set_at := null;
  end if;

  -- A new fence: the last id drawn, then (read after it) every transaction
  -- holding a write lock on the ledger. A writer takes that lock before it
  -- draws an id and keeps it until it ends (locks are released after the
  -- commit is visible), so once those transactions have ended, every row up
  -- to that id is committed or gone. Inserts are usually over within
  -- milliseconds: wait up to a second for them, so rows settle in this run.
  if v_state.fence_until is null then
    v_target := date_trunc('hour', clock_timestamp(), 'UTC');
    v_last_id := coalesce(pg_catalog.pg_sequence_last_value(v_seq), 0);
    select coalesce(array_agg(distinct l.virtualtransaction), '{}') into v_vxids
      from pg_catalog.pg_locks l
     where l.locktype = 'relation'
       and l.database = (select d.oid from pg_catalog.pg_database d where d.datname = current_database())
       and l.mode in ('RowExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')
       and l.relation in (select 'app_public.chat_completion_requests'::regclass
                          union all
                          select i.inhrelid::regclass from pg_catalog.pg_inherits i
                           where i.inhparent = 'app_public.chat_completion_requests'::regclass);
    v_deadline := clock_timestamp() + interval '1 second';
    -- (Not when this transaction is one of them: it cannot wait for itself.)
    while cardinality(v_vxids) > 0 and clock_timestamp() < v_deadline
          and not exists (select 1 from pg_catalog.pg_locks l
                           where l.pid = pg_catalog.pg_backend_pid() and l.virtualtransaction = any(v_vxids)) loop
      perform pg_catalog.pg_sleep(0.005);
      select coalesce(array_agg(distinct l.virtualtransaction), '{}') into v_vxids
        from pg_catalog.pg_locks l where l.virtualtransaction = any(v_vxids);
    end loop;
    if cardinality(v_vxids) = 0 then
      v_new := greatest(v_new, v_last_id);
      v_settled := greatest(v_settled, v_target);
    else
      v_state.fence_id := v_last_id;
      v_state.fence_transactions := v_vxids;
      v_state.fence_until := v_target;
      v_state.fence_set_at := now();
    end if;
  end if;

  if v_settled = '-infinity' then
    -- No fence has passed yet: nothing is settled, nothing to count.
    update app_public.attribution_rollup_state s set
      fence_id = v_state.fence_id, fence_transactions = v_state.fence_transactions,
      fence_until = v_state.fence_until, fence_set_at = v_state.fence_set_at, refreshed_at = now();
    v_result.settled_through := v_settled;
    v_result.settled_hours := 0;
    v_result.recomputed_hours := 0;
    v_result.waiting_since := v_state.fence_set_at;
    return v_result;
  end if;

  if v_from_scratch then
    -- Everything is counted again, except frozen hours (their raw rows may be gone).
    delete from app_public.attribution_rollups_minutely m where m.minute >= v_state.frozen_before;
    delete from app_public.attribution_rollups_hourly r where r.hour >= v_state.frozen_before;
  end if;

  -- One statement, so one snapshot: the marks and changes it consumes are
  -- exactly those whose effects the rows it counts already show. Changes of
  -- rows settled before this run are applied; changes of rows counted now (or
  -- still unsettled) are dropped, the count sees them. Hours marked for a
  -- recount are counted whole (rows up to the new settled id).
  with marks as (
    delete from app_public.attribution_rollup_dirty_hours d returning d.hour, d.recount
  ), recount as (
    select distinct m.hour from marks m
     where m.recount and m.hour >= v_state.frozen_before and not v_from_scratch
  ), consumed as (
    delete from app_public.attribution_rollup_changes d
    returning d.row_id, d.created_at, d.attribution_status, d.is_anonymous, d.has_user, d.initial_attribution, d.requests
  ), changes as (
    select date_trunc('minute', d.created_at, 'UTC') as minute, d.attribution_status, d.is_anonymous, d.has_user,
           d.initial_attribution, d.requests::bigint as n
      from consumed d
     where d.row_id <= v_old
       and date_trunc('hour', d.created_at, 'UTC') not in (select h.hour from recount h)
    union all
    select date_trunc('minute', c.created_at, 'UTC'), c.attribution_status, c.is_anonymous, c.user_id is not null,
           coalesce(c.initial_attribution, 'unknown'), 1
      from app_public.chat_completion_requests c
     where c.id > v_old and c.id <= v_new
       and (not v_from_scratch or c.created_at >= v_state.frozen_before)
       and date_trunc('hour', c.created_at, 'UTC') not in (select h.hour from recount h)
    union all
    select date_trunc('minute', c.created_at, 'UTC'), c.attribution_status, c.is_anonymous, c.user_id is not null,
           coalesce(c.initial_attribution, 'unknown'), 1
      from recount h
      join app_public.chat_completion_requests c on c.created_at >= h.hour and c.created_at < h.hour + interval '1 hour'
     where c.id <= v_new
  ), net as (
    select g.minute, g.attribution_status, g.is_anonymous, g.has_user, g.initial_attribution, sum(g.n)::bigint as n
      from changes g
     group by 1, 2, 3, 4, 5
    having sum(g.n) <> 0
  )
  select (select array_agg(h.hour) from recount h),
         array_agg(t.minute), array_agg(t.attribution_status), array_agg(t.is_anonymous), array_agg(t.has_user),
         array_agg(t.initial_attribution), array_agg(t.n)
    into v_recount, v_minutes, v_statuses, v_anonymous, v_has_user, v_initial, v_counts
    from net t;

  if v_recount is not null then
    delete from app_public.attribution_rollups_hourly r where r.hour = any(v_recount);
    delete from app_public.attribution_rollups_minutely m
     using unnest(v_recount) h(hour)
     where m.minute >= h.hour and m.minute < h.hour + interval '1 hour';
  end if;

  if v_minutes is not null then
    -- A count that would become negative violates the CHECK: the rollups
    -- would be wrong, better to fail loudly.
    merge into app_public.attribution_rollups_minutely m
    using (select * from unnest(v_minutes, v_statuses, v_anonymous, v_has_user, v_initial, v_counts)
             as u(minute, attribution_status, is_anonymous, has_user, initial_attribution, n)) u
       on m.minute = u.minute and m.attribution_status = u.attribution_status and m.is_anonymous = u.is_anonymous
      and m.has_user = u.has_user and m.initial_attribution = u.initial_attribution
    when matched and m.requests + u.n = 0 then delete
    when matched then update set requests = m.requests + u.n
    when not matched then insert (minute, attribution_status, is_anonymous, has_user, initial_attribution, requests)
      values (u.minute, u.attribution_status, u.is_anonymous, u.has_user, u.initial_attribution, u.n);

    merge into app_public.attribution_rollups_hourly r
    using (select date_trunc('hour', u.minute, 'UTC') as hour, u.attribution_status, u.is_anonymous, u.has_user,
                  u.initial_attribution, sum(u.n)::bigint as n
             from unnest(v_minutes, v_statuses, v_anonymous, v_has_user, v_initial, v_counts)
               as u(minute, attribution_status, is_anonymous, has_user, initial_attribution, n)
            group by 1, 2, 3, 4, 5
           having sum(u.n) <> 0) u
       on r.hour = u.hour and r.attribution_status = u.attribution_status and r.is_anonymous = u.is_anonymous
      and r.has_user = u.has_user and r.initial_attribution = u.initial_attribution
    when matched and r.requests + u.n = 0 then delete
    when matched then update set requests = r.requests + u.n
    when not matched then insert (hour, attribution_status, is_anonymous, has_user, initial_attribution, requests)
      values (u.hour, u.attribution_status, u.is_anonymous, u.has_user, u.initial_attribution, u.n);
  end if;

  update app_public.attribution_rollup_state s set
    settled_through = v_settled,
    settled_id = v_new,
    fence_id = v_state.fence_id,
    fence_transactions = v_state.fence_transactions,
    fence_until = v_state.fence_until,
    fence_set_at = v_state.fence_set_at,
    refreshed_at = now();

  v_result.settled_through := v_settled;
  v_result.settled_hours := case when v_state.settled_through = '-infinity' then 0
                                 else (extract(epoch from v_settled - v_state.settled_through) / 3600)::integer end;
  v_result.recomputed_hours := coalesce(cardinality(v_recount), 0);
  v_result.waiting_since := v_state.fence_set_at;
  return v_result;
end;
$$;
comment on function app_private.refresh_attribution_rollups() is
  'The rollup worker''s body (every minute): takes a fence (the last id drawn and the transactions writing the ledger), waits up to a second for them to end (else the next run settles it), then in one snapshot counts the rows up to that id into the minute and hour rollups, applies and removes the recorded changes of rows settled before, and recounts the hours marked for a recount. Cost: the rows inserted and changed since the last run (plus recounted hours), whatever their created_at. Idempotent; concurrent runs skip. Reads are exact whether or not it runs; it only makes them cheaper. Refuses (55000) if the ledger''s id sequence has a cache.';

create or replace function app_private.freeze_attribution_rollups(before timestamptz) returns app_public.attribution_rollup_state
  language plpgsql volatile
  set search_path = pg_catalog, public, pg_temp
  as $$
declare
  v_state app_public.attribution_rollup_state;
begin
  select * into v_state from app_public.attribution_rollup_state for update;
  if before is null or before <> date_trunc('hour', before, 'UTC') then
    raise exception 'before must be a whole UTC hour, got %', before using errcode = '22023';
  end if;
  if before > v_state.settled_through then
    raise exception 'rollups are settled only up to %; refresh them before freezing up to %', v_state.settled_through, before
      using errcode = '55000';
  end if;
  if exists (select 1 from app_public.attribution_rollup_dirty_hours d
              where d.recount and d.hour < before and d.hour >= v_state.frozen_before)
     or exists (select 1 from app_public.chat_completion_requests c
                 where c.id > v_state.settled_id and c.created_at < before and c.created_at >= v_state.frozen_before)
     or exists (select 1 from app_public.attribution_rollup_changes d
                 where d.created_at < before and d.created_at >= v_state.frozen_before) then
    raise exception 'hours before % have rows or changes not in the rollups yet; refresh the rollups first', before using errcode = '55000';
  end if;
  update app_public.attribution_rollup_state s set frozen_before = greatest(s.frozen_before, before)
    returning * into v_state;
  return v_state;
end;
$$;
comment on function app_private.freeze_attribution_rollups(timestamptz) is
  'Call before dropping raw partitions (retention): hours before `before` keep their rollups forever and are never recounted from raw rows that may be gone. Refuses while those hours have rows or changes the rollups do not hold yet, or are marked for a recount.';

--------------------------------------------------------------------------------
-- Reading: rollups, changes not applied yet, rows not settled yet, one snapshot.
--------------------------------------------------------------------------------

create or replace function app_public.ledger_last_id() returns bigint
  language sql stable security definer
  set search_path = pg_catalog, public, pg_temp
  as $$
  select pg_catalog.pg_sequence_last_value(pg_catalog.pg_get_serial_sequence('app_public.chat_completion_requests', 'id')::regclass)
$$;
comment on function app_public.ledger_last_id() is
  E'@behavior -queryField\nThe last id drawn for chat_completion_requests (NULL before the first), whatever the caller may read: when it equals attribution_rollup_state.settled_id, no row is unsettled and attribution_counts_by_hour() skips its raw scan by id.';
revoke all on function app_public.ledger_last_id() from public;
grant execute on function app_public.ledger_last_id() to keytrack_admin, keytrack_analyst, keytrack_user;

create or replace function app_public.attribution_counts_by_hour(since timestamptz, until timestamptz default 'infinity')
  returns table (
    hour timestamptz,
    attribution_status text,
    is_anonymous boolean,
    has_user boolean,
    initial_attribution text,
    requests bigint
  )
  language plpgsql stable
  -- The raw parts' row estimates (ranges bound by variables) are far too high:
  -- at 10M rows they made the planner JIT-compile (340 ms) and start parallel
  -- workers (25 ms) for a few thousand rows. A generic plan would not know
  -- that `id > settled_id` is the last minute's rows: plan each call.
  set jit = off
  set max_parallel_workers_per_gather = 0
  set plan_cache_mode = force_custom_plan
  as $$
declare
  v_settled timestamptz;
  v_id bigint;
  v_frozen timestamptz;
  v_a timestamptz;
  v_b timestamptz;
  v_ha timestamptz;
  v_hb timestamptz;
  v_raw_hours timestamptz[];
  v_minute_hours timestamptz[];
  v_parts text[];
begin
  if since >= until then
    return;
  end if;
  -- Invisible (not an admin or analyst), or nothing settled yet: every row is
  -- read raw, through the caller's row-level security.
  select s.settled_through, s.settled_id, s.frozen_before into v_settled, v_id, v_frozen from app_public.attribution_rollup_state s;
  if v_settled is null or v_settled = '-infinity' then
    return query
      select date_trunc('hour', c.created_at), c.attribution_status, c.is_anonymous, c.user_id is not null,
             coalesce(c.initial_attribution, 'unknown'), count(*)
        from app_public.chat_completion_requests c
       where c.created_at >= since and c.created_at < until
       group by 1, 2, 3, 4, 5;
    return;
  end if;

  -- Rollups cover whole minutes [v_a, v_b), from the minute boundary nearest
  -- to since to the one nearest to until: the settled rows between since and
  -- v_a (and between until and v_b) are read raw and added or taken back, at
  -- most 30 seconds of rows at each edge. A window shorter than two minutes
  -- reads its settled rows raw. An until close to now() rounds up: rows
  -- created after now() are rare. Whole UTC hours [v_ha, v_hb) come from the
  -- hourly rollups, the other minutes from the minute rollups.
  if since > '-infinity' and until < 'infinity' and until - since < interval '2 minutes' then
    v_a := since;
    v_b := since;
  else
    v_a := since;
    if since > '-infinity' then
      v_a := date_trunc('minute', since, 'UTC');
      if since - v_a > interval '30 seconds' then
        v_a := v_a + interval '1 minute';
      end if;
    end if;
    v_b := until;
    if until < 'infinity' then
      v_b := date_trunc('minute', until, 'UTC');
      if until > v_b and (until - v_b >= interval '30 seconds' or v_b + interval '1 minute' > now()) then
        v_b := v_b + interval '1 minute';
      end if;
    end if;
  end if;
  v_ha := date_trunc('hour', v_a, 'UTC');
  if v_ha < v_a then
    v_ha := v_ha + interval '1 hour';
  end if;
  v_hb := greatest(date_trunc('hour', v_b, 'UTC'), v_ha);

  -- Read raw: hours marked for a recount (unless frozen), and hours whose
  -- minutes are not minutes of the session's time zone (offsets in seconds).
  select array_agg(distinct d.hour) into v_raw_hours
    from app_public.attribution_rollup_dirty_hours d
   where d.recount and d.hour >= date_trunc('hour', least(v_a, since), 'UTC') and d.hour < greatest(v_b, until) and d.hour >= v_frozen;
  v_raw_hours := coalesce(v_raw_hours, '{}');
  -- Whole hours that are not one hour of the session's time zone (offsets
  -- that are not whole hours) are read from their minutes.
  if pg_catalog.current_setting('TimeZone') not in ('UTC', 'Etc/UTC', 'GMT', 'Etc/GMT', 'UCT', 'Zulu') then
    select array_agg(x.h) filter (where date_trunc('minute', x.h) = x.h),
           v_raw_hours || coalesce(array_agg(x.h) filter (where date_trunc('minute', x.h) <> x.h), '{}')
      into v_minute_hours, v_raw_hours
      from (select distinct r.hour as h from app_public.attribution_rollups_hourly r
             where r.hour >= v_ha and r.hour < v_hb
               and date_trunc('hour', r.hour) <> date_trunc('hour', r.hour + interval '59 minutes 59.999999 seconds')) x;
    -- The edge hours' minutes too.
    select v_raw_hours || coalesce(array_agg(e.h), '{}') into v_raw_hours
      from (values (date_trunc('hour', least(v_a, since), 'UTC')), (date_trunc('hour', greatest(v_b, until), 'UTC'))) e(h)
     where e.h > '-infinity' and e.h < 'infinity' and date_trunc('minute', e.h) <> e.h;
  end if;
  v_minute_hours := coalesce(v_minute_hours, '{}');

  -- Only the parts this window needs, planned for its values ($1..$9 below):
  -- planning every part against every partition cost more than running them.
  v_parts := array[
    -- Settled rows, whole hours.
    $q$select date_trunc('hour', r.hour) as hour, r.attribution_status, r.is_anonymous, r.has_user, r.initial_attribution,
              r.requests as n
         from app_public.attribution_rollups_hourly r
        where r.hour >= $1 and r.hour < $2 and r.hour <> all($3) and r.hour <> all($4)$q$,
    -- Changes to settled rows that the rollups do not hold yet.
    $q$select date_trunc('hour', d.created_at), d.attribution_status, d.is_anonymous, d.has_user, d.initial_attribution,
              d.requests::bigint
         from app_public.attribution_rollup_changes d
        where d.row_id <= $7 and d.created_at >= $5 and d.created_at < $6
          and date_trunc('hour', d.created_at, 'UTC') <> all($3)$q$];
  if v_a < v_ha or v_hb < v_b then
    -- Settled rows, the edge minutes.
    v_parts := v_parts || $q$select date_trunc('hour', m.minute), m.attribution_status, m.is_anonymous, m.has_user, m.initial_attribution, m.requests
         from app_public.attribution_rollups_minutely m
        where ((m.minute >= $5 and m.minute < least($1, $6)) or (m.minute >= greatest($2, $5) and m.minute < $6))
          and date_trunc('hour', m.minute, 'UTC') <> all($3)$q$::text;
  end if;
  if cardinality(v_minute_hours) > 0 then
    -- Settled rows, hours that are not hours here.
    v_parts := v_parts || $q$select date_trunc('hour', m.minute), m.attribution_status, m.is_anonymous, m.has_user, m.initial_attribution, m.requests
         from unnest($4) h(hour)
         join app_public.attribution_rollups_minutely m on m.minute >= h.hour and m.minute < h.hour + interval '1 hour'
        where h.hour <> all($3)$q$::text;
  end if;
  -- Settled rows between since and v_a, and between until and v_b: added
  -- when inside [since, until), taken back when outside.
  if v_a <> since then
    v_parts := v_parts || format($q$select date_trunc('hour', c.created_at), c.attribution_status, c.is_anonymous, c.user_id is not null,
              coalesce(c.initial_attribution, 'unknown'), %s * count(*)
         from app_public.chat_completion_requests c
        where c.created_at >= least($5, $8) and c.created_at < greatest($5, $8) and c.id <= $7
          and date_trunc('hour', c.created_at, 'UTC') <> all($3)
        group by 1, 2, 3, 4, 5$q$, case when v_a < since then -1 else 1 end);
  end if;
  if v_b <> until then
    v_parts := v_parts || format($q$select date_trunc('hour', c.created_at), c.attribution_status, c.is_anonymous, c.user_id is not null,
              coalesce(c.initial_attribution, 'unknown'), %s * count(*)
         from app_public.chat_completion_requests c
        where c.created_at >= least($6, $9) and c.created_at < greatest($6, $9) and c.id <= $7
          and date_trunc('hour', c.created_at, 'UTC') <> all($3)
        group by 1, 2, 3, 4, 5$q$, case when until < v_b then -1 else 1 end);
  end if;
  -- Rows not settled yet (inserted since the last refresh, whatever their
  -- created_at); none when no id was drawn since.
  if coalesce(app_public.ledger_last_id(), 0) > v_id then
    v_parts := v_parts || $q$select date_trunc('hour', c.created_at), c.attribution_status, c.is_anonymous, c.user_id is not null,
              coalesce(c.initial_attribution, 'unknown'), count(*)
         from app_public.chat_completion_requests c
        where c.id > $7 and c.created_at >= $8 and c.created_at < $9
          and date_trunc('hour', c.created_at, 'UTC') <> all($3)
        group by 1, 2, 3, 4, 5$q$::text;
  end if;
  if cardinality(v_raw_hours) > 0 then
    -- Hours read raw: every row.
    v_parts := v_parts || $q$select date_trunc('hour', c.created_at), c.attribution_status, c.is_anonymous, c.user_id is not null,
              coalesce(c.initial_attribution, 'unknown'), count(*)
         from unnest($3) h(hour)
         join app_public.chat_completion_requests c
           on c.created_at >= greatest(h.hour, $8) and c.created_at < least(h.hour + interval '1 hour', $9)
        group by 1, 2, 3, 4, 5$q$::text;
  end if;

  return query execute
    'select x.hour, x.attribution_status, x.is_anonymous, x.has_user, x.initial_attribution, sum(x.n)::bigint from ('
    || array_to_string(v_parts, ' union all ')
    || ') x (hour, attribution_status, is_anonymous, has_user, initial_attribution, n) group by 1, 2, 3, 4, 5 having sum(x.n) > 0'
    using v_ha, v_hb, v_raw_hours, v_minute_hours, v_a, v_b, v_id, since, until;
end;
$$;
comment on function app_public.attribution_counts_by_hour(timestamptz, timestamptz) is
  E'@behavior -queryField\nRequests created in [since, until) counted per hour (date_trunc(''hour'', created_at) in the session''s time zone) and attribution outcome, one row per key: hourly and minute rollups of the settled rows, plus their changes not applied yet, minus the settled rows of the edge minutes outside the window, plus the rows not settled yet (by id), all in one snapshot, so the result always equals a scan of the raw rows. Admins and analysts get rollups; other callers scan raw rows through their row-level security.';

--------------------------------------------------------------------------------
-- /metrics: the tracking-rate gauge (the last 60 minutes) from the rollups too.
--------------------------------------------------------------------------------

create or replace function app_private.attribution_metrics() returns app_private.attribution_metrics
  language plpgsql stable security definer
  set search_path = pg_catalog, public, pg_temp
  set timezone = 'UTC'
  as $$
declare
  m app_private.attribution_metrics;
  e jsonb;
  v_authenticated bigint;
  v_with_key bigint;
begin
  select coalesce(sum(q.requests) filter (where q.initial_attribution in ('resolved_lookup', 'resolved_dev')), 0),
         coalesce(sum(q.requests) filter (where q.initial_attribution in ('pending_not_found', 'pending_lookup_failed')), 0),
         coalesce(sum(q.requests) filter (where q.initial_attribution = 'resolved_lookup'), 0),
         coalesce(sum(q.requests) filter (where q.initial_attribution = 'resolved_dev'), 0),
         coalesce(sum(q.requests) filter (where q.initial_attribution = 'anonymous'), 0),
         coalesce(sum(q.requests) filter (where q.initial_attribution = 'pending_lookup_failed'), 0),
         coalesce(sum(q.requests) filter (where q.initial_attribution = 'failed_dev_bypass'), 0),
         coalesce(sum(q.requests) filter (where q.initial_attribution = 'failed_no_key'), 0),
         coalesce(sum(q.requests) filter (where q.attribution_status = 'pending'), 0),
         coalesce(sum(q.requests) filter (where q.attribution_status = 'failed'), 0)
    into m.lookup_attempts_success, m.lookup_attempts_retry,
         m.tracking_success_authenticated, m.tracking_success_dev,
         m.tracking_failures_anonymous, m.tracking_failures_lookup_failed, m.tracking_failures_dev_bypass,
         m.tracking_failures_no_key, m.pending_attributions, m.failed_attributions
    from app_public.attribution_counts_by_hour('-infinity') q;

  select coalesce(jsonb_object_agg(a.event, a.occurrences), '{}') into e from app_private.attribution_events a;
  m.lookup_attempts_success := m.lookup_attempts_success + coalesce((e ->> 'retry_resolved')::bigint, 0)
                               + coalesce((e ->> 'backfill_resolved_by_hash')::bigint, 0);
  m.lookup_attempts_retry := m.lookup_attempts_retry + coalesce((e ->> 'retry_still_pending')::bigint, 0);
  m.lookup_attempts_failed := coalesce((e ->> 'retry_failed')::bigint, 0) + coalesce((e ->> 'backfill_unknown_hash')::bigint, 0);
  m.tracking_success_retry := coalesce((e ->> 'retry_resolved')::bigint, 0);
  m.tracking_success_backfill := coalesce((e ->> 'backfill_resolved_by_hash')::bigint, 0)
                                 + coalesce((e ->> 'backfill_resolved_by_only_key')::bigint, 0);
  m.tracking_failures_anonymous := m.tracking_failures_anonymous + coalesce((e ->> 'backfill_anonymized')::bigint, 0);
  m.tracking_failures_not_found := coalesce((e ->> 'retry_failed')::bigint, 0);
  m.tracking_failures_no_key := m.tracking_failures_no_key + coalesce((e ->> 'backfill_no_key')::bigint, 0);
  m.tracking_failures_ambiguous := coalesce((e ->> 'backfill_ambiguous')::bigint, 0);

  -- api_key_id is set exactly when attribution_status is resolved (a CHECK).
  select coalesce(sum(q.requests) filter (where not q.is_anonymous), 0),
         coalesce(sum(q.requests) filter (where not q.is_anonymous and q.attribution_status = 'resolved'), 0)
    into v_authenticated, v_with_key
    from app_public.attribution_counts_by_hour(now() - interval '1 hour') q;
  m.authenticated_tracking_rate := v_with_key::double precision / nullif(v_authenticated, 0);
  return m;
end;
$$;
comment on function app_private.attribution_metrics() is
  'The numbers behind the spec''s Prometheus metrics, one row: cumulative counters that never decrease (insert-time outcomes counted from initial_attribution, so a row resolved or failed later does not lower them; retry and backfill events from app_private.attribution_events) and gauges (pending and failed rows now, the authenticated tracking rate of the last 60 minutes), all from the rollups (app_public.attribution_counts_by_hour()). Rows recorded before initial_attribution existed are not counted. For the service (the owner).';

--------------------------------------------------------------------------------
-- The attribution latency part of the quality endpoint, from the retry
-- latencies and the rollups instead of every row of the window.
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
begin
  if hours is null or hours < 1 or hours > 168 then
    raise exception 'hours must be between 1 and 168, got %', hours using errcode = '22023';
  end if;
  v_since := now() - make_interval(hours => hours);
  select coalesce(sum(q.requests) filter (where q.attribution_status = 'pending'), 0) into v_pending
    from app_public.attribution_counts_by_hour('-infinity') q;
  return query
  select count(*),
         percentile_cont(0.5) within group (order by extract(epoch from l.attributed_at - l.created_at))::double precision,
         percentile_cont(0.99) within group (order by extract(epoch from l.attributed_at - l.created_at))::double precision,
         max(extract(epoch from l.attributed_at - l.created_at))::double precision,
         v_pending,
         (select extract(epoch from now() - min(p.created_at))::double precision
            from app_public.chat_completion_requests p where p.attribution_status = 'pending')
    from app_public.attribution_retry_latencies l
   where l.created_at >= v_since;
end;
$$;
comment on function app_public.attribution_latency_report(integer) is
  'How long attribution took for the rows that arrived in the last `hours` hours (1..168) and were resolved by the retry worker: how many, p50, p99 and max seconds from arrival to attribution (from attribution_retry_latencies); and the rows still pending (from the rollups), with how long the oldest has waited.';
