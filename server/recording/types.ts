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
  /** process_id, process_seq: the serving process that accepted the request and its number there (completeness). */
  processId?: string | null;
  processSeq?: number | null;
}

export type RecordOutcome =
  /** Written now (after `attempts` tries). */
  | { outcome: "recorded"; attempts: number }
  /** The request id was already recorded: nothing changed. */
  | { outcome: "duplicate"; attempts: number }
  /** The database could not take it; it is in the durable spool and will be replayed. */
  | { outcome: "spooled"; attempts: number; error: string }
  /**
   * Neither the database nor the spool could take it (database down and disk
   * full): it is held in memory and retried (both) until one takes it. Not
   * durable: while any row is held, accepting() is false.
   */
  | { outcome: "buffered"; attempts: number; error: string };

/**
 * Why a served request's row is not in the ledger (keytrack_record_dropped_total{reason}):
 *
 * - rejected_by_database: the database refused the row for good; kept in the
 *   spool's rejected.jsonl, from which an operator can recover it;
 * - corrupt_spool_line: a spool line that did not parse (or was torn by a crash
 *   mid-write); kept as raw text in rejected.jsonl;
 * - memory_full: neither the database nor the spool could take the row and the
 *   in-memory buffer was full: lost (logged);
 * - shutdown: still held in memory when the recorder closed, with neither the
 *   database nor the spool able to take it: lost (logged).
 */
export const DROP_REASONS = ["rejected_by_database", "corrupt_spool_line", "memory_full", "shutdown"] as const;
export type DropReason = (typeof DROP_REASONS)[number];

export interface Recorder {
  /**
   * Resolves once the row is in the database, durably (fsynced) in the spool,
   * or, when neither can take it, held in memory ("buffered", retried). Rejects
   * for a permanent error (PermanentRecordError: the database refuses the row;
   * it is kept in rejected.jsonl), when the memory buffer is full (the row is
   * lost, counted as memory_full), and after close().
   */
  record(row: RequestRecord): Promise<RecordOutcome>;
  /** Rows waiting in the spool. */
  spoolDepth(): number;
  /** Rows held in memory because neither the database nor the spool could take them. */
  bufferedRows(): number;
  /**
   * Whether a new request may be served: false while rows are held in memory
   * (neither the database nor the spool works) and after close(). The gateway
   * answers 503 before serving while it is false.
   */
  accepting(): boolean;
  /** Rows that are not in the ledger, by reason, since the recorder started (reasons with none are left out). */
  dropped(): Partial<Record<DropReason, number>>;
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
