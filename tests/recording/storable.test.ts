// Whatever reaches the recorder is storable: text the database refuses (NUL,
// 22021) or would refuse (longer than a column's CHECK) is made safe before the
// insert, so a served request still ends as exactly one row. A refusal that
// still happens (a row the database rejects for good) is never silent: the row
// is kept in rejected.jsonl and counted as dropped (reason rejected_by_database).
import test from "ava";
import { readFile } from "node:fs/promises";

import type { RunningServer } from "../../server/main.js";
import { createRecorder, insertValues } from "../../server/recording/recorder.js";
import { spoolPaths } from "../../server/recording/spool.js";
import { PermanentRecordError, type RequestRecord } from "../../server/recording/types.js";
import { post, rowOf } from "../helpers/chat.js";
import { createKey, createTestDb, createUser, rowsFor, type TestDb } from "../helpers/db.js";
import { captureLog, makeRow } from "../helpers/recording.js";
import { removeTempDataDirs, startTestServer, tempDataDir } from "../helpers/server.js";

let db: TestDb;
let server: RunningServer;
let key: { id: string; secret: string };

test.before(async () => {
  db = await createTestDb();
  server = await startTestServer(db, { APP_ENV: "test" });
  key = await createKey(db, await createUser(db, "storable@example.com"), "storable");
});
test.after.always(async () => {
  await server?.close();
  await db?.drop();
  await removeTempDataDirs();
});

async function lines(file: string): Promise<string[]> {
  return (await readFile(file, "utf8")).split("\n").filter(Boolean);
}

function recorder() {
  const capture = captureLog();
  const dataDir = tempDataDir();
  const r = createRecorder({ pool: db.owner, dataDir, log: capture.log });
  return { recorder: r, capture, dataDir };
}

test("a model with a NUL character, served by the echo model through the real server, ends as exactly one row", async (t) => {
  const res = await post(
    server,
    "/v1/chat/completions",
    { model: "gpt-4o\u0000x", messages: [{ role: "user", content: "hi" }] },
    { authorization: `Bearer ${key.secret}` },
  );
  const requestId = res.headers.get("x-request-id")!;
  await res.arrayBuffer();
  if (res.status === 400) {
    // /v1 refuses control characters in `model` before serving: then no row is the right answer.
    t.log("the gateway refused the model before serving it (400): nothing to record");
    t.deepEqual(await rowsFor(db.owner, [requestId]), []);
    return;
  }
  t.is(res.status, 200);
  const row = await rowOf(db, requestId);
  t.is(row.model, "gpt-4o\uFFFDx");
  t.is(row.api_key_id, key.id);
  t.is(row.status, "completed");
});

test("an upstream error message with a NUL character: the failed row is recorded, the NUL replaced", async (t) => {
  const { recorder: r } = recorder();
  t.teardown(() => r.close());
  const row = makeRow({ status: "failed", errorMessage: "upstream said \u0000 no", inputTokens: null, outputTokens: null });
  t.deepEqual(await r.record(row), { outcome: "recorded", attempts: 1 });
  const [stored] = await rowsFor(db.owner, [row.requestId]);
  t.is(stored!.status, "failed");
  t.is(stored!.error_message, "upstream said \uFFFD no");
  t.deepEqual(r.dropped(), {});
});

test("a NUL in the model and the provider is replaced, not refused", async (t) => {
  const { recorder: r } = recorder();
  t.teardown(() => r.close());
  const row = makeRow({ model: "\u0000gpt\u0000", provider: "p\u0000" });
  t.is((await r.record(row)).outcome, "recorded");
  const [stored] = await rowsFor(db.owner, [row.requestId]);
  t.is(stored!.model, "\uFFFDgpt\uFFFD");
  t.is(stored!.provider, "p\uFFFD");
});

test("text longer than its column allows is cut to the bound (in characters, never splitting a surrogate pair)", async (t) => {
  const { recorder: r } = recorder();
  t.teardown(() => r.close());
  const row = makeRow({ model: "m".repeat(199) + "😀😀😀", provider: "p".repeat(5000), status: "failed", errorMessage: "e".repeat(100_000) });
  t.is((await r.record(row)).outcome, "recorded");
  const [stored] = await rowsFor(db.owner, [row.requestId]);
  t.is([...stored!.model!].length, 200);
  t.true(stored!.model!.startsWith("m".repeat(199)));
  t.false(/[\uD800-\uDFFF]/.test(stored!.model!.slice(199).replace(/[\uD800-\uDBFF][\uDC00-\uDFFF]/g, "")), "no lone surrogate");
  t.is([...stored!.provider!].length, 200);
  t.is([...stored!.error_message!].length, 2000);
  t.true(stored!.error_message!.endsWith("…"), "a cut is marked");
});

test("insertValues makes every text field storable; what is already storable is passed as is", (t) => {
  const row: RequestRecord = makeRow({ model: "a\u0000b\uD800c", provider: "ok", errorMessage: null });
  const v = insertValues(row);
  t.is(v[5], "a\uFFFDb\uFFFDc");
  t.is(v[6], "ok");
  t.is(v[11], null);
  t.is(v[0], row.requestId, "the request id is ours and never rewritten");
  const fine = makeRow();
  t.deepEqual(insertValues(fine).slice(5, 7), [fine.model, fine.provider]);
});

test("numbers the table's CHECKs or int4 would refuse are stored as unknown (NULL) or clamped, not refused", async (t) => {
  const { recorder: r } = recorder();
  t.teardown(() => r.close());
  const row = makeRow({ inputTokens: -1, outputTokens: 1.5, processingTimeMs: 3e10 });
  t.is((await r.record(row)).outcome, "recorded");
  const [stored] = await rowsFor(db.owner, [row.requestId]);
  t.is(stored!.input_tokens, null);
  t.is(stored!.output_tokens, null);
  t.is(stored!.processing_time_ms, 2_147_483_647);
});

test("a row the database still refuses for good is kept in rejected.jsonl and counted as dropped (rejected_by_database)", async (t) => {
  const { recorder: r, dataDir, capture } = recorder();
  t.teardown(() => r.close());
  // A key hash that is not 32 bytes: nothing in the recording path can repair it.
  const row = makeRow({ apiKeyHash: Buffer.from("abc") });
  const err = await t.throwsAsync(r.record(row), { instanceOf: PermanentRecordError });
  t.is(err!.code, "23514");
  t.deepEqual(await rowsFor(db.owner, [row.requestId]), []);
  const rejected = (await lines(spoolPaths(dataDir).rejected)).map((l) => JSON.parse(l));
  t.is(rejected.length, 1);
  t.like(rejected[0], { code: "23514", record: { row: { requestId: row.requestId, apiKeyHash: "616263" } } });
  t.deepEqual(r.dropped(), { rejected_by_database: 1 });
  t.is(r.bufferedRows(), 0);
  t.true(r.accepting());
  t.true(capture.entries().some((e) => e.level === "error" && e.requestId === row.requestId && String(e.msg).includes("rejected.jsonl")));
});
