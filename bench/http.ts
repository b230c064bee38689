// (c) HTTP: POST /v1/chat/completions through keytrack in production mode
// (the compiled service as `npm start` runs it, WORKER=true, a real key made
// by app_public.create_api_key) forwarding to a trivial loopback upstream
// (bench/upstream.mjs, its own process), against the same requests sent to
// the upstream directly:
//   - throughput: autocannon, --http-connections (16) for --http-seconds, after
//     a short warm-up; recorded requests/s = 2xx/s through keytrack, and the
//     ledger is checked: rows recorded with the key = 2xx served (target >= 3,000/s);
//   - latency: an open-loop sender at a fixed --http-rate (500/s) for
//     --http-rate-seconds, each request timed (performance.now()); keytrack's
//     p50/p99 minus the upstream's (targets: <= 1 ms and <= 5 ms added).
// Every non-2xx or socket error is counted and reported. Beside them, the
// figures a busy machine disturbs least: keytrack's own CPU time (user +
// system, from /proc) per request of the throughput run, and the load average.
import { randomBytes } from "node:crypto";
import http from "node:http";
import { readFileSync } from "node:fs";
import { mkdir } from "node:fs/promises";
import os from "node:os";
import path from "node:path";

import autocannon from "autocannon";
import pg from "pg";

import { createKeys } from "./generate.js";
import { cleanEnv, ensureBuilt, freePort, percentile, Proc, row, say, sleep, startCommand, startUpstream, untilHealthy, type Benchmark, type ResultRow } from "./lib.js";

const BODY = JSON.stringify({ model: "bench-model", messages: [{ role: "user", content: "hello from the benchmark" }] });

/** CPU time (user + system, ms) a process has used so far, from /proc/<pid>/stat (Linux); null elsewhere. */
function cpuMs(pid: number | undefined): number | null {
  if (!pid) return null;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // After "(command)": state is field 3, utime and stime fields 14 and 15, in clock ticks (USER_HZ, 100).
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return (Number(fields[11]) + Number(fields[12])) * 10;
  } catch {
    return null;
  }
}

/**
 * Closed loop: `connections` connections for `seconds`, or for exactly `amount`
 * requests (then every request sent is answered and counted: none is cut off
 * by the end of the run, so 2xx can be compared with rows).
 */
async function throughput(url: string, secret: string | null, connections: number, run: { seconds: number } | { amount: number }) {
  const headers: Record<string, string> = { "content-type": "application/json" };
  if (secret) headers.authorization = `Bearer ${secret}`;
  const instance = autocannon({
    url: `${url}/v1/chat/completions`, connections, timeout: 10, requests: [{ method: "POST", headers, body: BODY }],
    ...("amount" in run ? { amount: run.amount } : { duration: run.seconds }),
  });
  const guard = setTimeout(() => instance.stop(), 300_000);
  const result = await instance;
  clearTimeout(guard);
  return { ok: result["2xx"], non2xx: result.non2xx, errors: result.errors, perSecond: result["2xx"] / result.duration, latency: result.latency };
}

/** Open loop: `rate` requests a second for `seconds`, whatever the answers do; the latency of each. */
async function fixedRate(url: string, secret: string | null, rate: number, seconds: number) {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 256 });
  const target = new URL(`${url}/v1/chat/completions`);
  const headers: Record<string, string | number> = { "content-type": "application/json", "content-length": Buffer.byteLength(BODY) };
  if (secret) headers.authorization = `Bearer ${secret}`;
  const latencies: number[] = [];
  let ok = 0, failed = 0, sent = 0;
  const total = Math.round(rate * seconds);
  const inflight = new Set<Promise<void>>();
  const one = () => {
    const t = performance.now();
    const p = new Promise<void>((resolve) => {
      const req = http.request({ host: target.hostname, port: target.port, path: target.pathname, method: "POST", headers, agent }, (res) => {
        res.resume();
        res.on("end", () => {
          latencies.push(performance.now() - t);
          if (res.statusCode! >= 200 && res.statusCode! < 300) ok++;
          else failed++;
          resolve();
        });
      });
      req.setTimeout(10_000, () => req.destroy(new Error("timeout")));
      req.on("error", () => { failed++; resolve(); });
      req.end(BODY);
    });
    inflight.add(p);
    void p.then(() => inflight.delete(p));
  };
  const started = performance.now();
  while (sent < total) {
    const due = Math.min(total, Math.floor(((performance.now() - started) / 1000) * rate) + 1);
    while (sent < due) {
      one();
      sent++;
    }
    await sleep(1);
  }
  await Promise.all(inflight);
  agent.destroy();
  latencies.sort((a, b) => a - b);
  return { ok, failed, achievedRate: sent / ((performance.now() - started) / 1000), p50: percentile(latencies, 50), p99: percentile(latencies, 99) };
}

