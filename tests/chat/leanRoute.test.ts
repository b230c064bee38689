// The lean route (server/chat/leanRoute.ts) serves plain JSON POSTs to
// /v1/chat/completions and /v1/responses ahead of Express: it must answer
// exactly as the Express route does. Two servers on one database, one with the
// lean route (the default) and one without, get the same requests; status,
// headers (but the date and the request ids) and bodies must be equal, and
// what the lean server serves is recorded and timed as before.
import http from "node:http";

import test from "ava";

import { leanRouteFor, parseJsonBody } from "../../server/chat/leanRoute.js";
import type { RunningServer } from "../../server/main.js";
import { createKey, createTestDb, createUser, type TestDb } from "../helpers/db.js";
import { rowOf } from "../helpers/chat.js";
import { startFakeUpstream, type FakeUpstream } from "../helpers/fakeUpstream.js";
import { waitFor } from "../helpers/poll.js";
import { ADMIN_TOKEN, startTestServer } from "../helpers/server.js";

const BODY_LIMIT = 4096;

let db: TestDb;
let fake: FakeUpstream;
let lean: RunningServer;
let express: RunningServer;
let secret: string;

test.before(async () => {
  db = await createTestDb();
  fake = await startFakeUpstream();
  const env = { UPSTREAM_BASE_URL: fake.url, ALLOW_ANONYMOUS: "false", BODY_LIMIT: `${BODY_LIMIT}b`, UPSTREAM_TIMEOUT_MS: "1000" };
  // One after the other: starting a server prepares the database.
  lean = await startTestServer(db, env);
  express = await startTestServer(db, env, { leanRoutes: false });
  secret = (await createKey(db, await createUser(db, "lean@example.com"))).secret;
});

test.after.always(async () => {
  await lean?.close();
  await express?.close();
  await fake?.close();
  await db?.drop();
});

interface Answer {
  status: number;
  headers: Record<string, string>;
  body: string;
}

/** Headers that differ between any two answers. */
const VARYING = new Set(["date", "x-request-id", "x-upstream-request-id", "etag"]);

function send(server: RunningServer, method: string, path: string, headers: Record<string, string>, body: Buffer | string | null): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const url = new URL(server.url);
    const req = http.request({ host: url.hostname, port: url.port, method, path, headers, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (c: Buffer) => chunks.push(c));
      res.on("end", () => {
        const kept: Record<string, string> = {};
        for (const [k, v] of Object.entries(res.headers)) if (!VARYING.has(k)) kept[k] = String(v);
        resolve({ status: res.statusCode!, headers: kept, body: Buffer.concat(chunks).toString("utf8") });
      });
    });
    req.on("error", reject);
    req.end(body ?? undefined);
  });
}

const json = (extra: Record<string, string> = {}) => ({ "content-type": "application/json", ...extra });
const auth = () => ({ authorization: `Bearer ${secret}` });
const chatBody = (model = "fake-ok") => JSON.stringify({ model, messages: [{ role: "user", content: "hi" }] });
const deep = (n: number) => "[".repeat(n) + "]".repeat(n);

interface Case {
  name: string;
  method?: string;
  path?: string;
  headers: () => Record<string, string>;
  body: Buffer | string | null;
  status: number;
  /** The error code expected in both answers, for error statuses. */
  code?: string;
  /** Bodies that carry ids or times (the upstream's answers): compared by their keys. */
  sameKeysOnly?: boolean;
}

