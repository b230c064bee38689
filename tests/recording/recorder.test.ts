// The one recording path against a real PostgreSQL: transient failures during a
// write are retried (exactly one row), a database that is down sends rows to the
// durable spool without holding the caller, and the spool is replayed exactly
// once, in order, when the database answers again, also by the next process.
// "Down" is a TCP proxy in front of the test database that the test stops,
// starts and cuts.
import test from "ava";
import { appendFile, readFile, stat } from "node:fs/promises";

import { createRecorder, INSERT_REQUEST_SQL, insertValues } from "../../server/recording/recorder.js";
import { spoolPaths } from "../../server/recording/spool.js";
import { PermanentRecordError, type Recorder } from "../../server/recording/types.js";
import { createTestDb, makePool, rowsFor, type TestDb } from "../helpers/db.js";
import { sleep, waitFor } from "../helpers/poll.js";
import { apiKeyHash, appName, blockedBackend, captureLog, holdRequestId, makeRow, PgProxy } from "../helpers/recording.js";
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

async function lines(file: string): Promise<string[]> {
  return (await readFile(file, "utf8")).split("\n").filter(Boolean);
}

test("a connection killed (pg_terminate_backend) during a write is retried: exactly one row", async (t) => {
  const app = appName("kt_rec_kill");
  const pool = track(makePool(db.ownerUrl, { application_name: app }));
  const capture = captureLog();
  const recorder = track(createRecorder({ pool, dataDir: tempDataDir(), log: capture.log }));
  const row = makeRow();

  const hold = await holdRequestId(db.rootUrl, row.requestId);
  const recording = recorder.record(row);
  const pid = await blockedBackend(db.root, app);
  await db.root.query("select pg_terminate_backend($1)", [pid]);
  await hold.release();

  t.deepEqual(await recording, { outcome: "recorded", attempts: 2 });
  const retried = capture.entries().filter((e) => e.msg === "recording a request failed, retrying");
  t.is(retried.length, 1);
  t.regex(String(retried[0]!.error), /57P01|terminat/i);
  const stored = await rowsFor(db.owner, [row.requestId]);
  t.is(stored.length, 1);
  t.is(stored[0]!.spooled_at, null);
  t.is(recorder.spoolDepth(), 0);
});

test("a statement timeout (57014) during a write is retried: exactly one row", async (t) => {
  const app = appName("kt_rec_timeout");
  const pool = track(makePool(db.ownerUrl, { application_name: app, statement_timeout: 300 }));
  const capture = captureLog();
  const recorder = track(createRecorder({ pool, dataDir: tempDataDir(), log: capture.log, baseDelayMs: 100 }));
  const row = makeRow();

  const hold = await holdRequestId(db.rootUrl, row.requestId);
  const recording = recorder.record(row);
  // The first try blocks, times out after 300 ms; release the id during the 100 ms backoff.
  await waitFor("the first try to time out", () => capture.entries().some((e) => e.msg === "recording a request failed, retrying"));
  await hold.release();

  t.deepEqual(await recording, { outcome: "recorded", attempts: 2 });
  const retried = capture.entries().find((e) => e.msg === "recording a request failed, retrying")!;
  t.regex(String(retried.error), /^57014:/);
  t.is((await rowsFor(db.owner, [row.requestId])).length, 1);
});

test("a connection cut after the insert was sent: the retry finds the row the cut try committed, says recorded, exactly one row", async (t) => {
  const proxy = track(await PgProxy.start(db.ownerUrl));
  const app = appName("kt_rec_cut");
  const pool = track(makePool(proxy.url, { application_name: app }));
  const recorder = track(createRecorder({ pool, dataDir: tempDataDir(), log: captureLog().log, baseDelayMs: 300 }));
  const row = makeRow();

  const hold = await holdRequestId(db.rootUrl, row.requestId);
  const recording = recorder.record(row);
  await blockedBackend(db.root, app);
  proxy.cut(); // the client sees "Connection terminated unexpectedly"; the server still runs the insert
  await hold.release();
  // The orphaned insert commits while the recorder waits 300 ms before its retry.
  await waitFor("the cut try's commit", async () => (await rowsFor(db.owner, [row.requestId])).length === 1);

  // The retry inserts nothing (request_id already recorded) but the row is this call's own.
  t.deepEqual(await recording, { outcome: "recorded", attempts: 2 });
  t.is((await rowsFor(db.owner, [row.requestId])).length, 1);
});

