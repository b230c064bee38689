/**
 * One request, exactly one row: a RequestEntry is opened when a request is
 * accepted (authenticated, valid) and settled once with its outcome, after the
 * response has ended. Recording runs off the client's critical path through the
 * one recording path (ctx.recorder: retries, then the durable spool, then
 * memory); its failures are logged (and counted by the recorder), never thrown.
 */
import type { AppContext } from "../context.js";
import type { RequestRecord } from "../recording/types.js";
import type { ChatIdentity } from "./identity.js";
import type { Outcome } from "./outcome.js";

export interface EntryInit {
  requestId: string;
  createdAt: Date;
  /** performance.now() when the request arrived. */
  startedAt: number;
  identity: ChatIdentity;
  model: string;
  provider: string;
}

/** The request's place in its serving process's numbering (completeness). */
export interface Numbered {
  processId: string;
  processSeq: number;
}

export function toRecord(init: EntryInit, outcome: Outcome, processingTimeMs: number, numbered: Numbered | null = null): RequestRecord {
  const id = init.identity;
  return {
    processId: numbered?.processId ?? null,
    processSeq: numbered?.processSeq ?? null,
    requestId: init.requestId,
    createdAt: init.createdAt,
    apiKeyHash: id.kind === "anonymous" ? null : id.apiKeyHash,
    apiKeyId: id.kind === "dev" ? id.apiKeyId : null,
    model: init.model,
    provider: init.provider,
    inputTokens: outcome.usage?.inputTokens ?? null,
    outputTokens: outcome.usage?.outputTokens ?? null,
    processingTimeMs,
    status: outcome.status,
    errorMessage: outcome.error,
    attributionReason: id.kind === "dev" ? id.attributionReason : null,
  };
}

export class RequestEntry {
  private settled = false;
  /** Resolves when the recording attempt is over (tests and shutdown may wait on it). */
  done: Promise<void> = Promise.resolve();

  /** Numbered when accepted, in the order of acceptance. */
  private readonly numbered: Numbered | null;

  constructor(
    private readonly ctx: AppContext,
    readonly init: EntryInit,
  ) {
    const p = ctx.servingProcess;
    this.numbered = p ? { processId: p.id, processSeq: p.nextSeq() } : null;
  }

  /** Records the row; only the first call counts. */
  settle(outcome: Outcome): void {
    if (this.settled) return;
    this.settled = true;
    const ms = Math.max(0, Math.round(performance.now() - this.init.startedAt));
    const row = toRecord(this.init, outcome, ms, this.numbered);
    const { log, recorder } = this.ctx;
    this.done = (async () => {
      try {
        const result = await recorder.record(row);
        if (result.outcome === "spooled") log.warn("request row spooled", { requestId: row.requestId, error: result.error });
        else if (result.outcome === "buffered") log.warn("request row held in memory (database and spool unavailable)", { requestId: row.requestId, error: result.error });
      } catch (err) {
        // Only the request id and the error: never the key, nor its hash.
        log.error("request row could not be recorded", { requestId: row.requestId, status: row.status, error: err });
      }
    })();
  }
}
