// The compiled service in dist/: built once (by `npm ci`/`npm install`, the
// `prepare` script, or `npm run build`), then run as plain JavaScript by
// `npm start`, `npm run worker`, `npm run backfill` and `npm run keys:import`.
//
//   node scripts/build.mjs            build dist/ now (tsc -p tsconfig.build.json)
//   node scripts/build.mjs --if-stale build only when dist/ is missing or older than
//                                     the sources (the `prepare` script: a no-op on an
//                                     up-to-date tree; without TypeScript installed,
//                                     e.g. `npm ci --omit=dev`, a note and exit 0)
//
// Whether dist/ is up to date is decided from file times alone (a few ms):
// dist/.build-stamp holds when the last successful build started and which
// sources it compiled; dist/ is stale when a source (server/**/*.ts, the
// tsconfig files) changed after that, or a source was added or removed.
import { spawnSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const root = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
const STAMP = path.join(root, "dist", ".build-stamp");
const TSC = path.join(root, "node_modules", "typescript", "bin", "tsc");
const CONFIGS = ["tsconfig.json", "tsconfig.build.json"];

/** The sources the build compiles (relative paths, sorted), and the newest change among them. */
function sources() {
  const files = [];
  const walk = (rel) => {
    for (const entry of readdirSync(path.join(root, rel), { withFileTypes: true })) {
      const child = `${rel}/${entry.name}`;
      if (entry.isDirectory()) walk(child);
      else if (entry.name.endsWith(".ts") && !entry.name.endsWith(".d.ts")) files.push(child);
    }
  };
  walk("server");
  files.sort();
  let newest = { file: null, mtimeMs: 0 };
  for (const file of [...files, ...CONFIGS]) {
    const { mtimeMs } = statSync(path.join(root, file));
    if (mtimeMs > newest.mtimeMs) newest = { file, mtimeMs };
  }
  return { files, newest };
}

/**
 * Why dist/ cannot be run as it is (one phrase), or null when it is up to
 * date. Also null when there are no sources to compare with (a deployment
 * that ships dist/ alone).
 */
export function staleness() {
  if (!existsSync(path.join(root, "server"))) return null;
  if (!existsSync(STAMP)) {
    return existsSync(path.join(root, "dist", "server")) ? "dist/ was not built by this version's build (no dist/.build-stamp)" : "dist/ is missing";
  }
  let stamp;
  try {
    stamp = JSON.parse(readFileSync(STAMP, "utf8"));
  } catch {
    return "dist/.build-stamp is unreadable";
  }
  const { files, newest } = sources();
  if (newest.mtimeMs > stamp.startedAtMs) return `${newest.file} changed after dist/ was built`;
  const built = new Set(stamp.files ?? []);
  const added = files.find((f) => !built.has(f));
  if (added) return `${added} is new since dist/ was built`;
  if (built.size !== files.length) return `a source file was removed since dist/ was built`;
  return null;
}

/**
 * Runs tsc; writes the stamp when it emitted the JavaScript: exit code 0, or
 * 2 (type errors reported above, output emitted all the same, as tsx would
 * run it; `npm run typecheck` and the tests are where type errors fail).
 * Returns tsc's exit code.
 */
export function build() {
  if (!existsSync(TSC)) {
    process.stderr.write("keytrack: cannot build dist/: TypeScript is not installed (run `npm ci` with the devDependencies, or ship a dist/ built elsewhere)\n");
    return 127;
  }
  // Taken before tsc reads anything: a source saved during the build makes dist/ stale.
  const startedAtMs = Date.now();
  const { files } = sources();
  const r = spawnSync(process.execPath, [TSC, "-p", path.join(root, "tsconfig.build.json")], { cwd: root, stdio: "inherit" });
  const code = r.status ?? 1;
  if (code === 0 || code === 2) writeFileSync(STAMP, JSON.stringify({ startedAtMs, builtAt: new Date(startedAtMs).toISOString(), files, typeErrors: code === 2 }) + "\n");
  return code;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const args = process.argv.slice(2);
  const unknown = args.find((a) => a !== "--if-stale");
  if (unknown) {
    process.stderr.write(`build: unknown argument ${unknown} (usage: node scripts/build.mjs [--if-stale])\n`);
    process.exit(2);
  }
  if (args.includes("--if-stale")) {
    const why = staleness();
    if (!why) process.exit(0);
    if (!existsSync(TSC)) {
      process.stderr.write(`keytrack: ${why}, and TypeScript is not installed here (devDependencies omitted?): dist/ not built; \`npm start\` will refuse until it is\n`);
      process.exit(0);
    }
    process.stderr.write(`keytrack: ${why}: building dist/ (tsc, once)\n`);
  }
  const started = Date.now();
  const code = build();
  const took = `${((Date.now() - started) / 1000).toFixed(1)} s`;
  if (code === 0) process.stderr.write(`keytrack: dist/ built in ${took}\n`);
  else if (code === 2) process.stderr.write(`keytrack: dist/ built in ${took}, with the type errors above (npm run typecheck)\n`);
  // npm ci / npm install go on with the emitted output (prepare); `npm run build` fails as tsc does.
  process.exit(code === 2 && args.includes("--if-stale") ? 0 : code);
}
