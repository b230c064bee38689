// Shared by the chat tests: a server with the chat endpoints, the ledger row
// of a request (recorded after the response, so polled), and clients.
import { mkdtempSync } from "node:fs";
import os from "node:os";
import path from "node:path";

import OpenAI from "openai";

import { installChat } from "../../server/chat/installChat.js";
import type { RunningServer } from "../../server/main.js";
import type { TestDb } from "../helpers/db.js";
import { sleep, waitFor } from "../helpers/poll.js";
import { startTestServer } from "../helpers/server.js";

/** A data folder (spool) of its own, so several servers can run in one process. */
export const tempDataDir = () => mkdtempSync(path.join(os.tmpdir(), "keytrack-chat-"));

/** The service with the chat endpoints. */
export const startChatServer = (db: TestDb, env: Record<string, string> = {}) =>
  startTestServer(db, { KEYTRACK_DATA_DIR: tempDataDir(), ...env }, [installChat]);

export interface LedgerRow {
  request_id: string;
  api_key_id: string | null;
  user_id: string | null;
  is_anonymous: boolean;
  model: string | null;
  provider: string | null;
  input_tokens: number | null;
  output_tokens: number | null;
  processing_time_ms: number | null;
  status: string;
  error_message: string | null;
  api_key_hash: Buffer | null;
  attribution_status: string;
  attribution_reason: string | null;
}

export async function rowsFor(db: TestDb, requestId: string): Promise<LedgerRow[]> {
  const { rows } = await db.owner.query<LedgerRow>("select * from app_public.chat_completion_requests where request_id = $1", [requestId]);
  return rows;
}

/** Waits for the request's row; then checks that it stays the only one. */
export async function rowOf(db: TestDb, requestId: string): Promise<LedgerRow> {
  const rows = await waitFor(`the row of request ${requestId}`, async () => {
    const found = await rowsFor(db, requestId);
    if (found.length > 1) throw new Error(`${found.length} rows for request ${requestId}`);
    return found.length === 1 && found;
  });
  await sleep(100);
  const again = await rowsFor(db, requestId);
  if (again.length !== 1) throw new Error(`${again.length} rows for request ${requestId}`);
  return again[0] ?? rows[0]!;
}

/** The official client, without retries (each retry would be a request, and a row, of its own). */
export function client(server: RunningServer, apiKey: string | null): OpenAI {
  return new OpenAI({
    baseURL: `${server.url}/v1`,
    apiKey: apiKey ?? "unused",
    maxRetries: 0,
    timeout: 20_000,
    ...(apiKey === null ? { defaultHeaders: { Authorization: null } } : {}),
  });
}

export async function post(server: RunningServer, path: string, body: unknown, headers: Record<string, string> = {}): Promise<Response> {
  return fetch(`${server.url}${path}`, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
}
