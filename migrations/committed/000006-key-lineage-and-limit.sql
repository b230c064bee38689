--! Previous: sha1:7d212cf1728aee11174849fd075880352c734018
--! Hash: sha1:b379377f2493792ab8ef47a5c34c03070ded835c
--! Message: Keys made with keys are revoked with them; users hold a bounded number of live keys

--! split: 1-current.sql
--------------------------------------------------------------------------------
-- Keys made with keys: a leaked key must not keep its owner's access alive
-- through keys it made. A key created by a caller authenticated with an API key
-- records that key (created_by_api_key_id); revoking a key revokes, in the same
-- statement, every live key made with it, and the keys made with those. Users
-- (not admins) may hold at most keytrack.max_live_keys_per_user live keys
-- (a setting the service passes with each request; default 20): one request
-- with 100 aliased createApiKey mutations no longer makes 100 keys.
--------------------------------------------------------------------------------

alter table app_public.api_keys
  add column if not exists created_by_api_key_id uuid references app_public.api_keys (id) on delete restrict;
comment on column app_public.api_keys.created_by_api_key_id is
  'The API key its creator authenticated with, when it was created by a caller using a key (not the admin token, not SQL): revoking that key revokes this one too.';
create index if not exists api_keys_created_by_api_key_id_idx on app_public.api_keys (created_by_api_key_id);

create or replace function app_public.create_api_key(
  user_id uuid,
  name text default 'default',
  environment text default 'live',
  expires_at timestamptz default null
) returns app_public.created_api_key
  language plpgsql volatile security definer
  set search_path = pg_catalog, public, pg_temp
  as $$
declare
  v_secret text;
  v_key app_public.api_keys;
  v_result app_public.created_api_key;
  v_creator uuid := nullif(current_setting('keytrack.api_key_id', true), '')::uuid;
  v_limit integer := coalesce(nullif(current_setting('keytrack.max_live_keys_per_user', true), '')::integer, 20);
  v_live integer;
begin
  if not app_private.is_admin() and create_api_key.user_id is distinct from app_public.current_user_id() then
    raise exception 'only admins may create keys for other users' using errcode = '42501';
  end if;
  if create_api_key.environment not in ('live', 'test') then
    raise exception 'environment must be live or test, got %', create_api_key.environment using errcode = '22023';
  end if;
  -- The user's row lock serialises concurrent creations, so the limit holds.
  perform 1 from app_public.users u where u.id = create_api_key.user_id for update;
  if not found then
    raise exception 'user % does not exist', create_api_key.user_id using errcode = '23503';
  end if;
  if not app_private.is_admin() then
    select count(*) into v_live from app_public.api_keys k
     where k.user_id = create_api_key.user_id and k.revoked_at is null and (k.expires_at is null or k.expires_at > now());
    if v_live >= v_limit then
      raise exception 'a user may have at most % live API keys; revoke one first', v_limit
        using errcode = '54000', hint = 'Admins may create more; the limit is the MAX_LIVE_KEYS_PER_USER setting.';
    end if;
  end if;
  -- kt_<env>_ and 64 hex digits from two random UUIDs (244 random bits).
  v_secret := 'kt_' || create_api_key.environment || '_'
    || replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '');
  insert into app_public.api_keys (user_id, name, prefix, last4, environment, source, expires_at, created_by_api_key_id)
    values (create_api_key.user_id, coalesce(create_api_key.name, 'default'),
            left(v_secret, 12), right(v_secret, 4), create_api_key.environment, 'created', create_api_key.expires_at, v_creator)
    returning * into v_key;
  insert into app_private.api_key_secrets (api_key_id, key_hash)
    values (v_key.id, app_public.api_key_hash(v_secret));
  v_result := row(v_key.id, v_key.user_id, v_key.name, v_key.prefix, v_key.environment, v_key.expires_at, v_secret);
  return v_result;
end;
$$;
comment on function app_public.create_api_key(uuid, text, text, timestamptz) is
  'Creates an API key for a user and returns it with its secret, once (kt_live_... or kt_test_...). Admins for anyone; a user for themselves, up to keytrack.max_live_keys_per_user live keys (SQLSTATE 54000 past it). A key created by a caller authenticated with a key records it in created_by_api_key_id, and is revoked with it.';

create or replace function app_public.revoke_api_key(api_key_id uuid) returns app_public.api_keys
  language plpgsql volatile security definer
  set search_path = pg_catalog, public, pg_temp
  as $$
declare
  v_key app_public.api_keys;
begin
  select * into v_key from app_public.api_keys k where k.id = revoke_api_key.api_key_id for update;
  if not found or not (app_private.is_admin() or v_key.user_id = app_public.current_user_id()) then
    raise exception 'api key % not found', revoke_api_key.api_key_id using errcode = 'P0002';
  end if;
  -- The key and, transitively, every live key made with it.
  with recursive made(id) as (
    select revoke_api_key.api_key_id
    union
    select k.id from app_public.api_keys k join made m on k.created_by_api_key_id = m.id
  )
  update app_public.api_keys k set revoked_at = coalesce(k.revoked_at, now())
    from made m
   where k.id = m.id and (k.id = revoke_api_key.api_key_id or k.revoked_at is null);
  select * into v_key from app_public.api_keys k where k.id = revoke_api_key.api_key_id;
  return v_key;
end;
$$;
comment on function app_public.revoke_api_key(uuid) is
  'Revokes a key, and every key made with it (created_by_api_key_id, transitively): they stop authenticating at once, but the rows stay so requests they made stay attributed. Revoking twice keeps the first revocation time. Admins, or the key''s owner.';
