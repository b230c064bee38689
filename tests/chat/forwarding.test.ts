// The real forwarding code against a fake OpenAI-shaped upstream on loopback:
// usage and latency recorded, upstream errors and timeouts recorded as failed,
// client disconnects recorded as partial and propagated upstream, and exactly
// one row per request in every case.
import net from "node:net";

import test from "ava";
import OpenAI from "openai";

import type { RunningServer } from "../../server/main.js";
import { createKey, createTestDb, createUser, type TestDb } from "../helpers/db.js";
import { waitFor } from "../helpers/poll.js";
import { FAKE_TEXT, FAKE_USAGE, startFakeUpstream, type FakeUpstream } from "../helpers/fakeUpstream.js";
import { client, post, rowOf } from "../helpers/chat.js";
import { startTestServer } from "../helpers/server.js";

// The upstream timeout is the thing under test only in the two timeout tests, which use a
// server of their own (their fake upstream never answers, so the margin cannot be too small).
// Every other test runs far below a timeout that a slow, busy machine never reaches.
const TIMEOUT_MS = 5000;
const GENEROUS_TIMEOUT_MS = 120_000;
const UPSTREAM_KEY = "upstream-secret-key";

let db: TestDb;
let fake: FakeUpstream;
let server: RunningServer;
/** The same gateway with a short upstream timeout, for the timeout tests only. */
let tight: RunningServer;
let key: { id: string; secret: string };
/** Every request id the gateway accepted in this file: each must have exactly one row. */
const served: string[] = [];

test.before(async () => {
  db = await createTestDb();
  fake = await startFakeUpstream();
  server = await startTestServer(db, {
    UPSTREAM_BASE_URL: fake.url,
    UPSTREAM_API_KEY: UPSTREAM_KEY,
    UPSTREAM_TIMEOUT_MS: String(GENEROUS_TIMEOUT_MS),
    ALLOW_ANONYMOUS: "false",
  });
  tight = await startTestServer(db, {
    UPSTREAM_BASE_URL: fake.url,
    UPSTREAM_API_KEY: UPSTREAM_KEY,
    UPSTREAM_TIMEOUT_MS: String(TIMEOUT_MS),
    ALLOW_ANONYMOUS: "false",
  });
  key = await createKey(db, await createUser(db, "fwd@example.com"), "fwd");
});

test.after("exactly one row per served request, and no others", async (t) => {
  await Promise.all(served.map((id) => rowOf(db, id)));
  const { rows } = await db.owner.query("select request_id, count(*)::int as n from app_public.chat_completion_requests group by 1");
  t.is(rows.length, served.length);
  t.true(rows.every((r) => r.n === 1));
  t.deepEqual(rows.map((r) => r.request_id).sort(), [...served].sort());
});

test.after.always(async () => {
  await server?.close();
  await tight?.close();
  await fake?.close();
  await db?.drop();
});

const messages = [{ role: "user" as const, content: "hi" }];
const callFor = (requestId: string) => fake.calls.find((c) => c.headers["x-request-id"] === requestId);
function served_(requestId: string | null | undefined): string {
  if (!requestId) throw new Error("no x-request-id");
  served.push(requestId);
  return requestId;
}

test("non-streaming: the upstream's answer and usage, latency recorded, the gateway's own upstream key", async (t) => {
  const { data, response } = await client(server, key.secret)
    .chat.completions.create({ model: "fake-delay-150", messages })
    .withResponse();
  const id = served_(response.headers.get("x-request-id"));
  t.is(data.choices[0]!.message.content, FAKE_TEXT.join(""));
  t.is(response.headers.get("x-upstream-request-id"), "up-123");
  const call = callFor(id)!;
  t.is(call.path, "/v1/chat/completions");
  t.is(call.headers.authorization, `Bearer ${UPSTREAM_KEY}`);
  t.false(JSON.stringify(call.headers).includes(key.secret));

  const row = await rowOf(db, id);
  t.is(row.status, "completed");
  t.is(row.api_key_id, key.id);
  t.false(row.is_anonymous);
  t.is(row.model, "fake-delay-150");
  t.is(row.provider, new URL(fake.url).host);
  t.deepEqual([row.input_tokens, row.output_tokens], [FAKE_USAGE.input, FAKE_USAGE.output]);
  t.true(row.processing_time_ms! >= 150, `processing_time_ms ${row.processing_time_ms}`);
});

