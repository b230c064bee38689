// For command-line tools: the database the service would use (DATABASE_URL, or
// the embedded PostgreSQL in the data folder, started or joined), prepared.
import { isConnected, withDatabaseUrls, type Config, type ConnectedConfig } from "../config.js";
import { startEmbeddedPostgres } from "../db/embedded.js";
import { prepareDatabase } from "../db/prepare.js";

export async function connectForCli(config: Config, log: (msg: string) => void): Promise<{ config: ConnectedConfig; close(): Promise<void> }> {
  if (isConnected(config)) {
    await prepareDatabase({ rootUrl: config.db.rootDatabaseUrl, databaseUrl: config.db.databaseUrl, log });
    return { config, close: async () => {} };
  }
  const embedded = await startEmbeddedPostgres({ dataDir: config.dataDir, port: config.embeddedPgPort, log });
  const connected = withDatabaseUrls(config, { databaseUrl: embedded.ownerUrl, rootDatabaseUrl: embedded.rootUrl });
  try {
    await prepareDatabase({ rootUrl: connected.db.rootDatabaseUrl, databaseUrl: connected.db.databaseUrl, log });
  } catch (err) {
    await embedded.stop();
    throw err;
  }
  return { config: connected, close: () => embedded.stop() };
}
