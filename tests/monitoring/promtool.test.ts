// The alert rules are checked and their unit tests run by promtool (Debian/Ubuntu:
// `apt-get install prometheus`; .ci/run installs it). Without promtool these
// tests fail, saying how to install it; KEYTRACK_SKIP_PROMTOOL=1 skips them
// explicitly (never silently).
import { execFile } from "node:child_process";
import path from "node:path";
import { promisify } from "node:util";

import test from "ava";

import { projectRoot } from "../../server/db/projectRoot.js";

const run = promisify(execFile);
const skip = process.env.KEYTRACK_SKIP_PROMTOOL === "1";
const maybe = skip ? test.skip : test.serial;

const HOW_TO_INSTALL =
  "promtool is not installed: `sudo apt-get install prometheus` (Debian/Ubuntu), or download the Prometheus " +
  "release from https://prometheus.io/download/ and put promtool on PATH; or set KEYTRACK_SKIP_PROMTOOL=1 to skip the alert rule tests";

async function promtool(...args: string[]): Promise<string> {
  try {
    const { stdout, stderr } = await run("promtool", args, { cwd: projectRoot, timeout: 60_000 });
    return stdout + stderr;
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stdout?: string; stderr?: string };
    if (e.code === "ENOENT") throw new Error(HOW_TO_INSTALL);
    throw new Error(`promtool ${args.join(" ")} failed:\n${e.stdout ?? ""}${e.stderr ?? ""}`);
  }
}

maybe("promtool check rules monitoring/alerts.yml", async (t) => {
  const out = await promtool("check", "rules", path.join("monitoring", "alerts.yml"));
  t.regex(out, /SUCCESS: 10 rules found/);
});

maybe("promtool test rules monitoring/alerts.test.yml: every rule fires and stays quiet when it should", async (t) => {
  const out = await promtool("test", "rules", path.join("monitoring", "alerts.test.yml"));
  t.regex(out, /SUCCESS/);
});
