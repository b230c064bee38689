/**
 * The echo model's text handling and its token count. A "token" here is a run
 * of letters, digits or underscores, or any single other non-space character
 * ("Hello, world!" is 4 tokens). Deterministic and documented, not a model
 * tokenizer: input tokens count the text of every message (and instructions),
 * output tokens count the answer, and a streamed answer is sent one token per
 * chunk, so chunks and usage always agree.
 */

const TOKEN = /[\p{L}\p{N}_]+|[^\s\p{L}\p{N}_]/gu;

export function countTokens(text: string): number {
  let n = 0;
  for (const _ of text.matchAll(TOKEN)) n++;
  return n;
}

/** The text cut into pieces of one token each (with the whitespace before it); joined, they are the text. */
export function splitTokens(text: string): string[] {
  const pieces: string[] = [];
  let from = 0;
  for (const m of text.matchAll(TOKEN)) {
    const end = m.index + m[0].length;
    pieces.push(text.slice(from, end));
    from = end;
  }
  if (from < text.length) {
    if (pieces.length) pieces[pieces.length - 1] += text.slice(from);
    else pieces.push(text.slice(from));
  }
  return pieces;
}

export interface BoundedText {
  /** The text, cut after at most maxTokens tokens and maxChars characters (whole tokens, except a first token longer than maxChars). */
  text: string;
  /** The text in pieces of one token each (with the whitespace before it); joined, they are `text`. */
  pieces: string[];
  /** Whether anything was cut off. */
  truncated: boolean;
}

/**
 * splitTokens, bounded: stops after `maxTokens` tokens or `maxChars`
 * characters, whichever comes first, without looking at the rest of the text.
 */
export function boundedTokens(text: string, maxTokens: number, maxChars: number): BoundedText {
  const pieces: string[] = [];
  let from = 0;
  for (const m of text.matchAll(TOKEN)) {
    const end = m.index + m[0].length;
    if (pieces.length >= maxTokens || end > maxChars) {
      if (pieces.length === 0) {
        // One token longer than maxChars: its beginning (not splitting a surrogate pair).
        let cut = maxChars;
        const last = text.charCodeAt(cut - 1);
        if (cut > 1 && last >= 0xd800 && last <= 0xdbff) cut--;
        pieces.push(text.slice(0, cut));
        from = cut;
      }
      return { text: text.slice(0, from), pieces, truncated: true };
    }
    pieces.push(text.slice(from, end));
    from = end;
  }
  // Only whitespace after the last token: kept, within the bound.
  if (from < text.length) {
    const rest = text.slice(from, Math.max(from, maxChars));
    if (pieces.length) pieces[pieces.length - 1] += rest;
    else if (rest !== "") pieces.push(rest);
    from += rest.length;
  }
  return { text: text.slice(0, from), pieces, truncated: from < text.length };
}

type Json = Record<string, unknown>;
const isObject = (v: unknown): v is Json => typeof v === "object" && v !== null && !Array.isArray(v);

/** The text of a message's content: a string, or the text of its text parts. */
export function contentText(content: unknown): string {
  if (typeof content === "string") return content;
  if (!Array.isArray(content)) return "";
  return content
    .map((part) => (typeof part === "string" ? part : isObject(part) && typeof part.text === "string" ? part.text : ""))
    .filter((t) => t !== "")
    .join("\n");
}

export interface EchoPrompt {
  /** The last user message's text: the answer. */
  answer: string;
  inputTokens: number;
}

function fromMessages(messages: unknown[], extra: string[]): EchoPrompt {
  let answer = "";
  let inputTokens = extra.reduce((n, t) => n + countTokens(t), 0);
  for (const m of messages) {
    if (typeof m === "string") {
      inputTokens += countTokens(m);
      answer = m;
      continue;
    }
    if (!isObject(m)) continue;
    const text = contentText(m.content);
    inputTokens += countTokens(text);
    // Responses input items without a role are user messages when they carry content.
    if (m.role === "user" || (m.role === undefined && m.content !== undefined)) answer = text;
  }
  return { answer, inputTokens };
}

export function chatPrompt(body: Json): EchoPrompt {
  return fromMessages(Array.isArray(body.messages) ? body.messages : [], []);
}

export function responsesPrompt(body: Json): EchoPrompt {
  const instructions = typeof body.instructions === "string" ? [body.instructions] : [];
  const input = body.input;
  return fromMessages(typeof input === "string" ? [input] : Array.isArray(input) ? input : [], instructions);
}