test("a re-recorded request id is a duplicate, not a second row", async (t) => {
  const recorder = track(createRecorder({ pool: db.owner, dataDir: tempDataDir(), log: captureLog().log }));
  const row = makeRow();
  t.deepEqual(await recorder.record(row), { outcome: "recorded", attempts: 1 });
  t.deepEqual(await recorder.record(row), { outcome: "duplicate", attempts: 1 });
  t.is((await rowsFor(db.owner, [row.requestId])).length, 1);
});

test("database down: rows are spooled within the retry budget, the caller goes on, and they are replayed exactly once, in order, when it returns", async (t) => {
  const proxy = track(await PgProxy.start(db.ownerUrl));
  await proxy.down();
  const pool = track(makePool(proxy.url));
  const capture = captureLog();
  const dataDir = tempDataDir();
  const recorder: Recorder = track(createRecorder({ pool, dataDir, log: capture.log, replayIntervalMs: 100 }));
  const keys = [0, 1, 2, 3, 4].map((i) => `kt_live_${i}_secret_key_${"x".repeat(40)}`);
  const rows = keys.map((key) => makeRow({ apiKeyHash: apiKeyHash(key) }));

  const before = Date.now();
  for (const row of rows) {
    const started = Date.now();
    const outcome = await recorder.record(row);
    const took = Date.now() - started;
    t.like(outcome, { outcome: "spooled", attempts: 3 });
    t.regex((outcome as { error: string }).error, /ECONNREFUSED/);
    // 100 + 200 ms of backoff between the three tries, then the spool: never more tries.
    t.true(took >= 300, `record() took ${took} ms`);
  }
  t.is(recorder.spoolDepth(), 5);
  const spooled = (await lines(spoolPaths(dataDir).requests)).map((l) => JSON.parse(l));
  t.deepEqual(spooled.map((s) => s.row.requestId), rows.map((r) => r.requestId));
  t.is(spooled[0].row.apiKeyHash, rows[0]!.apiKeyHash!.toString("hex"));

  // Replays on the timer fail while the database stays down; nothing is lost or written.
  await sleep(350);
  t.is(recorder.spoolDepth(), 5);
  t.is((await rowsFor(db.owner, rows.map((r) => r.requestId))).length, 0);

  await proxy.up();
  const upAt = Date.now();
  await waitFor("the timer to replay the spool", () => recorder.spoolDepth() === 0);

  const stored = await rowsFor(db.owner, rows.map((r) => r.requestId));
  t.deepEqual(stored.map((s) => s.request_id), rows.map((r) => r.requestId), "one row each, in spool order");
  for (const s of stored) {
    t.truthy(s.spooled_at);
    t.true(s.spooled_at!.getTime() >= before - 5 && s.spooled_at!.getTime() <= upAt, "spooled_at is when the row was spooled");
  }
  await recorder.replay(); // lets the timer's pass finish (it may still be compacting)
  t.is(await recorder.replay(), 0, "nothing left to replay");
  t.is((await rowsFor(db.owner, rows.map((r) => r.requestId))).length, 5);
  t.is((await stat(spoolPaths(dataDir).requests)).size, 0, "the replayed spool is emptied");

  // One warning for the outage, not one per row; no key and no key hash in any line.
  t.is(capture.entries().filter((e) => e.level === "warn" && String(e.msg).startsWith("database unavailable")).length, 1);
  t.true(capture.entries().some((e) => e.msg === "database available again: spool drained"));
  for (const line of capture.lines) {
    for (const [i, key] of keys.entries()) {
      t.false(line.includes(key.slice(0, 12)) || line.includes(rows[i]!.apiKeyHash!.toString("hex")), `log line leaks a key: ${line}`);
    }
  }
});

