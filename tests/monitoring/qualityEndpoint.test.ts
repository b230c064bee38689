// GET /admin/monitoring/api-key-tracking-quality: the spec's JSON, exactly, on
// seeded data (the spec's own example: 1000 requests, 950 with a key, 5 naming
// a user but no key, 45 anonymous), with the hours served by settled rollups
// and the current hour read raw; the alert status from the authenticated rate
// (anonymous traffic never lowers it, no traffic is no_data); every
// recommendation on its condition.
import test from "ava";

import type { RunningServer } from "../../server/main.js";
import { createKey, createTestDb, createUser, settleRollups, type TestDb } from "../helpers/db.js";
import { ADMIN_TOKEN, startTestServer } from "../helpers/server.js";

let db: TestDb;
let server: RunningServer;
let alice: string;
let bob: string;
let aliceKey: string;
let bobKey: string;

test.before(async () => {
  db = await createTestDb();
  alice = await createUser(db, "alice@example.com");
  bob = await createUser(db, "bob@example.com");
  aliceKey = (await createKey(db, alice)).secret;
  bobKey = (await createKey(db, bob)).secret;
  server = await startTestServer(db, {});
});
test.after.always(async () => {
  await server?.close();
  await db?.drop();
});

async function reset(): Promise<void> {
  await db.root.query(`
    truncate app_public.chat_completion_requests, app_private.request_ids, app_public.attribution_rollups_hourly,
             app_public.attribution_rollup_dirty_hours, app_private.attribution_events;
    update app_public.attribution_rollup_state
       set settled_through = '-infinity', fence_transactions = null, fence_until = null, fence_set_at = null`);
}

/** Inserts `count` rows `minutesAgo` minutes old (spread by (i % spread) hours when spread > 1). */
async function rows(kind: "key" | "user" | "anon" | "unknown", count: number, prefix: string, spread = 1, minutesAgo = 1) {
  await db.owner.query(
    `insert into app_public.chat_completion_requests (request_id, created_at, api_key_hash, user_id, model)
     select $1 || i, now() - (i % $2::int) * interval '1 hour' - $3::int * interval '1 minute',
            case $4::text when 'key' then app_public.api_key_hash(case when i % 2 = 0 then $5 else $6 end)
                    when 'unknown' then app_public.api_key_hash('unknown-' || i) end,
            case when $4 = 'user' then $7::uuid end, 'gpt-4o'
       from generate_series(0, $8::int - 1) i`,
    [prefix, spread, minutesAgo, kind, aliceKey, bobKey, bob, count],
  );
}

async function quality(query = ""): Promise<{ status: number; body: any }> {
  const res = await fetch(`${server.url}/admin/monitoring/api-key-tracking-quality${query}`, {
    headers: { authorization: `Bearer ${ADMIN_TOKEN}` },
  });
  return { status: res.status, body: await res.json() };
}

/** The body without the time window's instants, nor what keytrack adds to the spec's fields (checked in tests/completeness/). */
function withoutInstants(body: any) {
  const { time_window, completeness: _c, attribution_latency: _l, ...rest } = body;
  return { ...rest, time_window: { hours: time_window.hours } };
}

const GOOD = "API key tracking quality is good. No action needed.";

