// `npm run db:distribute`: turns a migrated single-node keytrack database on a
// Citus coordinator into a distributed one. Idempotent: run it again after
// every migration (it re-applies the Citus variants a migration may have
// replaced, or says which original it no longer recognises) and after
// citus_add_node (the new worker gets the request roles as NOLOGIN); move
// shards to a new worker with citus_rebalance_start().
//
// The design, and why (docs/scaling.md, "Citus: what the drill proved"):
//
// - app_public.chat_completion_requests is distributed by request_id (hash),
//   the one column that is never NULL (user and key are NULL on anonymous and
//   pending rows), with its monthly partitions, and app_private.request_ids
//   co-located with it: the idempotency claim in the insert trigger is an
//   insert into the co-located shard on the same node, so it stays local.
//   The primary key becomes (id, created_at, request_id): Citus requires the
//   distribution column in every unique constraint.
// - users, api_keys and api_key_secrets become reference tables (a copy on
//   every node): the insert trigger's key lookup reads the local copy.
// - Every other table (rollups, serving processes, backfill runs, counters,
//   wakes, graphile_worker) stays a plain table on the coordinator: small,
//   written by the coordinator's functions only.
// - The insert trigger runs on the shards (citus.enable_unsafe_triggers). Two
//   things it does on one node cannot run on a worker, so its Citus variant
//   leaves them out: scheduling the retry worker (graphile_worker lives on
//   the coordinator; pending rows are found by the minute sweep and by
//   import_api_key's wake on the coordinator) and marking late rows' hours
//   for the rollups.
// - The rollups are off: the statement triggers that record changes would
//   write coordinator tables from the shards, and the refresh's "one
//   statement, one snapshot" does not hold across nodes (Citus has no
//   distributed snapshot), so the refresh is a no-op, the rollup state stays
//   "nothing settled" and every report reads raw rows, aggregated on the
//   shards (exact; the cost grows with the window).
// - The retry worker and the backfill batch take their rows without FOR
//   UPDATE (not supported across shards): the retry one batch at a time under
//   an advisory lock, both updating a row only while it still needs it.
// - Row-level security runs in the shards' policies as the request's role:
//   keytrack_user and keytrack_admin may log in on the workers, and
//   keytrack.user_id reaches them as SET LOCAL (citus.propagate_set_commands,
//   and server/graphql/citusSettings.ts).
//
// Needs a superuser connection to keytrack's database (ROOT_DATABASE_URL's
// credentials, DATABASE_URL's database): creating distributed tables and
// changing database settings do.
import pg from "pg";

import { ConfigError, isConnected, loadConfig } from "../../server/config.js";
import { databaseNameOf, redactUrl, withDatabaseName } from "../../server/db/urls.js";

export const LEDGER = "app_public.chat_completion_requests";
export const REQUEST_IDS = "app_private.request_ids";
export const REFERENCE_TABLES = ["app_public.users", "app_public.api_keys", "app_private.api_key_secrets"];
/** The ledger's triggers that run on its shards; the others (rollup bookkeeping) are dropped. */
const SHARD_TRIGGERS = ["_200_keep_initial_attribution", "_500_attribute"];

export class DistributeError extends Error {}

export interface DistributeResult {
  /** What this run changed (empty: the database was distributed already). */
  changed: string[];
  workers: number;
  shards: number;
}

/** Functions that change the ledger's partitions. */
const SEQUENTIAL_FUNCTIONS = ["app_private.create_partitions(integer)", "app_private.drop_expired_partitions(interval, timestamp with time zone)"];

/** md5 of pg_get_functiondef() of the single-node functions replaced whole (as of migration 000010). */
const ORIGINALS: Record<string, string> = {
  "app_private.resolve_pending_attributions": "a8ecf267142e3d03adb65473b7062733",
  "app_private.refresh_attribution_rollups": "3db2e6f3e0665bbc5d430a89da65ad66",
};

/** Marks the Citus variants, so a re-run knows whether a migration replaced them. */
const MARK = "[citus variant: scripts/citus/distribute.ts]";

async function one<T>(client: pg.Client, sql: string, params: unknown[] = []): Promise<T> {
  return (await client.query(sql, params)).rows[0] as T;
}

