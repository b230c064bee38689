// The durable local spool: request rows the database could not take, kept on
// disk until it answers again. One process owns a spool folder (a lock file
// with its pid). Files in <dataDir>/spool/:
//
//   requests.jsonl   append-only, one JSON line per row; a line is written and
//                    fsynced before append() resolves (concurrent appends share
//                    one write and one fsync, in call order).
//   requests.offset  {"offset": N}: the lines before byte N are replayed. Written
//                    to a temp file, fsynced, renamed over, directory fsynced.
//                    Absent: 0. Writing it may fail (disk full): that is not an
//                    error of the replay, only a lag (see below); it is tried
//                    again at the next commit point.
//   rejected.jsonl   lines the database refused for good (bad data) or that do
//                    not parse, with the reason: never silently dropped.
//   lock             the owner's pid.
//
// Exactly once comes from the database (re-inserting a request_id is a no-op),
// so the offset may lag behind what was replayed: a crash in between replays a
// few rows again, harmlessly. It never runs ahead: a row counts as replayed only
// after the database took it (or it was moved to rejected.jsonl, fsynced).
// In this process the position in memory is the truth, so a replay whose offset
// cannot be persisted goes on, applying each line once; only a restart would
// replay from the older offset on disk (duplicates, ignored by the database).
// When everything is replayed the file is emptied: the offset file is removed
// first (offset 0; removing needs no free space, so a full disk cannot keep the
// spool from being emptied, which is what frees the disk), then the file is
// truncated, so a crash in between replays old rows again (duplicates,
// ignored) but never skips a new one.
//
// Writes can fail (ENOSPC, EIO): a failed append rejects its callers (the
// recorder then keeps the rows in memory) and the half-written tail is cut off
// before the next write; a failed rejected.jsonl write stops the replay at that
// line, which stays in the spool. Tests simulate such failures with the
// `fault` option (SpoolOptions), never by filling a disk.
import fs from "node:fs";
import path from "node:path";

import type { Logger } from "../log.js";
import type { RequestRecord, RequestStatus } from "./types.js";
import { processAlive } from "../processAlive.js";

export interface SpoolEntry {
  row: RequestRecord;
  /** When the row was spooled (becomes spooled_at). */
  spooledAt: Date;
}

/** What the replayer did with one entry. */
export type ReplayVerdict =
  /** In the database (written now or already there): move on. */
  | "done"
  /** The database is unavailable: stop here, this entry stays first in line. */
  | "stop"
  /** The database refuses this row for good: move it to rejected.jsonl and go on. */
  | { reject: string; code?: string };

export interface ReplayPass {
  /** Entries taken off the spool (done or rejected). */
  processed: number;
  /** Entries moved to rejected.jsonl: refused by the database, or corrupt. */
  rejected: number;
  /** Of `rejected`: lines that did not parse. */
  corrupt: number;
  /** True when the replayer asked to stop (or shouldStop said so) before the end. */
  stopped: boolean;
  /** Why the spool itself stopped the pass (a line could not be moved to rejected.jsonl). */
  error?: string;
}

/** The spool's writes, as a fault hook sees them. */
export type SpoolOp =
  /** A group of lines appended to requests.jsonl (write and fsync). */
  | "append"
  /** requests.offset written (temp file, fsync, rename). */
  | "offset"
  /** A line appended to rejected.jsonl. */
  | "rejected";

export interface SpoolOptions {
  /**
   * Tests only: called before each write; an error it returns (or throws)
   * fails that write as the file system would (e.g. `code: "ENOSPC"`).
   */
  fault?: (op: SpoolOp) => Error | null | undefined | void;
}

/** Rows the spool moved to rejected.jsonl since it was opened, by why. */
export interface RejectedCounts {
  /** Refused for good by the database (on replay, or handed over by reject()). */
  database: number;
  /** Lines that did not parse, and a torn last line found at open. */
  corrupt: number;
}

