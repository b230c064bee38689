/**
 * The Express application, assembled from small install steps (one file each
 * under middleware/). Order matters: health first (no auth, no body), then the
 * JSON body parser, GraphQL auth, PostGraphile, extra routes, and last the
 * 404 and error handlers.
 */
// Before PostGraphile is evaluated (tests may import this file directly).
import "./preamble.js";

import express from "express";
import type { PostGraphileInstance } from "postgraphile";

import type { ConnectedConfig } from "./config.js";
import type { Pools } from "./db/pools.js";
import type { Logger } from "./log.js";
import type { Recorder } from "./recording/types.js";
import type { DevKey } from "./chat/devKey.js";
import { installAdminAuth } from "./middleware/installAdminAuth.js";
import { installErrorHandler } from "./middleware/installErrorHandler.js";
import { installHealth } from "./middleware/installHealth.js";
import { installPostGraphile } from "./middleware/installPostGraphile.js";
import { installMetrics } from "./metrics/installMetrics.js";

export interface AppContext {
  config: ConnectedConfig;
  pools: Pools;
  log: Logger;
  /** The one recording path for request rows (retry, spool, replay). */
  recorder: Recorder;
  /** APP_ENV=development only: the dev key (or the bypass) that requests without credentials are attributed to. */
  devKey?: DevKey;
}

/** A route group added by another module (metrics, monitoring, chat), mounted before the 404 handler. */
export type Installer = (app: express.Express, ctx: AppContext) => void | Promise<void>;

export interface MakeAppOptions {
  installers?: Installer[];
}

export interface App {
  app: express.Express;
  pgl: PostGraphileInstance;
  /** Releases PostGraphile (its pools and schema); the service's pools are closed by the caller. */
  close(): Promise<void>;
}

export async function makeApp(ctx: AppContext, options: MakeAppOptions = {}): Promise<App> {
  const app = express();
  app.disable("x-powered-by");

  installHealth(app, ctx);
  // Times every later request (http_request_duration_seconds); /metrics itself is an installer.
  installMetrics(app, ctx);
  // application/json bodies for every route; grafserv uses the parsed body when present.
  app.use(express.json({ limit: ctx.config.bodyLimit }));
  installAdminAuth(app, ctx);
  const postgraphile = await installPostGraphile(app, ctx);
  try {
    for (const install of options.installers ?? []) await install(app, ctx);
    installErrorHandler(app, ctx);
  } catch (err) {
    await postgraphile.release();
    throw err;
  }

  let closed: Promise<void> | null = null;
  return {
    app,
    pgl: postgraphile.pgl,
    close: () => (closed ??= postgraphile.release()),
  };
}
