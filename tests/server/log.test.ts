// server/log.ts (pino behind the project's Logger) and the graphile-worker
// bridge of server/worker/runner.ts. No database.
import test from "ava";

import { createLogger, LOG_LEVELS, maskKey, REDACTED, type LogLevel } from "../../server/log.js";
import { workerLogger } from "../../server/worker/runner.js";

function capture(level: LogLevel = "debug", json = true) {
  const lines: Array<{ line: string; level: LogLevel }> = [];
  const log = createLogger({ level, json, write: (line, lvl) => lines.push({ line, level: lvl }) });
  return {
    log,
    lines,
    entries: () => lines.map(({ line }) => JSON.parse(line) as Record<string, unknown>),
  };
}

test("JSON lines: level label, ISO time, msg, then the fields; no pino numbers, pid or hostname", (t) => {
  const { log, lines, entries } = capture();
  log.info("hello", { requestId: "req_1", n: 2, nested: { a: [1, 2] } });
  t.is(lines.length, 1);
  t.false(lines[0]!.line.endsWith("\n"));
  const [e] = entries();
  t.deepEqual(Object.keys(e!), ["level", "time", "msg", "requestId", "n", "nested"]);
  t.is(e!.level, "info");
  t.is(e!.msg, "hello");
  t.is(new Date(String(e!.time)).toISOString(), String(e!.time));
  t.deepEqual(e!.nested, { a: [1, 2] });
  t.is(lines[0]!.level, "info");

  for (const level of LOG_LEVELS) log[level](`at ${level}`);
  t.deepEqual(entries().slice(1).map((x) => x.level), ["debug", "info", "warn", "error"]);
  t.deepEqual(lines.slice(1).map((x) => x.level), ["debug", "info", "warn", "error"]);
  t.false(lines.some(({ line }) => /"level":\d/.test(line)));
});

test("level filtering: lines below the level are dropped", (t) => {
  const warn = capture("warn");
  for (const level of LOG_LEVELS) warn.log[level](level);
  t.deepEqual(warn.entries().map((e) => e.msg), ["warn", "error"]);

  const info = capture("info", false);
  for (const level of LOG_LEVELS) info.log[level](`readable ${level}`);
  t.deepEqual(info.lines.map((l) => l.level), ["info", "warn", "error"]);
});

test("child loggers add their fields; the call's fields win", (t) => {
  const { log, entries } = capture();
  const child = log.child({ component: "recorder", pool: "owner" });
  child.child({ attempt: 1 }).info("a", { pool: "read" });
  log.info("b");
  const [a, b] = entries();
  t.like(a, { msg: "a", component: "recorder", pool: "read", attempt: 1 });
  t.deepEqual(Object.keys(b!), ["level", "time", "msg"]);
});

test("an Error field keeps name, message, code, detail, stack and its cause chain", (t) => {
  const { log, entries } = capture();
  const root = Object.assign(new Error("duplicate key value violates unique constraint"), {
    code: "23505",
    detail: "Key (request_id)=(req_1) already exists.",
    severity: "ERROR",
  });
  const err = new Error("could not record", { cause: root });
  log.error("unhandled error", { method: "POST", error: err, failure: new TypeError("other field") });
  const e = entries()[0]!;
  const error = e.error as Record<string, any>;
  t.is(error.name, "Error");
  t.is(error.message, "could not record");
  t.regex(error.stack, /^Error: could not record\n\s+at /);
  t.like(error.cause, { name: "Error", message: root.message, code: "23505", detail: root.detail });
  t.regex(error.cause.stack, /duplicate key value/);
  t.is(error.cause.severity, undefined);
  t.like(e.failure, { name: "TypeError", message: "other field" });

  // A cycle (or a very long chain) is cut off, not followed forever.
  const loop = new Error("loop");
  (loop as { cause?: unknown }).cause = loop;
  log.error("cyclic", { err: loop });
  let depth = 0;
  let node = entries()[1]!.err as Record<string, unknown>;
  while (typeof node.cause === "object") {
    node = node.cause as Record<string, unknown>;
    depth++;
  }
  t.true(depth > 0 && depth < 10);
  t.is(typeof node.cause, "string");
});

test("readable lines (json: false) carry the error's stack too", (t) => {
  const { log, lines } = capture("debug", false);
  log.error("unhandled error", { error: new Error("boom", { cause: new Error("root cause") }) });
  t.is(lines.length, 1);
  t.is(lines[0]!.level, "error");
  t.regex(lines[0]!.line, /ERROR.*unhandled error/);
  t.regex(lines[0]!.line, /Error: boom\n/);
  t.regex(lines[0]!.line, /root cause/);
});

