-- keytrack schema dump: written by scripts/dump-schema.mjs after migrating; do not edit.
-- Reviewable as a diff; tests check that a fresh migrate reproduces it.

-- schema app_partitions
--   acl: (default)
--   comment: keytrack: the time partitions of app_public.chat_completion_requests. Never granted to anyone: query the parent table, whose row-level security applies.

-- schema app_private
--   acl: keytrack_authenticator=U/keytrack_owner, keytrack_owner=UC/keytrack_owner
--   comment: keytrack internals: hashed key secrets, request id guard, helper functions. Not exposed; reached through security definer functions.

-- schema app_public
--   acl: keytrack_admin=U/keytrack_owner, keytrack_analyst=U/keytrack_owner, keytrack_authenticator=U/keytrack_owner, keytrack_owner=UC/keytrack_owner, keytrack_user=U/keytrack_owner
--   comment: keytrack: the request ledger as seen by GraphQL, admins and DBAs (users, api_keys, chat_completion_requests, quality views).

-- default privileges in (all) for f: keytrack_owner=X/keytrack_owner

create type app_private.attribution_metrics as (
  lookup_attempts_success bigint,  -- api_key_lookup_attempts_total{status="success"}: lookups that found the key (at insert, by the retry worker, by the backfill from a hash).
  lookup_attempts_retry bigint,  -- api_key_lookup_attempts_total{status="retry"}: lookups that found no key and left the row pending for another try (at insert, including a writer-declared lookup_failed, and by the retry worker).
  lookup_attempts_failed bigint,  -- api_key_lookup_attempts_total{status="failed"}: lookups that found no key and gave up (the retry limit, or the backfill meeting an unknown hash).
  tracking_success_authenticated bigint,  -- api_key_tracking_success_total{request_type="authenticated"}: rows resolved at insert by a (non-development) key.
  tracking_success_retry bigint,  -- api_key_tracking_success_total{request_type="retry"}: rows resolved by the retry worker.
  tracking_success_backfill bigint,  -- api_key_tracking_success_total{request_type="backfill"}: rows resolved by the backfill.
  tracking_success_dev bigint,  -- api_key_tracking_success_total{request_type="dev"}: rows resolved at insert by the development key.
  tracking_failures_anonymous bigint,  -- api_key_tracking_failures_total{reason="anonymous"}: rows recorded anonymous, or flagged anonymous by the backfill.
  tracking_failures_not_found bigint,  -- api_key_tracking_failures_total{reason="not_found"}: pending rows the retry worker gave up on.
  tracking_failures_lookup_failed bigint,  -- api_key_tracking_failures_total{reason="lookup_failed"}: rows whose writer declared its key lookup failed and whose key was not found at insert either.
  tracking_failures_dev_bypass bigint,  -- api_key_tracking_failures_total{reason="dev_bypass"}: rows recorded with the development bypass key.
  tracking_failures_no_key bigint,  -- api_key_tracking_failures_total{reason="no_key"}: rows naming a user but no key at insert, or newly found keyless by the backfill.
  tracking_failures_ambiguous bigint,  -- api_key_tracking_failures_total{reason="ambiguous"}: rows the backfill newly found ambiguous (several keys alive).
  pending_attributions bigint,  -- Gauge: rows pending attribution now.
  failed_attributions bigint,  -- Gauge: rows whose attribution failed, now.
  authenticated_tracking_rate double precision  -- Gauge api_key_tracking_rate (0..1): of the non-anonymous requests of the last 60 minutes, the share with api_key_id set; NULL without such requests.
);
-- comment: The attribution counters and gauges behind /metrics (see app_private.attribution_metrics()).

create type app_private.attribution_retry_result as (
  examined integer,  -- Due pending rows looked at.
  resolved integer,  -- Rows whose key was found: now resolved (method retry).
  failed integer,  -- Rows that reached the attempt limit: now failed (reason not_found).
  still_pending integer,  -- Rows left pending, due again later.
  next_attempt_at timestamp with time zone  -- When the earliest pending row is due next (NULL: none pending).
);
-- comment: What one run of resolve_pending_attributions() did.

create type app_private.attribution_rollup_refresh_result as (
  settled_through timestamp with time zone,  -- Rollups are settled for every hour before this (NULL: another refresh was running, nothing done).
  settled_hours integer,  -- Hours newly settled by this run (0 when it settled from the beginning of time: see recomputed_hours).
  recomputed_hours integer,  -- Dirty hours recomputed by this run.
  waiting_since timestamp with time zone  -- When the fence still waited for was taken (NULL: none); old means a long-running transaction holds settlement back.
);
-- comment: What one run of refresh_attribution_rollups() did.

create type app_private.authenticated_api_key as (
  api_key_id uuid,  -- The key, or NULL when no key has this hash.
  user_id uuid,  -- The key's owner.
  user_role text,  -- The owner's role: `user` or `admin`.
  environment text,  -- The key's environment.
  is_usable boolean,  -- True when the key may authenticate now: not revoked, not expired.
  reason text  -- Why it may not: `not_found`, `revoked` or `expired`; NULL when usable.
);
-- comment: What authenticate_api_key() knows about a presented key.

create type app_public.api_key_import_result as (
  position integer,  -- The entry's position in the input array, from 1.
  key_hash_hex text,  -- The entry's key hash as given (hex), when it had one.
  outcome text,  -- imported, already_present (a key with this hash is registered: nothing changed) or refused (see reason).
  reason text,  -- Why the entry was refused, or for already_present whether the registered key has the same user.
  api_key_id uuid  -- The key's id (new, or the one already registered).
);
-- comment: One entry of import_api_keys(): its position in the input (from 1), its hash, the outcome (imported, already_present, refused), why, and the key's id.

