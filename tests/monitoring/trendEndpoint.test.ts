// GET /admin/monitoring/api-key-tracking-trend: one entry per UTC calendar day
// (today included, days without requests included, oldest first) and the
// summary with the rate weighted by requests; exact JSON on seeded days, past
// days served by settled rollups; zero traffic.
import test from "ava";

import type { RunningServer } from "../../server/main.js";
import { createKey, createTestDb, createUser, settleRollups, type TestDb } from "../helpers/db.js";
import { ADMIN_TOKEN, startTestServer } from "../helpers/server.js";

let db: TestDb;
let server: RunningServer;
let userId: string;
let secret: string;
let today: string;

test.before(async () => {
  db = await createTestDb();
  userId = await createUser(db, "trend@example.com");
  secret = (await createKey(db, userId)).secret;
  server = await startTestServer(db, {});
  today = (await db.owner.query(`select (now() at time zone 'UTC')::date::text as d`)).rows[0].d;
});
test.after.always(async () => {
  await server?.close();
  await db?.drop();
});

/** The UTC date `n` days before today, YYYY-MM-DD. */
function daysAgo(n: number): string {
  const d = new Date(`${today}T00:00:00Z`);
  d.setUTCDate(d.getUTCDate() - n);
  return d.toISOString().slice(0, 10);
}

/** Rows created `n` UTC days ago, one second (today) or one hour (other days) after midnight. */
async function day(n: number, kind: "key" | "user" | "anon", count: number) {
  await db.owner.query(
    `insert into app_public.chat_completion_requests (request_id, created_at, api_key_hash, user_id)
     select $1 || '-' || $2::int || '-' || i,
            date_trunc('day', now(), 'UTC') - $2::int * interval '1 day' + case when $2::int = 0 then interval '1 second' else interval '1 hour' end,
            case when $1 = 'key' then app_public.api_key_hash($4) end,
            case when $1 = 'user' then $5::uuid end
       from generate_series(1, $3::int) i`,
    [kind, n, count, secret, userId],
  );
}

async function trend(query = ""): Promise<{ status: number; body: any }> {
  const res = await fetch(`${server.url}/admin/monitoring/api-key-tracking-trend${query}`, {
    headers: { authorization: `Bearer ${ADMIN_TOKEN}` },
  });
  return { status: res.status, body: await res.json() };
}

const entry = (n: number, total: number, withKey: number, rate: number) => ({
  date: daysAgo(n),
  total_requests: total,
  requests_with_api_key: withKey,
  tracking_rate_percent: rate,
});

test.serial("zero traffic: every day present with zeros", async (t) => {
  const { status, body } = await trend();
  t.is(status, 200);
  t.deepEqual(body, {
    trend_data: [6, 5, 4, 3, 2, 1, 0].map((n) => entry(n, 0, 0, 0)),
    summary: {
      period_days: 7,
      total_requests: 0,
      requests_with_api_key: 0,
      average_tracking_rate_percent: 0,
      start_date: daysAgo(6),
      end_date: today,
    },
  });
});

test.serial("seeded days: exact entries and a weighted summary, past days from rollups", async (t) => {
  await day(0, "key", 10);
  await day(0, "user", 5);
  await day(1, "key", 20);
  await day(3, "key", 7);
  await day(3, "anon", 3);
  await day(6, "key", 4);
  await day(7, "anon", 100); // outside 7 days
  await day(20, "anon", 50); // inside 30 days
  await settleRollups(db.owner);
  const { rows: rolled } = await db.owner.query(`select coalesce(sum(requests), 0)::int as n from app_public.attribution_rollups_hourly`);
  t.true(rolled[0].n >= 184, "the past days are rolled up");

  const { status, body } = await trend("?days=7");
  t.is(status, 200);
  t.deepEqual(Object.keys(body), ["trend_data", "summary"]);
  t.deepEqual(Object.keys(body.trend_data[0]), ["date", "total_requests", "requests_with_api_key", "tracking_rate_percent"]);
  t.deepEqual(Object.keys(body.summary), [
    "period_days", "total_requests", "requests_with_api_key", "average_tracking_rate_percent", "start_date", "end_date",
  ]);
  t.deepEqual(body, {
    trend_data: [
      entry(6, 4, 4, 100),
      entry(5, 0, 0, 0),
      entry(4, 0, 0, 0),
      entry(3, 10, 7, 70),
      entry(2, 0, 0, 0),
      entry(1, 20, 20, 100),
      entry(0, 15, 10, 66.67),
    ],
    summary: {
      period_days: 7,
      total_requests: 49,
      requests_with_api_key: 41,
      average_tracking_rate_percent: 83.67,
      start_date: daysAgo(6),
      end_date: today,
    },
  });

  // The default is 7 days.
  t.deepEqual((await trend()).body, body);

  const one = (await trend("?days=1")).body;
  t.deepEqual(one, {
    trend_data: [entry(0, 15, 10, 66.67)],
    summary: { period_days: 1, total_requests: 15, requests_with_api_key: 10, average_tracking_rate_percent: 66.67, start_date: today, end_date: today },
  });

  const thirty = (await trend("?days=30")).body;
  t.is(thirty.trend_data.length, 30);
  t.is(thirty.trend_data[0].date, daysAgo(29));
  t.deepEqual(thirty.trend_data.find((d: any) => d.date === daysAgo(20)), entry(20, 50, 0, 0));
  t.deepEqual(thirty.trend_data.find((d: any) => d.date === daysAgo(7)), entry(7, 100, 0, 0));
  t.deepEqual(thirty.summary, {
    period_days: 30,
    total_requests: 199,
    requests_with_api_key: 41,
    average_tracking_rate_percent: 20.6,
    start_date: daysAgo(29),
    end_date: today,
  });
});