test("secret fields are censored, at the top level and one object down; the caller's objects are untouched", (t) => {
  const { log, lines, entries } = capture();
  const headers = { authorization: "Bearer sk-live-123456789", "content-type": "application/json" };
  log.warn("request", {
    key: "sk-live-abcdefghijklmnop",
    token: "t0ken-secret",
    apiKey: "sk-api",
    password: "hunter2",
    adminApiKey: "admin-secret",
    config: { upstreamApiKey: "up-secret", metricsToken: "m-secret", port: 8080 },
    headers,
    requestId: "req_2",
  });
  const e = entries()[0]!;
  for (const field of ["key", "token", "apiKey", "password", "adminApiKey"]) t.is(e[field], REDACTED, field);
  t.deepEqual(e.config, { upstreamApiKey: REDACTED, metricsToken: REDACTED, port: 8080 });
  t.deepEqual(e.headers, { authorization: REDACTED, "content-type": "application/json" });
  t.is(e.requestId, "req_2");
  t.false(/sk-live|t0ken|hunter2|secret/.test(lines[0]!.line));
  t.is(headers.authorization, "Bearer sk-live-123456789");
});

test("maskKey is unchanged", (t) => {
  t.is(maskKey("sk-abcdefghijkl"), "sk-a...ijkl");
  t.is(maskKey("short"), "****");
  t.is(maskKey(null), "****");
});

test("the write sink gets each line, without its newline, with its level, synchronously", (t) => {
  for (const json of [true, false]) {
    const { log, lines } = capture("info", json);
    log.info("one");
    t.is(lines.length, 1, "written before info() returns");
    log.warn("two");
    log.error("three");
    t.deepEqual(lines.map((l) => l.level), ["info", "warn", "error"]);
    t.true(lines.every((l) => !l.line.endsWith("\n")));
    t.regex(lines[1]!.line, /two/);
  }
});

test("graphile-worker bridge: task and job ids reach our log as fields; routine completions are debug", (t) => {
  const { log, entries } = capture();
  const logger = workerLogger(log.child({ component: "worker" }));

  // What a task's helpers.logger is: scoped to the job.
  logger.scope({ label: "job", taskIdentifier: "chat_completion_requests__refresh_rollups", jobId: "42" }).info("refreshed 3 hours");
  t.like(entries()[0], {
    level: "info",
    msg: "refreshed 3 hours",
    component: "worker",
    taskIdentifier: "chat_completion_requests__refresh_rollups",
    jobId: "42",
  });

  // The worker's own lines: its scope has the workerId, the job comes in meta.
  const worker = logger.scope({ label: "worker", workerId: "worker-abc" });
  const job = { id: "43", task_identifier: "x__task", attempts: 1, max_attempts: 25, payload: { secretish: "not logged" } };
  worker.info("Completed task 43 (x__task, 2.50ms) with success", { job, duration: 2.5, success: true });
  t.like(entries()[1], { level: "debug", workerId: "worker-abc", jobId: "43", taskIdentifier: "x__task", attempt: 1, duration: 2.5 });
  t.is(entries()[1]!.job, undefined);
  t.false(JSON.stringify(entries()[1]).includes("not logged"));

  const err = new Error("boom");
  worker.error(`Failed task 43 (x__task, 3.00ms, attempt 1 of 25) with error 'boom':\n  ${err.stack}`, { failure: true, job, error: err, duration: 3 });
  const failed = entries()[2]!;
  t.like(failed, { level: "error", msg: "Failed task 43 (x__task, 3.00ms, attempt 1 of 25) with error 'boom'", jobId: "43", taskIdentifier: "x__task" });
  t.regex((failed.error as { stack: string }).stack, /^Error: boom\n/);

  worker.warn("careful");
  worker.debug("Spawned");
  t.deepEqual(entries().slice(3).map((e) => [e.level, e.msg]), [["warn", "careful"], ["debug", "Spawned"]]);

  // At info, completions vanish; other info lines stay.
  const quiet = capture("info");
  const qlogger = workerLogger(quiet.log);
  qlogger.info("Completed task 44 (x__task, 1.00ms) with success", { job: { ...job, id: "44" }, success: true });
  qlogger.info("Worker connected and looking for jobs... (task names: 'x__task')");
  t.deepEqual(quiet.entries().map((e) => e.msg), ["Worker connected and looking for jobs... (task names: 'x__task')"]);
});
