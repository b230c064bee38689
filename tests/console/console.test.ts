// The admin console at the HTTP level: sign-in (admin token, admin key; a user
// key 403, wrong 401) sets an HttpOnly SameSite=Strict session cookie; the API
// needs the cookie (401 without, unknown or expired), state-changing requests
// the console header (CSRF); every console response carries the CSP; the
// figures equal the REST endpoints'; the import and backfill actions work; a
// database that does not answer is a 503.
import test from "ava";

import { installConsole } from "../../server/console/installConsole.js";
import type { RunningServer } from "../../server/main.js";
import { createKey, createTestDb, createUser, type TestDb } from "../helpers/db.js";
import { ADMIN_TOKEN, startTestServer } from "../helpers/server.js";

let db: TestDb;
let server: RunningServer;
let adminKey: string;
let userKey: string;
let user: string;

const CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'";
const H = { "x-keytrack-console": "1" };

test.before(async () => {
  db = await createTestDb();
  const admin = await createUser(db, "admin@example.com", "admin");
  user = await createUser(db, "user@example.com");
  adminKey = (await createKey(db, admin)).secret;
  userKey = (await createKey(db, user)).secret;
  await db.owner.query(
    `insert into app_public.chat_completion_requests (request_id, api_key_hash, user_id, model)
     select 'c-' || i,
            case when i < 6 then app_public.api_key_hash($1) when i < 9 then app_public.api_key_hash('unknown-key-' || (i % 2)) end,
            null, 'gpt-4o'
       from generate_series(0, 11) i`,
    [userKey],
  );
  // One naming a user but no key (failed, no_key).
  await db.owner.query(`insert into app_public.chat_completion_requests (request_id, user_id) values ('c-user', $1)`, [user]);
  server = await startTestServer(db, {});
});
test.after.always(async () => {
  await server?.close();
  await db?.drop();
});

async function signIn(token: string, base = server.url) {
  const res = await fetch(`${base}/console/session`, {
    method: "POST",
    headers: { ...H, "content-type": "application/json" },
    body: JSON.stringify({ token }),
  });
  const cookie = res.headers.get("set-cookie");
  return { status: res.status, cookie, body: (await res.json()) as any, session: cookie?.split(";")[0] ?? "" };
}

async function api(path: string, session?: string, init: RequestInit = {}, base = server.url) {
  const res = await fetch(`${base}/console/api/${path}`, {
    ...init,
    headers: { ...(session ? { cookie: session } : {}), ...(init.headers as Record<string, string> | undefined) },
  });
  const text = await res.text();
  return { status: res.status, headers: res.headers, body: text ? JSON.parse(text) : null };
}

async function rest(path: string) {
  const res = await fetch(`${server.url}/admin/monitoring/${path}`, { headers: { authorization: `Bearer ${ADMIN_TOKEN}` } });
  return res.json() as Promise<any>;
}

