// Completeness you can prove: each serving process numbers the requests it
// accepts and its rows carry the number, so SQL finds any row that never
// arrived (app_public.completeness_gaps) and gives the ratio per hour
// (completeness_by_hour); /metrics and the quality report show it.
import { spawn, type ChildProcess } from "node:child_process";
import net from "node:net";
import path from "node:path";

import test from "ava";

import { projectRoot } from "../../server/db/projectRoot.js";
import { withDatabaseName } from "../../server/db/urls.js";
import { readFile } from "node:fs/promises";

import { createRecorder } from "../../server/recording/recorder.js";
import { spoolPaths } from "../../server/recording/spool.js";
import type { RunningServer } from "../../server/main.js";
import { createTestDb, type TestDb } from "../helpers/db.js";
import { parseExposition } from "../helpers/exposition.js";
import { waitFor } from "../helpers/poll.js";
import { captureLog, makeRow } from "../helpers/recording.js";
import { ADMIN_TOKEN, startTestServer, tempDataDir } from "../helpers/server.js";

let db: TestDb;
test.before(async () => {
  db = await createTestDb();
});
test.after.always(async () => {
  await db?.drop();
});

const messages = [{ role: "user" as const, content: "count me" }];
const ANON = { ALLOW_ANONYMOUS: "true", COMPLETENESS_HEARTBEAT_MS: "200" };

