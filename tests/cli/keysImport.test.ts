// `npm run keys:import`: keys registered by hash from JSONL or CSV, from a file or
// standard input, idempotently, with per-line refusals and a summary; pending rows
// that presented an imported key are woken for the worker. Never a plaintext key
// on the command line.
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { writeFileSync } from "node:fs";
import path from "node:path";

import test from "ava";

import { projectRoot } from "../../server/db/projectRoot.js";
import { withDatabaseName } from "../../server/db/urls.js";
import { parseCsvLine, parseKeyImportArgs } from "../../server/cli/keysImport.js";
import { createTestDb, createUser, type TestDb } from "../helpers/db.js";
import { tempDataDir } from "../helpers/server.js";

let db: TestDb;
test.before(async () => {
  db = await createTestDb();
});
test.after.always(async () => {
  await db?.drop();
});

const hex = (key: string) => createHash("sha256").update(key, "utf8").digest("hex");

function run(args: string[], input?: string) {
  const res = spawnSync(process.execPath, ["--import=tsx", path.join(projectRoot, "server/cli/keysImport.ts"), ...args], {
    cwd: projectRoot,
    input,
    encoding: "utf8",
    env: { ...process.env, DATABASE_URL: db.ownerUrl, ROOT_DATABASE_URL: withDatabaseName(db.rootUrl, "postgres"), KEYTRACK_DATA_DIR: tempDataDir(), LOG_LEVEL: "error" },
  });
  return { code: res.status, out: res.stdout, err: res.stderr };
}

test.serial("JSONL from a file: imported, then already present on a second run; refusals named by line", async (t) => {
  await createUser(db, "sync@example.com");
  await db.owner.query("insert into app_public.chat_completion_requests (request_id, api_key_hash) values ('sync-pending', app_public.api_key_hash('kt_live_sync_0'))");
  const file = path.join(tempDataDir(), "keys.jsonl");
  const lines = [
    ...Array.from({ length: 25 }, (_, i) => JSON.stringify({ key_hash: hex(`kt_live_sync_${i}`), user_email: "sync@example.com", name: `sync ${i}` })),
    JSON.stringify({ key: "kt_live_plaintext", user_email: "sync@example.com" }),
    JSON.stringify({ key_hash: "nothex", user_email: "sync@example.com" }),
    "{ not json",
  ];
  writeFileSync(file, lines.join("\n") + "\n");
  const first = run(["--file", file, "--batch-size", "10"]);
  t.is(first.code, 3, first.err);
  t.regex(first.out, /keys:import: 25 imported, 0 already present, 3 refused/);
  t.regex(first.out, /refused \(line 26\): plaintext keys are not accepted/);
  t.regex(first.out, /refused \(line 27\): key_hash must be 64 hex digits/);
  t.regex(first.out, /refused \(line 28\)/);
  t.false(first.out.includes("kt_live_plaintext") || first.err.includes("kt_live_plaintext"), "the plaintext key is never echoed");
  const { rows } = await db.owner.query("select count(*)::int as n from app_public.api_keys where source = 'imported'");
  t.is(rows[0].n, 25);
  t.is((await db.owner.query("select count(*)::int as n from app_private.attribution_wakes")).rows[0].n, 1, "the pending row is woken");

  const again = run(["--file", file]);
  t.regex(again.out, /keys:import: 0 imported, 25 already present, 3 refused/);
});

test.serial("CSV on standard input, with quoted fields", async (t) => {
  await createUser(db, "csv@example.com");
  const csv = `key_hash,user_email,name,environment\n${hex("kt_test_csv_1")},csv@example.com,"a, quoted ""name""",test\n${hex("kt_test_csv_2")},csv@example.com,plain,live\n`;
  const res = run(["--format", "csv", "-"], csv);
  t.is(res.code, 0, res.err + res.out);
  t.regex(res.out, /keys:import: 2 imported, 0 already present, 0 refused/);
  const { rows } = await db.owner.query("select name, environment from app_public.api_keys k join app_public.users u on u.id = k.user_id where u.email = 'csv@example.com' order by name");
  t.deepEqual(rows, [{ name: 'a, quoted "name"', environment: "test" }, { name: "plain", environment: "live" }]);
});

test("arguments: no key on the command line, the format from the file name, bad values refused", (t) => {
  t.deepEqual(parseKeyImportArgs(["--file", "keys.csv"]), { file: "keys.csv", format: "csv", batchSize: 1000 });
  t.deepEqual(parseKeyImportArgs([]), { file: null, format: "jsonl", batchSize: 1000 });
  const err = t.throws(() => parseKeyImportArgs(["kt_live_0123456789abcdef"]));
  t.false(err!.message.includes("kt_live_0123456789abcdef"), "the argument is not echoed");
  t.throws(() => parseKeyImportArgs(["--format", "xml"]), { message: /--format must be jsonl or csv/ });
  t.throws(() => parseKeyImportArgs(["--batch-size", "0"]), { message: /--batch-size/ });
  t.deepEqual(parseCsvLine('a,"b,c","d ""e"""'), ["a", "b,c", 'd "e"']);
});
