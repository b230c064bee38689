// Must be evaluated before anything from PostGraphile: keep this import first.
import "./preamble.js";

import { ConfigError, loadConfig, unknownSettingWarnings, type Config } from "./config.js";
import { createLogger } from "./log.js";
import { startServer, StartupError } from "./main.js";
import { keepRunningOnUnhandledRejections } from "./unhandled.js";

let config: Config;
try {
  config = loadConfig();
} catch (err) {
  if (err instanceof ConfigError) {
    process.stderr.write(`keytrack: configuration error: ${err.message}\n`);
    process.exit(2);
  }
  throw err;
}

const log = createLogger({ level: config.logLevel, json: config.appEnv === "production" });

// Look-alikes of settings (DATABSE_URL, ADMIN_APIKEY): probably meant, certainly ignored.
for (const w of unknownSettingWarnings(process.env)) log.warn(w.message, { variable: w.name, setting: w.meant });

let server: Awaited<ReturnType<typeof startServer>>;
try {
  server = await startServer(config, { log });
} catch (err) {
  // A cause the operator fixes from the message alone (busy PORT, unreachable database): one line, no stack.
  if (err instanceof StartupError) process.stderr.write(`keytrack: ${err.message}\n`);
  else log.error("keytrack failed to start", { error: err });
  process.exit(1);
}

let shuttingDown = false;
const onSignal = (signal: NodeJS.Signals) => {
  if (shuttingDown) {
    log.warn(`second ${signal}: exiting immediately`);
    process.exit(1);
  }
  shuttingDown = true;
  log.info(`${signal} received: shutting down`);
  server.close().then(
    () => {
      log.info("keytrack stopped");
      process.exit(0);
    },
    (err: unknown) => {
      log.error("shutdown failed", { error: err });
      process.exit(1);
    },
  );
};
keepRunningOnUnhandledRejections(log);
process.on("SIGINT", onSignal);
process.on("SIGTERM", onSignal);
