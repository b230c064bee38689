// The gateway and group commit: a response never waits for its row, and rows of
// concurrent requests are written together (fewer transactions than requests),
// each exactly once, carrying its own completeness number.
import test from "ava";
import pg from "pg";

import type { RunningServer } from "../../server/main.js";
import { post } from "../helpers/chat.js";
import { createKey, createTestDb, createUser, rowsFor, type TestDb } from "../helpers/db.js";
import { waitFor } from "../helpers/poll.js";
import { startTestServer } from "../helpers/server.js";

let db: TestDb;
let server: RunningServer;

test.before(async () => {
  db = await createTestDb();
  // Rows wait on a table lock below, for as long as the requests take on a busy machine: far more tries
  // than that can use up, so none goes to the spool (whose replay writes one row per transaction).
  server = await startTestServer(db, { ECHO_MODEL: "true", RECORD_RETRY_ATTEMPTS: "20" });
});
test.after.always(async () => {
  await server?.close();
  await db?.drop();
});

const body = { model: "echo", messages: [{ role: "user", content: "group commit" }] };

test.serial("concurrent requests: every 2xx recorded exactly once, rows sharing transactions, numbered without gaps", async (t) => {
  const user = await createUser(db, "group-commit@example.com");
  const key = await createKey(db, user, "group");
  // Warm the key cache, so that only the rows' inserts need the ledger.
  t.is((await post(server, "/v1/chat/completions", body, { authorization: `Bearer ${key.secret}` })).status, 200);
  // The rows of 120 concurrent requests queue while the ledger's inserts are blocked, then go in
  // together: however slowly a busy machine serves the requests, they cannot each get a transaction.
  const blocker = new pg.Client({ connectionString: db.rootUrl });
  await blocker.connect();
  await blocker.query("begin");
  await blocker.query("lock table app_private.request_ids in exclusive mode");
  let answers: Awaited<ReturnType<typeof post>>[];
  try {
    answers = await Promise.all(Array.from({ length: 120 }, () => post(server, "/v1/chat/completions", body, { authorization: `Bearer ${key.secret}` })));
    await Promise.all(answers.map((a) => a.arrayBuffer()));
  } finally {
    await blocker.query("rollback");
    await blocker.end();
  }
  t.true(answers.every((a) => a.status === 200));
  const ids = answers.map((a) => a.headers.get("x-request-id")!);

  const rows = await waitFor("every row", async () => {
    const found = await rowsFor(db.owner, ids);
    return found.length === ids.length && found;
  });
  t.is(new Set(rows.map((r) => r.request_id)).size, 120);
  const { rows: [stats] } = await db.owner.query<{ transactions: number; resolved: number; seqs: number; min: string; max: string }>(
    `select count(distinct xmin::text)::int as transactions,
            count(*) filter (where api_key_id = $2)::int as resolved,
            count(distinct process_seq)::int as seqs, min(process_seq) as min, max(process_seq) as max
       from app_public.chat_completion_requests where request_id = any($1)`,
    [ids, key.id],
  );
  t.is(stats!.resolved, 120);
  t.true(stats!.transactions < 120, `${stats!.transactions} transactions for 120 rows`);
  t.is(stats!.seqs, 120);
  t.is(Number(stats!.max) - Number(stats!.min), 119, "consecutive request numbers");
});

test.serial("a response does not wait for its row: answered while the ledger's inserts are blocked, recorded once they are not", async (t) => {
  const user = await createUser(db, "no-wait@example.com");
  const key = await createKey(db, user, "no-wait");
  // Warm the key cache, so that only the row's insert needs the table.
  t.is((await post(server, "/v1/chat/completions", body, { authorization: `Bearer ${key.secret}` })).status, 200);

  const blocker = new pg.Client({ connectionString: db.rootUrl });
  await blocker.connect();
  await blocker.query("begin");
  await blocker.query("lock table app_private.request_ids in exclusive mode");
  let ids: string[];
  try {
    const answers = await Promise.all(Array.from({ length: 5 }, () => post(server, "/v1/chat/completions", body, { authorization: `Bearer ${key.secret}` })));
    t.true(answers.every((a) => a.status === 200), "served while no row can be written");
    ids = answers.map((a) => a.headers.get("x-request-id")!);
    t.is((await rowsFor(db.owner, ids)).length, 0);
  } finally {
    await blocker.query("rollback");
    await blocker.end();
  }
  await waitFor("the rows after the lock", async () => (await rowsFor(db.owner, ids)).length === 5);
  t.is((await rowsFor(db.owner, ids)).length, 5);
});
