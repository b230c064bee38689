/**
 * Admin-only access for /admin/monitoring: `Authorization: Bearer $ADMIN_API_KEY`
 * (constant-time compare) or a usable API key whose user is an admin. Reuses
 * the GraphQL bearer check (installAdminAuth's authenticate):
 *
 * - no credentials, malformed header, unknown/revoked/expired key -> 401
 * - a usable key of a non-admin user                              -> 403
 * - the key lookup itself failed                                  -> 503
 */
import type express from "express";

import type { AppContext } from "../app.js";
import { authenticate } from "../middleware/installAdminAuth.js";
import { sendError } from "./errors.js";

export function requireAdmin(ctx: AppContext): express.RequestHandler {
  return async (req, res, next) => {
    try {
      const header = req.get("authorization");
      if (header === undefined || header === "") {
        res.set("WWW-Authenticate", 'Bearer realm="keytrack"');
        return sendError(res, 401, "authentication_error", "missing_credentials",
          "this endpoint needs Authorization: Bearer <ADMIN_API_KEY or an admin user's API key>");
      }
      const result = await authenticate(ctx, header);
      if (!result.ok) {
        if (result.status === 503) {
          return sendError(res, 503, "server_error", "authentication_unavailable", "authentication is unavailable, try again");
        }
        ctx.log.debug("monitoring request refused", { reason: result.reason });
        res.set("WWW-Authenticate", 'Bearer realm="keytrack", error="invalid_token"');
        return sendError(res, 401, "authentication_error", "invalid_credentials", "invalid credentials");
      }
      if (result.pgSettings.role !== "keytrack_admin") {
        return sendError(res, 403, "permission_error", "forbidden", "this endpoint is for admins only");
      }
      next();
    } catch (err) {
      next(err);
    }
  };
}
