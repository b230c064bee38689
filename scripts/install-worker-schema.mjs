// Installs (or upgrades) graphile-worker's own schema in the database named by
// GM_DBURL (graphile-migrate's beforeAllMigrations hook) or by the first argument.
// Our migrations reference graphile_worker, so it must exist before they run.
import { runMigrations } from "graphile-worker";
import { pathToFileURL } from "node:url";

export async function installWorkerSchema(connectionString) {
  await runMigrations({ connectionString, logger: undefined });
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  const url = process.argv[2] ?? process.env.GM_DBURL;
  if (!url) {
    console.error("install-worker-schema: pass a connection string or set GM_DBURL");
    process.exit(2);
  }
  installWorkerSchema(url).catch((err) => {
    console.error(`install-worker-schema: ${err.message}`);
    process.exit(1);
  });
}
