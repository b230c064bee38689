// Settings are validated once at start-up: a bad value names itself, and the
// entry point stops with exit code 2 before touching any database.
import test from "ava";
import { spawnSync } from "node:child_process";
import path from "node:path";
import { ConfigError, loadConfig } from "../../server/config.js";
import { projectRoot } from "../../server/db/projectRoot.js";

test("defaults: port 8000, development, anonymous allowed in development only, embedded database", (t) => {
  const c = loadConfig({});
  t.like(c, { port: 8000, appEnv: "development", allowAnonymous: true, db: null, worker: true, adminApiKey: null });
  t.false(loadConfig({ APP_ENV: "production" }).allowAnonymous);
  t.false(loadConfig({ APP_ENV: "test" }).allowAnonymous);
});

test("development is the default only on the embedded database: with DATABASE_URL, production unless APP_ENV says otherwise", (t) => {
  const external = loadConfig({ DATABASE_URL: "postgres://keytrack_owner@db.example/keytrack" });
  t.like(external, { appEnv: "production", allowAnonymous: false, echoModel: false, graphiql: false });
  t.throws(() => loadConfig({ DATABASE_URL: "postgres://keytrack_owner@db.example/keytrack", ADMIN_API_KEY: "8-chars!" }), {
    instanceOf: ConfigError,
    message: /ADMIN_API_KEY must be at least 32 characters when APP_ENV=production/,
  });
  t.like(loadConfig({ DATABASE_URL: "postgres://keytrack_owner@db.example/keytrack", APP_ENV: "development" }), { appEnv: "development", allowAnonymous: true, echoModel: true, graphiql: true });
  t.like(loadConfig({}), { appEnv: "development", echoModel: true, graphiql: true });
  t.like(loadConfig({ APP_ENV: "test" }), { echoModel: true, graphiql: false });
});

test("connection strings are derived from DATABASE_URL", (t) => {
  const c = loadConfig({ DATABASE_URL: "postgres://keytrack_owner:pw@db.example:5433/keytrack" });
  t.deepEqual(
    { ...c.db },
    {
      databaseUrl: "postgres://keytrack_owner:pw@db.example:5433/keytrack",
      authDatabaseUrl: "postgres://keytrack_authenticator@db.example:5433/keytrack",
      rootDatabaseUrl: "postgres://keytrack_owner:pw@db.example:5433/postgres",
      shadowDatabaseUrl: "postgres://keytrack_owner:pw@db.example:5433/keytrack_shadow",
      readDatabaseUrl: null,
    },
  );
});

for (const [name, value, message] of [
  ["PORT", "eighty", /^PORT must be an integer 0\.\.65535, got "eighty"$/],
  ["PORT", "70000", /^PORT must be an integer/],
  ["APP_ENV", "staging", /^APP_ENV must be one of development, test, production/],
  ["DATABASE_URL", "mysql://x@y/z", /^DATABASE_URL/],
  ["ALLOW_ANONYMOUS", "maybe", /^ALLOW_ANONYMOUS/],
  ["BODY_LIMIT", "lots", /^BODY_LIMIT/],
  ["UPSTREAM_BASE_URL", "not a url", /^UPSTREAM_BASE_URL/],
] as const) {
  test(`${name}=${value} is refused with a message naming it`, (t) => {
    t.throws(() => loadConfig({ [name]: value }), { instanceOf: ConfigError, message });
  });
}

test("ADMIN_API_KEY must be at least 32 characters in production", (t) => {
  t.throws(() => loadConfig({ APP_ENV: "production", ADMIN_API_KEY: "short-but-fine-in-dev" }), {
    instanceOf: ConfigError,
    message: /ADMIN_API_KEY must be at least 32 characters when APP_ENV=production/,
  });
  t.is(loadConfig({ ADMIN_API_KEY: "short-but-fine-in-dev" }).adminApiKey, "short-but-fine-in-dev");
});

test("the entry point stops with exit code 2 and names the bad setting", (t) => {
  const res = spawnSync(process.execPath, ["--import=tsx", path.join(projectRoot, "server/index.ts")], {
    env: { ...process.env, PORT: "-1", DATABASE_URL: "" },
    encoding: "utf8",
    timeout: 30_000,
  });
  t.is(res.status, 2);
  t.regex(res.stderr, /keytrack: configuration error: PORT must be an integer 0\.\.65535, got "-1"/);
});
