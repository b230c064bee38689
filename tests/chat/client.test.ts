// The official openai client against the running service, answered by the
// built-in echo model (no upstream): the spec's test "send a chat completion,
// find its row with api_key_id and is_anonymous set", and authentication.
import test from "ava";
import OpenAI from "openai";

import type { RunningServer } from "../../server/main.js";
import { createKey, createTestDb, createUser, rowsFor, type TestDb } from "../helpers/db.js";
import { client, rowOf } from "../helpers/chat.js";
import { startTestServer } from "../helpers/server.js";
import { sleep } from "../helpers/poll.js";

let db: TestDb;
let closed: RunningServer; // ALLOW_ANONYMOUS=false
let open: RunningServer; // ALLOW_ANONYMOUS=true
let key: { id: string; secret: string };
let userId: string;

test.before(async () => {
  db = await createTestDb();
  closed = await startTestServer(db, { ALLOW_ANONYMOUS: "false" });
  open = await startTestServer(db, { ALLOW_ANONYMOUS: "true" });
  userId = await createUser(db, "chat@example.com");
  key = await createKey(db, userId, "chat");
});

test.after.always(async () => {
  await closed?.close();
  await open?.close();
  await db?.drop();
});

const messages = [
  { role: "system" as const, content: "Be brief." },
  { role: "user" as const, content: "Hello, world!" },
];

