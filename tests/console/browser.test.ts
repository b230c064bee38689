// The console in a real browser (Debian's chromium, driven by playwright-core):
// sign-in errors (wrong token, a user's key), the dashboard on seeded traffic
// showing the REST endpoints' numbers, the charts drawn, the offenders table,
// registering an offender's key, an expired session and a database that does
// not answer; no CSP violation anywhere. Screenshots go to docs/screenshots/.
// Without /usr/bin/chromium the test passes with a note (.ci/run installs it).
import { existsSync, mkdirSync } from "node:fs";
import path from "node:path";

import test from "ava";

import { projectRoot } from "../../server/db/projectRoot.js";
import type { RunningServer } from "../../server/main.js";
import { createKey, createTestDb, createUser, type TestDb } from "../helpers/db.js";
import { ADMIN_TOKEN, startTestServer } from "../helpers/server.js";

const CHROMIUM = "/usr/bin/chromium";
const SHOTS = path.join(projectRoot, "docs", "screenshots");
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
  "--disable-sync", "--no-first-run"];

let db: TestDb;
let server: RunningServer;
let userKey: string;

test.before(async () => {
  if (!existsSync(CHROMIUM)) return;
  db = await createTestDb();
  const admin = await createUser(db, "admin@example.com", "admin");
  const alice = await createUser(db, "alice@example.com");
  await createKey(db, admin);
  userKey = (await createKey(db, alice)).secret;
  // Over the last 30 hours: 40 with a key, 6 with unknown hashes (pending), 5 anonymous, 2 naming a user but no key;
  // and some days back for the daily chart.
  await db.owner.query(
    `insert into app_public.chat_completion_requests (request_id, created_at, api_key_hash, user_id, model)
     select 'b-' || i, now() - (i % 30) * interval '1 hour' - interval '1 minute',
            case when i < 40 then app_public.api_key_hash($1)
                 when i < 46 then app_public.api_key_hash('legacy-key-' || (i % 2)) end,
            case when i >= 51 then $2::uuid end, 'gpt-4o'
       from generate_series(0, 52) i`,
    [userKey, alice],
  );
  await db.owner.query(
    `insert into app_public.chat_completion_requests (request_id, created_at, api_key_hash, model)
     select 'old-' || i, now() - (2 + i % 20) * interval '1 day', case when i % 4 <> 0 then app_public.api_key_hash($1) end, 'gpt-4o'
       from generate_series(0, 59) i`,
    [userKey],
  );
  server = await startTestServer(db, {});
  mkdirSync(SHOTS, { recursive: true });
});
test.after.always(async () => {
  await server?.close();
  await db?.drop();
});

async function rest(p: string) {
  const res = await fetch(`${server.url}/admin/monitoring/${p}`, { headers: { authorization: `Bearer ${ADMIN_TOKEN}` } });
  return res.json() as Promise<any>;
}

