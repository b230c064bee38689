// The hourly rollups never change an answer: every read that uses them (the
// spec's view, the quality report, the trend, the hourly counts behind the
// metrics) equals a scan of the raw rows in the same snapshot, at every moment:
// while rows arrive (in the current hour and late, into hours already rolled
// up), while the retry worker and the backfill change the attribution of old
// rows, while rows are deleted and while the rollups are refreshed; in any
// session time zone; for every role. Randomised (the seed is logged).
import test from "ava";
import pg from "pg";

import type { JobHelpers } from "graphile-worker";

import { REFRESH_ROLLUPS, refreshRollups } from "../../server/worker/tasks/rollups.js";
import { VIEW_QUERY } from "../helpers/specSql.js";
import { asRole, createKey, createTestDb, createUser, makePool, settleRollups, withClient, type TestDb } from "../helpers/db.js";
import { concurrentRun, transient } from "../helpers/concurrent.js";
import { sleep } from "../helpers/poll.js";

let db: TestDb;
/** Owner connections for the concurrent actors (the helper's pool has 5). */
let pool: pg.Pool;

test.before(async () => {
  db = await createTestDb();
  pool = makePool(db.ownerUrl, { max: 12 });
});
test.after.always(async () => {
  await pool?.end();
  await db?.drop();
});

type Queryable = Pick<pg.Pool, "query">;

/** compareAll on a connection of its own. */
async function compareNow(timeZones: readonly string[]): Promise<string[]> {
  const client = await pool.connect();
  try {
    return await compareAll(client, timeZones);
  } finally {
    client.release();
  }
}

/** A timestamptz as a number: node-pg gives -Infinity (not a Date) for '-infinity'. */
const at = (value: Date | number | null) => Number(value);

/** mulberry32: a small seeded PRNG, so a failure can be replayed. */
function prng(seed: number) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return { next, int: (n: number) => Math.floor(next() * n), pick: <T>(xs: readonly T[]) => xs[Math.floor(next() * xs.length)]! };
}

async function refresh(): Promise<{ settled_through: Date | null; recomputed_hours: number | null }> {
  return (await db.owner.query("select * from app_private.refresh_attribution_rollups()")).rows[0];
}

/** Sorted JSON lines, so multisets of rows compare as arrays. */
const canon = (rows: unknown[]) => rows.map((r) => JSON.stringify(r)).sort();

/**
 * Every rollup-backed read against the raw rows, inside one REPEATABLE READ
 * transaction (one snapshot, one now()). Returns the mismatches.
 */
