// `npm run drill:citus [-- --quick] [--json PATH] [--seconds N] [--rate N] [--late-rows N] [--ingest-seconds N] ...`
//
// keytrack on a real Citus cluster, on loopback only: a coordinator and two
// workers (Citus 13, each its own initdb in a temporary folder, never the
// machine's shared server; scripts/citus/cluster.ts), keytrack migrated on the
// coordinator as on one node, then `npm run db:distribute`
// (scripts/citus/distribute.ts), the gateway with its worker on the
// coordinator, and mixed traffic: HTTP requests with known keys and without
// any, SQL writers presenting keys that do not exist yet (each batch sent
// twice), then those keys imported.
//
// Asserts the promises of one node (scripts/citus/drill.ts): one row per
// served request, none lost, no duplicate request_id, rows attributed as sent,
// pending rows resolved after the import, no completeness gap, the spec's view
// equal to the spec's SELECT, the quality and trend endpoints equal to raw
// counts, row-level security for a user's key through GraphQL; db:distribute
// idempotent; no row lost when a worker is drained and removed. Prints SQL
// ingestion through the coordinator with 2 workers and with 1 (rows/s), and
// the same ingestion on the coordinator alone before Citus: on
// one small machine all three nodes share its cores, so read them as what the
// coordinator's path costs, not as what more machines would add.
//
// Needs Citus installed (sudo bash ../shared/vendor/citus/build.sh). Exit code
// 0 when every assertion holds, 1 otherwise (2: a bad option, or no Citus).
import { citusUnavailable } from "../citus/cluster.js";
import { runCitusDrill } from "../citus/drill.js";
import { conclude, parseDrillArgs, printSection, runDrill, say, Verdict } from "./harness.js";

const opts = parseDrillArgs("citus", {
  seconds: { full: 20, quick: 5, min: 1, max: 3600, help: "mixed HTTP and SQL traffic, seconds" },
  rate: { full: 50, quick: 20, min: 1, max: 2000, help: "HTTP requests per second", integer: true },
  "late-rows": { full: 5_000, quick: 500, min: 1, max: 1_000_000, help: "SQL rows presenting keys that do not exist yet", integer: true },
  "late-keys": { full: 20, quick: 5, min: 1, max: 10_000, help: "keys those rows present, imported after the traffic", integer: true },
  "ingest-seconds": { full: 15, quick: 5, min: 0, max: 3600, help: "SQL ingestion measured with 2 workers, then with 1, seconds each (0: skip)" },
  "ingest-clients": { full: 4, quick: 4, min: 1, max: 64, help: "concurrent SQL writers while measuring", integer: true },
  "ingest-batch": { full: 500, quick: 500, min: 1, max: 5000, help: "rows per INSERT while measuring", integer: true },
  "wait-seconds": { full: 120, quick: 90, min: 5, max: 3600, help: "longest wait for pending rows to resolve and served rows to arrive" },
});
const o = opts.values;

const why = citusUnavailable();
if (why) {
  process.stderr.write(`drill citus: ${why}\n`);
  process.exit(2);
}

runDrill("citus", (o.seconds + 2 * o["ingest-seconds"] + 2 * o["wait-seconds"]) * 1000 + 6 * 60_000, async (drill) => {
  say(`citus drill: coordinator + 2 workers on loopback; ${o.rate} HTTP requests/s for ${o.seconds} s, ${o["late-rows"]} SQL rows over ${o["late-keys"]} late keys${opts.quick ? " (--quick)" : ""}`);
  const result = await runCitusDrill({
    rate: o.rate,
    seconds: o.seconds,
    lateRows: o["late-rows"],
    lateKeys: o["late-keys"],
    ingestSeconds: o["ingest-seconds"],
    ingestClients: o["ingest-clients"],
    ingestBatch: o["ingest-batch"],
    waitSeconds: o["wait-seconds"],
    log: say,
  });
  const f = result.figures;
  printSection("cluster", [
    ["ledger shards", f.shards ?? "n/a"],
    ["start, migrate, distribute", `${f.setupSeconds ?? "n/a"} s`],
  ]);
  printSection("traffic", [
    ["HTTP requests", f.httpRequests ?? "n/a"],
    ["HTTP served (200)", f.httpServed ?? "n/a"],
    ["SQL rows (late keys)", f.sqlRows ?? "n/a"],
    ["ledger rows checked", f.ledgerRows ?? "n/a"],
    ["import to all resolved", `${f.importToResolvedSeconds ?? "n/a"} s`],
  ]);
  if (o["ingest-seconds"] > 0) {
    printSection(`SQL ingestion through the coordinator (${o["ingest-clients"]} writers, ${o["ingest-batch"]}-row INSERTs, ${o["ingest-seconds"]} s each)`, [
      ["1 node, no Citus, rows/s", f.rowsPerSecond1Node ?? "n/a"],
      ["2 workers, rows/s", f.rowsPerSecond2Workers ?? "n/a"],
      ["1 worker, rows/s", f.rowsPerSecond1Worker ?? "n/a"],
      ["drain worker2 (block_writes)", `${f.drainSeconds ?? "n/a"} s`],
    ]);
    printSection(`raw reads afterwards (no rollups on Citus; ${f.readRows ?? "n/a"} rows, best of 3)`, [
      ["quality, 24 hours", `${f.qualityMs ?? "n/a"} ms`],
      ["trend, 30 days", `${f.trendMs ?? "n/a"} ms`],
      ["attribution_metrics() (behind /metrics)", `${f.metricsMs ?? "n/a"} ms`],
    ]);
  }
  const verdict = new Verdict();
  for (const failure of result.failures) verdict.check(false, failure);
  return conclude(drill, verdict, { figures: f }, { json: opts.json });
});
