// Several worker processes (`npm run worker`, the web processes with
// WORKER=false) on one database: each cron task is scheduled once per tick,
// each pending row is resolved once, each backfill batch runs once, and work
// goes on when one worker is SIGKILLed in the middle of a backfill.
import { spawn, type ChildProcess } from "node:child_process";
import path from "node:path";
import { fileURLToPath } from "node:url";
import test from "ava";
import { withDatabaseName } from "../../server/db/urls.js";
import { createKey, createTestDb, createUser, type TestDb } from "../helpers/db.js";
import { waitFor } from "../helpers/poll.js";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const WORKERS = 3;
/** A cron tick comes once a minute; the sweep that revives a stalled backfill waits 30 s and runs on a tick. */
const TICK_WAIT_MS = 150_000;

interface Worker {
  child: ChildProcess;
  output: string;
  exited: Promise<number | null>;
}

let db: TestDb;
const workers: Worker[] = [];
let startedAt: Date;

function startWorker(index: number): Worker {
  const child = spawn(process.execPath, ["--import=tsx", "server/worker/index.ts"], {
    cwd: root,
    env: {
      ...process.env,
      DATABASE_URL: db.ownerUrl,
      ROOT_DATABASE_URL: withDatabaseName(db.rootUrl, "postgres"),
      APP_ENV: "test",
      LOG_LEVEL: "info",
      WORKER_CONCURRENCY: "2",
      // node-postgres names its connections after it: which worker runs a blocked batch is seen in pg_stat_activity.
      PGAPPNAME: `many-workers-${index}`,
      // Rows are retried only because their key was imported, never by their own schedule.
      ATTRIBUTION_RETRY_BASE_MS: "3600000",
      ATTRIBUTION_RETRY_MAX_MS: "3600000",
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  const worker: Worker = { child, output: "", exited: new Promise((resolve) => child.on("exit", (code) => resolve(code))) };
  child.stdout!.on("data", (c) => (worker.output += c));
  child.stderr!.on("data", (c) => (worker.output += c));
  return worker;
}

test.before(async () => {
  db = await createTestDb();
  // Test instrumentation (this database only): every job graphile-worker's cron schedules, by task and tick.
  await db.root.query(`
    create table public.test_cron_log (task text not null, tick text not null, logged_at timestamptz not null default clock_timestamp());
    create function public.test_log_cron() returns trigger language plpgsql security definer as $$
    begin
      if (new.payload::jsonb ? '_cron') and (tg_op = 'INSERT' or old.revision <> new.revision) then
        insert into public.test_cron_log (task, tick)
          select t.identifier, new.payload::jsonb -> '_cron' ->> 'ts' from graphile_worker._private_tasks t where t.id = new.task_id;
      end if;
      return null;
    end $$;
    create trigger test_log_cron after insert or update on graphile_worker._private_jobs
      for each row execute function public.test_log_cron();`);
  startedAt = new Date();
  for (let i = 0; i < WORKERS; i++) workers.push(startWorker(i));
  for (const [i, w] of workers.entries()) {
    await waitFor(`worker ${i} to start`, () => /keytrack worker running/.test(w.output) || w.child.exitCode !== null);
    if (w.child.exitCode !== null) throw new Error(`worker ${i} exited: ${w.output}`);
  }
});

test.after.always(async () => {
  for (const w of workers) {
    if (w.child.exitCode === null && w.child.signalCode === null) w.child.kill("SIGTERM");
  }
  await Promise.all(workers.map((w) => w.exited));
  await db?.drop();
});

const events = async () => {
  const { rows } = await db.owner.query<{ event: string; n: string }>("select event, occurrences as n from app_private.attribution_events");
  return Object.fromEntries(rows.map((r) => [r.event, Number(r.n)])) as Record<string, number>;
};

test.serial("three workers: each cron task is scheduled once per tick", async (t) => {
  const tasks = ["chat_completion_requests__refresh_rollups", "chat_completion_requests__resolve_pending", "attribution_backfills__sweep"];
  // The first tick after all three started (ticks are whole minutes).
  const firstTick = new Date(Math.ceil((Date.now() + 1) / 60_000) * 60_000).toISOString();
  await waitFor("a cron tick with three workers", async () =>
    (await db.root.query("select count(distinct task)::int as n from public.test_cron_log where tick::timestamptz >= $1", [firstTick])).rows[0].n === tasks.length,
  { timeoutMs: TICK_WAIT_MS, intervalMs: 500 });
  const { rows } = await db.root.query(
    "select task, tick, count(*)::int as n from public.test_cron_log where tick::timestamptz >= $1 group by 1, 2 order by 1, 2", [firstTick]);
  t.deepEqual([...new Set(rows.map((r) => r.task))].sort(), [...tasks].sort());
  t.deepEqual(rows.filter((r) => r.n !== 1), [], "a task scheduled more than once for one tick");
  t.true(startedAt < new Date(firstTick));
});

test.serial("three workers: 30,000 rows pending on 30 keys imported in bulk are each resolved exactly once", async (t) => {
  const user = await createUser(db, "many-workers@example.com");
  const before = await events();
  const client = await db.owner.connect();
  try {
    await client.query("begin");
    await client.query(
      `insert into app_public.chat_completion_requests (request_id, api_key_hash)
       select 'mw-' || i, app_public.api_key_hash('kt_live_mw_' || (i % 30)) from generate_series(1, 30000) i`);
    // Not due by their own schedule: only the import makes them due.
    await client.query("update app_public.chat_completion_requests set attribution_next_attempt_at = now() + interval '1 hour' where request_id like 'mw-%'");
    await client.query("commit");
  } finally {
    client.release();
  }
  const keys = Array.from({ length: 30 }, (_, k) => ({ user_id: user, name: `mw ${k}` }));
  await db.owner.query(
    `select count(*) from app_public.import_api_keys(
       (select jsonb_agg(k || jsonb_build_object('key_hash', encode(app_public.api_key_hash('kt_live_mw_' || (ord - 1)), 'hex')))
          from jsonb_array_elements($1::jsonb) with ordinality as e(k, ord)))`,
    [JSON.stringify(keys)]);
  await waitFor("every row to resolve", async () =>
    (await db.owner.query("select count(*)::int as n from app_public.chat_completion_requests where request_id like 'mw-%' and attribution_status = 'pending'")).rows[0].n === 0,
  { intervalMs: 200 });
  const after = await events();
  const delta = (e: string) => (after[e] ?? 0) - (before[e] ?? 0);
  t.is(delta("retry_resolved"), 30000, "each row resolved once");
  t.is(delta("retry_still_pending"), 0, "no row looked up twice");
  const { rows } = await db.owner.query(
    `select attribution_status, attribution_method, attribution_attempts, count(*)::int as n
       from app_public.chat_completion_requests where request_id like 'mw-%' group by 1, 2, 3`);
  t.is(rows.length, 1);
  t.like(rows[0], { attribution_status: "resolved", attribution_method: "retry", n: 30000 });
});

test.serial("three workers, one SIGKILLed mid-way: a backfill of 20,000 rows runs each batch once and finishes", async (t) => {
  const user = await createUser(db, "legacy@example.com");
  const key = await createKey(db, user, "legacy");
  // Legacy rows, written before keytrack attributed anything (no trigger ran: no key id, no guard row).
  const client = await db.root.connect();
  try {
    await client.query("begin");
    await client.query("set local session_replication_role = replica");
    await client.query(
      `insert into app_public.chat_completion_requests (request_id, api_key_hash, attribution_status, attribution_reason, created_at)
       select 'legacy-' || i, app_public.api_key_hash($1), 'failed', 'not_found', now() - interval '1 day'
         from generate_series(1, 20000) i`, [key.secret]);
    await client.query("commit");
  } finally {
    client.release();
  }
  const { rows: [run] } = await db.owner.query("select id from app_public.start_attribution_backfill(500)");
  const backfill = async () =>
    (await db.owner.query("select status, examined::int, filled::int, batches::int from app_public.attribution_backfills where id = $1", [run.id])).rows[0];
  await waitFor("the backfill to be under way", async () => (await backfill()).batches >= 5, { intervalMs: 20 });
  // Hold the run row, so the next batch's job waits, locked by its worker; then SIGKILL that worker. Its
  // job stays locked (graphile-worker 0.18 frees a dead worker's jobs after four hours): the backfill
  // goes on only because the minute sweep queues its next batch again.
  const holder = await db.owner.connect();

  try {
    await holder.query("begin");
    await holder.query("select 1 from app_public.attribution_backfills where id = $1 for update", [run.id]);
    const { application_name: name } = await waitFor("a worker's batch to wait on the run row", async () =>
      (await db.root.query(
        `select application_name from pg_stat_activity
          where datname = current_database() and wait_event_type = 'Lock' and query like '%run_attribution_backfill_batch%'`)).rows[0]);
    const victim = workers[Number(/^many-workers-(\d+)$/.exec(name)![1])]!;
    victim.child.kill("SIGKILL");
    t.is(await victim.exited, null);
  } finally {
    await holder.query("rollback");
    holder.release();
  }
  const done = await waitFor("the backfill to finish with two workers", async () => {
    const b = await backfill();
    return b.status === "finished" && b;
  }, { timeoutMs: TICK_WAIT_MS, intervalMs: 200 });
  // 40 full batches, then one that finds nothing: a batch run twice would have examined rows twice.
  t.deepEqual(done, { status: "finished", examined: 20000, filled: 20000, batches: 41 });
  const { rows } = await db.owner.query(
    "select count(*)::int as n from app_public.chat_completion_requests where request_id like 'legacy-%' and api_key_id = $1 and attribution_method = 'backfill'", [key.id]);
  t.is(rows[0].n, 20000);
});
