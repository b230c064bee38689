/**
 * Request bodies checked before anything is forwarded: what the gateway itself
 * relies on (model, messages or input, stream flags), with OpenAI-style 400s
 * naming the parameter. Everything else is the upstream's to judge.
 */
import { badRequest, type ApiError } from "../http/errors.js";

export type ChatKind = "chat" | "responses";

export interface ValidRequest {
  kind: ChatKind;
  body: Record<string, unknown>;
  model: string;
  stream: boolean;
  /** The client asked for a usage chunk in its stream (chat: stream_options.include_usage). */
  clientWantsUsage: boolean;
}

export type Validation = { ok: true; request: ValidRequest } | { ok: false; error: ApiError };

const MAX_MODEL_LENGTH = 200; // the ledger's model column

/** U+0000-U+001F and U+007F: never part of a model name, and they would reach logs and the ledger as is. */
const CONTROL = /[\u0000-\u001f\u007f]/;

/** What a model id in a URL path (GET /v1/models/:model) may be made of. */
const MODEL_ID = /^[A-Za-z0-9._:/@+-]+$/;

/**
 * Why `id` is not a model id that may be put in an upstream URL, or null: at
 * most 200 characters of [A-Za-z0-9._:/@+-], and no "." or ".." segment (as a
 * path, it would name another resource of the upstream, fetched with the
 * gateway's own key), nor an empty one ("/x", "x//y", "x/").
 */
export function modelIdProblem(id: string): string | null {
  if (id === "") return "empty";
  if (id.length > MAX_MODEL_LENGTH) return `longer than ${MAX_MODEL_LENGTH} characters`;
  if (!MODEL_ID.test(id)) return "only letters, digits and . _ : / @ + - are allowed";
  const segments = id.split("/");
  if (segments.some((segment) => segment === "." || segment === "..")) return '"." and ".." are not model ids, nor parts of one';
  if (segments.some((segment) => segment === "")) return "empty parts between slashes";
  return null;
}

function typeName(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  return typeof v === "object" ? "an object" : `a ${typeof v}`;
}

const isObject = (v: unknown): v is Record<string, unknown> =>
  typeof v === "object" && v !== null && !Array.isArray(v);

const wrongType = (param: string, expected: string, got: unknown) =>
  badRequest(`Invalid type for '${param}': expected ${expected}, but got ${typeName(got)} instead.`, param, "invalid_type");

const missing = (param: string) => badRequest(`Missing required parameter: '${param}'.`, param, "missing_required_parameter");

function checkCommon(body: unknown): { body: Record<string, unknown>; model: string; stream: boolean } | ApiError {
  if (!isObject(body)) {
    return body === undefined
      ? badRequest("The request body must be JSON (Content-Type: application/json).", null, "invalid_json")
      : badRequest(`The request body must be a JSON object, but got ${typeName(body)}.`, null, "invalid_type");
  }
  const model = body.model;
  if (model === undefined || model === null) return missing("model");
  if (typeof model !== "string") return wrongType("model", "a string", model);
  if (model.trim() === "") return badRequest("Invalid 'model': empty string.", "model", "invalid_value");
  if (model.length > MAX_MODEL_LENGTH) {
    return badRequest(`Invalid 'model': longer than ${MAX_MODEL_LENGTH} characters.`, "model", "invalid_value");
  }
  if (CONTROL.test(model)) {
    return badRequest("Invalid 'model': control characters (U+0000-U+001F, U+007F) are not allowed.", "model", "invalid_value");
  }
  const stream = body.stream;
  if (stream !== undefined && stream !== null && typeof stream !== "boolean") return wrongType("stream", "a boolean", stream);
  return { body, model, stream: stream === true };
}

/** The roles of OpenAI's chat and responses messages. */
const ROLES = new Set(["system", "developer", "user", "assistant", "tool", "function"]);

