/**
 * The service's own connection pools: the owner pool (health checks and the
 * security definer calls that authenticate keys) and an optional read pool on
 * a replica. PostGraphile keeps its own authenticator pool.
 */
import pg from "pg";

import type { DatabaseUrls } from "../config.js";
import { redactUrl } from "./urls.js";
import type { Logger } from "../log.js";

export interface Pools {
  /** Connects as the owner (DATABASE_URL). */
  owner: pg.Pool;
  /** READ_DATABASE_URL when set, else the owner pool itself. */
  read: pg.Pool;
}

function makePool(name: string, connectionString: string, log: Logger): pg.Pool {
  // connectionTimeoutMillis: a database that hangs instead of refusing must not
  // queue callers for minutes (the recorder's retries and /health rely on it).
  const pool = new pg.Pool({ connectionString, max: 10, idleTimeoutMillis: 30_000, connectionTimeoutMillis: 5_000 });
  // An idle client losing its connection (server restart, network) must not
  // crash the process: pg emits 'error' on the pool, which throws if unheard.
  pool.on("error", (err) => {
    log.warn("idle database client error", { pool: name, error: err });
  });
  // A checked-out client's connection dying is reported on the client too;
  // graphile-worker (which shares this pool) insists these are heard.
  pool.on("connect", (client) => {
    client.on("error", (err) => log.warn("database client error", { pool: name, error: err }));
  });
  log.debug("database pool created", { pool: name, url: redactUrl(connectionString) });
  return pool;
}

export function createPools(urls: Pick<DatabaseUrls, "databaseUrl" | "readDatabaseUrl">, log: Logger): Pools {
  const owner = makePool("owner", urls.databaseUrl, log);
  const read = urls.readDatabaseUrl ? makePool("read", urls.readDatabaseUrl, log) : owner;
  return { owner, read };
}

export async function closePools(pools: Pools): Promise<void> {
  const distinct = new Set([pools.owner, pools.read]);
  await Promise.all([...distinct].map((pool) => (pool.ended ? undefined : pool.end())));
}
