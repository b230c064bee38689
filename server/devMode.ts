// Development mode (APP_ENV=development): a real dev user and key from SQL
// (app_private.get_or_create_dev_api_key, the spec's function), so requests
// sent without credentials are attributed. If that fails, the spec's bypass
// key is used and its rows are recorded as failures with reason dev_bypass.
import { randomBytes } from "node:crypto";
import fs from "node:fs/promises";
import path from "node:path";
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

/** Where development mode keeps its generated admin token: `<KEYTRACK_DATA_DIR>/admin-token`. */
export function adminTokenPath(dataDir: string): string {
  return path.join(path.resolve(dataDir), "admin-token");
}

/** Shortest stored token accepted; shorter (or unreadable) contents are replaced. */
const ADMIN_TOKEN_MIN_LENGTH = 32;

/**
 * Development mode without ADMIN_API_KEY: the admin token stored in the data
 * folder (mode 0600), made on the first start (48 random hex characters) and
 * reused afterwards. Never call it outside development.
 */
export async function getOrCreateAdminToken(dataDir: string): Promise<{ token: string; path: string; created: boolean }> {
  const file = adminTokenPath(dataDir);
  await fs.mkdir(path.dirname(file), { recursive: true });
  const existing = (await fs.readFile(file, "utf8").catch(() => "")).trim();
  if (existing.length >= ADMIN_TOKEN_MIN_LENGTH && /^[\x21-\x7e]+$/.test(existing)) {
    await fs.chmod(file, 0o600);
    return { token: existing, path: file, created: false };
  }
  const token = randomBytes(24).toString("hex");
  // Written beside, then renamed: a concurrent start never reads half a token.
  const tmp = `${file}.${process.pid}.tmp`;
  await fs.writeFile(tmp, `${token}\n`, { mode: 0o600 });
  await fs.rename(tmp, file);
  return { token, path: file, created: true };
}

/** Which admin credentials are in force, for the start-up banner. */
export type AdminCredentials =
  | { source: "environment" }
  | { source: "generated"; path: string; created: boolean }
  | { source: "none" };

export function describeAdminCredentials(c: AdminCredentials): string {
  switch (c.source) {
    case "environment":
      return "admin credentials: ADMIN_API_KEY from the environment";
    case "generated":
      return `admin credentials: generated and stored at ${c.path}${c.created ? " (new)" : ""}`;
    case "none":
      return "admin credentials: none: admin users' keys only (ADMIN_API_KEY is unset)";
  }
}

/** Printed (not logged) once the service listens, in development without ADMIN_API_KEY. */
export function printAdminToken(url: string, token: string, file: string): void {
  process.stdout.write(
    `\n  Console: ${url}/\n` +
      `  Admin token (APP_ENV=development only; stored in ${file}; set ADMIN_API_KEY to choose your own):\n    ${token}\n\n`,
  );
}