export class SpoolLockedError extends Error {
  constructor(message: string, readonly pid: number | null) {
    super(message);
    this.name = "SpoolLockedError";
  }
}

export interface SpoolPaths {
  dir: string;
  requests: string;
  offset: string;
  rejected: string;
  lock: string;
}

export function spoolPaths(dataDir: string): SpoolPaths {
  const dir = path.join(path.resolve(dataDir), "spool");
  return {
    dir,
    requests: path.join(dir, "requests.jsonl"),
    offset: path.join(dir, "requests.offset"),
    rejected: path.join(dir, "rejected.jsonl"),
    lock: path.join(dir, "lock"),
  };
}

// ---------------------------------------------------------------------------
// Line format: {"v":1,"spooledAt":"<iso>","row":{...RequestRecord, createdAt as
// ISO text, apiKeyHash as hex}}

const STATUSES: readonly RequestStatus[] = ["completed", "failed", "partial"];

export function encodeEntry(entry: SpoolEntry): string {
  const r = entry.row;
  return JSON.stringify({
    v: 1,
    spooledAt: entry.spooledAt.toISOString(),
    row: {
      requestId: r.requestId,
      createdAt: r.createdAt.toISOString(),
      apiKeyHash: r.apiKeyHash ? r.apiKeyHash.toString("hex") : null,
      apiKeyId: r.apiKeyId ?? null,
      userId: r.userId ?? null,
      model: r.model,
      provider: r.provider,
      inputTokens: r.inputTokens,
      outputTokens: r.outputTokens,
      processingTimeMs: r.processingTimeMs,
      status: r.status,
      errorMessage: r.errorMessage,
      attributionReason: r.attributionReason ?? null,
      processId: r.processId ?? null,
      processSeq: r.processSeq ?? null,
    },
  });
}

function date(value: unknown, field: string): Date {
  const d = typeof value === "string" ? new Date(value) : null;
  if (!d || Number.isNaN(d.getTime())) throw new Error(`${field} is not a timestamp`);
  return d;
}

function strOrNull(value: unknown, field: string): string | null {
  if (value === null || typeof value === "string") return value;
  throw new Error(`${field} is not a string or null`);
}

function numOrNull(value: unknown, field: string): number | null {
  if (value === null || typeof value === "number") return value;
  throw new Error(`${field} is not a number or null`);
}

export function decodeEntry(line: string): SpoolEntry {
  const obj = JSON.parse(line) as { v?: unknown; spooledAt?: unknown; row?: Record<string, unknown> };
  if (!obj || typeof obj !== "object" || obj.v !== 1 || !obj.row || typeof obj.row !== "object") {
    throw new Error("not a version 1 spool record");
  }
  const r = obj.row;
  if (typeof r.requestId !== "string" || r.requestId === "") throw new Error("requestId is missing");
  const hash = strOrNull(r.apiKeyHash, "apiKeyHash");
  if (hash !== null && !/^(?:[0-9a-f]{2})*$/.test(hash)) throw new Error("apiKeyHash is not hex");
  if (!STATUSES.includes(r.status as RequestStatus)) throw new Error("status is not a request status");
  const reason = strOrNull(r.attributionReason ?? null, "attributionReason");
  if (reason !== null && reason !== "dev_bypass") throw new Error("attributionReason is not dev_bypass or null");
  return {
    spooledAt: date(obj.spooledAt, "spooledAt"),
    row: {
      requestId: r.requestId,
      createdAt: date(r.createdAt, "createdAt"),
      apiKeyHash: hash === null ? null : Buffer.from(hash, "hex"),
      apiKeyId: strOrNull(r.apiKeyId ?? null, "apiKeyId"),
      userId: strOrNull(r.userId ?? null, "userId"),
      model: strOrNull(r.model, "model"),
      provider: strOrNull(r.provider, "provider"),
      inputTokens: numOrNull(r.inputTokens, "inputTokens"),
      outputTokens: numOrNull(r.outputTokens, "outputTokens"),
      processingTimeMs: numOrNull(r.processingTimeMs, "processingTimeMs"),
      status: r.status as RequestStatus,
      errorMessage: strOrNull(r.errorMessage, "errorMessage"),
      attributionReason: reason as "dev_bypass" | null,
      // Absent in lines spooled before completeness numbering: null.
      processId: strOrNull(r.processId ?? null, "processId"),
      processSeq: numOrNull(r.processSeq ?? null, "processSeq"),
    },
  };
}

