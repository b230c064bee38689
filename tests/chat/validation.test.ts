// Bad input is a 400 (413 for a body over BODY_LIMIT) in OpenAI's error shape,
// before any upstream call, and is not recorded; but authentication comes first
// (no body is read for a caller without a usable key), on /v1 and on /graphql.
import test from "ava";
import OpenAI from "openai";

import type { RunningServer } from "../../server/main.js";
import { createKey, createTestDb, createUser, type TestDb } from "../helpers/db.js";
import { startFakeUpstream, type FakeUpstream } from "../helpers/fakeUpstream.js";
import { client, post } from "../helpers/chat.js";
import { ADMIN_TOKEN, startTestServer } from "../helpers/server.js";
import { jsonDepthExceeds, MAX_JSON_DEPTH } from "../../server/http/jsonBody.js";
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

test("control characters in model are a 400 naming it, before anything is served", async (t) => {
  for (const c of ["\u0000", "\u0001", "\n", "\r", "\t", "\u001b", "\u001f", "\u007f"]) {
    await expectError(t, chat, { model: `gpt${c}4`, messages }, 400, "invalid_value", "model");
    await expectError(t, "/v1/responses", { model: `${c}gpt`, input: "hi" }, 400, "invalid_value", "model");
  }
  await expectError(t, chat, { model: "m".repeat(200) + "\u0000", messages }, 400, "invalid_value", "model");
});

const nested = (depth: number) => "[".repeat(depth) + "]".repeat(depth);

test("a body nested deeper than 400 is a 400 json_too_deep, checked before parsing", async (t) => {
  // 400k arrays once overflowed the stack (and were recorded as "upstream unreachable").
  await expectError(t, chat, `{"model":"fake-ok","messages":${nested(1000)}}`, 400, "json_too_deep", null);
  await expectError(t, chat, nested(1000), 400, "json_too_deep", null);
  // Brackets inside strings are text, not nesting.
  await expectError(t, chat, JSON.stringify({ model: "fake-ok", messages: "[".repeat(1500) }), 400, "invalid_type", "messages");
  // 400 levels are fine (and then judged as usual): the body itself is level 1.
  await expectError(t, chat, `{"model":"fake-ok","messages":${nested(399)}}`, 400, "invalid_type", "messages[0]");
  await expectError(t, chat, `{"model":"fake-ok","messages":${nested(400)}}`, 400, "json_too_deep", null);
});

test("authentication comes before the body is read: no key with a malformed, deep or huge body is a 401", async (t) => {
  for (const path of [chat, "/v1/responses"]) {
    await expectError(t, path, '{"model": "fake-ok", "messages": [', 401, "missing_api_key", undefined, {});
    await expectError(t, path, nested(5000), 401, "missing_api_key", undefined, {});
    await expectError(t, path, { model: "fake-ok", input: "x".repeat(64 * 1024) }, 401, "missing_api_key", undefined, {});
    await expectError(t, path, '{"model": "fake-ok", "messages": [', 401, "invalid_api_key", undefined, { authorization: "Bearer kt_live_nope" });
    await expectError(t, path, { model: "fake-ok", input: "x".repeat(64 * 1024) }, 401, "invalid_api_key", undefined, { authorization: "Bearer kt_live_nope" });
  }
});

test("the depth pre-scan skips strings (escaped quotes included) and reads other UTF charsets", async (t) => {
  t.false(jsonDepthExceeds('["\\"[[[[", "]]]]"]', 1));
  t.true(jsonDepthExceeds('[["\\"[", []]]', 2));
  t.true(jsonDepthExceeds(new TextEncoder().encode('{"a":"é","b":[[1]]}'), 2));
  t.false(jsonDepthExceeds(new TextEncoder().encode('{"a":"é","b":[[1]]}'), 3));
  const res = await fetch(server.url + chat, {
    method: "POST",
    headers: { "content-type": "application/json; charset=utf-16le", ...auth },
    body: Buffer.from(`{"model":"fake-ok","messages":${nested(MAX_JSON_DEPTH)}}`, "utf16le"),
  });
  t.is(res.status, 400);
  t.is((await res.json()).error.code, "json_too_deep");
});

test("/graphql authenticates before reading its body too, with the same parser", async (t) => {
  const gql = (body: string, token?: string) =>
    fetch(`${server.url}/graphql`, {
      method: "POST",
      headers: { "content-type": "application/json", ...(token ? { authorization: `Bearer ${token}` } : {}) },
      body,
    });
  for (const body of ['{"query": ', nested(5000), JSON.stringify({ query: "{ __typename }", pad: "x".repeat(8192) })]) {
    const res = await gql(body, "kt_live_not_a_key");
    t.is(res.status, 401, body.slice(0, 20));
    t.is((await res.json()).errors[0].extensions.code, "UNAUTHENTICATED");
  }
  const deep = await gql(`{"query":"{ __typename }","variables":{"a":${nested(500)}}}`, ADMIN_TOKEN);
  t.is(deep.status, 400);
  t.is((await deep.json()).error.code, "json_too_deep");
  const malformed = await gql('{"query": ', ADMIN_TOKEN);
  t.is(malformed.status, 400);
  t.is((await malformed.json()).error.code, "invalid_json");
  const huge = await gql(JSON.stringify({ query: "{ __typename }", pad: "x".repeat(8192) }), ADMIN_TOKEN);
  t.is(huge.status, 413);
  t.is((await huge.json()).error.code, "body_too_large");
  const fine = await gql(JSON.stringify({ query: "{ __typename }" }), ADMIN_TOKEN);
  t.is(fine.status, 200);
  t.deepEqual(await fine.json(), { data: { __typename: "Query" } });
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
