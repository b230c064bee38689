// The metrics registry without a database: the column -> series table, what a
// scrape shows when the database fails or hangs, caching, the worker job
// counter and the HTTP histogram's route label.
import http from "node:http";
import type { AddressInfo } from "node:net";

import test from "ava";
import express from "express";
import type { Job, WorkerEventMap } from "graphile-worker";

import type { AppContext } from "../../server/context.js";
import { createLogger } from "../../server/log.js";
import { DB_COLUMNS, DB_METRICS } from "../../server/metrics/dbMetrics.js";
import type { MetricsPool } from "../../server/metrics/dbSource.js";
import { installMetrics, installMetricsEndpoint, metricsOf } from "../../server/metrics/installMetrics.js";
import { createMetrics } from "../../server/metrics/registry.js";
import { WorkerJobCounts } from "../../server/metrics/workerJobs.js";
import type { DropReason, Recorder } from "../../server/recording/types.js";
import { parseExposition } from "../helpers/exposition.js";
import { sleep } from "../helpers/poll.js";

const log = createLogger({ level: "error" });

/** A row as attribution_metrics() returns it: column i holds i + 1, the rate 0.75. */
function fakeRow(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  const row: Record<string, unknown> = {};
  DB_COLUMNS.forEach((m, i) => {
    // bigint columns arrive as strings from pg.
    row[m.column] = m.metric === "api_key_tracking_rate" ? 0.75 : String(i + 1);
  });
  return { ...row, ...overrides };
}

interface FakePool extends MetricsPool {
  /** The statements of the client that read attribution_metrics() (other metric queries use clients of their own). */
  statements: string[];
  queries: number;
}

function fakePool(answer: () => Promise<Record<string, unknown>>): FakePool {
  const sessions: string[][] = [];
  const pool = {
    get statements() {
      return sessions.find((s) => s.some((sql) => /attribution_metrics\(\)/.test(sql))) ?? [];
    },
    queries: 0,
    async connect() {
      const session: string[] = [];
      sessions.push(session);
      return {
        async query(sql: string) {
          session.push(sql);
          if (/attribution_metrics\(\)/.test(sql)) {
            pool.queries++;
            return { rows: [await answer()] };
          }
          return { rows: [] };
        },
        release() {},
      };
    },
  };
  return pool as unknown as FakePool;
}

interface FakeState {
  buffered?: number;
  dropped?: Partial<Record<DropReason, number>>;
  staleServed?: number;
}

function fakeCtx(pool: MetricsPool, spool = 0, state: FakeState = {}): AppContext {
  const recorder: Recorder = {
    record: async () => ({ outcome: "recorded", attempts: 1 }),
    spoolDepth: () => spool,
    bufferedRows: () => state.buffered ?? 0,
    accepting: () => (state.buffered ?? 0) === 0,
    dropped: () => state.dropped ?? {},
    replay: async () => 0,
    close: async () => {},
  };
  return {
    config: { metricsToken: null } as AppContext["config"],
    pools: { owner: pool, read: pool } as unknown as AppContext["pools"],
    log,
    recorder,
    auth: { staleServed: () => state.staleServed ?? 0 } as unknown as AppContext["auth"],
  };
}

const scrape = async (m: ReturnType<typeof createMetrics>) => parseExposition(await m.registry.metrics());

test("every column of attribution_metrics() becomes its series, with the right type", async (t) => {
  const pool = fakePool(async () => fakeRow());
  const m = createMetrics(fakeCtx(pool, 3), { pool, defaultMetrics: false });
  const e = await scrape(m);
  DB_COLUMNS.forEach((mapping, i) => {
    const expected = mapping.metric === "api_key_tracking_rate" ? 0.75 : i + 1;
    t.is(e.value(mapping.metric, mapping.labels), expected, `${mapping.column} -> ${mapping.metric}`);
  });
  for (const [name, def] of Object.entries(DB_METRICS)) t.is(e.types.get(name), def.type, name);
  t.is(e.types.get("api_key_lookup_attempts_total"), "counter");
  t.is(e.types.get("api_key_tracking_rate"), "gauge");
  t.is(e.value("keytrack_database_up"), 1);
  t.is(e.value("keytrack_spool_depth"), 3);
  t.is(e.types.get("http_request_duration_seconds"), "histogram");
  t.is(e.types.get("keytrack_worker_jobs_total"), "counter");
  // The spec's label values are all there, zero or not.
  t.deepEqual(e.find("api_key_lookup_attempts_total").map((s) => s.labels.status).sort(), ["failed", "retry", "success"]);
  for (const reason of ["anonymous", "not_found", "lookup_failed", "dev_bypass"]) {
    t.not(e.value("api_key_tracking_failures_total", { reason }), undefined, reason);
  }
});

