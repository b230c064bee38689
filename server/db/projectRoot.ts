import { existsSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

/** The folder holding package.json, whether we run from server/ (tsx) or dist/server/ (compiled). */
export const projectRoot: string = (() => {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  while (!existsSync(path.join(dir, "package.json")) || !existsSync(path.join(dir, "migrations"))) {
    const parent = path.dirname(dir);
    if (parent === dir) throw new Error("keytrack: cannot find the project folder (package.json beside migrations/)");
    dir = parent;
  }
  return dir;
})();

export const migrationsFolder = path.join(projectRoot, "migrations");
