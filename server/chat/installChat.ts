/**
 * The OpenAI-compatible gateway: POST /v1/chat/completions, POST /v1/responses,
 * GET /v1/models. Forwards to UPSTREAM_BASE_URL when set, else answers with the
 * built-in echo model (a development aid, when ECHO_MODEL is on; otherwise a
 * 503 naming the settings). Every served request becomes exactly one ledger row.
 * Each POST route authenticates first, then parses its JSON body
 * (server/http/jsonBody.ts: BODY_LIMIT, nesting depth, malformed JSON), whose
 * errors come out of installErrorHandler in OpenAI's error shape. The two POST
 * routes are also served ahead of Express by the lean route (leanRoute.ts),
 * for the requests whose headers say Express would answer the same.
 */
import type { AppContext, Installer } from "../context.js";
import { chatHandler, type HandlerDeps } from "./handler.js";
import { modelsHandler } from "./models.js";
import { upstreamTarget } from "./upstream.js";

/** What the chat routes answer with: the upstream, or (null) the echo model. Also used by the lean route (leanRoute.ts). */
export function chatDeps({ config }: AppContext): HandlerDeps {
  const upstream = config.upstreamBaseUrl
    ? upstreamTarget(config.upstreamBaseUrl, config.upstreamApiKey, config.upstreamTimeoutMs, {
        maxBodyBytes: config.upstreamMaxBodyBytes,
        maxEventBytes: config.upstreamMaxEventBytes,
      })
    : null;
  return { upstream };
}

export const installChat: Installer = (app, ctx) => {
  const { config } = ctx;
  const deps = chatDeps(ctx);
  const { upstream } = deps;

  app.post("/v1/chat/completions", ...chatHandler("chat", ctx, deps));
  app.post("/v1/responses", ...chatHandler("responses", ctx, deps));
  app.get("/v1/models", modelsHandler(ctx, upstream));
  app.get("/v1/models/:model", modelsHandler(ctx, upstream));

  if (upstream) ctx.log.info("chat endpoints forward to the upstream", { provider: upstream.provider });
  else if (config.echoModel) ctx.log.info("chat endpoints answer with the built-in echo model (UPSTREAM_BASE_URL is unset; a development aid)");
  else ctx.log.warn("chat endpoints answer 503: no upstream configured (set UPSTREAM_BASE_URL, or ECHO_MODEL=true for the built-in echo model)");
};
