--! Previous: -
--! Hash: sha1:f3d9c590a8b2fc390f31d25dfb73bec1642a516a
--! Message: ledger

--------------------------------------------------------------------------------
-- keytrack 000001: the request ledger.
--
-- Users, their API keys (hashed secrets only), and chat_completion_requests: one
-- row per request, attributed in SQL by a BEFORE INSERT trigger from the presented
-- key's SHA-256 hash, so that every writer (the service, a gateway in another
-- language, a DBA) gets the same attribution.
--------------------------------------------------------------------------------

--------------------------------------------------------------------------------
-- Schemas. app_public is what GraphQL and DBAs see; app_private holds secrets and
-- internals reached only through security definer functions; app_partitions holds
-- the partitions of chat_completion_requests, which nobody is granted anything on
-- (row-level security lives on the parent only).
--------------------------------------------------------------------------------

drop schema if exists app_partitions cascade;
drop schema if exists app_private cascade;
drop schema if exists app_public cascade;

create schema app_public;
create schema app_private;
create schema app_partitions;

comment on schema app_public is 'keytrack: the request ledger as seen by GraphQL, admins and DBAs (users, api_keys, chat_completion_requests, quality views).';
comment on schema app_private is 'keytrack internals: hashed key secrets, request id guard, helper functions. Not exposed; reached through security definer functions.';
comment on schema app_partitions is 'keytrack: the time partitions of app_public.chat_completion_requests. Never granted to anyone: query the parent table, whose row-level security applies.';

grant usage on schema app_public to keytrack_authenticator, keytrack_admin, keytrack_user, keytrack_analyst;
grant usage on schema app_private to keytrack_authenticator;

-- Functions are executable by PUBLIC by default: revoke that for everything this
-- owner creates from now on; each function is granted to the roles that need it.
alter default privileges revoke all on functions from public;

--------------------------------------------------------------------------------
-- Who is asking. The service sets these per request (pgSettings); in psql they
-- are unset and the helpers return NULL.
--------------------------------------------------------------------------------

create function app_public.current_user_id() returns uuid
  language sql stable parallel safe
  as $$ select nullif(current_setting('keytrack.user_id', true), '')::uuid $$;
comment on function app_public.current_user_id() is
  E'@behavior -queryField\nThe id of the user whose API key authenticated this request (the keytrack.user_id setting), or NULL.';

