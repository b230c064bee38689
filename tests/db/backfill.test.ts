// The attribution backfill on legacy rows (written before keytrack attributed
// them: inserted here with triggers disabled, as a bulk load would): fills from
// the key hash or the user's only key alive at the time, leaves ambiguous rows
// NULL with a reason, flags rows with neither key nor user anonymous; batched,
// resumable, and safe while inserts run.
import test from "ava";
import { runBackfill } from "../../server/cli/backfill.js";
import { asRole, createKey, createTestDb, createUser, makePool, type TestDb } from "../helpers/db.js";

let db: TestDb;

test.before(async () => {
  db = await createTestDb();
});
test.after.always(async () => {
  await db?.drop();
});

/** Inserts rows bypassing the attribution trigger, like data loaded before keytrack. */
async function legacy(rows: Array<{ id: string; at: string; user?: string | null; hash?: string | null }>) {
  const client = await db.root.connect();
  try {
    await client.query("begin");
    await client.query("set local session_replication_role = replica");
    for (const r of rows) {
      await client.query(
        `insert into app_public.chat_completion_requests (request_id, created_at, user_id, api_key_hash, attribution_status, attribution_attempts)
         values ($1, $2, $3, case when $4::text is null then null else app_public.api_key_hash($4) end, 'pending', 0)`,
        [r.id, r.at, r.user ?? null, r.hash ?? null],
      );
      await client.query("insert into app_private.request_ids values ($1, $2)", [r.id, r.at]);
    }
    await client.query("commit");
  } finally {
    client.release();
  }
}
const get = async (id: string) =>
  (await db.owner.query("select * from app_public.chat_completion_requests where request_id = $1", [id])).rows[0];
const silent = { write: () => true, isTTY: false } as unknown as NodeJS.WriteStream;

test.serial("fills from the hash or the only key alive, leaves ambiguous rows, flags anonymous", async (t) => {
  const one = await createUser(db, "one-key@example.com");
  const two = await createUser(db, "two-keys@example.com");
  const none = await createUser(db, "no-key@example.com");
  const k1 = await createKey(db, one, "only");
  const k2a = await createKey(db, two, "a");
  const k2b = await createKey(db, two, "b");
  const hashed = await createKey(db, two, "hashed");
  // Keys "existed" from 2025 on; the revoked one died in mid-2025.
  await db.owner.query("update app_public.api_keys set created_at = '2025-01-01' where id = any($1)", [[k1.id, k2a.id, k2b.id, hashed.id]]);
  await db.owner.query("update app_public.api_keys set revoked_at = '2025-06-01' where id = $1", [k2b.id]);
  await legacy([
    { id: "one-key", at: "2025-03-01T10:00:00Z", user: one },
    { id: "two-keys", at: "2025-03-01T10:00:00Z", user: two },             // both alive: ambiguous
    { id: "two-keys-later", at: "2025-07-01T10:00:00Z", user: two },       // k2b revoked by then: only k2a... and hashed
    { id: "no-key", at: "2025-03-01T10:00:00Z", user: none },
    { id: "before-keys", at: "2024-06-01T10:00:00Z", user: one },          // no key alive yet
    { id: "hash", at: "2025-03-01T10:00:00Z", user: null, hash: hashed.secret },
    { id: "unknown-hash", at: "2025-03-01T10:00:00Z", hash: "sk-unknown" },
    { id: "nobody", at: "2025-03-01T10:00:00Z" },
  ]);
  t.like(await get("nobody"), { is_anonymous: false, api_key_id: null }); // legacy: not flagged yet

  const { rows: [started] } = await db.owner.query("select * from app_public.start_attribution_backfill(3)");
  let run = started;
  while (run.status === "running") {
    ({ rows: [run] } = await db.owner.query("select * from app_private.run_attribution_backfill_batch($1)", [started.id]));
  }
  t.like(await get("one-key"), { api_key_id: k1.id, user_id: one, attribution_status: "resolved", attribution_method: "backfill" });
  t.like(await get("two-keys"), { api_key_id: null, attribution_status: "failed", attribution_reason: "ambiguous" });
  t.regex((await get("two-keys")).attribution_error, /3 keys alive/);
  t.like(await get("two-keys-later"), { api_key_id: null, attribution_reason: "ambiguous" }); // k2a and hashed
  t.like(await get("no-key"), { api_key_id: null, attribution_status: "failed", attribution_reason: "no_key" });
  t.like(await get("before-keys"), { api_key_id: null, attribution_reason: "no_key" });
  t.like(await get("hash"), { api_key_id: hashed.id, user_id: two, attribution_status: "resolved", attribution_method: "backfill" });
  t.like(await get("unknown-hash"), { api_key_id: null, attribution_status: "pending", is_anonymous: false });
  t.like(await get("nobody"), { api_key_id: null, user_id: null, is_anonymous: true, attribution_status: "anonymous" });
  t.like(run, { status: "finished", examined: "8", filled: "2", ambiguous: "2", no_key: "2", anonymized: "1", batches: 3 });
});

