/**
 * Bearer authentication for /graphql, turned into the pgSettings PostGraphile
 * runs the request with (stashed on `req.pgSettings`, read by the grafast
 * context callback in installPostGraphile).
 *
 * - ADMIN_API_KEY (constant-time compare)   -> role keytrack_admin
 * - a usable API key (checked by SQL)       -> keytrack_admin or keytrack_user + ids
 * - no Authorization header                 -> no role switch: the NOINHERIT
 *   authenticator itself, which can read no private data
 * - anything else (malformed, unknown, revoked, expired) -> 401
 */
import { createHash, timingSafeEqual } from "node:crypto";

import type express from "express";

import type { AppContext } from "../app.js";
import { maskKey } from "../log.js";

export type PgSettings = Record<string, string | undefined>;

declare global {
  // eslint-disable-next-line @typescript-eslint/no-namespace
  namespace Express {
    interface Request {
      /** Set by installAdminAuth for /graphql; {} means "the authenticator itself". */
      pgSettings?: PgSettings;
    }
  }
}

export type AuthResult =
  | { ok: true; pgSettings: PgSettings; via: "anonymous" | "admin_api_key" | "api_key" }
  | { ok: false; status: 401 | 503; reason: string };

interface AuthenticateRow {
  api_key_id: string | null;
  user_id: string | null;
  user_role: string | null;
  environment: string | null;
  is_usable: boolean | null;
  reason: string | null;
}

export function sha256(text: string): Buffer {
  return createHash("sha256").update(text, "utf8").digest();
}

/** Compares digests, so neither the content nor the length of the secret leaks through timing. */
export function safeEqual(a: string, b: string): boolean {
  return timingSafeEqual(sha256(a), sha256(b));
}

const BEARER = /^Bearer +([\x21-\x7e]+) *$/i;

/** Resolves the Authorization header; exported for other routes (monitoring, chat) to reuse. */
export async function authenticate(ctx: AppContext, header: string | undefined): Promise<AuthResult> {
  if (header === undefined || header === "") return { ok: true, pgSettings: {}, via: "anonymous" };
  const match = BEARER.exec(header);
  if (!match) return { ok: false, status: 401, reason: "malformed_authorization_header" };
  const token = match[1]!;

  const admin = ctx.config.adminApiKey;
  if (admin !== null && safeEqual(token, admin)) {
    return { ok: true, pgSettings: { role: "keytrack_admin" }, via: "admin_api_key" };
  }
  // The spec's development keys are refused outright outside development mode.
  if (ctx.config.appEnv !== "development" && token.startsWith("dev_local_")) {
    return { ok: false, status: 401, reason: "dev_key_outside_development" };
  }

  let row: AuthenticateRow | undefined;
  try {
    const { rows } = await ctx.pools.owner.query<AuthenticateRow>(
      "select * from app_private.authenticate_api_key($1::bytea)",
      [sha256(token)],
    );
    row = rows[0];
  } catch (err) {
    ctx.log.error("api key lookup failed", { key: maskKey(token), error: err });
    return { ok: false, status: 503, reason: "lookup_failed" };
  }
  if (!row || !row.is_usable || !row.api_key_id || !row.user_id) {
    return { ok: false, status: 401, reason: row?.reason ?? "not_found" };
  }
  return {
    ok: true,
    via: "api_key",
    pgSettings: {
      role: row.user_role === "admin" ? "keytrack_admin" : "keytrack_user",
      "keytrack.user_id": row.user_id,
      "keytrack.api_key_id": row.api_key_id,
    },
  };
}

const UNAUTHENTICATED = {
  errors: [{ message: "invalid credentials", extensions: { code: "UNAUTHENTICATED" } }],
};
const UNAVAILABLE = {
  errors: [{ message: "authentication is unavailable, try again", extensions: { code: "SERVICE_UNAVAILABLE" } }],
};

export function installAdminAuth(app: express.Express, ctx: AppContext, path = "/graphql"): void {
  app.use(path, async (req, res, next) => {
    try {
      const result = await authenticate(ctx, req.get("authorization"));
      if (result.ok) {
        req.pgSettings = result.pgSettings;
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
