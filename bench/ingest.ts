// `npm run bench`: SQL ingestion with full attribution (the BEFORE INSERT
// trigger: request id guard + key lookup, and whatever else the ledger's
// triggers do) against a plain insert of the same rows into the same table with
// its triggers off (ALTER TABLE ... DISABLE TRIGGER USER: indexes and foreign
// keys stay), in two shapes:
//   batch:  INSERT ... SELECT of BENCH_BATCH rows per statement, one client;
//   single: one row per statement and per durable commit, BENCH_CLIENTS clients.
// Prints rows/s and the ratio attributed/plain. Uses BENCH_DATABASE_URL (a
// superuser connection; default: the embedded PostgreSQL in a temporary folder)
// and a scratch database it drops afterwards.
import { chmod, mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import pg from "pg";
import { startEmbeddedPostgres } from "../server/db/embedded.js";
import { prepareDatabase } from "../server/db/prepare.js";
import { withDatabaseName, withUser } from "../server/db/urls.js";

const BATCH = Number(process.env.BENCH_BATCH ?? 1000);
const BATCHES = Number(process.env.BENCH_BATCHES ?? 100);
const CLIENTS = Number(process.env.BENCH_CLIENTS ?? 4);
const SINGLE_SECONDS = Number(process.env.BENCH_SECONDS ?? 10);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const KEYS = 100;

async function main() {
  let root = process.env.BENCH_DATABASE_URL;
  let cleanup = async () => {};
  if (!root) {
    const dir = await mkdtemp(path.join(os.tmpdir(), "keytrack-bench-"));
    await chmod(dir, 0o755);
    const pgEmbedded = await startEmbeddedPostgres({ dataDir: dir, port: 30000 + Math.floor(Math.random() * 10000) });
    root = pgEmbedded.rootUrl;
    cleanup = async () => {
      await pgEmbedded.stop();
      await rm(dir, { recursive: true, force: true });
    };
  }
  const dbName = `kt_bench_${process.pid}`;
  const rootDb = withDatabaseName(root, dbName);
  const owner = withUser(rootDb, "keytrack_owner");
  try {
    await prepareDatabase({ rootUrl: root, databaseUrl: owner });
    const pool = new pg.Pool({ connectionString: rootDb, max: CLIENTS + 1 });
    const { rows: [version] } = await pool.query("select current_setting('server_version') as v");
    await pool.query(`insert into app_public.users (email) select 'bench' || i || '@example.com' from generate_series(1, 10) i`);
    await pool.query(`select app_public.create_api_key((select id from app_public.users order by email limit 1 offset (i % 10)), 'k' || i)
                        from generate_series(1, ${KEYS}) i`);
    // Secrets are shown once: re-derive presented hashes from stored ones.
    const { rows: hashRows } = await pool.query("select key_hash from app_private.api_key_secrets");
    const hashes = hashRows.map((r) => r.key_hash as Buffer);
    console.log(`# keytrack ingestion bench: PostgreSQL ${version.v}, ${os.cpus().length} cores, batch ${BATCH} x ${BATCHES}, single-row ${CLIENTS} clients x ${SINGLE_SECONDS}s, best of ${ROUNDS}`);

    let seq = 0;
    const batchRun = async (plain: boolean): Promise<number> => {
      const client = await pool.connect();
      try {
        const start = performance.now();
        for (let b = 0; b < BATCHES; b++) {
          const base = seq;
          seq += BATCH;
          await client.query(
            `insert into app_public.chat_completion_requests
               (request_id, api_key_hash, model, provider, input_tokens, output_tokens, processing_time_ms, status)
             select 'b' || ($1::bigint + i), ($2::bytea[])[1 + (i % ${KEYS})], 'gpt-4o', 'openai', 10, 20, 100, 'completed'
               from generate_series(0, $3 - 1) i`,
            [base, hashes, BATCH],
          );
        }
        return (BATCH * BATCHES) / ((performance.now() - start) / 1000);
      } finally {
        client.release();
      }
    };
    const singleRun = async (plain: boolean): Promise<number> => {
      let done = 0;
      const deadline = performance.now() + SINGLE_SECONDS * 1000;
      await Promise.all(Array.from({ length: CLIENTS }, async () => {
        const client = await pool.connect();
        try {
          while (performance.now() < deadline) {
            const n = seq++;
            await client.query(
              `insert into app_public.chat_completion_requests
                 (request_id, api_key_hash, model, provider, input_tokens, output_tokens, processing_time_ms, status)
               values ($1, $2, 'gpt-4o', 'openai', 10, 20, 100, 'completed')`,
              [`s${n}`, hashes[n % KEYS]],
            );
            done++;
          }
        } finally {
          client.release();
        }
      }));
      return done / SINGLE_SECONDS;
    };
    const best = async (fn: (plain: boolean) => Promise<number>, plain: boolean) => {
      if (plain) await pool.query("alter table app_public.chat_completion_requests disable trigger user");
      try {
        let top = 0;
        for (let r = 0; r < ROUNDS; r++) top = Math.max(top, await fn(plain));
        return top;
      } finally {
        if (plain) await pool.query("alter table app_public.chat_completion_requests enable trigger user");
      }
    };
    for (const [name, fn] of [["batch", batchRun], ["single", singleRun]] as const) {
      // Alternate to spread warm-up and checkpoints over both sides.
      const plain = await best(fn, true);
      const attributed = await best(fn, false);
      console.log(`${name.padEnd(6)} plain ${plain.toFixed(0).padStart(7)} rows/s   attributed ${attributed.toFixed(0).padStart(7)} rows/s   ratio ${(attributed / plain).toFixed(2)}`);
    }
    const { rows: [check] } = await pool.query(
      `select count(*) filter (where attribution_status = 'resolved')::int as resolved, count(*)::int as total
         from app_public.chat_completion_requests where api_key_hash is not null and tableoid is not null`);
    console.log(`# attributed rows resolved: ${check.resolved} (of ${check.total}, plain rows included unresolved)`);
    await pool.end();
  } finally {
    const c = new pg.Client({ connectionString: root });
    await c.connect();
    await c.query(`drop database if exists ${pg.escapeIdentifier(dbName)} with (force)`).catch(() => {});
    await c.end();
    await cleanup();
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
