/**
 * Who is making a /v1 request.
 *
 * - `Authorization: Bearer <key>`: the key is looked up by its SHA-256 with the
 *   ledger's SQL function app_private.authenticate_api_key (active, not revoked,
 *   not expired). Unknown, revoked or expired keys, and malformed headers, are a
 *   401: never silently anonymous. Outside development, `dev_local_` keys are a 401
 *   without a lookup. A failed lookup (database down) is a 503 and is not cached.
 * - No credentials: in development, the dev key when there is one (ctx.devKey);
 *   otherwise anonymous when ALLOW_ANONYMOUS, else a 401.
 *
 * Lookups are cached per key hash for AUTH_CACHE_TTL_MS (0 disables), both
 * answers (usable or not), so a revocation (or a new key that was tried before
 * it existed) takes effect within that time. Concurrent lookups of one key share
 * one query. The cache holds at most MAX_ENTRIES hashes, oldest evicted first.
 */
import type { AppContext } from "../app.js";
import { maskKey } from "../log.js";
import { sha256 } from "../middleware/installAdminAuth.js";
import { DEV_BYPASS_KEY } from "./devKey.js";
import { ChatError } from "./errors.js";

export type ChatIdentity =
  /** A usable key from the ledger. */
  | { kind: "key"; apiKeyHash: Buffer; apiKeyId: string; userId: string }
  /** No credentials, anonymous access allowed. */
  | { kind: "anonymous" }
  /** No credentials in development: the dev key, or the bypass key when it could not be created. */
  | { kind: "dev"; apiKeyHash: Buffer; apiKeyId: string | null; attributionReason: "dev_bypass" | null };

export type ChatAuthResult = { ok: true; identity: ChatIdentity } | { ok: false; error: ChatError; reason: string };

export interface ChatAuth {
  authenticate(header: string | undefined): Promise<ChatAuthResult>;
  /** Entries now in the cache (for tests and diagnostics). */
  cacheSize(): number;
}

interface KeyLookup {
  api_key_id: string | null;
  user_id: string | null;
  is_usable: boolean | null;
  reason: string | null;
}

const MAX_ENTRIES = 10_000;
const BEARER = /^Bearer +([\x21-\x7e]+) *$/i;

const unauthorized = (message: string, code: string) => new ChatError(401, message, "invalid_request_error", code);

const REFUSALS: Record<string, ChatError> = {
  missing: unauthorized("No API key provided: send `Authorization: Bearer <key>`.", "missing_api_key"),
  malformed_authorization_header: unauthorized("Malformed Authorization header: expected `Bearer <key>`.", "invalid_api_key"),
  dev_key_outside_development: unauthorized("Development keys are refused outside development mode.", "invalid_api_key"),
  not_found: unauthorized("Invalid API key.", "invalid_api_key"),
  revoked: unauthorized("This API key has been revoked.", "api_key_revoked"),
  expired: unauthorized("This API key has expired.", "api_key_expired"),
};
const UNAVAILABLE = new ChatError(503, "Authentication is temporarily unavailable; retry shortly.", "server_error", "auth_unavailable");

function refuse(reason: string): ChatAuthResult {
  return { ok: false, reason, error: REFUSALS[reason] ?? REFUSALS.not_found! };
}

export function createChatAuth(ctx: AppContext, now: () => number = Date.now): ChatAuth {
  const ttl = ctx.config.authCacheTtlMs;
  const cache = new Map<string, { expires: number; lookup: Promise<KeyLookup> }>();

  const query = async (hash: Buffer): Promise<KeyLookup> => {
    const { rows } = await ctx.pools.owner.query<KeyLookup>(
      "select api_key_id, user_id, is_usable, reason from app_private.authenticate_api_key($1::bytea)",
      [hash],
    );
    return rows[0] ?? { api_key_id: null, user_id: null, is_usable: false, reason: "not_found" };
  };

  const lookup = (hash: Buffer): Promise<KeyLookup> => {
    if (ttl === 0) return query(hash);
    const id = hash.toString("hex");
    const t = now();
    const hit = cache.get(id);
    if (hit && hit.expires > t) return hit.lookup;
    const entry = { expires: t + ttl, lookup: query(hash) };
    cache.delete(id);
    cache.set(id, entry);
    if (cache.size > MAX_ENTRIES) cache.delete(cache.keys().next().value!);
    // A failed lookup says nothing about the key: forget it so the next request asks again.
    entry.lookup.catch(() => {
      if (cache.get(id) === entry) cache.delete(id);
    });
    return entry.lookup;
  };

  const withoutCredentials = (): ChatAuthResult => {
    if (ctx.config.appEnv === "development") {
      const devKey = ctx.devKey;
      if (devKey?.kind === "key") {
        return { ok: true, identity: { kind: "dev", apiKeyHash: sha256(devKey.key), apiKeyId: devKey.apiKeyId, attributionReason: null } };
      }
      if (devKey?.kind === "bypass") {
        return { ok: true, identity: { kind: "dev", apiKeyHash: sha256(DEV_BYPASS_KEY), apiKeyId: null, attributionReason: "dev_bypass" } };
      }
    }
    return ctx.config.allowAnonymous ? { ok: true, identity: { kind: "anonymous" } } : refuse("missing");
  };

  return {
    cacheSize: () => cache.size,
    async authenticate(header) {
      if (header === undefined || header.trim() === "") return withoutCredentials();
      const match = BEARER.exec(header);
      if (!match) return refuse("malformed_authorization_header");
      const token = match[1]!;
      if (ctx.config.appEnv !== "development" && token.startsWith("dev_local_")) return refuse("dev_key_outside_development");

      const hash = sha256(token);
      let row: KeyLookup;
      try {
        row = await lookup(hash);
      } catch (err) {
        ctx.log.error("api key lookup failed", { key: maskKey(token), error: err });
        return { ok: false, reason: "lookup_failed", error: UNAVAILABLE };
      }
      if (!row.is_usable || !row.api_key_id || !row.user_id) {
        ctx.log.debug("chat request refused", { key: maskKey(token), reason: row.reason });
        return refuse(row.reason ?? "not_found");
      }
      return { ok: true, identity: { kind: "key", apiKeyHash: hash, apiKeyId: row.api_key_id, userId: row.user_id } };
    },
  };
}
