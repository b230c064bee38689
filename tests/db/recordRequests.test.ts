// app_private.record_requests(): many rows in one set-based call must store
// exactly what as many INSERTs through the row trigger store (every column,
// every attribution branch), with the same exactly-once by request_id, the
// same rollup marks and retry wake-up, and leave the row trigger on for
// everything else in the transaction.
import { randomUUID } from "node:crypto";

import test from "ava";

import { INSERT_REQUEST_SQL, RECORD_REQUESTS_SQL, batchValues, insertValues } from "../../server/recording/recorder.js";
import type { RequestRecord } from "../../server/recording/types.js";
import { asRole, createKey, createTestDb, createUser, type TestDb } from "../helpers/db.js";

let db: TestDb;
let alice: string;
let bob: string;
let live: { id: string; secret: string };
let dev: { id: string; secret: string };
let revoked: { id: string; secret: string };
let processId: string;

test.before(async () => {
  db = await createTestDb();
  alice = await createUser(db, "alice@example.com");
  bob = await createUser(db, "bob@example.com");
  live = await createKey(db, alice, "live");
  dev = await createKey(db, bob, "dev");
  await db.owner.query("update app_public.api_keys set environment = 'development' where id = $1", [dev.id]);
  revoked = await createKey(db, alice, "revoked");
  await db.owner.query("select app_public.revoke_api_key($1)", [revoked.id]);
  processId = (await db.owner.query(
    "insert into app_public.serving_processes (host, pid, version) values ('test', 1, 'test') returning id")).rows[0].id;
});
test.after.always(async () => {
  await db?.drop();
});

const hash = (key: string) => db.owner.query("select app_public.api_key_hash($1) as h", [key]).then((r) => r.rows[0].h as Buffer);

/** One row of every kind the trigger tells apart; `id` makes its request id. */
async function everyKind(id: (name: string) => string, createdAt: Date): Promise<RequestRecord[]> {
  const base = { createdAt, model: "gpt-4o", provider: "openai", inputTokens: 5, outputTokens: 7, processingTimeMs: 12, status: "completed" as const, errorMessage: null };
  const unknown = await hash("kt_live_nobody_has_this_key");
  return [
    { ...base, requestId: id("live"), apiKeyHash: await hash(live.secret) },
    { ...base, requestId: id("dev"), apiKeyHash: await hash(dev.secret) },
    { ...base, requestId: id("revoked"), apiKeyHash: await hash(revoked.secret) },
    { ...base, requestId: id("unknown"), apiKeyHash: unknown },
    { ...base, requestId: id("unknown-user"), apiKeyHash: unknown, userId: alice },
    { ...base, requestId: id("lookup-failed"), apiKeyHash: unknown, attributionReason: "lookup_failed" as never },
    { ...base, requestId: id("dev-bypass"), apiKeyHash: unknown, attributionReason: "dev_bypass" },
    { ...base, requestId: id("dev-bypass-known"), apiKeyHash: await hash(live.secret), attributionReason: "dev_bypass" },
    { ...base, requestId: id("hash-and-other-key"), apiKeyHash: await hash(live.secret), apiKeyId: dev.id, userId: bob },
    { ...base, requestId: id("key-id"), apiKeyHash: null, apiKeyId: live.id },
    { ...base, requestId: id("dev-key-id"), apiKeyHash: null, apiKeyId: dev.id, userId: alice },
    { ...base, requestId: id("user-only"), apiKeyHash: null, userId: bob },
    { ...base, requestId: id("anonymous"), apiKeyHash: null, status: "failed", errorMessage: "upstream 502" },
    { ...base, requestId: id("process"), apiKeyHash: await hash(live.secret), processId, processSeq: 7 },
  ];
}

/** The columns a writer cannot choose, compared by kind: times by presence. */
const TIMES = ["attributed_at", "attribution_next_attempt_at"];
function comparable(row: Record<string, unknown>, prefix: string) {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(row)) {
    if (k === "id") continue;
    if (k === "request_id") out[k] = (v as string).slice(prefix.length);
    else if (TIMES.includes(k)) out[k] = v === null ? null : "set";
    else out[k] = v;
  }
  return out;
}

