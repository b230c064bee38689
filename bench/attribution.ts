// (e) Attribution after the fact.
// 1. Late keys: --pending-rows rows inserted through the ledger's trigger with
//    the hashes of --pending-keys keys nobody registered yet (all pending);
//    the retry worker runs as in production (`npm run worker`, the compiled
//    worker process); the keys are then imported in one call
//    (app_public.import_api_keys). Figure: seconds from the import's start to
//    the last row resolved (target <= 10 s). Baseline: the same rows resolved
//    by one direct SQL statement after the same import (the floor, with
//    no worker): one UPDATE joining the keys, timed on a second copy of the data.
// 2. Backfill: --backfill-rows legacy rows (no api_key_id; a known key's hash,
//    or a user with one key, or nothing) loaded with triggers off, then
//    `npm run backfill` (the compiled CLI, default batch size) run to the end
//    while --backfill-clients clients insert single rows (durable, attributed):
//    backfill rows/s (target >= 50,000), and the inserts' p99 beside the
//    backfill against their p99 just before it (target within 2x).
import { randomBytes } from "node:crypto";

import pg from "pg";

import { createKeys, settleRollups, sha256 } from "./generate.js";
import { cleanEnv, ensureBuilt, percentile, Proc, row, say, sleep, startCommand, type BenchContext, type Benchmark, type ResultRow } from "./lib.js";

export const attribution: Benchmark = async (ctx) => {
  const rows: ResultRow[] = [];
  const details: Record<string, unknown> = {};
  const late = await lateKeys(ctx);
  rows.push(...late.rows);
  details.lateKeys = late.details;
  const backfill = await backfillBeside(ctx);
  rows.push(...backfill.rows);
  details.backfill = backfill.details;
  return { rows, details };
};

/** Inserts `n` rows through the trigger presenting `hashes` in turn (all pending when none is known). */
async function insertPending(pool: pg.Pool, n: number, hashes: Buffer[], tag: string): Promise<void> {
  for (let off = 0; off < n; off += 10_000) {
    await pool.query(
      `insert into app_public.chat_completion_requests (request_id, api_key_hash, model, provider, input_tokens, output_tokens, processing_time_ms, status)
       select $4 || i, ($1::bytea[])[1 + i % array_length($1::bytea[], 1)], 'gpt-4o', 'openai', 10, 20, 100, 'completed'
         from generate_series($2::bigint, $2::bigint + $3::bigint - 1) i`,
      [hashes, off, Math.min(10_000, n - off), tag],
    );
  }
}

