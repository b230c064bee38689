// The durable spool on its own (no database): line order, group commit,
// replay that stops and resumes, appends during a replay, torn and corrupt
// lines, offsets across reopen, compaction, and the one-owner lock.
import test from "ava";
import { spawn } from "node:child_process";
import { appendFile, readFile, stat, writeFile } from "node:fs/promises";

import { createRecorder } from "../../server/recording/recorder.js";
import { decodeEntry, encodeEntry, Spool, SpoolLockedError, spoolPaths, type ReplayVerdict, type SpoolEntry } from "../../server/recording/spool.js";
import { makePool } from "../helpers/db.js";
import { apiKeyHash, captureLog, makeRow } from "../helpers/recording.js";
import { removeTempDataDirs, tempDataDir } from "../helpers/server.js";

test.after.always(removeTempDataDirs);

const entry = (n: number): SpoolEntry => ({ row: makeRow({ requestId: `r${n}` }), spooledAt: new Date(1_700_000_000_000 + n) });

async function fileLines(file: string): Promise<string[]> {
  return (await readFile(file, "utf8")).split("\n").filter(Boolean);
}

test("an entry survives encoding: Buffer as hex, dates as ISO text", (t) => {
  const e: SpoolEntry = {
    row: makeRow({
      apiKeyHash: apiKeyHash("k"), apiKeyId: null, userId: null, attributionReason: "dev_bypass", status: "partial", errorMessage: "client went away",
      processId: "3f9d2a6e-0000-4000-8000-000000000001", processSeq: 42,
    }),
    spooledAt: new Date("2025-03-04T05:06:07.089Z"),
  };
  const line = encodeEntry(e);
  t.false(line.includes("\n"));
  t.is(JSON.parse(line).row.apiKeyHash, apiKeyHash("k").toString("hex"));
  t.deepEqual(decodeEntry(line), e);
  const parsed = JSON.parse(line);
  t.throws(() => decodeEntry(JSON.stringify({ ...parsed, row: { ...parsed.row, status: "nope" } })), { message: /status/ });
  t.throws(() => decodeEntry(JSON.stringify({ ...parsed, row: { ...parsed.row, apiKeyHash: "xyz" } })), { message: /hex/ });
  t.throws(() => decodeEntry(JSON.stringify({ ...parsed, v: 2 })), { message: /version 1/ });
  // Lines spooled before completeness numbering have no process: they decode with none.
  const { processId: _p, processSeq: _s, ...older } = parsed.row;
  t.like(decodeEntry(JSON.stringify({ ...parsed, row: older })).row, { processId: null, processSeq: null });
  t.throws(() => decodeEntry("{not json"));
});

test("concurrent appends become lines in call order, each durable when its promise resolves", async (t) => {
  const dir = tempDataDir();
  const spool = Spool.open(dir, captureLog().log);
  await Promise.all(Array.from({ length: 50 }, (_, i) => spool.append(entry(i))));
  t.is(spool.depth, 50);
  const lines = await fileLines(spoolPaths(dir).requests);
  t.deepEqual(lines.map((l) => decodeEntry(l).row.requestId), Array.from({ length: 50 }, (_, i) => `r${i}`));
  await spool.close();
});

test("a replay applies each line once, in order; a stop keeps the line first in line, across a reopen; a drained spool is emptied", async (t) => {
  const dir = tempDataDir();
  const paths = spoolPaths(dir);
  let spool = Spool.open(dir, captureLog().log);
  for (let i = 0; i < 5; i++) await spool.append(entry(i));

  const applied: string[] = [];
  const stopAt = (id: string) => async (e: SpoolEntry): Promise<ReplayVerdict> => {
    if (e.row.requestId === id) return "stop";
    applied.push(e.row.requestId);
    return "done";
  };
  t.like(await spool.replay(stopAt("r2")), { processed: 2, stopped: true });
  t.is(spool.depth, 3);
  t.deepEqual(JSON.parse(await readFile(paths.offset, "utf8")), { offset: (await fileLines(paths.requests)).slice(0, 2).join("\n").length + 1 });
  await spool.close();

  spool = Spool.open(dir, captureLog().log);
  t.is(spool.depth, 3);
  t.like(await spool.replay(stopAt("none")), { processed: 3, stopped: false, rejected: 0 });
  t.deepEqual(applied, ["r0", "r1", "r2", "r3", "r4"]);
  t.is(spool.depth, 0);
  t.is((await stat(paths.requests)).size, 0);
  // Offset 0 is no offset file (removing it needs no free space, writing 0 would).
  await t.throwsAsync(stat(paths.offset), { code: "ENOENT" });

  // After compaction, new appends start a fresh file and replay from its start.
  await spool.append(entry(9));
  const again: string[] = [];
  await spool.replay(async (e) => (again.push(e.row.requestId), "done"));
  t.deepEqual(again, ["r9"]);
  await spool.close();
});