async function compareAll(client: pg.ClientBase, timeZones: readonly string[]): Promise<string[]> {
  const problems: string[] = [];
  await client.query("begin isolation level repeatable read");
  try {
    for (const zone of timeZones) {
      await client.query(`set local timezone = '${zone}'`);
      const view = (await client.query("select * from app_public.api_key_tracking_quality")).rows;
      const spec = (await client.query(VIEW_QUERY.replace("FROM chat_completion_requests", "FROM app_public.chat_completion_requests"))).rows;
      if (JSON.stringify(view) !== JSON.stringify(spec)) problems.push(`view differs from the spec's SELECT (${zone})`);

      const hourly = (await client.query(`
        select hour, attribution_status, is_anonymous, has_user, initial_attribution, sum(requests)::int as n
          from app_public.attribution_counts_by_hour(now() - interval '9 days', now() + interval '1 hour')
         group by 1, 2, 3, 4, 5`)).rows;
      const hourlyRaw = (await client.query(`
        select date_trunc('hour', created_at) as hour, attribution_status, is_anonymous, user_id is not null as has_user,
               coalesce(initial_attribution, 'unknown') as initial_attribution, count(*)::int as n
          from app_public.chat_completion_requests
         where created_at >= now() - interval '9 days' and created_at < now() + interval '1 hour'
         group by 1, 2, 3, 4, 5`)).rows;
      if (JSON.stringify(canon(hourly)) !== JSON.stringify(canon(hourlyRaw))) problems.push(`hourly counts differ (${zone})`);
    }

    const all = (await client.query(`
      select attribution_status, is_anonymous, has_user, initial_attribution, sum(requests)::int as n
        from app_public.attribution_counts_by_hour('-infinity') group by 1, 2, 3, 4`)).rows;
    const allRaw = (await client.query(`
      select attribution_status, is_anonymous, user_id is not null as has_user, coalesce(initial_attribution, 'unknown') as initial_attribution,
             count(*)::int as n
        from app_public.chat_completion_requests group by 1, 2, 3, 4`)).rows;
    if (JSON.stringify(canon(all)) !== JSON.stringify(canon(allRaw))) problems.push("all-time counts differ");

    for (const hours of [1, 5, 24, 168]) {
      const report = (await client.query(`
        select total_requests::int as total, requests_with_api_key::int as with_key, null_key_with_valid_user::int as nkwu,
               both_null_likely_anonymous::int as both_null, anonymous_requests::int as anon,
               pending_attributions::int as pending, failed_attributions::int as failed
          from app_public.api_key_tracking_quality_report($1)`, [hours])).rows[0];
      const raw = (await client.query(`
        select count(*)::int as total, count(api_key_id)::int as with_key,
               count(*) filter (where api_key_id is null and user_id is not null)::int as nkwu,
               count(*) filter (where api_key_id is null and user_id is null)::int as both_null,
               count(*) filter (where is_anonymous)::int as anon,
               count(*) filter (where attribution_status = 'pending')::int as pending,
               count(*) filter (where attribution_status = 'failed')::int as failed
          from app_public.chat_completion_requests
         where created_at >= now() - make_interval(hours => $1) and created_at <= now()`, [hours])).rows[0];
      if (JSON.stringify(report) !== JSON.stringify(raw)) problems.push(`quality report (${hours} h) differs: ${JSON.stringify(report)} vs ${JSON.stringify(raw)}`);
    }

    for (const days of [1, 7, 30]) {
      const trend = (await client.query(`
        select d.date::text as date, d.total_requests::int as total, d.requests_with_api_key::int as with_key
          from unnest((app_public.api_key_tracking_trend($1)).trend_data) d order by 1`, [days])).rows;
      const raw = (await client.query(`
        select d::date::text as date, count(c.id)::int as total, count(c.api_key_id)::int as with_key
          from generate_series((now() at time zone 'UTC')::date - ($1 - 1), (now() at time zone 'UTC')::date, interval '1 day') d
          left join app_public.chat_completion_requests c
            on c.created_at >= d::date::timestamp at time zone 'UTC' and c.created_at < (d::date + 1)::timestamp at time zone 'UTC'
         group by 1 order by 1`, [days])).rows;
      if (JSON.stringify(trend) !== JSON.stringify(raw)) problems.push(`trend (${days} days) differs`);
    }
    await client.query("commit");
  } catch (err) {
    await client.query("rollback");
    throw err;
  }
  return problems;
}

interface World {
  knownHashes: string[];
  laterKeys: string[];
  neverHashes: string[];
  users: { one: string; two: string; none: string };
  bypassHash: string;
}

async function makeWorld(): Promise<World> {
  const one = await createUser(db, "one-key@example.com");
  const two = await createUser(db, "two-keys@example.com");
  const none = await createUser(db, "no-key@example.com");
  const k1 = await createKey(db, one);
  const k2a = await createKey(db, two, "a");
  const k2b = await createKey(db, two, "b");
  // Keys alive long before the rows, so the backfill can use them.
  await db.owner.query("update app_public.api_keys set created_at = now() - interval '60 days'");
  const hash = async (text: string) => (await db.owner.query("select encode(app_public.api_key_hash($1), 'hex') as h", [text])).rows[0].h as string;
  return {
    knownHashes: [await hash(k1.secret), await hash(k2a.secret), await hash(k2b.secret)],
    laterKeys: ["kt_live_later_1", "kt_live_later_2", "kt_live_later_3"],
    neverHashes: [await hash("kt_live_never_1"), await hash("kt_live_never_2")],
    users: { one, two, none },
    bypassHash: await hash("local-dev-bypass-key"),
  };
}

