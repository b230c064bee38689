// The SQL behind /metrics and the offenders list: app_private.attribution_metrics()
// counts every insert-time outcome (from the immutable initial_attribution) and
// every retry and backfill event (one counter upsert per batch); its counters
// never decrease when rows later change; a writer-declared lookup_failed stays
// pending (retried) and is counted; attribution_offenders() names the key
// hashes and users behind unattributed requests.
import test from "ava";

import { createKey, createTestDb, createUser, type TestDb } from "../helpers/db.js";

let db: TestDb;

test.before(async () => {
  db = await createTestDb();
});
test.after.always(async () => {
  await db?.drop();
});

type Metrics = Record<string, number | null>;

async function metrics(): Promise<Metrics> {
  const row = (await db.owner.query("select * from app_private.attribution_metrics()")).rows[0];
  return Object.fromEntries(Object.entries(row).map(([k, v]) => [k, v === null ? null : Number(v)]));
}

const COLUMNS = [
  "lookup_attempts_success", "lookup_attempts_retry", "lookup_attempts_failed",
  "tracking_success_authenticated", "tracking_success_retry", "tracking_success_backfill", "tracking_success_dev",
  "tracking_failures_anonymous", "tracking_failures_not_found", "tracking_failures_lookup_failed",
  "tracking_failures_dev_bypass", "tracking_failures_no_key", "tracking_failures_ambiguous",
  "pending_attributions", "failed_attributions", "authenticated_tracking_rate",
];
const COUNTERS = COLUMNS.slice(0, 13);

async function insert(requestId: string, v: { key?: string; userId?: string; reason?: string; at?: string } = {}) {
  await db.owner.query(
    `insert into app_public.chat_completion_requests (request_id, created_at, api_key_hash, user_id, attribution_reason)
     values ($1, coalesce($2::timestamptz, now()), app_public.api_key_hash($3), $4, $5)`,
    [requestId, v.at ?? null, v.key ?? null, v.userId ?? null, v.reason ?? null],
  );
}

const monotonic = (t: { true: (c: boolean, m?: string) => void }, before: Metrics, after: Metrics) => {
  for (const c of COUNTERS) t.true((after[c] ?? 0) >= (before[c] ?? 0), `${c} went from ${before[c]} to ${after[c]}`);
};

