// Each test file gets a database of its own, cloned from the migrated template
// that scripts/test.ts prepared, so files run in parallel without interfering.
import { randomBytes } from "node:crypto";
import pg from "pg";
import { applyDatabasePrivileges } from "../../server/db/prepare.js";
import { withDatabaseName, withUser } from "../../server/db/urls.js";

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
