// Test helpers for the recording path: a TCP proxy in front of PostgreSQL that
// a test can stop (the database is "down": connections refused), start again
// on the same port, or use to cut live connections; a logger that keeps its
// lines; request rows; backends blocked on a lock.
import { createHash, randomBytes, randomUUID } from "node:crypto";
import net from "node:net";
import pg from "pg";

import { createLogger, type LogLevel, type Logger } from "../../server/log.js";
import type { SpoolOp } from "../../server/recording/spool.js";
import type { RequestRecord } from "../../server/recording/types.js";
import { serverAddressOf, withTcpServer, type ServerAddress } from "../../server/db/urls.js";
import { waitFor } from "./poll.js";

export class PgProxy {
  private server: net.Server | null = null;
  private readonly sockets = new Set<net.Socket>();
  private readonly target: ServerAddress;
  port = 0;

  private constructor(private readonly databaseUrl: string) {
    this.target = serverAddressOf(databaseUrl);
  }

  /** A proxy listening on a free port of 127.0.0.1, forwarding to databaseUrl's server. */
  static async start(databaseUrl: string): Promise<PgProxy> {
    const proxy = new PgProxy(databaseUrl);
    await proxy.up();
    return proxy;
  }

  /** databaseUrl, through the proxy. */
  get url(): string {
    return withTcpServer(this.databaseUrl, "127.0.0.1", this.port);
  }

  /** Listens (again, on the same port once it has one). */
  async up(): Promise<void> {
    if (this.server) return;
    const server = net.createServer((client) => {
      const upstream = net.connect(this.target);
      for (const s of [client, upstream]) {
        this.sockets.add(s);
        s.on("close", () => this.sockets.delete(s));
        s.on("error", () => {
          client.destroy();
          upstream.destroy();
        });
      }
      client.pipe(upstream);
      upstream.pipe(client);
    });
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(this.port, "127.0.0.1", () => {
        server.off("error", reject);
        resolve();
      });
    });
    this.port = (server.address() as net.AddressInfo).port;
    this.server = server;
  }

  /** Drops every live connection (both ends), as a network failure would. */
  cut(): void {
    for (const s of this.sockets) s.destroy();
    this.sockets.clear();
  }

  /** The database is down: live connections dropped, new ones refused. */
  async down(): Promise<void> {
    const server = this.server;
    this.server = null;
    this.cut();
    if (server) await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}

/** The error a write to a full disk fails with. */
export function enospc(op: string): NodeJS.ErrnoException {
  return Object.assign(new Error(`ENOSPC: no space left on device, write (${op}, simulated)`), { code: "ENOSPC", errno: -28, syscall: "write" });
}

/**
 * A simulated full disk for a Spool (its `fault` option, createRecorder's
 * `spoolFault`): while full, the chosen writes fail with ENOSPC. Removing a
 * file needs no space and is never failed.
 */
export class DiskFault {
  private failing = new Set<SpoolOp>();
  /** Writes failed so far, by kind. */
  readonly failures: Record<SpoolOp, number> = { append: 0, offset: 0, rejected: 0 };

  /** The disk is full for these writes (default: every write). */
  fill(ops: SpoolOp[] = ["append", "offset", "rejected"]): void {
    this.failing = new Set(ops);
  }

  free(): void {
    this.failing.clear();
  }

  readonly fault = (op: SpoolOp): Error | null => {
    if (!this.failing.has(op)) return null;
    this.failures[op]++;
    return enospc(op);
  };
}

/** A logger whose lines (JSON) are kept for assertions. */
export function captureLog(level: LogLevel = "debug"): { log: Logger; lines: string[]; entries: () => Array<Record<string, unknown>> } {
  const lines: string[] = [];
  const log = createLogger({ level, json: true, write: (line) => lines.push(line) });
  return { log, lines, entries: () => lines.map((l) => JSON.parse(l) as Record<string, unknown>) };
}

export function apiKeyHash(key: string): Buffer {
  return createHash("sha256").update(key, "utf8").digest();
}

export function makeRow(overrides: Partial<RequestRecord> = {}): RequestRecord {
  return {
    requestId: `req_${randomUUID()}`,
    createdAt: new Date(),
    apiKeyHash: null,
    model: "echo",
    provider: "test",
    inputTokens: 3,
    outputTokens: 5,
    processingTimeMs: 12,
    status: "completed",
    errorMessage: null,
    ...overrides,
  };
}

export function appName(prefix: string): string {
  return `${prefix}_${randomBytes(4).toString("hex")}`;
}

/** pid of the backend of `application` waiting on a lock (its insert is blocked). */
export async function blockedBackend(root: pg.Pool, application: string): Promise<number> {
  return waitFor(`a backend of ${application} waiting on a lock`, async () => {
    const { rows } = await root.query<{ pid: number }>(
      "select pid from pg_stat_activity where application_name = $1 and wait_event_type = 'Lock'",
      [application],
    );
    return rows[0]?.pid;
  });
}

/**
 * Claims a request id in app_private.request_ids in an open transaction: an
 * insert of that request id blocks until release() (rolled back, so the id is
 * free again).
 */
export async function holdRequestId(rootUrl: string, requestId: string): Promise<{ release(): Promise<void> }> {
  const client = new pg.Client({ connectionString: rootUrl });
  client.on("error", () => {});
  await client.connect();
  await client.query("begin");
  await client.query("insert into app_private.request_ids (request_id, created_at) values ($1, now())", [requestId]);
  return {
    async release() {
      await client.query("rollback");
      await client.end();
    },
  };
}
