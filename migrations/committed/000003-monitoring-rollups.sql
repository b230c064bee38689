--! Previous: sha1:c0276674d4ff5598c22bab21a47693f5ae93cda2
--! Hash: sha1:219ed516d3a3f7accc3fe3f04e44ee33cda5202b
--! Message: monitoring rollups

--------------------------------------------------------------------------------
-- keytrack 000003: monitoring of attribution quality, exact at every moment and
-- cheap at any size.
--
-- Hourly rollups of chat_completion_requests serve every read that spans more
-- than the current hour: the spec's view api_key_tracking_quality, the quality
-- report, the daily trend and the Prometheus counters. A worker job settles
-- hours once they have ended; anything a rollup does not cover exactly (the
-- current hour, an hour whose rows changed or arrived late since it was rolled
-- up) is read from the raw rows in the same snapshot, so every read equals a
-- scan of the raw rows. The insert path pays one clock comparison in the
-- existing insert trigger, and writes a mark only for a row of an hour that
-- has already ended.
--------------------------------------------------------------------------------

-- Idempotent: drop what this migration creates, newest first.
drop view if exists app_public.api_key_tracking_quality;
drop function if exists app_private.attribution_metrics();
drop function if exists app_public.attribution_offenders(integer, integer);
drop function if exists app_public.api_key_tracking_trend(integer);
drop function if exists app_public.api_key_tracking_quality_report(integer);
drop function if exists app_public.attribution_counts_by_hour(timestamptz, timestamptz);
drop function if exists app_private.refresh_attribution_rollups();
drop function if exists app_private.invalidate_attribution_rollups(timestamptz, timestamptz);
drop function if exists app_private.freeze_attribution_rollups(timestamptz);
drop function if exists app_private.count_attribution_events(text[], bigint[]);
drop trigger if exists _900_mark_rollup_hours_update on app_public.chat_completion_requests;
drop trigger if exists _900_mark_rollup_hours_delete on app_public.chat_completion_requests;
drop trigger if exists _200_keep_initial_attribution on app_public.chat_completion_requests;
drop function if exists app_private.tg_chat_completion_requests__mark_rollup_hours();
drop function if exists app_private.tg_chat_completion_requests__keep_initial_attribution();
drop type if exists app_public.attribution_offender;
drop type if exists app_public.api_key_tracking_trend;
drop type if exists app_public.api_key_tracking_trend_day;
drop type if exists app_public.api_key_tracking_quality_report;
drop type if exists app_private.attribution_rollup_refresh_result;
drop type if exists app_private.attribution_metrics;
drop table if exists app_private.attribution_events;
drop table if exists app_public.attribution_rollup_dirty_hours;
drop table if exists app_public.attribution_rollups_hourly;
drop table if exists app_public.attribution_rollup_state;
drop index if exists app_public.chat_completion_requests_unattributed_idx;
alter table app_public.chat_completion_requests drop column if exists initial_attribution;

--------------------------------------------------------------------------------
-- The insert-time outcome of every row, kept forever. attribution_status
-- changes (retry, backfill); Prometheus counters must not go down when it does,
-- so they count this column, which the insert trigger sets and nothing changes.
--------------------------------------------------------------------------------

-- No CHECK constraint: the insert trigger always sets it from its fixed set
-- of values and nothing may change it afterwards, and a CHECK evaluated on
-- every insert cost a measured 4 us per row (8% of a single-row insert).
alter table app_public.chat_completion_requests add column initial_attribution text;
comment on column app_public.chat_completion_requests.initial_attribution is 'The attribution outcome at insert, set by the insert trigger and never changed: `resolved_lookup`, `resolved_dev` (the development key), `pending_not_found` (the key hash matched no key yet), `pending_lookup_failed` (the writer declared its own key lookup failed), `failed_dev_bypass`, `failed_no_key` or `anonymous`. NULL for rows recorded before keytrack kept it. The monotonic Prometheus counters count it.';
-- Existing partitions do not get the parent's column comments by themselves.
do $$
declare
  v_part regclass;
begin
  for v_part in select inhrelid::regclass from pg_inherits where inhparent = 'app_public.chat_completion_requests'::regclass loop
    execute format('comment on column %s.initial_attribution is %L', v_part,
      col_description('app_public.chat_completion_requests'::regclass,
        (select attnum from pg_attribute where attrelid = 'app_public.chat_completion_requests'::regclass and attname = 'initial_attribution')));
  end loop;
end
$$;

create function app_private.tg_chat_completion_requests__keep_initial_attribution() returns trigger
  language plpgsql
  set search_path = pg_catalog, public, pg_temp
  as $$
begin
  raise exception 'initial_attribution is the insert-time outcome of request % and never changes', old.request_id
    using errcode = '55000';
end;
$$;
comment on function app_private.tg_chat_completion_requests__keep_initial_attribution() is
  'Trigger function (BEFORE UPDATE on chat_completion_requests, only when initial_attribution would change): refuses the change, so counters derived from it never go down.';
revoke all on function app_private.tg_chat_completion_requests__keep_initial_attribution() from public;

create trigger _200_keep_initial_attribution before update on app_public.chat_completion_requests
  for each row when (old.initial_attribution is distinct from new.initial_attribution)
  execute function app_private.tg_chat_completion_requests__keep_initial_attribution();
comment on trigger _200_keep_initial_attribution on app_public.chat_completion_requests is 'Keeps initial_attribution immutable (see app_private.tg_chat_completion_requests__keep_initial_attribution).';

--------------------------------------------------------------------------------
-- The insert trigger, now also:
--   - records initial_attribution;
--   - honours a writer-declared `lookup_failed` (the writer's own key lookup
--     failed, e.g. its database call errored) when the key is not found here
--     either: the row stays pending, so the worker retries it, with that
--     reason, so the failure is counted;
--   - marks the row's hour dirty for the rollups when that hour has already
--     ended (a late row: spool replay, a backdated import). Here rather than in
--     a statement-level trigger: an AFTER INSERT statement trigger with a
--     transition table cost 12 us per single-row INSERT (-18% CPU-bound),
--     this check costs nothing measurable. At most one mark per hour per
--     transaction (remembered in a transaction-local setting, which a rolled
--     back savepoint also rolls back).
--------------------------------------------------------------------------------

create or replace function app_private.tg_chat_completion_requests__attribute() returns trigger
  language plpgsql
  set search_path = pg_catalog, public, pg_temp
  as $$
declare
  v_key_id uuid;
  v_user_id uuid;
  v_env text;
  v_declared_reason text := new.attribution_reason;
  v_hour timestamptz;
begin
  insert into app_private.request_ids (request_id, created_at)
    values (new.request_id, new.created_at)
    on conflict do nothing;
  if not found then
    return null;  -- already recorded: re-delivery changes nothing
  end if;

  -- After the insert above, which gave this transaction its id: a row whose
  -- hour is still open here is covered by the rollup refresh's fence.
  if new.created_at < date_trunc('hour', clock_timestamp(), 'UTC') then
    v_hour := date_trunc('hour', new.created_at, 'UTC');
    if current_setting('keytrack.rollup_marked_hour', true) is distinct from v_hour::text then
      insert into app_public.attribution_rollup_dirty_hours (hour) values (v_hour);
      perform set_config('keytrack.rollup_marked_hour', v_hour::text, true);
    end if;
  end if;

  new.attribution_method := null;
  new.attribution_reason := null;
  new.attributed_at := null;
  new.attribution_next_attempt_at := null;

  if new.api_key_hash is not null then
    select k.id, k.user_id, k.environment into v_key_id, v_user_id, v_env
      from app_private.api_key_secrets s
      join app_public.api_keys k on k.id = s.api_key_id
      where s.key_hash = new.api_key_hash;
    new.attribution_attempts := 1;
    new.is_anonymous := false;
    if found then
      new.api_key_id := v_key_id;
      new.user_id := v_user_id;
      new.attribution_status := 'resolved';
      new.attribution_method := case when v_env = 'development' then 'dev' else 'lookup' end;
      new.attributed_at := now();
      new.initial_attribution := case when v_env = 'development' then 'resolved_dev' else 'resolved_lookup' end;
    elsif v_declared_reason = 'dev_bypass' then
      new.api_key_id := null;
      new.attribution_status := 'failed';
      new.attribution_reason := 'dev_bypass';
      new.initial_attribution := 'failed_dev_bypass';
    else
      new.api_key_id := null;
      new.attribution_status := 'pending';
      if v_declared_reason = 'lookup_failed' then
        new.attribution_reason := 'lookup_failed';
        new.attribution_error := coalesce(new.attribution_error, 'the writer''s own key lookup failed');
        new.initial_attribution := 'pending_lookup_failed';
      else
        new.attribution_reason := 'not_found';
        new.initial_attribution := 'pending_not_found';
      end if;
      new.attribution_next_attempt_at := now();
      perform app_private.schedule_attribution_retry(now());
    end if;
  elsif new.api_key_id is not null then
    select k.user_id, k.environment into v_user_id, v_env
      from app_public.api_keys k where k.id = new.api_key_id;
    if found then
      new.user_id := v_user_id;
    end if;  -- otherwise the foreign key rejects the row
    new.is_anonymous := false;
    new.attribution_status := 'resolved';
    new.attribution_method := case when v_env = 'development' then 'dev' else 'lookup' end;
    new.attributed_at := now();
    new.initial_attribution := case when v_env = 'development' then 'resolved_dev' else 'resolved_lookup' end;
  elsif new.user_id is not null then
    new.is_anonymous := false;
    new.attribution_status := 'failed';
    new.attribution_reason := 'no_key';
    new.initial_attribution := 'failed_no_key';
  else
    new.is_anonymous := true;
    new.attribution_status := 'anonymous';
    new.initial_attribution := 'anonymous';
  end if;
  return new;