test("a successful write replays the spool at once (no waiting for the timer)", async (t) => {
  const proxy = track(await PgProxy.start(db.ownerUrl));
  await proxy.down();
  const pool = track(makePool(proxy.url));
  const recorder = track(createRecorder({ pool, dataDir: tempDataDir(), log: captureLog().log, baseDelayMs: 10, replayIntervalMs: 600_000 }));
  const spooled = [makeRow(), makeRow(), makeRow()];
  for (const row of spooled) t.is((await recorder.record(row)).outcome, "spooled");

  await proxy.up();
  const direct = makeRow();
  t.deepEqual(await recorder.record(direct), { outcome: "recorded", attempts: 1 });
  // The timer would replay only after 10 minutes: an empty spool now is the write's doing.
  await waitFor("the replay kicked by the write", () => recorder.spoolDepth() === 0);
  const stored = await rowsFor(db.owner, [...spooled, direct].map((r) => r.requestId));
  t.is(stored.length, 4);
  t.deepEqual(stored.filter((s) => s.spooled_at).map((s) => s.request_id), spooled.map((r) => r.requestId));
  t.is(stored.find((s) => s.request_id === direct.requestId)!.spooled_at, null);
});

test("across a restart: a new Recorder on the same data dir replays the old spool exactly once (torn last line skipped)", async (t) => {
  const proxy = track(await PgProxy.start(db.ownerUrl));
  await proxy.down();
  const dataDir = tempDataDir();
  const paths = spoolPaths(dataDir);
  const poolA = track(makePool(proxy.url));
  const a = createRecorder({ pool: poolA, dataDir, log: captureLog().log, baseDelayMs: 10 });
  const rows = [makeRow(), makeRow(), makeRow()];
  for (const row of rows) t.is((await a.record(row)).outcome, "spooled");
  await a.close();
  await t.throwsAsync(stat(paths.lock), { code: "ENOENT" }, "the lock is released on close");
  t.is((await lines(paths.requests)).length, 3, "the spool stays on disk");

  // The first row made it to the database before the crash (offset not committed yet),
  // and a crash cut the last line short.
  const firstSpooledAt = new Date(JSON.parse((await lines(paths.requests))[0]!).spooledAt);
  await db.owner.query(INSERT_REQUEST_SQL, insertValues(rows[0]!, firstSpooledAt));
  await appendFile(paths.requests, '{"v":1,"spooledAt":"2025-01-01T00:00:00.000Z","row":{"requestId":"req_tor');

  const capture = captureLog();
  const b = track(createRecorder({ pool: db.owner, dataDir, log: capture.log }));
  t.is(b.spoolDepth(), 3);
  const replayed = await waitFor("B to replay the old spool on start", () => capture.entries().find((e) => e.msg === "spooled request rows replayed"));
  t.is(b.spoolDepth(), 0);

  const stored = await rowsFor(db.owner, rows.map((r) => r.requestId));
  t.deepEqual(stored.map((s) => s.request_id), rows.map((r) => r.requestId), "exactly one row each, in order");
  for (const s of stored) t.truthy(s.spooled_at);
  t.is(stored[0]!.spooled_at!.getTime(), firstSpooledAt.getTime());
  t.true(capture.entries().some((e) => e.level === "warn" && String(e.msg).includes("torn")));
  t.like(replayed, { written: 2, alreadyRecorded: 1, rejected: 0, remaining: 0 });
  const rejected = (await lines(paths.rejected)).map((l) => JSON.parse(l));
  t.is(rejected.length, 1);
  t.regex(rejected[0].raw, /req_tor$/);
  t.deepEqual(b.dropped(), { corrupt_spool_line: 1 }, "the torn line is counted: its row is not in the ledger");
});

test("an outage in the middle of a replay: it stops at the failed row, rows spooled meanwhile queue behind, all are replayed exactly once in order", async (t) => {
  const proxy = track(await PgProxy.start(db.ownerUrl));
  await proxy.down();
  const app = appName("kt_rec_midreplay");
  const pool = track(makePool(proxy.url, { application_name: app }));
  const recorder = track(createRecorder({ pool, dataDir: tempDataDir(), log: captureLog().log, baseDelayMs: 10, replayIntervalMs: 600_000 }));
  const first = Array.from({ length: 6 }, () => makeRow());
  for (const row of first) t.is((await recorder.record(row)).outcome, "spooled");

  // The replay of the 4th row blocks; the database goes down under it.
  const hold = await holdRequestId(db.rootUrl, first[3]!.requestId);
  await proxy.up();
  const replaying = recorder.replay();
  await blockedBackend(db.root, app);
  await proxy.down();
  t.is(await replaying, 3);
  t.is(recorder.spoolDepth(), 3);

  const later = [makeRow(), makeRow()];
  for (const row of later) t.is((await recorder.record(row)).outcome, "spooled");
  t.is(recorder.spoolDepth(), 5);
  await hold.release();

  await proxy.up();
  await recorder.replay();
  t.is(recorder.spoolDepth(), 0);
  const all = [...first, ...later].map((r) => r.requestId);
  const stored = await rowsFor(db.owner, all);
  t.deepEqual(stored.map((s) => s.request_id), all);
});

