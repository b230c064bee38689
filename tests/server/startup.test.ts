// The entry point (server/index.ts) as an operator meets it on a fresh clone:
// a busy PORT or an unreachable database is one clear line (exit 1) naming the
// setting; look-alike variables are warned about, never fatal; development
// without ADMIN_API_KEY generates an admin token, stores it in the data folder
// and prints it with the console's URL; Ctrl-C stops everything quietly.
import test from "ava";
import { spawn, type ChildProcess } from "node:child_process";
import { chmod, mkdtemp, readdir, rm, stat } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { adminTokenPath } from "../../server/devMode.js";
import { socketDirFor } from "../../server/db/embedded.js";
import { projectRoot } from "../../server/db/projectRoot.js";

const ENTRY = path.join(projectRoot, "server/index.ts");

/** The environment without any keytrack setting inherited from the test run. */
function cleanEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const name of Object.keys(env)) {
    if (/^(DATABASE_URL|ROOT_DATABASE_URL|AUTH_DATABASE_URL|SHADOW_DATABASE_URL|READ_DATABASE_URL|READ_FALLBACK|READ_MAX_LAG_MS|READ_CHECK_MS|ADMIN_API_KEY|APP_ENV|PORT|HOST|KEYTRACK_DATA_DIR|EMBEDDED_PG_PORT|LOG_LEVEL)$/.test(name)) delete env[name];
  }
  return { ...env, ...extra };
}

interface Run {
  child: ChildProcess;
  output: () => string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

function run(env: Record<string, string>, detached = false): Run {
  const child = spawn(process.execPath, ["--import=tsx", ENTRY], {
    cwd: projectRoot,
    env: cleanEnv(env),
    stdio: ["ignore", "pipe", "pipe"],
    detached,
  });
  let out = "";
  child.stdout!.on("data", (c: Buffer) => (out += c.toString("utf8")));
  child.stderr!.on("data", (c: Buffer) => (out += c.toString("utf8")));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once("close", (code, signal) => resolve({ code, signal })),
  );
  return { child, output: () => out, exited };
}

async function untilOutput(r: Run, re: RegExp, ms = 180_000): Promise<RegExpExecArray> {
  const deadline = Date.now() + ms;
  for (;;) {
    const m = re.exec(r.output());
    if (m) return m;
    if (r.child.exitCode !== null || r.child.signalCode !== null) throw new Error(`exited before ${re}:\n${r.output()}`);
    if (Date.now() > deadline) throw new Error(`no ${re} within ${ms} ms:\n${r.output()}`);
    await new Promise((res) => setTimeout(res, 100));
  }
}

function freePortServer(): Promise<{ port: number; close: () => Promise<void> }> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () =>
      resolve({ port: (s.address() as net.AddressInfo).port, close: () => new Promise((r) => s.close(() => r())) }),
    );
  });
}

async function unusedPort(): Promise<number> {
  const s = await freePortServer();
  await s.close();
  return s.port;
}

test("a busy PORT is reported before the database is touched: one line naming PORT, exit 1", async (t) => {
  const busy = await freePortServer();
  try {
    // The database is unreachable too: had it been tried first, that would be the message.
    const r = run({ PORT: String(busy.port), HOST: "127.0.0.1", DATABASE_URL: `postgres://keytrack_owner:pw@127.0.0.1:${await unusedPort()}/keytrack` });
    const { code } = await r.exited;
    t.is(code, 1);
    const lines = r.output().trim().split("\n");
    t.is(lines.length, 1, r.output());
    t.regex(lines[0]!, new RegExp(`^keytrack: PORT ${busy.port} is already in use on 127\\.0\\.0\\.1 .*set PORT`));
  } finally {
    await busy.close();
  }
});