end;
$$;
comment on function app_private.tg_chat_completion_requests__attribute() is
  'Trigger function (BEFORE INSERT on chat_completion_requests): makes request_id idempotent and attributes the row from api_key_hash (resolved; pending, which wakes the retry worker, with reason not_found or, when the writer declared it, lookup_failed; failed with dev_bypass when the writer declared the development bypass), api_key_id, user_id (failed: no_key) or nothing (anonymous). Records the outcome in initial_attribution, and marks the row''s hour dirty for the rollups when that hour has already ended.';

-- Offenders and the pending/failed counts read only unattributed rows; a
-- partial index keeps that cheap (resolved and anonymous rows are not in it).
create index chat_completion_requests_unattributed_idx on app_public.chat_completion_requests (created_at)
  where attribution_status in ('pending', 'failed');

--------------------------------------------------------------------------------
-- Rollups. Keyed by UTC hour and the few columns the reads need. An hour is
-- "settled" when it is before attribution_rollup_state.settled_through and has
-- no mark in attribution_rollup_dirty_hours: only then do reads use its rollup
-- rows; every other hour is read raw. In app_public (not app_private) because
-- the spec's view is security_invoker: its readers need SELECT; row-level
-- security shows rollups to admins and analysts only, so a user reading the
-- view gets raw rows filtered by their own policy instead.
--------------------------------------------------------------------------------

create table app_public.attribution_rollup_state (
  id boolean primary key default true check (id),
  settled_through timestamptz not null default '-infinity',
  frozen_before timestamptz not null default '-infinity',
  fence_transactions text[],
  fence_until timestamptz,
  fence_set_at timestamptz,
  refreshed_at timestamptz,
  check (settled_through = '-infinity' or settled_through = date_trunc('hour', settled_through, 'UTC')),
  check ((fence_transactions is null) = (fence_until is null))
);
alter table app_public.attribution_rollup_state enable row level security;
comment on table app_public.attribution_rollup_state is E'@behavior -*\nHow far the hourly rollups are settled (one row). Written only by app_private.refresh_attribution_rollups().';
comment on column app_public.attribution_rollup_state.id is 'Always true: the table has one row.';
comment on column app_public.attribution_rollup_state.settled_through is 'Every UTC hour before this instant has been rolled up; reads use those rollups unless the hour is marked dirty.';
comment on column app_public.attribution_rollup_state.frozen_before is 'Hours before this instant are never recomputed, because their raw rows may be gone (partitions dropped by retention): reads use their rollups even when marked dirty. Set with app_private.freeze_attribution_rollups().';
comment on column app_public.attribution_rollup_state.fence_transactions is 'The transactions (virtual transaction ids, pg_locks.virtualtransaction) that held a write lock on chat_completion_requests or a partition when the pending settlement was decided: the hours before fence_until settle once all of them have ended (a writer that put a row into an hour before the hour ended did not mark it dirty, and held that lock until it ended). Transactions of other tables and databases never hold settlement back.';
comment on column app_public.attribution_rollup_state.fence_until is 'The end of the hours that settle once every fence transaction has ended.';
comment on column app_public.attribution_rollup_state.fence_set_at is 'When the fence was taken; an old fence means a long-running transaction writing the ledger holds settlement back (reads stay exact, but scan more raw rows).';
comment on column app_public.attribution_rollup_state.refreshed_at is 'When app_private.refresh_attribution_rollups() last ran.';
insert into app_public.attribution_rollup_state default values;

create table app_public.attribution_rollups_hourly (
  hour timestamptz not null check (hour = date_trunc('hour', hour, 'UTC')),
  attribution_status text not null,
  is_anonymous boolean not null,
  has_user boolean not null,
  initial_attribution text not null,
  requests bigint not null check (requests > 0),
  primary key (hour, attribution_status, is_anonymous, has_user, initial_attribution)
);
alter table app_public.attribution_rollups_hourly enable row level security;
comment on table app_public.attribution_rollups_hourly is E'@behavior -*\nRequest counts per UTC hour and attribution outcome, recomputed from the raw rows by app_private.refresh_attribution_rollups(). Read through app_public.attribution_counts_by_hour(), which adds the hours not settled yet from the raw rows.';
comment on column app_public.attribution_rollups_hourly.hour is 'The UTC hour (date_trunc(''hour'', created_at, ''UTC'')).';
comment on column app_public.attribution_rollups_hourly.attribution_status is 'The rows'' attribution_status (api_key_id is set exactly when it is `resolved`).';
comment on column app_public.attribution_rollups_hourly.is_anonymous is 'The rows'' is_anonymous.';
comment on column app_public.attribution_rollups_hourly.has_user is 'Whether the rows'' user_id is set.';
comment on column app_public.attribution_rollups_hourly.initial_attribution is 'The rows'' initial_attribution, `unknown` for rows recorded before it was kept.';
comment on column app_public.attribution_rollups_hourly.requests is 'How many rows.';

-- Append-only marks: a writer never waits on another writer's mark, and a
-- mark committed after the refresh read the marks survives it (consuming a
-- shared per-hour row could drop a mark whose rows are not visible yet).
create table app_public.attribution_rollup_dirty_hours (
  id bigint generated always as identity primary key,
  hour timestamptz not null,
  marked_at timestamptz not null default now()
);
create index attribution_rollup_dirty_hours_hour_idx on app_public.attribution_rollup_dirty_hours (hour);
alter table app_public.attribution_rollup_dirty_hours enable row level security;
comment on table app_public.attribution_rollup_dirty_hours is E'@behavior -*\nUTC hours whose rows changed or arrived after the hour ended (late rows, retry, backfill, deletes): reads scan them raw until the next refresh recomputes their rollups and removes the marks. Written by triggers on chat_completion_requests.';
comment on column app_public.attribution_rollup_dirty_hours.id is 'Primary key (several marks for one hour are normal).';
comment on column app_public.attribution_rollup_dirty_hours.hour is 'The UTC hour whose rollup is stale.';
comment on column app_public.attribution_rollup_dirty_hours.marked_at is 'When the change was made (its transaction''s start).';

create policy select_admin on app_public.attribution_rollup_state for select to keytrack_admin, keytrack_analyst using (true);
create policy select_admin on app_public.attribution_rollups_hourly for select to keytrack_admin, keytrack_analyst using (true);
create policy select_admin on app_public.attribution_rollup_dirty_hours for select to keytrack_admin, keytrack_analyst using (true);
comment on policy select_admin on app_public.attribution_rollup_state is 'Admins and analysts read the rollup state; for anyone else reads fall back to raw rows.';
comment on policy select_admin on app_public.attribution_rollups_hourly is 'Admins and analysts read the rollups (they see every request anyway); users read raw rows through their own policy.';
comment on policy select_admin on app_public.attribution_rollup_dirty_hours is 'Admins and analysts read the dirty marks.';
-- keytrack_user too: the spec's view (security_invoker) reads these; it sees no row of them.
grant select on app_public.attribution_rollup_state, app_public.attribution_rollups_hourly, app_public.attribution_rollup_dirty_hours
  to keytrack_admin, keytrack_analyst, keytrack_user;

--------------------------------------------------------------------------------
-- Marking dirty hours on UPDATE and DELETE (inserts are marked by the insert
-- trigger above): statement-level AFTER triggers with transition tables, one
-- INSERT of the distinct affected hours per statement, and only for hours that
-- have already ended (by the clock, at the end of the statement). Rows of the
-- current hour are never marked: that hour is not settled until every
-- transaction that could have written it unmarked has ended (the fence).
--------------------------------------------------------------------------------

create function app_private.tg_chat_completion_requests__mark_rollup_hours() returns trigger
  language plpgsql security definer
  set search_path = pg_catalog, public, pg_temp
  as $$