async function ledger(prefix: string) {
  const { rows } = await db.owner.query(
    "select * from app_public.chat_completion_requests where starts_with(request_id, $1) order by request_id", [prefix]);
  return rows.map((r) => comparable(r, prefix));
}

test.serial("every kind of row: record_requests stores what the row trigger stores, column by column", async (t) => {
  const at = new Date(Date.now() - 1000);
  const byTrigger = await everyKind((n) => `trg-${n}`, at);
  for (const r of byTrigger) await db.owner.query(INSERT_REQUEST_SQL, insertValues(r));
  const bySet = await everyKind((n) => `set-${n}`, at);
  const { rows } = await db.owner.query(RECORD_REQUESTS_SQL, batchValues(bySet));
  t.deepEqual(rows.map((r) => r.request_id).sort(), bySet.map((r) => r.requestId).sort(), "every request id is returned");

  const expected = await ledger("trg-");
  const got = await ledger("set-");
  t.is(got.length, byTrigger.length);
  t.deepEqual(got, expected);
  // The kinds really differ (a mistake in the helpers would compare nothing).
  const status = Object.fromEntries(got.map((r) => [r.request_id, `${r.attribution_status}/${r.initial_attribution}`]));
  t.like(status, {
    live: "resolved/resolved_lookup", dev: "resolved/resolved_dev", revoked: "resolved/resolved_lookup",
    unknown: "pending/pending_not_found", "lookup-failed": "pending/pending_lookup_failed", "dev-bypass": "failed/failed_dev_bypass",
    "dev-bypass-known": "resolved/resolved_lookup", "key-id": "resolved/resolved_lookup", "dev-key-id": "resolved/resolved_dev",
    "user-only": "failed/failed_no_key", anonymous: "anonymous/anonymous",
  });
  const ids = await db.owner.query("select count(*)::int as n from app_private.request_ids where starts_with(request_id, 'set-')");
  t.is(ids.rows[0].n, bySet.length, "each recorded row claimed its request id");
});

test.serial("exactly once: a request id given twice keeps its first row, one already recorded is skipped, and only the recorded ids come back", async (t) => {
  const h = await hash(live.secret);
  const row = (requestId: string, model: string): RequestRecord => ({
    requestId, createdAt: new Date(), apiKeyHash: h, model, provider: "openai", inputTokens: 1, outputTokens: 1, processingTimeMs: 1, status: "completed", errorMessage: null,
  });
  await db.owner.query(INSERT_REQUEST_SQL, insertValues(row("dup-old", "first")));
  const { rows } = await db.owner.query(RECORD_REQUESTS_SQL, batchValues([
    row("dup-a", "first"), row("dup-old", "second"), row("dup-a", "second"), row("dup-b", "first"),
    // A re-delivery with another created_at is the same request.
    { ...row("dup-b", "third"), createdAt: new Date(Date.now() - 40 * 86_400_000) },
  ]));
  t.deepEqual(rows.map((r) => r.request_id).sort(), ["dup-a", "dup-b"]);
  const stored = await db.owner.query(
    "select request_id, model from app_public.chat_completion_requests where starts_with(request_id, 'dup-') order by request_id");
  t.deepEqual(stored.rows, [{ request_id: "dup-a", model: "first" }, { request_id: "dup-b", model: "first" }, { request_id: "dup-old", model: "first" }]);
  // And again: nothing new.
  const again = await db.owner.query(RECORD_REQUESTS_SQL, batchValues([row("dup-a", "x"), row("dup-b", "x")]));
  t.deepEqual(again.rows, []);
});