async function isCitusTable(client: pg.Client, table: string): Promise<boolean> {
  return (await client.query("select 1 from pg_dist_partition where logicalrelid = $1::regclass", [table])).rowCount === 1;
}

/** Checks that this is a migrated keytrack database on a Citus coordinator with workers; throws DistributeError saying what is missing. */
async function checkPreconditions(client: pg.Client): Promise<number> {
  const db = await one<{ db: string; user: string; superuser: boolean }>(client,
    "select current_database() as db, current_user as user, (select rolsuper from pg_roles where rolname = current_user) as superuser");
  if (!db.superuser) throw new DistributeError(`needs a superuser connection: set ROOT_DATABASE_URL to a superuser on the coordinator (${db.db} is reached as ${db.user}, not a superuser)`);
  const available = await one<{ installed: string | null; available: string | null }>(client,
    "select (select extversion from pg_extension where extname = 'citus') as installed, (select default_version from pg_available_extensions where name = 'citus') as available");
  if (!available.installed) {
    throw new DistributeError(available.available
      ? `the citus extension is not created in database ${db.db}: run "create extension citus" there as a superuser, on the coordinator and on every worker (docs/operations.md, "Citus")`
      : `Citus is not installed on this PostgreSQL server (no citus extension available): install Citus ${"(13.x)"} and add shared_preload_libraries = 'citus'`);
  }
  const coordinator = await one<{ ok: boolean }>(client, "select citus_is_coordinator() as ok");
  if (!coordinator.ok) {
    throw new DistributeError(`database ${db.db} is not on a Citus coordinator: on the coordinator run select citus_set_coordinator_host('<its host>', <port>), then citus_add_node() for each worker; never run db:distribute on a worker`);
  }
  const { n } = await one<{ n: number }>(client, "select count(*)::int as n from pg_dist_node where groupid <> 0 and isactive and noderole = 'primary'");
  if (n === 0) throw new DistributeError("the coordinator has no active worker node: add them with select citus_add_node('<host>', <port>)");
  const ledger = await one<{ ok: boolean }>(client, "select to_regclass($1) is not null and to_regclass($2) is not null as ok", [LEDGER, REQUEST_IDS]);
  if (!ledger.ok) throw new DistributeError(`database ${db.db} has no keytrack schema: migrate it first (npm run db:migrate, or start keytrack once)`);
  const frozen = await one<{ frozen: string | null }>(client,
    "select frozen_before::text as frozen from app_public.attribution_rollup_state where frozen_before <> '-infinity'");
  if (frozen?.frozen) {
    throw new DistributeError(`the rollups are frozen before ${frozen.frozen} (retention dropped raw partitions): on Citus reports read raw rows only, so that history would vanish from them; not distributed`);
  }
  return n;
}

/** The insert trigger function's Citus variant, made from its current definition (so a migration's changes carry over). */
function citusTriggerFunction(definition: string): string {
  if (definition.includes(MARK)) return definition;
  const marks = /\n {2}-- After the insert above[^\n]*\n(?: {2}--[^\n]*\n)* {2}if new\.created_at < [\s\S]*?\n {4}end if;\n {2}end if;\n/;
  const schedule = "perform app_private.schedule_attribution_retry(now());";
  if (!marks.test(definition) || !definition.includes(schedule)) {
    throw new DistributeError(
      "app_private.tg_chat_completion_requests__attribute() is not the version db:distribute knows (a migration changed it): " +
        "update citusTriggerFunction() in scripts/citus/distribute.ts for it before distributing");
  }
  return definition
    .replace(marks, `\n  -- ${MARK} no rollup marks: on Citus the rollups are off and every report reads raw rows.\n`)
    .replace(schedule,
      "-- On a worker (no graphile_worker) the minute sweep and import_api_key's wake on the coordinator find the row.\n" +
      `      if pg_catalog.to_regnamespace('graphile_worker') is not null then\n        ${schedule}\n      end if;`);
}