declare
  v_open_hour timestamptz := date_trunc('hour', clock_timestamp(), 'UTC');
begin
  if tg_op = 'DELETE' then
    insert into app_public.attribution_rollup_dirty_hours (hour)
      select distinct date_trunc('hour', o.created_at, 'UTC') from old_rows o where o.created_at < v_open_hour;
  else
    -- Only rows whose rolled-up columns changed (a retry that leaves a row
    -- pending changes nothing a rollup counts).
    insert into app_public.attribution_rollup_dirty_hours (hour)
      select distinct date_trunc('hour', x.created_at, 'UTC') from (
        (select o.created_at, o.attribution_status, o.is_anonymous, o.user_id is null as no_user from old_rows o
         except all
         select n.created_at, n.attribution_status, n.is_anonymous, n.user_id is null from new_rows n)
        union all
        (select n.created_at, n.attribution_status, n.is_anonymous, n.user_id is null as no_user from new_rows n
         except all
         select o.created_at, o.attribution_status, o.is_anonymous, o.user_id is null from old_rows o)
      ) x
      where x.created_at < v_open_hour;
  end if;
  return null;
end;
$$;
comment on function app_private.tg_chat_completion_requests__mark_rollup_hours() is
  'Trigger function (AFTER UPDATE/DELETE FOR EACH STATEMENT on chat_completion_requests, with transition tables): marks the UTC hours that already ended and whose rolled-up counts the statement changed in attribution_rollup_dirty_hours, one row per hour per statement. Writes nothing for rows of the current hour.';
revoke all on function app_private.tg_chat_completion_requests__mark_rollup_hours() from public;

create trigger _900_mark_rollup_hours_update after update on app_public.chat_completion_requests
  referencing old table as old_rows new table as new_rows
  for each statement execute function app_private.tg_chat_completion_requests__mark_rollup_hours();
create trigger _900_mark_rollup_hours_delete after delete on app_public.chat_completion_requests
  referencing old table as old_rows
  for each statement execute function app_private.tg_chat_completion_requests__mark_rollup_hours();
comment on trigger _900_mark_rollup_hours_update on app_public.chat_completion_requests is 'Marks ended hours whose rows changed attribution (retry, backfill) dirty for the rollups.';
comment on trigger _900_mark_rollup_hours_delete on app_public.chat_completion_requests is 'Marks ended hours that lost rows dirty for the rollups.';

create function app_private.invalidate_attribution_rollups(since timestamptz, until timestamptz) returns integer
  language plpgsql volatile
  set search_path = pg_catalog, public, pg_temp
  as $$
declare
  v_count integer;
begin
  if since is null or until is null or since >= until or since = '-infinity' or until = 'infinity' then
    raise exception 'since and until must be finite with since < until' using errcode = '22023';
  end if;
  insert into app_public.attribution_rollup_dirty_hours (hour)
    select h from generate_series(date_trunc('hour', since, 'UTC'), until - interval '1 microsecond', interval '1 hour') h;
  get diagnostics v_count = row_count;
  return v_count;
end;
$$;
comment on function app_private.invalidate_attribution_rollups(timestamptz, timestamptz) is
  'Marks every UTC hour that overlaps [since, until) dirty, so reads scan it raw and the next refresh recomputes it. For loads that bypass triggers (session_replication_role = replica, COPY into a partition). Returns how many hours it marked.';
revoke all on function app_private.invalidate_attribution_rollups(timestamptz, timestamptz) from public;

--------------------------------------------------------------------------------
-- Settling. Run every minute by the worker (task
-- chat_completion_requests__refresh_rollups). An ended hour settles once every
-- transaction that was writing the ledger when it ended has finished (the
-- fence: those are the only writers that could have put rows in it without
-- marking it; any later write into it is marked). Marked hours are recomputed
-- after their marks are consumed, in a later statement, so the recount sees
-- every row whose mark it consumed.
--------------------------------------------------------------------------------

create type app_private.attribution_rollup_refresh_result as (
  settled_through timestamptz,
  settled_hours integer,
  recomputed_hours integer,
  waiting_since timestamptz
);
comment on type app_private.attribution_rollup_refresh_result is 'What one run of refresh_attribution_rollups() did.';
comment on column app_private.attribution_rollup_refresh_result.settled_through is 'Rollups are settled for every hour before this (NULL: another refresh was running, nothing done).';
comment on column app_private.attribution_rollup_refresh_result.settled_hours is 'Hours newly settled by this run (0 when it settled from the beginning of time: see recomputed_hours).';
comment on column app_private.attribution_rollup_refresh_result.recomputed_hours is 'Dirty hours recomputed by this run.';
comment on column app_private.attribution_rollup_refresh_result.waiting_since is 'When the fence still waited for was taken (NULL: none); old means a long-running transaction holds settlement back.';

create function app_private.refresh_attribution_rollups() returns app_private.attribution_rollup_refresh_result
  language plpgsql volatile
  set search_path = pg_catalog, public, pg_temp
  -- Over-estimated dirty-hour recounts would JIT-compile every minute.
  set jit = off
  as $$
declare
  v_state app_public.attribution_rollup_state;
  v_target timestamptz;
  v_settled timestamptz;
  v_from timestamptz;
  v_hours timestamptz[];
  v_result app_private.attribution_rollup_refresh_result;
begin
  -- Each statement below needs a snapshot newer than the one before (the
  -- recount must see the rows whose marks were consumed, and the writers the
  -- fence waited for): READ COMMITTED only.
  if current_setting('transaction_isolation') <> 'read committed' then
    raise exception 'refresh_attribution_rollups() must run in a READ COMMITTED transaction, not %', current_setting('transaction_isolation')
      using errcode = '25001';
  end if;
  -- One refresh at a time; a second one has nothing to add.
  select * into v_state from app_public.attribution_rollup_state for update skip locked;
  if not found then
    return v_result;
  end if;
  v_target := date_trunc('hour', clock_timestamp(), 'UTC');

  v_settled := v_state.settled_through;
  if v_state.fence_until is not null
     and not exists (select 1 from pg_catalog.pg_locks l where l.virtualtransaction = any(v_state.fence_transactions)) then
    v_settled := greatest(v_state.settled_through, v_state.fence_until);
    v_state.fence_transactions := null;
    v_state.fence_until := null;
    v_state.fence_set_at := null;
  end if;

  -- Consume the marks of every hour that is settled after this run; those
  -- before the old settled_through (and not frozen) need a recount.
  with consumed as (
    delete from app_public.attribution_rollup_dirty_hours d where d.hour < v_settled returning d.hour
  )
  select array_agg(distinct c.hour) into v_hours from consumed c
   where c.hour < v_state.settled_through and c.hour >= v_state.frozen_before;

  -- Newly settled hours, counted from the raw rows (this statement's snapshot
  -- is newer than the one that consumed the marks).
  v_from := greatest(v_state.settled_through, v_state.frozen_before);
  if v_from < v_settled then
    delete from app_public.attribution_rollups_hourly r where r.hour >= v_from and r.hour < v_settled;
    insert into app_public.attribution_rollups_hourly (hour, attribution_status, is_anonymous, has_user, initial_attribution, requests)
      select date_trunc('hour', c.created_at, 'UTC'), c.attribution_status, c.is_anonymous, c.user_id is not null,
             coalesce(c.initial_attribution, 'unknown'), count(*)
        from app_public.chat_completion_requests c
       where c.created_at >= v_from and c.created_at < v_settled
       group by 1, 2, 3, 4, 5;
  end if;

  -- Dirty hours, recounted.
  if v_hours is not null then
    delete from app_public.attribution_rollups_hourly r where r.hour = any(v_hours);
    insert into app_public.attribution_rollups_hourly (hour, attribution_status, is_anonymous, has_user, initial_attribution, requests)
      select h.hour, c.attribution_status, c.is_anonymous, c.user_id is not null,
             coalesce(c.initial_attribution, 'unknown'), count(*)
        from unnest(v_hours) as h(hour)
        join app_public.chat_completion_requests c on c.created_at >= h.hour and c.created_at < h.hour + interval '1 hour'
       group by 1, 2, 3, 4, 5;
  end if;

  -- The next fence: hours up to v_target settle once every transaction that
  -- holds a write lock on the ledger now has ended. Read after v_target: a
  -- writer that still saw one of those hours open took its lock before, and
  -- keeps it until it ends (locks are released after the commit is visible).
  if v_state.fence_until is null and v_settled < v_target then
    select coalesce(array_agg(distinct l.virtualtransaction), '{}') into v_state.fence_transactions
      from pg_catalog.pg_locks l
     where l.locktype = 'relation'
       and l.database = (select d.oid from pg_catalog.pg_database d where d.datname = current_database())
       and l.mode in ('RowExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')
       and l.relation in (select 'app_public.chat_completion_requests'::regclass
                          union all
                          select i.inhrelid::regclass from pg_catalog.pg_inherits i
                           where i.inhparent = 'app_public.chat_completion_requests'::regclass);
    v_state.fence_until := v_target;
    v_state.fence_set_at := now();
  end if;

  update app_public.attribution_rollup_state s set
    settled_through = v_settled,
    fence_transactions = v_state.fence_transactions,
    fence_until = v_state.fence_until,
    fence_set_at = v_state.fence_set_at,
    refreshed_at = now();

  v_result.settled_through := v_settled;
  v_result.settled_hours := case when v_state.settled_through = '-infinity' then 0
                                 else (extract(epoch from v_settled - v_state.settled_through) / 3600)::integer end;
  v_result.recomputed_hours := coalesce(cardinality(v_hours), 0);
  v_result.waiting_since := v_state.fence_set_at;
  return v_result;
