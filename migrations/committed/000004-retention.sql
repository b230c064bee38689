--! Previous: sha1:219ed516d3a3f7accc3fe3f04e44ee33cda5202b
--! Hash: sha1:a165ea3f0825a2a50eade21d295351781407ed67
--! Message: retention

--------------------------------------------------------------------------------
-- keytrack 000004: retention. Raw partitions older than RETENTION_DAYS are
-- dropped whole (cheap, no bloat); their hours' rollups are frozen first, so the
-- reports and metrics keep the history.
--------------------------------------------------------------------------------

drop function if exists app_private.drop_expired_partitions(interval, timestamptz);
create function app_private.drop_expired_partitions(retention interval, as_of timestamptz default now()) returns integer
  language plpgsql volatile
  set search_path = pg_catalog, public, pg_temp
  as $$
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
$$;
comment on function app_private.drop_expired_partitions(interval, timestamptz) is
  'Retention: drops the monthly partitions of chat_completion_requests whose whole month ended more than `retention` before as_of, after freezing the rollups of their hours (history stays in the reports and metrics) and deleting their request ids from the idempotency guard (a re-delivery of such an old request would be recorded again). Never drops the default partition or a month that is partly inside the window. Returns how many partitions it dropped. Run daily by the worker when RETENTION_DAYS is set.';
revoke all on function app_private.drop_expired_partitions(interval, timestamptz) from public;
