// What one GraphQL request may cost the service, proven by refusals and by the
// SQL a request runs (never by timing): connections get a default and a
// maximum page size, every request an estimated cost, depth and field limit
// checked before anything runs (fragments and variables included),
// introspection is for admins unless GRAPHIQL is on, and every request's
// statements run under statement_timeout.
import test from "ava";
import pg from "pg";
import { postgraphile, type PostGraphileInstance } from "postgraphile";
import { makePgService } from "postgraphile/adaptors/pg";
import { grafast } from "postgraphile/grafast";
import {
  getIntrospectionQuery,
  getNamedType,
  isLeafType,
  isObjectType,
  parse,
  type GraphQLSchema,
  type OperationDefinitionNode,
} from "postgraphile/graphql";

import { loadConfig } from "../../server/config.js";
import type { AppContext } from "../../server/context.js";
import { analyzeOperation, limitErrors, MAX_FIELDS, SCAN_PAGES, type GraphQLLimits } from "../../server/graphql/limits.js";
import { pgSettingsFor } from "../../server/middleware/installGraphQLAuth.js";
import { makePreset } from "../../server/middleware/installPostGraphile.js";
import type { RunningServer } from "../../server/main.js";
import { createKey, createTestDb, createUser, type TestDb } from "../helpers/db.js";
import { ADMIN_TOKEN, graphql, startTestServer } from "../helpers/server.js";

let db: TestDb;
/** Small limits (page 10 by default, 50 at most, cost 5000); GraphiQL off, as in production. */
let server: RunningServer;
/** GRAPHIQL=true and a 500 ms statement_timeout. */
let open: RunningServer;
/** The same preset in-process, with grafast's explain on: shows the SQL a request runs. */
let pgl: PostGraphileInstance;
let releasePgService: () => Promise<void>;
let schema: GraphQLSchema;
let userId: string;
let userKey: string;
let keyId: string;

const ROWS = 60;
const SMALL = { GRAPHQL_DEFAULT_PAGE_SIZE: "10", GRAPHQL_MAX_PAGE_SIZE: "50", GRAPHQL_MAX_COST: "5000" };

test.before(async () => {
  db = await createTestDb();
  const user = await createUser(db, "limits@example.com");
  userId = user;
  const key = await createKey(db, user);
  userKey = key.secret;
  keyId = key.id;
  await db.owner.query(
    `insert into app_public.chat_completion_requests (request_id, api_key_hash, model)
     select 'lim-' || i, app_public.api_key_hash($1), 'gpt-4o' from generate_series(1, ${ROWS}) i`,
    [userKey],
  );
  server = await startTestServer(db, SMALL);
  open = await startTestServer(db, { GRAPHIQL: "true", GRAPHQL_STATEMENT_TIMEOUT_MS: "500" });

  const pgService = makePgService({
    connectionString: db.authUrl,
    superuserConnectionString: db.ownerUrl,
    schemas: ["app_public"],
    pgSettingsForIntrospection: { role: "keytrack_admin" },
  });
  releasePgService = async () => {
    await pgService.release?.();
  };
  pgl = postgraphile({ extends: [makePreset({ config: server.config } as AppContext, pgService)], grafast: { explain: ["sql"] } });
  schema = await pgl.getSchema();
});
test.after.always(async () => {
  await server?.close();
  await open?.close();
  await pgl?.release();
  await releasePgService?.();
  await db?.drop();
});

interface Explained {
  data?: Record<string, any> | null;
  errors?: ReadonlyArray<{ message: string; extensions?: Record<string, unknown>; originalError?: { extensions?: Record<string, unknown> } }>;
  sql: string[];
}

/** Runs a query in-process as an admin, as the service would, and returns its result and the SQL it ran. */
async function explain(source: string, variableValues: Record<string, unknown> = {}): Promise<Explained> {
  const result = (await grafast({
    schema,
    source,
    variableValues,
    resolvedPreset: pgl.getResolvedPreset(),
    // The context callback reads the settings installGraphQLAuth stashes on the request.
    requestContext: { expressv4: { req: { pgSettings: pgSettingsFor({ kind: "admin_token" }, 10_000) } } } as never,
  })) as Explained & { extensions?: { explain?: { operations: Array<{ type: string; query: string }> } } };
  const sql = (result.extensions?.explain?.operations ?? []).filter((o) => o.type === "sql").map((o) => o.query);
  return { data: result.data, errors: result.errors, sql };
}

