// Settings are validated once at start-up: a bad value names itself, and the
// entry point stops with exit code 2 before touching any database.
import test from "ava";
import { spawnSync } from "node:child_process";
import path from "node:path";
import { ConfigError, loadConfig, SETTING_NAMES, unknownSettingWarnings } from "../../server/config.js";
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

test("SETTING_NAMES is exactly what loadConfig reads", (t) => {
  const read = new Set<string>();
  const env = new Proxy({} as NodeJS.ProcessEnv, {
    get: (_target, name) => {
      if (typeof name === "string") read.add(name);
      return undefined;
    },
  });
  loadConfig(env);
  t.deepEqual([...read].sort(), [...SETTING_NAMES].sort());
});

test("variables that look like settings are reported with the name probably meant; others are left alone", (t) => {
  const warnings = unknownSettingWarnings({
    DATABSE_URL: "postgres://x@y/z", ADMIN_APIKEY: "x", KEYTRACK_DATADIR: "/tmp/x", log_level: "debug", WORKERS: "2",
    // Not look-alikes: settings themselves, common variables, and the tools' own.
    DATABASE_URL: "postgres://x@y/z", PORT: "1", HOME: "/root", PGPORT: "5432", PGHOST: "db", HOSTNAME: "h", PATH: "/bin",
    NODE_ENV: "production", PGUSER: "me", TEST_DATABASE_URL: "postgres://x@y/z", USER: "me", SHELL: "/bin/sh",
  });
  t.deepEqual(
    warnings.map((w) => [w.name, w.meant]),
    [["ADMIN_APIKEY", "ADMIN_API_KEY"], ["DATABSE_URL", "DATABASE_URL"], ["KEYTRACK_DATADIR", "KEYTRACK_DATA_DIR"], ["WORKERS", "WORKER"], ["log_level", "LOG_LEVEL"]],
  );
  t.regex(warnings[1]!.message, /^DATABSE_URL is set, but keytrack has no such setting: did you mean DATABASE_URL\?/);
  // Never fatal.
  t.notThrows(() => loadConfig({ DATABSE_URL: "x", ADMIN_APIKEY: "y" }));
});
