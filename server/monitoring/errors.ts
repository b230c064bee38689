/**
 * The monitoring endpoints' JSON errors, in the service's one error shape
 * (installErrorHandler): `{ error: { message, type, code, ... } }`.
 */
import type express from "express";

export type ErrorType = "authentication_error" | "permission_error" | "invalid_request_error" | "server_error";

export function sendError(
  res: express.Response,
  status: number,
  type: ErrorType,
  code: string,
  message: string,
  extra: Record<string, unknown> = {},
): void {
  res.status(status).json({ error: { message, type, code, ...extra } });
}
