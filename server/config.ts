/**
 * Settings, parsed and validated once at start-up from the environment.
 * A missing or bad setting names itself (ConfigError) and the process stops.
 */
import path from "node:path";

import { databaseNameOf, withDatabaseName, withUser } from "./db/urls.js";
import { LOG_LEVELS, type LogLevel } from "./log.js";

export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ConfigError";
  }
}

export type AppEnv = "development" | "test" | "production";
const APP_ENVS: readonly AppEnv[] = ["development", "test", "production"];

/** The connection strings the service needs; all derived from DATABASE_URL when not given. */
export interface DatabaseUrls {
  /** The owner's connection (migrations, security definer calls, health). */
  databaseUrl: string;
  /** The login PostGraphile uses for requests (NOINHERIT authenticator). */
  authDatabaseUrl: string;
  /** A superuser connection to a maintenance database (creates roles and the database). */
  rootDatabaseUrl: string;
  /** graphile-migrate's shadow database. */
  shadowDatabaseUrl: string;
  /** A replica for reads; null means the primary. */
  readDatabaseUrl: string | null;
}

export interface Config {
  /** Null when DATABASE_URL is unset: the embedded PostgreSQL fills it in (see withDatabaseUrls). */
  readonly db: Readonly<DatabaseUrls> | null;
  /** Explicit overrides from the environment, kept so embedded mode can apply them too. */
  readonly dbOverrides: Readonly<Partial<DatabaseUrls>>;
  readonly dataDir: string;
  readonly embeddedPgPort: number;
  readonly port: number;
  readonly host: string;
  readonly appEnv: AppEnv;
  readonly adminApiKey: string | null;
  readonly allowAnonymous: boolean;
  readonly upstreamBaseUrl: string | null;
  readonly upstreamApiKey: string | null;
  /** Longest wait for the upstream to answer (headers) or to send the next bytes of its body, in ms. */
  readonly upstreamTimeoutMs: number;
  /** How long key lookups are cached, in ms (0: no cache); a change made outside keytrack's SQL takes effect within it. */
  readonly authCacheTtlMs: number;
  /** While the database cannot be reached, a key verified usable within this long (ms) is still served (0: never). */
  readonly authStaleMaxMs: number;
  readonly metricsToken: string | null;
  /** With READ_DATABASE_URL: a replica replaying more than this far (ms) behind the primary is not read from. */
  readonly readMaxLagMs: number;
  /** With READ_DATABASE_URL: how often the replica's health and lag are checked, in ms. */
  readonly readCheckMs: number;
  /** With READ_DATABASE_URL: while the replica is unhealthy, read from the primary (true) or fail those reads with a 503 (false: no read load on the primary, ever). */
  readonly readFallback: boolean;
  /** GET /health answers 503 when the database has not answered within this long, in ms. */
  readonly healthTimeoutMs: number;
  readonly retentionDays: number | null;
  readonly worker: boolean;
  /** Jobs one worker runs at once. */
  readonly workerConcurrency: number;
  /** Lookups of a pending row's key before it is marked failed (not_found). */
  readonly attributionRetryMaxAttempts: number;
  /** First retry delay of a pending row; doubles each attempt. */
  readonly attributionRetryBaseMs: number;
  /** Cap on a pending row's retry delay. */
  readonly attributionRetryMaxMs: number;
  /** Pending rows resolved per statement. */
  readonly attributionRetryBatchSize: number;
  /** Rows per backfill batch (one short transaction each). */
  readonly backfillBatchSize: number;
  /** Tries to write a request row before it goes to the durable spool (transient errors only). */
  readonly recordRetryAttempts: number;
  /** Wait after the first failed try to write a request row; doubles after each further one. */
  readonly recordRetryBaseMs: number;
  /** Request rows written at most by one INSERT (one transaction): rows of concurrent requests share it. */
  readonly recordBatchSize: number;
  /** Batches of request rows written at once (each holds a pooled connection while on its first try). */
  readonly recordConcurrency: number;
  readonly logLevel: LogLevel;
  /** As given (e.g. "1mb"), for body parsers. */
  readonly bodyLimit: string;
  readonly bodyLimitBytes: number;
  /** Largest upstream response body read (non-streaming), and largest single SSE event; past either: 502, row failed. */
  readonly upstreamMaxBodyBytes: number;
  readonly upstreamMaxEventBytes: number;
  /** Whether the built-in echo model answers (without an upstream); a development aid, off in production unless set. */
  readonly echoModel: boolean;
  /** GraphiQL at /graphiql and introspection for non-admins; default on in development only. */
  readonly graphiql: boolean;
  /** GraphQL connections: rows when no first/last is given, and the most one page may ask for. */
  readonly graphqlDefaultPageSize: number;
  readonly graphqlMaxPageSize: number;
  /** GraphQL requests: the largest estimated cost (rows that may be fetched, fields and aliases counted) and depth. */
  readonly graphqlMaxCost: number;
  readonly graphqlMaxDepth: number;
  /** statement_timeout of every GraphQL request's transaction, in ms. */
  readonly graphqlStatementTimeoutMs: number;
  /** Keys a user may have alive (not revoked, not expired) when creating one themselves. */
  readonly maxLiveKeysPerUser: number;
  /** How often a serving process tells the database how many requests it has accepted (completeness), in ms. */
  readonly completenessHeartbeatMs: number;
}