/** Replaces each `from` (which must occur exactly once) in a function's definition, or explains which one a migration changed. */
function rewrite(name: string, definition: string, replacements: Array<[string, string]>): string {
  if (definition.includes(MARK)) return definition;
  let out = definition;
  for (const [from, to] of replacements) {
    if (out.split(from).length !== 2) {
      throw new DistributeError(`${name} is not the version db:distribute knows (a migration changed it near "${from.trim().slice(0, 60)}"): update its Citus variant in scripts/citus/distribute.ts before distributing`);
    }
    out = out.replace(from, to);
  }
  return out;
}

/**
 * The backfill batch's Citus variant: no FOR UPDATE on the ledger's rows (not
 * supported across shards; batches of a run are already serialized by the lock
 * on the run's row), each row updated by its request_id only while it still
 * has no key, and the values Citus cannot compute inside the UPDATE's CASE
 * (format(), now()) computed in the SELECT before it.
 */
function citusBackfillFunction(definition: string): string {
  return rewrite("app_private.run_attribution_backfill_batch()", definition, [
    ["\nbegin\n", `\nbegin\n  -- ${MARK}\n`],
    ["    select r.id, r.created_at, r.api_key_hash, r.user_id,", "    select r.request_id, r.id, r.created_at, r.api_key_hash, r.user_id,"],
    ["     limit v_run.batch_size\n     for update\n  ), decided as (", "     limit v_run.batch_size\n  ), decided as ("],
    ["    select b.id, b.created_at, b.is_anonymous as was_anonymous,", "    select b.request_id, b.id, b.created_at, b.is_anonymous as was_anonymous,"],
    ["           alive.n as alive_keys, alive.key_id as alive_key_id,\n",
     "           alive.n as alive_keys, alive.key_id as alive_key_id,\n" +
     "           format('the user had %s keys alive at the time', alive.n) as ambiguous_error, now() as decided_at,\n"],
    ["then format('the user had %s keys alive at the time', d.alive_keys) else", "then d.ambiguous_error else"],
    ["attributed_at = case when d.decision in ('hash', 'only_key') then now() end", "attributed_at = case when d.decision in ('hash', 'only_key') then d.decided_at end"],
    ["    where r.id = d.id and r.created_at = d.created_at\n", "    where r.request_id = d.request_id and r.id = d.id and r.created_at = d.created_at and r.api_key_id is null\n"],
  ]);
}

