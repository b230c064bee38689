// Which failures the recording path retries, and how long it waits.
import test from "ava";

import { backoffDelay, backoffSchedule, describeError, isTransientError, mayHaveCommitted } from "../../server/recording/retry.js";

const pgError = (code: string) => Object.assign(new Error(`server says ${code}`), { code });
const nodeError = (code: string) => Object.assign(new Error(`connect ${code} 127.0.0.1:5432`), { code });

test("transient: connection exceptions, serialization failures, deadlocks, timeouts, too many connections, shutdowns", (t) => {
  for (const code of ["08000", "08003", "08006", "08001", "08P01", "40001", "40P01", "57014", "53300", "57P01", "57P03", "55P03"]) {
    t.true(isTransientError(pgError(code)), code);
  }
  for (const code of ["ECONNREFUSED", "ECONNRESET", "ENOENT", "ETIMEDOUT", "EPIPE", "KT_ATTEMPT_TIMEOUT"]) {
    t.true(isTransientError(nodeError(code)), code);
  }
  for (const message of ["Connection terminated unexpectedly", "Connection terminated", "Connection terminated due to connection timeout",
    "timeout exceeded when trying to connect", "Client has encountered a connection error and is not queryable", "Query read timeout"]) {
    t.true(isTransientError(new Error(message)), message);
  }
  t.true(isTransientError(new AggregateError([nodeError("ECONNREFUSED"), nodeError("ECONNREFUSED")])), "happy-eyeballs connect");
});

test("permanent: bad data, missing objects and privileges, programming errors", (t) => {
  for (const code of ["23505", "23514", "23503", "23502", "22P02", "22001", "42703", "42501", "42P01", "XX000"]) {
    t.false(isTransientError(pgError(code)), code);
  }
  t.false(isTransientError(new TypeError("cannot read properties of undefined")));
  t.false(isTransientError("a string"));
});

test("may have committed: only when the connection broke after the statement was sent", (t) => {
  t.true(mayHaveCommitted(new Error("Connection terminated unexpectedly")));
  t.true(mayHaveCommitted(nodeError("ECONNRESET")));
  t.true(mayHaveCommitted(nodeError("KT_ATTEMPT_TIMEOUT")));
  t.false(mayHaveCommitted(nodeError("ECONNREFUSED")), "never connected");
  t.false(mayHaveCommitted(new Error("timeout exceeded when trying to connect")), "never connected");
  t.false(mayHaveCommitted(pgError("57014")), "the server answered: rolled back");
  t.false(mayHaveCommitted(pgError("57P01")));
});

test("backoff: exponential from the base, no jitter; the default budget is 100 + 200 ms", (t) => {
  t.deepEqual(backoffSchedule({ attempts: 3, baseDelayMs: 100 }), [100, 200]);
  t.deepEqual(backoffSchedule({ attempts: 5, baseDelayMs: 50 }), [50, 100, 200, 400]);
  t.deepEqual(backoffSchedule({ attempts: 1, baseDelayMs: 100 }), []);
  t.is(backoffDelay({ attempts: 3, baseDelayMs: 100 }, 2), 200);
});

test("errors are described with their code", (t) => {
  t.is(describeError(pgError("57014")), "57014: server says 57014");
  t.is(describeError(new Error("Connection terminated unexpectedly")), "Connection terminated unexpectedly");
});
