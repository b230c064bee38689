// A real streaming replica: a primary and a pg_basebackup standby, each its own
// cluster in a temporary folder on loopback ports (never the machine's shared
// server). With READ_DATABASE_URL on the standby, the monitoring reports,
// GraphQL queries and /metrics' database reads run there (counted in the
// standby's own statement log), nothing is written to it, a replica replaying
// too far behind or stopped makes reads fall back to the primary (counted by
// keytrack_read_replica_fallbacks_total), and every read says which node
// answered and as of when.
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { appendFile, chmod, chown, mkdtemp, readFile, rm } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import test from "ava";
import pg from "pg";

import { loadConfig } from "../../server/config.js";
import { prepareDatabase } from "../../server/db/prepare.js";
import { startServer, type RunningServer } from "../../server/main.js";
import { waitFor } from "../helpers/poll.js";
import { ADMIN_TOKEN, tempDataDir } from "../helpers/server.js";

const BIN = "/usr/lib/postgresql/15/bin";
const available = existsSync(path.join(BIN, "pg_basebackup"));
const serial = available ? test.serial : test.serial.skip;
if (!available) console.log(`# readReplica: skipped, ${BIN}/pg_basebackup not found (Debian's postgresql-15 provides it)`);

/** PostgreSQL refuses to run as root: as root, run its tools as the system user "postgres". */
let runAs: { uid: number; gid: number } | null = null;

function run(cmd: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(path.join(BIN, cmd), args, { stdio: ["ignore", "pipe", "pipe"], ...(runAs ?? {}) });
    let out = "";
    child.stdout.on("data", (c) => (out += c));
    child.stderr.on("data", (c) => (out += c));
    child.on("error", reject);
    child.on("close", (code) => (code === 0 ? resolve(out) : reject(new Error(`${cmd} ${args.join(" ")} exited with ${code}: ${out}`))));
  });
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

let dir: string;
let primaryPort: number;
let standbyPort: number;
let server: RunningServer;
let primaryRoot: pg.Pool;
let standbyRoot: pg.Pool;
const started: string[] = [];

const url = (user: string, port: number, db = "keytrack") => `postgres://${user}@127.0.0.1:${port}/${db}`;

async function startCluster(name: string): Promise<void> {
  await run("pg_ctl", ["-D", path.join(dir, name), "-l", path.join(dir, `${name}.log`), "-w", "-t", "120", "start"]);
  if (!started.includes(name)) started.push(name);
}

async function stopCluster(name: string, mode = "fast"): Promise<void> {
  await run("pg_ctl", ["-D", path.join(dir, name), "-m", mode, "-w", "-t", "120", "stop"]);
}

/** Statements the cluster logged that mention `text` (log_statement = all). */
async function logged(name: string, text: string): Promise<number> {
  const log = await readFile(path.join(dir, `${name}.log`), "utf8").catch(() => "");
  return log.split("\n").filter((line) => /LOG: {2}(statement|execute [^:]*):/.test(line) && line.includes(text)).length;
}

