// `npm run graphql:sdl`: starts the service on the configured database (or the
// embedded one), reads its GraphQL schema and writes server/graphql/schema.graphql.
import { writeFile } from "node:fs/promises";
import path from "node:path";
import { loadConfig } from "../server/config.js";
import { fetchSdl } from "../server/graphql/sdl.js";
import { startServer } from "../server/main.js";
import { projectRoot } from "../server/db/projectRoot.js";

export const SDL_PATH = path.join(projectRoot, "server/graphql/schema.graphql");

const server = await startServer(loadConfig({ ...process.env, PORT: "0", HOST: "127.0.0.1", WORKER: "false", LOG_LEVEL: "warn", GRAPHIQL: "true" }));
try {
  await writeFile(SDL_PATH, await fetchSdl(server.url));
  console.log(`wrote ${path.relative(process.cwd(), SDL_PATH)}`);
} finally {
  await server.close();
}
