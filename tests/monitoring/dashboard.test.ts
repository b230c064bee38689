// The Grafana dashboard and the alert rules read only metrics keytrack really
// exposes: every PromQL expression is compared with a scrape of /metrics from
// a running service.
import { readFile } from "node:fs/promises";
import path from "node:path";

import test from "ava";

import { projectRoot } from "../../server/db/projectRoot.js";
import type { RunningServer } from "../../server/main.js";
import { createTestDb, type TestDb } from "../helpers/db.js";
import { startTestServer } from "../helpers/server.js";
import { metricNamesIn, parseExposition, type Exposition } from "../helpers/exposition.js";

/** Added by Prometheus itself, not by the target. */
const PROMETHEUS_SERIES = new Set(["up"]);

let db: TestDb;
let server: RunningServer;
let exposed: Exposition;

test.before(async () => {
  db = await createTestDb();
  server = await startTestServer(db);
  // One request first, so the histogram has series (its _bucket/_count names).
  await (await fetch(`${server.url}/nope`)).arrayBuffer();
  exposed = parseExposition(await (await fetch(`${server.url}/metrics`)).text());
});
test.after.always(async () => {
  await server?.close();
  await db?.drop();
});

interface Panel {
  id: number;
  type: string;
  title: string;
  datasource?: { type: string; uid: string };
  targets?: Array<{ expr: string; datasource?: { uid: string } }>;
  panels?: Panel[];
}

async function dashboard() {
  const text = await readFile(path.join(projectRoot, "monitoring", "grafana-dashboard.json"), "utf8");
  return JSON.parse(text) as {
    title: string;
    uid: string;
    panels: Panel[];
    templating: { list: Array<{ name: string; type: string; query?: unknown; datasource?: { uid: string } }> };
  };
}

function unknownNames(expr: string): string[] {
  return metricNamesIn(expr).filter((n) => !exposed.names.has(n) && !PROMETHEUS_SERIES.has(n));
}

test("metricNamesIn finds metric names, not functions, labels or variables", (t) => {
  t.deepEqual(
    metricNamesIn('histogram_quantile(0.95, sum by (le, route) (rate(http_request_duration_seconds_bucket{job=~"$job"}[$__rate_interval])))'),
    ["http_request_duration_seconds_bucket"],
  );
  t.deepEqual(metricNamesIn("max by (job) (a_total) > 100 and max by (job) (delta(b[15m])) > 0").sort(), ["a_total", "b"]);
});

test("the dashboard is valid JSON with the datasource as the ${DS_PROMETHEUS} variable", async (t) => {
  const d = await dashboard();
  t.truthy(d.uid);
  const ds = d.templating.list.find((v) => v.name === "DS_PROMETHEUS");
  t.like(ds, { type: "datasource", query: "prometheus" });
  for (const panel of d.panels.filter((p) => p.type !== "row")) {
    t.is(panel.datasource?.uid, "${DS_PROMETHEUS}", panel.title);
    t.true((panel.targets ?? []).length > 0, `${panel.title} has queries`);
    for (const target of panel.targets ?? []) t.is(target.datasource?.uid, "${DS_PROMETHEUS}", panel.title);
  }
  t.is(new Set(d.panels.map((p) => p.id)).size, d.panels.length, "panel ids are unique");
});

