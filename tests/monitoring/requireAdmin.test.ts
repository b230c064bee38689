// The monitoring endpoints' contract around the numbers: admin-only access
// (ADMIN_API_KEY or an admin user's key; 401 without or with wrong
// credentials, 403 for a non-admin key, each a JSON error), parameter
// validation (422 naming the parameter and its bounds), a database failure as
// a 503 (never a 200 with zeros); and the same reports in GraphQL (admins
// only) and in psql (keytrack_analyst).
import test from "ava";

import type { RunningServer } from "../../server/main.js";
import { createKey, createTestDb, createUser, withClient, type TestDb } from "../helpers/db.js";
import { ADMIN_TOKEN, graphql, startTestServer } from "../helpers/server.js";

let db: TestDb;
let server: RunningServer;
let adminKey: string;
let revokedAdminKey: string;
let userKey: string;

const QUALITY = "/admin/monitoring/api-key-tracking-quality";
const TREND = "/admin/monitoring/api-key-tracking-trend";

test.before(async () => {
  db = await createTestDb();
  const admin = await createUser(db, "admin@example.com", "admin");
  const user = await createUser(db, "user@example.com");
  adminKey = (await createKey(db, admin)).secret;
  const revoked = await createKey(db, admin, "revoked");
  revokedAdminKey = revoked.secret;
  await db.owner.query("select app_public.revoke_api_key($1)", [revoked.id]);
  userKey = (await createKey(db, user)).secret;
  await db.owner.query(
    `insert into app_public.chat_completion_requests (request_id, api_key_hash) values ('r1', app_public.api_key_hash($1))`,
    [userKey],
  );
  server = await startTestServer(db, {});
});
test.after.always(async () => {
  await server?.close();
  await db?.drop();
});

async function get(path: string, authorization?: string, base = server.url) {
  const res = await fetch(`${base}${path}`, { headers: authorization ? { authorization } : {} });
  return { status: res.status, type: res.headers.get("content-type"), challenge: res.headers.get("www-authenticate"), body: (await res.json()) as any };
}

for (const path of [QUALITY, TREND]) {
  test(`${path}: no credentials is a 401 with a JSON error`, async (t) => {
    const r = await get(path);
    t.is(r.status, 401);
    t.regex(r.type ?? "", /application\/json/);
    t.regex(r.challenge ?? "", /^Bearer/);
    // Worded as the gateway's missing-credentials error.
    t.like(r.body, { error: { type: "authentication_error", code: "missing_credentials", message: "No credentials: send Authorization: Bearer <key>" } });
  });

  test(`${path}: wrong, malformed or revoked credentials are a 401`, async (t) => {
    for (const header of ["Bearer not-a-key", `Bearer ${ADMIN_TOKEN}x`, "Basic dXNlcjpwYXNz", "Bearer", `Bearer ${revokedAdminKey}`]) {
      const r = await get(path, header);
      t.is(r.status, 401, header);
      t.like(r.body, { error: { type: "authentication_error", code: "invalid_credentials", message: "invalid credentials" } }, header);
    }
  });

  test(`${path}: a non-admin user's key is a 403`, async (t) => {
    const r = await get(path, `Bearer ${userKey}`);
    t.is(r.status, 403);
    t.like(r.body, { error: { type: "permission_error", code: "forbidden" } });
  });

  test(`${path}: ADMIN_API_KEY and an admin user's key are allowed`, async (t) => {
    for (const header of [`Bearer ${ADMIN_TOKEN}`, `bearer ${adminKey}`]) {
      const r = await get(path, header);
      t.is(r.status, 200, header);
      t.regex(r.type ?? "", /application\/json/);
    }
  });

  test(`${path}: credentials are checked before parameters`, async (t) => {
    t.is((await get(`${path}?hours=0&days=0`)).status, 401);
    t.is((await get(`${path}?hours=0&days=0`, `Bearer ${userKey}`)).status, 403);
  });
}

const INVALID = ["0", "-1", "+5", "1.5", "1e2", "", "abc", "24abc", " 24", "99999999999999999999"];

