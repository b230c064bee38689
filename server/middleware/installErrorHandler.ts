/**
 * The last steps: a JSON 404 for unknown routes, and one JSON shape for every
 * error (server/http/errors.ts). Body-parser errors
 * keep their 4xx status; anything unexpected is a 500 without internals in
 * production.
 */
import type express from "express";

import type { AppContext } from "../context.js";
import { ApiError, sendError } from "../http/errors.js";

interface HttpishError {
  status?: number;
  statusCode?: number;
  type?: string;
  expose?: boolean;
  message?: string;
  stack?: string;
}

function clientError(err: HttpishError): ApiError | null {
  const status = err.status ?? err.statusCode;
  if (typeof status !== "number" || status < 400 || status >= 500) return null;
  const invalid = (status: number, message: string, code: string) => new ApiError(status, message, "invalid_request_error", code);
  switch (err.type) {
    case "entity.too.large":
      return invalid(413, "request body too large", "body_too_large");
    case "entity.parse.failed":
      return invalid(400, "request body is not valid JSON", "invalid_json");
    case "encoding.unsupported":
    case "charset.unsupported":
      return invalid(415, err.message ?? "unsupported encoding", "unsupported_encoding");
    case "request.aborted":
      return invalid(400, "request aborted", "request_aborted");
    default:
      return invalid(status, err.expose && err.message ? err.message : "bad request", "bad_request");
  }
}

const NOT_FOUND = new ApiError(404, "not found", "invalid_request_error", "not_found");

export function installErrorHandler(app: express.Express, ctx: AppContext): void {
  app.use((_req, res) => sendError(res, NOT_FOUND));

  const errorHandler: express.ErrorRequestHandler = (err: unknown, req, res, next) => {
    if (res.headersSent) return next(err);
    const e = (err ?? {}) as HttpishError;
    const client = clientError(e);
    if (client) return sendError(res, client);
    ctx.log.error("unhandled error", { method: req.method, path: req.path, error: err });
    // Internals (message, stack) only outside production, for the developer at hand.
    const detail = ctx.config.appEnv === "production" ? {} : { detail: e.message, stack: e.stack?.split("\n").map((l) => l.trim()) };
    sendError(res, new ApiError(500, "internal server error", "server_error", "internal_error", null, detail));
  };
  app.use(errorHandler);
}
