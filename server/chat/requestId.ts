/**
 * Request ids: UUIDv7 (RFC 9562), so the id carries the request's arrival time
 * (the row's created_at) and sorts by it. Always generated here, never taken from
 * the client: a client that reused an id would make the ledger skip its later
 * requests (re-recording a request_id is a no-op).
 */
import { randomBytes } from "node:crypto";

export function uuidv7(at: Date = new Date()): string {
  const b = randomBytes(16);
  const ms = BigInt(at.getTime());
  for (let i = 0; i < 6; i++) b[i] = Number((ms >> BigInt(8 * (5 - i))) & 0xffn);
  b[6] = (b[6]! & 0x0f) | 0x70; // version 7
  b[8] = (b[8]! & 0x3f) | 0x80; // variant 10
  const h = b.toString("hex");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}