type Row = [requestId: string, createdAt: string, hashHex: string | null, userId: string | null, reason: string | null];

/** A random row: mostly attributed, every other outcome too; `late` rows go into the last 8 days. */
function randomRow(rnd: ReturnType<typeof prng>, w: World, laterHashes: string[], id: string, late: boolean): Row {
  const at = late ? new Date(Date.now() - rnd.int(8 * 24 * 3600) * 1000 - 1000) : new Date();
  const roll = rnd.int(100);
  let row: Row;
  if (roll < 55) row = [id, "", rnd.pick(w.knownHashes), null, null];
  else if (roll < 65) row = [id, "", rnd.pick(laterHashes), null, rnd.int(4) === 0 ? "lookup_failed" : null];
  else if (roll < 70) row = [id, "", rnd.pick(w.neverHashes), null, null];
  else if (roll < 80) row = [id, "", null, rnd.pick([w.users.one, w.users.two, w.users.none]), null];
  else if (roll < 83) row = [id, "", w.bypassHash, null, "dev_bypass"];
  else row = [id, "", null, null, null];
  row[1] = at.toISOString();
  return row;
}

async function insertRows(client: Queryable, rows: Row[]): Promise<void> {
  await client.query(
    `insert into app_public.chat_completion_requests (request_id, created_at, api_key_hash, user_id, attribution_reason, model)
     select r, t, decode(h, 'hex'), u, reason, 'gpt-4o'
       from unnest($1::text[], $2::timestamptz[], $3::text[], $4::uuid[], $5::text[]) as x(r, t, h, u, reason)`,
    [rows.map((r) => r[0]), rows.map((r) => r[1]), rows.map((r) => r[2]), rows.map((r) => r[3]), rows.map((r) => r[4])],
  );
}

/** Deadlocks and serialization failures between the mutators are expected; the loop goes on. */

