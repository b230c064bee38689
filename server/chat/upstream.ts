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
 * - The call itself is made by upstreamHttp.ts (node:http with keep-alive,
 *   far cheaper than fetch); redirects are not followed: a 3xx is a 502.
 * - Only JSON (application/json) and event streams (text/event-stream) are
 *   passed on; any other content type (an HTML error page, a script) is a 502
 *   upstream_bad_content_type, its body never read.
 * - What is read is bounded: a whole body at UPSTREAM_MAX_BODY (its declared
 *   length checked first, then counted while reading), one stream event at
 *   UPSTREAM_MAX_EVENT. Past either the gateway stops reading and aborts the
 *   upstream call: a 502 upstream_response_too_large, or mid-stream an error
 *   event and the end; the row is failed.
 */
import type express from "express";

import type { Logger } from "../log.js";
import type { ClientConnection } from "./connection.js";
import { ApiError, sendError } from "../http/errors.js";
import { completed, failed, partial, type Outcome } from "./outcome.js";
import { SSE_HEADERS, SseEventTooLarge, SseParser, sseData, sseEvent } from "./sse.js";
import { errorMessageOf, StreamWatch, usageOf } from "./usage.js";
import type { ValidRequest } from "./validate.js";
import { upstreamCall, type UpstreamAnswer, type UpstreamBody } from "./upstreamHttp.js";

export interface UpstreamTarget {
  /** Without a trailing slash, e.g. https://api.openai.com/v1. */
  baseUrl: string;
  apiKey: string | null;
  timeoutMs: number;
  /** Recorded as the row's provider: the upstream's host. */
  provider: string;
  /** The largest body read whole (UPSTREAM_MAX_BODY), and the largest stream event (UPSTREAM_MAX_EVENT), in bytes. */
  maxBodyBytes: number;
  maxEventBytes: number;
}

export interface UpstreamLimits {
  maxBodyBytes: number;
  maxEventBytes: number;
}

export function upstreamTarget(baseUrl: string, apiKey: string | null, timeoutMs: number, limits: UpstreamLimits): UpstreamTarget {
  return { baseUrl: baseUrl.replace(/\/+$/, ""), apiKey, timeoutMs, provider: new URL(baseUrl).host, ...limits };
}

export const JSON_TYPE = "application/json";
export const SSE_TYPE = "text/event-stream";

/** The media type of a Content-Type header, lower case and without parameters ("" when there is none). */
export function mediaTypeOf(contentType: string | null): string {
  return (contentType ?? "").split(";")[0]!.trim().toLowerCase();
}

/** A content type the gateway does not pass on: the client's error and the row's message. */
export function badContentType(contentType: string | null, accepted: readonly string[]): { error: ApiError; message: string } {
  const shown = contentType === null ? "none" : clip(contentType, 100);
  return {
    error: new ApiError(
      502,
      `The upstream answered with content type "${shown}"; the gateway passes on only ${accepted.join(" or ")}.`,
      "upstream_error",
      "upstream_bad_content_type",
    ),
    message: `upstream answered with content type "${shown}", not ${accepted.join(" or ")}; not passed on`,
  };
}

/** A body larger than the gateway reads: it stopped reading (the caller aborts the call). */
export class UpstreamTooLarge extends Error {
  constructor(readonly maxBytes: number) {
    super(`upstream answer larger than UPSTREAM_MAX_BODY (${maxBytes} bytes)`);
    this.name = "UpstreamTooLarge";
  }
}

export const tooLargeError = (maxBytes: number) =>
  new ApiError(502, `The upstream's answer is larger than the gateway accepts (${maxBytes} bytes).`, "upstream_error", "upstream_response_too_large");

/**
 * Reads a whole body, at most `maxBytes` of it: a larger declared length is
 * refused before reading, and reading stops (the body is cancelled) as soon as
 * more arrived. `onRead` is called on every read (the idle timer).
 */
export async function readBounded(response: { headers: UpstreamAnswer["headers"]; body: UpstreamBody | ReadableStream<Uint8Array> | null }, maxBytes: number, onRead: () => void = () => {}): Promise<Buffer> {
  const body = response.body;
  if (!body) return Buffer.alloc(0);
  const declared = Number(response.headers.get("content-length"));
  if (Number.isFinite(declared) && declared > maxBytes) {
    await body.cancel().catch(() => {});
    throw new UpstreamTooLarge(maxBytes);
  }
  if ("readAll" in body && body.readAll) return body.readAll(maxBytes, onRead, () => new UpstreamTooLarge(maxBytes));
  const parts: Uint8Array[] = [];
  let size = 0;
  const reader: ReturnType<UpstreamBody["getReader"]> = body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done || !value) break;
    onRead();
    size += value.byteLength;
    if (size > maxBytes) {
      parts.length = 0;
      await reader.cancel().catch(() => {});
      throw new UpstreamTooLarge(maxBytes);
    }
    parts.push(value);
  }
  return Buffer.concat(parts, size);
}