test("streaming: chunks pass through, usage is asked for upstream but not shown to a client that did not ask, and recorded", async (t) => {
  const { data: stream, response } = await client(server, key.secret)
    .chat.completions.create({ model: "fake-ok", messages, stream: true })
    .withResponse();
  const id = served_(response.headers.get("x-request-id"));
  let text = "";
  let usageSeen = false;
  for await (const chunk of stream) {
    text += chunk.choices[0]?.delta?.content ?? "";
    if (chunk.usage) usageSeen = true;
  }
  t.is(text, FAKE_TEXT.join(""));
  t.false(usageSeen);
  t.deepEqual(callFor(id)!.body.stream_options, { include_usage: true });
  const row = await rowOf(db, id);
  t.is(row.status, "completed");
  t.deepEqual([row.input_tokens, row.output_tokens], [FAKE_USAGE.input, FAKE_USAGE.output]);
});

test("streaming with include_usage from the client: the usage chunk reaches it", async (t) => {
  const { data: stream, response } = await client(server, key.secret)
    .chat.completions.create({ model: "fake-ok", messages, stream: true, stream_options: { include_usage: true } })
    .withResponse();
  served_(response.headers.get("x-request-id"));
  let usage: OpenAI.CompletionUsage | undefined;
  for await (const chunk of stream) if (chunk.usage) usage = chunk.usage;
  t.is(usage?.completion_tokens, FAKE_USAGE.output);
});

test("streaming: usage carried on the last content chunk is the fallback", async (t) => {
  const { data: stream, response } = await client(server, key.secret)
    .chat.completions.create({ model: "fake-usage-last", messages, stream: true })
    .withResponse();
  const id = served_(response.headers.get("x-request-id"));
  for await (const _ of stream);
  const row = await rowOf(db, id);
  t.deepEqual([row.input_tokens, row.output_tokens, row.status], [FAKE_USAGE.input, FAKE_USAGE.output, "completed"]);
});

test("streaming: an upstream that reports no usage is recorded with NULL tokens, completed", async (t) => {
  const { data: stream, response } = await client(server, key.secret)
    .chat.completions.create({ model: "fake-no-usage", messages, stream: true })
    .withResponse();
  const id = served_(response.headers.get("x-request-id"));
  for await (const _ of stream);
  const row = await rowOf(db, id);
  t.deepEqual([row.input_tokens, row.output_tokens, row.status], [null, null, "completed"]);
});

test("responses: forwarded to /v1/responses, usage recorded (JSON and stream)", async (t) => {
  const c = client(server, key.secret);
  const { data, response } = await c.responses.create({ model: "fake-ok", input: "hi", instructions: "x" }).withResponse();
  const id1 = served_(response.headers.get("x-request-id"));
  t.is(data.output_text, FAKE_TEXT.join(""));
  t.is(callFor(id1)!.path, "/v1/responses");

  const { data: stream, response: r2 } = await c.responses.create({ model: "fake-ok", input: "hi", stream: true }).withResponse();
  const id2 = served_(r2.headers.get("x-request-id"));
  let text = "";
  for await (const ev of stream) if (ev.type === "response.output_text.delta") text += ev.delta;
  t.is(text, FAKE_TEXT.join(""));
  for (const id of [id1, id2]) {
    const row = await rowOf(db, id);
    t.deepEqual([row.input_tokens, row.output_tokens, row.status], [FAKE_USAGE.input, FAKE_USAGE.output, "completed"]);
  }
});

test("upstream 500: a 502 with a JSON error, recorded as failed with the message", async (t) => {
  const err = await t.throwsAsync(client(server, key.secret).chat.completions.create({ model: "fake-500", messages }), {
    instanceOf: OpenAI.InternalServerError,
  });
  t.is(err.status, 502);
  t.is(err.code, "upstream_error");
  const row = await rowOf(db, served_(err.requestID));
  t.is(row.status, "failed");
  t.regex(row.error_message!, /HTTP 500.*the fake upstream broke/);
  t.is(row.api_key_id, key.id);
});

test("upstream 401 (the gateway's upstream key): a 502, not the client's authentication error", async (t) => {
  const err = await t.throwsAsync(client(server, key.secret).chat.completions.create({ model: "fake-401", messages }), {
    instanceOf: OpenAI.APIError,
  });
  t.is(err.status, 502);
  t.is(err.code, "upstream_auth_failed");
  t.is((await rowOf(db, served_(err.requestID))).status, "failed");
});