test("an unreachable database names the setting (derived from DATABASE_URL), says what to try and hides the password; look-alike variables are only warned about", async (t) => {
  const dbPort = await unusedPort();
  const r = run({
    PORT: "0",
    HOST: "127.0.0.1",
    DATABASE_URL: `postgres://keytrack_owner:s3cret-pw@127.0.0.1:${dbPort}/keytrack`,
    ADMIN_APIKEY: "x",
  });
  const { code } = await r.exited;
  t.is(code, 1);
  const out = r.output();
  t.false(out.includes("s3cret-pw"));
  t.regex(out, /ADMIN_APIKEY is set, but keytrack has no such setting: did you mean ADMIN_API_KEY\?/);
  const last = out.trim().split("\n").at(-1)!;
  t.regex(last, new RegExp(`^keytrack: cannot connect to the database: ROOT_DATABASE_URL \\(derived from DATABASE_URL\\) is postgres://keytrack_owner:\\*\\*\\*@127\\.0\\.0\\.1:${dbPort}/postgres: .*ECONNREFUSED.*is the PostgreSQL server running.*host and port`));
  t.notRegex(out, /\n\s+at /, "no stack");
});

test.serial("development on the embedded database: admin token generated, stored 0600, printed with the console URL and reused; Ctrl-C stops everything in a few lines", async (t) => {
  const dataDir = await mkdtemp(path.join(os.tmpdir(), "keytrack-entry-"));
  await chmod(dataDir, 0o755); // PostgreSQL runs as the postgres user when we are root
  const env = { KEYTRACK_DATA_DIR: dataDir, EMBEDDED_PG_PORT: String(40000 + Math.floor(Math.random() * 20000)), PORT: "0", WORKER: "true", DATABSE_URL: "typo" };
  try {
    const tokens: string[] = [];
    for (const round of [1, 2]) {
      const r = run(env, true);
      try {
        const [, url] = await untilOutput(r, /keytrack listening on (http:\/\/localhost:\d+)/);
        const [, printedUrl, token] = await untilOutput(r, /Console: (http:\/\/localhost:\d+)\/\n.*Admin token[^\n]*\n\s+(\S+)/);
        t.is(printedUrl, url);
        t.true(token!.length >= 32);
        tokens.push(token!);
        t.regex(r.output(), new RegExp(`admin credentials: generated and stored at ${adminTokenPath(dataDir).replace(/[.]/g, "\\.")}`));
        t.regex(r.output(), /DATABSE_URL is set, but keytrack has no such setting: did you mean DATABASE_URL\?/);
        t.regex(r.output(), round === 1 ? /"existingData":false/ : /"existingData":true/);
        t.regex(r.output(), /"joinedRunning":false/);
        t.is((await stat(adminTokenPath(dataDir))).mode & 0o777, 0o600);
        const res = await fetch(`${url}/admin/monitoring/api-key-tracking-quality?hours=1`, { headers: { authorization: `Bearer ${token}` } });
        t.is(res.status, 200, "the generated token is an admin credential");
        t.is((await fetch(`${url}/health`)).status, 200);

        // Ctrl-C in a terminal: SIGINT to the whole foreground process group.
        const before = r.output().length;
        process.kill(-r.child.pid!, "SIGINT");
        const { code } = await r.exited;
        const after = r.output().slice(before);
        t.is(code, 0, r.output());
        const lines = after.split("\n").filter((l) => l.trim());
        t.true(lines.length < 15, `after SIGINT:\n${after}`);
        t.notRegex(after, /EPIPE|ECONNRESET|terminating connection/i);
        t.regex(after, /keytrack stopped/);
        await t.throwsAsync(stat(socketDirFor(dataDir)), { code: "ENOENT" }, "the empty socket folder is removed");
      } finally {
        if (r.child.exitCode === null && r.child.signalCode === null) {
          try { process.kill(-r.child.pid!, "SIGKILL"); } catch { /* gone */ }
        }
      }
    }
    t.is(tokens[0], tokens[1], "the stored token is reused");
    t.false((await readdir(dataDir)).some((f) => f.endsWith(".tmp")));
  } finally {
    await rm(dataDir, { recursive: true, force: true });
  }
});
