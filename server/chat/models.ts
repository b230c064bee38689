/**
 * GET /v1/models (and /v1/models/:model): what the upstream offers, passed
 * through, or the built-in echo model when there is no upstream (and
 * ECHO_MODEL is on). Authenticated like the chat endpoints; not recorded.
 *
 * A model id in the path must be a model id (modelIdProblem: no "." or ".."
 * that would make the gateway fetch another upstream path with its own key);
 * it is sent upstream encoded, as one path segment. The upstream's answer is
 * passed on only as JSON, and read up to UPSTREAM_MAX_BODY.
 */
import type express from "express";

import type { AppContext } from "../context.js";
import { authenticateChat } from "./identity.js";
import { ECHO_CREATED, ECHO_MODEL } from "./echo.js";
import { ApiError, badRequest, sendError } from "../http/errors.js";
import { NO_UPSTREAM } from "./admit.js";
import {
  badContentType,
  JSON_TYPE,
  mediaTypeOf,
  readBounded,
  tooLargeError,
  UpstreamTooLarge,
  upstreamHeaders,
  type UpstreamTarget,
} from "./upstream.js";
import { uuidv7 } from "./requestId.js";
import { modelIdProblem } from "./validate.js";

const ECHO_ENTRY = { id: ECHO_MODEL, object: "model", created: ECHO_CREATED, owned_by: "keytrack" };

export function modelsHandler(ctx: AppContext, upstream: UpstreamTarget | null): express.RequestHandler {
  const echo = ctx.config.echoModel;
  return async (req, res) => {
    const requestId = uuidv7();
    res.set("x-request-id", requestId);
    const who = await authenticateChat(ctx, req.get("authorization"));
    if (!who.ok) return sendError(res, who.error);
    const one = typeof req.params.model === "string" ? req.params.model : null;
    if (one !== null) {
      const problem = modelIdProblem(one);
      if (problem) return sendError(res, badRequest(`Invalid model id: ${problem}.`, "model", "invalid_model_id"));
    }

    if (!upstream) {
      if (!echo) return sendError(res, NO_UPSTREAM);
      if (one === null) return void res.json({ object: "list", data: [ECHO_ENTRY] });
      if (one === ECHO_MODEL) return void res.json(ECHO_ENTRY);
      return sendError(res, new ApiError(404, `The model '${one}' does not exist.`, "invalid_request_error", "model_not_found", "model"));
    }

    const path = one === null ? "/models" : `/models/${encodeURIComponent(one)}`;
    const controller = new AbortController();
    const signal = AbortSignal.any([controller.signal, AbortSignal.timeout(upstream.timeoutMs)]);
    try {
      const answer = await fetch(upstream.baseUrl + path, {
        headers: upstreamHeaders(upstream, requestId, JSON_TYPE),
        signal,
      });
      if (answer.status >= 500 || answer.status === 401 || answer.status === 403) {
        controller.abort();
        return sendError(res, new ApiError(502, `The upstream failed to list models (HTTP ${answer.status}).`, "upstream_error", "upstream_error"));
      }
      const contentType = answer.headers.get("content-type");
      if (mediaTypeOf(contentType) !== JSON_TYPE) {
        controller.abort();
        return sendError(res, badContentType(contentType, [JSON_TYPE]).error);
      }
      const body = await readBounded(answer, upstream.maxBodyBytes);
      res.status(answer.status).set({ "content-type": JSON_TYPE, "x-content-type-options": "nosniff" }).send(body);
    } catch (err) {
      controller.abort();
      if (err instanceof UpstreamTooLarge) return sendError(res, tooLargeError(err.maxBytes));
      const timedOut = (err as Error)?.name === "TimeoutError";
      sendError(res, timedOut
        ? new ApiError(504, `The upstream did not answer within ${upstream.timeoutMs} ms.`, "upstream_error", "upstream_timeout")
        : new ApiError(502, "The upstream is unreachable.", "upstream_error", "upstream_unavailable"));
    }
  };
}
