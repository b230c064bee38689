// The one recording path's contract: every request row the service writes goes
// through a Recorder (retries transient failures, spools what it cannot write,
// replays the spool in order). Implemented in server/recording/recorder.ts.

export type RequestStatus = "completed" | "failed" | "partial";

/** One chat request, as the service recorded it. Column names in comments. */
export interface RequestRecord {
  /** request_id: unique per request; re-recording the same id is a no-op. */
  requestId: string;
  /** created_at: when the request arrived. */
  createdAt: Date;
  /** api_key_hash: sha256(utf8 key) of the presented key, or null (anonymous). Never the key. */
  apiKeyHash: Buffer | null;
  /** api_key_id: when the service already knows it (e.g. the dev key); the trigger derives the rest. */
  apiKeyId?: string | null;
  /** user_id: only for writers that know the user but not the key. */
  userId?: string | null;
  model: string | null;
  provider: string | null;
  inputTokens: number | null;
  outputTokens: number | null;
  processingTimeMs: number | null;
  status: RequestStatus;
  errorMessage: string | null;
  /** attribution_reason: only `dev_bypass` is honoured by the trigger (dev key creation failed). */
  attributionReason?: "dev_bypass" | null;
}

export type RecordOutcome =
  /** Written now (after `attempts` tries). */
  | { outcome: "recorded"; attempts: number }
  /** The request id was already recorded: nothing changed. */
  | { outcome: "duplicate"; attempts: number }
  /** The database could not take it; it is in the durable spool and will be replayed. */
  | { outcome: "spooled"; attempts: number; error: string };

export interface Recorder {
  /** Resolves once the row is in the database or durably (fsynced) in the spool. Rejects only for permanent errors (bad data). */
  record(row: RequestRecord): Promise<RecordOutcome>;
  /** Rows waiting in the spool. */
  spoolDepth(): number;
  /** Replays the spool now (also done automatically); resolves with how many rows were written. */
  replay(): Promise<number>;
  /** Stops timers; the spool stays on disk for the next start. */
  close(): Promise<void>;
}

/** A permanent error: the row itself is bad (constraint violation), retrying cannot help. */
export class PermanentRecordError extends Error {
  constructor(message: string, readonly code: string | undefined, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "PermanentRecordError";
  }
}
