// The logs of a busy run, at debug level, hold no secret: no API key, no key
// hash, no admin, metrics or upstream token, nor the "first 4 ... last 4" of
// any of them. The run goes through every path that logs about credentials:
// good, wrong, malformed, revoked and development keys, the admin token on
// every route, a failing upstream, and a database outage (lookups failing,
// rows spooled and replayed).
import { createHash } from "node:crypto";

import test from "ava";

import { client } from "../helpers/chat.js";
import { createKey, createTestDb, createUser, type TestDb } from "../helpers/db.js";
import { startFakeUpstream, type FakeUpstream } from "../helpers/fakeUpstream.js";
import { waitFor } from "../helpers/poll.js";
import { captureLog, PgProxy } from "../helpers/recording.js";
import { ADMIN_TOKEN, graphql, startTestServer } from "../helpers/server.js";

const METRICS_TOKEN = "metrics-secret-token-0123456789abcdefABCDEF";
const UPSTREAM_KEY = "sk-upstream-secret-0123456789abcdefABCDEF";

let db: TestDb;
let fake: FakeUpstream;
test.before(async () => {
  db = await createTestDb();
  fake = await startFakeUpstream();
});
test.after.always(async () => {
  await fake?.close();
  await db?.drop();
});

const messages = [{ role: "user" as const, content: "hello" }];
const quietly = <T>(p: Promise<T>) => p.catch(() => null);

test("a debug-level log of every credential path holds no key, hash or token", async (t) => {
  const capture = captureLog("debug");
  const proxy = await PgProxy.start(db.ownerUrl);
  const server = await startTestServer(db, {
    DATABASE_URL: proxy.url,
    LOG_LEVEL: "debug",
    METRICS_TOKEN,
    UPSTREAM_BASE_URL: fake.url,
    UPSTREAM_API_KEY: UPSTREAM_KEY,
    AUTH_CACHE_TTL_MS: "0",
    RECORD_RETRY_ATTEMPTS: "1",
  }, { log: capture.log });
  const user = await createUser(db, "secrets@example.com");
  const good = await createKey(db, user, "good");
  const revoked = await createKey(db, user, "revoked");
  await db.owner.query("select app_public.revoke_api_key($1)", [revoked.id]);
  const wrong = `kt_live_${"f".repeat(64)}`;
  const odd = "not-a-keytrack-key-but-secret-0123456789";
  const presented = [good.secret, revoked.secret, wrong, odd, ADMIN_TOKEN, `dev_local_${user}_local_development`];
  try {
    for (const token of presented) {
      await quietly(client(server, token).chat.completions.create({ model: "fake-ok", messages }));
      await quietly(client(server, token).chat.completions.create({ model: "fake-500", messages }));
      await quietly(client(server, token).chat.completions.create({ model: "fake-401", messages }));
      await graphql(server, "{ allApiKeys { totalCount } }", {}, token);
      await fetch(`${server.url}/admin/monitoring/api-key-tracking-quality`, { headers: { authorization: `Bearer ${token}` } });
      await fetch(`${server.url}/metrics`, { headers: { authorization: `Bearer ${token}` } });
      await fetch(`${server.url}/v1/models`, { headers: { authorization: `Bearer ${token}` } });
    }
    await fetch(`${server.url}/metrics`, { headers: { authorization: `Bearer ${METRICS_TOKEN}` } });
    await fetch(`${server.url}/graphql`, { method: "POST", headers: { authorization: `Basic ${good.secret}`, "content-type": "application/json" }, body: "{}" });

    // An outage: lookups fail, the served row is spooled, then replayed.
    await proxy.down();
    for (const token of presented) await quietly(client(server, token).chat.completions.create({ model: "fake-ok", messages }));
    await fetch(`${server.url}/health`);
    await proxy.up();
    await waitFor("the spool to drain", async () => /^keytrack_spool_depth 0$/m.test(
      await (await fetch(`${server.url}/metrics`, { headers: { authorization: `Bearer ${METRICS_TOKEN}` } })).text()));
  } finally {
    await server.close();
    await proxy.down();
  }

  const text = capture.lines.join("\n");
  t.true(capture.lines.length > 20, `${capture.lines.length} log lines`);
  const secrets = [...presented, METRICS_TOKEN, UPSTREAM_KEY];
  const leaks: string[] = [];
  for (const secret of secrets) {
    const hash = createHash("sha256").update(secret, "utf8").digest();
    const forms = {
      secret,
      "its hash (hex)": hash.toString("hex"),
      "its hash (base64)": hash.toString("base64"),
      "its first and last 4": `${secret.slice(0, 4)}...${secret.slice(-4)}`,
      // (The development key's tail is the fixed "_local_development": not secret.)
      ...(secret.startsWith("dev_local_") ? {} : { "its tail": secret.slice(-12) }),
    };
    for (const [what, form] of Object.entries(forms)) {
      if (text.includes(form)) leaks.push(`${what} of ${secret.slice(0, 6)}…: ${capture.lines.find((l) => l.includes(form))?.slice(0, 200)}`);
    }
  }
  t.deepEqual(leaks, []);
});