/** A Config whose database URLs are known (external server, or embedded one started). */
export type ConnectedConfig = Config & { readonly db: Readonly<DatabaseUrls> };

export const AUTHENTICATOR_ROLE = "keytrack_authenticator";

type Env = NodeJS.ProcessEnv;

function str(env: Env, name: string): string | null {
  const value = env[name];
  if (value === undefined) return null;
  const trimmed = value.trim();
  return trimmed === "" ? null : trimmed;
}

function pgUrl(env: Env, name: string): string | null {
  const value = str(env, name);
  if (value === null) return null;
  let problem: string | null = null;
  try {
    if (!databaseNameOf(value)) problem = "it names no database";
  } catch {
    problem = /^postgres(ql)?:\/\//i.test(value) ? "it does not parse" : `got scheme "${value.split(":")[0]}"`;
  }
  if (problem) throw new ConfigError(`${name} must be a postgres:// or postgresql:// URL naming a database (${problem})`);
  return value;
}

function int(env: Env, name: string, min: number, max: number, fallback: number | null): number | null {
  const value = str(env, name);
  if (value === null) return fallback;
  if (!/^\d+$/.test(value) || Number(value) < min || Number(value) > max) {
    throw new ConfigError(`${name} must be an integer ${min}..${max}, got "${value}"`);
  }
  return Number(value);
}

function bool(env: Env, name: string, fallback: boolean): boolean {
  const value = str(env, name);
  if (value === null) return fallback;
  switch (value.toLowerCase()) {
    case "true":
    case "1":
      return true;
    case "false":
    case "0":
      return false;
    default:
      throw new ConfigError(`${name} must be one of true, false, 1, 0, got "${value}"`);
  }
}

function oneOf<T extends string>(env: Env, name: string, allowed: readonly T[], fallback: T): T {
  const value = str(env, name);
  if (value === null) return fallback;
  if (!(allowed as readonly string[]).includes(value)) {
    throw new ConfigError(`${name} must be one of ${allowed.join(", ")}, got "${value}"`);
  }
  return value as T;
}

function httpUrl(env: Env, name: string): string | null {
  const value = str(env, name);
  if (value === null) return null;
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw new ConfigError(`${name} must be an http:// or https:// URL, got "${value}"`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new ConfigError(`${name} must be an http:// or https:// URL, got "${value}"`);
  }
  return value.replace(/\/+$/, "");
}

function size(env: Env, name: string, fallback: string): number {
  const value = str(env, name) ?? fallback;
  const bytes = parseByteSize(value);
  if (bytes === null) throw new ConfigError(`${name} must be a size such as 100kb or 1mb, got "${value}"`);
  return bytes;
}

const SIZE_UNITS: Record<string, number> = { b: 1, kb: 1024, mb: 1024 ** 2, gb: 1024 ** 3 };

/** "1mb" -> 1048576, the units body-parser (bytes) understands. */
export function parseByteSize(value: string): number | null {
  const m = /^(\d+(?:\.\d+)?)\s*(b|kb|mb|gb)?$/i.exec(value.trim());
  if (!m) return null;
  const bytes = Math.floor(Number(m[1]) * SIZE_UNITS[(m[2] ?? "b").toLowerCase()]!);
  return bytes > 0 ? bytes : null;
}

