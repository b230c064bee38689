--! Previous: sha1:b379377f2493792ab8ef47a5c34c03070ded835c
--! Hash: sha1:cbb2d249d6d91586aa6ef0da380e96c35c8a357f
--! Message: Completeness: serving processes number the requests they accept; gaps and completeness in SQL

--! split: 1-current.sql
--------------------------------------------------------------------------------
-- Completeness you can prove. Each keytrack serving process registers itself
-- (app_public.serving_processes) and numbers the requests it accepts, 1, 2, 3,
-- ... without gaps; every ledger row it writes carries (process_id,
-- process_seq). A row that never arrived is then a hole in a process's
-- numbering, which SQL can find: completeness_gaps() lists the holes older than
-- the spool's replay window, completeness_by_hour() gives recorded over
-- accepted per process and hour. Rows written by other writers through SQL
-- carry neither column and are not part of this accounting.
--
-- No foreign key from the ledger to serving_processes: every insert would take
-- a KEY SHARE lock on its process's one row, the hot-row pattern the ingestion
-- benchmarks warn about. The columns are set only by the service.
--------------------------------------------------------------------------------

drop function if exists app_public.completeness_by_hour(integer, interval);
drop function if exists app_public.completeness_gaps(interval, timestamptz);
drop function if exists app_private.completeness_metrics(interval);
drop function if exists app_private.stop_serving_process(uuid, bigint);
drop function if exists app_private.heartbeat_serving_process(uuid, bigint);
drop function if exists app_private.register_serving_process(text, integer, text);
drop function if exists app_public.serving_process_state(app_public.serving_processes);
drop index if exists app_public.chat_completion_requests_process_seq_idx;
alter table app_public.chat_completion_requests drop column if exists process_id, drop column if exists process_seq;
drop table if exists app_public.serving_processes;

create table app_public.serving_processes (
  id uuid primary key default gen_random_uuid(),
  host text not null check (length(host) between 1 and 255),
  pid integer not null check (pid > 0),
  version text not null check (length(version) between 1 and 100),
  started_at timestamptz not null default now(),
  heartbeat_at timestamptz not null default now(),
  accepted_seq bigint not null default 0 check (accepted_seq >= 0),
  stopped_at timestamptz,
  last_seq bigint check (last_seq >= 0),
  check ((stopped_at is null) = (last_seq is null))
);
alter table app_public.serving_processes enable row level security;
comment on table app_public.serving_processes is E'@behavior -insert -update -delete\nThe keytrack processes that serve requests, one row per start: each numbers the requests it accepts 1, 2, 3, ... and its ledger rows carry that number (chat_completion_requests.process_seq), so completeness_gaps() can find any row that never arrived.';
comment on column app_public.serving_processes.id is 'The process''s identity; chat_completion_requests.process_id.';
comment on column app_public.serving_processes.host is 'Host name of the machine it runs on.';
comment on column app_public.serving_processes.pid is 'Its operating-system process id.';
comment on column app_public.serving_processes.version is 'keytrack''s version (package.json).';
comment on column app_public.serving_processes.started_at is 'When it registered, at start-up.';
comment on column app_public.serving_processes.heartbeat_at is 'Its last sign of life (every few seconds while it runs).';
comment on column app_public.serving_processes.accepted_seq is 'The highest request number it had handed out at heartbeat_at (or at stopped_at).';
comment on column app_public.serving_processes.stopped_at is 'When it shut down cleanly; NULL while running, or if it was killed.';
comment on column app_public.serving_processes.last_seq is 'The last request number it handed out, recorded at a clean shutdown: every number up to it must have a row.';

create policy select_admin on app_public.serving_processes for select to keytrack_admin, keytrack_analyst using (true);
comment on policy select_admin on app_public.serving_processes is 'Admins and analysts see every serving process.';
grant select on app_public.serving_processes to keytrack_admin, keytrack_analyst;

alter table app_public.chat_completion_requests
  add column process_id uuid,
  add column process_seq bigint check (process_seq > 0),
  add constraint chat_completion_requests_process_check check ((process_id is null) = (process_seq is null));
comment on column app_public.chat_completion_requests.process_id is 'The keytrack serving process that accepted the request (serving_processes.id); NULL for rows written through SQL by other writers.';
comment on column app_public.chat_completion_requests.process_seq is 'The request''s number in its process''s numbering (1, 2, 3, ... in the order accepted); a missing number is a row that never arrived (completeness_gaps()).';
-- Existing partitions do not get the parent's column comments by themselves (new ones do: describe_partition).
do $$
declare
  v_part regclass;
  v_col text;
begin
  for v_part in select inhrelid::regclass from pg_inherits where inhparent = 'app_public.chat_completion_requests'::regclass loop
    foreach v_col in array array['process_id', 'process_seq'] loop
      execute format('comment on column %s.%I is %L', v_part, v_col,
        col_description('app_public.chat_completion_requests'::regclass,
          (select attnum from pg_attribute where attrelid = 'app_public.chat_completion_requests'::regclass and attname = v_col)));
    end loop;
  end loop;
