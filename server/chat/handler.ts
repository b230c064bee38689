/**
 * POST /v1/chat/completions and POST /v1/responses: authenticate (admit.ts,
 * before the body is read), parse the body (server/http/jsonBody.ts), validate,
 * answer (upstream or echo), then record exactly one row. Requests refused
 * before being served (401, 400, 413, 503 from authentication) are not
 * recorded: they reached no model, and a flood of bad keys must not read as
 * attribution failures. Every response carries the request id in x-request-id.
 */
import type express from "express";

import type { AppContext } from "../context.js";
import { jsonBody } from "../http/jsonBody.js";
import { type Admission, admissionOf, admitChat } from "./admit.js";
import { ClientConnection } from "./connection.js";
import { ECHO_PROVIDER, serveEcho } from "./echo.js";
import { ApiError, sendError } from "../http/errors.js";
import { failed, partial, type Outcome } from "./outcome.js";
import { RequestEntry } from "./record.js";
import { forward, type UpstreamTarget } from "./upstream.js";
import { type ChatKind, validateChat, validateResponses } from "./validate.js";

const RECORDING_UNAVAILABLE = new ApiError(
  503,
  "Requests cannot be recorded right now (the ledger database and the local spool are both unavailable); retry shortly.",
  "server_error",
  "recording_unavailable",
);

export interface HandlerDeps {
  /** null: the built-in echo model answers. */
  upstream: UpstreamTarget | null;
}

/** Serves one admitted request whose body was parsed (`body`: undefined when it was not JSON). */
export type ChatServe = (admission: Admission, body: unknown, res: express.Response) => Promise<void>;

/** What answers an admitted request: validation, the upstream or the echo model, its row. */
export function chatServe(kind: ChatKind, ctx: AppContext, deps: HandlerDeps): ChatServe {
  const validate = kind === "chat" ? validateChat : validateResponses;
  return async ({ requestId, createdAt, startedAt, identity }, body, res) => {
    const valid = validate(body);
    if (!valid.ok) return sendError(res, valid.error);
    const request = valid.request;
    // Neither the database nor the spool can take rows now (they are held in
    // memory): refuse before serving, so no request is served without its row.
    if (!ctx.recorder.accepting()) {
      res.setHeader("retry-after", "5");
      return sendError(res, RECORDING_UNAVAILABLE);
    }

    const entry = new RequestEntry(ctx, {
      requestId,
      createdAt,
      startedAt,
      identity,
      model: request.model,
      provider: deps.upstream?.provider ?? ECHO_PROVIDER,
    });
    const conn = new ClientConnection(res);
    let outcome: Outcome;
    try {
      outcome = deps.upstream
        ? await forward(request, deps.upstream, requestId, res, conn, ctx.log)
        : await serveEcho(request, requestId, res, conn);
    } catch (err) {
      // A bug, or the client leaving while the echo model wrote.
      if (conn.gone) {
        outcome = partial("client disconnected mid-response");
      } else {
        ctx.log.error("chat request failed", { requestId, error: err });
        outcome = failed(`gateway error: ${(err as Error)?.message ?? String(err)}`);
        if (res.headersSent) conn.end();
        else sendError(res, new ApiError(500, "The gateway failed to serve the request.", "server_error", "internal_error"));
      }
    }
    entry.settle(outcome);
  };
}

/** Whether anything can answer: an upstream, or the echo model. */
export const isServing = (ctx: AppContext, deps: HandlerDeps) => deps.upstream !== null || ctx.config.echoModel;

/** The route's middlewares, in order: admission (authentication), the JSON body, the handler. */
export function chatHandler(kind: ChatKind, ctx: AppContext, deps: HandlerDeps): express.RequestHandler[] {
  const serve = chatServe(kind, ctx, deps);
  return [admitChat(ctx, isServing(ctx, deps)), jsonBody(ctx.config), (req, res) => serve(admissionOf(res), req.body, res)];
}
