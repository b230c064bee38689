// The one recording path. (First version: a direct insert; retries and the
// durable spool follow.)
import type pg from "pg";
import type { Logger } from "../log.js";
import { PermanentRecordError, type RecordOutcome, type Recorder, type RequestRecord } from "./types.js";

export interface RecorderOptions {
  pool: pg.Pool;
  /** Folder for the durable spool (KEYTRACK_DATA_DIR). */
  dataDir: string;
  log: Logger;
}

export const INSERT_REQUEST_SQL = `
  insert into app_public.chat_completion_requests
    (request_id, created_at, api_key_hash, api_key_id, user_id, model, provider, input_tokens,
     output_tokens, processing_time_ms, status, error_message, attribution_reason)
  values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)`;

export function insertValues(r: RequestRecord): unknown[] {
  return [
    r.requestId, r.createdAt, r.apiKeyHash, r.apiKeyId ?? null, r.userId ?? null, r.model, r.provider,
    r.inputTokens, r.outputTokens, r.processingTimeMs, r.status, r.errorMessage, r.attributionReason ?? null,
  ];
}

export function createRecorder(options: RecorderOptions): Recorder {
  return {
    async record(row: RequestRecord): Promise<RecordOutcome> {
      try {
        const res = await options.pool.query(INSERT_REQUEST_SQL, insertValues(row));
        return { outcome: res.rowCount ? "recorded" : "duplicate", attempts: 1 };
      } catch (err) {
        const code = (err as { code?: string }).code;
        throw new PermanentRecordError(`request ${row.requestId} could not be recorded: ${(err as Error).message}`, code, { cause: err });
      }
    },
    spoolDepth: () => 0,
    replay: async () => 0,
    close: async () => {},
  };
}
