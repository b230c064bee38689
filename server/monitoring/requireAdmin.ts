/**
 * Admin-only access for /admin/monitoring (and the console's API):
 * `Authorization: Bearer $ADMIN_API_KEY` or a usable API key whose user is an
 * admin, as the one authenticator (server/auth) resolves them:
 *
 * - no credentials, malformed header, unknown/revoked/expired key -> 401
 * - a usable key of a non-admin user                              -> 403
 * - the key lookup itself failed                                  -> 503
 */
import type express from "express";

import type { AppContext } from "../context.js";
import { ApiError, sendError } from "../http/errors.js";

// Worded as the gateway's (server/chat/identity.ts); the key: ADMIN_API_KEY or an admin user's API key.
const MISSING = new ApiError(401, "No credentials: send Authorization: Bearer <key>", "authentication_error", "missing_credentials");
const INVALID = new ApiError(401, "invalid credentials", "authentication_error", "invalid_credentials");
const UNAVAILABLE = new ApiError(503, "authentication is unavailable, try again", "server_error", "authentication_unavailable");
const FORBIDDEN = new ApiError(403, "this endpoint is for admins only", "permission_error", "forbidden");

export function requireAdmin(ctx: AppContext): express.RequestHandler {
  return async (req, res, next) => {
    try {
      const result = await ctx.auth.authenticate(req.get("authorization"));
      if (!result.ok) {
        if (result.status === 503) return sendError(res, UNAVAILABLE);
        ctx.log.debug("monitoring request refused", { reason: result.reason });
        res.set("WWW-Authenticate", 'Bearer realm="keytrack", error="invalid_token"');
        return sendError(res, INVALID);
      }
      const { principal } = result;
      if (principal === null) return sendError(res, MISSING);
      if (principal.kind === "key" && !principal.isAdmin) return sendError(res, FORBIDDEN);
      next();
    } catch (err) {
      next(err);
    }
  };
}
