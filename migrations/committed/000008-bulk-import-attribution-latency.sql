--! Previous: sha1:cbb2d249d6d91586aa6ef0da380e96c35c8a357f
--! Hash: sha1:5990f60bb2b0315b0033d16e167f6572c43f7ae4
--! Message: Bulk key import by hash; attribution latency histogram and report

--! split: 1-bulk-key-import.sql
--------------------------------------------------------------------------------
-- Bulk key sync, for gateways whose keys live in another system: many keys in
-- one call, by hash. Idempotent: a key already registered is reported
-- (already_present), not an error; a bad entry is refused with its reason and
-- the others are imported. The pending rows that presented the imported keys
-- are woken once for the whole call (app_private.attribution_wakes).
--------------------------------------------------------------------------------

drop function if exists app_public.import_api_keys(jsonb);
drop type if exists app_public.api_key_import_result;

create type app_public.api_key_import_result as (
  position integer,
  key_hash_hex text,
  outcome text,
  reason text,
  api_key_id uuid
);
comment on type app_public.api_key_import_result is 'One entry of import_api_keys(): its position in the input (from 1), its hash, the outcome (imported, already_present, refused), why, and the key''s id.';
comment on column app_public.api_key_import_result.position is 'The entry''s position in the input array, from 1.';
comment on column app_public.api_key_import_result.key_hash_hex is 'The entry''s key hash as given (hex), when it had one.';
comment on column app_public.api_key_import_result.outcome is 'imported, already_present (a key with this hash is registered: nothing changed) or refused (see reason).';
comment on column app_public.api_key_import_result.reason is 'Why the entry was refused, or for already_present whether the registered key has the same user.';
comment on column app_public.api_key_import_result.api_key_id is 'The key''s id (new, or the one already registered).';

create function app_public.import_api_keys(keys jsonb) returns setof app_public.api_key_import_result
  language plpgsql volatile security definer
  set search_path = pg_catalog, public, pg_temp
  as $$
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
$$;
comment on function app_public.import_api_keys(jsonb) is
  'Registers many keys issued by another system by their hashes, in one call (npm run keys:import uses it): keys is a JSON array of {"key_hash": hex SHA-256, "user_id" or "user_email", "name", "environment", "prefix", "last4", "expires_at"}. Returns one result per entry: imported, already_present (idempotent: nothing changed) or refused with the reason; never a plaintext key. Wakes the pending rows that presented the imported keys, once. Admins only.';

--! split: 2-attribution-latency.sql
--------------------------------------------------------------------------------
-- Attribution latency, measured: for every row that was pending at insert and
-- reached its final attribution through the retry worker (resolved, or failed
-- at the attempt limit), the time from its arrival (created_at) to that moment,
-- counted in a cumulative histogram (app_private.attribution_latency) that
-- /metrics exports as keytrack_attribution_latency_seconds. One upsert per
-- worker batch, as for attribution_events.
--------------------------------------------------------------------------------

drop function if exists app_public.attribution_latency_report(integer);
drop function if exists app_private.attribution_latency_metrics();
drop function if exists app_private.observe_attribution_latency(double precision[]);
drop table if exists app_private.attribution_latency;

create table app_private.attribution_latency (
  le double precision primary key,
  observations bigint not null default 0 check (observations >= 0),
  sum_seconds double precision not null default 0,
  updated_at timestamptz not null default now()
);
alter table app_private.attribution_latency enable row level security;
comment on table app_private.attribution_latency is 'Histogram of attribution latency (seconds from a pending row''s arrival to its final attribution by the retry worker): observations with latency <= le and above the next smaller bound, one row per bucket (le = Infinity for the last); sum_seconds on the Infinity row is the total. Never decreasing.';
comment on column app_private.attribution_latency.le is 'The bucket''s upper bound in seconds (Infinity: everything above the largest bound).';
comment on column app_private.attribution_latency.observations is 'Rows whose latency fell in this bucket (not cumulative).';
comment on column app_private.attribution_latency.sum_seconds is 'Sum of the latencies counted in this bucket.';
comment on column app_private.attribution_latency.updated_at is 'When the bucket last changed.';
insert into app_private.attribution_latency (le)
  select unnest(array[0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 'Infinity'::double precision]);