create type app_public.api_key_tracking_quality_report as (
  hours integer,  -- The window, in hours.
  start_time timestamp with time zone,  -- The window's start: end_time minus hours.
  end_time timestamp with time zone,  -- The window's end: now() (rows created in [start_time, end_time] count).
  total_requests bigint,  -- Requests in the window.
  requests_with_api_key bigint,  -- Requests with api_key_id set.
  requests_without_api_key bigint,  -- Requests with api_key_id NULL.
  tracking_rate_percent numeric,  -- requests_with_api_key / total_requests * 100, rounded to 2 places; 0 without requests (as the spec's endpoint).
  null_key_with_valid_user bigint,  -- Requests naming a user but no key (potential lookup failures).
  both_null_likely_anonymous bigint,  -- Requests with neither key nor user: anonymous, or a key hash not known (yet).
  null_key_with_valid_user_percent numeric,  -- null_key_with_valid_user / total_requests * 100, rounded to 2 places; 0 without requests.
  both_null_percent numeric,  -- both_null_likely_anonymous / total_requests * 100, rounded to 2 places; 0 without requests.
  anonymous_requests bigint,  -- Requests flagged is_anonymous (no credentials, on purpose).
  authenticated_requests bigint,  -- Requests not flagged is_anonymous.
  authenticated_tracking_rate_percent numeric,  -- requests_with_api_key / authenticated_requests * 100, rounded to 2 places; NULL without authenticated requests. The alert status is computed from it.
  pending_attributions bigint,  -- Requests still pending attribution (a key hash not found yet; the retry worker retries them).
  failed_attributions bigint,  -- Requests whose attribution failed (attribution_reason says why).
  alert_status text,  -- `ok` (authenticated tracking rate >= 90), `warning` (>= 70), `critical` (< 70) or `no_data` (no authenticated requests). Anonymous requests never lower it.
  recommendations text[]  -- What to do, one sentence each; "API key tracking quality is good. No action needed." when nothing applies.
);
-- comment: API key tracking quality over the last N hours (the spec's admin endpoint), with the alert status and recommendations.

create type app_public.api_key_tracking_trend as (
  period_days integer,  -- How many days.
  start_date date,  -- The first day (UTC).
  end_date date,  -- The last day: today (UTC), so far.
  total_requests bigint,  -- Requests over the period.
  requests_with_api_key bigint,  -- Of those, requests with api_key_id set.
  average_tracking_rate_percent numeric,  -- The period's tracking rate weighted by requests: requests_with_api_key / total_requests * 100, rounded to 2 places; 0 without requests.
  trend_data app_public.api_key_tracking_trend_day[]  -- One entry per day, oldest first, days without requests included.
);
-- comment: The API key tracking trend over the last N UTC days, and its summary.

create type app_public.api_key_tracking_trend_day as (
  date date,  -- The UTC calendar day.
  total_requests bigint,  -- Requests created that day.
  requests_with_api_key bigint,  -- Of those, requests with api_key_id set.
  tracking_rate_percent numeric  -- requests_with_api_key / total_requests * 100, rounded to 2 places; 0 on a day without requests.
);
-- comment: One UTC day of the API key tracking trend.

create type app_public.attribution_offender as (
  kind text,  -- `api_key_hash` (a presented key that matches no key) or `user` (a user whose requests carry no key).
  api_key_hash text,  -- For kind api_key_hash: the presented key's SHA-256, hex. Register the key with import_api_key() if it is legitimate.
  user_id uuid,  -- For kind user: the user.
  email text,  -- For kind user: the user's email.
  unattributed_requests bigint,  -- Pending plus failed requests in the window.
  pending_requests bigint,  -- Requests still pending attribution.
  failed_requests bigint,  -- Requests whose attribution failed.
  reasons text[],  -- The distinct attribution_reason values of those requests.
  first_seen_at timestamp with time zone,  -- The oldest of those requests in the window.
  last_seen_at timestamp with time zone  -- The newest of those requests.
);
-- comment: A key hash or a user behind unattributed (pending or failed) requests.

create type app_public.created_api_key as (
  api_key_id uuid,  -- The new key's id.
  user_id uuid,  -- The owner.
  name text,  -- The key's label.
  prefix text,  -- The key's first characters, stored for display.
  environment text,  -- `live`, `test` or `development`.
  expires_at timestamp with time zone,  -- When the key expires, or NULL.
  secret text  -- The API key itself. Shown once: keytrack stores only its SHA-256.
);
-- comment: A newly created API key, with its secret: the only time the secret is ever shown.

create table app_partitions.chat_completion_requests_default partition (DEFAULT) (
  id bigint not null,  -- Row number, unique with created_at (the partition key).
  request_id text not null default (gen_random_uuid())::text,  -- The request's id, unique across the ledger: re-inserting a request with the same request_id is ignored (idempotent re-delivery).
  created_at timestamp with time zone not null default now(),  -- When the request arrived (the partition key).
  user_id uuid,  -- The user who made the request: set from the key when the key is resolved; NULL for anonymous requests.
  api_key_id uuid,  -- The API key that made the request. NULL when anonymous, or while the presented key is not (yet) known.
  is_anonymous boolean not null default false,  -- True for requests made without credentials on purpose (no key, no user); these are not attribution failures.
  model text,  -- The model requested.
  provider text,  -- The upstream provider that served it.
  input_tokens integer,  -- Prompt tokens, from the provider's usage.
  output_tokens integer,  -- Completion tokens, from the provider's usage.
  processing_time_ms integer,  -- Time from receiving the request to the end of the response, in milliseconds.
  status text not null default 'completed'::text,  -- Outcome of the request: `completed`, `failed` (upstream error or timeout) or `partial` (the client went away mid-stream).
  error_message text,  -- Why the request failed, when it did.
  api_key_hash bytea,  -- SHA-256 of the presented key (sha256(convert_to(key, 'UTF8'))), never the key. Kept so the row can be resolved later.
  attribution_status text not null default 'pending'::text,  -- `resolved` (api_key_id set), `anonymous` (no credentials on purpose), `pending` (a key hash was presented that matches no key yet, to be retried) or `failed` (could not be attributed; see attribution_reason).
  attribution_method text,  -- How a resolved row was attributed: `lookup` (at insert), `retry` (by the retry worker), `backfill`, or `dev` (the development key).
  attribution_reason text,  -- Why a row is not attributed: e.g. `no_key` (a user but no key presented), `not_found` (the key never appeared), `lookup_failed`, `dev_bypass`, `ambiguous`.
  attribution_attempts integer not null default 0,  -- How many times the key was looked up for this row.
  attribution_next_attempt_at timestamp with time zone,  -- When a pending row is due to be looked up again.
  attribution_error text,  -- The last error met while attributing this row, for diagnosis.
  attributed_at timestamp with time zone,  -- When api_key_id was set.
  spooled_at timestamp with time zone,  -- When the service could not reach the database and wrote this row to its durable local spool; the row was replayed later. NULL for rows written directly.
  initial_attribution text,  -- The attribution outcome at insert, set by the insert trigger and never changed: `resolved_lookup`, `resolved_dev` (the development key), `pending_not_found` (the key hash matched no key yet), `pending_lookup_failed` (the writer declared its own key lookup failed), `failed_dev_bypass`, `failed_no_key` or `anonymous`. NULL for rows recorded before keytrack kept it. The monotonic Prometheus counters count it.
  process_id uuid,  -- The keytrack serving process that accepted the request (serving_processes.id); NULL for rows written through SQL by other writers.
  process_seq bigint  -- The request's number in its process's numbering (1, 2, 3, ... in the order accepted); a missing number is a row that never arrived (completeness_gaps()).
);
-- row level security: enabled
-- acl: (default)
-- comment: Default partition of app_public.chat_completion_requests: catches rows outside every month created so far until create_partitions() moves them. Query the parent.
constraint chat_completion_requests_api_key_hash_check CHECK (octet_length(api_key_hash) = 32);
constraint chat_completion_requests_api_key_id_fkey FOREIGN KEY (api_key_id) REFERENCES app_public.api_keys(id) ON DELETE RESTRICT;
constraint chat_completion_requests_attribution_attempts_check CHECK (attribution_attempts >= 0);
constraint chat_completion_requests_attribution_method_check CHECK (attribution_method = ANY (ARRAY['lookup'::text, 'retry'::text, 'backfill'::text, 'dev'::text]));
constraint chat_completion_requests_attribution_status_check CHECK (attribution_status = ANY (ARRAY['resolved'::text, 'anonymous'::text, 'pending'::text, 'failed'::text]));
constraint chat_completion_requests_check CHECK ((attribution_status = 'resolved'::text) = (api_key_id IS NOT NULL));
constraint chat_completion_requests_check1 CHECK (attribution_status <> 'anonymous'::text OR is_anonymous AND api_key_id IS NULL AND user_id IS NULL);
constraint chat_completion_requests_check2 CHECK (attribution_method IS NULL OR attribution_status = 'resolved'::text);
constraint chat_completion_requests_default_pkey PRIMARY KEY (id, created_at);
constraint chat_completion_requests_input_tokens_check CHECK (input_tokens >= 0);
constraint chat_completion_requests_model_check CHECK (length(model) <= 200);
constraint chat_completion_requests_output_tokens_check CHECK (output_tokens >= 0);
constraint chat_completion_requests_process_check CHECK ((process_id IS NULL) = (process_seq IS NULL));
constraint chat_completion_requests_process_seq_check CHECK (process_seq > 0);
constraint chat_completion_requests_processing_time_ms_check CHECK (processing_time_ms >= 0);
constraint chat_completion_requests_provider_check CHECK (length(provider) <= 200);
constraint chat_completion_requests_request_id_check CHECK (length(request_id) >= 1 AND length(request_id) <= 200);
constraint chat_completion_requests_status_check CHECK (status = ANY (ARRAY['completed'::text, 'failed'::text, 'partial'::text]));
constraint chat_completion_requests_user_id_fkey FOREIGN KEY (user_id) REFERENCES app_public.users(id) ON DELETE RESTRICT;
CREATE INDEX chat_completion_requests_defaul_attribution_next_attempt_at_idx ON app_partitions.chat_completion_requests_default USING btree (attribution_next_attempt_at) WHERE (attribution_status = 'pending'::text);
CREATE INDEX chat_completion_requests_default_api_key_hash_idx ON app_partitions.chat_completion_requests_default USING btree (api_key_hash) WHERE (attribution_status = 'pending'::text);
CREATE INDEX chat_completion_requests_default_api_key_id_idx ON app_partitions.chat_completion_requests_default USING btree (api_key_id);
CREATE INDEX chat_completion_requests_default_created_at_idx ON app_partitions.chat_completion_requests_default USING btree (created_at);
CREATE INDEX chat_completion_requests_default_created_at_idx1 ON app_partitions.chat_completion_requests_default USING btree (created_at) WHERE (attribution_status = ANY (ARRAY['pending'::text, 'failed'::text]));
CREATE INDEX chat_completion_requests_default_is_anonymous_idx ON app_partitions.chat_completion_requests_default USING btree (is_anonymous);
CREATE UNIQUE INDEX chat_completion_requests_default_pkey ON app_partitions.chat_completion_requests_default USING btree (id, created_at);
CREATE INDEX chat_completion_requests_default_process_id_process_seq_idx ON app_partitions.chat_completion_requests_default USING btree (process_id, process_seq) WHERE (process_id IS NOT NULL);
CREATE INDEX chat_completion_requests_default_request_id_idx ON app_partitions.chat_completion_requests_default USING btree (request_id);
CREATE INDEX chat_completion_requests_default_user_id_idx ON app_partitions.chat_completion_requests_default USING btree (user_id);
CREATE TRIGGER _200_keep_initial_attribution BEFORE UPDATE ON app_partitions.chat_completion_requests_default FOR EACH ROW WHEN (old.initial_attribution IS DISTINCT FROM new.initial_attribution) EXECUTE FUNCTION app_private.tg_chat_completion_requests__keep_initial_attribution();  -- (no comment)
CREATE TRIGGER _500_attribute BEFORE INSERT ON app_partitions.chat_completion_requests_default FOR EACH ROW WHEN (current_setting('keytrack.set_based_insert'::text, true) IS DISTINCT FROM 'on'::text) EXECUTE FUNCTION app_private.tg_chat_completion_requests__attribute();  -- (no comment)

create table app_private.api_key_secrets (
  api_key_id uuid not null,  -- The key this hash belongs to (also the primary key, so it is indexed).
  key_hash bytea not null  -- SHA-256 of the key's UTF-8 bytes; unique, so a hash names at most one key.
);
-- row level security: enabled
-- acl: (default)
-- comment: The SHA-256 of each API key (sha256(convert_to(key, 'UTF8'))). The key itself is stored nowhere. Read only by security definer functions.
constraint api_key_secrets_api_key_id_fkey FOREIGN KEY (api_key_id) REFERENCES app_public.api_keys(id) ON DELETE RESTRICT;
constraint api_key_secrets_key_hash_check CHECK (octet_length(key_hash) = 32);
constraint api_key_secrets_key_hash_key UNIQUE (key_hash);
constraint api_key_secrets_pkey PRIMARY KEY (api_key_id);
CREATE UNIQUE INDEX api_key_secrets_key_hash_key ON app_private.api_key_secrets USING btree (key_hash);
CREATE UNIQUE INDEX api_key_secrets_pkey ON app_private.api_key_secrets USING btree (api_key_id);

create table app_private.attribution_events (
  event text not null,  -- `retry_resolved`, `retry_still_pending`, `retry_failed` (a retry lookup found the key, did not and will retry, did not and gave up); `backfill_resolved_by_hash`, `backfill_resolved_by_only_key`, `backfill_unknown_hash` (a hash that matches no key), `backfill_ambiguous`, `backfill_no_key` (rows that newly got that reason), `backfill_anonymized`.
  occurrences bigint not null default 0,  -- How many times it happened, ever.
  updated_at timestamp with time zone not null default now()  -- When it last happened.
);
-- row level security: enabled
-- acl: (default)
-- comment: Cumulative counts of attribution events caused by the retry worker and the backfill (never decreasing), for the Prometheus counters (app_private.attribution_metrics()). One upsert per batch.
constraint attribution_events_event_check CHECK (event = ANY (ARRAY['retry_resolved'::text, 'retry_still_pending'::text, 'retry_failed'::text, 'backfill_resolved_by_hash'::text, 'backfill_resolved_by_only_key'::text, 'backfill_unknown_hash'::text, 'backfill_ambiguous'::text, 'backfill_no_key'::text, 'backfill_anonymized'::text]));
constraint attribution_events_occurrences_check CHECK (occurrences >= 0);
constraint attribution_events_pkey PRIMARY KEY (event);
CREATE UNIQUE INDEX attribution_events_pkey ON app_private.attribution_events USING btree (event);

create table app_private.attribution_latency (
  le double precision not null,  -- The bucket's upper bound in seconds (Infinity: everything above the largest bound).
  observations bigint not null default 0,  -- Rows whose latency fell in this bucket (not cumulative).
  sum_seconds double precision not null default 0,  -- Sum of the latencies counted in this bucket.
  updated_at timestamp with time zone not null default now()  -- When the bucket last changed.
);
-- row level security: enabled
-- acl: (default)
-- comment: Histogram of attribution latency (seconds from a pending row's arrival to its final attribution by the retry worker): observations with latency <= le and above the next smaller bound, one row per bucket (le = Infinity for the last); sum_seconds on the Infinity row is the total. Never decreasing.
constraint attribution_latency_observations_check CHECK (observations >= 0);
constraint attribution_latency_pkey PRIMARY KEY (le);
CREATE UNIQUE INDEX attribution_latency_pkey ON app_private.attribution_latency USING btree (le);

create table app_private.attribution_wakes (
  key_hash bytea not null,  -- sha256 of the imported key, as chat_completion_requests.api_key_hash.
  woken_at timestamp with time zone not null default now()  -- When the key was imported.
);
-- row level security: enabled
-- acl: (default)
-- comment: Hashes of keys imported while pending rows presented them: the retry worker resolves those rows first, whatever their next attempt time, then removes the hash. Written by import_api_key(), read and emptied by resolve_pending_attributions().
constraint attribution_wakes_key_hash_check CHECK (octet_length(key_hash) = 32);
constraint attribution_wakes_pkey PRIMARY KEY (key_hash);
CREATE UNIQUE INDEX attribution_wakes_pkey ON app_private.attribution_wakes USING btree (key_hash);

create table app_private.request_ids (
  request_id text not null,  -- The request's id.
  created_at timestamp with time zone not null  -- The created_at of the recorded row.
);
-- row level security: enabled
-- acl: (default)
-- comment: One row per request_id recorded in chat_completion_requests: makes re-delivery of a request a no-op across partitions, and finds a request's created_at (its partition) from its id.
constraint request_ids_pkey PRIMARY KEY (request_id);
CREATE UNIQUE INDEX request_ids_pkey ON app_private.request_ids USING btree (request_id);

create view app_public.api_key_tracking_quality (
  hour timestamp with time zone,  -- The hour (date_trunc('hour', created_at), in the session's time zone).
  total_requests bigint,  -- Requests in the hour.
  requests_with_api_key bigint,  -- Requests with api_key_id set.
  requests_without_api_key bigint,  -- Requests with api_key_id NULL (anonymous, pending or failed).
  anonymous_requests bigint,  -- Requests flagged is_anonymous.
  potential_lookup_failures bigint,  -- Requests naming a user but no API key: attribution failures to investigate.
  tracking_rate_percent numeric  -- requests_with_api_key / total_requests * 100, rounded to 2 places.
);
-- definition:
SELECT q.hour,
    sum(q.requests)::bigint AS total_requests,
    COALESCE(sum(q.requests) FILTER (WHERE q.attribution_status = 'resolved'::text), 0::numeric)::bigint AS requests_with_api_key,
    COALESCE(sum(q.requests) FILTER (WHERE q.attribution_status <> 'resolved'::text), 0::numeric)::bigint AS requests_without_api_key,
    COALESCE(sum(q.requests) FILTER (WHERE q.is_anonymous), 0::numeric)::bigint AS anonymous_requests,
    COALESCE(sum(q.requests) FILTER (WHERE q.attribution_status <> 'resolved'::text AND q.has_user), 0::numeric)::bigint AS potential_lookup_failures,
    round(COALESCE(sum(q.requests) FILTER (WHERE q.attribution_status = 'resolved'::text), 0::numeric) / NULLIF(sum(q.requests), 0::numeric) * 100::numeric, 2) AS tracking_rate_percent
   FROM app_public.attribution_counts_by_hour(now() - '7 days'::interval) q(hour, attribution_status, is_anonymous, has_user, initial_attribution, requests)
  GROUP BY q.hour
  ORDER BY q.hour DESC;
-- options: security_invoker=true
-- row level security: DISABLED
-- acl: keytrack_admin=r/keytrack_owner, keytrack_analyst=r/keytrack_owner, keytrack_owner=arwdDxt/keytrack_owner, keytrack_user=r/keytrack_owner
-- comment: @primaryKey hour
@behavior -insert -update -delete
API key tracking quality per hour over the last 7 days (the spec's view): how many requests carried an API key id, how many were anonymous, how many name a user but no key. Served from hourly rollups plus the hours not settled yet; always equal to the spec's SELECT over the raw rows.

create table app_public.api_keys (
  id uuid not null default gen_random_uuid(),  -- Primary key; chat_completion_requests.api_key_id points here.
  user_id uuid not null,  -- The user who owns the key; requests made with it are attributed to them.
  name text not null default 'default'::text,  -- A label chosen by the owner. [acl: keytrack_admin=w/keytrack_owner]
  prefix text,  -- The first characters of the key, for recognising it (e.g. kt_live_1a2b). NULL for imported keys registered without one.
  last4 text,  -- The last four characters of the key, for recognising it.
  environment text not null default 'live'::text,  -- `live`, `test` or `development` (the dev key of APP_ENV=development).
  source text not null default 'created'::text,  -- `created` by keytrack (create_api_key) or `imported` by hash from another system (import_api_key).
  created_at timestamp with time zone not null default now(),  -- When the key was created or imported.
  expires_at timestamp with time zone,  -- After this instant the key no longer authenticates. NULL: never expires. [acl: keytrack_admin=w/keytrack_owner]
  revoked_at timestamp with time zone,  -- When the key was revoked; it no longer authenticates, but requests it made stay attributed to it.
  last_used_at timestamp with time zone,  -- When the key last authenticated a request through the service (updated at most once a minute).
  created_by_api_key_id uuid  -- The API key its creator authenticated with, when it was created by a caller using a key (not the admin token, not SQL): revoking that key revokes this one too.
);
-- row level security: enabled
-- acl: keytrack_admin=r/keytrack_owner, keytrack_analyst=r/keytrack_owner, keytrack_owner=arwdDxt/keytrack_owner, keytrack_user=r/keytrack_owner
-- comment: @behavior -insert -delete
API keys. Created with create_api_key() (the secret is shown once) or registered by hash with import_api_key(); revoked with revoke_api_key(), never deleted, so requests stay attributed.
constraint api_keys_check CHECK (expires_at IS NULL OR expires_at > created_at);
constraint api_keys_created_by_api_key_id_fkey FOREIGN KEY (created_by_api_key_id) REFERENCES app_public.api_keys(id) ON DELETE RESTRICT;
constraint api_keys_environment_check CHECK (environment = ANY (ARRAY['live'::text, 'test'::text, 'development'::text]));
constraint api_keys_last4_check CHECK (length(last4) <= 4);
constraint api_keys_name_check CHECK (length(name) >= 1 AND length(name) <= 200);
constraint api_keys_pkey PRIMARY KEY (id);
constraint api_keys_prefix_check CHECK (length(prefix) <= 32);
constraint api_keys_source_check CHECK (source = ANY (ARRAY['created'::text, 'imported'::text]));
constraint api_keys_user_id_fkey FOREIGN KEY (user_id) REFERENCES app_public.users(id) ON DELETE RESTRICT;
CREATE INDEX api_keys_created_by_api_key_id_idx ON app_public.api_keys USING btree (created_by_api_key_id);
CREATE UNIQUE INDEX api_keys_pkey ON app_public.api_keys USING btree (id);
CREATE INDEX api_keys_user_id_idx ON app_public.api_keys USING btree (user_id);
CREATE TRIGGER _900_notify_key_change AFTER UPDATE ON app_public.api_keys FOR EACH ROW WHEN (old.revoked_at IS DISTINCT FROM new.revoked_at OR old.expires_at IS DISTINCT FROM new.expires_at OR old.user_id IS DISTINCT FROM new.user_id) EXECUTE FUNCTION app_private.tg_api_keys__notify_change();  -- Announces revocations, expiry changes and owner changes to keytrack's key caches (channel keytrack_key_changes).
policy select_admin for r to keytrack_admin, keytrack_analyst using (true);  -- Admins and analysts see every key.
policy select_own for r to keytrack_user using ((user_id = app_public.current_user_id()));  -- A user sees only their own keys.
policy update_admin for w to keytrack_admin using (true);  -- Admins rename keys and change their expiry.

create table app_public.attribution_backfills (
  id bigint not null generated always as identity,  -- Primary key.
  status text not null default 'running'::text,  -- `running` (at most one at a time), `finished` or `cancelled`.
  batch_size integer not null default 1000,  -- Rows per batch; each batch is one short transaction.
  upto timestamp with time zone not null default now(),  -- Only rows created before this instant (the start) are examined; newer rows are attributed at insert.
  cursor_created_at timestamp with time zone,  -- Resume point: created_at of the last row examined.
  cursor_id bigint,  -- Resume point: id of the last row examined.
  examined bigint not null default 0,  -- Rows without api_key_id looked at so far.
  filled bigint not null default 0,  -- Rows whose api_key_id was filled (method backfill).
  ambiguous bigint not null default 0,  -- Rows left NULL because their user had several keys alive at the time (reason ambiguous).
  no_key bigint not null default 0,  -- Rows left NULL because their user had no key alive at the time (reason no_key).
  anonymized bigint not null default 0,  -- Rows with neither key nor user flagged is_anonymous (as the spec's migration did).
  batches integer not null default 0,  -- Batches run so far.
  started_by text not null default CURRENT_USER,  -- The database role that started the run.
  started_at timestamp with time zone not null default now(),  -- When the run started.
  updated_at timestamp with time zone not null default now(),  -- When the last batch ran.
  finished_at timestamp with time zone  -- When the run finished or was cancelled.
);
-- row level security: enabled
-- acl: keytrack_admin=r/keytrack_owner, keytrack_analyst=r/keytrack_owner, keytrack_owner=arwdDxt/keytrack_owner
-- comment: @behavior -insert -update -delete
Runs of the attribution backfill: fills api_key_id of historical rows from their key hash, or from the user's only key alive at the time; flags rows with neither key nor user anonymous. Batched and resumable; start one with start_attribution_backfill().
constraint attribution_backfills_batch_size_check CHECK (batch_size >= 1 AND batch_size <= 100000);
constraint attribution_backfills_pkey PRIMARY KEY (id);
constraint attribution_backfills_status_check CHECK (status = ANY (ARRAY['running'::text, 'finished'::text, 'cancelled'::text]));
CREATE UNIQUE INDEX attribution_backfills_one_running_idx ON app_public.attribution_backfills USING btree ((true)) WHERE (status = 'running'::text);
CREATE UNIQUE INDEX attribution_backfills_pkey ON app_public.attribution_backfills USING btree (id);
policy select_admin for r to keytrack_admin, keytrack_analyst using (true);  -- Admins and analysts see backfill runs.

create table app_public.attribution_retry_latencies (
  row_id bigint not null,  -- The ledger row's id.
  created_at timestamp with time zone not null,  -- The ledger row's created_at (when the request arrived).
  attributed_at timestamp with time zone  -- The ledger row's attributed_at (when the retry worker resolved it).
);
-- row level security: enabled
-- acl: keytrack_admin=r/keytrack_owner, keytrack_analyst=r/keytrack_owner, keytrack_owner=arwdDxt/keytrack_owner
-- comment: @behavior -*
The ledger rows whose attribution_method is `retry` (resolved by the retry worker), with their created_at and attributed_at: exactly those rows, kept by the UPDATE and DELETE triggers of chat_completion_requests (the insert trigger never sets `retry`). Read by app_public.attribution_latency_report().
constraint attribution_retry_latencies_pkey PRIMARY KEY (row_id, created_at);
CREATE INDEX attribution_retry_latencies_created_at_idx ON app_public.attribution_retry_latencies USING btree (created_at) INCLUDE (attributed_at);
CREATE UNIQUE INDEX attribution_retry_latencies_pkey ON app_public.attribution_retry_latencies USING btree (row_id, created_at);
policy select_admin for r to keytrack_admin, keytrack_analyst using (true);  -- Admins and analysts read the retry latencies (they see every request anyway).

create table app_public.attribution_rollup_changes (
  id bigint not null generated always as identity,  -- Primary key.
  row_id bigint not null,  -- The ledger row's id: its change counts only if the row is settled (id <= settled_id); a row not settled yet is read raw as it is.
  created_at timestamp with time zone not null,  -- The ledger row's created_at (its bucket).
  attribution_status text not null,  -- The outcome's attribution_status.
  is_anonymous boolean not null,  -- The outcome's is_anonymous.
  has_user boolean not null,  -- Whether the outcome's user_id is set.
  initial_attribution text not null,  -- The outcome's initial_attribution (`unknown` when NULL).
  requests integer not null  -- -1 (the row left this outcome) or +1 (it entered it).
);
-- row level security: enabled
-- acl: keytrack_admin=r/keytrack_owner, keytrack_analyst=r/keytrack_owner, keytrack_owner=arwdDxt/keytrack_owner, keytrack_user=r/keytrack_owner
-- comment: @behavior -*
Changes to the rolled-up columns of ledger rows (retry, backfill, deletes) not yet applied to the rollups: for each changed row, -1 for its old outcome and +1 for its new one (a deleted row: -1). Written by triggers on chat_completion_requests, consumed by app_private.refresh_attribution_rollups().
constraint attribution_rollup_changes_pkey PRIMARY KEY (id);
constraint attribution_rollup_changes_requests_check CHECK (requests <> 0);
CREATE INDEX attribution_rollup_changes_created_at_idx ON app_public.attribution_rollup_changes USING btree (created_at);
CREATE UNIQUE INDEX attribution_rollup_changes_pkey ON app_public.attribution_rollup_changes USING btree (id);
policy select_admin for r to keytrack_admin, keytrack_analyst using (true);  -- Admins and analysts read the pending changes with the rollups.

create table app_public.attribution_rollup_dirty_hours (
  id bigint not null generated always as identity,  -- Primary key (several marks for one hour are normal).
  hour timestamp with time zone not null,  -- The UTC hour whose rollup is stale.
  marked_at timestamp with time zone not null default now(),  -- When the change was made (its transaction's start).
  recount boolean not null default false  -- True: the hour's rollups are wrong (app_private.invalidate_attribution_rollups(): rows changed without triggers), reads scan it raw until the next refresh recounts it. False: a late insert (older insert triggers), which settling by id already counts: ignored, cleared by the next refresh.
);
-- row level security: enabled
-- acl: keytrack_admin=r/keytrack_owner, keytrack_analyst=r/keytrack_owner, keytrack_owner=arwdDxt/keytrack_owner, keytrack_user=r/keytrack_owner
-- comment: @behavior -*
UTC hours to recount from the raw rows (recount) because their rows changed without triggers: reads scan them raw until the next refresh recounts them and removes the marks. Marks without recount (late inserts, from older insert triggers) are ignored.
constraint attribution_rollup_dirty_hours_pkey PRIMARY KEY (id);
CREATE INDEX attribution_rollup_dirty_hours_hour_idx ON app_public.attribution_rollup_dirty_hours USING btree (hour);
CREATE UNIQUE INDEX attribution_rollup_dirty_hours_pkey ON app_public.attribution_rollup_dirty_hours USING btree (id);
policy select_admin for r to keytrack_admin, keytrack_analyst using (true);  -- Admins and analysts read the dirty marks.

create table app_public.attribution_rollup_state (
  id boolean not null default true,  -- Always true: the table has one row.
  settled_through timestamp with time zone not null default '-infinity'::timestamp with time zone,  -- The UTC hour of the last fence that passed: rows whose ids were drawn before then are settled. -infinity: nothing is settled, reads scan raw rows only.
  frozen_before timestamp with time zone not null default '-infinity'::timestamp with time zone,  -- Hours before this instant are never recomputed, because their raw rows may be gone (partitions dropped by retention): reads use their rollups even when marked dirty. Set with app_private.freeze_attribution_rollups().
  fence_transactions text[],  -- The transactions (virtual transaction ids, pg_locks.virtualtransaction) that held a write lock on chat_completion_requests or a partition when the pending fence was taken: rows up to fence_id settle once all of them have ended (a row's id is drawn while its writer holds that lock). Transactions of other tables and databases never hold settlement back.
  fence_until timestamp with time zone,  -- The UTC hour in which the pending fence was taken (settled_through once it passes).
  fence_set_at timestamp with time zone,  -- When the fence was taken; an old fence means a long-running transaction writing the ledger holds settlement back (reads stay exact, but scan more raw rows).
  refreshed_at timestamp with time zone,  -- When app_private.refresh_attribution_rollups() last ran.
  settled_id bigint not null default 0,  -- Every ledger row with id <= settled_id is counted in the rollups (its changes since are in attribution_rollup_changes); rows above it are read raw. Ids come from the ledger's identity sequence (CACHE 1), which writers never override.
  fence_id bigint  -- The pending fence's id: the last id drawn when it was taken; rows up to it settle once every fence transaction has ended.
);
-- row level security: enabled
-- acl: keytrack_admin=r/keytrack_owner, keytrack_analyst=r/keytrack_owner, keytrack_owner=arwdDxt/keytrack_owner, keytrack_user=r/keytrack_owner
-- comment: @behavior -*
How far the hourly rollups are settled (one row). Written only by app_private.refresh_attribution_rollups().
constraint attribution_rollup_state_check CHECK ((fence_transactions IS NULL) = (fence_until IS NULL));
constraint attribution_rollup_state_fence_id_check CHECK ((fence_id IS NULL) = (fence_until IS NULL));
constraint attribution_rollup_state_id_check CHECK (id);
constraint attribution_rollup_state_pkey PRIMARY KEY (id);
constraint attribution_rollup_state_settled_through_check CHECK (settled_through = '-infinity'::timestamp with time zone OR settled_through = date_trunc('hour'::text, settled_through, 'UTC'::text));
CREATE UNIQUE INDEX attribution_rollup_state_pkey ON app_public.attribution_rollup_state USING btree (id);
policy select_admin for r to keytrack_admin, keytrack_analyst using (true);  -- Admins and analysts read the rollup state; for anyone else reads fall back to raw rows.

create table app_public.attribution_rollups_hourly (
  hour timestamp with time zone not null,  -- The UTC hour (date_trunc('hour', created_at, 'UTC')).
  attribution_status text not null,  -- The rows' attribution_status (api_key_id is set exactly when it is `resolved`).
  is_anonymous boolean not null,  -- The rows' is_anonymous.
  has_user boolean not null,  -- Whether the rows' user_id is set.
  initial_attribution text not null,  -- The rows' initial_attribution, `unknown` for rows recorded before it was kept.
  requests bigint not null  -- How many rows.
);
-- row level security: enabled
-- acl: keytrack_admin=r/keytrack_owner, keytrack_analyst=r/keytrack_owner, keytrack_owner=arwdDxt/keytrack_owner, keytrack_user=r/keytrack_owner
-- comment: @behavior -*
Request counts per UTC hour and attribution outcome of the rows with id <= attribution_rollup_state.settled_id, kept by app_private.refresh_attribution_rollups(). Read through app_public.attribution_counts_by_hour(), which adds the changes not applied yet and the rows not settled yet.
constraint attribution_rollups_hourly_hour_check CHECK (hour = date_trunc('hour'::text, hour, 'UTC'::text));
constraint attribution_rollups_hourly_pkey PRIMARY KEY (hour, attribution_status, is_anonymous, has_user, initial_attribution);
constraint attribution_rollups_hourly_requests_check CHECK (requests > 0);
CREATE UNIQUE INDEX attribution_rollups_hourly_pkey ON app_public.attribution_rollups_hourly USING btree (hour, attribution_status, is_anonymous, has_user, initial_attribution);
policy select_admin for r to keytrack_admin, keytrack_analyst using (true);  -- Admins and analysts read the rollups (they see every request anyway); users read raw rows through their own policy.

create table app_public.attribution_rollups_minutely (
  minute timestamp with time zone not null,  -- The minute (date_trunc('minute', created_at, 'UTC')).
  attribution_status text not null,  -- The rows' attribution_status.
  is_anonymous boolean not null,  -- The rows' is_anonymous.
  has_user boolean not null,  -- Whether the rows' user_id is set.
  initial_attribution text not null,  -- The rows' initial_attribution, `unknown` for rows recorded before it was kept.
  requests bigint not null  -- How many rows.
);
-- row level security: enabled
-- acl: keytrack_admin=r/keytrack_owner, keytrack_analyst=r/keytrack_owner, keytrack_owner=arwdDxt/keytrack_owner, keytrack_user=r/keytrack_owner
-- comment: @behavior -*
Request counts per minute and attribution outcome of the rows with id <= attribution_rollup_state.settled_id, kept by app_private.refresh_attribution_rollups() (the hourly rollups are their sums). Read through app_public.attribution_counts_by_hour().
constraint attribution_rollups_minutely_minute_check CHECK (minute = date_trunc('minute'::text, minute, 'UTC'::text));
constraint attribution_rollups_minutely_pkey PRIMARY KEY (minute, attribution_status, is_anonymous, has_user, initial_attribution);
constraint attribution_rollups_minutely_requests_check CHECK (requests > 0);
CREATE UNIQUE INDEX attribution_rollups_minutely_pkey ON app_public.attribution_rollups_minutely USING btree (minute, attribution_status, is_anonymous, has_user, initial_attribution);
policy select_admin for r to keytrack_admin, keytrack_analyst using (true);  -- Admins and analysts read the rollups (they see every request anyway); users read raw rows through their own policy.

create table app_public.chat_completion_requests (
  id bigint not null generated by default as identity,  -- Row number, unique with created_at (the partition key).
  request_id text not null default (gen_random_uuid())::text,  -- The request's id, unique across the ledger: re-inserting a request with the same request_id is ignored (idempotent re-delivery).
  created_at timestamp with time zone not null default now(),  -- When the request arrived (the partition key).
  user_id uuid,  -- The user who made the request: set from the key when the key is resolved; NULL for anonymous requests.
  api_key_id uuid,  -- The API key that made the request. NULL when anonymous, or while the presented key is not (yet) known.
  is_anonymous boolean not null default false,  -- True for requests made without credentials on purpose (no key, no user); these are not attribution failures.
  model text,  -- The model requested.
  provider text,  -- The upstream provider that served it.
  input_tokens integer,  -- Prompt tokens, from the provider's usage.
  output_tokens integer,  -- Completion tokens, from the provider's usage.
  processing_time_ms integer,  -- Time from receiving the request to the end of the response, in milliseconds.
  status text not null default 'completed'::text,  -- Outcome of the request: `completed`, `failed` (upstream error or timeout) or `partial` (the client went away mid-stream).
  error_message text,  -- Why the request failed, when it did.
  api_key_hash bytea,  -- SHA-256 of the presented key (sha256(convert_to(key, 'UTF8'))), never the key. Kept so the row can be resolved later.
  attribution_status text not null default 'pending'::text,  -- `resolved` (api_key_id set), `anonymous` (no credentials on purpose), `pending` (a key hash was presented that matches no key yet, to be retried) or `failed` (could not be attributed; see attribution_reason).
  attribution_method text,  -- How a resolved row was attributed: `lookup` (at insert), `retry` (by the retry worker), `backfill`, or `dev` (the development key).
  attribution_reason text,  -- Why a row is not attributed: e.g. `no_key` (a user but no key presented), `not_found` (the key never appeared), `lookup_failed`, `dev_bypass`, `ambiguous`.
  attribution_attempts integer not null default 0,  -- How many times the key was looked up for this row.
  attribution_next_attempt_at timestamp with time zone,  -- When a pending row is due to be looked up again.
  attribution_error text,  -- The last error met while attributing this row, for diagnosis.
  attributed_at timestamp with time zone,  -- When api_key_id was set.
  spooled_at timestamp with time zone,  -- When the service could not reach the database and wrote this row to its durable local spool; the row was replayed later. NULL for rows written directly.
  initial_attribution text,  -- The attribution outcome at insert, set by the insert trigger and never changed: `resolved_lookup`, `resolved_dev` (the development key), `pending_not_found` (the key hash matched no key yet), `pending_lookup_failed` (the writer declared its own key lookup failed), `failed_dev_bypass`, `failed_no_key` or `anonymous`. NULL for rows recorded before keytrack kept it. The monotonic Prometheus counters count it.
  process_id uuid,  -- The keytrack serving process that accepted the request (serving_processes.id); NULL for rows written through SQL by other writers.
  process_seq bigint  -- The request's number in its process's numbering (1, 2, 3, ... in the order accepted); a missing number is a row that never arrived (completeness_gaps()).
) partition by RANGE (created_at);
-- row level security: enabled
-- acl: keytrack_admin=r/keytrack_owner, keytrack_analyst=r/keytrack_owner, keytrack_owner=arwdDxt/keytrack_owner, keytrack_user=r/keytrack_owner
-- comment: @behavior -insert -update -delete
The request ledger: one row per chat request that passed the gateway, attributed to the API key and user that made it, or flagged anonymous on purpose. Insert with the key's SHA-256 in api_key_hash (or nothing, for anonymous): a trigger resolves api_key_id and user_id, sets is_anonymous and attribution_status. Re-inserting a request_id changes nothing. Partitioned by month of created_at.
constraint chat_completion_requests_api_key_hash_check CHECK (octet_length(api_key_hash) = 32);
constraint chat_completion_requests_api_key_id_fkey FOREIGN KEY (api_key_id) REFERENCES app_public.api_keys(id) ON DELETE RESTRICT;
constraint chat_completion_requests_attribution_attempts_check CHECK (attribution_attempts >= 0);
constraint chat_completion_requests_attribution_method_check CHECK (attribution_method = ANY (ARRAY['lookup'::text, 'retry'::text, 'backfill'::text, 'dev'::text]));
constraint chat_completion_requests_attribution_status_check CHECK (attribution_status = ANY (ARRAY['resolved'::text, 'anonymous'::text, 'pending'::text, 'failed'::text]));
constraint chat_completion_requests_check CHECK ((attribution_status = 'resolved'::text) = (api_key_id IS NOT NULL));
constraint chat_completion_requests_check1 CHECK (attribution_status <> 'anonymous'::text OR is_anonymous AND api_key_id IS NULL AND user_id IS NULL);
constraint chat_completion_requests_check2 CHECK (attribution_method IS NULL OR attribution_status = 'resolved'::text);
constraint chat_completion_requests_input_tokens_check CHECK (input_tokens >= 0);
constraint chat_completion_requests_model_check CHECK (length(model) <= 200);
constraint chat_completion_requests_output_tokens_check CHECK (output_tokens >= 0);
constraint chat_completion_requests_pkey PRIMARY KEY (id, created_at);
constraint chat_completion_requests_process_check CHECK ((process_id IS NULL) = (process_seq IS NULL));
constraint chat_completion_requests_process_seq_check CHECK (process_seq > 0);
constraint chat_completion_requests_processing_time_ms_check CHECK (processing_time_ms >= 0);
constraint chat_completion_requests_provider_check CHECK (length(provider) <= 200);
constraint chat_completion_requests_request_id_check CHECK (length(request_id) >= 1 AND length(request_id) <= 200);
constraint chat_completion_requests_status_check CHECK (status = ANY (ARRAY['completed'::text, 'failed'::text, 'partial'::text]));
constraint chat_completion_requests_user_id_fkey FOREIGN KEY (user_id) REFERENCES app_public.users(id) ON DELETE RESTRICT;
CREATE INDEX chat_completion_requests_api_key_id_idx ON ONLY app_public.chat_completion_requests USING btree (api_key_id);
CREATE INDEX chat_completion_requests_created_at_idx ON ONLY app_public.chat_completion_requests USING btree (created_at);
CREATE INDEX chat_completion_requests_pending_hash_idx ON ONLY app_public.chat_completion_requests USING btree (api_key_hash) WHERE (attribution_status = 'pending'::text);
CREATE INDEX chat_completion_requests_pending_idx ON ONLY app_public.chat_completion_requests USING btree (attribution_next_attempt_at) WHERE (attribution_status = 'pending'::text);
CREATE UNIQUE INDEX chat_completion_requests_pkey ON ONLY app_public.chat_completion_requests USING btree (id, created_at);
CREATE INDEX chat_completion_requests_process_seq_idx ON ONLY app_public.chat_completion_requests USING btree (process_id, process_seq) WHERE (process_id IS NOT NULL);
CREATE INDEX chat_completion_requests_request_id_idx ON ONLY app_public.chat_completion_requests USING btree (request_id);
CREATE INDEX chat_completion_requests_unattributed_idx ON ONLY app_public.chat_completion_requests USING btree (created_at) WHERE (attribution_status = ANY (ARRAY['pending'::text, 'failed'::text]));
CREATE INDEX chat_completion_requests_user_id_idx ON ONLY app_public.chat_completion_requests USING btree (user_id);
CREATE INDEX idx_chat_completion_requests_is_anonymous ON ONLY app_public.chat_completion_requests USING btree (is_anonymous);
CREATE TRIGGER _200_keep_initial_attribution BEFORE UPDATE ON app_public.chat_completion_requests FOR EACH ROW WHEN (old.initial_attribution IS DISTINCT FROM new.initial_attribution) EXECUTE FUNCTION app_private.tg_chat_completion_requests__keep_initial_attribution();  -- Keeps initial_attribution immutable (see app_private.tg_chat_completion_requests__keep_initial_attribution).
CREATE TRIGGER _500_attribute BEFORE INSERT ON app_public.chat_completion_requests FOR EACH ROW WHEN (current_setting('keytrack.set_based_insert'::text, true) IS DISTINCT FROM 'on'::text) EXECUTE FUNCTION app_private.tg_chat_completion_requests__attribute();  -- Claims the request_id and attributes the row (see app_private.tg_chat_completion_requests__attribute); skipped for the rows app_private.record_requests() inserts, which it claims and attributes itself.
CREATE TRIGGER _900_mark_rollup_hours_delete AFTER DELETE ON app_public.chat_completion_requests REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION app_private.tg_chat_completion_requests__mark_rollup_hours();  -- Records deleted rows for the rollups (see app_private.tg_chat_completion_requests__mark_rollup_hours).
CREATE TRIGGER _900_mark_rollup_hours_update AFTER UPDATE ON app_public.chat_completion_requests REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION app_private.tg_chat_completion_requests__mark_rollup_hours();  -- Records attribution changes (retry, backfill) for the rollups (see app_private.tg_chat_completion_requests__mark_rollup_hours).
policy select_admin for r to keytrack_admin, keytrack_analyst using (true);  -- Admins and analysts see every request.
policy select_own for r to keytrack_user using ((user_id = app_public.current_user_id()));  -- A user sees only the requests attributed to them.

create table app_public.serving_processes (
  id uuid not null default gen_random_uuid(),  -- The process's identity; chat_completion_requests.process_id.
  host text not null,  -- Host name of the machine it runs on.
  pid integer not null,  -- Its operating-system process id.
  version text not null,  -- keytrack's version (package.json).
  started_at timestamp with time zone not null default now(),  -- When it registered, at start-up.
  heartbeat_at timestamp with time zone not null default now(),  -- Its last sign of life (every few seconds while it runs).
  accepted_seq bigint not null default 0,  -- The highest request number it had handed out at heartbeat_at (or at stopped_at).
  stopped_at timestamp with time zone,  -- When it shut down cleanly; NULL while running, or if it was killed.
  last_seq bigint  -- The last request number it handed out, recorded at a clean shutdown: every number up to it must have a row.
);
-- row level security: enabled
-- acl: keytrack_admin=r/keytrack_owner, keytrack_analyst=r/keytrack_owner, keytrack_owner=arwdDxt/keytrack_owner
-- comment: @behavior -insert -update -delete
The keytrack processes that serve requests, one row per start: each numbers the requests it accepts 1, 2, 3, ... and its ledger rows carry that number (chat_completion_requests.process_seq), so completeness_gaps() can find any row that never arrived.
constraint serving_processes_accepted_seq_check CHECK (accepted_seq >= 0);
constraint serving_processes_check CHECK ((stopped_at IS NULL) = (last_seq IS NULL));
constraint serving_processes_host_check CHECK (length(host) >= 1 AND length(host) <= 255);
constraint serving_processes_last_seq_check CHECK (last_seq >= 0);
constraint serving_processes_pid_check CHECK (pid > 0);
constraint serving_processes_pkey PRIMARY KEY (id);
constraint serving_processes_version_check CHECK (length(version) >= 1 AND length(version) <= 100);
CREATE UNIQUE INDEX serving_processes_pkey ON app_public.serving_processes USING btree (id);
policy select_admin for r to keytrack_admin, keytrack_analyst using (true);  -- Admins and analysts see every serving process.

create table app_public.users (
  id uuid not null default gen_random_uuid(),  -- Primary key.
  email text not null,  -- Email address, unique regardless of case. [acl: keytrack_admin=aw/keytrack_owner]
  display_name text,  -- Name shown to admins. [acl: keytrack_admin=aw/keytrack_owner]
  role text not null default 'user'::text,  -- `user` or `admin`. An admin user's API key grants admin access to GraphQL and the monitoring endpoints. [acl: keytrack_admin=aw/keytrack_owner]
  created_at timestamp with time zone not null default now(),  -- When the user was created.
  updated_at timestamp with time zone not null default now()  -- When the user was last changed.
);
-- row level security: enabled
-- acl: keytrack_admin=r/keytrack_owner, keytrack_analyst=r/keytrack_owner, keytrack_owner=arwdDxt/keytrack_owner, keytrack_user=r/keytrack_owner
-- comment: People (or services) that own API keys. Requests are attributed to a user through their key.
constraint users_display_name_check CHECK (length(display_name) <= 200);
constraint users_email_check CHECK (email ~ '^[^@\s]+@[^@\s]+$'::text AND length(email) <= 320);
constraint users_pkey PRIMARY KEY (id);
constraint users_role_check CHECK (role = ANY (ARRAY['user'::text, 'admin'::text]));
CREATE UNIQUE INDEX users_email_key ON app_public.users USING btree (lower(email));
CREATE UNIQUE INDEX users_pkey ON app_public.users USING btree (id);
CREATE TRIGGER _100_set_updated_at BEFORE UPDATE ON app_public.users FOR EACH ROW EXECUTE FUNCTION app_private.tg__set_updated_at();  -- Maintains users.updated_at.
CREATE TRIGGER _900_notify_user_change AFTER DELETE OR UPDATE OF role ON app_public.users FOR EACH ROW EXECUTE FUNCTION app_private.tg_users__notify_change();  -- Announces role changes and deletions to keytrack's key caches (channel keytrack_key_changes).
policy insert_admin for a to keytrack_admin with check (true);  -- Admins create users.
policy select_admin for r to keytrack_admin, keytrack_analyst using (true);  -- Admins and analysts see every user.
policy select_self for r to keytrack_user using ((id = app_public.current_user_id()));  -- A user sees only themselves.
policy update_admin for w to keytrack_admin using (true);  -- Admins change users.

-- 5 monthly partitions (chat_completion_requests_pYYYY_MM) made by create_partitions(), not listed.

CREATE OR REPLACE FUNCTION app_private.attribution_latency_metrics()
 RETURNS TABLE(le double precision, cumulative bigint, sum_seconds double precision, oldest_pending_seconds double precision)
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
  select l.le,
         (sum(l.observations) over (order by l.le))::bigint,
         sum(l.sum_seconds) over (),
         (select extract(epoch from now() - min(r.created_at))::double precision
            from app_public.chat_completion_requests r where r.attribution_status = 'pending')
    from app_private.attribution_latency l
   order by l.le
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: For /metrics: the attribution latency histogram as Prometheus wants it (cumulative counts per upper bound, the sum), and how long the oldest pending row has waited (NULL when none).

CREATE OR REPLACE FUNCTION app_private.attribution_metrics()
 RETURNS app_private.attribution_metrics
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
 SET "TimeZone" TO 'UTC'
AS $function$
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
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: The numbers behind the spec's Prometheus metrics, one row: cumulative counters that never decrease (insert-time outcomes counted from initial_attribution, so a row resolved or failed later does not lower them; retry and backfill events from app_private.attribution_events) and gauges (pending and failed rows now, the authenticated tracking rate of the last 60 minutes), all from the rollups (app_public.attribution_counts_by_hour()). Rows recorded before initial_attribution existed are not counted. For the service (the owner).

CREATE OR REPLACE FUNCTION app_private.authenticate_api_key(key_hash bytea)
 RETURNS app_private.authenticated_api_key
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
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
$function$;
-- acl: keytrack_authenticator=X/keytrack_owner, keytrack_owner=X/keytrack_owner
-- comment: Looks up a presented key by its hash: the key id, the user id and whether the key is usable now (not revoked, not expired), with the reason when not. Always returns one row.

CREATE OR REPLACE FUNCTION app_private.completeness_metrics(replay_window interval DEFAULT '00:10:00'::interval)
 RETURNS TABLE(process_id uuid, host text, state text, accepted_seq bigint, recorded bigint, missing bigint)
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
begin
  return query
  with procs as (
    select p.*, app_public.serving_process_state(p) as st
      from app_public.serving_processes p
     where coalesce(p.stopped_at, p.heartbeat_at) >= now() - interval '1 day'
  )
  select p.id, p.host, p.st, p.accepted_seq,
         (select count(*) from app_public.chat_completion_requests r
           where r.process_id = p.id and r.created_at >= p.started_at - interval '1 minute'),
         coalesce((select sum(g.missing) from app_public.completeness_gaps(replay_window, now() - interval '1 day') g
                    where g.process_id = p.id), 0)::bigint
    from procs p;
end;
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: For /metrics: per serving process alive within the last day, the numbers it reported handing out, its rows in the ledger and the numbers missing past replay_window.

CREATE OR REPLACE FUNCTION app_private.count_attribution_events(events text[], counts bigint[])
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
begin
  -- Always in event order, so concurrent batches lock the counter rows in the
  -- same order and never deadlock.
  insert into app_private.attribution_events as e (event, occurrences, updated_at)
    select u.event, u.n, now() from unnest(events, counts) as u(event, n) where u.n > 0 order by u.event
    on conflict (event) do update set occurrences = e.occurrences + excluded.occurrences, updated_at = excluded.updated_at;
end;
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: Adds counts[i] to the counter of events[i] in app_private.attribution_events (zeros skipped). Called once per retry or backfill batch.

CREATE OR REPLACE FUNCTION app_private.create_partitions(months_ahead integer DEFAULT 3)
 RETURNS integer
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
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
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: Creates the monthly partitions of chat_completion_requests (UTC) from last month to months_ahead months ahead, and for every month whose rows the default partition caught, moving those rows into it. Idempotent; returns how many partitions it created.

CREATE OR REPLACE FUNCTION app_private.describe_partition(partition regclass, description text)
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
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
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: Comments a partition of chat_completion_requests and copies the parent's column comments onto it, so \d+ on a partition explains itself too.

CREATE OR REPLACE FUNCTION app_private.drop_expired_partitions(retention interval, as_of timestamp with time zone DEFAULT now())
 RETURNS integer
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
declare
  v_cutoff timestamptz;
  v_part record;
  v_month date;
  v_hi timestamptz;
  v_dropped integer := 0;
begin
  if retention is null or retention < interval '1 day' then
    raise exception 'retention must be at least 1 day, got %', retention using errcode = '22023';
  end if;
  v_cutoff := as_of - retention;
  -- Only whole months that ended before the cutoff; never the default partition.
  for v_part in
    select c.relname
      from pg_inherits i join pg_class c on c.oid = i.inhrelid
     where i.inhparent = 'app_public.chat_completion_requests'::regclass
       and c.relname ~ '^chat_completion_requests_p[0-9]{4}_[0-9]{2}$'
     order by c.relname
  loop
    v_month := to_date(right(v_part.relname, 7), 'YYYY_MM');
    v_hi := (v_month + interval '1 month')::timestamp at time zone 'UTC';
    exit when v_hi > v_cutoff;
    -- Keep the rollups of these hours for good (refuses while they are not
    -- settled: the worker refreshes rollups first and retries later).
    perform app_private.freeze_attribution_rollups(v_hi);
    -- The idempotency guard's rows of the dropped requests, found by primary key.
    execute format('delete from app_private.request_ids r using app_partitions.%I p where r.request_id = p.request_id', v_part.relname);
    execute format('drop table app_partitions.%I', v_part.relname);
    v_dropped := v_dropped + 1;
  end loop;
  return v_dropped;
end;
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: Retention: drops the monthly partitions of chat_completion_requests whose whole month ended more than `retention` before as_of, after freezing the rollups of their hours (history stays in the reports and metrics) and deleting their request ids from the idempotency guard (a re-delivery of such an old request would be recorded again). Never drops the default partition or a month that is partly inside the window. Returns how many partitions it dropped. Run daily by the worker when RETENTION_DAYS is set.

CREATE OR REPLACE FUNCTION app_private.freeze_attribution_rollups(before timestamp with time zone)
 RETURNS app_public.attribution_rollup_state
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
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
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: Call before dropping raw partitions (retention): hours before `before` keep their rollups forever and are never recounted from raw rows that may be gone. Refuses while those hours have rows or changes the rollups do not hold yet, or are marked for a recount.

CREATE OR REPLACE FUNCTION app_private.get_or_create_dev_api_key()
 RETURNS text
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
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
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: The spec's development key: creates, once, the user dev@localhost and the real key dev_local_{user_id}_local_development (stored hashed, environment development) and returns the key. Raises 28000 when that key was revoked. Called by the service at start-up with APP_ENV=development only.

CREATE OR REPLACE FUNCTION app_private.heartbeat_serving_process(process_id uuid, accepted_seq bigint)
 RETURNS void
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
  update app_public.serving_processes p
     set heartbeat_at = now(), accepted_seq = greatest(p.accepted_seq, heartbeat_serving_process.accepted_seq)
   where p.id = heartbeat_serving_process.process_id
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: Called by a keytrack process every few seconds: it is alive and has handed out request numbers up to accepted_seq.

CREATE OR REPLACE FUNCTION app_private.invalidate_attribution_rollups(since timestamp with time zone, until timestamp with time zone)
 RETURNS integer
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
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
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: Marks every UTC hour that overlaps [since, until) for a recount, so reads scan it raw and the next refresh counts it again from the raw rows. For changes that bypass triggers (UPDATE or DELETE with session_replication_role = replica, on a partition without triggers); rows inserted without triggers need nothing (they are settled by id). Returns how many hours it marked.

CREATE OR REPLACE FUNCTION app_private.is_admin()
 RETURNS boolean
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$
  select pg_has_role(
    case when current_setting('role') = 'none' then session_user
         else current_setting('role')::name end,
    'keytrack_admin', 'USAGE')
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: True when the calling role (the role setting, or the session user when none is set) has the privileges of keytrack_admin: the service maps ADMIN_API_KEY and admin users to it; the owner and superusers count too. Correct inside security definer functions.

CREATE OR REPLACE FUNCTION app_private.observe_attribution_latency(seconds double precision[])
 RETURNS void
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
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
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: Adds latencies (seconds) to the attribution latency histogram; one call per retry batch. Locks the buckets in ascending le (an ordered upsert), so concurrent batches never deadlock.

CREATE OR REPLACE FUNCTION app_private.record_requests(request_ids text[], created_ats timestamp with time zone[], api_key_hashes bytea[], api_key_ids uuid[], user_ids uuid[], models text[], providers text[], input_tokens integer[], output_tokens integer[], processing_times_ms integer[], statuses text[], error_messages text[], attribution_reasons text[], spooled_ats timestamp with time zone[], process_ids uuid[], process_seqs bigint[])
 RETURNS SETOF text
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
declare
  v_ids text[];
  v_pending boolean;
  v_late_hours timestamptz[];
  v_distributed boolean := false;
begin
  if pg_catalog.to_regclass('pg_catalog.pg_dist_partition') is not null then
    execute 'select exists (select 1 from pg_catalog.pg_dist_partition where logicalrelid = ''app_public.chat_completion_requests''::regclass)'
      into v_distributed;
  end if;
  if v_distributed then
    -- Citus (npm run db:distribute): the row trigger's Citus variant runs on the shards, row by row.
    return query
      insert into app_public.chat_completion_requests
        (request_id, created_at, api_key_hash, api_key_id, user_id, model, provider, input_tokens, output_tokens,
         processing_time_ms, status, error_message, attribution_reason, spooled_at, process_id, process_seq)
      select * from unnest(record_requests.request_ids, record_requests.created_ats, record_requests.api_key_hashes,
        record_requests.api_key_ids, record_requests.user_ids, record_requests.models, record_requests.providers,
        record_requests.input_tokens, record_requests.output_tokens, record_requests.processing_times_ms,
        record_requests.statuses, record_requests.error_messages, record_requests.attribution_reasons,
        record_requests.spooled_ats, record_requests.process_ids, record_requests.process_seqs)
      returning chat_completion_requests.request_id;
    return;
  end if;
  perform pg_catalog.set_config('keytrack.set_based_insert', 'on', true);
  with input as materialized (
    select u.*
      from unnest(record_requests.request_ids, record_requests.created_ats, record_requests.api_key_hashes,
        record_requests.api_key_ids, record_requests.user_ids, record_requests.models, record_requests.providers,
        record_requests.input_tokens, record_requests.output_tokens, record_requests.processing_times_ms,
        record_requests.statuses, record_requests.error_messages, record_requests.attribution_reasons,
        record_requests.spooled_ats, record_requests.process_ids, record_requests.process_seqs)
        with ordinality as u(request_id, created_at, api_key_hash, api_key_id, user_id, model, provider, input_tokens,
                             output_tokens, processing_time_ms, status, error_message, attribution_reason, spooled_at,
                             process_id, process_seq, ord)
  ), firsts as (
    -- As the trigger, row by row in the given order: the first row of a request id claims it, a later
    -- one (in this call, or recorded before) is skipped.
    select distinct on (i.request_id) i.* from input i order by i.request_id, i.ord
  ), claimed as (
    insert into app_private.request_ids (request_id, created_at)
      select f.request_id, f.created_at from firsts f order by f.ord
      on conflict do nothing
      returning request_id
  ), decided as (
    select f.*,
           by_hash.id as hash_key_id, by_hash.user_id as hash_user_id, by_hash.environment as hash_env,
           by_id.user_id as id_user_id, by_id.environment as id_env
      from firsts f
      join claimed c on c.request_id = f.request_id
      -- Index lookups per row (lateral), never a hash of every key: the batch is small, the keys are many.
      left join lateral (
        select k.id, k.user_id, k.environment from app_private.api_key_secrets s join app_public.api_keys k on k.id = s.api_key_id
         where s.key_hash = f.api_key_hash) by_hash on true
      left join lateral (
        select k.user_id, k.environment from app_public.api_keys k
         where f.api_key_hash is null and k.id = f.api_key_id) by_id on true
  ), inserted as (
    insert into app_public.chat_completion_requests
      (request_id, created_at, api_key_hash, api_key_id, user_id, is_anonymous, model, provider, input_tokens,
       output_tokens, processing_time_ms, status, error_message, attribution_status, attribution_method,
       attribution_reason, attribution_attempts, attribution_next_attempt_at, attribution_error, attributed_at,
       initial_attribution, spooled_at, process_id, process_seq)
    select d.request_id, d.created_at, d.api_key_hash,
           case when d.api_key_hash is not null then d.hash_key_id else d.api_key_id end,
           case when d.hash_key_id is not null then d.hash_user_id
                when d.api_key_hash is null and d.api_key_id is not null then coalesce(d.id_user_id, d.user_id)
                else d.user_id end,
           d.api_key_hash is null and d.api_key_id is null and d.user_id is null,
           d.model, d.provider, d.input_tokens, d.output_tokens, d.processing_time_ms, d.status, d.error_message,
           case when d.hash_key_id is not null or (d.api_key_hash is null and d.api_key_id is not null) then 'resolved'
                when d.api_key_hash is not null and d.attribution_reason = 'dev_bypass' then 'failed'
                when d.api_key_hash is not null then 'pending'
                when d.user_id is not null then 'failed'
                else 'anonymous' end,
           case when d.hash_key_id is not null then case when d.hash_env = 'development' then 'dev' else 'lookup' end
                when d.api_key_hash is null and d.api_key_id is not null then case when d.id_env = 'development' then 'dev' else 'lookup' end
           end,
           case when d.hash_key_id is not null or (d.api_key_hash is null and d.api_key_id is not null) then null
                when d.api_key_hash is not null and d.attribution_reason in ('dev_bypass', 'lookup_failed') then d.attribution_reason
                when d.api_key_hash is not null then 'not_found'
                when d.user_id is not null then 'no_key'
           end,
           case when d.api_key_hash is not null then 1 else 0 end,
           case when d.hash_key_id is null and d.api_key_hash is not null and d.attribution_reason is distinct from 'dev_bypass' then now() end,
           case when d.hash_key_id is null and d.api_key_hash is not null and d.attribution_reason = 'lookup_failed'
                then 'the writer''s own key lookup failed' end,
           case when d.hash_key_id is not null or (d.api_key_hash is null and d.api_key_id is not null) then now() end,
           case when d.hash_key_id is not null then case when d.hash_env = 'development' then 'resolved_dev' else 'resolved_lookup' end
                when d.api_key_hash is null and d.api_key_id is not null then case when d.id_env = 'development' then 'resolved_dev' else 'resolved_lookup' end
                when d.api_key_hash is not null and d.attribution_reason = 'dev_bypass' then 'failed_dev_bypass'
                when d.api_key_hash is not null and d.attribution_reason = 'lookup_failed' then 'pending_lookup_failed'
                when d.api_key_hash is not null then 'pending_not_found'
                when d.user_id is not null then 'failed_no_key'
                else 'anonymous' end,
           d.spooled_at, d.process_id, d.process_seq
      from decided d
     order by d.ord
    returning chat_completion_requests.request_id, chat_completion_requests.created_at, chat_completion_requests.attribution_status
  )
  select pg_catalog.array_agg(x.request_id), pg_catalog.bool_or(x.attribution_status = 'pending'),
         pg_catalog.array_agg(distinct pg_catalog.date_trunc('hour', x.created_at, 'UTC'))
           filter (where x.created_at < pg_catalog.date_trunc('hour', pg_catalog.clock_timestamp(), 'UTC'))
    into v_ids, v_pending, v_late_hours
    from inserted x;
  perform pg_catalog.set_config('keytrack.set_based_insert', '', true);
  -- As the trigger: after the rows (this transaction has its id and a write lock on the ledger), a row
  -- whose hour had already ended marks it for the rollups; one still open is covered by the refresh's fence.
  if v_late_hours is not null then
    insert into app_public.attribution_rollup_dirty_hours (hour) select h from pg_catalog.unnest(v_late_hours) h;
  end if;
  if v_pending then
    perform app_private.schedule_attribution_retry(now());
  end if;
  return query select r from pg_catalog.unnest(v_ids) r;
end;
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: Records many requests in one call, one array per column (all of the same length), exactly as that many INSERTs through the row trigger would: the request id claimed (a request id already recorded, or given twice, is skipped: its first row counts), the row attributed from api_key_hash, api_key_id, user_id or nothing, late hours marked for the rollups, the retry worker woken for pending rows. Returns the request ids recorded. Set-based (one claim, one join to the keys, one INSERT): less than half the cost the row trigger adds per row. On Citus it inserts through the row trigger.

CREATE OR REPLACE FUNCTION app_private.refresh_attribution_rollups()
 RETURNS app_private.attribution_rollup_refresh_result
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
 SET jit TO 'off'
 SET plan_cache_mode TO 'force_custom_plan'
AS $function$
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
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: The rollup worker's body (every minute): takes a fence (the last id drawn and the transactions writing the ledger), waits up to a second for them to end (else the next run settles it), then in one snapshot counts the rows up to that id into the minute and hour rollups, applies and removes the recorded changes of rows settled before, and recounts the hours marked for a recount. Cost: the rows inserted and changed since the last run (plus recounted hours), whatever their created_at. Idempotent; concurrent runs skip. Reads are exact whether or not it runs; it only makes them cheaper. Refuses (55000) if the ledger's id sequence has a cache.

CREATE OR REPLACE FUNCTION app_private.register_serving_process(host text, pid integer, version text)
 RETURNS uuid
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
  insert into app_public.serving_processes (host, pid, version) values (host, pid, version) returning id
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: Called by a keytrack process at start-up: registers it and returns its identity.

CREATE OR REPLACE FUNCTION app_private.resolve_pending_attributions(batch_size integer DEFAULT 500, max_attempts integer DEFAULT 10, base_delay interval DEFAULT '00:00:01'::interval, max_delay interval DEFAULT '00:10:00'::interval, as_of timestamp with time zone DEFAULT now(), woken_batch_size integer DEFAULT 5000)
 RETURNS app_private.attribution_retry_result
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
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
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: The retry worker's body. Takes first the pending rows whose key was imported since (app_private.attribution_wakes, oldest wake first, per hash through the pending-hash index), up to woken_batch_size; then rows due by as_of, up to what is left of batch_size; all with FOR UPDATE SKIP LOCKED (workers run in parallel and never wait on a row). Looks their key hash up again: found -> resolved (method retry); not found -> pending again after base_delay * 2^(attempts-1) (capped at max_delay), or failed (reason not_found) at max_attempts. Counts the outcomes in app_private.attribution_events and the latency of every row it resolves or fails in app_private.attribution_latency (one ordered upsert each per batch), removes the wakes it looked at that no pending row presents any more, and reschedules the worker (at once while wakes remain). Idempotent; never deadlocks with another worker, an import or a backfill.

CREATE OR REPLACE FUNCTION app_private.run_attribution_backfill_batch(backfill_id bigint)
 RETURNS app_public.attribution_backfills
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
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
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: Runs one batch of an attribution backfill (one short transaction): the next batch_size rows without api_key_id created before the run started, in (created_at, id) order from the saved cursor. Fills api_key_id from the key hash, else from the user's only key alive at the request's time (method backfill); leaves ambiguous rows NULL (reason ambiguous) and rows whose user had no key (reason no_key); flags rows with neither key nor user anonymous. Counts the outcomes in app_private.attribution_events (one upsert per batch). Resumable; finishes the run on a short batch.

CREATE OR REPLACE FUNCTION app_private.schedule_attribution_retry(run_at timestamp with time zone DEFAULT now())
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
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
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: Schedules the retry worker (task chat_completion_requests__resolve_pending) to run at run_at, unless a run is already due by then.

CREATE OR REPLACE FUNCTION app_private.stop_serving_process(process_id uuid, last_seq bigint)
 RETURNS void
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
  update app_public.serving_processes p
     set stopped_at = now(), heartbeat_at = now(), last_seq = stop_serving_process.last_seq,
         accepted_seq = greatest(p.accepted_seq, stop_serving_process.last_seq)
   where p.id = stop_serving_process.process_id
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: Called by a keytrack process at a clean shutdown, after its rows were written or spooled: the last request number it handed out.

CREATE OR REPLACE FUNCTION app_private.tg__set_updated_at()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
begin
  new.updated_at := greatest(now(), old.updated_at + interval '1 microsecond');
  return new;
end;
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: Trigger function: keeps updated_at strictly increasing on every update.

CREATE OR REPLACE FUNCTION app_private.tg_api_keys__notify_change()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
begin
  perform pg_notify('keytrack_key_changes', json_build_object('api_key_id', new.id)::text);
  return null;
end;
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: Trigger function (AFTER UPDATE on api_keys, when the revocation, expiry or owner changes): announces the key's id on the channel keytrack_key_changes, so every keytrack process drops its cached lookup of that key. Delivered at commit, only if the transaction commits.

CREATE OR REPLACE FUNCTION app_private.tg_chat_completion_requests__attribute()
 RETURNS trigger
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
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
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: Trigger function (BEFORE INSERT on chat_completion_requests): makes request_id idempotent and attributes the row from api_key_hash (resolved; pending, which wakes the retry worker, with reason not_found or, when the writer declared it, lookup_failed; failed with dev_bypass when the writer declared the development bypass), api_key_id, user_id (failed: no_key) or nothing (anonymous). Records the outcome in initial_attribution, and marks the row's hour dirty for the rollups when that hour has already ended.

CREATE OR REPLACE FUNCTION app_private.tg_chat_completion_requests__keep_initial_attribution()
 RETURNS trigger
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
begin
  raise exception 'initial_attribution is the insert-time outcome of request % and never changes', old.request_id
    using errcode = '55000';
end;
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: Trigger function (BEFORE UPDATE on chat_completion_requests, only when initial_attribution would change): refuses the change, so counters derived from it never go down.

CREATE OR REPLACE FUNCTION app_private.tg_chat_completion_requests__mark_rollup_hours()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
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
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: Trigger function (AFTER UPDATE/DELETE FOR EACH STATEMENT on chat_completion_requests, with transition tables): records in attribution_rollup_changes, with one INSERT per statement, the outcome each changed row left (-1) and entered (+1), for rows whose rolled-up columns changed (id, created_at, attribution_status, is_anonymous, whether user_id is set, initial_attribution), and -1 for each deleted row. Reads add these changes at once; the next refresh applies them to the rollups. Also keeps attribution_retry_latencies equal to the rows whose attribution_method is `retry`.

CREATE OR REPLACE FUNCTION app_private.tg_users__notify_change()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
begin
  perform pg_notify('keytrack_key_changes', json_build_object('user_id', old.id)::text);
  return null;
end;
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: Trigger function (AFTER UPDATE OF role or DELETE on users): announces the user's id on the channel keytrack_key_changes, so every keytrack process drops its cached lookups of that user's keys (their role decides admin rights).

CREATE OR REPLACE FUNCTION app_public.api_key_hash(key text)
 RETURNS bytea
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE STRICT
AS $function$ select sha256(convert_to(key, 'UTF8')) $function$;
-- acl: keytrack_admin=X/keytrack_owner, keytrack_analyst=X/keytrack_owner, keytrack_owner=X/keytrack_owner, keytrack_user=X/keytrack_owner
-- comment: @behavior -queryField
The hash keytrack stores and matches for an API key: sha256(convert_to(key, 'UTF8')) as bytea. Writers present this in chat_completion_requests.api_key_hash; the key itself is stored nowhere.

CREATE OR REPLACE FUNCTION app_public.api_key_tracking_quality_report(hours integer DEFAULT 24)
 RETURNS app_public.api_key_tracking_quality_report
 LANGUAGE plpgsql
 STABLE
 SET "TimeZone" TO 'UTC'
AS $function$
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
$function$;
-- acl: keytrack_admin=X/keytrack_owner, keytrack_analyst=X/keytrack_owner, keytrack_owner=X/keytrack_owner
-- comment: API key tracking quality over the last `hours` hours (1..168): the spec's report plus anonymous, pending and failed counts and the authenticated tracking rate, which decides the alert status (anonymous traffic never lowers it; no authenticated requests is no_data). Recommendations fire at 1% of authenticated requests naming a user but no key, pending or failed, at 20% of requests with neither key nor user, and below a 90% authenticated rate. From rollups plus the unsettled hours: equal to a raw scan. Admins and analysts.

CREATE OR REPLACE FUNCTION app_public.api_key_tracking_trend(days integer DEFAULT 7)
 RETURNS app_public.api_key_tracking_trend
 LANGUAGE plpgsql
 STABLE
 SET "TimeZone" TO 'UTC'
AS $function$
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
$function$;
-- acl: keytrack_admin=X/keytrack_owner, keytrack_analyst=X/keytrack_owner, keytrack_owner=X/keytrack_owner
-- comment: API key tracking per UTC calendar day over the last `days` days (1..30, today included so far), oldest first, with the period's summary (rate weighted by requests). From rollups plus the unsettled hours: equal to a raw scan. Admins and analysts.

CREATE OR REPLACE FUNCTION app_public.attribution_counts_by_hour(since timestamp with time zone, until timestamp with time zone DEFAULT 'infinity'::timestamp with time zone)
 RETURNS TABLE(hour timestamp with time zone, attribution_status text, is_anonymous boolean, has_user boolean, initial_attribution text, requests bigint)
 LANGUAGE plpgsql
 STABLE
 SET jit TO 'off'
 SET max_parallel_workers_per_gather TO '0'
 SET plan_cache_mode TO 'force_custom_plan'
AS $function$
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
$function$;
-- acl: keytrack_admin=X/keytrack_owner, keytrack_analyst=X/keytrack_owner, keytrack_owner=X/keytrack_owner, keytrack_user=X/keytrack_owner
-- comment: @behavior -queryField
Requests created in [since, until) counted per hour (date_trunc('hour', created_at) in the session's time zone) and attribution outcome, one row per key: hourly and minute rollups of the settled rows, plus their changes not applied yet, minus the settled rows of the edge minutes outside the window, plus the rows not settled yet (by id), all in one snapshot, so the result always equals a scan of the raw rows. Admins and analysts get rollups; other callers scan raw rows through their row-level security.

CREATE OR REPLACE FUNCTION app_public.attribution_latency_report(hours integer DEFAULT 24)
 RETURNS TABLE(attributed_after_retry bigint, p50_seconds double precision, p99_seconds double precision, max_seconds double precision, pending bigint, oldest_pending_seconds double precision)
 LANGUAGE plpgsql
 STABLE
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
 SET jit TO 'off'
AS $function$
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
$function$;
-- acl: keytrack_admin=X/keytrack_owner, keytrack_analyst=X/keytrack_owner, keytrack_owner=X/keytrack_owner
-- comment: How long attribution took for the rows that arrived in the last `hours` hours (1..168) and were resolved by the retry worker: how many, p50, p99 and max seconds from arrival to attribution (from attribution_retry_latencies); and the rows still pending (counted from the pending rows themselves, in the same scan as the oldest), with how long the oldest has waited.

CREATE OR REPLACE FUNCTION app_public.attribution_offenders(hours integer DEFAULT 24, max_rows integer DEFAULT 20)
 RETURNS SETOF app_public.attribution_offender
 LANGUAGE plpgsql
 STABLE
AS $function$
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
$function$;
-- acl: keytrack_admin=X/keytrack_owner, keytrack_analyst=X/keytrack_owner, keytrack_owner=X/keytrack_owner
-- comment: The key hashes and users behind the most unattributed (pending or failed) requests in the last `hours` hours (1..8760), most first, at most max_rows (1..1000) in all. A request naming both a user and a key hash counts for both. Admins and analysts.

CREATE OR REPLACE FUNCTION app_public.completeness_by_hour(hours integer DEFAULT 24, replay_window interval DEFAULT '00:10:00'::interval)
 RETURNS TABLE(process_id uuid, hour timestamp with time zone, recorded bigint, missing bigint, accepted bigint, completeness_ratio numeric)
 LANGUAGE plpgsql
 STABLE
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
declare
  v_since timestamptz;
begin
  if hours is null or hours < 1 or hours > 24 * 90 then
    raise exception 'hours must be between 1 and 2160, got %', hours using errcode = '22023';
  end if;
  v_since := date_trunc('hour', now(), 'UTC') - make_interval(hours => hours - 1);
  return query
  with recorded as (
    select r.process_id, date_trunc('hour', r.created_at, 'UTC') as hour, count(*) as n
      from app_public.chat_completion_requests r
     where r.process_id is not null and r.created_at >= v_since
     group by 1, 2
  ), missing as (
    -- A gap belongs to the hour of the last row before it (or of the time it was noticed).
    select g.process_id, date_trunc('hour', coalesce(g.after_request_at, g.before_request_at), 'UTC') as hour, sum(g.missing) as n
      from app_public.completeness_gaps(replay_window, v_since - interval '1 hour') g
     group by 1, 2
  )
  select coalesce(r.process_id, m.process_id), coalesce(r.hour, m.hour),
         coalesce(r.n, 0)::bigint, coalesce(m.n, 0)::bigint, (coalesce(r.n, 0) + coalesce(m.n, 0))::bigint,
         round(coalesce(r.n, 0)::numeric / nullif(coalesce(r.n, 0) + coalesce(m.n, 0), 0), 6)
    from recorded r full join missing m on m.process_id = r.process_id and m.hour = r.hour
   where coalesce(r.hour, m.hour) >= v_since
   order by 2, 1;
end;
$function$;
-- acl: keytrack_admin=X/keytrack_owner, keytrack_analyst=X/keytrack_owner, keytrack_owner=X/keytrack_owner
-- comment: Completeness per serving process and UTC hour over the last `hours` hours: rows recorded, numbers missing (completeness_gaps() with replay_window), accepted = recorded + missing, and the ratio recorded / accepted (1 when nothing is missing).

CREATE OR REPLACE FUNCTION app_public.completeness_gaps(replay_window interval DEFAULT '00:10:00'::interval, since timestamp with time zone DEFAULT (now() - '7 days'::interval))
 RETURNS TABLE(process_id uuid, host text, pid integer, process_state text, from_seq bigint, to_seq bigint, missing bigint, after_request_at timestamp with time zone, before_request_at timestamp with time zone)
 LANGUAGE plpgsql
 STABLE
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
declare
  v_since timestamptz := since;
  v_settled timestamptz := now() - replay_window;
begin
  return query
  with procs as (
    select p.*, app_public.serving_process_state(p) as state,
           coalesce(p.last_seq, p.accepted_seq) as expected_last
      from app_public.serving_processes p
     where coalesce(p.stopped_at, p.heartbeat_at) >= v_since
  ), rows_ as (
    select r.process_id, r.process_seq, r.created_at,
           lag(r.process_seq) over w as prev_seq, lag(r.created_at) over w as prev_at
      from app_public.chat_completion_requests r
      join procs p on p.id = r.process_id
     where r.created_at >= greatest(v_since, p.started_at - interval '1 minute')
    window w as (partition by r.process_id order by r.process_seq)
  ), inner_gaps as (
    -- Between two rows of a process: the numbers in between were accepted between their times.
    select r.process_id, coalesce(r.prev_seq, 0) + 1 as from_seq, r.process_seq - 1 as to_seq,
           r.prev_at as after_at, r.created_at as before_at
      from rows_ r
     where r.process_seq > coalesce(r.prev_seq, 0) + 1
  ), last_rows as (
    select distinct on (r.process_id) r.process_id, r.process_seq, r.created_at
      from rows_ r order by r.process_id, r.process_seq desc
  ), tail_gaps as (
    -- After a process's last row: numbers it handed out (by its heartbeat or its stop) with no row.
    select p.id as process_id, coalesce(l.process_seq, 0) + 1 as from_seq, p.expected_last as to_seq,
           l.created_at as after_at, coalesce(p.stopped_at, p.heartbeat_at) as before_at
      from procs p left join last_rows l on l.process_id = p.id
     where p.expected_last > coalesce(l.process_seq, 0)
  )
  select g.process_id, p.host, p.pid, p.state, g.from_seq, g.to_seq, g.to_seq - g.from_seq + 1,
         g.after_at, g.before_at
    from (select * from inner_gaps union all select * from tail_gaps) g
    join procs p on p.id = g.process_id
   -- Rows still in a spool may land within the replay window; a killed process's are reported at once.
   where g.before_at < v_settled or p.state = 'killed'
   order by p.started_at, g.from_seq;
end;
$function$;
-- acl: keytrack_admin=X/keytrack_owner, keytrack_analyst=X/keytrack_owner, keytrack_owner=X/keytrack_owner
-- comment: The request numbers that keytrack serving processes handed out (accepted requests) and that have no ledger row, as ranges per process: between two recorded rows, or after a process's last row up to the last number it reported (accepted_seq at its heartbeat, last_seq at a clean stop). Only gaps older than replay_window (rows may still be in a spool until then), except for killed processes, whose tail may be missing until their spool is replayed. Processes alive since `since`.

CREATE OR REPLACE FUNCTION app_public.create_api_key(user_id uuid, name text DEFAULT 'default'::text, environment text DEFAULT 'live'::text, expires_at timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS app_public.created_api_key
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
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
$function$;
-- acl: keytrack_admin=X/keytrack_owner, keytrack_owner=X/keytrack_owner, keytrack_user=X/keytrack_owner
-- comment: Creates an API key for a user and returns it with its secret, once (kt_live_... or kt_test_...). Admins for anyone; a user for themselves, up to keytrack.max_live_keys_per_user live keys (SQLSTATE 54000 past it). A key created by a caller authenticated with a key records it in created_by_api_key_id, and is revoked with it.

CREATE OR REPLACE FUNCTION app_public.current_user_id()
 RETURNS uuid
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ select nullif(current_setting('keytrack.user_id', true), '')::uuid $function$;
-- acl: keytrack_admin=X/keytrack_owner, keytrack_analyst=X/keytrack_owner, keytrack_owner=X/keytrack_owner, keytrack_user=X/keytrack_owner
-- comment: @behavior -queryField
The id of the user whose API key authenticated this request (the keytrack.user_id setting), or NULL.

CREATE OR REPLACE FUNCTION app_public.import_api_key(user_id uuid, key_hash bytea, name text DEFAULT 'imported'::text, environment text DEFAULT 'live'::text, prefix text DEFAULT NULL::text, last4 text DEFAULT NULL::text, expires_at timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS app_public.api_keys
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
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
$function$;
-- acl: keytrack_admin=X/keytrack_owner, keytrack_owner=X/keytrack_owner
-- comment: Registers a key issued by another system by its hash (sha256(convert_to(key, 'UTF8'))), for gateways that bring their own keys. When pending requests presented it, notes the hash in app_private.attribution_wakes and wakes the retry worker, which resolves them at once; it locks no ledger row, so it never deadlocks with the worker or a backfill. Admins only.

CREATE OR REPLACE FUNCTION app_public.import_api_keys(keys jsonb)
 RETURNS SETOF app_public.api_key_import_result
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
declare
  v_entry jsonb;
  v_pos integer := 0;
  v_hex text;
  v_hash bytea;
  v_user uuid;
  v_env text;
  v_expires timestamptz;
  v_existing record;
  v_key_id uuid;
  v_woken boolean := false;
  v_result app_public.api_key_import_result;
begin
  if not app_private.is_admin() then
    raise exception 'only admins may import keys' using errcode = '42501';
  end if;
  if keys is null or jsonb_typeof(keys) <> 'array' then
    raise exception 'keys must be a JSON array of objects {"key_hash": "<64 hex digits>", "user_id" or "user_email", "name", "environment", "prefix", "last4", "expires_at"}'
      using errcode = '22023';
  end if;
  if jsonb_array_length(keys) > 100000 then
    raise exception 'at most 100000 keys per call, got %', jsonb_array_length(keys) using errcode = '54000';
  end if;
  for v_entry in select value from jsonb_array_elements(keys) loop
    v_pos := v_pos + 1;
    v_result := row(v_pos, null, 'refused', null, null);
    begin
      if jsonb_typeof(v_entry) <> 'object' then
        v_result.reason := 'not an object';
        return next v_result;
        continue;
      end if;
      if v_entry ? 'key' or v_entry ? 'secret' then
        v_result.reason := 'plaintext keys are not accepted: give key_hash, the hex SHA-256 of the key''s UTF-8 bytes';
        return next v_result;
        continue;
      end if;
      v_hex := lower(v_entry ->> 'key_hash');
      v_result.key_hash_hex := v_hex;
      if v_hex is null or v_hex !~ '^[0-9a-f]{64}$' then
        v_result.reason := 'key_hash must be 64 hex digits (the SHA-256 of the key)';
        return next v_result;
        continue;
      end if;
      v_hash := decode(v_hex, 'hex');
      if v_entry ? 'user_id' then
        select u.id into v_user from app_public.users u where u.id = (v_entry ->> 'user_id')::uuid;
      else
        select u.id into v_user from app_public.users u where lower(u.email) = lower(v_entry ->> 'user_email');
      end if;
      if v_user is null then
        v_result.reason := 'no such user (give user_id or user_email of an existing user)';
        return next v_result;
        continue;
      end if;
      v_env := coalesce(v_entry ->> 'environment', 'live');
      if v_env not in ('live', 'test') then
        v_result.reason := format('environment must be live or test, got %s', v_env);
        return next v_result;
        continue;
      end if;
      v_expires := (v_entry ->> 'expires_at')::timestamptz;
      select s.api_key_id, k.user_id into v_existing
        from app_private.api_key_secrets s join app_public.api_keys k on k.id = s.api_key_id
       where s.key_hash = v_hash;
      if found then
        v_result.outcome := 'already_present';
        v_result.api_key_id := v_existing.api_key_id;
        v_result.reason := case when v_existing.user_id = v_user then 'registered with this user'
                                else 'registered with another user: not changed' end;
        return next v_result;
        continue;
      end if;
      insert into app_public.api_keys (user_id, name, prefix, last4, environment, source, expires_at)
        values (v_user, coalesce(v_entry ->> 'name', 'imported'), v_entry ->> 'prefix', v_entry ->> 'last4', v_env, 'imported', v_expires)
        returning id into v_key_id;
      insert into app_private.api_key_secrets (api_key_id, key_hash) values (v_key_id, v_hash);
      if exists (select 1 from app_public.chat_completion_requests r
                  where r.attribution_status = 'pending' and r.api_key_hash = v_hash) then
        insert into app_private.attribution_wakes (key_hash) values (v_hash)
          on conflict on constraint attribution_wakes_pkey do nothing;
        v_woken := true;
      end if;
      v_result.outcome := 'imported';
      v_result.api_key_id := v_key_id;
      return next v_result;
    exception
      -- A bad value in one entry (a malformed uuid or timestamp, a too long name) refuses that entry only.
      when invalid_text_representation or datetime_field_overflow or invalid_datetime_format
        or check_violation or string_data_right_truncation or unique_violation then
        v_result.outcome := 'refused';
        v_result.reason := sqlerrm;
        return next v_result;
    end;
  end loop;
  if v_woken then
    perform app_private.schedule_attribution_retry(now());
  end if;
end;
$function$;
-- acl: keytrack_owner=X/keytrack_owner
-- comment: Registers many keys issued by another system by their hashes, in one call (npm run keys:import uses it): keys is a JSON array of {"key_hash": hex SHA-256, "user_id" or "user_email", "name", "environment", "prefix", "last4", "expires_at"}. Returns one result per entry: imported, already_present (idempotent: nothing changed) or refused with the reason; never a plaintext key. Wakes the pending rows that presented the imported keys, once. Admins only.

CREATE OR REPLACE FUNCTION app_public.ledger_last_id()
 RETURNS bigint
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
  select pg_catalog.pg_sequence_last_value(pg_catalog.pg_get_serial_sequence('app_public.chat_completion_requests', 'id')::regclass)
$function$;
-- acl: keytrack_admin=X/keytrack_owner, keytrack_analyst=X/keytrack_owner, keytrack_owner=X/keytrack_owner, keytrack_user=X/keytrack_owner
-- comment: @behavior -queryField
The last id drawn for chat_completion_requests (NULL before the first), whatever the caller may read: when it equals attribution_rollup_state.settled_id, no row is unsettled and attribution_counts_by_hour() skips its raw scan by id.

CREATE OR REPLACE FUNCTION app_public.revoke_api_key(api_key_id uuid)
 RETURNS app_public.api_keys
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
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
$function$;
-- acl: keytrack_admin=X/keytrack_owner, keytrack_owner=X/keytrack_owner, keytrack_user=X/keytrack_owner
-- comment: Revokes a key, and every key made with it (created_by_api_key_id, transitively): they stop authenticating at once, but the rows stay so requests they made stay attributed. Revoking twice keeps the first revocation time. Admins, or the key's owner.

CREATE OR REPLACE FUNCTION app_public.serving_process_state(p app_public.serving_processes)
 RETURNS text
 LANGUAGE sql
 STABLE
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
  select case when p.stopped_at is not null then 'stopped'
              when p.heartbeat_at >= now() - interval '2 minutes' then 'running'
              else 'killed' end
$function$;
-- acl: keytrack_admin=X/keytrack_owner, keytrack_analyst=X/keytrack_owner, keytrack_owner=X/keytrack_owner
-- comment: stopped (shut down cleanly: last_seq is known), running (a heartbeat within 2 minutes), or killed (no heartbeat for 2 minutes and no clean stop: the numbers after accepted_seq are unknown, and rows it had spooled land only when a process restarts on its data folder).

CREATE OR REPLACE FUNCTION app_public.start_attribution_backfill(batch_size integer DEFAULT 1000)
 RETURNS app_public.attribution_backfills
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'public', 'pg_temp'
AS $function$
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
$function$;
-- acl: keytrack_admin=X/keytrack_owner, keytrack_owner=X/keytrack_owner
-- comment: Starts (or resumes, if one is running) the attribution backfill and queues it for the worker, which runs it batch by batch; `npm run backfill` runs the batches itself with a progress bar. Returns the run. Admins only.