async function lateKeys(ctx: BenchContext) {
  const n = ctx.opts["pending-rows"]!, k = Math.max(1, ctx.opts["pending-keys"]!);
  const db = await ctx.dbs.create("late_keys");
  const pool = new pg.Pool({ connectionString: db.rootUrl, max: 3 });
  let worker: Proc | null = null;
  try {
    const secrets = Array.from({ length: k }, () => `kt_live_${randomBytes(24).toString("hex")}`);
    const hashes = secrets.map(sha256);
    const { rows: users } = await pool.query<{ id: string }>(
      "insert into app_public.users (email) select 'late-' || i || '@bench.example' from generate_series(1, $1::int) i returning id", [k]);
    await insertPending(pool, n, hashes, "p");
    const { rows: [before] } = await pool.query<{ n: number }>("select count(*)::int as n from app_public.chat_completion_requests where attribution_status = 'pending'");
    say(`attribution: ${before!.n} pending rows on ${k} unknown keys`);
    const entries = hashes.map((h, i) => ({ key_hash: h.toString("hex"), user_id: users[i]!.id, name: `late-${i}` }));

    // Baseline: the same rows, resolved by direct SQL passes (no worker, no wake-up), on a copy.
    let baselineSeconds: number | null = null;
    {
      const copy = await ctx.dbs.create("late_keys_sql");
      const cpool = new pg.Pool({ connectionString: copy.rootUrl, max: 1 });
      try {
        const { rows: cu } = await cpool.query<{ id: string }>(
          "insert into app_public.users (email) select 'late-' || i || '@bench.example' from generate_series(1, $1::int) i returning id", [k]);
        await insertPending(cpool, n, hashes, "p");
        const t = performance.now();
        await cpool.query("select count(*) from app_public.import_api_keys($1::jsonb)", [JSON.stringify(hashes.map((h, i) => ({ key_hash: h.toString("hex"), user_id: cu[i]!.id, name: `late-${i}` })))]);
        // The floor: one set-based UPDATE joining the imported keys (no worker, no schedule, no bookkeeping).
        await cpool.query(
          `update app_public.chat_completion_requests r
              set api_key_id = k.id, user_id = k.user_id, attribution_status = 'resolved', attribution_method = 'retry',
                  attribution_reason = null, attribution_next_attempt_at = null, attributed_at = now()
             from app_private.api_key_secrets s join app_public.api_keys k on k.id = s.api_key_id
            where r.attribution_status = 'pending' and s.key_hash = r.api_key_hash`);
        const { rows: [left] } = await cpool.query<{ n: number }>("select count(*)::int as n from app_public.chat_completion_requests where attribution_status = 'pending'");
        if (left!.n === 0) baselineSeconds = (performance.now() - t) / 1000;
      } catch (err) {
        say(`attribution: the SQL baseline failed (${(err as Error).message}); reported without a baseline`);
      } finally {
        await cpool.end();
        await ctx.dbs.drop(copy.name);
      }
    }

    await ensureBuilt();
    worker = Proc.node("npm run worker", startCommand("dist/server/worker/index.js"),
      cleanEnv({ DATABASE_URL: db.ownerUrl, ROOT_DATABASE_URL: ctx.dbs.rootUrl, APP_ENV: "production", LOG_LEVEL: "info" }));
    for (let i = 0; !/keytrack worker running/.test(worker.output); i++) {
      if (!worker.alive || i > 1200) throw new Error(`the worker did not start: ${worker.tail()}`);
      await sleep(50);
    }
    const t = performance.now();
    const { rows: [imported] } = await pool.query<{ n: number }>("select count(*) filter (where outcome = 'imported')::int as n from app_public.import_api_keys($1::jsonb)", [JSON.stringify(entries)]);
    const importSeconds = (performance.now() - t) / 1000;
    let pending = n;
    const limit = ctx.quick ? 120_000 : 300_000;
    while (pending > 0 && performance.now() - t < limit) {
      await sleep(100);
      ({ rows: [{ n: pending }] } = await pool.query<{ n: number }>("select count(*)::int as n from app_public.chat_completion_requests where attribution_status = 'pending'") as { rows: Array<{ n: number }> });
    }
    const seconds = (performance.now() - t) / 1000;
    const { rows: [outcome] } = await pool.query<{ resolved: number; failed: number }>(
      "select count(*) filter (where attribution_status = 'resolved')::int as resolved, count(*) filter (where attribution_status = 'failed')::int as failed from app_public.chat_completion_requests");
    say(`attribution: ${imported!.n} keys imported in ${importSeconds.toFixed(2)} s; ${outcome!.resolved} rows resolved ${seconds.toFixed(2)} s after the import started (${pending} still pending, ${outcome!.failed} failed)`);
    const r = row("e. attribution", `${n.toLocaleString("en-US")} pending rows on ${k} keys: import to last resolved (retry worker)`, seconds, "s",
      baselineSeconds === null ? null : { value: baselineSeconds, label: "import + one UPDATE join, no worker" }, { on: "figure", op: "<=", limit: 10, text: "<= 10 s" },
      `${outcome!.resolved} resolved, ${pending} pending, ${outcome!.failed} failed`);
    if (r.met !== null) r.met = r.met && pending === 0 && outcome!.resolved === n;
    return { rows: [r], details: { rows: n, keys: k, imported: imported!.n, importSeconds, seconds, baselineSeconds, resolved: outcome!.resolved, failed: outcome!.failed, stillPending: pending } };
  } finally {
    await worker?.stop();
    await pool.end();
    await ctx.dbs.drop(db.name);
  }
}


