// A hostile or broken upstream, and clients trying to make the gateway amplify or
// misdirect: the gateway bounds what it reads (UPSTREAM_MAX_BODY, UPSTREAM_MAX_EVENT),
// passes on only JSON and event streams, refuses model ids that are not model ids
// before any upstream call, and bounds the echo model's answer (ECHO_MODEL).
import http from "node:http";

import test from "ava";
import OpenAI from "openai";

import type { RunningServer } from "../../server/main.js";
import { createKey, createTestDb, createUser, type TestDb } from "../helpers/db.js";
import { HUGE_TOTAL_BYTES, startFakeUpstream, type FakeUpstream } from "../helpers/fakeUpstream.js";
import { client, post, rowOf } from "../helpers/chat.js";
import { sleep, waitFor } from "../helpers/poll.js";
import { startTestServer } from "../helpers/server.js";
import { ECHO_MAX_OUTPUT_CHARS, ECHO_MAX_OUTPUT_TOKENS } from "../../server/chat/echo.js";
import { countTokens } from "../../server/chat/tokens.js";

const MAX_BODY = 256 * 1024;
const MAX_EVENT = 64 * 1024;

let db: TestDb;
let fake: FakeUpstream;
/** Forwards to the fake upstream, with small caps. */
let gw: RunningServer;
/** No upstream: the echo model (on by default outside production), with room for a large prompt. */
let echo: RunningServer;
/** No upstream and ECHO_MODEL=false. */
let none: RunningServer;
let auth: Record<string, string>;
let secret: string;

test.before(async () => {
  db = await createTestDb();
  fake = await startFakeUpstream();
  // One after the other: starting a server prepares the database.
  gw = await startTestServer(db, {
    UPSTREAM_BASE_URL: fake.url,
    UPSTREAM_API_KEY: "upstream-secret",
    UPSTREAM_MAX_BODY: `${MAX_BODY}b`,
    UPSTREAM_MAX_EVENT: `${MAX_EVENT}b`,
    UPSTREAM_TIMEOUT_MS: "120000",
    ALLOW_ANONYMOUS: "false",
  });
  echo = await startTestServer(db, { ALLOW_ANONYMOUS: "false", BODY_LIMIT: "2mb" });
  none = await startTestServer(db, { ALLOW_ANONYMOUS: "false", ECHO_MODEL: "false" });
  secret = (await createKey(db, await createUser(db, "hostile@example.com"))).secret;
  auth = { authorization: `Bearer ${secret}` };
});

test.after.always(async () => {
  await gw?.close();
  await echo?.close();
  await none?.close();
  await fake?.close();
  await db?.drop();
});

const messages = [{ role: "user" as const, content: "hi" }];
const callFor = (requestId: string) => fake.calls.find((c) => c.headers["x-request-id"] === requestId);

async function expectJsonError(res: Response, status: number, code: string) {
  if (res.status !== status) throw new Error(`expected ${status}, got ${res.status}: ${(await res.text()).slice(0, 200)}`);
  if (!/^application\/json/.test(res.headers.get("content-type") ?? "")) throw new Error(`not JSON: ${res.headers.get("content-type")}`);
  const body = await res.json();
  if (body.error?.code !== code) throw new Error(`expected code ${code}, got ${JSON.stringify(body)}`);
  return body.error as { message: string; code: string; param: string | null; type: string };
}

// ------------------------------------------------------------ 1. the upstream's body is capped

test("a huge upstream body: read up to UPSTREAM_MAX_BODY, the upstream call aborted, a 502, the row failed", async (t) => {
  const res = await post(gw, "/v1/chat/completions", { model: "fake-huge-body", messages }, auth);
  const error = await expectJsonError(res, 502, "upstream_response_too_large");
  t.is(error.type, "upstream_error");
  const id = res.headers.get("x-request-id")!;
  await waitFor("the upstream call to be aborted", () => callFor(id)?.aborted === true);
  // Stopped early: far less than the whole body was ever written (socket buffers aside).
  t.true(callFor(id)!.bytesWritten < HUGE_TOTAL_BYTES / 2, `written ${callFor(id)!.bytesWritten}`);
  const row = await rowOf(db, id);
  t.is(row.status, "failed");
  t.regex(row.error_message!, new RegExp(`larger than UPSTREAM_MAX_BODY \\(${MAX_BODY} bytes\\)`));
});

