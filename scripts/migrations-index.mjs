// Prints the index of migrations/README.md: every table, view, function,
// trigger function and trigger that the committed migrations create, the
// migration that last (re)defines it, and the first sentence of its comment.
//
//   node scripts/migrations-index.mjs           print the markdown table
//   node scripts/migrations-index.mjs --check   exit 1, showing the difference, when
//                                               migrations/README.md embeds another table
//   node scripts/migrations-index.mjs --write   rewrite the table in migrations/README.md
//
// It reads migrations/committed/*.sql in order, statement by statement (comments
// and quoted text skipped, so the SQL inside function bodies and format() strings
// is never taken for a statement): `create [or replace] table|view|function|trigger`
// define an object, `comment on` describes it, `drop` removes it (a table takes its
// triggers along, a schema everything in it). Objects made at run time (the monthly
// partitions create_partitions() makes) are not in the text, so not in the index.
// Plain Node, no dependencies.
import { readFile, readdir, writeFile } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

export const MIGRATIONS_DIR = fileURLToPath(new URL("../migrations/", import.meta.url));
export const README_PATH = path.join(MIGRATIONS_DIR, "README.md");
export const START = "<!-- index:start -->";
export const END = "<!-- index:end -->";

// ---------------------------------------------------------------------------
// Splitting SQL into statements
// ---------------------------------------------------------------------------

/**
 * The top-level statements of a SQL script, comments replaced by a space, string
 * literals, quoted identifiers and dollar-quoted bodies kept verbatim.
 */
export function splitStatements(sql) {
  const statements = [];
  let current = "";
  let i = 0;
  const n = sql.length;
  while (i < n) {
    const c = sql[i];
    const next = sql[i + 1];
    if (c === "-" && next === "-") {
      const end = sql.indexOf("\n", i);
      i = end === -1 ? n : end;
      current += " ";
    } else if (c === "/" && next === "*") {
      let depth = 1; // PostgreSQL block comments nest
      i += 2;
      while (i < n && depth > 0) {
        if (sql[i] === "/" && sql[i + 1] === "*") (depth++, (i += 2));
        else if (sql[i] === "*" && sql[i + 1] === "/") (depth--, (i += 2));
        else i++;
      }
      current += " ";
    } else if (c === "'") {
      // E'...' strings: a backslash escapes the next character.
      const escapes = /[eE]$/.test(current) && !/[A-Za-z0-9_$][eE]$/.test(current);
      let j = i + 1;
      while (j < n) {
        if (escapes && sql[j] === "\\") j += 2;
        else if (sql[j] === "'" && sql[j + 1] === "'") j += 2;
        else if (sql[j] === "'") break;
        else j++;
      }
      current += sql.slice(i, j + 1);
      i = j + 1;
    } else if (c === '"') {
      let j = i + 1;
      while (j < n && !(sql[j] === '"' && sql[j + 1] !== '"')) j += sql[j] === '"' ? 2 : 1;
      current += sql.slice(i, j + 1);
      i = j + 1;
    } else if (c === "$" && !/[A-Za-z0-9_$]$/.test(current)) {
      const tag = /^\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$/.exec(sql.slice(i, i + 100));
      if (tag) {
        const end = sql.indexOf(tag[0], i + tag[0].length);
        const stop = end === -1 ? n : end + tag[0].length;
        current += sql.slice(i, stop);
        i = stop;
      } else {
        current += c;
        i++;
      }
    } else if (c === ";") {
      if (current.trim()) statements.push(current.trim());
      current = "";
      i++;
    } else {
      current += c;
      i++;
    }
  }
  if (current.trim()) statements.push(current.trim());
  return statements;
}

// ---------------------------------------------------------------------------
// Names, signatures and literals
// ---------------------------------------------------------------------------

const IDENT = String.raw`(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)`;
const NAME = String.raw`${IDENT}(?:\s*\.\s*${IDENT})?`;

