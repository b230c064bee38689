/**
 * The lean route: POST /v1/chat/completions and POST /v1/responses served
 * straight from node:http, ahead of Express, for the requests that make up a
 * gateway's traffic. Express's router walks every layer before these routes
 * (GraphQL's middleware looks at each request), and body-parser reads a body
 * through several streams and libraries: together about a third of the CPU
 * the gateway spent per request (node --cpu-prof under autocannon).
 *
 * It takes a request only when its headers alone say that Express would do
 * exactly what it does: the exact path (no query string, no trailing slash,
 * no other case), `Content-Type: application/json` (optionally with
 * `; charset=utf-8`), a Content-Length within BODY_LIMIT, no Content-Encoding
 * and no Transfer-Encoding. Everything else goes to Express untouched (the
 * decision is made before anything is read), so unusual requests keep
 * Express's answers by construction. What it serves runs the same code as the
 * Express route: admission (admit.ts), then chatServe (handler.ts); the
 * request and response get Express's prototypes, so res.json, res.set and the
 * error bodies (server/http/errors.ts) are Express's own. Its body reading
 * answers as body-parser does through installErrorHandler: 400 invalid_json
 * (an empty body is {}, a UTF-8 BOM is skipped, strict: only an object or an
 * array), 400 json_too_deep, 400 request_aborted. It times every request into
 * http_request_duration_seconds as installMetrics does.
 */
import type http from "node:http";

import type express from "express";
import type client from "prom-client";

import type { AppContext } from "../context.js";
import { ApiError, sendError } from "../http/errors.js";
import { jsonDepthExceeds, jsonTooDeepError, MAX_JSON_DEPTH } from "../http/jsonBody.js";
import { admit } from "./admit.js";
import { chatServe, isServing, type ChatServe, type HandlerDeps } from "./handler.js";

/** Takes the request (true) or leaves it to Express (false, nothing read or written). */
export type LeanRoute = (req: http.IncomingMessage, res: http.ServerResponse) => boolean;

/** What body-parser and installErrorHandler answer (server/middleware/installErrorHandler.ts). */
const INVALID_JSON = new ApiError(400, "request body is not valid JSON", "invalid_request_error", "invalid_json");
const ABORTED = new ApiError(400, "request aborted", "invalid_request_error", "request_aborted");
const TOO_DEEP = jsonTooDeepError(MAX_JSON_DEPTH);

/** Content types body-parser reads as UTF-8 JSON whatever else it does; anything else is Express's to judge. */
const JSON_CONTENT_TYPE = /^application\/json(?:; ?charset=(?:utf-8|"utf-8"))?$/i;
const CONTENT_LENGTH = /^\d{1,15}$/;

/** JSON whitespace (RFC 8259), as body-parser's strict check skips it. */
const isJsonSpace = (c: number) => c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d;
const OPEN_OBJECT = 0x7b;
const OPEN_ARRAY = 0x5b;

/** body-parser's strict JSON: empty is {}, a leading BOM is dropped, only an object or array at the top. */
export function parseJsonBody(buf: Buffer, maxDepth = MAX_JSON_DEPTH): unknown {
  if (jsonDepthExceeds(buf, maxDepth)) throw maxDepth === MAX_JSON_DEPTH ? TOO_DEEP : jsonTooDeepError(maxDepth);
  let text = buf.toString("utf8");
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
  if (text.length === 0) return {};
  let i = 0;
  while (i < text.length && isJsonSpace(text.charCodeAt(i))) i++;
  const first = text.charCodeAt(i);
  if (first !== OPEN_OBJECT && first !== OPEN_ARRAY) throw INVALID_JSON;
  try {
    return JSON.parse(text);
  } catch {
    throw INVALID_JSON;
  }
}

export const LEAN_PATHS = { chat: "/v1/chat/completions", responses: "/v1/responses" } as const;

/**
 * Which chat route takes the request on the lean route, or null to leave it
 * to Express: decided from the method, the URL and the headers alone.
 */
