/**
 * The last steps: a JSON 404 for unknown routes, and one JSON shape for every
 * error (OpenAI-style `{ error: { message, type, code } }`). Body-parser errors
 * keep their 4xx status; anything unexpected is a 500 without internals in
 * production.
 */
import type express from "express";

import type { AppContext } from "../context.js";

interface HttpishError {
  status?: number;
  statusCode?: number;
  type?: string;
  expose?: boolean;
  message?: string;
  stack?: string;
}

function clientError(err: HttpishError): { status: number; message: string; code: string } | null {
  const status = err.status ?? err.statusCode;
  if (typeof status !== "number" || status < 400 || status >= 500) return null;
  switch (err.type) {
    case "entity.too.large":
      return { status: 413, message: "request body too large", code: "body_too_large" };
    case "entity.parse.failed":
      return { status: 400, message: "request body is not valid JSON", code: "invalid_json" };
    case "encoding.unsupported":
    case "charset.unsupported":
      return { status: 415, message: err.message ?? "unsupported encoding", code: "unsupported_encoding" };
    case "request.aborted":
      return { status: 400, message: "request aborted", code: "request_aborted" };
    default:
      return { status, message: err.expose && err.message ? err.message : "bad request", code: "bad_request" };
  }
}

export function installErrorHandler(app: express.Express, ctx: AppContext): void {
  app.use((_req, res) => {
    res.status(404).json({ error: { message: "not found", type: "invalid_request_error", code: "not_found" } });
  });

  const errorHandler: express.ErrorRequestHandler = (err: unknown, req, res, next) => {
    if (res.headersSent) return next(err);
    const e = (err ?? {}) as HttpishError;
    const client = clientError(e);
    if (client) {
      res
        .status(client.status)
        .json({ error: { message: client.message, type: "invalid_request_error", code: client.code } });
      return;
    }
    ctx.log.error("unhandled error", { method: req.method, path: req.path, error: err });
    const body: { error: Record<string, unknown> } = {
      error: { message: "internal server error", type: "server_error", code: "internal_error" },
    };
    if (ctx.config.appEnv !== "production") {
      body.error.detail = e.message;
      body.error.stack = e.stack?.split("\n").map((l) => l.trim());
    }
    res.status(500).json(body);
  };
  app.use(errorHandler);
}
