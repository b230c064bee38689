// Group commit in the recording path against a real PostgreSQL: rows recorded
// at the same time share one INSERT and one transaction, and each row keeps its
// own fate: a row the database refuses does not take its batch down, a batch
// that fails transiently is retried whole and spooled whole, exactly once by
// request_id, whatever is re-delivered.
import test from "ava";
import { readFile } from "node:fs/promises";

import { createRecorder } from "../../server/recording/recorder.js";
import { spoolPaths } from "../../server/recording/spool.js";
import { PermanentRecordError, type RecordOutcome } from "../../server/recording/types.js";
import { createTestDb, makePool, rowsFor, type TestDb } from "../helpers/db.js";
import { waitFor } from "../helpers/poll.js";
import { appName, blockedBackend, captureLog, holdRequestId, makeRow, PgProxy } from "../helpers/recording.js";
import { removeTempDataDirs, tempDataDir } from "../helpers/server.js";

let db: TestDb;
const cleanups: Array<() => Promise<unknown>> = [];

test.before(async () => {
  db = await createTestDb();
});
test.after.always(async () => {
  for (const c of cleanups.reverse()) await c().catch(() => {});
  await db?.drop();
  await removeTempDataDirs();
});

function track<T extends { close(): Promise<void> } | { end(): Promise<void> } | PgProxy>(x: T): T {
  if (x instanceof PgProxy) cleanups.push(() => x.down());
  else if ("close" in x) cleanups.push(() => x.close());
  else cleanups.push(() => x.end());
  return x;
}

/** A pool whose query() calls are counted (every statement the recorder sends is one). */
function counting(pool: { query: (...args: never[]) => unknown }) {
  const counter = { queries: 0 };
  const proxy = new Proxy(pool, {
    get: (target, prop, receiver) =>
      prop === "query"
        ? (...args: unknown[]) => (counter.queries++, (target.query as (...a: unknown[]) => unknown)(...args))
        : Reflect.get(target, prop, receiver),
  });
  return { pool: proxy, counter };
}

/** Transactions (xmin) the rows were written in. */
async function transactionsOf(requestIds: string[]): Promise<number> {
  const { rows } = await db.owner.query<{ n: number }>(
    "select count(distinct xmin::text)::int as n from app_public.chat_completion_requests where request_id = any($1)",
    [requestIds],
  );
  return rows[0]!.n;
}

async function lines(file: string): Promise<string[]> {
  return (await readFile(file, "utf8")).split("\n").filter(Boolean);
}

test("rows recorded at the same time share one INSERT and one transaction; an idle recorder writes a row at once", async (t) => {
  const { pool, counter } = counting(db.owner);
  const recorder = track(createRecorder({ pool: () => pool as typeof db.owner, dataDir: tempDataDir(), log: captureLog().log, concurrency: 1 }));

  const alone = makeRow();
  t.deepEqual(await recorder.record(alone), { outcome: "recorded", attempts: 1 });
  t.is(counter.queries, 1);

  // 200 at once: the first goes alone when the slot is free, the rows behind it gather while it commits.
  counter.queries = 0;
  const rows = Array.from({ length: 200 }, () => makeRow());
  const outcomes = await Promise.all(rows.map((r) => recorder.record(r)));
  t.true(outcomes.every((o) => o.outcome === "recorded" && o.attempts === 1));
  t.true(counter.queries <= 2, `${counter.queries} statements for 200 rows`);
  t.is(await transactionsOf(rows.map((r) => r.requestId)), counter.queries);
  t.is((await rowsFor(db.owner, rows.map((r) => r.requestId))).length, 200);
});

test("a batch holds at most batchSize rows", async (t) => {
  const { pool, counter } = counting(db.owner);
  const recorder = track(createRecorder({ pool: () => pool as typeof db.owner, dataDir: tempDataDir(), log: captureLog().log, concurrency: 1, batchSize: 50 }));
  const rows = Array.from({ length: 201 }, () => makeRow());
  await Promise.all(rows.map((r) => recorder.record(r)));
  // At most 50 a statement: 5 (201 rows), or 6 when the first went alone.
  t.true(counter.queries === 5 || counter.queries === 6, `${counter.queries} statements`);
  t.is(await transactionsOf(rows.map((r) => r.requestId)), counter.queries);
  t.throws(() => createRecorder({ pool: db.owner, dataDir: tempDataDir(), log: captureLog().log, batchSize: 5001 }), { message: /batchSize/ });
});

test("a row the database refuses for good does not take its batch down: the others are recorded, it alone is rejected, kept and counted", async (t) => {
  const dataDir = tempDataDir();
  const capture = captureLog();
  const recorder = track(createRecorder({ pool: db.owner, dataDir, log: capture.log, concurrency: 1 }));
  const first = makeRow();
  const good = Array.from({ length: 30 }, () => makeRow());
  // A key hash that is not a sha256 (32 bytes): refused by a CHECK (23514), as in recorder.test.ts.
  const bad = makeRow({ apiKeyHash: Buffer.from("abc") });
  const batch = [...good.slice(0, 17), bad, ...good.slice(17)];

  const firstDone = recorder.record(first);
  const settled = await Promise.allSettled(batch.map((r) => recorder.record(r)));
  await firstDone;

  const refused = settled[17]!;
  t.is(refused.status, "rejected");
  t.true((refused as PromiseRejectedResult).reason instanceof PermanentRecordError);
  t.is(((refused as PromiseRejectedResult).reason as PermanentRecordError).code, "23514");
  for (const [i, s] of settled.entries()) {
    if (i !== 17) t.like(s, { status: "fulfilled", value: { outcome: "recorded", attempts: 1 } });
  }
  const stored = await rowsFor(db.owner, [...good, bad].map((r) => r.requestId));
  t.is(stored.length, 30);
  t.false(stored.some((s) => s.request_id === bad.requestId));
  const rejected = (await lines(spoolPaths(dataDir).rejected)).map((l) => JSON.parse(l));
  t.like(rejected, [{ code: "23514", record: { row: { requestId: bad.requestId } } }]);
  t.deepEqual(recorder.dropped(), { rejected_by_database: 1 });
  t.is(recorder.spoolDepth(), 0);
  t.false(capture.entries().some((e) => e.msg === "recording a request failed, retrying"), "a permanent error is not retried");
});