const cases: Case[] = [
  { name: "served", headers: () => json(auth()), body: chatBody(), status: 200, sameKeysOnly: true },
  { name: "served, charset=utf-8", headers: () => json({ ...auth(), "content-type": "application/json; charset=utf-8" }), body: chatBody(), status: 200, sameKeysOnly: true },
  { name: "served, a UTF-8 BOM before the JSON", headers: () => json(auth()), body: Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(chatBody())]), status: 200, sameKeysOnly: true },
  { name: "responses served", path: "/v1/responses", headers: () => json(auth()), body: JSON.stringify({ model: "fake-ok", input: "hi" }), status: 200, sameKeysOnly: true },
  { name: "no credentials", headers: () => json(), body: chatBody(), status: 401, code: "missing_api_key" },
  { name: "an unknown key", headers: () => json({ authorization: "Bearer sk-not-a-key" }), body: chatBody(), status: 401, code: "invalid_api_key" },
  { name: "a malformed Authorization header", headers: () => json({ authorization: "Basic abc" }), body: chatBody(), status: 401, code: "invalid_api_key" },
  { name: "the admin token", headers: () => json({ authorization: `Bearer ${ADMIN_TOKEN}` }), body: chatBody(), status: 401, code: "invalid_api_key" },
  { name: "an unknown key and malformed JSON: 401 first", headers: () => json({ authorization: "Bearer sk-not-a-key" }), body: "{oops", status: 401, code: "invalid_api_key" },
  { name: "malformed JSON", headers: () => json(auth()), body: "{oops", status: 400, code: "invalid_json" },
  { name: "a JSON number (strict)", headers: () => json(auth()), body: " 5", status: 400, code: "invalid_json" },
  { name: "a JSON string (strict)", headers: () => json(auth()), body: '"hi"', status: 400, code: "invalid_json" },
  { name: "an empty body", headers: () => json(auth()), body: "", status: 400, code: "missing_required_parameter" },
  { name: "a BOM alone", headers: () => json(auth()), body: Buffer.from([0xef, 0xbb, 0xbf]), status: 400, code: "missing_required_parameter" },
  { name: "whitespace alone", headers: () => json(auth()), body: " \n", status: 400, code: "invalid_json" },
  { name: "an array", headers: () => json(auth()), body: "[1]", status: 400, code: "invalid_type" },
  { name: "nested too deep", headers: () => json(auth()), body: deep(401), status: 400, code: "json_too_deep" },
  { name: "invalid UTF-8", headers: () => json(auth()), body: Buffer.from([0x7b, 0x22, 0xff, 0x22, 0x3a, 0x31, 0x7d]), status: 400, code: "missing_required_parameter" },
  { name: "no messages", headers: () => json(auth()), body: JSON.stringify({ model: "fake-ok" }), status: 400, code: "missing_required_parameter" },
  { name: "a bad role", headers: () => json(auth()), body: JSON.stringify({ model: "fake-ok", messages: [{ role: "x", content: "hi" }] }), status: 400, code: "invalid_value" },
  { name: "too large (413, by Content-Length)", headers: () => json(auth()), body: "x".repeat(BODY_LIMIT + 1), status: 413, code: "body_too_large" },
  { name: "too large without a key: 401 first", headers: () => json(), body: "x".repeat(BODY_LIMIT + 1), status: 401, code: "missing_api_key" },
  { name: "exactly at the limit", headers: () => json(auth()), body: JSON.stringify({ model: "fake-ok", messages: [{ role: "user", content: "hi" }], pad: "" }).padEnd(BODY_LIMIT - 1, " ") + "\n", status: 200, sameKeysOnly: true },
  { name: "text/plain", headers: () => ({ ...auth(), "content-type": "text/plain" }), body: chatBody(), status: 400, code: "invalid_json" },
  { name: "no content type", headers: () => auth(), body: chatBody(), status: 400, code: "invalid_json" },
  { name: "an unsupported charset", headers: () => json({ ...auth(), "content-type": "application/json; charset=latin1" }), body: chatBody(), status: 415, code: "unsupported_encoding" },
  { name: "a query string", path: "/v1/chat/completions?x=1", headers: () => json(auth()), body: chatBody(), status: 200, sameKeysOnly: true },
  { name: "a trailing slash", path: "/v1/chat/completions/", headers: () => json(auth()), body: chatBody(), status: 200, sameKeysOnly: true },
  { name: "GET: not found", method: "GET", headers: () => auth(), body: null, status: 404, code: "not_found" },
  { name: "PUT: not found", method: "PUT", headers: () => json(auth()), body: chatBody(), status: 404, code: "not_found" },
  { name: "upstream 500: 502", headers: () => json(auth()), body: chatBody("fake-500"), status: 502, code: "upstream_error" },
  { name: "upstream 400: passed through", headers: () => json(auth()), body: chatBody("fake-400"), status: 400 },
  { name: "upstream 401: 502", headers: () => json(auth()), body: chatBody("fake-401"), status: 502, code: "upstream_auth_failed" },
  { name: "upstream HTML: 502", headers: () => json(auth()), body: chatBody("fake-html"), status: 502, code: "upstream_bad_content_type" },
  { name: "upstream hangs: 504", headers: () => json(auth()), body: chatBody("fake-hang"), status: 504, code: "upstream_timeout" },
];