/** schema.name as PostgreSQL folds it: unquoted parts lower-cased, quotes removed. */
function normalizeName(raw) {
  return raw
    .split(/\s*\.\s*(?=(?:[^"]*"[^"]*")*[^"]*$)/)
    .map((p) => (p.startsWith('"') ? p.slice(1, -1).replace(/""/g, '"') : p.toLowerCase()))
    .join(".");
}

/** The text inside the parenthesis that opens at text[open], and the index after it. */
function balanced(text, open) {
  let depth = 0;
  let quote = null;
  for (let i = open; i < text.length; i++) {
    const c = text[i];
    if (quote) {
      if (c === quote && text[i + 1] === quote) i++;
      else if (c === quote) quote = null;
    } else if (c === "'" || c === '"') quote = c;
    else if (c === "(") depth++;
    else if (c === ")" && --depth === 0) return { inner: text.slice(open + 1, i), after: i + 1 };
  }
  throw new Error(`unbalanced parentheses in: ${text.slice(0, 120)}`);
}

/** Splits on commas outside parentheses and quotes. */
function splitTopLevel(text, separator = ",") {
  const parts = [];
  let depth = 0;
  let quote = null;
  let start = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quote) {
      if (c === quote && text[i + 1] === quote) i++;
      else if (c === quote) quote = null;
    } else if (c === "'" || c === '"') quote = c;
    else if (c === "(" || c === "[") depth++;
    else if (c === ")" || c === "]") depth--;
    else if (c === separator && depth === 0) {
      parts.push(text.slice(start, i));
      start = i + 1;
    }
  }
  parts.push(text.slice(start));
  return parts.map((p) => p.trim()).filter((p) => p !== "");
}

const TYPE_ALIASES = new Map([
  ["int", "integer"], ["int4", "integer"], ["int8", "bigint"], ["int2", "smallint"],
  ["bool", "boolean"], ["float8", "double precision"], ["float4", "real"], ["decimal", "numeric"],
  ["varchar", "character varying"], ["char", "character"],
  ["timestamp with time zone", "timestamptz"], ["timestamp without time zone", "timestamp"],
  ["time with time zone", "timetz"], ["time without time zone", "time"],
]);
// Types of more than one word: their first word is not a parameter name.
const MULTIWORD_TYPE_START = new Set(["double", "character", "timestamp", "time", "bit", "national", "interval"]);

/** The identity signature of a function's argument list: its input argument types. */
function signature(args) {
  const types = [];
  for (let arg of splitTopLevel(args)) {
    // Drop the default (DEFAULT x or = x).
    const def = /\s+default\s|\s*=/i.exec(arg);
    if (def) arg = arg.slice(0, def.index);
    const mode = /^(in|out|inout|variadic)\s+/i.exec(arg);
    if (mode) {
      if (mode[1].toLowerCase() === "out") continue; // not part of the identity
      arg = arg.slice(mode[0].length);
    }
    let words = arg.trim().split(/\s+/);
    if (words.length >= 2 && !MULTIWORD_TYPE_START.has(words[0].toLowerCase())) words = words.slice(1);
    let type = words.join(" ").toLowerCase().replace(/\s*\(.*?\)/g, "").replace(/\s*\[\s*\]/g, "[]");
    const array = type.match(/(\[\])*$/)[0];
    const base = type.slice(0, type.length - array.length);
    type = (TYPE_ALIASES.get(base) ?? base) + array;
    types.push(type);
  }
  return `(${types.join(", ")})`;
}

/** The value of a string literal ('...', E'...', $$...$$) at the start of text, or null. */
function literal(text) {
  text = text.trim();
  let m;
  if ((m = /^[eE]'((?:[^'\\]|\\.|'')*)'/s.exec(text))) {
    return m[1].replace(/''/g, "'").replace(/\\(.)/gs, (_, c) => ({ n: "\n", t: "\t", r: "\r", b: "\b", f: "\f" })[c] ?? c);
  }
  if ((m = /^'((?:[^']|'')*)'/s.exec(text))) return m[1].replace(/''/g, "'");
  if ((m = /^(\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$)(.*?)\1/s.exec(text))) return m[2];
  return null;
}