async function backfillBeside(ctx: BenchContext) {
  const n = ctx.opts["backfill-rows"]!, clients = Math.max(1, ctx.opts["backfill-clients"]!);
  const db = await ctx.dbs.create("backfill");
  const pool = new pg.Pool({ connectionString: db.rootUrl, max: clients + 2 });
  try {
    const keys = await createKeys(pool, 1000, 1, "legacy");
    const t0 = performance.now();
    // Legacy rows, a month before the current hour: 80% a known key's hash, 10% a user (one key), 10% nothing.
    const client = await pool.connect();
    try {
      await client.query("alter table app_public.chat_completion_requests disable trigger user");
      for (let off = 0; off < n; off += 500_000) {
        await client.query(
          `insert into app_public.chat_completion_requests (request_id, created_at, user_id, api_key_hash, model, provider, status, attribution_status, attribution_reason)
           select 'l' || i, date_trunc('hour', now()) - interval '30 days' + (i::double precision / $4) * interval '30 days',
                  case when i % 10 = 8 then ($2::uuid[])[1 + i % 1000] end,
                  case when i % 10 < 8 then ($1::bytea[])[1 + i % 1000] end,
                  'gpt-4o', 'openai', 'completed', 'failed', 'no_key'
             from generate_series($3::bigint, $3::bigint + least(500000, $4::bigint - $3::bigint) - 1) i`,
          [keys.map((k) => k.hash), keys.map((k) => k.userId), off, n],
        );
      }
    } finally {
      await client.query("alter table app_public.chat_completion_requests enable trigger user");
      client.release();
    }
    await pool.query("select app_private.invalidate_attribution_rollups(now() - interval '31 days', now())");
    await settleRollups(pool);
    await pool.query("analyze app_public.chat_completion_requests");
    say(`attribution: ${n.toLocaleString("en-US")} legacy rows loaded in ${((performance.now() - t0) / 1000).toFixed(0)} s`);

    // Single-row inserters (attributed, durable), until told to stop; latencies by phase.
    let phase: "without" | "with" | "stop" = "without";
    const lat: Record<"without" | "with", number[]> = { without: [], with: [] };
    let seq = 0;
    const inserters = Promise.all(Array.from({ length: clients }, async () => {
      const c = await pool.connect();
      try {
        while (phase !== "stop") {
          const p = phase;
          const i = seq++;
          const t = performance.now();
          await c.query(
            "insert into app_public.chat_completion_requests (request_id, api_key_hash, model, provider, input_tokens, output_tokens, processing_time_ms, status) values ($1, $2, 'gpt-4o', 'openai', 10, 20, 100, 'completed')",
            [`n${i}`, keys[i % keys.length]!.hash]);
          if (p === phase) lat[p].push(performance.now() - t);
        }
      } finally {
        c.release();
      }
    }));
    await sleep(ctx.quick ? 2000 : 8000);
    phase = "with";
    await ensureBuilt();
    const t = performance.now();
    const backfill = Proc.node("npm run backfill", startCommand("dist/server/cli/backfill.js"),
      cleanEnv({ DATABASE_URL: db.ownerUrl, ROOT_DATABASE_URL: ctx.dbs.rootUrl, APP_ENV: "production", LOG_LEVEL: "warn" }));
    const exit = await backfill.exited;
    const seconds = (performance.now() - t) / 1000;
    phase = "stop";
    await inserters;
    if (exit.code !== 0) throw new Error(`npm run backfill exited with code ${exit.code}: ${backfill.tail()}`);
    const { rows: [run] } = await pool.query<{ examined: string; filled: string; status: string }>("select examined, filled, status from app_public.attribution_backfills order by id desc limit 1");
    const examined = Number(run!.examined);
    const rate = examined / seconds;
    const sorted = { without: [...lat.without].sort((a, b) => a - b), with: [...lat.with].sort((a, b) => a - b) };
    const p99 = { without: percentile(sorted.without, 99), with: percentile(sorted.with, 99) };
    say(`attribution: backfill examined ${examined} rows (filled ${run!.filled}) in ${seconds.toFixed(1)} s = ${rate.toFixed(0)} rows/s; insert p99 ${p99.with.toFixed(1)} ms beside it, ${p99.without.toFixed(1)} ms before`);
    const rows = [
      row("e. attribution", `backfill of ${n.toLocaleString("en-US")} legacy rows (npm run backfill), ${clients} inserters beside it`, rate, "rows/s", null,
        { on: "figure", op: ">=", limit: 50_000, text: ">= 50,000 rows/s" }, `${examined} examined, ${run!.filled} filled in ${seconds.toFixed(1)} s`),
      row("e. attribution", `single-row insert p99 beside the backfill (${clients} clients)`, p99.with, "ms", { value: p99.without, label: "p99 without backfill" },
        { on: "ratio", op: "<=", limit: 2, text: "<= 2x" }, `${sorted.with.length} inserts beside, ${sorted.without.length} before`),
    ];
    return {
      rows,
      details: { rows: n, examined, filled: Number(run!.filled), status: run!.status, seconds, rowsPerSecond: rate, inserts: { without: sorted.without.length, with: sorted.with.length }, p99, p50: { without: percentile(sorted.without, 50), with: percentile(sorted.with, 50) } },
    };
  } finally {
    await pool.end();
    await ctx.dbs.drop(db.name);
  }
}
