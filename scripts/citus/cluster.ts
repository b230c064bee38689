// A Citus cluster on loopback for the tests and the drill: a coordinator and N
// workers, each its own `initdb` (Debian's PostgreSQL 15 tools) in a temporary
// folder with shared_preload_libraries = 'citus', listening on 127.0.0.1 on a
// free port, trust authentication, never the machine's shared server. As root,
// PostgreSQL's tools run as the system user "postgres" (PostgreSQL refuses
// root). Used by scripts/drills/citus.ts and tests/scale/citus.test.ts.
//
// What an operator does by hand on real machines is here in code, in the same
// order (docs/operations.md, "Citus"): every node gets keytrack's roles and
// database (ensureDatabase) and `create extension citus` in it; the
// coordinator registers itself (citus_set_coordinator_host) and its workers
// (citus_add_node). keytrack's schema is migrated on the coordinator only, and
// `npm run db:distribute` (scripts/citus/distribute.ts) distributes it.
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { appendFile, chmod, chown, mkdtemp, readFile, rm } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";

import pg from "pg";

import { ensureDatabase } from "../../server/db/prepare.js";

export const PG_BIN = "/usr/lib/postgresql/15/bin";
/** The extension's library, installed by ../shared/vendor/citus/build.sh (or a Citus package). */
export const CITUS_LIBRARY = "/usr/lib/postgresql/15/lib/citus.so";

/** Why a Citus cluster cannot be built on this machine, or null when it can. */
export function citusUnavailable(): string | null {
  if (!existsSync(path.join(PG_BIN, "initdb"))) return `${PG_BIN}/initdb not found (Debian's postgresql-15 provides it)`;
  if (!existsSync(CITUS_LIBRARY)) return `${CITUS_LIBRARY} not found (install Citus: sudo bash ../shared/vendor/citus/build.sh)`;
  return null;
}

/** PostgreSQL refuses to run as root: as root, its tools run as the system user "postgres". */
async function postgresUser(): Promise<{ uid: number; gid: number } | null> {
  if (os.userInfo().uid !== 0) return null;
  const id = (flag: string) => new Promise<number>((resolve, reject) => {
    const c = spawn("id", [flag, "postgres"]);
    let out = "";
    c.stdout.on("data", (d) => (out += d));
    c.on("error", reject);
    c.on("close", (code) => (code === 0 ? resolve(Number(out.trim())) : reject(new Error("as root, the system user postgres must exist (Debian's postgresql-15 creates it)"))));
  });
  return { uid: await id("-u"), gid: await id("-g") };
}

function run(cmd: string, args: string[], runAs: { uid: number; gid: number } | null): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(path.join(PG_BIN, cmd), args, {
      stdio: ["ignore", "pipe", "pipe"],
      ...(runAs ?? {}),
      // Not root's HOME (the server's libpq reads ~/.postgresql): the cluster's own.
      env: { ...process.env, HOME: os.tmpdir(), PGSSLMODE: "disable" },
    });
    let out = "";
    child.stdout.on("data", (c) => (out += c));
    child.stderr.on("data", (c) => (out += c));
    child.on("error", reject);
    child.on("close", (code) => (code === 0 ? resolve(out) : reject(new Error(`${cmd} ${args.join(" ")} exited with ${code}: ${out}`))));
  });
}

/** A port nobody listens on at 127.0.0.1 right now (the OS picks it). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

export interface CitusNode {
  /** "coordinator", "worker1", "worker2", ... */
  name: string;
  port: number;
  dataDir: string;
  logFile: string;
  running: boolean;
}

export interface CitusClusterOptions {
  /** Worker nodes (default 2). */
  workers?: number;
  /** Extra postgresql.conf lines for every node. */
  settings?: string[];
  /** Progress lines. */
  log?: (line: string) => void;
}

export class CitusCluster {
  private constructor(
    /** The temporary folder: one data folder and one log file per node, and the nodes' sockets. */
    readonly dir: string,
    readonly coordinator: CitusNode,
    readonly workers: CitusNode[],
    private readonly runAs: { uid: number; gid: number } | null,
  ) {}

  get nodes(): CitusNode[] {
    return [this.coordinator, ...this.workers];
  }

  /** A connection string to a node over TCP on loopback. */
  url(node: CitusNode, user = "postgres", database = "postgres"): string {
    return `postgres://${user}@127.0.0.1:${node.port}/${database}`;
  }

