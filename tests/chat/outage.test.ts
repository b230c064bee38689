// A short database outage is invisible to keys the gateway verified recently:
// while PostgreSQL cannot be reached, such a key is served from its last known
// good answer (AUTH_STALE_MAX_MS), its row goes to the spool with the key's hash
// and lands, attributed, when the database is back; a key known to be revoked
// stays refused, and an unknown key gets 503. "Down" is a TCP proxy in front of
// the test database.
import test from "ava";
import OpenAI from "openai";

import type { RunningServer } from "../../server/main.js";
import { client, rowOf } from "../helpers/chat.js";
import { createKey, createTestDb, createUser, type TestDb } from "../helpers/db.js";
import { waitFor } from "../helpers/poll.js";
import { PgProxy } from "../helpers/recording.js";
import { startTestServer } from "../helpers/server.js";

let db: TestDb;
let proxy: PgProxy;
let server: RunningServer;

test.before(async () => {
  db = await createTestDb();
  proxy = await PgProxy.start(db.ownerUrl);
  server = await startTestServer(db, {
    DATABASE_URL: proxy.url,
    // Every lookup goes to the database while it answers: the stale answer is the outage's doing only.
    AUTH_CACHE_TTL_MS: "0",
    AUTH_STALE_MAX_MS: "900000",
    RECORD_RETRY_ATTEMPTS: "2",
    RECORD_RETRY_BASE_MS: "10",
  });
});
test.after.always(async () => {
  await proxy?.up();
  await server?.close();
  await proxy?.down();
  await db?.drop();
});

const messages = [{ role: "user" as const, content: "during the outage" }];

test.serial("database down: a recently verified key is served and its row lands, attributed, after the outage", async (t) => {
  const user = await createUser(db, "outage@example.com");
  const good = await createKey(db, user, "verified");
  const revoked = await createKey(db, user, "revoked");
  await db.owner.query("select app_public.revoke_api_key($1)", [revoked.id]);

  // Verified while the database answers.
  await client(server, good.secret).chat.completions.create({ model: "echo", messages });
  await t.throwsAsync(client(server, revoked.secret).chat.completions.create({ model: "echo", messages }), { instanceOf: OpenAI.AuthenticationError });

  await proxy.down();
  const { response } = await client(server, good.secret).chat.completions.create({ model: "echo", messages }).withResponse();
  const servedId = response.headers.get("x-request-id")!;
  const revokedErr = await t.throwsAsync(client(server, revoked.secret).chat.completions.create({ model: "echo", messages }), { instanceOf: OpenAI.AuthenticationError });
  t.is(revokedErr.code, "api_key_revoked", "known to be revoked: still refused");
  const unknown = await t.throwsAsync(client(server, `kt_live_${"0".repeat(64)}`).chat.completions.create({ model: "echo", messages }), { instanceOf: OpenAI.InternalServerError });
  t.is(unknown.status, 503, "never seen: cannot be verified");

  const metrics = await (await fetch(`${server.url}/metrics`)).text();
  t.regex(metrics, /^keytrack_auth_stale_total 1$/m);

  await proxy.up();
  const row = await waitFor("the spooled row to be replayed", async () => {
    try {
      return await rowOf(db, servedId);
    } catch {
      return null;
    }
  });
  t.like(row, { api_key_id: good.id, user_id: user, attribution_status: "resolved", status: "completed" });
  t.truthy(row.spooled_at, "it went through the spool");
});
