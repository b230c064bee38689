// Development mode end to end: the service creates the spec's dev user and key
// once at start-up and prints the key; requests without credentials are
// attributed to it; when creating it fails, the bypass key is used and its rows
// are recorded as failures with their own reason; outside development no dev
// key is created and dev_local_ keys are refused.
import test from "ava";
import { createHash } from "node:crypto";
import type { RunningServer } from "../../server/main.js";
import { rowOf } from "../helpers/chat.js";
import { createTestDb, type TestDb } from "../helpers/db.js";
import { startTestServer } from "../helpers/server.js";

let db: TestDb;
test.before(async () => {
  db = await createTestDb();
});
test.after.always(async () => {
  await db?.drop();
});

const sha256 = (s: string) => createHash("sha256").update(s, "utf8").digest();

/** Starts the service with the chat endpoints, capturing what it prints on stdout. */
async function start(env: Record<string, string>): Promise<{ server: RunningServer; printed: string }> {
  const write = process.stdout.write.bind(process.stdout);
  let printed = "";
  process.stdout.write = ((chunk: string | Uint8Array, ...rest: unknown[]) => {
    printed += String(chunk);
    return (write as (...a: unknown[]) => boolean)(chunk, ...rest);
  }) as typeof process.stdout.write;
  try {
    const server = await startTestServer(db, env);
    return { server, printed };
  } finally {
    process.stdout.write = write;
  }
}

async function chatWithoutCredentials(server: RunningServer, headers: Record<string, string> = {}) {
  return fetch(`${server.url}/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: JSON.stringify({ model: "gpt-3.5-turbo", messages: [{ role: "user", content: "test" }] }),
  });
}

test.serial("outside development no dev key is created and dev_local_ keys are refused", async (t) => {
  const { server } = await start({ APP_ENV: "production", ALLOW_ANONYMOUS: "false" });
  try {
    const { rows } = await db.owner.query("select count(*)::int as n from app_public.users where email = 'dev@localhost'");
    t.is(rows[0].n, 0);
    const res = await chatWithoutCredentials(server);
    t.is(res.status, 401);
  } finally {
    await server.close();
  }
});

test.serial("development: the dev key is created once, printed, and requests without credentials are attributed to it", async (t) => {
  const first = await start({ APP_ENV: "development" });
  let key: string;
  try {
    const match = /(dev_local_([0-9a-f-]{36})_local_development)/.exec(first.printed);
    t.truthy(match, "the key is printed at start-up");
    key = match![1]!;
    const { rows: [user] } = await db.owner.query("select id from app_public.users where email = 'dev@localhost'");
    t.is(match![2], user.id);
    const { rows: [stored] } = await db.root.query(
      `select k.id, k.environment, s.key_hash from app_public.api_keys k join app_private.api_key_secrets s on s.api_key_id = k.id
        where k.user_id = $1`, [user.id]);
    t.is(stored.environment, "development");
    t.deepEqual(stored.key_hash, sha256(key), "stored hashed like any key");

    const res = await chatWithoutCredentials(first.server);
    t.is(res.status, 200);
    const row = await rowOf(db, res.headers.get("x-request-id")!);
    t.like(row, { api_key_id: stored.id, user_id: user.id, is_anonymous: false, attribution_status: "resolved" });
    t.is((await db.owner.query("select attribution_method from app_public.chat_completion_requests where request_id = $1",
      [res.headers.get("x-request-id")])).rows[0].attribution_method, "dev");
  } finally {
    await first.server.close();
  }
  // A second start reuses the same user and key.
  const second = await start({ APP_ENV: "development" });
  try {
    t.true(second.printed.includes(key!));
    const { rows } = await db.owner.query(
      "select count(*)::int as n from app_public.api_keys k join app_public.users u on u.id = k.user_id where u.email = 'dev@localhost'");
    t.is(rows[0].n, 1);
  } finally {
    await second.server.close();
  }
  // The real dev key is refused outside development, although it exists.
  const prod = await start({ APP_ENV: "production", ALLOW_ANONYMOUS: "true" });
  try {
    const res = await chatWithoutCredentials(prod.server, { authorization: `Bearer ${key!}` });
    t.is(res.status, 401);
  } finally {
    await prod.server.close();
  }
});

test.serial("development when the dev key cannot be made: the bypass key, recorded as failed with reason dev_bypass", async (t) => {
  // A revoked dev key makes get_or_create_dev_api_key() fail (28000).
  await db.owner.query(
    "update app_public.api_keys set revoked_at = now() where user_id = (select id from app_public.users where email = 'dev@localhost')");
  const { server, printed } = await start({ APP_ENV: "development" });
  try {
    t.false(/dev_local_/.test(printed));
    const res = await chatWithoutCredentials(server);
    t.is(res.status, 200);
    const row = await rowOf(db, res.headers.get("x-request-id")!);
    t.like(row, { api_key_id: null, is_anonymous: false, attribution_status: "failed", attribution_reason: "dev_bypass" });
    t.deepEqual(row.api_key_hash, sha256("local-dev-bypass-key"));
  } finally {
    await server.close();
  }
});
