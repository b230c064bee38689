// The database down and the spool's disk full at once: a served request's row
// is never lost. A row that neither the database nor the spool takes is held
// in memory and retried (both) until one does; while any row is held the
// gateway answers 503 before serving; the offset file of a replay failing
// (ENOSPC) neither loses nor duplicates a row. The full disk is simulated with
// the spool's fault hook (DiskFault), never by filling a disk; "down" is a TCP
// proxy in front of the test database.
import test from "ava";
import express from "express";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { readFile, stat } from "node:fs/promises";

import { chatHandler } from "../../server/chat/handler.js";
import { loadConfig } from "../../server/config.js";
import type { AppContext } from "../../server/context.js";
import { createRecorder, MAX_BUFFERED_ROWS } from "../../server/recording/recorder.js";
import { Spool, spoolPaths, type SpoolEntry } from "../../server/recording/spool.js";
import { PermanentRecordError, type Recorder } from "../../server/recording/types.js";
import { createTestDb, makePool, rowsFor, type TestDb } from "../helpers/db.js";
import { waitFor } from "../helpers/poll.js";
import { captureLog, DiskFault, makeRow, PgProxy } from "../helpers/recording.js";
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

function later(fn: () => Promise<unknown>): void {
  cleanups.push(fn);
}

async function lines(file: string): Promise<string[]> {
  return (await readFile(file, "utf8").catch(() => "")).split("\n").filter(Boolean);
}

/** A proxy that starts down, a pool through it, a data folder, a full disk, a recorder over them. */
async function outage(options: { bufferRows?: number; fill?: boolean } = {}) {
  const proxy = await PgProxy.start(db.ownerUrl);
  later(() => proxy.down());
  await proxy.down();
  const pool = makePool(proxy.url);
  later(() => pool.end());
  const disk = new DiskFault();
  if (options.fill !== false) disk.fill();
  const capture = captureLog();
  const dataDir = tempDataDir();
  const recorder = createRecorder({
    pool, dataDir, log: capture.log, baseDelayMs: 10, replayIntervalMs: 50, spoolFault: disk.fault,
    ...(options.bufferRows ? { bufferLimits: { rows: options.bufferRows } } : {}),
  });
  later(() => recorder.close());
  return { proxy, pool, disk, capture, dataDir, recorder };
}

