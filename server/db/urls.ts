/**
 * PostgreSQL connection strings: the one module that reads and rewrites them
 * (settings, database preparation, the embedded cluster, scripts and tests).
 *
 * libpq and pg accept `postgres://user@/db?host=/socket/dir` (an empty host: a
 * Unix socket folder given as a parameter), which is not a valid WHATWG URL, so
 * `new URL()` alone refuses it. A placeholder host is swapped in while parsing
 * and taken out again when formatting, so every helper here handles socket URLs
 * exactly as it handles TCP ones.
 */

const PLACEHOLDER_HOST = "keytrack-empty-host.invalid";
const SCHEME = /^postgres(ql)?:\/\//i;

export function isPgUrl(raw: string): boolean {
  return SCHEME.test(raw);
}

/** Parses a postgres:// or postgresql:// URL, with or without a host. Throws a TypeError otherwise. */
export function parsePgUrl(raw: string): URL {
  if (!isPgUrl(raw)) throw new TypeError("not a postgres:// or postgresql:// URL");
  try {
    return new URL(raw);
  } catch {
    try {
      return new URL(raw.replace(/^(postgres(?:ql)?:\/\/(?:[^@/]*@)?)(?=[/?]|$)/i, `$1${PLACEHOLDER_HOST}`));
    } catch {
      throw new TypeError("the connection string does not parse");
    }
  }
}

function formatPgUrl(url: URL): string {
  return url.toString().replace(`@${PLACEHOLDER_HOST}`, "@").replace(`//${PLACEHOLDER_HOST}`, "//");
}

/** The database a connection string names ("" when it names none). */
export function databaseNameOf(raw: string): string {
  const url = parsePgUrl(raw);
  return decodeURIComponent(url.pathname.replace(/^\//, "")) || url.searchParams.get("dbname") || "";
}

/** The user a connection string logs in as (libpq's default: PGUSER, else the OS user's name; we assume postgres). */
export function userNameOf(raw: string): string {
  const url = parsePgUrl(raw);
  return decodeURIComponent(url.username) || url.searchParams.get("user") || process.env.PGUSER || "postgres";
}

/** The same connection string, naming another database. */
export function withDatabaseName(raw: string, name: string): string {
  const url = parsePgUrl(raw);
  url.pathname = "/" + encodeURIComponent(name);
  url.searchParams.delete("dbname");
  return formatPgUrl(url);
}

/** The same connection string, logging in as another user (with no password unless one is given). */
export function withUser(raw: string, user: string, password: string | null = null): string {
  const url = parsePgUrl(raw);
  url.username = encodeURIComponent(user);
  url.password = password === null ? "" : encodeURIComponent(password);
  if (url.searchParams.has("user")) url.searchParams.set("user", user);
  url.searchParams.delete("password");
  return formatPgUrl(url);
}

/** For logs and messages: the connection string with its password replaced. */
export function redactUrl(raw: string): string {
  try {
    const url = parsePgUrl(raw);
    if (url.password) url.password = "***";
    if (url.searchParams.has("password")) url.searchParams.set("password", "***");
    return formatPgUrl(url);
  } catch {
    return "<unparseable connection string>";
  }
}

/** Where the server listens: a TCP host and port, or a Unix socket file. */
export type ServerAddress = { host: string; port: number } | { path: string };

/** The server a connection string reaches (host or `?host=` socket folder, port or `?port=`). */
export function serverAddressOf(raw: string): ServerAddress {
  const url = parsePgUrl(raw);
  const port = Number(url.searchParams.get("port") ?? (url.port || 5432));
  const hostParam = url.searchParams.get("host");
  const host = hostParam ?? (url.hostname === PLACEHOLDER_HOST ? "/var/run/postgresql" : url.hostname);
  return host.startsWith("/") ? { path: `${host}/.s.PGSQL.${port}` } : { host, port };
}

/** The same connection string, reaching the server at a TCP host and port (socket parameters dropped). */
export function withTcpServer(raw: string, host: string, port: number): string {
  const url = parsePgUrl(raw);
  url.searchParams.delete("host");
  url.searchParams.delete("port");
  url.hostname = host;
  url.port = String(port);
  return url.toString();
}
