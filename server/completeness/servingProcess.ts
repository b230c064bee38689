/**
 * This process's identity for completeness (migrations: serving_processes): it
 * registers at start-up, numbers the requests it accepts 1, 2, 3, ... in the
 * order it accepts them (each ledger row carries its number), tells the
 * database every few seconds how far it has counted (a heartbeat), and records
 * the last number at a clean shutdown. A gap in the numbering is a row that
 * never arrived: app_public.completeness_gaps() finds it.
 */
import os from "node:os";
import { readFileSync } from "node:fs";
import path from "node:path";

import type pg from "pg";

import { projectRoot } from "../db/projectRoot.js";
import type { Logger } from "../log.js";

export interface ServingProcess {
  readonly id: string;
  /** The next request number (the first is 1). */
  nextSeq(): number;
  /** Numbers handed out so far. */
  accepted(): number;
  /** Stops the heartbeat and records the last number handed out (call once no request can be accepted any more). */
  close(): Promise<void>;
}

export interface ServingProcessOptions {
  pool: Pick<pg.Pool, "query">;
  log: Logger;
  heartbeatMs?: number;
}

export const KEYTRACK_VERSION: string = (() => {
  try {
    return (JSON.parse(readFileSync(path.join(projectRoot, "package.json"), "utf8")) as { version?: string }).version ?? "unknown";
  } catch {
    return "unknown";
  }
})();

export async function registerServingProcess({ pool, log, heartbeatMs = 10_000 }: ServingProcessOptions): Promise<ServingProcess> {
  const { rows } = await pool.query<{ id: string }>("select app_private.register_serving_process($1, $2, $3) as id", [
    os.hostname().slice(0, 255) || "unknown",
    process.pid,
    KEYTRACK_VERSION,
  ]);
  const id = rows[0]!.id;
  let seq = 0;
  let beating: Promise<unknown> | null = null;
  let failing = false;

  const heartbeat = () => {
    if (beating) return;
    beating = pool
      .query("select app_private.heartbeat_serving_process($1, $2)", [id, seq])
      .then(
        () => {
          if (failing) log.info("completeness heartbeat works again");
          failing = false;
        },
        (err: unknown) => {
          // The database may be down: the next heartbeat (or the stop) catches up.
          if (!failing) log.warn("completeness heartbeat failed", { error: err });
          failing = true;
        },
      )
      .finally(() => {
        beating = null;
      });
  };
  const timer = setInterval(heartbeat, heartbeatMs);
  timer.unref();

  let closing: Promise<void> | null = null;
  log.info("serving process registered", { processId: id });
  return {
    id,
    nextSeq: () => ++seq,
    accepted: () => seq,
    close: () =>
      (closing ??= (async () => {
        clearInterval(timer);
        await beating;
        try {
          await pool.query("select app_private.stop_serving_process($1, $2)", [id, seq]);
        } catch (err) {
          // Reported as killed later, with its tail as "may be missing until the spool is replayed".
          log.warn("could not record the serving process's clean stop", { processId: id, lastSeq: seq, error: err });
        }
      })()),
  };
}
