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
//   npm run db -- status    any other graphile-migrate command
import { spawn } from "node:child_process";
import path from "node:path";
import { ConfigError, isConnected, loadConfig, withDatabaseUrls, type ConnectedConfig } from "../server/config.js";
import { startEmbeddedPostgres, type EmbeddedPostgres } from "../server/db/embedded.js";
import { ensureDatabase } from "../server/db/prepare.js";
import { projectRoot } from "../server/db/projectRoot.js";

const aliases: Record<string, string[]> = {
  dump: ["reset", "--shadow", "--erase"],
  reset: ["reset", "--erase"],
};

async function main(): Promise<number> {
  const [command = "status", ...rest] = process.argv.slice(2);
  const config = loadConfig();
  let embedded: EmbeddedPostgres | null = null;
  let connected: ConnectedConfig;
  if (isConnected(config)) {
    connected = config;
  } else {
    embedded = await startEmbeddedPostgres({ dataDir: config.dataDir, port: config.embeddedPgPort, log: (l) => console.error(l) });
    connected = withDatabaseUrls(config, { databaseUrl: embedded.ownerUrl, rootDatabaseUrl: embedded.rootUrl });
  }
  try {
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
    console.error(err instanceof ConfigError ? `keytrack: configuration error: ${err.message}` : `db: ${err.stack ?? err}`);
    process.exit(err instanceof ConfigError ? 2 : 1);
  },
);
