/**
 * The Express application: every route group of the service, installed here
 * in order, each from a file of its own. Order matters:
 *
 * 1. /health (no auth, no body parsing)
 * 2. request timing for http_request_duration_seconds
 * 3. (no global body parser: each route parses its JSON body after authenticating, server/http/jsonBody.ts)
 * 4. GraphQL: authentication, the JSON body parser (grafserv uses the parsed body), then PostGraphile (/graphql, /graphiql)
 * 5. /metrics (Prometheus)
 * 6. /v1: the OpenAI-compatible gateway
 * 7. /admin/monitoring: the spec's monitoring endpoints
 * 8. / and /console: the admin console (server/console)
 * 9. whatever the caller adds (tests), then the JSON 404 and error handlers
 *
 * Ahead of all of them, `handler` (what the HTTP server calls) gives plain
 * JSON POSTs to /v1/chat/completions and /v1/responses to the lean route
 * (chat/leanRoute.ts), which answers them as the Express route would.
 */
// Before PostGraphile is evaluated (tests may import this file directly).
import "./preamble.js";

import type http from "node:http";

import express from "express";
import type { PostGraphileInstance } from "postgraphile";

import { chatDeps, installChat } from "./chat/installChat.js";
import { leanChatRoute } from "./chat/leanRoute.js";
import { installConsole } from "./console/installConsole.js";
import { jsonBody } from "./http/jsonBody.js";
import type { AppContext, Installer } from "./context.js";
import { installMetrics, installMetricsEndpoint, metricsOf } from "./metrics/installMetrics.js";
import { installErrorHandler } from "./middleware/installErrorHandler.js";
import { installGraphQLAuth } from "./middleware/installGraphQLAuth.js";
import { installHealth } from "./middleware/installHealth.js";
import { GRAPHQL_PATH, installPostGraphile } from "./middleware/installPostGraphile.js";
import { installMonitoring } from "./monitoring/installMonitoring.js";

export interface MakeAppOptions {
  /** Extra routes, mounted after the service's own and before the 404 handler (tests). */
  extraInstallers?: Installer[];
  /** Serve the chat POSTs through the lean route (default true); false: Express only (tests compare both). */
  leanRoutes?: boolean;
}

export interface App {
  app: express.Express;
  /** The HTTP server's request listener: the lean route, else the Express app. */
  handler: (req: http.IncomingMessage, res: http.ServerResponse) => void;
  pgl: PostGraphileInstance;
  /** Releases PostGraphile (its pools and schema); the service's pools are closed by the caller. */
  close(): Promise<void>;
}

export async function makeApp(ctx: AppContext, options: MakeAppOptions = {}): Promise<App> {
  const app = express();
  app.disable("x-powered-by");

  installHealth(app, ctx);
  installMetrics(app, ctx);
  installGraphQLAuth(app, ctx);
  app.use(GRAPHQL_PATH, jsonBody(ctx.config));
  const postgraphile = await installPostGraphile(app, ctx);
  try {
    for (const install of [installMetricsEndpoint, installChat, installMonitoring, installConsole, ...(options.extraInstallers ?? [])]) {
      await install(app, ctx);
    }
    installErrorHandler(app, ctx);
  } catch (err) {
    await postgraphile.release();
    throw err;
  }

  const lean = options.leanRoutes === false ? null : leanChatRoute(app, ctx, chatDeps(ctx), metricsOf(app, ctx).httpDuration);
  const handler = lean
    ? (req: http.IncomingMessage, res: http.ServerResponse) => {
        if (!lean(req, res)) app(req, res);
      }
    : app;

  let closed: Promise<void> | null = null;
  return {
    app,
    handler,
    pgl: postgraphile.pgl,
    close: () => (closed ??= postgraphile.release()),
  };
}
