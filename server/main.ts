/**
 * Starts the whole service in this process: the embedded PostgreSQL when no
 * DATABASE_URL is set, database preparation (roles, database, migrations),
 * pools, the Express app and the HTTP listener. Tests call startServer
 * directly; server/index.ts adds signals and exit codes.
 */
import "./preamble.js";

import http from "node:http";
import net, { type AddressInfo } from "node:net";

import pg from "pg";

import { makeApp } from "./app.js";
import { createAuthenticator } from "./auth/authenticator.js";
import { registerServingProcess } from "./completeness/servingProcess.js";
import { listenForKeyChanges } from "./auth/keyChanges.js";
import { createKeyLookup, queryKey } from "./auth/keyLookup.js";
import type { DevKey } from "./chat/devKey.js";
import type { AppContext, Installer } from "./context.js";
import { type Config, type ConnectedConfig, isConnected, withDatabaseUrls } from "./config.js";
import { redactUrl } from "./db/urls.js";
import { answerClientErrors } from "./http/clientErrors.js";
import { startEmbeddedPostgres, type EmbeddedPostgres } from "./db/embedded.js";
import { closePools, createPools } from "./db/pools.js";
import { prepareDatabase } from "./db/prepare.js";
import { createRecorder } from "./recording/recorder.js";
import { describeAdminCredentials, getDevKey, getOrCreateAdminToken, printAdminToken, type AdminCredentials } from "./devMode.js";
import { startWorker } from "./worker/runner.js";
import { WorkerJobCounts } from "./metrics/workerJobs.js";
import { createLogger, type Logger } from "./log.js";

export interface StartServerOptions {
  log?: Logger;
  /** Extra routes mounted after the service's own, before the 404 handler (tests). */
  extraInstallers?: Installer[];
  /** Development mode's key, instead of asking the database for it (tests of the bypass). */
  devKey?: DevKey;
  /** Serve the chat POSTs through the lean route (default true; app.ts); false: Express only. */
  leanRoutes?: boolean;
}

export interface RunningServer {
  /** e.g. http://localhost:8000 (the actual port when PORT=0 was used in tests). */
  url: string;
  port: number;
  config: ConnectedConfig;
  /** Stops accepting connections, then releases PostGraphile, the pools and the embedded PostgreSQL. */
  close(): Promise<void>;
}

const SHUTDOWN_GRACE_MS = 5000;

/**
 * A start-up failure the operator can fix from its message alone (a busy port,
 * a database that cannot be reached): server/index.ts prints the message as one
 * line, without a stack, and exits 1.
 */
export class StartupError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "StartupError";
  }
}

/** A listen error as a StartupError naming PORT or HOST, or the error itself when it is something else. */
function listenError(err: unknown, host: string, port: number): unknown {
  switch ((err as NodeJS.ErrnoException)?.code) {
    case "EADDRINUSE":
      return new StartupError(
        `PORT ${port} is already in use on ${host} (another keytrack, or another program): stop it, or set PORT ` +
          `to a free port (e.g. PORT=${port === 65535 ? 8001 : port + 1}; PORT=0 takes any free one)`,
        { cause: err },
      );
    case "EACCES":
      return new StartupError(`PORT ${port} on ${host} needs privileges this process does not have: set PORT to 1024 or above`, { cause: err });
    case "EADDRNOTAVAIL":
    case "ENOTFOUND":
    case "EAI_AGAIN":
      return new StartupError(`HOST ${host} is not an address of this machine: set HOST (0.0.0.0: every interface, 127.0.0.1: this machine only)`, { cause: err });
    default:
      return err;
  }
}

/**
 * Fails fast, before the database is touched, when HOST:PORT cannot be listened
 * on. (The port is released again and taken for good once the app is ready; a
 * program that grabs it in between is reported the same way by the real listen.)
 */
async function assertCanListen(host: string, port: number): Promise<void> {
  if (port === 0) return;
  const probe = net.createServer();
  try {
    await new Promise<void>((resolve, reject) => {
      probe.once("error", reject);
      probe.listen({ port, host, exclusive: true }, () => resolve());
    });
  } catch (err) {
    throw listenError(err, host, port);
  }
  await new Promise<void>((resolve) => probe.close(() => resolve()));
}

/** Codes of errors that mean "could not connect or log in" rather than "the SQL failed". */
const CONNECTION_ERROR_CODES = new Set([
  "ECONNREFUSED", "ENOTFOUND", "EAI_AGAIN", "ETIMEDOUT", "EHOSTUNREACH", "ENETUNREACH", "ECONNRESET",
  "28P01", "28000", "3D000", "57P03", "53300",
]);