const codeOf = (r: { body: { errors?: Array<{ extensions?: { code?: string } }> } }) => r.body.errors?.[0]?.extensions?.code;
const valueOf = (r: { body: { errors?: Array<{ extensions?: Record<string, unknown> }> } }) => r.body.errors?.[0]?.extensions?.value;

// 1. Page sizes ------------------------------------------------------------------------------------

test("a connection without first/last returns the default page, and says there is more", async (t) => {
  for (const token of [ADMIN_TOKEN, userKey]) {
    const r = await graphql(server, `{ allChatCompletionRequests { nodes { requestId } pageInfo { hasNextPage } totalCount } }`, {}, token);
    t.is(r.status, 200);
    t.is(r.body.data!.allChatCompletionRequests.nodes.length, 10);
    t.true(r.body.data!.allChatCompletionRequests.pageInfo.hasNextPage);
    t.is(r.body.data!.allChatCompletionRequests.totalCount, ROWS);
  }
  // Nested connections too, and first given as null (literal or variable) or a variable left out.
  const nested = await graphql(server, `{ allUsers(condition: { rowId: "${userId}" }) { nodes { chatCompletionRequestsByUserId { nodes { requestId } pageInfo { hasNextPage } } } } }`, {}, ADMIN_TOKEN);
  const inner = nested.body.data!.allUsers.nodes[0].chatCompletionRequestsByUserId;
  t.is(inner.nodes.length, 10);
  t.true(inner.pageInfo.hasNextPage);
  t.is((await graphql(server, `{ allChatCompletionRequests(first: null) { nodes { rowId } } }`, {}, ADMIN_TOKEN)).body.data!.allChatCompletionRequests.nodes.length, 10);
  const byVariable = `query ($n: Int) { allChatCompletionRequests(first: $n) { nodes { rowId } } }`;
  t.is((await graphql(server, byVariable, {}, ADMIN_TOKEN)).body.data!.allChatCompletionRequests.nodes.length, 10);
  t.is((await graphql(server, byVariable, { n: null }, ADMIN_TOKEN)).body.data!.allChatCompletionRequests.nodes.length, 10);
  t.is((await graphql(server, byVariable, { n: 3 }, ADMIN_TOKEN)).body.data!.allChatCompletionRequests.nodes.length, 3);

  // Up to the maximum, and last, work as asked.
  const max = await graphql(server, `{ allChatCompletionRequests(first: 50) { nodes { rowId } pageInfo { hasNextPage } } }`, {}, ADMIN_TOKEN);
  t.is(max.body.data!.allChatCompletionRequests.nodes.length, 50);
  t.true(max.body.data!.allChatCompletionRequests.pageInfo.hasNextPage);
  const last = await graphql(server, `{ allChatCompletionRequests(last: 5) { nodes { requestId } pageInfo { hasPreviousPage } } }`, {}, ADMIN_TOKEN);
  t.deepEqual(last.body.data!.allChatCompletionRequests.nodes.map((n: { requestId: string }) => n.requestId), ["lim-56", "lim-57", "lim-58", "lim-59", "lim-60"]);
  t.true(last.body.data!.allChatCompletionRequests.pageInfo.hasPreviousPage);
});

test("the SQL of a connection without first/last is limited to the default page (plus one to know about the next)", async (t) => {
  const plain = await explain(`{ allChatCompletionRequests { nodes { requestId } pageInfo { hasNextPage } } }`);
  t.is(plain.data!.allChatCompletionRequests.nodes.length, 10);
  t.is(plain.sql.length, 1);
  t.regex(plain.sql[0]!, /\blimit 11\b/);

  const first = await explain(`{ allChatCompletionRequests(first: 50) { nodes { requestId } pageInfo { hasNextPage } } }`);
  t.regex(first.sql[0]!, /\blimit 51\b/);

  // A nested connection's rows are limited inside the parent's query.
  const nested = await explain(`{ allUsers(condition: { rowId: "${userId}" }, first: 1) { nodes { chatCompletionRequestsByUserId { nodes { requestId } } } } }`);
  t.is(nested.data!.allUsers.nodes[0].chatCompletionRequestsByUserId.nodes.length, 10);
  t.is(nested.sql.length, 1);
  t.regex(nested.sql[0]!, /array\(select[\s\S]*\blimit 10\)[\s\S]*\blimit 1;/);
});

