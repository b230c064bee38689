// Hostile and broken input across every route (chat, responses, models,
// monitoring, GraphQL, metrics, the HTTP layer itself): each case is answered
// with a 4xx and a JSON error body, never a 5xx or a stack trace; the service
// stays up and no row is stored for any of them.
import net from "node:net";

import test from "ava";

import type { RunningServer } from "../../server/main.js";
import { createKey, createTestDb, createUser, type TestDb } from "../helpers/db.js";
import { ADMIN_TOKEN, startTestServer } from "../helpers/server.js";

interface Case {
  name: string;
  method?: string;
  path: string;
  headers?: Record<string, string>;
  body?: string;
  /** The expected status, when one is certain; otherwise any 4xx. */
  status?: number;
}

const METRICS_TOKEN = "metrics-token-0123456789abcdef0123456789";
let db: TestDb;
let server: RunningServer;
let key: string;
let userKey: string;

test.before(async () => {
  db = await createTestDb();
  server = await startTestServer(db, { METRICS_TOKEN, BODY_LIMIT: "64kb", ECHO_MODEL: "true" });
  const admin = await createUser(db, "hostile-admin@example.com", "admin");
  key = (await createKey(db, admin, "hostile")).secret;
  userKey = (await createKey(db, await createUser(db, "hostile-user@example.com"), "user")).secret;
});
test.after.always(async () => {
  await server?.close();
  await db?.drop();
});

const json = { "content-type": "application/json" };
const auth = () => ({ ...json, authorization: `Bearer ${key}` });
const messages = [{ role: "user", content: "hi" }];

