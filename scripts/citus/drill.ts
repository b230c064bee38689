// The Citus drill's body, shared by `npm run drill:citus` (scripts/drills/citus.ts,
// full figures) and tests/scale/citus.test.ts (a shortened run): a coordinator
// and two workers on loopback (cluster.ts), keytrack migrated on the coordinator
// as on one node (prepareDatabase), then distributed (distribute.ts), the
// gateway (startServer, in this process, with its worker) on the coordinator,
// and mixed traffic: HTTP requests with known keys and without any, and SQL
// writers presenting the hashes of keys that do not exist yet, some rows sent
// twice; then those keys are imported.
//
// It checks the promises of one node: one row per served request (none lost,
// no duplicate request_id), rows attributed as sent, the pending rows resolved
// after the import, no completeness gap, the spec's view equal to the spec's
// SELECT, the quality and trend endpoints equal to raw counts, row-level
// security for a user's key through GraphQL. Then it measures SQL ingestion
// through the coordinator with 2 workers, drains and removes one worker (its
// shards move to the other, no row lost) and measures again with 1; the same
// ingestion is measured first on the coordinator alone, before Citus, to compare.
import { createHash, randomBytes, randomUUID } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";

import pg from "pg";

import { loadConfig } from "../../server/config.js";
import { prepareDatabase } from "../../server/db/prepare.js";
import { startServer, type RunningServer } from "../../server/main.js";
import { checkLedger, completenessGaps, createKeys, createUsers, importKey, newKeySecret, readLedger, Traffic, type Expected, type Target } from "../drills/harness.js";
import { VIEW_QUERY } from "../../tests/helpers/specSql.js";
import { CitusCluster } from "./cluster.js";
import { distribute } from "./distribute.js";

export interface CitusDrillOptions {
  /** HTTP requests per second, and for how long. */
  rate: number;
  seconds: number;
  /** Rows the SQL writers insert with keys that do not exist yet, spread over lateKeys keys. */
  lateRows: number;
  lateKeys: number;
  /** Seconds of SQL ingestion measured with 2 workers, then with 1 (0: not measured). */
  ingestSeconds: number;
  /** Concurrent SQL writers during the measurement, and rows per INSERT. */
  ingestClients: number;
  ingestBatch: number;
  /** Longest wait for the pending rows to be resolved after the import, and for the served rows to arrive. */
  waitSeconds: number;
  log: (line: string) => void;
}

export interface CitusDrillResult {
  failures: string[];
  figures: Record<string, number | string>;
}

const ADMIN = `citus-drill-admin-${randomBytes(16).toString("hex")}`;
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
const sha256 = (secret: string) => createHash("sha256").update(secret, "utf8").digest();

async function waitUntil(what: string, seconds: number, fn: () => Promise<boolean>): Promise<boolean> {
  const deadline = Date.now() + seconds * 1000;
  for (;;) {
    if (await fn()) return true;
    if (Date.now() > deadline) return false;
    await sleep(100);
  }
}

/** SQL rows presenting a key hash (or none), in one INSERT like the service's batches (insert ... select from unnest). */
const INSERT_SQL = `
  insert into app_public.chat_completion_requests (request_id, api_key_hash, model, provider, input_tokens, output_tokens, processing_time_ms)
  select r, h, 'gpt-drill', 'sql', 10, 20, 5 from unnest($1::text[], $2::bytea[]) as u(r, h)`;

async function insertRows(pool: pg.Pool, ids: string[], hashes: Array<Buffer | null>): Promise<void> {
  await pool.query(INSERT_SQL, [ids, hashes]);
}

/** Rows per second that `clients` writers insert through the coordinator in `seconds` (batches of `batch`; half with a known key, half anonymous). */
async function measureIngestion(pool: pg.Pool, seconds: number, clients: number, batch: number, keyHash: Buffer): Promise<{ rows: number; perSecond: number }> {
  let rows = 0;
  const started = Date.now();
  const until = started + seconds * 1000;
  await Promise.all(Array.from({ length: clients }, async () => {
    while (Date.now() < until) {
      const ids = Array.from({ length: batch }, () => `ingest-${randomUUID()}`);
      await insertRows(pool, ids, ids.map((_, i) => (i % 2 ? keyHash : null)));
      rows += batch;
    }
  }));
  const elapsed = (Date.now() - started) / 1000;
  return { rows, perSecond: Math.round(rows / elapsed) };
}

async function getJson(url: string): Promise<{ status: number; body: any }> {
  const res = await fetch(url, { headers: { authorization: `Bearer ${ADMIN}` } });
  return { status: res.status, body: await res.json() };
}

