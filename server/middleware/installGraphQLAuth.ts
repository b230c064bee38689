/**
 * Authenticates every /graphql caller with the one authenticator (server/auth)
 * and turns the principal into the pgSettings PostGraphile runs the request
 * with (stashed on `req.pgSettings`, read by the grafast context callback in
 * installPostGraphile):
 *
 * - the admin token, or a key of an admin user -> role keytrack_admin
 * - a key of any other user                    -> role keytrack_user, with its user and key ids (RLS)
 * - no Authorization header                    -> no role switch: the NOINHERIT authenticator
 *                                                 itself, which can read no private data
 * - refused (malformed, unknown, revoked, expired) -> 401; lookup failed -> 503
 *
 * Every principal's settings, none included, carry statement_timeout
 * (GRAPHQL_STATEMENT_TIMEOUT_MS): PostGraphile applies them with
 * set_config(..., true) in the request's transaction, so no statement of a
 * GraphQL request runs longer, whatever the login role's own setting.
 */
import type express from "express";

import type { Principal } from "../auth/authenticator.js";
import type { AppContext } from "../context.js";
import { graphqlError } from "../http/errors.js";
import { ADMIN_ROLE, GRAPHQL_PATH } from "./installPostGraphile.js";

export type PgSettings = Record<string, string | undefined>;

declare global {
  // eslint-disable-next-line @typescript-eslint/no-namespace
  namespace Express {
    interface Request {
      /** Set by installGraphQLAuth for /graphql; no role means "the authenticator itself". */
      pgSettings?: PgSettings;
    }
  }
}

const USER_ROLE = "keytrack_user";

/** The role and settings a principal's GraphQL requests run with (no role: the authenticator itself). */
export function pgSettingsFor(principal: Principal | null, statementTimeoutMs: number, maxLiveKeysPerUser = 20): PgSettings {
  const statement_timeout = String(statementTimeoutMs);
  if (principal === null) return { statement_timeout };
  if (principal.kind === "admin_token") return { role: ADMIN_ROLE, statement_timeout };
  return {
    role: principal.isAdmin ? ADMIN_ROLE : USER_ROLE,
    "keytrack.user_id": principal.userId,
    // create_api_key() records it as the new key's creator, and bounds a user's live keys.
    "keytrack.api_key_id": principal.apiKeyId,
    "keytrack.max_live_keys_per_user": String(maxLiveKeysPerUser),
    statement_timeout,
  };
}

const UNAUTHENTICATED = graphqlError("invalid credentials", "UNAUTHENTICATED");
const UNAVAILABLE = graphqlError("authentication is unavailable, try again", "SERVICE_UNAVAILABLE");

export function installGraphQLAuth(app: express.Express, ctx: AppContext): void {
  app.use(GRAPHQL_PATH, async (req, res, next) => {
    try {
      const result = await ctx.auth.authenticate(req.get("authorization"));
      if (result.ok) {
        req.pgSettings = pgSettingsFor(result.principal, ctx.config.graphqlStatementTimeoutMs, ctx.config.maxLiveKeysPerUser);
        return next();
      }
      ctx.log.debug("graphql request refused", { reason: result.reason, status: result.status });
      if (result.status === 401) res.set("WWW-Authenticate", 'Bearer realm="keytrack"');
      res.status(result.status).json(result.status === 401 ? UNAUTHENTICATED : UNAVAILABLE);
    } catch (err) {
      next(err);
    }
  });
}