test.serial("counters from insert-time outcomes, retry and backfill events; never decreasing", async (t) => {
  const empty = await metrics();
  t.deepEqual(Object.keys(empty), COLUMNS);
  t.deepEqual(empty, { ...Object.fromEntries(COUNTERS.map((c) => [c, 0])), pending_attributions: 0, failed_attributions: 0, authenticated_tracking_rate: null });

  const alice = await createUser(db, "alice@example.com");
  const bob = await createUser(db, "bob@example.com"); // no key yet: no_key
  const key = await createKey(db, alice);
  const devKey = (await db.owner.query("select app_private.get_or_create_dev_api_key() as k")).rows[0].k as string;

  for (let i = 0; i < 3; i++) await insert(`key-${i}`, { key: key.secret });
  await insert("dev-0", { key: devKey });
  await insert("later-0", { key: "kt_live_later" });
  await insert("later-1", { key: "kt_live_later" });
  await insert("later-lf", { key: "kt_live_later", reason: "lookup_failed" });
  await insert("never-0", { key: "kt_live_never" });
  await insert("bypass-0", { key: "local-dev-bypass-key", reason: "dev_bypass" });
  for (let i = 0; i < 2; i++) await insert(`user-${i}`, { userId: bob });
  for (let i = 0; i < 4; i++) await insert(`anon-${i}`);
  // Rows of an hour that already ended count the same (read raw until rolled up).
  await insert("old-key", { key: key.secret, at: new Date(Date.now() - 5 * 3600_000).toISOString() });

  const lf = (await db.owner.query("select attribution_status, attribution_reason, initial_attribution from app_public.chat_completion_requests where request_id = 'later-lf'")).rows[0];
  t.deepEqual({ ...lf }, { attribution_status: "pending", attribution_reason: "lookup_failed", initial_attribution: "pending_lookup_failed" });

  const m1 = await metrics();
  t.deepEqual(m1, {
    lookup_attempts_success: 5, // 3 + old-key + dev
    lookup_attempts_retry: 4, // later x2, later-lf, never
    lookup_attempts_failed: 0,
    tracking_success_authenticated: 4,
    tracking_success_retry: 0,
    tracking_success_backfill: 0,
    tracking_success_dev: 1,
    tracking_failures_anonymous: 4,
    tracking_failures_not_found: 0,
    tracking_failures_lookup_failed: 1,
    tracking_failures_dev_bypass: 1,
    tracking_failures_no_key: 2,
    tracking_failures_ambiguous: 0,
    pending_attributions: 4,
    failed_attributions: 3,
    authenticated_tracking_rate: 4 / 11, // last hour: 3 keys + dev of 11 non-anonymous
  });

  // The same, when the past hour comes from a rollup.
  for (let i = 0; i < 2; i++) await db.owner.query("select app_private.refresh_attribution_rollups()");
  t.deepEqual(await metrics(), m1);

  // The key appears: the retry worker resolves its 3 rows; the never-known one reaches the limit.
  await db.owner.query("select app_public.import_api_key($1, app_public.api_key_hash('kt_live_later'))", [alice]);
  const retry = (await db.owner.query(
    "select * from app_private.resolve_pending_attributions(500, 2, interval '1 ms', interval '1 ms', now() + interval '1 hour')",
  )).rows[0];
  t.like(retry, { examined: 4, resolved: 3, failed: 1, still_pending: 0 });
  const m2 = await metrics();
  monotonic(t, m1, m2);
  t.like(m2, {
    lookup_attempts_success: 8,
    lookup_attempts_retry: 4,
    lookup_attempts_failed: 1,
    tracking_success_retry: 3,
    tracking_failures_not_found: 1,
    tracking_failures_lookup_failed: 1, // an event: stays counted although the row resolved since
    pending_attributions: 0,
    failed_attributions: 4,
    authenticated_tracking_rate: 7 / 11,
  });

  // bob gets a key alive since before his requests: the backfill fills them; the failures stay counted.
  const bobKey = await createKey(db, bob);
  await db.owner.query("update app_public.api_keys set created_at = now() - interval '1 day' where id = $1", [bobKey.id]);
  const run = (await db.owner.query("select id from app_public.start_attribution_backfill(100)")).rows[0];
  const done = (await db.owner.query("select * from app_private.run_attribution_backfill_batch($1)", [run.id])).rows[0];
  t.like(done, { status: "finished", filled: "2" });
  const m3 = await metrics();
  monotonic(t, m2, m3);
  t.like(m3, {
    tracking_success_backfill: 2,
    tracking_failures_no_key: 2,
    lookup_attempts_failed: 3, // + the backfill meeting the never-known and the bypass hashes
    failed_attributions: 2,
  });

  // A second backfill over the same rows counts no new failures.
  const run2 = (await db.owner.query("select id from app_public.start_attribution_backfill(100)")).rows[0];
  await db.owner.query("select * from app_private.run_attribution_backfill_batch($1)", [run2.id]);
  const m4 = await metrics();
  monotonic(t, m3, m4);
  t.is(m4.tracking_failures_no_key, 2);
  t.is(m4.tracking_failures_ambiguous, 0);
});

test.serial("initial_attribution never changes", async (t) => {
  const err = await db.owner
    .query("update app_public.chat_completion_requests set initial_attribution = 'anonymous' where request_id = 'key-0'")
    .then(() => null, (e) => e);
  t.is(err?.code, "55000");
  // Other updates of the row are fine.
  await db.owner.query("update app_public.chat_completion_requests set model = 'gpt-4o-mini' where request_id = 'key-0'");
  t.pass();
});

test.serial("offenders: the key hashes and users behind the most unattributed requests", async (t) => {
  const carol = await createUser(db, "carol@example.com");
  for (let i = 0; i < 3; i++) await insert(`carol-${i}`, { userId: carol });
  for (let i = 0; i < 5; i++) await insert(`mystery-${i}`, { key: "kt_live_mystery" });
  await insert("mystery-old", { key: "kt_live_mystery", at: new Date(Date.now() - 48 * 3600_000).toISOString() });
  const mystery = (await db.owner.query("select encode(app_public.api_key_hash('kt_live_mystery'), 'hex') as h")).rows[0].h;

  const rows = (await db.owner.query("select * from app_public.attribution_offenders(24, 2)")).rows;
  t.is(rows.length, 2);
  t.like(rows[0], { kind: "api_key_hash", api_key_hash: mystery, user_id: null, email: null, unattributed_requests: "5", pending_requests: "5", failed_requests: "0", reasons: ["not_found"] });
  t.like(rows[1], { kind: "user", api_key_hash: null, user_id: carol, email: "carol@example.com", unattributed_requests: "3", pending_requests: "0", failed_requests: "3", reasons: ["no_key"] });

  const wider = (await db.owner.query("select * from app_public.attribution_offenders(72)")).rows;
  t.like(wider.find((r) => r.api_key_hash === mystery), { unattributed_requests: "6" });

  for (const [hours, max] of [[0, 20], [8761, 20], [24, 0], [24, 1001]]) {
    const err = await db.owner.query("select * from app_public.attribution_offenders($1, $2)", [hours, max]).then(() => null, (e) => e);
    t.is(err?.code, "22023", `hours ${hours}, max_rows ${max}`);
  }
});
