/**
 * Requests that Node's HTTP parser refuses before Express sees them (headers
 * too large, malformed request lines, bad header characters) get the service's
 * JSON error shape too, instead of Node's bare `HTTP/1.1 400` / `431`.
 */
import type http from "node:http";
import type { Duplex } from "node:stream";

import { ApiError } from "./errors.js";

function refusal(err: NodeJS.ErrnoException): ApiError {
  if (err.code === "HPE_HEADER_OVERFLOW") {
    return new ApiError(431, "request headers too large", "invalid_request_error", "headers_too_large");
  }
  if (err.code === "HPE_URI_TOO_LONG" || err.code === "ERR_HTTP_URI_TOO_LONG") {
    return new ApiError(414, "request URI too long", "invalid_request_error", "uri_too_long");
  }
  if (err.code === "ERR_HTTP_REQUEST_TIMEOUT") {
    return new ApiError(408, "request timed out", "invalid_request_error", "request_timeout");
  }
  return new ApiError(400, "malformed HTTP request", "invalid_request_error", "bad_request");
}

const REASONS: Record<number, string> = { 400: "Bad Request", 408: "Request Timeout", 414: "URI Too Long", 431: "Request Header Fields Too Large" };

export function answerClientErrors(server: http.Server): void {
  server.on("clientError", (err: NodeJS.ErrnoException, socket: Duplex) => {
    // A socket already gone, or one whose response started, gets nothing more.
    if (err.code === "ECONNRESET" || !socket.writable || (socket as { _httpMessage?: { headersSent?: boolean } })._httpMessage?.headersSent) {
      socket.destroy();
      return;
    }
    const error = refusal(err);
    const body = JSON.stringify(error.body());
    socket.end(
      `HTTP/1.1 ${error.status} ${REASONS[error.status]}\r\n` +
        "Content-Type: application/json; charset=utf-8\r\n" +
        `Content-Length: ${Buffer.byteLength(body)}\r\n` +
        "Connection: close\r\n\r\n" +
        body,
    );
  });
}
