// The BEFORE INSERT trigger attributes every row from the presented key hash,
// whoever writes it, and request_id makes re-delivery a no-op.
import test from "ava";
import { asRole, createKey, createTestDb, createUser, withClient, type TestDb } from "../helpers/db.js";

let db: TestDb;
let alice: string;

test.before(async () => {
  db = await createTestDb();
  alice = await createUser(db, "alice@example.com");
});
test.after.always(async () => {
  await db?.drop();
});

async function record(values: Record<string, unknown>) {
  const cols = Object.keys(values);
  const { rows } = await db.owner.query(
    `insert into app_public.chat_completion_requests (${cols.join(", ")})
     values (${cols.map((_, i) => `$${i + 1}`).join(", ")}) returning *`,
    Object.values(values),
  );
  return rows[0];
}
const hash = (key: string) => db.owner.query("select app_public.api_key_hash($1) as h", [key]).then((r) => r.rows[0].h as Buffer);

test("a valid key resolves the key and its user", async (t) => {
  const key = await createKey(db, alice);
  const row = await record({ request_id: "valid-1", api_key_hash: await hash(key.secret), model: "gpt-4o" });
  t.like(row, { api_key_id: key.id, user_id: alice, is_anonymous: false, attribution_status: "resolved", attribution_method: "lookup", attribution_attempts: 1 });
  t.truthy(row.attributed_at);
});

test("the hash is sha256 of the key's UTF-8 bytes, computable by any writer", async (t) => {
  const { createHash } = await import("node:crypto");
  const key = "kt_live_ünïcödé";
  t.deepEqual(await hash(key), createHash("sha256").update(key, "utf8").digest());
});

test("a revoked key still attributes the request: the key made it", async (t) => {
  const key = await createKey(db, alice);
  await db.owner.query("select app_public.revoke_api_key($1)", [key.id]);
  const row = await record({ request_id: "revoked-1", api_key_hash: await hash(key.secret) });
  t.like(row, { api_key_id: key.id, user_id: alice, attribution_status: "resolved" });
});

test("an unknown key leaves the row pending with its hash, not anonymous", async (t) => {
  const h = await hash("kt_live_not_a_known_key");
  const row = await record({ request_id: "unknown-1", api_key_hash: h });
  t.like(row, { api_key_id: null, user_id: null, is_anonymous: false, attribution_status: "pending", attribution_reason: "not_found" });
  t.deepEqual(row.api_key_hash, h);
  t.truthy(row.attribution_next_attempt_at);
});

test("no key and no user is anonymous", async (t) => {
  const row = await record({ request_id: "anon-1" });
  t.like(row, { api_key_id: null, user_id: null, is_anonymous: true, attribution_status: "anonymous" });
});

test("a user without a key is a potential lookup failure, not anonymous", async (t) => {
  const row = await record({ request_id: "user-only-1", user_id: alice });
  t.like(row, { api_key_id: null, user_id: alice, is_anonymous: false, attribution_status: "failed", attribution_reason: "no_key" });
});

test("a known api_key_id is resolved and its user filled in", async (t) => {
  const key = await createKey(db, alice);
  const row = await record({ request_id: "by-id-1", api_key_id: key.id });
  t.like(row, { api_key_id: key.id, user_id: alice, attribution_status: "resolved" });
});

test("writers cannot forge attribution: status and anonymity are derived", async (t) => {
  const row = await record({ request_id: "forged-1", attribution_status: "resolved", is_anonymous: false, attribution_method: "backfill" });
  t.like(row, { is_anonymous: true, attribution_status: "anonymous", attribution_method: null });
  const row2 = await record({ request_id: "forged-2", is_anonymous: true, api_key_hash: await hash("kt_x") });
  t.like(row2, { is_anonymous: false, attribution_status: "pending" });
});

test("re-inserting the same request_id changes nothing", async (t) => {
  const key = await createKey(db, alice);
  const first = await record({ request_id: "dup-1", api_key_hash: await hash(key.secret), model: "a", input_tokens: 1 });
  const again = await db.owner.query(
    "insert into app_public.chat_completion_requests (request_id, model, input_tokens, created_at) values ('dup-1', 'b', 99, now() - interval '40 days') returning *",
  );
  t.is(again.rowCount, 0);
  const { rows } = await db.owner.query("select * from app_public.chat_completion_requests where request_id = 'dup-1'");
  t.is(rows.length, 1);
  t.deepEqual(rows[0], first);
});

