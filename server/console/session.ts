/**
 * Console sessions: POST /console/session exchanges the admin token (or an
 * admin user's key) for a random session id, kept in memory and sent back as an
 * HttpOnly, SameSite=Strict cookie. The token itself is never stored in the
 * browser, nor in a URL; the server keeps only the principal (for a key: its
 * id, user and hash, so each request re-checks that the key is still usable
 * and its user still an admin, through the authenticator's cached lookup).
 *
 * - sessions expire `ttlMs` after sign-in (12 h); at most `maxSessions` are
 *   kept, the oldest forgotten first (one process: a restart signs everyone out)
 * - requireSession: no, unknown or expired cookie -> 401 session_expired;
 *   a key since revoked or demoted -> the session is dropped, 401 / 403
 * - requireConsoleHeader: state-changing requests must carry
 *   `x-keytrack-console: 1` (a cross-site form cannot set it; the SameSite=Strict
 *   cookie is not sent cross-site either), else 403 csrf_header_missing
 */
import { randomBytes } from "node:crypto";

import type express from "express";

import type { Principal } from "../auth/authenticator.js";
import type { AppContext } from "../context.js";
import { ApiError, sendError } from "../http/errors.js";

export const SESSION_COOKIE = "keytrack_console";
export const CONSOLE_HEADER = "x-keytrack-console";
export const SESSION_TTL_MS = 12 * 60 * 60 * 1000;
export const MAX_SESSIONS = 1000;

export interface Session {
  id: string;
  principal: Principal;
  createdAt: number;
  expiresAt: number;
}

export interface SessionStoreOptions {
  ttlMs?: number;
  maxSessions?: number;
  now?: () => number;
}

export class SessionStore {
  private readonly sessions = new Map<string, Session>();
  readonly ttlMs: number;
  readonly maxSessions: number;
  private readonly now: () => number;

  constructor(options: SessionStoreOptions = {}) {
    this.ttlMs = options.ttlMs ?? SESSION_TTL_MS;
    this.maxSessions = options.maxSessions ?? MAX_SESSIONS;
    this.now = options.now ?? Date.now;
  }

  create(principal: Principal): Session {
    this.sweep();
    const now = this.now();
    const session: Session = { id: randomBytes(32).toString("base64url"), principal, createdAt: now, expiresAt: now + this.ttlMs };
    this.sessions.set(session.id, session);
    // Insertion order is age order: forget the oldest beyond the bound.
    while (this.sessions.size > this.maxSessions) this.sessions.delete(this.sessions.keys().next().value!);
    return session;
  }

  get(id: string | undefined): Session | null {
    if (!id) return null;
    const session = this.sessions.get(id);
    if (!session) return null;
    if (session.expiresAt <= this.now()) {
      this.sessions.delete(id);
      return null;
    }
    return session;
  }

  delete(id: string | undefined): void {
    if (id) this.sessions.delete(id);
  }

  /** Forces a session to expire now (tests). */
  expire(id: string): void {
    const s = this.sessions.get(id);
    if (s) s.expiresAt = this.now();
  }

  size(): number {
    return this.sessions.size;
  }

  private sweep(): void {
    const now = this.now();
    for (const [id, s] of this.sessions) if (s.expiresAt <= now) this.sessions.delete(id);
  }
}

/** The value of one cookie in a Cookie header (no dependency for one cookie). */
export function readCookie(header: string | undefined, name: string): string | undefined {
  if (!header) return undefined;
  for (const part of header.split(";")) {
    const eq = part.indexOf("=");
    if (eq < 0) continue;
    if (part.slice(0, eq).trim() === name) return part.slice(eq + 1).trim();
  }
  return undefined;
}

export function sessionCookie(req: express.Request, value: string, maxAgeSeconds: number): string {
  const secure = req.secure ? "; Secure" : "";
  return `${SESSION_COOKIE}=${value}; Path=/; HttpOnly; SameSite=Strict; Max-Age=${maxAgeSeconds}${secure}`;
}

export const SESSION_EXPIRED = new ApiError(401, "session expired or unknown: sign in again", "authentication_error", "session_expired");
export const ADMINS_ONLY = new ApiError(403, "admins only: this key's user is not an admin", "permission_error", "admins_only");
const CSRF = new ApiError(403, `this request must carry the header ${CONSOLE_HEADER}: 1 (sent by the console page)`, "permission_error", "csrf_header_missing");
const AUTH_UNAVAILABLE = new ApiError(503, "authentication is unavailable, try again", "server_error", "authentication_unavailable");

/** The session of this request, set by requireSession. */
export function sessionOf(res: express.Response): Session {
  return res.locals.consoleSession as Session;
}

export function requireConsoleHeader(): express.RequestHandler {
  return (req, res, next) => {
    if (req.method === "GET" || req.method === "HEAD") return next();
    if (req.get(CONSOLE_HEADER) !== "1") return sendError(res, CSRF);
    next();
  };
}

function refuse(req: express.Request, res: express.Response, store: SessionStore, id: string | undefined, err: ApiError) {
  store.delete(id);
  res.append("Set-Cookie", sessionCookie(req, "", 0));
  res.set("WWW-Authenticate", 'Cookie realm="keytrack console"');
  sendError(res, err);
}

export function requireSession(ctx: AppContext, store: SessionStore): express.RequestHandler {
  return async (req, res, next) => {
    const id = readCookie(req.get("cookie"), SESSION_COOKIE);
    const session = store.get(id);
    if (!session) return refuse(req, res, store, id, SESSION_EXPIRED);
    const p = session.principal;
    if (p.kind === "key") {
      // The key may have been revoked, or its user demoted, since sign-in (cached, invalidated by NOTIFY).
      let answer;
      try {
        answer = await ctx.auth.keys.lookup(p.apiKeyHash);
      } catch {
        return sendError(res, AUTH_UNAVAILABLE);
      }
      if (!answer.record.usable) return refuse(req, res, store, id, SESSION_EXPIRED);
      if (answer.record.userRole !== "admin") return refuse(req, res, store, id, ADMINS_ONLY);
    }
    res.locals.consoleSession = session;
    next();
  };
}