test.serial("rollup-backed reads equal raw scans under concurrent inserts, late rows, retry, backfill, deletes and refreshes", async (t) => {
  const seed = Number(process.env.KEYTRACK_ROLLUP_SEED ?? Date.now() % 1_000_000);
  t.log(`seed ${seed} (KEYTRACK_ROLLUP_SEED=${seed} replays the data)`);
  const rnd = prng(seed);
  const w = await makeWorld();
  const laterHashes = await Promise.all(
    w.laterKeys.map(async (k) => (await db.owner.query("select encode(app_public.api_key_hash($1), 'hex') as h", [k])).rows[0].h as string),
  );

  // History: 3000 rows over the last 8 days, rolled up.
  let n = 0;
  const history: Row[] = [];
  for (let i = 0; i < 3000; i++) history.push(randomRow(rnd, w, laterHashes, `h-${n++}`, true));
  await insertRows(pool, history);
  await settleRollups(db.owner);
  // Attribution changes are recorded per row (and consumed by each refresh): count them by their identity sequence.
  const changesSql = "select coalesce(pg_sequence_last_value(pg_get_serial_sequence('app_public.attribution_rollup_changes', 'id')), 0) as m";
  const changesBefore = Number((await db.owner.query(changesSql)).rows[0].m);

  // Everything keeps writing for 8 s and until the checker has compared at least 3 times while they wrote.
  const { running, guard, checker, errors, problems, checks } = concurrentRun({ ms: 8000, minChecks: 3 });

  const writer = (name: string) =>
    guard(name, async () => {
      while (running()) {
        const rows: Row[] = [];
        const size = 1 + rnd.int(20);
        for (let i = 0; i < size; i++) {
          // A re-delivered request now and then (changes nothing).
          if (rnd.int(30) === 0 && n > 0) rows.push([`h-${rnd.int(n)}`, new Date().toISOString(), null, null, null]);
          else rows.push(randomRow(rnd, w, laterHashes, `${name}-${n++}`, rnd.int(3) === 0));
        }
        const unique = [...new Map(rows.map((r) => [r[0], r])).values()];
        await insertRows(pool, unique).catch((e) => {
          if (!transient(e)) throw e;
        });
        await sleep(rnd.int(15));
      }
    });

  const retrier = guard("retry", async () => {
    while (running()) {
      await pool.query(
        "select * from app_private.resolve_pending_attributions(200, 4, interval '1 ms', interval '1 ms', now() + interval '1 day')",
      ).catch((e) => {
        if (!transient(e)) throw e;
      });
      await sleep(50);
    }
  });

  const importer = guard("import", async () => {
    for (const key of w.laterKeys) {
      await sleep(1500);
      await db.owner.query("select app_public.import_api_key($1, app_public.api_key_hash($2))", [w.users.one, key]);
    }
  });

  const backfiller = guard("backfill", async () => {
    while (running()) {
      await sleep(1000);
      const run = (await pool.query("select id from app_public.start_attribution_backfill(200)")).rows[0];
      for (;;) {
        const r = await pool.query("select status from app_private.run_attribution_backfill_batch($1)", [run.id]).catch((e) => {
          if (transient(e)) return null;
          throw e;
        });
        if (r && r.rows[0].status !== "running") break;
      }
    }
  });

  const deleter = guard("delete", async () => {
    while (running()) {
      await sleep(700);
      await pool.query(
        `delete from app_public.chat_completion_requests where request_id = any($1)`,
        [[`h-${rnd.int(3000)}`, `h-${rnd.int(3000)}`]],
      ).catch((e) => {
        if (!transient(e)) throw e;
      });
    }
  });

  const refresher = guard("refresh", async () => {
    while (running()) {
      await refresh();
      await sleep(rnd.int(40));
    }
  });

  const check = checker(pool, (client) => compareAll(client, ["UTC", "America/New_York", "Asia/Kolkata"]));

  await Promise.all([writer("a"), writer("b"), retrier, importer, backfiller, deleter, refresher, check]);
  t.deepEqual(errors, []);
  t.deepEqual(problems, []);
  t.true(checks() >= 3, `${checks()} comparisons`);

  // The rollups were really in use, late rows and attribution changes really marked hours.
  const state = (await db.owner.query(`
    select (select settled_through from app_public.attribution_rollup_state) >= date_trunc('hour', now(), 'UTC') - interval '1 hour' as settled,
           (select count(*) from app_public.attribution_rollups_hourly)::int as rollup_rows,
           (select count(*) from app_public.chat_completion_requests
             where request_id ~ '^[ab]-' and created_at < date_trunc('hour', now(), 'UTC'))::int as late_rows,
           (select count(*) from app_public.chat_completion_requests where attribution_method in ('retry', 'backfill'))::int as changed`)).rows[0];
  t.true(state.settled);
  t.true(state.rollup_rows > 100);
  t.true(state.late_rows > 0, "late rows arrived");
  t.true(Number((await db.owner.query(changesSql)).rows[0].m) > changesBefore, "attribution changes and deletes were recorded for the rollups");
  t.true(state.changed > 0, "retry and backfill changed rows");

  // Once settled again, the same reads still equal the raw rows, as the analyst too.
  await settleRollups(db.owner);
  t.deepEqual(await compareNow(["UTC", "Australia/Adelaide"]), []);
  t.log(`${checks()} comparisons while writing; ${state.rollup_rows} rollup rows`);
});

