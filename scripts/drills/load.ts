// `npm run drill:load [-- --quick] [--json PATH] [--rate N] [--seconds N] [--connections N]`
//
// Steady load on the gateway, on loopback only: a PostgreSQL cluster of its
// own (temporary folder, random port, Unix socket), the keytrack service as a
// child process (WORKER=true), and autocannon sending POST
// /v1/chat/completions (model echo) at a fixed rate, with a few valid keys in
// turn, after a warm-up (--warmup-seconds, with a key of its own, so the
// measured run starts on a warm service; its rows are checked too). Then drain (spool empty, every answered request id in the ledger) and
// assert: no errors (non-2xx, socket errors, timeouts), every 2xx recorded
// exactly once (by request id from x-request-id, and by count of the rows of
// the drill's keys), and a flat RSS after warm-up: the mean of
// process_resident_memory_bytes (from /metrics, sampled every second) over the
// last third of the run is within 25% of its mean over the middle third (the
// first third is warm-up). Prints p50/p99 latency and requests/s.
//
// Exit code 0 when every assertion holds, 1 otherwise; everything it started
// is stopped and removed on every exit.
import { randomBytes } from "node:crypto";
import path from "node:path";

import autocannon from "autocannon";

import {
  checkLedger, Cluster, completenessGaps, conclude, createKeys, createUsers, drain, formatCounts, mean, ownerPool, parseDrillArgs,
  printSection, readLedger, runDrill, say, secondsSince, Service, sleep, Verdict, type DrillKey, type Expected,
} from "./harness.js";

const opts = parseDrillArgs("load", {
  rate: { full: 300, quick: 100, min: 1, max: 100_000, help: "requests per second", integer: true },
  seconds: { full: 30, quick: 5, min: 3, max: 3600, help: "how long, seconds (rate x seconds requests)", integer: true },
  connections: { full: 20, quick: 10, min: 1, max: 1000, help: "autocannon connections", integer: true },
  keys: { full: 4, quick: 4, min: 1, max: 100, help: "valid keys, used in turn", integer: true },
  "warmup-seconds": { full: 3, quick: 1, min: 0, max: 600, help: "warm-up at the same rate before the measured run (0: none)" },
  "drain-seconds": { full: 120, quick: 60, min: 5, max: 3600, help: "longest wait for the drain" },
});
const o = opts.values;
const RATE = o.rate, SECONDS = o.seconds, KEYS = o.keys;
const AMOUNT = RATE * SECONDS;
const CONNECTIONS = Math.min(o.connections, RATE, AMOUNT);
const DRAIN_MS = o["drain-seconds"] * 1000;
const WARMUP_AMOUNT = Math.round(RATE * o["warmup-seconds"]);
/** RSS is flat when mean(last third) / mean(middle third) is within 1 ± this. */
const RSS_TOLERANCE = 0.25;

