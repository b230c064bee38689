// Keys made by users: at most keytrack.max_live_keys_per_user live keys (admins
// exempt), and a key made with a key is revoked with it, transitively, so a
// leaked key that an admin revokes keeps no way in.
import test from "ava";

import { asRole, createKey, createTestDb, createUser, type TestDb } from "../helpers/db.js";

let db: TestDb;
test.before(async () => {
  db = await createTestDb();
});
test.after.always(async () => {
  await db?.drop();
});

const createAsKey = "select * from app_public.create_api_key($1, $2)";

test("a user may hold at most the live-key limit; a revoked key frees its place; admins are not limited", async (t) => {
  const user = await createUser(db, "limited@example.com");
  const first = await createKey(db, user, "first");
  const err = await asRole(db, "keytrack_user", { userId: user, apiKeyId: first.id }, async (c) => {
    await c.query("select set_config('keytrack.max_live_keys_per_user', '3', true)");
    await c.query(createAsKey, [user, "second"]);
    await c.query(createAsKey, [user, "third"]);
    return c.query(createAsKey, [user, "fourth"]).then(() => null, (e) => e);
  });
  t.is(err?.code, "54000");
  t.regex(err?.message ?? "", /at most 3 live API keys/);

  // Default limit 20; a revoked key frees its place.
  await asRole(db, "keytrack_user", { userId: user, apiKeyId: first.id }, async (c) => {
    for (let i = 0; i < 19; i++) await c.query(createAsKey, [user, `k${i}`]);
    // A savepoint, so that the refusal does not end the transaction.
    await c.query("savepoint refused");
    t.is((await c.query(createAsKey, [user, "one too many"]).then(() => null, (e) => e))?.code, "54000");
    await c.query("rollback to savepoint refused");
    await c.query("select app_public.revoke_api_key(id) from app_public.api_keys where user_id = $1 and name = 'k0'", [user]);
    await t.notThrowsAsync(c.query(createAsKey, [user, "after a revocation"]));
  });

  const admin = await createUser(db, "admin-many@example.com", "admin");
  await asRole(db, "keytrack_admin", { userId: admin }, async (c) => {
    await c.query("select set_config('keytrack.max_live_keys_per_user', '1', true)");
    for (let i = 0; i < 5; i++) await c.query(createAsKey, [user, `by-admin-${i}`]);
    t.pass();
  });
});

test("revoking a key revokes the keys made with it, and theirs; keys made otherwise stay", async (t) => {
  const user = await createUser(db, "leak@example.com");
  const leaked = await createKey(db, user, "leaked");
  const other = await createKey(db, user, "other");
  await asRole(db, "keytrack_user", { userId: user, apiKeyId: leaked.id }, async (c) => {
    const child = (await c.query(createAsKey, [user, "child"])).rows[0].api_key_id;
    await c.query("select set_config('keytrack.api_key_id', $1, true)", [child]);
    const grandchild = (await c.query(createAsKey, [user, "grandchild"])).rows[0].api_key_id;
    const { rows } = await c.query("select id, created_by_api_key_id from app_public.api_keys where id = any($1)", [[child, grandchild]]);
    t.deepEqual(Object.fromEntries(rows.map((r) => [r.id, r.created_by_api_key_id])), { [child]: leaked.id, [grandchild]: child });

    await c.query("select app_public.revoke_api_key($1)", [leaked.id]);
    const state = await c.query(
      "select name, revoked_at is not null as revoked from app_public.api_keys where user_id = $1 order by name", [user]);
    t.deepEqual(state.rows, [
      { name: "child", revoked: true },
      { name: "grandchild", revoked: true },
      { name: "leaked", revoked: true },
      { name: "other", revoked: false },
    ]);
    const usable = await c.query(
      "select count(*)::int as n from app_public.api_keys k where k.id = any($1) and k.revoked_at is null", [[child, grandchild, other.id]]);
    t.is(usable.rows[0].n, 1);
  });
});

test("a key created by the admin token or in SQL records no creator", async (t) => {
  const user = await createUser(db, "plain@example.com");
  const key = await createKey(db, user, "made in SQL");
  const { rows } = await db.owner.query("select created_by_api_key_id from app_public.api_keys where id = $1", [key.id]);
  t.is(rows[0].created_by_api_key_id, null);
});