test("first or last above the maximum is refused before anything runs (HTTP 400, PAGE_SIZE_TOO_LARGE)", async (t) => {
  for (const query of [
    `{ allChatCompletionRequests(first: 51) { nodes { rowId } } }`,
    `{ allChatCompletionRequests(last: 51) { nodes { rowId } } }`,
    `{ allUsers(first: 1) { nodes { chatCompletionRequestsByUserId(first: 1000) { nodes { rowId } } } } }`,
  ]) {
    const r = await graphql(server, query, {}, ADMIN_TOKEN);
    t.is(r.status, 400, query);
    t.is(r.body.data, undefined, query);
    t.is(codeOf(r), "PAGE_SIZE_TOO_LARGE", query);
    t.regex(r.body.errors![0]!.message, /more than the largest page, 50 rows \(GRAPHQL_MAX_PAGE_SIZE\)/, query);
  }
  // Negative values are refused the same way (PostgreSQL would refuse the LIMIT mid-request).
  for (const query of [`{ allUsers(first: -1) { totalCount } }`, `{ allUsers(last: -1) { totalCount } }`, `{ allUsers(offset: -5) { totalCount } }`]) {
    const r = await graphql(server, query, {}, ADMIN_TOKEN);
    t.is(r.status, 400, query);
    t.is(codeOf(r), "NEGATIVE_PAGE_ARGUMENT", query);
  }
  // The same through a variable: checked with its value, before execution.
  const byVariable = await graphql(server, `query ($n: Int) { allChatCompletionRequests(first: $n) { nodes { rowId } } }`, { n: 51 }, ADMIN_TOKEN);
  t.is(byVariable.status, 400);
  t.is(codeOf(byVariable), "PAGE_SIZE_TOO_LARGE");
  t.is(valueOf(byVariable), 51);
  // Clients that only accept application/json get the legacy 200 with the same errors and no data.
  const legacy = await fetch(`${server.url}/graphql`, {
    method: "POST",
    headers: { "content-type": "application/json", accept: "application/json", authorization: `Bearer ${ADMIN_TOKEN}` },
    body: JSON.stringify({ query: `{ allChatCompletionRequests(first: 51) { nodes { rowId } } }` }),
  });
  t.is(legacy.status, 200);
  const body = (await legacy.json()) as { data?: unknown; errors: Array<{ extensions: { code: string } }> };
  t.is(body.data, undefined);
  t.is(body.errors[0]!.extensions.code, "PAGE_SIZE_TOO_LARGE");
});

test("where the HTTP checks are not in the way, the schema itself refuses a page above the maximum and runs no SQL", async (t) => {
  // grafast() in-process skips grafserv's validation rules: what is left is the plugin on the field.
  const r = await explain(`{ allChatCompletionRequests(first: 51) { nodes { requestId } } }`);
  t.is(r.data?.allChatCompletionRequests ?? null, null);
  const error = r.errors?.[0];
  t.is(error?.extensions?.code ?? error?.originalError?.extensions?.code, "PAGE_SIZE_TOO_LARGE");
  t.deepEqual(r.sql, []);
});

// 2. Cost, depth and fields ------------------------------------------------------------------------

const NESTED = (n: string) => `allUsers(first: ${n}) { nodes { apiKeysByUserId(first: ${n}) { nodes {
  chatCompletionRequestsByApiKeyId(first: ${n}) { nodes { requestId } } } } } }`;
// Per level: the connection field 1, its nodes field 1, then per row: the row 1 and what is selected on it.
// allUsers, nodes, 40 × (user, apiKeys, nodes, 40 × (key, requests, nodes, 40 × (request, requestId)))
const NESTED_40_COST = 2 + 40 * (1 + 2 + 40 * (1 + 2 + 40 * (1 + 1)));