function cases(): Case[] {
  const out: Case[] = [];
  const chatPaths = ["/v1/chat/completions", "/v1/responses"];

  // Malformed JSON, on both POST endpoints.
  const malformed = ["{", "[", "nul", "{\"model\":}", "{\"model\": \"echo\",}", "{'model': 'echo'}", "{\"a\":1}{\"b\":2}",
    "\"just a string\"", "42", "true", "null", "[]", "[1,2,3]", "{\"model\": \"echo\", \"messages\": [}", "\u0000", "{\"model\": \"e\\x\"}",
    "{\"model\": \"\\ud800\"", " ", "\ufeff{}", "{\"model\": NaN}"];
  for (const path of chatPaths) {
    for (const [i, body] of malformed.entries()) out.push({ name: `${path} malformed JSON #${i}`, method: "POST", path, headers: auth(), body });
  }

  // The model: wrong types, empty, too long, control characters.
  const badModels: unknown[] = [null, 1, 1.5, true, [], ["echo"], {}, { id: "echo" }, "", " ".repeat(3), "x".repeat(300)];
  for (let c = 0; c <= 0x1f; c++) badModels.push(`gpt-4o${String.fromCharCode(c)}x`);
  badModels.push("gpt\u007f");
  for (const [i, model] of badModels.entries()) {
    out.push({ name: `chat model #${i} (${JSON.stringify(model)?.slice(0, 20)})`, method: "POST", path: "/v1/chat/completions", headers: auth(), body: JSON.stringify({ model, messages }) });
  }
  for (const [i, model] of badModels.slice(0, 12).entries()) {
    out.push({ name: `responses model #${i}`, method: "POST", path: "/v1/responses", headers: auth(), body: JSON.stringify({ model, input: "hi" }) });
  }

  // Messages and other parameters of the wrong shape.
  const badMessages: unknown[] = [undefined, null, "hi", 1, {}, [], [null], [1], ["hi"], [{}], [{ role: 1, content: "x" }], [{ role: "user" }],
    [{ role: "user", content: 5 }], [{ role: "alien", content: "x" }], [{ content: "x" }], [{ role: "user", content: [{ type: 5 }] }],
    [{ role: "user", content: {} }], [{ role: null, content: "x" }]];
  for (const [i, m] of badMessages.entries()) {
    out.push({ name: `chat messages #${i}`, method: "POST", path: "/v1/chat/completions", headers: auth(), body: JSON.stringify({ model: "echo", messages: m }) });
  }
  const badParams: Array<Record<string, unknown>> = [{ stream: "yes" }, { stream: 1 }, { stream: {} }, { stream_options: "x", stream: true }];
  for (const [i, p] of badParams.entries()) {
    out.push({ name: `chat params #${i}`, method: "POST", path: "/v1/chat/completions", headers: auth(), body: JSON.stringify({ model: "echo", messages, ...p }) });
  }
  const badInputs: unknown[] = [undefined, null, 1, {}, [1], [{}], true];
  for (const [i, input] of badInputs.entries()) {
    out.push({ name: `responses input #${i}`, method: "POST", path: "/v1/responses", headers: auth(), body: JSON.stringify({ model: "echo", input }) });
  }

  // Deep nesting and big bodies.
  for (const depth of [401, 1000, 10_000, 30_000]) {
    const body = `{"model":"echo","messages":${"[".repeat(depth)}${"]".repeat(depth)}}`;
    out.push({ name: `chat nested ${depth} deep`, method: "POST", path: "/v1/chat/completions", headers: auth(), body });
    out.push({ name: `graphql nested ${depth} deep`, method: "POST", path: "/graphql", headers: auth(), body: `{"query":"{ __typename }","variables":{"a":${"[".repeat(depth)}${"]".repeat(depth)}}}` });
  }
  out.push({ name: "chat body over BODY_LIMIT", method: "POST", path: "/v1/chat/completions", headers: auth(), body: JSON.stringify({ model: "echo", messages: [{ role: "user", content: "x".repeat(100_000) }] }), status: 413 });
  out.push({ name: "chat body of commas", method: "POST", path: "/v1/chat/completions", headers: auth(), body: ",".repeat(60_000) });

  // Content types.
  for (const type of ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml", ""]) {
    out.push({ name: `chat content-type "${type}"`, method: "POST", path: "/v1/chat/completions", headers: { authorization: `Bearer ${key}`, "content-type": type }, body: JSON.stringify({ model: "echo", messages }) });
  }
  out.push({ name: "chat charset unsupported", method: "POST", path: "/v1/chat/completions", headers: { authorization: `Bearer ${key}`, "content-type": "application/json; charset=ebcdic" }, body: "{}" });

  // Credentials.
  const badAuth = ["", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "bearer  two tokens", `Bearer ${"k".repeat(4000)}`, "Bearer kt_live_" + "0".repeat(64),
    "Bearer dev_local_x_local_development", `Bearer ${ADMIN_TOKEN}x`, "Token abc", "Bearer ' or 1=1 --", "Bearer %00"];
  for (const [i, a] of badAuth.entries()) {
    for (const path of chatPaths) {
      out.push({ name: `${path} credentials #${i}`, method: "POST", path, headers: { ...json, ...(a ? { authorization: a } : {}) }, body: JSON.stringify({ model: "echo", messages, input: "hi" }) });
    }
    out.push({ name: `models credentials #${i}`, path: "/v1/models", headers: a ? { authorization: a } : {} });
  }
  // The admin token is not an API key for the gateway.
  out.push({ name: "chat with the admin token", method: "POST", path: "/v1/chat/completions", headers: { ...json, authorization: `Bearer ${ADMIN_TOKEN}` }, body: JSON.stringify({ model: "echo", messages }), status: 401 });

  // Model ids and path tricks.
  // (fetch resolves "%2E"-style dot segments itself; tests/chat/hostile.test.ts sends those raw.)
  const badIds = ["..%2F..", "a%00b", "x".repeat(300), "%2F", "a%2F..%2F..%2Fadmin", "%E2%80%AE", "a%0Ab", "..%5C..", "%252E%252E"];
  for (const id of badIds) out.push({ name: `models/${id.slice(0, 20)}`, path: `/v1/models/${id}`, headers: { authorization: `Bearer ${key}` } });
  const badPaths = ["/v1/chat/completions/..%2F..%2Fadmin", "/%2e%2e/%2e%2e/etc/passwd",
    "/v1/chat/completions%00", "/v1/chat", "/v2/chat/completions", "/admin", "/admin/monitoring/", "/admin/monitoring/nothing",
    "/.env", "/v1/models/echo/extra", "/favicon.ico", "/index.php"];
  for (const path of badPaths) out.push({ name: `path ${path}`, path, headers: { authorization: `Bearer ${key}` } });
  for (const path of ["/v1/chat/completions", "/v1/responses"]) {
    for (const method of ["GET", "PUT", "DELETE", "PATCH"]) out.push({ name: `${method} ${path}`, method, path, headers: auth() });
  }

  // Monitoring parameters and access.
  for (const report of ["api-key-tracking-quality?hours=", "api-key-tracking-trend?days="]) {
    for (const value of ["abc", "0", "-1", "1.5", "1e2", "", "%00", "99999999999999999999", "0x10", "1%20", "NaN", "Infinity", "169&x=1", "31"]) {
      if (report.includes("quality") && value === "31") continue;
      out.push({ name: `monitoring ${report}${value}`, path: `/admin/monitoring/${report}${value}`, headers: { authorization: `Bearer ${key}` } });
    }
    const param = report.includes("quality") ? "hours" : "days";
    out.push({ name: `monitoring ${param} twice`, path: `/admin/monitoring/${report}1&${param}=2`, headers: { authorization: `Bearer ${key}` } });
    out.push({ name: `monitoring misspelt ${param}`, path: `/admin/monitoring/${report.replace(`${param}=`, `${param.slice(0, -1)}=`)}1`, headers: { authorization: `Bearer ${key}` }, status: 422 });
    out.push({ name: `monitoring ${param}[]`, path: `/admin/monitoring/${report.replace(`${param}=`, `${param}[]=`)}1`, headers: { authorization: `Bearer ${key}` } });
    out.push({ name: `monitoring ${param} without credentials`, path: `/admin/monitoring/${report}1`, status: 401 });
    out.push({ name: `monitoring ${param} as a user`, path: `/admin/monitoring/${report}1`, headers: { authorization: `Bearer ${userKey}` }, status: 403 });
  }

  // GraphQL.
  const gql = (body: string, headers: Record<string, string> = auth()) => ({ method: "POST", path: "/graphql", headers: { ...headers, accept: "application/graphql-response+json" }, body });
  const badQueries = ["{", "{ nope }", "query { allUsers { nodes { nope } } }", "mutation { nope }", "{ allUsers(first: \"x\") { totalCount } }",
    "{ allUsers(first: -1) { totalCount } }", "subscription { x }", "fragment F on Query { ...F } { ...F }", "{ allUsers { totalCount } } { allApiKeys { totalCount } }",
    "query Q { allUsers { totalCount } } query Q { allUsers { totalCount } }", "{ allUsers(first: 100000000) { nodes { id } } }"];
  for (const [i, q] of badQueries.entries()) out.push({ name: `graphql query #${i}`, ...gql(JSON.stringify({ query: q })) });
  const badBodies = ["{}", "{\"query\": 5}", "{\"query\": null}", "{\"query\": \"{ __typename }\", \"variables\": 5}", "{\"query\": \"{ __typename }\", \"operationName\": 5}", "[]", "nope"];
  for (const [i, b] of badBodies.entries()) out.push({ name: `graphql body #${i}`, ...gql(b) });
  out.push({ name: "graphql wrong token", ...gql(JSON.stringify({ query: "{ __typename }" }), { ...json, authorization: "Bearer wrong" }), status: 401 });
  out.push({ name: "graphql malformed header", ...gql(JSON.stringify({ query: "{ __typename }" }), { ...json, authorization: "Basic x" }), status: 401 });
  out.push({ name: "graphql aliases fan-out", ...gql(JSON.stringify({ query: `{ ${Array.from({ length: 300 }, (_, i) => `a${i}: allChatCompletionRequests { totalCount }`).join(" ")} }` })) });
  out.push({ name: "graphql depth", ...gql(JSON.stringify({ query: "{ allUsers { nodes { apiKeysByUserId { nodes { userByUserId { apiKeysByUserId { nodes { userByUserId { apiKeysByUserId { nodes { userByUserId { id } } } } } } } } } } } }" })) });

  // Metrics.
  out.push({ name: "metrics without its token", path: "/metrics", status: 401 });
  out.push({ name: "metrics with a wrong token", path: "/metrics", headers: { authorization: `Bearer ${METRICS_TOKEN}x` }, status: 401 });
  out.push({ name: "metrics with an API key", path: "/metrics", headers: { authorization: `Bearer ${key}` }, status: 401 });
  out.push({ name: "metrics malformed header", path: "/metrics", headers: { authorization: "Bearer a b" }, status: 401 });
  out.push({ name: "POST /metrics", method: "POST", path: "/metrics", headers: { authorization: `Bearer ${METRICS_TOKEN}` }, body: "{}" });
  return out;
}