end;
$$;
comment on function app_private.refresh_attribution_rollups() is
  'The rollup worker''s body (every minute): settles the hours whose fence has passed (counts them from the raw rows), recomputes the hours marked dirty since, consumes their marks and takes the next fence. Idempotent; concurrent runs skip. Reads are exact whether or not it runs; it only makes them cheaper.';
revoke all on function app_private.refresh_attribution_rollups() from public;

create function app_private.freeze_attribution_rollups(before timestamptz) returns app_public.attribution_rollup_state
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
  if exists (select 1 from app_public.attribution_rollup_dirty_hours d where d.hour < before and d.hour >= v_state.frozen_before) then
    raise exception 'hours before % are marked dirty; refresh the rollups first', before using errcode = '55000';
  end if;
  update app_public.attribution_rollup_state s set frozen_before = greatest(s.frozen_before, before)
    returning * into v_state;
  return v_state;
end;
$$;
comment on function app_private.freeze_attribution_rollups(timestamptz) is
  'Call before dropping raw partitions (retention): hours before `before` keep their rollups forever and are never recomputed from raw rows that may be gone. Refuses while those hours are not settled or are marked dirty.';
revoke all on function app_private.freeze_attribution_rollups(timestamptz) from public;

--------------------------------------------------------------------------------
-- Reading: rollups for settled hours, raw rows for the rest, one snapshot.
--------------------------------------------------------------------------------

create function app_public.attribution_counts_by_hour(since timestamptz, until timestamptz default 'infinity')
  returns table (
    hour timestamptz,
    attribution_status text,
    is_anonymous boolean,
    has_user boolean,
    initial_attribution text,
    requests bigint
  )
  language plpgsql stable
  -- The raw part's row estimates (ranges bound by variables) are far too high:
  -- at 10M rows they made the planner JIT-compile (340 ms) and start parallel
  -- workers (25 ms) for a few thousand rows. Measured: 4 ms with both off.
  set jit = off
  set max_parallel_workers_per_gather = 0
  as $$
declare
  v_settled timestamptz;
  v_frozen timestamptz;
  v_first timestamptz;
  v_last timestamptz;
  v_raw_hours timestamptz[];
begin
  -- Invisible (not an admin or analyst): nothing is settled for this caller,
  -- so everything is read raw, through the caller's row-level security.
  select s.settled_through, s.frozen_before into v_settled, v_frozen from app_public.attribution_rollup_state s;
  v_settled := coalesce(v_settled, '-infinity');
  v_frozen := coalesce(v_frozen, '-infinity');
  -- Whole UTC hours [v_first, v_last) may come from rollups.
  v_first := date_trunc('hour', since, 'UTC');
  if v_first < since then
    v_first := v_first + interval '1 hour';
  end if;
  v_last := greatest(least(date_trunc('hour', until, 'UTC'), v_settled), v_first);

  -- Among those, read raw: hours marked dirty (unless frozen), and hours that
  -- do not fall inside one hour of the session's time zone (offsets that are
  -- not whole hours), whose rows must be bucketed one by one.
  select array_agg(x.h) into v_raw_hours from (
    select d.hour as h from app_public.attribution_rollup_dirty_hours d
     where d.hour >= v_first and d.hour < v_last and d.hour >= v_frozen
    union
    select r.hour from app_public.attribution_rollups_hourly r
     where r.hour >= v_first and r.hour < v_last
       and date_trunc('hour', r.hour) <> date_trunc('hour', r.hour + interval '59 minutes 59.999999 seconds')
  ) x;
  v_raw_hours := coalesce(v_raw_hours, '{}');

  return query
    select date_trunc('hour', r.hour), r.attribution_status, r.is_anonymous, r.has_user, r.initial_attribution, r.requests
      from app_public.attribution_rollups_hourly r
     where r.hour >= v_first and r.hour < v_last and r.hour <> all(v_raw_hours)
    union all
    select date_trunc('hour', c.created_at), c.attribution_status, c.is_anonymous, c.user_id is not null,
           coalesce(c.initial_attribution, 'unknown'), count(*)
      from (select since as lo, least(v_first, until) as hi   -- the partial first hour
            union all
            select greatest(v_last, since), until               -- the hours not settled yet
            union all
            select h, h + interval '1 hour' from unnest(v_raw_hours) h) rg
      join app_public.chat_completion_requests c on c.created_at >= rg.lo and c.created_at < rg.hi
     where rg.lo < rg.hi
     group by 1, 2, 3, 4, 5;
end;
$$;
comment on function app_public.attribution_counts_by_hour(timestamptz, timestamptz) is
  E'@behavior -queryField\nRequests created in [since, until) counted per hour (date_trunc(''hour'', created_at) in the session''s time zone) and attribution outcome: settled rollups where they apply, raw rows for everything else, all in one snapshot, so the result always equals a scan of the raw rows. The same key can appear in several rows: sum them. Admins and analysts get rollups; other callers scan raw rows through their row-level security.';
revoke all on function app_public.attribution_counts_by_hour(timestamptz, timestamptz) from public;
grant execute on function app_public.attribution_counts_by_hour(timestamptz, timestamptz) to keytrack_admin, keytrack_analyst, keytrack_user;

--------------------------------------------------------------------------------
-- The spec's view, same columns, same meaning, same order, now from rollups
-- plus the unsettled hours. Its rows equal the spec's SELECT over the raw rows
-- (tests/db/specSql.test.ts compares them).
--------------------------------------------------------------------------------

create view app_public.api_key_tracking_quality with (security_invoker = true) as
select
  q.hour,
  sum(q.requests)::bigint as total_requests,
  coalesce(sum(q.requests) filter (where q.attribution_status = 'resolved'), 0)::bigint as requests_with_api_key,
  coalesce(sum(q.requests) filter (where q.attribution_status <> 'resolved'), 0)::bigint as requests_without_api_key,
  coalesce(sum(q.requests) filter (where q.is_anonymous), 0)::bigint as anonymous_requests,
  coalesce(sum(q.requests) filter (where q.attribution_status <> 'resolved' and q.has_user), 0)::bigint as potential_lookup_failures,
  round((coalesce(sum(q.requests) filter (where q.attribution_status = 'resolved'), 0)::numeric / nullif(sum(q.requests), 0)) * 100, 2) as tracking_rate_percent
from app_public.attribution_counts_by_hour(now() - interval '7 days') q
group by q.hour
order by q.hour desc;

comment on view app_public.api_key_tracking_quality is E'@primaryKey hour\n@behavior -insert -update -delete\nAPI key tracking quality per hour over the last 7 days (the spec''s view): how many requests carried an API key id, how many were anonymous, how many name a user but no key. Served from hourly rollups plus the hours not settled yet; always equal to the spec''s SELECT over the raw rows.';
comment on column app_public.api_key_tracking_quality.hour is 'The hour (date_trunc(''hour'', created_at), in the session''s time zone).';
comment on column app_public.api_key_tracking_quality.total_requests is 'Requests in the hour.';
comment on column app_public.api_key_tracking_quality.requests_with_api_key is 'Requests with api_key_id set.';
comment on column app_public.api_key_tracking_quality.requests_without_api_key is 'Requests with api_key_id NULL (anonymous, pending or failed).';
comment on column app_public.api_key_tracking_quality.anonymous_requests is 'Requests flagged is_anonymous.';
comment on column app_public.api_key_tracking_quality.potential_lookup_failures is 'Requests naming a user but no API key: attribution failures to investigate.';
comment on column app_public.api_key_tracking_quality.tracking_rate_percent is 'requests_with_api_key / total_requests * 100, rounded to 2 places.';

grant select on app_public.api_key_tracking_quality to keytrack_admin, keytrack_user, keytrack_analyst;