-- Inside a security definer function current_user is the definer, so the caller
-- is read from the role setting (what PostGraphile's pgSettings set) or, when no
-- role was set, the session user. USAGE (not MEMBER): the NOINHERIT
-- authenticator is a member of keytrack_admin but is not an admin until it SETs it.
create function app_private.is_admin() returns boolean
  language sql stable parallel safe
  as $$
  select pg_has_role(
    case when current_setting('role') = 'none' then session_user
         else current_setting('role')::name end,
    'keytrack_admin', 'USAGE')
$$;
comment on function app_private.is_admin() is
  'True when the calling role (the role setting, or the session user when none is set) has the privileges of keytrack_admin: the service maps ADMIN_API_KEY and admin users to it; the owner and superusers count too. Correct inside security definer functions.';

grant execute on function app_public.current_user_id() to keytrack_admin, keytrack_user, keytrack_analyst;

--------------------------------------------------------------------------------
-- The key hash contract: any writer in any language computes
-- sha256(convert_to(key, 'UTF8')) and presents that, never the key.
--------------------------------------------------------------------------------

create function app_public.api_key_hash(key text) returns bytea
  language sql immutable strict parallel safe
  as $$ select sha256(convert_to(key, 'UTF8')) $$;
comment on function app_public.api_key_hash(text) is
  E'@behavior -queryField\nThe hash keytrack stores and matches for an API key: sha256(convert_to(key, ''UTF8'')) as bytea. Writers present this in chat_completion_requests.api_key_hash; the key itself is stored nowhere.';
grant execute on function app_public.api_key_hash(text) to keytrack_admin, keytrack_user, keytrack_analyst;

--------------------------------------------------------------------------------
-- Users.
--------------------------------------------------------------------------------

create table app_public.users (
  id uuid primary key default gen_random_uuid(),
  email text not null check (email ~ '^[^@\s]+@[^@\s]+$' and length(email) <= 320),
  display_name text check (length(display_name) <= 200),
  role text not null default 'user' check (role in ('user', 'admin')),
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);
create unique index users_email_key on app_public.users (lower(email));
alter table app_public.users enable row level security;

comment on table app_public.users is 'People (or services) that own API keys. Requests are attributed to a user through their key.';
comment on column app_public.users.id is 'Primary key.';
comment on column app_public.users.email is 'Email address, unique regardless of case.';
comment on column app_public.users.display_name is 'Name shown to admins.';
comment on column app_public.users.role is '`user` or `admin`. An admin user''s API key grants admin access to GraphQL and the monitoring endpoints.';
comment on column app_public.users.created_at is 'When the user was created.';
comment on column app_public.users.updated_at is 'When the user was last changed.';

create function app_private.tg__set_updated_at() returns trigger
  language plpgsql
  as $$
begin
  new.updated_at := greatest(now(), old.updated_at + interval '1 microsecond');
  return new;
end;
$$;
comment on function app_private.tg__set_updated_at() is 'Trigger function: keeps updated_at strictly increasing on every update.';

create trigger _100_set_updated_at before update on app_public.users
  for each row execute function app_private.tg__set_updated_at();
comment on trigger _100_set_updated_at on app_public.users is 'Maintains users.updated_at.';

create policy select_admin on app_public.users for select to keytrack_admin, keytrack_analyst using (true);
create policy insert_admin on app_public.users for insert to keytrack_admin with check (true);
create policy update_admin on app_public.users for update to keytrack_admin using (true);
create policy select_self on app_public.users for select to keytrack_user using (id = app_public.current_user_id());
comment on policy select_admin on app_public.users is 'Admins and analysts see every user.';
comment on policy insert_admin on app_public.users is 'Admins create users.';
comment on policy update_admin on app_public.users is 'Admins change users.';
comment on policy select_self on app_public.users is 'A user sees only themselves.';

grant select on app_public.users to keytrack_admin, keytrack_user, keytrack_analyst;
grant insert (email, display_name, role) on app_public.users to keytrack_admin;
grant update (email, display_name, role) on app_public.users to keytrack_admin;

--------------------------------------------------------------------------------
-- API keys. Never hard-deleted: revoking keeps the row, so history stays
-- attributed. The secret is never stored; app_private.api_key_secrets holds its
-- SHA-256.
--------------------------------------------------------------------------------

create table app_public.api_keys (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references app_public.users (id) on delete restrict,
  name text not null default 'default' check (length(name) between 1 and 200),
  prefix text check (length(prefix) <= 32),
  last4 text check (length(last4) <= 4),
  environment text not null default 'live' check (environment in ('live', 'test', 'development')),
  source text not null default 'created' check (source in ('created', 'imported')),
  created_at timestamptz not null default now(),
  expires_at timestamptz,
  revoked_at timestamptz,
  last_used_at timestamptz,
  check (expires_at is null or expires_at > created_at)
);
create index api_keys_user_id_idx on app_public.api_keys (user_id);
alter table app_public.api_keys enable row level security;

comment on table app_public.api_keys is E'@behavior -insert -delete\nAPI keys. Created with create_api_key() (the secret is shown once) or registered by hash with import_api_key(); revoked with revoke_api_key(), never deleted, so requests stay attributed.';
comment on column app_public.api_keys.id is 'Primary key; chat_completion_requests.api_key_id points here.';
comment on column app_public.api_keys.user_id is 'The user who owns the key; requests made with it are attributed to them.';
comment on column app_public.api_keys.name is 'A label chosen by the owner.';
comment on column app_public.api_keys.prefix is 'The first characters of the key, for recognising it (e.g. kt_live_1a2b). NULL for imported keys registered without one.';
comment on column app_public.api_keys.last4 is 'The last four characters of the key, for recognising it.';
comment on column app_public.api_keys.environment is '`live`, `test` or `development` (the dev key of APP_ENV=development).';
comment on column app_public.api_keys.source is '`created` by keytrack (create_api_key) or `imported` by hash from another system (import_api_key).';
comment on column app_public.api_keys.created_at is 'When the key was created or imported.';
comment on column app_public.api_keys.expires_at is 'After this instant the key no longer authenticates. NULL: never expires.';
comment on column app_public.api_keys.revoked_at is 'When the key was revoked; it no longer authenticates, but requests it made stay attributed to it.';
comment on column app_public.api_keys.last_used_at is 'When the key last authenticated a request through the service (updated at most once a minute).';

create policy select_admin on app_public.api_keys for select to keytrack_admin, keytrack_analyst using (true);
create policy update_admin on app_public.api_keys for update to keytrack_admin using (true);
create policy select_own on app_public.api_keys for select to keytrack_user using (user_id = app_public.current_user_id());
comment on policy select_admin on app_public.api_keys is 'Admins and analysts see every key.';
comment on policy update_admin on app_public.api_keys is 'Admins rename keys and change their expiry.';
comment on policy select_own on app_public.api_keys is 'A user sees only their own keys.';

grant select on app_public.api_keys to keytrack_admin, keytrack_user, keytrack_analyst;
grant update (name, expires_at) on app_public.api_keys to keytrack_admin;

create table app_private.api_key_secrets (
  api_key_id uuid primary key references app_public.api_keys (id) on delete restrict,
  key_hash bytea not null unique check (octet_length(key_hash) = 32)
);
alter table app_private.api_key_secrets enable row level security;
comment on table app_private.api_key_secrets is 'The SHA-256 of each API key (sha256(convert_to(key, ''UTF8''))). The key itself is stored nowhere. Read only by security definer functions.';
comment on column app_private.api_key_secrets.api_key_id is 'The key this hash belongs to (also the primary key, so it is indexed).';
comment on column app_private.api_key_secrets.key_hash is 'SHA-256 of the key''s UTF-8 bytes; unique, so a hash names at most one key.';

--------------------------------------------------------------------------------
-- Key management: the SQL contract used by GraphQL, gateways and DBAs.
--------------------------------------------------------------------------------

create type app_public.created_api_key as (
  api_key_id uuid,
  user_id uuid,
  name text,
  prefix text,
  environment text,
  expires_at timestamptz,
  secret text
);
comment on type app_public.created_api_key is 'A newly created API key, with its secret: the only time the secret is ever shown.';
comment on column app_public.created_api_key.api_key_id is 'The new key''s id.';
comment on column app_public.created_api_key.user_id is 'The owner.';
comment on column app_public.created_api_key.name is 'The key''s label.';
comment on column app_public.created_api_key.prefix is 'The key''s first characters, stored for display.';
comment on column app_public.created_api_key.environment is '`live`, `test` or `development`.';
comment on column app_public.created_api_key.expires_at is 'When the key expires, or NULL.';
comment on column app_public.created_api_key.secret is 'The API key itself. Shown once: keytrack stores only its SHA-256.';

create function app_public.create_api_key(
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
begin
  if not app_private.is_admin() and create_api_key.user_id is distinct from app_public.current_user_id() then
    raise exception 'only admins may create keys for other users' using errcode = '42501';
  end if;
  if create_api_key.environment not in ('live', 'test') then
    raise exception 'environment must be live or test, got %', create_api_key.environment using errcode = '22023';
  end if;
  if not exists (select 1 from app_public.users u where u.id = create_api_key.user_id) then
    raise exception 'user % does not exist', create_api_key.user_id using errcode = '23503';
  end if;
  -- kt_<env>_ and 64 hex digits from two random UUIDs (244 random bits).
  v_secret := 'kt_' || create_api_key.environment || '_'
    || replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '');
  insert into app_public.api_keys (user_id, name, prefix, last4, environment, source, expires_at)
    values (create_api_key.user_id, coalesce(create_api_key.name, 'default'),
            left(v_secret, 12), right(v_secret, 4), create_api_key.environment, 'created', create_api_key.expires_at)
    returning * into v_key;
  insert into app_private.api_key_secrets (api_key_id, key_hash)
    values (v_key.id, app_public.api_key_hash(v_secret));
  v_result := row(v_key.id, v_key.user_id, v_key.name, v_key.prefix, v_key.environment, v_key.expires_at, v_secret);
  return v_result;
end;
$$;
comment on function app_public.create_api_key(uuid, text, text, timestamptz) is
  'Creates an API key for a user and returns it with its secret, once (kt_live_... or kt_test_...). Only the SHA-256 is stored. Admins may create keys for anyone, a user only for themselves.';

create function app_public.import_api_key(
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
  return v_key;
end;
$$;
comment on function app_public.import_api_key(uuid, bytea, text, text, text, text, timestamptz) is
  'Registers a key issued by another system by its hash (sha256(convert_to(key, ''UTF8''))), for gateways that bring their own keys. Admins only.';

create function app_public.revoke_api_key(api_key_id uuid) returns app_public.api_keys
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
  update app_public.api_keys k set revoked_at = coalesce(k.revoked_at, now())
    where k.id = revoke_api_key.api_key_id
    returning * into v_key;
  return v_key;
end;
$$;
comment on function app_public.revoke_api_key(uuid) is
  'Revokes a key: it stops authenticating at once, but the row stays so requests it made stay attributed. Revoking twice keeps the first revocation time. Admins, or the key''s owner.';

create type app_private.authenticated_api_key as (
  api_key_id uuid,
  user_id uuid,
  user_role text,
  environment text,
  is_usable boolean,
  reason text
);
comment on type app_private.authenticated_api_key is 'What authenticate_api_key() knows about a presented key.';
comment on column app_private.authenticated_api_key.api_key_id is 'The key, or NULL when no key has this hash.';
comment on column app_private.authenticated_api_key.user_id is 'The key''s owner.';
comment on column app_private.authenticated_api_key.user_role is 'The owner''s role: `user` or `admin`.';
comment on column app_private.authenticated_api_key.environment is 'The key''s environment.';
comment on column app_private.authenticated_api_key.is_usable is 'True when the key may authenticate now: not revoked, not expired.';
comment on column app_private.authenticated_api_key.reason is 'Why it may not: `not_found`, `revoked` or `expired`; NULL when usable.';

create function app_private.authenticate_api_key(key_hash bytea) returns app_private.authenticated_api_key
  language sql stable security definer
  set search_path = pg_catalog, public, pg_temp
  as $$
  select coalesce(
    (select row(
        k.id, k.user_id, u.role, k.environment,
        k.revoked_at is null and (k.expires_at is null or k.expires_at > now()),
        case when k.revoked_at is not null then 'revoked'
             when k.expires_at is not null and k.expires_at <= now() then 'expired' end
      )::app_private.authenticated_api_key
     from app_private.api_key_secrets s
     join app_public.api_keys k on k.id = s.api_key_id
     join app_public.users u on u.id = k.user_id
     where s.key_hash = authenticate_api_key.key_hash),
    row(null, null, null, null, false, 'not_found')::app_private.authenticated_api_key)
$$;
comment on function app_private.authenticate_api_key(bytea) is
  'Looks up a presented key by its hash: the key id, the user id and whether the key is usable now (not revoked, not expired), with the reason when not. Always returns one row.';

revoke all on function app_public.create_api_key(uuid, text, text, timestamptz) from public;
revoke all on function app_public.import_api_key(uuid, bytea, text, text, text, text, timestamptz) from public;
revoke all on function app_public.revoke_api_key(uuid) from public;
revoke all on function app_private.authenticate_api_key(bytea) from public;
grant execute on function app_public.create_api_key(uuid, text, text, timestamptz) to keytrack_admin, keytrack_user;
grant execute on function app_public.import_api_key(uuid, bytea, text, text, text, text, timestamptz) to keytrack_admin;
grant execute on function app_public.revoke_api_key(uuid) to keytrack_admin, keytrack_user;
grant execute on function app_private.authenticate_api_key(bytea) to keytrack_authenticator;

--------------------------------------------------------------------------------
-- The ledger. Range-partitioned by created_at (monthly, UTC) from the start, so
-- old months can be dropped and time-bounded reads touch few partitions. The
-- primary key must include the partition key: (id, created_at).
--------------------------------------------------------------------------------

create table app_public.chat_completion_requests (
  id bigint generated by default as identity,
  request_id text not null default gen_random_uuid()::text check (length(request_id) between 1 and 200),
  created_at timestamptz not null default now(),
  user_id uuid references app_public.users (id) on delete restrict,
  api_key_id uuid references app_public.api_keys (id) on delete restrict,
  is_anonymous boolean not null default false,
  model text check (length(model) <= 200),
  provider text check (length(provider) <= 200),
  input_tokens integer check (input_tokens >= 0),
  output_tokens integer check (output_tokens >= 0),
  processing_time_ms integer check (processing_time_ms >= 0),
  status text not null default 'completed' check (status in ('completed', 'failed', 'partial')),
  error_message text,
  api_key_hash bytea check (octet_length(api_key_hash) = 32),
  attribution_status text not null default 'pending'
    check (attribution_status in ('resolved', 'anonymous', 'pending', 'failed')),
  attribution_method text check (attribution_method in ('lookup', 'retry', 'backfill', 'dev')),
  attribution_reason text,
  attribution_attempts integer not null default 0 check (attribution_attempts >= 0),
  attribution_next_attempt_at timestamptz,
  attribution_error text,
  attributed_at timestamptz,
  primary key (id, created_at),
  check ((attribution_status = 'resolved') = (api_key_id is not null)),
  check (attribution_status <> 'anonymous' or (is_anonymous and api_key_id is null and user_id is null)),
  check (attribution_method is null or attribution_status = 'resolved')
) partition by range (created_at);

comment on table app_public.chat_completion_requests is E'@behavior -insert -update -delete\nThe request ledger: one row per chat request that passed the gateway, attributed to the API key and user that made it, or flagged anonymous on purpose. Insert with the key''s SHA-256 in api_key_hash (or nothing, for anonymous): a trigger resolves api_key_id and user_id, sets is_anonymous and attribution_status. Re-inserting a request_id changes nothing. Partitioned by month of created_at.';
comment on column app_public.chat_completion_requests.id is 'Row number, unique with created_at (the partition key).';
comment on column app_public.chat_completion_requests.request_id is 'The request''s id, unique across the ledger: re-inserting a request with the same request_id is ignored (idempotent re-delivery).';
comment on column app_public.chat_completion_requests.created_at is 'When the request arrived (the partition key).';
comment on column app_public.chat_completion_requests.user_id is 'The user who made the request: set from the key when the key is resolved; NULL for anonymous requests.';
comment on column app_public.chat_completion_requests.api_key_id is 'The API key that made the request. NULL when anonymous, or while the presented key is not (yet) known.';
comment on column app_public.chat_completion_requests.is_anonymous is 'True for requests made without credentials on purpose (no key, no user); these are not attribution failures.';
comment on column app_public.chat_completion_requests.model is 'The model requested.';
comment on column app_public.chat_completion_requests.provider is 'The upstream provider that served it.';
comment on column app_public.chat_completion_requests.input_tokens is 'Prompt tokens, from the provider''s usage.';
comment on column app_public.chat_completion_requests.output_tokens is 'Completion tokens, from the provider''s usage.';
comment on column app_public.chat_completion_requests.processing_time_ms is 'Time from receiving the request to the end of the response, in milliseconds.';
comment on column app_public.chat_completion_requests.status is 'Outcome of the request: `completed`, `failed` (upstream error or timeout) or `partial` (the client went away mid-stream).';
comment on column app_public.chat_completion_requests.error_message is 'Why the request failed, when it did.';
comment on column app_public.chat_completion_requests.api_key_hash is 'SHA-256 of the presented key (sha256(convert_to(key, ''UTF8''))), never the key. Kept so the row can be resolved later.';
comment on column app_public.chat_completion_requests.attribution_status is '`resolved` (api_key_id set), `anonymous` (no credentials on purpose), `pending` (a key hash was presented that matches no key yet, to be retried) or `failed` (could not be attributed; see attribution_reason).';
comment on column app_public.chat_completion_requests.attribution_method is 'How a resolved row was attributed: `lookup` (at insert), `retry` (by the retry worker), `backfill`, or `dev` (the development key).';
comment on column app_public.chat_completion_requests.attribution_reason is 'Why a row is not attributed: e.g. `no_key` (a user but no key presented), `not_found` (the key never appeared), `lookup_failed`, `dev_bypass`, `ambiguous`.';
comment on column app_public.chat_completion_requests.attribution_attempts is 'How many times the key was looked up for this row.';
comment on column app_public.chat_completion_requests.attribution_next_attempt_at is 'When a pending row is due to be looked up again.';
comment on column app_public.chat_completion_requests.attribution_error is 'The last error met while attributing this row, for diagnosis.';
comment on column app_public.chat_completion_requests.attributed_at is 'When api_key_id was set.';

-- Every foreign key is indexed; created_at serves every time-bounded read;
-- is_anonymous is the spec's index.
create index chat_completion_requests_created_at_idx on app_public.chat_completion_requests (created_at);
create index chat_completion_requests_user_id_idx on app_public.chat_completion_requests (user_id);
create index chat_completion_requests_api_key_id_idx on app_public.chat_completion_requests (api_key_id);
create index idx_chat_completion_requests_is_anonymous on app_public.chat_completion_requests (is_anonymous);
create index chat_completion_requests_pending_idx on app_public.chat_completion_requests (attribution_next_attempt_at)
  where attribution_status = 'pending';
create index chat_completion_requests_request_id_idx on app_public.chat_completion_requests (request_id);

alter table app_public.chat_completion_requests enable row level security;
create policy select_admin on app_public.chat_completion_requests for select to keytrack_admin, keytrack_analyst using (true);
create policy select_own on app_public.chat_completion_requests for select to keytrack_user using (user_id = app_public.current_user_id());
comment on policy select_admin on app_public.chat_completion_requests is 'Admins and analysts see every request.';
comment on policy select_own on app_public.chat_completion_requests is 'A user sees only the requests attributed to them.';
grant select on app_public.chat_completion_requests to keytrack_admin, keytrack_user, keytrack_analyst;

-- Idempotency. A partitioned table cannot have unique (request_id) alone, so a
-- small table keyed by request_id guards it in the same statement: the insert
-- trigger claims the request id here and skips the row when it is taken.
create table app_private.request_ids (
  request_id text primary key,
  created_at timestamptz not null
);
alter table app_private.request_ids enable row level security;
comment on table app_private.request_ids is 'One row per request_id recorded in chat_completion_requests: makes re-delivery of a request a no-op across partitions, and finds a request''s created_at (its partition) from its id.';
comment on column app_private.request_ids.request_id is 'The request''s id.';
comment on column app_private.request_ids.created_at is 'The created_at of the recorded row.';

--------------------------------------------------------------------------------
-- Partitions: monthly, UTC, in app_partitions. A default partition catches rows
-- outside every month created so far, so no insert ever fails for want of a
-- partition; create_partitions() moves such rows into their month.
--------------------------------------------------------------------------------

create function app_private.describe_partition(partition regclass, description text) returns void
  language plpgsql volatile
  set search_path = pg_catalog, public, pg_temp
  as $$
declare
  v_col record;
begin
  execute format('comment on table %s is %L', partition, description);
  for v_col in
    select a.attname, col_description(a.attrelid, a.attnum) as description
      from pg_attribute a
     where a.attrelid = 'app_public.chat_completion_requests'::regclass and a.attnum > 0 and not a.attisdropped
  loop
    execute format('comment on column %s.%I is %L', partition, v_col.attname, v_col.description);
  end loop;
end;
$$;
comment on function app_private.describe_partition(regclass, text) is
  'Comments a partition of chat_completion_requests and copies the parent''s column comments onto it, so \d+ on a partition explains itself too.';

create function app_private.create_partitions(months_ahead integer default 3) returns integer
  language plpgsql volatile
  set search_path = pg_catalog, public, pg_temp
  as $$
declare
  v_this_month date := date_trunc('month', now() at time zone 'UTC')::date;
  v_month date;
  v_lo timestamptz;
  v_hi timestamptz;
  v_name text;
  v_created integer := 0;
begin
  if months_ahead is null or months_ahead < 0 or months_ahead > 120 then
    raise exception 'months_ahead must be between 0 and 120, got %', months_ahead using errcode = '22023';
  end if;
  -- Last month to months_ahead ahead, plus every month the default partition
  -- has caught rows for.
  for v_month in
    select m::date from generate_series(v_this_month - interval '1 month',
                                        v_this_month + make_interval(months => months_ahead),
                                        interval '1 month') m
    union
    select distinct date_trunc('month', d.created_at at time zone 'UTC')::date
      from app_partitions.chat_completion_requests_default d
    order by 1
  loop
    v_name := 'chat_completion_requests_p' || to_char(v_month, 'YYYY_MM');
    if to_regclass(format('app_partitions.%I', v_name)) is null then
      v_lo := v_month::timestamp at time zone 'UTC';
      v_hi := (v_month + interval '1 month')::timestamp at time zone 'UTC';
      -- Build it detached, move the rows the default partition caught for this
      -- month, then attach (the parent's indexes and triggers follow).
      execute format('create table app_partitions.%I (like app_public.chat_completion_requests including defaults including constraints)', v_name);
      execute format($q$with moved as (delete from app_partitions.chat_completion_requests_default where created_at >= %L and created_at < %L returning *)
                       insert into app_partitions.%I select * from moved$q$, v_lo, v_hi, v_name);
      execute format('alter table app_public.chat_completion_requests attach partition app_partitions.%I for values from (%L) to (%L)', v_name, v_lo, v_hi);
      execute format('alter table app_partitions.%I enable row level security', v_name);
      perform app_private.describe_partition(format('app_partitions.%I', v_name)::regclass,
        format('Partition of app_public.chat_completion_requests for %s (UTC). Query the parent.', to_char(v_month, 'YYYY-MM')));
      v_created := v_created + 1;
    end if;
  end loop;
  return v_created;
end;
$$;
comment on function app_private.create_partitions(integer) is
  'Creates the monthly partitions of chat_completion_requests (UTC) from last month to months_ahead months ahead, and for every month whose rows the default partition caught, moving those rows into it. Idempotent; returns how many partitions it created.';

create table app_partitions.chat_completion_requests_default
  partition of app_public.chat_completion_requests default;
alter table app_partitions.chat_completion_requests_default enable row level security;
select app_private.describe_partition('app_partitions.chat_completion_requests_default',
  'Default partition of app_public.chat_completion_requests: catches rows outside every month created so far until create_partitions() moves them. Query the parent.');

select app_private.create_partitions();

--------------------------------------------------------------------------------
-- Attribution at insert. One BEFORE INSERT trigger per row, on the parent (so
-- every partition, present and future, has it):
--   1. claims the request_id (skips the row when it was already recorded);
--   2. resolves the presented key hash to api_key_id and user_id in one indexed
--      lookup: found -> resolved, even if the key was revoked since (the key made
--      the request); not found -> pending, for the retry worker;
--   3. no key hash: a known api_key_id is resolved as given; a user without a
--      key is a potential lookup failure (`failed`, reason no_key) left for
--      backfill; neither -> anonymous.
-- Writers cannot forge attribution: the status columns are always derived here.
--------------------------------------------------------------------------------

create function app_private.tg_chat_completion_requests__attribute() returns trigger
  language plpgsql
  set search_path = pg_catalog, public, pg_temp
  as $$
declare
  v_key_id uuid;
  v_user_id uuid;
  v_env text;
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
    else
      new.api_key_id := null;
      new.attribution_status := 'pending';
      new.attribution_reason := 'not_found';
      new.attribution_next_attempt_at := now();
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
    new.attribution_reason := coalesce(new.attribution_reason, 'no_key');
  else
    new.is_anonymous := true;
    new.attribution_status := 'anonymous';
  end if;
  return new;
end;
$$;
comment on function app_private.tg_chat_completion_requests__attribute() is
  'Trigger function (BEFORE INSERT on chat_completion_requests): makes request_id idempotent and attributes the row from api_key_hash (resolved, pending), api_key_id, user_id (failed: no_key) or nothing (anonymous).';

create trigger _500_attribute before insert on app_public.chat_completion_requests
  for each row execute function app_private.tg_chat_completion_requests__attribute();
comment on trigger _500_attribute on app_public.chat_completion_requests is 'Claims the request_id and attributes the row (see app_private.tg_chat_completion_requests__attribute).';

--------------------------------------------------------------------------------
-- The spec's view, same columns, same meaning, same order. security_invoker so
-- that row-level security applies to whoever reads it.
--------------------------------------------------------------------------------

create view app_public.api_key_tracking_quality with (security_invoker = true) as
select
  date_trunc('hour', created_at) as hour,
  count(*) as total_requests,
  count(api_key_id) as requests_with_api_key,
  count(*) filter (where api_key_id is null) as requests_without_api_key,
  count(*) filter (where is_anonymous = true) as anonymous_requests,
  count(*) filter (where api_key_id is null and user_id is not null) as potential_lookup_failures,
  round((count(api_key_id)::numeric / nullif(count(*), 0)) * 100, 2) as tracking_rate_percent
from app_public.chat_completion_requests
where created_at >= now() - interval '7 days'
group by date_trunc('hour', created_at)
order by hour desc;

comment on view app_public.api_key_tracking_quality is E'@primaryKey hour\n@behavior -insert -update -delete\nAPI key tracking quality per hour over the last 7 days (the spec''s view): how many requests carried an API key id, how many were anonymous, how many name a user but no key.';
comment on column app_public.api_key_tracking_quality.hour is 'The hour (date_trunc(''hour'', created_at), in the session''s time zone).';
comment on column app_public.api_key_tracking_quality.total_requests is 'Requests in the hour.';
comment on column app_public.api_key_tracking_quality.requests_with_api_key is 'Requests with api_key_id set.';
comment on column app_public.api_key_tracking_quality.requests_without_api_key is 'Requests with api_key_id NULL (anonymous, pending or failed).';
comment on column app_public.api_key_tracking_quality.anonymous_requests is 'Requests flagged is_anonymous.';
comment on column app_public.api_key_tracking_quality.potential_lookup_failures is 'Requests naming a user but no API key: attribution failures to investigate.';
comment on column app_public.api_key_tracking_quality.tracking_rate_percent is 'requests_with_api_key / total_requests * 100, rounded to 2 places.';

grant select on app_public.api_key_tracking_quality to keytrack_admin, keytrack_user, keytrack_analyst;
