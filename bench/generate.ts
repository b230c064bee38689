// The benchmarks' data: users and keys, key mixes (the issue's: one busy
// customer's 100 keys, or 1,000 users with a key each; 90% known keys, 5%
// unknown hashes, 5% no key), and bulk ledger history written straight into
// the table with its user triggers off (then the rollups invalidated and
// settled, as README says loads that bypass triggers must do). Sizes are
// arguments; everything is generated in SQL (generate_series), so 10M rows
// take minutes, not hours.
import { createHash, randomBytes } from "node:crypto";

import type pg from "pg";

export interface Key {
  id: string;
  userId: string;
  secret: string;
  hash: Buffer;
}

export const sha256 = (s: string) => createHash("sha256").update(s, "utf8").digest();

/** `users` users with `keysPerUser` keys each (app_public.create_api_key: real keys, secrets known). */
export async function createKeys(pool: pg.Pool, users: number, keysPerUser: number, label: string): Promise<Key[]> {
  const { rows } = await pool.query<{ id: string; user_id: string; secret: string }>(
    `with u as (
       insert into app_public.users (email)
       select $1 || '-' || i || '@bench.example' from generate_series(1, $2::int) i
       returning id)
     select k.api_key_id as id, u.id as user_id, k.secret
       from u, generate_series(1, $3::int) j, lateral app_public.create_api_key(u.id, $1 || '-' || j) k`,
    [label, users, keysPerUser],
  );
  return rows.map((r) => ({ id: r.id, userId: r.user_id, secret: r.secret, hash: sha256(r.secret) }));
}

/** Hashes of keys that exist nowhere (yet). */
export function unknownHashes(n: number): Buffer[] {
  return Array.from({ length: n }, () => sha256(`kt_live_${randomBytes(24).toString("hex")}`));
}

/**
 * A mix: 1,000 slots, row i presents slot i % 1000: `known` per mille a known
 * key (in turn over the keys), `unknown` per mille a never-registered hash,
 * the rest no key (anonymous). Shuffled with a fixed seed so that kinds
 * interleave the same way on every run.
 */
export function mix(keys: Key[], knownPerMille = 900, unknownPerMille = 50): Array<Buffer | null> {
  const unknown = unknownHashes(unknownPerMille);
  const slots: Array<Buffer | null> = [];
  for (let i = 0; i < 1000; i++) {
    if (i < knownPerMille) slots.push(keys[i % keys.length]!.hash);
    else if (i < knownPerMille + unknownPerMille) slots.push(unknown[i - knownPerMille]!);
    else slots.push(null);
  }
  let seed = 42;
  const rand = () => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff);
  for (let i = slots.length - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [slots[i], slots[j]] = [slots[j]!, slots[i]!];
  }
  return slots;
}

/**
 * Ledger history as a gateway would have written it, straight into the table
 * (user triggers off for the load): `rows` rows spread evenly over the `days`
 * days before the current hour, plus `currentHourRows` in the current hour up
 * to now. Per 1,000 rows: 900 resolved at insert on the keys (in turn), 40
 * failed (an unknown hash, given up), 10 naming a user but no key (legacy,
 * failed no_key: what a backfill may fill), 50 anonymous. Then the rollups of
 * the loaded range are invalidated and refreshed until settled.
 */
