/**
 * Prometheus for the app, in two steps:
 *
 * - installMetrics(app, ctx): early middleware (app.ts, right after /health)
 *   that times every request into http_request_duration_seconds, labelled by
 *   the matched route pattern, never the raw URL;
 * - metricsEndpoint(options): the Installer that serves GET /metrics (main.ts),
 *   behind `Authorization: Bearer $METRICS_TOKEN` when that is set.
 *
 * Both find the app's own registry (one per Express app) through a WeakMap.
 */
import type express from "express";

import type { AppContext, Installer } from "../app.js";
import { safeEqual } from "../middleware/installAdminAuth.js";
import { createMetrics, type KeytrackMetrics } from "./registry.js";
import type { WorkerJobCounts } from "./workerJobs.js";

const byApp = new WeakMap<express.Express, KeytrackMetrics>();

/** The app's metrics, created on first use. */
export function metricsOf(app: express.Express, ctx: AppContext): KeytrackMetrics {
  let metrics = byApp.get(app);
  if (!metrics) {
    metrics = createMetrics(ctx);
    byApp.set(app, metrics);
  }
  return metrics;
}

/**
 * Paths served by middleware rather than a route (grafserv mounts /graphql and
 * /graphiql with app.use), kept as their own route label.
 */
const MIDDLEWARE_PATHS = new Set(["/graphql", "/graphiql"]);

function routeOf(req: express.Request): string {
  const route = req.route as { path?: unknown } | undefined;
  if (route && route.path !== undefined) return `${req.baseUrl}${String(route.path)}`;
  const path = req.originalUrl.split("?", 1)[0]!;
  return MIDDLEWARE_PATHS.has(path) ? path : "unmatched";
}

export function installMetrics(app: express.Express, ctx: AppContext): void {
  const { httpDuration } = metricsOf(app, ctx);
  app.use((req, res, next) => {
    const start = process.hrtime.bigint();
    // `close` comes after `finish`, or alone when the client went away first.
    res.once("close", () => {
      const seconds = Number(process.hrtime.bigint() - start) / 1e9;
      const status = res.writableFinished ? String(res.statusCode) : "499";
      httpDuration.observe({ method: req.method, route: routeOf(req), status_code: status }, seconds);
    });
    next();
  });
}

const UNAUTHORIZED = {
  error: { message: "a valid METRICS_TOKEN bearer token is required", type: "invalid_request_error", code: "unauthorized" },
};
const BEARER = /^Bearer +(\S+) *$/i;

export interface MetricsEndpointOptions {
  /** Job outcomes of the worker running in this process (WORKER=true). */
  workerJobs?: WorkerJobCounts;
}

/** GET /metrics: Prometheus text format. */
export function metricsEndpoint(options: MetricsEndpointOptions = {}): Installer {
  return (app, ctx) => {
    const metrics = metricsOf(app, ctx);
    if (options.workerJobs) metrics.addWorkerJobs(options.workerJobs);
    const token = ctx.config.metricsToken;
    app.get("/metrics", async (req, res, next) => {
      res.set("Cache-Control", "no-store");
      if (token !== null) {
        const presented = BEARER.exec(req.get("authorization") ?? "")?.[1];
        if (presented === undefined || !safeEqual(presented, token)) {
          res.set("WWW-Authenticate", 'Bearer realm="keytrack-metrics"');
          res.status(401).json(UNAUTHORIZED);
          return;
        }
      }
      try {
        const body = await metrics.registry.metrics();
        res.set("Content-Type", metrics.registry.contentType);
        res.send(body);
      } catch (err) {
        next(err);
      }
    });
  };
}
