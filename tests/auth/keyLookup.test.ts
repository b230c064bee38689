// The one key lookup (server/auth/keyLookup.ts), against a fake database so the
// clock and failures are the test's: the cache's TTL, shared lookups, failures
// not cached, invalidation, and the last known answers during an outage.
import test from "ava";

import { createKeyLookup, type KeyRecord } from "../../server/auth/keyLookup.js";

const USABLE: KeyRecord = { apiKeyId: "k1", userId: "u1", userRole: "user", usable: true, reason: null };
const REVOKED: KeyRecord = { ...USABLE, usable: false, reason: "revoked" };
const UNKNOWN: KeyRecord = { apiKeyId: null, userId: null, userRole: null, usable: false, reason: "not_found" };

function fakeDb(options: { ttlMs?: number; staleMaxMs?: number } = {}) {
  const f = {
    queries: 0,
    answer: USABLE as KeyRecord,
    down: false,
    clock: 0,
  };
  const keys = createKeyLookup({
    query: async () => {
      f.queries++;
      await new Promise((r) => setTimeout(r, 2));
      if (f.down) throw new Error("connect ECONNREFUSED");
      return f.answer;
    },
    ttlMs: options.ttlMs ?? 1000,
    staleMaxMs: options.staleMaxMs ?? 0,
    now: () => f.clock,
  });
  return { f, keys };
}

const A = Buffer.alloc(32, 1);
const B = Buffer.alloc(32, 2);

test("an answer is cached for the TTL, then asked again", async (t) => {
  const { f, keys } = fakeDb({ ttlMs: 1000 });
  t.deepEqual(await keys.lookup(A), { record: USABLE, stale: false });
  await keys.lookup(A);
  t.is(f.queries, 1);
  f.answer = REVOKED;
  f.clock = 999;
  t.true((await keys.lookup(A)).record.usable, "still cached within the TTL");
  f.clock = 1000;
  t.deepEqual(await keys.lookup(A), { record: REVOKED, stale: false });
  t.is(f.queries, 2);
});

test("concurrent lookups of one key share one query; other keys have their own", async (t) => {
  const { f, keys } = fakeDb();
  await Promise.all([keys.lookup(A), keys.lookup(A), keys.lookup(B)]);
  t.is(f.queries, 2);
  t.is(keys.size(), 2);
});

test("TTL 0: every lookup asks the database", async (t) => {
  const { f, keys } = fakeDb({ ttlMs: 0 });
  await keys.lookup(A);
  await keys.lookup(A);
  t.is(f.queries, 2);
});

test("a failed lookup rejects and is not cached: the next one asks again", async (t) => {
  const { f, keys } = fakeDb();
  f.down = true;
  await t.throwsAsync(keys.lookup(A), { message: /ECONNREFUSED/ });
  t.is(keys.size(), 0);
  f.down = false;
  t.true((await keys.lookup(A)).record.usable);
  t.is(f.queries, 2);
});

test("invalidation by key or by user drops the answers at once", async (t) => {
  const { f, keys } = fakeDb({ ttlMs: 60_000 });
  await keys.lookup(A);
  f.answer = REVOKED;
  keys.invalidate({ apiKeyId: "other" });
  t.true((await keys.lookup(A)).record.usable, "another key's change changes nothing");
  keys.invalidate({ apiKeyId: "k1" });
  t.false((await keys.lookup(A)).record.usable);
  f.answer = { ...USABLE, userRole: "admin" };
  keys.invalidate({ userId: "u1" });
  t.is((await keys.lookup(A)).record.userRole, "admin");
  keys.clear();
  t.is(keys.size(), 0);
});

test("an answer that arrives after an invalidation is not kept", async (t) => {
  const { f, keys } = fakeDb({ ttlMs: 60_000 });
  const pending = keys.lookup(A);
  keys.invalidate({ apiKeyId: "k1" });
  keys.clear();
  await pending;
  f.answer = REVOKED;
  t.false((await keys.lookup(A)).record.usable);
  t.is(f.queries, 2);
});

test("database down: a key verified within AUTH_STALE_MAX_MS is served stale, then no longer", async (t) => {
  const { f, keys } = fakeDb({ ttlMs: 1000, staleMaxMs: 15 * 60_000 });
  await keys.lookup(A);
  f.down = true;
  f.clock = 5000;
  t.deepEqual(await keys.lookup(A), { record: USABLE, stale: true });
  f.clock = 15 * 60_000;
  t.deepEqual(await keys.lookup(A), { record: USABLE, stale: true }, "15 minutes after the last answer: still");
  f.clock = 15 * 60_000 + 1;
  await t.throwsAsync(keys.lookup(A), { message: /ECONNREFUSED/ }, "past the bound: unavailable");
  f.down = false;
  t.deepEqual(await keys.lookup(A), { record: USABLE, stale: false });
});

test("database down: a revoked key stays refused, an unknown key is unavailable, staleMaxMs 0 serves nothing stale", async (t) => {
  const { f, keys } = fakeDb({ ttlMs: 1000, staleMaxMs: 60_000 });
  f.answer = REVOKED;
  await keys.lookup(A);
  f.answer = UNKNOWN;
  await keys.lookup(B);
  f.down = true;
  f.clock = 2000;
  t.deepEqual(await keys.lookup(A), { record: REVOKED, stale: true });
  await t.throwsAsync(keys.lookup(B), { message: /ECONNREFUSED/ }, "not found before: it may exist now");

  const strict = fakeDb({ ttlMs: 1000, staleMaxMs: 0 });
  await strict.keys.lookup(A);
  strict.f.down = true;
  strict.f.clock = 2000;
  await t.throwsAsync(strict.keys.lookup(A));
});

test("at most maxEntries keys are remembered, the oldest forgotten first", async (t) => {
  const keys = createKeyLookup({ query: async () => USABLE, ttlMs: 60_000, staleMaxMs: 0, maxEntries: 2 });
  for (const n of [1, 2, 3]) await keys.lookup(Buffer.alloc(32, n));
  t.is(keys.size(), 2);
});
