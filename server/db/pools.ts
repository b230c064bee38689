/**
 * The service's own connection pools: the owner pool (writes, health checks
 * and the security definer calls that authenticate keys), and the read side:
 * with READ_DATABASE_URL, a replica's pool behind a ReadRouter (reads go to the
 * replica while it is healthy, else to the primary; see readRouter.ts).
 * PostGraphile keeps its own authenticator pools.
 */
import pg from "pg";

import type { DatabaseUrls } from "../config.js";
import { redactUrl } from "./urls.js";
import type { Logger } from "../log.js";
import { ReadRouter } from "./readRouter.js";

export interface Pools {
  /** Connects as the owner (DATABASE_URL). */
  owner: pg.Pool;
  /** Where reads go: the router's pool with READ_DATABASE_URL set, else the owner pool itself. */
  read: pg.Pool;
  /** Decides between the replica and the primary (no replica: always the primary). */
  reads: ReadRouter;
}

export interface ReadRouting {
  /** A replica further behind than this is not read from. */
  readMaxLagMs: number;
  /** How often the replica is checked. */
  readCheckMs: number;
  /** Read from the primary while the replica is unhealthy (else those reads fail). */
  readFallback: boolean;
}

export function makePool(name: string, connectionString: string, log: Logger): pg.Pool {
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

export function createPools(
  urls: Pick<DatabaseUrls, "databaseUrl" | "readDatabaseUrl">,
  log: Logger,
  routing: ReadRouting = { readMaxLagMs: 10_000, readCheckMs: 2_000, readFallback: true },
): Pools {
  const owner = makePool("owner", urls.databaseUrl, log);
  const replica = urls.readDatabaseUrl ? makePool("read", urls.readDatabaseUrl, log) : null;
  const reads = new ReadRouter({ primary: owner, replica, maxLagMs: routing.readMaxLagMs, checkMs: routing.readCheckMs, fallback: routing.readFallback, log: log.child({ component: "reads" }) });
  return { owner, read: replica ? reads.asPool() : owner, reads };
}

export async function closePools(pools: Pools): Promise<void> {
  pools.reads.stop();
  const distinct = new Set([pools.owner, pools.reads.replica].filter((p): p is pg.Pool => p !== null));
  await Promise.all([...distinct].map((pool) => (pool.ended ? undefined : pool.end())));
}
