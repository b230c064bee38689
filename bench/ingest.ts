// (a) SQL ingestion: rows presenting a key hash inserted into
// app_public.chat_completion_requests with everything the ledger does at insert
// (its user triggers: request id guard, key lookup, attribution, rollup marks),
// against the same rows into the same table with its user triggers disabled
// (ALTER TABLE ... DISABLE TRIGGER USER: indexes and foreign keys stay; the
// plain rows carry no api_key_id/user_id). Two shapes, both with `clients`
// concurrent connections and a durable commit per statement:
//   single: one row per INSERT (target >= 0.90x plain);
//   batch:  100 rows per INSERT ... SELECT (target >= 0.95x plain);
//   set:    the same 100-row batches through app_private.record_requests()
//           (set-based: what the service's recorder sends), against the same
//           plain INSERT ... SELECT baseline (target >= 0.95x plain).
// Two key mixes (bench/generate.ts): A, one busy customer's 100 keys; B, 1,000
// users with a key each; both 90% known keys, 5% unknown hashes, 5% no key.
// Rounds alternate plain and attributed; the best round of each side counts
// (the machine is shared: the best is the least disturbed).
import pg from "pg";

import { createKeys, mix } from "./generate.js";
import { row, say, type Benchmark, type ResultRow } from "./lib.js";

const COLUMNS = "request_id, api_key_hash, model, provider, input_tokens, output_tokens, processing_time_ms, status";

export const ingest: Benchmark = async (ctx) => {
  const { clients, seconds, rounds, batch } = { clients: ctx.opts["ingest-clients"]!, seconds: ctx.opts["ingest-seconds"]!, rounds: ctx.opts["ingest-rounds"]!, batch: ctx.opts["ingest-batch"]! };
  const db = await ctx.dbs.create("ingest");
  const pool = new pg.Pool({ connectionString: db.rootUrl, max: clients + 1 });
  const rows: ResultRow[] = [];
  const details: Record<string, unknown> = { clients, secondsPerRound: seconds, rounds, batch };
  try {
    const mixes = {
      "A (1 customer, 100 keys)": mix(await createKeys(pool, 1, 100, "busy")),
      "B (1,000 users, 1 key each)": mix(await createKeys(pool, 1000, 1, "many")),
    };
    let seq = 0;
    // One round: `clients` connections insert for `seconds`; rows/s.
    const runRound = async (shape: "single" | "batch" | "set", slots: Array<Buffer | null>): Promise<number> => {
      let done = 0;
      const deadline = performance.now() + seconds * 1000;
      const started = performance.now();
      await Promise.all(Array.from({ length: clients }, async () => {
        const client = await pool.connect();
        try {
          while (performance.now() < deadline) {
            if (shape === "single") {
              const n = seq++;
              await client.query(`insert into app_public.chat_completion_requests (${COLUMNS}) values ($1, $2, 'gpt-4o', 'openai', 10, 20, 100, 'completed')`, [`s${n}`, slots[n % 1000]]);
              done++;
            } else if (shape === "set") {
              const base = seq;
              seq += batch;
              // The arrays made in SQL, as the plain side's rows are: only the recording differs.
              await client.query(
                `select count(*) from app_private.record_requests(
                   (select array_agg('b' || ($1::bigint + i) order by i) from generate_series(0, $3::int - 1) i),
                   array_fill(now(), array[$3::int]),
                   (select array_agg(($2::bytea[])[1 + (($1::bigint + i) % 1000)] order by i) from generate_series(0, $3::int - 1) i),
                   array_fill(null::uuid, array[$3::int]), array_fill(null::uuid, array[$3::int]),
                   array_fill('gpt-4o'::text, array[$3::int]), array_fill('openai'::text, array[$3::int]),
                   array_fill(10, array[$3::int]), array_fill(20, array[$3::int]), array_fill(100, array[$3::int]),
                   array_fill('completed'::text, array[$3::int]), array_fill(null::text, array[$3::int]), array_fill(null::text, array[$3::int]),
                   array_fill(null::timestamptz, array[$3::int]), array_fill(null::uuid, array[$3::int]), array_fill(null::int8, array[$3::int]))`,
                [base, slots, batch],
              );
              done += batch;
            } else {
              const base = seq;
              seq += batch;
              await client.query(
                `insert into app_public.chat_completion_requests (${COLUMNS})
                 select 'b' || ($1::bigint + i), ($2::bytea[])[1 + (($1::bigint + i) % 1000)], 'gpt-4o', 'openai', 10, 20, 100, 'completed'
                   from generate_series(0, $3::int - 1) i`,
                [base, slots, batch],
              );
              done += batch;
            }
          }
        } finally {
          client.release();
        }
      }));
      return done / ((performance.now() - started) / 1000);
    };
    const setPlain = (plain: boolean) => pool.query(`alter table app_public.chat_completion_requests ${plain ? "disable" : "enable"} trigger user`);
    const measured: Record<string, unknown> = {};
    for (const shape of ["single", "batch", "set"] as const) {
      for (const [mixName, slots] of Object.entries(mixes)) {
        const plainRounds: number[] = [], attributedRounds: number[] = [];
        for (let r = 0; r < rounds; r++) {
          // Alternate which side goes first, to spread checkpoints and warm-up over both.
          for (const plain of r % 2 === 0 ? [true, false] : [false, true]) {
            await setPlain(plain);
            try {
              (plain ? plainRounds : attributedRounds).push(await runRound(plain && shape === "set" ? "batch" : shape, slots));
            } finally {
              await setPlain(false);
            }
          }
        }
        const plainBest = Math.max(...plainRounds), attributedBest = Math.max(...attributedRounds);
        const target = shape === "single"
          ? { on: "ratio" as const, op: ">=" as const, limit: 0.9, text: ">= 0.90x" }
          : { on: "ratio" as const, op: ">=" as const, limit: 0.95, text: ">= 0.95x" };
        const what = shape === "single" ? "single-row" : shape === "batch" ? `${batch}-row batches` : `${batch}-row batches via record_requests()`;
        const measure = `${what}, ${clients} clients, mix ${mixName}`;
        rows.push(row("a. SQL ingestion", measure, attributedBest, "rows/s", { value: plainBest, label: "plain, triggers off" }, target));
        measured[`${shape} ${mixName}`] = { plainRounds, attributedRounds };
        say(`ingest ${measure}: attributed ${attributedBest.toFixed(0)} rows/s, plain ${plainBest.toFixed(0)} rows/s`);
      }
    }
    // The attributed rows really were attributed (the plain ones have no status set by a trigger).
    const { rows: [check] } = await pool.query<{ resolved: number; pending: number; anonymous: number }>(
      `select count(*) filter (where attribution_status = 'resolved')::int as resolved,
              count(*) filter (where attribution_status = 'pending' and api_key_hash is not null and initial_attribution is not null)::int as pending,
              count(*) filter (where attribution_status = 'anonymous')::int as anonymous
         from app_public.chat_completion_requests where initial_attribution is not null`,
    );
    details.rounds = measured;
    details.attributedRowsCheck = check;
    return { rows, details };
  } finally {
    await pool.end();
    await ctx.dbs.drop(db.name);
  }
};