test("concurrent re-deliveries of one request_id store exactly one row", async (t) => {
  const results = await Promise.all(
    Array.from({ length: 8 }, () =>
      db.owner.query("insert into app_public.chat_completion_requests (request_id) values ('race-1')"),
    ),
  );
  t.is(results.reduce((n, r) => n + (r.rowCount ?? 0), 0), 1);
  const { rows } = await db.owner.query("select count(*)::int as n from app_public.chat_completion_requests where request_id = 'race-1'");
  t.is(rows[0].n, 1);
});

test("bad rows are refused with clear SQLSTATEs and nothing stored", async (t) => {
  const short = await db.owner.query("insert into app_public.chat_completion_requests (request_id, api_key_hash) values ('bad-1', '\\x00')").catch((e) => e);
  t.is(short.code, "23514"); // check_violation: a hash is 32 bytes
  const badStatus = await db.owner.query("insert into app_public.chat_completion_requests (request_id, status) values ('bad-2', 'weird')").catch((e) => e);
  t.is(badStatus.code, "23514");
  const badKey = await db.owner.query("insert into app_public.chat_completion_requests (request_id, api_key_id) values ('bad-3', gen_random_uuid())").catch((e) => e);
  t.is(badKey.code, "23503");
  const { rows } = await db.owner.query("select count(*)::int as n from app_public.chat_completion_requests where request_id like 'bad-%'");
  t.is(rows[0].n, 0);
  // A refused row does not claim its request_id: a corrected retry is stored.
  const ok = await db.owner.query("insert into app_public.chat_completion_requests (request_id) values ('bad-1')");
  t.is(ok.rowCount, 1);
});

test("rows outside existing months land in the default partition and move to their month", async (t) => {
  await record({ request_id: "ancient-1", created_at: "2019-03-15T12:00:00Z" });
  const where = async () =>
    (await db.owner.query("select tableoid::regclass::text as p from app_public.chat_completion_requests where request_id = 'ancient-1'")).rows[0].p;
  t.is(await where(), "app_partitions.chat_completion_requests_default");
  const { rows } = await db.owner.query("select app_private.create_partitions() as n");
  t.is(rows[0].n, 1);
  t.is(await where(), "app_partitions.chat_completion_requests_p2019_03");
  const again = await db.owner.query("select app_private.create_partitions(6) as n");
  t.true(again.rows[0].n >= 0);
  const idem = await db.owner.query("select app_private.create_partitions(6) as n");
  t.is(idem.rows[0].n, 0);
  // The moved row keeps its attribution trigger on new inserts to that month.
  const row = await record({ request_id: "ancient-2", created_at: "2019-03-16T12:00:00Z" });
  t.is(row.attribution_status, "anonymous");
  const bad = await db.owner.query("select app_private.create_partitions(-1)").catch((e) => e);
  t.is(bad.code, "22023");
});

test("authenticate_api_key tells usable, revoked, expired and unknown keys apart", async (t) => {
  const live = await createKey(db, alice);
  const revoked = await createKey(db, alice);
  await db.owner.query("select app_public.revoke_api_key($1)", [revoked.id]);
  const { rows: [expired] } = await db.owner.query(
    "select * from app_public.create_api_key($1, 'soon', 'live', now() + interval '1 second')", [alice]);
  await db.owner.query("update app_public.api_keys set created_at = now() - interval '2 days', expires_at = now() - interval '1 day' where id = $1", [expired.api_key_id]);
  const check = async (secret: string) =>
    (await db.owner.query("select * from app_private.authenticate_api_key(app_public.api_key_hash($1))", [secret])).rows[0];
  t.like(await check(live.secret), { api_key_id: live.id, user_id: alice, user_role: "user", is_usable: true, reason: null });
  t.like(await check(revoked.secret), { api_key_id: revoked.id, is_usable: false, reason: "revoked" });
  t.like(await check(expired.secret), { api_key_id: expired.api_key_id, is_usable: false, reason: "expired" });
  t.like(await check("kt_live_nope"), { api_key_id: null, is_usable: false, reason: "not_found" });
  const viaAuthenticator = await withClient(db.authUrl, (c) =>
    c.query("select (app_private.authenticate_api_key($1::bytea)).is_usable", [Buffer.alloc(32)]));
  t.is(viaAuthenticator.rows[0].is_usable, false);
});