test("upstream 400: passed through with its status and message, recorded as failed", async (t) => {
  const err = await t.throwsAsync(client(server, key.secret).chat.completions.create({ model: "fake-400", messages }), {
    instanceOf: OpenAI.BadRequestError,
  });
  t.is(err.message, "400 the fake upstream rejects this");
  const row = await rowOf(db, served_(err.requestID));
  t.is(row.status, "failed");
  t.regex(row.error_message!, /HTTP 400/);
});

test("upstream timeout before answering: a 504, the upstream call aborted, recorded as failed", async (t) => {
  const started = Date.now();
  const res = await post(tight, "/v1/chat/completions", { model: "fake-hang", messages }, { authorization: `Bearer ${key.secret}` });
  t.is(res.status, 504);
  const body = await res.json();
  t.is(body.error.code, "upstream_timeout");
  t.is(body.error.type, "upstream_error");
  t.true(Date.now() - started >= TIMEOUT_MS);
  const id = served_(res.headers.get("x-request-id"));
  await waitFor("the upstream call to be aborted", () => callFor(id)?.aborted === true);
  const row = await rowOf(db, id);
  t.is(row.status, "failed");
  t.regex(row.error_message!, /timed out/);
});

test("upstream timeout mid-stream: the stream ends with an error the client raises, recorded as failed", async (t) => {
  const { data: stream, response } = await client(tight, key.secret)
    .chat.completions.create({ model: "fake-stream-hang", messages, stream: true })
    .withResponse();
  const id = served_(response.headers.get("x-request-id"));
  const err = await t.throwsAsync(async () => {
    for await (const _ of stream);
  });
  t.regex(err.message, /stopped responding/);
  const row = await rowOf(db, id);
  t.is(row.status, "failed");
  t.regex(row.error_message!, /timed out mid-stream/);
});

test("client disconnect mid-stream: recorded as partial, the upstream call aborted", async (t) => {
  const controller = new AbortController();
  const res = await fetch(`${server.url}/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${key.secret}` },
    body: JSON.stringify({ model: "fake-slow", messages, stream: true }),
    signal: controller.signal,
  });
  const id = served_(res.headers.get("x-request-id"));
  const reader = res.body!.getReader();
  let received = "";
  while (!received.includes("w3 ")) received += new TextDecoder().decode((await reader.read()).value);
  controller.abort();
  await waitFor("the upstream to see the disconnect", () => callFor(id)?.aborted === true);
  const row = await rowOf(db, id);
  t.is(row.status, "partial");
  t.is(row.api_key_id, key.id);
  t.true(callFor(id)!.ended === false);
});

test("client disconnect before a non-streaming answer: recorded as partial, the upstream call aborted", async (t) => {
  const controller = new AbortController();
  const pending = fetch(`${server.url}/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${key.secret}` },
    // An upstream that never answers: the client's disconnect is what ends the call, however slow the machine.
    body: JSON.stringify({ model: "fake-hang-until-disconnect", messages }),
    signal: controller.signal,
  }).catch(() => null);
  await waitFor("the upstream call", () => fake.calls.some((c) => c.body?.model === "fake-hang-until-disconnect"));
  controller.abort();
  await pending;
  const call = fake.calls.find((c) => c.body?.model === "fake-hang-until-disconnect")!;
  const id = served_(call.headers["x-request-id"] as string);
  await waitFor("the upstream call to be aborted", () => call.aborted);
  t.is((await rowOf(db, id)).status, "partial");
});

test("upstream down: a 502 with a JSON error, recorded as failed", async (t) => {
  // A port nothing listens on.
  const port = await new Promise<number>((resolve) => {
    const s = net.createServer().listen(0, "127.0.0.1", () => {
      const p = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(p));
    });
  });
  const down = await startTestServer(db, { UPSTREAM_BASE_URL: `http://127.0.0.1:${port}/v1`, ALLOW_ANONYMOUS: "false" });
  try {
    const res = await post(down, "/v1/chat/completions", { model: "x", messages }, { authorization: `Bearer ${key.secret}` });
    t.is(res.status, 502);
    t.is((await res.json()).error.code, "upstream_unavailable");
    const row = await rowOf(db, served_(res.headers.get("x-request-id")));
    t.is(row.status, "failed");
    t.regex(row.error_message!, /unreachable.*ECONNREFUSED/);
  } finally {
    await down.close();
  }
});

test("GET /v1/models lists what the upstream offers", async (t) => {
  const ids = [];
  for await (const m of client(server, key.secret).models.list()) ids.push(m.id);
  t.deepEqual(ids, ["fake-ok"]);
});
