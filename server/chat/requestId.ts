/**
 * Request ids: UUIDv7 (RFC 9562), so the id carries the request's arrival time
 * (the row's created_at) and sorts by it. Always generated here, never taken from
 * the client: a client that reused an id would make the ledger skip its later
 * requests (re-recording a request_id is a no-op).
 *
 * The random bits come from a pool filled 256 ids at a time (as
 * crypto.randomUUID does): one call into OpenSSL per request was ~1.5% of the
 * gateway's CPU under load.
 */
import { randomFillSync } from "node:crypto";

const POOL_IDS = 256;
const pool = Buffer.alloc(16 * POOL_IDS);
let next = POOL_IDS;

export function uuidv7(at: Date = new Date()): string {
  if (next === POOL_IDS) {
    randomFillSync(pool);
    next = 0;
  }
  const b = Buffer.from(pool.subarray(16 * next, 16 * next + 16));
  next++;
  let ms = at.getTime();
  for (let i = 5; i >= 0; i--) {
    b[i] = ms % 256;
    ms = Math.floor(ms / 256);
  }
  b[6] = (b[6]! & 0x0f) | 0x70; // version 7
  b[8] = (b[8]! & 0x3f) | 0x80; // variant 10
  const h = b.toString("hex");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}
