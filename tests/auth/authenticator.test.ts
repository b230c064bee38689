// The one authenticator (server/auth): the Bearer parser, the admin token, the
// dev_local_ rule, what logs may say about a token, and revocation reaching
// every process at once through the database's key-change notifications.
import test from "ava";
import OpenAI from "openai";

import { createAuthenticator } from "../../server/auth/authenticator.js";
import { parseBearer } from "../../server/auth/bearer.js";
import { listenForKeyChanges } from "../../server/auth/keyChanges.js";
import { createKeyLookup, queryKey, type KeyRecord } from "../../server/auth/keyLookup.js";
import { tokenForLog } from "../../server/auth/secrets.js";
import { createLogger } from "../../server/log.js";
import { client } from "../helpers/chat.js";
import { createKey, createTestDb, createUser, type TestDb } from "../helpers/db.js";
import { waitFor } from "../helpers/poll.js";
import { ADMIN_TOKEN, graphql, startTestServer } from "../helpers/server.js";

const quiet = createLogger({ level: "error", write: () => {} });

test("one Bearer parser: scheme case-insensitive, one token of printable ASCII", (t) => {
  t.deepEqual(parseBearer(undefined), { kind: "none" });
  t.deepEqual(parseBearer("  "), { kind: "none" });
  t.deepEqual(parseBearer("Bearer kt_live_x"), { kind: "token", token: "kt_live_x" });
  t.deepEqual(parseBearer("bearer   kt_live_x "), { kind: "token", token: "kt_live_x" });
  for (const bad of ["Basic abc", "Bearer", "Bearer a b", "Bearer é", "kt_live_x", "Bearer\tx"]) {
    t.deepEqual(parseBearer(bad), { kind: "malformed" }, bad);
  }
});

test("logs may show a well-formed key's public prefix, and nothing of any other token", (t) => {
  t.is(tokenForLog(`kt_live_${"ab12".repeat(16)}`), "kt_live_ab12…");
  t.is(tokenForLog(ADMIN_TOKEN), "(not a keytrack key)");
  t.is(tokenForLog("kt_live_short"), "(not a keytrack key)");
});

function fakeAuth(appEnv: "development" | "test", record: KeyRecord) {
  let queries = 0;
  const keys = createKeyLookup({ query: async () => (queries++, record), ttlMs: 1000, staleMaxMs: 0 });
  const auth = createAuthenticator({ appEnv, adminApiKey: ADMIN_TOKEN, keys, log: quiet });
  return { auth, queries: () => queries };
}
const USER_KEY: KeyRecord = { apiKeyId: "k1", userId: "u1", userRole: "user", usable: true, reason: null };

test("the rules, each in one place: admin token, dev_local_ outside development, refusals with their reason", async (t) => {
  const { auth, queries } = fakeAuth("test", USER_KEY);
  t.deepEqual(await auth.authenticate(undefined), { ok: true, principal: null });
  t.deepEqual(await auth.authenticate(`Bearer ${ADMIN_TOKEN}`), { ok: true, principal: { kind: "admin_token" } });
  t.deepEqual(await auth.authenticate("Bearer dev_local_u_local_development"), { ok: false, status: 401, reason: "dev_key_outside_development" });
  t.deepEqual(await auth.authenticate("Token x"), { ok: false, status: 401, reason: "malformed_authorization_header" });
  t.is(queries(), 0, "none of these asked the database");
  const r = await auth.authenticate("Bearer kt_live_x");
  t.like(r, { ok: true, principal: { kind: "key", apiKeyId: "k1", userId: "u1", isAdmin: false, stale: false } });

  const revoked = fakeAuth("test", { ...USER_KEY, usable: false, reason: "revoked" });
  t.deepEqual(await revoked.auth.authenticate("Bearer kt_live_x"), { ok: false, status: 401, reason: "revoked" });
  const dev = fakeAuth("development", USER_KEY);
  t.like(await dev.auth.authenticate("Bearer dev_local_u_local_development"), { ok: true });
});

test("a lookup that fails is a 503 (lookup_failed)", async (t) => {
  const keys = createKeyLookup({ query: async () => Promise.reject(new Error("down")), ttlMs: 1000, staleMaxMs: 0 });
  const auth = createAuthenticator({ appEnv: "test", adminApiKey: null, keys, log: quiet });
  t.deepEqual(await auth.authenticate("Bearer kt_live_x"), { ok: false, status: 503, reason: "lookup_failed" });
});

// ------------------------------------------------------------ against the database

let db: TestDb;
test.before(async () => {
  db = await createTestDb();
});
test.after.always(async () => {
  await db?.drop();
});

const messages = [{ role: "user" as const, content: "hi" }];

