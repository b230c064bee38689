// Rows settle by id into minute and hour rollups (migrations/current/2-reads.sql):
// reads over any window (edges inside a minute, the current hour, future rows,
// time zones whose hours are not UTC hours) equal a scan of the raw rows at
// every moment, while rows arrive (now, late, in the future), change (updates,
// retry, backfill), vanish (deletes), hours are invalidated for a recount and
// the rollups are refreshed. Randomised (the seed is logged).
import test from "ava";
import pg from "pg";

import { createKey, createTestDb, createUser, makePool, settleRollups, type TestDb } from "../helpers/db.js";
import { concurrentRun, transient } from "../helpers/concurrent.js";
import { sleep } from "../helpers/poll.js";

let db: TestDb;
let pool: pg.Pool;

test.before(async () => {
  db = await createTestDb();
  pool = makePool(db.ownerUrl, { max: 10 });
});
test.after.always(async () => {
  await pool?.end();
  await db?.drop();
});

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

const canon = (rows: unknown[]) => rows.map((r) => JSON.stringify(r)).sort();
const ZONES = ["UTC", "Asia/Kolkata", "Asia/Kathmandu", "America/St_Johns", "Europe/Paris"] as const;

/** One window, as SQL expressions evaluated in the checker's snapshot. */
function randomWindow(rnd: ReturnType<typeof prng>): [string, string] {
  // Offsets in microseconds, so edges fall anywhere inside a minute.
  const back = (maxSeconds: number) => `now() - make_interval(secs => ${(rnd.int(maxSeconds * 1000) / 1000).toFixed(3)}) - interval '${rnd.int(1000)} microseconds'`;
  const since = rnd.pick([back(3 * 3600), back(3600), back(300), back(60), "'-infinity'::timestamptz", "date_trunc('hour', now(), 'UTC')", "date_trunc('minute', now(), 'UTC') - interval '7 minutes'"]);
  const until = rnd.pick(["now() + interval '1 microsecond'", "'infinity'::timestamptz", back(120), back(1800), "now() + interval '3 minutes 1 second'", "date_trunc('minute', now(), 'UTC')"]);
  return [since, until];
}

async function compareWindows(client: pg.ClientBase, windows: Array<[string, string]>): Promise<string[]> {
  const problems: string[] = [];
  await client.query("begin isolation level repeatable read");
  try {
    for (const zone of ZONES) {
      await client.query(`set local timezone = '${zone}'`);
      for (const [since, until] of windows) {
        const rolled = (await client.query(`
          select hour, attribution_status, is_anonymous, has_user, initial_attribution, requests::int as n
            from app_public.attribution_counts_by_hour(${since}, ${until})`)).rows;
        const raw = (await client.query(`
          select date_trunc('hour', created_at) as hour, attribution_status, is_anonymous, user_id is not null as has_user,
                 coalesce(initial_attribution, 'unknown') as initial_attribution, count(*)::int as n
            from app_public.chat_completion_requests
           where created_at >= ${since} and created_at < ${until}
           group by 1, 2, 3, 4, 5`)).rows;
        if (JSON.stringify(canon(rolled)) !== JSON.stringify(canon(raw))) {
          problems.push(`[${since}, ${until}) in ${zone}: ${rolled.length} rolled-up groups vs ${raw.length} raw`);
        }
      }
    }
    await client.query("commit");
  } catch (err) {
    await client.query("rollback");
    throw err;
  }
  return problems;
}

