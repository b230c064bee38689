/**
 * Errors in OpenAI's shape: `{ "error": { "message", "type", "param", "code" } }`,
 * with the HTTP status the official clients map to their error classes
 * (400 BadRequestError, 401 AuthenticationError, 413, 429, 502/503/504 server errors).
 */
import type express from "express";

export type OpenAIErrorType =
  | "invalid_request_error"
  | "authentication_error"
  | "rate_limit_error"
  | "upstream_error"
  | "server_error";

export interface OpenAIErrorBody {
  error: { message: string; type: OpenAIErrorType | string; param: string | null; code: string | null };
}

export class ChatError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly type: OpenAIErrorType,
    readonly code: string,
    readonly param: string | null = null,
  ) {
    super(message);
    this.name = "ChatError";
  }

  body(): OpenAIErrorBody {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

export const badRequest = (message: string, param: string | null = null, code = "invalid_request") =>
  new ChatError(400, message, "invalid_request_error", code, param);

/** Sends the error unless the response has started (then the caller ends the stream its own way). */
export function sendError(res: express.Response, err: ChatError): void {
  if (res.headersSent) return;
  if (err.status === 401) res.set("WWW-Authenticate", 'Bearer realm="keytrack"');
  res.status(err.status).json(err.body());
}
