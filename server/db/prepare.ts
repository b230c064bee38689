// Brings a database to the current schema: the cluster-wide roles, the database
// itself, graphile-worker's schema, then graphile-migrate's committed migrations.
// Used by `npm start`, by scripts/db.ts and by the test harness, so that every
// database keytrack touches is prepared the same way.
import { readFile } from "node:fs/promises";
import path from "node:path";
import { pathToFileURL } from "node:url";
import pg from "pg";
import { Logger, migrate } from "graphile-migrate";
// Not re-exported by the package index, but part of its module (dist/pg.js).
import { clearAllPools } from "graphile-migrate/dist/pg.js";
import { migrationsFolder, projectRoot } from "./projectRoot.js";
import { databaseNameOf, redactUrl, userNameOf, withDatabaseName } from "./urls.js";

export interface PrepareOptions {
  /** A superuser connection to any database of the cluster. */
  rootUrl: string;
  /** The owner's connection to keytrack's database (created when missing). */
  databaseUrl: string;
  log?: (msg: string) => void;
}

function databaseOf(url: string): { database: string; user: string } {
  const database = databaseNameOf(url);
  if (!database) throw new Error(`the connection string ${redactUrl(url)} names no database`);
  return { database, user: userNameOf(url) };
}

/** Runs fn with a client connected to url, then disconnects. */
export async function withClient<T>(url: string, fn: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}

async function readSetupSql(file: string, database: string, owner: string): Promise<string> {
  const text = await readFile(path.join(migrationsFolder, file), "utf8");
  // Substituted as bare names, as graphile-migrate does (the files also use them
  // inside string literals), so only plain identifiers are accepted.
  for (const name of [database, owner]) {
    if (!/^[a-z_][a-z0-9_]*$/.test(name)) {
      throw new Error(`database and owner names must be plain lower-case identifiers ([a-z_][a-z0-9_]*), got "${name}"`);
    }
  }
  return text.replace(/:DATABASE_NAME\b/g, database).replace(/:DATABASE_OWNER\b/g, owner);
}

/**
 * Creates the cluster-wide roles (roles.sql) and, when missing, the database
 * owned by the connection string's user, then applies its privileges
 * (afterReset.sql): the same files graphile-migrate runs after `reset`.
 */
export async function ensureDatabase(rootUrl: string, databaseUrl: string, log = (_: string) => {}): Promise<void> {
  try {
    await ensureDatabaseUnchecked(rootUrl, databaseUrl, log);
  } catch (err) {
    if ((err as { code?: string }).code === "42501") {
      throw new Error(
        `preparing the database needs a superuser once (roles, database, privileges): set ROOT_DATABASE_URL ` +
          `to a superuser connection (it is ${redactUrl(rootUrl)}): ${(err as Error).message}`,
        { cause: err },
      );
    }
    throw err;
  }
}

async function ensureDatabaseUnchecked(rootUrl: string, databaseUrl: string, log: (msg: string) => void): Promise<void> {
  const { database, user } = databaseOf(databaseUrl);
  await withClient(rootUrl, async (client) => {
    await client.query(await readSetupSql("roles.sql", database, user));
    const { rowCount } = await client.query("select 1 from pg_database where datname = $1", [database]);
    if (!rowCount) {
      log(`creating database ${database} owned by ${user}`);
      await client.query(`create database ${pg.escapeIdentifier(database)} owner ${pg.escapeIdentifier(user)}`);
    }
  });
  await applyDatabasePrivileges(rootUrl, databaseUrl);
}

/** afterReset.sql on one database: its privileges (not copied when a database is cloned from a template). */
export async function applyDatabasePrivileges(rootUrl: string, databaseUrl: string): Promise<void> {
  const { database, user } = databaseOf(databaseUrl);
  const privileges = await readSetupSql("afterReset.sql", database, user);
  await withClient(withDatabaseName(rootUrl, database), (client) => client.query(privileges));
}

/** Roles, database, graphile-worker's schema, then every committed migration. Idempotent. */
export async function prepareDatabase(options: PrepareOptions): Promise<void> {
  // Replicas (or a worker process) starting at once take turns: one prepares,
  // the others then find everything in place. The lock lives on the root
  // connection because keytrack's database may not exist yet.
  const { database } = databaseOf(options.databaseUrl);
  const lock = new pg.Client({ connectionString: options.rootUrl });
  await lock.connect();
  try {
    await lock.query("select pg_advisory_lock(hashtext('keytrack prepare ' || $1))", [database]);
    await prepareDatabaseLocked(options);
  } finally {
    await lock.end(); // releases the session lock
  }
}

async function prepareDatabaseLocked({ rootUrl, databaseUrl, log = () => {} }: PrepareOptions): Promise<void> {
  await ensureDatabase(rootUrl, databaseUrl, log);
  const worker = await import(pathToFileURL(path.join(projectRoot, "scripts/install-worker-schema.mjs")).href);
  await worker.installWorkerSchema(databaseUrl);
  await migrate({
    connectionString: databaseUrl,
    rootConnectionString: rootUrl,
    migrationsFolder,
    // Production has no shadow database; the schema dump is refreshed by watch/commit.
    afterAllMigrations: [],
    beforeAllMigrations: [],
    logger: makeMigrateLogger(log),
  });
  // graphile-migrate keeps its pool for 200 ms after use and exits the whole
  // process if a connection in it errors meanwhile (a database stopped right
  // after start-up): end its idle pools now.
  clearAllPools();
}

function makeMigrateLogger(log: (msg: string) => void): Logger {
  // Keep graphile-migrate's chatter in our log instead of on stdout.
  return new Logger(() => (level, message) => {
    if (level !== "debug") log(`migrate: ${message}`);
  });
}
