// GraphQL as admins and strangers see it: admins manage users and keys (the
// secret is shown once), nobody without credentials reads anything private,
// and a wrong token is refused.
import test from "ava";
import { readFile } from "node:fs/promises";
import path from "node:path";
import type { RunningServer } from "../../server/main.js";
import { fetchSdl } from "../../server/graphql/sdl.js";
import { projectRoot } from "../../server/db/projectRoot.js";
import { createTestDb, type TestDb } from "../helpers/db.js";
import { ADMIN_TOKEN, graphql, startTestServer } from "../helpers/server.js";
import { waitFor } from "../helpers/poll.js";

let db: TestDb;
let server: RunningServer;

test.before(async () => {
  db = await createTestDb();
  // Cached key answers never expire here: a revoked key is refused only because its NOTIFY reached the cache.
  server = await startTestServer(db, { AUTH_CACHE_TTL_MS: "600000" });
});
test.after.always(async () => {
  await server?.close();
  await db?.drop();
});

const CREATE_USER = `mutation ($email: String!, $role: String) {
  createUser(input: { user: { email: $email, role: $role } }) { user { id rowId email role } } }`;
const CREATE_KEY = `mutation ($userId: UUID!, $name: String) {
  createApiKey(input: { userId: $userId, name: $name }) { result { apiKeyId userId name prefix environment secret } } }`;

async function adminCreateUser(email: string, role = "user") {
  const r = await graphql(server, CREATE_USER, { email, role }, ADMIN_TOKEN);
  if (r.body.errors) throw new Error(JSON.stringify(r.body.errors));
  return r.body.data!.createUser.user as { id: string; rowId: string };
}

test("an admin creates a user and a key, and sees the secret once", async (t) => {
  const user = await adminCreateUser("carol@example.com");
  const created = await graphql(server, CREATE_KEY, { userId: user.rowId, name: "laptop" }, ADMIN_TOKEN);
  t.is(created.status, 200);
  t.falsy(created.body.errors);
  const key = created.body.data!.createApiKey.result;
  t.regex(key.secret, /^kt_live_[0-9a-f]{64}$/);
  t.like(key, { userId: user.rowId, name: "laptop", environment: "live", prefix: key.secret.slice(0, 12) });

  // Listing keys shows the prefix, never the secret: the type has no such field.
  const listed = await graphql(server, `{ allApiKeys { nodes { rowId name prefix last4 revokedAt } } }`, {}, ADMIN_TOKEN);
  const node = listed.body.data!.allApiKeys.nodes.find((n: { rowId: string }) => n.rowId === key.apiKeyId);
  t.like(node, { name: "laptop", prefix: key.secret.slice(0, 12), last4: key.secret.slice(-4), revokedAt: null });
  const secretField = await graphql(server, `{ allApiKeys { nodes { secret } } }`, {}, ADMIN_TOKEN);
  t.is(secretField.status, 400);
  t.truthy(secretField.body.errors);

  // The key works, as the user: it authenticates GraphQL and sees only its own keys.
  const asUser = await graphql(server, `{ allApiKeys { nodes { rowId } } allUsers { nodes { rowId } } }`, {}, key.secret);
  t.is(asUser.status, 200);
  t.deepEqual(asUser.body.data!.allApiKeys.nodes, [{ rowId: key.apiKeyId }]);
  t.deepEqual(asUser.body.data!.allUsers.nodes, [{ rowId: user.rowId }]);

  // Revoked through GraphQL: the row stays, the key stops working as soon as the revocation's
  // NOTIFY reaches the key cache (asynchronous, milliseconds after the commit: seen to lose the
  // race with the very next request once in CI), without waiting for AUTH_CACHE_TTL_MS.
  const revoked = await graphql(server, `mutation ($id: UUID!) { revokeApiKey(input: { apiKeyId: $id }) { result { rowId revokedAt } } }`,
    { id: key.apiKeyId }, ADMIN_TOKEN);
  t.falsy(revoked.body.errors);
  t.truthy(revoked.body.data!.revokeApiKey.result.revokedAt);
  const after = await waitFor("the revoked key to be refused", async () => {
    const r = await graphql(server, `{ allApiKeys { totalCount } }`, {}, key.secret);
    return r.status === 401 && r;
  }, { intervalMs: 5 });
  t.is(after.status, 401);
  t.is(after.body.errors?.[0]?.extensions?.code, "UNAUTHENTICATED");
});

