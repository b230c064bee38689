/**
 * The process logger: pino underneath, behind the project's small `Logger`
 * interface (`log.info(msg, fields)`, `log.child(fields)`).
 *
 * - json: true (production): one JSON object a line on stdout, keys in the
 *   order `level` (the label: "info", never pino's number), `time` (ISO),
 *   `msg`, then the fields.
 * - json: false: readable lines from pino-pretty, used as an in-process
 *   synchronous stream (no worker thread), so nothing is lost at
 *   process.exit; warn and error go to stderr.
 * - `write`: every line (JSON or readable) goes to write(line, level) instead.
 *
 * Any field holding an Error keeps its name, message, code (and pg's detail,
 * hint, constraint), stack and cause chain. Fields that may carry secrets are
 * censored (REDACT_PATHS).
 */
import { Writable } from "node:stream";
import { types } from "node:util";
import pino from "pino";
import pretty from "pino-pretty";

export type LogLevel = "debug" | "info" | "warn" | "error";

export const LOG_LEVELS: readonly LogLevel[] = ["debug", "info", "warn", "error"];

export type LogFields = Record<string, unknown>;

export interface Logger {
  debug(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
  /** A logger that adds `fields` to every line (e.g. `{ component: "pg" }`). */
  child(fields: LogFields): Logger;
}

export interface LoggerOptions {
  level?: LogLevel;
  /** JSON lines (production) or human-readable lines. */
  json?: boolean;
  /** Where lines go (without their newline); defaults to stdout (stderr for warn/error in readable mode). */
  write?: (line: string, level: LogLevel) => void;
}

/** What a censored value is replaced with. */
export const REDACTED = "[redacted]";

/**
 * Fields censored wherever they are logged, at the top level or one object
 * down (e.g. `headers.authorization`). `key` is among them: a field named
 * `key` is censored even when it holds a masked key (maskKey); log masked
 * keys under another name. URLs are not censored here: log them through
 * redactUrl (server/config.ts), which keeps all but the password.
 */
export const REDACT_PATHS: readonly string[] = [
  "authorization", "*.authorization",
  "cookie", "*.cookie", '["set-cookie"]', '*["set-cookie"]',
  "token", "*.token", "accessToken", "*.accessToken", "refreshToken", "*.refreshToken",
  "apiKey", "*.apiKey", "api_key", "*.api_key", "key", "*.key",
  "secret", "*.secret", "password", "*.password",
  "adminApiKey", "*.adminApiKey", "upstreamApiKey", "*.upstreamApiKey", "metricsToken", "*.metricsToken",
];

/** How many causes (and nested AggregateError members) deep an error is serialised. */
const MAX_ERROR_DEPTH = 5;
/** Members of an AggregateError kept. */
const MAX_AGGREGATE_ERRORS = 10;
/** Extra properties kept when an error has them (node's system errors, pg's DatabaseError). */
const ERROR_PROPS = ["code", "detail", "hint", "constraint"] as const;

function isError(value: unknown): value is Error {
  return value instanceof Error || types.isNativeError(value);
}

/** An Error as a plain object: name, message, code/detail/hint/constraint, stack, cause (bounded depth). */
export function serializeError(err: Error, depth = 0): Record<string, unknown> {
  const out: Record<string, unknown> = { name: err.name, message: err.message };
  const extra = err as unknown as Record<string, unknown>;
  for (const prop of ERROR_PROPS) {
    if (extra[prop] !== undefined && extra[prop] !== null) out[prop] = extra[prop];
  }
  if (err.stack) out.stack = err.stack;
  if (err instanceof AggregateError && Array.isArray(err.errors)) {
    out.errors = depth + 1 < MAX_ERROR_DEPTH
      ? err.errors.slice(0, MAX_AGGREGATE_ERRORS).map((e: unknown) => serializeNested(e, depth + 1))
      : `[${err.errors.length} errors not shown]`;
  }
  if (err.cause !== undefined) {
    out.cause = depth + 1 < MAX_ERROR_DEPTH ? serializeNested(err.cause, depth + 1) : "[cause not shown: too deep]";
  }
  return out;
}

function serializeNested(value: unknown, depth: number): unknown {
  return isError(value) ? serializeError(value, depth) : value;
}

function prettyOptions(destination: number | Writable, colorize?: boolean): pretty.PrettyOptions {
  return {
    sync: true,
    destination,
    singleLine: true,
    translateTime: "SYS:standard",
    ignore: "pid,hostname",
    ...(colorize === undefined ? {} : { colorize }),
  };
}

/** A stream handing each formatted line (newline removed) to write(line, level). */
function lineSink(write: (line: string, level: LogLevel) => void, level: LogLevel): Writable {
  return new Writable({
    decodeStrings: false,
    write(chunk: string | Buffer, _encoding, callback) {
      const text = String(chunk);
      write(text.endsWith("\n") ? text.slice(0, -1) : text, level);
      callback();
    },
  });
}

/** One stream per level (dedupe: each line reaches exactly one). */
function perLevel(make: (level: LogLevel) => pino.DestinationStream): pino.DestinationStream {
  return pino.multistream(LOG_LEVELS.map((level) => ({ level, stream: make(level) })), { dedupe: true });
}

function destinationFor(json: boolean, write: LoggerOptions["write"]): pino.DestinationStream {
  if (json) {
    if (!write) return pino.destination({ dest: 1, sync: true });
    // pino hands a destination one complete line per write().
    return perLevel((level) => ({
      write(line: string) {
        write(line.endsWith("\n") ? line.slice(0, -1) : line, level);
      },
    }));
  }
  if (write) return perLevel((level) => pretty(prettyOptions(lineSink(write, level), false)));
  return pino.multistream(
    [
      { level: "debug", stream: pretty(prettyOptions(1)) },
      { level: "warn", stream: pretty(prettyOptions(2)) },
    ],
    { dedupe: true },
  );
}

export function createLogger(options: LoggerOptions = {}, base: LogFields = {}): Logger {
  const json = options.json ?? false;
  const root = pino(
    {
      level: options.level ?? "info",
      base: null, // no pid/hostname
      timestamp: pino.stdTimeFunctions.isoTime,
      // The label in JSON lines; pino-pretty reads pino's numbers.
      formatters: json ? { level: (label) => ({ level: label }) } : {},
      // Errors are serialised (any field name) before pino sees them; pino's
      // own `err` serializer (merged in unless replaced) would redo it badly.
      serializers: { err: (value: unknown) => value },
      redact: { paths: [...REDACT_PATHS], censor: REDACTED },
    },
    destinationFor(json, options.write),
  );
  return wrap(root, base);
}

function wrap(root: pino.Logger, base: LogFields): Logger {
  const emit = (level: LogLevel, msg: string, fields?: LogFields) => {
    if (!root.isLevelEnabled(level)) return;
    // msg first, then the fields (call fields override child fields); msg is
    // passed inside the object so it precedes the fields in JSON lines.
    const entry: LogFields = { msg, ...base, ...fields };
    for (const key of Object.keys(entry)) {
      const value = entry[key];
      if (isError(value)) entry[key] = serializeError(value);
    }
    root[level](entry);
  };
  return {
    debug: (msg, fields) => emit("debug", msg, fields),
    info: (msg, fields) => emit("info", msg, fields),
    warn: (msg, fields) => emit("warn", msg, fields),
    error: (msg, fields) => emit("error", msg, fields),
    child: (fields) => wrap(root, { ...base, ...fields }),
  };
}

/** Shows enough of a key to recognise it in logs, never enough to use it. */
export function maskKey(key: string | null | undefined): string {
  if (!key || key.length <= 8) return "****";
  return `${key.slice(0, 4)}...${key.slice(-4)}`;
}
