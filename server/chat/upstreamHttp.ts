/**
 * The call to the upstream, on node:http / node:https with keep-alive agents,
 * instead of the global fetch: fetch (undici behind WHATWG streams) costs about
 * twice the CPU per call on Node 20 (measured on loopback, 8 concurrent calls:
 * ~500 µs against ~240 µs a call, kernel included): it builds several web
 * streams per call, tees the request body to be able to follow redirects, and
 * wraps every chunk. The answer is exposed as the small part of a fetch
 * Response that forward() uses (status, headers.get, a body reader), so the
 * forwarding logic and its limits read the same as with fetch.
 *
 * - Connections are kept alive and reused (one agent per protocol, for every
 *   upstream of the process); an idle one is closed after 4 s, before the usual
 *   5 s of a Node or nginx server, so a reused socket is rarely found closed.
 *   When it is (the upstream closed it while it was idle: a reset before any
 *   byte of an answer on a reused socket), the call is made once more on a
 *   fresh connection; nothing was processed upstream.
 * - Redirects are not followed (an API upstream does not redirect a POST):
 *   the 3xx is the answer, and forward() reports it as the upstream's error.
 * - `signal` aborts the call at any point: before the answer (the promise
 *   rejects) or while its body is read (the reader rejects).
 */
import http from "node:http";
import https from "node:https";

/** What forward() and readBounded() read of an answer (a subset of fetch's Response). */
export interface UpstreamAnswer {
  status: number;
  ok: boolean;
  headers: { get(name: string): string | null };
  body: UpstreamBody | null;
}

/** As a web stream reader's: `value` is set whenever `done` is false. */
export type ReadResult = { done: boolean; value?: Uint8Array };

export interface UpstreamBody {
  getReader(): { read(): Promise<ReadResult>; cancel(): Promise<void> };
  cancel(): Promise<void>;
  /**
   * The whole body at once (instead of getReader(), never both), at most
   * `maxBytes`: past that it stops reading, destroys the answer and rejects
   * with tooLarge(). `onRead` is called on every chunk (the idle timer).
   */
  readAll?(maxBytes: number, onRead: () => void, tooLarge: () => Error): Promise<Buffer>;
}

/** Idle keep-alive connections are closed after this long (below the usual 5 s of servers). */
export const UPSTREAM_IDLE_SOCKET_MS = 4000;

const agentOptions = { keepAlive: true, maxFreeSockets: 256, timeout: UPSTREAM_IDLE_SOCKET_MS, scheduling: "lifo" as const };
const httpAgent = new http.Agent(agentOptions);
const httpsAgent = new https.Agent(agentOptions);

export interface UpstreamCall {
  method: "GET" | "POST";
  headers: Record<string, string>;
  body?: string;
  signal: AbortSignal;
}

class Headers {
  constructor(private readonly raw: http.IncomingHttpHeaders) {}
  get(name: string): string | null {
    const value = this.raw[name.toLowerCase()];
    if (value === undefined) return null;
    return Array.isArray(value) ? value.join(", ") : value;
  }
}

