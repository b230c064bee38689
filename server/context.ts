/**
 * What every part of the service is given: the settings, the pools, the log,
 * the one authenticator, the recording path. Built once by startServer
 * (main.ts) and handed to makeApp (app.ts), which installs every route group.
 */
import type express from "express";

import type { Authenticator } from "./auth/authenticator.js";
import type { DevKey } from "./chat/devKey.js";
import type { ConnectedConfig } from "./config.js";
import type { Pools } from "./db/pools.js";
import type { Logger } from "./log.js";
import type { WorkerJobCounts } from "./metrics/workerJobs.js";
import type { ServingProcess } from "./completeness/servingProcess.js";
import type { Recorder } from "./recording/types.js";

export interface AppContext {
  config: ConnectedConfig;
  pools: Pools;
  log: Logger;
  /** Who is calling, for every route (server/auth). */
  auth: Authenticator;
  /** The one recording path for request rows (retry, spool, replay). */
  recorder: Recorder;
  /** APP_ENV=development only: the dev key (or the bypass) that requests without credentials are attributed to. */
  devKey?: DevKey;
  /** Job outcomes of the worker running in this process (WORKER=true), for /metrics. */
  workerJobs?: WorkerJobCounts;
  /** This process's identity and request numbering (completeness); absent in unit tests' contexts. */
  servingProcess?: ServingProcess;
}

/** One route group, mounted by makeApp. */
export type Installer = (app: express.Express, ctx: AppContext) => void | Promise<void>;
