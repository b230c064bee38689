// `npm run backfill [-- --batch-size N]`: fills api_key_id of historical rows
// (app_private.run_attribution_backfill_batch), batch by batch, each its own
// short transaction, with a progress bar and a final summary. Resumes the run
// that is still running, if any (after an interruption); Ctrl-C stops after the
// current batch. Safe while traffic flows and while the service's worker runs
// the same backfill (batches take turns on the run's row).
import "../preamble.js";
import pg from "pg";
import { ConfigError, loadConfig } from "../config.js";
import { connectForCli } from "./connect.js";
import { runCli } from "./run.js";
import { ProgressBar } from "./progress.js";

interface Run {
  id: string;
  status: string;
  batch_size: number;
  upto: Date;
  cursor_created_at: Date | null;
  cursor_id: string | null;
  examined: string;
  filled: string;
  ambiguous: string;
  no_key: string;
  anonymized: string;
  batches: number;
}

function parseArgs(argv: string[], fallback: number): { batchSize: number } {
  let batchSize = fallback;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const value = arg.startsWith("--batch-size=") ? arg.slice(13) : arg === "--batch-size" ? argv[++i] : undefined;
    if (value === undefined) throw new ConfigError(`unknown argument "${arg}" (usage: npm run backfill -- [--batch-size N])`);
    if (!/^\d+$/.test(value) || Number(value) < 1 || Number(value) > 100_000) {
      throw new ConfigError(`--batch-size must be an integer 1..100000, got "${value}"`);
    }
    batchSize = Number(value);
  }
  return { batchSize };
}

export async function runBackfill(
  pool: pg.Pool,
  batchSize: number,
  shouldStop: () => boolean,
  out: NodeJS.WriteStream = process.stderr,
): Promise<Run> {
  let { rows: [run] } = await pool.query<Run>("select * from app_public.start_attribution_backfill($1)", [batchSize]);
  const { rows: [{ remaining }] } = await pool.query<{ remaining: string }>(
    `select count(*) as remaining from app_public.chat_completion_requests
      where api_key_id is null and created_at < $1
        and (created_at, id) > (coalesce($2::timestamptz, '-infinity'), coalesce($3::bigint, -1))`,
    [run!.upto, run!.cursor_created_at, run!.cursor_id],
  );
  const already = Number(run!.examined);
  const bar = new ProgressBar(already + Number(remaining), out);
  out.write(`attribution backfill #${run!.id}: ${already > 0 ? `resuming after ${already} rows, ` : ""}${remaining} rows to examine, batches of ${run!.batch_size}\n`);
  while (run!.status === "running" && !shouldStop()) {
    ({ rows: [run] } = await pool.query<Run>("select * from app_private.run_attribution_backfill_batch($1)", [run!.id]));
    bar.update(Number(run!.examined), `filled ${run!.filled}, ambiguous ${run!.ambiguous}`);
  }
  bar.done();
  return run!;
}

async function main(): Promise<number> {
  const config = loadConfig();
  const { batchSize } = parseArgs(process.argv.slice(2), config.backfillBatchSize);
  const db = await connectForCli(config, (m) => process.stderr.write(`${m}\n`));
  const pool = new pg.Pool({ connectionString: db.config.db.databaseUrl, max: 1 });
  let stop = false;
  process.on("SIGINT", () => {
    if (stop) process.exit(130);
    stop = true;
    process.stderr.write("\nstopping after this batch (Ctrl-C again to quit now); `npm run backfill` resumes\n");
  });
  try {
    const run = await runBackfill(pool, batchSize, () => stop);
    console.log(
      `attribution backfill #${run.id} ${run.status}: ${run.examined} rows examined, ${run.filled} filled, ` +
        `${run.ambiguous} ambiguous (left NULL), ${run.no_key} without a key alive (left NULL), ${run.anonymized} flagged anonymous, ${run.batches} batches`,
    );
    return run.status === "finished" ? 0 : 3;
  } finally {
    await pool.end();
    await db.close();
  }
}

runCli("backfill", import.meta.url, main);