--------------------------------------------------------------------------------
-- The quality report (GET /admin/monitoring/api-key-tracking-quality).
--------------------------------------------------------------------------------

create type app_public.api_key_tracking_quality_report as (
  hours integer,
  start_time timestamptz,
  end_time timestamptz,
  total_requests bigint,
  requests_with_api_key bigint,
  requests_without_api_key bigint,
  tracking_rate_percent numeric,
  null_key_with_valid_user bigint,
  both_null_likely_anonymous bigint,
  null_key_with_valid_user_percent numeric,
  both_null_percent numeric,
  anonymous_requests bigint,
  authenticated_requests bigint,
  authenticated_tracking_rate_percent numeric,
  pending_attributions bigint,
  failed_attributions bigint,
  alert_status text,
  recommendations text[]
);
comment on type app_public.api_key_tracking_quality_report is 'API key tracking quality over the last N hours (the spec''s admin endpoint), with the alert status and recommendations.';
comment on column app_public.api_key_tracking_quality_report.hours is 'The window, in hours.';
comment on column app_public.api_key_tracking_quality_report.start_time is 'The window''s start: end_time minus hours.';
comment on column app_public.api_key_tracking_quality_report.end_time is 'The window''s end: now() (rows created in [start_time, end_time] count).';
comment on column app_public.api_key_tracking_quality_report.total_requests is 'Requests in the window.';
comment on column app_public.api_key_tracking_quality_report.requests_with_api_key is 'Requests with api_key_id set.';
comment on column app_public.api_key_tracking_quality_report.requests_without_api_key is 'Requests with api_key_id NULL.';
comment on column app_public.api_key_tracking_quality_report.tracking_rate_percent is 'requests_with_api_key / total_requests * 100, rounded to 2 places; 0 without requests (as the spec''s endpoint).';
comment on column app_public.api_key_tracking_quality_report.null_key_with_valid_user is 'Requests naming a user but no key (potential lookup failures).';
comment on column app_public.api_key_tracking_quality_report.both_null_likely_anonymous is 'Requests with neither key nor user: anonymous, or a key hash not known (yet).';
comment on column app_public.api_key_tracking_quality_report.null_key_with_valid_user_percent is 'null_key_with_valid_user / total_requests * 100, rounded to 2 places; 0 without requests.';
comment on column app_public.api_key_tracking_quality_report.both_null_percent is 'both_null_likely_anonymous / total_requests * 100, rounded to 2 places; 0 without requests.';
comment on column app_public.api_key_tracking_quality_report.anonymous_requests is 'Requests flagged is_anonymous (no credentials, on purpose).';
comment on column app_public.api_key_tracking_quality_report.authenticated_requests is 'Requests not flagged is_anonymous.';
comment on column app_public.api_key_tracking_quality_report.authenticated_tracking_rate_percent is 'requests_with_api_key / authenticated_requests * 100, rounded to 2 places; NULL without authenticated requests. The alert status is computed from it.';
comment on column app_public.api_key_tracking_quality_report.pending_attributions is 'Requests still pending attribution (a key hash not found yet; the retry worker retries them).';
comment on column app_public.api_key_tracking_quality_report.failed_attributions is 'Requests whose attribution failed (attribution_reason says why).';
comment on column app_public.api_key_tracking_quality_report.alert_status is '`ok` (authenticated tracking rate >= 90), `warning` (>= 70), `critical` (< 70) or `no_data` (no authenticated requests). Anonymous requests never lower it.';
comment on column app_public.api_key_tracking_quality_report.recommendations is 'What to do, one sentence each; "API key tracking quality is good. No action needed." when nothing applies.';

create function app_public.api_key_tracking_quality_report(hours integer default 24) returns app_public.api_key_tracking_quality_report
  language plpgsql stable
  -- Rollups are keyed by UTC hour: in UTC every one of them applies.
  set timezone = 'UTC'
  as $$
declare
  r app_public.api_key_tracking_quality_report;
  v_pct_key_user numeric;
  v_pct_pending numeric;
  v_pct_failed numeric;
begin
  if hours is null or hours < 1 or hours > 168 then
    raise exception 'hours must be an integer between 1 and 168, got %', hours using errcode = '22023';
  end if;
  r.hours := hours;
  r.end_time := now();
  r.start_time := r.end_time - make_interval(hours => hours);

  select coalesce(sum(q.requests), 0),
         coalesce(sum(q.requests) filter (where q.attribution_status = 'resolved'), 0),
         coalesce(sum(q.requests) filter (where q.attribution_status <> 'resolved' and q.has_user), 0),
         coalesce(sum(q.requests) filter (where q.attribution_status <> 'resolved' and not q.has_user), 0),
         coalesce(sum(q.requests) filter (where q.is_anonymous), 0),
         coalesce(sum(q.requests) filter (where q.attribution_status = 'pending'), 0),
         coalesce(sum(q.requests) filter (where q.attribution_status = 'failed'), 0)
    into r.total_requests, r.requests_with_api_key, r.null_key_with_valid_user, r.both_null_likely_anonymous,
         r.anonymous_requests, r.pending_attributions, r.failed_attributions
    from app_public.attribution_counts_by_hour(r.start_time, r.end_time + interval '1 microsecond') q;

  r.requests_without_api_key := r.total_requests - r.requests_with_api_key;
  r.authenticated_requests := r.total_requests - r.anonymous_requests;
  r.tracking_rate_percent := coalesce(round(r.requests_with_api_key * 100.0 / nullif(r.total_requests, 0), 2), 0);
  r.null_key_with_valid_user_percent := coalesce(round(r.null_key_with_valid_user * 100.0 / nullif(r.total_requests, 0), 2), 0);
  r.both_null_percent := coalesce(round(r.both_null_likely_anonymous * 100.0 / nullif(r.total_requests, 0), 2), 0);
  r.authenticated_tracking_rate_percent := round(r.requests_with_api_key * 100.0 / nullif(r.authenticated_requests, 0), 2);
  r.alert_status := case
    when r.authenticated_tracking_rate_percent is null then 'no_data'
    when r.authenticated_tracking_rate_percent >= 90 then 'ok'
    when r.authenticated_tracking_rate_percent >= 70 then 'warning'
    else 'critical' end;

  -- Each recommendation has its condition; shares of authenticated requests,
  -- so anonymous traffic never raises one except the anonymous share itself.
  v_pct_key_user := round(r.null_key_with_valid_user * 100.0 / nullif(r.authenticated_requests, 0), 2);
  v_pct_pending := round(r.pending_attributions * 100.0 / nullif(r.authenticated_requests, 0), 2);
  v_pct_failed := round(r.failed_attributions * 100.0 / nullif(r.authenticated_requests, 0), 2);
  r.recommendations := '{}';
  if r.authenticated_requests = 0 then
    r.recommendations := r.recommendations || format(
      'No authenticated requests in the last %s hours: tracking quality cannot be assessed.', hours);
  end if;
  if v_pct_key_user >= 1 then
    r.recommendations := r.recommendations || format(
      '%s requests (%s%% of authenticated requests) name a user but no API key: their key lookup failed or they predate key tracking. Run the attribution backfill (npm run backfill) and check the writers'' logs.',
      r.null_key_with_valid_user, v_pct_key_user);
  end if;
  if r.both_null_percent > 20 then
    r.recommendations := r.recommendations || format(
      '%s requests (%s%%) have neither an API key nor a user. Make sure this much anonymous traffic is expected (ALLOW_ANONYMOUS).',
      r.both_null_likely_anonymous, r.both_null_percent);
  end if;
  if r.authenticated_tracking_rate_percent < 90 then
    r.recommendations := r.recommendations || format(
      'The authenticated tracking rate is %s%%, below 90%%. Review key lookups, the retry worker and the backfill.',
      r.authenticated_tracking_rate_percent);
  end if;
  if v_pct_pending >= 1 then
    r.recommendations := r.recommendations || format(
      '%s requests (%s%% of authenticated requests) are pending attribution: their key is not known yet. The retry worker resolves them when it appears; register keys issued elsewhere with import_api_key(), and check that the worker runs.',
      r.pending_attributions, v_pct_pending);
  end if;
  if v_pct_failed >= 1 then
    r.recommendations := r.recommendations || format(
      '%s requests (%s%% of authenticated requests) failed attribution. See attribution_offenders() for the keys and users involved, and attribution_reason for why.',
      r.failed_attributions, v_pct_failed);
  end if;
  if cardinality(r.recommendations) = 0 then
    r.recommendations := array['API key tracking quality is good. No action needed.'];
  end if;
  return r;
