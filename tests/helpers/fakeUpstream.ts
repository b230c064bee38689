// An OpenAI-shaped HTTP server on loopback, so the gateway's real forwarding
// code runs in tests. What it does depends on the requested model:
//   fake-ok            answers at once (chat or responses shape) with usage
//   fake-delay-<ms>    answers after <ms>
//   fake-500 / fake-400 / fake-401   that status, an OpenAI-shaped error
//   fake-hang          never answers (the gateway's timeout fires)
//   fake-stream-hang   streams one chunk, then nothing
//   fake-slow          streams a chunk every 20 ms for 10 s (disconnect tests)
//   fake-usage-last    streams usage on the last content chunk only (no usage-only chunk)
//   fake-no-usage      streams without any usage
//   fake-huge-body     a 200 JSON answer of HUGE_TOTAL_BYTES (never a complete JSON document),
//                      written with backpressure until done or the gateway hangs up
//   fake-huge-event    a 200 event stream whose one event never ends (HUGE_TOTAL_BYTES of data)
//   fake-html          a 200 text/html answer with a script (streamed or not)
//   fake-no-type       a 200 JSON answer without a content type
// GET /v1/models lists fake-ok; GET /v1/models/<id> answers that model (fake-html: text/html,
// fake-huge-body: a huge JSON body); GET on anything else (the upstream's root) answers
// "upstream root", so a test can tell the gateway reached it.
// Streams follow `stream: true`; a chat stream adds the usage-only chunk when
// stream_options.include_usage is true. Every request is logged in `calls`.
import http from "node:http";
import type { AddressInfo } from "node:net";

import { sleep } from "./poll.js";

export interface FakeCall {
  path: string;
  headers: http.IncomingHttpHeaders;
  body: any;
  /** The gateway closed the connection before the answer ended. */
  aborted: boolean;
  ended: boolean;
  /** Bytes of body this fake wrote (or handed to the socket) for the answer. */
  bytesWritten: number;
}

export interface FakeUpstream {
  url: string;
  calls: FakeCall[];
  close(): Promise<void>;
}

export const FAKE_USAGE = { input: 11, output: 7 };
export const FAKE_TEXT = ["Hello", " from", " the", " fake", " upstream", "."];
/** What fake-huge-body and fake-huge-event would send in all, were they read to the end. */
export const HUGE_TOTAL_BYTES = 64 * 1024 * 1024;
const HUGE_PIECE = Buffer.alloc(64 * 1024, "x");

/** Writes `head`, then filler up to HUGE_TOTAL_BYTES with backpressure, stopping when the gateway hangs up. */
async function writeHuge(res: http.ServerResponse, call: FakeCall, head: string): Promise<void> {
  const write = async (data: string | Buffer) => {
    call.bytesWritten += Buffer.byteLength(data);
    if (!res.write(data)) await new Promise<void>((resolve) => {
      const done = () => {
        res.off("drain", done);
        res.off("close", done);
        resolve();
      };
      res.on("drain", done);
      res.on("close", done);
    });
  };
  await write(head);
  while (call.bytesWritten < HUGE_TOTAL_BYTES && !call.aborted && !res.destroyed) await write(HUGE_PIECE);
  if (!res.destroyed) res.end();
}

const HTML = "<!doctype html><html><body><script>alert(document.cookie)</script></body></html>";

function chatJson(model: string) {
  return {
    id: "chatcmpl-fake",
    object: "chat.completion",
    created: 1,
    model,
    choices: [{ index: 0, message: { role: "assistant", content: FAKE_TEXT.join("") }, finish_reason: "stop", logprobs: null }],
    usage: { prompt_tokens: FAKE_USAGE.input, completion_tokens: FAKE_USAGE.output, total_tokens: FAKE_USAGE.input + FAKE_USAGE.output },
  };
}

function responseJson(model: string, status = "completed") {
  return {
    id: "resp_fake",
    object: "response",
    created_at: 1,
    status,
    model,
    output: [{ type: "message", id: "msg_fake", status: "completed", role: "assistant", content: [{ type: "output_text", text: FAKE_TEXT.join(""), annotations: [] }] }],
    usage: { input_tokens: FAKE_USAGE.input, output_tokens: FAKE_USAGE.output, total_tokens: FAKE_USAGE.input + FAKE_USAGE.output },
  };
}

const chunk = (model: string, delta: object, finish: string | null = null, extra: object = {}) =>
  `data: ${JSON.stringify({ id: "chatcmpl-fake", object: "chat.completion.chunk", created: 1, model, choices: [{ index: 0, delta, finish_reason: finish }], ...extra })}\n\n`;

const usage = { prompt_tokens: FAKE_USAGE.input, completion_tokens: FAKE_USAGE.output, total_tokens: FAKE_USAGE.input + FAKE_USAGE.output };