async function send(server: RunningServer | string, n: number): Promise<string[]> {
  const url = typeof server === "string" ? server : server.url;
  const ids: string[] = [];
  for (let i = 0; i < n; i++) {
    const res = await fetch(`${url}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: "echo", messages }),
    });
    if (res.status !== 200) throw new Error(`request ${i}: ${res.status} ${await res.text()}`);
    ids.push(res.headers.get("x-request-id")!);
  }
  return ids;
}

const processOf = async (requestId: string) =>
  (await db.owner.query("select process_id, process_seq from app_public.chat_completion_requests where request_id = $1", [requestId])).rows[0];
const gaps = async (processId: string, window = "0") =>
  (await db.owner.query(
    "select process_state, from_seq::int, to_seq::int, missing::int from app_public.completeness_gaps($1::interval) where process_id = $2 order by from_seq",
    [`${window} seconds`, processId],
  )).rows;
const rowsLanded = (ids: string[]) => waitFor(`${ids.length} rows`, async () =>
  Number((await db.owner.query("select count(*) from app_public.chat_completion_requests where request_id = any($1)", [ids])).rows[0].count) === ids.length);

test.serial("a normal run has no gaps; a stopped process's numbers 1..last all have rows; the ratio is 1", async (t) => {
  const server = await startTestServer(db, ANON);
  const ids = await send(server, 12);
  await rowsLanded(ids);
  const { process_id: processId } = await processOf(ids[0]!);
  await server.close();
  const seqs = (await db.owner.query("select process_seq::int as s from app_public.chat_completion_requests where process_id = $1 order by 1", [processId])).rows.map((r) => r.s);
  t.deepEqual(seqs, Array.from({ length: 12 }, (_, i) => i + 1), "numbered 1, 2, 3, ... in the order accepted");
  const proc = (await db.owner.query("select *, app_public.serving_process_state(p) as state from app_public.serving_processes p where id = $1", [processId])).rows[0];
  t.like(proc, { state: "stopped", last_seq: "12", pid: process.pid });
  t.deepEqual(await gaps(processId), []);
  const hours = (await db.owner.query("select recorded::int, missing::int, completeness_ratio::float from app_public.completeness_by_hour(1, '0 seconds') where process_id = $1", [processId])).rows;
  t.deepEqual(hours, [{ recorded: 12, missing: 0, completeness_ratio: 1 }]);
});

test.serial("a row removed from the database is reported as a gap with its process and range, in SQL, /metrics and the quality report", async (t) => {
  const server = await startTestServer(db, ANON);
  try {
    const ids = await send(server, 8);
    await rowsLanded(ids);
    const { process_id: processId } = await processOf(ids[0]!);
    await db.owner.query("delete from app_public.chat_completion_requests where request_id = any($1)", [[ids[3], ids[4]]]);
    // Within the replay window the missing rows may still be in a spool: not reported yet.
    t.deepEqual(await gaps(processId, "600"), []);
    t.deepEqual(await gaps(processId), [{ process_state: "running", from_seq: 4, to_seq: 5, missing: 2 }]);
    // The analyst sees the same.
    const analyst = new (await import("pg")).default.Client({ connectionString: db.analystUrl });
    await analyst.connect();
    try {
      const { rows } = await analyst.query("select from_seq::int, to_seq::int from completeness_gaps('0 seconds') where process_id = $1", [processId]);
      t.deepEqual(rows, [{ from_seq: 4, to_seq: 5 }]);
    } finally {
      await analyst.end();
    }
    const hours = (await db.owner.query("select recorded::int, missing::int, accepted::int from app_public.completeness_by_hour(1, '0 seconds') where process_id = $1", [processId])).rows;
    t.deepEqual(hours, [{ recorded: 6, missing: 2, accepted: 8 }]);

    const metrics = parseExposition(await (await fetch(`${server.url}/metrics`)).text());
    t.is(metrics.value("keytrack_requests_accepted_total", { process: processId }), 8);
    t.is(metrics.find("keytrack_process_rows_recorded").find((s) => s.labels.process === processId)?.value, 6);
    // /metrics uses the 10-minute replay window: the fresh gap is not counted yet.
    t.is(metrics.find("keytrack_completeness_missing_requests").find((s) => s.labels.process === processId)?.value, 0);

    const report = await (await fetch(`${server.url}/admin/monitoring/api-key-tracking-quality?hours=1`, { headers: { authorization: `Bearer ${ADMIN_TOKEN}` } })).json();
    // The report uses the replay window too; it counts every process of the hour (earlier tests' as well).
    t.is(report.completeness.rows_missing, 0);
    t.is(report.completeness.requests_accepted, report.completeness.rows_recorded);
    t.true(report.completeness.rows_recorded >= 6);
    t.is(report.completeness.completeness_percent, 100);
    t.truthy(report.attribution_latency);
  } finally {
    await server.close();
  }
});

test.serial("several processes writing at once are checked independently", async (t) => {
  const a = await startTestServer(db, ANON);
  const b = await startTestServer(db, ANON);
  try {
    const [idsA, idsB] = await Promise.all([send(a, 10), send(b, 10)]);
    await rowsLanded([...idsA, ...idsB]);
    const pa = (await processOf(idsA[0]!)).process_id;
    const pb = (await processOf(idsB[0]!)).process_id;
    t.not(pa, pb);
    await db.owner.query("delete from app_public.chat_completion_requests where request_id = $1", [idsB[6]]);
    t.deepEqual(await gaps(pa), []);
    t.deepEqual(await gaps(pb), [{ process_state: "running", from_seq: 7, to_seq: 7, missing: 1 }]);
  } finally {
    await a.close();
    await b.close();
  }
});

test.serial("re-delivery and idempotent retries never produce a duplicate number", async (t) => {
  const server = await startTestServer(db, ANON);
  try {
    const ids = await send(server, 5);
    await rowsLanded(ids);
    const { process_id: processId } = await processOf(ids[0]!);
    // A writer re-sending a recorded request (same id, same number), and the recorder writing it again.
    await db.owner.query(
      "insert into app_public.chat_completion_requests (request_id, process_id, process_seq) values ($1, $2, 1)", [ids[0], processId]);
    const recorder = createRecorder({ pool: db.owner, dataDir: tempDataDir(), log: captureLog().log });
    try {
      const again = makeRow({ requestId: ids[1]!, processId, processSeq: 2 });
      t.like(await recorder.record(again), { outcome: "duplicate" });
      t.like(await recorder.record(again), { outcome: "duplicate" });
    } finally {
      await recorder.close();
    }
    const { rows } = await db.owner.query(
      "select process_seq::int as s, count(*)::int as n from app_public.chat_completion_requests where process_id = $1 group by 1 order by 1", [processId]);
    t.deepEqual(rows, [1, 2, 3, 4, 5].map((s) => ({ s, n: 1 })));
  } finally {
    await server.close();
  }
});

// ------------------------------------------------------------ a process killed with a non-empty spool

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer().listen(0, "127.0.0.1", () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
    s.on("error", reject);
  });
}

async function startChild(dataDir: string): Promise<{ child: ChildProcess; url: string }> {
  const port = await freePort();
  const child = spawn(process.execPath, ["--import=tsx", path.join(projectRoot, "server/index.ts")], {
    cwd: projectRoot,
    stdio: "ignore",
    env: {
      PATH: process.env.PATH,
      DATABASE_URL: db.ownerUrl,
      ROOT_DATABASE_URL: withDatabaseName(db.rootUrl, "postgres"),
      AUTH_DATABASE_URL: db.authUrl,
      KEYTRACK_DATA_DIR: dataDir,
      PORT: String(port),
      HOST: "127.0.0.1",
      APP_ENV: "test",
      WORKER: "false",
      LOG_LEVEL: "error",
      ECHO_MODEL: "true",
      RECORD_RETRY_ATTEMPTS: "1",
      ...ANON,
    },
  });
  const url = `http://127.0.0.1:${port}`;
  await waitFor("the service to start", async () => (await fetch(`${url}/health`).catch(() => null))?.status === 200, { intervalMs: 100 });
  return { child, url };
}

test.serial("a process killed with a non-empty spool shows a gap, reported as killed, that closes when its spool is replayed", async (t) => {
  const dataDir = tempDataDir();
  const first = await startChild(dataDir);
  let lock: import("pg").PoolClient | null = null;
  try {
    const landed = await send(first.url, 3);
    await rowsLanded(landed);
    const { process_id: processId } = await processOf(landed[0]!);

    // Inserts block (the request-id guard is locked): the next rows time out and go to the spool.
    const held = await db.root.connect();
    lock = held;
    await held.query("begin");
    await held.query("lock table app_private.request_ids in exclusive mode");
    const spooled = await send(first.url, 3);
    await waitFor("the heartbeat to report 6 accepted requests", async () =>
      Number((await db.owner.query("select accepted_seq from app_public.serving_processes where id = $1", [processId])).rows[0].accepted_seq) === 6);
    // Killed once the three rows are in its spool (each first try times out after 5 s).
    await waitFor("three rows in the spool", async () => (await readFile(spoolPaths(dataDir).requests, "utf8").catch(() => "")).trim().split("\n").filter(Boolean).length >= 3);
    first.child.kill("SIGKILL");
    await new Promise((r) => first.child.once("exit", r));
    // Its abandoned inserts still wait on the lock in their backends: end them, or they would commit on release.
    await db.root.query(
      "select pg_terminate_backend(pid) from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock' and pid <> $1",
      [(await held.query("select pg_backend_pid() as pid")).rows[0].pid]);
    await held.query("rollback");
    held.release();
    lock = null;

    // No heartbeat for 2 minutes (time moved by hand): killed, its tail reported at once.
    await db.owner.query("update app_public.serving_processes set heartbeat_at = now() - interval '3 minutes' where id = $1", [processId]);
    t.deepEqual(await gaps(processId, "600"), [{ process_state: "killed", from_seq: 4, to_seq: 6, missing: 3 }]);

    // A new process on the same data folder replays the spool: the gap closes.
    const second = await startChild(dataDir);
    try {
      await rowsLanded(spooled);
      t.deepEqual(await gaps(processId, "600"), []);
      const { rows } = await db.owner.query(
        "select process_seq::int as s from app_public.chat_completion_requests where process_id = $1 order by 1", [processId]);
      t.deepEqual(rows.map((r) => r.s), [1, 2, 3, 4, 5, 6]);
    } finally {
      second.child.kill("SIGTERM");
      await new Promise((r) => second.child.once("exit", r));
    }
  } finally {
    if (lock) {
      await lock.query("rollback").catch(() => {});
      lock.release();
    }
    if (first.child.exitCode === null) first.child.kill("SIGKILL");
  }
});