export async function runCitusDrill(o: CitusDrillOptions): Promise<CitusDrillResult> {
  const failures: string[] = [];
  const figures: Record<string, number | string> = {};
  const check = (ok: boolean, what: string) => {
    if (!ok) failures.push(what);
    o.log(`${ok ? "ok  " : "FAIL"} ${what}`);
    return ok;
  };
  let cluster: CitusCluster | null = null;
  let server: RunningServer | null = null;
  let pool: pg.Pool | null = null;
  const dataDir = await mkdtemp(path.join(os.tmpdir(), "keytrack-citus-data-"));
  try {
    const t0 = Date.now();
    cluster = await CitusCluster.start({ workers: 2, log: o.log });
    const coordinator = cluster.coordinator;
    const rootUrl = cluster.url(coordinator);
    const ownerUrl = cluster.url(coordinator, "keytrack_owner", "keytrack");
    // keytrack as on one node first: roles, database, migrations on the coordinator.
    await prepareDatabase({ rootUrl, databaseUrl: ownerUrl });
    // db:distribute refuses, saying why, a database without Citus and a worker.
    const noCitus = await distribute(cluster.url(coordinator, "postgres", "keytrack")).then(() => "distributed", (e: Error) => e.message);
    check(/create extension citus/.test(noCitus), `db:distribute refuses a database without the citus extension: "${noCitus.slice(0, 100)}..."`);
    let baselineMs = 0;
    // Rows recorded on the single node before distribution: db:distribute must carry them over, attributed as they were.
    const before: Array<{ id: string; expected: Expected }> = [];
    const single = new pg.Pool({ connectionString: ownerUrl, max: o.ingestClients + 1, application_name: "keytrack-drill" });
    single.on("error", () => {});
    try {
      if (o.ingestSeconds > 0) {
        const baselineStarted = Date.now();
        // The same SQL ingestion on one node first (the coordinator before Citus: plain PostgreSQL, same settings).
        const [user] = await createUsers(single, 1, "baseline");
        const [key] = await createKeys(single, [user!], 1, "baseline");
        const base = await measureIngestion(single, o.ingestSeconds, o.ingestClients, o.ingestBatch, sha256(key!.secret));
        figures.rowsPerSecond1Node = base.perSecond;
        o.log(`ingestion on one node (before Citus): ${base.rows} rows in ${o.ingestSeconds} s: ${base.perSecond} rows/s`);
        await single.query("truncate app_public.chat_completion_requests, app_private.request_ids");
        baselineMs = Date.now() - baselineStarted;
      }
      const [user] = await createUsers(single, 1, "before");
      const [key] = await createKeys(single, [user!], 1, "before");
      for (let i = 0; i < 20; i++) before.push({ id: `before-${randomUUID()}`, expected: i % 2 ? { apiKeyId: key!.id } : { anonymous: true } });
      await insertRows(single, before.map((b) => b.id), before.map((b) => ("apiKeyId" in b.expected ? sha256(key!.secret) : null)));
    } finally {
      await single.end();
    }
    await cluster.createDatabase();
    const onWorker = await distribute(cluster.url(cluster.workers[0]!, "postgres", "keytrack")).then(() => "distributed", (e: Error) => e.message);
    check(/not on a Citus coordinator/.test(onWorker), `db:distribute refuses a worker's database: "${onWorker.slice(0, 100)}..."`);
    const dist = await distribute(cluster.url(coordinator, "postgres", "keytrack"));
    const again = await distribute(cluster.url(coordinator, "postgres", "keytrack"));
    check(again.changed.length === 0, `db:distribute is idempotent (a second run changed ${again.changed.length === 0 ? "nothing" : again.changed.join("; ")})`);
    figures.shards = dist.shards;
    figures.setupSeconds = Math.round((Date.now() - t0 - baselineMs) / 100) / 10;
    o.log(`cluster up, keytrack migrated and distributed (${dist.shards} shards on ${dist.workers} workers) in ${figures.setupSeconds} s`);

    server = await startServer(loadConfig({
      KEYTRACK_DATA_DIR: dataDir,
      DATABASE_URL: ownerUrl,
      ROOT_DATABASE_URL: rootUrl,
      PORT: "0",
      HOST: "127.0.0.1",
      APP_ENV: "production",
      ADMIN_API_KEY: ADMIN,
      ALLOW_ANONYMOUS: "true",
      ECHO_MODEL: "true",
      WORKER: "true",
      LOG_LEVEL: "error",
      HEALTH_TIMEOUT_MS: "60000",
      AUTH_CACHE_TTL_MS: "5000",
    }));
    pool = new pg.Pool({ connectionString: ownerUrl, max: Math.max(4, o.ingestClients + 1), application_name: "keytrack-drill" });
    pool.on("error", () => {});

    // Users and keys (reference tables: written through the coordinator, copied to every node).
    const users = await createUsers(pool, 3, "citus");
    const keys = await createKeys(pool, users, 2, "citus");
    const late = Array.from({ length: o.lateKeys }, (_, i) => ({ secret: newKeySecret(), userId: users[i % users.length]!, id: "" }));

    // HTTP: known keys and no key at all, at a fixed rate.
    const pick = (seq: number): Target => (seq % 3 === 2
      ? { kind: "anonymous", keyName: null, secret: null }
      : { kind: "key", keyName: keys[seq % keys.length]!.name, secret: keys[seq % keys.length]!.secret });
    const traffic = new Traffic(server.url, o.rate, 64, pick);
    // SQL: rows presenting keys that do not exist yet, in batches, each batch sent twice (a re-delivery).
    const lateRows: Array<{ id: string; key: number }> = Array.from({ length: o.lateRows }, (_, i) => ({ id: `late-${randomUUID()}`, key: i % o.lateKeys }));
    traffic.start();
    const writer = (async () => {
      const batch = Math.max(1, Math.ceil(o.lateRows / Math.max(1, o.seconds * 2)));
      for (let i = 0; i < lateRows.length; i += batch) {
        const part = lateRows.slice(i, i + batch);
        const ids = part.map((r) => r.id);
        const hashes = part.map((r) => sha256(late[r.key]!.secret));
        await insertRows(pool!, ids, hashes);
        await insertRows(pool!, ids, hashes);
        await sleep(500);
      }
    })();
    await sleep(o.seconds * 1000);
    await traffic.stop();
    await writer;
    const pendingBefore = Number((await pool.query("select count(*) from app_public.chat_completion_requests where attribution_status = 'pending'")).rows[0].count);
    check(pendingBefore === lateRows.length, `the late keys' rows are pending before the import (${pendingBefore} of ${lateRows.length})`);

    // The keys are imported (reference tables; import_api_key wakes the retry worker on the coordinator).
    const importedAt = Date.now();
    for (const [i, k] of late.entries()) k.id = (await importKey(pool, k.userId, k.secret, `late-${i + 1}`)).id;
    const resolved = await waitUntil("the pending rows to be resolved", o.waitSeconds, async () =>
      Number((await pool!.query("select count(*) from app_public.chat_completion_requests where attribution_status = 'pending'")).rows[0].count) === 0);
    figures.importToResolvedSeconds = Math.round((Date.now() - importedAt) / 100) / 10;
    check(resolved, `every pending row resolved after the import (in ${figures.importToResolvedSeconds} s, by the retry worker on the coordinator)`);

    // One row per served request.
    const served = new Map<string, Expected>();
    const statuses: Record<string, number> = {};
    for (const a of traffic.answers) {
      statuses[String(a.status)] = (statuses[String(a.status)] ?? 0) + 1;
      if (a.status === 200 && a.requestId) {
        served.set(a.requestId, a.keyName ? { apiKeyId: keys.find((k) => k.name === a.keyName)!.id } : { anonymous: true });
      }
    }
    for (const r of lateRows) served.set(r.id, { apiKeyId: late[r.key]!.id });
    for (const b of before) served.set(b.id, b.expected);
    figures.httpRequests = traffic.answers.length;
    figures.httpServed = traffic.answers.filter((a) => a.status === 200).length;
    figures.sqlRows = lateRows.length;
    check(traffic.answers.length > 0 && traffic.answers.every((a) => a.status === 200), `every HTTP request answered 200 (${Object.entries(statuses).map(([s, n]) => `${s}: ${n}`).join(", ")}; ${traffic.shed} not sent)`);
    const httpIds = [...served.keys()];
    await waitUntil("the served rows to arrive", o.waitSeconds, async () =>
      Number((await pool!.query("select count(*) from app_public.chat_completion_requests where request_id = any($1)", [httpIds])).rows[0].count) >= httpIds.length);
    const ledger = checkLedger(await readLedger(pool), served);
    figures.ledgerRows = ledger.rows;
    check(before.every((b) => !ledger.lostIds.includes(b.id)) && ledger.lost === 0, `the ${before.length} rows recorded on the single node before db:distribute are all there`);
    check(ledger.lost === 0, `no served request without its row (lost: ${ledger.lost}${ledger.lost ? `, e.g. ${ledger.lostIds.slice(0, 3).join(", ")}` : ""})`);
    check(ledger.duplicates === 0, `no duplicate request_id (re-delivered SQL batches included): ${ledger.duplicates}`);
    check(ledger.unknownRows === 0, `no row the drill did not send: ${ledger.unknownRows}`);
    check(ledger.misattributed === 0, `every row attributed as sent: known keys to their key, no key anonymous, late keys to the imported key (${ledger.misattributed} not${ledger.misattributedExamples.length ? `: ${ledger.misattributedExamples.join("; ")}` : ""})`);
    const gaps = await completenessGaps(pool);
    check(gaps.missing === 0, `no completeness gap in the serving process's numbering (${gaps.missing} missing)`);

    // Exact reports.
    const client = await pool.connect();
    try {
      await client.query("set time zone 'UTC'");
      const view = (await client.query("select * from app_public.api_key_tracking_quality")).rows;
      const spec = (await client.query(VIEW_QUERY.replace(/FROM chat_completion_requests/, "FROM app_public.chat_completion_requests"))).rows;
      check(JSON.stringify(view) === JSON.stringify(spec), `the spec's view api_key_tracking_quality equals the spec's SELECT over the raw rows (${view.length} hours, ${view.reduce((n, r) => n + Number(r.total_requests), 0)} requests)`);
    } finally {
      client.release();
    }
    const raw = (await pool.query(`select count(*)::int as total, count(api_key_id)::int as with_key,
                                          count(*) filter (where is_anonymous)::int as anonymous
                                     from app_public.chat_completion_requests where created_at >= now() - interval '24 hours'`)).rows[0];
    const quality = await getJson(`${server.url}/admin/monitoring/api-key-tracking-quality?hours=24`);
    check(quality.status === 200 && quality.body.total_requests === raw.total && quality.body.requests_with_api_key === raw.with_key,
      `quality endpoint equals raw counts (${quality.body.total_requests}/${quality.body.requests_with_api_key} vs ${raw.total}/${raw.with_key})`);
    const trend = await getJson(`${server.url}/admin/monitoring/api-key-tracking-trend?days=7`);
    const rawTrend = (await pool.query(`select count(*)::int as total, count(api_key_id)::int as with_key from app_public.chat_completion_requests
                                         where created_at >= (date_trunc('day', now() at time zone 'UTC') - interval '6 days') at time zone 'UTC'`)).rows[0];
    check(trend.status === 200 && trend.body.summary?.total_requests === rawTrend.total && trend.body.summary?.requests_with_api_key === rawTrend.with_key,
      `trend endpoint equals raw counts (${trend.body.summary?.total_requests}/${trend.body.summary?.requests_with_api_key} vs ${rawTrend.total}/${rawTrend.with_key})`);

    // Row-level security through GraphQL for a user's key: the policy runs on the shards.
    const userKey = keys[0]!;
    const own = Number((await pool.query("select count(*) from app_public.chat_completion_requests where user_id = $1", [userKey.userId])).rows[0].count);
    const gql = await fetch(`${server.url}/graphql`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${userKey.secret}` },
      body: JSON.stringify({ query: "{ allChatCompletionRequests(first: 1000) { totalCount nodes { userId } } }" }),
    });
    const gqlBody = await gql.json() as { data?: { allChatCompletionRequests: { totalCount: number; nodes: Array<{ userId: string }> } }; errors?: unknown };
    const seen = gqlBody.data?.allChatCompletionRequests;
    check(!!seen && seen.totalCount === own && own > 0 && seen.nodes.every((n) => n.userId === userKey.userId),
      `RLS through GraphQL: a user's key sees exactly that user's ${own} rows (${seen ? `saw ${seen.totalCount}, ${seen.nodes.filter((n) => n.userId !== userKey.userId).length} of others` : JSON.stringify(gqlBody.errors)})`);

    // Backfill (its Citus variant): legacy rows naming a user but no key get the user's only key.
    const [legacyUser] = await createUsers(pool, 1, "citus-legacy");
    const [legacyKey] = await createKeys(pool, [legacyUser!], 1, "citus-legacy");
    const legacyIds = Array.from({ length: 20 }, () => `legacy-${randomUUID()}`);
    await pool.query(`insert into app_public.chat_completion_requests (request_id, user_id)
                      select r, $2::uuid from unnest($1::text[]) r`, [legacyIds, legacyUser]);
    const run = (await pool.query("select id from app_public.start_attribution_backfill(1000)")).rows[0].id;
    const backfilled = await waitUntil("the backfill to finish", o.waitSeconds, async () =>
      (await pool!.query("select status from app_public.attribution_backfills where id = $1", [run])).rows[0].status === "finished");
    const filled = Number((await pool.query(`select count(*) from app_public.chat_completion_requests
                                              where request_id = any($1) and api_key_id = $2 and attribution_method = 'backfill'`, [legacyIds, legacyKey!.id])).rows[0].count);
    check(backfilled && filled === legacyIds.length, `the backfill (run by the worker) gave ${filled} of ${legacyIds.length} keyless rows their user's only key`);

    // Throughput: SQL ingestion through the coordinator, 2 workers, then 1.
    if (o.ingestSeconds > 0) {
      const keyHash = sha256(keys[1]!.secret);
      const two = await measureIngestion(pool, o.ingestSeconds, o.ingestClients, o.ingestBatch, keyHash);
      figures.rowsPerSecond2Workers = two.perSecond;
      o.log(`ingestion with 2 workers: ${two.rows} rows in ${o.ingestSeconds} s: ${two.perSecond} rows/s`);
      const before = Number((await pool.query("select count(*) from app_public.chat_completion_requests")).rows[0].count);
      const worker2 = cluster.workers[1]!;
      const drainStarted = Date.now();
      await cluster.query(coordinator, "keytrack", "select citus_drain_node('127.0.0.1', $1, shard_transfer_mode => 'block_writes')", [worker2.port]);
      await cluster.query(coordinator, "keytrack", "select citus_remove_node('127.0.0.1', $1)", [worker2.port]);
      figures.drainSeconds = Math.round((Date.now() - drainStarted) / 100) / 10;
      const after = Number((await pool.query("select count(*) from app_public.chat_completion_requests")).rows[0].count);
      const placements = (await cluster.query<{ n: number }>(coordinator, "keytrack", "select count(distinct nodeport)::int as n from citus_shards where citus_table_type = 'distributed'")).rows[0]!.n;
      check(after === before && placements === 1, `worker2 drained (its shards moved to worker1 in ${figures.drainSeconds} s) and removed: ${after} of ${before} rows, shards on ${placements} node`);
      const one = await measureIngestion(pool, o.ingestSeconds, o.ingestClients, o.ingestBatch, keyHash);
      figures.rowsPerSecond1Worker = one.perSecond;
      o.log(`ingestion with 1 worker: ${one.rows} rows in ${o.ingestSeconds} s: ${one.perSecond} rows/s`);
      const total = Number((await pool.query("select count(*) from app_public.chat_completion_requests")).rows[0].count);
      check(total === before + one.rows, `every row ingested with 1 worker is in the ledger (${total} = ${before} + ${one.rows})`);
      // What reading raw rows costs (no rollups on Citus): the reports and /metrics over the whole ledger now.
      const timed = async (url: string) => {
        const started = Date.now();
        const res = await fetch(url, { headers: { authorization: `Bearer ${ADMIN}` } });
        await res.arrayBuffer();
        return { status: res.status, ms: Date.now() - started };
      };
      const reads: Array<Record<"quality" | "trend" | "metrics", { status: number; ms: number }>> = [];
      for (let i = 0; i < 3; i++) {
        reads.push({
          quality: await timed(`${server.url}/admin/monitoring/api-key-tracking-quality?hours=24`),
          trend: await timed(`${server.url}/admin/monitoring/api-key-tracking-trend?days=30`),
          // (/metrics itself answers from a cached read: time the function behind it.)
          metrics: await (async () => {
            const started = Date.now();
            await pool!.query("select * from app_private.attribution_metrics()");
            return { status: 200, ms: Date.now() - started };
          })(),
        });
      }
      const best = (k: "quality" | "trend" | "metrics") => Math.min(...reads.map((r) => r[k].ms));
      figures.readRows = total;
      figures.qualityMs = best("quality");
      figures.trendMs = best("trend");
      figures.metricsMs = best("metrics");
      check(reads.every((r) => r.quality.status === 200 && r.trend.status === 200 && r.metrics.status === 200),
        `reports and the metrics function answer over ${total} raw rows (best of 3: quality ${figures.qualityMs} ms, trend ${figures.trendMs} ms, attribution_metrics() ${figures.metricsMs} ms)`);
    }
    return { failures, figures };
  } catch (err) {
    failures.push(`exception: ${(err as Error).stack ?? String(err)}`);
    if (cluster) {
      for (const node of cluster.nodes) {
        const tail = await cluster.logTail(node, 10);
        if (tail.length) o.log(`${node.name}'s last log lines:\n${tail.map((l) => `    ${l}`).join("\n")}`);
      }
    }
    return { failures, figures };
  } finally {
    await server?.close().catch(() => {});
    await pool?.end().catch(() => {});
    await cluster?.stop().catch(() => {});
    await rm(dataDir, { recursive: true, force: true });
  }
}
