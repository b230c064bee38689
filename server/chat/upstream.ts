/**
 * Forwarding to the configured OpenAI-compatible upstream (UPSTREAM_BASE_URL,
 * as the official clients take it: e.g. https://api.openai.com/v1).
 *
 * - The client's body goes as is, with the gateway's UPSTREAM_API_KEY (the
 *   client's key never leaves keytrack). Chat streams ask for usage
 *   (stream_options.include_usage); the usage-only chunk is dropped again when
 *   the client did not ask for it.
 * - Streams pass through event by event as they arrive (at most one unfinished
 *   event is held), with backpressure from the client's socket.
 * - UPSTREAM_TIMEOUT_MS bounds every wait on the upstream: for its response
 *   headers, and between two reads of its body. Before the response started:
 *   504 upstream_timeout; mid-stream: an error event, then the end.
 * - The client going away aborts the upstream call (its connection is closed).
 * - Upstream unreachable or 5xx: 502; upstream 401/403 (the gateway's key): 502;
 *   other 4xx (bad model, rate limit...) pass through with their status.
 */
import type express from "express";

import type { Logger } from "../log.js";
import type { ClientConnection } from "./connection.js";
import { ApiError, sendError } from "../http/errors.js";
import { completed, failed, partial, type Outcome } from "./outcome.js";
import { SSE_HEADERS, SseParser, sseData, sseEvent } from "./sse.js";
import { errorMessageOf, StreamWatch, usageOf } from "./usage.js";
import type { ValidRequest } from "./validate.js";

export interface UpstreamTarget {
  /** Without a trailing slash, e.g. https://api.openai.com/v1. */
  baseUrl: string;
  apiKey: string | null;
  timeoutMs: number;
  /** Recorded as the row's provider: the upstream's host. */
  provider: string;
}

export function upstreamTarget(baseUrl: string, apiKey: string | null, timeoutMs: number): UpstreamTarget {
  return { baseUrl: baseUrl.replace(/\/+$/, ""), apiKey, timeoutMs, provider: new URL(baseUrl).host };
}

/** Aborts after `ms` without a touch(); paused while the gateway waits on the client, not the upstream. */
class IdleTimer {
  timedOut = false;
  private timer: NodeJS.Timeout | null = null;
  constructor(
    private readonly ms: number,
    private readonly onTimeout: () => void,
  ) {
    this.touch();
  }
  touch(): void {
    this.pause();
    this.timer = setTimeout(() => {
      this.timedOut = true;
      this.onTimeout();
    }, this.ms);
  }
  pause(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }
  stop(): void {
    this.pause();
  }
}

const MAX_ERROR_LENGTH = 1000;
const clip = (s: string) => (s.length > MAX_ERROR_LENGTH ? s.slice(0, MAX_ERROR_LENGTH) + "…" : s);

function describeFetchError(err: unknown): string {
  const e = err as { message?: string; cause?: { code?: string; message?: string } };
  const cause = e?.cause?.code ?? e?.cause?.message;
  return cause ? `${e.message ?? "fetch failed"} (${cause})` : (e?.message ?? String(err));
}

export function upstreamHeaders(target: UpstreamTarget, requestId: string, accept: string): Record<string, string> {
  const headers: Record<string, string> = { accept, "user-agent": "keytrack", "x-request-id": requestId };
  if (target.apiKey) headers.authorization = `Bearer ${target.apiKey}`;
  return headers;
}

function upstreamBody(request: ValidRequest): string {
  if (request.kind !== "chat" || !request.stream) return JSON.stringify(request.body);
  const so = request.body.stream_options;
  const options = typeof so === "object" && so !== null ? so : {};
  return JSON.stringify({ ...request.body, stream_options: { ...options, include_usage: true } });
}

/** Reads the whole body (non-streaming answers and errors), touching the timer on every read. */
async function readAll(body: ReadableStream<Uint8Array> | null, timer: IdleTimer): Promise<Buffer> {
  if (!body) return Buffer.alloc(0);
  const parts: Uint8Array[] = [];
  const reader = body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    timer.touch();
    parts.push(value);
  }
  return Buffer.concat(parts);
}

function parseJson(buf: Buffer): unknown {
  try {
    return JSON.parse(buf.toString("utf8"));
  } catch {
    return undefined;
  }
}

/** The client's answer to an upstream error status, and the row's error message. */
function upstreamFailure(status: number, body: unknown, raw: Buffer): { error: ApiError; passthrough: boolean; message: string } {
  const upstreamMessage = errorMessageOf(body) ?? (clip(raw.toString("utf8").trim()) || `HTTP ${status}`);
  const message = clip(`upstream HTTP ${status}: ${upstreamMessage}`);
  if (status >= 500) {
    return { error: new ApiError(502, `The upstream failed (HTTP ${status}): ${upstreamMessage}`, "upstream_error", "upstream_error"), passthrough: false, message };
  }
  if (status === 401 || status === 403) {
    return { error: new ApiError(502, "The upstream refused the gateway's credentials.", "upstream_error", "upstream_auth_failed"), passthrough: false, message };
  }
  const type = status === 429 ? "rate_limit_error" : "invalid_request_error";
  return { error: new ApiError(status, upstreamMessage, type, status === 429 ? "rate_limit_exceeded" : "upstream_rejected"), passthrough: errorMessageOf(body) !== null, message };
}