end;
$$;
comment on function app_public.api_key_tracking_quality_report(integer) is
  'API key tracking quality over the last `hours` hours (1..168): the spec''s report plus anonymous, pending and failed counts and the authenticated tracking rate, which decides the alert status (anonymous traffic never lowers it; no authenticated requests is no_data). Recommendations fire at 1% of authenticated requests naming a user but no key, pending or failed, at 20% of requests with neither key nor user, and below a 90% authenticated rate. From rollups plus the unsettled hours: equal to a raw scan. Admins and analysts.';
revoke all on function app_public.api_key_tracking_quality_report(integer) from public;
grant execute on function app_public.api_key_tracking_quality_report(integer) to keytrack_admin, keytrack_analyst;

--------------------------------------------------------------------------------
-- The daily trend (GET /admin/monitoring/api-key-tracking-trend), UTC days.
--------------------------------------------------------------------------------

create type app_public.api_key_tracking_trend_day as (
  date date,
  total_requests bigint,
  requests_with_api_key bigint,
  tracking_rate_percent numeric
);
comment on type app_public.api_key_tracking_trend_day is 'One UTC day of the API key tracking trend.';
comment on column app_public.api_key_tracking_trend_day.date is 'The UTC calendar day.';
comment on column app_public.api_key_tracking_trend_day.total_requests is 'Requests created that day.';
comment on column app_public.api_key_tracking_trend_day.requests_with_api_key is 'Of those, requests with api_key_id set.';
comment on column app_public.api_key_tracking_trend_day.tracking_rate_percent is 'requests_with_api_key / total_requests * 100, rounded to 2 places; 0 on a day without requests.';

create type app_public.api_key_tracking_trend as (
  period_days integer,
  start_date date,
  end_date date,
  total_requests bigint,
  requests_with_api_key bigint,
  average_tracking_rate_percent numeric,
  trend_data app_public.api_key_tracking_trend_day[]
);
comment on type app_public.api_key_tracking_trend is 'The API key tracking trend over the last N UTC days, and its summary.';
comment on column app_public.api_key_tracking_trend.period_days is 'How many days.';
comment on column app_public.api_key_tracking_trend.start_date is 'The first day (UTC).';
comment on column app_public.api_key_tracking_trend.end_date is 'The last day: today (UTC), so far.';
comment on column app_public.api_key_tracking_trend.total_requests is 'Requests over the period.';
comment on column app_public.api_key_tracking_trend.requests_with_api_key is 'Of those, requests with api_key_id set.';
comment on column app_public.api_key_tracking_trend.average_tracking_rate_percent is 'The period''s tracking rate weighted by requests: requests_with_api_key / total_requests * 100, rounded to 2 places; 0 without requests.';
comment on column app_public.api_key_tracking_trend.trend_data is 'One entry per day, oldest first, days without requests included.';

create function app_public.api_key_tracking_trend(days integer default 7) returns app_public.api_key_tracking_trend
  language plpgsql stable
  set timezone = 'UTC'
  as $$
declare
  r app_public.api_key_tracking_trend;
  v_since timestamptz;
  v_until timestamptz;
begin
  if days is null or days < 1 or days > 30 then
    raise exception 'days must be an integer between 1 and 30, got %', days using errcode = '22023';
  end if;
  r.period_days := days;
  r.end_date := (now() at time zone 'UTC')::date;
  r.start_date := r.end_date - (days - 1);
  v_since := r.start_date::timestamp at time zone 'UTC';
  v_until := (r.end_date + 1)::timestamp at time zone 'UTC';

  with counts as (
    select (q.hour at time zone 'UTC')::date as day,
           sum(q.requests) as total,
           coalesce(sum(q.requests) filter (where q.attribution_status = 'resolved'), 0) as with_key
      from app_public.attribution_counts_by_hour(v_since, v_until) q
     group by 1
  ), per_day as (
    select d::date as day, coalesce(c.total, 0)::bigint as total, coalesce(c.with_key, 0)::bigint as with_key
      from generate_series(r.start_date, r.end_date, interval '1 day') d
      left join counts c on c.day = d::date
  )
  select array_agg(row(d.day, d.total, d.with_key,
                       coalesce(round(d.with_key * 100.0 / nullif(d.total, 0), 2), 0))::app_public.api_key_tracking_trend_day
                   order by d.day),
         sum(d.total)::bigint, sum(d.with_key)::bigint
    into r.trend_data, r.total_requests, r.requests_with_api_key
    from per_day d;
  r.average_tracking_rate_percent := coalesce(round(r.requests_with_api_key * 100.0 / nullif(r.total_requests, 0), 2), 0);
  return r;
end;
$$;
comment on function app_public.api_key_tracking_trend(integer) is
  'API key tracking per UTC calendar day over the last `days` days (1..30, today included so far), oldest first, with the period''s summary (rate weighted by requests). From rollups plus the unsettled hours: equal to a raw scan. Admins and analysts.';
revoke all on function app_public.api_key_tracking_trend(integer) from public;
grant execute on function app_public.api_key_tracking_trend(integer) to keytrack_admin, keytrack_analyst;

--------------------------------------------------------------------------------
-- Offenders: the key hashes and users behind the most unattributed requests.
-- Read from the partial index of pending and failed rows.
--------------------------------------------------------------------------------

create type app_public.attribution_offender as (
  kind text,
  api_key_hash text,
  user_id uuid,
  email text,
  unattributed_requests bigint,
  pending_requests bigint,
  failed_requests bigint,
  reasons text[],
  first_seen_at timestamptz,
  last_seen_at timestamptz
);
comment on type app_public.attribution_offender is 'A key hash or a user behind unattributed (pending or failed) requests.';
comment on column app_public.attribution_offender.kind is '`api_key_hash` (a presented key that matches no key) or `user` (a user whose requests carry no key).';
comment on column app_public.attribution_offender.api_key_hash is 'For kind api_key_hash: the presented key''s SHA-256, hex. Register the key with import_api_key() if it is legitimate.';
comment on column app_public.attribution_offender.user_id is 'For kind user: the user.';
comment on column app_public.attribution_offender.email is 'For kind user: the user''s email.';
comment on column app_public.attribution_offender.unattributed_requests is 'Pending plus failed requests in the window.';
comment on column app_public.attribution_offender.pending_requests is 'Requests still pending attribution.';
comment on column app_public.attribution_offender.failed_requests is 'Requests whose attribution failed.';
comment on column app_public.attribution_offender.reasons is 'The distinct attribution_reason values of those requests.';
comment on column app_public.attribution_offender.first_seen_at is 'The oldest of those requests in the window.';
comment on column app_public.attribution_offender.last_seen_at is 'The newest of those requests.';

create function app_public.attribution_offenders(hours integer default 24, max_rows integer default 20)
  returns setof app_public.attribution_offender
  language plpgsql stable
  as $$
declare
  v_since timestamptz;
begin
  if hours is null or hours < 1 or hours > 8760 then
    raise exception 'hours must be an integer between 1 and 8760, got %', hours using errcode = '22023';
  end if;
  if max_rows is null or max_rows < 1 or max_rows > 1000 then
    raise exception 'max_rows must be an integer between 1 and 1000, got %', max_rows using errcode = '22023';
  end if;
  v_since := now() - make_interval(hours => hours);
  return query
    with unattributed as (
      select c.api_key_hash, c.user_id, c.attribution_status, c.attribution_reason, c.created_at
        from app_public.chat_completion_requests c
       where c.attribution_status in ('pending', 'failed') and c.created_at >= v_since
    ), grouped as (
      select 'api_key_hash'::text as kind, encode(u.api_key_hash, 'hex') as api_key_hash, null::uuid as user_id,
             count(*) as unattributed, count(*) filter (where u.attribution_status = 'pending') as pending,
             count(*) filter (where u.attribution_status = 'failed') as failed,
             array_agg(distinct u.attribution_reason) filter (where u.attribution_reason is not null) as reasons,
             min(u.created_at) as first_seen, max(u.created_at) as last_seen
        from unattributed u where u.api_key_hash is not null group by u.api_key_hash
      union all
      select 'user', null, u.user_id,
             count(*), count(*) filter (where u.attribution_status = 'pending'),
             count(*) filter (where u.attribution_status = 'failed'),
             array_agg(distinct u.attribution_reason) filter (where u.attribution_reason is not null),
             min(u.created_at), max(u.created_at)
        from unattributed u where u.user_id is not null group by u.user_id
    )
    select g.kind, g.api_key_hash, g.user_id, usr.email, g.unattributed, g.pending, g.failed,
           coalesce(g.reasons, '{}'), g.first_seen, g.last_seen
      from grouped g
      left join app_public.users usr on usr.id = g.user_id
     order by g.unattributed desc, g.last_seen desc, g.kind, g.api_key_hash, g.user_id
     limit max_rows;