async function streamChat(res: http.ServerResponse, call: FakeCall, model: string): Promise<void> {
  const includeUsage = call.body.stream_options?.include_usage === true;
  res.writeHead(200, { "content-type": "text/event-stream", "x-request-id": "up-123" });
  res.write(chunk(model, { role: "assistant", content: "" }));
  if (model === "fake-stream-hang") return; // never ends
  if (model === "fake-slow") {
    for (let i = 0; i < 500 && !call.aborted; i++) {
      res.write(chunk(model, { content: `w${i} ` }));
      await sleep(20);
    }
  } else {
    // Split one event across two writes, with CRLF line endings, to exercise the parser.
    res.write("data: " + JSON.stringify({ id: "x", object: "chat.completion.chunk", created: 1, model, choices: [{ index: 0, delta: { content: FAKE_TEXT[0] }, finish_reason: null }] }).slice(0, 20));
    await sleep(5);
    res.write(JSON.stringify({ id: "x", object: "chat.completion.chunk", created: 1, model, choices: [{ index: 0, delta: { content: FAKE_TEXT[0] }, finish_reason: null }] }).slice(20) + "\r\n\r\n");
    for (const piece of FAKE_TEXT.slice(1)) res.write(chunk(model, { content: piece }));
  }
  if (model === "fake-usage-last") {
    res.write(chunk(model, {}, "stop", { usage }));
  } else {
    res.write(chunk(model, {}, "stop"));
    if (includeUsage && model !== "fake-no-usage") {
      res.write(`data: ${JSON.stringify({ id: "chatcmpl-fake", object: "chat.completion.chunk", created: 1, model, choices: [], usage })}\n\n`);
    }
  }
  res.end("data: [DONE]\n\n");
}

function streamResponses(res: http.ServerResponse, model: string): void {
  res.writeHead(200, { "content-type": "text/event-stream" });
  const ev = (type: string, data: object) => res.write(`event: ${type}\ndata: ${JSON.stringify({ type, ...data })}\n\n`);
  ev("response.created", { response: { ...responseJson(model, "in_progress"), output: [], usage: null } });
  for (const delta of FAKE_TEXT) ev("response.output_text.delta", { item_id: "msg_fake", output_index: 0, content_index: 0, delta });
  ev("response.completed", { response: responseJson(model) });
  res.end();
}

export async function startFakeUpstream(): Promise<FakeUpstream> {
  const calls: FakeCall[] = [];
  const server = http.createServer(async (req, res) => {
    const chunks: Buffer[] = [];
    for await (const c of req) chunks.push(c as Buffer);
    const text = Buffer.concat(chunks).toString("utf8");
    const call: FakeCall = { path: req.url ?? "", headers: req.headers, body: text ? JSON.parse(text) : null, aborted: false, ended: false, bytesWritten: 0 };
    calls.push(call);
    res.on("close", () => {
      if (!res.writableFinished) call.aborted = true;
    });
    res.on("finish", () => (call.ended = true));

    if (req.method === "GET") {
      const json = { "content-type": "application/json" };
      if (req.url === "/v1/models") {
        return void res.writeHead(200, json).end(JSON.stringify({ object: "list", data: [{ id: "fake-ok", object: "model", created: 1, owned_by: "fake" }] }));
      }
      const one = /^\/v1\/models\/([^/?]+)$/.exec(req.url ?? "");
      if (!one) return void res.writeHead(200, json).end(JSON.stringify({ message: "upstream root" }));
      const id = decodeURIComponent(one[1]!);
      if (id === "fake-html") return void res.writeHead(200, { "content-type": "text/html" }).end(HTML);
      if (id === "fake-huge-body") {
        res.writeHead(200, json);
        return writeHuge(res, call, '{"id":"');
      }
      return void res.writeHead(200, json).end(JSON.stringify({ id, object: "model", created: 1, owned_by: "fake" }));
    }
    const model: string = call.body?.model ?? "";
    const kind = req.url === "/v1/responses" ? "responses" : req.url === "/v1/chat/completions" ? "chat" : null;
    if (!kind) return void res.writeHead(404).end();
    const error = (status: number, message: string) =>
      res.writeHead(status, { "content-type": "application/json" }).end(JSON.stringify({ error: { message, type: "fake_error", code: "fake" } }));

    if (model === "fake-500") return error(500, "the fake upstream broke");
    if (model === "fake-400") return error(400, "the fake upstream rejects this");
    if (model === "fake-401") return error(401, "bad upstream key");
    // Never answers (fake-hang, or fake-hang-<anything> to tell calls apart).
    if (model === "fake-hang" || model.startsWith("fake-hang-")) return;
    if (model === "fake-html") return void res.writeHead(200, { "content-type": "text/html; charset=utf-8" }).end(HTML);
    if (model === "fake-no-type") {
      const body = JSON.stringify(chatJson(model));
      return void res.writeHead(200, { "content-length": String(Buffer.byteLength(body)) }).end(body);
    }
    if (model === "fake-huge-body") {
      res.writeHead(200, { "content-type": "application/json" });
      return writeHuge(res, call, '{"id":"');
    }
    if (model === "fake-huge-event") {
      res.writeHead(200, { "content-type": "text/event-stream" });
      res.write(chunk(model, { role: "assistant", content: "" }));
      return writeHuge(res, call, 'data: {"filler":"');
    }
    const delay = /^fake-delay-(\d+)$/.exec(model);
    if (delay) await sleep(Number(delay[1]));
    if (call.body.stream) {
      return kind === "chat" ? streamChat(res, call, model) : streamResponses(res, model);
    }
    res.writeHead(200, { "content-type": "application/json", "x-request-id": "up-123" });
    res.end(JSON.stringify(kind === "chat" ? chatJson(model) : responseJson(model)));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}/v1`,
    calls,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
