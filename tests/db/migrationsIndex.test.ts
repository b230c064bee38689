// The index in migrations/README.md (which migration last defines each table,
// view, function and trigger) is what scripts/migrations-index.mjs makes of the
// committed migrations now.
import test from "ava";
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";

const script = fileURLToPath(new URL("../../scripts/migrations-index.mjs", import.meta.url));

test("migrations/README.md embeds the index of the committed migrations", async (t) => {
  const { code, output } = await new Promise<{ code: number | null; output: string }>((resolve, reject) => {
    const child = spawn(process.execPath, [script, "--check"], { stdio: ["ignore", "pipe", "pipe"] });
    let output = "";
    child.stdout.on("data", (chunk) => (output += chunk));
    child.stderr.on("data", (chunk) => (output += chunk));
    child.on("error", reject);
    child.on("close", (code) => resolve({ code, output }));
  });
  t.is(code, 0, `run \`npm run db:index\` and commit migrations/README.md:\n${output}`);
});