test.serial("the analyst and a user read the view through their own row-level security", async (t) => {
  await settleRollups(db.owner);
  await withClient(db.analystUrl, async (c) => {
    t.deepEqual(await compareAll(c, ["UTC"]), []);
  });
  const user = (await db.owner.query("select id from app_public.users where email = 'one-key@example.com'")).rows[0].id;
  const { view, spec, all, rollups } = await asRole(
    db,
    "keytrack_user",
    { userId: user },
    async (client) => ({
      view: (await client.query("select * from app_public.api_key_tracking_quality")).rows,
      spec: (await client.query(VIEW_QUERY.replace("FROM chat_completion_requests", "FROM app_public.chat_completion_requests"))).rows,
      all: (await client.query("select count(*)::int as n from app_public.chat_completion_requests")).rows[0].n,
      rollups: (await client.query("select count(*)::int as n from app_public.attribution_rollups_hourly")).rows[0].n,
    }),
    { isolation: "repeatable read" },
  );
  t.deepEqual(view, spec);
  t.true(view.length > 0);
  t.true(all > 0, "the user has rows of their own");
  t.is(rollups, 0, "rollups are for admins and analysts only");
  const everyone = (await db.owner.query("select count(*)::int as n from app_public.chat_completion_requests")).rows[0].n;
  t.true(all < everyone, "only the user's own rows");
});

test.serial("an hour settles only after every transaction that was writing the ledger has ended", async (t) => {
  await db.root.query(`
    update app_public.attribution_rollup_state set settled_through = '-infinity', fence_transactions = null, fence_until = null, fence_set_at = null;
    truncate app_public.attribution_rollups_hourly, app_public.attribution_rollup_dirty_hours`);
  const writer = await db.owner.connect();
  try {
    await writer.query("begin");
    await writer.query(`insert into app_public.chat_completion_requests (request_id, created_at) values ('fence-open', now())`);
    const first = await refresh();
    const second = await refresh();
    t.is(at(first.settled_through), -Infinity);
    t.is(at(second.settled_through), -Infinity, "the open writer holds the fence");
    // Reads stay exact meanwhile (everything is read raw).
    t.deepEqual(await compareNow(["UTC"]), []);
    await writer.query("commit");
  } finally {
    writer.release();
  }
  const third = await refresh();
  t.true(at(third.settled_through) > 0, "settles once the writer has ended");
  const state = (await db.owner.query("select fence_transactions from app_public.attribution_rollup_state")).rows[0];
  t.true(state.fence_transactions === null || Array.isArray(state.fence_transactions));
});

test.serial("a late row into a settled hour is read raw at once (by id), then rolled up by the next refresh without a recount", async (t) => {
  await settleRollups(db.owner);
  const q = async () =>
    (await db.owner.query(`
      select coalesce(sum(requests), 0)::int as n from app_public.attribution_counts_by_hour(
        date_trunc('hour', now(), 'UTC') - interval '5 hours', date_trunc('hour', now(), 'UTC') - interval '4 hours')`)).rows[0].n;
  const before = await q();
  await db.owner.query(`
    insert into app_public.chat_completion_requests (request_id, created_at)
    values ('late-1', date_trunc('hour', now(), 'UTC') - interval '5 hours' + interval '17 minutes')`);
  const recounts = (await db.owner.query(`
    select count(*)::int as n from app_public.attribution_rollup_dirty_hours where recount`)).rows[0].n;
  t.is(recounts, 0, "a late row needs no recount: it is settled by id");
  t.is(await q(), before + 1, "counted at once");
  const r = await refresh();
  t.is(r.recomputed_hours, 0);
  t.is(await q(), before + 1, "still counted, now from the rollup");
  const rolled = (await db.owner.query(`
    select (select coalesce(sum(requests), 0) from app_public.attribution_rollups_hourly
             where hour = date_trunc('hour', now(), 'UTC') - interval '5 hours')::int as hourly,
           (select coalesce(sum(requests), 0) from app_public.attribution_rollups_minutely
             where minute = date_trunc('hour', now(), 'UTC') - interval '5 hours' + interval '17 minutes')::int as minute,
           (select count(*) from app_public.chat_completion_requests
             where created_at >= date_trunc('hour', now(), 'UTC') - interval '5 hours' + interval '17 minutes'
               and created_at < date_trunc('hour', now(), 'UTC') - interval '5 hours' + interval '18 minutes')::int as raw_minute`)).rows[0];
  t.is(rolled.hourly, before + 1);
  t.is(rolled.minute, rolled.raw_minute);
});