  /**
   * initdb and start a coordinator and `workers` workers, in parallel. On a
   * failure everything started so far is stopped and removed.
   */
  static async start(options: CitusClusterOptions = {}): Promise<CitusCluster> {
    const why = citusUnavailable();
    if (why) throw new Error(`cannot start a Citus cluster: ${why}`);
    const runAs = await postgresUser();
    const dir = await mkdtemp(path.join(os.tmpdir(), "keytrack-citus-"));
    await chmod(dir, 0o755);
    if (runAs) await chown(dir, runAs.uid, runAs.gid);
    const names = ["coordinator", ...Array.from({ length: options.workers ?? 2 }, (_, i) => `worker${i + 1}`)];
    const nodes: CitusNode[] = [];
    for (const name of names) {
      nodes.push({ name, port: await freePort(), dataDir: path.join(dir, name), logFile: path.join(dir, `${name}.log`), running: false });
    }
    const cluster = new CitusCluster(dir, nodes[0]!, nodes.slice(1), runAs);
    try {
      await Promise.all(nodes.map(async (node) => {
        await run("initdb", ["-D", node.dataDir, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-instructions"], runAs);
        await appendFile(node.dataDir + "/postgresql.conf", [
          "",
          "# keytrack's Citus cluster on loopback (scripts/citus/cluster.ts)",
          `port = ${node.port}`,
          "listen_addresses = '127.0.0.1'",
          `unix_socket_directories = '${dir}'`,
          "shared_preload_libraries = 'citus'",
          "max_connections = 200",
          // A throw-away cluster: durability is not what it tests.
          "fsync = off",
          "synchronous_commit = off",
          "full_page_writes = off",
          "shared_buffers = 64MB",
          // Citus's maintenance daemon and prepared transactions (2PC across nodes).
          "max_prepared_transactions = 100",
          // Loopback between the nodes: no TLS (libpq would otherwise look for client certificates in $HOME).
          "citus.node_conninfo = 'sslmode=disable'",
          ...(options.settings ?? []),
          "",
        ].join("\n"));
        await cluster.startNode(node);
      }));
      options.log?.(`citus: ${nodes.map((n) => `${n.name} on 127.0.0.1:${n.port}`).join(", ")} (in ${dir})`);
      return cluster;
    } catch (err) {
      await cluster.stop();
      throw err;
    }
  }

  async startNode(node: CitusNode): Promise<void> {
    await run("pg_ctl", ["-D", node.dataDir, "-l", node.logFile, "-w", "-t", "120", "start"], this.runAs);
    node.running = true;
  }

  async stopNode(node: CitusNode, mode: "fast" | "immediate" = "fast"): Promise<void> {
    if (!node.running) return;
    await run("pg_ctl", ["-D", node.dataDir, "-m", mode, "-w", "-t", "120", "stop"], this.runAs);
    node.running = false;
  }

  /** The last lines of a node's server log (for failures). */
  async logTail(node: CitusNode, lines = 30): Promise<string[]> {
    const text = await readFile(node.logFile, "utf8").catch(() => "");
    return text.split("\n").filter(Boolean).slice(-lines);
  }

  /**
   * Makes `database` a Citus database on every node, as an operator would:
   * keytrack's roles, the database owned by `owner` with its privileges
   * (ensureDatabase: migrations/roles.sql and afterReset.sql), `create
   * extension citus` in it; then, on the coordinator, registers itself and
   * adds the workers. keytrack's schema itself is not created here: migrate
   * the coordinator (prepareDatabase), then distribute it.
   */
  async createDatabase(database = "keytrack", owner = "keytrack_owner"): Promise<void> {
    await Promise.all(this.nodes.map(async (node) => {
      await ensureDatabase(this.url(node), this.url(node, owner, database));
      await this.query(node, database, "create extension if not exists citus");
    }));
    await this.query(this.coordinator, database, "select citus_set_coordinator_host('127.0.0.1', $1)", [this.coordinator.port]);
    for (const worker of this.workers) await this.addNode(worker, database);
  }

  /** citus_add_node for a worker (no-op when it is in the metadata already). */
  async addNode(worker: CitusNode, database = "keytrack"): Promise<void> {
    await this.query(this.coordinator, database, "select citus_add_node('127.0.0.1', $1)", [worker.port]);
  }

  /** One statement as the superuser on a node's database. */
  async query<R extends pg.QueryResultRow = pg.QueryResultRow>(node: CitusNode, database: string, sql: string, params: unknown[] = []): Promise<pg.QueryResult<R>> {
    const client = new pg.Client({ connectionString: this.url(node, "postgres", database) });
    await client.connect();
    try {
      return await client.query<R>(sql, params);
    } finally {
      await client.end();
    }
  }

  /** Stops every node (fast, then immediate if that fails) and removes the folder. Safe to call twice. */
  async stop(): Promise<void> {
    await Promise.all(this.nodes.map(async (node) => {
      await this.stopNode(node).catch(() => this.stopNode(node, "immediate")).catch(() => {});
    }));
    await rm(this.dir, { recursive: true, force: true });
  }
}
