/**
 * The spec's admin monitoring endpoints (admins only, see requireAdmin):
 *
 * - GET /admin/monitoring/api-key-tracking-quality?hours=24  (1..168)
 * - GET /admin/monitoring/api-key-tracking-trend?days=7      (1..30)
 *
 * Both read the SQL reports on the read pool (READ_DATABASE_URL when set). A
 * bad or unknown parameter is a 422 naming it and its bounds (or the known one); a database failure is a
 * 503, never a 200 with zeros (the original's behaviour).
 */
import type express from "express";

import type { AppContext, Installer } from "../context.js";
import { ApiError, sendError } from "../http/errors.js";
import { parseIntParam, type IntParam } from "./params.js";
import { qualityReport, trendReport } from "./reports.js";
import { requireAdmin } from "./requireAdmin.js";

export const MONITORING_PATH = "/admin/monitoring";

const HOURS: IntParam = { name: "hours", min: 1, max: 168, default: 24 };
const DAYS: IntParam = { name: "days", min: 1, max: 30, default: 7 };

function report(ctx: AppContext, param: IntParam, read: (value: number) => Promise<unknown>): express.RequestHandler {
  return async (req, res) => {
    res.set("Cache-Control", "no-store");
    const query = req.query as Record<string, unknown>;
    // A misspelt parameter (?hour=24) would silently give the default: refuse it, naming the known one.
    const unknown = Object.keys(query).filter((name) => name !== param.name);
    if (unknown.length > 0) {
      return sendError(res, new ApiError(422, `unknown query parameter ${unknown.map((u) => `"${u}"`).join(", ")}: this endpoint takes only "${param.name}"`,
        "invalid_request_error", "unknown_parameter", unknown[0]!, { known: [param.name] }));
    }
    const parsed = parseIntParam(query[param.name], param);
    if (!parsed.ok) {
      return sendError(res, new ApiError(422, parsed.message, "invalid_request_error", "invalid_parameter", param.name, {
        minimum: param.min,
        maximum: param.max,
      }));
    }
    try {
      res.status(200).json(await read(parsed.value));
    } catch (err) {
      ctx.log.error("monitoring report failed", { path: req.path, error: err });
      sendError(res, new ApiError(503, "the monitoring data could not be read from the database, try again", "server_error", "database_unavailable"));
    }
  };
}

export const installMonitoring: Installer = (app, ctx) => {
  app.use(MONITORING_PATH, requireAdmin(ctx));
  app.get(`${MONITORING_PATH}/api-key-tracking-quality`,
    report(ctx, HOURS, (hours) => qualityReport(ctx.pools.read, hours)));
  app.get(`${MONITORING_PATH}/api-key-tracking-trend`,
    report(ctx, DAYS, (days) => trendReport(ctx.pools.read, days)));
};
