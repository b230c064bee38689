// Whom a /v1 request is attributed to (server/chat/identity.ts): a usable key,
// the dev key or the bypass in development, anonymous only when allowed, never
// the admin token; and, against the service, revocation within the cache's TTL
// and development mode end to end. The key cache itself: tests/auth/.
import test from "ava";
import OpenAI from "openai";

import type { Authentication } from "../../server/auth/authenticator.js";
import { sha256 } from "../../server/auth/secrets.js";
import { chatIdentity } from "../../server/chat/identity.js";
import { DEV_BYPASS_KEY, type DevKey } from "../../server/chat/devKey.js";
import type { AppContext } from "../../server/context.js";
import { client, rowOf } from "../helpers/chat.js";
import { createKey, createTestDb, createUser, type TestDb } from "../helpers/db.js";
import { startTestServer } from "../helpers/server.js";

// ---------------------------------------------------------------- unit: the mapping

function ctxWith(config: { appEnv?: string; allowAnonymous?: boolean; devKey?: DevKey } = {}): AppContext {
  return {
    config: { appEnv: config.appEnv ?? "test", allowAnonymous: config.allowAnonymous ?? false },
    devKey: config.devKey,
  } as unknown as AppContext;
}
const NONE: Authentication = { ok: true, principal: null };

test("no credentials: anonymous only when allowed; in development, the dev key or the bypass", (t) => {
  const none = (config: Parameters<typeof ctxWith>[0]) => chatIdentity(ctxWith(config), NONE);
  t.like(none({ allowAnonymous: false }), { ok: false, error: { status: 401, code: "missing_api_key", message: "No credentials: send Authorization: Bearer <key>" } });
  t.deepEqual(none({ allowAnonymous: true }), { ok: true, identity: { kind: "anonymous" } });
  t.deepEqual(none({ appEnv: "development", allowAnonymous: true }), { ok: true, identity: { kind: "anonymous" } });
  t.deepEqual(none({ appEnv: "development", devKey: { kind: "key", key: "dev_local_x", apiKeyId: "k9" } }), {
    ok: true,
    identity: { kind: "dev", apiKeyHash: sha256("dev_local_x"), apiKeyId: "k9", attributionReason: null },
  });
  t.deepEqual(none({ appEnv: "development", devKey: { kind: "bypass", key: DEV_BYPASS_KEY } }), {
    ok: true,
    identity: { kind: "dev", apiKeyHash: sha256(DEV_BYPASS_KEY), apiKeyId: null, attributionReason: "dev_bypass" },
  });
  // The dev key is for development only.
  t.false(none({ appEnv: "production", devKey: { kind: "key", key: "dev_local_x", apiKeyId: "k9" } }).ok);
});

test("a key is its own identity; the admin token is not an API key; refusals keep their reason", (t) => {
  const ctx = ctxWith();
  const hash = sha256("kt_live_x");
  t.deepEqual(chatIdentity(ctx, { ok: true, principal: { kind: "key", apiKeyId: "k1", userId: "u1", isAdmin: true, apiKeyHash: hash, stale: false } }), {
    ok: true,
    identity: { kind: "key", apiKeyHash: hash, apiKeyId: "k1", userId: "u1" },
  });
  t.like(chatIdentity(ctx, { ok: true, principal: { kind: "admin_token" } }), { ok: false, error: { status: 401, code: "invalid_api_key" } });
  t.like(chatIdentity(ctx, { ok: false, status: 401, reason: "revoked" }), { ok: false, error: { status: 401, code: "api_key_revoked" } });
  t.like(chatIdentity(ctx, { ok: false, status: 401, reason: "expired" }), { ok: false, error: { status: 401, code: "api_key_expired" } });
  t.like(chatIdentity(ctx, { ok: false, status: 503, reason: "lookup_failed" }), { ok: false, error: { status: 503, code: "auth_unavailable" } });
});

// ---------------------------------------------------------------- against the service

let db: TestDb;
test.before(async () => {
  db = await createTestDb();
});
test.after.always(async () => {
  await db?.drop();
});

const messages = [{ role: "user" as const, content: "hi" }];
// Serial: starting servers prepares (migrates) the same database, which must not run concurrently.

test.serial("revoking a key takes effect within AUTH_CACHE_TTL_MS (and at once with 0)", async (t) => {
  const cached = await startTestServer(db, { AUTH_CACHE_TTL_MS: "500", ALLOW_ANONYMOUS: "false" });
  const uncached = await startTestServer(db, { AUTH_CACHE_TTL_MS: "0", ALLOW_ANONYMOUS: "false" });
  try {
    const key = await createKey(db, await createUser(db, "revoke@example.com"));
    await client(cached, key.secret).chat.completions.create({ model: "echo", messages });
    await client(uncached, key.secret).chat.completions.create({ model: "echo", messages });
    await db.owner.query("select app_public.revoke_api_key($1)", [key.id]);
    const revokedAt = Date.now();
    await t.throwsAsync(client(uncached, key.secret).chat.completions.create({ model: "echo", messages }), {
      instanceOf: OpenAI.AuthenticationError,
    });
    // Within the TTL the cached answer may still be used; after it, never.
    await new Promise((r) => setTimeout(r, Math.max(0, 520 - (Date.now() - revokedAt))));
    await t.throwsAsync(client(cached, key.secret).chat.completions.create({ model: "echo", messages }), {
      instanceOf: OpenAI.AuthenticationError,
    });
  } finally {
    await cached.close();
    await uncached.close();
  }
});

test.serial("development mode: a request without credentials is attributed to the dev key (the spec's test)", async (t) => {
  const dev = await startTestServer(db, { APP_ENV: "development" });
  try {
    const res = await fetch(`${dev.url}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: "gpt-3.5-turbo", messages: [{ role: "user", content: "test" }] }),
    });
    t.is(res.status, 200);
    const row = await rowOf(db, res.headers.get("x-request-id")!);
    const { rows } = await db.owner.query("select id from app_public.api_keys where environment = 'development'");
    t.is(row.api_key_id, rows[0].id);
    t.false(row.is_anonymous);
    t.is(row.status, "completed");
  } finally {
    await dev.close();
  }
});

test.serial("development mode with the bypass key: recorded with its hash and attribution reason dev_bypass, not anonymous", async (t) => {
  const dev = await startTestServer(db, { APP_ENV: "development" }, { devKey: { kind: "bypass", key: DEV_BYPASS_KEY } });
  try {
    const { response } = await client(dev, null).chat.completions.create({ model: "echo", messages }).withResponse();
    const row = await rowOf(db, response.headers.get("x-request-id")!);
    t.false(row.is_anonymous);
    t.is(row.api_key_id, null);
    t.deepEqual(row.api_key_hash, sha256(DEV_BYPASS_KEY));
    t.is(row.attribution_reason, "dev_bypass");
  } finally {
    await dev.close();
  }
});
