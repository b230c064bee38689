// `npm run worker`: graphile-worker as its own process (run the web processes
// with WORKER=false). Needs DATABASE_URL: the embedded PostgreSQL belongs to the
// web process.
import "../preamble.js";
import pg from "pg";
import { ConfigError, isConnected, loadConfig } from "../config.js";
import { prepareDatabase } from "../db/prepare.js";
import { createLogger } from "../log.js";
import { keepRunningOnUnhandledRejections } from "../unhandled.js";
import { startWorker } from "./runner.js";

async function main(): Promise<void> {
  const config = loadConfig();
  if (!isConnected(config)) throw new ConfigError("DATABASE_URL must be set for a separate worker process");
  const log = createLogger({ level: config.logLevel, json: config.appEnv === "production" }, { component: "worker" });
  await prepareDatabase({ rootUrl: config.db.rootDatabaseUrl, databaseUrl: config.db.databaseUrl, log: (m) => log.info(m) });
  const pool = new pg.Pool({ connectionString: config.db.databaseUrl, max: config.workerConcurrency + 2 });
  pool.on("error", (err) => log.warn("idle database connection failed", { error: err }));
  keepRunningOnUnhandledRejections(log);
  const worker = await startWorker({ config, pool, log });
  log.info("keytrack worker running");
  const shutdown = async () => {
    log.info("stopping the worker (finishing running jobs)");
    await worker.stop();
    await pool.end();
    process.exit(0);
  };
  process.once("SIGINT", shutdown);
  process.once("SIGTERM", shutdown);
}

main().catch((err) => {
  console.error(err instanceof ConfigError ? `keytrack: configuration error: ${err.message}` : `keytrack worker: ${err.stack ?? err}`);
  process.exit(err instanceof ConfigError ? 2 : 1);
});
