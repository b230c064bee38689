/**
 * The admin console: `GET /` serves one small page (server/console/static:
 * index.html, console.js, console.css; uPlot from node_modules for the charts)
 * for the admin of a small gateway without Grafana, showing how good
 * attribution is and where it fails, with two actions (import a key by hash,
 * start a backfill). Its data comes from /console/api (api.ts), behind a
 * cookie session (session.ts).
 *
 * Every console response (the page, its assets, its JSON) carries a strict
 * Content-Security-Policy (no inline script or style, nothing from elsewhere),
 * nosniff and no-referrer.
 */
import { createRequire } from "node:module";
import path from "node:path";

import express from "express";

import type { Installer } from "../context.js";
import { projectRoot } from "../db/projectRoot.js";
import { ApiError, sendError } from "../http/errors.js";
import { consoleRouter } from "./api.js";
import { SessionStore } from "./session.js";

export const CONSOLE_CSP =
  "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'";

const STATIC_DIR = path.join(projectRoot, "server", "console", "static");

function uplotDir(): string {
  const require = createRequire(import.meta.url);
  return path.dirname(require.resolve("uplot")); // node_modules/uplot/dist
}

export const consoleHeaders: express.RequestHandler = (_req, res, next) => {
  res.set({
    "Content-Security-Policy": CONSOLE_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
  });
  next();
};

const NOT_FOUND = new ApiError(404, "not found", "invalid_request_error", "not_found");

/** The sessions of this process (exposed for tests through installConsole.sessions). */
export function makeConsoleInstaller(store = new SessionStore()): Installer & { sessions: SessionStore } {
  const install: Installer = (app, ctx) => {
    const staticOptions = { index: false, fallthrough: true, dotfiles: "deny" as const, maxAge: 0, etag: true };
    app.get("/", consoleHeaders, (_req, res) => {
      res.set("Cache-Control", "no-cache");
      res.sendFile(path.join(STATIC_DIR, "index.html"));
    });
    app.use("/console", consoleHeaders);
    app.use("/console/static", express.static(STATIC_DIR, staticOptions));
    const vendor = uplotDir();
    app.get("/console/vendor/uPlot.esm.js", (_req, res) => res.sendFile(path.join(vendor, "uPlot.esm.js")));
    app.get("/console/vendor/uPlot.min.css", (_req, res) => res.sendFile(path.join(vendor, "uPlot.min.css")));
    app.use("/console", consoleRouter(ctx, store));
    // Anything else under /console: the JSON 404, with the console's headers.
    app.use("/console", (_req, res) => sendError(res, NOT_FOUND));
  };
  return Object.assign(install, { sessions: store });
}

export const installConsole = makeConsoleInstaller();