function checkContentParts(parts: unknown[], param: string): ApiError | null {
  for (const [j, part] of parts.entries()) {
    if (typeof part === "string") continue;
    if (!isObject(part)) return wrongType(`${param}[${j}]`, "an object", part);
    if (typeof part.type !== "string") return part.type === undefined ? missing(`${param}[${j}].type`) : wrongType(`${param}[${j}].type`, "a string", part.type);
  }
  return null;
}

function checkMessages(messages: unknown, param: string): ApiError | null {
  if (messages === undefined || messages === null) return missing(param);
  if (!Array.isArray(messages)) return wrongType(param, "an array of objects", messages);
  if (messages.length === 0 && param === "messages") return badRequest(`Invalid '${param}': empty array. Expected at least one message.`, param, "empty_array");
  for (const [i, m] of messages.entries()) {
    const at = `${param}[${i}]`;
    if (!isObject(m)) return wrongType(at, "an object", m);
    if (m.role !== undefined && typeof m.role !== "string") return wrongType(`${at}.role`, "a string", m.role);
    if (param === "messages" && m.role === undefined) return missing(`${at}.role`);
    // A responses input item is a message (role) or a typed item (function_call_output, ...).
    if (param === "input" && m.role === undefined && typeof m.type !== "string") return missing(`${at}.role`);
    if (typeof m.role === "string" && !ROLES.has(m.role)) {
      return badRequest(`Invalid value for '${at}.role': "${m.role.slice(0, 40)}". Supported values are: ${[...ROLES].join(", ")}.`, `${at}.role`, "invalid_value");
    }
    const c = m.content;
    if (c !== undefined && c !== null && typeof c !== "string" && !Array.isArray(c)) {
      return wrongType(`${at}.content`, "a string or an array of content parts", c);
    }
    if (Array.isArray(c)) {
      const bad = checkContentParts(c, `${at}.content`);
      if (bad) return bad;
    }
    // Only an assistant message may go without content (it carries tool calls instead).
    if (param === "messages" && (c === undefined || c === null) && m.role !== "assistant") return missing(`${at}.content`);
  }
  return null;
}

export function validateChat(raw: unknown): Validation {
  const common = checkCommon(raw);
  if ("status" in common) return { ok: false, error: common };
  const { body } = common;
  const bad = checkMessages(body.messages, "messages");
  if (bad) return { ok: false, error: bad };
  const so = body.stream_options;
  if (so !== undefined && so !== null) {
    if (!isObject(so)) return { ok: false, error: wrongType("stream_options", "an object", so) };
    if (so.include_usage !== undefined && typeof so.include_usage !== "boolean") {
      return { ok: false, error: wrongType("stream_options.include_usage", "a boolean", so.include_usage) };
    }
    if (!common.stream) {
      return { ok: false, error: badRequest("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options", "invalid_value") };
    }
  }
  const clientWantsUsage = isObject(so) && so.include_usage === true;
  return { ok: true, request: { kind: "chat", body, model: common.model, stream: common.stream, clientWantsUsage } };
}

export function validateResponses(raw: unknown): Validation {
  const common = checkCommon(raw);
  if ("status" in common) return { ok: false, error: common };
  const { body } = common;
  const input = body.input;
  if (input === undefined || input === null) {
    // Without input, a response continues from stored state upstream.
    if (body.previous_response_id == null && body.conversation == null && body.prompt == null) {
      return { ok: false, error: missing("input") };
    }
  } else if (typeof input !== "string") {
    const bad = checkMessages(input, "input");
    if (bad) return { ok: false, error: Array.isArray(input) ? bad : wrongType("input", "a string or an array", input) };
  }
  const instructions = body.instructions;
  if (instructions !== undefined && instructions !== null && typeof instructions !== "string") {
    return { ok: false, error: wrongType("instructions", "a string", instructions) };
  }
  return { ok: true, request: { kind: "responses", body, model: common.model, stream: common.stream, clientWantsUsage: true } };
}