test.serial("reads over any window equal raw scans while rows arrive, change and vanish and the rollups settle by id", async (t) => {
  const seed = Number(process.env.KEYTRACK_ROLLUP_SEED ?? Date.now() % 1_000_000);
  t.log(`seed ${seed} (KEYTRACK_ROLLUP_SEED=${seed} replays the data)`);
  const rnd = prng(seed);
  const user = await createUser(db, "minutes@example.com");
  const other = await createUser(db, "minutes-other@example.com");
  const key = await createKey(db, user);
  const hash = (await db.owner.query("select encode(app_public.api_key_hash($1), 'hex') as h", [key.secret])).rows[0].h as string;
  const unknown = (await db.owner.query("select encode(app_public.api_key_hash('kt_live_unknown'), 'hex') as h")).rows[0].h as string;

  let n = 0;
  /** A row created `secondsAgo` before now (negative: in the future), any outcome. */
  const row = (prefix: string, secondsAgo: number) => {
    const roll = rnd.int(10);
    return {
      id: `${prefix}-${n++}`,
      at: secondsAgo,
      hash: roll < 5 ? hash : roll < 7 ? unknown : null,
      user: roll === 7 ? user : roll === 8 ? other : null,
    };
  };
  const insert = async (rows: ReturnType<typeof row>[]) => {
    await pool.query(
      `insert into app_public.chat_completion_requests (request_id, created_at, api_key_hash, user_id)
       select r, now() - make_interval(secs => s), decode(h, 'hex'), u
         from unnest($1::text[], $2::float8[], $3::text[], $4::uuid[]) as x(r, s, h, u)`,
      [rows.map((r) => r.id), rows.map((r) => r.at), rows.map((r) => r.hash), rows.map((r) => r.user)],
    ).catch((e) => {
      if (!transient(e)) throw e;
    });
  };
  // History: the last 3 hours, a busy last few minutes, rows on minute boundaries, a few in the future.
  const history = [];
  for (let i = 0; i < 1500; i++) history.push(row("h", rnd.int(3 * 3600 * 1000) / 1000));
  for (let i = 0; i < 500; i++) history.push(row("h", rnd.int(300 * 1000) / 1000));
  for (let i = 0; i < 10; i++) history.push(row("h", -rnd.int(240)));
  await insert(history);
  await db.owner.query(`
    insert into app_public.chat_completion_requests (request_id, created_at)
    select 'boundary-' || g, date_trunc('minute', now(), 'UTC') - make_interval(mins => g) from generate_series(0, 90) g`);
  await settleRollups(db.owner);

  // Everything keeps writing for 8 s and until the checker has compared at least 3 times while they wrote.
  const { running, guard, checker, errors, problems, checks } = concurrentRun({ ms: 8000, minChecks: 3 });

  const writer = (name: string) =>
    guard(name, async () => {
      while (running()) {
        const rows = [];
        for (let i = 0, size = 1 + rnd.int(30); i < size; i++) {
          const kind = rnd.int(10);
          rows.push(row(name, kind < 6 ? 0 : kind < 9 ? rnd.int(3 * 3600) : -rnd.int(200)));
        }
        await insert(rows);
        await sleep(rnd.int(10));
      }
    });

  const updater = guard("update", async () => {
    while (running()) {
      // Failed rows naming a user lose it, keyless anonymous-looking failed rows gain one.
      await pool.query(
        `update app_public.chat_completion_requests set user_id = case when user_id is null then $1::uuid end
          where attribution_status = 'failed' and id in (select id from app_public.chat_completion_requests
                                                          where attribution_status = 'failed' order by random() limit 5)`,
        [other],
      ).catch((e) => {
        if (!transient(e)) throw e;
      });
      await pool.query("select * from app_private.resolve_pending_attributions(50, 3, interval '1 ms', interval '1 ms', now() + interval '1 day')").catch((e) => {
        if (!transient(e)) throw e;
      });
      await sleep(rnd.int(60));
    }
  });

  const importer = guard("import", async () => {
    await sleep(3000);
    await db.owner.query("select app_public.import_api_key($1, app_public.api_key_hash('kt_live_unknown'))", [user]);
  });

  const deleter = guard("delete", async () => {
    while (running()) {
      await pool.query("delete from app_public.chat_completion_requests where request_id = any($1)", [
        [`h-${rnd.int(2000)}`, `a-${rnd.int(n)}`, `b-${rnd.int(n)}`],
      ]).catch((e) => {
        if (!transient(e)) throw e;
      });
      await sleep(300);
    }
  });

  const invalidator = guard("invalidate", async () => {
    while (running()) {
      await sleep(1500);
      const ago = 1 + rnd.int(3);
      await pool.query(
        `select app_private.invalidate_attribution_rollups(date_trunc('hour', now(), 'UTC') - make_interval(hours => $1),
                                                           date_trunc('hour', now(), 'UTC') - make_interval(hours => $1 - 1))`,
        [ago],
      );
    }
  });

  const refresher = guard("refresh", async () => {
    while (running()) {
      await pool.query("select * from app_private.refresh_attribution_rollups()");
      await sleep(rnd.int(200));
    }
  });

  const check = checker(pool, (client) => compareWindows(client, Array.from({ length: 4 }, () => randomWindow(rnd))));

  await Promise.all([writer("a"), writer("b"), updater, importer, deleter, invalidator, refresher, check]);
  t.deepEqual(errors, []);
  t.deepEqual(problems, []);
  t.true(checks() >= 3, `${checks()} comparisons`);

  // Settled again: everything is in the rollups, nothing is left to read raw.
  await settleRollups(db.owner);
  await settleRollups(db.owner);
  const state = (await db.owner.query(`
    select s.settled_id = (select max(id) from app_public.chat_completion_requests) as all_settled,
           (select count(*) from app_public.attribution_rollup_changes)::int as changes,
           (select count(*) from app_public.attribution_rollup_dirty_hours)::int as marks,
           (select count(*) from app_public.attribution_rollups_minutely where minute >= date_trunc('hour', now(), 'UTC'))::int as current_hour_minutes
      from app_public.attribution_rollup_state s`)).rows[0];
  t.true(state.all_settled, "every row settled, the current hour's too");
  t.is(state.changes, 0);
  t.is(state.marks, 0);
  t.true(state.current_hour_minutes > 0);
  const client = await pool.connect();
  try {
    t.deepEqual(await compareWindows(client, Array.from({ length: 6 }, () => randomWindow(rnd))), []);
  } finally {
    client.release();
  }
  // The retry latencies are exactly the rows the retry worker resolved, and the report equals a raw scan.
  const latencies = (await db.owner.query(`
    select (select count(*) from (select row_id, created_at, attributed_at from app_public.attribution_retry_latencies
                                  except all
                                  select id, created_at, attributed_at from app_public.chat_completion_requests where attribution_method = 'retry'
                                  union all
                                  (select id, created_at, attributed_at from app_public.chat_completion_requests where attribution_method = 'retry'
                                   except all
                                   select row_id, created_at, attributed_at from app_public.attribution_retry_latencies)) d)::int as differences,
           (select count(*) from app_public.attribution_retry_latencies)::int as rows`)).rows[0];
  t.is(latencies.differences, 0);
  t.true(latencies.rows > 0, "the retry worker resolved rows");
  const report = (await db.owner.query("select to_jsonb(r) - 'oldest_pending_seconds' as r from app_public.attribution_latency_report(24) r")).rows[0].r;
  const raw = (await db.owner.query(`
    select to_jsonb(x) as r from (
      select count(*) as attributed_after_retry,
             percentile_cont(0.5) within group (order by extract(epoch from attributed_at - created_at))::double precision as p50_seconds,
             percentile_cont(0.99) within group (order by extract(epoch from attributed_at - created_at))::double precision as p99_seconds,
             max(extract(epoch from attributed_at - created_at))::double precision as max_seconds,
             (select count(*) from app_public.chat_completion_requests where attribution_status = 'pending') as pending
        from app_public.chat_completion_requests where created_at >= now() - interval '24 hours' and attribution_method = 'retry') x`)).rows[0].r;
  t.deepEqual(report, raw);
  t.log(`${checks()} comparisons of ${4 * ZONES.length} windows while writing`);
});