test.serial("resumable: an interrupted run continues where it stopped; a second start resumes it", async (t) => {
  const u = await createUser(db, "resume@example.com");
  const k = await createKey(db, u);
  await db.owner.query("update app_public.api_keys set created_at = '2020-01-01' where id = $1", [k.id]);
  await legacy(Array.from({ length: 25 }, (_, i) => ({ id: `resume-${i}`, at: `2021-01-${String(i + 1).padStart(2, "0")}T00:00:00Z`, user: u })));
  // Rows the first test left NULL (ambiguous, no key...) are examined again too.
  const { rows: [{ n: nullRows }] } = await db.owner.query("select count(*)::text as n from app_public.chat_completion_requests where api_key_id is null");
  const { rows: [run] } = await db.owner.query("select * from app_public.start_attribution_backfill(10)");
  await db.owner.query("select app_private.run_attribution_backfill_batch($1)", [run.id]); // then "crash"
  const { rows: [again] } = await db.owner.query("select * from app_public.start_attribution_backfill(10)");
  t.is(again.id, run.id, "resumes the running run");
  t.is(again.examined, "10");
  const pool = makePool(db.ownerUrl, { max: 1 });
  try {
    const done = await runBackfill(pool, 10, () => false, silent);
    t.like(done, { id: run.id, status: "finished", examined: nullRows, filled: "25" });
  } finally {
    await pool.end();
  }
  const { rows } = await db.owner.query("select count(*)::int as n from app_public.chat_completion_requests where request_id like 'resume-%' and api_key_id = $1", [k.id]);
  t.is(rows[0].n, 25);
});

test.serial("backfill while inserts run: no row lost, none attributed twice", async (t) => {
  const u = await createUser(db, "busy@example.com");
  const k = await createKey(db, u);
  await db.owner.query("update app_public.api_keys set created_at = '2019-01-01' where id = $1", [k.id]);
  await legacy(Array.from({ length: 200 }, (_, i) => ({ id: `busy-legacy-${i}`, at: new Date(Date.UTC(2022, 0, 1) + i * 60_000).toISOString(), user: u })));
  const writer = (async () => {
    for (let i = 0; i < 200; i++) {
      await db.owner.query(
        "insert into app_public.chat_completion_requests (request_id, api_key_hash, created_at) values ($1, app_public.api_key_hash($2), $3)",
        [`busy-new-${i}`, k.secret, i % 2 ? new Date() : new Date(Date.UTC(2022, 0, 1) + i * 30_000)],
      );
    }
  })();
  const pool = makePool(db.ownerUrl, { max: 1 });
  try {
    const [run] = await Promise.all([runBackfill(pool, 7, () => false, silent), writer]);
    t.is(run.status, "finished");
  } finally {
    await pool.end();
  }
  const { rows } = await db.owner.query(
    `select count(*)::int as total, count(api_key_id)::int as attributed,
            count(*) filter (where attribution_method = 'backfill')::int as by_backfill,
            count(*) filter (where attribution_method = 'lookup')::int as by_lookup,
            count(distinct request_id)::int as distinct_ids
       from app_public.chat_completion_requests where request_id like 'busy-%'`);
  t.deepEqual(rows[0], { total: 400, attributed: 400, by_backfill: 200, by_lookup: 200, distinct_ids: 400 });
});

test.serial("only admins start a backfill; bad batch sizes are refused", async (t) => {
  const err = await asRole(db, "keytrack_user", {}, (c) => c.query("select app_public.start_attribution_backfill()").catch((e) => e));
  t.is(err.code, "42501");
  const bad = await db.owner.query("select app_public.start_attribution_backfill(0)").catch((e) => e);
  t.is(bad.code, "22023");
});
