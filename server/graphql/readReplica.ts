/**
 * GraphQL queries on the read replica (READ_DATABASE_URL), mutations on the
 * primary. After PostGraphile's PgContextPlugin has put the primary's
 * withPgClient in the request's context, a query operation gets the replica's
 * instead while the ReadRouter finds it healthy; a replica that fails on its
 * connection mid-request is marked unhealthy and the operation's SQL runs on
 * the primary (queries only read, so running them again is harmless). The
 * response says which node answered and as of when (X-Keytrack-Read-Node,
 * X-Keytrack-Read-As-Of, as of the router's last check).
 */
import type { ServerResponse } from "node:http";

import { createWithPgClient } from "postgraphile/adaptors/pg";
import { getOperationAST } from "postgraphile/graphql";
import type pg from "pg";

import type { ReadRouter } from "../db/readRouter.js";
import { isTransientError } from "../recording/retry.js";
import { afterPrepareArgs } from "./afterPrepareArgs.js";

type WithPgClient = ReturnType<typeof createWithPgClient>;

export interface ReadReplicaGraphQL {
  plugin: GraphileConfig.Plugin;
  release(): void;
}

export function makeReadReplicaPlugin(router: ReadRouter, replicaAuthPool: pg.Pool, withPgClientKey = "withPgClient"): ReadReplicaGraphQL {
  const replicaWithPgClient: WithPgClient = createWithPgClient({ pool: replicaAuthPool });

  const route = (args: { document?: unknown; operationName?: string | null; contextValue?: Record<string, unknown>; requestContext?: Partial<Grafast.RequestContext> }) => {
    const contextValue = args.contextValue;
    if (!contextValue || !args.document) return;
    const operation = getOperationAST(args.document as Parameters<typeof getOperationAST>[0], args.operationName ?? undefined);
    if (operation?.operation !== "query") return;
    const res = (args.requestContext as { expressv4?: { res?: ServerResponse } } | undefined)?.expressv4?.res;
    const say = (node: "primary" | "replica") => {
      if (res && !res.headersSent) {
        const state = router.replicaState;
        res.setHeader("X-Keytrack-Read-Node", node);
        res.setHeader("X-Keytrack-Read-As-Of", (node === "replica" && state.lagSeconds !== null && state.checkedAt
          ? new Date(state.checkedAt.getTime() - state.lagSeconds * 1000) : new Date()).toISOString());
      }
    };
    const primaryWithPgClient = contextValue[withPgClientKey] as WithPgClient | undefined;
    if (!primaryWithPgClient) return;
    if (router.choose() !== "replica") {
      router.countFallback(router.replicaState.reason ?? "unreachable");
      router.countServed("primary");
      say("primary");
      return;
    }
    router.countServed("replica");
    say("replica");
    const routed = (async (pgSettings, callback) => {
      try {
        return await replicaWithPgClient(pgSettings, callback);
      } catch (err) {
        if (!isTransientError(err)) throw err;
        router.markFailed(err);
        if (!router.fallsBack) throw err;
        router.countFallback("failed");
        return primaryWithPgClient(pgSettings, callback);
      }
    }) as WithPgClient;
    contextValue[withPgClientKey] = routed;
  };

  const plugin: GraphileConfig.Plugin = {
    name: "KeytrackReadReplicaPlugin",
    version: "1.0.0",
    description: "Runs GraphQL query operations on the read replica while it is healthy",
    grafast: {
      middleware: {
        prepareArgs: afterPrepareArgs((args) => route(args as Parameters<typeof route>[0])),
      },
    },
  };
  return { plugin, release: () => replicaWithPgClient.release?.() };
}
