--! Previous: sha1:41d26dee0d3fd76c380678f5e89d8a18be0dcef9
--! Hash: sha1:b909557e839775ec6f2b5111ab2d6448e944ab71
--! Message: record_requests: set-based recording of many rows

--! split: 1-current.sql
--------------------------------------------------------------------------------
-- Set-based recording of many rows at once: app_private.record_requests().
--
-- The row trigger _500_attribute runs two statements per row (the request id
-- claim and the key lookup), each paying plpgsql's per-statement executor
-- work: 100-row batches went at 0.45x the rate of the same rows with the
-- triggers off. record_requests() does the same work for the whole batch in one
-- statement (one claim INSERT ... ON CONFLICT, one hash join to the keys, one
-- INSERT of attributed rows), and skips the row trigger for its own INSERT only.
-- Same rows, same columns, same exactly-once by request_id as the trigger
-- (tests/db/recordRequests.test.ts compares them column by column).
--------------------------------------------------------------------------------

-- The row trigger is skipped only while record_requests() inserts: it sets
-- keytrack.set_based_insert for its one INSERT and clears it right after (an
-- error aborts the transaction or the savepoint, which restores the setting).
drop trigger if exists _500_attribute on app_public.chat_completion_requests;
create trigger _500_attribute before insert on app_public.chat_completion_requests
  for each row
  when (pg_catalog.current_setting('keytrack.set_based_insert', true) is distinct from 'on')
  execute function app_private.tg_chat_completion_requests__attribute();
comment on trigger _500_attribute on app_public.chat_completion_requests is
  'Claims the request_id and attributes the row (see app_private.tg_chat_completion_requests__attribute); skipped for the rows app_private.record_requests() inserts, which it claims and attributes itself.';

drop function if exists app_private.record_requests(text[], timestamptz[], bytea[], uuid[], uuid[], text[], text[], int4[], int4[], int4[], text[], text[], text[], timestamptz[], uuid[], int8[]);
create function app_private.record_requests(
  request_ids text[], created_ats timestamptz[], api_key_hashes bytea[], api_key_ids uuid[], user_ids uuid[],
  models text[], providers text[], input_tokens int4[], output_tokens int4[], processing_times_ms int4[],
  statuses text[], error_messages text[], attribution_reasons text[], spooled_ats timestamptz[],
  process_ids uuid[], process_seqs int8[]
) returns setof text
  language plpgsql volatile security definer
  set search_path = pg_catalog, public, pg_temp
  as $$
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
$$;
comment on function app_private.record_requests(text[], timestamptz[], bytea[], uuid[], uuid[], text[], text[], int4[], int4[], int4[], text[], text[], text[], timestamptz[], uuid[], int8[]) is
  'Records many requests in one call, one array per column (all of the same length), exactly as that many INSERTs through the row trigger would: the request id claimed (a request id already recorded, or given twice, is skipped: its first row counts), the row attributed from api_key_hash, api_key_id, user_id or nothing, late hours marked for the rollups, the retry worker woken for pending rows. Returns the request ids recorded. Set-based (one claim, one join to the keys, one INSERT): less than half the cost the row trigger adds per row. On Citus it inserts through the row trigger.';
revoke all on function app_private.record_requests(text[], timestamptz[], bytea[], uuid[], uuid[], text[], text[], int4[], int4[], int4[], text[], text[], text[], timestamptz[], uuid[], int8[]) from public;