export function leanRouteFor(
  req: { method?: string; url?: string; headers: http.IncomingHttpHeaders },
  bodyLimitBytes: number,
): "chat" | "responses" | null {
  if (req.method !== "POST") return null;
  const kind = req.url === LEAN_PATHS.chat ? "chat" : req.url === LEAN_PATHS.responses ? "responses" : null;
  if (kind === null) return null;
  const h = req.headers;
  if (h["content-encoding"] !== undefined || h["transfer-encoding"] !== undefined) return null;
  const type = h["content-type"];
  if (type === undefined || (type !== "application/json" && !JSON_CONTENT_TYPE.test(type))) return null;
  const length = h["content-length"];
  if (length === undefined || !CONTENT_LENGTH.test(length) || Number(length) > bodyLimitBytes) return null;
  return kind;
}

/** The whole body (its length already known to be within BODY_LIMIT); rejects with ABORTED when the client leaves first. */
function readBody(req: http.IncomingMessage): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const onData = (chunk: Buffer) => {
      chunks.push(chunk);
      size += chunk.length;
    };
    const cleanup = () => {
      req.off("data", onData);
      req.off("end", onEnd);
      req.off("error", onAbort);
      req.off("close", onClose);
    };
    const onEnd = () => {
      cleanup();
      resolve(chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, size));
    };
    const onAbort = () => {
      cleanup();
      reject(ABORTED);
    };
    const onClose = () => {
      if (!req.complete) onAbort();
    };
    req.on("data", onData);
    req.on("end", onEnd);
    req.on("error", onAbort);
    req.on("close", onClose);
  });
}

export function leanChatRoute(
  app: express.Express,
  ctx: AppContext,
  deps: HandlerDeps,
  httpDuration: client.Histogram<"method" | "route" | "status_code">,
): LeanRoute {
  const serving = isServing(ctx, deps);
  const limit = ctx.config.bodyLimitBytes;
  const production = ctx.config.appEnv === "production";

  interface Route {
    serve: ChatServe;
    /** http_request_duration_seconds children by status code, bound once. */
    timers: Map<number, client.Histogram.Internal<"method" | "route" | "status_code">>;
    path: string;
  }
  const route = (kind: "chat" | "responses"): Route => ({ serve: chatServe(kind, ctx, deps), timers: new Map(), path: LEAN_PATHS[kind] });
  const routes = { chat: route("chat"), responses: route("responses") };

  function observe(r: Route, res: http.ServerResponse, started: number): void {
    const status = res.writableFinished ? res.statusCode : 499;
    let timer = r.timers.get(status);
    if (!timer) {
      timer = httpDuration.labels("POST", r.path, String(status));
      r.timers.set(status, timer);
    }
    timer.observe((performance.now() - started) / 1000);
  }

  /** As installErrorHandler answers an error that escaped a route. */
  function unexpected(req: http.IncomingMessage, res: express.Response, err: unknown): void {
    if (res.headersSent) {
      res.destroy();
      return;
    }
    const e = (err ?? {}) as { message?: string; stack?: string };
    ctx.log.error("unhandled error", { method: req.method, path: req.url, error: err });
    const detail = production ? {} : { detail: e.message, stack: e.stack?.split("\n").map((l) => l.trim()) };
    sendError(res, new ApiError(500, "internal server error", "server_error", "internal_error", null, detail));
  }

  async function handle(r: Route, req: http.IncomingMessage, nodeRes: http.ServerResponse): Promise<void> {
    const started = performance.now();
    // `close` comes after `finish`, or alone when the client went away first.
    nodeRes.once("close", () => observe(r, nodeRes, started));
    // What Express's app.handle does before routing: its request and response methods.
    const ereq = req as express.Request;
    const res = nodeRes as express.Response;
    ereq.res = res;
    res.req = ereq;
    Object.setPrototypeOf(req, app.request);
    Object.setPrototypeOf(res, app.response);
    res.locals = Object.create(null) as express.Response["locals"];
    try {
      const admission = await admit(ctx, serving, req.headers.authorization, res);
      if (!admission) return;
      let body: unknown;
      try {
        body = parseJsonBody(await readBody(req));
      } catch (err) {
        if (err instanceof ApiError) return sendError(res, err);
        throw err;
      }
      await r.serve(admission, body, res);
    } catch (err) {
      unexpected(req, res, err);
    }
  }

  return (req, res) => {
    const kind = leanRouteFor(req, limit);
    if (kind === null) return false;
    void handle(routes[kind], req, res);
    return true;
  };
}