test("a huge upstream answer to GET /v1/models/:id is capped too", async (t) => {
  const res = await fetch(`${gw.url}/v1/models/fake-huge-body`, { headers: auth });
  await expectJsonError(res, 502, "upstream_response_too_large");
  await waitFor("the upstream models call to be aborted", () =>
    fake.calls.some((c) => c.path === "/v1/models/fake-huge-body" && c.aborted),
  );
  t.pass();
});

// ------------------------------------------------------------ 2. one event is capped

test("an endless upstream event: the stream ends with the gateway's error event, the upstream aborted, the row failed", async (t) => {
  const res = await post(gw, "/v1/chat/completions", { model: "fake-huge-event", messages, stream: true }, auth);
  t.is(res.status, 200);
  const id = res.headers.get("x-request-id")!;
  const text = await res.text();
  t.true(text.length < MAX_EVENT * 2, `the client got ${text.length} characters`);
  const events = text.split("\n\n").filter((e) => e.trim() !== "");
  const last = JSON.parse(events.at(-1)!.replace(/^data: /, ""));
  t.is(last.error.code, "upstream_event_too_large");
  t.is(last.error.type, "upstream_error");
  await waitFor("the upstream call to be aborted", () => callFor(id)?.aborted === true);
  t.true(callFor(id)!.bytesWritten < HUGE_TOTAL_BYTES / 2);
  const row = await rowOf(db, id);
  t.is(row.status, "failed");
  t.regex(row.error_message!, new RegExp(`larger than UPSTREAM_MAX_EVENT \\(${MAX_EVENT} bytes\\)`));
});

test("the official client raises the gateway's error event of a too large upstream event", async (t) => {
  const { data: stream, response } = await client(gw, secret)
    .chat.completions.create({ model: "fake-huge-event", messages, stream: true })
    .withResponse();
  const err = await t.throwsAsync(async () => {
    for await (const _ of stream);
  });
  t.regex(err.message, /too large/);
  t.is((await rowOf(db, response.headers.get("x-request-id")!)).status, "failed");
});

// ------------------------------------------------------------ 3. only JSON and event streams

for (const stream of [false, true]) {
  test(`an upstream answering text/html${stream ? " to a stream" : ""}: a 502 JSON error, never HTML; the row failed`, async (t) => {
    const res = await post(gw, "/v1/chat/completions", { model: "fake-html", messages, stream }, auth);
    const error = await expectJsonError(res, 502, "upstream_bad_content_type");
    t.regex(error.message, /text\/html/);
    const row = await rowOf(db, res.headers.get("x-request-id")!);
    t.is(row.status, "failed");
    t.regex(row.error_message!, /content type "text\/html; charset=utf-8"/);
  });
}

test("an upstream answer without a content type is not passed on", async (t) => {
  const res = await post(gw, "/v1/chat/completions", { model: "fake-no-type", messages }, auth);
  await expectJsonError(res, 502, "upstream_bad_content_type");
  t.is((await rowOf(db, res.headers.get("x-request-id")!)).status, "failed");
});

test("GET /v1/models/:id answered with text/html: a 502 JSON error", async (t) => {
  const res = await fetch(`${gw.url}/v1/models/fake-html`, { headers: auth });
  const error = await expectJsonError(res, 502, "upstream_bad_content_type");
  t.regex(error.message, /text\/html/);
});

test("JSON answers are passed on as JSON, and not to be sniffed", async (t) => {
  const res = await post(gw, "/v1/chat/completions", { model: "fake-ok", messages }, auth);
  t.is(res.status, 200);
  t.regex(res.headers.get("content-type")!, /^application\/json/);
  t.is(res.headers.get("x-content-type-options"), "nosniff");
  const model = await fetch(`${gw.url}/v1/models/fake-ok`, { headers: auth });
  t.is(model.status, 200);
  t.regex(model.headers.get("content-type")!, /^application\/json/);
  t.is((await model.json()).id, "fake-ok");
});

