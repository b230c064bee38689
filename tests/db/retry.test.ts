// Pending rows (a key hash that matched no key at insert) are re-resolved with
// exponential backoff per row until they resolve or fail after the limit. Time
// is controlled explicitly through resolve_pending_attributions(as_of).
// Serial: every test moves the same queue of pending rows through time.
import test from "ava";
import { createUser, createTestDb, withClient, type TestDb } from "../helpers/db.js";

let db: TestDb;
let alice: string;

test.before(async () => {
  db = await createTestDb();
  alice = await createUser(db, "alice@example.com");
});
test.after.always(async () => {
  await db?.drop();
});

const T0 = new Date("2030-01-01T00:00:00Z");
const at = (seconds: number) => new Date(T0.getTime() + seconds * 1000);

async function pending(requestId: string, key: string) {
  await db.owner.query(
    "insert into app_public.chat_completion_requests (request_id, api_key_hash) values ($1, app_public.api_key_hash($2))",
    [requestId, key],
  );
  // Make the row due at T0 so the test controls time from there.
  await db.owner.query(
    "update app_public.chat_completion_requests set attribution_next_attempt_at = $2 where request_id = $1",
    [requestId, T0],
  );
}
const row = async (requestId: string) =>
  (await db.owner.query("select * from app_public.chat_completion_requests where request_id = $1", [requestId])).rows[0];
const resolve = async (asOf: Date, maxAttempts = 4, batch = 500) =>
  (await db.owner.query(
    "select * from app_private.resolve_pending_attributions($1, $2, interval '1 second', interval '1 minute', $3)",
    [batch, maxAttempts, asOf],
  )).rows[0];

test.serial("a key created after the request arrived: the retry resolves the row (method retry)", async (t) => {
  const key = "sk-created-later-1";
  await pending("later-1", key);
  t.is((await row("later-1")).attribution_status, "pending");
  const { rows: [imported] } = await db.owner.query("select * from app_public.import_api_key($1, app_public.api_key_hash($2))", [alice, key]);
  await resolve(at(3600)); // import made it due at once; any later time works
  t.like(await row("later-1"), {
    attribution_status: "resolved", attribution_method: "retry", api_key_id: imported.id, user_id: alice,
    attribution_attempts: 2, attribution_reason: null, is_anonymous: false,
  });
});

test.serial("a key that never appears is retried with growing delays, then failed with the reason and attempt count", async (t) => {
  await pending("never-1", "sk-never-1");
  const r1 = await resolve(at(0));
  t.true(r1.examined >= 1);
  let r = await row("never-1");
  t.like(r, { attribution_status: "pending", attribution_attempts: 2 });
  t.deepEqual(r.attribution_next_attempt_at, at(2)); // 1 s * 2^(2-1)
  // Not due yet: nothing happens.
  await resolve(at(1));
  t.is((await row("never-1")).attribution_attempts, 2);
  await resolve(at(2));
  r = await row("never-1");
  t.like(r, { attribution_status: "pending", attribution_attempts: 3 });
  t.deepEqual(r.attribution_next_attempt_at, at(2 + 4));
  await resolve(at(6));
  r = await row("never-1");
  t.like(r, { attribution_status: "failed", attribution_reason: "not_found", attribution_attempts: 4, attribution_next_attempt_at: null, api_key_id: null });
  t.regex(r.attribution_error, /attempt 4 of 4/);
  // Failed rows are left alone.
  await resolve(at(10_000));
  t.is((await row("never-1")).attribution_attempts, 4);
});

test.serial("resolution never changes other requests' rows", async (t) => {
  await pending("mine-1", "sk-mine-1");
  await db.owner.query("insert into app_public.chat_completion_requests (request_id, user_id) values ('other-1', $1)", [alice]);
  await db.owner.query("insert into app_public.chat_completion_requests (request_id) values ('other-2')");
  const before = (await db.owner.query("select * from app_public.chat_completion_requests where request_id like 'other-%' order by request_id")).rows;
  await db.owner.query("select app_public.import_api_key($1, app_public.api_key_hash('sk-mine-1'))", [alice]);
  await resolve(at(100_000));
  const after = (await db.owner.query("select * from app_public.chat_completion_requests where request_id like 'other-%' order by request_id")).rows;
  t.deepEqual(after, before);
  t.is((await row("mine-1")).attribution_status, "resolved");
});

test.serial("parallel workers share the queue (SKIP LOCKED): every row is looked up exactly once per round", async (t) => {
  await db.owner.query(
    `insert into app_public.chat_completion_requests (request_id, api_key_hash)
     select 'par-' || i, app_public.api_key_hash('sk-par-' || i) from generate_series(1, 300) i`,
  );
  await db.owner.query("update app_public.chat_completion_requests set attribution_next_attempt_at = $1 where request_id like 'par-%'", [T0]);
  const results = await Promise.all(
    [0, 1, 2, 3].map(() => withClient(db.ownerUrl, async (c) =>
      (await c.query("select * from app_private.resolve_pending_attributions(50, 10, interval '1 second', interval '1 minute', $1)", [at(0)])).rows[0])),
  );
  const { rows } = await db.owner.query(
    "select attribution_attempts as n, count(*)::int as c from app_public.chat_completion_requests where request_id like 'par-%' group by 1 order by 1");
  const examined = results.reduce((n, r) => n + r.examined, 0);
  t.is(examined, 200);
  t.deepEqual(rows, [{ n: 1, c: 100 }, { n: 2, c: 200 }]);
});

test.serial("a pending row wakes the worker: a job is queued, and bad settings are refused", async (t) => {
  await db.root.query("delete from graphile_worker._private_jobs");
  await pending("wake-1", "sk-wake-1");
  const { rows } = await db.root.query("select task_identifier, key from graphile_worker.jobs");
  t.deepEqual(rows, [{ task_identifier: "chat_completion_requests__resolve_pending", key: "chat_completion_requests__resolve_pending" }]);
  const bad = await db.owner.query("select app_private.resolve_pending_attributions(0)").catch((e) => e);
  t.is(bad.code, "22023");
});

test.serial("a revoked key keeps its attribution; rows presenting it after revocation still resolve to it", async (t) => {
  const { rows: [k] } = await db.owner.query("select * from app_public.create_api_key($1, 'to-revoke')", [alice]);
  await db.owner.query("insert into app_public.chat_completion_requests (request_id, api_key_hash) values ('rv-1', app_public.api_key_hash($1))", [k.secret]);
  await db.owner.query("select app_public.revoke_api_key($1)", [k.api_key_id]);
  t.like(await row("rv-1"), { api_key_id: k.api_key_id, attribution_status: "resolved" });
  await resolve(at(100_000));
  t.like(await row("rv-1"), { api_key_id: k.api_key_id, attribution_status: "resolved", attribution_method: "lookup" });
});