test("sign-in with the admin token sets an HttpOnly, SameSite=Strict, Path=/ cookie with an expiry", async (t) => {
  const r = await signIn(ADMIN_TOKEN);
  t.is(r.status, 201);
  t.regex(r.cookie ?? "", /^keytrack_console=[A-Za-z0-9_-]{40,}; /);
  t.regex(r.cookie!, /; HttpOnly/);
  t.regex(r.cookie!, /; SameSite=Strict/);
  t.regex(r.cookie!, /; Path=\//);
  t.regex(r.cookie!, /; Max-Age=43200/);
  t.false(r.cookie!.includes(ADMIN_TOKEN));
  t.deepEqual(r.body.principal, { kind: "admin_token" });
  t.is((await api("status", r.session)).status, 200);
});

test("sign-in with an admin user's key works; a user's key is 403 admins only; wrong is 401", async (t) => {
  const admin = await signIn(adminKey);
  t.is(admin.status, 201);
  t.regex(admin.cookie!, /HttpOnly; SameSite=Strict/);
  t.is(admin.body.principal.kind, "key");
  t.is((await api("status", admin.session)).status, 200);

  const asUser = await signIn(userKey);
  t.is(asUser.status, 403);
  t.is(asUser.cookie, null);
  t.like(asUser.body.error, { code: "admins_only", type: "permission_error" });
  t.regex(asUser.body.error.message, /admins only/);

  for (const wrong of [`${ADMIN_TOKEN}x`, "kt_live_" + "0".repeat(64), "two words", ""]) {
    const r = await signIn(wrong);
    t.is(r.status, 401, wrong);
    t.is(r.cookie, null, wrong);
    t.is(r.body.error.type, "authentication_error", wrong);
  }
});

test("the API is 401 without a cookie, with an unknown one, after expiry and after sign-out", async (t) => {
  for (const path of ["status", "quality", "trend", "hourly", "offenders", "recent", "backfills"]) {
    const r = await api(path);
    t.is(r.status, 401, path);
    t.is(r.body.error.code, "session_expired", path);
  }
  t.is((await api("quality", "keytrack_console=not-a-session")).status, 401);

  const s = await signIn(ADMIN_TOKEN);
  t.is((await api("quality", s.session)).status, 200);
  installConsole.sessions.expire(s.session.split("=")[1]!);
  const expired = await api("quality", s.session);
  t.is(expired.status, 401);
  t.is(expired.body.error.code, "session_expired");
  t.regex(expired.headers.get("set-cookie") ?? "", /Max-Age=0/, "the stale cookie is cleared");

  const s2 = await signIn(ADMIN_TOKEN);
  const out = await fetch(`${server.url}/console/session`, { method: "DELETE", headers: { ...H, cookie: s2.session } });
  t.is(out.status, 204);
  t.is((await api("status", s2.session)).status, 401);
});

test("a key revoked after sign-in ends its session", async (t) => {
  const admin = await createUser(db, "admin2@example.com", "admin");
  const key = await createKey(db, admin);
  const s = await signIn(key.secret);
  t.is(s.status, 201);
  await db.owner.query("select app_public.revoke_api_key($1)", [key.id]);
  // The cache is invalidated by NOTIFY: within a moment the session is refused.
  let status = 200;
  for (let i = 0; i < 50 && status === 200; i++) {
    status = (await api("status", s.session)).status;
    if (status === 200) await new Promise((r) => setTimeout(r, 100));
  }
  t.is(status, 401);
});

test("state-changing requests need the console header (CSRF)", async (t) => {
  const s = await signIn(ADMIN_TOKEN);
  const noHeader = await fetch(`${server.url}/console/session`, {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ token: ADMIN_TOKEN }),
  });
  t.is(noHeader.status, 403);
  t.is(((await noHeader.json()) as any).error.code, "csrf_header_missing");
  t.is(noHeader.headers.get("set-cookie"), null);
  for (const path of ["import-key", "backfill"]) {
    const r = await api(path, s.session, { method: "POST", headers: { "content-type": "application/json" }, body: "{}" });
    t.is(r.status, 403, path);
    t.is(r.body.error.code, "csrf_header_missing", path);
  }
  const del = await fetch(`${server.url}/console/session`, { method: "DELETE", headers: { cookie: s.session } });
  t.is(del.status, 403);
  t.is((await api("status", s.session)).status, 200, "still signed in");
});

