// Writes a deterministic, reviewable dump of keytrack's schemas to
// migrations/schema.sql (graphile-migrate's afterAllMigrations hook, on the
// shadow database). It reads the catalogs itself instead of running pg_dump, so
// it needs nothing but Node (a fresh machine with the embedded PostgreSQL has no
// pg_dump) and its output does not change with the pg_dump version, the run, or
// the month: time partitions, which create_partitions() makes relative to now,
// are summarised, not listed.
import pg from "pg";
import { writeFile } from "node:fs/promises";
import { fileURLToPath, pathToFileURL } from "node:url";
import path from "node:path";

export const SCHEMAS = ["app_public", "app_private", "app_partitions"];
const TIME_PARTITION = /_p\d{4}_\d{2}$/;

const q = async (client, text, values = []) => (await client.query(text, values)).rows;
const acl = (a) => (a ? [...a].sort().join(", ") : "(default)");
const lines = (text) => text.replace(/\s+$/gm, "").trim();

export async function dumpSchema(client) {
  const out = [
    "-- keytrack schema dump: written by scripts/dump-schema.mjs after migrating; do not edit.",
    "-- Reviewable as a diff; tests check that a fresh migrate reproduces it.",
    "",
  ];
  const push = (...l) => out.push(...l);

  for (const s of await q(client, `
      select n.nspname, n.nspacl::text[] as acl,
             obj_description(n.oid, 'pg_namespace') as comment
        from pg_namespace n where n.nspname = any($1) order by 1`, [SCHEMAS])) {
    push(`-- schema ${s.nspname}`, `--   acl: ${acl(s.acl)}`, `--   comment: ${s.comment ?? "(none)"}`, "");
  }

  for (const d of await q(client, `
      select coalesce(n.nspname, '(all)') as schema, d.defaclobjtype as kind, d.defaclacl::text[] as acl
        from pg_default_acl d left join pg_namespace n on n.oid = d.defaclnamespace
       order by 1, 2`)) {
    push(`-- default privileges in ${d.schema} for ${d.kind}: ${acl(d.acl)}`);
  }
  push("");

  for (const t of await q(client, `
      select t.oid, n.nspname, t.typname, obj_description(t.oid, 'pg_type') as comment, c.oid as relid
        from pg_type t join pg_namespace n on n.oid = t.typnamespace
        join pg_class c on c.oid = t.typrelid and c.relkind = 'c'
       where n.nspname = any($1) order by 2, 3`, [SCHEMAS])) {
    push(`create type ${t.nspname}.${t.typname} as (`);
    const cols = await q(client, `
        select a.attname, format_type(a.atttypid, a.atttypmod) as type, col_description(a.attrelid, a.attnum) as comment
          from pg_attribute a where a.attrelid = $1 and a.attnum > 0 and not a.attisdropped order by a.attnum`, [t.relid]);
    push(...cols.map((c, i) => `  ${c.attname} ${c.type}${i < cols.length - 1 ? "," : ""}  -- ${c.comment ?? "(no comment)"}`), ");");
    push(`-- comment: ${t.comment ?? "(none)"}`, "");
  }

  const rels = await q(client, `
      select c.oid, n.nspname, c.relname, c.relkind, c.relrowsecurity, c.relforcerowsecurity,
             c.relacl::text[] as acl, c.reloptions, c.relispartition,
             obj_description(c.oid, 'pg_class') as comment,
             case when c.relkind = 'p' then pg_get_partkeydef(c.oid) end as partkey,
             case when c.relispartition then pg_get_expr(c.relpartbound, c.oid) end as bound,
             case when c.relkind = 'v' then pg_get_viewdef(c.oid, true) end as viewdef
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
       where n.nspname = any($1) and c.relkind in ('r', 'p', 'v', 'm') order by 2, 3`, [SCHEMAS]);
  const partitions = rels.filter((r) => TIME_PARTITION.test(r.relname));
  for (const r of rels) {
    if (TIME_PARTITION.test(r.relname)) continue;
    const kind = { r: "table", p: "table", v: "view", m: "materialized view" }[r.relkind];
    push(`create ${kind} ${r.nspname}.${r.relname}${r.bound ? ` partition (${r.bound})` : ""} (`);
    const cols = await q(client, `
        select a.attname, format_type(a.atttypid, a.atttypmod) as type, a.attnotnull, a.attidentity,
               pg_get_expr(d.adbin, d.adrelid) as def, col_description(a.attrelid, a.attnum) as comment,
               a.attacl::text[] as acl
          from pg_attribute a left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
         where a.attrelid = $1 and a.attnum > 0 and not a.attisdropped order by a.attnum`, [r.oid]);
    push(...cols.map((c, i) => [
      `  ${c.attname} ${c.type}`,
      c.attnotnull ? " not null" : "",
      c.attidentity ? ` generated ${c.attidentity === "a" ? "always" : "by default"} as identity` : "",
      c.def ? ` default ${c.def}` : "",
      i < cols.length - 1 ? "," : "",
      `  -- ${c.comment ?? "(no comment)"}`,
      c.acl ? ` [acl: ${acl(c.acl)}]` : "",
    ].join("")), `)${r.partkey ? ` partition by ${r.partkey}` : ""};`);
    if (r.viewdef) push(`-- definition:`, lines(r.viewdef), `-- options: ${(r.reloptions ?? []).join(", ") || "(none)"}`);
    push(`-- row level security: ${r.relrowsecurity ? "enabled" : "DISABLED"}${r.relforcerowsecurity ? ", forced" : ""}`);
    push(`-- acl: ${acl(r.acl)}`, `-- comment: ${r.comment ?? "(none)"}`);
    for (const c of await q(client, `
        select conname, pg_get_constraintdef(oid, true) as def from pg_constraint
         where conrelid = $1 order by conname`, [r.oid])) {
      push(`constraint ${c.conname} ${c.def};`);
    }
    for (const i of await q(client, `
        select pg_get_indexdef(indexrelid) as def from pg_index i join pg_class c on c.oid = i.indexrelid
         where indrelid = $1 order by c.relname`, [r.oid])) {
      push(`${i.def};`);
    }
    for (const t of await q(client, `
        select pg_get_triggerdef(oid, true) as def, obj_description(oid, 'pg_trigger') as comment
          from pg_trigger where tgrelid = $1 and not tgisinternal order by tgname`, [r.oid])) {
      push(`${t.def};  -- ${t.comment ?? "(no comment)"}`);
    }
    for (const p of await q(client, `
        select polname, polcmd, polpermissive, array(select rolname from pg_roles where oid = any(polroles) order by 1)::text[] as roles,
               pg_get_expr(polqual, polrelid) as qual, pg_get_expr(polwithcheck, polrelid) as chk,
               obj_description(oid, 'pg_policy') as comment
          from pg_policy where polrelid = $1 order by polname`, [r.oid])) {
      push(`policy ${p.polname} for ${p.polcmd} to ${p.roles.join(", ") || "public"}${p.qual ? ` using (${p.qual})` : ""}${p.chk ? ` with check (${p.chk})` : ""};  -- ${p.comment ?? "(no comment)"}`);
    }
    push("");
  }
  if (partitions.length > 0) {
    push(`-- ${partitions.length} monthly partitions (chat_completion_requests_pYYYY_MM) made by create_partitions(), not listed.`, "");
  }

  for (const f of await q(client, `
      select p.oid, pg_get_functiondef(p.oid) as def, p.proacl::text[] as acl,
             obj_description(p.oid, 'pg_proc') as comment
        from pg_proc p join pg_namespace n on n.oid = p.pronamespace
       where n.nspname = any($1) order by n.nspname, p.proname, pg_get_function_identity_arguments(p.oid)`, [SCHEMAS])) {
    push(lines(f.def) + ";", `-- acl: ${acl(f.acl)}`, `-- comment: ${f.comment ?? "(none)"}`, "");
  }
  return out.join("\n").replace(/\n+$/, "") + "\n";
}

export const SCHEMA_DUMP_PATH = fileURLToPath(new URL("../migrations/schema.sql", import.meta.url));

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  const url = process.argv[2] ?? process.env.GM_DBURL;
  if (!url) {
    console.error("dump-schema: pass a connection string or set GM_DBURL");
    process.exit(2);
  }
  const client = new pg.Client({ connectionString: url });
  try {
    await client.connect();
    await writeFile(SCHEMA_DUMP_PATH, await dumpSchema(client));
    console.log(`dump-schema: wrote ${path.relative(process.cwd(), SCHEMA_DUMP_PATH)}`);
  } finally {
    await client.end();
  }
}
