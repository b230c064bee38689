// The machine's own speed, measured at the start of every run, so that absolute
// figures (requests/s, rows/s, milliseconds) from different machines, or from
// one machine on different days, can be told apart from changes in keytrack.
// Not a benchmark of keytrack: none of it runs keytrack's code. Each part is
// short (about a second on a quiet 2-core machine) and printed as one line:
//   - JS: a fixed integer loop in this process (the JIT and the core's speed);
//   - SHA-256: digests of short strings (native code, as keytrack hashes tokens);
//   - loopback HTTP: sequential POSTs to bench/upstream.mjs, another process
//     (the system calls and cross-process wake-ups every proxied request pays);
//   - PostgreSQL: sequential `select 1` round trips, and sequential commits that
//     flush the WAL (`select txid_current()` takes a transaction id, so its commit
//     waits for the flush as a durable insert's does).
import { createHash } from "node:crypto";
import http from "node:http";

import pg from "pg";

import { median, percentile, say, startUpstream } from "./lib.js";

export interface Calibration {
  /** Million iterations a second of a fixed integer loop. */
  jsLoopMops: number;
  /** Thousand SHA-256 digests a second (a 40-byte input). */
  sha256KPerSecond: number;
  /** Median and p99 of sequential loopback HTTP round trips, ms. */
  loopbackHttpP50Ms: number;
  loopbackHttpP99Ms: number;
  /** Median of sequential `select 1`, ms. */
  postgresRoundTripP50Ms: number;
  /** Median of sequential commits that flush the WAL, ms. */
  postgresCommitP50Ms: number;
}

function jsLoopMops(iterations: number): number {
  const t = performance.now();
  let x = 0;
  for (let i = 0; i < iterations; i++) x = (x + ((i * 2654435761) >>> 7)) | 0;
  const ms = performance.now() - t;
  if (x === 42) say("calibration: (an unlikely sum, printed so that the loop is not optimised away)");
  return iterations / ms / 1000;
}

function sha256KPerSecond(count: number): number {
  const t = performance.now();
  for (let i = 0; i < count; i++) createHash("sha256").update(`kt_live_calibration_${i.toString().padStart(20, "0")}`).digest();
  return count / (performance.now() - t);
}

async function loopbackHttp(url: string, count: number): Promise<number[]> {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const body = JSON.stringify({ model: "bench-model", messages: [{ role: "user", content: "calibration" }] });
  const target = new URL(`${url}/v1/chat/completions`);
  const times: number[] = [];
  try {
    for (let i = 0; i < count; i++) {
      const t = performance.now();
      await new Promise<void>((resolve, reject) => {
        const req = http.request(
          { host: target.hostname, port: target.port, path: target.pathname, method: "POST", agent, headers: { "content-type": "application/json", "content-length": Buffer.byteLength(body) } },
          (res) => {
            res.resume();
            res.on("end", resolve);
          },
        );
        req.on("error", reject);
        req.end(body);
      });
      times.push(performance.now() - t);
    }
  } finally {
    agent.destroy();
  }
  return times.sort((a, b) => a - b);
}

async function postgresTimes(rootUrl: string, count: number): Promise<{ roundTrip: number[]; commit: number[] }> {
  const client = new pg.Client({ connectionString: rootUrl });
  await client.connect();
  try {
    await client.query("set synchronous_commit = on");
    const time = async (sql: string) => {
      const out: number[] = [];
      for (let i = 0; i < count; i++) {
        const t = performance.now();
        await client.query(sql);
        out.push(performance.now() - t);
      }
      return out;
    };
    return { roundTrip: await time("select 1"), commit: await time("select txid_current()") };
  } finally {
    await client.end();
  }
}

export async function calibrate(rootUrl: string, quick: boolean): Promise<Calibration> {
  const n = quick ? 0.1 : 1;
  jsLoopMops(1e6); // warm-up (the JIT)
  const js = jsLoopMops(2e8 * n);
  sha256KPerSecond(1000);
  const sha = sha256KPerSecond(Math.round(200_000 * n));
  const upstream = await startUpstream();
  let http_: number[];
  try {
    await loopbackHttp(upstream.url, 20);
    http_ = await loopbackHttp(upstream.url, Math.round(1000 * n));
  } finally {
    await upstream.proc.stop();
  }
  const pgTimes = await postgresTimes(rootUrl, Math.round(500 * n));
  const c: Calibration = {
    jsLoopMops: Number(js.toFixed(0)),
    sha256KPerSecond: Number(sha.toFixed(0)),
    loopbackHttpP50Ms: Number(median(http_).toFixed(3)),
    loopbackHttpP99Ms: Number(percentile(http_, 99).toFixed(3)),
    postgresRoundTripP50Ms: Number(median(pgTimes.roundTrip).toFixed(3)),
    postgresCommitP50Ms: Number(median(pgTimes.commit).toFixed(3)),
  };
  say(
    `machine: JS loop ${c.jsLoopMops} M/s, SHA-256 ${c.sha256KPerSecond}k/s, loopback HTTP round trip p50 ${c.loopbackHttpP50Ms} ms ` +
      `(p99 ${c.loopbackHttpP99Ms}), PostgreSQL round trip p50 ${c.postgresRoundTripP50Ms} ms, durable commit p50 ${c.postgresCommitP50Ms} ms`,
  );
  return c;
}