async function send(c: Case): Promise<{ status: number; text: string; type: string | null }> {
  const res = await fetch(server.url + c.path, { method: c.method ?? "GET", headers: c.headers, body: c.body });
  return { status: res.status, text: await res.text(), type: res.headers.get("content-type") };
}

/** What is wrong with an answer to a hostile request (nothing, for a 4xx with a JSON error and no internals). */
function problems(name: string, r: { status: number; text: string; type: string | null }, status?: number): string[] {
  const found: string[] = [];
  if (!(r.status >= 400 && r.status < 500)) found.push(`${name}: status ${r.status} ${r.text.slice(0, 120)}`);
  if (status !== undefined && r.status !== status) found.push(`${name}: status ${r.status}, expected ${status}`);
  if (!/json/.test(r.type ?? "")) found.push(`${name}: content-type ${r.type}`);
  let body: { error?: { message?: unknown }; errors?: unknown[] } | undefined;
  try {
    body = JSON.parse(r.text);
  } catch {
    found.push(`${name}: not JSON: ${r.text.slice(0, 120)}`);
  }
  if (body && !(typeof body.error?.message === "string" || Array.isArray(body.errors))) found.push(`${name}: not an error body: ${r.text.slice(0, 120)}`);
  if (/\bat [\w.<>]+ \(|node:internal|"stack"/.test(r.text)) found.push(`${name}: a stack trace`);
  return found;
}

const rowCount = async () => Number((await db.owner.query("select count(*) from app_public.chat_completion_requests")).rows[0].count);

test.serial("at least 250 hostile requests: each a 4xx with a JSON error, no 5xx, no stack trace, nothing stored", async (t) => {
  const all = cases();
  t.true(all.length >= 250, `${all.length} cases`);
  const before = await rowCount();
  const found: string[] = [];
  for (const c of all) found.push(...problems(c.name, await send(c), c.status));
  t.deepEqual(found, []);
  t.is(await rowCount(), before, "no hostile request left a row");
  t.is((await fetch(`${server.url}/health`)).status, 200, "the service is alive");
});

/** Sends raw bytes and returns the raw answer (for what fetch refuses to send). */
function raw(payload: string | Buffer): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(Number(new URL(server.url).port), "127.0.0.1");
    let answer = "";
    socket.on("data", (d) => (answer += d.toString("latin1")));
    socket.on("end", () => resolve(answer));
    socket.on("close", () => resolve(answer));
    socket.on("error", reject);
    socket.end(payload);
  });
}

