// GET /metrics on the real service: after a known set of rows (written by SQL,
// attributed by the insert trigger) the spec's metrics have exact values; a
// restart of the service does not reset them (they are counted in the
// database); METRICS_TOKEN is enforced; a database that does not answer
// leaves /metrics up with keytrack_database_up 0; worker jobs are counted.
import test from "ava";

import type { RunningServer } from "../../server/main.js";
import { createKey, createTestDb, createUser, type TestDb } from "../helpers/db.js";
import { sleep, waitFor } from "../helpers/poll.js";
import { startTestServer } from "../helpers/server.js";
import { parseExposition, type Exposition } from "../helpers/exposition.js";

let db: TestDb;
let key: { id: string; secret: string };
let alice: string;

test.before(async () => {
  db = await createTestDb();
  alice = await createUser(db, "alice@example.com");
  key = await createKey(db, alice);
});
test.after.always(async () => {
  await db?.drop();
});

async function insert(requestId: string, values: { key?: string; userId?: string; reason?: string } = {}) {
  await db.owner.query(
    `insert into app_public.chat_completion_requests (request_id, api_key_hash, user_id, attribution_reason, model, status)
     values ($1, app_public.api_key_hash($2), $3, $4, 'gpt-4o', 'completed')`,
    [requestId, values.key ?? null, values.userId ?? null, values.reason ?? null],
  );
}

async function scrape(server: RunningServer, token?: string): Promise<Exposition> {
  const res = await fetch(`${server.url}/metrics`, { headers: token ? { authorization: `Bearer ${token}` } : {} });
  if (res.status !== 200) throw new Error(`/metrics answered ${res.status}: ${await res.text()}`);
  return parseExposition(await res.text());
}

/** The spec's metrics and keytrack's attribution gauges, as numbers by series. */
function attribution(e: Exposition): Record<string, number | undefined> {
  const out: Record<string, number | undefined> = {};
  for (const status of ["success", "failed", "retry"]) {
    out[`lookup_${status}`] = e.value("api_key_lookup_attempts_total", { status });
  }
  for (const request_type of ["authenticated", "retry", "backfill", "dev"]) {
    out[`success_${request_type}`] = e.value("api_key_tracking_success_total", { request_type });
  }
  for (const reason of ["anonymous", "not_found", "lookup_failed", "dev_bypass", "no_key", "ambiguous"]) {
    out[`failure_${reason}`] = e.value("api_key_tracking_failures_total", { reason });
  }
  out.pending = e.value("keytrack_pending_attributions");
  out.failed = e.value("keytrack_failed_attributions");
  out.rate = e.value("api_key_tracking_rate");
  return out;
}

/*
 * The known sequence, all within the last hour:
 *   3 rows with alice's key               -> resolved at insert (lookup found the key)
 *   2 rows without credentials            -> anonymous
 *   1 row naming alice, no key            -> failed, no_key
 *   1 row with the dev bypass             -> failed, dev_bypass
 *   1 row with a key not issued yet       -> pending (lookup found nothing, to be retried)
 *   1 row whose writer's lookup failed    -> pending, counted as lookup_failed
 * No worker runs here, so pending rows stay pending.
 * Not anonymous in the last hour: 7, with a key: 3.
 */
const EXPECTED = {
  lookup_success: 3,
  lookup_failed: 0,
  lookup_retry: 2,
  success_authenticated: 3,
  success_retry: 0,
  success_backfill: 0,
  success_dev: 0,
  failure_anonymous: 2,
  failure_not_found: 0,
  failure_lookup_failed: 1,
  failure_dev_bypass: 1,
  failure_no_key: 1,
  failure_ambiguous: 0,
  pending: 2,
  failed: 2,
  rate: 3 / 7,
};

let first: Exposition;