// ---------------------------------------------------------------------------
// Small promise wrappers over fd-level calls (positional reads, whole writes).

function writeAll(fd: number, buf: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    let done = 0;
    const step = () =>
      fs.write(fd, buf, done, buf.length - done, null, (err, n) => {
        if (err) return reject(err);
        done += n;
        if (done < buf.length) step();
        else resolve();
      });
    step();
  });
}

function fsyncFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fsync(fd, (err) => (err ? reject(err) : resolve())));
}

function ftruncateFd(fd: number, length: number): Promise<void> {
  return new Promise((resolve, reject) => fs.ftruncate(fd, length, (err) => (err ? reject(err) : resolve())));
}

function readAt(fd: number, length: number, position: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const buf = Buffer.alloc(length);
    let got = 0;
    const step = () =>
      fs.read(fd, buf, got, length - got, position + got, (err, n) => {
        if (err) return reject(err);
        got += n;
        if (n === 0 || got === length) resolve(buf.subarray(0, got));
        else step();
      });
    step();
  });
}

function readAtSync(fd: number, length: number, position: number): Buffer {
  const buf = Buffer.alloc(length);
  let got = 0;
  while (got < length) {
    const n = fs.readSync(fd, buf, got, length - got, position + got);
    if (n === 0) break;
    got += n;
  }
  return buf.subarray(0, got);
}