const RESOLVE_PENDING_SQL = `
create or replace function app_private.resolve_pending_attributions(
  batch_size integer default 500, max_attempts integer default 10, base_delay interval default '00:00:01'::interval,
  max_delay interval default '00:10:00'::interval, as_of timestamp with time zone default now(), woken_batch_size integer default 5000)
 returns app_private.attribution_retry_result
 language plpgsql
 security definer
 set search_path to 'pg_catalog', 'public', 'pg_temp'
as $function$
-- ${MARK}
declare
  v_result app_private.attribution_retry_result := row(0, 0, 0, 0, null);
  v_wakes bytea[];
  v_rids text[];
  v_more text[];
  v_room integer;
  v_hash bytea;
  v_latencies double precision[];
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
  -- FOR UPDATE SKIP LOCKED does not run across shards: one batch at a time
  -- instead (the job is single-keyed anyway); another batch running: nothing to do.
  if not pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext('keytrack resolve_pending_attributions')) then
    return v_result;
  end if;
  -- 1. Rows whose key was imported since they became pending.
  select coalesce(array_agg(aw.key_hash), '{}') into v_wakes
    from (select w.key_hash from app_private.attribution_wakes w order by w.woken_at, w.key_hash limit 1000) aw;
  select coalesce(array_agg(r.request_id), '{}') into v_rids
    from (select r.request_id from app_public.chat_completion_requests r
           where r.api_key_hash = any(v_wakes) and r.attribution_status = 'pending'
           limit woken_batch_size) r;
  -- 2. Rows due by their own schedule, in what is left of batch_size.
  v_room := batch_size - cardinality(v_rids);
  if v_room > 0 then
    select coalesce(array_agg(d.request_id), '{}') into v_more
      from (select r.request_id from app_public.chat_completion_requests r
             where r.attribution_status = 'pending' and r.attribution_next_attempt_at <= as_of
               and r.request_id <> all (v_rids)
             order by r.attribution_next_attempt_at
             limit v_room) d;
    v_rids := v_rids || v_more;
  end if;
  -- 3. Look every taken row's key up again (reference tables) and update it by
  -- its distribution column, only while it is still pending.
  -- (Citus evaluates no stable function inside the UPDATE's CASE: every new value is computed in the SELECT.)
  with found as (
    select r.request_id, r.id, r.created_at, r.user_id, r.attribution_attempts + 1 as attempts, k.id as key_id, k.user_id as key_user_id
      from app_public.chat_completion_requests r
      left join app_private.api_key_secrets s on s.key_hash = r.api_key_hash
      left join app_public.api_keys k on k.id = s.api_key_id
     where r.request_id = any(v_rids) and r.attribution_status = 'pending'
  ), looked_up as (
    select f.request_id, f.id, f.created_at, f.attempts, f.key_id,
           coalesce(f.key_user_id, f.user_id) as user_id,
           case when f.key_id is not null then 'resolved' when f.attempts >= max_attempts then 'failed' else 'pending' end as status,
           case when f.key_id is not null then 'retry' end as method,
           case when f.key_id is not null then null else 'not_found' end as reason,
           case when f.key_id is null then format('no key has this hash (attempt %s of %s)', f.attempts, max_attempts) end as error,
           case when f.key_id is not null then as_of end as attributed_at,
           case when f.key_id is null and f.attempts < max_attempts
                then as_of + least(max_delay, base_delay * power(2, least(f.attempts - 1, 30))) end as next_attempt_at,
           greatest(extract(epoch from as_of - f.created_at), 0)::double precision as latency
      from found f
  ), updated as (
    update app_public.chat_completion_requests r set
      api_key_id = l.key_id,
      user_id = l.user_id,
      attribution_attempts = l.attempts,
      attribution_status = l.status,
      attribution_method = l.method,
      attribution_reason = l.reason,
      attribution_error = l.error,
      attributed_at = l.attributed_at,
      attribution_next_attempt_at = l.next_attempt_at
    from looked_up l
    where r.request_id = l.request_id and r.id = l.id and r.created_at = l.created_at and r.attribution_status = 'pending'
    returning r.id, r.created_at, r.attribution_status, r.attribution_method, r.attributed_at, l.latency
  ), latencies as (
    -- What the (dropped) statement trigger kept on one node: the rows resolved by retry.
    insert into app_public.attribution_retry_latencies (row_id, created_at, attributed_at)
    select u.id, u.created_at, u.attributed_at from updated u where u.attribution_method = 'retry'
    on conflict (row_id, created_at) do update set attributed_at = excluded.attributed_at
  )
  select count(*)::int,
         count(*) filter (where u.attribution_status = 'resolved')::int,
         count(*) filter (where u.attribution_status = 'failed')::int,
         count(*) filter (where u.attribution_status = 'pending')::int,
         array_agg(u.latency) filter (where u.attribution_status <> 'pending')
    into v_result.examined, v_result.resolved, v_result.failed, v_result.still_pending, v_latencies
    from updated u;
  if v_result.examined > 0 then
    perform app_private.count_attribution_events(
      array['retry_resolved', 'retry_still_pending', 'retry_failed'],
      array[v_result.resolved, v_result.still_pending, v_result.failed]::bigint[]);
  end if;
  if v_latencies is not null then
    perform app_private.observe_attribution_latency(v_latencies);
  end if;
  -- 4. A wake is done once no pending row presents it.
  foreach v_hash in array v_wakes loop
    if not exists (select 1 from app_public.chat_completion_requests r
                    where r.api_key_hash = v_hash and r.attribution_status = 'pending') then
      delete from app_private.attribution_wakes w where w.key_hash = v_hash;
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
$function$`;

const REFRESH_ROLLUPS_SQL = `
create or replace function app_private.refresh_attribution_rollups()
 returns app_private.attribution_rollup_refresh_result
 language sql
 set search_path to 'pg_catalog', 'public', 'pg_temp'
as $function$
  -- ${MARK}
  update app_public.attribution_rollup_state set refreshed_at = now();
  select '-infinity'::timestamptz, 0, 0, null::timestamptz;
$function$`;