test.serial("late rows mark their ended hours for the rollups, the open hour is not marked, pending rows wake the worker", async (t) => {
  await db.root.query("delete from app_public.attribution_rollup_dirty_hours");
  await db.root.query("delete from graphile_worker._private_jobs");
  const hourAgo = (h: number) => new Date(Date.now() - h * 3_600_000);
  const base = { model: "m", provider: "p", inputTokens: 1, outputTokens: 1, processingTimeMs: 1, status: "completed" as const, errorMessage: null };
  await db.owner.query(RECORD_REQUESTS_SQL, batchValues([
    { ...base, requestId: `late-${randomUUID()}`, createdAt: hourAgo(3), apiKeyHash: await hash(live.secret) },
    { ...base, requestId: `late-${randomUUID()}`, createdAt: hourAgo(3), apiKeyHash: null },
    { ...base, requestId: `late-${randomUUID()}`, createdAt: hourAgo(5), apiKeyHash: null },
    { ...base, requestId: `late-${randomUUID()}`, createdAt: new Date(), apiKeyHash: await hash("kt_live_not_yet_imported") },
  ]));
  const { rows } = await db.root.query(
    "select distinct hour from app_public.attribution_rollup_dirty_hours order by hour");
  const trunc = (d: Date) => new Date(Math.floor(d.getTime() / 3_600_000) * 3_600_000).toISOString();
  t.deepEqual(rows.map((r) => (r.hour as Date).toISOString()), [trunc(hourAgo(5)), trunc(hourAgo(3))].sort());
  const jobs = await db.root.query("select task_identifier from graphile_worker.jobs");
  t.deepEqual(jobs.rows, [{ task_identifier: "chat_completion_requests__resolve_pending" }]);
});

test.serial("the row trigger still runs for every other insert of the transaction, also after a failed call", async (t) => {
  const client = await db.owner.connect();
  try {
    await client.query("begin");
    const base = { createdAt: new Date(), model: "m", provider: "p", inputTokens: 1, outputTokens: 1, processingTimeMs: 1, status: "completed" as const, errorMessage: null };
    await client.query(RECORD_REQUESTS_SQL, batchValues([{ ...base, requestId: "tx-set", apiKeyHash: await hash(live.secret) }]));
    await client.query("insert into app_public.chat_completion_requests (request_id, api_key_hash) values ('tx-plain', $1)", [await hash(live.secret)]);
    // A call that fails (a model longer than the column allows): nothing of it is stored, and the trigger runs after it.
    await client.query("savepoint s");
    const err = await client.query(RECORD_REQUESTS_SQL, batchValues([
      { ...base, requestId: "tx-bad-ok", apiKeyHash: null }, { ...base, requestId: "tx-bad", apiKeyHash: null, model: "x".repeat(201) },
    ])).catch((e) => e);
    t.is(err.code, "23514");
    await client.query("rollback to savepoint s");
    await client.query("insert into app_public.chat_completion_requests (request_id, api_key_hash) values ('tx-after', $1)", [await hash(live.secret)]);
    await client.query("commit");
  } finally {
    client.release();
  }
  const { rows } = await db.owner.query(
    "select request_id, api_key_id, attribution_status, initial_attribution from app_public.chat_completion_requests where starts_with(request_id, 'tx-') order by request_id");
  t.deepEqual(rows, [
    { request_id: "tx-after", api_key_id: live.id, attribution_status: "resolved", initial_attribution: "resolved_lookup" },
    { request_id: "tx-plain", api_key_id: live.id, attribution_status: "resolved", initial_attribution: "resolved_lookup" },
    { request_id: "tx-set", api_key_id: live.id, attribution_status: "resolved", initial_attribution: "resolved_lookup" },
  ]);
  const claimed = await db.owner.query("select count(*)::int as n from app_private.request_ids where starts_with(request_id, 'tx-bad')");
  t.is(claimed.rows[0].n, 0, "the failed call claimed nothing");
});

test.serial("only the owner may call it", async (t) => {
  const err = await asRole(db, "keytrack_admin", {}, (c) =>
    c.query(RECORD_REQUESTS_SQL, batchValues([])).then(() => null, (e) => e));
  t.is(err?.code, "42501");
});
