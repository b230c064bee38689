/**
 * On a Citus cluster (`npm run db:distribute`), the row-level security of the
 * ledger runs on the workers, in each shard's policy: the `keytrack.user_id`
 * setting it reads must reach them. Citus forwards `SET LOCAL` to the nodes a
 * transaction uses when citus.propagate_set_commands is `local` (which
 * db:distribute sets for the database), never settings made with set_config(),
 * which is how PostGraphile applies pgSettings. So, only on such a database,
 * each GraphQL transaction whose settings name a user repeats that one setting
 * as `SET LOCAL` before its first statement. On a single node nothing changes.
 */
import type { createWithPgClient } from "postgraphile/adaptors/pg";

import { afterPrepareArgs } from "./afterPrepareArgs.js";

type WithPgClient = ReturnType<typeof createWithPgClient>;

/** The settings the shards' policies read (app_public.current_user_id()). */
const PROPAGATED = ["keytrack.user_id"] as const;

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** Whether this database forwards SET LOCAL to the Citus workers (db:distribute sets it). */
export async function propagatesSetLocal(query: (sql: string) => Promise<{ rows: Array<Record<string, unknown>> }>): Promise<boolean> {
  const { rows } = await query("select current_setting('citus.propagate_set_commands', true) as mode");
  return rows[0]?.mode === "local";
}

export function makeCitusSettingsPlugin(withPgClientKey = "withPgClient"): GraphileConfig.Plugin {
  const wrap = (contextValue: Record<string, unknown> | undefined) => {
    const inner = contextValue?.[withPgClientKey] as WithPgClient | undefined;
    if (!contextValue || !inner) return;
    contextValue[withPgClientKey] = (async (pgSettings, callback) => {
      const statements: string[] = [];
      for (const name of PROPAGATED) {
        const value = (pgSettings as Record<string, string | undefined> | null)?.[name];
        // Only ids reach here (pgSettingsFor); anything else is not sent as SQL text.
        if (value && UUID.test(value)) statements.push(`set local ${name} = '${value}'`);
      }
      if (statements.length === 0) return inner(pgSettings, callback);
      return inner(pgSettings, async (client) => {
        for (const text of statements) await client.query({ text });
        return callback(client);
      });
    }) as WithPgClient;
  };
  return {
    name: "KeytrackCitusSettingsPlugin",
    version: "1.0.0",
    description: "Repeats keytrack.user_id as SET LOCAL so Citus forwards it to the shards' row-level security",
    grafast: {
      middleware: {
        prepareArgs: afterPrepareArgs((args) => wrap((args as { contextValue?: Record<string, unknown> }).contextValue)),
      },
    },
  };
}