test("every console response carries the CSP, nosniff and no-referrer; the page has no inline script or style", async (t) => {
  const s = await signIn(ADMIN_TOKEN);
  for (const [path, cookie] of [
    ["/", undefined], ["/console/static/console.js", undefined], ["/console/static/console.css", undefined],
    ["/console/vendor/uPlot.esm.js", undefined], ["/console/vendor/uPlot.min.css", undefined],
    ["/console/api/quality", s.session], ["/console/api/quality", undefined], ["/console/nothing-here", undefined],
  ] as const) {
    const res = await fetch(`${server.url}${path}`, { headers: cookie ? { cookie } : {} });
    t.is(res.headers.get("content-security-policy"), CSP, path);
    t.is(res.headers.get("x-content-type-options"), "nosniff", path);
    t.is(res.headers.get("referrer-policy"), "no-referrer", path);
    if (path === "/") {
      t.is(res.status, 200);
      t.regex(res.headers.get("content-type") ?? "", /text\/html/);
      const html = await res.text();
      t.notRegex(html, /<script(?![^>]*\bsrc=)[^>]*>/, "no inline script");
      t.notRegex(html, /<style|\sstyle=/, "no inline style");
      t.notRegex(html, /https?:\/\//, "nothing from elsewhere");
      t.regex(html, /href="\/graphiql"/);
      t.regex(html, /href="\/metrics"/);
    } else if (path.includes("/static/") || path.includes("/vendor/")) {
      t.is(res.status, 200, path);
      t.regex(res.headers.get("content-type") ?? "", path.endsWith(".js") ? /javascript/ : /text\/css/, path);
    } else {
      await res.arrayBuffer();
    }
  }
});

test.serial("the console's figures equal the REST endpoints' answers", async (t) => {
  const s = await signIn(adminKey);
  for (const hours of [24, 168]) {
    const mine = (await api(`quality?hours=${hours}`, s.session)).body;
    const theirs = await rest(`api-key-tracking-quality?hours=${hours}`);
    const strip = (b: any) => ({ ...b, time_window: { hours: b.time_window.hours }, attribution_latency: { ...b.attribution_latency, oldest_pending_seconds: null } });
    t.deepEqual(strip(mine), strip(theirs), `hours=${hours}`);
  }
  const q = (await api("quality", s.session)).body;
  t.is(q.total_requests, 13);
  t.is(q.requests_with_api_key, 6);
  t.is(q.pending_attributions, 3);
  t.is(q.anonymous_requests, 3);
  t.is(q.failed_attributions, 1);
  t.truthy(q.completeness);
  t.true("p99_seconds" in q.attribution_latency);

  const trend = (await api("trend?days=30", s.session)).body;
  t.deepEqual(trend, await rest("api-key-tracking-trend?days=30"));
  t.is(trend.trend_data.length, 30);

  const hourly = (await api("hourly?hours=24", s.session)).body;
  t.is(hourly.data.length, 24);
  const last = hourly.data.at(-1);
  t.is(last.total_requests, 13);
  t.is(last.requests_with_api_key, 6);
  t.is(last.authenticated_tracking_rate_percent, q.authenticated_tracking_rate_percent);

  const offenders = (await api("offenders?hours=24", s.session)).body.offenders;
  const sql = (await db.owner.query("select * from app_public.attribution_offenders(24, 20)")).rows;
  t.is(offenders.length, sql.length);
  t.deepEqual(offenders.map((o: any) => [o.kind, o.api_key_hash, o.user_id, o.pending_requests, o.failed_requests]),
    sql.map((o: any) => [o.kind, o.api_key_hash, o.user_id, Number(o.pending_requests), Number(o.failed_requests)]));

  const recent = (await api("recent?limit=10", s.session)).body.requests;
  t.is(recent.length, 4);
  t.true(recent.every((r: any) => ["pending", "failed"].includes(r.attribution_status)));
  t.true(recent.some((r: any) => r.attribution_reason === "no_key" && r.email === "user@example.com"));
  t.is((await api("recent?limit=201", s.session)).status, 422, "bounded");
  t.is((await api("quality?hours=0", s.session)).status, 422);
  t.is((await api("quality?hour=2", s.session)).status, 422);

  const status = (await api("status", s.session)).body;
  t.is(status.spool_depth, 0);
});

test.serial("import-key registers a pending offender's key by hash; its rows can then resolve", async (t) => {
  const s = await signIn(ADMIN_TOKEN);
  const hash = (await db.owner.query(`select encode(app_public.api_key_hash('unknown-key-1'), 'hex') as h`)).rows[0].h as string;
  const post = (body: unknown) => api("import-key", s.session, { method: "POST", headers: { ...H, "content-type": "application/json" }, body: JSON.stringify(body) });

  t.is((await post({ user_email: "user@example.com", key_hash: "zz" })).status, 422);
  t.is((await post({ key_hash: hash })).status, 422);
  t.is((await post({ user_email: "nobody@example.com", key_hash: hash })).status, 404);
  t.is((await post({ user_id: "00000000-0000-0000-0000-000000000000", key_hash: hash })).status, 404);

  const ok = await post({ user_email: "USER@example.com", key_hash: hash.toUpperCase() });
  t.is(ok.status, 201);
  t.is(ok.body.key.user_id, user);
  t.is(ok.body.key.source, "imported");
  t.is(ok.body.key.pending_requests, 1);
  const { rows } = await db.owner.query(
    `select k.user_id from app_private.api_key_secrets s join app_public.api_keys k on k.id = s.api_key_id where s.key_hash = decode($1, 'hex')`, [hash]);
  t.is(rows[0]?.user_id, user);
  const again = await post({ user_id: user, key_hash: hash });
  t.is(again.status, 409);
  t.is(again.body.error.code, "already_exists");
  // The retry worker (off in this server) resolves the row: run one pass as it would.
  await db.owner.query("select app_private.resolve_pending_attributions(100, as_of => now() + interval '1 hour')");
  const resolved = await db.owner.query(`select attribution_status, user_id from app_public.chat_completion_requests where api_key_hash = decode($1, 'hex')`, [hash]);
  t.deepEqual(resolved.rows.map((r) => ({ ...r })), [{ attribution_status: "resolved", user_id: user }]);
});

test.serial("backfill starts a run (or resumes the running one) and the list shows it", async (t) => {
  const s = await signIn(adminKey);
  const post = () => api("backfill", s.session, { method: "POST", headers: { ...H, "content-type": "application/json" }, body: "{}" });
  const r = await post();
  t.is(r.status, 202);
  t.is(r.body.backfill.status, "running");
  t.is((await post()).body.backfill.id, r.body.backfill.id, "resumes the running one");
  const list = (await api("backfills", s.session)).body.backfills;
  t.is(list[0].id, r.body.backfill.id);
  t.is(list[0].status, "running");
  const bad = await api("backfill", s.session, { method: "POST", headers: { ...H, "content-type": "application/json" }, body: JSON.stringify({ batch_size: 0 }) });
  t.is(bad.status, 422);
});

test("a database that does not answer is a 503 database_unavailable", async (t) => {
  const broken = await startTestServer(db, { READ_DATABASE_URL: "postgres://keytrack_owner@127.0.0.1:1/nowhere", READ_FALLBACK: "false" });
  try {
    const s = await signIn(ADMIN_TOKEN, broken.url);
    t.is(s.status, 201);
    for (const path of ["quality", "trend", "hourly", "offenders", "recent", "backfills"]) {
      const r = await api(path, s.session, {}, broken.url);
      t.is(r.status, 503, path);
      t.like(r.body.error, { code: "database_unavailable", type: "server_error" }, path);
    }
    t.is((await api("status", s.session, {}, broken.url)).status, 200, "the spool depth needs no database");
  } finally {
    await broken.close();
  }
});
