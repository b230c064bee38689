// `npm run drill:outage [-- --quick] [--json PATH] [--seconds N] [--outage-seconds N] [--after-seconds N] [--rate N]`
//
// A database outage under steady traffic, end to end, on loopback only: a
// PostgreSQL cluster of its own (temporary folder, random port, Unix socket),
// the keytrack service as a child process, and a fixed rate of chat requests
// (model echo): valid keys, anonymous requests, and two keys that only come
// to exist during the run (registered by hash with import_api_key: before,
// they must be refused; after, served).
//
// Phase 1: traffic for --seconds, PostgreSQL stopped for --outage-seconds,
// started again on the same folder and port, traffic for --after-seconds,
// then drain (spool empty, every served request id in the ledger). Asserts:
// no served request lost, no request id twice, no key verified before the
// outage refused during it, late keys refused before they existed and served
// after, rows attributed to the key that was sent.
//
// Phase 2: PostgreSQL stopped again, a few requests served (spooled), the
// service SIGKILLed, PostgreSQL started, the service restarted on the same
// KEYTRACK_DATA_DIR: every spooled row lands exactly once.
//
// Exit code 0 when every assertion holds, 1 otherwise; everything it started
// is stopped and removed on every exit.
import { randomBytes } from "node:crypto";
import path from "node:path";

import {
  AUTH_CACHE_TTL_MS, checkLedger, Cluster, completenessGaps, conclude, createKeys, createUsers, drain, formatCounts, importKey, newKeySecret,
  ownerPool, parseDrillArgs, printSection, readLedger, runDrill, say, secondsSince, send, Service, sleep, statusCounts, Traffic, Verdict, waitForSpool,
  type Answer, type DrillKey, type Expected, type Target,
} from "./harness.js";

const opts = parseDrillArgs("outage", {
  seconds: { full: 20, quick: 8, min: 1, max: 3600, help: "traffic before the outage, seconds" },
  "outage-seconds": { full: 20, quick: 3, min: 1, max: 3600, help: "how long PostgreSQL is stopped, seconds" },
  "after-seconds": { full: 15, quick: 9, min: 1, max: 3600, help: "traffic after PostgreSQL is back, seconds" },
  rate: { full: 50, quick: 20, min: 1, max: 2000, help: "requests per second", integer: true },
  concurrency: { full: 64, quick: 32, min: 1, max: 1024, help: "most requests in flight at once", integer: true },
  "crash-requests": { full: 20, quick: 10, min: 1, max: 10_000, help: "requests served (spooled) before the SIGKILL of phase 2", integer: true },
  "drain-seconds": { full: 120, quick: 60, min: 5, max: 3600, help: "longest wait for the drain" },
});
const o = opts.values;
const SECONDS = o.seconds, OUTAGE = o["outage-seconds"], AFTER = o["after-seconds"], RATE = o.rate;
const DRAIN_MS = o["drain-seconds"] * 1000;
/** A verified key must be served for the whole outage: the stale window is far above it. */
const AUTH_STALE_MAX_MS = Math.max(900_000, (OUTAGE + 60) * 1000);

// ---------------------------------------------------------------------------
// Requests (kinds: "key", "anonymous", "late")

const isRefusal = (a: Answer) => a.status === 401 || a.status === 503;
const examples = (answers: Answer[], n = 5) =>
  answers.slice(0, n).map((a) => `#${a.seq} ${a.kind}${a.keyName ? ` ${a.keyName}` : ""} -> ${a.status}${a.error ? ` (${a.error})` : ""}`).join("; ");

// ---------------------------------------------------------------------------