test("nested pages multiply: three levels of first: 40 are refused with their estimated cost (QUERY_TOO_COSTLY)", async (t) => {
  const r = await graphql(server, `{ ${NESTED("40")} }`, {}, ADMIN_TOKEN);
  t.is(r.status, 400);
  t.is(r.body.data, undefined);
  t.is(codeOf(r), "QUERY_TOO_COSTLY");
  t.is(valueOf(r), NESTED_40_COST);
  t.regex(r.body.errors![0]!.message, new RegExp(`estimated cost of ${NESTED_40_COST}; the limit is 5000 \\(GRAPHQL_MAX_COST\\)`));
  // Small pages of the same shape run.
  const small = await graphql(server, `{ ${NESTED("2")} }`, {}, ADMIN_TOKEN);
  t.is(small.status, 200);
  t.falsy(small.body.errors);
});

test("fragments, inline fragments and variables do not get around the estimate", async (t) => {
  const viaFragments = await graphql(server, `
    query { ...Users }
    fragment Users on Query { allUsers(first: 40) { nodes { ...Keys } } }
    fragment Keys on User { apiKeysByUserId(first: 40) { nodes { ... on ApiKey { chatCompletionRequestsByApiKeyId(first: 40) { ...Requests } } } } }
    fragment Requests on ChatCompletionRequestConnection { nodes { requestId } }`, {}, ADMIN_TOKEN);
  t.is(codeOf(viaFragments), "QUERY_TOO_COSTLY");
  t.is(valueOf(viaFragments), NESTED_40_COST);

  const query = `query ($n: Int) { ${NESTED("$n")} }`;
  const refused = await graphql(server, query, { n: 40 }, ADMIN_TOKEN);
  t.is(refused.status, 400);
  t.is(codeOf(refused), "QUERY_TOO_COSTLY");
  t.is(valueOf(refused), NESTED_40_COST);
  const allowed = await graphql(server, query, { n: 2 }, ADMIN_TOKEN);
  t.is(allowed.status, 200);
  t.falsy(allowed.body.errors);
  // A variable's default counts when the variable is not given.
  const byDefault = await graphql(server, `query ($n: Int = 40) { ${NESTED("$n")} }`, {}, ADMIN_TOKEN);
  t.is(codeOf(byDefault), "QUERY_TOO_COSTLY");
});

test("aliases count one by one: twenty totalCounts are refused, five run", async (t) => {
  const counts = (n: number) =>
    `{ ${Array.from({ length: n }, (_, i) => `c${i}: allChatCompletionRequests(condition: { model: "gpt-4o" }) { totalCount }`).join("\n")} }`;
  const scan = SCAN_PAGES * 50;
  const twenty = await graphql(server, counts(20), {}, ADMIN_TOKEN);
  t.is(twenty.status, 400);
  t.is(codeOf(twenty), "QUERY_TOO_COSTLY");
  t.is(valueOf(twenty), 20 * (1 + 1 + scan));
  const five = await graphql(server, counts(5), {}, ADMIN_TOKEN);
  t.is(five.status, 200);
  t.is(five.body.data!.c4.totalCount, ROWS);
  // The report functions count as scans too.
  const reports = `{ ${Array.from({ length: 10 }, (_, i) => `r${i}: apiKeyTrackingQualityReport(hours: 1) { totalRequests }`).join(" ")} }`;
  const refused = await graphql(server, reports, {}, ADMIN_TOKEN);
  t.is(codeOf(refused), "QUERY_TOO_COSTLY");
  t.is(valueOf(refused), 10 * (1 + scan + 1));
});

test("more than 200 fields (aliases, fragments expanded) are refused (TOO_MANY_FIELDS)", async (t) => {
  const fields = Array.from({ length: MAX_FIELDS }, (_, i) => `f${i}: rowId`).join(" ");
  const r = await graphql(server, `{ allUsers(first: 1) { nodes { ${fields} } } }`, {}, ADMIN_TOKEN);
  t.is(r.status, 400);
  t.is(codeOf(r), "TOO_MANY_FIELDS");
  t.is(valueOf(r), MAX_FIELDS + 2);
  // A fragment spread twice counts twice; one that doubles at every level stops being counted early.
  const doubling = Array.from({ length: 20 }, (_, i) => `fragment F${i} on Query { ...F${i + 1} ...F${i + 1} }`).join("\n");
  const exploding = await graphql(server, `query { ...F0 }\n${doubling}\nfragment F20 on Query { __typename }`, {}, ADMIN_TOKEN);
  t.is(codeOf(exploding), "TOO_MANY_FIELDS");
  t.regex(exploding.body.errors![0]!.message, /selects more than 2000 fields; the limit is 200/);
});

