// Development mode (APP_ENV=development): a real dev user and key from SQL
// (app_private.get_or_create_dev_api_key, the spec's function), so requests
// sent without credentials are attributed. If that fails, the spec's bypass
// key is used and its rows are recorded as failures with reason dev_bypass.
import type pg from "pg";
import { DEV_BYPASS_KEY, type DevKey } from "./chat/devKey.js";
import type { Logger } from "./log.js";

export async function getDevKey(pool: pg.Pool, log: Logger): Promise<DevKey> {
  try {
    const { rows } = await pool.query<{ key: string; api_key_id: string }>(
      `select k.key, (app_private.authenticate_api_key(app_public.api_key_hash(k.key))).api_key_id
         from app_private.get_or_create_dev_api_key() as k(key)`,
    );
    const { key, api_key_id: apiKeyId } = rows[0]!;
    // Not a log line: the operator needs the key itself, and it is predictable
    // anyway (it names the dev user's id) and refused outside development.
    process.stdout.write(
      `\n  Development API key (APP_ENV=development only; requests without credentials use it):\n    ${key}\n\n`,
    );
    return { kind: "key", key, apiKeyId };
  } catch (err) {
    log.error("could not create the development API key; falling back to the bypass key (rows recorded as failed: dev_bypass)", {
      error: err,
    });
    return { kind: "bypass", key: DEV_BYPASS_KEY };
  }
}
