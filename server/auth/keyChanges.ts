/**
 * Invalidation of the key cache: the database announces every change that can
 * turn a key's answer around (a key revoked, its expiry or user changed, a
 * user's role changed or the user deleted) on the channel `keytrack_key_changes`
 * (triggers in the migrations), and this listener drops the cached answers
 * about that key or user at once, in every keytrack process.
 *
 * The listener holds one connection of its own. When it is lost, changes may
 * be missed until it is back: on reconnecting, the whole cache is dropped. (It
 * is not dropped on the loss itself: while the database is down nothing can
 * be revoked, and the last known answers keep verified keys served.)
 */
import pg from "pg";

import type { Logger } from "../log.js";
import type { KeyLookup } from "./keyLookup.js";

export const KEY_CHANGES_CHANNEL = "keytrack_key_changes";

export interface KeyChangesListener {
  /** Resolves once the first LISTEN is in place (or failed: it then retries in the background). */
  ready: Promise<void>;
  close(): Promise<void>;
}

export interface ListenOptions {
  connectionString: string;
  keys: KeyLookup;
  log: Logger;
  /** Pause before reconnecting, doubled up to 30 s. */
  retryBaseMs?: number;
}

export function listenForKeyChanges({ connectionString, keys, log, retryBaseMs = 500 }: ListenOptions): KeyChangesListener {
  let closed = false;
  let client: pg.Client | null = null;
  let timer: NodeJS.Timeout | null = null;
  let failures = 0;

  const onNotification = (msg: pg.Notification) => {
    if (msg.channel !== KEY_CHANGES_CHANNEL || !msg.payload) return;
    try {
      const change = JSON.parse(msg.payload) as { api_key_id?: string; user_id?: string };
      keys.invalidate({ apiKeyId: change.api_key_id, userId: change.user_id });
    } catch {
      keys.clear();
    }
  };

  const scheduleReconnect = () => {
    if (closed || timer) return;
    const delay = Math.min(retryBaseMs * 2 ** Math.min(failures, 10), 30_000);
    failures++;
    timer = setTimeout(() => {
      timer = null;
      void connect();
    }, delay);
    timer.unref();
  };

  const connect = async (): Promise<void> => {
    const c = new pg.Client({ connectionString, connectionTimeoutMillis: 5_000 });
    c.on("error", () => {}); // reported through "end"
    c.on("notification", onNotification);
    c.on("end", () => {
      if (client !== c) return;
      client = null;
      if (!closed) {
        log.warn("the key-change listener lost its connection; reconnecting");
        scheduleReconnect();
      }
    });
    try {
      await c.connect();
      await c.query(`listen ${KEY_CHANGES_CHANNEL}`);
    } catch (err) {
      void c.end().catch(() => {});
      if (!closed) {
        log.warn("the key-change listener could not connect; retrying", { error: err });
        scheduleReconnect();
      }
      return;
    }
    if (closed) return void (await c.end().catch(() => {}));
    client = c;
    failures = 0;
    // Changes made while nobody listened are unknown: forget every cached answer.
    if (keys.size() > 0) log.info("the key-change listener is (re)connected; the key cache was cleared");
    keys.clear();
  };

  const ready = connect();
  return {
    ready,
    async close() {
      closed = true;
      if (timer) clearTimeout(timer);
      await ready;
      const c = client;
      client = null;
      if (c) await c.end().catch(() => {});
    },
  };
}
