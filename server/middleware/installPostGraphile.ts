/**
 * PostGraphile v5 (Amber preset) on Express through grafserv: GraphQL at
 * /graphql, GraphiQL (Ruru) at /graphiql. Requests connect as the NOINHERIT
 * authenticator and switch role per request from the pgSettings that
 * installGraphQLAuth resolved; introspection runs as keytrack_admin so the
 * schema shows what an admin may see (objects without a GRANT disappear).
 */
import type express from "express";
import { postgraphile, type PostGraphileInstance } from "postgraphile";
import { makePgService } from "postgraphile/adaptors/pg";
import { defaultMaskError } from "postgraphile/grafserv";
import { grafserv } from "postgraphile/grafserv/express/v4";
import { GraphQLError } from "postgraphile/graphql";
import { PostGraphileAmberPreset } from "postgraphile/presets/amber";

import type { AppContext } from "../context.js";

export const GRAPHQL_PATH = "/graphql";
export const GRAPHIQL_PATH = "/graphiql";

type PgService = ReturnType<typeof makePgService>;

/**
 * SQLSTATE classes whose message is meant for the client (the database's own
 * checks and the errors our SQL functions raise); they are returned with
 * `extensions.code` = the SQLSTATE so clients and tests match on the code.
 * Everything else is masked and logged by grafserv's default.
 */
const CLIENT_SQLSTATE = /^(22|23|28|40|P0)[0-9A-Z]{3}$|^42501$/;

function maskError(error: GraphQLError) {
  const code = (error.originalError as { code?: unknown } | undefined)?.code;
  if (typeof code === "string" && CLIENT_SQLSTATE.test(code)) {
    return new GraphQLError(error.originalError!.message, {
      nodes: error.nodes,
      source: error.source,
      positions: error.positions,
      path: error.path,
      originalError: error.originalError,
      extensions: { code },
    });
  }
  return defaultMaskError(error);
}

export function makePreset(ctx: AppContext, pgService: PgService): GraphileConfig.Preset {
  const { config } = ctx;
  return {
    extends: [PostGraphileAmberPreset],
    pgServices: [pgService],
    grafserv: {
      graphqlPath: GRAPHQL_PATH,
      graphiql: true,
      graphiqlPath: GRAPHIQL_PATH,
      graphiqlOnGraphQLGET: false,
      maxRequestLength: config.bodyLimitBytes,
      websockets: false,
      watch: false,
      maskError,
    },
    grafast: {
      context(requestContext, args) {
        const req = requestContext.expressv4?.req;
        return {
          // No stashed settings means no role switch: the authenticator, which reads nothing private.
          pgSettings: { ...args.contextValue?.pgSettings, ...req?.pgSettings },
        };
      },
    },
  };
}

export interface InstalledPostGraphile {
  pgl: PostGraphileInstance;
  release(): Promise<void>;
}

export async function installPostGraphile(app: express.Express, ctx: AppContext): Promise<InstalledPostGraphile> {
  const pgService = makePgService({
    connectionString: ctx.config.db.authDatabaseUrl,
    superuserConnectionString: ctx.config.db.databaseUrl,
    schemas: ["app_public"],
    pgSettingsForIntrospection: { role: "keytrack_admin" },
  });
  // pgl.release() releases grafserv but not the service's pools: that is ours to do.
  const releaseService = async () => {
    await pgService.release?.();
  };
  const pgl = postgraphile(makePreset(ctx, pgService));
  try {
    // Build the schema now: a database that cannot be introspected fails the start, not the first request.
    await pgl.getSchema();
    const serv = pgl.createServ(grafserv);
    // No websockets, so no HTTP server is needed here.
    await serv.addTo(app, null, false);
  } catch (err) {
    await pgl.release();
    await releaseService();
    throw err;
  }
  return {
    pgl,
    async release() {
      try {
        await pgl.release();
      } finally {
        await releaseService();
      }
    },
  };
}