end
$$;
create index chat_completion_requests_process_seq_idx on app_public.chat_completion_requests (process_id, process_seq)
  where process_id is not null;

create function app_public.serving_process_state(p app_public.serving_processes) returns text
  language sql stable
  set search_path = pg_catalog, public, pg_temp
  as $$
  select case when p.stopped_at is not null then 'stopped'
              when p.heartbeat_at >= now() - interval '2 minutes' then 'running'
              else 'killed' end
$$;
comment on function app_public.serving_process_state(app_public.serving_processes) is
  'stopped (shut down cleanly: last_seq is known), running (a heartbeat within 2 minutes), or killed (no heartbeat for 2 minutes and no clean stop: the numbers after accepted_seq are unknown, and rows it had spooled land only when a process restarts on its data folder).';
grant execute on function app_public.serving_process_state(app_public.serving_processes) to keytrack_admin, keytrack_analyst;

create function app_private.register_serving_process(host text, pid integer, version text) returns uuid
  language sql volatile security definer
  set search_path = pg_catalog, public, pg_temp
  as $$
  insert into app_public.serving_processes (host, pid, version) values (host, pid, version) returning id
$$;
comment on function app_private.register_serving_process(text, integer, text) is
  'Called by a keytrack process at start-up: registers it and returns its identity.';
revoke all on function app_private.register_serving_process(text, integer, text) from public;

create function app_private.heartbeat_serving_process(process_id uuid, accepted_seq bigint) returns void
  language sql volatile security definer
  set search_path = pg_catalog, public, pg_temp
  as $$
  update app_public.serving_processes p
     set heartbeat_at = now(), accepted_seq = greatest(p.accepted_seq, heartbeat_serving_process.accepted_seq)
   where p.id = heartbeat_serving_process.process_id
$$;
comment on function app_private.heartbeat_serving_process(uuid, bigint) is
  'Called by a keytrack process every few seconds: it is alive and has handed out request numbers up to accepted_seq.';
revoke all on function app_private.heartbeat_serving_process(uuid, bigint) from public;

create function app_private.stop_serving_process(process_id uuid, last_seq bigint) returns void
  language sql volatile security definer
  set search_path = pg_catalog, public, pg_temp
  as $$
  update app_public.serving_processes p
     set stopped_at = now(), heartbeat_at = now(), last_seq = stop_serving_process.last_seq,
         accepted_seq = greatest(p.accepted_seq, stop_serving_process.last_seq)
   where p.id = stop_serving_process.process_id
$$;
comment on function app_private.stop_serving_process(uuid, bigint) is
  'Called by a keytrack process at a clean shutdown, after its rows were written or spooled: the last request number it handed out.';
revoke all on function app_private.stop_serving_process(uuid, bigint) from public;

create function app_public.completeness_gaps(
  replay_window interval default interval '10 minutes',
  since timestamptz default now() - interval '7 days'
) returns table (
  process_id uuid,
  host text,
  pid integer,
  process_state text,
  from_seq bigint,
  to_seq bigint,
  missing bigint,
  after_request_at timestamptz,
  before_request_at timestamptz
)
  language plpgsql stable
  set search_path = pg_catalog, public, pg_temp
  as $$
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
$$;
comment on function app_public.completeness_gaps(interval, timestamptz) is
  'The request numbers that keytrack serving processes handed out (accepted requests) and that have no ledger row, as ranges per process: between two recorded rows, or after a process''s last row up to the last number it reported (accepted_seq at its heartbeat, last_seq at a clean stop). Only gaps older than replay_window (rows may still be in a spool until then), except for killed processes, whose tail may be missing until their spool is replayed. Processes alive since `since`.';
grant execute on function app_public.completeness_gaps(interval, timestamptz) to keytrack_admin, keytrack_analyst;

create function app_public.completeness_by_hour(
  hours integer default 24,
  replay_window interval default interval '10 minutes'
) returns table (
  process_id uuid,
  hour timestamptz,
  recorded bigint,
  missing bigint,
  accepted bigint,
  completeness_ratio numeric
)
  language plpgsql stable
  set search_path = pg_catalog, public, pg_temp
  as $$
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
$$;
comment on function app_public.completeness_by_hour(integer, interval) is
  'Completeness per serving process and UTC hour over the last `hours` hours: rows recorded, numbers missing (completeness_gaps() with replay_window), accepted = recorded + missing, and the ratio recorded / accepted (1 when nothing is missing).';
grant execute on function app_public.completeness_by_hour(integer, interval) to keytrack_admin, keytrack_analyst;

create function app_private.completeness_metrics(replay_window interval default interval '10 minutes')
returns table (process_id uuid, host text, state text, accepted_seq bigint, recorded bigint, missing bigint)
  language plpgsql stable security definer
  set search_path = pg_catalog, public, pg_temp
  as $$
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
$$;
comment on function app_private.completeness_metrics(interval) is
  'For /metrics: per serving process alive within the last day, the numbers it reported handing out, its rows in the ledger and the numbers missing past replay_window.';
revoke all on function app_private.completeness_metrics(interval) from public;