test.serial("rows settle only once the transaction that drew their ids has ended", async (t) => {
  await settleRollups(db.owner);
  const writer = await db.owner.connect();
  try {
    await writer.query("begin");
    const { rows } = await writer.query(
      "insert into app_public.chat_completion_requests (request_id, created_at) values ('fence-row', now() - interval '2 hours') returning id",
    );
    const id = Number(rows[0].id);
    // A later insert, committed: its id is above the open writer's.
    await db.owner.query("insert into app_public.chat_completion_requests (request_id) values ('fence-after')");
    await db.owner.query("select * from app_private.refresh_attribution_rollups()");
    const during = (await db.owner.query("select settled_id::int as s, fence_id::int as f from app_public.attribution_rollup_state")).rows[0];
    t.true(during.s < id, "not settled past a row whose writer is still open");
    t.true(during.f >= id, "the fence waits for it");
    await writer.query("commit");
  } finally {
    writer.release();
  }
  await db.owner.query("select * from app_private.refresh_attribution_rollups()");
  const after = (await db.owner.query(`
    select s.settled_id >= (select max(id) from app_public.chat_completion_requests) as settled,
           (select coalesce(sum(requests), 0) from app_public.attribution_rollups_hourly)::int as rolled,
           (select count(*) from app_public.chat_completion_requests)::int as raw
      from app_public.attribution_rollup_state s`)).rows[0];
  t.true(after.settled);
  t.is(after.rolled, after.raw, "the rollups hold every row");
});

test.serial("the refresh refuses to settle by id when the id sequence has a cache; reads stay exact", async (t) => {
  const seq = (await db.owner.query("select pg_get_serial_sequence('app_public.chat_completion_requests', 'id') as s")).rows[0].s as string;
  await db.owner.query(`alter sequence ${seq} cache 20`);
  try {
    const err = await db.owner.query("select * from app_private.refresh_attribution_rollups()").then(() => null, (e) => e);
    t.is(err?.code, "55000");
    await db.owner.query("insert into app_public.chat_completion_requests (request_id) values ('cached-1')");
    const client = await pool.connect();
    try {
      t.deepEqual(await compareWindows(client, [["now() - interval '1 hour 17 seconds'", "now() + interval '1 microsecond'"]]), []);
    } finally {
      client.release();
    }
  } finally {
    await db.owner.query(`alter sequence ${seq} cache 1`);
  }
});