/** One line for the table: smart tags (@behavior ...) dropped, the first sentence kept. */
export function describe(comment) {
  if (comment == null) return "";
  const text = comment
    .split("\n")
    .filter((line) => !line.startsWith("@"))
    .join(" ")
    .replace(/\s+/g, " ")
    .trim();
  const sentence = /^.*?[.!?](?=\s+[A-Z]|$)/.exec(text);
  return sentence ? sentence[0] : text;
}

// ---------------------------------------------------------------------------
// Replaying the migrations
// ---------------------------------------------------------------------------

const KIND_ORDER = ["table", "view", "materialized view", "function", "trigger function", "trigger"];

/**
 * Replays the statements of the migrations (in order) and returns the objects
 * that exist at the end: { key, kind, name, definedIn: [migration, ...], comment }.
 */
export function indexMigrations(migrations) {
  /** @type {Map<string, {key: string, kind: string, name: string, schema: string, table?: string, fn?: string, definedIn: string[], comment: string | null}>} */
  const objects = new Map();
  /** Where dropped objects had been defined: one re-created under the same name keeps that history. */
  const dropped = new Map();
  const keyOf = (kind, name) => `${kind === "trigger function" ? "function" : kind === "materialized view" ? "view" : kind}:${name}`;

  const define = (migration, kind, name, extra = {}, replace = false) => {
    const key = keyOf(kind, name);
    const existing = objects.get(key);
    const schema = name.includes(".") ? name.split(".")[0] : "";
    if (existing && replace) {
      // CREATE OR REPLACE keeps the object, and its comment.
      existing.kind = kind;
      Object.assign(existing, extra);
      if (existing.definedIn.at(-1) !== migration) existing.definedIn.push(migration);
    } else {
      const definedIn = [...(dropped.get(key) ?? []).filter((d) => d !== migration), migration];
      objects.set(key, { key, kind, name, schema, definedIn, comment: null, ...extra });
    }
  };
  const remove = (key) => {
    const obj = objects.get(key);
    if (!obj) return;
    objects.delete(key);
    dropped.set(key, obj.definedIn);
    // Dropping a table drops its triggers.
    if (obj.kind === "table") for (const o of [...objects.values()]) if (o.kind === "trigger" && o.table === obj.name) remove(o.key);
  };

  for (const { name: migration, sql } of migrations) {
    for (const statement of splitStatements(sql)) {
      const s = statement.replace(/^\s+/, "");
      let m;
      if ((m = new RegExp(String.raw`^create\s+(or\s+replace\s+)?function\s+(${NAME})\s*(?=\()`, "i").exec(s))) {
        const { inner, after } = balanced(s, m[0].length);
        const name = normalizeName(m[2]) + signature(inner);
        const kind = /^\s*returns\s+trigger\b/i.test(s.slice(after)) ? "trigger function" : "function";
        define(migration, kind, name, {}, Boolean(m[1]));
      } else if ((m = new RegExp(String.raw`^create\s+(?:(?:global\s+|local\s+)?(?:temp|temporary|unlogged)\s+)?table\s+(?:if\s+not\s+exists\s+)?(${NAME})`, "i").exec(s))) {
        const name = normalizeName(m[1]);
        if (!objects.has(keyOf("table", name))) define(migration, "table", name);
      } else if ((m = new RegExp(String.raw`^create\s+(or\s+replace\s+)?(?:(?:temp|temporary)\s+)?(?:recursive\s+)?(materialized\s+)?view\s+(?:if\s+not\s+exists\s+)?(${NAME})`, "i").exec(s))) {
        define(migration, m[2] ? "materialized view" : "view", normalizeName(m[3]), {}, Boolean(m[1]));
      } else if ((m = new RegExp(String.raw`^create\s+(or\s+replace\s+)?(?:constraint\s+)?trigger\s+(${IDENT})\s.*?\son\s+(${NAME}).*?\bexecute\s+(?:function|procedure)\s+(${NAME})`, "is").exec(s))) {
        const table = normalizeName(m[3]);
        const name = `${normalizeName(m[2])} on ${table}`;
        define(migration, "trigger", name, { table, schema: table.split(".")[0], fn: normalizeName(m[4]) }, Boolean(m[1]));
      } else if ((m = new RegExp(String.raw`^comment\s+on\s+(function|table|view|materialized\s+view|trigger)\s+`, "i").exec(s))) {
        const kind = m[1].toLowerCase().replace(/\s+/, " ");
        let rest = s.slice(m[0].length);
        let name;
        if (kind === "function") {
          const fm = new RegExp(String.raw`^(${NAME})\s*(?=\()`).exec(rest);
          if (!fm) continue;
          const { inner, after } = balanced(rest, fm[0].length);
          name = normalizeName(fm[1]) + signature(inner);
          rest = rest.slice(after);
        } else if (kind === "trigger") {
          const tm = new RegExp(String.raw`^(${IDENT})\s+on\s+(${NAME})`, "i").exec(rest);
          if (!tm) continue;
          name = `${normalizeName(tm[1])} on ${normalizeName(tm[2])}`;
          rest = rest.slice(tm[0].length);
        } else {
          const nm = new RegExp(String.raw`^(${NAME})`).exec(rest);
          if (!nm) continue;
          name = normalizeName(nm[1]);
          rest = rest.slice(nm[0].length);
        }
        const is = /^\s*is\s+/i.exec(rest);
        if (!is) continue;
        const obj = objects.get(keyOf(kind, name));
        if (obj) obj.comment = /^null\b/i.test(rest.slice(is[0].length)) ? null : literal(rest.slice(is[0].length));
      } else if ((m = /^drop\s+(function|procedure|table|view|materialized\s+view|trigger|schema)\s+(?:if\s+exists\s+)?/i.exec(s))) {
        const kind = m[1].toLowerCase().replace(/\s+/, " ");
        const list = s.slice(m[0].length).replace(/\s+(cascade|restrict)\s*$/i, "");
        if (kind === "function" || kind === "procedure") {
          for (const item of splitTopLevel(list)) {
            const paren = item.indexOf("(");
            if (paren === -1) {
              // No argument list: the only function of that name.
              const prefix = `function:${normalizeName(item)}(`;
              for (const key of [...objects.keys()]) if (key.startsWith(prefix)) remove(key);
            } else {
              remove(keyOf("function", normalizeName(item.slice(0, paren)) + signature(balanced(item, paren).inner)));
            }
          }
        } else if (kind === "trigger") {
          const tm = new RegExp(String.raw`^(${IDENT})\s+on\s+(${NAME})`, "i").exec(list);
          if (tm) remove(keyOf("trigger", `${normalizeName(tm[1])} on ${normalizeName(tm[2])}`));
        } else if (kind === "schema") {
          for (const schema of splitTopLevel(list).map(normalizeName)) {
            for (const obj of [...objects.values()]) if (obj.schema === schema) remove(obj.key);
          }
        } else {
          for (const item of splitTopLevel(list)) remove(keyOf(kind, normalizeName(item)));
        }
      } else if ((m = /^select\s+app_private\.describe_partition\s*\(\s*'((?:[^']|'')*)'\s*(?:::\s*regclass\s*)?,\s*/i.exec(s))) {
        // keytrack's partitions are commented by app_private.describe_partition(partition, description).
        const obj = objects.get(keyOf("table", normalizeName(m[1])));
        if (obj) obj.comment = literal(s.slice(m[0].length));
      }
    }
  }
  return [...objects.values()].sort(
    (a, b) => KIND_ORDER.indexOf(a.kind) - KIND_ORDER.indexOf(b.kind) || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0),
  );
}

