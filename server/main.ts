/**
 * Starts the whole service in this process: the embedded PostgreSQL when no
 * DATABASE_URL is set, database preparation (roles, database, migrations),
 * pools, the Express app and the HTTP listener. Tests call startServer
 * directly; server/index.ts adds signals and exit codes.
 */
import "./preamble.js";

import http from "node:http";
import type { AddressInfo } from "node:net";

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
import { getDevKey } from "./devMode.js";
import { startWorker } from "./worker/runner.js";
import { WorkerJobCounts } from "./metrics/workerJobs.js";
import { createLogger, type Logger } from "./log.js";

export interface StartServerOptions {
  log?: Logger;
  /** Extra routes mounted after the service's own, before the 404 handler (tests). */
  extraInstallers?: Installer[];
  /** Development mode's key, instead of asking the database for it (tests of the bypass). */
  devKey?: DevKey;
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
      log.info("embedded PostgreSQL ready", { socketDir: embedded.socketDir, reused: embedded.reused });
    }

    log.info("preparing the database", { url: redactUrl(connected.db.databaseUrl) });
    await prepareDatabase({
      rootUrl: connected.db.rootDatabaseUrl,
      databaseUrl: connected.db.databaseUrl,
      log: (msg) => log.info(msg, { component: "prepare" }),
    });

    const pools = createPools(connected.db, log);
    undo.push(() => closePools(pools));

    const recorder = createRecorder({ pool: pools.owner, dataDir: connected.dataDir, log: log.child({ component: "recorder" }), attempts: config.recordRetryAttempts, baseDelayMs: config.recordRetryBaseMs });
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
    const auth = createAuthenticator({ appEnv: config.appEnv, adminApiKey: config.adminApiKey, keys, log: log.child({ component: "auth" }) });

    // Job outcomes for /metrics, counted from the worker's first job on.
    const workerJobs = new WorkerJobCounts();
    if (connected.worker) {
      const worker = await startWorker({ config: connected, pool: pools.owner, log: log.child({ component: "worker" }), events: workerJobs.events });
      undo.push(() => worker.stop());
    }

    const ctx: AppContext = { config: connected, pools, log, auth, recorder, devKey, workerJobs, servingProcess };
    const app = await makeApp(ctx, { extraInstallers: options.extraInstallers });
    undo.push(() => app.close());

    const server = http.createServer(app.app);
    answerClientErrors(server);
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(config.port, config.host, () => {
        server.off("error", reject);
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

    let closing: Promise<void> | null = null;
    return { url, port, config: connected, close: () => (closing ??= unwind()) };
  } catch (err) {
    await unwind();
    throw err;
  }
}
