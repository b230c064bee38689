/**
 * The one lookup of API keys by hash (app_private.authenticate_api_key), with
 * its cache, for every route that accepts keys.
 *
 * - Answers (usable or not) are cached per key hash for `ttlMs` (0: no cache),
 *   so a change in the database takes effect within that time at the latest.
 *   Changes made through keytrack's SQL (revocation, expiry, a user's role) are
 *   announced with NOTIFY and drop the key's entries at once (keyChanges.ts).
 * - Concurrent lookups of one key share one query.
 * - A failed lookup (database unreachable) says nothing about the key and is
 *   not cached. While the database cannot be reached, a key verified usable
 *   within `staleMaxMs` keeps its last known good answer (marked stale), a key
 *   known to be revoked or expired stays refused, and an unknown key fails (the
 *   caller answers 503). staleMaxMs 0 turns the first of these off.
 * - At most `maxEntries` keys are remembered, the least recently verified
 *   forgotten first.
 */
import type pg from "pg";

export interface KeyRecord {
  apiKeyId: string | null;
  userId: string | null;
  /** The key's user's role (`admin` or `user`). */
  userRole: string | null;
  usable: boolean;
  /** Why it is not usable: not_found, revoked, expired. */
  reason: string | null;
}

export interface KeyAnswer {
  record: KeyRecord;
  /** True when the database could not be asked and the last known good answer was used. */
  stale: boolean;
}

export interface KeyLookup {
  /** Rejects when the database cannot be asked and no last known answer may be used. */
  lookup(hash: Buffer): Promise<KeyAnswer>;
  /** Forgets the answers about one key (by id) or about the keys of one user. */
  invalidate(what: { apiKeyId?: string; userId?: string }): void;
  /** Forgets every answer (changes may have been missed). */
  clear(): void;
  size(): number;
}

export interface KeyLookupOptions {
  /** Asks the database; rejects when it cannot. */
  query: (hash: Buffer) => Promise<KeyRecord>;
  ttlMs: number;
  staleMaxMs: number;
  maxEntries?: number;
  now?: () => number;
}

interface Entry {
  /** When the database last answered for this key. */
  verifiedAt: number;
  record: KeyRecord | null;
  inFlight: Promise<KeyRecord> | null;
}

const DEFAULT_MAX_ENTRIES = 10_000;

export function createKeyLookup(options: KeyLookupOptions): KeyLookup {
  const { query, ttlMs, staleMaxMs } = options;
  const maxEntries = options.maxEntries ?? DEFAULT_MAX_ENTRIES;
  const now = options.now ?? Date.now;
  const entries = new Map<string, Entry>();

  const remember = (id: string, entry: Entry) => {
    entries.delete(id);
    entries.set(id, entry);
    if (entries.size > maxEntries) entries.delete(entries.keys().next().value!);
  };

  const ask = (id: string, hash: Buffer, previous: Entry | undefined): Promise<KeyRecord> => {
    const entry: Entry = { verifiedAt: previous?.verifiedAt ?? 0, record: previous?.record ?? null, inFlight: null };
    const inFlight = query(hash).then(
      (record) => {
        // Unless invalidated meanwhile (then the answer may predate the change).
        if (entries.get(id) === entry) {
          entry.record = record;
          entry.verifiedAt = now();
          entry.inFlight = null;
        }
        return record;
      },
      (err: unknown) => {
        if (entries.get(id) === entry) {
          entry.inFlight = null;
          if (entry.record === null) entries.delete(id);
        }
        throw err;
      },
    );
    entry.inFlight = inFlight;
    remember(id, entry);
    return inFlight;
  };

  return {
    async lookup(hash) {
      const id = hash.toString("hex");
      const entry = entries.get(id);
      if (entry?.record && ttlMs > 0 && now() - entry.verifiedAt < ttlMs) return { record: entry.record, stale: false };
      try {
        return { record: await (entry?.inFlight ?? ask(id, hash, entry)), stale: false };
      } catch (err) {
        // The last answer the database gave, where it may stand in: a key known to be revoked or
        // expired stays refused; a usable key stays usable for staleMaxMs; an unknown key is unknown.
        const last = entries.get(id)?.record;
        const verifiedAt = entries.get(id)?.verifiedAt ?? 0;
        if (last && !last.usable && last.reason !== "not_found") return { record: last, stale: true };
        if (last?.usable && staleMaxMs > 0 && now() - verifiedAt <= staleMaxMs) return { record: last, stale: true };
        throw err;
      }
    },
    invalidate({ apiKeyId, userId }) {
      for (const [id, entry] of entries) {
        const r = entry.record;
        if (r && ((apiKeyId && r.apiKeyId === apiKeyId) || (userId && r.userId === userId))) entries.delete(id);
      }
    },
    clear: () => entries.clear(),
    size: () => entries.size,
  };
}

interface AuthenticateRow {
  api_key_id: string | null;
  user_id: string | null;
  user_role: string | null;
  is_usable: boolean | null;
  reason: string | null;
}

/** The database side of the lookup: app_private.authenticate_api_key, as the owner. */
export function queryKey(pool: Pick<pg.Pool, "query">): (hash: Buffer) => Promise<KeyRecord> {
  return async (hash) => {
    const { rows } = await pool.query<AuthenticateRow>(
      "select api_key_id, user_id, user_role, is_usable, reason from app_private.authenticate_api_key($1::bytea)",
      [hash],
    );
    const row = rows[0];
    if (!row) return { apiKeyId: null, userId: null, userRole: null, usable: false, reason: "not_found" };
    const usable = row.is_usable === true && row.api_key_id !== null && row.user_id !== null;
    return { apiKeyId: row.api_key_id, userId: row.user_id, userRole: row.user_role, usable, reason: usable ? null : row.reason ?? "not_found" };
  };
}