const keysOf = (text: string) => Object.keys(JSON.parse(text) as object).sort();

for (const c of cases) {
  test(`the lean route answers as Express: ${c.name}`, async (t) => {
    const path = c.path ?? "/v1/chat/completions";
    const method = c.method ?? "POST";
    const [a, b] = await Promise.all([lean, express].map((s) => send(s, method, path, c.headers(), c.body)));
    t.is(a!.status, c.status, a!.body);
    t.is(b!.status, c.status, b!.body);
    t.deepEqual(a!.headers, b!.headers);
    if (c.sameKeysOnly) t.deepEqual(keysOf(a!.body), keysOf(b!.body));
    else t.is(a!.body, b!.body);
    if (c.code) t.is((JSON.parse(a!.body) as { error: { code: string } }).error.code, c.code);
  });
}

test("the lean route's etag on an error equals Express's (same body, same etag)", async (t) => {
  const headersOf = (s: RunningServer) =>
    new Promise<http.IncomingHttpHeaders>((resolve, reject) => {
      const url = new URL(s.url);
      const req = http.request({ host: url.hostname, port: url.port, method: "POST", path: "/v1/chat/completions", headers: json(auth()), agent: false }, (res) => {
        res.resume();
        res.on("end", () => resolve(res.headers));
      });
      req.on("error", reject);
      req.end("{oops");
    });
  const [a, b] = await Promise.all([headersOf(lean), headersOf(express)]);
  t.truthy(a.etag);
  t.is(a.etag, b.etag);
});

test("what the lean route serves is recorded once and timed in http_request_duration_seconds", async (t) => {
  const res = await send(lean, "POST", "/v1/chat/completions", json(auth()), chatBody());
  t.is(res.status, 200);
  // The id is a varying header: ask again, keeping it.
  const id = await new Promise<string>((resolve, reject) => {
    const url = new URL(lean.url);
    const req = http.request({ host: url.hostname, port: url.port, method: "POST", path: "/v1/chat/completions", headers: json(auth()), agent: false }, (r) => {
      r.resume();
      r.on("end", () => resolve(String(r.headers["x-request-id"])));
    });
    req.on("error", reject);
    req.end(chatBody());
  });
  const row = await rowOf(db, id);
  t.is(row.status, "completed");
  t.is(row.model, "fake-ok");
  const metrics = await (await fetch(`${lean.url}/metrics`)).text();
  t.regex(metrics, /http_request_duration_seconds_count\{method="POST",route="\/v1\/chat\/completions",status_code="200"\} [1-9]/);
});