/** Fills in the connection strings not given, from DATABASE_URL. */
export function deriveDatabaseUrls(databaseUrl: string, overrides: Partial<DatabaseUrls> = {}): DatabaseUrls {
  return {
    databaseUrl,
    authDatabaseUrl: overrides.authDatabaseUrl ?? withUser(databaseUrl, AUTHENTICATOR_ROLE),
    rootDatabaseUrl: overrides.rootDatabaseUrl ?? withDatabaseName(databaseUrl, "postgres"),
    shadowDatabaseUrl:
      overrides.shadowDatabaseUrl ?? withDatabaseName(databaseUrl, `${databaseNameOf(databaseUrl)}_shadow`),
    readDatabaseUrl: overrides.readDatabaseUrl ?? null,
  };
}

/**
 * Returns a copy of `config` with its database URLs set: used by the embedded
 * mode once the cluster runs. URLs set explicitly in the environment win.
 */
export function withDatabaseUrls(
  config: Config,
  urls: { databaseUrl: string } & Partial<DatabaseUrls>,
): ConnectedConfig {
  const given = Object.fromEntries(Object.entries(urls).filter(([, v]) => v != null)) as Partial<DatabaseUrls>;
  const merged = { ...given, ...config.dbOverrides };
  return { ...config, db: deriveDatabaseUrls(urls.databaseUrl, merged) };
}

export function isConnected(config: Config): config is ConnectedConfig {
  return config.db !== null;
}

/**
 * Every setting loadConfig reads (a test checks that it reads exactly these): the names
 * unknownSettingWarnings compares the environment against.
 */
export const SETTING_NAMES: readonly string[] = [
  "DATABASE_URL", "ROOT_DATABASE_URL", "AUTH_DATABASE_URL", "SHADOW_DATABASE_URL", "READ_DATABASE_URL",
  "KEYTRACK_DATA_DIR", "EMBEDDED_PG_PORT", "PORT", "HOST", "APP_ENV", "ADMIN_API_KEY", "ALLOW_ANONYMOUS",
  "UPSTREAM_BASE_URL", "UPSTREAM_API_KEY", "UPSTREAM_TIMEOUT_MS", "UPSTREAM_MAX_BODY", "UPSTREAM_MAX_EVENT",
  "AUTH_CACHE_TTL_MS", "AUTH_STALE_MAX_MS", "METRICS_TOKEN", "RETENTION_DAYS", "WORKER", "WORKER_CONCURRENCY",
  "ATTRIBUTION_RETRY_MAX_ATTEMPTS", "ATTRIBUTION_RETRY_BASE_MS", "ATTRIBUTION_RETRY_MAX_MS",
  "ATTRIBUTION_RETRY_BATCH_SIZE", "BACKFILL_BATCH_SIZE", "RECORD_RETRY_ATTEMPTS", "RECORD_RETRY_BASE_MS",
  "RECORD_BATCH_SIZE", "RECORD_CONCURRENCY",
  "LOG_LEVEL", "BODY_LIMIT", "ECHO_MODEL", "GRAPHIQL", "GRAPHQL_DEFAULT_PAGE_SIZE", "GRAPHQL_MAX_PAGE_SIZE",
  "GRAPHQL_MAX_COST", "GRAPHQL_MAX_DEPTH", "GRAPHQL_STATEMENT_TIMEOUT_MS", "MAX_LIVE_KEYS_PER_USER",
  "COMPLETENESS_HEARTBEAT_MS", "READ_MAX_LAG_MS", "READ_CHECK_MS", "READ_FALLBACK", "HEALTH_TIMEOUT_MS",
];

/** Variables keytrack's tools read that are not service settings (never reported as look-alikes). */
const OTHER_NAMES: readonly string[] = ["TEST_DATABASE_URL", "KEYTRACK_TEST_ROOT_URL", "KEYTRACK_SKIP_PROMTOOL"];

/** Upper case, no underscores, dashes or dots: ADMIN_APIKEY, admin_api_key and ADMINAPIKEY compare equal. */
function normaliseName(name: string): string {
  return name.toUpperCase().replace(/[_\-.]/g, "");
}

