/**
 * Server-sent events: an incremental parser (bytes in, complete events out,
 * holding at most one unfinished event) and the writers' formatting.
 * Line endings are normalised to "\n"; each event's `raw` text is what is
 * passed through to the client, so events arrive as the upstream sends them.
 */

export interface SseEvent {
  /** The event as text, ending with the blank line ("\n\n"). */
  raw: string;
  /** The `event:` field, or null. */
  event: string | null;
  /** The `data:` lines joined with "\n" ("" for a comment-only block such as a keep-alive). */
  data: string;
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

export class SseParser {
  private readonly decoder = new TextDecoder();
  private buffer = "";
  private pendingCR = false;

  /** Feeds bytes; returns the events they completed. */
  push(chunk: Uint8Array): SseEvent[] {
    let text = this.decoder.decode(chunk, { stream: true });
    if (this.pendingCR && text.startsWith("\n")) text = text.slice(1);
    if (text === "") return [];
    this.pendingCR = text.endsWith("\r");
    this.buffer += text.replace(/\r\n?/g, "\n");
    return this.drain();
  }

  /** The end of the stream: an unterminated last event, if any. */
  end(): SseEvent[] {
    this.buffer += this.decoder.decode();
    const rest = this.buffer.replace(/^\n+/, "").replace(/\n+$/, "");
    this.buffer = "";
    return rest === "" ? [] : [parseBlock(rest)];
  }

  private drain(): SseEvent[] {
    const events: SseEvent[] = [];
    let at: number;
    while ((at = this.buffer.indexOf("\n\n")) >= 0) {
      const block = this.buffer.slice(0, at);
      this.buffer = this.buffer.slice(at + 2);
      if (block.replace(/\n/g, "") !== "") events.push(parseBlock(block.replace(/^\n+/, "")));
    }
    return events;
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
