/** GET /health: is the process up, and does the database answer (owner pool, HEALTH_TIMEOUT_MS budget, 2 s by default)? No details: anyone may ask. */
import type express from "express";

import type { AppContext } from "../context.js";

async function pingWithin(ctx: AppContext, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer within ${ms} ms`)), ms);
  });
  try {
    await Promise.race([ctx.pools.owner.query("select 1"), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

export function installHealth(app: express.Express, ctx: AppContext): void {
  app.get("/health", async (_req, res) => {
    res.set("Cache-Control", "no-store");
    try {
      await pingWithin(ctx, ctx.config.healthTimeoutMs);
      res.status(200).json({ status: "ok", database: "ok" });
    } catch (err) {
      // Unauthenticated: up or down only. The error (hosts, ports, users) goes to the log.
      ctx.log.warn("health check: database unreachable", { error: err });
      res.status(503).json({ status: "error", database: "unreachable" });
    }
  });
}