const COMMENTS: Record<string, string> = {
  "app_private.resolve_pending_attributions(integer, integer, interval, interval, timestamp with time zone, integer)":
    "Citus variant (scripts/citus/distribute.ts) of the retry worker's body: the same outcomes and counters as on one node, but rows are taken without FOR UPDATE SKIP LOCKED (not supported across shards): one batch at a time under an advisory lock, each row updated by its request_id only while still pending. Also records rows resolved by retry in attribution_retry_latencies (the statement trigger that does it on one node is dropped on Citus).",
  "app_private.refresh_attribution_rollups()":
    "Citus variant (scripts/citus/distribute.ts): does nothing. Settling by id behind a fence needs one snapshot of the whole ledger, which a Citus cluster does not have; the rollup state stays at nothing settled, so every report reads raw rows (aggregated on the shards), exactly.",
};

/** Distributes the database at url (a superuser connection to keytrack's database on the coordinator). */
export async function distribute(url: string, log: (line: string) => void = () => {}): Promise<DistributeResult> {
  const client = new pg.Client({ connectionString: url, application_name: "keytrack-distribute" });
  await client.connect();
  const changed: string[] = [];
  const step = async (what: string, sql: string, params: unknown[] = []) => {
    log(what);
    await client.query(sql, params);
    changed.push(what);
  };
  try {
    const workers = await checkPreconditions(client);
    // One db:distribute at a time; keytrack may keep running meanwhile (writes wait for the ledger's lock while it is copied).
    await client.query("select pg_advisory_lock(hashtext('keytrack db:distribute'))");
    await client.query("set citus.enable_unsafe_triggers = on");
    const { db } = await one<{ db: string }>(client, "select current_database() as db");
    // Partitions made later by create_partitions() inherit the ledger's triggers: Citus refuses those without it.
    const setting = await one<{ on: boolean }>(client,
      `select exists (select 1 from pg_db_role_setting s join pg_database d on d.oid = s.setdatabase
                       where d.datname = current_database() and s.setrole = 0
                         and 'citus.enable_unsafe_triggers=on' = any(s.setconfig)) as on`);
    if (!setting.on) await step(`alter database ${db} set citus.enable_unsafe_triggers = on`, `alter database ${pg.escapeIdentifier(db)} set citus.enable_unsafe_triggers = on`);
    // One connection per worker per statement: measured on a 2-core machine (docs/scaling.md), a 500-row INSERT
    // through the coordinator took 125 ms with 1 and 1.8-3 s with Citus's default of up to 16 (each a new backend
    // on the worker, for statements that fan out to 32 shards). Raise it on workers with many cores.
    const pool = await one<{ on: boolean }>(client,
      `select exists (select 1 from pg_db_role_setting s join pg_database d on d.oid = s.setdatabase
                       where d.datname = current_database() and s.setrole = 0
                         and exists (select 1 from unnest(s.setconfig) c where c like 'citus.max_adaptive_executor_pool_size=%')) as on`);
    if (!pool.on) await step(`alter database ${db} set citus.max_adaptive_executor_pool_size = 1`, `alter database ${pg.escapeIdentifier(db)} set citus.max_adaptive_executor_pool_size = 1`);
    // Row-level security runs in the shards' policies, on the workers: the keytrack.user_id setting must reach them.
    // Citus forwards SET LOCAL with this (the service sends it: server/graphql/citusSettings.ts), never set_config().
    const propagate = await one<{ on: boolean }>(client,
      `select exists (select 1 from pg_db_role_setting s join pg_database d on d.oid = s.setdatabase
                       where d.datname = current_database() and s.setrole = 0
                         and 'citus.propagate_set_commands=local' = any(s.setconfig)) as on`);
    if (!propagate.on) await step(`alter database ${db} set citus.propagate_set_commands = 'local'`, `alter database ${pg.escapeIdentifier(db)} set citus.propagate_set_commands = 'local'`);
    // The Citus variants of four functions, first: the shards' triggers must never run the single-node body (it
    // schedules the retry worker through graphile_worker, which the workers lack). On the coordinator they behave as
    // before until the tables are distributed. CREATE OR REPLACE of a distributed function reaches every node.
    const trigger = await one<{ def: string }>(client, "select pg_get_functiondef('app_private.tg_chat_completion_requests__attribute()'::regprocedure) as def");
    const variant = citusTriggerFunction(trigger.def);
    if (variant !== trigger.def) await step("Citus variant of app_private.tg_chat_completion_requests__attribute()", variant);
    const backfill = await one<{ def: string }>(client, "select pg_get_functiondef('app_private.run_attribution_backfill_batch(bigint)'::regprocedure) as def");
    const backfillVariant = citusBackfillFunction(backfill.def);
    if (backfillVariant !== backfill.def) await step("Citus variant of app_private.run_attribution_backfill_batch()", backfillVariant);
    for (const [name, sql] of [["app_private.resolve_pending_attributions", RESOLVE_PENDING_SQL], ["app_private.refresh_attribution_rollups", REFRESH_ROLLUPS_SQL]] as const) {
      const { def, md5 } = await one<{ def: string; md5: string }>(client,
        "select pg_get_functiondef(to_regproc($1)) as def, md5(pg_get_functiondef(to_regproc($1))) as md5", [name]);
      if (def.includes(MARK)) {
        // Replaced again (cheap, and this file may hold a newer variant): not a change.
        await client.query(sql);
        continue;
      }
      // Whole replacements: only of the single-node version they were written from, so a migration's change is never lost silently.
      if (md5 !== ORIGINALS[name]) {
        throw new DistributeError(`${name}() is not the version db:distribute knows (a migration changed it, md5 ${md5}): update its Citus variant and ORIGINALS in scripts/citus/distribute.ts before distributing`);
      }
      await step(`Citus variant of ${name}()`, sql);
    }
    // The ledger's trigger functions on every node now: inside the transaction below Citus would not create them there.
    for (const fn of ["app_private.tg_chat_completion_requests__attribute()", "app_private.tg_chat_completion_requests__keep_initial_attribution()"]) {
      const distributed = await one<{ ok: boolean }>(client,
        "select exists (select 1 from pg_dist_object where classid = 'pg_proc'::regclass and objid = $1::regprocedure) as ok", [fn]);
      if (!distributed.ok) await step(`${fn} on every node`, "select create_distributed_function($1)", [fn]);
    }
    // Foreign keys among the reference tables and from the ledger: dropped while the tables change kind, then added back.
    // All of it in one transaction that first locks the tables against writes (reads go on): a row written between
    // dropping the ledger's triggers and creating them on the shards would skip its attribution and its request-id
    // claim. Writers wait for the copy (the service's rows wait in memory or its spool); a failure changes nothing.
    const ledgerDistributed = await isCitusTable(client, LEDGER);
    let referencesDone = true;
    for (const t of REFERENCE_TABLES) referencesDone &&= await isCitusTable(client, t);
    const converting = !(ledgerDistributed && referencesDone);
    if (converting) {
      await client.query("begin");
      // One connection per node for the whole transaction: it adds foreign keys to reference tables after copying.
      await client.query("set local citus.multi_shard_modify_mode to 'sequential'");
      await client.query(`lock table ${[LEDGER, REQUEST_IDS, ...REFERENCE_TABLES].join(", ")} in exclusive mode`);
    }
    const fks = ledgerDistributed && referencesDone ? [] : (await client.query<{ tbl: string; name: string; def: string }>(
      `select c.conrelid::regclass::text as tbl, c.conname as name, pg_get_constraintdef(c.oid) as def
         from pg_constraint c
        where c.contype = 'f' and c.conparentid = 0
          and (c.conrelid = any($1::regclass[]) or c.confrelid = any($1::regclass[]))`,
      [[...REFERENCE_TABLES, LEDGER]])).rows;
    for (const fk of fks) await step(`drop foreign key ${fk.name} on ${fk.tbl}`, `alter table ${fk.tbl} drop constraint ${pg.escapeIdentifier(fk.name)}`);
    for (const table of REFERENCE_TABLES) {
      if (await isCitusTable(client, table)) continue;
      await step(`reference table ${table}`, "select create_reference_table($1)", [table]);
      await client.query("select truncate_local_data_after_distributing_table($1)", [table]);
    }

    if (!ledgerDistributed) {
      // The ledger's triggers must not fire while Citus copies its rows into the shards (the copy would find
      // every request_id claimed already and skip its row): dropped now, created again once it is distributed.
      const triggers = (await client.query<{ name: string; def: string }>(
        `select t.tgname as name, pg_get_triggerdef(t.oid) as def from pg_trigger t
          where t.tgrelid = $1::regclass and not t.tgisinternal order by t.tgname`, [LEDGER])).rows;
      for (const t of triggers) await step(`drop trigger ${t.name} on ${LEDGER}`, `drop trigger ${pg.escapeIdentifier(t.name)} on ${LEDGER}`);
      const pk = await one<{ def: string }>(client,
        "select pg_get_constraintdef(oid) as def from pg_constraint where conrelid = $1::regclass and conname = 'chat_completion_requests_pkey'", [LEDGER]);
      if (pk && !pk.def.includes("request_id")) {
        await step(`primary key of ${LEDGER}: (id, created_at, request_id)`,
          `alter table ${LEDGER} drop constraint chat_completion_requests_pkey`);
        await client.query(`alter table ${LEDGER} add constraint chat_completion_requests_pkey primary key (id, created_at, request_id)`);
      }
      if (!(await isCitusTable(client, REQUEST_IDS))) {
        await step(`distributed table ${REQUEST_IDS} by request_id`, "select create_distributed_table($1, 'request_id')", [REQUEST_IDS]);
        await client.query("select truncate_local_data_after_distributing_table($1)", [REQUEST_IDS]);
      }
      await step(`distributed table ${LEDGER} by request_id, co-located with ${REQUEST_IDS}`,
        "select create_distributed_table($1, 'request_id', colocate_with => $2)", [LEDGER, REQUEST_IDS]);
      const parts = (await client.query<{ part: string }>("select inhrelid::regclass::text as part from pg_inherits where inhparent = $1::regclass", [LEDGER])).rows;
      for (const { part } of [{ part: LEDGER }, ...parts]) await client.query("select truncate_local_data_after_distributing_table($1)", [part]);
      for (const t of triggers.filter((x) => SHARD_TRIGGERS.includes(x.name))) {
        await step(`trigger ${t.name} on ${LEDGER} (runs on the shards)`, t.def);
      }
    }
    for (const fk of fks) await step(`foreign key ${fk.name} on ${fk.tbl}`, `alter table ${fk.tbl} add constraint ${pg.escapeIdentifier(fk.name)} ${fk.def}`);
    if (converting) await client.query("commit");

    // A migration run after distribution may have put the rollup triggers back: they would write coordinator tables from the shards.
    const extra = (await client.query<{ name: string }>(
      "select tgname as name from pg_trigger where tgrelid = $1::regclass and not tgisinternal and tgname <> all($2)", [LEDGER, SHARD_TRIGGERS])).rows;
    for (const t of extra) await step(`drop trigger ${t.name} on ${LEDGER} (rollup bookkeeping: off on Citus)`, `drop trigger ${pg.escapeIdentifier(t.name)} on ${LEDGER}`);

    // DDL on the ledger (attaching and detaching partitions) after reading its shards in parallel: Citus wants one
    // connection per node in such a transaction when the table has foreign keys to reference tables.
    for (const fn of SEQUENTIAL_FUNCTIONS) {
      const { set } = await one<{ set: boolean }>(client,
        "select coalesce('citus.multi_shard_modify_mode=sequential' = any(proconfig), false) as set from pg_proc where oid = $1::regprocedure", [fn]);
      if (!set) await step(`${fn}: citus.multi_shard_modify_mode = sequential`, `alter function ${fn} set citus.multi_shard_modify_mode = 'sequential'`);
    }
    for (const [fn, comment] of Object.entries(COMMENTS)) await client.query(`comment on function ${fn} is ${pg.escapeLiteral(comment)}`);

    // Rollups off: nothing settled, so every read is raw (and exact); what the single node had rolled up goes.
    const state = await one<{ settled: boolean }>(client,
      "select settled_through <> '-infinity' or settled_id <> 0 or fence_id is not null as settled from app_public.attribution_rollup_state");
    const leftovers = await one<{ n: number }>(client,
      `select (select count(*) from app_public.attribution_rollups_hourly) + (select count(*) from app_public.attribution_rollups_minutely)
            + (select count(*) from app_public.attribution_rollup_changes) + (select count(*) from app_public.attribution_rollup_dirty_hours) as n`);
    if (state?.settled || Number(leftovers.n) > 0) {
      await step("rollups emptied; rollup state: nothing settled (reports read raw rows)", `
        truncate app_public.attribution_rollups_hourly, app_public.attribution_rollups_minutely,
                 app_public.attribution_rollup_changes, app_public.attribution_rollup_dirty_hours;
        update app_public.attribution_rollup_state set settled_through = '-infinity', settled_id = 0,
               fence_id = null, fence_transactions = null, fence_until = null, fence_set_at = null`);
    }

    // Citus reaches the workers as the current role: the roles requests switch to (NOLOGIN on the coordinator, where
    // only the authenticator logs in) must log in on the workers. Last: creating distributed objects propagates
    // their roles to the workers again, as NOLOGIN. Workers must accept connections from the
    // coordinator only (pg_hba.conf), as in any Citus cluster.
    const logins = await client.query<{ nodename: string; nodeport: number; result: string }>(
      `select nodename, nodeport, result from run_command_on_workers($1) where not success or result <> '2'`,
      [`select count(*) from pg_roles where rolname in ('keytrack_admin', 'keytrack_user') and rolcanlogin and has_database_privilege(rolname, current_database(), 'connect')`]);
    if (logins.rowCount) {
      await step(`workers: keytrack_admin and keytrack_user may log in and connect (they run the shards' row-level security)`,
        "select * from run_command_on_workers($1)",
        [`set citus.enable_ddl_propagation = off; alter role keytrack_admin login; alter role keytrack_user login; grant connect on database ${pg.escapeIdentifier(db)} to keytrack_admin, keytrack_user`]);
      const failed = (await client.query<{ nodename: string; nodeport: number; result: string }>(
        `select nodename, nodeport, result from run_command_on_workers($1) where not success or result <> '2'`,
        [`select count(*) from pg_roles where rolname in ('keytrack_admin', 'keytrack_user') and rolcanlogin and has_database_privilege(rolname, current_database(), 'connect')`])).rows;
      if (failed.length) throw new DistributeError(`could not let keytrack_admin and keytrack_user log in on ${failed.map((f) => `${f.nodename}:${f.nodeport} (${f.result})`).join(", ")}`);
    }

    const { shards } = await one<{ shards: number }>(client,
      "select count(*)::int as shards from pg_dist_shard where logicalrelid = $1::regclass", [LEDGER]);
    return { changed, workers, shards };
  } finally {
    await client.end().catch(() => {});
  }
}

