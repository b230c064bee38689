// keytrack console: plain ES module, no framework. Data from /console/api/*
// (cookie session); every figure is shown as the server computed it.
import uPlot from "/console/vendor/uPlot.esm.js";

const REFRESH_MS = 30_000;
const FAST_REFRESH_MS = 3_000; // while a backfill runs
const HEADERS = { "x-keytrack-console": "1" };

const $ = (id) => document.getElementById(id);

class HttpError extends Error {
  constructor(status, body) {
    super(body?.error?.message ?? `HTTP ${status}`);
    this.status = status;
    this.code = body?.error?.code;
  }
}

async function call(path, { method = "GET", body } = {}) {
  const init = { method, credentials: "same-origin", headers: { ...HEADERS } };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch {
    throw new HttpError(0, { error: { message: "keytrack is not answering", code: "network" } });
  }
  const text = await res.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { json = null; }
  if (!res.ok) throw new HttpError(res.status, json);
  return json;
}

// ---------- state ----------
let signedIn = false;
let timer = null;
let charts = { hourly: null, daily: null };
let lastData = null;

function hoursWindow() { return Number($("window").value) || 24; }

// ---------- formatting ----------
const nf = new Intl.NumberFormat("en-US");
const fmtInt = (n) => (n === null || n === undefined ? "–" : nf.format(n));
const fmtPct = (n) => (n === null || n === undefined ? "–" : `${Number(n).toFixed(2)} %`);
function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 120) return `${Number(s).toFixed(1)} s`;
  if (s < 7200) return `${(s / 60).toFixed(1)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}
function fmtTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

/** Shows a figure; data-value keeps the server's number as is (what the browser test compares). */
function figure(id, value, text) {
  const el = $(id);
  el.dataset.value = value === null || value === undefined ? "" : String(value);
  el.textContent = text;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

// ---------- states: sign-in, banner ----------
function showSignIn(note) {
  signedIn = false;
  stopTimer();
  $("dashboard").hidden = true;
  $("sign-out").hidden = true;
  $("who").hidden = true;
  $("as-of").hidden = true;
  $("banner").hidden = true;
  $("signin").hidden = false;
  $("signin-note").textContent = note ?? "";
  $("signin-note").hidden = !note;
  $("signin-error").hidden = true;
  $("signin-token").focus();
}

function showDashboard(principal) {
  signedIn = true;
  $("signin").hidden = true;
  $("dashboard").hidden = false;
  $("sign-out").hidden = false;
  $("who").hidden = false;
  $("who").textContent = principal?.kind === "key" ? `signed in with an admin key (${principal.api_key_id.slice(0, 8)}…)` : "signed in with the admin token";
}

function banner(text) {
  $("banner").textContent = text ?? "";
  $("banner").hidden = !text;
  $("dashboard").classList.toggle("stale", Boolean(text));
}

// ---------- rendering ----------
function renderQuality(q, status) {
  const badge = $("alert-status");
  badge.textContent = q.alert_status.replace("_", " ");
  badge.dataset.value = q.alert_status;
  badge.className = `badge ${q.alert_status === "no_data" ? "" : q.alert_status}`;
  const recs = $("recommendations");
  recs.replaceChildren(...q.recommendations.map((r) => el("li", r)));

  const w = q.time_window;
  $("window-label").textContent = `(last ${w.hours} h)`;
  $("window-range").textContent = `${fmtTime(w.start_time)} → ${fmtTime(w.end_time)}`;
  $("window-range").dataset.start = w.start_time;
  $("window-range").dataset.end = w.end_time;
  figure("total-requests", q.total_requests, fmtInt(q.total_requests));
  figure("attributed", q.requests_with_api_key, fmtInt(q.requests_with_api_key));
  figure("anonymous", q.anonymous_requests, fmtInt(q.anonymous_requests));
  figure("pending", q.pending_attributions, fmtInt(q.pending_attributions));
  figure("failed", q.failed_attributions, fmtInt(q.failed_attributions));
  figure("tracking-rate", q.tracking_rate_percent, fmtPct(q.tracking_rate_percent));
  figure("auth-rate", q.authenticated_tracking_rate_percent, q.authenticated_tracking_rate_percent === null ? "no authenticated requests" : fmtPct(q.authenticated_tracking_rate_percent));

  const c = q.completeness;
  figure("completeness", c.completeness_percent, c.completeness_percent === null ? "no data" : fmtPct(c.completeness_percent));
  figure("rows-missing", c.rows_missing, fmtInt(c.rows_missing));
  const l = q.attribution_latency;
  figure("latency-p50", l.p50_seconds, fmtSeconds(l.p50_seconds));
  figure("latency-p99", l.p99_seconds, fmtSeconds(l.p99_seconds));
  figure("after-retry", l.attributed_after_retry, fmtInt(l.attributed_after_retry));
  figure("retry-queue", l.pending, fmtInt(l.pending));
  figure("oldest-pending", l.oldest_pending_seconds, fmtSeconds(l.oldest_pending_seconds));
  if (status) figure("spool-depth", status.spool_depth, fmtInt(status.spool_depth));
}

function chartWidth(container) {
  return Math.max(300, Math.floor(container.clientWidth || container.parentElement.clientWidth - 28));
}

function drawChart(key, containerId, emptyId, data, series, { hasData, xIsDays }) {
  const container = $(containerId);
  $(emptyId).hidden = hasData;
  const opts = {
    width: chartWidth(container),
    height: 220,
    cursor: { drag: { x: false, y: false } },
    legend: { live: true },
    scales: { x: { time: true }, rate: { range: [0, 100] }, req: { range: (_u, _min, max) => [0, Math.max(1, max)] } },
    axes: [
      { values: xIsDays ? "{MM}-{DD}" : undefined },
      { scale: "rate", label: "%", size: 50 },
      { scale: "req", side: 1, label: "requests", grid: { show: false }, size: 60 },
    ],
    series: [{ label: xIsDays ? "day" : "hour" }, ...series],
  };
  if (charts[key]) charts[key].destroy();
  container.replaceChildren();
  charts[key] = new uPlot(opts, data, container);
}

function renderHourly(h) {
  const xs = h.data.map((d) => Date.parse(d.hour) / 1000);
  const auth = h.data.map((d) => d.authenticated_tracking_rate_percent);
  const reqs = h.data.map((d) => d.total_requests);
  $("hourly-label").textContent = `(last ${h.hours} h, from the hourly view)`;
  drawChart("hourly", "chart-hourly", "chart-hourly-empty", [xs, auth, reqs], [
    { label: "authenticated rate %", scale: "rate", stroke: "#0969da", width: 2, spanGaps: false, points: { show: h.data.length <= 48 } },
    { label: "requests", scale: "req", stroke: "#8c959f", fill: "rgba(140,149,159,0.15)", width: 1 },
  ], { hasData: reqs.some((n) => n > 0), xIsDays: false });
}

function renderDaily(t) {
  const xs = t.trend_data.map((d) => Date.parse(`${d.date}T00:00:00Z`) / 1000);
  const rate = t.trend_data.map((d) => (d.total_requests > 0 ? d.tracking_rate_percent : null));
  const reqs = t.trend_data.map((d) => d.total_requests);
  drawChart("daily", "chart-daily", "chart-daily-empty", [xs, rate, reqs], [
    { label: "tracking rate %", scale: "rate", stroke: "#1a7f37", width: 2, spanGaps: false },
    { label: "requests", scale: "req", stroke: "#8c959f", fill: "rgba(140,149,159,0.15)", width: 1 },
  ], { hasData: reqs.some((n) => n > 0), xIsDays: true });
  $("chart-daily").dataset.average = t.summary.average_tracking_rate_percent;
}

function renderOffenders(o) {
  const rows = o.offenders.map((x) => {
    const tr = el("tr");
    tr.dataset.kind = x.kind;
    const who = x.kind === "api_key_hash" ? el("td", x.api_key_hash, "mono") : el("td", x.email ?? x.user_id);
    tr.append(el("td", x.kind === "api_key_hash" ? "key hash" : "user"), who,
      el("td", fmtInt(x.unattributed_requests), "num"), el("td", fmtInt(x.pending_requests), "num"),
      el("td", fmtInt(x.failed_requests), "num"), el("td", x.reasons.join(", ") || "–"), el("td", fmtTime(x.last_seen_at)));
    const act = el("td");
    if (x.kind === "api_key_hash") {
      const b = el("button", "Register…", "small");
      b.type = "button";
      b.addEventListener("click", () => {
        $("import-hash").value = x.api_key_hash;
        $("import-user").focus();
        $("import-result").hidden = true;
      });
      act.append(b);
    }
    tr.append(act);
    return tr;
  });
  $("offenders").querySelector("tbody").replaceChildren(...rows);
  $("offenders-empty").hidden = rows.length > 0;
}

function renderRecent(r) {
  const rows = r.requests.map((x) => {
    const tr = el("tr");
    tr.append(el("td", fmtTime(x.created_at)), el("td", x.request_id, "mono"), el("td", x.model ?? "–"),
      el("td", x.attribution_status), el("td", x.attribution_reason ?? (x.attribution_status === "pending" ? "key not found yet" : "–")),
      el("td", x.attribution_attempts, "num"), el("td", x.attribution_next_attempt_at ? fmtTime(x.attribution_next_attempt_at) : "–"),
      el("td", x.api_key_hash ? `${x.api_key_hash.slice(0, 16)}…` : x.email ?? x.user_id ?? "–", x.api_key_hash ? "mono" : undefined));
    if (x.attribution_error) tr.title = x.attribution_error;
    return tr;
  });
  $("recent").querySelector("tbody").replaceChildren(...rows);
  $("recent-empty").hidden = rows.length > 0;
}

function renderBackfills(b) {
  const rows = b.backfills.map((x) => {
    const tr = el("tr");
    tr.dataset.status = x.status;
    tr.append(el("td", x.id), el("td", x.status), el("td", fmtInt(x.examined), "num"), el("td", fmtInt(x.filled), "num"),
      el("td", fmtInt(x.ambiguous), "num"), el("td", fmtInt(x.no_key), "num"), el("td", fmtInt(x.anonymized), "num"),
      el("td", x.batches, "num"), el("td", fmtTime(x.started_at)), el("td", fmtTime(x.updated_at)));
    return tr;
  });
  $("backfills").querySelector("tbody").replaceChildren(...rows);
  $("backfills-empty").hidden = rows.length > 0;
  return b.backfills.some((x) => x.status === "running");
}

// ---------- refresh ----------
let refreshing = null;

async function refresh() {
  if (refreshing) return refreshing;
  refreshing = (async () => {
    const hours = hoursWindow();
    const parts = {
      status: "/console/api/status",
      quality: `/console/api/quality?hours=${hours}`,
      hourly: `/console/api/hourly?hours=${hours}`,
      trend: "/console/api/trend?days=30",
      offenders: `/console/api/offenders?hours=${hours}`,
      recent: "/console/api/recent?limit=50",
      backfills: "/console/api/backfills",
    };
    const keys = Object.keys(parts);
    const results = await Promise.allSettled(keys.map((k) => call(parts[k])));
    const data = {};
    const errors = [];
    results.forEach((r, i) => (r.status === "fulfilled" ? (data[keys[i]] = r.value) : errors.push(r.reason)));
    if (errors.some((e) => e.status === 401)) {
      showSignIn(signedIn ? "Your session expired: sign in again." : undefined);
      return;
    }
    if (data.status) figure("spool-depth", data.status.spool_depth, fmtInt(data.status.spool_depth));
    if (data.quality) renderQuality(data.quality, data.status);
    if (data.hourly) renderHourly(data.hourly);
    if (data.trend) renderDaily(data.trend);
    if (data.offenders) renderOffenders(data.offenders);
    if (data.recent) renderRecent(data.recent);
    const running = data.backfills ? renderBackfills(data.backfills) : false;
    if (errors.length === 0) {
      banner(null);
      lastData = data;
      $("as-of").hidden = false;
      const now = new Date();
      $("as-of-time").dateTime = now.toISOString();
      $("as-of-time").textContent = now.toLocaleTimeString();
    } else if (errors.some((e) => e.status === 503)) {
      banner(`Database not answering: ${lastData ? "the figures below are from the last successful refresh" : "no figures yet"}. Retrying every ${REFRESH_MS / 1000} s.`);
    } else {
      banner(`Could not refresh: ${errors[0].message}`);
    }
    schedule(running ? FAST_REFRESH_MS : REFRESH_MS);
  })().finally(() => { refreshing = null; });
  return refreshing;
}

function stopTimer() { if (timer) clearTimeout(timer); timer = null; }
function schedule(ms) { stopTimer(); if (signedIn) timer = setTimeout(refresh, ms); }

// ---------- actions ----------
function result(id, ok, text) {
  const p = $(id);
  p.textContent = text;
  p.className = `result ${ok ? "good" : "bad"}`;
  p.hidden = false;
}

async function onSignIn(ev) {
  ev.preventDefault();
  const input = $("signin-token");
  const token = input.value;
  input.value = "";
  const err = $("signin-error");
  err.hidden = true;
  try {
    const r = await call("/console/session", { method: "POST", body: { token } });
    showDashboard(r.principal);
    await refresh();
  } catch (e) {
    err.textContent = e.status === 401 ? "Wrong token: it is neither the admin token nor a usable API key."
      : e.status === 403 ? "Admins only: this key belongs to a user who is not an admin."
      : e.status === 503 ? "Database not answering: cannot check the key now, try again."
      : `Sign-in failed: ${e.message}`;
    err.hidden = false;
  }
}

async function onSignOut() {
  try { await call("/console/session", { method: "DELETE" }); } catch { /* signed out anyway */ }
  showSignIn("Signed out.");
}

async function onImport(ev) {
  ev.preventDefault();
  const user = $("import-user").value.trim();
  const keyHash = $("import-hash").value.trim();
  const isId = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(user);
  const button = ev.target.querySelector("button");
  button.disabled = true;
  try {
    const r = await call("/console/api/import-key", { method: "POST", body: { ...(isId ? { user_id: user } : { user_email: user }), key_hash: keyHash } });
    result("import-result", true, `Key registered (${r.key.api_key_id}); ${r.key.pending_requests} pending request(s) will resolve shortly.`);
    $("import-hash").value = "";
    await refresh();
  } catch (e) {
    if (e.status === 401) return showSignIn("Your session expired: sign in again.");
    result("import-result", false, e.status === 503 ? "Database not answering: the key was not registered." : `Not registered: ${e.message}`);
  } finally {
    button.disabled = false;
  }
}

async function onBackfill() {
  const button = $("backfill-start");
  button.disabled = true;
  try {
    const r = await call("/console/api/backfill", { method: "POST", body: {} });
    result("backfill-result", true, `Backfill #${r.backfill.id} ${r.backfill.batches > 0 ? "resumed" : "started"}; progress below.`);
    await refresh();
  } catch (e) {
    if (e.status === 401) return showSignIn("Your session expired: sign in again.");
    result("backfill-result", false, e.status === 503 ? "Database not answering: the backfill was not started." : `Not started: ${e.message}`);
  } finally {
    button.disabled = false;
  }
}

// ---------- start ----------
$("signin-form").addEventListener("submit", onSignIn);
$("sign-out").addEventListener("click", onSignOut);
$("refresh").addEventListener("click", () => refresh());
$("window").addEventListener("change", () => refresh());
$("import-form").addEventListener("submit", onImport);
$("backfill-start").addEventListener("click", onBackfill);
let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => {
    for (const [key, id] of [["hourly", "chart-hourly"], ["daily", "chart-daily"]]) {
      if (charts[key]) charts[key].setSize({ width: chartWidth($(id)), height: 220 });
    }
  }, 150);
});

(async () => {
  try {
    const status = await call("/console/api/status");
    showDashboard(status.principal);
    await refresh();
  } catch (e) {
    if (e.status === 401) showSignIn();
    else { showSignIn(); $("signin-error").textContent = `keytrack is not answering: ${e.message}`; $("signin-error").hidden = false; }
  }
})();
