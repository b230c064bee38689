/**
 * The JSON body parser, mounted per route after that route's authentication
 * (so an unauthenticated caller never has a body read, parsed or judged: a
 * malformed or huge body without credentials is a 401, not a 400 or 413).
 *
 * - only `application/json` bodies are parsed (anything else leaves req.body
 *   undefined, for the route to refuse), up to BODY_LIMIT (413 body_too_large);
 * - before JSON.parse, one linear pass over the raw body (strings skipped)
 *   bounds its nesting at MAX_JSON_DEPTH: deeper is a 400 json_too_deep (deep
 *   nesting overflows the stack of whatever walks the value later, such as
 *   JSON.stringify when forwarding);
 * - malformed JSON is a 400 invalid_json (installErrorHandler maps body-parser's
 *   errors, as for every route).
 */
import express from "express";

import type { Config } from "../config.js";
import { badRequest, sendError } from "./errors.js";

/** The deepest nesting of arrays and objects accepted in a request body (the body itself is level 1). */
export const MAX_JSON_DEPTH = 400;

const QUOTE = 0x22;
const BACKSLASH = 0x5c;
const OPEN_ARRAY = 0x5b;
const CLOSE_ARRAY = 0x5d;
const OPEN_OBJECT = 0x7b;
const CLOSE_OBJECT = 0x7d;

/**
 * Whether JSON text nests arrays and objects deeper than `max`, in one pass
 * (brackets inside strings do not count). Works on UTF-8 bytes (no byte of a
 * multi-byte character is ASCII) or on decoded text. Not a validator: whatever
 * it lets through is still parsed (and refused) by JSON.parse.
 */
export function jsonDepthExceeds(json: Uint8Array | string, max: number): boolean {
  const text = typeof json === "string" ? json : null;
  const bytes = typeof json === "string" ? null : json;
  const length = json.length;
  let depth = 0;
  let inString = false;
  for (let i = 0; i < length; i++) {
    const c = text !== null ? text.charCodeAt(i) : bytes![i]!;
    if (inString) {
      if (c === BACKSLASH) i++;
      else if (c === QUOTE) inString = false;
    } else if (c === QUOTE) {
      inString = true;
    } else if (c === OPEN_ARRAY || c === OPEN_OBJECT) {
      if (++depth > max) return true;
    } else if (c === CLOSE_ARRAY || c === CLOSE_OBJECT) {
      if (depth > 0) depth--;
    }
  }
  return false;
}

class JsonTooDeep extends Error {
  constructor(readonly maxDepth: number) {
    super(`JSON nested deeper than ${maxDepth}`);
    this.name = "JsonTooDeep";
  }
}

/** An error body-parser passes on as is; installErrorHandler answers 415 unsupported_encoding. */
function unsupportedCharset(charset: string): Error {
  return Object.assign(new Error(`unsupported charset "${charset.toUpperCase()}"`), {
    status: 415,
    expose: true,
    type: "charset.unsupported",
  });
}

function textOf(buf: Buffer, encoding: string | null): Uint8Array | string {
  if (encoding === null || encoding === "utf-8" || encoding === "utf8") return buf;
  let decoder: TextDecoder;
  try {
    decoder = new TextDecoder(encoding);
  } catch {
    throw unsupportedCharset(encoding);
  }
  return decoder.decode(buf);
}

/** The 400 for a body nested deeper than `maxDepth`. */
export const jsonTooDeepError = (maxDepth: number) =>
  badRequest(`The request body is nested deeper than ${maxDepth} levels.`, null, "json_too_deep");

export function jsonBody(config: Pick<Config, "bodyLimit">, maxDepth = MAX_JSON_DEPTH): express.RequestHandler {
  const tooDeep = jsonTooDeepError(maxDepth);
  const parse = express.json({
    limit: config.bodyLimit,
    type: "application/json",
    verify: (_req, _res, buf, encoding) => {
      if (jsonDepthExceeds(textOf(buf, encoding as string | null), maxDepth)) throw new JsonTooDeep(maxDepth);
    },
  });
  return (req, res, next) => {
    parse(req, res, (err?: unknown) => {
      if (err instanceof JsonTooDeep) sendError(res, tooDeep);
      else next(err);
    });
  };
}
