// Schema-wide invariants over every keytrack schema: RLS on every table,
// a comment on every object, nothing executable by PUBLIC, every foreign key
// indexed. New objects are checked automatically.
import test from "ava";
import { createTestDb, type TestDb } from "../helpers/db.js";

const SCHEMAS = ["app_public", "app_private", "app_partitions"];
let db: TestDb;

test.before(async () => {
  db = await createTestDb();
});
test.after.always(async () => {
  await db?.drop();
});

const rows = async (sql: string) => (await db.root.query(sql, [SCHEMAS])).rows;

test("row-level security is enabled on every table, partitions included", async (t) => {
  const tables = await rows(`
    select c.oid::regclass::text as name, c.relrowsecurity as rls from pg_class c
      join pg_namespace n on n.oid = c.relnamespace
     where n.nspname = any($1) and c.relkind in ('r', 'p') order by 1`);
  t.true(tables.length >= 6);
  t.deepEqual(tables.filter((r) => !r.rls).map((r) => r.name), []);
});

test("every schema, table, view, column, type and function has a comment", async (t) => {
  const missing = await rows(`
    select 'schema ' || nspname as obj from pg_namespace n where nspname = any($1) and obj_description(n.oid, 'pg_namespace') is null
    union all
    select 'relation ' || c.oid::regclass from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where n.nspname = any($1) and c.relkind in ('r', 'p', 'v', 'm', 'c') and obj_description(c.oid, 'pg_class') is null
       and not (c.relkind = 'c' and obj_description((select t.oid from pg_type t where t.typrelid = c.oid), 'pg_type') is not null)
    union all
    select 'column ' || c.oid::regclass || '.' || a.attname from pg_attribute a
      join pg_class c on c.oid = a.attrelid join pg_namespace n on n.oid = c.relnamespace
     where n.nspname = any($1) and c.relkind in ('r', 'p', 'v', 'm', 'c') and a.attnum > 0 and not a.attisdropped
       and col_description(c.oid, a.attnum) is null
    union all
    select 'function ' || p.oid::regprocedure from pg_proc p join pg_namespace n on n.oid = p.pronamespace
     where n.nspname = any($1) and obj_description(p.oid, 'pg_proc') is null
    union all
    select 'trigger ' || tg.tgname || ' on ' || tg.tgrelid::regclass from pg_trigger tg
      join pg_class c on c.oid = tg.tgrelid join pg_namespace n on n.oid = c.relnamespace
     where n.nspname = any($1) and not tg.tgisinternal and tg.tgparentid = 0 and obj_description(tg.oid, 'pg_trigger') is null
    union all
    select 'policy ' || pol.polname || ' on ' || pol.polrelid::regclass from pg_policy pol
      join pg_class c on c.oid = pol.polrelid join pg_namespace n on n.oid = c.relnamespace
     where n.nspname = any($1) and obj_description(pol.oid, 'pg_policy') is null
    order by 1`);
  t.deepEqual(missing.map((r) => r.obj), []);
});

test("no function is executable by PUBLIC", async (t) => {
  const open = await rows(`
    select p.oid::regprocedure::text as fn from pg_proc p join pg_namespace n on n.oid = p.pronamespace
     where n.nspname = any($1)
       and (p.proacl is null or exists (select 1 from aclexplode(p.proacl) a where a.grantee = 0 and a.privilege_type = 'EXECUTE'))
     order by 1`);
  t.deepEqual(open.map((r) => r.fn), []);
});

test("security definer functions pin search_path", async (t) => {
  const loose = await rows(`
    select p.oid::regprocedure::text as fn from pg_proc p join pg_namespace n on n.oid = p.pronamespace
     where n.nspname = any($1) and p.prosecdef
       and not exists (select 1 from unnest(p.proconfig) c where c like 'search_path=%')`);
  t.deepEqual(loose.map((r) => r.fn), []);
});

test("every foreign key is indexed (its columns lead an index)", async (t) => {
  const unindexed = await rows(`
    select con.conrelid::regclass::text || ' ' || con.conname as fk from pg_constraint con
      join pg_class c on c.oid = con.conrelid join pg_namespace n on n.oid = c.relnamespace
     where con.contype = 'f' and n.nspname = any($1)
       and not exists (
         select 1 from pg_index i where i.indrelid = con.conrelid
            and (i.indkey::int2[])[0:cardinality(con.conkey) - 1] @> con.conkey
            and (i.indkey::int2[])[0:cardinality(con.conkey) - 1] <@ con.conkey)
     order by 1`);
  t.deepEqual(unindexed.map((r) => r.fk), []);
});

test("views are security_invoker, so row-level security applies through them", async (t) => {
  const views = await rows(`
    select c.oid::regclass::text as v from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where n.nspname = any($1) and c.relkind = 'v'
       and not coalesce('security_invoker=true' = any(c.reloptions), false)`);
  t.deepEqual(views.map((r) => r.v), []);
});

test("nobody but the owner is granted anything on partitions or private tables", async (t) => {
  const grants = await rows(`
    select c.oid::regclass::text || ' to ' || coalesce(r.rolname, 'public') as g from pg_class c
      join pg_namespace n on n.oid = c.relnamespace
      cross join lateral aclexplode(c.relacl) a left join pg_roles r on r.oid = a.grantee
     where n.nspname = any($1) and n.nspname <> 'app_public' and a.grantee <> c.relowner`);
  t.deepEqual(grants.map((r) => r.g), []);
});