test("create_api_key returns the secret once and stores only its hash", async (t) => {
  const { rows: [k] } = await db.owner.query("select * from app_public.create_api_key($1, 'ci')", [alice]);
  t.regex(k.secret, /^kt_live_[0-9a-f]{64}$/);
  t.is(k.prefix, k.secret.slice(0, 12));
  const stored = await db.root.query(
    `select s.key_hash = sha256(convert_to($1, 'UTF8')) as matches, k.last4
       from app_private.api_key_secrets s join app_public.api_keys k on k.id = s.api_key_id where k.id = $2`,
    [k.secret, k.api_key_id]);
  t.deepEqual(stored.rows[0], { matches: true, last4: k.secret.slice(-4) });
  // Nothing in the database holds the secret itself.
  const { rows: [found] } = await db.root.query(
    `select count(*)::int as n from app_public.api_keys k where row(k.*)::text like '%' || $1 || '%'`, [k.secret]);
  t.is(found.n, 0);
  const bad = await db.owner.query("select app_public.create_api_key($1, 'x', 'prod')", [alice]).catch((e) => e);
  t.is(bad.code, "22023");
  const noUser = await db.owner.query("select app_public.create_api_key(gen_random_uuid())").catch((e) => e);
  t.is(noUser.code, "23503");
});

test("import_api_key registers a foreign key by hash; rows presenting it resolve", async (t) => {
  const foreign = "sk-gateway-issued-0001";
  const { rows: [imported] } = await db.owner.query(
    "select * from app_public.import_api_key($1, app_public.api_key_hash($2), 'gateway', 'live', 'sk-gate', '0001')", [alice, foreign]);
  t.like(imported, { user_id: alice, source: "imported", prefix: "sk-gate", last4: "0001" });
  const row = await record({ request_id: "imported-1", api_key_hash: await hash(foreign) });
  t.like(row, { api_key_id: imported.id, attribution_status: "resolved" });
  const dup = await db.owner.query("select app_public.import_api_key($1, app_public.api_key_hash($2))", [alice, foreign]).catch((e) => e);
  t.is(dup.code, "23505");
  const short = await db.owner.query("select app_public.import_api_key($1, '\\x0102')", [alice]).catch((e) => e);
  t.is(short.code, "22023");
});

test("keys are never hard-deleted; revoking twice keeps the first time", async (t) => {
  const key = await createKey(db, alice);
  const first = (await db.owner.query("select revoked_at from app_public.revoke_api_key($1)", [key.id])).rows[0].revoked_at;
  const second = (await db.owner.query("select revoked_at from app_public.revoke_api_key($1)", [key.id])).rows[0].revoked_at;
  t.deepEqual(first, second);
  // Nobody but the owner is granted DELETE: admins get permission denied.
  const asAdmin = await asRole(db, "keytrack_admin", {}, (c) =>
    c.query("delete from app_public.api_keys where id = $1", [key.id]).then(() => null, (e) => e));
  t.is(asAdmin?.code, "42501");
});

test("role checks in key management: users manage only their own keys", async (t) => {
  const bob = await createUser(db, "bob@example.com");
  const bobKey = await createKey(db, bob);
  const asUser = (userId: string, sql: string, params: unknown[]) =>
    asRole(db, "keytrack_user", { userId }, (c) => c.query(sql, params).then((r) => r.rows, (e) => e));
  const mine = await asUser(alice, "select * from app_public.create_api_key($1, 'mine')", [alice]);
  t.true(Array.isArray(mine) && /^kt_live_/.test(mine[0].secret));
  const forBob = await asUser(alice, "select * from app_public.create_api_key($1, 'not mine')", [bob]);
  t.is(forBob.code, "42501");
  const revokeBob = await asUser(alice, "select * from app_public.revoke_api_key($1)", [bobKey.id]);
  t.is(revokeBob.code, "P0002");
  const importAsUser = await asUser(alice, "select * from app_public.import_api_key($1, sha256('x'))", [alice]);
  t.is(importAsUser.code, "42501");
  const seen = await asUser(alice, "select user_id from app_public.api_keys", []);
  t.true(seen.length > 0 && seen.every((r: { user_id: string }) => r.user_id === alice));
});
