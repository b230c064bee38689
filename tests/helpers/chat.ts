// Shared by the chat tests: a server with the chat endpoints, the ledger row
// of a request (recorded after the response, so polled), and clients.
import OpenAI from "openai";

import type { RunningServer } from "../../server/main.js";
import { rowsFor, type LedgerRow, type TestDb } from "./db.js";
import { sleep, waitFor } from "./poll.js";


/** Waits for the request's row; then checks that it stays the only one. */
export async function rowOf(db: TestDb, requestId: string): Promise<LedgerRow> {
  const rows = await waitFor(`the row of request ${requestId}`, async () => {
    const found = await rowsFor(db.owner, [requestId]);
    if (found.length > 1) throw new Error(`${found.length} rows for request ${requestId}`);
    return found.length === 1 && found;
  });
  await sleep(100);
  const again = await rowsFor(db.owner, [requestId]);
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
