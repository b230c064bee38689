/**
 * The spec's admin monitoring endpoints (admins only, see requireAdmin):
 *
 * - GET /admin/monitoring/api-key-tracking-quality?hours=24  (1..168)
 * - GET /admin/monitoring/api-key-tracking-trend?days=7      (1..30)
 *
 * Both read the SQL reports on the read replica (READ_DATABASE_URL) while it is
 * healthy, else on the primary, and say which node answered and as of when
 * (X-Keytrack-Read-Node, X-Keytrack-Read-As-Of; server/db/readRouter.ts). A
 * bad or unknown parameter is a 422 naming it and its bounds (or the known one); a database failure is a
 * 503, never a 200 with zeros (the original's behaviour).
 */
import type express from "express";
import type pg from "pg";

import type { AppContext, Installer } from "../context.js";
import { readInfoHeaders } from "../db/readRouter.js";
import { ApiError, sendError } from "../http/errors.js";
import { parseIntParam, type IntParam } from "./params.js";
import { qualityReport, trendReport } from "./reports.js";
import { requireAdmin } from "./requireAdmin.js";

export const MONITORING_PATH = "/admin/monitoring";

const HOURS: IntParam = { name: "hours", min: 1, max: 168, default: 24 };
const DAYS: IntParam = { name: "days", min: 1, max: 30, default: 7 };

function report(ctx: AppContext, param: IntParam, read: (db: pg.PoolClient, value: number) => Promise<unknown>): express.RequestHandler {
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
      // One client of the chosen node for the whole report (its queries share that node's view).
      const { result, ...info } = await ctx.pools.reads.read((client) => read(client, parsed.value));
      res.set(readInfoHeaders(info));
      res.status(200).json(result);
    } catch (err) {
      ctx.log.error("monitoring report failed", { path: req.path, error: err });
      sendError(res, new ApiError(503, "the monitoring data could not be read from the database, try again", "server_error", "database_unavailable"));
    }
  };
}

export const installMonitoring: Installer = (app, ctx) => {
  app.use(MONITORING_PATH, requireAdmin(ctx));
  app.get(`${MONITORING_PATH}/api-key-tracking-quality`,
    report(ctx, HOURS, (db, hours) => qualityReport(db, hours)));
  app.get(`${MONITORING_PATH}/api-key-tracking-trend`,
    report(ctx, DAYS, (db, days) => trendReport(db, days)));
};
