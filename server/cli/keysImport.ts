// `npm run keys:import -- [--file keys.jsonl | --file keys.csv | -] [--format jsonl|csv] [--batch-size N]`:
// registers keys issued by another system, by their SHA-256 hashes, through
// app_public.import_api_keys() (admin; idempotent), a batch per call, with a
// progress bar and a summary: imported, already present, refused with reasons.
//
// Input: JSON lines ({"key_hash": "<64 hex digits>", "user_email": "..."} or
// "user_id", plus optional "name", "environment", "prefix", "last4",
// "expires_at"), or CSV with a header line naming those columns. From a file,
// or standard input (`-`, or no --file). Keys themselves are never accepted:
// not as an argument, and an entry carrying "key" is refused by the database.
import "../preamble.js";

import { createReadStream } from "node:fs";
import readline from "node:readline";
import type { Readable } from "node:stream";

import pg from "pg";

import { ConfigError, loadConfig } from "../config.js";
import { connectForCli } from "./connect.js";
import { runCli } from "./run.js";
import { ProgressBar } from "./progress.js";

export type KeyImportFormat = "jsonl" | "csv";

export interface KeyImportOptions {
  file: string | null;
  format: KeyImportFormat;
  batchSize: number;
}

const USAGE = "usage: npm run keys:import -- [--file PATH | -] [--format jsonl|csv] [--batch-size N]";

export function parseKeyImportArgs(argv: string[]): KeyImportOptions {
  const options: KeyImportOptions = { file: null, format: "jsonl", batchSize: 1000 };
  let formatGiven = false;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const [name, inline] = arg.includes("=") ? [arg.slice(0, arg.indexOf("=")), arg.slice(arg.indexOf("=") + 1)] : [arg, undefined];
    const value = () => inline ?? argv[++i] ?? "";
    if (arg === "-") options.file = null;
    else if (name === "--file") {
      const f = value();
      options.file = f === "-" ? null : f;
    }
    else if (name === "--format") {
      const f = value();
      if (f !== "jsonl" && f !== "csv") throw new ConfigError(`--format must be jsonl or csv, got "${f}" (${USAGE})`);
      options.format = f;
      formatGiven = true;
    } else if (name === "--batch-size") {
      const v = value();
      if (!/^\d+$/.test(v) || Number(v) < 1 || Number(v) > 10_000) throw new ConfigError(`--batch-size must be an integer 1..10000, got "${v}"`);
      options.batchSize = Number(v);
    } else {
      // Anything else, in particular something that looks like a key, is refused without echoing it.
      throw new ConfigError(`unknown argument #${i + 1} (${USAGE}); keys are never given on the command line: put their hashes in a file`);
    }
  }
  if (!formatGiven && options.file?.toLowerCase().endsWith(".csv")) options.format = "csv";
  return options;
}

/** One CSV line into fields (double quotes, "" inside quotes). */
export function parseCsvLine(line: string): string[] {
  const fields: string[] = [];
  let field = "";
  let quoted = false;
  for (let i = 0; i < line.length; i++) {
    const c = line[i]!;
    if (quoted) {
      if (c === '"' && line[i + 1] === '"') (field += '"'), i++;
      else if (c === '"') quoted = false;
      else field += c;
    } else if (c === '"') quoted = true;
    else if (c === ",") fields.push(field), (field = "");
    else field += c;
  }
  fields.push(field);
  return fields;
}

/** The entries of the input, one object per line (a line that does not parse becomes an entry the database refuses). */
export async function* readEntries(input: Readable, format: KeyImportFormat): AsyncGenerator<{ line: number; entry: unknown }> {
  const lines = readline.createInterface({ input, crlfDelay: Infinity });
  let header: string[] | null = null;
  let n = 0;
  for await (const raw of lines) {
    n++;
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) continue;
    if (format === "jsonl") {
      let entry: unknown;
      try {
        entry = JSON.parse(line);
      } catch {
        entry = `line ${n} is not JSON`;
      }
      yield { line: n, entry };
    } else if (header === null) {
      header = parseCsvLine(line).map((h) => h.trim());
    } else {
      const values = parseCsvLine(line);
      yield { line: n, entry: Object.fromEntries(header.map((h, i) => [h, values[i]?.trim() ?? ""]).filter(([, v]) => v !== "")) };
    }
  }
}

export interface ImportSummary {
  imported: number;
  alreadyPresent: number;
  refused: Array<{ line: number; reason: string }>;
}

interface ResultRow {
  position: number;
  outcome: "imported" | "already_present" | "refused";
  reason: string | null;
}

export async function importKeys(
  pool: Pick<pg.Pool, "query">,
  entries: AsyncIterable<{ line: number; entry: unknown }>,
  options: { batchSize: number; total?: number; out?: NodeJS.WriteStream },
): Promise<ImportSummary> {
  const summary: ImportSummary = { imported: 0, alreadyPresent: 0, refused: [] };
  const bar = options.total !== undefined ? new ProgressBar(options.total, options.out) : null;
  let seen = 0;
  let batch: Array<{ line: number; entry: unknown }> = [];
  const flush = async () => {
    if (batch.length === 0) return;
    const { rows } = await pool.query<ResultRow>("select position, outcome, reason from app_public.import_api_keys($1::jsonb)", [
      JSON.stringify(batch.map((b) => b.entry)),
    ]);
    for (const r of rows) {
      if (r.outcome === "imported") summary.imported++;
      else if (r.outcome === "already_present") summary.alreadyPresent++;
      else summary.refused.push({ line: batch[r.position - 1]!.line, reason: r.reason ?? "refused" });
    }
    seen += batch.length;
    batch = [];
    bar?.update(seen, `imported ${summary.imported}, present ${summary.alreadyPresent}, refused ${summary.refused.length}`);
  };
  for await (const item of entries) {
    batch.push(item);
    if (batch.length >= options.batchSize) await flush();
  }
  await flush();
  bar?.done();
  return summary;
}

async function countEntries(file: string, format: KeyImportFormat): Promise<number> {
  let n = 0;
  for await (const _ of readEntries(createReadStream(file), format)) n++;
  return n;
}

async function main(): Promise<number> {
  const options = parseKeyImportArgs(process.argv.slice(2));
  const config = loadConfig();
  const db = await connectForCli(config, (m) => process.stderr.write(`${m}\n`));
  const pool = new pg.Pool({ connectionString: db.config.db.databaseUrl, max: 1 });
  try {
    const source = options.file ?? "standard input";
    const total = options.file ? await countEntries(options.file, options.format) : undefined;
    process.stderr.write(`importing keys (${options.format}) from ${source}${total !== undefined ? `: ${total} entries` : ""}\n`);
    const input = options.file ? createReadStream(options.file) : process.stdin;
    const summary = await importKeys(pool, readEntries(input, options.format), { batchSize: options.batchSize, total });
    for (const r of summary.refused.slice(0, 50)) console.log(`refused (line ${r.line}): ${r.reason}`);
    if (summary.refused.length > 50) console.log(`... and ${summary.refused.length - 50} more refused`);
    console.log(`keys:import: ${summary.imported} imported, ${summary.alreadyPresent} already present, ${summary.refused.length} refused`);
    return summary.refused.length > 0 ? 3 : 0;
  } finally {
    await pool.end();
    await db.close();
  }
}

runCli("keys:import", import.meta.url, main);