end;
$$;
comment on function app_public.attribution_offenders(integer, integer) is
  'The key hashes and users behind the most unattributed (pending or failed) requests in the last `hours` hours (1..8760), most first, at most max_rows (1..1000) in all. A request naming both a user and a key hash counts for both. Admins and analysts.';
revoke all on function app_public.attribution_offenders(integer, integer) from public;
grant execute on function app_public.attribution_offenders(integer, integer) to keytrack_admin, keytrack_analyst;

--------------------------------------------------------------------------------
-- Events the batch functions cause (retry, backfill), counted once per batch
-- for the Prometheus counters. Insert-time outcomes are not counted here: they
-- are initial_attribution, summed from the rollups.
--------------------------------------------------------------------------------

create table app_private.attribution_events (
  event text primary key check (event in (
    'retry_resolved', 'retry_still_pending', 'retry_failed',
    'backfill_resolved_by_hash', 'backfill_resolved_by_only_key', 'backfill_unknown_hash',
    'backfill_ambiguous', 'backfill_no_key', 'backfill_anonymized')),
  occurrences bigint not null default 0 check (occurrences >= 0),
  updated_at timestamptz not null default now()
);
alter table app_private.attribution_events enable row level security;
comment on table app_private.attribution_events is 'Cumulative counts of attribution events caused by the retry worker and the backfill (never decreasing), for the Prometheus counters (app_private.attribution_metrics()). One upsert per batch.';
comment on column app_private.attribution_events.event is '`retry_resolved`, `retry_still_pending`, `retry_failed` (a retry lookup found the key, did not and will retry, did not and gave up); `backfill_resolved_by_hash`, `backfill_resolved_by_only_key`, `backfill_unknown_hash` (a hash that matches no key), `backfill_ambiguous`, `backfill_no_key` (rows that newly got that reason), `backfill_anonymized`.';
comment on column app_private.attribution_events.occurrences is 'How many times it happened, ever.';
comment on column app_private.attribution_events.updated_at is 'When it last happened.';

create function app_private.count_attribution_events(events text[], counts bigint[]) returns void
  language plpgsql volatile
  set search_path = pg_catalog, public, pg_temp
  as $$
begin
  -- Always in event order, so concurrent batches lock the counter rows in the
  -- same order and never deadlock.
  insert into app_private.attribution_events as e (event, occurrences, updated_at)
    select u.event, u.n, now() from unnest(events, counts) as u(event, n) where u.n > 0 order by u.event
    on conflict (event) do update set occurrences = e.occurrences + excluded.occurrences, updated_at = excluded.updated_at;
end;
$$;
comment on function app_private.count_attribution_events(text[], bigint[]) is
  'Adds counts[i] to the counter of events[i] in app_private.attribution_events (zeros skipped). Called once per retry or backfill batch.';
revoke all on function app_private.count_attribution_events(text[], bigint[]) from public;

-- The retry worker's body, unchanged except that it counts its outcomes.
create or replace function app_private.resolve_pending_attributions(
  batch_size integer default 500,
  max_attempts integer default 10,
  base_delay interval default interval '1 second',
  max_delay interval default interval '10 minutes',
  as_of timestamptz default now()
) returns app_private.attribution_retry_result
  language plpgsql volatile security definer
  set search_path = pg_catalog, public, pg_temp
  as $$
declare
  v_result app_private.attribution_retry_result;
begin
  if batch_size is null or batch_size < 1 or batch_size > 100000 then
    raise exception 'batch_size must be between 1 and 100000, got %', batch_size using errcode = '22023';
  end if;
  if max_attempts is null or max_attempts < 1 or max_attempts > 1000 then
    raise exception 'max_attempts must be between 1 and 1000, got %', max_attempts using errcode = '22023';
  end if;
  if base_delay is null or base_delay <= interval '0' or max_delay is null or max_delay < base_delay then
    raise exception 'base_delay must be positive and max_delay at least base_delay' using errcode = '22023';
  end if;

  with due as (
    select r.id, r.created_at
      from app_public.chat_completion_requests r
     where r.attribution_status = 'pending' and r.attribution_next_attempt_at <= as_of
     order by r.attribution_next_attempt_at
     limit batch_size
     for update skip locked
  ), looked_up as (
    select r.id, r.created_at, r.attribution_attempts + 1 as attempts, k.id as key_id, k.user_id as key_user_id
      from due d
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
    returning r.attribution_status
  )
  select count(*)::int,
         count(*) filter (where attribution_status = 'resolved')::int,
         count(*) filter (where attribution_status = 'failed')::int,
         count(*) filter (where attribution_status = 'pending')::int
    into v_result.examined, v_result.resolved, v_result.failed, v_result.still_pending
    from updated;

  if v_result.examined > 0 then
    perform app_private.count_attribution_events(
      array['retry_resolved', 'retry_still_pending', 'retry_failed'],
      array[v_result.resolved, v_result.still_pending, v_result.failed]::bigint[]);
  end if;

  select min(r.attribution_next_attempt_at) into v_result.next_attempt_at
    from app_public.chat_completion_requests r
   where r.attribution_status = 'pending';
  if v_result.next_attempt_at is not null then
    perform app_private.schedule_attribution_retry(greatest(v_result.next_attempt_at, now()));
  end if;
  return v_result;
end;
$$;
comment on function app_private.resolve_pending_attributions(integer, integer, interval, interval, timestamptz) is
  'The retry worker''s body: takes up to batch_size due pending rows (FOR UPDATE SKIP LOCKED, so workers run in parallel safely), looks their key hash up again: found -> resolved (method retry); not found -> pending again after base_delay * 2^(attempts-1) (capped at max_delay), or failed (reason not_found) at max_attempts. Counts the outcomes in app_private.attribution_events (one upsert per batch). Reschedules the worker for the next due row. Idempotent.';

-- The backfill batch, unchanged except that it counts its outcomes.
create or replace function app_private.run_attribution_backfill_batch(backfill_id bigint) returns app_public.attribution_backfills
  language plpgsql volatile security definer
  set search_path = pg_catalog, public, pg_temp
  as $$
declare
  v_run app_public.attribution_backfills;
  v_examined integer;
  v_filled integer;
  v_ambiguous integer;
  v_no_key integer;
  v_anonymized integer;
  v_by_hash integer;
  v_unknown_hash integer;
  v_new_ambiguous integer;
  v_new_no_key integer;
  v_last_created_at timestamptz;
  v_last_id bigint;
  v_from_created_at timestamptz;
  v_from_id bigint;
