// Which database errors are worth retrying, and how long to wait between tries.
// Transient: the database (or the way to it) failed, the row is fine; the same
// insert can succeed a moment later. Everything else (a constraint violation,
// a bad value, a missing column or privilege) is permanent: retrying cannot help.

/** SQLSTATE classes whose every code is transient. */
const TRANSIENT_CLASSES = [
  "08", // connection exception (server gone, cannot connect, protocol lost)
  "53", // insufficient resources: too many connections (53300), disk full, out of memory
];

/** Single SQLSTATE codes that are transient. */
const TRANSIENT_CODES = new Set([
  "40001", // serialization_failure
  "40P01", // deadlock_detected
  "40003", // statement_completion_unknown
  "57014", // query_canceled (statement_timeout)
  "55P03", // lock_not_available (lock_timeout)
  "57P01", // admin_shutdown (pg_terminate_backend, fast shutdown)
  "57P02", // crash_shutdown
  "57P03", // cannot_connect_now (starting up, recovering)
  "57P05", // idle_session_timeout
  "25006", // read_only_sql_transaction (a primary just demoted during a failover)
]);

/** Node socket errors: the database is unreachable (for now). */
const TRANSIENT_NODE_CODES = new Set([
  "ECONNREFUSED", // nothing listens on the port (server down, restarting)
  "ECONNRESET",
  "ECONNABORTED",
  "EPIPE",
  "ETIMEDOUT",
  "EHOSTUNREACH",
  "EHOSTDOWN",
  "ENETUNREACH",
  "ENETDOWN",
  "EAI_AGAIN", // DNS temporarily unavailable
  "ENOENT", // the Unix socket file is not there (server down)
  "KT_ATTEMPT_TIMEOUT", // ours: an attempt took longer than attemptTimeoutMs
]);

/** Node errors raised before anything was sent: the statement certainly did not run. */
const NOT_SENT_NODE_CODES = new Set(["ECONNREFUSED", "EHOSTUNREACH", "EHOSTDOWN", "ENETUNREACH", "ENETDOWN", "EAI_AGAIN", "ENOENT"]);

/** node-postgres errors that carry no code: the connection broke or never came up. */
const TRANSIENT_MESSAGES = [
  /^Connection terminated/, // "Connection terminated", "... unexpectedly", "... due to connection timeout"
  /^timeout exceeded when trying to connect$/, // pg-pool connectionTimeoutMillis
  /^Client has encountered a connection error and is not queryable$/,
  /^Client was closed and is not queryable$/,
  /^Query read timeout$/, // query_timeout
  /^Cannot use a pool after calling end on the pool$/, // shutting down: spool rather than lose the row
];

function codeOf(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === "string" ? code : undefined;
}

/**
 * A five-character SQLSTATE (the server's verdict), as opposed to a Node error
 * code. No SQLSTATE class starts with E, and five-letter Node codes do (EPIPE).
 */
export function sqlStateOf(err: unknown): string | undefined {
  const code = codeOf(err);
  return code && /^[0-9A-DF-Z][0-9A-Z]{4}$/.test(code) ? code : undefined;
}

export function isTransientError(err: unknown): boolean {
  if (err instanceof AggregateError && err.errors.length > 0) {
    // Node's happy-eyeballs connect reports one error per address tried.
    return err.errors.some(isTransientError);
  }
  const state = sqlStateOf(err);
  if (state) return TRANSIENT_CODES.has(state) || TRANSIENT_CLASSES.includes(state.slice(0, 2));
  const code = codeOf(err);
  if (code && TRANSIENT_NODE_CODES.has(code)) return true;
  const message = err instanceof Error ? err.message : "";
  return TRANSIENT_MESSAGES.some((re) => re.test(message));
}

/**
 * True when a failed attempt may nevertheless have committed: the connection
 * broke (or we stopped waiting) after the statement was sent. A server error
 * (any SQLSTATE) means the statement was rolled back; a refused connection
 * means it was never sent.
 */
export function mayHaveCommitted(err: unknown): boolean {
  if (err instanceof AggregateError && err.errors.length > 0) return err.errors.some(mayHaveCommitted);
  if (sqlStateOf(err)) return false;
  const code = codeOf(err);
  if (code && NOT_SENT_NODE_CODES.has(code)) return false;
  const message = err instanceof Error ? err.message : "";
  return !/^timeout exceeded when trying to connect$|^Cannot use a pool after calling end/.test(message);
}

export interface RetryPolicy {
  /** Tries in all (1 = no retry). */
  attempts: number;
  /** Wait after the first failed try; doubles after each further one. */
  baseDelayMs: number;
}

/**
 * The wait after failed attempt `attempt` (1-based): base, 2*base, 4*base...
 * No jitter, so tests and the documented budget are exact.
 */
export function backoffDelay(policy: RetryPolicy, attempt: number): number {
  return policy.baseDelayMs * 2 ** (attempt - 1);
}

/** Every wait a record() goes through before it spools: [100, 200] with the defaults. */
export function backoffSchedule(policy: RetryPolicy): number[] {
  return Array.from({ length: Math.max(0, policy.attempts - 1) }, (_, i) => backoffDelay(policy, i + 1));
}

/** A short description of an error for logs and outcomes: code and message. */
export function describeError(err: unknown): string {
  if (err instanceof AggregateError && err.errors.length > 0) return describeError(err.errors[0]);
  const code = codeOf(err);
  const message = err instanceof Error ? err.message : String(err);
  return code ? `${code}: ${message}` : message;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