test.serial("after a known sequence of rows, /metrics shows the exact counts, types and rate", async (t) => {
  const { rows } = await db.owner.query("select to_regprocedure('app_private.attribution_metrics()') is not null as present");
  if (!rows[0].present) return t.fail("app_private.attribution_metrics() is not in the migrated database: migration 000003 is not committed yet");
  for (let i = 1; i <= 3; i++) await insert(`m-key-${i}`, { key: key.secret });
  await insert("m-anon-1");
  await insert("m-anon-2");
  await insert("m-user-only", { userId: alice });
  await insert("m-bypass", { key: "local-dev-bypass-key", reason: "dev_bypass" });
  await insert("m-unknown", { key: "kt_live_issued_later" });
  await insert("m-lookup-failed", { key: "kt_live_writer_lookup_failed", reason: "lookup_failed" });
  // Re-delivery of a request id changes nothing, in the table or in the metrics.
  await insert("m-key-1", { key: key.secret });

  const server = await startTestServer(db);
  try {
    await (await fetch(`${server.url}/nope`)).arrayBuffer();
    await (await fetch(`${server.url}/nope/again?x=1`)).arrayBuffer();
    first = await scrape(server);
  } finally {
    await server.close();
  }

  t.is(first.value("keytrack_database_up"), 1);
  t.deepEqual(attribution(first), EXPECTED);
  const rate = first.value("api_key_tracking_rate")!;
  t.true(rate >= 0 && rate <= 1);

  t.is(first.types.get("api_key_lookup_attempts_total"), "counter");
  t.is(first.types.get("api_key_tracking_success_total"), "counter");
  t.is(first.types.get("api_key_tracking_failures_total"), "counter");
  t.is(first.types.get("api_key_tracking_rate"), "gauge");
  t.is(first.types.get("keytrack_pending_attributions"), "gauge");
  t.is(first.types.get("keytrack_failed_attributions"), "gauge");
  t.is(first.types.get("keytrack_spool_depth"), "gauge");
  t.is(first.types.get("http_request_duration_seconds"), "histogram");
  t.is(first.value("keytrack_spool_depth"), 0);
  t.is(first.value("http_request_duration_seconds_count", { method: "GET", route: "unmatched", status_code: "404" }), 2);
  t.true(first.names.has("process_resident_memory_bytes"));
  t.true(first.names.has("nodejs_eventloop_lag_seconds"));
});

test.serial("a new service process on the same database shows the same counts, then counts on", async (t) => {
  t.truthy(first, "the first scrape ran");
  const server = await startTestServer(db);
  try {
    const again = await scrape(server);
    t.deepEqual(attribution(again), attribution(first), "nothing was reset by the restart");
    // HTTP durations belong to the process: the new one starts empty.
    t.is(again.value("http_request_duration_seconds_count", { method: "GET", route: "unmatched", status_code: "404" }), undefined);

    // Events in SQL by other paths: the key of the pending row is imported and
    // a retry round runs (as the worker would); then two more rows arrive.
    await db.owner.query("select app_public.import_api_key($1, app_public.api_key_hash('kt_live_issued_later'))", [alice]);
    await db.owner.query("select * from app_private.resolve_pending_attributions()");
    await insert("m-key-4", { key: key.secret });
    await insert("m-anon-3");
    await sleep(1600); // past the scrape cache
    t.deepEqual(attribution(await scrape(server)), {
      ...EXPECTED,
      lookup_success: EXPECTED.lookup_success + 2, // the retry found the imported key; the new row's key
      lookup_retry: EXPECTED.lookup_retry + 1, // the retry found nothing for the lookup_failed row
      success_authenticated: EXPECTED.success_authenticated + 1,
      success_retry: 1,
      failure_anonymous: EXPECTED.failure_anonymous + 1,
      pending: 1,
      rate: 5 / 8,
    });
  } finally {
    await server.close();
  }
});

