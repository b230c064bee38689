/**
 * Who a /v1 request is attributed to, from the one authenticator (server/auth):
 *
 * - a usable key: that key (its rows carry the key's hash);
 * - no credentials: in development, the dev key when there is one (ctx.devKey);
 *   otherwise anonymous when ALLOW_ANONYMOUS, else a 401;
 * - the admin token: a 401 (it is not an API key; the gateway records requests by key);
 * - a refused key or header: a 401, never silently anonymous; a failed lookup: a 503.
 */
import type { AppContext } from "../context.js";
import type { Authentication } from "../auth/authenticator.js";
import { sha256 } from "../auth/secrets.js";
import { ApiError } from "../http/errors.js";
import { DEV_BYPASS_KEY } from "./devKey.js";

export type ChatIdentity =
  /** A usable key from the ledger. */
  | { kind: "key"; apiKeyHash: Buffer; apiKeyId: string; userId: string }
  /** No credentials, anonymous access allowed. */
  | { kind: "anonymous" }
  /** No credentials in development: the dev key, or the bypass key when it could not be created. */
  | { kind: "dev"; apiKeyHash: Buffer; apiKeyId: string | null; attributionReason: "dev_bypass" | null };

export type ChatAuthResult = { ok: true; identity: ChatIdentity } | { ok: false; error: ApiError };

const unauthorized = (message: string, code: string) => new ApiError(401, message, "invalid_request_error", code);

const REFUSALS = {
  // Worded as the admin endpoints' (server/monitoring/requireAdmin.ts); the code stays the gateway's own.
  missing: unauthorized("No credentials: send Authorization: Bearer <key>", "missing_api_key"),
  malformed_authorization_header: unauthorized("Malformed Authorization header: expected `Bearer <key>`.", "invalid_api_key"),
  dev_key_outside_development: unauthorized("Development keys are refused outside development mode.", "invalid_api_key"),
  admin_token: unauthorized("The admin token is not an API key: requests through the gateway need a user's API key.", "invalid_api_key"),
  not_found: unauthorized("Invalid API key.", "invalid_api_key"),
  revoked: unauthorized("This API key has been revoked.", "api_key_revoked"),
  expired: unauthorized("This API key has expired.", "api_key_expired"),
  lookup_failed: new ApiError(503, "Authentication is temporarily unavailable; retry shortly.", "server_error", "auth_unavailable"),
} satisfies Record<string, ApiError>;

function withoutCredentials(ctx: AppContext): ChatAuthResult {
  if (ctx.config.appEnv === "development") {
    const devKey = ctx.devKey;
    if (devKey?.kind === "key") {
      return { ok: true, identity: { kind: "dev", apiKeyHash: sha256(devKey.key), apiKeyId: devKey.apiKeyId, attributionReason: null } };
    }
    if (devKey?.kind === "bypass") {
      return { ok: true, identity: { kind: "dev", apiKeyHash: sha256(DEV_BYPASS_KEY), apiKeyId: null, attributionReason: "dev_bypass" } };
    }
  }
  return ctx.config.allowAnonymous ? { ok: true, identity: { kind: "anonymous" } } : { ok: false, error: REFUSALS.missing };
}

export function chatIdentity(ctx: AppContext, authentication: Authentication): ChatAuthResult {
  if (!authentication.ok) return { ok: false, error: REFUSALS[authentication.reason] };
  const { principal } = authentication;
  if (principal === null) return withoutCredentials(ctx);
  if (principal.kind === "admin_token") return { ok: false, error: REFUSALS.admin_token };
  return { ok: true, identity: { kind: "key", apiKeyHash: principal.apiKeyHash, apiKeyId: principal.apiKeyId, userId: principal.userId } };
}

/** Authenticates a /v1 request and says whom it is attributed to. */
export async function authenticateChat(ctx: AppContext, header: string | undefined): Promise<ChatAuthResult> {
  return chatIdentity(ctx, await ctx.auth.authenticate(header));
}