function fsyncDirSync(dir: string): void {
  const fd = fs.openSync(dir, "r");
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

async function fsyncDir(dir: string): Promise<void> {
  const handle = await fs.promises.open(dir, "r");
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

const NL = 0x0a;
const READ_CHUNK = 1 << 20;
/** Replayed lines between two offset commits (a crash replays at most this many again). */
const COMMIT_EVERY = 100;

/** Spool folders held by this process (a second Spool on one folder is refused too). */
const heldHere = new Set<string>();

/**
 * The spool of one data folder. open() is synchronous (start-up): it takes the
 * lock, repairs a torn last line and counts what is left to replay.
 */
export class Spool {
  readonly paths: SpoolPaths;
  private readonly log: Logger;
  private readonly appendFd: number;
  private readonly readFd: number;
  private rejectedFd: number | null = null;
  /** Bytes in requests.jsonl that are written and fsynced (whole lines only). */
  private size: number;
  /** Where the next replay starts: lines before it are in the database or rejected. */
  private readPos: number;
  /** What requests.offset says on disk (<= readPos). */
  private committed: number;
  private pending = 0;
  private lines = 0;
  private queue: Array<{ data: Buffer; resolve: () => void; reject: (err: unknown) => void }> = [];
  private flushRunning = false;
  private flushDone: Promise<void> = Promise.resolve();
  /** Serialises appends with compaction (both change the file's length). */
  private exclusive: Promise<unknown> = Promise.resolve();
  private replaying = false;
  /** A failed append may have left part of a line at the end: cut it off (back to `size`) before the next write. */
  private tailDirty = false;
  /** Serialises writes to rejected.jsonl. */
  private rejectedChain: Promise<unknown> = Promise.resolve();
  /** Set while requests.offset cannot be written: one warning per streak. */
  private offsetFailing = false;
  private readonly fault: SpoolOptions["fault"];
  private readonly rejectedCounts: RejectedCounts = { database: 0, corrupt: 0 };
  private closed = false;

  static open(dataDir: string, log: Logger, options: SpoolOptions = {}): Spool {
    return new Spool(spoolPaths(dataDir), log, options);
  }

  private constructor(paths: SpoolPaths, log: Logger, options: SpoolOptions) {
    this.paths = paths;
    this.log = log;
    this.fault = options.fault;
    // Rows carry key hashes and request metadata: readable by this user only.
    fs.mkdirSync(paths.dir, { recursive: true, mode: 0o700 });
    this.lock();
    const opened: number[] = [];
    try {
      this.appendFd = fs.openSync(paths.requests, "a", 0o600);
      opened.push(this.appendFd);
      this.readFd = fs.openSync(paths.requests, "r");
      opened.push(this.readFd);
      fsyncDirSync(paths.dir);
      this.size = this.repairTail(fs.fstatSync(this.appendFd).size);
      this.committed = this.readOffset();
      this.readPos = this.committed;
      this.lines = this.countLines(this.readPos, this.size);
    } catch (err) {
      for (const fd of opened) fs.closeSync(fd);
      this.unlock();
      throw err;
    }
    if (this.lines > 0) {
      log.info("spool holds rows from an earlier run: replaying them", { rows: this.lines, file: paths.requests });
    }
  }

  /** Rows waiting to be replayed (durable ones plus those being written). */
  get depth(): number {
    return this.lines + this.pending;
  }

  /** Rows moved to rejected.jsonl since the spool was opened (a copy). */
  get rejected(): RejectedCounts {
    return { ...this.rejectedCounts };
  }

  /** Throws the injected fault for this write, if any (tests). */
  private injected(op: SpoolOp): void {
    const err = this.fault?.(op);
    if (err) throw err;
  }

  /** Appends one entry; resolves once it is on disk (fsynced). Order of calls is the order of lines. */
  append(entry: SpoolEntry): Promise<void> {
    if (this.closed) return Promise.reject(new Error("the spool is closed"));
    const data = Buffer.from(encodeEntry(entry) + "\n", "utf8");
    this.pending++;
    return new Promise<void>((resolve, reject) => {
      this.queue.push({ data, resolve, reject });
      if (!this.flushRunning) {
        this.flushRunning = true;
        this.flushDone = this.flush();
      }
    });
  }

  /**
   * Group commit: everything queued goes out in one write and one fsync, in
   * order. flushRunning is cleared right after the last empty-queue check, with
   * no await in between, so an append can never be left waiting in the queue.
   */
  private async flush(): Promise<void> {
    while (this.queue.length > 0) {
      const batch = this.queue.splice(0);
      const data = Buffer.concat(batch.map((b) => b.data));
      try {
        await this.withExclusive(async () => {
          if (this.tailDirty) {
            // A partial line at the end would swallow the next one: cut it off first.
            try {
              await ftruncateFd(this.appendFd, this.size);
              this.tailDirty = false;
            } catch (cutErr) {
              throw new Error(`the spool file ${this.paths.requests} could not be repaired after a failed write: ${(cutErr as Error).message}`, { cause: cutErr });
            }
          }
          try {
            this.injected("append");
            await writeAll(this.appendFd, data);
            await fsyncFd(this.appendFd);
          } catch (err) {
            this.tailDirty = true;
            try {
              await ftruncateFd(this.appendFd, this.size);
              this.tailDirty = false;
            } catch {
              // tried again before the next write
            }
            throw err;
          }
          this.size += data.length;
          this.lines += batch.length;
        });
        this.pending -= batch.length;
        for (const b of batch) b.resolve();
      } catch (err) {
        this.pending -= batch.length;
        for (const b of batch) b.reject(err);
      }
    }
    this.flushRunning = false;
  }

  private withExclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.exclusive.then(fn, fn);
    this.exclusive = run.catch(() => {});
    return run;
  }

  /**
   * Replays lines in file order, one at a time, through `apply`, until the end
   * (including lines appended meanwhile), a "stop", or shouldStop(). Then, when
   * nothing is left, empties the file.
   */
  async replay(apply: (entry: SpoolEntry) => Promise<ReplayVerdict>, shouldStop: () => boolean = () => false): Promise<ReplayPass> {
    if (this.replaying) throw new Error("a replay of this spool is already running");
    if (this.closed) throw new Error("the spool is closed");
    this.replaying = true;
    const pass: ReplayPass = { processed: 0, rejected: 0, corrupt: 0, stopped: false };
    let sinceCommit = 0;
    try {
      outer: while (this.readPos < this.size) {
        const start = this.readPos;
        let length = Math.min(READ_CHUNK, this.size - start);
        let buf = await readAt(this.readFd, length, start);
        // A line longer than a chunk: read on to its end.
        while (buf.lastIndexOf(NL) < 0 && start + length < this.size) {
          length = Math.min(length * 2, this.size - start);
          buf = await readAt(this.readFd, length, start);
        }
        const lastNl = buf.lastIndexOf(NL);
        if (lastNl < 0) throw new Error(`spool file ${this.paths.requests} has no line end after byte ${start}`);
        let from = 0;
        while (from <= lastNl) {
          if (shouldStop()) {
            pass.stopped = true;
            break outer;
          }
          const nl = buf.indexOf(NL, from);
          const text = buf.subarray(from, nl).toString("utf8");
          let entry: SpoolEntry | null = null;
          let corrupt = "";
          try {
            entry = decodeEntry(text);
          } catch (err) {
            corrupt = `corrupt spool line at byte ${start + from}: ${(err as Error).message}`;
            this.log.warn("corrupt line in the spool: moved to rejected.jsonl", { byte: start + from, error: err });
          }
          const verdict: ReplayVerdict = entry ? await apply(entry) : { reject: corrupt };
          if (verdict === "stop") {
            pass.stopped = true;
            break outer;
          }
          if (verdict !== "done") {
            try {
              await this.writeRejected({ error: verdict.reject, code: verdict.code, entry, raw: entry ? undefined : text });
            } catch (err) {
              // The line stays first in line (in the spool, durable): the next pass tries it again.
              pass.stopped = true;
              pass.error = `${this.paths.rejected} could not be written: ${(err as Error).message}`;
              this.log.error("a spooled row refused for good could not be moved to rejected.jsonl: it stays in the spool, the replay stops there", {
                requestId: entry?.row.requestId, error: err,
              });
              break outer;
            }
            pass.rejected++;
            if (entry) this.rejectedCounts.database++;
            else {
              pass.corrupt++;
              this.rejectedCounts.corrupt++;
            }
          }
          pass.processed++;
          this.lines--;
          from = nl + 1;
          this.readPos = start + from;
          if (++sinceCommit >= COMMIT_EVERY) {
            await this.tryCommitOffset(this.readPos);
            sinceCommit = 0;
          }
        }
      }
    } finally {
      try {
        if (this.committed !== this.readPos) await this.tryCommitOffset(this.readPos);
      } finally {
        this.replaying = false;
      }
    }
    if (!pass.stopped) await this.compactIfDrained();
    return pass;
  }

  /**
   * Empties requests.jsonl once every line in it is replayed: the offset file
   * is removed first (offset 0, and removing needs no free space), then the
   * file is truncated. False when there was nothing to do, or it failed (logged;
   * the next drained pass tries again).
   */
  async compactIfDrained(): Promise<boolean> {
    return this.withExclusive(async () => {
      if (this.closed || this.size === 0 || this.readPos !== this.size) return false;
      try {
        await fs.promises.rm(this.paths.offset, { force: true });
        await fsyncDir(this.paths.dir);
        this.committed = 0;
        await ftruncateFd(this.appendFd, 0);
        await fsyncFd(this.appendFd);
      } catch (err) {
        // Nothing is lost: the lines are all replayed (readPos), at worst a restart replays them again.
        this.log.warn("the replayed spool could not be emptied: tried again after the next replay", { file: this.paths.requests, error: err });
        return false;
      }
      this.readPos = 0;
      this.size = 0;
      this.lines = 0;
      this.tailDirty = false;
      this.log.debug("spool fully replayed: file emptied", { file: this.paths.requests });
      return true;
    });
  }

  /**
   * Moves a row the database refused for good (at record time) to
   * rejected.jsonl; resolves once it is fsynced there, and counts it.
   */
  async reject(entry: SpoolEntry, error: string, code?: string): Promise<void> {
    if (this.closed) throw new Error("the spool is closed");
    await this.writeRejected({ error, code, entry });
    this.rejectedCounts.database++;
  }

  /** Waits for appends in flight, closes the files and releases the lock. The spool stays on disk. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true; // no new appends; those already queued are still written
    while (this.flushRunning) await this.flushDone;
    await this.exclusive;
    await this.rejectedChain;
    fs.closeSync(this.appendFd);
    fs.closeSync(this.readFd);
    if (this.rejectedFd !== null) fs.closeSync(this.rejectedFd);
    this.unlock();
  }

  // -------------------------------------------------------------------------

  private async commitOffset(offset: number): Promise<void> {
    const tmp = this.paths.offset + ".tmp";
    try {
      this.injected("offset");
      const handle = await fs.promises.open(tmp, "w", 0o600);
      try {
        await handle.writeFile(JSON.stringify({ offset }) + "\n");
        await handle.sync();
      } finally {
        await handle.close();
      }
      await fs.promises.rename(tmp, this.paths.offset);
    } catch (err) {
      await fs.promises.rm(tmp, { force: true }).catch(() => {});
      throw err;
    }
    await fsyncDir(this.paths.dir);
    this.committed = offset;
  }

  /**
   * commitOffset, for the replay: a failure (disk full) is logged, once per
   * streak, and left for the next commit point. The offset on disk then lags
   * behind: only a restart would replay those lines again, and the database
   * ignores a request_id it already has.
   */
  private async tryCommitOffset(offset: number): Promise<boolean> {
    try {
      await this.commitOffset(offset);
    } catch (err) {
      if (!this.offsetFailing) {
        this.offsetFailing = true;
        this.log.warn("the spool offset could not be written: the replay goes on, a restart may replay some rows again (ignored as duplicates)", {
          file: this.paths.offset, error: err,
        });
      }
      return false;
    }
    if (this.offsetFailing) {
      this.offsetFailing = false;
      this.log.info("the spool offset is written again", { file: this.paths.offset });
    }
    return true;
  }

  /** Appends one line to rejected.jsonl (fsynced); writes are serialised, a failure leaves no partial line behind. */
  private writeRejected(r: { error: string; code?: string; entry: SpoolEntry | null; raw?: string }): Promise<void> {
    const run = this.rejectedChain.then(async () => {
      const line = JSON.stringify({
        rejectedAt: new Date().toISOString(),
        error: r.error,
        ...(r.code ? { code: r.code } : {}),
        ...(r.entry ? { record: JSON.parse(encodeEntry(r.entry)) } : { raw: r.raw }),
      });
      this.injected("rejected");
      if (this.rejectedFd === null) {
        this.rejectedFd = fs.openSync(this.paths.rejected, "a", 0o600);
        await fsyncDir(this.paths.dir);
      }
      const fd = this.rejectedFd;
      const before = fs.fstatSync(fd).size;
      try {
        await writeAll(fd, Buffer.from(line + "\n", "utf8"));
        await fsyncFd(fd);
      } catch (err) {
        await ftruncateFd(fd, before).catch(() => {});
        throw err;
      }
    });
    this.rejectedChain = run.catch(() => {});
    return run;
  }

  /** A crash in the middle of a write leaves a last line without its end: keep it aside, cut it off. */
  private repairTail(size: number): number {
    if (size === 0) return 0;
    if (readAtSync(this.readFd, 1, size - 1)[0] === NL) return size;
    let cut = 0;
    for (let end = size; end > 0 && cut === 0; ) {
      const start = Math.max(0, end - READ_CHUNK);
      const nl = readAtSync(this.readFd, end - start, start).lastIndexOf(NL);
      if (nl >= 0) cut = start + nl + 1;
      end = start;
    }
    const torn = readAtSync(this.readFd, size - cut, cut).toString("utf8");
    const fd = fs.openSync(this.paths.rejected, "a", 0o600);
    try {
      const line = { rejectedAt: new Date().toISOString(), error: `torn last line of the spool (a crash during a write; its record() never resolved), ${size - cut} bytes at byte ${cut}`, raw: torn };
      fs.writeSync(fd, JSON.stringify(line) + "\n");
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.ftruncateSync(this.appendFd, cut);
    fs.fsyncSync(this.appendFd);
    this.rejectedCounts.corrupt++;
    this.log.warn("the spool's last line was torn by a crash mid-write: skipped (kept in rejected.jsonl)", { file: this.paths.requests, byte: cut, bytes: size - cut });
    return cut;
  }

  private readOffset(): number {
    let text: string;
    try {
      text = fs.readFileSync(this.paths.offset, "utf8");
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return 0;
      throw err;
    }
    let offset: unknown;
    try {
      offset = (JSON.parse(text) as { offset?: unknown }).offset;
    } catch {
      offset = undefined;
    }
    // Replaying from 0 is always safe (duplicates are ignored); skipping never is.
    if (typeof offset !== "number" || !Number.isInteger(offset) || offset < 0) {
      this.log.warn("spool offset file unreadable: replaying the whole spool", { file: this.paths.offset });
      return 0;
    }
    if (offset > this.size || (offset > 0 && readAtSync(this.readFd, 1, offset - 1)[0] !== NL)) {
      this.log.warn("spool offset does not match the spool file: replaying the whole spool", { offset, size: this.size });
      return 0;
    }
    return offset;
  }

  private countLines(from: number, to: number): number {
    let count = 0;
    for (let pos = from; pos < to; pos += READ_CHUNK) {
      const buf = readAtSync(this.readFd, Math.min(READ_CHUNK, to - pos), pos);
      for (let i = buf.indexOf(NL); i >= 0; i = buf.indexOf(NL, i + 1)) count++;
    }
    return count;
  }

  /** Takes the lock file (written complete, then linked into place, so nobody reads half a pid). */
  private lock(): void {
    const key = this.paths.lock;
    if (heldHere.has(key)) {
      throw new SpoolLockedError(`the spool ${this.paths.dir} is already open in this process (one Recorder per data folder)`, process.pid);
    }
    const tmp = `${this.paths.lock}.${process.pid}.tmp`;
    fs.writeFileSync(tmp, `${process.pid}\n`);
    try {
      for (let tries = 0; ; tries++) {
        try {
          fs.linkSync(tmp, this.paths.lock);
          break;
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code !== "EEXIST" || tries >= 2) throw err;
        }
        const holder = this.lockHolder();
        // Our own pid but not held here: a previous life of this process (a container's pid 1).
        if (holder !== null && holder !== process.pid && processAlive(holder)) {
          throw new SpoolLockedError(
            `the spool ${this.paths.dir} is in use by process ${holder} (lock file ${this.paths.lock}); ` +
              `one process owns a data folder's spool: stop that process or give this one its own KEYTRACK_DATA_DIR`,
            holder,
          );
        }
        this.log.warn("taking over the spool lock of a process that is gone", { pid: holder, lock: this.paths.lock });
        fs.rmSync(this.paths.lock, { force: true });
      }
    } finally {
      fs.rmSync(tmp, { force: true });
    }
    fsyncDirSync(this.paths.dir);
    heldHere.add(key);
  }

  private lockHolder(): number | null {
    try {
      const pid = Number(fs.readFileSync(this.paths.lock, "utf8").trim());
      return Number.isInteger(pid) && pid > 0 ? pid : null;
    } catch {
      return null;
    }
  }

  private unlock(): void {
    if (this.lockHolder() === process.pid) fs.rmSync(this.paths.lock, { force: true });
    heldHere.delete(this.paths.lock);
  }
}