begin
  -- One batch at a time per run, whoever runs it (worker or CLI).
  select * into v_run from app_public.attribution_backfills b where b.id = backfill_id for update;
  if not found then
    raise exception 'attribution backfill % does not exist', backfill_id using errcode = 'P0002';
  end if;
  if v_run.status <> 'running' then
    return v_run;
  end if;
  v_from_created_at := coalesce(v_run.cursor_created_at, '-infinity'::timestamptz);
  v_from_id := coalesce(v_run.cursor_id, -1);

  with batch as (
    select r.id, r.created_at, r.api_key_hash, r.user_id, r.is_anonymous, r.attribution_status, r.attribution_reason
      from app_public.chat_completion_requests r
     where r.api_key_id is null
       and r.created_at < v_run.upto
       and (r.created_at, r.id) > (v_from_created_at, v_from_id)
     order by r.created_at, r.id
     limit v_run.batch_size
     for update
  ), decided as (
    select b.id, b.created_at, b.is_anonymous as was_anonymous,
           b.attribution_status as was_status, b.attribution_reason as was_reason,
           by_hash.key_id as hash_key_id, by_hash.user_id as hash_user_id,
           alive.n as alive_keys, alive.key_id as alive_key_id,
           case
             when by_hash.key_id is not null then 'hash'
             when b.api_key_hash is not null then 'unknown_hash'
             when b.user_id is not null and alive.n = 1 then 'only_key'
             when b.user_id is not null and alive.n > 1 then 'ambiguous'
             when b.user_id is not null then 'no_key'
             else 'anonymous'
           end as decision
      from batch b
      left join lateral (
        select k.id as key_id, k.user_id from app_private.api_key_secrets s
          join app_public.api_keys k on k.id = s.api_key_id
         where s.key_hash = b.api_key_hash) by_hash on true
      left join lateral (
        select count(*) as n, (array_agg(k.id))[1] as key_id from app_public.api_keys k
         where b.user_id is not null and k.user_id = b.user_id
           and k.created_at <= b.created_at
           and (k.revoked_at is null or k.revoked_at > b.created_at)
           and (k.expires_at is null or k.expires_at > b.created_at)) alive on true
  ), updated as (
    update app_public.chat_completion_requests r set
      api_key_id = case d.decision when 'hash' then d.hash_key_id when 'only_key' then d.alive_key_id end,
      user_id = case d.decision when 'hash' then d.hash_user_id else r.user_id end,
      is_anonymous = (d.decision = 'anonymous'),
      attribution_status = case
        when d.decision in ('hash', 'only_key') then 'resolved'
        when d.decision = 'anonymous' then 'anonymous'
        when d.decision in ('ambiguous', 'no_key') then 'failed'
        else r.attribution_status end,
      attribution_method = case when d.decision in ('hash', 'only_key') then 'backfill' end,
      attribution_reason = case
        when d.decision in ('hash', 'only_key', 'anonymous') then null
        when d.decision in ('ambiguous', 'no_key') then d.decision
        else r.attribution_reason end,
      attribution_error = case when d.decision = 'ambiguous'
        then format('the user had %s keys alive at the time', d.alive_keys) else r.attribution_error end,
      attribution_next_attempt_at = case when d.decision = 'unknown_hash' then r.attribution_next_attempt_at end,
      attributed_at = case when d.decision in ('hash', 'only_key') then now() end
    from decided d
    where r.id = d.id and r.created_at = d.created_at
    returning d.decision, d.was_anonymous, d.was_status, d.was_reason, r.created_at, r.id
  )
  select count(*),
         count(*) filter (where decision in ('hash', 'only_key')),
         count(*) filter (where decision = 'ambiguous'),
         count(*) filter (where decision = 'no_key'),
         count(*) filter (where decision = 'anonymous' and not was_anonymous),
         count(*) filter (where decision = 'hash'),
         count(*) filter (where decision = 'unknown_hash'),
         count(*) filter (where decision = 'ambiguous' and (was_status, was_reason) is distinct from ('failed', 'ambiguous')),
         count(*) filter (where decision = 'no_key' and (was_status, was_reason) is distinct from ('failed', 'no_key')),
         (array_agg(created_at order by created_at desc, id desc))[1],
         (array_agg(id order by created_at desc, id desc))[1]
    into v_examined, v_filled, v_ambiguous, v_no_key, v_anonymized, v_by_hash, v_unknown_hash,
         v_new_ambiguous, v_new_no_key, v_last_created_at, v_last_id
    from updated;

  if v_examined > 0 then
    perform app_private.count_attribution_events(
      array['backfill_resolved_by_hash', 'backfill_resolved_by_only_key', 'backfill_unknown_hash',
            'backfill_ambiguous', 'backfill_no_key', 'backfill_anonymized'],
      array[v_by_hash, v_filled - v_by_hash, v_unknown_hash, v_new_ambiguous, v_new_no_key, v_anonymized]::bigint[]);
  end if;

  update app_public.attribution_backfills b set
    examined = b.examined + v_examined,
    filled = b.filled + v_filled,
    ambiguous = b.ambiguous + v_ambiguous,
    no_key = b.no_key + v_no_key,
    anonymized = b.anonymized + v_anonymized,
    batches = b.batches + 1,
    cursor_created_at = coalesce(v_last_created_at, b.cursor_created_at),
    cursor_id = coalesce(v_last_id, b.cursor_id),
    updated_at = now(),
    status = case when v_examined < b.batch_size then 'finished' else b.status end,
    finished_at = case when v_examined < b.batch_size then now() end
  where b.id = backfill_id
  returning * into v_run;
  return v_run;
end;
$$;
comment on function app_private.run_attribution_backfill_batch(bigint) is
  'Runs one batch of an attribution backfill (one short transaction): the next batch_size rows without api_key_id created before the run started, in (created_at, id) order from the saved cursor. Fills api_key_id from the key hash, else from the user''s only key alive at the request''s time (method backfill); leaves ambiguous rows NULL (reason ambiguous) and rows whose user had no key (reason no_key); flags rows with neither key nor user anonymous. Counts the outcomes in app_private.attribution_events (one upsert per batch). Resumable; finishes the run on a short batch.';

--------------------------------------------------------------------------------
-- Prometheus support (GET /metrics): cumulative counters that never decrease
-- (insert-time outcomes from initial_attribution in the rollups, plus batch
-- events) and a few gauges. Cheap at any size: rollups plus the unsettled
-- hours, the partial index of unattributed rows, and one hour of raw rows.
--------------------------------------------------------------------------------

create type app_private.attribution_metrics as (
  lookup_attempts_success bigint,
  lookup_attempts_retry bigint,
  lookup_attempts_failed bigint,
  tracking_success_authenticated bigint,
  tracking_success_retry bigint,
  tracking_success_backfill bigint,
  tracking_success_dev bigint,
  tracking_failures_anonymous bigint,
  tracking_failures_not_found bigint,
  tracking_failures_lookup_failed bigint,
  tracking_failures_dev_bypass bigint,
  tracking_failures_no_key bigint,
  tracking_failures_ambiguous bigint,
  pending_attributions bigint,
  failed_attributions bigint,
  authenticated_tracking_rate double precision
);
comment on type app_private.attribution_metrics is 'The attribution counters and gauges behind /metrics (see app_private.attribution_metrics()).';
comment on column app_private.attribution_metrics.lookup_attempts_success is 'api_key_lookup_attempts_total{status="success"}: lookups that found the key (at insert, by the retry worker, by the backfill from a hash).';
comment on column app_private.attribution_metrics.lookup_attempts_retry is 'api_key_lookup_attempts_total{status="retry"}: lookups that found no key and left the row pending for another try (at insert, including a writer-declared lookup_failed, and by the retry worker).';
comment on column app_private.attribution_metrics.lookup_attempts_failed is 'api_key_lookup_attempts_total{status="failed"}: lookups that found no key and gave up (the retry limit, or the backfill meeting an unknown hash).';
comment on column app_private.attribution_metrics.tracking_success_authenticated is 'api_key_tracking_success_total{request_type="authenticated"}: rows resolved at insert by a (non-development) key.';
comment on column app_private.attribution_metrics.tracking_success_retry is 'api_key_tracking_success_total{request_type="retry"}: rows resolved by the retry worker.';
comment on column app_private.attribution_metrics.tracking_success_backfill is 'api_key_tracking_success_total{request_type="backfill"}: rows resolved by the backfill.';
comment on column app_private.attribution_metrics.tracking_success_dev is 'api_key_tracking_success_total{request_type="dev"}: rows resolved at insert by the development key.';
comment on column app_private.attribution_metrics.tracking_failures_anonymous is 'api_key_tracking_failures_total{reason="anonymous"}: rows recorded anonymous, or flagged anonymous by the backfill.';
comment on column app_private.attribution_metrics.tracking_failures_not_found is 'api_key_tracking_failures_total{reason="not_found"}: pending rows the retry worker gave up on.';
comment on column app_private.attribution_metrics.tracking_failures_lookup_failed is 'api_key_tracking_failures_total{reason="lookup_failed"}: rows whose writer declared its key lookup failed and whose key was not found at insert either.';
comment on column app_private.attribution_metrics.tracking_failures_dev_bypass is 'api_key_tracking_failures_total{reason="dev_bypass"}: rows recorded with the development bypass key.';
comment on column app_private.attribution_metrics.tracking_failures_no_key is 'api_key_tracking_failures_total{reason="no_key"}: rows naming a user but no key at insert, or newly found keyless by the backfill.';
comment on column app_private.attribution_metrics.tracking_failures_ambiguous is 'api_key_tracking_failures_total{reason="ambiguous"}: rows the backfill newly found ambiguous (several keys alive).';
comment on column app_private.attribution_metrics.pending_attributions is 'Gauge: rows pending attribution now.';
comment on column app_private.attribution_metrics.failed_attributions is 'Gauge: rows whose attribution failed, now.';
comment on column app_private.attribution_metrics.authenticated_tracking_rate is 'Gauge api_key_tracking_rate (0..1): of the non-anonymous requests of the last 60 minutes, the share with api_key_id set; NULL without such requests.';

create function app_private.attribution_metrics() returns app_private.attribution_metrics
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

  select count(*) filter (where not c.is_anonymous), count(*) filter (where not c.is_anonymous and c.api_key_id is not null)
    into v_authenticated, v_with_key
    from app_public.chat_completion_requests c
   where c.created_at >= now() - interval '1 hour';
  m.authenticated_tracking_rate := v_with_key::double precision / nullif(v_authenticated, 0);
  return m;
end;
$$;
comment on function app_private.attribution_metrics() is
  'The numbers behind the spec''s Prometheus metrics, one row: cumulative counters that never decrease (insert-time outcomes counted from initial_attribution, so a row resolved or failed later does not lower them; retry and backfill events from app_private.attribution_events) and gauges (pending and failed rows now, the authenticated tracking rate of the last 60 minutes). Rows recorded before initial_attribution existed are not counted. For the service (the owner).';
revoke all on function app_private.attribution_metrics() from public;