function parseRaw(answer: string): { status: number; text: string; type: string | null } {
  const [head = "", ...rest] = answer.split("\r\n\r\n");
  const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(head)?.[1] ?? 0);
  const type = /\r\ncontent-type: ([^\r]+)/i.exec(head)?.[1] ?? null;
  return { status, text: rest.join("\r\n\r\n"), type };
}

test.serial("what Node's HTTP parser refuses is answered in JSON too: huge headers (431), malformed requests (400)", async (t) => {
  const found: string[] = [];
  const huge = `GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ${"a".repeat(100_000)}\r\n\r\n`;
  found.push(...problems("huge header", parseRaw(await raw(huge)), 431));
  const many = `GET /health HTTP/1.1\r\nHost: x\r\n${Array.from({ length: 3000 }, (_, i) => `X-H${i}: v`).join("\r\n")}\r\n\r\n`;
  found.push(...problems("many headers", parseRaw(await raw(many)), 431));
  found.push(...problems("garbage request line", parseRaw(await raw("NOT HTTP AT ALL\r\n\r\n")), 400));
  found.push(...problems("bad header name", parseRaw(await raw("GET /health HTTP/1.1\r\nHost: x\r\nBad Header: v\r\n\r\n")), 400));
  found.push(...problems("NUL in a header", parseRaw(await raw("GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\u0000b\r\n\r\n")), 400));
  found.push(...problems("bad content-length", parseRaw(await raw("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")), 400));
  found.push(...problems("two content-lengths", parseRaw(await raw("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}")), 400));
  t.deepEqual(found, []);
  t.is((await fetch(`${server.url}/health`)).status, 200, "the service is alive");
});
