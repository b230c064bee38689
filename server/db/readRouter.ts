/**
 * Where reads go when READ_DATABASE_URL names a replica: monitoring reports,
 * GraphQL queries and /metrics' database reads run there while it is healthy,
 * and on the primary otherwise. Writes, migrations and the worker never come
 * here.
 *
 * Healthy means: it answers, it is in recovery (a standby, not a promoted
 * node taking writes of its own), and its replay is at most READ_MAX_LAG_MS
 * behind the primary. A check runs every READ_CHECK_MS; a read that fails on
 * the replica with a connection error marks it unhealthy at once and runs on
 * the primary. So a stopped replica costs at most one failed connection
 * attempt per read until the next check, and a lagging one at most
 * READ_CHECK_MS of reads that are older than the limit.
 *
 * Every read says which node answered and as of when: on the primary, now;
 * on a replica, now if it had replayed everything the primary had written at
 * the last check, else the commit time of the last transaction it replayed.
 */
import pg from "pg";

import { isTransientError } from "../recording/retry.js";
import type { Logger } from "../log.js";

export type ReadNode = "primary" | "replica";

/** Why a read that could have gone to the replica went to the primary. */
export type FallbackReason = "unreachable" | "lagging" | "not_standby" | "failed";

export interface ReadInfo {
  node: ReadNode;
  /** The data is complete up to this moment. */
  asOf: Date;
}

export interface ReplicaState {
  healthy: boolean;
  /** Seconds behind the primary at the last check (0: caught up); null until the first check or when unreachable. */
  lagSeconds: number | null;
  reason: FallbackReason | null;
  checkedAt: Date | null;
}

export interface ReadRouterOptions {
  primary: pg.Pool;
  /** The replica's pool (owner role); null when READ_DATABASE_URL is unset. */
  replica: pg.Pool | null;
  maxLagMs: number;
  checkMs: number;
  /** false: never read from the primary instead (a replica that fails fails the read: a 503). */
  fallback?: boolean;
  log: Logger;
}

interface CheckRow {
  in_recovery: boolean;
  replay_lsn: string | null;
  replay_at: Date | null;
  now: Date;
}

export class ReadRouter {
  readonly primary: pg.Pool;
  readonly replica: pg.Pool | null;
  private readonly maxLagMs: number;
  private readonly checkMs: number;
  private readonly fallback: boolean;
  private readonly log: Logger;
  private timer: NodeJS.Timeout | null = null;
  private checking: Promise<void> | null = null;
  private state: ReplicaState = { healthy: false, lagSeconds: null, reason: "unreachable", checkedAt: null };
  /** The primary's WAL position at the last check: a replica that replayed it had everything as of that check. */
  private primaryLsn: string | null = null;
  private primaryLsnAt: Date | null = null;
  private readonly fallbacks = new Map<FallbackReason, number>();
  private readonly served = new Map<ReadNode, number>();

  constructor(options: ReadRouterOptions) {
    this.primary = options.primary;
    this.replica = options.replica;
    this.maxLagMs = options.maxLagMs;
    this.checkMs = options.checkMs;
    this.fallback = options.fallback ?? true;
    this.log = options.log;
  }