test.before(async () => {
  if (!available) return;
  if (os.userInfo().uid === 0) {
    const id = async (flag: string) => Number((await new Promise<string>((resolve, reject) => {
      const c = spawn("id", [flag, "postgres"]);
      let out = "";
      c.stdout.on("data", (d) => (out += d));
      c.on("error", reject);
      c.on("close", () => resolve(out));
    })).trim());
    runAs = { uid: await id("-u"), gid: await id("-g") };
  }
  dir = await mkdtemp(path.join(os.tmpdir(), "keytrack-replica-"));
  await chmod(dir, 0o755);
  if (runAs) await chown(dir, runAs.uid, runAs.gid);
  [primaryPort, standbyPort] = [await freePort(), await freePort()];

  await run("initdb", ["-D", path.join(dir, "primary"), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-instructions"]);
  await appendFile(path.join(dir, "primary", "postgresql.conf"), [
    "",
    `port = ${primaryPort}`,
    "listen_addresses = '127.0.0.1'",
    `unix_socket_directories = '${dir}'`,
    "wal_level = replica",
    "max_wal_senders = 4",
    "hot_standby = on",
    "fsync = off",
    "log_statement = 'all'",
    "",
  ].join("\n"));
  await startCluster("primary");
  primaryRoot = new pg.Pool({ connectionString: url("postgres", primaryPort, "postgres"), max: 2 });
  primaryRoot.on("error", () => {});
  await prepareDatabase({ rootUrl: url("postgres", primaryPort, "postgres"), databaseUrl: url("keytrack_owner", primaryPort) });

  await run("pg_basebackup", ["-h", "127.0.0.1", "-p", String(primaryPort), "-U", "postgres", "-D", path.join(dir, "standby"), "-R", "-X", "stream", "-c", "fast"]);
  await appendFile(path.join(dir, "standby", "postgresql.conf"), `\nport = ${standbyPort}\n`);
  await startCluster("standby");
  standbyRoot = new pg.Pool({ connectionString: url("postgres", standbyPort, "postgres"), max: 2 });
  standbyRoot.on("error", () => {});

  server = await startServer(loadConfig({
    KEYTRACK_DATA_DIR: tempDataDir(),
    DATABASE_URL: url("keytrack_owner", primaryPort),
    ROOT_DATABASE_URL: url("postgres", primaryPort, "postgres"),
    READ_DATABASE_URL: url("keytrack_owner", standbyPort),
    READ_MAX_LAG_MS: "1000",
    READ_CHECK_MS: "200",
    PORT: "0",
    HOST: "127.0.0.1",
    APP_ENV: "test",
    ADMIN_API_KEY: ADMIN_TOKEN,
    WORKER: "false",
    LOG_LEVEL: "error",
    ECHO_MODEL: "true",
  }));
});

test.after.always(async () => {
  await server?.close();
  await primaryRoot?.end();
  await standbyRoot?.end();
  for (const name of started.reverse()) await stopCluster(name, "immediate").catch(() => {});
  if (dir) await rm(dir, { recursive: true, force: true });
});

const admin = { authorization: `Bearer ${ADMIN_TOKEN}` };

async function quality() {
  const res = await fetch(`${server.url}/admin/monitoring/api-key-tracking-quality?hours=24`, { headers: admin });
  return { status: res.status, node: res.headers.get("x-keytrack-read-node"), asOf: res.headers.get("x-keytrack-read-as-of"), body: await res.json() as Record<string, unknown> };
}

async function totalCount() {
  const res = await fetch(`${server.url}/graphql`, {
    method: "POST",
    headers: { ...admin, "content-type": "application/json" },
    body: JSON.stringify({ query: "{ allChatCompletionRequests(first: 1) { totalCount } }" }),
  });
  const body = await res.json() as { data?: { allChatCompletionRequests: { totalCount: number } }; errors?: unknown };
  if (!body.data) throw new Error(`GraphQL failed: ${JSON.stringify(body)}`);
  return { node: res.headers.get("x-keytrack-read-node"), count: body.data.allChatCompletionRequests.totalCount };
}

async function metric(name: string, labels = ""): Promise<number> {
  const text = await (await fetch(`${server.url}/metrics`, { headers: admin })).text();
  const line = text.split("\n").find((l) => l.startsWith(`${name}${labels} `) || (labels === "" && l.startsWith(`${name} `)));
  return line ? Number(line.split(" ").pop()) : 0;
}

const ownerPool = (port: number) => {
  const p = new pg.Pool({ connectionString: url("keytrack_owner", port), max: 2 });
  p.on("error", () => {});
  return p;
};

async function chat(key?: string): Promise<number> {
  const res = await fetch(`${server.url}/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json", ...(key ? { authorization: `Bearer ${key}` } : {}) },
    body: JSON.stringify({ model: "echo", messages: [{ role: "user", content: "hi" }] }),
  });
  await res.arrayBuffer();
  return res.status;
}

serial("reads go to the replica and are counted there; writes go to the primary; nothing is written to the replica", async (t) => {
  const primary = ownerPool(primaryPort);
  const standby = ownerPool(standbyPort);
  try {
    const { rows: [user] } = await primary.query("insert into app_public.users (email) values ('replica@example.com') returning id");
    const { rows: [key] } = await primary.query("select * from app_public.create_api_key($1, 'replica')", [user.id]);
    for (let i = 0; i < 3; i++) t.is(await chat(key.secret), 200);
    const written = await waitFor("the rows to be recorded", async () => {
      const n = Number((await primary.query("select count(*) from app_public.chat_completion_requests")).rows[0].count);
      return n >= 3 && n;
    });
    await waitFor("the standby to replay them", async () =>
      Number((await standby.query("select count(*) from app_public.chat_completion_requests")).rows[0].count) === written);
    await waitFor("the router to find the replica healthy", async () => (await metric("keytrack_read_replica_healthy")) === 1);

    const before = { standby: await logged("standby", "api_key_tracking_quality_report"), primary: await logged("primary", "api_key_tracking_quality_report") };
    for (let i = 0; i < 3; i++) {
      const q = await quality();
      t.is(q.status, 200);
      t.is(q.node, "replica");
      t.truthy(q.asOf && !Number.isNaN(Date.parse(q.asOf)));
    }
    const g = await totalCount();
    t.deepEqual(g, { node: "replica", count: written });
    await waitFor("the standby's log to show the reports", async () =>
      (await logged("standby", "api_key_tracking_quality_report")) >= before.standby + 3);
    t.is(await logged("primary", "api_key_tracking_quality_report"), before.primary, "no report ran on the primary");
    t.true((await metric("keytrack_reads_total", '{node="replica"}')) >= 4);

    // Writes still work while reads go to the replica (a GraphQL mutation, a recorded request): the primary took them.
    const res = await fetch(`${server.url}/graphql`, {
      method: "POST",
      headers: { ...admin, "content-type": "application/json" },
      body: JSON.stringify({ query: "mutation { startAttributionBackfill(input: { batchSize: 10 }) { clientMutationId } }" }),
    });
    const body = await res.json() as { data?: unknown; errors?: unknown };
    t.falsy(body.errors, JSON.stringify(body.errors));
    t.is(await chat(key.secret), 200);
    t.is(await logged("standby", "insert into"), 0, "nothing tried to write to the standby");
    const standbyWrite = await standby.query("insert into app_public.users (email) values ('x@example.com')").catch((e) => e);
    t.is(standbyWrite.code, "25006", "the standby is read-only");
  } finally {
    await primary.end();
    await standby.end();
  }
});

serial("a replica replaying too far behind: reads fall back to the primary (counted), then return when it catches up", async (t) => {
  const primary = ownerPool(primaryPort);
  try {
    await standbyRoot.query("select pg_wal_replay_pause()");
    const fallbacksBefore = await metric("keytrack_read_replica_fallbacks_total", '{reason="lagging"}');
    // Rows the paused replica does not have.
    await primary.query(`insert into app_public.chat_completion_requests (request_id, api_key_hash)
                         select 'lag-' || i, null from generate_series(1, 5) i`);
    const expected = Number((await primary.query("select count(*) from app_public.chat_completion_requests")).rows[0].count);
    // READ_MAX_LAG_MS is 1 s and the paused replay falls further behind every moment: the router notices at a check.
    const fallback = await waitFor("reads to fall back to the primary", async () => {
      const q = await quality();
      return q.node === "primary" && q;
    }, { intervalMs: 100 });
    t.is(fallback.status, 200);
    t.true(Math.abs(Date.parse(fallback.asOf!) - Date.now()) < 60_000, "the primary answers as of now");
    t.deepEqual(await totalCount(), { node: "primary", count: expected }, "exact: the primary has every row");
    t.true((await metric("keytrack_read_replica_fallbacks_total", '{reason="lagging"}')) > fallbacksBefore);
    t.true((await metric("keytrack_read_replica_lag_seconds")) > 1);

    await standbyRoot.query("select pg_wal_replay_resume()");
    await waitFor("reads to return to the replica", async () => (await quality()).node === "replica", { intervalMs: 100 });
    t.deepEqual(await totalCount(), { node: "replica", count: expected }, "caught up: the replica has every row");
  } finally {
    await standbyRoot.query("select pg_wal_replay_resume()").catch(() => {});
    await primary.end();
  }
});

serial("a stopped replica: reads go to the primary at once, counted; back to the replica once it is up again", async (t) => {
  await standbyRoot.end();
  await stopCluster("standby", "immediate");
  const q = await quality();
  t.is(q.status, 200, "a stopped replica costs no failed read");
  t.is(q.node, "primary");
  const g = await totalCount();
  t.is(g.node, "primary");
  t.true((await metric("keytrack_read_replica_fallbacks_total", '{reason="failed"}')) + (await metric("keytrack_read_replica_fallbacks_total", '{reason="unreachable"}')) > 0);
  t.is(await metric("keytrack_read_replica_healthy"), 0);

  await startCluster("standby");
  standbyRoot = new pg.Pool({ connectionString: url("postgres", standbyPort, "postgres"), max: 2 });
  standbyRoot.on("error", () => {});
  await waitFor("reads to return to the replica", async () => (await quality()).node === "replica", { intervalMs: 100 });
  t.is((await totalCount()).node, "replica");
});