test.serial("the spec's example gives the spec's numbers, from rollups plus the current hour", async (t) => {
  await reset();
  // Over the last 10 hours, as in the spec SQL test: 950 with a key, 5 naming a user, 45 anonymous.
  await rows("key", 950, "with-key-", 10, 1);
  await rows("user", 5, "user-only-", 10, 2);
  await rows("anon", 45, "anon-", 10, 3);
  // Outside the 24-hour window.
  await db.owner.query(`insert into app_public.chat_completion_requests (request_id, created_at) values ('old', now() - interval '3 days')`);
  await settleRollups(db.owner);
  const { rows: used } = await db.owner.query(`select count(*)::int as n from app_public.attribution_rollups_hourly where hour >= now() - interval '11 hours'`);
  t.true(used[0].n >= 9, "the past hours are rolled up");

  const before = Date.now();
  const { status, body } = await quality("?hours=24");
  t.is(status, 200);
  t.deepEqual(Object.keys(body), [
    "total_requests", "requests_with_api_key", "requests_without_api_key", "tracking_rate_percent", "breakdown",
    "anonymous_requests", "authenticated_tracking_rate_percent", "pending_attributions", "failed_attributions",
    "time_window", "alert_status", "recommendations", "completeness", "attribution_latency",
  ]);
  t.deepEqual(withoutInstants(body), {
    total_requests: 1000,
    requests_with_api_key: 950,
    requests_without_api_key: 50,
    tracking_rate_percent: 95,
    breakdown: {
      null_key_with_valid_user: 5,
      both_null_likely_anonymous: 45,
      null_key_with_valid_user_percent: 0.5,
      both_null_percent: 4.5,
    },
    anonymous_requests: 45,
    authenticated_tracking_rate_percent: 99.48,
    pending_attributions: 0,
    failed_attributions: 5,
    time_window: { hours: 24 },
    alert_status: "ok",
    recommendations: [GOOD],
  });
  t.deepEqual(Object.keys(body.breakdown), [
    "null_key_with_valid_user", "both_null_likely_anonymous", "null_key_with_valid_user_percent", "both_null_percent",
  ]);
  t.deepEqual(Object.keys(body.time_window), ["hours", "start_time", "end_time"]);
  const start = Date.parse(body.time_window.start_time);
  const end = Date.parse(body.time_window.end_time);
  t.regex(body.time_window.end_time, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
  t.is(end - start, 24 * 3600_000);
  t.true(end >= before - 5000 && end <= Date.now() + 5000);

  // The default window is 24 hours.
  t.deepEqual(withoutInstants((await quality()).body), withoutInstants(body));
});

test.serial("a one-hour window counts only the last hour, and small shares fire their recommendations", async (t) => {
  // Same data: the rows of the last hour are i % 10 = 0 (95 with a key, 1 user only, 5 anonymous).
  const { status, body } = await quality("?hours=1");
  t.is(status, 200);
  t.deepEqual(withoutInstants(body), {
    total_requests: 101,
    requests_with_api_key: 95,
    requests_without_api_key: 6,
    tracking_rate_percent: 94.06,
    breakdown: {
      null_key_with_valid_user: 1,
      both_null_likely_anonymous: 5,
      null_key_with_valid_user_percent: 0.99,
      both_null_percent: 4.95,
    },
    anonymous_requests: 5,
    authenticated_tracking_rate_percent: 98.96,
    pending_attributions: 0,
    failed_attributions: 1,
    time_window: { hours: 1 },
    alert_status: "ok",
    recommendations: [
      "1 requests (1.04% of authenticated requests) name a user but no API key: their key lookup failed or they predate key tracking. Run the attribution backfill (npm run backfill) and check the writers' logs.",
      "1 requests (1.04% of authenticated requests) failed attribution. See attribution_offenders() for the keys and users involved, and attribution_reason for why.",
    ],
  });
});

test.serial("zero traffic is no_data with zeros, not critical", async (t) => {
  await reset();
  const { status, body } = await quality();
  t.is(status, 200);
  t.deepEqual(withoutInstants(body), {
    total_requests: 0,
    requests_with_api_key: 0,
    requests_without_api_key: 0,
    tracking_rate_percent: 0,
    breakdown: {
      null_key_with_valid_user: 0,
      both_null_likely_anonymous: 0,
      null_key_with_valid_user_percent: 0,
      both_null_percent: 0,
    },
    anonymous_requests: 0,
    authenticated_tracking_rate_percent: null,
    pending_attributions: 0,
    failed_attributions: 0,
    time_window: { hours: 24 },
    alert_status: "no_data",
    recommendations: ["No authenticated requests in the last 24 hours: tracking quality cannot be assessed."],
  });
});

test.serial("only anonymous traffic is no_data; anonymous traffic never lowers the alert status", async (t) => {
  await reset();
  await rows("anon", 30, "anon-");
  let { body } = await quality();
  t.like(body, {
    total_requests: 30,
    requests_with_api_key: 0,
    tracking_rate_percent: 0,
    anonymous_requests: 30,
    authenticated_tracking_rate_percent: null,
    alert_status: "no_data",
  });
  t.deepEqual(body.recommendations, [
    "No authenticated requests in the last 24 hours: tracking quality cannot be assessed.",
    "30 requests (100.00%) have neither an API key nor a user. Make sure this much anonymous traffic is expected (ALLOW_ANONYMOUS).",
  ]);

  // 50 authenticated, all attributed, among 950 anonymous: the spec's rate is 5%, the alert is ok.
  await reset();
  await rows("key", 50, "key-");
  await rows("anon", 950, "anon-");
  ({ body } = await quality());
  t.like(body, { total_requests: 1000, tracking_rate_percent: 5, authenticated_tracking_rate_percent: 100, alert_status: "ok" });
  t.deepEqual(body.recommendations, [
    "950 requests (95.00%) have neither an API key nor a user. Make sure this much anonymous traffic is expected (ALLOW_ANONYMOUS).",
  ]);
});

test.serial("warning between 70 and 90, with the pending and rate recommendations", async (t) => {
  await reset();
  await rows("key", 80, "key-");
  await rows("unknown", 20, "unknown-");
  const { body } = await quality();
  t.deepEqual(withoutInstants(body), {
    total_requests: 100,
    requests_with_api_key: 80,
    requests_without_api_key: 20,
    tracking_rate_percent: 80,
    breakdown: {
      null_key_with_valid_user: 0,
      both_null_likely_anonymous: 20,
      null_key_with_valid_user_percent: 0,
      both_null_percent: 20,
    },
    anonymous_requests: 0,
    authenticated_tracking_rate_percent: 80,
    pending_attributions: 20,
    failed_attributions: 0,
    time_window: { hours: 24 },
    alert_status: "warning",
    recommendations: [
      "The authenticated tracking rate is 80.00%, below 90%. Review key lookups, the retry worker and the backfill.",
      "20 requests (20.00% of authenticated requests) are pending attribution: their key is not known yet. The retry worker resolves them when it appears; register keys issued elsewhere with import_api_key(), and check that the worker runs.",
    ],
  });
});

test.serial("critical below 70, with the lookup-failure, rate and failed recommendations", async (t) => {
  await reset();
  await rows("key", 60, "key-");
  await rows("user", 40, "user-");
  const { body } = await quality();
  t.like(body, {
    total_requests: 100,
    requests_with_api_key: 60,
    tracking_rate_percent: 60,
    breakdown: { null_key_with_valid_user: 40, both_null_likely_anonymous: 0, null_key_with_valid_user_percent: 40, both_null_percent: 0 },
    authenticated_tracking_rate_percent: 60,
    pending_attributions: 0,
    failed_attributions: 40,
    alert_status: "critical",
  });
  t.deepEqual(body.recommendations, [
    "40 requests (40.00% of authenticated requests) name a user but no API key: their key lookup failed or they predate key tracking. Run the attribution backfill (npm run backfill) and check the writers' logs.",
    "The authenticated tracking rate is 60.00%, below 90%. Review key lookups, the retry worker and the backfill.",
    "40 requests (40.00% of authenticated requests) failed attribution. See attribution_offenders() for the keys and users involved, and attribution_reason for why.",
  ]);
});

test.serial("the thresholds: 90.00 is ok, 89.99 is warning, 70.00 is warning, 69.99 is critical", async (t) => {
  const cases: Array<[number, number, string]> = [
    [9000, 1000, "ok"],
    [8999, 1001, "warning"],
    [7000, 3000, "warning"],
    [6999, 3001, "critical"],
  ];
  for (const [withKey, withoutKey, status] of cases) {
    await reset();
    await rows("key", withKey, "key-");
    await rows("user", withoutKey, "user-");
    const { body } = await quality();
    t.is(body.authenticated_tracking_rate_percent, (withKey * 100) / (withKey + withoutKey), `${withKey}/${withKey + withoutKey}`);
    t.is(body.alert_status, status, `${withKey}/${withKey + withoutKey}`);
  }
});
