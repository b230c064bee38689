/**
 * A tiny structured logger: JSON lines in production (for log shippers),
 * readable lines otherwise. One process-wide level, set once from LOG_LEVEL.
 */

export type LogLevel = "debug" | "info" | "warn" | "error";

export const LOG_LEVELS: readonly LogLevel[] = ["debug", "info", "warn", "error"];

const rank: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

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
  /** Where lines go; defaults to stdout (stderr for warn/error in readable mode). */
  write?: (line: string, level: LogLevel) => void;
}

function defaultWrite(json: boolean) {
  return (line: string, level: LogLevel) => {
    if (!json && (level === "warn" || level === "error")) process.stderr.write(line + "\n");
    else process.stdout.write(line + "\n");
  };
}

function errorToFields(value: unknown): unknown {
  if (value instanceof Error) {
    const out: Record<string, unknown> = { message: value.message, name: value.name };
    const code = (value as { code?: unknown }).code;
    if (code !== undefined) out.code = code;
    return out;
  }
  return value;
}

export function createLogger(options: LoggerOptions = {}, base: LogFields = {}): Logger {
  const level = options.level ?? "info";
  const json = options.json ?? false;
  const write = options.write ?? defaultWrite(json);
  const threshold = rank[level];

  const emit = (lvl: LogLevel, msg: string, fields?: LogFields) => {
    if (rank[lvl] < threshold) return;
    const all: LogFields = { ...base, ...fields };
    for (const key of Object.keys(all)) all[key] = errorToFields(all[key]);
    if (json) {
      write(JSON.stringify({ time: new Date().toISOString(), level: lvl, msg, ...all }), lvl);
    } else {
      const extra = Object.entries(all)
        .map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`)
        .join(" ");
      write(`${new Date().toISOString()} ${lvl.toUpperCase().padEnd(5)} ${msg}${extra ? " " + extra : ""}`, lvl);
    }
  };

  return {
    debug: (msg, fields) => emit("debug", msg, fields),
    info: (msg, fields) => emit("info", msg, fields),
    warn: (msg, fields) => emit("warn", msg, fields),
    error: (msg, fields) => emit("error", msg, fields),
    child: (fields) => createLogger(options, { ...base, ...fields }),
  };
}

/** Shows enough of a key to recognise it in logs, never enough to use it. */
export function maskKey(key: string | null | undefined): string {
  if (!key || key.length <= 8) return "****";
  return `${key.slice(0, 4)}...${key.slice(-4)}`;
}
