/**
 * The built-in `echo` model, a development aid answering when no upstream is
 * configured (UPSTREAM_BASE_URL unset) and ECHO_MODEL is on (the default
 * outside production), whatever model is asked for: it answers the last user
 * message back, with the token counts of tokens.ts. Chat completions and
 * Responses shapes, JSON or server-sent events (one token per delta, so the
 * chunks agree with the usage).
 *
 * Its answer is bounded: at most ECHO_MAX_OUTPUT_TOKENS tokens and
 * ECHO_MAX_OUTPUT_CHARS characters of the prompt are echoed (then
 * finish_reason "length"; Responses: status "incomplete", reason
 * max_output_tokens), so a body of commas cannot become a stream a hundred
 * times its size; streams are written event by event, with backpressure.
 */
import type express from "express";

import type { ClientConnection } from "./connection.js";
import { completed, type Outcome } from "./outcome.js";
import { SSE_HEADERS, sseData, sseEvent } from "./sse.js";
import { boundedTokens, chatPrompt, countTokens, responsesPrompt } from "./tokens.js";
import type { ValidRequest } from "./validate.js";

export const ECHO_MODEL = "echo";
export const ECHO_PROVIDER = "echo";
/** A fixed creation time for the model listing (2024-01-01). */
export const ECHO_CREATED = 1704067200;
/** The most tokens, and characters, the echo model answers with. */
export const ECHO_MAX_OUTPUT_TOKENS = 4096;
export const ECHO_MAX_OUTPUT_CHARS = 64 * 1024;

const compact = (requestId: string) => requestId.replace(/-/g, "");

function* chatEvents(id: string, created: number, pieces: string[], finish: string, usage: object, withUsage: boolean): Generator<string> {
  const base = { id, object: "chat.completion.chunk", created, model: ECHO_MODEL, system_fingerprint: null };
  const chunk = (delta: object, finishReason: string | null) => ({
    ...base,
    choices: [{ index: 0, delta, logprobs: null, finish_reason: finishReason }],
  });
  yield sseData(chunk({ role: "assistant", content: "", refusal: null }, null));
  for (const p of pieces) yield sseData(chunk({ content: p }, null));
  yield sseData(chunk({}, finish));
  if (withUsage) yield sseData({ ...base, choices: [], usage });
  yield sseData("[DONE]");
}

function responseObject(id: string, created: number, body: Record<string, unknown>, status: string, output: unknown[], usage: unknown) {
  return {
    id,
    object: "response",
    created_at: created,
    status,
    error: null,
    incomplete_details: status === "incomplete" ? { reason: "max_output_tokens" } : null,
    instructions: typeof body.instructions === "string" ? body.instructions : null,
    max_output_tokens: null,
    model: ECHO_MODEL,
    output,
    parallel_tool_calls: true,
    previous_response_id: null,
    reasoning: { effort: null, summary: null },
    store: false,
    temperature: 1,
    text: { format: { type: "text" } },
    tool_choice: "auto",
    tools: [],
    top_p: 1,
    truncation: "disabled",
    usage,
    user: null,
    metadata: {},
  };
}

function* responsesEvents(resp: ReturnType<typeof responseObject>, msgId: string, text: string, pieces: string[]): Generator<string> {
  let seq = 0;
  const ev = (type: string, fields: object) => sseEvent(type, { type, sequence_number: seq++, ...fields });
  const started = { ...resp, status: "in_progress", incomplete_details: null, output: [], usage: null };
  const part = { type: "output_text", text: "", annotations: [] };
  const item = { id: msgId, type: "message", status: "in_progress", role: "assistant", content: [] };
  const loc = { item_id: msgId, output_index: 0, content_index: 0 };
  const done = resp.output[0];
  yield ev("response.created", { response: started });
  yield ev("response.in_progress", { response: started });
  yield ev("response.output_item.added", { output_index: 0, item });
  yield ev("response.content_part.added", { ...loc, part });
  for (const delta of pieces) yield ev("response.output_text.delta", { ...loc, delta, logprobs: [] });
  yield ev("response.output_text.done", { ...loc, text, logprobs: [] });
  yield ev("response.content_part.done", { ...loc, part: { ...part, text } });
  yield ev("response.output_item.done", { output_index: 0, item: done });
  yield ev(resp.status === "incomplete" ? "response.incomplete" : "response.completed", { response: resp });
}

/** Writes a stream event by event, waiting for the client's socket to drain (a client gone throws ClientGone). */
async function writeStream(conn: ClientConnection, events: Iterable<string>): Promise<void> {
  conn.startStream(200, { ...SSE_HEADERS });
  for (const event of events) await conn.write(event);
  conn.end();
}

export async function serveEcho(
  request: ValidRequest,
  requestId: string,
  res: express.Response,
  conn: ClientConnection,
): Promise<Outcome> {
  const created = Math.floor(Date.now() / 1000);
  const prompt = request.kind === "chat" ? chatPrompt(request.body) : responsesPrompt(request.body);
  const { text, pieces, truncated } = boundedTokens(prompt.answer, ECHO_MAX_OUTPUT_TOKENS, ECHO_MAX_OUTPUT_CHARS);
  const inputTokens = prompt.inputTokens;
  const outputTokens = countTokens(text);
  const total = inputTokens + outputTokens;
  const outcome = completed({ inputTokens, outputTokens });

  if (request.kind === "chat") {
    const id = `chatcmpl-${compact(requestId)}`;
    const usage = { prompt_tokens: inputTokens, completion_tokens: outputTokens, total_tokens: total };
    const finish = truncated ? "length" : "stop";
    if (request.stream) {
      await writeStream(conn, chatEvents(id, created, pieces, finish, usage, request.clientWantsUsage));
    } else {
      res.json({
        id,
        object: "chat.completion",
        created,
        model: ECHO_MODEL,
        system_fingerprint: null,
        choices: [{ index: 0, message: { role: "assistant", content: text, refusal: null }, logprobs: null, finish_reason: finish }],
        usage,
      });
    }
    return outcome;
  }

  const msgId = `msg_${compact(requestId)}`;
  const message = {
    id: msgId,
    type: "message",
    status: truncated ? "incomplete" : "completed",
    role: "assistant",
    content: [{ type: "output_text", text, annotations: [] }],
  };
  const usage = {
    input_tokens: inputTokens,
    input_tokens_details: { cached_tokens: 0 },
    output_tokens: outputTokens,
    output_tokens_details: { reasoning_tokens: 0 },
    total_tokens: total,
  };
  const resp = responseObject(`resp_${compact(requestId)}`, created, request.body, truncated ? "incomplete" : "completed", [message], usage);
  if (request.stream) {
    await writeStream(conn, responsesEvents(resp, msgId, text, pieces));
  } else {
    res.json(resp);
  }
  return outcome;
}
