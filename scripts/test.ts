// `npm test`: prepares a migrated template database, runs ava over tests/, and
// prints the closing line `ava: N passed, N failed` (exit 1 on any failure).
//
// The PostgreSQL is TEST_DATABASE_URL (a superuser connection, e.g.
// postgres://postgres@127.0.0.1:5432/postgres) when set; otherwise an embedded
// PostgreSQL is started in a temporary folder for the run and removed after.
// Each test file clones the template into a database of its own, so files run
// in parallel without seeing each other's rows.
import { spawn } from "node:child_process";
import { chmod, mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { pathToFileURL } from "node:url";
import pg from "pg";
import { prepareDatabase, withClient } from "../server/db/prepare.js";
import { withDatabaseName, withUser } from "../server/db/urls.js";
import { startEmbeddedPostgres } from "../server/db/embedded.js";
import { projectRoot } from "../server/db/projectRoot.js";
import { processAlive } from "../server/processAlive.js";

const runId = `${process.pid}_${Date.now().toString(36)}`;
const template = `kt_template_${runId}`;

async function main(): Promise<number> {
  let rootUrl = process.env.TEST_DATABASE_URL;
  let stopEmbedded: (() => Promise<void>) | undefined;
  let embeddedDir: string | undefined;
  if (!rootUrl) {
    embeddedDir = await mkdtemp(path.join(os.tmpdir(), "keytrack-test-"));
    // When run as root, PostgreSQL runs as the postgres user, who must reach the folder.
    await chmod(embeddedDir, 0o755);
    const port = 20000 + Math.floor(Math.random() * 20000);
    console.log(`# TEST_DATABASE_URL unset: starting an embedded PostgreSQL (${embeddedDir}, port ${port})`);
    const embedded = await startEmbeddedPostgres({ dataDir: embeddedDir, port });
    rootUrl = embedded.rootUrl;
    stopEmbedded = embedded.stop;
  }
  const ownerUrl = withUser(withDatabaseName(rootUrl, template), "keytrack_owner");
  try {
    await dropLeftovers(rootUrl);
    await prepareDatabase({ rootUrl, databaseUrl: ownerUrl });
    // Cloning needs a template nobody is connected to; mark it as one.
    await withClient(rootUrl, (c) => c.query(`alter database ${pg.escapeIdentifier(template)} is_template true`));
    return await runAva({ ...process.env, KEYTRACK_TEST_ROOT_URL: rootUrl, KEYTRACK_TEST_TEMPLATE: template, KEYTRACK_TEST_RUN: runId });
  } finally {
    await withClient(rootUrl, async (c) => {
      const { rows } = await c.query("select datname from pg_database where datname like $1", [`kt_%${runId}%`]);
      for (const { datname } of rows) {
        await c.query(`alter database ${pg.escapeIdentifier(datname)} is_template false`);
        await c.query(`drop database if exists ${pg.escapeIdentifier(datname)} with (force)`);
      }
    }).catch((err) => console.error(`# cleanup failed: ${err.message}`));
    if (stopEmbedded) await stopEmbedded();
    if (embeddedDir) await rm(embeddedDir, { recursive: true, force: true });
  }
}

/**
 * Databases of earlier runs that were killed before their cleanup: their process is gone and
 * none of the run's databases has a connection (a run in another pid namespace, whose process
 * this one cannot see, is still connected to its databases while it runs).
 */
async function dropLeftovers(rootUrl: string): Promise<void> {
  await withClient(rootUrl, async (c) => {
    const { rows } = await c.query<{ datname: string }>(
      "select datname from pg_database where datname ~ '^kt_(template|t)_[0-9]+_'");
    const { rows: busy } = await c.query<{ run: string }>(
      "select distinct substring(datname from '^kt_(?:template|t)_([0-9]+_[0-9a-z]+)') as run from pg_stat_activity where datname ~ '^kt_(template|t)_[0-9]+_'");
    const busyRuns = new Set(busy.map((b) => b.run));
    for (const { datname } of rows) {
      const pid = Number(/^kt_(?:template|t)_(\d+)_/.exec(datname)![1]);
      const run = /^kt_(?:template|t)_(\d+_[0-9a-z]+)/.exec(datname)![1]!;
      if (pid === process.pid || processAlive(pid) || busyRuns.has(run)) continue;
      await c.query(`alter database ${pg.escapeIdentifier(datname)} is_template false`);
      await c.query(`drop database if exists ${pg.escapeIdentifier(datname)} with (force)`);
    }
  });
}

/**
 * Runs ava with its TAP reporter and counts the results from the TAP lines as they
 * stream (`ok N - title`, `not ok N - title`), so the closing line counts what ran
 * even when ava ends early (its inactivity timeout, a crashed worker). Failures are
 * listed by name at the end.
 */
function runAva(env: NodeJS.ProcessEnv): Promise<number> {
  return new Promise((resolve, reject) => {
    const args = [
      `--import=${pathToFileURL(path.join(projectRoot, "scripts/ava-tap-fix.mjs")).href}`,
      path.join(projectRoot, "node_modules/ava/entrypoints/cli.mjs"),
      "--tap",
      ...process.argv.slice(2),
    ];
    const child = spawn(process.execPath, args, { cwd: projectRoot, env, stdio: ["ignore", "pipe", "inherit"] });
    let passed = 0, buffer = "";
    const failures: string[] = [];
    const onLine = (line: string) => {
      const m = /^(ok|not ok) \d+ - (.*?)(?: # (SKIP|TODO)\b.*)?$/.exec(line);
      if (!m || m[3]) return;
      if (m[1] === "ok") passed++;
      else failures.push(m[2]!);
    };
    child.stdout.on("data", (chunk: Buffer) => {
      process.stdout.write(chunk);
      buffer += chunk.toString("utf8");
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        onLine(buffer.slice(0, nl).replace(/\r$/, ""));
        buffer = buffer.slice(nl + 1);
      }
    });
    child.on("error", reject);
    child.on("close", (code) => {
      if (buffer) onLine(buffer);
      // A run that failed without naming a failed test (ava itself crashed) is one failure.
      if (code !== 0 && failures.length === 0) failures.push(`ava exited with code ${code} without naming a failed test`);
      if (failures.length > 0) console.log(`# failed:\n${failures.map((f) => `#   ${f}`).join("\n")}`);
      console.log(`ava: ${passed} passed, ${failures.length} failed`);
      resolve(code === 0 && failures.length === 0 && passed > 0 ? 0 : 1);
    });
  });
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(`npm test: ${err.stack ?? err}`);
    console.log("ava: 0 passed, 1 failed");
    process.exit(1);
  },
);