/** The committed migrations, in order: [{ name: "000001-ledger", file, sql }]. */
export async function readMigrations(dir = path.join(MIGRATIONS_DIR, "committed")) {
  const files = (await readdir(dir)).filter((f) => /^\d+(-[-_a-zA-Z0-9]*)?\.sql$/.test(f)).sort();
  return Promise.all(files.map(async (file) => ({ name: file.replace(/\.sql$/, ""), file, sql: await readFile(path.join(dir, file), "utf8") })));
}

const cell = (text) => text.replace(/\|/g, "\\|");

/** The markdown table. */
export function renderIndex(objects, migrations) {
  const link = (name) => {
    const m = migrations.find((x) => x.name === name);
    return `[${name.split("-")[0]}](committed/${m.file})`;
  };
  const out = [
    "| object | kind | last (re)defined in | description (first sentence of its comment) |",
    "|---|---|---|---|",
  ];
  for (const o of objects) {
    const last = o.definedIn.at(-1);
    const earlier = o.definedIn.slice(0, -1);
    const where = link(last) + (earlier.length ? ` (before: ${earlier.map((e) => e.split("-")[0]).join(", ")})` : "");
    const name = o.kind === "trigger" ? `${o.name.replace(/ on .*/, "")} on ${o.table}` : o.name;
    out.push(`| \`${cell(name)}\` | ${o.kind} | ${where} | ${cell(describe(o.comment)) || "(no comment)"} |`);
  }
  return out.join("\n") + "\n";
}

