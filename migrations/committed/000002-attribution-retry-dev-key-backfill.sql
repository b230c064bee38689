--! Previous: sha1:f3d9c590a8b2fc390f31d25dfb73bec1642a516a
--! Hash: sha1:c0276674d4ff5598c22bab21a47693f5ae93cda2
--! Message: attribution retry, dev key, backfill

--------------------------------------------------------------------------------
-- keytrack 000002: attribution that never silently fails.
--
-- Rows whose key is not known at insert time are retried by a worker until they
-- resolve or fail with a reason; the development key is a real key; historical
-- rows are backfilled in resumable batches; every outcome is recorded on the row
-- (status, method, reason, attempts, spooled_at) so monitoring can count it
-- whichever path wrote the row.
--------------------------------------------------------------------------------

alter table app_public.chat_completion_requests drop column if exists spooled_at;
alter table app_public.chat_completion_requests add column spooled_at timestamptz;
comment on column app_public.chat_completion_requests.spooled_at is 'When the service could not reach the database and wrote this row to its durable local spool; the row was replayed later. NULL for rows written directly.';
-- Existing partitions do not get the parent's column comments by themselves.
do $$
declare
  v_part regclass;
begin
  for v_part in select inhrelid::regclass from pg_inherits where inhparent = 'app_public.chat_completion_requests'::regclass loop
    execute format('comment on column %s.spooled_at is %L', v_part,
      col_description('app_public.chat_completion_requests'::regclass,
        (select attnum from pg_attribute where attrelid = 'app_public.chat_completion_requests'::regclass and attname = 'spooled_at')));
  end loop;
end
$$;

-- Pending rows by key hash: import_api_key() wakes the rows that presented it.
drop index if exists app_public.chat_completion_requests_pending_hash_idx;
create index chat_completion_requests_pending_hash_idx on app_public.chat_completion_requests (api_key_hash)
  where attribution_status = 'pending';

--------------------------------------------------------------------------------
-- Waking the retry worker. graphile-worker functions called from a trigger must
-- be security definer. One job key for the whole queue of pending rows; it is
-- only touched when a row becomes pending (rare), never on ordinary inserts, and
-- an earlier scheduled run is never pushed later.
--------------------------------------------------------------------------------

drop function if exists app_private.schedule_attribution_retry(timestamptz);
create function app_private.schedule_attribution_retry(run_at timestamptz default now()) returns void
  language plpgsql volatile security definer
  set search_path = pg_catalog, public, pg_temp
  as $$
begin
  if exists (select 1 from graphile_worker.jobs j
              where j.key = 'chat_completion_requests__resolve_pending'
                and j.locked_at is null and j.run_at <= schedule_attribution_retry.run_at) then
    return;
  end if;
  perform graphile_worker.add_job(
    'chat_completion_requests__resolve_pending',
    '{}'::json,
    run_at := schedule_attribution_retry.run_at,
    job_key := 'chat_completion_requests__resolve_pending',
    max_attempts := 25);
end;
$$;
comment on function app_private.schedule_attribution_retry(timestamptz) is
  'Schedules the retry worker (task chat_completion_requests__resolve_pending) to run at run_at, unless a run is already due by then.';
revoke all on function app_private.schedule_attribution_retry(timestamptz) from public;

--------------------------------------------------------------------------------
-- The insert trigger, now also: a writer-declared development bypass (the dev
-- key could not be created) fails at once with its own reason instead of being
-- retried; a pending row wakes the retry worker.
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
begin
  insert into app_private.request_ids (request_id, created_at)
    values (new.request_id, new.created_at)
    on conflict do nothing;
  if not found then
    return null;  -- already recorded: re-delivery changes nothing
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
    elsif v_declared_reason = 'dev_bypass' then
      new.api_key_id := null;
      new.attribution_status := 'failed';
      new.attribution_reason := 'dev_bypass';
    else
      new.api_key_id := null;
      new.attribution_status := 'pending';
      new.attribution_reason := 'not_found';
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
  elsif new.user_id is not null then
    new.is_anonymous := false;
    new.attribution_status := 'failed';
    new.attribution_reason := 'no_key';
  else
    new.is_anonymous := true;
    new.attribution_status := 'anonymous';
  end if;
  return new;
end;
$$;
comment on function app_private.tg_chat_completion_requests__attribute() is
  'Trigger function (BEFORE INSERT on chat_completion_requests): makes request_id idempotent and attributes the row from api_key_hash (resolved; pending, which wakes the retry worker; failed with dev_bypass when the writer declared the development bypass), api_key_id, user_id (failed: no_key) or nothing (anonymous).';