function isConnectionError(err: unknown): boolean {
  const e = err as { code?: string; message?: string };
  return (e?.code !== undefined && CONNECTION_ERROR_CODES.has(e.code)) || /timeout expired|Connection terminated/i.test(e?.message ?? "");
}

function errorText(err: unknown): string {
  const e = err as { message?: string; code?: string; errors?: Array<{ message?: string }> };
  // A refused connection to a name with several addresses is an AggregateError with an empty message.
  return e?.message || e?.errors?.map((x) => x.message).filter(Boolean).join("; ") || e?.code || String(err);
}

function connectionHint(err: unknown): string {
  switch ((err as { code?: string })?.code) {
    case "ECONNREFUSED":
      return "Nothing accepts connections there: is the PostgreSQL server running, and are the host and port in the URL right?";
    case "ENOENT":
      return "There is no PostgreSQL socket there: is the server running, and are the socket folder (host=) and port right?";
    case "ENOTFOUND":
    case "EAI_AGAIN":
      return "The host name does not resolve: check the host in the URL";
    case "28P01":
    case "28000":
      return "The server refused the login: check the user and password in the URL (and the server's pg_hba.conf)";
    case "3D000":
      return "That database does not exist on the server: check the database name in the URL";
    case "57P03":
      return "The server is starting up or shutting down: try again in a moment";
    default:
      return "Is the PostgreSQL server running and reachable from here? Check the host and port in the URL, and the user and password";
  }
}

function unreachable(setting: string, url: string, err: unknown): StartupError {
  return new StartupError(
    `cannot connect to the database: ${setting} is ${redactUrl(url)}: ${errorText(err)}. ${connectionHint(err)}`,
    { cause: err },
  );
}

/** Connects once to url, so that a server that cannot be reached is named by its setting before anything else runs. */
async function assertReachable(setting: string, url: string): Promise<void> {
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 15_000 });
  client.on("error", () => {});
  try {
    await client.connect();
  } catch (err) {
    throw unreachable(setting, url, err);
  } finally {
    await client.end().catch(() => {});
  }
}