test("the dashboard shows tracking rate, failures by reason, pending, spool and latency", async (t) => {
  const d = await dashboard();
  const exprs = d.panels.flatMap((p) => (p.targets ?? []).map((x) => ({ type: p.type, expr: x.expr })));
  const has = (re: RegExp, type?: string) => exprs.some((e) => re.test(e.expr) && (!type || e.type === type));
  t.true(has(/api_key_tracking_rate/, "stat"), "tracking rate stat");
  t.true(has(/api_key_tracking_rate/, "timeseries"), "tracking rate over time");
  t.true(has(/by \(reason\) \(rate\(api_key_tracking_failures_total/), "failures by reason");
  t.true(has(/keytrack_pending_attributions/) && has(/keytrack_failed_attributions/), "pending and failed");
  t.true(has(/keytrack_spool_depth/), "spool");
  t.true(has(/keytrack_record_buffered/), "rows held in memory");
  t.true(has(/by \(instance, reason\) \(increase\(keytrack_record_dropped_total/), "dropped rows by reason");
  t.true(has(/keytrack_auth_stale_total/), "stale key answers");
  for (const q of ["0.5", "0.95", "0.99"]) {
    t.true(has(new RegExp(`histogram_quantile\\(${q.replace(".", "\\.")}, .*http_request_duration_seconds_bucket`)), `p${q}`);
  }
});

test("every dashboard query reads only metrics that /metrics exposes", async (t) => {
  const d = await dashboard();
  let checked = 0;
  for (const panel of d.panels) {
    for (const target of panel.targets ?? []) {
      t.true(metricNamesIn(target.expr).length > 0, target.expr);
      t.deepEqual(unknownNames(target.expr), [], `${panel.title}: ${target.expr}`);
      checked++;
    }
  }
  for (const v of d.templating.list) {
    const q = typeof v.query === "string" ? v.query : (v.query as { query?: string } | undefined)?.query;
    const m = q && /label_values\(\s*([a-zA-Z_:][\w:]*)/.exec(q);
    if (m) t.true(exposed.names.has(m[1]!), `variable ${v.name}: ${m[1]}`);
  }
  t.true(checked >= 10);
});

test("every alert rule reads only metrics that /metrics exposes", async (t) => {
  const text = await readFile(path.join(projectRoot, "monitoring", "alerts.yml"), "utf8");
  // `expr: ...` on one line, or a folded block (`expr: >-` and the lines indented under it).
  const exprs: string[] = [];
  const lines = text.split("\n");
  lines.forEach((line, i) => {
    const m = /^(\s*)expr:\s*(.*)$/.exec(line);
    if (!m) return;
    if (!/^[>|]/.test(m[2]!)) return void exprs.push(m[2]!);
    const block: string[] = [];
    for (let j = i + 1; j < lines.length && (lines[j]!.trim() === "" || lines[j]!.search(/\S/) > m[1]!.length); j++) block.push(lines[j]!.trim());
    exprs.push(block.join(" "));
  });
  t.is(exprs.length, 10);
  t.true(exprs.some((e) => /increase\(keytrack_record_dropped_total\[5m\]\) > 0/.test(e)), "an alert for any dropped row");
  t.true(exprs.some((e) => /keytrack_record_buffered/.test(e)), "an alert for rows held in memory");
  t.true(exprs.some((e) => /keytrack_completeness_missing_requests/.test(e)), "an alert for accepted requests without a row");
  t.true(exprs.some((e) => /keytrack_oldest_pending_attribution_seconds/.test(e)), "an alert for slow attribution");
  for (const expr of exprs) t.deepEqual(unknownNames(expr), [], expr);
});

test("the exposition declares each metric with its type", (t) => {
  t.is(exposed.types.get("api_key_lookup_attempts_total"), "counter");
  t.is(exposed.types.get("api_key_tracking_success_total"), "counter");
  t.is(exposed.types.get("api_key_tracking_failures_total"), "counter");
  t.is(exposed.types.get("api_key_tracking_rate"), "gauge");
  t.is(exposed.types.get("keytrack_pending_attributions"), "gauge");
  t.is(exposed.types.get("keytrack_failed_attributions"), "gauge");
  t.is(exposed.types.get("keytrack_spool_depth"), "gauge");
  t.is(exposed.types.get("keytrack_database_up"), "gauge");
  t.is(exposed.types.get("keytrack_worker_jobs_total"), "counter");
  t.is(exposed.types.get("keytrack_record_dropped_total"), "counter");
  t.is(exposed.types.get("keytrack_record_buffered"), "gauge");
  t.is(exposed.types.get("keytrack_auth_stale_total"), "counter");
  t.is(exposed.types.get("http_request_duration_seconds"), "histogram");
  t.is(exposed.types.get("process_cpu_seconds_total"), "counter");
});