export async function loadHistory(
  pool: pg.Pool,
  o: { rows: number; days: number; currentHourRows: number; keys: Key[]; chunk?: number; progress?: (done: number, total: number) => void },
): Promise<{ seconds: number; settleSeconds: number; from: Date; until: Date }> {
  const started = performance.now();
  const keyIds = o.keys.map((k) => k.id);
  const userIds = o.keys.map((k) => k.userId);
  const hashes = o.keys.map((k) => k.hash);
  const { rows: [{ hour, now }] } = await pool.query<{ hour: Date; now: Date }>("select date_trunc('hour', now()) as hour, now() as now");
  const from = new Date(hour.getTime() - o.days * 86_400_000);
  const chunk = o.chunk ?? 500_000;
  const total = o.rows + o.currentHourRows;
  let done = 0;
  const client = await pool.connect();
  try {
    await client.query("alter table app_public.chat_completion_requests disable trigger user");
    const insert = async (offset: number, n: number, start: Date, spanMs: number, all: number, tag: string) => {
      // Row i of this range: created_at spread evenly over [start, start + spanMs).
      await client.query(
        `insert into app_public.chat_completion_requests
           (request_id, created_at, user_id, api_key_id, api_key_hash, is_anonymous, model, provider, input_tokens, output_tokens,
            processing_time_ms, status, attribution_status, attribution_method, attribution_reason, attribution_attempts, attributed_at, initial_attribution)
         select $7 || i, c.t,
                case when m < 950 then ($2::uuid[])[1 + i % $5] end,
                case when m < 900 then ($1::uuid[])[1 + i % $5] end,
                case when m < 900 then ($3::bytea[])[1 + i % $5] when m < 940 then sha256(('unknown' || (i % 50))::bytea) end,
                m >= 950, 'gpt-4o', 'openai', 10 + i % 90, 20 + i % 300, 100 + i % 900, 'completed',
                case when m < 900 then 'resolved' when m < 950 then 'failed' else 'anonymous' end,
                case when m < 900 then 'lookup' end,
                case when m < 900 then null when m < 940 then 'not_found' when m < 950 then 'no_key' end,
                case when m < 940 then 1 else 0 end,
                case when m < 900 then c.t end,
                case when m < 900 then 'resolved_lookup' when m < 940 then 'pending_not_found' when m < 950 then 'failed_no_key' else 'anonymous' end
           from generate_series($4::bigint, $4::bigint + $6::bigint - 1) i,
                lateral (select (i * 7919) % 1000 as m) mm,
                lateral (select $8::timestamptz + (i - $9::bigint) * ($10::double precision / $11::bigint) * interval '1 millisecond' as t) c`,
        [keyIds, userIds, hashes, offset, o.keys.length, n, tag, start, 0, spanMs, all],
      );
      done += n;
      o.progress?.(done, total);
    };
    for (let off = 0; off < o.rows; off += chunk) {
      await insert(off, Math.min(chunk, o.rows - off), from, o.days * 86_400_000, o.rows, "h");
    }
    const currentSpan = Math.max(1, now.getTime() - hour.getTime());
    for (let off = 0; off < o.currentHourRows; off += chunk) {
      await insert(off, Math.min(chunk, o.currentHourRows - off), hour, currentSpan, o.currentHourRows, "c");
    }
    await client.query("alter table app_public.chat_completion_requests enable trigger user");
  } finally {
    await client.query("alter table app_public.chat_completion_requests enable trigger user").catch(() => {});
    client.release();
  }
  const until = new Date();
  const settleStarted = performance.now();
  await pool.query("select app_private.invalidate_attribution_rollups($1, $2)", [from, until]);
  await settleRollups(pool);
  await pool.query("analyze app_public.chat_completion_requests");
  return { seconds: (settleStarted - started) / 1000, settleSeconds: (performance.now() - settleStarted) / 1000, from, until };
}

/** Runs the rollup refresh (what the worker does every minute) until every ended hour is settled and none is dirty. */
export async function settleRollups(pool: pg.Pool, maxRuns = 20): Promise<number> {
  for (let run = 1; run <= maxRuns; run++) {
    await pool.query("select * from app_private.refresh_attribution_rollups()");
    const { rows: [s] } = await pool.query<{ ok: boolean }>(
      `select coalesce((select settled_through from app_public.attribution_rollup_state) >= date_trunc('hour', now()), false)
              and not exists (select 1 from app_public.attribution_rollup_dirty_hours) as ok`,
    ).catch(async () => ({ rows: [{ ok: run >= 2 }] }));
    if (s!.ok) return run;
  }
  return maxRuns;
}