export const http_: Benchmark = async (ctx) => {
  const o = { seconds: ctx.opts["http-seconds"]!, connections: ctx.opts["http-connections"]!, rate: ctx.opts["http-rate"]!, rateSeconds: ctx.opts["http-rate-seconds"]! };
  const db = await ctx.dbs.create("http");
  const pool = new pg.Pool({ connectionString: db.ownerUrl, max: 2 });
  const upstream = await startUpstream();
  let service: Proc | null = null;
  try {
    const [key] = await createKeys(pool, 1, 1, "http");
    const port = await freePort();
    const dataDir = path.join(ctx.tmp, "http-data");
    await mkdir(dataDir, { recursive: true });
    const env = cleanEnv({
      DATABASE_URL: db.ownerUrl, ROOT_DATABASE_URL: ctx.dbs.rootUrl, APP_ENV: "production", ADMIN_API_KEY: randomBytes(24).toString("hex"),
      UPSTREAM_BASE_URL: `${upstream.url}/v1`, HOST: "127.0.0.1", PORT: String(port), KEYTRACK_DATA_DIR: dataDir, LOG_LEVEL: "warn", WORKER: "true",
    });
    await ensureBuilt();
    const t = performance.now();
    service = Proc.node("keytrack", startCommand(), env);
    const url = `http://127.0.0.1:${port}`;
    await untilHealthy(service, url, 120_000, t);

    // Warm-up (JIT, pools, the key cache), not measured; its rows are counted in the ledger check.
    // The measured runs send as many requests as the warm-up's rate fits in --http-seconds.
    const warm = { seconds: Math.max(1, Math.min(3, o.seconds)) };
    const directWarm = await throughput(upstream.url, null, o.connections, warm);
    const warmupProbe = await throughput(url, key!.secret, o.connections, warm);
    // The probe's run ends with requests in flight (answered and recorded, not counted): the ledger check
    // starts from the rows once the probe's are all in (the count stable for a second).
    const countRows = async () => (await pool.query<{ n: number }>("select count(*)::int as n from app_public.chat_completion_requests where api_key_id = $1", [key!.id])).rows[0]!.n;
    let base = -1;
    for (let i = 0; i < 60; i++) {
      const n = await countRows();
      if (n === base && n >= warmupProbe.ok) break;
      base = n;
      await sleep(1000);
    }
    const warmup = await throughput(url, key!.secret, o.connections, { amount: o.connections * 10 });
    const amountFor = (perSecond: number) => Math.max(o.connections * 20, Math.min(1_000_000, Math.round(perSecond * o.seconds)));
    const direct = await throughput(upstream.url, null, o.connections, { amount: amountFor(directWarm.perSecond) });
    const loadAverage = os.loadavg()[0]!;
    const cpuBefore = cpuMs(service.child.pid);
    const through = await throughput(url, key!.secret, o.connections, { amount: amountFor(warmupProbe.perSecond) });
    const cpuAfter = cpuMs(service.child.pid);
    const answered = through.ok + through.non2xx;
    const cpuPerRequestUs = cpuBefore !== null && cpuAfter !== null && answered > 0 ? ((cpuAfter - cpuBefore) * 1000) / answered : null;
    if (warmup.errors + through.errors > 0) say(`http: socket errors through keytrack; the service ${service.alive ? "is running" : `exited (${JSON.stringify(service.exit)})`}; its last lines:\n${service.tail(15)}`);
    const cpuNote = `${cpuPerRequestUs === null ? "" : `keytrack CPU ${cpuPerRequestUs.toFixed(0)} us a request, `}load average ${loadAverage.toFixed(1)}`;
    say(`http: ${through.perSecond.toFixed(0)} recorded requests/s through keytrack (${through.non2xx} non-2xx, ${through.errors} errors), ${direct.perSecond.toFixed(0)}/s direct; ${cpuNote}`);

    const directRate = await fixedRate(upstream.url, null, o.rate, o.rateSeconds);
    const throughRate = await fixedRate(url, key!.secret, o.rate, o.rateSeconds);
    say(`http: at ${o.rate}/s keytrack p50 ${throughRate.p50.toFixed(2)} ms p99 ${throughRate.p99.toFixed(2)} ms; direct p50 ${directRate.p50.toFixed(2)} ms p99 ${directRate.p99.toFixed(2)} ms`);

    // Every 2xx is a row (recording is off the response's path: wait for it).
    const served = base + warmup.ok + through.ok + throughRate.ok;
    let recorded = 0;
    const deadline = Date.now() + 120_000;
    for (;;) {
      recorded = await countRows();
      if (recorded >= served || Date.now() > deadline) break;
      await sleep(250);
    }
    const { rows: [dup] } = await pool.query<{ n: number }>("select (count(*) - count(distinct request_id))::int as n from app_public.chat_completion_requests");
    const errors = through.non2xx + through.errors + throughRate.failed + warmup.non2xx + warmup.errors;
    // A request the client gave up on (timeout) may still be served and recorded: rows may exceed 2xx by the errors, never fall short.
    const lost = Math.max(0, served - recorded);
    const unexplained = Math.max(0, recorded - served - errors);
    const ledgerNote = `${served} 2xx served (${base} rows of the warm-up probe), ${recorded} rows recorded, ${lost} lost, ${dup!.n} duplicates, ${errors} client errors (non-2xx, timeouts)`;
    say(`http: ${ledgerNote}`);

    const rows: ResultRow[] = [
      row("c. HTTP", `recorded requests/s, ${o.connections} connections (rows = 2xx: ${recorded === served && dup!.n === 0 ? "yes" : lost === 0 && unexplained === 0 && dup!.n === 0 ? `none lost, ${errors} errors` : "NO"})`, through.perSecond, "req/s",
        { value: direct.perSecond, label: "upstream direct" }, { on: "figure", op: ">=", limit: 3000, text: ">= 3,000 req/s, 0 errors, 0 lost" }, `${ledgerNote}; ${cpuNote}`),
    ];
    rows[0]!.met = rows[0]!.met! && recorded === served && lost === 0 && dup!.n === 0 && errors === 0;
    for (const q of ["p50", "p99"] as const) {
      const limit = q === "p50" ? 1 : 5;
      const r = row("c. HTTP", `${q} latency at ${o.rate} req/s (added: ${(throughRate[q] - directRate[q]).toFixed(2)} ms)`, throughRate[q], "ms",
        { value: directRate[q], label: "upstream direct" }, null);
      r.target = `<= +${limit} ms added`;
      r.met = throughRate[q] - directRate[q] <= limit;
      rows.push(r);
    }
    return {
      rows,
      details: { options: o, warmup, direct, through, directRate, throughRate, served, recorded, lost, duplicates: dup!.n, errors, cpuPerRequestUs, loadAverage },
    };
  } finally {
    await service?.stop();
    await upstream.proc.stop();
    await pool.end();
    await ctx.dbs.drop(db.name);
  }
};

export { http_ as http };