test("deeper than GRAPHQL_MAX_DEPTH is refused (QUERY_TOO_DEEP), and a refused mutation changes nothing", async (t) => {
  const deep = (levels: number) => "query { ".repeat(levels) + "__typename" + " }".repeat(levels);
  const r = await graphql(server, `{ ${deep(10)} }`, {}, ADMIN_TOKEN);
  t.is(r.status, 400);
  t.is(codeOf(r), "QUERY_TOO_DEEP");
  t.is(valueOf(r), 11);
  t.regex(r.body.errors![0]!.message, /11 levels deep; the limit is 10 \(GRAPHQL_MAX_DEPTH\)/);
  t.is((await graphql(server, `{ ${deep(9)} }`, {}, ADMIN_TOKEN)).status, 200);

  const mutation = await graphql(server, `mutation { createUser(input: { user: { email: "deep@example.com" } }) { ${deep(10)} } }`, {}, ADMIN_TOKEN);
  t.is(codeOf(mutation), "QUERY_TOO_DEEP");
  const { rows } = await db.owner.query("select count(*)::int as n from app_public.users where email = 'deep@example.com'");
  t.is(rows[0].n, 0);
});

test("with the default settings: a user's whole ledger comes a page at a time; the findings' queries are refused", (t) => {
  const defaults = loadConfig({});
  const limits: GraphQLLimits = {
    defaultPageSize: defaults.graphqlDefaultPageSize,
    maxPageSize: defaults.graphqlMaxPageSize,
    maxCost: defaults.graphqlMaxCost,
    maxDepth: defaults.graphqlMaxDepth,
  };
  const check = (source: string) => {
    const document = parse(source);
    const operation = document.definitions[0] as OperationDefinitionNode;
    const analysis = analyzeOperation(schema, operation, () => undefined, limits, null);
    return { analysis, errors: limitErrors(analysis, limits, operation) };
  };
  const type = schema.getType("ChatCompletionRequest");
  if (!isObjectType(type)) return t.fail("no ChatCompletionRequest type");
  const columns = Object.values(type.getFields()).filter((f) => isLeafType(getNamedType(f.type))).map((f) => f.name);

  // Every column of every row: the default page (100) fits, and so does the largest page (1000).
  const all = check(`{ allChatCompletionRequests { nodes { ${columns.join(" ")} } pageInfo { hasNextPage endCursor } } }`);
  t.deepEqual(all.errors, []);
  t.is(all.analysis.cost, 1 + 1 + 100 * (1 + columns.length) + 1 + 2);
  t.deepEqual(check(`{ allChatCompletionRequests(first: 1000) { nodes { ${columns.join(" ")} } } }`).errors, []);
  t.is(check(`{ allChatCompletionRequests(first: 1001) { nodes { rowId } } }`).errors[0]?.extensions.code, "PAGE_SIZE_TOO_LARGE");
  // Twenty aliased totalCounts, and three levels of first: 40.
  const counts = Array.from({ length: 20 }, (_, i) => `c${i}: allChatCompletionRequests(condition: { model: "x" }) { totalCount }`);
  t.is(check(`{ ${counts.join(" ")} }`).errors[0]?.extensions.code, "QUERY_TOO_COSTLY");
  t.is(check(`{ ${NESTED("40")} }`).errors[0]?.extensions.code, "QUERY_TOO_COSTLY");
  // A couple of counts next to a page still fit.
  t.deepEqual(check(`{ ${counts.slice(0, 2).join(" ")} allApiKeys { nodes { rowId name } } }`).errors, []);
});

// 3. Introspection and GraphiQL ---------------------------------------------------------------------