test("the recorder's buffered rows and dropped rows, and the stale-key requests, are exported; every drop reason from the start", async (t) => {
  const pool = fakePool(async () => fakeRow());
  const state: FakeState = {};
  const m = createMetrics(fakeCtx(pool, 0, state), { pool, defaultMetrics: false });
  let e = await scrape(m);
  t.is(e.types.get("keytrack_record_dropped_total"), "counter");
  t.is(e.types.get("keytrack_record_buffered"), "gauge");
  t.is(e.types.get("keytrack_auth_stale_total"), "counter");
  t.deepEqual(
    e.find("keytrack_record_dropped_total").map((s) => [s.labels.reason, s.value]).sort(),
    [["corrupt_spool_line", 0], ["memory_full", 0], ["rejected_by_database", 0], ["shutdown", 0]],
  );
  t.is(e.value("keytrack_record_buffered"), 0);
  t.is(e.value("keytrack_auth_stale_total"), 0);

  state.buffered = 7;
  state.dropped = { rejected_by_database: 2, memory_full: 1 };
  state.staleServed = 5;
  e = await scrape(m);
  t.is(e.value("keytrack_record_buffered"), 7);
  t.is(e.value("keytrack_record_dropped_total", { reason: "rejected_by_database" }), 2);
  t.is(e.value("keytrack_record_dropped_total", { reason: "memory_full" }), 1);
  t.is(e.value("keytrack_record_dropped_total", { reason: "shutdown" }), 0);
  t.is(e.value("keytrack_auth_stale_total"), 5);
});

test("a context without the authenticator still scrapes: keytrack_auth_stale_total is 0", async (t) => {
  const pool = fakePool(async () => fakeRow());
  const ctx = { ...fakeCtx(pool), auth: undefined as unknown as AppContext["auth"] };
  const e = await scrape(createMetrics(ctx, { pool, defaultMetrics: false }));
  t.is(e.value("keytrack_auth_stale_total"), 0);
});

test("the query runs in its own transaction with a local statement_timeout", async (t) => {
  const pool = fakePool(async () => fakeRow());
  const m = createMetrics(fakeCtx(pool), { pool, defaultMetrics: false, timeoutMs: 1234 });
  await m.registry.metrics();
  t.deepEqual(pool.statements, ["begin", "set local statement_timeout = 1234", "select * from app_private.attribution_metrics()", "commit"]);
});

test("a database error: /metrics still answers, database_up is 0 and the database series are absent, not zero", async (t) => {
  const pool = fakePool(async () => {
    throw Object.assign(new Error("connection refused"), { code: "ECONNREFUSED" });
  });
  const m = createMetrics(fakeCtx(pool, 2), { pool });
  const e = await scrape(m);
  t.is(e.value("keytrack_database_up"), 0);
  for (const name of Object.keys(DB_METRICS)) {
    t.deepEqual(e.find(name), [], `${name} has no samples`);
    t.truthy(e.types.get(name), `${name} is still declared`);
  }
  t.is(e.value("keytrack_spool_depth"), 2);
  t.true(e.names.has("process_cpu_user_seconds_total"));
  t.true(e.names.has("nodejs_heap_size_used_bytes"));
  t.true(pool.statements.includes("rollback"));
});

test("a hung database: the scrape answers within the budget, and no second query piles up", async (t) => {
  let release!: () => void;
  const hung = new Promise<void>((r) => (release = r));
  const pool = fakePool(async () => {
    await hung;
    return fakeRow();
  });
  const m = createMetrics(fakeCtx(pool), { pool, defaultMetrics: false, timeoutMs: 100, ttlMs: 10 });
  // The query never returns until released below: a scrape that waited for it would never end.
  const e = await scrape(m);
  t.is(e.value("keytrack_database_up"), 0);
  t.deepEqual(e.find("api_key_tracking_success_total"), []);
  await sleep(20);
  t.is((await scrape(m)).value("keytrack_database_up"), 0);
  t.is(pool.queries, 1, "the running query is waited on, not repeated");
  release();
  await sleep(20);
  const after = await scrape(m);
  t.is(after.value("keytrack_database_up"), 1);
  t.is(after.value("api_key_lookup_attempts_total", { status: "success" }), 1);
});

test("parallel scrapes share one query; a later one reads again", async (t) => {
  const pool = fakePool(async () => {
    await sleep(20);
    return fakeRow();
  });
  const m = createMetrics(fakeCtx(pool), { pool, defaultMetrics: false, ttlMs: 50 });
  await Promise.all(Array.from({ length: 10 }, () => m.registry.metrics()));
  t.is(pool.queries, 1);
  await sleep(60);
  await m.registry.metrics();
  t.is(pool.queries, 2);
});

