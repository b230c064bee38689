// `npm run db:psql`: psql on the database keytrack uses, as its owner or (with
// --analyst) as keytrack_analyst; a clear message when psql is not installed.
import test from "ava";
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { projectRoot } from "../../server/db/projectRoot.js";
import { withDatabaseName } from "../../server/db/urls.js";
import { createTestDb, type TestDb } from "../helpers/db.js";

let db: TestDb;
test.before(async () => {
  db = await createTestDb();
});
test.after.always(async () => {
  await db?.drop();
});

function dbPsql(args: string[], env: Record<string, string> = {}) {
  return spawnSync(process.execPath, ["--import=tsx", path.join(projectRoot, "scripts/db.ts"), "psql", ...args], {
    cwd: projectRoot,
    env: { ...process.env, DATABASE_URL: db.ownerUrl, ROOT_DATABASE_URL: withDatabaseName(db.rootUrl, "postgres"), ...env },
    encoding: "utf8",
    timeout: 60_000,
  });
}

test("opens psql on keytrack's database as its owner, or as keytrack_analyst", (t) => {
  const owner = dbPsql(["-At", "-c", "select current_user, current_database()"]);
  t.is(owner.status, 0, owner.stderr);
  t.is(owner.stdout.trim(), `keytrack_owner|${new URL(db.ownerUrl).pathname.slice(1)}`);
  const analyst = dbPsql(["--analyst", "-At", "-c", "select current_user"]);
  t.is(analyst.status, 0, analyst.stderr);
  t.is(analyst.stdout.trim(), "keytrack_analyst");
});

test("without psql on PATH: a message saying how to install it, exit 1", (t) => {
  const empty = mkdtempSync(path.join(os.tmpdir(), "keytrack-nopsql-"));
  try {
    const res = dbPsql(["-c", "select 1"], { PATH: empty });
    t.is(res.status, 1);
    t.regex(res.stderr, /^db:psql: psql \(the PostgreSQL client\) is not installed, or not on PATH\. Install it: .*apt-get install postgresql-client/);
    t.is(res.stderr.trim().split("\n").length, 1);
  } finally {
    rmSync(empty, { recursive: true, force: true });
  }
});
