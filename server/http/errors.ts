/**
 * The service's one shape for JSON errors, on every route: OpenAI's
 * `{ "error": { "message", "type", "param", "code" } }` (plus extra fields where
 * a route has more to say, such as a parameter's bounds), with the HTTP status
 * that the official OpenAI clients map to their error classes (400, 401, 403,
 * 404, 413, 422, 429, 5xx). GraphQL keeps GraphQL's own shape (graphqlError).
 */
import type express from "express";

export type ErrorType =
  | "invalid_request_error"
  | "authentication_error"
  | "permission_error"
  | "rate_limit_error"
  | "upstream_error"
  | "server_error";

export interface ErrorBody {
  error: { message: string; type: ErrorType; param: string | null; code: string } & Record<string, unknown>;
}

export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly type: ErrorType,
    readonly code: string,
    readonly param: string | null = null,
    readonly extra: Record<string, unknown> = {},
  ) {
    super(message);
    this.name = "ApiError";
  }

  body(): ErrorBody {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code, ...this.extra } };
  }
}

export const badRequest = (message: string, param: string | null = null, code = "invalid_request") =>
  new ApiError(400, message, "invalid_request_error", code, param);

/**
 * Sends the error, unless the response has started (then the caller ends the
 * stream its own way). A 401 names the Bearer scheme unless the route set its own challenge.
 */
export function sendError(res: express.Response, err: ApiError): void {
  if (res.headersSent) return;
  if (err.status === 401 && !res.get("WWW-Authenticate")) res.set("WWW-Authenticate", 'Bearer realm="keytrack"');
  res.status(err.status).json(err.body());
}

/** A GraphQL-shaped error response body (`{ errors: [...] }`), for refusals before GraphQL runs. */
export function graphqlError(message: string, code: string): { errors: Array<{ message: string; extensions: { code: string } }> } {
  return { errors: [{ message, extensions: { code } }] };
}
