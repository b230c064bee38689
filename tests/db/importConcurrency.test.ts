// Importing keys while the retry worker and a backfill work on the same pending
// rows: no deadlock, no error, and every row ends attributed to its key. The
// import locks no ledger row (it notes the hash in app_private.attribution_wakes
// and wakes the worker); before, its UPDATE of the pending rows deadlocked with
// a backfill batch ("deadlock detected" in the admin's import).
import test from "ava";

import { createTestDb, createUser, makePool, type TestDb } from "../helpers/db.js";

let db: TestDb;
test.before(async () => {
  db = await createTestDb();
});
test.after.always(async () => {
  await db?.drop();
});

const KEYS = 40;
const ROWS = 100_000;

test.serial("imports, two retry workers and a backfill at once on 100,000 pending rows: no error, all attributed", async (t) => {
  const user = await createUser(db, "late-keys@example.com");
  // Rows presenting 40 keys that are not registered yet: all pending.
  await db.owner.query(
    `insert into app_public.chat_completion_requests (request_id, api_key_hash)
     select 'late-' || i, app_public.api_key_hash('kt_live_late_' || (i % $1)) from generate_series(1, $2) i`,
    [KEYS, ROWS],
  );
  const pending = async () =>
    Number((await db.owner.query("select count(*) from app_public.chat_completion_requests where attribution_status = 'pending'")).rows[0].count);
  t.is(await pending(), ROWS);

  let importing = true;
  const errors: string[] = [];
  const guard = (name: string, body: () => Promise<void>) => body().catch((err) => void errors.push(`${name}: ${(err as Error).message}`));

  const importer = guard("import", async () => {
    try {
      for (let k = 0; k < KEYS; k++) {
        await db.owner.query("select app_public.import_api_key($1, app_public.api_key_hash($2))", [user, `kt_live_late_${k}`]);
      }
    } finally {
      importing = false;
    }
  });
  const retrier = (name: string) =>
    guard(name, async () => {
      // As the worker calls it; the rows' own retry times lie in the future, so only the imports make them due.
      while (errors.length === 0 && (importing || (await pending()) > 0)) {
        await db.owner.query("select * from app_private.resolve_pending_attributions(500, 10, interval '1 hour', interval '1 hour')");
      }
    });
  const backfiller = guard("backfill", async () => {
    while (importing) {
      const { rows: [run] } = await db.owner.query("select id from app_public.start_attribution_backfill(500)");
      for (;;) {
        const { rows: [r] } = await db.owner.query("select status from app_private.run_attribution_backfill_batch($1)", [run.id]);
        if (r.status !== "running") break;
      }
    }
  });

  await Promise.all([importer, retrier("retry-a"), retrier("retry-b"), backfiller]);
  t.deepEqual(errors, []);
  const { rows } = await db.owner.query(`
    select count(*) filter (where r.attribution_status = 'resolved' and k.id is not null and k.user_id = $1)::int as right_key,
           count(*) filter (where r.attribution_status <> 'resolved')::int as unresolved
      from app_public.chat_completion_requests r
      left join app_private.api_key_secrets s on s.key_hash = r.api_key_hash
      left join app_public.api_keys k on k.id = r.api_key_id and k.id = s.api_key_id`, [user]);
  t.deepEqual(rows[0], { right_key: ROWS, unresolved: 0 });
  // The backfill may have resolved the last woken rows after the retriers' last batch: the worker's next
  // run (scheduled at once while wakes remain) drops those wakes.
  await db.owner.query("select * from app_private.resolve_pending_attributions()");
  t.is(Number((await db.owner.query("select count(*) from app_private.attribution_wakes")).rows[0].count), 0, "no wake left behind");
});

test.serial("retry batches recording their latencies at once never deadlock on the histogram", async (t) => {
  // (Serial with the test above: its retriers add to the same histogram.)
  // Before: UPDATE ... FROM locked the buckets in heap order, which every update changes; 8 callers at
  // once failed 10-20% of their calls with "deadlock detected". Latencies spread over every bucket.
  const CALLERS = 8, CALLS = 40, PER_CALL = 6;
  const before = Number((await db.owner.query("select sum(observations) as n from app_private.attribution_latency")).rows[0].n);
  const pool = makePool(db.ownerUrl, { max: CALLERS });
  try {
    const errors: string[] = [];
    await Promise.all(Array.from({ length: CALLERS }, async () => {
      for (let i = 0; i < CALLS; i++) {
        await pool.query(
          "select app_private.observe_attribution_latency(array(select (random() * 5000)::double precision from generate_series(1, $1)))",
          [PER_CALL]).catch((err) => void errors.push((err as Error).message));
      }
    }));
    t.deepEqual(errors, []);
  } finally {
    await pool.end();
  }
  const after = Number((await db.owner.query("select sum(observations) as n from app_private.attribution_latency")).rows[0].n);
  t.is(after - before, CALLERS * CALLS * PER_CALL);
});
