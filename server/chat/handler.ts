/**
 * POST /v1/chat/completions and POST /v1/responses: authenticate, validate,
 * answer (upstream or echo), then record exactly one row. Requests refused
 * before being served (401, 400, 413, 503 from authentication) are not
 * recorded: they reached no model, and a flood of bad keys must not read as
 * attribution failures. Every response carries the request id in x-request-id.
 */
import type express from "express";

import type { AppContext } from "../context.js";
import { authenticateChat } from "./identity.js";
import { ClientConnection } from "./connection.js";
import { ECHO_PROVIDER, serveEcho } from "./echo.js";
import { ApiError, sendError } from "../http/errors.js";
import { failed, partial, type Outcome } from "./outcome.js";
import { RequestEntry } from "./record.js";
import { uuidv7 } from "./requestId.js";
import { forward, type UpstreamTarget } from "./upstream.js";
import { type ChatKind, validateChat, validateResponses } from "./validate.js";

export interface HandlerDeps {
  /** null: the built-in echo model answers. */
  upstream: UpstreamTarget | null;
}

export function chatHandler(kind: ChatKind, ctx: AppContext, deps: HandlerDeps): express.RequestHandler {
  const validate = kind === "chat" ? validateChat : validateResponses;
  return async (req, res) => {
    const startedAt = performance.now();
    const createdAt = new Date();
    const requestId = uuidv7(createdAt);
    res.set("x-request-id", requestId);

    const auth = await authenticateChat(ctx, req.get("authorization"));
    if (!auth.ok) return sendError(res, auth.error);
    const valid = validate(req.body);
    if (!valid.ok) return sendError(res, valid.error);
    const request = valid.request;

    const entry = new RequestEntry(ctx, {
      requestId,
      createdAt,
      startedAt,
      identity: auth.identity,
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
