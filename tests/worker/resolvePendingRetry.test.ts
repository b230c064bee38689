// The retry task tries a batch again when its connection is killed (a real
// pg_terminate_backend while the batch waits on a lock), instead of failing the
// job into graphile-worker's exp(attempts) backoff: drill:attribution saw rows
// of a just-imported key wait 58 s for the minute sweep after a few kills.
import test from "ava";
import type { JobHelpers } from "graphile-worker";
import { makeResolvePending } from "../../server/worker/tasks/resolvePending.js";
import { createTestDb, createUser, makePool, type TestDb } from "../helpers/db.js";
import { waitFor } from "../helpers/poll.js";

let db: TestDb;
test.before(async () => {
  db = await createTestDb();
});
test.after.always(async () => {
  await db?.drop();
});

const settings = { attributionRetryBatchSize: 500, attributionRetryMaxAttempts: 10, attributionRetryBaseMs: 1000, attributionRetryMaxMs: 60_000 };

function fakeHelpers(query: (text: string, values?: unknown[]) => Promise<unknown>, warnings: string[]): JobHelpers {
  const logger = { warn: (m: string) => void warnings.push(m), info: () => {}, error: () => {}, debug: () => {} };
  return { query, logger } as unknown as JobHelpers;
}

test("a batch whose connection is killed is tried again at once; the job succeeds and the rows resolve", async (t) => {
  const user = await createUser(db, "killed@example.com");
  await db.owner.query(
    `insert into app_public.chat_completion_requests (request_id, api_key_hash)
     select 'killed-' || i, app_public.api_key_hash('kt_live_killed') from generate_series(1, 50) i`);
  await db.owner.query("select app_public.import_api_key($1, app_public.api_key_hash('kt_live_killed'))", [user]);

  const pool = makePool(db.ownerUrl, { max: 2 });
  const warnings: string[] = [];
  let calls = 0;
  try {
    const task = makeResolvePending(settings);
    await task({}, fakeHelpers(async (text, values) => {
      calls++;
      if (calls > 1) return pool.query(text, values);
      // The first batch: blocked at its counter upsert, then its backend is terminated.
      const blocker = await db.owner.connect();
      const victim = await pool.connect();
      try {
        await blocker.query("begin");
        await blocker.query("lock table app_private.attribution_events in exclusive mode");
        const pid = (await victim.query("select pg_backend_pid() as pid")).rows[0].pid;
        const running = victim.query(text, values);
        running.catch(() => {});
        await waitFor("the batch to wait on the lock", async () =>
          (await db.root.query("select 1 from pg_stat_activity where pid = $1 and wait_event_type = 'Lock'", [pid])).rowCount === 1);
        await db.root.query("select pg_terminate_backend($1)", [pid]);
        return await running;
      } finally {
        victim.release(true);
        await blocker.query("rollback");
        blocker.release();
      }
    }, warnings));
  } finally {
    await pool.end();
  }
  t.true(calls >= 2);
  t.is(warnings.length, 1);
  t.regex(warnings[0]!, /57P01.*trying again/);
  const { rows } = await db.owner.query(
    "select attribution_status, count(*)::int as n from app_public.chat_completion_requests where request_id like 'killed-%' group by 1");
  t.deepEqual(rows, [{ attribution_status: "resolved", n: 50 }]);
});

test("a permanent error is not retried: the job fails at once", async (t) => {
  const warnings: string[] = [];
  let calls = 0;
  const task = makeResolvePending({ ...settings, attributionRetryBatchSize: 0 });
  const err = await t.throwsAsync(async () => {
    await task({}, fakeHelpers(async (text, values) => {
      calls++;
      return db.owner.query(text, values);
    }, warnings));
  });
  t.is((err as { code?: string }).code, "22023");
  t.is(calls, 1);
  t.deepEqual(warnings, []);
});
