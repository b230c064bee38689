// Starts the real service in-process on a test database (port chosen by the OS).
import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { loadConfig } from "../../server/config.js";
import { withDatabaseName } from "../../server/db/urls.js";
import type { Installer } from "../../server/app.js";
import { startServer, type RunningServer } from "../../server/main.js";
import type { TestDb } from "./db.js";

export const ADMIN_TOKEN = "test-admin-token-0123456789abcdef0123";

export async function startTestServer(
  db: TestDb,
  env: Record<string, string> = {},
  installers: Installer[] = [],
): Promise<RunningServer> {
  // Each server gets a data folder (spool) of its own unless the test names one
  // (e.g. to restart on the same spool); ours is removed when the server closes.
  const ownDataDir = env.KEYTRACK_DATA_DIR ? null : mkdtempSync(path.join(os.tmpdir(), "keytrack-server-"));
  const server = await startServer(
    loadConfig({
      ...(ownDataDir ? { KEYTRACK_DATA_DIR: ownDataDir } : {}),
      DATABASE_URL: db.ownerUrl,
      ROOT_DATABASE_URL: withDatabaseName(db.rootUrl, "postgres"),
      AUTH_DATABASE_URL: db.authUrl,
      PORT: "0",
      HOST: "127.0.0.1",
      APP_ENV: "test",
      ADMIN_API_KEY: ADMIN_TOKEN,
      WORKER: "false",
      LOG_LEVEL: "error",
      ...env,
    }),
    { installers },
  ).catch((err) => {
    if (ownDataDir) rmSync(ownDataDir, { recursive: true, force: true });
    throw err;
  });
  if (!ownDataDir) return server;
  return {
    ...server,
    close: async () => {
      await server.close();
      rmSync(ownDataDir, { recursive: true, force: true });
    },
  };
}

export interface GraphQLResult {
  status: number;
  body: { data?: Record<string, any> | null; errors?: Array<{ message: string; extensions?: { code?: string } }> };
}

export async function graphql(
  server: RunningServer,
  query: string,
  variables: Record<string, unknown> = {},
  token?: string,
): Promise<GraphQLResult> {
  const res = await fetch(`${server.url}/graphql`, {
    method: "POST",
    headers: { "content-type": "application/json", ...(token ? { authorization: `Bearer ${token}` } : {}) },
    body: JSON.stringify({ query, variables }),
  });
  return { status: res.status, body: (await res.json()) as GraphQLResult["body"] };
}
