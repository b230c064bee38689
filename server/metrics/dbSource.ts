/**
 * Reads one metrics function (app_private.attribution_metrics() by default) for a scrape: at most one query in
 * flight, its answer shared by the scrapes of the next TTL (parallel scrapers,
 * several Prometheus servers), a client-side budget so /metrics always answers,
 * and a server-side statement_timeout so a slow database is not piled on.
 */
import type pg from "pg";

import type { Logger } from "../log.js";
import { ATTRIBUTION_METRICS_SQL } from "./dbMetrics.js";

export type DbSnapshot =
  | { ok: true; row: Record<string, unknown>; rows: Array<Record<string, unknown>>; at: number }
  | { ok: false; error: string; at: number };

export interface DbSourceOptions {
  /** How long an answer (or a failure) is reused, in ms. */
  ttlMs?: number;
  /** How long a scrape waits for the database, in ms. */
  timeoutMs?: number;
  now?: () => number;
  /** The query (default: the attribution metrics). */
  sql?: string;
}

/** The part of pg.Pool used here (tests pass a fake). */
export type MetricsPool = Pick<pg.Pool, "connect">;

export class DbMetricsSource {
  private readonly ttlMs: number;
  private readonly timeoutMs: number;
  private readonly now: () => number;
  private readonly sql: string;
  private cached: DbSnapshot | null = null;
  private inflight: Promise<DbSnapshot> | null = null;
  private lastError: string | null = null;

  constructor(
    private readonly pool: MetricsPool,
    private readonly log: Logger,
    options: DbSourceOptions = {},
  ) {
    this.ttlMs = options.ttlMs ?? 1500;
    this.timeoutMs = options.timeoutMs ?? 2000;
    this.now = options.now ?? Date.now;
    this.sql = options.sql ?? ATTRIBUTION_METRICS_SQL;
  }

  /** The latest answer, at most ttlMs old; never rejects. */
  get(): Promise<DbSnapshot> {
    const cached = this.cached;
    if (cached && this.now() - cached.at < this.ttlMs) return Promise.resolve(cached);
    // A query still running (even past a previous scrape's budget) is waited on, not repeated.
    this.inflight ??= this.query()
      .then((snapshot) => (this.cached = snapshot))
      .finally(() => {
        this.inflight = null;
      });
    return this.within(this.inflight);
  }

  private async within(query: Promise<DbSnapshot>): Promise<DbSnapshot> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<DbSnapshot>((resolve) => {
      timer = setTimeout(
        () => resolve({ ok: false, error: `no answer within ${this.timeoutMs} ms`, at: this.now() }),
        this.timeoutMs,
      );
    });
    try {
      const snapshot = await Promise.race([query, timeout]);
      // A late answer replaces this failure in the cache when it arrives.
      if (!snapshot.ok && snapshot !== this.cached) this.cached = snapshot;
      this.report(snapshot);
      return snapshot;
    } finally {
      clearTimeout(timer);
    }
  }

  private async query(): Promise<DbSnapshot> {
    let client: pg.PoolClient | undefined;
    let broken: Error | undefined;
    try {
      client = await this.pool.connect();
      // SET LOCAL: the timeout must not leak to the pool's other users.
      await client.query("begin");
      await client.query(`set local statement_timeout = ${Math.max(1, this.timeoutMs)}`);
      const { rows } = await client.query(this.sql);
      await client.query("commit");
      return { ok: true, row: (rows[0] ?? {}) as Record<string, unknown>, rows: rows as Array<Record<string, unknown>>, at: this.now() };
    } catch (err) {
      if (client) {
        await client.query("rollback").catch((e: Error) => {
          broken = e;
        });
      }
      return { ok: false, error: describe(err), at: this.now() };
    } finally {
      // A connection that could not even roll back is dropped, not reused.
      client?.release(broken);
    }
  }

  /** Logs a change of state once, not at every scrape. */
  private report(snapshot: DbSnapshot): void {
    if (!snapshot.ok && snapshot.error !== this.lastError) {
      this.log.warn("metrics: the database did not answer; database-derived metrics are left out", {
        error: snapshot.error,
      });
      this.lastError = snapshot.error;
    } else if (snapshot.ok && this.lastError !== null) {
      this.log.info("metrics: the database answers again");
      this.lastError = null;
    }
  }
}

function describe(err: unknown): string {
  const message = err instanceof Error ? err.message : String(err);
  const code = (err as { code?: unknown } | null)?.code;
  const text = typeof code === "string" && !message.includes(code) ? `${code}: ${message}` : message;
  return text.split("\n")[0]!.slice(0, 200);
}