test("appends made while a replay runs are neither lost nor reordered", async (t) => {
  const dir = tempDataDir();
  const spool = Spool.open(dir, captureLog().log);
  for (let i = 0; i < 20; i++) await spool.append(entry(i));
  const applied: string[] = [];
  let next = 20;
  const appends: Promise<void>[] = [];
  const pass = await spool.replay(async (e) => {
    applied.push(e.row.requestId);
    // Each applied row lets two new ones arrive, until 60 exist; every other
    // time they are on disk before the replay goes on, otherwise still in flight.
    const arriving: Promise<void>[] = [];
    for (let k = 0; k < 2 && next < 60; k++) arriving.push(spool.append(entry(next++)));
    appends.push(...arriving);
    if (applied.length % 2 === 0) await Promise.all(arriving);
    return "done";
  });
  await Promise.all(appends);
  // The pass follows the file's end as it grows; whatever it missed the next one takes.
  if (spool.depth > 0) await spool.replay(async (e) => (applied.push(e.row.requestId), "done"));
  t.deepEqual(applied, Array.from({ length: 60 }, (_, i) => `r${i}`));
  t.true(pass.processed > 20, "the running pass also took rows appended during it");
  t.is(spool.depth, 0);
  await spool.close();
});

test("a torn last line is cut off with a warning and kept in rejected.jsonl; the next append is intact", async (t) => {
  const dir = tempDataDir();
  const paths = spoolPaths(dir);
  let spool = Spool.open(dir, captureLog().log);
  await spool.append(entry(1));
  await spool.close();
  await appendFile(paths.requests, '{"v":1,"spooledAt":"2025-01-');

  const capture = captureLog();
  spool = Spool.open(dir, capture.log);
  t.is(spool.depth, 1);
  t.true(capture.entries().some((e) => e.level === "warn" && String(e.msg).includes("torn")));
  await spool.append(entry(2));
  const applied: string[] = [];
  await spool.replay(async (e) => (applied.push(e.row.requestId), "done"));
  t.deepEqual(applied, ["r1", "r2"]);
  const rejected = (await fileLines(paths.rejected)).map((l) => JSON.parse(l));
  t.is(rejected.length, 1);
  t.is(rejected[0].raw, '{"v":1,"spooledAt":"2025-01-');
  await spool.close();
});

test("a corrupt line and a row refused for good go to rejected.jsonl with the reason; the others are applied", async (t) => {
  const dir = tempDataDir();
  const paths = spoolPaths(dir);
  let spool = Spool.open(dir, captureLog().log);
  await spool.append(entry(1));
  await spool.close();
  await appendFile(paths.requests, "garbage line\n");
  spool = Spool.open(dir, captureLog().log);
  await spool.append(entry(2));
  await spool.append(entry(3));
  t.is(spool.depth, 4);

  const applied: string[] = [];
  const pass = await spool.replay(async (e) => {
    if (e.row.requestId === "r2") return { reject: "bad row", code: "23514" };
    applied.push(e.row.requestId);
    return "done";
  });
  t.like(pass, { processed: 4, rejected: 2, stopped: false });
  t.deepEqual(applied, ["r1", "r3"]);
  const rejected = (await fileLines(paths.rejected)).map((l) => JSON.parse(l));
  t.is(rejected.length, 2);
  t.regex(rejected[0].error, /corrupt spool line/);
  t.is(rejected[0].raw, "garbage line");
  t.like(rejected[1], { error: "bad row", code: "23514", record: { row: { requestId: "r2" } } });
  await spool.close();
});

test("an offset file that does not fit the spool replays everything rather than skipping", async (t) => {
  const dir = tempDataDir();
  const paths = spoolPaths(dir);
  let spool = Spool.open(dir, captureLog().log);
  await spool.append(entry(1));
  await spool.append(entry(2));
  await spool.close();
  await writeFile(paths.offset, JSON.stringify({ offset: 7 })); // not a line boundary
  const capture = captureLog();
  spool = Spool.open(dir, capture.log);
  t.is(spool.depth, 2);
  t.true(capture.entries().some((e) => e.level === "warn" && String(e.msg).includes("offset")));
  await spool.close();
});

test("one process owns a spool: a live holder is refused clearly, a dead one's lock is taken over, a second open in-process is refused", async (t) => {
  const dir = tempDataDir();
  const paths = spoolPaths(dir);
  await Spool.open(dir, captureLog().log).close(); // creates the folder

  const child = spawn(process.execPath, ["-e", "setInterval(() => {}, 1000)"], { stdio: "ignore" });
  try {
    await writeFile(paths.lock, `${child.pid}\n`);
    const err = t.throws(() => Spool.open(dir, captureLog().log), { instanceOf: SpoolLockedError });
    t.is(err!.pid, child.pid!);
    t.regex(err!.message, new RegExp(`in use by process ${child.pid}.*KEYTRACK_DATA_DIR`));
    // The recorder surfaces it at creation, so the service stops at start-up.
    const pool = makePool("postgres://nobody@127.0.0.1:1/none");
    t.throws(() => createRecorder({ pool, dataDir: dir, log: captureLog().log }), { instanceOf: SpoolLockedError });
    await pool.end();
  } finally {
    child.kill("SIGKILL");
    await new Promise((r) => child.once("exit", r));
  }

  const capture = captureLog();
  const spool = Spool.open(dir, capture.log);
  t.true(capture.entries().some((e) => e.level === "warn" && String(e.msg).includes("process that is gone")));
  t.is((await readFile(paths.lock, "utf8")).trim(), String(process.pid));
  t.throws(() => Spool.open(dir, captureLog().log), { instanceOf: SpoolLockedError, message: /already open in this process/ });
  await spool.close();
  await t.throwsAsync(stat(paths.lock), { code: "ENOENT" });
});