export async function buildIndex() {
  const migrations = await readMigrations();
  return renderIndex(indexMigrations(migrations), migrations);
}

/** The text between the markers, or null when they are missing. */
export function embedded(readme) {
  const start = readme.indexOf(START);
  const end = readme.indexOf(END, start + START.length);
  if (start === -1 || end === -1) return null;
  return readme.slice(start + START.length, end).replace(/\r\n/g, "\n").trim() + "\n";
}

/** Lines only in a (-) and only in b (+), in order: a small diff for --check. */
function lineDiff(a, b) {
  const x = a.split("\n");
  const y = b.split("\n");
  // Longest common subsequence; the tables are a few hundred lines at most.
  const dp = Array.from({ length: x.length + 1 }, () => new Array(y.length + 1).fill(0));
  for (let i = x.length - 1; i >= 0; i--) {
    for (let j = y.length - 1; j >= 0; j--) dp[i][j] = x[i] === y[j] ? dp[i + 1][j + 1] + 1 : Math.max(dp[i + 1][j], dp[i][j + 1]);
  }
  const out = [];
  let i = 0;
  let j = 0;
  while (i < x.length || j < y.length) {
    if (i < x.length && j < y.length && x[i] === y[j]) (i++, j++);
    else if (j < y.length && (i === x.length || dp[i][j + 1] >= dp[i + 1][j])) out.push(`+ ${y[j++]}`);
    else out.push(`- ${x[i++]}`);
  }
  return out.join("\n");
}

async function main(argv) {
  const mode = argv.includes("--write") ? "write" : argv.includes("--check") ? "check" : "print";
  const index = await buildIndex();
  if (mode === "print") {
    process.stdout.write(index);
    return 0;
  }
  const readme = await readFile(README_PATH, "utf8");
  const current = embedded(readme);
  const rel = path.relative(process.cwd(), README_PATH) || README_PATH;
  if (current === null) {
    console.error(`migrations-index: ${rel} has no ${START} ... ${END} markers`);
    return 1;
  }
  if (mode === "check") {
    if (current === index) return 0;
    console.error(`migrations-index: the index in ${rel} is out of date (- in the README, + from the migrations):`);
    console.error(lineDiff(current, index));
    console.error("run `npm run db:index` to rewrite it");
    return 1;
  }
  if (current !== index) {
    const start = readme.indexOf(START) + START.length;
    const end = readme.indexOf(END, start);
    await writeFile(README_PATH, `${readme.slice(0, start)}\n${index}${readme.slice(end)}`);
    console.log(`migrations-index: wrote the index in ${rel}`);
  }
  return 0;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (err) => {
      console.error(`migrations-index: ${err.stack ?? err}`);
      process.exit(2);
    },
  );
}