// ------------------------------------------------------------ 5. model ids in the path

/** A raw request, so the path reaches the gateway exactly as written (fetch would normalise dots). */
function rawGet(server: RunningServer, path: string): Promise<{ status: number; body: any }> {
  const { hostname, port } = new URL(server.url);
  return new Promise((resolve, reject) => {
    http
      .get({ hostname, port, path, headers: auth }, (res) => {
        let text = "";
        res.setEncoding("utf8");
        res.on("data", (c) => (text += c));
        res.on("end", () => resolve({ status: res.statusCode!, body: text ? JSON.parse(text) : null }));
      })
      .on("error", reject);
  });
}

// Serial (AVA runs serial tests before the others): no other test's upstream calls while it counts them.
test.serial("GET /v1/models/<not a model id>: a 400 before any upstream call (no reaching the upstream's root with its key)", async (t) => {
  const before = fake.calls.length;
  const bad = [
    "%2E%2E",
    "%2e%2E",
    "%2E",
    "..%2F..",
    "a%2F..%2Fb",
    "a%2F.%2Fb",
    "%2F",
    "a%2F%2Fb",
    "%2Fetc",
    "%2E%2E%2Fmodels",
    "..%5C..",
    "a%20b",
    "a%00b",
    "a%0Ab",
    "a%3Fb",
    "a%23b",
    "a%25b",
    "m".repeat(201),
  ];
  for (const path of bad) {
    const res = await rawGet(gw, `/v1/models/${path}`);
    t.is(res.status, 400, path);
    t.is(res.body?.error?.code, "invalid_model_id", path);
    t.is(res.body?.error?.param, "model", path);
  }
  await sleep(100);
  t.is(fake.calls.length, before, "no upstream call");
  t.false(fake.calls.some((c) => c.path === "/v1/" || c.path === "/" || c.path === "/v1"));
});

test("GET /v1/models/<model id>: ids with dots, colons, slashes, @ and + are sent upstream encoded", async (t) => {
  for (const id of ["gpt-4.1-mini", "org/model:v1@latest+x", "m".repeat(200), "a..b"]) {
    const res = await fetch(`${gw.url}/v1/models/${encodeURIComponent(id)}`, { headers: auth });
    t.is(res.status, 200, id);
    t.is((await res.json()).id, id);
    t.true(fake.calls.some((c) => c.path === `/v1/models/${encodeURIComponent(id)}`), id);
  }
});

test("the echo model refuses bad model ids the same way", async (t) => {
  const res = await rawGet(echo, "/v1/models/%2E%2E");
  t.is(res.status, 400);
  t.is(res.body.error.code, "invalid_model_id");
});

// ------------------------------------------------------------ 4. the echo model is bounded

test("echo: a prompt of commas is answered with at most ECHO_MAX_OUTPUT_TOKENS, finish_reason length (JSON)", async (t) => {
  const commas = ",".repeat(900_000);
  const res = await post(echo, "/v1/chat/completions", { model: "echo", messages: [{ role: "user", content: commas }] }, auth);
  t.is(res.status, 200);
  const body = await res.json();
  const content: string = body.choices[0].message.content;
  t.is(body.choices[0].finish_reason, "length");
  t.is(content, ",".repeat(ECHO_MAX_OUTPUT_TOKENS));
  t.is(body.usage.completion_tokens, ECHO_MAX_OUTPUT_TOKENS);
  t.is(body.usage.prompt_tokens, 900_000);
  const row = await rowOf(db, res.headers.get("x-request-id")!);
  t.deepEqual([row.status, row.output_tokens, row.input_tokens], ["completed", ECHO_MAX_OUTPUT_TOKENS, 900_000]);
});