runDrill("load", (SECONDS + o["warmup-seconds"]) * 3000 + DRAIN_MS + 6 * 60_000, async (drill) => {
  const verdict = new Verdict();
  say(`load drill in ${drill.dir}: ${RATE} requests/s for ${SECONDS} s (${AMOUNT} requests), ${CONNECTIONS} connections, ${KEYS} keys${opts.quick ? " (--quick)" : ""}`);

  const cluster = await Cluster.start(drill, opts.verbose);
  say(`PostgreSQL running (socket ${cluster.socketDir}, port ${cluster.port})`);
  const service = await Service.start({
    drill, cluster, dataDir: path.join(drill.dir, "service"), adminApiKey: randomBytes(20).toString("hex"), logFile: opts.serviceLog,
  });
  say(`service running (pid ${service.pid}, ${service.url})`);
  const pool = ownerPool(drill, cluster);
  const users = await createUsers(pool, Math.ceil(KEYS / 2), "load");
  const keys = (await createKeys(pool, users, 2, "key")).slice(0, KEYS);
  const [warmupKey] = await createKeys(pool, [users[0]!], 1, "warmup");

  // Request ids of the 2xx answers, with the key each was sent with (warm-up and measured run).
  const served = new Map<string, Expected>();
  let withoutId = 0;
  const requestsFor = (ks: DrillKey[]): autocannon.Request[] => ks.map((key) => ({
    method: "POST",
    path: "/v1/chat/completions",
    headers: { "content-type": "application/json", authorization: `Bearer ${key.secret}` },
    body: JSON.stringify({ model: "echo", messages: [{ role: "user", content: `load drill, ${key.name}` }] }),
    onResponse: (status, _body, _context, headers) => {
      if (status < 200 || status >= 300) return;
      const entry = Object.entries(headers).find(([name]) => name.toLowerCase() === "x-request-id");
      const id = entry && (Array.isArray(entry[1]) ? entry[1][0] : entry[1]);
      if (id) served.set(id, { apiKeyId: key.id });
      else withoutId++;
    },
  }));

  let warmup: autocannon.Result | null = null;
  if (WARMUP_AMOUNT > 0) {
    say(`warm-up: ${WARMUP_AMOUNT} requests`);
    const instance = autocannon({ url: service.url, connections: Math.min(CONNECTIONS, WARMUP_AMOUNT), overallRate: RATE, amount: WARMUP_AMOUNT, timeout: 10, requests: requestsFor([warmupKey!]) });
    const guard = setTimeout(() => instance.stop(), o["warmup-seconds"] * 2000 + 30_000);
    warmup = await instance;
    clearTimeout(guard);
  }
  const warmupServed = served.size;

  // RSS of the service, every second while the load runs.
  const rss: Array<{ t: number; bytes: number }> = [];
  let sampling = true;
  const loadStartedAt = Date.now();
  const sampler = (async () => {
    while (sampling) {
      const t = Date.now();
      const bytes = (await service.metrics().catch(() => null))?.value("process_resident_memory_bytes");
      if (sampling && bytes != null) rss.push({ t: secondsSince(loadStartedAt, t), bytes });
      await sleep(Math.max(0, 1000 - (Date.now() - t)));
    }
  })();

  say("load started");
  const instance = autocannon({ url: service.url, connections: CONNECTIONS, overallRate: RATE, amount: AMOUNT, timeout: 10, requests: requestsFor(keys) });
  // amount bounds the run; this bounds it in time too, should answers stop coming.
  const guard = setTimeout(() => instance.stop(), SECONDS * 2000 + 30_000);
  const result = await instance;
  clearTimeout(guard);
  sampling = false;
  await sampler;
  const loadSeconds = secondsSince(loadStartedAt);
  say(`load done in ${loadSeconds} s: ${result["2xx"]} 2xx, ${result.non2xx} non-2xx, ${result.errors} errors; draining`);

  const ids = [...served.keys()];
  const drained = await drain(service, pool, ids, DRAIN_MS);
  const ledger = checkLedger(await readLedger(pool), served);
  const { rows: [byKey] } = await pool.query<{ n: number }>(
    "select count(*)::int as n from app_public.chat_completion_requests where api_key_id = any($1::uuid[])",
    [keys.map((k) => k.id)],
  );
  const keyRows = byKey!.n;

  const third = Math.floor(rss.length / 3);
  const middle = rss.slice(third, 2 * third).map((s) => s.bytes);
  const last = rss.slice(2 * third).map((s) => s.bytes);
  const rssRatio = mean(last) / mean(middle);
  const mb = (b: number) => `${(b / 1024 / 1024).toFixed(1)} MB`;

  verdict.check(result.non2xx === 0, `${result.non2xx} answers were not 2xx (${formatCounts(Object.fromEntries(Object.entries(result.statusCodeStats).map(([k, v]) => [k, v.count])))})`);
  verdict.check(result.errors === 0, `${result.errors} requests failed without an answer (${result.timeouts} of them timed out)`);
  verdict.check(result["2xx"] === AMOUNT, `${result["2xx"]} 2xx answers, expected ${AMOUNT} (rate x seconds)`);
  verdict.check(served.size - warmupServed === result["2xx"] && withoutId === 0, `${served.size - warmupServed} distinct request ids collected for ${result["2xx"]} 2xx answers (${withoutId} without x-request-id)`);
  verdict.check(warmup === null || (warmup.non2xx === 0 && warmup.errors === 0 && warmupServed === warmup["2xx"]), `warm-up: ${warmup?.non2xx} non-2xx, ${warmup?.errors} errors, ${warmupServed} ids for ${warmup?.["2xx"]} 2xx`);
  verdict.check(drained.drained, `not drained within ${DRAIN_MS / 1000} s (spool depth ${drained.spoolDepth}, ${drained.present} of ${drained.expected} request ids in the ledger)`);
  verdict.check(ledger.lost === 0, `${ledger.lost} answered requests have no row (e.g. ${ledger.lostIds.slice(0, 5).join(", ")})`);
  verdict.check(ledger.duplicates === 0, `${ledger.duplicates} request ids have more than one row`);
  verdict.check(keyRows === result["2xx"], `${keyRows} rows carry the drill's keys, for ${result["2xx"]} 2xx answers`);
  verdict.check(ledger.misattributed === 0, `${ledger.misattributed} rows not attributed to the key sent: ${ledger.misattributedExamples.join("; ")}`);
  const gaps = await completenessGaps(pool);
  verdict.check(gaps.missing === 0, `completeness_gaps() reports ${gaps.missing} accepted requests without a row: ${gaps.ranges.join("; ")}`);
  verdict.check(rss.length >= 3, `only ${rss.length} RSS samples (need 3 or more)`);
  verdict.check(Math.abs(rssRatio - 1) <= RSS_TOLERANCE, `RSS not flat: mean of the last third ${mb(mean(last))} is ${(rssRatio * 100).toFixed(0)}% of the middle third's ${mb(mean(middle))} (allowed ${100 - RSS_TOLERANCE * 100}..${100 + RSS_TOLERANCE * 100}%)`);

  const achieved = result["2xx"] / (result.duration || loadSeconds);
  printSection(`load drill: ${RATE} requests/s for ${SECONDS} s, ${CONNECTIONS} connections, ${keys.length} keys in turn`, [
    ["requests", `${AMOUNT} (rate x seconds); answered ${result["2xx"] + result.non2xx}`],
    ["answered by status", formatCounts(Object.fromEntries(Object.entries(result.statusCodeStats).map(([k, v]) => [k, v.count])))],
    ["errors (non-2xx, socket, timeouts)", `${result.non2xx}, ${result.errors - result.timeouts}, ${result.timeouts}`],
    ["latency p50 / p99", `${result.latency.p50} ms / ${result.latency.p99} ms (max ${result.latency.max} ms)`],
    ["requests/s", `${achieved.toFixed(1)} (2xx over ${result.duration} s; target ${RATE}); autocannon's per-second mean ${result.requests.average}`],
    ["target rate reached", achieved >= 0.95 * RATE ? "yes" : `no (${((achieved / RATE) * 100).toFixed(0)}%): the service, or this machine, did not keep up; latency shows which way`],
    ["warm-up (not measured)", warmup ? `${WARMUP_AMOUNT} requests, ${warmup["2xx"]} 2xx, p99 ${warmup.latency.p99} ms` : "none"],
    ["rows", `${ledger.rows} (warm-up included)`],
    ["rows with the drill's keys", keyRows],
    ["lost", ledger.lost],
    ["duplicate request_ids", ledger.duplicates],
    ["completeness gaps (SQL)", gaps.missing],
    ["attribution outcomes", formatCounts(ledger.attribution)],
    ["misattributed rows", ledger.misattributed],
    ["seconds to drain", drained.seconds],
    ["RSS middle third / last third", `${mb(mean(middle))} / ${mb(mean(last))} (${rss.length} samples)`],
    ["RSS rule", `mean(last third) within ±${RSS_TOLERANCE * 100}% of mean(middle third): ${(rssRatio * 100).toFixed(1)}%`],
    ["service warnings, errors logged", `${service.levels.warn}, ${service.levels.error}`],
  ]);

  return conclude(drill, verdict, {
    options: { quick: opts.quick, rate: RATE, seconds: SECONDS, amount: AMOUNT, connections: CONNECTIONS, keys: keys.length, rssTolerance: RSS_TOLERANCE },
    requests: AMOUNT, answeredByStatus: Object.fromEntries(Object.entries(result.statusCodeStats).map(([k, v]) => [k, v.count])),
    "2xx": result["2xx"], non2xx: result.non2xx, errors: result.errors, timeouts: result.timeouts,
    latencyMs: { p50: result.latency.p50, p90: result.latency.p90, p99: result.latency.p99, max: result.latency.max, mean: result.latency.mean },
    requestsPerSecond: { autocannonAverage: result.requests.average, achieved: Number(achieved.toFixed(1)), durationSeconds: result.duration },
    warmup: warmup && { requests: WARMUP_AMOUNT, "2xx": warmup["2xx"], non2xx: warmup.non2xx, errors: warmup.errors, latencyMs: { p50: warmup.latency.p50, p99: warmup.latency.p99 } },
    rows: ledger.rows, rowsWithDrillKeys: keyRows, lost: ledger.lost, lostIds: ledger.lostIds, duplicates: ledger.duplicates,
    attribution: ledger.attribution, misattributed: ledger.misattributed, drain: drained,
    rss: { samples: rss, middleMeanBytes: mean(middle), lastMeanBytes: mean(last), ratio: rssRatio, rule: `mean(last third) / mean(middle third) within 1 ± ${RSS_TOLERANCE}` },
  }, { json: opts.json, services: [service], cluster });
});