test("no authenticated traffic (rate NULL): the rate is absent while the counts are there", async (t) => {
  const rate = DB_COLUMNS.find((c) => c.metric === "api_key_tracking_rate")!.column;
  const pending = DB_COLUMNS.find((c) => c.metric === "keytrack_pending_attributions")!.column;
  const pool = fakePool(async () => fakeRow({ [rate]: null, [pending]: "0" }));
  const e = await scrape(createMetrics(fakeCtx(pool), { pool, defaultMetrics: false }));
  t.deepEqual(e.find("api_key_tracking_rate"), []);
  t.is(e.value("keytrack_pending_attributions"), 0);
  t.is(e.value("keytrack_database_up"), 1);
});

test("a column missing from the result leaves its series out, the others stay", async (t) => {
  const row = fakeRow();
  const gone = DB_COLUMNS[0]!;
  delete row[gone.column];
  const pool = fakePool(async () => row);
  const e = await scrape(createMetrics(fakeCtx(pool), { pool, defaultMetrics: false }));
  t.is(e.value(gone.metric, gone.labels), undefined);
  t.is(e.value(DB_COLUMNS[1]!.metric, DB_COLUMNS[1]!.labels), 2);
});

test("worker job outcomes: success, error (will retry) and failed (last attempt) each count once", async (t) => {
  const counts = new WorkerJobCounts();
  const job = (task: string, attempts: number, max = 3) => ({ task_identifier: task, attempts, max_attempts: max }) as Job;
  const emit = <E extends keyof WorkerEventMap>(event: E, params: object) =>
    counts.events.emit(event, params as WorkerEventMap[E]);
  emit("job:success", { job: job("a", 1) });
  emit("job:success", { job: job("a", 1) });
  emit("job:error", { job: job("a", 1), error: new Error("x") });
  emit("job:error", { job: job("b", 3), error: new Error("x") });
  emit("job:failed", { job: job("b", 3), error: new Error("x") });
  const pool = fakePool(async () => fakeRow());
  const m = createMetrics(fakeCtx(pool), { pool, defaultMetrics: false });
  m.addWorkerJobs(counts);
  const e = await scrape(m);
  t.is(e.value("keytrack_worker_jobs_total", { task: "a", outcome: "success" }), 2);
  t.is(e.value("keytrack_worker_jobs_total", { task: "a", outcome: "error" }), 1);
  t.is(e.value("keytrack_worker_jobs_total", { task: "b", outcome: "failed" }), 1);
  t.is(e.value("keytrack_worker_jobs_total", { task: "b", outcome: "error" }), undefined);
});

test("HTTP durations are labelled by route pattern, not by URL", async (t) => {
  const pool = fakePool(async () => fakeRow());
  const ctx = fakeCtx(pool);
  const app = express();
  installMetrics(app, ctx);
  app.get("/things/:id", (_req, res) => void res.json({ ok: true }));
  app.use("/graphql", (_req, res) => void res.status(401).json({}));
  installMetricsEndpoint(app, ctx);
  app.use((_req, res) => void res.status(404).end());
  const server = http.createServer(app).listen(0, "127.0.0.1");
  await new Promise((r) => server.once("listening", r));
  t.teardown(() => new Promise<void>((r) => server.close(() => r())));
  const base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  for (const path of ["/things/1", "/things/2?x=1", "/things/3", "/nope/1", "/nope/2", "/graphql"]) {
    await (await fetch(base + path)).arrayBuffer();
  }
  await (await fetch(base + "/metrics")).text();
  const e = parseExposition(await (await fetch(base + "/metrics")).text());
  const count = (labels: Record<string, string>) => e.value("http_request_duration_seconds_count", labels);
  t.is(count({ method: "GET", route: "/things/:id", status_code: "200" }), 3);
  t.is(count({ method: "GET", route: "unmatched", status_code: "404" }), 2);
  t.is(count({ method: "GET", route: "/graphql", status_code: "401" }), 1);
  t.is(count({ method: "GET", route: "/metrics", status_code: "200" }), 1);
  const routes = new Set(e.find("http_request_duration_seconds_count").map((s) => s.labels.route));
  t.deepEqual([...routes].sort(), ["/graphql", "/metrics", "/things/:id", "unmatched"]);
  t.is(metricsOf(app, ctx), metricsOf(app, ctx), "one registry per app");
});

test("each app has its own registry", (t) => {
  const pool = fakePool(async () => fakeRow());
  const ctx = fakeCtx(pool);
  const a = express();
  const b = express();
  t.not(metricsOf(a, ctx).registry, metricsOf(b, ctx).registry);
});