--------------------------------------------------------------------------------
-- The retry worker's body: resolve due pending rows in one set-based batch.
-- Rows are taken FOR UPDATE SKIP LOCKED, so several workers share the queue;
-- each row gets exponential backoff of its own; a row never changes any other.
-- as_of lets tests (and operators) control time.
--------------------------------------------------------------------------------

drop function if exists app_private.resolve_pending_attributions(integer, integer, interval, interval, timestamptz);
drop type if exists app_private.attribution_retry_result;
create type app_private.attribution_retry_result as (
  examined integer,
  resolved integer,
  failed integer,
  still_pending integer,
  next_attempt_at timestamptz
);
comment on type app_private.attribution_retry_result is 'What one run of resolve_pending_attributions() did.';
comment on column app_private.attribution_retry_result.examined is 'Due pending rows looked at.';
comment on column app_private.attribution_retry_result.resolved is 'Rows whose key was found: now resolved (method retry).';
comment on column app_private.attribution_retry_result.failed is 'Rows that reached the attempt limit: now failed (reason not_found).';
comment on column app_private.attribution_retry_result.still_pending is 'Rows left pending, due again later.';
comment on column app_private.attribution_retry_result.next_attempt_at is 'When the earliest pending row is due next (NULL: none pending).';

create function app_private.resolve_pending_attributions(
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
  'The retry worker''s body: takes up to batch_size due pending rows (FOR UPDATE SKIP LOCKED, so workers run in parallel safely), looks their key hash up again: found -> resolved (method retry); not found -> pending again after base_delay * 2^(attempts-1) (capped at max_delay), or failed (reason not_found) at max_attempts. Reschedules the worker for the next due row. Idempotent.';
revoke all on function app_private.resolve_pending_attributions(integer, integer, interval, interval, timestamptz) from public;

--------------------------------------------------------------------------------
-- Importing a key wakes the pending rows that presented it: they are due at once
-- and the worker is scheduled now, so they resolve within seconds.
--------------------------------------------------------------------------------

create or replace function app_public.import_api_key(
  user_id uuid,
  key_hash bytea,
  name text default 'imported',
  environment text default 'live',
  prefix text default null,
  last4 text default null,
  expires_at timestamptz default null
) returns app_public.api_keys
  language plpgsql volatile security definer
  set search_path = pg_catalog, public, pg_temp
  as $$
declare
  v_key app_public.api_keys;
begin
  if not app_private.is_admin() then
    raise exception 'only admins may import keys' using errcode = '42501';
  end if;
  if import_api_key.key_hash is null or octet_length(import_api_key.key_hash) <> 32 then
    raise exception 'key_hash must be the 32-byte SHA-256 of the key (sha256(convert_to(key, ''UTF8'')))' using errcode = '22023';
  end if;
  if import_api_key.environment not in ('live', 'test') then
    raise exception 'environment must be live or test, got %', import_api_key.environment using errcode = '22023';
  end if;
  if exists (select 1 from app_private.api_key_secrets s where s.key_hash = import_api_key.key_hash) then
    raise exception 'a key with this hash is already registered' using errcode = '23505';
  end if;
  insert into app_public.api_keys (user_id, name, prefix, last4, environment, source, expires_at)
    values (import_api_key.user_id, coalesce(import_api_key.name, 'imported'), import_api_key.prefix,
            import_api_key.last4, import_api_key.environment, 'imported', import_api_key.expires_at)
    returning * into v_key;
  insert into app_private.api_key_secrets (api_key_id, key_hash) values (v_key.id, import_api_key.key_hash);

  update app_public.chat_completion_requests r
     set attribution_next_attempt_at = now()
   where r.attribution_status = 'pending' and r.api_key_hash = import_api_key.key_hash;
  if found then
    perform app_private.schedule_attribution_retry(now());
  end if;
  return v_key;
end;
$$;
comment on function app_public.import_api_key(uuid, bytea, text, text, text, text, timestamptz) is
  'Registers a key issued by another system by its hash (sha256(convert_to(key, ''UTF8''))), for gateways that bring their own keys, and wakes the pending requests that presented it so the retry worker resolves them at once. Admins only.';

--------------------------------------------------------------------------------
-- Development mode: a real user and a real key (the spec's format), stored
-- hashed like any key, so local requests are attributed. Only the service (the
-- owner) calls it, and only with APP_ENV=development; outside it the service
-- refuses every dev_local_ key.
--------------------------------------------------------------------------------

drop function if exists app_private.get_or_create_dev_api_key();
create function app_private.get_or_create_dev_api_key() returns text
  language plpgsql volatile
  set search_path = pg_catalog, public, pg_temp
  as $$
declare
  v_user_id uuid;
  v_key text;
  v_revoked timestamptz;
  v_key_id uuid;
begin
  -- Two service processes starting at once create one user and one key.
  perform pg_advisory_xact_lock(hashtext('keytrack get_or_create_dev_api_key'));
  insert into app_public.users (email, display_name, role)
    values ('dev@localhost', 'Local development', 'user')
    on conflict ((lower(email))) do nothing;
  select u.id into v_user_id from app_public.users u where lower(u.email) = 'dev@localhost';
  v_key := 'dev_local_' || v_user_id || '_local_development';

  select k.id, k.revoked_at into v_key_id, v_revoked
    from app_private.api_key_secrets s join app_public.api_keys k on k.id = s.api_key_id
   where s.key_hash = app_public.api_key_hash(v_key);
  if v_key_id is null then
    insert into app_public.api_keys (user_id, name, prefix, last4, environment, source)
      values (v_user_id, 'development', left(v_key, 12), right(v_key, 4), 'development', 'created')
      returning id into v_key_id;
    insert into app_private.api_key_secrets (api_key_id, key_hash) values (v_key_id, app_public.api_key_hash(v_key));
  elsif v_revoked is not null then
    raise exception 'the development key % was revoked at %', left(v_key, 12) || '...', v_revoked
      using errcode = '28000', hint = 'Un-revoke it (update app_public.api_keys set revoked_at = null) or delete dev@localhost''s key and restart.';
  end if;
  return v_key;
end;
$$;
comment on function app_private.get_or_create_dev_api_key() is
  'The spec''s development key: creates, once, the user dev@localhost and the real key dev_local_{user_id}_local_development (stored hashed, environment development) and returns the key. Raises 28000 when that key was revoked. Called by the service at start-up with APP_ENV=development only.';
revoke all on function app_private.get_or_create_dev_api_key() from public;

--------------------------------------------------------------------------------
-- Backfill of historical rows: resumable runs of short batches.
--------------------------------------------------------------------------------

drop function if exists app_public.start_attribution_backfill(integer);
drop function if exists app_private.run_attribution_backfill_batch(bigint);
drop table if exists app_public.attribution_backfills;
create table app_public.attribution_backfills (
  id bigint generated always as identity primary key,
  status text not null default 'running' check (status in ('running', 'finished', 'cancelled')),
  batch_size integer not null default 1000 check (batch_size between 1 and 100000),
  upto timestamptz not null default now(),
  cursor_created_at timestamptz,
  cursor_id bigint,
  examined bigint not null default 0,
  filled bigint not null default 0,
  ambiguous bigint not null default 0,
  no_key bigint not null default 0,
  anonymized bigint not null default 0,
  batches integer not null default 0,
  started_by text not null default current_user,
  started_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  finished_at timestamptz
);
create unique index attribution_backfills_one_running_idx on app_public.attribution_backfills ((true)) where status = 'running';
alter table app_public.attribution_backfills enable row level security;
create policy select_admin on app_public.attribution_backfills for select to keytrack_admin, keytrack_analyst using (true);
comment on policy select_admin on app_public.attribution_backfills is 'Admins and analysts see backfill runs.';
grant select on app_public.attribution_backfills to keytrack_admin, keytrack_analyst;

comment on table app_public.attribution_backfills is E'@behavior -insert -update -delete\nRuns of the attribution backfill: fills api_key_id of historical rows from their key hash, or from the user''s only key alive at the time; flags rows with neither key nor user anonymous. Batched and resumable; start one with start_attribution_backfill().';
comment on column app_public.attribution_backfills.id is 'Primary key.';
comment on column app_public.attribution_backfills.status is '`running` (at most one at a time), `finished` or `cancelled`.';
comment on column app_public.attribution_backfills.batch_size is 'Rows per batch; each batch is one short transaction.';
comment on column app_public.attribution_backfills.upto is 'Only rows created before this instant (the start) are examined; newer rows are attributed at insert.';
comment on column app_public.attribution_backfills.cursor_created_at is 'Resume point: created_at of the last row examined.';
comment on column app_public.attribution_backfills.cursor_id is 'Resume point: id of the last row examined.';
comment on column app_public.attribution_backfills.examined is 'Rows without api_key_id looked at so far.';
comment on column app_public.attribution_backfills.filled is 'Rows whose api_key_id was filled (method backfill).';
comment on column app_public.attribution_backfills.ambiguous is 'Rows left NULL because their user had several keys alive at the time (reason ambiguous).';
comment on column app_public.attribution_backfills.no_key is 'Rows left NULL because their user had no key alive at the time (reason no_key).';
comment on column app_public.attribution_backfills.anonymized is 'Rows with neither key nor user flagged is_anonymous (as the spec''s migration did).';
comment on column app_public.attribution_backfills.batches is 'Batches run so far.';
comment on column app_public.attribution_backfills.started_by is 'The database role that started the run.';
comment on column app_public.attribution_backfills.started_at is 'When the run started.';
comment on column app_public.attribution_backfills.updated_at is 'When the last batch ran.';
comment on column app_public.attribution_backfills.finished_at is 'When the run finished or was cancelled.';

create function app_public.start_attribution_backfill(batch_size integer default 1000) returns app_public.attribution_backfills
  language plpgsql volatile security definer
  set search_path = pg_catalog, public, pg_temp
  as $$
declare
  v_run app_public.attribution_backfills;
begin
  if not app_private.is_admin() then
    raise exception 'only admins may start a backfill' using errcode = '42501';
  end if;
  if start_attribution_backfill.batch_size is null or start_attribution_backfill.batch_size not between 1 and 100000 then
    raise exception 'batch_size must be between 1 and 100000, got %', start_attribution_backfill.batch_size using errcode = '22023';
  end if;
  perform pg_advisory_xact_lock(hashtext('keytrack attribution backfill'));
  -- Resume the running one rather than start a second.
  select * into v_run from app_public.attribution_backfills b where b.status = 'running';
  if not found then
    insert into app_public.attribution_backfills (batch_size) values (start_attribution_backfill.batch_size)
      returning * into v_run;
  end if;
  perform graphile_worker.add_job('attribution_backfills__run_batch', json_build_object('id', v_run.id),
    job_key := 'attribution_backfills__run_batch', max_attempts := 25);
  return v_run;
end;
$$;
comment on function app_public.start_attribution_backfill(integer) is
  'Starts (or resumes, if one is running) the attribution backfill and queues it for the worker, which runs it batch by batch; `npm run backfill` runs the batches itself with a progress bar. Returns the run. Admins only.';
revoke all on function app_public.start_attribution_backfill(integer) from public;
grant execute on function app_public.start_attribution_backfill(integer) to keytrack_admin;

create function app_private.run_attribution_backfill_batch(backfill_id bigint) returns app_public.attribution_backfills
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
    select r.id, r.created_at, r.api_key_hash, r.user_id, r.is_anonymous
      from app_public.chat_completion_requests r
     where r.api_key_id is null
       and r.created_at < v_run.upto
       and (r.created_at, r.id) > (v_from_created_at, v_from_id)
     order by r.created_at, r.id
     limit v_run.batch_size
     for update
  ), decided as (
    select b.id, b.created_at, b.is_anonymous as was_anonymous,
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
    returning d.decision, d.was_anonymous, r.created_at, r.id
  )
  select count(*),
         count(*) filter (where decision in ('hash', 'only_key')),
         count(*) filter (where decision = 'ambiguous'),
         count(*) filter (where decision = 'no_key'),
         count(*) filter (where decision = 'anonymous' and not was_anonymous),
         (array_agg(created_at order by created_at desc, id desc))[1],
         (array_agg(id order by created_at desc, id desc))[1]
    into v_examined, v_filled, v_ambiguous, v_no_key, v_anonymized, v_last_created_at, v_last_id
    from updated;

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
  'Runs one batch of an attribution backfill (one short transaction): the next batch_size rows without api_key_id created before the run started, in (created_at, id) order from the saved cursor. Fills api_key_id from the key hash, else from the user''s only key alive at the request''s time (method backfill); leaves ambiguous rows NULL (reason ambiguous) and rows whose user had no key (reason no_key); flags rows with neither key nor user anonymous. Resumable; finishes the run on a short batch.';
revoke all on function app_private.run_attribution_backfill_batch(bigint) from public;
