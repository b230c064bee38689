/**
 * The console's JSON: sign-in and sign-out (/console/session), and the data
 * the page shows (/console/api/*), each from the SQL functions and report code
 * the rest of the service uses, never a second computation of a figure:
 *
 * - GET  quality?hours=       server/monitoring/reports.ts qualityReport (the REST endpoint's JSON)
 * - GET  trend?days=          trendReport (per UTC day)
 * - GET  hourly?hours=        the spec's view app_public.api_key_tracking_quality (per hour, 7 days),
 *                             empty hours included, with the authenticated rate of each hour
 * - GET  offenders?hours=&limit=   app_public.attribution_offenders(hours, max_rows)
 * - GET  recent?limit=        the newest pending or failed rows of app_public.chat_completion_requests, with their reasons
 * - GET  backfills?limit=     app_public.attribution_backfills, newest first
 * - GET  status               this process: the spool depth (ctx.recorder.spoolDepth()), the session's expiry
 * - POST import-key           app_public.import_api_key(user_id, key_hash) as keytrack_admin
 * - POST backfill             app_public.start_attribution_backfill(batch_size) as keytrack_admin
 *
 * Reads use the read pool (READ_DATABASE_URL when set); a database failure is
 * the monitoring endpoints' 503 database_unavailable. Every route needs a
 * session (session.ts); POST and DELETE also the console header (CSRF).
 */
import express from "express";
import type pg from "pg";

import type { Principal } from "../auth/authenticator.js";
import type { AppContext } from "../context.js";
import { ApiError, sendError } from "../http/errors.js";
import { jsonBody } from "../http/jsonBody.js";
import { parseIntParam, type IntParam } from "../monitoring/params.js";
import { qualityReport, trendReport } from "../monitoring/reports.js";
import {
  ADMINS_ONLY,
  requireConsoleHeader,
  requireSession,
  readCookie,
  SESSION_COOKIE,
  sessionCookie,
  sessionOf,
  type SessionStore,
} from "./session.js";

const HOURS: IntParam = { name: "hours", min: 1, max: 168, default: 24 };
const DAYS: IntParam = { name: "days", min: 1, max: 30, default: 30 };
const OFFENDER_LIMIT: IntParam = { name: "limit", min: 1, max: 100, default: 20 };
const RECENT_LIMIT: IntParam = { name: "limit", min: 1, max: 200, default: 50 };
const BACKFILL_LIMIT: IntParam = { name: "limit", min: 1, max: 50, default: 10 };

export const DATABASE_UNAVAILABLE = new ApiError(503, "the monitoring data could not be read from the database, try again",
  "server_error", "database_unavailable");
const WRONG_TOKEN = new ApiError(401, "wrong token: not the admin token nor a usable API key", "authentication_error", "invalid_credentials");
const NO_TOKEN = new ApiError(401, "enter the admin token or an admin user's API key", "authentication_error", "missing_credentials");

function params(req: express.Request, res: express.Response, wanted: IntParam[]): Record<string, number> | null {
  const query = req.query as Record<string, unknown>;
  const known = wanted.map((p) => p.name);
  const unknown = Object.keys(query).filter((name) => !known.includes(name));
  if (unknown.length > 0) {
    sendError(res, new ApiError(422, `unknown query parameter "${unknown[0]}": this endpoint takes ${known.map((k) => `"${k}"`).join(", ") || "none"}`,
      "invalid_request_error", "unknown_parameter", unknown[0]!, { known }));
    return null;
  }
  const out: Record<string, number> = {};
  for (const p of wanted) {
    const parsed = parseIntParam(query[p.name], p);
    if (!parsed.ok) {
      sendError(res, new ApiError(422, parsed.message, "invalid_request_error", "invalid_parameter", p.name, { minimum: p.min, maximum: p.max }));
      return null;
    }
    out[p.name] = parsed.value;
  }
  return out;
}

/** A GET route reading the database: parameters checked, no caching, failures a 503. */
function read(ctx: AppContext, wanted: IntParam[], fn: (p: Record<string, number>) => Promise<unknown>): express.RequestHandler {
  return async (req, res) => {
    res.set("Cache-Control", "no-store");
    const p = params(req, res, wanted);
    if (!p) return;
    try {
      res.status(200).json(await fn(p));
    } catch (err) {
      ctx.log.error("console read failed", { path: req.path, error: err });
      sendError(res, DATABASE_UNAVAILABLE);
    }
  };
}

/** Runs `fn` as keytrack_admin in one transaction on the owner pool (the functions check app_private.is_admin()). */
async function asAdmin<T>(pool: pg.Pool, fn: (client: pg.PoolClient) => Promise<T>): Promise<T> {
  const client = await pool.connect();
  try {
    await client.query("begin");
    await client.query("select set_config('role', 'keytrack_admin', true)");
    const result = await fn(client);
    await client.query("commit");
    return result;
  } catch (err) {
    await client.query("rollback").catch(() => {});
    throw err;
  } finally {
    client.release();
  }
}

