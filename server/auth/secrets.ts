/**
 * Hashing and comparing secrets. A key's hash is the ledger's contract:
 * sha256 of its UTF-8 bytes, what app_public.api_key_hash() computes in SQL.
 */
import { createHash, timingSafeEqual } from "node:crypto";

export function sha256(text: string): Buffer {
  return createHash("sha256").update(text, "utf8").digest();
}

/** Compares digests, so neither the content nor the length of a secret leaks through timing. */
export function safeEqual(a: string, b: string): boolean {
  return timingSafeEqual(sha256(a), sha256(b));
}

/** A key that app_public.create_api_key() issues: kt_<environment>_ and 64 hex digits. */
const WELL_FORMED_KEY = /^kt_(live|test)_[0-9a-f]{64}$/;

/**
 * What a log line may say about a presented token: the public prefix of a
 * well-formed keytrack key (its first 12 characters, as api_keys.prefix stores
 * it), and nothing of anything else (an admin token, an imported key, a typo).
 */
export function tokenForLog(token: string): string {
  return WELL_FORMED_KEY.test(token) ? `${token.slice(0, 12)}…` : "(not a keytrack key)";
}
