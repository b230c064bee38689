// PostgreSQL connection strings, TCP and Unix socket alike (server/db/urls.ts),
// and the service starting on a socket URL (`postgres://user@/db?host=/dir`),
// which start-up once refused with "Invalid URL".
import test from "ava";

import {
  databaseNameOf, parsePgUrl, redactUrl, serverAddressOf, userNameOf, withDatabaseName, withTcpServer, withUser,
} from "../../server/db/urls.js";
import { createKey, createTestDb, createUser, type TestDb } from "../helpers/db.js";
import { graphql, startTestServer } from "../helpers/server.js";

const SOCKET = "postgres://keytrack_owner@/keytrack?host=/var/run/postgresql&port=5433";

test("a socket URL with an empty host parses, and every rewrite keeps it a socket URL", (t) => {
  t.is(parsePgUrl(SOCKET).searchParams.get("host"), "/var/run/postgresql");
  t.is(databaseNameOf(SOCKET), "keytrack");
  t.is(userNameOf(SOCKET), "keytrack_owner");
  // (The socket folder comes back percent-encoded, which pg and libpq read the same.)
  t.is(withDatabaseName(SOCKET, "postgres"), "postgres://keytrack_owner@/postgres?host=%2Fvar%2Frun%2Fpostgresql&port=5433");
  t.is(withUser(SOCKET, "keytrack_authenticator"), "postgres://keytrack_authenticator@/keytrack?host=%2Fvar%2Frun%2Fpostgresql&port=5433");
  t.deepEqual(serverAddressOf(SOCKET), { path: "/var/run/postgresql/.s.PGSQL.5433" });
  t.is(withTcpServer(SOCKET, "127.0.0.1", 6000), "postgres://keytrack_owner@127.0.0.1:6000/keytrack");
});

test("no user and no database in the authority, and the socket URL without a user", (t) => {
  t.is(databaseNameOf("postgres:///keytrack?host=/tmp"), "keytrack");
  t.is(withDatabaseName("postgres:///keytrack?host=/tmp", "other"), "postgres:///other?host=%2Ftmp");
  t.is(databaseNameOf("postgresql://u@h/?dbname=named"), "named");
  t.is(withDatabaseName("postgresql://u@h/?dbname=named", "x"), "postgresql://u@h/x");
});

test("TCP URLs: user, database, port, password", (t) => {
  const url = "postgres://owner:s3cret@db.example:5433/keytrack?sslmode=require";
  t.is(userNameOf(url), "owner");
  t.is(withUser(url, "keytrack_authenticator"), "postgres://keytrack_authenticator@db.example:5433/keytrack?sslmode=require");
  t.is(redactUrl(url), "postgres://owner:***@db.example:5433/keytrack?sslmode=require");
  t.deepEqual(serverAddressOf(url), { host: "db.example", port: 5433 });
  t.is(redactUrl("postgres://u@/db?host=/tmp&password=x"), "postgres://u@/db?host=%2Ftmp&password=***");
});

test("what is not a postgres URL is refused, and redactUrl never throws", (t) => {
  t.throws(() => parsePgUrl("mysql://u@h/db"), { instanceOf: TypeError });
  t.throws(() => parsePgUrl("postgres://u@h:notaport/db"), { instanceOf: TypeError });
  t.is(redactUrl("nonsense"), "<unparseable connection string>");
});

let db: TestDb;
test.before(async () => {
  db = await createTestDb();
});
test.after.always(async () => {
  await db?.drop();
});

test("the service starts on socket URLs (DATABASE_URL, ROOT_DATABASE_URL, AUTH_DATABASE_URL) and serves GraphQL", async (t) => {
  // Where this cluster's Unix socket is (the machine's PostgreSQL, or the embedded one of `npm test`).
  const { rows: [where] } = await db.root.query<{ dir: string; port: string }>(
    "select split_part(current_setting('unix_socket_directories'), ',', 1) as dir, current_setting('port') as port");
  if (!where?.dir) return t.pass("this cluster listens on no Unix socket");
  const socketUrl = (user: string, database: string) =>
    `postgres://${user}@/${database}?host=${where.dir.trim()}&port=${where.port}`;
  const server = await startTestServer(db, {
    DATABASE_URL: socketUrl("keytrack_owner", db.name),
    ROOT_DATABASE_URL: socketUrl(userNameOf(db.rootUrl), "postgres"),
    AUTH_DATABASE_URL: socketUrl("keytrack_authenticator", db.name),
  });
  try {
    t.regex(server.config.db.databaseUrl, /^postgres:\/\/keytrack_owner@\//);
    const key = await createKey(db, await createUser(db, "socket@example.com"));
    const res = await graphql(server, "{ allApiKeys { nodes { rowId } } }", {}, key.secret);
    t.is(res.status, 200);
    t.deepEqual(res.body.data?.allApiKeys.nodes, [{ rowId: key.id }]);
    const health = await fetch(`${server.url}/health`);
    t.is(health.status, 200);
  } finally {
    await server.close();
  }
});
