// The incremental SSE parser, the usage watcher and the echo model's tokens.
import test from "ava";

import { SseEventTooLarge, SseParser } from "../../server/chat/sse.js";
import { countTokens, splitTokens } from "../../server/chat/tokens.js";
import { StreamWatch } from "../../server/chat/usage.js";
import { uuidv7 } from "../../server/chat/requestId.js";

const bytes = (s: string) => new TextEncoder().encode(s);

test("events split anywhere (even inside a UTF-8 character or a CRLF) come out whole", (t) => {
  const text = 'data: {"a":"é"}\r\n\r\n: keep-alive\n\nevent: x\ndata: 1\ndata: 2\r\r';
  const all = bytes(text);
  for (let cut = 1; cut < all.length; cut++) {
    const p = new SseParser();
    const events = [...p.push(all.slice(0, cut)), ...p.push(all.slice(cut)), ...p.end()];
    t.deepEqual(
      events.map((e) => [e.event, e.data]),
      [[null, '{"a":"é"}'], [null, ""], ["x", "1\n2"]],
      `cut at ${cut}`,
    );
    t.is(events[0]!.raw, 'data: {"a":"é"}\n\n');
  }
});

test("events split into pieces of every size come out as from one piece", (t) => {
  const text = "\n\ndata: a\n\n\n\ndata: b\r\n\r\n\r\n: c\n\nevent: e\ndata: é1\n\ndata: 🙂\r\rdata: mixed\r\n\ndata: last";
  const all = bytes(text);
  const whole = new SseParser();
  const expected = [...whole.push(all), ...whole.end()];
  t.deepEqual(expected.map((e) => e.data), ["a", "b", "", "é1", "🙂", "mixed", "last"]);
  for (let size = 1; size <= 7; size++) {
    const p = new SseParser();
    const events = [];
    for (let at = 0; at < all.length; at += size) events.push(...p.push(all.slice(at, at + size)));
    events.push(...p.end());
    t.deepEqual(events, expected, `pieces of ${size}`);
  }
});

test("parsing is linear: 20 MB of one event in 1 KB chunks examines each character at most twice (searched, then joined)", (t) => {
  const p = new SseParser({ maxEventBytes: 64 * 1024 * 1024 });
  const piece = bytes("x".repeat(1024));
  const head = bytes("data: ");
  let fed = 0;
  const feed = (b: Uint8Array) => {
    fed += b.length;
    const events = p.push(b);
    // Checked as it goes: one chunk's work is bounded by that chunk, not by what is held.
    if (!(p.scanned <= 2 * fed + 2 * p.pushes)) throw new Error(`scanned ${p.scanned} characters for ${fed} bytes`);
    return events;
  };
  t.deepEqual(feed(head), []);
  for (let i = 0; i < 20 * 1024; i++) if (feed(piece).length !== 0) throw new Error("no event is complete yet");
  const events = [...feed(bytes("\n\ndata: next\n\n")), ...p.end()];
  t.is(events.length, 2);
  t.is(events[0]!.data.length, 20 * 1024 * 1024);
  t.is(events[1]!.data, "next");
  t.true(p.scanned <= 2 * fed + 2 * p.pushes, `scanned ${p.scanned} for ${fed}`);
});