test("the console in chromium: sign-in errors, REST numbers, charts, offenders, import, expired session, database down", async (t) => {
  if (!existsSync(CHROMIUM)) {
    t.log(`skipped: ${CHROMIUM} is missing (apt-get install chromium; .ci/run installs it)`);
    t.pass();
    return;
  }
  const { chromium } = await import("playwright-core");
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS });
  const problems: string[] = [];
  try {
    const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
    const page = await context.newPage();
    page.on("console", (m) => {
      // 401/503 answers are expected states; anything else (CSP violations, script errors) is a failure.
      if (m.type() === "error" && !/status of (401|403|503)/.test(m.text())) problems.push(m.text());
    });
    page.on("pageerror", (e) => problems.push(String(e)));

    await page.goto(`${server.url}/`);
    await page.locator("#signin").waitFor({ state: "visible" });
    t.true(await page.locator("#dashboard").isHidden());

    // Wrong token, then a user's key.
    await page.fill("#signin-token", "not-the-token");
    await page.click("#signin-form button[type=submit]");
    await page.locator("#signin-error").waitFor({ state: "visible" });
    t.regex(await page.locator("#signin-error").innerText(), /Wrong token/);
    t.is(await page.inputValue("#signin-token"), "", "the token does not stay in the form");
    await page.screenshot({ path: path.join(SHOTS, "console-wrong-token.png") });
    await page.fill("#signin-token", userKey);
    await page.click("#signin-form button[type=submit]");
    await page.waitForFunction(() => /Admins only/.test(document.getElementById("signin-error")!.textContent ?? ""));

    // The admin token.
    await page.fill("#signin-token", ADMIN_TOKEN);
    await page.click("#signin-form button[type=submit]");
    await page.locator("#as-of").waitFor({ state: "visible" });
    const cookies = await context.cookies();
    t.is(cookies.length, 1);
    t.like(cookies[0], { name: "keytrack_console", httpOnly: true, sameSite: "Strict", path: "/" });
    t.is(await page.evaluate(() => document.cookie), "", "the session cookie is not visible to scripts");
    t.is(await page.evaluate(() => localStorage.length + sessionStorage.length), 0);

    // The numbers shown are the REST endpoint's.
    const q = await rest("api-key-tracking-quality?hours=24");
    const value = (id: string) => page.locator(`#${id}`).getAttribute("data-value");
    t.is(await value("total-requests"), String(q.total_requests));
    t.is(await value("attributed"), String(q.requests_with_api_key));
    t.is(await value("anonymous"), String(q.anonymous_requests));
    t.is(await value("pending"), String(q.pending_attributions));
    t.is(await value("failed"), String(q.failed_attributions));
    t.is(await value("tracking-rate"), String(q.tracking_rate_percent));
    t.is(await value("auth-rate"), String(q.authenticated_tracking_rate_percent));
    t.is(await value("completeness"), q.completeness.completeness_percent === null ? "" : String(q.completeness.completeness_percent));
    t.is(await value("latency-p99"), q.attribution_latency.p99_seconds === null ? "" : String(q.attribution_latency.p99_seconds));
    t.is(await value("retry-queue"), String(q.attribution_latency.pending));
    t.is(await value("spool-depth"), "0");
    t.is(await page.locator("#alert-status").getAttribute("data-value"), q.alert_status);
    t.is(await page.locator("#recommendations li").count(), q.recommendations.length);
    t.true(q.total_requests > 0 && q.pending_attributions === 6);
    const trend = await rest("api-key-tracking-trend?days=30");
    t.is(await page.locator("#chart-daily").getAttribute("data-average"), String(trend.summary.average_tracking_rate_percent));

    // The charts are drawn.
    for (const id of ["chart-hourly", "chart-daily"]) {
      const box = await page.locator(`#${id} canvas`).first().boundingBox();
      t.truthy(box, id);
      t.true(box!.width > 100 && box!.height > 100, `${id}: ${JSON.stringify(box)}`);
    }
    t.true(await page.locator("#chart-hourly-empty").isHidden());

    // Offenders: the two unknown hashes and alice (no key).
    const hashRows = page.locator("#offenders tbody tr[data-kind=api_key_hash]");
    t.is(await hashRows.count(), 2);
    t.is(await page.locator("#offenders tbody tr[data-kind=user]").count(), 1);
    t.regex(await page.locator("#offenders tbody").innerText(), /alice@example\.com/);
    t.true((await page.locator("#recent tbody tr").count()) >= 8);
    await page.screenshot({ path: path.join(SHOTS, "console-dashboard.png"), fullPage: true });

    // Register the first offender's key for alice.
    const hash = (await hashRows.first().locator("td.mono").innerText()).trim();
    await hashRows.first().locator("button").click();
    t.is(await page.inputValue("#import-hash"), hash);
    await page.fill("#import-user", "alice@example.com");
    await page.click("#import-form button[type=submit]");
    await page.waitForFunction(() => /Key registered/.test(document.getElementById("import-result")!.textContent ?? ""));
    t.regex(await page.locator("#import-result").innerText(), /3 pending request/);
    const { rows } = await db.owner.query(
      `select k.user_id, k.source from app_private.api_key_secrets s join app_public.api_keys k on k.id = s.api_key_id
        where s.key_hash = decode($1, 'hex')`, [hash]);
    t.is(rows.length, 1);
    t.is(rows[0].source, "imported");

    // Start a backfill; the list shows the run.
    await page.click("#backfill-start");
    await page.waitForFunction(() => /Backfill #\d+/.test(document.getElementById("backfill-result")!.textContent ?? ""));
    await page.locator("#backfills tbody tr").first().waitFor();
    await page.screenshot({ path: path.join(SHOTS, "console-actions.png"), fullPage: true });

    // The session ends (cookie gone): the page asks to sign in again.
    await context.clearCookies();
    await page.click("#refresh");
    await page.locator("#signin").waitFor({ state: "visible" });
    t.regex(await page.locator("#signin-note").innerText(), /session expired/i);
    await page.screenshot({ path: path.join(SHOTS, "console-session-expired.png") });
    await context.close();

    // A database that does not answer.
    const broken = await startTestServer(db, { READ_DATABASE_URL: "postgres://keytrack_owner@127.0.0.1:1/nowhere", READ_FALLBACK: "false" });
    try {
      const ctx2 = await browser.newContext({ viewport: { width: 1400, height: 900 } });
      const p2 = await ctx2.newPage();
      p2.on("pageerror", (e) => problems.push(String(e)));
      await p2.goto(`${broken.url}/`);
      await p2.fill("#signin-token", ADMIN_TOKEN);
      await p2.click("#signin-form button[type=submit]");
      await p2.locator("#banner").waitFor({ state: "visible" });
      t.regex(await p2.locator("#banner").innerText(), /Database not answering/);
      await p2.screenshot({ path: path.join(SHOTS, "console-database-down.png") });
      await ctx2.close();
    } finally {
      await broken.close();
    }
    t.deepEqual(problems, [], "no script error or CSP violation");
  } finally {
    await browser.close();
  }
});
