// Bad input is a 400 (413 for a body over BODY_LIMIT) in OpenAI's error shape,
// before any upstream call, and is not recorded.
import test from "ava";
import OpenAI from "openai";

import type { RunningServer } from "../../server/main.js";
import { createKey, createTestDb, createUser, type TestDb } from "../helpers/db.js";
import { startFakeUpstream, type FakeUpstream } from "../helpers/fakeUpstream.js";
import { client, post } from "../helpers/chat.js";
import { startTestServer } from "../helpers/server.js";
import { sleep } from "../helpers/poll.js";

let db: TestDb;
let fake: FakeUpstream;
let server: RunningServer;
let auth: Record<string, string>;

test.before(async () => {
  db = await createTestDb();
  fake = await startFakeUpstream();
  server = await startTestServer(db, { UPSTREAM_BASE_URL: fake.url, BODY_LIMIT: "2kb", ALLOW_ANONYMOUS: "false" });
  const key = await createKey(db, await createUser(db, "val@example.com"));
  auth = { authorization: `Bearer ${key.secret}` };
});

test.after("no upstream call and no row for any bad request", async (t) => {
  await sleep(200);
  t.is(fake.calls.length, 0);
  const { rows } = await db.owner.query("select count(*)::int as n from app_public.chat_completion_requests");
  t.is(rows[0].n, 0);
});

test.after.always(async () => {
  await server?.close();
  await fake?.close();
  await db?.drop();
});

async function expectError(t: any, path: string, body: unknown, status: number, code: string, param?: string | null, headers = auth) {
  const res = await post(server, path, body, headers);
  t.is(res.status, status, JSON.stringify(body).slice(0, 80));
  t.regex(res.headers.get("content-type") ?? "", /application\/json/);
  const json = await res.json();
  t.is(typeof json.error.message, "string");
  t.is(typeof json.error.type, "string");
  t.is(json.error.code, code);
  if (param !== undefined) t.is(json.error.param, param);
}

const chat = "/v1/chat/completions";
const messages = [{ role: "user", content: "hi" }];

test("a body over BODY_LIMIT is a 413", async (t) => {
  await expectError(t, chat, { model: "fake-ok", messages: [{ role: "user", content: "x".repeat(4096) }] }, 413, "body_too_large");
  await expectError(t, "/v1/responses", { model: "fake-ok", input: "x".repeat(4096) }, 413, "body_too_large");
});

test("malformed JSON is a 400", async (t) => {
  await expectError(t, chat, '{"model": "fake-ok", "messages": [', 400, "invalid_json");
  await expectError(t, "/v1/responses", "not json", 400, "invalid_json");
});

test("a body that is not a JSON object, or not JSON at all, is a 400", async (t) => {
  await expectError(t, chat, [1, 2], 400, "invalid_type");
  const res = await fetch(server.url + chat, { method: "POST", headers: { "content-type": "text/plain", ...auth }, body: "hello" });
  t.is(res.status, 400);
  t.is((await res.json()).error.code, "invalid_json");
});

test("missing model or messages is a 400 naming the parameter", async (t) => {
  await expectError(t, chat, { messages }, 400, "missing_required_parameter", "model");
  await expectError(t, chat, { model: "fake-ok" }, 400, "missing_required_parameter", "messages");
  await expectError(t, "/v1/responses", { model: "fake-ok" }, 400, "missing_required_parameter", "input");
  await expectError(t, "/v1/responses", { input: "hi" }, 400, "missing_required_parameter", "model");
});

test("wrong types are a 400 naming the parameter", async (t) => {
  await expectError(t, chat, { model: 42, messages }, 400, "invalid_type", "model");
  await expectError(t, chat, { model: "fake-ok", messages: "hi" }, 400, "invalid_type", "messages");
  await expectError(t, chat, { model: "fake-ok", messages: ["hi"] }, 400, "invalid_type", "messages[0]");
  await expectError(t, chat, { model: "fake-ok", messages: [{ content: "hi" }] }, 400, "missing_required_parameter", "messages[0].role");
  await expectError(t, chat, { model: "fake-ok", messages: [{ role: "user", content: 5 }] }, 400, "invalid_type", "messages[0].content");
  await expectError(t, chat, { model: "fake-ok", messages, stream: "yes" }, 400, "invalid_type", "stream");
  await expectError(t, chat, { model: "fake-ok", messages, stream: true, stream_options: { include_usage: "yes" } }, 400, "invalid_type", "stream_options.include_usage");
  await expectError(t, chat, { model: "fake-ok", messages, stream_options: { include_usage: true } }, 400, "invalid_value", "stream_options");
  await expectError(t, "/v1/responses", { model: "fake-ok", input: 7 }, 400, "invalid_type", "input");
  await expectError(t, "/v1/responses", { model: "fake-ok", input: "hi", instructions: 1 }, 400, "invalid_type", "instructions");
});

test("bad values are a 400", async (t) => {
  await expectError(t, chat, { model: "fake-ok", messages: [] }, 400, "empty_array", "messages");
  await expectError(t, chat, { model: "", messages }, 400, "invalid_value", "model");
  await expectError(t, chat, { model: "m".repeat(201), messages }, 400, "invalid_value", "model");
});

test("the official client raises BadRequestError for a missing field", async (t) => {
  const err = await t.throwsAsync(
    client(server, auth.authorization!.slice(7)).chat.completions.create({ model: "fake-ok" } as any),
    { instanceOf: OpenAI.BadRequestError },
  );
  t.is(err.param, "messages");
});

test("unknown /v1 routes are a 404 in the same shape", async (t) => {
  const res = await fetch(server.url + "/v1/embeddings", { method: "POST", headers: auth });
  t.is(res.status, 404);
  t.is((await res.json()).error.code, "not_found");
});
