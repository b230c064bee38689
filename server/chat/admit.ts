/**
 * The first step of POST /v1/chat/completions and /v1/responses, before the
 * body is read: the request id (x-request-id on every answer), the arrival
 * time, authentication, and whether anything can answer at all (an upstream,
 * or the echo model when ECHO_MODEL is on). Refusals here (401, 503) read no
 * body and are not recorded. What it admitted is on res.locals for the handler.
 */
import type express from "express";

import type { AppContext } from "../context.js";
import { ApiError, sendError } from "../http/errors.js";
import { authenticateChat, type ChatIdentity } from "./identity.js";
import { uuidv7 } from "./requestId.js";

/** No upstream and the echo model off: nothing can answer. */
export const NO_UPSTREAM = new ApiError(
  503,
  "no upstream configured: set UPSTREAM_BASE_URL, or ECHO_MODEL=true for the built-in echo model",
  "server_error",
  "no_upstream",
);

export interface Admission {
  requestId: string;
  createdAt: Date;
  /** performance.now() when the request arrived. */
  startedAt: number;
  identity: ChatIdentity;
}

const KEY = "chatAdmission";

/**
 * Admits one request: sets x-request-id, authenticates, checks that something
 * can answer. On a refusal the error is sent and null returned. Shared by the
 * Express route (admitChat) and the lean route (leanRoute.ts).
 */
export async function admit(ctx: AppContext, serving: boolean, authorization: string | undefined, res: express.Response): Promise<Admission | null> {
  const startedAt = performance.now();
  const createdAt = new Date();
  const requestId = uuidv7(createdAt);
  res.setHeader("x-request-id", requestId);

  const auth = await authenticateChat(ctx, authorization);
  if (!auth.ok) {
    sendError(res, auth.error);
    return null;
  }
  if (!serving) {
    sendError(res, NO_UPSTREAM);
    return null;
  }
  return { requestId, createdAt, startedAt, identity: auth.identity };
}

/** `serving`: an upstream is configured, or the echo model is on. */
export function admitChat(ctx: AppContext, serving: boolean): express.RequestHandler {
  return async (req, res, next) => {
    const admission = await admit(ctx, serving, req.headers.authorization, res);
    if (!admission) return;
    res.locals[KEY] = admission;
    next();
  };
}

/** What admitChat admitted (it runs first on every chat route). */
export function admissionOf(res: express.Response): Admission {
  const admission = res.locals[KEY] as Admission | undefined;
  if (!admission) throw new Error("chat request handled without admitChat");
  return admission;
}
