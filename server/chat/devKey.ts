/**
 * The development key, as the chat endpoints see it (APP_ENV=development only).
 * Requests without credentials are attributed to it:
 * - `key`: the real dev key (`dev_local_{user_id}_local_development`), recorded by its hash;
 * - `bypass`: creating the dev key failed; the spec's fallback key, recorded by its hash
 *   with attribution_reason `dev_bypass` (counted as a failure with its own reason).
 * Set on the app context as `ctx.devKey`; undefined means "no dev key" (anonymous if allowed).
 */
export const DEV_BYPASS_KEY = "local-dev-bypass-key";

export type DevKey =
  | { kind: "key"; key: string; apiKeyId: string }
  | { kind: "bypass"; key: typeof DEV_BYPASS_KEY };