/** Edit distance (insertions, deletions, substitutions, swaps of neighbours), giving up past `max`. */
function editDistance(a: string, b: string, max: number): number {
  if (Math.abs(a.length - b.length) > max) return max + 1;
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) => [i, ...new Array<number>(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) d[0]![j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      let v = Math.min(d[i - 1]![j]! + 1, d[i]![j - 1]! + 1, d[i - 1]![j - 1]! + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) v = Math.min(v, d[i - 2]![j - 2]! + 1);
      d[i]![j] = v;
    }
  }
  return d[a.length]![b.length]!;
}

/**
 * Environment variables that look like a setting but are not one (DATABSE_URL,
 * ADMIN_APIKEY, KEYTRACK_DATADIR), each with the setting probably meant: same
 * name ignoring case and underscores, or within edit distance 2 (1 for names
 * of under 8 letters, so HOME is not taken for HOST nor PGPORT for PORT).
 * Only warnings: a stray variable never stops the service.
 */
export function unknownSettingWarnings(env: NodeJS.ProcessEnv = process.env): Array<{ name: string; meant: string; message: string }> {
  const known = new Set([...SETTING_NAMES, ...OTHER_NAMES]);
  const out: Array<{ name: string; meant: string; message: string }> = [];
  for (const name of Object.keys(env).sort()) {
    if (known.has(name) || env[name] === undefined) continue;
    const n = normaliseName(name);
    if (n.length < 3) continue;
    let best: { meant: string; distance: number } | null = null;
    for (const setting of SETTING_NAMES) {
      const s = normaliseName(setting);
      const max = Math.min(s.length, n.length) >= 8 ? 2 : 1;
      const distance = n === s ? 0 : editDistance(n, s, max);
      if (distance <= max && (best === null || distance < best.distance)) best = { meant: setting, distance };
    }
    if (best) {
      out.push({
        name,
        meant: best.meant,
        message: `${name} is set, but keytrack has no such setting: did you mean ${best.meant}? (it is ignored)`,
      });
    }
  }
  return out;
}

