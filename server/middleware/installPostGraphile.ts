/**
 * PostGraphile v5 (Amber preset) on Express through grafserv: GraphQL at
 * /graphql, GraphiQL (Ruru) at /graphiql. Requests connect as the NOINHERIT
 * authenticator and switch role per request from the pgSettings that
 * installAdminAuth resolved; introspection runs as keytrack_admin so the
 * schema shows what an admin may see (objects without a GRANT disappear).
 */
import type express from "express";
import { postgraphile, type PostGraphileInstance } from "postgraphile";
import { makePgService } from "postgraphile/adaptors/pg";
import { grafserv } from "postgraphile/grafserv/express/v4";
import { PostGraphileAmberPreset } from "postgraphile/presets/amber";

import type { AppContext } from "../app.js";

export const GRAPHQL_PATH = "/graphql";
export const GRAPHIQL_PATH = "/graphiql";

export function makePreset(ctx: AppContext): GraphileConfig.Preset {
  const { config } = ctx;
  return {
    extends: [PostGraphileAmberPreset],
    pgServices: [
      makePgService({
        connectionString: config.db.authDatabaseUrl,
        superuserConnectionString: config.db.databaseUrl,
        schemas: ["app_public"],
        pgSettingsForIntrospection: { role: "keytrack_admin" },
      }),
    ],
    grafserv: {
      graphqlPath: GRAPHQL_PATH,
      graphiql: true,
      graphiqlPath: GRAPHIQL_PATH,
      graphiqlOnGraphQLGET: false,
      maxRequestLength: config.bodyLimitBytes,
      websockets: false,
      watch: false,
    },
    grafast: {
      explain: config.appEnv === "development",
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
  const pgl = postgraphile(makePreset(ctx));
  // Build the schema now: a database that cannot be introspected fails the start, not the first request.
  await pgl.getSchema();
  const serv = pgl.createServ(grafserv);
  // No websockets, so no HTTP server is needed here.
  await serv.addTo(app, null, false);
  return {
    pgl,
    async release() {
      await serv.release();
      await pgl.release();
    },
  };
}