/** The real chat handler (echo model, anonymous requests allowed) over a recorder. */
async function gateway(recorder: Recorder, log: AppContext["log"]): Promise<string> {
  const config = loadConfig({ DATABASE_URL: db.ownerUrl, APP_ENV: "test", ALLOW_ANONYMOUS: "true", KEYTRACK_DATA_DIR: tempDataDir() });
  const ctx = {
    config,
    log,
    recorder,
    auth: { authenticate: async () => ({ ok: true, principal: null }), staleServed: () => 0 },
  } as unknown as AppContext;
  const app = express();
  app.use(express.json());
  app.post("/v1/chat/completions", chatHandler("chat", ctx, { upstream: null }));
  const server = http.createServer(app).listen(0, "127.0.0.1");
  await new Promise((r) => server.once("listening", r));
  later(() => new Promise<void>((r) => server.close(() => r())));
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

interface Answer {
  status: number;
  requestId: string;
  body: { error?: { code?: string; type?: string } };
}

async function chat(base: string, i: number): Promise<Answer> {
  const res = await fetch(`${base}/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ model: "echo", messages: [{ role: "user", content: `request ${i}` }] }),
  });
  return { status: res.status, requestId: res.headers.get("x-request-id")!, body: (await res.json()) as Answer["body"] };
}

/** The served requests whose recording has ended (spooled, held, or failed: logged by server/chat/record.ts). */
function settled(capture: ReturnType<typeof captureLog>): { held: number; spooled: number; lost: number } {
  const msgs = capture.entries().map((e) => String(e.msg));
  return {
    held: msgs.filter((m) => m.startsWith("request row held in memory (")).length,
    spooled: msgs.filter((m) => m === "request row spooled").length,
    lost: msgs.filter((m) => m === "request row could not be recorded").length,
  };
}

test("40 requests with the database down and the spool's disk full: each is answered 503 before serving or its row lands exactly once when the disk and the database are back", async (t) => {
  const { proxy, disk, capture, recorder, dataDir } = await outage();
  const base = await gateway(recorder, capture.log);

  // Three waves of ten at once: served before any row is known to be stuck, or refused.
  const answers: Answer[] = [];
  for (let wave = 0; wave < 3; wave++) answers.push(...(await Promise.all(Array.from({ length: 10 }, (_, i) => chat(base, wave * 10 + i)))));
  const served = answers.filter((a) => a.status === 200);
  t.true(served.length > 0, "the first requests are served");
  t.log(`${served.length} of 30 served before a row was held in memory`);
  await waitFor("every served request's recording to settle", () => {
    const s = settled(capture);
    return s.held + s.spooled + s.lost === served.length;
  });
  t.deepEqual(settled(capture), { held: served.length, spooled: 0, lost: 0 }, "nothing lost: every row the database and the spool refused is held in memory");
  t.is(recorder.bufferedRows(), served.length);
  t.false(recorder.accepting());

  // While rows are held, new requests are refused before serving, and not recorded.
  const refused = await Promise.all(Array.from({ length: 10 }, (_, i) => chat(base, 30 + i)));
  for (const a of refused) {
    t.is(a.status, 503);
    t.like(a.body, { error: { code: "recording_unavailable", type: "server_error" } });
  }
  answers.push(...refused);
  t.is(answers.length, 40);
  for (const a of answers.filter((x) => x.status !== 200)) t.is(a.status, 503);

  // The disk comes back first: the held rows go to the spool, requests are served again.
  disk.free();
  await waitFor("the held rows to reach the spool", () => recorder.bufferedRows() === 0);
  t.true(recorder.accepting());
  t.is(recorder.spoolDepth(), served.length);
  t.is((await lines(spoolPaths(dataDir).requests)).length, served.length);
  const afterDisk = await chat(base, 40);
  t.is(afterDisk.status, 200, "served again once the spool takes rows");
  served.push(afterDisk);

  // Then the database: every served request's row, exactly once; none of the refused.
  await proxy.up();
  await waitFor("the spool to be replayed", async () => (await rowsFor(db.owner, served.map((a) => a.requestId))).length === served.length);
  await recorder.replay();
  const stored = await rowsFor(db.owner, answers.concat(afterDisk).map((a) => a.requestId));
  t.deepEqual(stored.map((r) => r.request_id).sort(), served.map((a) => a.requestId).sort(), "one row per served request, none for a refused one");
  t.true(stored.every((r) => r.status === "completed"));
  t.true(stored.filter((r) => r.request_id !== afterDisk.requestId).every((r) => r.spooled_at !== null), "the held rows went through the spool");
  t.deepEqual(recorder.dropped(), {}, "count lost: 0");
  t.is(recorder.spoolDepth(), 0);
  t.is(capture.entries().filter((e) => String(e.msg).startsWith("neither the database nor the spool")).length, 1, "one error for the episode");
});

test("the database comes back first while the disk stays full: held rows are inserted directly, spooled rows are replayed although the offset cannot be written, each exactly once", async (t) => {
  const { proxy, disk, recorder, dataDir, capture } = await outage({ fill: false });
  // Some rows reach the spool before the disk fills up, the next ones are held in memory.
  const spooled = [makeRow(), makeRow(), makeRow()];
  for (const row of spooled) t.is((await recorder.record(row)).outcome, "spooled");
  disk.fill();
  const held = [makeRow(), makeRow()];
  for (const row of held) t.like(await recorder.record(row), { outcome: "buffered", attempts: 3 });
  t.is(recorder.bufferedRows(), 2);
  t.false(recorder.accepting());
  t.regex((await recorder.record(makeRow({ requestId: held[0]!.requestId }))).outcome, /buffered/, "a second record of a held row is held too (a duplicate later)");

  await proxy.up();
  await waitFor("the held rows and the spool to be written", () => recorder.bufferedRows() === 0 && recorder.spoolDepth() === 0);
  t.true(recorder.accepting());
  await recorder.replay();
  const all = [...spooled, ...held].map((r) => r.requestId);
  const stored = await rowsFor(db.owner, all);
  t.deepEqual(stored.map((r) => r.request_id).sort(), [...all].sort(), "exactly one row each");
  t.true(stored.every((r) => r.spooled_at !== null), "held rows are marked as delayed too");
  t.true(disk.failures.offset > 0, "the offset write failed");
  // The replayed spool was emptied anyway (removing the offset file needs no space): that frees the disk.
  t.is((await stat(spoolPaths(dataDir).requests)).size, 0);
  await t.throwsAsync(stat(spoolPaths(dataDir).offset), { code: "ENOENT" });
  t.deepEqual(recorder.dropped(), {});
  t.true(capture.entries().some((e) => e.level === "warn" && String(e.msg).startsWith("the spool offset could not be written")));
});

test("a replay whose offset writes fail (ENOSPC) applies every line once, goes on after a stop from where it was, and a restart replays at worst again (never skips)", async (t) => {
  const dir = tempDataDir();
  const disk = new DiskFault();
  const capture = captureLog();
  let spool = Spool.open(dir, capture.log, { fault: disk.fault });
  const entry = (n: number): SpoolEntry => ({ row: makeRow({ requestId: `r${n}` }), spooledAt: new Date(1_700_000_000_000 + n) });
  for (let i = 0; i < 250; i++) await spool.append(entry(i));
  disk.fill(["offset"]);

  const applied: string[] = [];
  const apply = (stopAt?: string) => async (e: SpoolEntry) => {
    if (e.row.requestId === stopAt) return "stop" as const;
    applied.push(e.row.requestId);
    return "done" as const;
  };
  // Past two commit points (every 100 lines), both failing: the pass goes on, no error.
  t.like(await spool.replay(apply("r150")), { processed: 150, stopped: true });
  t.true(disk.failures.offset >= 2);
  t.is(spool.depth, 100);
  t.like(await spool.replay(apply("r200")), { processed: 50, stopped: true });
  t.deepEqual(applied, Array.from({ length: 200 }, (_, i) => `r${i}`), "each line once, in order, in this process");
  t.is(capture.entries().filter((e) => String(e.msg).startsWith("the spool offset could not be written")).length, 1, "one warning per streak");
  await spool.close();

  // A restart: the offset on disk is behind (never written), so lines are applied again, none skipped.
  spool = Spool.open(dir, captureLog().log, { fault: disk.fault });
  t.is(spool.depth, 250);
  const again: string[] = [];
  await spool.replay(async (e) => (again.push(e.row.requestId), "done"));
  t.deepEqual(again, Array.from({ length: 250 }, (_, i) => `r${i}`));
  t.is(spool.depth, 0);
  t.is((await stat(spoolPaths(dir).requests)).size, 0, "emptied although the offset cannot be written");
  await spool.close();

  // The disk is back: offsets are written again.
  disk.free();
  spool = Spool.open(dir, captureLog().log, { fault: disk.fault });
  for (let i = 0; i < 3; i++) await spool.append(entry(300 + i));
  await spool.replay(apply("r301"));
  t.deepEqual(JSON.parse(await readFile(spoolPaths(dir).offset, "utf8")), { offset: (await lines(spoolPaths(dir).requests))[0]!.length + 1 });
  await spool.close();
});

test("offset writes failing during a replay against the database: every row exactly once, also after a restart on the same spool", async (t) => {
  const { proxy, disk, recorder, dataDir } = await outage({ fill: false });
  const rows = Array.from({ length: 120 }, () => makeRow());
  await Promise.all(rows.map((row) => recorder.record(row)));
  t.is(recorder.spoolDepth(), 120);
  disk.fill(["offset"]);
  await proxy.up();
  await waitFor("the spool to be replayed", () => recorder.spoolDepth() === 0);
  await recorder.replay();
  t.true(disk.failures.offset > 0);
  await recorder.close();

  const next = createRecorder({ pool: db.owner, dataDir, log: captureLog().log, spoolFault: disk.fault });
  later(() => next.close());
  await next.replay();
  const stored = await rowsFor(db.owner, rows.map((r) => r.requestId));
  t.is(stored.length, 120);
  t.is(new Set(stored.map((r) => r.request_id)).size, 120);
  t.deepEqual(next.dropped(), {});
});

test("the memory buffer is bounded: a row beyond it is lost, logged and counted (memory_full); the held ones land", async (t) => {
  t.true(MAX_BUFFERED_ROWS >= 10_000, "a constant, not a setting");
  const { proxy, disk, recorder, capture } = await outage({ bufferRows: 3 });
  const rows = Array.from({ length: 5 }, () => makeRow());
  const outcomes = await Promise.allSettled(rows.map((row) => recorder.record(row)));
  t.is(outcomes.filter((o) => o.status === "fulfilled" && o.value.outcome === "buffered").length, 3);
  const failed = outcomes.filter((o): o is PromiseRejectedResult => o.status === "rejected");
  t.is(failed.length, 2);
  t.regex(String(failed[0]!.reason.message), /memory buffer is full/);
  t.deepEqual(recorder.dropped(), { memory_full: 2 });
  t.is(capture.entries().filter((e) => e.level === "error" && String(e.msg).startsWith("request row LOST")).length, 2);

  disk.free();
  await proxy.up();
  await waitFor("the held rows to land", async () => recorder.bufferedRows() === 0 && recorder.spoolDepth() === 0);
  await recorder.replay();
  t.is((await rowsFor(db.owner, rows.map((r) => r.requestId))).length, 3);
  t.deepEqual(recorder.dropped(), { memory_full: 2 });
});

test("rows still held when the recorder closes (neither path works) are counted as lost (shutdown) and logged", async (t) => {
  const { recorder, capture } = await outage();
  const row = makeRow();
  t.is((await recorder.record(row)).outcome, "buffered");
  await recorder.close();
  t.deepEqual(recorder.dropped(), { shutdown: 1 });
  t.false(recorder.accepting());
  const lost = capture.entries().find((e) => String(e.msg).startsWith("request rows LOST at shutdown"));
  t.like(lost, { level: "error", rows: 1, requestIds: [row.requestId] });
});

test("a row refused for good while rejected.jsonl cannot be written is held, then kept there and counted once the disk is back", async (t) => {
  // The database answers, the disk is full.
  const disk = new DiskFault();
  const dataDir = tempDataDir();
  const recorder = createRecorder({ pool: db.owner, dataDir, log: captureLog().log, replayIntervalMs: 50, spoolFault: disk.fault });
  later(() => recorder.close());
  disk.fill();
  const bad = makeRow({ apiKeyHash: Buffer.from("abc") });
  await t.throwsAsync(recorder.record(bad), { instanceOf: PermanentRecordError });
  t.is(recorder.bufferedRows(), 1);
  t.false(recorder.accepting());
  t.deepEqual(recorder.dropped(), {}, "not counted before it is kept somewhere");

  disk.free();
  await waitFor("the refused row to reach rejected.jsonl", () => recorder.bufferedRows() === 0);
  t.true(recorder.accepting());
  t.deepEqual(recorder.dropped(), { rejected_by_database: 1 });
  const rejected = (await lines(spoolPaths(dataDir).rejected)).map((l) => JSON.parse(l));
  t.like(rejected, [{ code: "23514", record: { row: { requestId: bad.requestId } } }]);
});

test("on replay, a refused row whose rejected.jsonl line cannot be written stays in the spool (the replay stops there) and is counted once, when it is kept", async (t) => {
  const { proxy, disk, recorder, dataDir } = await outage({ fill: false });
  const good1 = makeRow();
  const bad = makeRow({ apiKeyHash: Buffer.from("abc") });
  const good2 = makeRow();
  for (const row of [good1, bad, good2]) t.is((await recorder.record(row)).outcome, "spooled");
  disk.fill(["rejected"]);
  await proxy.up();
  await recorder.replay();
  await recorder.replay();
  t.deepEqual((await rowsFor(db.owner, [good1, bad, good2].map((r) => r.requestId))).map((r) => r.request_id), [good1.requestId]);
  t.is(recorder.spoolDepth(), 2, "the refused row and the one behind it wait in the spool");
  t.deepEqual(recorder.dropped(), {});

  disk.free();
  await waitFor("the replay to go on", () => recorder.spoolDepth() === 0);
  await recorder.replay();
  t.deepEqual((await rowsFor(db.owner, [good1, bad, good2].map((r) => r.requestId))).map((r) => r.request_id), [good1.requestId, good2.requestId]);
  const rejected = (await lines(spoolPaths(dataDir).rejected)).map((l) => JSON.parse(l));
  t.is(rejected.length, 1);
  t.is(rejected[0].record.row.requestId, bad.requestId);
  t.deepEqual(recorder.dropped(), { rejected_by_database: 1 });
});