/** SQL errors of the actions as the one JSON error shape; anything without a SQLSTATE is the database not answering. */
function actionError(err: unknown): ApiError {
  const e = err as { code?: string; message?: string };
  const message = e.message ?? "error";
  switch (e.code) {
    case "22023":
    case "22P02":
    case "23514":
      return new ApiError(422, message, "invalid_request_error", "invalid_parameter");
    case "23505":
      return new ApiError(409, message, "invalid_request_error", "already_exists");
    case "23503":
      return new ApiError(404, "no such user", "invalid_request_error", "user_not_found", "user_id");
    case "42501":
      return new ApiError(403, message, "permission_error", "forbidden");
    default:
      return DATABASE_UNAVAILABLE;
  }
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const HASH = /^[0-9a-f]{64}$/i;

function describe(principal: Principal) {
  return principal.kind === "admin_token"
    ? { kind: "admin_token" as const }
    : { kind: "key" as const, api_key_id: principal.apiKeyId, user_id: principal.userId };
}

export function consoleRouter(ctx: AppContext, store: SessionStore): express.Router {
  const router = express.Router();
  const db = () => ctx.pools.read;
  router.use(requireConsoleHeader());

  // ---- sign-in / sign-out ----
  router.post("/session", jsonBody(ctx.config), async (req, res) => {
    res.set("Cache-Control", "no-store");
    const token = (req.body as { token?: unknown } | undefined)?.token;
    if (typeof token !== "string" || token.trim() === "") return sendError(res, NO_TOKEN);
    if (token.length > 1000) return sendError(res, WRONG_TOKEN);
    const result = await ctx.auth.authenticate(`Bearer ${token.trim()}`);
    if (!result.ok) {
      if (result.status === 503) {
        return sendError(res, new ApiError(503, "authentication is unavailable (database not answering), try again", "server_error", "authentication_unavailable"));
      }
      return sendError(res, WRONG_TOKEN);
    }
    const principal = result.principal;
    if (principal === null) return sendError(res, WRONG_TOKEN);
    if (principal.kind === "key" && !principal.isAdmin) return sendError(res, ADMINS_ONLY);
    // A fresh id at every sign-in (no fixation); the previous session of this browser ends.
    store.delete(readCookie(req.get("cookie"), SESSION_COOKIE));
    const session = store.create(principal);
    res.append("Set-Cookie", sessionCookie(req, session.id, Math.floor(store.ttlMs / 1000)));
    res.status(201).json({ principal: describe(principal), expires_at: new Date(session.expiresAt).toISOString() });
  });

  router.delete("/session", (req, res) => {
    store.delete(readCookie(req.get("cookie"), SESSION_COOKIE));
    res.append("Set-Cookie", sessionCookie(req, "", 0));
    res.status(204).end();
  });

  // ---- the data ----
  const api = express.Router();
  router.use("/api", requireSession(ctx, store), api);

  api.get("/status", (_req, res) => {
    res.set("Cache-Control", "no-store");
    const session = sessionOf(res);
    res.json({
      spool_depth: ctx.recorder.spoolDepth(),
      server_time: new Date().toISOString(),
      principal: describe(session.principal),
      session_expires_at: new Date(session.expiresAt).toISOString(),
    });
  });

  api.get("/quality", read(ctx, [HOURS], ({ hours }) => qualityReport(db(), hours!)));
  api.get("/trend", read(ctx, [DAYS], ({ days }) => trendReport(db(), days!)));

  api.get("/hourly", read(ctx, [HOURS], async ({ hours }) => {
    // Every hour of the window (the view has rows only for hours with requests), oldest first.
    const { rows } = await db().query(
      `select h.hour, coalesce(q.total_requests, 0)::int as total_requests,
              coalesce(q.requests_with_api_key, 0)::int as requests_with_api_key,
              coalesce(q.anonymous_requests, 0)::int as anonymous_requests,
              q.tracking_rate_percent::float8 as tracking_rate_percent,
              round(q.requests_with_api_key::numeric / nullif(q.total_requests - q.anonymous_requests, 0) * 100, 2)::float8
                as authenticated_tracking_rate_percent
         from generate_series(date_trunc('hour', now()) - make_interval(hours => $1::int - 1), date_trunc('hour', now()), interval '1 hour') h(hour)
         left join app_public.api_key_tracking_quality q on q.hour = h.hour
        order by h.hour`,
      [hours],
    );
    return { hours, data: rows.map((r) => ({ ...r, hour: new Date(r.hour).toISOString() })) };
  }));

  api.get("/offenders", read(ctx, [HOURS, OFFENDER_LIMIT], async ({ hours, limit }) => {
    const { rows } = await db().query(
      `select kind, api_key_hash, user_id, email, unattributed_requests::int, pending_requests::int, failed_requests::int,
              reasons, first_seen_at, last_seen_at
         from app_public.attribution_offenders($1, $2)`,
      [hours, limit],
    );
    return { hours, offenders: rows };
  }));

  api.get("/recent", read(ctx, [RECENT_LIMIT], async ({ limit }) => {
    const { rows } = await db().query(
      `select c.request_id, c.created_at, c.model, c.status, c.attribution_status, c.attribution_reason,
              c.attribution_attempts, c.attribution_next_attempt_at, c.attribution_error,
              encode(c.api_key_hash, 'hex') as api_key_hash, c.user_id, u.email
         from app_public.chat_completion_requests c
         left join app_public.users u on u.id = c.user_id
        where c.attribution_status in ('pending', 'failed')
        order by c.created_at desc, c.id desc
        limit $1`,
      [limit],
    );
    return { limit, requests: rows };
  }));

  api.get("/backfills", read(ctx, [BACKFILL_LIMIT], async ({ limit }) => {
    const { rows } = await db().query(
      `select id::int, status, batch_size, upto, examined::bigint::float8 as examined, filled::bigint::float8 as filled,
              ambiguous::bigint::float8 as ambiguous, no_key::bigint::float8 as no_key, anonymized::bigint::float8 as anonymized,
              batches, started_by, started_at, updated_at, finished_at
         from app_public.attribution_backfills order by id desc limit $1`,
      [limit],
    );
    return { backfills: rows };
  }));

  // ---- actions (as keytrack_admin, on the owner pool) ----
  api.post("/import-key", jsonBody(ctx.config), async (req, res) => {
    res.set("Cache-Control", "no-store");
    const body = (req.body ?? {}) as { user_id?: unknown; user_email?: unknown; key_hash?: unknown; name?: unknown };
    const bad = (message: string, param: string) => sendError(res, new ApiError(422, message, "invalid_request_error", "invalid_parameter", param));
    const keyHash = typeof body.key_hash === "string" ? body.key_hash.trim().toLowerCase() : "";
    if (!HASH.test(keyHash)) return bad("key_hash must be the key's SHA-256 as 64 hex digits", "key_hash");
    const userId = typeof body.user_id === "string" ? body.user_id.trim() : "";
    const email = typeof body.user_email === "string" ? body.user_email.trim() : "";
    if (!userId && !email) return bad("give user_id or user_email: the user the key belongs to", "user_id");
    if (userId && !UUID.test(userId)) return bad("user_id must be a UUID", "user_id");
    const name = typeof body.name === "string" && body.name.trim() ? body.name.trim().slice(0, 200) : "imported (console)";
    try {
      const result = await asAdmin(ctx.pools.owner, async (client) => {
        let id = userId;
        if (!id) {
          const { rows } = await client.query<{ id: string }>("select id from app_public.users where lower(email) = lower($1)", [email]);
          if (!rows[0]) return null;
          id = rows[0].id;
        }
        const { rows } = await client.query(
          `select k.id as api_key_id, k.user_id, k.name, k.source, k.created_at,
                  (select count(*)::int from app_public.chat_completion_requests r
                    where r.attribution_status = 'pending' and r.api_key_hash = decode($2, 'hex')) as pending_requests
             from app_public.import_api_key($1::uuid, decode($2, 'hex'), $3) k`,
          [id, keyHash, name],
        );
        return rows[0];
      });
      if (result === null) return sendError(res, new ApiError(404, `no user with email ${email}`, "invalid_request_error", "user_not_found", "user_email"));
      ctx.log.info("console: key imported", { apiKeyId: result.api_key_id, userId: result.user_id, by: describe(sessionOf(res).principal).kind });
      res.status(201).json({ key: result });
    } catch (err) {
      const e = actionError(err);
      if (e === DATABASE_UNAVAILABLE) ctx.log.error("console import-key failed", { error: err });
      sendError(res, e);
    }
  });

  api.post("/backfill", jsonBody(ctx.config), async (req, res) => {
    res.set("Cache-Control", "no-store");
    const raw = (req.body as { batch_size?: unknown } | undefined)?.batch_size;
    const batchSize = raw === undefined || raw === null || raw === "" ? ctx.config.backfillBatchSize ?? 1000 : Number(raw);
    if (!Number.isInteger(batchSize) || batchSize < 1 || batchSize > 100_000) {
      return sendError(res, new ApiError(422, "batch_size must be an integer between 1 and 100000", "invalid_request_error", "invalid_parameter", "batch_size",
        { minimum: 1, maximum: 100_000 }));
    }
    try {
      const run = await asAdmin(ctx.pools.owner, async (client) =>
        (await client.query(
          `select id::int, status, batch_size, upto, examined::bigint::float8 as examined, filled::bigint::float8 as filled, batches, started_at
             from app_public.start_attribution_backfill($1)`,
          [batchSize],
        )).rows[0]);
      ctx.log.info("console: backfill started", { id: run.id });
      res.status(202).json({ backfill: run });
    } catch (err) {
      const e = actionError(err);
      if (e === DATABASE_UNAVAILABLE) ctx.log.error("console backfill failed", { error: err });
      sendError(res, e);
    }
  });

  return router;
}