test("leanRouteFor: only requests whose headers say Express would answer the same", (t) => {
  const limit = 100;
  const ok = { "content-type": "application/json", "content-length": "10" };
  const route = (method: string, url: string, headers: Record<string, string>) => leanRouteFor({ method, url, headers }, limit);
  t.is(route("POST", "/v1/chat/completions", ok), "chat");
  t.is(route("POST", "/v1/responses", ok), "responses");
  t.is(route("POST", "/v1/chat/completions", { ...ok, "content-type": "application/json; charset=utf-8" }), "chat");
  t.is(route("POST", "/v1/chat/completions", { ...ok, "content-type": "Application/JSON" }), "chat");
  t.is(route("POST", "/v1/chat/completions", { ...ok, "content-length": "100" }), "chat");
  for (const [why, method, url, headers] of [
    ["GET", "GET", "/v1/chat/completions", ok],
    ["query string", "POST", "/v1/chat/completions?a=1", ok],
    ["trailing slash", "POST", "/v1/chat/completions/", ok],
    ["other case", "POST", "/V1/chat/completions", ok],
    ["models", "POST", "/v1/models", ok],
    ["over the limit", "POST", "/v1/chat/completions", { ...ok, "content-length": "101" }],
    ["no length (chunked)", "POST", "/v1/chat/completions", { "content-type": "application/json", "transfer-encoding": "chunked" }],
    ["content-encoding", "POST", "/v1/chat/completions", { ...ok, "content-encoding": "gzip" }],
    ["identity encoding", "POST", "/v1/chat/completions", { ...ok, "content-encoding": "identity" }],
    ["another charset", "POST", "/v1/chat/completions", { ...ok, "content-type": "application/json; charset=latin1" }],
    ["a parameter", "POST", "/v1/chat/completions", { ...ok, "content-type": "application/json; x=1" }],
    ["a tab", "POST", "/v1/chat/completions", { ...ok, "content-type": "application/json;\tcharset=utf-8" }],
    ["text/plain", "POST", "/v1/chat/completions", { ...ok, "content-type": "text/plain" }],
    ["no content type", "POST", "/v1/chat/completions", { "content-length": "10" }],
  ] as const) {
    t.is(route(method, url, headers as Record<string, string>), null, why);
  }
});

test("parseJsonBody: body-parser's strict JSON", (t) => {
  const err = (text: string | Buffer) => t.throws(() => parseJsonBody(Buffer.from(text)))!;
  t.deepEqual(parseJsonBody(Buffer.from("")), {});
  t.deepEqual(parseJsonBody(Buffer.from("\ufeff{\"a\":1}")), { a: 1 });
  t.deepEqual(parseJsonBody(Buffer.from(" \r\n\t[1]")), [1]);
  t.is((err("1") as unknown as { code: string }).code, "invalid_json");
  t.is((err("{") as unknown as { code: string }).code, "invalid_json");
  t.is((err("null") as unknown as { code: string }).code, "invalid_json");
  t.is((err(deep(401)) as unknown as { code: string }).code, "json_too_deep");
  t.deepEqual(parseJsonBody(Buffer.from(deep(400))), JSON.parse(deep(400)));
});

test("a client that leaves half-way through its body: nothing recorded, timed as 499, the server keeps serving", async (t) => {
  const own = (await createKey(db, await createUser(db, "lean-abort@example.com"))).secret;
  const count499 = async () => {
    const text = await (await fetch(`${lean.url}/metrics`)).text();
    const m = /http_request_duration_seconds_count\{method="POST",route="\/v1\/chat\/completions",status_code="499"\} (\d+)/.exec(text);
    return m ? Number(m[1]) : 0;
  };
  const before = await count499();
  await new Promise<void>((resolve, reject) => {
    const url = new URL(lean.url);
    const req = http.request({
      host: url.hostname, port: url.port, method: "POST", path: "/v1/chat/completions", agent: false,
      headers: { "content-type": "application/json", "content-length": "1000", authorization: `Bearer ${own}` },
    });
    req.on("error", () => resolve());
    req.on("response", () => reject(new Error("answered a request whose body never came")));
    req.write(chatBody().slice(0, 20));
    setTimeout(() => {
      req.destroy();
      resolve();
    }, 300);
  });
  await waitFor("the 499 to be timed", async () => (await count499()) === before + 1);
  const res = await send(lean, "POST", "/v1/chat/completions", json({ authorization: `Bearer ${own}` }), chatBody());
  t.is(res.status, 200);
  const rowsOfKey = async () =>
    (await db.owner.query<{ n: number }>(
      "select count(*)::int as n from app_public.chat_completion_requests r join app_public.api_keys k on k.id = r.api_key_id join app_public.users u on u.id = k.user_id where u.email = 'lean-abort@example.com'",
    )).rows[0]!.n;
  // The served request's row comes after its answer; the abandoned one never does.
  await waitFor("the served request's row", async () => (await rowsOfKey()) >= 1);
  await new Promise((r) => setTimeout(r, 300));
  t.is(await rowsOfKey(), 1);
});