test("a permanent error is not retried: PermanentRecordError with the SQLSTATE, no row, nothing spooled, the row kept in rejected.jsonl and counted", async (t) => {
  const capture = captureLog();
  // Counts the recorder's tries: every try is one query on its pool.
  let tries = 0;
  const counting = new Proxy(db.owner, {
    get: (target, prop, receiver) =>
      prop === "query" ? (...args: unknown[]) => (tries++, (target.query as (...a: unknown[]) => unknown)(...args)) : Reflect.get(target, prop, receiver),
  });
  const dataDir = tempDataDir();
  const recorder = track(createRecorder({ pool: () => counting, dataDir, log: capture.log, baseDelayMs: 1000 }));
  // A key hash that is not a sha256 (32 bytes): the one thing the recording path cannot make storable.
  const row = makeRow({ apiKeyHash: Buffer.from("abc") });
  const err = await t.throwsAsync(recorder.record(row), { instanceOf: PermanentRecordError });
  t.is(tries, 1, "one try: a permanent error is not retried");
  t.is(err!.code, "23514");
  t.true(err!.message.includes(row.requestId) && err!.message.includes("SQLSTATE 23514"), err!.message);
  t.false(capture.entries().some((e) => e.msg === "recording a request failed, retrying"));
  t.true(capture.entries().some((e) => e.level === "error" && e.requestId === row.requestId));
  t.is((await rowsFor(db.owner, [row.requestId])).length, 0);
  t.is(recorder.spoolDepth(), 0);
  const rejected = (await lines(spoolPaths(dataDir).rejected)).map((l) => JSON.parse(l));
  t.like(rejected, [{ code: "23514", record: { row: { requestId: row.requestId } } }]);
  t.deepEqual(recorder.dropped(), { rejected_by_database: 1 });
});

test("a row the database refuses on replay goes to rejected.jsonl with its error, and the replay goes on", async (t) => {
  const proxy = track(await PgProxy.start(db.ownerUrl));
  await proxy.down();
  const dataDir = tempDataDir();
  const pool = track(makePool(proxy.url));
  const recorder = track(createRecorder({ pool, dataDir, log: captureLog().log, baseDelayMs: 10, replayIntervalMs: 600_000 }));
  const good1 = makeRow();
  const bad = makeRow({ apiKeyHash: Buffer.from("abc") });
  const good2 = makeRow();
  for (const row of [good1, bad, good2]) t.is((await recorder.record(row)).outcome, "spooled");

  await proxy.up();
  t.is(await recorder.replay(), 2);
  t.is(recorder.spoolDepth(), 0);
  const stored = await rowsFor(db.owner, [good1, bad, good2].map((r) => r.requestId));
  t.deepEqual(stored.map((s) => s.request_id), [good1.requestId, good2.requestId]);
  const rejected = (await lines(spoolPaths(dataDir).rejected)).map((l) => JSON.parse(l));
  t.is(rejected.length, 1);
  t.like(rejected[0], { code: "23514", record: { row: { requestId: bad.requestId, apiKeyHash: "616263" } } });
  t.regex(rejected[0].error, /SQLSTATE 23514/);
  t.deepEqual(recorder.dropped(), { rejected_by_database: 1 });
});

test("record() after close() is refused; rows in flight at close still land", async (t) => {
  const proxy = track(await PgProxy.start(db.ownerUrl));
  await proxy.down();
  const dataDir = tempDataDir();
  const pool = track(makePool(proxy.url));
  const recorder = createRecorder({ pool, dataDir, log: captureLog().log, baseDelayMs: 50 });
  const inFlight = recorder.record(makeRow());
  await recorder.close();
  t.is((await inFlight).outcome, "spooled");
  await t.throwsAsync(recorder.record(makeRow()), { message: /recorder is closed/ });
  t.is((await lines(spoolPaths(dataDir).requests)).length, 1);
});