test.serial("a revocation reaches every process at once, whatever the cache's TTL (GraphQL and /v1 alike)", async (t) => {
  // Two service processes with a 10-minute cache: only the key-change notification can make this pass.
  const one = await startTestServer(db, { AUTH_CACHE_TTL_MS: "600000" });
  const two = await startTestServer(db, { AUTH_CACHE_TTL_MS: "600000" });
  try {
    const user = await createUser(db, "leaked@example.com");
    const leaked = await createKey(db, user, "leaked");
    // A key made with the leaked key: revoking the leaked one must not leave a way in.
    const made = await graphql(one, `mutation { createApiKey(input: { userId: "${user}", name: "made" }) { result { secret } } }`, {}, leaked.secret);
    t.is(made.status, 200, JSON.stringify(made.body));
    for (const server of [one, two]) {
      await client(server, leaked.secret).chat.completions.create({ model: "echo", messages });
      t.is((await graphql(server, "{ allApiKeys { totalCount } }", {}, leaked.secret)).status, 200);
    }
    const revoke = await graphql(one, `mutation { revokeApiKey(input: { apiKeyId: "${leaked.id}" }) { result { revokedAt } } }`, {}, ADMIN_TOKEN);
    t.truthy(revoke.body.data?.revokeApiKey?.result?.revokedAt, JSON.stringify(revoke.body));
    for (const server of [one, two]) {
      // The notification is delivered at commit; the listener needs a moment to receive it.
      await waitFor("the revocation to reach the process", async () => (await graphql(server, "{ allApiKeys { totalCount } }", {}, leaked.secret)).status === 401);
      const err = await t.throwsAsync(client(server, leaked.secret).chat.completions.create({ model: "echo", messages }), { instanceOf: OpenAI.AuthenticationError });
      t.is(err.code, "api_key_revoked");
    }
  } finally {
    await one.close();
    await two.close();
  }
});

test.serial("aliased createApiKey mutations make at most MAX_LIVE_KEYS_PER_USER keys; revoking the key that made them revokes them all", async (t) => {
  const server = await startTestServer(db, { MAX_LIVE_KEYS_PER_USER: "5" });
  try {
    const user = await createUser(db, "aliases@example.com");
    const key = await createKey(db, user, "maker");
    const aliased = (n: number) => `mutation { ${Array.from({ length: n }, (_, i) => `k${i}: createApiKey(input: { userId: "${user}", name: "k${i}" }) { result { secret } }`).join(" ")} }`;
    // A hundred aliases are refused whole by the GraphQL limits (nothing runs)...
    const hundred = await graphql(server, aliased(100), {}, key.secret);
    t.is(hundred.status, 400, JSON.stringify(hundred.body.errors?.[0]));
    t.is((await db.owner.query("select count(*)::int as n from app_public.api_keys where user_id = $1", [user])).rows[0].n, 1);
    // ... and within them, the live-key limit stops the rest.
    const res = await graphql(server, aliased(10), {}, key.secret);
    const made = Object.values(res.body.data ?? {}).filter((v) => v !== null).length;
    t.is(made, 4, "the maker plus 4 = 5 live keys");
    t.true((res.body.errors ?? []).some((e) => e.extensions?.code === "54000" && /at most 5 live API keys/.test(e.message)), JSON.stringify(res.body.errors?.[0]));
    const secrets = Object.values(res.body.data ?? {}).filter(Boolean).map((v) => (v as { result: { secret: string } }).result.secret);
    t.is((await graphql(server, "{ allApiKeys { totalCount } }", {}, secrets[0])).status, 200);

    await db.owner.query("select app_public.revoke_api_key($1)", [key.id]);
    for (const secret of secrets) {
      await waitFor("a key made with the revoked key to be refused", async () => (await graphql(server, "{ allApiKeys { totalCount } }", {}, secret)).status === 401);
    }
    t.pass();
  } finally {
    await server.close();
  }
});

test.serial("a user's role change reaches the cache at once: a demoted admin's key loses admin rights", async (t) => {
  const server = await startTestServer(db, { AUTH_CACHE_TTL_MS: "600000" });
  try {
    const admin = await createUser(db, "demoted@example.com", "admin");
    const key = await createKey(db, admin, "admin key");
    const asAdmin = await fetch(`${server.url}/admin/monitoring/api-key-tracking-quality`, { headers: { authorization: `Bearer ${key.secret}` } });
    t.is(asAdmin.status, 200);
    await db.owner.query("update app_public.users set role = 'user' where id = $1", [admin]);
    await waitFor("the demotion to reach the process", async () =>
      (await fetch(`${server.url}/admin/monitoring/api-key-tracking-quality`, { headers: { authorization: `Bearer ${key.secret}` } })).status === 403);
    t.pass();
  } finally {
    await server.close();
  }
});

test.serial("the listener reconnects after its connection is killed, and clears the cache then", async (t) => {
  const keys = createKeyLookup({ query: queryKey(db.owner), ttlMs: 600_000, staleMaxMs: 0 });
  const listener = listenForKeyChanges({ connectionString: db.ownerUrl, keys, log: quiet, retryBaseMs: 50 });
  try {
    await listener.ready;
    const key = await createKey(db, await createUser(db, "reconnect@example.com"));
    const hash = (await db.owner.query("select app_public.api_key_hash($1) as h", [key.secret])).rows[0].h as Buffer;
    t.true((await keys.lookup(hash)).record.usable);
    await db.root.query(
      "select pg_terminate_backend(pid) from pg_stat_activity where datname = current_database() and query ilike 'listen keytrack_key_changes%'");
    // Revoked while nobody listened: the reconnection's clear makes the next lookup ask again.
    await db.owner.query("select app_public.revoke_api_key($1)", [key.id]);
    await waitFor("the cache to be cleared on reconnection", () => keys.size() === 0);
    t.false((await keys.lookup(hash)).record.usable);
  } finally {
    await listener.close();
  }
});