test.serial("freezing keeps the rollups of hours whose raw rows are gone (retention)", async (t) => {
  await settleRollups(db.owner);
  const hour = (await db.owner.query(`select date_trunc('hour', now(), 'UTC') - interval '6 hours' as h`)).rows[0].h as Date;
  await db.owner.query(`insert into app_public.chat_completion_requests (request_id, created_at) values ('to-drop', $1::timestamptz + interval '1 minute')`, [hour]);
  const after = new Date(hour.getTime() + 3600_000);
  const dirty = await db.owner.query("select app_private.freeze_attribution_rollups($1)", [after]).then(() => null, (e) => e);
  t.is(dirty?.code, "55000", "refuses while the hour is dirty");
  await settleRollups(db.owner);
  const count = async () =>
    (await db.owner.query(`select coalesce(sum(requests), 0)::int as n from app_public.attribution_counts_by_hour($1, $1::timestamptz + interval '1 hour')`, [hour])).rows[0].n;
  const before = await count();
  t.true(before >= 1);
  await db.owner.query("select app_private.freeze_attribution_rollups($1)", [after]);
  // As retention would: the raw rows vanish without triggers (a dropped partition).
  const client = await db.root.connect();
  try {
    await client.query("begin");
    await client.query("set local session_replication_role = replica");
    await client.query("delete from app_public.chat_completion_requests where created_at >= $1 and created_at < $2", [hour, after]);
    await client.query("commit");
  } finally {
    client.release();
  }
  await db.owner.query("select app_private.invalidate_attribution_rollups($1, $2)", [hour, after]);
  await refresh();
  t.is(await count(), before, "the frozen hour keeps its rollup, even marked dirty");
  const tooFar = await db.owner.query("select app_private.freeze_attribution_rollups(date_trunc('hour', now(), 'UTC') + interval '2 hours')").then(() => null, (e) => e);
  t.is(tooFar?.code, "55000", "cannot freeze hours that are not settled");
});

test.serial("the worker task settles the rollups", async (t) => {
  // From scratch (the freezing test froze hours whose raw rows it then removed: forget those too).
  await db.root.query(`
    update app_public.attribution_rollup_state
       set settled_through = '-infinity', frozen_before = '-infinity', fence_transactions = null, fence_until = null, fence_set_at = null;
    truncate app_public.attribution_rollups_hourly, app_public.attribution_rollup_dirty_hours`);
  const logged: string[] = [];
  const log = (line: string) => void logged.push(line);
  const helpers = {
    query: (text: string, values?: unknown[]) => pool.query(text, values),
    logger: { debug: log, info: log, warn: log, error: log },
  } as unknown as JobHelpers;
  t.is(REFRESH_ROLLUPS, "chat_completion_requests__refresh_rollups");
  await refreshRollups({}, helpers);
  await refreshRollups({}, helpers);
  const state = (await db.owner.query(
    `select settled_through = date_trunc('hour', now(), 'UTC') as settled, (select count(*) from app_public.attribution_rollups_hourly)::int as rows
       from app_public.attribution_rollup_state`,
  )).rows[0];
  t.true(state.settled);
  t.true(state.rows > 0);
  t.deepEqual(await compareNow(["UTC"]), []);
});