test("non-streaming chat completion: echoes, returns usage and the request id, records one attributed row", async (t) => {
  const { data, response } = await client(closed, key.secret)
    .chat.completions.create({ model: "gpt-3.5-turbo", messages })
    .withResponse();
  t.is(data.choices[0]!.message.content, "Hello, world!");
  // "Be brief." and "Hello, world!": 3 + 4 input tokens; the answer, 4.
  t.deepEqual(data.usage, { prompt_tokens: 7, completion_tokens: 4, total_tokens: 11 });
  const requestId = response.headers.get("x-request-id")!;
  t.regex(requestId, /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  t.is((data as { _request_id?: string | null })._request_id, requestId);

  const row = await rowOf(db, requestId);
  t.is(row.api_key_id, key.id);
  t.is(row.user_id, userId);
  t.false(row.is_anonymous);
  t.is(row.status, "completed");
  t.is(row.model, "gpt-3.5-turbo");
  t.is(row.provider, "echo");
  t.is(row.input_tokens, 7);
  t.is(row.output_tokens, 4);
  t.true(row.processing_time_ms !== null && row.processing_time_ms >= 0);
  t.is(row.error_message, null);
});

test("streaming chat completion with include_usage: deltas, a usage chunk agreeing with them, one row", async (t) => {
  const { data: stream, response } = await client(closed, key.secret)
    .chat.completions.create({ model: "echo", messages, stream: true, stream_options: { include_usage: true } })
    .withResponse();
  t.regex(response.headers.get("content-type")!, /^text\/event-stream/);
  let text = "";
  let contentChunks = 0;
  let usage: OpenAI.CompletionUsage | null | undefined;
  for await (const chunk of stream) {
    const delta = chunk.choices[0]?.delta?.content;
    if (delta) {
      text += delta;
      contentChunks++;
    }
    if (chunk.usage) usage = chunk.usage;
  }
  t.is(text, "Hello, world!");
  t.is(usage?.completion_tokens, contentChunks);
  const row = await rowOf(db, response.headers.get("x-request-id")!);
  t.is(row.status, "completed");
  t.is(row.api_key_id, key.id);
  t.is(row.output_tokens, 4);
  t.is(row.input_tokens, 7);
});

test("streaming chat completion without include_usage: no usage chunk reaches the client, usage still recorded", async (t) => {
  const { data: stream, response } = await client(closed, key.secret)
    .chat.completions.create({ model: "echo", messages, stream: true })
    .withResponse();
  let sawUsage = false;
  for await (const chunk of stream) if (chunk.usage || chunk.choices.length === 0) sawUsage = true;
  t.false(sawUsage);
  const row = await rowOf(db, response.headers.get("x-request-id")!);
  t.is(row.output_tokens, 4);
});

test("responses call: output_text and usage in the Responses shape, one row", async (t) => {
  const { data, response } = await client(closed, key.secret)
    .responses.create({ model: "echo", instructions: "Be brief.", input: "Say it back." })
    .withResponse();
  t.is(data.object, "response");
  t.is(data.status, "completed");
  t.is(data.output_text, "Say it back.");
  t.deepEqual([data.usage?.input_tokens, data.usage?.output_tokens, data.usage?.total_tokens], [7, 4, 11]);
  const row = await rowOf(db, response.headers.get("x-request-id")!);
  t.is(row.api_key_id, key.id);
  t.deepEqual([row.input_tokens, row.output_tokens, row.status], [7, 4, "completed"]);
});

test("responses call, streamed: output_text deltas then response.completed with usage", async (t) => {
  const { data: stream, response } = await client(closed, key.secret)
    .responses.create({ model: "echo", input: [{ role: "user", content: "one two three" }], stream: true })
    .withResponse();
  let text = "";
  let completed: OpenAI.Responses.Response | undefined;
  const types: string[] = [];
  for await (const event of stream) {
    types.push(event.type);
    if (event.type === "response.output_text.delta") text += event.delta;
    if (event.type === "response.completed") completed = event.response;
  }
  t.is(text, "one two three");
  t.is(types[0], "response.created");
  t.is(types.at(-1), "response.completed");
  t.is(completed?.usage?.output_tokens, 3);
  const row = await rowOf(db, response.headers.get("x-request-id")!);
  t.deepEqual([row.input_tokens, row.output_tokens], [3, 3]);
});

test("the client's responses.stream() helper assembles the echo's final response", async (t) => {
  const final = await client(closed, key.secret).responses.stream({ model: "echo", input: "streamed helper" }).finalResponse();
  t.is(final.output_text, "streamed helper");
});

test("a bad key: the client raises its authentication error (401, OpenAI error shape), nothing recorded", async (t) => {
  const err = await t.throwsAsync(
    client(closed, "kt_not_a_real_key_0123456789").chat.completions.create({ model: "echo", messages }),
    { instanceOf: OpenAI.AuthenticationError },
  );
  t.is(err.status, 401);
  t.is(err.code, "invalid_api_key");
  t.truthy(err.requestID);
  await sleep(200);
  t.is((await rowsFor(db.owner, [err.requestID!])).length, 0);
});

test("a bad key with anonymous access on is still a 401, never silently anonymous", async (t) => {
  await t.throwsAsync(client(open, "kt_not_a_real_key_0123456789").chat.completions.create({ model: "echo", messages }), {
    instanceOf: OpenAI.AuthenticationError,
  });
});

test("a revoked key is a 401", async (t) => {
  const revoked = await createKey(db, userId, "revoked");
  await db.owner.query("select app_public.revoke_api_key($1)", [revoked.id]);
  const err = await t.throwsAsync(client(closed, revoked.secret).chat.completions.create({ model: "echo", messages }), {
    instanceOf: OpenAI.AuthenticationError,
  });
  t.is(err.code, "api_key_revoked");
});

test("an expired key is a 401", async (t) => {
  const expired = await createKey(db, userId, "expired");
  await db.owner.query("update app_public.api_keys set created_at = now() - interval '2 minutes', expires_at = now() - interval '1 minute' where id = $1", [expired.id]);
  const err = await t.throwsAsync(client(closed, expired.secret).chat.completions.create({ model: "echo", messages }), {
    instanceOf: OpenAI.AuthenticationError,
  });
  t.is(err.code, "api_key_expired");
});

test("anonymous off: no credentials is a 401", async (t) => {
  const err = await t.throwsAsync(client(closed, null).chat.completions.create({ model: "echo", messages }), {
    instanceOf: OpenAI.AuthenticationError,
  });
  t.is(err.code, "missing_api_key");
});

test("anonymous on: no credentials is served and recorded with is_anonymous and both ids NULL", async (t) => {
  const { data, response } = await client(open, null).chat.completions.create({ model: "echo", messages }).withResponse();
  t.is(data.choices[0]!.message.content, "Hello, world!");
  const row = await rowOf(db, response.headers.get("x-request-id")!);
  t.true(row.is_anonymous);
  t.is(row.api_key_id, null);
  t.is(row.user_id, null);
  t.is(row.api_key_hash, null);
  t.is(row.attribution_status, "anonymous");
});

test("anonymous on: a key is still used when given", async (t) => {
  const { response } = await client(open, key.secret).chat.completions.create({ model: "echo", messages }).withResponse();
  const row = await rowOf(db, response.headers.get("x-request-id")!);
  t.is(row.api_key_id, key.id);
  t.false(row.is_anonymous);
});

test("a dev_local_ key outside development is a 401, even when the database has it", async (t) => {
  const { rows } = await db.owner.query("select k from app_private.get_or_create_dev_api_key() as k");
  const devKey: string = rows[0].k;
  t.true(devKey.startsWith("dev_local_"));
  const err = await t.throwsAsync(client(closed, devKey).chat.completions.create({ model: "echo", messages }), {
    instanceOf: OpenAI.AuthenticationError,
  });
  t.is(err.status, 401);
});

test("GET /v1/models lists the built-in echo model", async (t) => {
  const c = client(closed, key.secret);
  const models = [];
  for await (const m of c.models.list()) models.push(m.id);
  t.deepEqual(models, ["echo"]);
  t.is((await c.models.retrieve("echo")).id, "echo");
  await t.throwsAsync(c.models.retrieve("gpt-4"), { instanceOf: OpenAI.NotFoundError });
});
