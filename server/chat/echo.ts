/**
 * The built-in `echo` model, a development aid answering when no upstream is
 * configured (UPSTREAM_BASE_URL unset), whatever model is asked for: it answers
 * the last user message back, with the token counts of tokens.ts. Chat
 * completions and Responses shapes, JSON or server-sent events (one token per
 * delta, so the chunks agree with the usage).
 */
import type express from "express";

import type { ClientConnection } from "./connection.js";
import { completed, type Outcome } from "./outcome.js";
import { SSE_HEADERS, sseData, sseEvent } from "./sse.js";
import { chatPrompt, responsesPrompt, splitTokens, countTokens } from "./tokens.js";
import type { ValidRequest } from "./validate.js";

export const ECHO_MODEL = "echo";
export const ECHO_PROVIDER = "echo";
/** A fixed creation time for the model listing (2024-01-01). */
export const ECHO_CREATED = 1704067200;

const compact = (requestId: string) => requestId.replace(/-/g, "");

function chatEvents(id: string, created: number, pieces: string[], usage: object, withUsage: boolean): string {
  const base = { id, object: "chat.completion.chunk", created, model: ECHO_MODEL, system_fingerprint: null };
  const chunk = (delta: object, finish: string | null) => ({
    ...base,
    choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }],
  });
  const out = [sseData(chunk({ role: "assistant", content: "", refusal: null }, null))];
  for (const p of pieces) out.push(sseData(chunk({ content: p }, null)));
  out.push(sseData(chunk({}, "stop")));
  if (withUsage) out.push(sseData({ ...base, choices: [], usage }));
  out.push(sseData("[DONE]"));
  return out.join("");
}

function responseObject(id: string, created: number, body: Record<string, unknown>, status: string, output: unknown[], usage: unknown) {
  return {
    id,
    object: "response",
    created_at: created,
    status,
    error: null,
    incomplete_details: null,
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

function responsesEvents(resp: ReturnType<typeof responseObject>, msgId: string, text: string, pieces: string[]): string {
  let seq = 0;
  const ev = (type: string, fields: object) => sseEvent(type, { type, sequence_number: seq++, ...fields });
  const started = { ...resp, status: "in_progress", output: [], usage: null };
  const part = { type: "output_text", text: "", annotations: [] };
  const item = { id: msgId, type: "message", status: "in_progress", role: "assistant", content: [] };
  const loc = { item_id: msgId, output_index: 0, content_index: 0 };
  const done = resp.output[0];
  const out = [
    ev("response.created", { response: started }),
    ev("response.in_progress", { response: started }),
    ev("response.output_item.added", { output_index: 0, item }),
    ev("response.content_part.added", { ...loc, part }),
  ];
  for (const delta of pieces) out.push(ev("response.output_text.delta", { ...loc, delta, logprobs: [] }));
  out.push(
    ev("response.output_text.done", { ...loc, text, logprobs: [] }),
    ev("response.content_part.done", { ...loc, part: { ...part, text } }),
    ev("response.output_item.done", { output_index: 0, item: done }),
    ev("response.completed", { response: resp }),
  );
  return out.join("");
}

export async function serveEcho(
  request: ValidRequest,
  requestId: string,
  res: express.Response,
  conn: ClientConnection,
): Promise<Outcome> {
  const created = Math.floor(Date.now() / 1000);
  const prompt = request.kind === "chat" ? chatPrompt(request.body) : responsesPrompt(request.body);
  const text = prompt.answer;
  const pieces = splitTokens(text);
  const inputTokens = prompt.inputTokens;
  const outputTokens = countTokens(text);
  const total = inputTokens + outputTokens;
  const outcome = completed({ inputTokens, outputTokens });

  if (request.kind === "chat") {
    const id = `chatcmpl-${compact(requestId)}`;
    const usage = { prompt_tokens: inputTokens, completion_tokens: outputTokens, total_tokens: total };
    if (request.stream) {
      conn.startStream(200, { ...SSE_HEADERS });
      await conn.write(chatEvents(id, created, pieces, usage, request.clientWantsUsage));
      conn.end();
    } else {
      res.json({
        id,
        object: "chat.completion",
        created,
        model: ECHO_MODEL,
        system_fingerprint: null,
        choices: [{ index: 0, message: { role: "assistant", content: text, refusal: null }, logprobs: null, finish_reason: "stop" }],
        usage,
      });
    }
    return outcome;
  }

  const msgId = `msg_${compact(requestId)}`;
  const message = {
    id: msgId,
    type: "message",
    status: "completed",
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
  const resp = responseObject(`resp_${compact(requestId)}`, created, request.body, "completed", [message], usage);
  if (request.stream) {
    conn.startStream(200, { ...SSE_HEADERS });
    await conn.write(responsesEvents(resp, msgId, text, pieces));
    conn.end();
  } else {
    res.json(resp);
  }
  return outcome;
}