  /** Checks the replica now and then every checkMs (no-op without one). */
  async start(): Promise<void> {
    if (!this.replica) return;
    await this.check();
    this.timer = setInterval(() => void this.check(), this.checkMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  get hasReplica(): boolean {
    return this.replica !== null;
  }

  get replicaState(): ReplicaState {
    return { ...this.state };
  }

  /** Reads sent to the primary instead of the replica, by reason (for /metrics). */
  get fallbackCounts(): ReadonlyMap<FallbackReason, number> {
    return this.fallbacks;
  }

  /** Reads served, by node (for /metrics). */
  get servedCounts(): ReadonlyMap<ReadNode, number> {
    return this.served;
  }

  /** One check of the replica (concurrent callers share it). */
  check(): Promise<void> {
    if (!this.replica) return Promise.resolve();
    this.checking ??= this.runCheck().finally(() => {
      this.checking = null;
    });
    return this.checking;
  }

  private async runCheck(): Promise<void> {
    const replica = this.replica!;
    let primaryLsn: string | null = null;
    let primaryAt: Date | null = null;
    try {
      const { rows } = await this.primary.query<{ lsn: string; now: Date }>("select pg_current_wal_lsn()::text as lsn, now()");
      primaryLsn = rows[0]!.lsn;
      primaryAt = rows[0]!.now;
    } catch {
      // The primary down: the replica is all there is; its own replay time says how old its data is.
    }
    let row: CheckRow;
    try {
      const { rows } = await replica.query<CheckRow>(
        "select pg_is_in_recovery() as in_recovery, pg_last_wal_replay_lsn()::text as replay_lsn, pg_last_xact_replay_timestamp() as replay_at, now()");
      row = rows[0]!;
    } catch (err) {
      this.setState({ healthy: false, lagSeconds: null, reason: "unreachable", checkedAt: new Date() }, err);
      return;
    }
    if (!row.in_recovery) {
      this.setState({ healthy: false, lagSeconds: null, reason: "not_standby", checkedAt: row.now });
      return;
    }
    this.primaryLsn = primaryLsn;
    this.primaryLsnAt = primaryAt;
    const caughtUp = primaryLsn !== null && row.replay_lsn !== null && lsnAtLeast(row.replay_lsn, primaryLsn);
    const lagSeconds = caughtUp ? 0 : row.replay_at ? Math.max(0, (row.now.getTime() - row.replay_at.getTime()) / 1000) : null;
    const lagging = lagSeconds === null || lagSeconds * 1000 > this.maxLagMs;
    this.setState({ healthy: !lagging, lagSeconds, reason: lagging ? "lagging" : null, checkedAt: row.now });
  }

  private setState(next: ReplicaState, err?: unknown): void {
    if (next.healthy !== this.state.healthy || next.reason !== this.state.reason) {
      if (next.healthy) this.log.info("read replica healthy: reads go to it", { lagSeconds: next.lagSeconds });
      else this.log.warn("read replica not used: reads go to the primary", { reason: next.reason, lagSeconds: next.lagSeconds, ...(err ? { error: err } : {}) });
    }
    this.state = next;
  }

  /** The node the next read should use (the primary when there is no healthy replica). */
  choose(): ReadNode {
    if (!this.replica) return "primary";
    return this.state.healthy || !this.fallback ? "replica" : "primary";
  }

  /** Whether a read that fails on the replica may run on the primary instead (READ_FALLBACK). */
  get fallsBack(): boolean {
    return this.fallback;
  }

  /** Counts a read that could have gone to the replica but went to the primary. */
  countFallback(reason: FallbackReason): void {
    this.fallbacks.set(reason, (this.fallbacks.get(reason) ?? 0) + 1);
  }

  countServed(node: ReadNode): void {
    this.served.set(node, (this.served.get(node) ?? 0) + 1);
  }

  /** A read on the replica failed on its connection: use the primary until a check finds it healthy again. */
  markFailed(err: unknown): void {
    this.setState({ healthy: false, lagSeconds: null, reason: "unreachable", checkedAt: new Date() }, err);
  }

  /**
   * Runs fn on a client of the chosen node and says which node answered and
   * as of when. A connection failure on the replica runs fn again on the
   * primary (reads only: running twice is harmless).
   */
  async read<T>(fn: (client: pg.PoolClient) => Promise<T>): Promise<{ result: T } & ReadInfo> {
    if (this.choose() === "replica") {
      try {
        const out = await this.onReplica(fn);
        this.countServed("replica");
        return out;
      } catch (err) {
        if (!isTransientError(err)) throw err;
        this.markFailed(err);
        if (!this.fallback) throw err;
        this.countFallback("failed");
      }
    } else if (this.replica) {
      this.countFallback(this.state.reason ?? "unreachable");
    }
    const client = await this.primary.connect();
    try {
      const result = await fn(client);
      this.countServed("primary");
      return { result, node: "primary", asOf: new Date() };
    } finally {
      client.release();
    }
  }

  /**
   * A client of the node read() would choose (for code that wants a pool);
   * failing to connect to the replica falls back to the primary.
   */
  async connectChosen(): Promise<pg.PoolClient> {
    if (this.choose() === "replica") {
      try {
        const client = await this.replica!.connect();
        this.countServed("replica");
        return client;
      } catch (err) {
        if (!isTransientError(err)) throw err;
        this.markFailed(err);
        if (!this.fallback) throw err;
        this.countFallback("failed");
      }
    } else if (this.replica) {
      this.countFallback(this.state.reason ?? "unreachable");
    }
    const client = await this.primary.connect();
    this.countServed("primary");
    return client;
  }

  /** A pg.Pool whose clients come from connectChosen(): what monitoring, the console and /metrics read through. */
  asPool(): pg.Pool {
    return new RoutingPool(this) as unknown as pg.Pool;
  }

  /** One query through read(). */
  async query<R extends pg.QueryResultRow>(text: string, values?: unknown[]): Promise<{ rows: R[] } & ReadInfo> {
    const { result, node, asOf } = await this.read((client) => client.query<R>(text, values));
    return { rows: result.rows, node, asOf };
  }

  private async onReplica<T>(fn: (client: pg.PoolClient) => Promise<T>): Promise<{ result: T } & ReadInfo> {
    const client = await this.replica!.connect();
    let broken = false;
    try {
      const result = await fn(client);
      const { rows } = await client.query<{ replay_lsn: string | null; replay_at: Date | null; now: Date }>(
        "select pg_last_wal_replay_lsn()::text as replay_lsn, pg_last_xact_replay_timestamp() as replay_at, now()");
      const r = rows[0]!;
      const caughtUp = this.primaryLsn !== null && r.replay_lsn !== null && lsnAtLeast(r.replay_lsn, this.primaryLsn);
      const asOf = caughtUp ? (this.primaryLsnAt ?? r.now) : (r.replay_at ?? r.now);
      return { result, node: "replica", asOf };
    } catch (err) {
      broken = isTransientError(err);
      throw err;
    } finally {
      client.release(broken);
    }
  }
}

/**
 * pg.Pool's interface over a ReadRouter: pool.query() and pool.connect()
 * (promise or callback) take a client of the chosen node, which goes back to
 * its own pool on release. It holds no connection of its own.
 */
class RoutingPool extends pg.Pool {
  constructor(private readonly router: ReadRouter) {
    super({ max: 1 });
  }

  // @ts-expect-error pg.Pool declares connect() with overloads; this serves both forms.
  override connect(callback?: (err: Error | undefined, client?: pg.PoolClient, done?: (release?: unknown) => void) => void) {
    const chosen = this.router.connectChosen();
    if (!callback) return chosen;
    chosen.then((client) => callback(undefined, client, (release?: unknown) => client.release(release as boolean | Error | undefined)), (err) => callback(err));
    return undefined;
  }

  override async end(): Promise<void> {
    // Nothing of its own to close: the primary's and the replica's pools are closed by their owner.
  }
}

/** a >= b for PostgreSQL LSNs written as "X/Y" (hex). */
export function lsnAtLeast(a: string, b: string): boolean {
  const parse = (lsn: string) => {
    const [hi, lo] = lsn.split("/");
    return (BigInt(`0x${hi}`) << 32n) + BigInt(`0x${lo}`);
  };
  return parse(a) >= parse(b);
}

/** Headers that say which node answered a read and as of when. */
export function readInfoHeaders(info: ReadInfo): Record<string, string> {
  return { "X-Keytrack-Read-Node": info.node, "X-Keytrack-Read-As-Of": info.asOf.toISOString() };
}
