/**
 * Prometheus for the app, in two steps:
 *
 * - installMetrics(app, ctx): early middleware (app.ts, right after /health)
 *   that times every request into http_request_duration_seconds, labelled by
 *   the matched route pattern, never the raw URL;
 * - installMetricsEndpoint: serves GET /metrics, behind
 *   `Authorization: Bearer $METRICS_TOKEN` when that is set.
 *
 * Both find the app's own registry (one per Express app) through a WeakMap.
 */
import type express from "express";

import { parseBearer } from "../auth/bearer.js";
import { safeEqual } from "../auth/secrets.js";
import type { AppContext, Installer } from "../context.js";
import { ApiError, sendError } from "../http/errors.js";
import { createMetrics, type KeytrackMetrics } from "./registry.js";

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

const UNAUTHORIZED = new ApiError(401, "a valid METRICS_TOKEN bearer token is required", "authentication_error", "unauthorized");

/** GET /metrics: Prometheus text format, behind `Authorization: Bearer $METRICS_TOKEN` when that is set. */
export const installMetricsEndpoint: Installer = (app, ctx) => {
  const metrics = metricsOf(app, ctx);
  if (ctx.workerJobs) metrics.addWorkerJobs(ctx.workerJobs);
  const token = ctx.config.metricsToken;
  app.get("/metrics", async (req, res, next) => {
    res.set("Cache-Control", "no-store");
    if (token !== null) {
      const bearer = parseBearer(req.get("authorization"));
      if (bearer.kind !== "token" || !safeEqual(bearer.token, token)) {
        res.set("WWW-Authenticate", 'Bearer realm="keytrack-metrics"');
        return sendError(res, UNAUTHORIZED);
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