export async function forward(
  request: ValidRequest,
  target: UpstreamTarget,
  requestId: string,
  res: express.Response,
  conn: ClientConnection,
  log: Logger,
): Promise<Outcome> {
  const controller = new AbortController();
  const timer = new IdleTimer(target.timeoutMs, () => controller.abort(new Error("upstream timeout")));
  const onClientGone = () => controller.abort(conn.signal.reason);
  conn.signal.addEventListener("abort", onClientGone, { once: true });
  const path = request.kind === "chat" ? "/chat/completions" : "/responses";
  const timeoutMessage = (when: string) => `upstream timed out ${when} (no data for ${target.timeoutMs} ms)`;

  try {
    let upstream: Response;
    try {
      upstream = await fetch(target.baseUrl + path, {
        method: "POST",
        headers: {
          ...upstreamHeaders(target, requestId, request.stream ? "text/event-stream" : "application/json"),
          "content-type": "application/json",
        },
        body: upstreamBody(request),
        signal: controller.signal,
      });
    } catch (err) {
      if (conn.gone) return partial("client disconnected before the upstream answered");
      if (timer.timedOut) {
        sendError(res, new ApiError(504, `The upstream did not answer within ${target.timeoutMs} ms.`, "upstream_error", "upstream_timeout"));
        return failed(timeoutMessage("before answering"));
      }
      const why = describeFetchError(err);
      log.warn("upstream unreachable", { requestId, error: why });
      sendError(res, new ApiError(502, "The upstream is unreachable.", "upstream_error", "upstream_unavailable"));
      return failed(clip(`upstream unreachable: ${why}`));
    }
    timer.touch();
    const upstreamId = upstream.headers.get("x-request-id");
    if (upstreamId) res.set("x-upstream-request-id", upstreamId);

    const isStream = request.stream && (upstream.headers.get("content-type") ?? "").includes("text/event-stream");
    if (upstream.ok && isStream) return await passStream(request, upstream, conn, timer, timeoutMessage);

    // A whole body: a JSON answer or an error.
    let raw: Buffer;
    try {
      raw = await readAll(upstream.body, timer);
    } catch (err) {
      if (conn.gone) return partial("client disconnected before the upstream answered");
      const why = timer.timedOut ? timeoutMessage("while answering") : `upstream answer broke off: ${describeFetchError(err)}`;
      sendError(res, timer.timedOut
        ? new ApiError(504, `The upstream stopped answering for ${target.timeoutMs} ms.`, "upstream_error", "upstream_timeout")
        : new ApiError(502, "The upstream's answer broke off.", "upstream_error", "upstream_error"));
      return failed(clip(why));
    }
    const body = parseJson(raw);
    if (!upstream.ok) {
      const f = upstreamFailure(upstream.status, body, raw);
      if (f.passthrough) {
        const retryAfter = upstream.headers.get("retry-after");
        if (retryAfter) res.set("retry-after", retryAfter);
        res.status(upstream.status).type("application/json").send(raw);
      } else {
        sendError(res, f.error);
      }
      return failed(f.message, usageOf(request.kind, body));
    }
    if (conn.gone) return partial("client disconnected before the answer was sent");
    // As received (res.end, not res.send: no ETag to compute over a POST's answer).
    res.status(upstream.status).set({ "content-type": upstream.headers.get("content-type") ?? "application/json", "content-length": String(raw.length) });
    res.end(raw);
    return completed(usageOf(request.kind, body));
  } finally {
    timer.stop();
    conn.signal.removeEventListener("abort", onClientGone);
  }
}

async function passStream(
  request: ValidRequest,
  upstream: Response,
  conn: ClientConnection,
  timer: IdleTimer,
  timeoutMessage: (when: string) => string,
): Promise<Outcome> {
  conn.startStream(upstream.status, { ...SSE_HEADERS });
  const parser = new SseParser();
  const watch = new StreamWatch(request.kind, request.clientWantsUsage);
  const relay = async (events: ReturnType<SseParser["push"]>) => {
    let out = "";
    for (const ev of events) if (watch.see(ev)) out += ev.raw;
    if (out === "") return;
    timer.pause();
    await conn.write(out);
    timer.touch();
  };
  const reader = upstream.body!.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      timer.touch();
      await relay(parser.push(value));
    }
    await relay(parser.end());
  } catch (err) {
    if (conn.gone) return partial("client disconnected mid-stream", watch.usage);
    const why = timer.timedOut ? timeoutMessage("mid-stream") : `upstream stream broke off: ${describeFetchError(err)}`;
    // The status line is gone: tell the client in the stream, as OpenAI does, then end it.
    const message = timer.timedOut ? "The upstream stopped responding." : "The upstream stream broke off.";
    const code = timer.timedOut ? "upstream_timeout" : "upstream_error";
    const event =
      request.kind === "chat"
        ? sseData({ error: { message, type: "upstream_error", param: null, code } })
        : sseEvent("error", { type: "error", code, message, param: null });
    await conn.write(event).catch(() => {});
    conn.end();
    return failed(clip(why), watch.usage);
  } finally {
    reader.cancel().catch(() => {});
  }
  conn.end();
  if (watch.error) return failed(clip(`upstream stream error: ${watch.error}`), watch.usage);
  return completed(watch.usage);
}
