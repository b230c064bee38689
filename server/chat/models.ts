/**
 * GET /v1/models (and /v1/models/:model): what the upstream offers, passed
 * through, or the built-in echo model when there is no upstream. Authenticated
 * like the chat endpoints; not recorded.
 */
import type express from "express";

import type { AppContext } from "../context.js";
import { authenticateChat } from "./identity.js";
import { ECHO_CREATED, ECHO_MODEL } from "./echo.js";
import { ApiError, sendError } from "../http/errors.js";
import { upstreamHeaders, type UpstreamTarget } from "./upstream.js";
import { uuidv7 } from "./requestId.js";

const ECHO_ENTRY = { id: ECHO_MODEL, object: "model", created: ECHO_CREATED, owned_by: "keytrack" };

export function modelsHandler(ctx: AppContext, upstream: UpstreamTarget | null): express.RequestHandler {
  return async (req, res) => {
    const requestId = uuidv7();
    res.set("x-request-id", requestId);
    const who = await authenticateChat(ctx, req.get("authorization"));
    if (!who.ok) return sendError(res, who.error);
    const one = typeof req.params.model === "string" ? req.params.model : null;

    if (!upstream) {
      if (one === null) return void res.json({ object: "list", data: [ECHO_ENTRY] });
      if (one === ECHO_MODEL) return void res.json(ECHO_ENTRY);
      return sendError(res, new ApiError(404, `The model '${one}' does not exist.`, "invalid_request_error", "model_not_found", "model"));
    }

    const path = one === null ? "/models" : `/models/${encodeURIComponent(one)}`;
    try {
      const answer = await fetch(upstream.baseUrl + path, {
        headers: upstreamHeaders(upstream, requestId, "application/json"),
        signal: AbortSignal.timeout(upstream.timeoutMs),
      });
      const body = Buffer.from(await answer.arrayBuffer());
      if (answer.status >= 500 || answer.status === 401 || answer.status === 403) {
        return sendError(res, new ApiError(502, `The upstream failed to list models (HTTP ${answer.status}).`, "upstream_error", "upstream_error"));
      }
      res.status(answer.status).type(answer.headers.get("content-type") ?? "application/json").send(body);
    } catch (err) {
      const timedOut = (err as Error)?.name === "TimeoutError";
      sendError(res, timedOut
        ? new ApiError(504, `The upstream did not answer within ${upstream.timeoutMs} ms.`, "upstream_error", "upstream_timeout")
        : new ApiError(502, "The upstream is unreachable.", "upstream_error", "upstream_unavailable"));
    }
  };
}
