/**
 * PostGraphile v5 (Amber preset) on Express through grafserv: GraphQL at
 * /graphql, GraphiQL (Ruru) at /graphiql when config.graphiql is on. Requests
 * connect as the NOINHERIT authenticator and switch role per request from the
 * pgSettings that installGraphQLAuth resolved (with their statement_timeout);
 * introspection of the database runs as keytrack_admin so the schema shows what
 * an admin may see (objects without a GRANT disappear).
 *
 * Limits (server/graphql): connections get a default and a maximum page size
 * (pageSize.ts), every request a cost, depth and field limit checked before it
 * runs, and GraphQL introspection (__schema, __type) is for admins only unless
 * config.graphiql is on (limits.ts).
 */
import type express from "express";
import { postgraphile, type PostGraphileInstance } from "postgraphile";
import { makePgService } from "postgraphile/adaptors/pg";
import { defaultMaskError } from "postgraphile/grafserv";
import { grafserv } from "postgraphile/grafserv/express/v4";
import { GraphQLError } from "postgraphile/graphql";
import { PostGraphileAmberPreset } from "postgraphile/presets/amber";

import pg from "pg";

import type { AppContext } from "../context.js";
import { parsePgUrl, userNameOf, withUser } from "../db/urls.js";
import { makeCitusSettingsPlugin, propagatesSetLocal } from "../graphql/citusSettings.js";
import { makeReadReplicaPlugin, type ReadReplicaGraphQL } from "../graphql/readReplica.js";
import { makeLimitsPlugin } from "../graphql/limits.js";
import { makePageSizePlugin } from "../graphql/pageSize.js";

export const GRAPHQL_PATH = "/graphql";
export const GRAPHIQL_PATH = "/graphiql";
/** The role admins' requests run as; the database is introspected as it too. */
export const ADMIN_ROLE = "keytrack_admin";

type PgService = ReturnType<typeof makePgService>;

/**
 * SQLSTATE classes whose message is meant for the client (the database's own
 * checks and the errors our SQL functions raise, and 57014: a statement that
 * ran past statement_timeout, or was cancelled; 54000: a limit such as the
 * live keys per user); they are returned with
 * `extensions.code` = the SQLSTATE so clients and tests match on the code.
 * Everything else is masked and logged by grafserv's default.
 */
const CLIENT_SQLSTATE = /^(22|23|28|40|P0)[0-9A-Z]{3}$|^42501$|^54000$|^57014$/;

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

/** The replica as the authenticator (READ_DATABASE_URL's server and database, AUTH_DATABASE_URL's login). */
function replicaAuthUrl(ctx: AppContext): string | null {
  const read = ctx.config.db.readDatabaseUrl;
  if (!read) return null;
  const auth = parsePgUrl(ctx.config.db.authDatabaseUrl);
  const password = auth.password ? decodeURIComponent(auth.password) : auth.searchParams.get("password");
  return withUser(read, userNameOf(ctx.config.db.authDatabaseUrl), password);
}

export function makePreset(ctx: AppContext, pgService: PgService, extraPlugins: GraphileConfig.Plugin[] = []): GraphileConfig.Preset {
  const { config } = ctx;
  const limits = {
    defaultPageSize: config.graphqlDefaultPageSize,
    maxPageSize: config.graphqlMaxPageSize,
    maxCost: config.graphqlMaxCost,
    maxDepth: config.graphqlMaxDepth,
  };
  return {
    extends: [PostGraphileAmberPreset],
    plugins: [
      makePageSizePlugin(limits),
      makeLimitsPlugin({
        limits,
        allowIntrospection: (contextValue) =>
          config.graphiql || (contextValue as { pgSettings?: Record<string, unknown> } | undefined)?.pgSettings?.role === ADMIN_ROLE,
      }),
      ...extraPlugins,
    ],
    pgServices: [pgService],
    grafserv: {
      graphqlPath: GRAPHQL_PATH,
      graphiql: config.graphiql,
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
          // statement_timeout comes with the stashed settings (pgSettingsFor); this default covers any other caller.
          pgSettings: {
            statement_timeout: String(config.graphqlStatementTimeoutMs),
            ...args.contextValue?.pgSettings,
            ...req?.pgSettings,
          },
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
    pgSettingsForIntrospection: { role: ADMIN_ROLE },
  });
  // pgl.release() releases grafserv but not the service's pools: that is ours to do.
  // With a read replica: query operations run there while it is healthy (graphql/readReplica.ts).
  const replicaUrl = replicaAuthUrl(ctx);
  const replicaPool = replicaUrl ? new pg.Pool({ connectionString: replicaUrl, max: 10, connectionTimeoutMillis: 5_000 }) : null;
  replicaPool?.on("error", (err) => ctx.log.warn("idle database client error", { pool: "graphql-read", error: err }));
  const replica: ReadReplicaGraphQL | null = replicaPool ? makeReadReplicaPlugin(ctx.pools.reads, replicaPool, pgService.withPgClientKey) : null;
  const releaseService = async () => {
    await pgService.release?.();
    replica?.release();
    await replicaPool?.end();
  };
  // On a Citus cluster the shards' row-level security needs keytrack.user_id as SET LOCAL (graphql/citusSettings.ts).
  // Listed first: its middleware runs last, so it also wraps the replica's client.
  const citus = await propagatesSetLocal((sql) => ctx.pools.owner.query(sql));
  const plugins = [...(citus ? [makeCitusSettingsPlugin(pgService.withPgClientKey)] : []), ...(replica ? [replica.plugin] : [])];
  const pgl = postgraphile(makePreset(ctx, pgService, plugins));
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
