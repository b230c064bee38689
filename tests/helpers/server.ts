// Starts the real service in-process on a test database (port chosen by the OS).
import { mkdtempSync, rmSync } from "node:fs";
import { rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { loadConfig } from "../../server/config.js";
import { withDatabaseName } from "../../server/db/urls.js";
import { startServer, type RunningServer, type StartServerOptions } from "../../server/main.js";
import type { TestDb } from "./db.js";

export const ADMIN_TOKEN = "test-admin-token-0123456789abcdef0123";

const madeDirs: string[] = [];

/**
 * A fresh data folder (KEYTRACK_DATA_DIR: the spool), so several servers or
 * recorders can run in one process; removeTempDataDirs() deletes every one made
 * (test.after.always).
 */
export function tempDataDir(): string {
  const dir = mkdtempSync(path.join(os.tmpdir(), "keytrack-data-"));
  madeDirs.push(dir);
  return dir;
}

export async function removeTempDataDirs(): Promise<void> {
  for (const dir of madeDirs.splice(0)) await rm(dir, { recursive: true, force: true });
}

export async function startTestServer(
  db: TestDb,
  env: Record<string, string> = {},
  options: StartServerOptions = {},
): Promise<RunningServer> {
  // Each server gets a data folder (spool) of its own unless the test names one
  // (e.g. to restart on the same spool); ours is removed when the server closes.
  const ownDataDir = env.KEYTRACK_DATA_DIR ? null : tempDataDir();
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
      // /health's database budget (2 s in production) must not race a busy machine in tests.
      HEALTH_TIMEOUT_MS: "60000",
      ...env,
    }),
    options,
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