/** Aborts after `ms` without a touch(); paused while the gateway waits on the client, not the upstream. */
class IdleTimer {
  timedOut = false;
  /** One timer, re-armed by refresh() on each touch (cheaper than a new one). */
  private timer: NodeJS.Timeout | null = null;
  private readonly fire = () => {
    this.timedOut = true;
    this.onTimeout();
  };
  constructor(
    private readonly ms: number,
    private readonly onTimeout: () => void,
  ) {
    this.touch();
  }
  touch(): void {
    if (this.timer) this.timer.refresh();
    else this.timer = setTimeout(this.fire, this.ms);
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
const clip = (s: string, max = MAX_ERROR_LENGTH) => (s.length > max ? s.slice(0, max) + "…" : s);

function describeFetchError(err: unknown): string {
  const e = err as { message?: string; code?: string; cause?: { code?: string; message?: string } };
  const cause = e?.cause?.code ?? e?.cause?.message ?? (e?.code && !e.message?.includes(e.code) ? e.code : undefined);
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
  if (status >= 500 || status < 400) {
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
  const offClientGone = conn.onGone((why) => controller.abort(why));
  const path = request.kind === "chat" ? "/chat/completions" : "/responses";
  const timeoutMessage = (when: string) => `upstream timed out ${when} (no data for ${target.timeoutMs} ms)`;

  try {
    let upstream: UpstreamAnswer;
    try {
      upstream = await upstreamCall(target.baseUrl + path, {
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

    const contentType = upstream.headers.get("content-type");
    const type = mediaTypeOf(contentType);
    if (upstream.ok) {
      if (type !== JSON_TYPE && type !== SSE_TYPE) {
        // Never read, never passed on (an HTML page with a script would be served as HTML).
        controller.abort(new Error("unacceptable upstream content type"));
        const bad = badContentType(contentType, [JSON_TYPE, SSE_TYPE]);
        sendError(res, bad.error);
        return failed(bad.message);
      }
      if (request.stream && type === SSE_TYPE) {
        return await passStream(request, upstream, conn, timer, timeoutMessage, target.maxEventBytes, (why) => controller.abort(why));
      }
    }

    // A whole body: a JSON answer or an error.
    let raw: Buffer;
    try {
      raw = await readBounded(upstream, target.maxBodyBytes, () => timer.touch());
    } catch (err) {
      if (conn.gone) return partial("client disconnected before the upstream answered");
      if (err instanceof UpstreamTooLarge) {
        controller.abort(err);
        sendError(res, tooLargeError(err.maxBytes));
        return failed(`${err.message}: stopped reading, upstream call aborted`);
      }
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
        res.status(upstream.status).set({ "content-type": JSON_TYPE, "x-content-type-options": "nosniff" }).send(raw);
      } else {
        sendError(res, f.error);
      }
      return failed(f.message, usageOf(request.kind, body));
    }
    if (conn.gone) return partial("client disconnected before the answer was sent");
    // As received (res.end, not res.send: no ETag to compute over a POST's answer), as JSON or an event stream only.
    res.status(upstream.status).set({ "content-type": type, "x-content-type-options": "nosniff", "content-length": String(raw.length) });
    res.end(raw);
    return completed(usageOf(request.kind, body));
  } finally {
    timer.stop();
    offClientGone();
  }
}

async function passStream(
  request: ValidRequest,
  upstream: UpstreamAnswer,
  conn: ClientConnection,
  timer: IdleTimer,
  timeoutMessage: (when: string) => string,
  maxEventBytes: number,
  abortUpstream: (why: Error) => void,
): Promise<Outcome> {
  conn.startStream(upstream.status, { ...SSE_HEADERS, "x-content-type-options": "nosniff" });
  const parser = new SseParser({ maxEventBytes });
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
      if (done || !value) break;
      timer.touch();
      await relay(parser.push(value));
    }
    await relay(parser.end());
  } catch (err) {
    if (conn.gone) return partial("client disconnected mid-stream", watch.usage);
    const tooLarge = err instanceof SseEventTooLarge;
    if (tooLarge) abortUpstream(err);
    const why = tooLarge
      ? `upstream stream event larger than UPSTREAM_MAX_EVENT (${err.maxBytes} bytes): stopped reading, upstream call aborted`
      : timer.timedOut
        ? timeoutMessage("mid-stream")
        : `upstream stream broke off: ${describeFetchError(err)}`;
    // The status line is gone: tell the client in the stream, as OpenAI does, then end it.
    const message = tooLarge
      ? `The upstream sent an event too large for the gateway (more than ${err.maxBytes} bytes).`
      : timer.timedOut
        ? "The upstream stopped responding."
        : "The upstream stream broke off.";
    const code = tooLarge ? "upstream_event_too_large" : timer.timedOut ? "upstream_timeout" : "upstream_error";
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