test("database down during a batch: every row of it is spooled (one fsync), then replayed exactly once, in order", async (t) => {
  const proxy = track(await PgProxy.start(db.ownerUrl));
  await proxy.down();
  const dataDir = tempDataDir();
  const pool = track(makePool(proxy.url));
  const recorder = track(createRecorder({ pool, dataDir, log: captureLog().log, baseDelayMs: 10, replayIntervalMs: 600_000, concurrency: 1 }));
  const rows = Array.from({ length: 40 }, () => makeRow());
  const outcomes = await Promise.all(rows.map((r) => recorder.record(r)));
  for (const o of outcomes) t.like(o, { outcome: "spooled", attempts: 3 });
  t.is(recorder.spoolDepth(), 40);
  const spooled = (await lines(spoolPaths(dataDir).requests)).map((l) => JSON.parse(l));
  t.deepEqual(spooled.map((s) => s.row.requestId), rows.map((r) => r.requestId), "spooled in arrival order");

  await proxy.up();
  t.is(await recorder.replay(), 40);
  const stored = await rowsFor(db.owner, rows.map((r) => r.requestId));
  t.deepEqual(stored.map((s) => s.request_id), rows.map((r) => r.requestId));
  t.true(stored.every((s) => s.spooled_at !== null));
});

test("a connection cut while a batch commits: the retry writes the batch once, every row recorded exactly once", async (t) => {
  const proxy = track(await PgProxy.start(db.ownerUrl));
  const app = appName("kt_batch_cut");
  const pool = track(makePool(proxy.url, { application_name: app }));
  const recorder = track(createRecorder({ pool, dataDir: tempDataDir(), log: captureLog().log, baseDelayMs: 300, concurrency: 1 }));
  const rows = Array.from({ length: 25 }, () => makeRow());

  // The batch blocks on the last row's request id; the connection is cut under it, the server goes on.
  const hold = await holdRequestId(db.rootUrl, rows[24]!.requestId);
  const recording = Promise.all(rows.map((r) => recorder.record(r)));
  await blockedBackend(db.root, app);
  proxy.cut();
  await hold.release();
  await waitFor("the cut batch's commit", async () => (await rowsFor(db.owner, [rows[0]!.requestId])).length === 1);

  const outcomes = await recording;
  t.true(outcomes.every((o) => o.outcome === "recorded"));
  // The first row may have gone alone before the others gathered; the batch that was cut took a second try.
  t.deepEqual(outcomes[24], { outcome: "recorded", attempts: 2 });
  t.true(outcomes.filter((o) => o.attempts === 2).length >= 24);
  t.is((await rowsFor(db.owner, rows.map((r) => r.requestId))).length, 25);
});

test("re-delivery is exactly once by request_id: in a later batch, in the same batch, and mixed with new rows", async (t) => {
  const recorder = track(createRecorder({ pool: db.owner, dataDir: tempDataDir(), log: captureLog().log, concurrency: 1 }));
  const old = Array.from({ length: 10 }, () => makeRow());
  await Promise.all(old.map((r) => recorder.record(r)));

  const fresh = Array.from({ length: 10 }, () => makeRow());
  const twice = makeRow();
  const blocker = recorder.record(makeRow());
  const mixed = [...old, ...fresh, twice, twice];
  const outcomes: RecordOutcome[] = await Promise.all(mixed.map((r) => recorder.record(r)));
  await blocker;
  t.true(outcomes.slice(0, 10).every((o) => o.outcome === "duplicate"));
  t.true(outcomes.slice(10, 20).every((o) => o.outcome === "recorded"));
  t.deepEqual(outcomes.slice(20).map((o) => o.outcome), ["recorded", "duplicate"], "the first of two rows with one id is the one recorded");
  const stored = await rowsFor(db.owner, mixed.map((r) => r.requestId));
  t.is(stored.length, 21);
  t.is(new Set(stored.map((s) => s.request_id)).size, 21);
});

test("a batch retrying after a failure gives its slot up: rows behind it are written meanwhile", async (t) => {
  const app = appName("kt_batch_slot");
  const pool = track(makePool(db.ownerUrl, { application_name: app }));
  const recorder = track(createRecorder({ pool, dataDir: tempDataDir(), log: captureLog().log, baseDelayMs: 2000, concurrency: 1 }));
  const stuck = makeRow();
  const hold = await holdRequestId(db.rootUrl, stuck.requestId);
  const stuckDone = recorder.record(stuck);
  const pid = await blockedBackend(db.root, app);
  await db.root.query("select pg_terminate_backend($1)", [pid]);
  await hold.release();
  // The stuck row now waits 2 s before its second try; a row recorded now does not wait for it.
  const started = Date.now();
  t.deepEqual(await recorder.record(makeRow()), { outcome: "recorded", attempts: 1 });
  t.true(Date.now() - started < 1500, `took ${Date.now() - started} ms`);
  t.deepEqual(await stuckDone, { outcome: "recorded", attempts: 2 });
});