test("introspection is refused to non-admins when GraphiQL is off, wherever it hides; __typename is fine", async (t) => {
  for (const query of [
    `{ __schema { queryType { name } } }`,
    `{ __type(name: "User") { name } }`,
    `query { ...Schema } fragment Schema on Query { __schema { types { name } } }`,
    `query { ... on Query { __type(name: "Query") { fields { name } } } }`,
  ]) {
    for (const token of [undefined, userKey]) {
      const r = await graphql(server, query, {}, token);
      t.is(r.status, 400, query);
      t.is(r.body.data, undefined, query);
      t.is(codeOf(r), "INTROSPECTION_DISABLED", query);
    }
  }
  const typename = await graphql(server, `{ __typename }`, {}, userKey);
  t.deepEqual(typename.body, { data: { __typename: "Query" } });
});

test("admins introspect (GraphiQL's full query passes the limits); with GRAPHIQL=true everyone does", async (t) => {
  const query = getIntrospectionQuery({ descriptions: true });
  const admin = await graphql(server, query, {}, ADMIN_TOKEN);
  t.is(admin.status, 200);
  t.falsy(admin.body.errors);
  t.true(admin.body.data!.__schema.types.length > 10);
  // An admin user's key, too.
  const adminUser = await createUser(db, "limits-admin@example.com", "admin");
  const adminKey = (await createKey(db, adminUser)).secret;
  t.is((await graphql(server, query, {}, adminKey)).status, 200);

  const anonymous = await graphql(open, query);
  t.is(anonymous.status, 200);
  t.true(anonymous.body.data!.__schema.types.length > 10);
});

test("the GraphiQL page is served only when GRAPHIQL is on", async (t) => {
  const off = await fetch(`${server.url}/graphiql`, { headers: { accept: "text/html" } });
  t.is(off.status, 404);
  await off.body?.cancel();
  const on = await fetch(`${open.url}/graphiql`, { headers: { accept: "text/html" } });
  t.is(on.status, 200);
  t.regex(on.headers.get("content-type") ?? "", /text\/html/);
  await on.body?.cancel();
});

// 4. statement_timeout -------------------------------------------------------------------------------

test("every principal's settings carry statement_timeout", (t) => {
  t.deepEqual(pgSettingsFor(null, 1234), { statement_timeout: "1234" });
  t.deepEqual(pgSettingsFor({ kind: "admin_token" }, 1234), { role: "keytrack_admin", statement_timeout: "1234" });
  const key = { kind: "key" as const, apiKeyId: "k", userId: "u", apiKeyHash: Buffer.alloc(32), stale: false };
  t.deepEqual(pgSettingsFor({ ...key, isAdmin: false }, 1234), {
    role: "keytrack_user", "keytrack.user_id": "u", "keytrack.api_key_id": "k", "keytrack.max_live_keys_per_user": "20", statement_timeout: "1234",
  });
  t.is(pgSettingsFor({ ...key, isAdmin: true }, 1234).role, "keytrack_admin");
});

test("a GraphQL statement that runs past GRAPHQL_STATEMENT_TIMEOUT_MS is cancelled (57014), for every principal", async (t) => {
  // A lock held by another transaction makes the request's statement wait: statement_timeout counts the wait.
  const locker = new pg.Client({ connectionString: db.ownerUrl });
  locker.on("error", () => {});
  await locker.connect();
  await locker.query("begin");
  await locker.query("lock table app_public.chat_completion_requests in access exclusive mode");
  // If the timeout did not apply, the lock goes after a while and the assertions below fail (nothing hangs).
  const safety = setTimeout(() => void locker.query("rollback").catch(() => {}), 30_000);
  try {
    for (const token of [ADMIN_TOKEN, userKey, undefined]) {
      const r = await graphql(open, `{ allChatCompletionRequests { totalCount } }`, {}, token);
      t.is(codeOf(r), "57014", String(token));
      t.regex(r.body.errors?.[0]?.message ?? "", /statement timeout/, String(token));
    }
  } finally {
    clearTimeout(safety);
    await locker.query("rollback").catch(() => {});
    await locker.end();
  }
  // Requests run normally under the timeout.
  const r = await graphql(open, `{ allChatCompletionRequests { totalCount } apiKeyByRowId(rowId: "${keyId}") { name } }`, {}, ADMIN_TOKEN);
  t.falsy(r.body.errors);
  t.is(r.body.data!.allChatCompletionRequests.totalCount, ROWS);
});
