// keytrack on a real Citus cluster: a shortened `npm run drill:citus`
// (scripts/citus/drill.ts) on a coordinator and two workers, each its own
// initdb in a temporary folder on loopback ports (scripts/citus/cluster.ts):
// migrated as on one node, distributed by `db:distribute`, the gateway on the
// coordinator with mixed traffic; one row per served request, exact reports,
// row-level security through GraphQL, pending rows resolved after the import.
// The throughput part (and its shard moves) is left to the drill. Skipped,
// with a note, where Citus is not installed.
import test from "ava";

import { citusUnavailable } from "../../scripts/citus/cluster.js";
import { runCitusDrill } from "../../scripts/citus/drill.js";

const why = citusUnavailable();
if (why) console.log(`# citus: skipped, ${why}`);
const serial = why ? test.serial.skip : test.serial;

serial("keytrack on a Citus coordinator and two workers keeps the promises of one node", async (t) => {
  const lines: string[] = [];
  const result = await runCitusDrill({
    rate: 10,
    seconds: 3,
    lateRows: 200,
    lateKeys: 4,
    ingestSeconds: 0,
    ingestClients: 1,
    ingestBatch: 100,
    // Bounds on waits that end as soon as the rows are there; never what the test measures.
    waitSeconds: 120,
    log: (line) => lines.push(line),
  });
  t.log(lines.filter((l) => l.startsWith("ok") || l.startsWith("FAIL")).join("\n"));
  t.deepEqual(result.failures, [], lines.join("\n"));
});