test("hours: 1..168, integers only, 422 naming the parameter and its bounds", async (t) => {
  for (const value of [...INVALID, "169", "1000"]) {
    const r = await get(`${QUALITY}?hours=${encodeURIComponent(value)}`, `Bearer ${ADMIN_TOKEN}`);
    t.is(r.status, 422, `hours=${value}`);
    t.deepEqual(r.body, {
      error: {
        message: "hours must be an integer between 1 and 168",
        type: "invalid_request_error",
        code: "invalid_parameter",
        param: "hours",
        minimum: 1,
        maximum: 168,
      },
    }, `hours=${value}`);
  }
  t.is((await get(`${QUALITY}?hours=1&hours=2`, `Bearer ${ADMIN_TOKEN}`)).status, 422, "repeated");
  const misspelt = await get(`${QUALITY}?hour=24`, `Bearer ${ADMIN_TOKEN}`);
  t.is(misspelt.status, 422, "an unknown parameter is refused, not ignored");
  t.like(misspelt.body.error, { code: "unknown_parameter", param: "hour", known: ["hours"] });
  t.is((await get(`${TREND}?days=7&hours=24`, `Bearer ${ADMIN_TOKEN}`)).status, 422);
  for (const value of ["1", "168", "024"]) {
    const r = await get(`${QUALITY}?hours=${value}`, `Bearer ${ADMIN_TOKEN}`);
    t.is(r.status, 200, `hours=${value}`);
    t.is(r.body.time_window.hours, Number(value));
  }
});

test("days: 1..30, integers only, 422 naming the parameter and its bounds", async (t) => {
  for (const value of [...INVALID, "31"]) {
    const r = await get(`${TREND}?days=${encodeURIComponent(value)}`, `Bearer ${ADMIN_TOKEN}`);
    t.is(r.status, 422, `days=${value}`);
    t.deepEqual(r.body, {
      error: {
        message: "days must be an integer between 1 and 30",
        type: "invalid_request_error",
        code: "invalid_parameter",
        param: "days",
        minimum: 1,
        maximum: 30,
      },
    }, `days=${value}`);
  }
  for (const value of ["1", "30"]) {
    const r = await get(`${TREND}?days=${value}`, `Bearer ${ADMIN_TOKEN}`);
    t.is(r.status, 200, `days=${value}`);
    t.is(r.body.summary.period_days, Number(value));
    t.is(r.body.trend_data.length, Number(value));
  }
});

test("a database failure is a 503 with a JSON error, never a 200 with zeros", async (t) => {
  // The reports read through READ_DATABASE_URL: point it at a port nobody listens on, with no fallback to the primary.
  const broken = await startTestServer(db, { READ_DATABASE_URL: "postgres://keytrack_owner@127.0.0.1:1/nowhere", READ_FALLBACK: "false" });
  try {
    for (const path of [QUALITY, TREND]) {
      const r = await get(path, `Bearer ${ADMIN_TOKEN}`, broken.url);
      t.is(r.status, 503, path);
      t.deepEqual(r.body, {
        error: {
          message: "the monitoring data could not be read from the database, try again",
          type: "server_error",
          param: null,
          code: "database_unavailable",
        },
      });
    }
  } finally {
    await broken.close();
  }
});

test("GraphQL: the reports and offenders for admins, refused for users", async (t) => {
  const query = `{
    apiKeyTrackingQualityReport(hours: 24) { totalRequests requestsWithApiKey trackingRatePercent alertStatus recommendations }
    apiKeyTrackingTrend(days: 2) { periodDays totalRequests trendData { date totalRequests trackingRatePercent } }
    attributionOffenders(hours: 24) { nodes { kind unattributedRequests } }
  }`;
  const admin = await graphql(server, query, {}, ADMIN_TOKEN);
  t.is(admin.status, 200);
  t.is(admin.body.errors, undefined);
  t.like(admin.body.data!.apiKeyTrackingQualityReport, { totalRequests: "1", requestsWithApiKey: "1", trackingRatePercent: "100.00", alertStatus: "ok" });
  t.is(admin.body.data!.apiKeyTrackingTrend.periodDays, 2);
  t.is(admin.body.data!.apiKeyTrackingTrend.trendData.length, 2);
  t.deepEqual(admin.body.data!.attributionOffenders.nodes, []);

  const asUser = await graphql(server, `{ apiKeyTrackingQualityReport(hours: 24) { totalRequests } }`, {}, userKey);
  t.is(asUser.body.data?.apiKeyTrackingQualityReport ?? null, null);
  t.is(asUser.body.errors?.[0]?.extensions?.code, "42501");
});

test("psql: the analyst runs the reports; the metrics function is the owner's", async (t) => {
  await withClient(db.analystUrl, async (c) => {
    const quality = (await c.query("select total_requests, alert_status from api_key_tracking_quality_report(24)")).rows[0];
    t.deepEqual({ ...quality }, { total_requests: "1", alert_status: "ok" });
    const trend = (await c.query("select period_days, total_requests from api_key_tracking_trend()")).rows[0];
    t.deepEqual({ ...trend }, { period_days: 7, total_requests: "1" });
    t.deepEqual((await c.query("select * from attribution_offenders()")).rows, []);
    const err = await c.query("select * from app_private.attribution_metrics()").then(() => null, (e) => e);
    t.is(err?.code, "42501");
  });
});
