--! Previous: sha1:a165ea3f0825a2a50eade21d295351781407ed67
--! Hash: sha1:7d212cf1728aee11174849fd075880352c734018
--! Message: Key changes announced to key caches; imports lock no ledger rows

--! split: 1-key-changes.sql
--------------------------------------------------------------------------------
-- Key changes announced to every keytrack process (NOTIFY keytrack_key_changes),
-- so their caches of key lookups drop a revoked key at once instead of serving
-- it until the cache's TTL runs out (server/auth/keyChanges.ts listens).
-- Payload: {"api_key_id": ...} or {"user_id": ...}.
--------------------------------------------------------------------------------

drop trigger if exists _900_notify_key_change on app_public.api_keys;
drop trigger if exists _900_notify_user_change on app_public.users;
drop function if exists app_private.tg_api_keys__notify_change();
drop function if exists app_private.tg_users__notify_change();

create function app_private.tg_api_keys__notify_change() returns trigger
  language plpgsql security definer
  set search_path = pg_catalog, public, pg_temp
  as $$
begin
  perform pg_notify('keytrack_key_changes', json_build_object('api_key_id', new.id)::text);
  return null;
end;
$$;
comment on function app_private.tg_api_keys__notify_change() is
  'Trigger function (AFTER UPDATE on api_keys, when the revocation, expiry or owner changes): announces the key''s id on the channel keytrack_key_changes, so every keytrack process drops its cached lookup of that key. Delivered at commit, only if the transaction commits.';
revoke all on function app_private.tg_api_keys__notify_change() from public;

create trigger _900_notify_key_change after update on app_public.api_keys
  for each row
  when (old.revoked_at is distinct from new.revoked_at
        or old.expires_at is distinct from new.expires_at
        or old.user_id is distinct from new.user_id)
  execute function app_private.tg_api_keys__notify_change();
comment on trigger _900_notify_key_change on app_public.api_keys is
  'Announces revocations, expiry changes and owner changes to keytrack''s key caches (channel keytrack_key_changes).';

create function app_private.tg_users__notify_change() returns trigger
  language plpgsql security definer
  set search_path = pg_catalog, public, pg_temp
  as $$
begin
  perform pg_notify('keytrack_key_changes', json_build_object('user_id', old.id)::text);
  return null;
end;
$$;
comment on function app_private.tg_users__notify_change() is
  'Trigger function (AFTER UPDATE OF role or DELETE on users): announces the user''s id on the channel keytrack_key_changes, so every keytrack process drops its cached lookups of that user''s keys (their role decides admin rights).';
revoke all on function app_private.tg_users__notify_change() from public;

create trigger _900_notify_user_change after update of role or delete on app_public.users
  for each row
  execute function app_private.tg_users__notify_change();
comment on trigger _900_notify_user_change on app_public.users is
  'Announces role changes and deletions to keytrack''s key caches (channel keytrack_key_changes).';

--! split: 2-import-without-deadlocks.sql
--------------------------------------------------------------------------------
-- Importing a key never locks ledger rows. It used to set
-- attribution_next_attempt_at on the pending rows that presented the key, an
-- UPDATE that waited on rows held by a backfill batch while that batch waited
-- on rows the import held: "deadlock detected" in the admin's import. Now the
-- import only notes the hash in app_private.attribution_wakes and wakes the
-- retry worker, whose batches take the woken rows first (FOR UPDATE SKIP
-- LOCKED, so they never wait on a row) and drop the note once no pending row
-- presents the hash.
--------------------------------------------------------------------------------

create table if not exists app_private.attribution_wakes (
  key_hash bytea primary key check (octet_length(key_hash) = 32),
  woken_at timestamptz not null default now()
);
alter table app_private.attribution_wakes enable row level security;
comment on table app_private.attribution_wakes is
  'Hashes of keys imported while pending rows presented them: the retry worker resolves those rows first, whatever their next attempt time, then removes the hash. Written by import_api_key(), read and emptied by resolve_pending_attributions().';
comment on column app_private.attribution_wakes.key_hash is 'sha256 of the imported key, as chat_completion_requests.api_key_hash.';
comment on column app_private.attribution_wakes.woken_at is 'When the key was imported.';

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

  -- Reads only (no row lock): the worker resolves the rows.
  if exists (select 1 from app_public.chat_completion_requests r
              where r.attribution_status = 'pending' and r.api_key_hash = import_api_key.key_hash) then
    insert into app_private.attribution_wakes (key_hash) values (import_api_key.key_hash)
      on conflict on constraint attribution_wakes_pkey do nothing;
    perform app_private.schedule_attribution_retry(now());
  end if;
  return v_key;
end;
$$;
comment on function app_public.import_api_key(uuid, bytea, text, text, text, text, timestamptz) is
  'Registers a key issued by another system by its hash (sha256(convert_to(key, ''UTF8''))), for gateways that bring their own keys. When pending requests presented it, notes the hash in app_private.attribution_wakes and wakes the retry worker, which resolves them at once; it locks no ledger row, so it never deadlocks with the worker or a backfill. Admins only.';

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

  with woken as (
    -- Rows whose key was imported since they became pending, due now whatever their next attempt time.
    select r.id, r.created_at
      from app_private.attribution_wakes w
      join app_public.chat_completion_requests r
        on r.api_key_hash = w.key_hash and r.attribution_status = 'pending'
     limit batch_size
     for update of r skip locked
  ), scheduled as (
    select r.id, r.created_at
      from app_public.chat_completion_requests r
     where r.attribution_status = 'pending' and r.attribution_next_attempt_at <= as_of
     order by r.attribution_next_attempt_at
     limit batch_size
     for update skip locked
  ), due as (
    select distinct d.id, d.created_at
      from (select * from woken union all select * from scheduled) d
     limit batch_size
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

  -- A woken hash is done once no pending row presents it (rows another worker holds keep it).
  delete from app_private.attribution_wakes w
   where not exists (select 1 from app_public.chat_completion_requests r
                      where r.api_key_hash = w.key_hash and r.attribution_status = 'pending');

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
comment on function app_private.resolve_pending_attributions(integer, integer, interval, interval, timestamptz) is
  'The retry worker''s body: takes up to batch_size pending rows, first those whose key was imported since (app_private.attribution_wakes), then those due by as_of (FOR UPDATE SKIP LOCKED: workers run in parallel and never wait on a row), and looks their key hash up again: found -> resolved (method retry); not found -> pending again after base_delay * 2^(attempts-1) (capped at max_delay), or failed (reason not_found) at max_attempts. Counts the outcomes in app_private.attribution_events (one upsert per batch), removes the woken hashes that no pending row presents any more, and reschedules the worker (at once while woken rows remain). Idempotent.';
