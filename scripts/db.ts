// `npm run db:<command>`: runs graphile-migrate against the database the service
// would use, with the connection strings it needs filled in from the same
// settings (DATABASE_URL, ROOT_DATABASE_URL, SHADOW_DATABASE_URL). With
// DATABASE_URL unset it starts (or joins) the embedded PostgreSQL first.
//
//   npm run db:migrate      apply committed migrations
//   npm run db:watch        apply them, then run and re-run migrations/current/ on every save
//   npm run db:commit -- -m "message"   commit migrations/current/ (rebuilds the shadow database)
//   npm run db:reset        drop and recreate the database (asks no questions: development only)
//   npm run db:dump         rebuild the shadow database and refresh migrations/schema.sql
//   npm run db:psql         psql on that database as its owner (`-- --analyst`: as keytrack_analyst;
//                           other arguments go to psql, e.g. `-- -c "select 1"`)
//   npm run db -- status    any other graphile-migrate command
import { spawn } from "node:child_process";
import { constants as fsConstants } from "node:fs";
import { access } from "node:fs/promises";
import path from "node:path";
import { ConfigError, isConnected, loadConfig, withDatabaseUrls, type ConnectedConfig } from "../server/config.js";
import { startEmbeddedPostgres, type EmbeddedPostgres } from "../server/db/embedded.js";
import { ensureDatabase } from "../server/db/prepare.js";
import { projectRoot } from "../server/db/projectRoot.js";
import { redactUrl, withUser } from "../server/db/urls.js";

/** The executable `name` on PATH, or null. */
async function onPath(name: string): Promise<string | null> {
  for (const dir of (process.env.PATH ?? "").split(path.delimiter)) {
    if (!dir) continue;
    const file = path.join(dir, name);
    try {
      await access(file, fsConstants.X_OK);
      return file;
    } catch {
      // not here
    }
  }
  return null;
}

const NO_PSQL =
  "db:psql: psql (the PostgreSQL client) is not installed, or not on PATH. Install it: " +
  "Debian/Ubuntu `apt-get install postgresql-client`, Fedora `dnf install postgresql`, macOS `brew install libpq` " +
  "(then add its bin folder to PATH); or use any other client with the connection string keytrack uses.";

/** `npm run db:psql [-- --analyst] [psql arguments]`: psql on keytrack's database, as its owner or as keytrack_analyst. */
async function psql(connected: ConnectedConfig, args: string[]): Promise<number> {
  const analyst = args.includes("--analyst");
  const rest = args.filter((a) => a !== "--analyst");
  // No password for the analyst: psql asks, or takes PGPASSWORD / ~/.pgpass (the embedded cluster needs none).
  const url = analyst ? withUser(connected.db.databaseUrl, "keytrack_analyst") : connected.db.databaseUrl;
  console.error(`db:psql: ${redactUrl(url)}`);
  return await new Promise<number>((resolve, reject) => {
    const child = spawn("psql", [url, ...rest], { stdio: "inherit" });
    // psql handles Ctrl-C itself (cancels the running query): this process just stays.
    process.on("SIGINT", () => {});
    process.on("SIGTERM", () => child.kill("SIGTERM"));
    child.on("error", (err) => reject((err as NodeJS.ErrnoException).code === "ENOENT" ? new Error(NO_PSQL) : err));
    child.on("close", (code) => resolve(code ?? 1));
  });
}

const aliases: Record<string, string[]> = {
  dump: ["reset", "--shadow", "--erase"],
  reset: ["reset", "--erase"],
};

async function main(): Promise<number> {
  const [command = "status", ...rest] = process.argv.slice(2);
  const config = loadConfig();
  if (command === "psql" && !(await onPath("psql"))) {
    console.error(NO_PSQL);
    return 1;
  }
  let embedded: EmbeddedPostgres | null = null;
  let connected: ConnectedConfig;
  if (isConnected(config)) {
    connected = config;
  } else {
    embedded = await startEmbeddedPostgres({ dataDir: config.dataDir, port: config.embeddedPgPort, log: (l) => console.error(l) });
    connected = withDatabaseUrls(config, { databaseUrl: embedded.ownerUrl, rootDatabaseUrl: embedded.rootUrl });
  }
  try {
    if (command === "psql") {
      // The embedded cluster may not hold keytrack's database (and roles) yet; a server of yours is left as it is.
      if (embedded) await ensureDatabase(connected.db.rootDatabaseUrl, connected.db.databaseUrl, (m) => console.error(m));
      return await psql(connected, rest);
    }
    await ensureDatabase(connected.db.rootDatabaseUrl, connected.db.databaseUrl, (m) => console.error(m));
    const args = [...(aliases[command] ?? [command]), ...rest];
    return await new Promise<number>((resolve, reject) => {
      const child = spawn(process.execPath, [path.join(projectRoot, "node_modules/graphile-migrate/dist/cli.js"), ...args], {
        cwd: projectRoot,
        stdio: "inherit",
        env: {
          ...process.env,
          DATABASE_URL: connected.db.databaseUrl,
          ROOT_DATABASE_URL: connected.db.rootDatabaseUrl,
          SHADOW_DATABASE_URL: connected.db.shadowDatabaseUrl,
        },
      });
      const forward = (signal: NodeJS.Signals) => child.kill(signal);
      process.on("SIGINT", forward);
      process.on("SIGTERM", forward);
      child.on("error", reject);
      child.on("close", (code) => resolve(code ?? 1));
    });
  } finally {
    await embedded?.stop();
  }
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(
      err instanceof ConfigError
        ? `keytrack: configuration error: ${err.message}`
        : err?.message === NO_PSQL
          ? NO_PSQL
          : `db: ${err.stack ?? err}`,
    );
    process.exit(err instanceof ConfigError ? 2 : 1);
  },
);