test("echo: a streamed answer to a huge prompt stays small (bounded chunks, finish_reason length)", async (t) => {
  const commas = ",".repeat(900_000);
  const res = await post(echo, "/v1/chat/completions", { model: "echo", messages: [{ role: "user", content: commas }], stream: true, stream_options: { include_usage: true } }, auth);
  t.is(res.status, 200);
  const text = await res.text();
  t.true(text.length < 2 * 1024 * 1024, `stream of ${text.length} characters`);
  const chunks = text.split("\n\n").filter((e) => e.startsWith("data: {")).map((e) => JSON.parse(e.slice(6)));
  const content = chunks.map((c) => c.choices[0]?.delta?.content ?? "").join("");
  t.is(content.length, ECHO_MAX_OUTPUT_TOKENS);
  t.is(chunks.find((c) => c.choices[0]?.finish_reason)?.choices[0].finish_reason, "length");
  t.is(chunks.at(-1).usage.completion_tokens, ECHO_MAX_OUTPUT_TOKENS);
});

test("echo: long words are cut at ECHO_MAX_OUTPUT_CHARS; the Responses API says incomplete (max_output_tokens)", async (t) => {
  const words = Array.from({ length: 2000 }, (_, i) => `word${i}`.padEnd(60, "x")).join(" ");
  const { data } = await client(echo, secret).responses.create({ model: "echo", input: words }).withResponse();
  t.is(data.status, "incomplete");
  t.is(data.incomplete_details?.reason, "max_output_tokens");
  t.true(data.output_text.length <= ECHO_MAX_OUTPUT_CHARS);
  t.true(words.startsWith(data.output_text));
  t.is(data.usage?.output_tokens, countTokens(data.output_text));

  // Streamed: the same bounded text, in deltas.
  const stream = await client(echo, secret).responses.create({ model: "echo", input: words, stream: true });
  let text = "";
  let final: OpenAI.Responses.Response | undefined;
  for await (const ev of stream) {
    if (ev.type === "response.output_text.delta") text += ev.delta;
    if (ev.type === "response.incomplete") final = ev.response;
  }
  t.is(text, data.output_text);
  t.is(final?.incomplete_details?.reason, "max_output_tokens");
});

test("400k nested arrays (within BODY_LIMIT): a 400 json_too_deep, nothing served or recorded", async (t) => {
  const res = await post(echo, "/v1/chat/completions", `{"model":"echo","messages":${"[".repeat(400_000)}${"]".repeat(400_000)}}`, auth);
  await expectJsonError(res, 400, "json_too_deep");
  await sleep(200);
  const { rows } = await db.owner.query("select 1 from app_public.chat_completion_requests where request_id = $1", [res.headers.get("x-request-id")]);
  t.is(rows.length, 0);
});

test("echo: an ordinary answer still ends with finish_reason stop", async (t) => {
  const { data } = await client(echo, secret).chat.completions.create({ model: "echo", messages }).withResponse();
  t.is(data.choices[0]!.finish_reason, "stop");
  t.is(data.choices[0]!.message.content, "hi");
});

test("ECHO_MODEL=false without an upstream: a 503 naming the settings, nothing recorded", async (t) => {
  for (const path of ["/v1/chat/completions", "/v1/responses"]) {
    const res = await post(none, path, { model: "echo", messages, input: "hi" }, auth);
    const error = await expectJsonError(res, 503, "no_upstream");
    t.is(error.message, "no upstream configured: set UPSTREAM_BASE_URL, or ECHO_MODEL=true for the built-in echo model");
    const id = res.headers.get("x-request-id")!;
    await sleep(200);
    const { rows } = await db.owner.query("select 1 from app_public.chat_completion_requests where request_id = $1", [id]);
    t.is(rows.length, 0);
  }
  const models = await fetch(`${none.url}/v1/models`, { headers: auth });
  await expectJsonError(models, 503, "no_upstream");
  // Authentication still comes first.
  const anon = await post(none, "/v1/chat/completions", { model: "echo", messages });
  t.is(anon.status, 401);
});
