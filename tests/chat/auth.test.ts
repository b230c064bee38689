// Chat authentication: the cache (TTL, shared lookups, failures not cached),
// revocation taking effect within the TTL, and development mode (the dev key,
// the bypass key).
import test from "ava";
import OpenAI from "openai";

import type { AppContext, Installer } from "../../server/app.js";
import { createChatAuth } from "../../server/chat/auth.js";
import { DEV_BYPASS_KEY, type DevKey } from "../../server/chat/devKey.js";
import { installChat } from "../../server/chat/installChat.js";
import { createLogger } from "../../server/log.js";
import { sha256 } from "../../server/middleware/installAdminAuth.js";
import { createKey, createTestDb, createUser, type TestDb } from "../helpers/db.js";
import { startTestServer } from "../helpers/server.js";
import { client, rowOf, startChatServer, tempDataDir } from "./helpers.js";

// ---------------------------------------------------------------- unit: a fake context

interface FakeCtx {
  ctx: AppContext;
  queries: number;
  row: Record<string, unknown>;
  fail: boolean;
  clock: number;
}

function fakeCtx(config: { authCacheTtlMs?: number; appEnv?: string; allowAnonymous?: boolean; devKey?: DevKey } = {}): FakeCtx {
  const f: FakeCtx = {
    queries: 0,
    row: { api_key_id: "k1", user_id: "u1", is_usable: true, reason: null },
    fail: false,
    clock: 0,
    ctx: undefined as unknown as AppContext,
  };
  f.ctx = {
    config: { authCacheTtlMs: config.authCacheTtlMs ?? 1000, appEnv: config.appEnv ?? "test", allowAnonymous: config.allowAnonymous ?? false },
    pools: {
      owner: {
        query: async () => {
          f.queries++;
          await new Promise((r) => setTimeout(r, 5));
          if (f.fail) throw new Error("connection refused");
          return { rows: [f.row] };
        },
      },
    },
    log: createLogger({ level: "error", write: () => {} }),
    devKey: config.devKey,
  } as unknown as AppContext;
  return f;
}

test("a key's lookup is cached for the TTL, then asked again", async (t) => {
  const f = fakeCtx({ authCacheTtlMs: 1000 });
  const auth = createChatAuth(f.ctx, () => f.clock);
  t.true((await auth.authenticate("Bearer kt_a")).ok);
  t.true((await auth.authenticate("Bearer kt_a")).ok);
  t.is(f.queries, 1);
  f.row = { api_key_id: "k1", user_id: "u1", is_usable: false, reason: "revoked" };
  f.clock = 999;
  t.true((await auth.authenticate("Bearer kt_a")).ok, "still cached within the TTL");
  f.clock = 1000;
  const after = await auth.authenticate("Bearer kt_a");
  t.false(after.ok);
  t.is(f.queries, 2);
  if (!after.ok) t.is(after.error.status, 401);
});

test("concurrent lookups of one key share one query; other keys have their own", async (t) => {
  const f = fakeCtx();
  const auth = createChatAuth(f.ctx, () => f.clock);
  await Promise.all([auth.authenticate("Bearer kt_a"), auth.authenticate("Bearer kt_a"), auth.authenticate("Bearer kt_b")]);
  t.is(f.queries, 2);
  t.is(auth.cacheSize(), 2);
});

test("a failed lookup is a 503 and is not cached", async (t) => {
  const f = fakeCtx();
  const auth = createChatAuth(f.ctx, () => f.clock);
  f.fail = true;
  const r = await auth.authenticate("Bearer kt_a");
  t.false(r.ok);
  if (!r.ok) t.deepEqual([r.error.status, r.error.code], [503, "auth_unavailable"]);
  f.fail = false;
  t.true((await auth.authenticate("Bearer kt_a")).ok);
  t.is(f.queries, 2);
});

test("AUTH_CACHE_TTL_MS=0: every request asks the database", async (t) => {
  const f = fakeCtx({ authCacheTtlMs: 0 });
  const auth = createChatAuth(f.ctx, () => f.clock);
  await auth.authenticate("Bearer kt_a");
  await auth.authenticate("Bearer kt_a");
  t.is(f.queries, 2);
  t.is(auth.cacheSize(), 0);
});

test("malformed headers and dev_local_ keys outside development are refused without a lookup", async (t) => {
  const f = fakeCtx();
  const auth = createChatAuth(f.ctx);
  for (const header of ["Basic abc", "Bearer", "Bearer two words", "kt_a"]) {
    const r = await auth.authenticate(header);
    t.false(r.ok, header);
  }
  const dev = await auth.authenticate("Bearer dev_local_123_local_development");
  t.false(dev.ok);
  if (!dev.ok) t.is(dev.reason, "dev_key_outside_development");
  t.is(f.queries, 0);
});

test("no credentials: anonymous only when allowed; in development, the dev key or the bypass", async (t) => {
  const none = async (config: Parameters<typeof fakeCtx>[0]) => createChatAuth(fakeCtx(config).ctx).authenticate(undefined);
  t.false((await none({ allowAnonymous: false })).ok);
  t.deepEqual(await none({ allowAnonymous: true }), { ok: true, identity: { kind: "anonymous" } });
  t.deepEqual(await none({ appEnv: "development", allowAnonymous: true }), { ok: true, identity: { kind: "anonymous" } });
  t.deepEqual(await none({ appEnv: "development", devKey: { kind: "key", key: "dev_local_x", apiKeyId: "k9" } }), {
    ok: true,
    identity: { kind: "dev", apiKeyHash: sha256("dev_local_x"), apiKeyId: "k9", attributionReason: null },
  });
  t.deepEqual(await none({ appEnv: "development", devKey: { kind: "bypass", key: DEV_BYPASS_KEY } }), {
    ok: true,
    identity: { kind: "dev", apiKeyHash: sha256(DEV_BYPASS_KEY), apiKeyId: null, attributionReason: "dev_bypass" },
  });
  // The dev key is for development only.
  t.false((await none({ appEnv: "production", devKey: { kind: "key", key: "dev_local_x", apiKeyId: "k9" } })).ok);
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
  const cached = await startChatServer(db, { AUTH_CACHE_TTL_MS: "500", ALLOW_ANONYMOUS: "false" });
  const uncached = await startChatServer(db, { AUTH_CACHE_TTL_MS: "0", ALLOW_ANONYMOUS: "false" });
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
  const dev = await startChatServer(db, { APP_ENV: "development" });
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
  const withBypass: Installer = (app, ctx) => {
    ctx.devKey = { kind: "bypass", key: DEV_BYPASS_KEY };
    return installChat(app, ctx);
  };
  const dev = await startTestServer(db, { APP_ENV: "development", KEYTRACK_DATA_DIR: tempDataDir() }, [withBypass]);
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