async function main(): Promise<number> {
  let config;
  try {
    config = loadConfig();
  } catch (err) {
    if (err instanceof ConfigError) {
      console.error(`db:distribute: ${err.message}`);
      return 2;
    }
    throw err;
  }
  if (!isConnected(config)) {
    console.error("db:distribute: set DATABASE_URL to keytrack's database on the Citus coordinator (the embedded PostgreSQL has no Citus)");
    return 2;
  }
  const database = databaseNameOf(config.db.databaseUrl);
  const url = withDatabaseName(config.db.rootDatabaseUrl, database);
  console.error(`db:distribute: ${redactUrl(url)}`);
  try {
    const result = await distribute(url, (line) => console.error(`db:distribute: ${line}`));
    console.log(result.changed.length
      ? `db:distribute: done (${result.changed.length} changes); ${result.shards} ledger shards on ${result.workers} workers`
      : `db:distribute: already distributed, nothing to do; ${result.shards} ledger shards on ${result.workers} workers`);
    return 0;
  } catch (err) {
    if (err instanceof DistributeError) {
      console.error(`db:distribute: ${err.message}`);
      return 1;
    }
    const e = err as { message: string; code?: string };
    const sqlstate = e.code && /^[0-9A-Z]{5}$/.test(e.code) ? ` (SQLSTATE ${e.code})` : "";
    console.error(`db:distribute: failed: ${e.message}${sqlstate}`);
    return 1;
  }
}

if (import.meta.url === `file://${process.argv[1]}`) process.exit(await main());