test("one event larger than maxEventBytes throws as soon as it is, holding no more", (t) => {
  const p = new SseParser({ maxEventBytes: 100 });
  t.deepEqual(p.push(bytes("data: ok\n\n")).map((e) => e.data), ["ok"]);
  t.deepEqual(p.push(bytes("data: " + "y".repeat(90))), []);
  const err = t.throws(() => p.push(bytes("z".repeat(10))), { instanceOf: SseEventTooLarge });
  t.is(err.maxBytes, 100);
  // An event over the cap that arrives whole, in one chunk, is refused too.
  const q = new SseParser({ maxEventBytes: 100 });
  t.throws(() => q.push(bytes("data: " + "é".repeat(60) + "\n\n")), { instanceOf: SseEventTooLarge });
  // Events completed before the oversized one in the same chunk come out first; then it throws.
  const o = new SseParser({ maxEventBytes: 100 });
  t.deepEqual(o.push(bytes("data: a\n\ndata: b\n\ndata: " + "y".repeat(200))).map((e) => e.data), ["a", "b"]);
  t.throws(() => o.end(), { instanceOf: SseEventTooLarge });
  const o2 = new SseParser({ maxEventBytes: 100 });
  o2.push(bytes("data: a\n\ndata: " + "y".repeat(200) + "\n\n"));
  t.throws(() => o2.push(bytes("data: c\n\n")), { instanceOf: SseEventTooLarge });
  // Exactly at the cap: fine (the event's text, without its blank line).
  const r = new SseParser({ maxEventBytes: 100 });
  t.is(r.push(bytes("data: " + "w".repeat(94) + "\n\n"))[0]!.data.length, 94);
});

test("an unterminated last event is returned at the end", (t) => {
  const p = new SseParser();
  t.deepEqual(p.push(bytes("data: [DONE]")), []);
  t.deepEqual(p.end().map((e) => e.data), ["[DONE]"]);
});

test("chat streams: the usage-only chunk is dropped unless the client asked; usage and errors are noted", (t) => {
  const usageChunk = { raw: "", event: null, data: JSON.stringify({ choices: [], usage: { prompt_tokens: 3, completion_tokens: 2 } }) };
  const hidden = new StreamWatch("chat", false);
  t.false(hidden.see(usageChunk));
  t.deepEqual(hidden.usage, { inputTokens: 3, outputTokens: 2 });
  t.true(new StreamWatch("chat", true).see(usageChunk));
  const w = new StreamWatch("chat", false);
  w.see({ raw: "", event: null, data: JSON.stringify({ error: { message: "overloaded" } }) });
  t.is(w.error, "overloaded");
  w.see({ raw: "", event: null, data: "[DONE]" });
  t.true(w.finished);
});

test("responses streams: usage from response.completed, failure from response.failed", (t) => {
  const w = new StreamWatch("responses", true);
  w.see({ raw: "", event: "response.completed", data: JSON.stringify({ type: "response.completed", response: { usage: { input_tokens: 5, output_tokens: 9 } } }) });
  t.deepEqual(w.usage, { inputTokens: 5, outputTokens: 9 });
  const f = new StreamWatch("responses", true);
  f.see({ raw: "", event: null, data: JSON.stringify({ type: "response.failed", response: { error: { message: "nope" } } }) });
  t.is(f.error, "nope");
});

test("bad token counts are not recorded (NULL rather than a rejected row)", (t) => {
  const w = new StreamWatch("chat", true);
  w.see({ raw: "", event: null, data: JSON.stringify({ choices: [], usage: { prompt_tokens: -1, completion_tokens: 1.5 } }) });
  t.deepEqual(w.usage, { inputTokens: null, outputTokens: null });
});

test("echo tokens: words and single punctuation marks; pieces rejoin to the text, one token each", (t) => {
  t.is(countTokens("Hello, world!"), 4);
  t.is(countTokens("  "), 0);
  t.is(countTokens("naïve café 42"), 3);
  for (const text of ["Hello, world!", "  leading and trailing  ", "a", "", "x\n\ny", "emoji 🙂 ok"]) {
    const pieces = splitTokens(text);
    t.is(pieces.join(""), text);
    if (countTokens(text) > 0) {
      t.is(pieces.length, countTokens(text));
      t.true(pieces.every((p) => countTokens(p) === 1));
    }
  }
});

test("request ids are UUIDv7 carrying the arrival time", (t) => {
  const at = new Date("2026-01-12T10:00:00.123Z");
  const id = uuidv7(at);
  t.regex(id, /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  t.is(parseInt(id.replace(/-/g, "").slice(0, 12), 16), at.getTime());
  t.not(uuidv7(at), id);
});
