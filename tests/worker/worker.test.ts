// The real graphile-worker, in the service process: pending rows resolve within
// seconds of their key being imported, a key that never appears ends failed
// after the limit, and a backfill started from GraphQL runs to the end.
// Serial: they share one database, and the backfill takes every row without a key (it would attribute
// the first test's pending row, method backfill, if it ran while that row waited for its import).
import test from "ava";
import type { RunningServer } from "../../server/main.js";
import { createTestDb, createUser, type TestDb } from "../helpers/db.js";
import { waitFor } from "../helpers/poll.js";
import { ADMIN_TOKEN, graphql, startTestServer } from "../helpers/server.js";

let db: TestDb;
let server: RunningServer;

test.before(async () => {
  db = await createTestDb();
  server = await startTestServer(db, {
    WORKER: "true",
    // Retries 1 s, 2 s, 2 s apart: a pending row fails after about 5 s, far longer than the
    // moment between the first test's insert and its import, however busy the machine.
    ATTRIBUTION_RETRY_BASE_MS: "1000",
    ATTRIBUTION_RETRY_MAX_MS: "2000",
    ATTRIBUTION_RETRY_MAX_ATTEMPTS: "4",
  });
});
test.after.always(async () => {
  await server?.close();
  await db?.drop();
});

const row = async (id: string) =>
  (await db.owner.query("select * from app_public.chat_completion_requests where request_id = $1", [id])).rows[0];

test.serial("a key imported after its request arrived: the worker resolves the row within seconds", async (t) => {
  const alice = await createUser(db, "alice@example.com");
  await db.owner.query("insert into app_public.chat_completion_requests (request_id, api_key_hash) values ('w-later', app_public.api_key_hash('sk-w-later'))");
  t.is((await row("w-later")).attribution_status, "pending");
  const { rows: [key] } = await db.owner.query("select * from app_public.import_api_key($1, app_public.api_key_hash('sk-w-later'))", [alice]);
  // The import wakes the worker: without the wake, the row would wait for its next retry time.
  const resolved = await waitFor("resolution", async () => {
    const r = await row("w-later");
    return r.attribution_status === "resolved" && r;
  });
  t.like(resolved, { api_key_id: key.id, user_id: alice, attribution_method: "retry" });
});

test.serial("a key that never appears ends failed (not_found) after the attempt limit", async (t) => {
  await db.owner.query("insert into app_public.chat_completion_requests (request_id, api_key_hash) values ('w-never', app_public.api_key_hash('sk-w-never'))");
  const failed = await waitFor("failure", async () => {
    const r = await row("w-never");
    return r.attribution_status === "failed" && r;
  });
  t.like(failed, { attribution_reason: "not_found", attribution_attempts: 4, api_key_id: null });
});

test.serial("a backfill started by an admin through GraphQL runs to the end in the worker", async (t) => {
  const bob = await createUser(db, "bob@example.com");
  await db.owner.query("select app_public.create_api_key($1)", [bob]);
  await db.owner.query("update app_public.api_keys set created_at = '2020-01-01' where user_id = $1", [bob]);
  const client = await db.root.connect();
  try {
    await client.query("begin");
    await client.query("set local session_replication_role = replica");
    await client.query(`insert into app_public.chat_completion_requests (request_id, created_at, user_id)
                        select 'w-legacy-' || i, '2021-01-01'::timestamptz + i * interval '1 hour', $1 from generate_series(1, 30) i`, [bob]);
    await client.query("insert into app_private.request_ids select request_id, created_at from app_public.chat_completion_requests where request_id like 'w-legacy-%'");
    await client.query("commit");
  } finally {
    client.release();
  }
  const started = await graphql(server, `mutation { startAttributionBackfill(input: { batchSize: 4 }) { result { rowId status } } }`, {}, ADMIN_TOKEN);
  t.falsy(started.body.errors);
  const id = started.body.data!.startAttributionBackfill.result.rowId;
  const run = await waitFor("backfill", async () => {
    const r = await graphql(server, `query ($id: BigInt!) { attributionBackfillByRowId(rowId: $id) { status examined filled batches } }`, { id }, ADMIN_TOKEN);
    const b = r.body.data?.attributionBackfillByRowId;
    return b?.status === "finished" && b;
  });
  t.like(run, { filled: "30" });
  t.true(run.batches >= 8);
  const anonymous = await graphql(server, `mutation { startAttributionBackfill(input: {}) { result { rowId } } }`);
  t.is(anonymous.body.errors?.[0]?.extensions?.code, "42501");
});
