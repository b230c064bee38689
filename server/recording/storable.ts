// What the ledger table accepts, applied to a row before it is written, so
// that no value the gateway can produce is refused by PostgreSQL (a refusal is
// permanent: the row would be lost to the ledger). migrations/schema.sql,
// app_public.chat_completion_requests:
//
//   text columns     PostgreSQL refuses NUL in text (SQLSTATE 22021): each NUL
//                    (and each lone UTF-16 surrogate, which has no UTF-8 form)
//                    becomes U+FFFD.
//   model, provider  CHECK (length(...) <= 200); error_message: no CHECK, kept
//                    to 2000 characters (an upstream can send megabytes). Cut
//                    in characters (code points, as PostgreSQL's length()
//                    counts), never inside a surrogate pair; a cut ends in "…".
//   input_tokens, output_tokens  integer, CHECK (>= 0): anything else is
//                    unknown (NULL); server/chat/usage.ts already reads only such
//                    counts, this is the last line of defence.
//   processing_time_ms  integer, CHECK (>= 0): rounded, clamped to 0..2^31-1.
//
// Left as they are: request_id (ours, and its identity: rewriting it would
// break exactly-once), api_key_hash (a sha256, 32 bytes), api_key_id and
// user_id (from the database), status and attribution_reason (closed sets).
// Whatever is still refused is a bug, kept in rejected.jsonl and counted.
import type { RequestRecord } from "./types.js";

export const MODEL_MAX_CHARS = 200;
export const PROVIDER_MAX_CHARS = 200;
export const ERROR_MESSAGE_MAX_CHARS = 2000;
export const INT4_MAX = 2_147_483_647;

/** NUL, or a surrogate that is not part of a pair. */
const UNSTORABLE = /\u0000|[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/g;

/** The text made storable: no NUL, no lone surrogate, at most maxChars code points. */
export function storableText(value: string | null, maxChars: number): string | null {
  if (value === null || value === undefined) return null;
  let text = String(value).replace(UNSTORABLE, "\uFFFD");
  // Code points never outnumber code units: only a long string can be too long.
  if (text.length > maxChars) {
    const points = Array.from(text);
    if (points.length > maxChars) text = points.slice(0, maxChars - 1).join("") + "…";
  }
  return text;
}

/** A token count the column takes (a non-negative int4), else null. */
function storableCount(value: number | null): number | null {
  return typeof value === "number" && Number.isInteger(value) && value >= 0 && value <= INT4_MAX ? value : null;
}

function storableDuration(value: number | null): number | null {
  if (typeof value !== "number" || !Number.isFinite(value)) return null;
  return Math.min(INT4_MAX, Math.max(0, Math.round(value)));
}

/** The row with every value the table could refuse made storable; the same object when nothing changes. */
export function storableRecord(r: RequestRecord): RequestRecord {
  const model = storableText(r.model, MODEL_MAX_CHARS);
  const provider = storableText(r.provider, PROVIDER_MAX_CHARS);
  const errorMessage = storableText(r.errorMessage, ERROR_MESSAGE_MAX_CHARS);
  const inputTokens = storableCount(r.inputTokens);
  const outputTokens = storableCount(r.outputTokens);
  const processingTimeMs = storableDuration(r.processingTimeMs);
  if (
    model === r.model && provider === r.provider && errorMessage === r.errorMessage &&
    inputTokens === r.inputTokens && outputTokens === r.outputTokens && processingTimeMs === r.processingTimeMs
  ) {
    return r;
  }
  return { ...r, model, provider, errorMessage, inputTokens, outputTokens, processingTimeMs };
}