test("METRICS_TOKEN: /metrics needs the bearer token, compared in constant time", async (t) => {
  const token = "metrics-token-0123456789";
  const server = await startTestServer(db, { METRICS_TOKEN: token });
  try {
    const none = await fetch(`${server.url}/metrics`);
    t.is(none.status, 401);
    t.regex(none.headers.get("www-authenticate") ?? "", /^Bearer/);
    t.like(await none.json(), { error: { code: "unauthorized" } });
    for (const header of [`Bearer ${token}x`, `Bearer ${token.slice(0, -1)}`, token, "Basic Zm9vOmJhcg==", "Bearer "]) {
      const res = await fetch(`${server.url}/metrics`, { headers: { authorization: header } });
      t.is(res.status, 401, header);
      await res.arrayBuffer();
    }
    const ok = await fetch(`${server.url}/metrics`, { headers: { authorization: `bearer ${token}` } });
    t.is(ok.status, 200);
    t.regex(ok.headers.get("content-type") ?? "", /^text\/plain; version=0\.0\.4/);
    t.regex(await ok.text(), /# TYPE api_key_tracking_failures_total counter/);
    t.is((await fetch(`${server.url}/health`)).status, 200, "/health stays open");
  } finally {
    await server.close();
  }
});

test("without METRICS_TOKEN, /metrics is open", async (t) => {
  const server = await startTestServer(db);
  try {
    const res = await fetch(`${server.url}/metrics`);
    t.is(res.status, 200);
    await res.arrayBuffer();
  } finally {
    await server.close();
  }
});

test("a database that does not answer: /metrics still answers, database_up 0, attribution series absent", async (t) => {
  // The metrics read the read pool: point it at a port where nothing listens.
  const server = await startTestServer(db, { READ_DATABASE_URL: "postgres://keytrack_owner@127.0.0.1:1/nowhere", READ_FALLBACK: "false" });
  try {
    const e = await scrape(server);
    t.is(e.value("keytrack_database_up"), 0);
    for (const name of ["api_key_lookup_attempts_total", "api_key_tracking_success_total", "api_key_tracking_failures_total", "api_key_tracking_rate", "keytrack_pending_attributions", "keytrack_failed_attributions"]) {
      t.deepEqual(e.find(name), [], `${name}: no samples rather than stale or zero ones`);
      t.truthy(e.types.get(name), `${name} still declared`);
    }
    t.is(e.value("keytrack_spool_depth"), 0);
    t.true(e.names.has("process_cpu_seconds_total"));
    t.is(e.types.get("http_request_duration_seconds"), "histogram");
  } finally {
    await server.close();
  }
});

test("the recording path's series: rows held in memory, rows dropped by every reason, requests let in on a stale key, all from the first scrape", async (t) => {
  const server = await startTestServer(db);
  try {
    const e = await scrape(server);
    t.is(e.types.get("keytrack_record_buffered"), "gauge");
    t.is(e.value("keytrack_record_buffered"), 0);
    t.is(e.types.get("keytrack_record_dropped_total"), "counter");
    t.deepEqual(
      e.find("keytrack_record_dropped_total").map((s) => [s.labels.reason, s.value]).sort(),
      [["corrupt_spool_line", 0], ["memory_full", 0], ["rejected_by_database", 0], ["shutdown", 0]],
    );
    t.is(e.types.get("keytrack_auth_stale_total"), "counter");
    t.is(e.value("keytrack_auth_stale_total"), 0);
  } finally {
    await server.close();
  }
});

test("worker job outcomes are counted by task and outcome", async (t) => {
  const server = await startTestServer(db, { WORKER: "true" });
  try {
    // The worker creates partitions at start-up.
    const e = await waitFor("the start-up partitions job in /metrics", async () => {
      const scraped = await scrape(server);
      return scraped.value("keytrack_worker_jobs_total", { task: "chat_completion_requests__create_partitions", outcome: "success" }) && scraped;
    }, { intervalMs: 200 });
    t.is(e.types.get("keytrack_worker_jobs_total"), "counter");
    t.true((e.value("keytrack_worker_jobs_total", { task: "chat_completion_requests__create_partitions", outcome: "success" }) ?? 0) >= 1);
    for (const s of e.find("keytrack_worker_jobs_total")) t.true(["success", "error", "failed"].includes(s.labels.outcome!));
  } finally {
    await server.close();
  }
});
