// Minimal OpenAI-compatible mock LLM server (no deps).
// Usage: node mock-llm.mjs [port]   (default 18555)
// Env: MOCK_LOG=/path/requests.jsonl  (default ./state/mock-requests.jsonl next to this file)
//
// Behaviour (per request):
//   - If the last message has role "tool"  -> text reply "tool said: <tool content>"
//   - Else if a tool named claw_echo is offered and the last user message contains "echo"
//       -> tool_call claw_echo({"text": "<user text>"})
//   - Else -> text "hello from mock" (+ " [saw: <marker>]" if an INJECT marker is in the prompt)
// Supports stream:true (SSE chat.completion.chunk) and stream:false.
import http from "node:http";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const port = Number(process.argv[2] || process.env.MOCK_PORT || 18555);
const logFile = process.env.MOCK_LOG || path.join(here, "state", "mock-requests.jsonl");
fs.mkdirSync(path.dirname(logFile), { recursive: true });
let counter = 0;

function textOf(content) {
  if (typeof content === "string") return content;
  if (Array.isArray(content)) return content.map((p) => (typeof p === "string" ? p : p?.text ?? "")).join("");
  return "";
}

function decide(body) {
  const msgs = Array.isArray(body.messages) ? body.messages : [];
  const all = msgs.map((m) => textOf(m.content)).join("\n");
  const marker = (all.match(/INJECT-[A-Za-z0-9_-]+/g) || []);
  const markerNote = marker.length ? ` [saw: ${[...new Set(marker)].join(",")}]` : "";
  // OpenClaw appends an internal-context user message after the real user message; skip those.
  const isInternal = (m) => textOf(m.content).includes("<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>");
  let lastUserIdx = -1;
  msgs.forEach((m, i) => { if (m.role === "user" && !isInternal(m)) lastUserIdx = i; });
  const lastUserText = lastUserIdx >= 0 ? textOf(msgs[lastUserIdx].content) : "";
  const toolMsgs = msgs.slice(lastUserIdx + 1).filter((m) => m.role === "tool");
  if (toolMsgs.length) {
    return { kind: "text", text: `tool said: ${textOf(toolMsgs[toolMsgs.length - 1].content)}${markerNote}` };
  }
  const tools = Array.isArray(body.tools) ? body.tools : [];
  const names = tools.map((t) => t.function?.name ?? t.name);
  // first line of the user text only (OpenClaw appends "Runtime: ..." lines)
  const userLine = lastUserText.replace(/^\[[^\]]*\]\s*/, "").split("\n")[0];
  if (/\becho\b/i.test(userLine)) {
    if (names.includes("claw_echo")) return { kind: "tool", name: "claw_echo", args: { text: userLine } };
    if (names.includes("tool_call")) return { kind: "tool", name: "tool_call", args: { id: "claw_echo", args: { text: userLine } } };
  }
  return { kind: "text", text: `hello from mock${markerNote}` };
}

function send(res, body, d) {
  const id = `chatcmpl-mock-${++counter}`;
  const created = Math.floor(Date.now() / 1000);
  const model = body.model || "mock-1";
  const usage = { prompt_tokens: 10, completion_tokens: 5, total_tokens: 15 };
  const toolCallId = `call_mock_${counter}`;
  if (!body.stream) {
    const message = d.kind === "text"
      ? { role: "assistant", content: d.text }
      : { role: "assistant", content: null, tool_calls: [{ id: toolCallId, type: "function", function: { name: d.name, arguments: JSON.stringify(d.args) } }] };
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify({ id, object: "chat.completion", created, model,
      choices: [{ index: 0, message, finish_reason: d.kind === "text" ? "stop" : "tool_calls" }], usage }));
    return;
  }
  res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache", connection: "keep-alive" });
  const chunk = (delta, finish_reason = null, extra = {}) =>
    res.write(`data: ${JSON.stringify({ id, object: "chat.completion.chunk", created, model,
      choices: [{ index: 0, delta, finish_reason }], ...extra })}\n\n`);
  chunk({ role: "assistant", content: "" });
  if (d.kind === "text") {
    chunk({ content: d.text });
    chunk({}, "stop");
  } else {
    chunk({ tool_calls: [{ index: 0, id: toolCallId, type: "function", function: { name: d.name, arguments: "" } }] });
    chunk({ tool_calls: [{ index: 0, function: { arguments: JSON.stringify(d.args) } }] });
    chunk({}, "tool_calls");
  }
  if (body.stream_options?.include_usage) {
    res.write(`data: ${JSON.stringify({ id, object: "chat.completion.chunk", created, model, choices: [], usage })}\n\n`);
  }
  res.write("data: [DONE]\n\n");
  res.end();
}

const server = http.createServer((req, res) => {
  let raw = "";
  req.on("data", (c) => (raw += c));
  req.on("end", () => {
    const entry = { t: new Date().toISOString(), method: req.method, url: req.url, headers: req.headers };
    let body = {};
    try { body = raw ? JSON.parse(raw) : {}; } catch { entry.rawBody = raw.slice(0, 2000); }
    entry.body = body;
    if (req.method === "GET" && req.url.startsWith("/v1/models")) {
      fs.appendFileSync(logFile, JSON.stringify(entry) + "\n");
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify({ object: "list", data: [{ id: "mock-1", object: "model", created: 0, owned_by: "mock" }] }));
      return;
    }
    if (req.method === "POST" && req.url.startsWith("/v1/chat/completions")) {
      const d = decide(body);
      entry.decision = d;
      fs.appendFileSync(logFile, JSON.stringify(entry) + "\n");
      send(res, body, d);
      return;
    }
    fs.appendFileSync(logFile, JSON.stringify(entry) + "\n");
    res.writeHead(404, { "content-type": "application/json" });
    res.end(JSON.stringify({ error: { message: `mock: no route ${req.method} ${req.url}` } }));
  });
});
server.listen(port, "127.0.0.1", () => console.log(`mock-llm listening on http://127.0.0.1:${port} log=${logFile}`));
