/**
 * Token usage and outcome, read from upstream answers: a whole JSON body, or a
 * stream watched event by event (chat: the usage chunk that
 * stream_options.include_usage asks for, else the last chunk carrying usage;
 * responses: the usage of response.completed / incomplete / failed).
 */
import type { SseEvent } from "./sse.js";
import type { ChatKind } from "./validate.js";

export interface Usage {
  inputTokens: number | null;
  outputTokens: number | null;
}

type Json = Record<string, unknown>;
const isObject = (v: unknown): v is Json => typeof v === "object" && v !== null && !Array.isArray(v);

/** A token count the ledger accepts (a non-negative int4), else null. */
function tokens(v: unknown): number | null {
  return typeof v === "number" && Number.isInteger(v) && v >= 0 && v <= 2_147_483_647 ? v : null;
}

export function usageOf(kind: ChatKind, body: unknown): Usage | null {
  if (!isObject(body) || !isObject(body.usage)) return null;
  const u = body.usage;
  return kind === "chat"
    ? { inputTokens: tokens(u.prompt_tokens), outputTokens: tokens(u.completion_tokens) }
    : { inputTokens: tokens(u.input_tokens), outputTokens: tokens(u.output_tokens) };
}

/** The message of an OpenAI-shaped error body (`{error: {message}}` or `{message}`), if any. */
export function errorMessageOf(body: unknown): string | null {
  if (!isObject(body)) return null;
  const e = body.error;
  if (isObject(e) && typeof e.message === "string") return e.message;
  if (typeof e === "string") return e;
  return typeof body.message === "string" ? body.message : null;
}

function parse(data: string): unknown {
  try {
    return JSON.parse(data);
  } catch {
    return undefined;
  }
}

export class StreamWatch {
  usage: Usage | null = null;
  /** An error the upstream reported inside the stream. */
  error: string | null = null;
  /** The upstream said the answer is complete ([DONE], response.completed...). */
  finished = false;

  constructor(
    private readonly kind: ChatKind,
    private readonly clientWantsUsage: boolean,
  ) {}

  /** Notes what the event says; false when it must not reach the client (a usage chunk it did not ask for). */
  see(ev: SseEvent): boolean {
    if (ev.data === "") return true;
    if (this.kind === "chat") {
      if (ev.data.trim() === "[DONE]") {
        this.finished = true;
        return true;
      }
      const chunk = parse(ev.data);
      if (!isObject(chunk)) return true;
      if (chunk.error !== undefined) this.error = errorMessageOf(chunk) ?? "upstream stream error";
      const usage = usageOf("chat", chunk);
      if (usage) {
        this.usage = usage;
        const usageOnly = Array.isArray(chunk.choices) && chunk.choices.length === 0;
        if (usageOnly && !this.clientWantsUsage) return false;
      }
      return true;
    }
    const payload = parse(ev.data);
    if (!isObject(payload)) return true;
    const type = ev.event ?? (typeof payload.type === "string" ? payload.type : null);
    switch (type) {
      case "response.completed":
      case "response.incomplete":
        this.finished = true;
        this.usage = usageOf("responses", payload.response) ?? this.usage;
        break;
      case "response.failed":
        this.finished = true;
        this.usage = usageOf("responses", payload.response) ?? this.usage;
        this.error = (isObject(payload.response) && errorMessageOf(payload.response)) || "the upstream response failed";
        break;
      case "error":
        this.error = errorMessageOf(payload) ?? "upstream stream error";
        break;
    }
    return true;
  }
}
