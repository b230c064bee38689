// Retention drops whole raw months older than the window, after freezing their
// rollups: the history stays in the reports, the guard forgets their request
// ids, and nothing inside the window (or the default partition) is touched.
import test from "ava";
import { createTestDb, settleRollups, type TestDb } from "../helpers/db.js";

let db: TestDb;
test.before(async () => {
  db = await createTestDb();
});
test.after.always(async () => {
  await db?.drop();
});

const partitions = async () =>
  (await db.owner.query(
    `select c.relname from pg_inherits i join pg_class c on c.oid = i.inhrelid
      where i.inhparent = 'app_public.chat_completion_requests'::regclass order by 1`)).rows.map((r) => r.relname as string);

test("drops expired months after freezing their rollups; keeps the window and the history", async (t) => {
  await db.owner.query(
    `insert into app_public.chat_completion_requests (request_id, created_at)
     select 'old-' || i, timestamptz '2020-01-10 00:00Z' + i * interval '1 hour' from generate_series(1, 30) i`);
  await db.owner.query(
    `insert into app_public.chat_completion_requests (request_id, created_at)
     select 'feb-' || i, timestamptz '2020-02-27 00:00Z' + i * interval '1 hour' from generate_series(1, 5) i`);
  await db.owner.query("insert into app_public.chat_completion_requests (request_id) values ('recent-1')");
  await db.owner.query("select app_private.create_partitions()");
  t.true((await partitions()).includes("chat_completion_requests_p2020_01"));

  // Rollups not settled yet: retention refuses rather than lose counts.
  const early = await db.owner.query("select app_private.drop_expired_partitions(interval '30 days', '2020-04-15')").catch((e) => e);
  t.is(early.code, "55000");

  // Settling takes a refresh to set its fence and one after the fence's transactions ended.
  await settleRollups(db.owner);
  const history = async () =>
    (await db.owner.query(
      "select sum(requests)::int as n from app_public.attribution_counts_by_hour('2020-01-01', '2020-03-01')")).rows[0].n;
  t.is(await history(), 35);

  // As of 2020-03-15 with 30 days: January ended before the cutoff (Feb 14), February did not.
  const { rows: [{ dropped }] } = await db.owner.query(
    "select app_private.drop_expired_partitions(interval '30 days', '2020-03-15') as dropped");
  t.is(dropped, 1);
  const after = await partitions();
  t.false(after.includes("chat_completion_requests_p2020_01"));
  t.true(after.includes("chat_completion_requests_p2020_02"));
  t.true(after.includes("chat_completion_requests_default"));
  const { rows: [raw] } = await db.owner.query(
    "select count(*)::int as n from app_public.chat_completion_requests where request_id like 'old-%'");
  t.is(raw.n, 0);
  const { rows: [guard] } = await db.root.query("select count(*)::int as n from app_private.request_ids where request_id like 'old-%'");
  t.is(guard.n, 0);
  t.is(await history(), 35, "the frozen rollups keep the dropped month's counts");
  const { rows: [recent] } = await db.owner.query(
    "select count(*)::int as n from app_public.chat_completion_requests where request_id = 'recent-1'");
  t.is(recent.n, 1);

  const again = await db.owner.query("select app_private.drop_expired_partitions(interval '30 days', '2020-03-15') as dropped");
  t.is(again.rows[0].dropped, 0);
  const bad = await db.owner.query("select app_private.drop_expired_partitions(interval '1 hour')").catch((e) => e);
  t.is(bad.code, "22023");
});
