/**
 * Server-sent events: an incremental parser (bytes in, complete events out,
 * holding at most one unfinished event) and the writers' formatting.
 * Line endings are normalised to "\n"; each event's `raw` text is what is
 * passed through to the client, so events arrive as the upstream sends them.
 *
 * The parser's work is linear in its input: each chunk is searched once for
 * the blank line that ends an event (the unfinished event's text is held in
 * pieces and never searched again; only a blank line split across two chunks
 * needs the held text's last character), and an event's pieces are joined
 * once, when it is complete. One event is capped at `maxEventBytes` (UTF-8):
 * past it, push() throws SseEventTooLarge at once, whether or not the event
 * has ended, and what was held is dropped (events the same chunk completed
 * before it are returned first; the next push() or end() throws).
 */

export interface SseEvent {
  /** The event as text, ending with the blank line ("\n\n"). */
  raw: string;
  /** The `event:` field, or null. */
  event: string | null;
  /** The `data:` lines joined with "\n" ("" for a comment-only block such as a keep-alive). */
  data: string;
}

export class SseEventTooLarge extends Error {
  constructor(readonly maxBytes: number) {
    super(`an event larger than ${maxBytes} bytes`);
    this.name = "SseEventTooLarge";
  }
}

function parseBlock(block: string): SseEvent {
  let event: string | null = null;
  const data: string[] = [];
  for (const line of block.split("\n")) {
    if (line === "" || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  return { raw: block + "\n\n", event, data: data.join("\n") };
}

const NL = 10;

/** The text without its leading and trailing newlines (no regular expression: linear whatever the text). */
function trimNewlines(text: string): string {
  let from = 0;
  let to = text.length;
  while (from < to && text.charCodeAt(from) === NL) from++;
  while (to > from && text.charCodeAt(to - 1) === NL) to--;
  return from === 0 && to === text.length ? text : text.slice(from, to);
}

export interface SseParserOptions {
  /** The largest event (its text before the blank line, in UTF-8 bytes). Default 1 MiB. */
  maxEventBytes?: number;
}

export class SseParser {
  private readonly decoder = new TextDecoder();
  private readonly maxEventBytes: number;
  /** The unfinished event's text, in the pieces it came in (already searched: never searched again). */
  private held: string[] = [];
  private heldBytes = 0;
  /** The held text ends with "\n": a "\n" first in the next chunk completes a blank line. */
  private heldEndsWithNewline = false;
  private pendingCR = false;
  /** An event over the cap, found after other events of the same chunk: thrown by the next call. */
  private failure: SseEventTooLarge | null = null;
  /**
   * Work counters, for the tests that prove parsing linear: characters examined
   * (searched for a blank line, or joined into an event), and calls to push().
   */
  scanned = 0;
  pushes = 0;

  constructor(options: SseParserOptions = {}) {
    this.maxEventBytes = options.maxEventBytes ?? 1024 * 1024;
  }

  /** Feeds bytes; returns the events they completed. Throws SseEventTooLarge past maxEventBytes. */
  push(chunk: Uint8Array): SseEvent[] {
    this.pushes++;
    if (this.failure) throw this.failure;
    let text = this.decoder.decode(chunk, { stream: true });
    if (text === "") return [];
    // The "\n" of a "\r\n" split between two chunks.
    if (this.pendingCR && text.charCodeAt(0) === NL) text = text.slice(1);
    this.pendingCR = text.endsWith("\r");
    if (text === "") return [];
    return this.scan(text.includes("\r") ? text.replace(/\r\n?/g, "\n") : text);
  }

  /** The end of the stream: an unterminated last event, if any. */
  end(): SseEvent[] {
    if (this.failure) throw this.failure;
    const tail = this.decoder.decode();
    if (tail !== "") this.hold(tail);
    const rest = trimNewlines(this.takeHeld(""));
    return rest === "" ? [] : [parseBlock(rest)];
  }

  private scan(text: string): SseEvent[] {
    const events: SseEvent[] = [];
    try {
      this.scanInto(events, text);
    } catch (err) {
      if (!(err instanceof SseEventTooLarge) || events.length === 0) throw err;
      this.failure = err;
    }
    return events;
  }

  private scanInto(events: SseEvent[], text: string): void {
    let from = 0;
    // A blank line split across chunks: the held text ends with "\n", this one starts with it.
    if (this.heldEndsWithNewline && text.charCodeAt(0) === NL) {
      this.scanned++;
      this.complete(events, "");
      from = 1;
    }
    let at: number;
    while ((at = text.indexOf("\n\n", from)) >= 0) {
      this.scanned += at + 2 - from;
      this.complete(events, text.slice(from, at));
      from = at + 2;
    }
    this.scanned += text.length - from;
    if (from < text.length) this.hold(from === 0 ? text : text.slice(from));
  }

  /** Holds a piece of the unfinished event, refusing it past the cap. */
  private hold(piece: string): void {
    this.heldBytes += Buffer.byteLength(piece);
    if (this.heldBytes > this.maxEventBytes) this.tooLarge();
    this.held.push(piece);
    this.heldEndsWithNewline = piece.charCodeAt(piece.length - 1) === NL;
  }

  /** The held text followed by `last`, and the parser ready for the next event. */
  private takeHeld(last: string): string {
    const text = this.held.length === 0 ? last : this.held.join("") + last;
    this.scanned += this.held.length === 0 ? 0 : text.length;
    this.held = [];
    this.heldBytes = 0;
    this.heldEndsWithNewline = false;
    return text;
  }

  /** An event ended: the held text and `last` (its text up to the blank line). */
  private complete(events: SseEvent[], last: string): void {
    if (this.heldBytes + (last === "" ? 0 : Buffer.byteLength(last)) > this.maxEventBytes) this.tooLarge();
    const block = trimNewlines(this.takeHeld(last));
    // A run of blank lines ends no event.
    if (block !== "") events.push(parseBlock(block));
  }

  private tooLarge(): never {
    this.held = [];
    this.heldBytes = 0;
    this.heldEndsWithNewline = false;
    throw new SseEventTooLarge(this.maxEventBytes);
  }
}

/** A chat-completions style event: `data: <json>`. */
export const sseData = (value: unknown): string => `data: ${typeof value === "string" ? value : JSON.stringify(value)}\n\n`;

/** A Responses API style event: `event: <type>` then `data: <json>`. */
export const sseEvent = (type: string, value: unknown): string => `event: ${type}\ndata: ${JSON.stringify(value)}\n\n`;

export const SSE_HEADERS = {
  "content-type": "text/event-stream; charset=utf-8",
  "cache-control": "no-cache",
  connection: "keep-alive",
  // Tells nginx-style proxies in front of keytrack not to buffer the stream.
  "x-accel-buffering": "no",
} as const;