function bodyOf(res: http.IncomingMessage): UpstreamBody {
  const cancel = async () => {
    // A body read to its end leaves its socket to the agent for the next call.
    if (!res.complete) res.destroy();
  };
  let iterator: AsyncIterator<Buffer> | null = null;
  return {
    cancel,
    // Events rather than the async iterator: a whole JSON answer is the common case, and the
    // iterator costs a promise, a result object and stream bookkeeping per chunk.
    readAll(maxBytes, onRead, tooLarge) {
      return new Promise<Buffer>((resolve, reject) => {
        const parts: Buffer[] = [];
        let size = 0;
        const done = (err: Error | null) => {
          res.off("data", onData);
          res.off("end", onEnd);
          res.off("error", done);
          res.off("close", onClose);
          if (err) reject(err);
          else resolve(parts.length === 1 ? parts[0]! : Buffer.concat(parts, size));
        };
        const onData = (chunk: Buffer) => {
          onRead();
          size += chunk.length;
          if (size > maxBytes) {
            parts.length = 0;
            res.destroy();
            done(tooLarge());
            return;
          }
          parts.push(chunk);
        };
        const onEnd = () => done(null);
        // As the async iterator reports an answer that ended without its end (and without an error).
        const onClose = () => done(Object.assign(new Error("Premature close"), { code: "ERR_STREAM_PREMATURE_CLOSE" }));
        if (res.errored) return done(res.errored);
        if (res.destroyed) return onClose();
        res.on("data", onData);
        res.on("end", onEnd);
        res.on("error", done);
        res.on("close", onClose);
      });
    },
    getReader() {
      iterator ??= res[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
      const it = iterator;
      return {
        async read(): Promise<ReadResult> {
          const next = await it.next();
          return next.done ? { done: true } : { done: false, value: next.value };
        },
        cancel,
      };
    },
  };
}

interface Target {
  secure: boolean;
  options: http.RequestOptions;
}

/** Parsed upstream URLs (a handful: the configured base and its paths), so a call does not parse its URL again. */
const targets = new Map<string, Target>();
const MAX_TARGETS = 64;

function targetOf(url: string): Target {
  let target = targets.get(url);
  if (target) return target;
  const u = new URL(url);
  const secure = u.protocol === "https:";
  if (!secure && u.protocol !== "http:") throw new TypeError(`the upstream URL must be http or https: ${u.protocol}`);
  target = {
    secure,
    options: {
      protocol: u.protocol,
      hostname: u.hostname.startsWith("[") ? u.hostname.slice(1, -1) : u.hostname,
      port: u.port || (secure ? 443 : 80),
      path: `${u.pathname}${u.search}`,
      agent: secure ? httpsAgent : httpAgent,
    },
  };
  if (targets.size < MAX_TARGETS) targets.set(url, target);
  return target;
}

/** What Node's own `signal` option destroys a request with (its AbortError). */
function abortError(reason: unknown): Error {
  return Object.assign(new Error("The operation was aborted", { cause: reason }), { name: "AbortError", code: "ABORT_ERR" });
}

function callOnce(target: Target, call: UpstreamCall): Promise<{ answer: UpstreamAnswer } | { staleSocket: Error }> {
  return new Promise((resolve, reject) => {
    const { signal } = call;
    if (signal.aborted) {
      reject(abortError(signal.reason));
      return;
    }
    const headers: Record<string, string> = { ...call.headers };
    if (call.body !== undefined) headers["content-length"] = String(Buffer.byteLength(call.body));
    // The abort is wired by hand rather than with request()'s `signal` option, which also
    // watches the request with finished() on every call: the same effect, less work.
    const req = (target.secure ? https : http).request({ ...target.options, method: call.method, headers });
    const onAbort = () => req.destroy(abortError(signal.reason));
    signal.addEventListener("abort", onAbort, { once: true });
    req.once("close", () => signal.removeEventListener("abort", onAbort));
    let answered = false;
    req.once("response", (res) => {
      answered = true;
      resolve({
        answer: {
          status: res.statusCode ?? 0,
          ok: (res.statusCode ?? 0) >= 200 && (res.statusCode ?? 0) < 300,
          headers: new Headers(res.headers),
          body: bodyOf(res),
        },
      });
    });
    req.on("error", (err: NodeJS.ErrnoException) => {
      if (answered) return; // reported to the body's reader
      if (req.reusedSocket && err.code === "ECONNRESET" && !signal.aborted) resolve({ staleSocket: err });
      else reject(err);
    });
    req.end(call.body);
  });
}

/** Makes one call to the upstream (once more on a fresh connection if a reused one was found closed). */
export async function upstreamCall(url: string, call: UpstreamCall): Promise<UpstreamAnswer> {
  const target = targetOf(url);
  const first = await callOnce(target, call);
  if ("answer" in first) return first.answer;
  const second = await callOnce(target, call);
  if ("answer" in second) return second.answer;
  throw second.staleSocket;
}
