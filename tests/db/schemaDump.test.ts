// The committed schema dump (migrations/schema.sql) is what a fresh migrate
// produces: every change to the database is reviewed as a diff of that file.
import test from "ava";
import { readFile } from "node:fs/promises";
import { dumpSchema, SCHEMA_DUMP_PATH } from "../../scripts/dump-schema.mjs";
import { createTestDb, withClient } from "../helpers/db.js";

test("a fresh migrate reproduces migrations/schema.sql", async (t) => {
  const db = await createTestDb();
  try {
    const fresh = await withClient(db.ownerUrl, (c) => dumpSchema(c));
    const committed = await readFile(SCHEMA_DUMP_PATH, "utf8");
    t.is(fresh, committed, "run `npm run db:dump` (or graphile-migrate commit/watch) and commit migrations/schema.sql");
  } finally {
    await db.drop();
  }
});