export function loadConfig(env: NodeJS.ProcessEnv = process.env): Config {
  const databaseUrl = pgUrl(env, "DATABASE_URL");
  // Development (anonymous requests, a dev key, internals in 500 bodies) is the default only
  // on the embedded database: a deployment pointed at its own database never runs in it by accident.
  const appEnv = oneOf(env, "APP_ENV", APP_ENVS, databaseUrl ? "production" : "development");

  const overrides: Partial<DatabaseUrls> = {};
  const auth = pgUrl(env, "AUTH_DATABASE_URL");
  const root = pgUrl(env, "ROOT_DATABASE_URL");
  const shadow = pgUrl(env, "SHADOW_DATABASE_URL");
  const read = pgUrl(env, "READ_DATABASE_URL");
  if (auth) overrides.authDatabaseUrl = auth;
  if (root) overrides.rootDatabaseUrl = root;
  if (shadow) overrides.shadowDatabaseUrl = shadow;
  if (read) overrides.readDatabaseUrl = read;

  const adminApiKey = str(env, "ADMIN_API_KEY");
  if (adminApiKey !== null) {
    const min = appEnv === "development" ? 8 : 32;
    if (adminApiKey.length < min) {
      throw new ConfigError(
        `ADMIN_API_KEY must be at least ${min} characters when APP_ENV=${appEnv}, got ${adminApiKey.length}`,
      );
    }
  }

  const bodyLimit = str(env, "BODY_LIMIT") ?? "1mb";
  const bodyLimitBytes = parseByteSize(bodyLimit);
  if (bodyLimitBytes === null) {
    throw new ConfigError(`BODY_LIMIT must be a size such as 100kb or 1mb, got "${bodyLimit}"`);
  }

  return {
    db: databaseUrl ? deriveDatabaseUrls(databaseUrl, overrides) : null,
    dbOverrides: overrides,
    dataDir: path.resolve(str(env, "KEYTRACK_DATA_DIR") ?? "./.keytrack"),
    embeddedPgPort: int(env, "EMBEDDED_PG_PORT", 1, 65535, 54329)!,
    // 0 asks the OS for a free port (tests); the chosen one is logged.
    port: int(env, "PORT", 0, 65535, 8000)!,
    host: str(env, "HOST") ?? "0.0.0.0",
    appEnv,
    adminApiKey,
    allowAnonymous: bool(env, "ALLOW_ANONYMOUS", appEnv === "development"),
    upstreamBaseUrl: httpUrl(env, "UPSTREAM_BASE_URL"),
    upstreamApiKey: str(env, "UPSTREAM_API_KEY"),
    upstreamTimeoutMs: int(env, "UPSTREAM_TIMEOUT_MS", 1, 3_600_000, 60_000)!,
    authCacheTtlMs: int(env, "AUTH_CACHE_TTL_MS", 0, 600_000, 5000)!,
    authStaleMaxMs: int(env, "AUTH_STALE_MAX_MS", 0, 86_400_000, 900_000)!,
    metricsToken: str(env, "METRICS_TOKEN"),
    readMaxLagMs: int(env, "READ_MAX_LAG_MS", 0, 86_400_000, 10_000)!,
    readCheckMs: int(env, "READ_CHECK_MS", 100, 600_000, 2_000)!,
    readFallback: bool(env, "READ_FALLBACK", true),
    healthTimeoutMs: int(env, "HEALTH_TIMEOUT_MS", 100, 600_000, 2_000)!,
    retentionDays: int(env, "RETENTION_DAYS", 1, 1_000_000, null),
    worker: bool(env, "WORKER", true),
    workerConcurrency: int(env, "WORKER_CONCURRENCY", 1, 64, 2)!,
    attributionRetryMaxAttempts: int(env, "ATTRIBUTION_RETRY_MAX_ATTEMPTS", 1, 1000, 10)!,
    attributionRetryBaseMs: int(env, "ATTRIBUTION_RETRY_BASE_MS", 1, 3_600_000, 1000)!,
    attributionRetryMaxMs: int(env, "ATTRIBUTION_RETRY_MAX_MS", 1, 86_400_000, 600_000)!,
    attributionRetryBatchSize: int(env, "ATTRIBUTION_RETRY_BATCH_SIZE", 1, 100_000, 500)!,
    backfillBatchSize: int(env, "BACKFILL_BATCH_SIZE", 1, 100_000, 1000)!,
    recordRetryAttempts: int(env, "RECORD_RETRY_ATTEMPTS", 1, 20, 3)!,
    recordRetryBaseMs: int(env, "RECORD_RETRY_BASE_MS", 1, 60_000, 100)!,
    // 5000: MAX_RECORD_BATCH_SIZE (server/recording/recorder.ts); 8: the owner pool has 10 connections, shared.
    recordBatchSize: int(env, "RECORD_BATCH_SIZE", 1, 5000, 500)!,
    recordConcurrency: int(env, "RECORD_CONCURRENCY", 1, 8, 2)!,
    logLevel: oneOf(env, "LOG_LEVEL", LOG_LEVELS, "info"),
    bodyLimit,
    bodyLimitBytes,
    upstreamMaxBodyBytes: size(env, "UPSTREAM_MAX_BODY", "16mb"),
    upstreamMaxEventBytes: size(env, "UPSTREAM_MAX_EVENT", "1mb"),
    echoModel: bool(env, "ECHO_MODEL", appEnv !== "production"),
    graphiql: bool(env, "GRAPHIQL", appEnv === "development"),
    graphqlDefaultPageSize: int(env, "GRAPHQL_DEFAULT_PAGE_SIZE", 1, 10_000, 100)!,
    graphqlMaxPageSize: int(env, "GRAPHQL_MAX_PAGE_SIZE", 1, 100_000, 1000)!,
    graphqlMaxCost: int(env, "GRAPHQL_MAX_COST", 1, 100_000_000, 50_000)!,
    graphqlMaxDepth: int(env, "GRAPHQL_MAX_DEPTH", 1, 100, 10)!,
    graphqlStatementTimeoutMs: int(env, "GRAPHQL_STATEMENT_TIMEOUT_MS", 100, 3_600_000, 10_000)!,
    maxLiveKeysPerUser: int(env, "MAX_LIVE_KEYS_PER_USER", 1, 100_000, 20)!,
    completenessHeartbeatMs: int(env, "COMPLETENESS_HEARTBEAT_MS", 100, 60_000, 10_000)!,
  };
}