runDrill("outage", (SECONDS + OUTAGE + AFTER) * 1000 + 2 * DRAIN_MS + 8 * 60_000, async (drill) => {
  const verdict = new Verdict();
  say(`outage drill in ${drill.dir}: ${SECONDS} s traffic, ${OUTAGE} s outage, ${AFTER} s after, ${RATE} requests/s${opts.quick ? " (--quick)" : ""}`);

  const cluster = await Cluster.start(drill, opts.verbose);
  say(`PostgreSQL running (socket ${cluster.socketDir}, port ${cluster.port})`);
  const serviceDataDir = path.join(drill.dir, "service");
  const startService = () =>
    Service.start({
      drill, cluster, dataDir: serviceDataDir, adminApiKey: randomBytes(20).toString("hex"), logFile: opts.serviceLog,
      env: { AUTH_STALE_MAX_MS: String(AUTH_STALE_MAX_MS) },
    });
  const service = await startService();
  say(`service running (pid ${service.pid}, ${service.url})`);
  const pool = ownerPool(drill, cluster);

  const users = await createUsers(pool, 3, "outage");
  const keys = await createKeys(pool, users, 2, "key");
  // Keys that come to exist during the run: A before the outage, B right after it.
  const late = [
    { name: "late-A", secret: newKeySecret(), userId: users[0]!, key: null as DrillKey | null, importStartedAt: 0, importedAt: 0 },
    { name: "late-B", secret: newKeySecret(), userId: users[1]!, key: null as DrillKey | null, importStartedAt: 0, importedAt: 0 },
  ];
  const importLate = async (l: (typeof late)[number]) => {
    l.importStartedAt = Date.now();
    l.key = await importKey(pool, l.userId, l.secret, l.name);
    l.importedAt = Date.now();
    say(`${l.name} registered (import_api_key)`);
  };

  let nextKey = 0;
  const pick = (seq: number): Target => {
    const slot = seq % 10;
    if (slot <= 5) {
      const key = keys[nextKey++ % keys.length]!;
      return { kind: "key", keyName: key.name, secret: key.secret };
    }
    if (slot <= 7) return { kind: "anonymous", keyName: null, secret: null };
    const l = late[slot - 8]!;
    return { kind: "late", keyName: l.name, secret: l.secret };
  };

  // ---- phase 1 -------------------------------------------------------------
  const traffic = new Traffic(service.url, RATE, o.concurrency, pick);
  const samples: Array<{ t: number; spoolDepth: number | null; databaseUp: number | null }> = [];
  let sampling = true;
  const sampler = (async () => {
    while (sampling) {
      const t = Date.now();
      try {
        const m = await service.metrics();
        samples.push({ t: secondsSince(drill.startedAt, t), spoolDepth: m.value("keytrack_spool_depth"), databaseUp: m.value("keytrack_database_up") });
      } catch {
        samples.push({ t: secondsSince(drill.startedAt, t), spoolDepth: null, databaseUp: null });
      }
      await sleep(Math.max(0, 1000 - (Date.now() - t)));
    }
  })();

  const trafficStartedAt = Date.now();
  traffic.start();
  say(`traffic started: ${RATE} requests/s`);
  await sleep(SECONDS * 300);
  await importLate(late[0]!);
  await sleep(Math.max(0, trafficStartedAt + SECONDS * 1000 - Date.now()));

  const pgStopRequestedAt = Date.now();
  await cluster.stop();
  const pgStoppedAt = Date.now();
  say(`PostgreSQL stopped (took ${secondsSince(pgStopRequestedAt)} s); traffic goes on for ${OUTAGE} s`);
  await sleep(Math.max(0, pgStoppedAt + OUTAGE * 1000 - Date.now()));

  const pgStartRequestedAt = Date.now();
  await cluster.restart();
  const pgStartedAt = Date.now();
  say(`PostgreSQL started again (took ${secondsSince(pgStartRequestedAt)} s)`);
  // Seconds to recover: from PostgreSQL accepting connections until the service's spool is empty.
  let recoveredAt: number | null = null;
  const recovery = (async () => {
    const deadline = pgStartedAt + (AFTER * 1000 + DRAIN_MS);
    while (recoveredAt === null && Date.now() < deadline) {
      try {
        if ((await service.metrics()).value("keytrack_spool_depth") === 0) recoveredAt = Date.now();
      } catch {
        // retry
      }
      if (recoveredAt === null) await sleep(100);
    }
  })();
  await importLate(late[1]!);
  await sleep(Math.max(0, pgStartedAt + AFTER * 1000 - Date.now()));

  await traffic.stop();
  const trafficStoppedAt = Date.now();
  say(`traffic stopped: ${traffic.sent} sent, ${traffic.answers.length} answered; draining`);

  const answers = traffic.answers;
  const served = answers.filter((a) => a.status !== "error" && a.status >= 200 && a.status < 300 && a.requestId);
  const keyIds = new Map<string, string>([...keys.map((k) => [k.name, k.id] as const), ...late.map((l) => [l.name, l.key?.id ?? ""] as const)]);
  const expectedOf = (a: Answer): Expected => (a.keyName ? { apiKeyId: keyIds.get(a.keyName)! } : { anonymous: true });
  const drained1 = await drain(service, pool, served.map((a) => a.requestId!), DRAIN_MS);
  await recovery;
  sampling = false;
  await sampler;
  say(drained1.drained ? `drained in ${drained1.seconds} s` : `NOT drained after ${drained1.seconds} s: spool depth ${drained1.spoolDepth}, ${drained1.present} of ${drained1.expected} served ids in the ledger`);
  const metrics1 = await service.metrics().catch(() => null);

  const ledger1 = checkLedger(await readLedger(pool), new Map(served.map((a) => [a.requestId!, expectedOf(a)])));

  // Keys verified (a 200 came back) before the outage began, and when each key was first verified.
  const verifiedAt = new Map<string, number>();
  for (const a of answers) {
    if (a.keyName && a.status === 200 && a.doneAt < (verifiedAt.get(a.keyName) ?? Infinity)) verifiedAt.set(a.keyName, a.doneAt);
  }
  const knownBeforeOutage = new Set([...verifiedAt].filter(([, t]) => t < pgStopRequestedAt).map(([name]) => name));
  const during = (a: Answer) => a.sentAt >= pgStopRequestedAt && a.sentAt < pgStartedAt;
  const refusedKnown = answers.filter((a) => a.keyName && knownBeforeOutage.has(a.keyName) && during(a) && isRefusal(a));
  const refusedVerified = answers.filter((a) => a.keyName && a.sentAt > (verifiedAt.get(a.keyName) ?? Infinity) && isRefusal(a));
  const clientErrors = answers.filter((a) => a.status === "error");
  // Valid keys and anonymous requests: always served.
  const unexpected = answers.filter((a) => (a.kind === "key" || a.kind === "anonymous") && a.status !== 200);
  // Late keys: refused until they exist; served once they exist, the cache TTL has passed and the database answers.
  const lateOf = (a: Answer) => late.find((l) => l.name === a.keyName)!;
  const lateAnswers = answers.filter((a) => a.kind === "late");
  const lateBefore = lateAnswers.filter((a) => a.doneAt < lateOf(a).importStartedAt);
  const lateServedBefore = lateBefore.filter((a) => a.status === 200);
  const dbDown = (a: Answer) => a.sentAt >= pgStopRequestedAt && a.sentAt < pgStartedAt + 2000;
  const lateAfter = lateAnswers.filter((a) => a.sentAt >= lateOf(a).importedAt + AUTH_CACHE_TTL_MS + 1000 && !dbDown(a));
  const lateRefusedAfter = lateAfter.filter((a) => a.status !== 200);
  const lateCounts = Object.fromEntries(late.map((l) => [l.name, {
    beforeExisting: statusCounts(lateBefore.filter((a) => a.keyName === l.name)),
    afterExisting: statusCounts(lateAfter.filter((a) => a.keyName === l.name)),
    verifiedBeforeOutage: knownBeforeOutage.has(l.name),
  }]));
  // Answer times and requests not sent, by phase of the outage.
  const phases: Array<[string, number, number]> = [
    ["before", 0, pgStopRequestedAt],
    ["stopping", pgStopRequestedAt, pgStoppedAt],
    ["down", pgStoppedAt, pgStartedAt],
    ["after", pgStartedAt, Infinity],
  ];
  const quantile = (xs: number[], q: number) => (xs.length ? xs[Math.min(xs.length - 1, Math.floor(q * xs.length))]! : null);
  const byPhase = Object.fromEntries(phases.map(([name, from, to]) => {
    const ms = answers.filter((a) => a.sentAt >= from && a.sentAt < to).map((a) => a.doneAt - a.sentAt).sort((x, y) => x - y);
    return [name, { answered: ms.length, p50Ms: quantile(ms, 0.5), p99Ms: quantile(ms, 0.99), maxMs: ms.at(-1) ?? null, notSent: traffic.shedAt.filter((t) => t >= from && t < to).length }];
  }));
  const spoolPeak = Math.max(0, ...samples.map((s) => s.spoolDepth ?? 0));
  const recoverSeconds = recoveredAt === null ? null : secondsSince(pgStartedAt, recoveredAt);
  const staleMetric = metrics1?.value("keytrack_auth_stale_total") ?? null;
  const droppedMetric = metrics1?.value("keytrack_record_dropped_total") ?? null;

  verdict.check(drained1.drained, `phase 1: not drained within ${DRAIN_MS / 1000} s (spool depth ${drained1.spoolDepth}, ${drained1.present} of ${drained1.expected} served ids in the ledger)`);
  verdict.check(ledger1.lost === 0, `phase 1: ${ledger1.lost} served requests have no row (e.g. ${ledger1.lostIds.slice(0, 5).join(", ")})`);
  verdict.check(ledger1.duplicates === 0, `phase 1: ${ledger1.duplicates} request ids have more than one row`);
  verdict.check(refusedKnown.length === 0, `phase 1: ${refusedKnown.length} requests with keys verified before the outage were refused during it: ${examples(refusedKnown)}`);
  verdict.check(refusedVerified.length === 0, `phase 1: ${refusedVerified.length} requests with already verified keys were refused: ${examples(refusedVerified)}`);
  verdict.check(unexpected.length === 0, `phase 1: ${unexpected.length} requests with valid keys or anonymous were not answered 200: ${examples(unexpected)}`);
  verdict.check(clientErrors.length === 0, `phase 1: ${clientErrors.length} requests got no answer: ${examples(clientErrors)}`);
  verdict.check(lateServedBefore.length === 0, `phase 1: ${lateServedBefore.length} requests with keys that did not exist yet were served: ${examples(lateServedBefore)}`);
  verdict.check(lateRefusedAfter.length === 0, `phase 1: ${lateRefusedAfter.length} requests with late keys, sent once they existed (and the ${AUTH_CACHE_TTL_MS} ms cache had passed), were not served: ${examples(lateRefusedAfter)}`);
  verdict.check(ledger1.misattributed === 0, `phase 1: ${ledger1.misattributed} rows not attributed to what was sent: ${ledger1.misattributedExamples.join("; ")}`);
  verdict.check(ledger1.unknownRows === 0, `phase 1: ${ledger1.unknownRows} rows whose request id was never answered 2xx to the drill`);
  verdict.check(droppedMetric === null || droppedMetric === 0, `phase 1: keytrack_record_dropped_total is ${droppedMetric}`);
  verdict.check(recoverSeconds !== null, "phase 1: the spool never drained after PostgreSQL came back");

  printSection(`outage drill, phase 1: ${SECONDS} s traffic, ${OUTAGE} s outage (PostgreSQL stopped), ${AFTER} s after, ${RATE} requests/s`, [
    ["sent", traffic.sent],
    ["not sent (concurrency bound)", `${traffic.shed} (${Object.entries(byPhase).map(([n, p]) => `${n} ${p.notSent}`).join(", ")})`],
    ["answered by status", formatCounts(statusCounts(answers))],
    ["served (2xx)", served.length],
    ["answer time p50/p99/max, ms", Object.entries(byPhase).map(([n, p]) => `${n} ${p.p50Ms}/${p.p99Ms}/${p.maxMs}`).join(", ")],
    ["rows", ledger1.rows],
    ["lost", ledger1.lost],
    ["duplicate request_ids", ledger1.duplicates],
    ["refused known keys", refusedKnown.length],
    ["refused verified keys (any time)", refusedVerified.length],
    ["valid or anonymous not served", unexpected.length],
    ["late keys served before existing", lateServedBefore.length],
    ["late keys refused after existing", lateRefusedAfter.length],
    ["late keys", late.map((l) => `${l.name}: before ${formatCounts(lateCounts[l.name]!.beforeExisting)}; after ${formatCounts(lateCounts[l.name]!.afterExisting)}`).join(" | ")],
    ["attribution outcomes", formatCounts(ledger1.attribution)],
    ["misattributed rows", ledger1.misattributed],
    ["rows of unanswered requests", ledger1.unknownRows],
    ["rows through the spool", ledger1.spooled],
    ["spool depth peak", spoolPeak],
    ["keytrack_auth_stale_total", staleMetric ?? "absent"],
    ["keytrack_record_dropped_total", droppedMetric ?? "absent"],
    ["seconds to recover", recoverSeconds ?? "never"],
  ]);

  // ---- phase 2: crash with rows in the spool --------------------------------
  say("phase 2: PostgreSQL stopped again; serving a few requests into the spool, then SIGKILL");
  await cluster.stop();
  const crashAnswers: Answer[] = [];
  for (let i = 0; i < o["crash-requests"]; i++) {
    const seq = 1_000_000 + i;
    const key = keys[i % keys.length]!;
    const target: Target = i % 3 === 2 ? { kind: "anonymous", keyName: null, secret: null } : { kind: "key", keyName: key.name, secret: key.secret };
    crashAnswers.push(await send(service.url, seq, target));
    await sleep(1000 / RATE);
  }
  const served2 = crashAnswers.filter((a) => a.status === 200 && a.requestId);
  // record() resolves once a row is fsynced in the spool: wait until every served row is counted there.
  const depthBeforeKill = await waitForSpool(service, served2.length, 30_000, 500);
  const killed = await service.kill();
  say(`service SIGKILLed (spool depth ${depthBeforeKill}, exit signal ${killed.signal})`);
  await cluster.restart();
  const restartedAt = Date.now();
  const service2 = await startService();
  say(`PostgreSQL started, service restarted on the same data folder (pid ${service2.pid}, healthy after ${secondsSince(restartedAt)} s)`);
  const allServed = [...served, ...served2];
  const drained2 = await drain(service2, pool, allServed.map((a) => a.requestId!), DRAIN_MS);
  const ledger = await readLedger(pool);
  const ledger2 = checkLedger(ledger, new Map(served2.map((a) => [a.requestId!, expectedOf(a)])));
  const ledgerAll = checkLedger(ledger, new Map(allServed.map((a) => [a.requestId!, expectedOf(a)])));
  const notOnce = served2.filter((a) => ledger.get(a.requestId!)?.count !== 1);
  const stopped = await service2.stop();

  verdict.check(served2.length === crashAnswers.length, `phase 2: ${crashAnswers.length - served2.length} of ${crashAnswers.length} requests during the second outage were not served: ${examples(crashAnswers.filter((a) => a.status !== 200))}`);
  verdict.check(depthBeforeKill === served2.length, `phase 2: spool depth before the kill was ${depthBeforeKill}, expected ${served2.length} (every served row)`);
  verdict.check(drained2.drained, `phase 2: not drained within ${DRAIN_MS / 1000} s after the restart (spool depth ${drained2.spoolDepth}, ${drained2.present} of ${drained2.expected} served ids in the ledger)`);
  verdict.check(notOnce.length === 0, `phase 2: ${notOnce.length} spooled requests are not in the ledger exactly once (e.g. ${notOnce.slice(0, 5).map((a) => `${a.requestId}: ${ledger.get(a.requestId!)?.count ?? 0} rows`).join(", ")})`);
  verdict.check(ledgerAll.lost === 0, `phases 1 and 2: ${ledgerAll.lost} served requests have no row`);
  verdict.check(ledgerAll.duplicates === 0, `phases 1 and 2: ${ledgerAll.duplicates} request ids have more than one row`);
  verdict.check(ledger2.misattributed === 0, `phase 2: ${ledger2.misattributed} rows not attributed to what was sent: ${ledger2.misattributedExamples.join("; ")}`);
  verdict.check(ledgerAll.unknownRows === 0, `phases 1 and 2: ${ledgerAll.unknownRows} rows whose request id was never answered 2xx to the drill`);
  const gaps = await completenessGaps(pool);
  verdict.check(gaps.missing === 0, `phases 1 and 2: completeness_gaps() reports ${gaps.missing} accepted requests without a row: ${gaps.ranges.join("; ")}`);

  printSection("outage drill, phase 2: SIGKILL with rows in the spool, restart on the same KEYTRACK_DATA_DIR", [
    ["sent", crashAnswers.length],
    ["answered by status", formatCounts(statusCounts(crashAnswers))],
    ["spool depth at the kill", depthBeforeKill ?? "unknown"],
    ["rows", ledgerAll.rows],
    ["lost", ledger2.lost],
    ["duplicate request_ids", ledgerAll.duplicates],
    ["spooled rows landed exactly once", `${served2.length - notOnce.length} of ${served2.length}`],
    ["rows through the spool", ledger2.spooled],
    ["attribution outcomes", formatCounts(ledger2.attribution)],
    ["misattributed rows", ledger2.misattributed],
    ["seconds to drain after restart", drained2.seconds],
    ["lost, phases 1 and 2", ledgerAll.lost],
    ["completeness gaps (SQL), phases 1 and 2", gaps.missing],
    ["service stop (SIGTERM)", `exit code ${stopped.code}${stopped.signal ? `, signal ${stopped.signal}` : ""}`],
    ["service warnings, errors logged", `${service.levels.warn + service2.levels.warn}, ${service.levels.error + service2.levels.error}`],
  ]);

  return conclude(drill, verdict, {
    options: { quick: opts.quick, seconds: SECONDS, outageSeconds: OUTAGE, afterSeconds: AFTER, rate: RATE, concurrency: o.concurrency, crashRequests: o["crash-requests"], authCacheTtlMs: AUTH_CACHE_TTL_MS, authStaleMaxMs: AUTH_STALE_MAX_MS },
    phase1: {
      sent: traffic.sent, shed: traffic.shed, byPhase, answeredByStatus: statusCounts(answers), served: served.length,
      rows: ledger1.rows, lost: ledger1.lost, lostIds: ledger1.lostIds, duplicates: ledger1.duplicates,
      refusedKnownKeys: refusedKnown.length, refusedVerifiedKeys: refusedVerified.length, validOrAnonymousNotServed: unexpected.length,
      clientErrors: clientErrors.length, lateKeys: lateCounts, lateServedBeforeExisting: lateServedBefore.length, lateRefusedAfterExisting: lateRefusedAfter.length,
      attribution: ledger1.attribution, misattributed: ledger1.misattributed, unknownRows: ledger1.unknownRows, spooledRows: ledger1.spooled,
      spoolDepthPeak: spoolPeak, authStaleTotal: staleMetric, recordDroppedTotal: droppedMetric,
      secondsToRecover: recoverSeconds, drain: drained1,
      // Seconds since the drill started, like spoolSamples[].t.
      timeline: {
        trafficStarted: secondsSince(drill.startedAt, trafficStartedAt),
        lateAImported: secondsSince(drill.startedAt, late[0]!.importedAt),
        postgresStopRequested: secondsSince(drill.startedAt, pgStopRequestedAt),
        postgresStopped: secondsSince(drill.startedAt, pgStoppedAt),
        postgresStarted: secondsSince(drill.startedAt, pgStartedAt),
        lateBImported: secondsSince(drill.startedAt, late[1]!.importedAt),
        trafficStopped: secondsSince(drill.startedAt, trafficStoppedAt),
        spoolDrained: recoveredAt === null ? null : secondsSince(drill.startedAt, recoveredAt),
      },
      spoolSamples: samples,
    },
    phase2: {
      sent: crashAnswers.length, answeredByStatus: statusCounts(crashAnswers), spoolDepthAtKill: depthBeforeKill,
      landedExactlyOnce: served2.length - notOnce.length, served: served2.length, lost: ledger2.lost, duplicates: ledgerAll.duplicates,
      attribution: ledger2.attribution, misattributed: ledger2.misattributed, spooledRows: ledger2.spooled, drain: drained2,
      lostAll: ledgerAll.lost, unknownRowsAll: ledgerAll.unknownRows, serviceStop: stopped,
    },
  }, { json: opts.json, services: [service, service2], cluster });
});