export async function startServer(config: Config, options: StartServerOptions = {}): Promise<RunningServer> {
  const log = options.log ?? createLogger({ level: config.logLevel, json: config.appEnv === "production" });

  // Each step pushes its undo, so a failure half-way (or close()) unwinds what was started, in reverse.
  const undo: Array<() => Promise<void>> = [];
  const unwind = async () => {
    while (undo.length) {
      const step = undo.pop()!;
      await step().catch((err) => log.error("shutdown step failed", { error: err }));
    }
  };

  try {
    await assertCanListen(config.host, config.port);

    // Admin credentials: ADMIN_API_KEY, else (development only) a token generated once and kept in the data folder.
    let adminApiKey = config.adminApiKey;
    let adminCredentials: AdminCredentials;
    if (adminApiKey !== null) {
      adminCredentials = { source: "environment" };
    } else if (config.appEnv === "development") {
      const stored = await getOrCreateAdminToken(config.dataDir);
      adminApiKey = stored.token;
      adminCredentials = { source: "generated", path: stored.path, created: stored.created };
    } else {
      adminCredentials = { source: "none" };
    }

    let connected: ConnectedConfig;
    let embedded: EmbeddedPostgres | null = null;
    if (isConnected(config)) {
      connected = config;
    } else {
      const pgLog = log.child({ component: "postgres" });
      log.info("DATABASE_URL is unset: starting the embedded PostgreSQL", { dataDir: config.dataDir });
      embedded = await startEmbeddedPostgres({
        dataDir: config.dataDir,
        port: config.embeddedPgPort,
        // A statement's ERROR already reached its client: debug. The server's own trouble: warn.
        log: (line) =>
          /\b(WARNING|FATAL|PANIC):/.test(line)
            ? pgLog.warn(line)
            : /\bERROR:/.test(line)
              ? pgLog.debug(line)
              : pgLog.info(line),
        verbose: config.logLevel === "debug",
      });
      const emb = embedded;
      undo.push(() => emb.stop());
      connected = withDatabaseUrls(config, { databaseUrl: embedded.ownerUrl, rootDatabaseUrl: embedded.rootUrl });
      log.info("embedded PostgreSQL ready", {
        socketDir: embedded.socketDir,
        existingData: embedded.existingData,
        joinedRunning: embedded.joinedRunning,
      });
    }
    connected = { ...connected, adminApiKey };

    // The settings a failure is named by: the operator's own, or derived from DATABASE_URL.
    const rootSetting = embedded
      ? config.dbOverrides.rootDatabaseUrl ? "ROOT_DATABASE_URL" : "the embedded PostgreSQL"
      : config.dbOverrides.rootDatabaseUrl ? "ROOT_DATABASE_URL" : "ROOT_DATABASE_URL (derived from DATABASE_URL)";
    const ownerSetting = embedded ? "the embedded PostgreSQL" : "DATABASE_URL";
    await assertReachable(rootSetting, connected.db.rootDatabaseUrl);
    log.info("preparing the database", { url: redactUrl(connected.db.databaseUrl) });
    try {
      await prepareDatabase({
        rootUrl: connected.db.rootDatabaseUrl,
        databaseUrl: connected.db.databaseUrl,
        log: (msg) => log.info(msg, { component: "prepare" }),
      });
    } catch (err) {
      // The root connection answered just now: a login failure here is the owner's.
      if (isConnectionError(err)) throw unreachable(ownerSetting, connected.db.databaseUrl, err);
      throw err;
    }

    const pools = createPools(connected.db, log, config);
    undo.push(() => closePools(pools));
    await pools.reads.start();

    const recorder = createRecorder({ pool: pools.owner, dataDir: connected.dataDir, log: log.child({ component: "recorder" }), attempts: config.recordRetryAttempts, baseDelayMs: config.recordRetryBaseMs, batchSize: config.recordBatchSize, concurrency: config.recordConcurrency });
    undo.push(() => recorder.close());

    // Registered before anything is accepted; its clean stop is recorded after the listener has
    // closed (undo runs in reverse) and before the recorder's last rows are flushed or spooled.
    const servingProcess = await registerServingProcess({
      pool: pools.owner,
      log: log.child({ component: "completeness" }),
      heartbeatMs: config.completenessHeartbeatMs,
    });
    undo.push(() => servingProcess.close());

    const devKey = connected.appEnv === "development" ? (options.devKey ?? (await getDevKey(pools.owner, log))) : undefined;

    const keys = createKeyLookup({ query: queryKey(pools.owner), ttlMs: config.authCacheTtlMs, staleMaxMs: config.authStaleMaxMs });
    const keyChanges = listenForKeyChanges({ connectionString: connected.db.databaseUrl, keys, log: log.child({ component: "auth" }) });
    undo.push(() => keyChanges.close());
    await keyChanges.ready;
    const auth = createAuthenticator({ appEnv: config.appEnv, adminApiKey, keys, log: log.child({ component: "auth" }) });

    // Job outcomes for /metrics, counted from the worker's first job on.
    const workerJobs = new WorkerJobCounts();
    if (connected.worker) {
      const worker = await startWorker({ config: connected, pool: pools.owner, log: log.child({ component: "worker" }), events: workerJobs.events });
      undo.push(() => worker.stop());
    }

    const ctx: AppContext = { config: connected, pools, log, auth, recorder, devKey, workerJobs, servingProcess };
    const app = await makeApp(ctx, { extraInstallers: options.extraInstallers, leanRoutes: options.leanRoutes });
    undo.push(() => app.close());

    const server = http.createServer(app.handler);
    answerClientErrors(server);
    await new Promise<void>((resolve, reject) => {
      const failed = (err: unknown) => reject(listenError(err, config.host, config.port));
      server.once("error", failed);
      server.listen(config.port, config.host, () => {
        server.off("error", failed);
        resolve();
      });
    });
    undo.push(
      () =>
        new Promise<void>((resolve) => {
          // Finish in-flight requests; idle keep-alive sockets are closed now, stragglers after the grace period.
          const force = setTimeout(() => server.closeAllConnections(), SHUTDOWN_GRACE_MS);
          force.unref();
          server.close(() => {
            clearTimeout(force);
            resolve();
          });
          server.closeIdleConnections();
        }),
    );

    const port = (server.address() as AddressInfo).port;
    const url = `http://localhost:${port}`;
    log.info(`keytrack listening on ${url} (graphql /graphql, graphiql /graphiql)`);
    log.info(describeAdminCredentials(adminCredentials));
    if (adminCredentials.source === "generated") printAdminToken(url, adminApiKey!, adminCredentials.path);

    let closing: Promise<void> | null = null;
    return { url, port, config: connected, close: () => (closing ??= unwind()) };
  } catch (err) {
    await unwind();
    throw err;
  }
}
