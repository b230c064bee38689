/**
 * Who is calling: the one place that turns an Authorization header into a
 * principal, for GraphQL, /v1, /admin/monitoring and the console alike. Each
 * route then decides what the principal may do (installGraphQLAuth.ts,
 * monitoring/requireAdmin.ts, chat/identity.ts).
 *
 * - ADMIN_API_KEY (constant-time compare)           -> the admin token
 * - a usable API key (keyLookup.ts, cached)          -> that key, its user, admin or not
 * - no Authorization header                          -> no principal (each route says what that means)
 * - a malformed header, an unknown, revoked or expired key -> refused (401)
 * - `dev_local_` keys outside development            -> refused without a lookup (401)
 * - the lookup failed and no last known answer may stand in -> unavailable (503)
 */
import { timingSafeEqual } from "node:crypto";

import type { AppEnv } from "../config.js";
import type { Logger } from "../log.js";
import { parseBearer } from "./bearer.js";
import type { KeyLookup } from "./keyLookup.js";
import { sha256, tokenForLog } from "./secrets.js";

export type Principal =
  | { kind: "admin_token" }
  | {
      kind: "key";
      apiKeyId: string;
      userId: string;
      isAdmin: boolean;
      /** sha256 of the presented key: what its ledger rows carry. */
      apiKeyHash: Buffer;
      /** Verified from the last known good answer while the database could not be asked. */
      stale: boolean;
    };

export type RefusalReason =
  | "malformed_authorization_header"
  | "dev_key_outside_development"
  | "not_found"
  | "revoked"
  | "expired"
  | "lookup_failed";

export type Authentication =
  /** principal null: no credentials were presented. */
  | { ok: true; principal: Principal | null }
  | { ok: false; status: 401 | 503; reason: RefusalReason };

export interface Authenticator {
  authenticate(header: string | undefined): Promise<Authentication>;
  readonly keys: KeyLookup;
  /** Requests let in on a key's last known good answer while the database could not be asked (since start). */
  staleServed(): number;
}

export interface AuthenticatorOptions {
  appEnv: AppEnv;
  adminApiKey: string | null;
  keys: KeyLookup;
  log: Logger;
}

const KNOWN_REASONS = new Set<RefusalReason>(["not_found", "revoked", "expired"]);

export function createAuthenticator({ appEnv, adminApiKey, keys, log }: AuthenticatorOptions): Authenticator {
  let stale = 0;
  // The admin token's digest, once: a presented token is hashed once, for this compare and the key lookup.
  const adminDigest = adminApiKey !== null ? sha256(adminApiKey) : null;
  return {
    keys,
    staleServed: () => stale,
    async authenticate(header) {
      const bearer = parseBearer(header);
      if (bearer.kind === "none") return { ok: true, principal: null };
      if (bearer.kind === "malformed") return { ok: false, status: 401, reason: "malformed_authorization_header" };
      const { token } = bearer;

      const apiKeyHash = sha256(token);
      // Digests compared in constant time (safeEqual's rule), so the token's content and length do not leak.
      if (adminDigest !== null && timingSafeEqual(apiKeyHash, adminDigest)) return { ok: true, principal: { kind: "admin_token" } };
      // The spec's development keys are refused outright outside development mode.
      if (appEnv !== "development" && token.startsWith("dev_local_")) {
        return { ok: false, status: 401, reason: "dev_key_outside_development" };
      }

      let answer;
      try {
        answer = await keys.lookup(apiKeyHash);
      } catch (err) {
        log.warn("api key lookup failed", { presented: tokenForLog(token), error: err });
        return { ok: false, status: 503, reason: "lookup_failed" };
      }
      const { record } = answer;
      if (!record.usable || !record.apiKeyId || !record.userId) {
        const reason = KNOWN_REASONS.has(record.reason as RefusalReason) ? (record.reason as RefusalReason) : "not_found";
        log.debug("api key refused", { presented: tokenForLog(token), apiKeyId: record.apiKeyId, reason });
        return { ok: false, status: 401, reason };
      }
      if (answer.stale) stale++;
      return {
        ok: true,
        principal: { kind: "key", apiKeyId: record.apiKeyId, userId: record.userId, isAdmin: record.userRole === "admin", apiKeyHash, stale: answer.stale },
      };
    },
  };
}