test("an admin lists users, keys and requests", async (t) => {
  const user = await adminCreateUser("dave@example.com");
  const key = (await graphql(server, CREATE_KEY, { userId: user.rowId }, ADMIN_TOKEN)).body.data!.createApiKey.result;
  await db.owner.query(
    "insert into app_public.chat_completion_requests (request_id, api_key_hash, model, input_tokens) values ('gql-1', app_public.api_key_hash($1), 'gpt-4o', 12)",
    [key.secret],
  );
  const r = await graphql(server, `{
    allUsers(condition: { rowId: "${user.rowId}" }) { nodes { rowId email } }
    allApiKeys(condition: { userId: "${user.rowId}" }) { totalCount }
    allChatCompletionRequests(condition: { requestId: "gql-1" }) {
      nodes { requestId model inputTokens isAnonymous attributionStatus apiKeyId userId }
    }
  }`, {}, ADMIN_TOKEN);
  t.falsy(r.body.errors);
  t.deepEqual(r.body.data!.allUsers.nodes, [{ rowId: user.rowId, email: "dave@example.com" }]);
  t.is(r.body.data!.allApiKeys.totalCount, 1);
  t.deepEqual(r.body.data!.allChatCompletionRequests.nodes, [{
    requestId: "gql-1", model: "gpt-4o", inputTokens: 12, isAnonymous: false,
    attributionStatus: "resolved", apiKeyId: key.apiKeyId, userId: user.rowId,
  }]);
});

test("without credentials nothing private can be read or changed", async (t) => {
  await adminCreateUser("erin@example.com");
  for (const query of [
    `{ allUsers { nodes { email } } }`,
    `{ allApiKeys { nodes { prefix } } }`,
    `{ allChatCompletionRequests { nodes { requestId } } }`,
    `{ allApiKeyTrackingQualities { nodes { totalRequests } } }`,
  ]) {
    const r = await graphql(server, query);
    t.falsy(r.body.data && Object.values(r.body.data).some((v) => v !== null), query);
    t.is(r.body.errors?.[0]?.extensions?.code, "42501", query);
  }
  const mutation = await graphql(server, `mutation { createUser(input: { user: { email: "mallory@example.com" } }) { user { rowId } } }`);
  t.is(mutation.body.errors?.[0]?.extensions?.code, "42501");
  const { rows } = await db.owner.query("select count(*)::int as n from app_public.users where email = 'mallory@example.com'");
  t.is(rows[0].n, 0);
});

test("a wrong admin token, an unknown key or a malformed header is refused with 401", async (t) => {
  for (const header of [`Bearer ${ADMIN_TOKEN}x`, "Bearer kt_live_0000", "Basic abc", "Bearer"]) {
    const res = await fetch(`${server.url}/graphql`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: header },
      body: JSON.stringify({ query: "{ allUsers { totalCount } }" }),
    });
    t.is(res.status, 401, header);
    const body = await res.json();
    t.is(body.errors[0].extensions.code, "UNAUTHENTICATED", header);
  }
});

test("errors from SQL reach the client with their SQLSTATE, and store nothing", async (t) => {
  const bad = await graphql(server, CREATE_USER, { email: "not-an-email" }, ADMIN_TOKEN);
  t.is(bad.body.errors?.[0]?.extensions?.code, "23514");
  const dup = await adminCreateUser("frank@example.com").then(() => graphql(server, CREATE_USER, { email: "FRANK@example.com" }, ADMIN_TOKEN));
  t.is(dup.body.errors?.[0]?.extensions?.code, "23505");
});

test("the committed SDL (server/graphql/schema.graphql) matches the running schema", async (t) => {
  const committed = await readFile(path.join(projectRoot, "server/graphql/schema.graphql"), "utf8");
  t.is(await fetchSdl(server.url, ADMIN_TOKEN), committed, "run `npm run graphql:sdl` and commit the result");
});

test("GET /health checks the database", async (t) => {
  const res = await fetch(`${server.url}/health`);
  t.is(res.status, 200);
  t.deepEqual(await res.json(), { status: "ok", database: "ok" });
});
