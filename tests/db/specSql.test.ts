// The spec's SQL runs verbatim as keytrack_analyst (the DBA's read-only login)
// and returns the spec's numbers: 1000 requests, 950 with a key, 5 naming a
// user but no key, 45 anonymous.
import test from "ava";
import { createKey, createTestDb, createUser, withClient, type TestDb } from "../helpers/db.js";
import { BREAKDOWN_BY_REQUEST_TYPE, HOURLY_TRACKING_QUALITY, POTENTIAL_LOOKUP_FAILURES, VIEW_QUERY } from "../helpers/specSql.js";

let db: TestDb;

test.before(async () => {
  db = await createTestDb();
  const alice = await createUser(db, "alice@example.com");
  const bob = await createUser(db, "bob@example.com");
  const k1 = await createKey(db, alice);
  const k2 = await createKey(db, bob);
  // Spread over the last 10 hours (i = 0..999), never older than 24 hours.
  await db.owner.query(
    `insert into app_public.chat_completion_requests (request_id, created_at, api_key_hash, model)
     select 'with-key-' || i, now() - (i % 10) * interval '1 hour' - interval '1 minute',
            app_public.api_key_hash(case when i % 2 = 0 then $1 else $2 end), 'gpt-4o'
       from generate_series(0, 949) i`,
    [k1.secret, k2.secret],
  );
  await db.owner.query(
    `insert into app_public.chat_completion_requests (request_id, created_at, user_id)
     select 'user-only-' || i, now() - (i % 10) * interval '1 hour' - interval '2 minutes', $1
       from generate_series(950, 954) i`,
    [alice],
  );
  await db.owner.query(
    `insert into app_public.chat_completion_requests (request_id, created_at)
     select 'anon-' || i, now() - (i % 10) * interval '1 hour' - interval '3 minutes'
       from generate_series(955, 999) i`,
  );
  // Outside the 24-hour window: not counted by the usage examples.
  await db.owner.query(
    `insert into app_public.chat_completion_requests (request_id, created_at) values ('old', now() - interval '3 days')`,
  );
});

test.after.always(async () => {
  await db?.drop();
});

test("breakdown of request types (spec usage example 1)", async (t) => {
  const rows = await withClient(db.analystUrl, async (c) => (await c.query(BREAKDOWN_BY_REQUEST_TYPE)).rows);
  const byType = Object.fromEntries(rows.map((r) => [String(r.is_anonymous), r]));
  t.deepEqual(
    { ...byType.false },
    { is_anonymous: false, total: "955", with_key: "950", without_key: "5" },
  );
  t.deepEqual({ ...byType.true }, { is_anonymous: true, total: "45", with_key: "0", without_key: "45" });
});

test("potential lookup failures (spec usage example 2)", async (t) => {
  const rows = await withClient(db.analystUrl, async (c) => (await c.query(POTENTIAL_LOOKUP_FAILURES)).rows);
  t.is(rows.length, 5);
  t.true(rows.every((r) => r.api_key_id === null && r.user_id !== null && r.is_anonymous === false));
  t.true(rows.every((r, i) => i === 0 || rows[i - 1].created_at >= r.created_at), "newest first");
  t.deepEqual(rows.map((r) => r.request_id).sort(), ["user-only-950", "user-only-951", "user-only-952", "user-only-953", "user-only-954"]);
});

test("hourly tracking quality from the view (spec usage example 3)", async (t) => {
  const rows = await withClient(db.analystUrl, async (c) => (await c.query(HOURLY_TRACKING_QUALITY)).rows);
  t.true(rows.length >= 10 && rows.length <= 24);
  const recent = rows.filter((r) => Date.now() - r.hour.getTime() < 11 * 3600_000);
  const sum = (k: string) => recent.reduce((n, r) => n + Number(r[k]), 0);
  t.is(sum("total_requests"), 1000);
  t.is(sum("requests_with_api_key"), 950);
  t.is(sum("requests_without_api_key"), 50);
  t.is(sum("anonymous_requests"), 45);
  t.is(sum("potential_lookup_failures"), 5);
  for (const r of rows) {
    const expected = Math.round((Number(r.requests_with_api_key) / Number(r.total_requests)) * 10000) / 100;
    t.is(Number(r.tracking_rate_percent), expected);
  }
  t.deepEqual(Object.keys(rows[0]), [
    "hour", "total_requests", "requests_with_api_key", "requests_without_api_key",
    "anonymous_requests", "potential_lookup_failures", "tracking_rate_percent",
  ]);
});

test("the view returns exactly what the spec's view definition computes", async (t) => {
  const [view, spec] = await withClient(db.analystUrl, async (c) => [
    (await c.query("select * from api_key_tracking_quality")).rows,
    (await c.query(VIEW_QUERY)).rows,
  ]);
  t.deepEqual(view, spec);
  t.true(view.length >= 11, "includes the 3-day-old hour");
});

test("the analyst is read-only", async (t) => {
  const err = await withClient(db.analystUrl, (c) =>
    c.query("insert into chat_completion_requests (request_id) values ('x')").then(() => null, (e) => e),
  );
  t.is(err?.code, "25006"); // read_only_sql_transaction
});