create function app_private.observe_attribution_latency(seconds double precision[]) returns void
  language sql volatile security definer
  set search_path = pg_catalog, public, pg_temp
  as $$
  with bounds as (
    select b.le, lag(b.le) over (order by b.le) as above from app_private.attribution_latency b
  ), counted as (
    select b.le, count(s) as n, coalesce(sum(s), 0) as total
      from bounds b join unnest(seconds) s on s <= b.le and (b.above is null or s > b.above)
     group by b.le
  )
  update app_private.attribution_latency l
     set observations = l.observations + c.n, sum_seconds = l.sum_seconds + c.total, updated_at = now()
    from counted c where l.le = c.le
$$;
comment on function app_private.observe_attribution_latency(double precision[]) is
  'Adds latencies (seconds) to the attribution latency histogram; one call per retry batch.';
revoke all on function app_private.observe_attribution_latency(double precision[]) from public;

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
  v_latencies double precision[];
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
  'The retry worker''s body: takes up to batch_size pending rows, first those whose key was imported since (app_private.attribution_wakes), then those due by as_of (FOR UPDATE SKIP LOCKED: workers run in parallel and never wait on a row), and looks their key hash up again: found -> resolved (method retry); not found -> pending again after base_delay * 2^(attempts-1) (capped at max_delay), or failed (reason not_found) at max_attempts. Counts the outcomes in app_private.attribution_events and the latency of every row it resolves or fails in app_private.attribution_latency (one upsert each per batch), removes the woken hashes that no pending row presents any more, and reschedules the worker (at once while woken rows remain). Idempotent.';

create function app_private.attribution_latency_metrics()
returns table (le double precision, cumulative bigint, sum_seconds double precision, oldest_pending_seconds double precision)
  language sql stable security definer
  set search_path = pg_catalog, public, pg_temp
  as $$
  select l.le,
         (sum(l.observations) over (order by l.le))::bigint,
         sum(l.sum_seconds) over (),
         (select extract(epoch from now() - min(r.created_at))::double precision
            from app_public.chat_completion_requests r where r.attribution_status = 'pending')
    from app_private.attribution_latency l
   order by l.le
$$;
comment on function app_private.attribution_latency_metrics() is
  'For /metrics: the attribution latency histogram as Prometheus wants it (cumulative counts per upper bound, the sum), and how long the oldest pending row has waited (NULL when none).';
revoke all on function app_private.attribution_latency_metrics() from public;

create function app_public.attribution_latency_report(hours integer default 24)
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
  as $$
declare
  v_since timestamptz;
begin
  if hours is null or hours < 1 or hours > 168 then
    raise exception 'hours must be between 1 and 168, got %', hours using errcode = '22023';
  end if;
  v_since := now() - make_interval(hours => hours);
  return query
  select count(*),
         percentile_cont(0.5) within group (order by extract(epoch from r.attributed_at - r.created_at))::double precision,
         percentile_cont(0.99) within group (order by extract(epoch from r.attributed_at - r.created_at))::double precision,
         max(extract(epoch from r.attributed_at - r.created_at))::double precision,
         (select count(*) from app_public.chat_completion_requests p where p.attribution_status = 'pending'),
         (select extract(epoch from now() - min(p.created_at))::double precision
            from app_public.chat_completion_requests p where p.attribution_status = 'pending')
    from app_public.chat_completion_requests r
   where r.created_at >= v_since and r.attribution_method = 'retry';
end;
$$;
comment on function app_public.attribution_latency_report(integer) is
  'How long attribution took for the rows that arrived in the last `hours` hours (1..168) and were resolved by the retry worker: how many, p50, p99 and max seconds from arrival to attribution; and the rows still pending, with how long the oldest has waited.';
grant execute on function app_public.attribution_latency_report(integer) to keytrack_admin, keytrack_analyst;
