// Each test file gets a database of its own, cloned from the migrated template
// that scripts/test.ts prepared, so files run in parallel without interfering.
import { randomBytes } from "node:crypto";
import pg from "pg";
import { applyDatabasePrivileges } from "../../server/db/prepare.js";
import { withDatabaseName, withUser } from "../../server/db/urls.js";
import { waitFor } from "./poll.js";

export interface TestDb {
  name: string;
  /** Superuser, on this database. */
  rootUrl: string;
  /** keytrack_owner (what the service's DATABASE_URL is). */
  ownerUrl: string;
  /** keytrack_authenticator (what PostGraphile connects as). */
  authUrl: string;
  /** keytrack_analyst: the read-only DBA login. */
  analystUrl: string;
  /** A pool as the owner. */
  owner: pg.Pool;
  /** A pool as the superuser. */
  root: pg.Pool;
  drop(): Promise<void>;
}

function env(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is unset: run the tests with \`npm test\`, which prepares the database`);
  return value;
}

export async function createTestDb(): Promise<TestDb> {
  const rootClusterUrl = env("KEYTRACK_TEST_ROOT_URL");
  const template = env("KEYTRACK_TEST_TEMPLATE");
  const name = `kt_t_${env("KEYTRACK_TEST_RUN")}_${randomBytes(4).toString("hex")}`;
  const admin = new pg.Client({ connectionString: rootClusterUrl });
  await admin.connect();
  try {
    await admin.query(`create database ${pg.escapeIdentifier(name)} template ${pg.escapeIdentifier(template)} owner keytrack_owner`);
  } finally {
    await admin.end();
  }
  const rootUrl = withDatabaseName(rootClusterUrl, name);
  const ownerUrl = withUser(rootUrl, "keytrack_owner");
  await applyDatabasePrivileges(rootClusterUrl, ownerUrl);
  const owner = new pg.Pool({ connectionString: ownerUrl, max: 5 });
  const root = new pg.Pool({ connectionString: rootUrl, max: 2 });
  owner.on("error", () => {});
  root.on("error", () => {});
  return {
    name,
    rootUrl,
    ownerUrl,
    authUrl: withUser(rootUrl, "keytrack_authenticator"),
    analystUrl: withUser(rootUrl, "keytrack_analyst"),
    owner,
    root,
    async drop() {
      await owner.end();
      await root.end();
      const c = new pg.Client({ connectionString: rootClusterUrl });
      await c.connect();
      try {
        await c.query(`drop database if exists ${pg.escapeIdentifier(name)} with (force)`);
      } finally {
        await c.end();
      }
    },
  };
}

/** A pool the test owns (and ends); idle-client errors (cut connections) are expected. */
export function makePool(connectionString: string, config: pg.PoolConfig = {}): pg.Pool {
  const pool = new pg.Pool({ connectionString, max: 3, ...config });
  pool.on("error", () => {});
  return pool;
}

/** Runs fn in a client connected with the given URL, then disconnects. */
export async function withClient<T>(url: string, fn: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: url });
  client.on("error", () => {});
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}

/** The roles the service switches a /graphql request to (its pgSettings: server/middleware/). */
export type RequestRole = "keytrack_admin" | "keytrack_user";

/** What the service sets besides the role (pgSettings keytrack.user_id, keytrack.api_key_id). */
export interface RequestSettings {
  userId?: string;
  apiKeyId?: string;
}

export interface AsRoleOptions {
  /** The transaction's isolation level (one snapshot for several reads: "repeatable read"). */
  isolation?: "read committed" | "repeatable read" | "serializable";
}

/**
 * Runs fn as the service runs a request: connected as keytrack_authenticator,
 * in a transaction whose role and settings are set with set_config(..., true),
 * as PostGraphile applies the pgSettings the service's /graphql auth builds
 * (role, keytrack.user_id, keytrack.api_key_id). The transaction is always
 * rolled back (no caller needs what fn writes kept); an error from fn, or a
 * refused role switch (42501), is passed on.
 */
export async function asRole<T>(
  db: Pick<TestDb, "authUrl">,
  role: RequestRole,
  settings: RequestSettings,
  fn: (client: pg.Client) => Promise<T>,
  { isolation }: AsRoleOptions = {},
): Promise<T> {
  const pgSettings: Record<string, string | undefined> = {
    role,
    "keytrack.user_id": settings.userId,
    "keytrack.api_key_id": settings.apiKeyId,
  };
  const entries = Object.entries(pgSettings).filter((e): e is [string, string] => e[1] !== undefined);
  return withClient(db.authUrl, async (client) => {
    await client.query(isolation ? `begin isolation level ${isolation}` : "begin");
    try {
      // The statement @dataplan/pg runs for a request's pgSettings.
      await client.query("select set_config(el->>0, el->>1, true) from json_array_elements($1::json) el", [JSON.stringify(entries)]);
      return await fn(client);
    } finally {
      await client.query("rollback").catch(() => {});
    }
  });
}

/** Refreshes the hourly rollups until every hour before the current one is settled. */
export async function settleRollups(pool: Pick<pg.Pool, "query">): Promise<void> {
  await waitFor(
    "the attribution rollups to settle",
    async () =>
      (await pool.query<{ done: boolean }>(
        `select (app_private.refresh_attribution_rollups()).settled_through >= date_trunc('hour', clock_timestamp(), 'UTC') as done`,
      )).rows[0]!.done,
    { intervalMs: 100 },
  );
}

/** Creates a user (as the owner) and returns its id. */
export async function createUser(db: TestDb, email: string, role: "user" | "admin" = "user"): Promise<string> {
  const { rows } = await db.owner.query("insert into app_public.users (email, role) values ($1, $2) returning id", [email, role]);
  return rows[0].id;
}

/** Creates a key for a user (as the owner) and returns its id and secret. */
export async function createKey(db: TestDb, userId: string, name = "test"): Promise<{ id: string; secret: string }> {
  const { rows } = await db.owner.query("select * from app_public.create_api_key($1, $2)", [userId, name]);
  return { id: rows[0].api_key_id, secret: rows[0].secret };
}

/** A row of the ledger (app_public.chat_completion_requests); the columns tests read. */
export interface LedgerRow {
  /** bigint, as node-pg reads it. */
  id: string;
  request_id: string;
  api_key_id: string | null;
  user_id: string | null;
  is_anonymous: boolean;
  model: string | null;
  provider: string | null;
  input_tokens: number | null;
  output_tokens: number | null;
  processing_time_ms: number | null;
  status: string;
  error_message: string | null;
  api_key_hash: Buffer | null;
  attribution_status: string;
  attribution_reason: string | null;
  spooled_at: Date | null;
}

/** The ledger's rows of these request ids, in insertion (id) order. */
export async function rowsFor(pool: Pick<pg.Pool, "query">, requestIds: string[]): Promise<LedgerRow[]> {
  const { rows } = await pool.query<LedgerRow>(
    "select * from app_public.chat_completion_requests where request_id = any($1) order by id",
    [requestIds],
  );
  return rows;
}
