// An OpenAI-compatible model server for the end-to-end test (OpenClaw only ever sends it
// streaming `POST /v1/chat/completions`). Its script:
//
// - a user message `RUN <seconds>` → a `claw_run` tool call for the `slow-job` program;
// - a tool result after the last user message → `started: <the tool's answer>`;
// - `THINK <seconds>` → that long before answering (a turn still running, to be aborted);
// - `CANCEL` → a `claw_cancel` tool call (all of the session's tasks);
// - a user message carrying a delivery (`[claw-task <id>] ...`) → `DELIVERED <id> <status>`;
// - anything else → `reply to: <text>`, and `progress seen: <id> <NN%>` for each progress note
//   of the plugin it finds in the request (how the test sees progress reach the session).
//
// Every request is kept, with its arrival time, for the test's assertions.
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";

interface Message {
  role: string;
  content?: unknown;
}
interface Body {
  messages?: Message[];
  model?: string;
  stream?: boolean;
  stream_options?: { include_usage?: boolean };
}
type Decision = { kind: "text"; text: string; delayMs?: number } | { kind: "tool"; name: string; args: unknown };

export interface Seen {
  at: number;
  /** The last user message of the request (OpenClaw's own context messages skipped). */
  user: string;
  /** The tool result that followed it, if any. */
  tool: string | undefined;
  all: string;
  /** Role and text of each message. */
  messages: { role: string; text: string }[];
  decision: Decision;
}

function textOf(content: unknown): string {
  if (typeof content === "string") return content;
  if (Array.isArray(content)) return content.map((p) => (typeof p === "string" ? p : (p?.text ?? ""))).join("");
  return "";
}

const INTERNAL = "<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>";

function decide(body: Body): Omit<Seen, "at"> {
  const messages = body.messages ?? [];
  const all = messages.map((m) => textOf(m.content)).join("\n");
  let last = -1;
  messages.forEach((m, i) => {
    if (m.role === "user" && !textOf(m.content).includes(INTERNAL)) last = i;
  });
  const user = last >= 0 ? textOf(messages[last]!.content) : "";
  const tools = messages.slice(last + 1).filter((m) => m.role === "tool");
  const tool = tools.length > 0 ? textOf(tools[tools.length - 1]!.content) : undefined;
  let decision: Decision;
  const delivered = /\[claw-task ([0-9a-f-]+)\] .* has (\w+)\./.exec(user);
  const run = /\bRUN (\d+)\b/.exec(user);
  const think = /\bTHINK (\d+)\b/.exec(user);
  if (tool !== undefined) {
    decision = { kind: "text", text: `started: ${tool}` };
  } else if (delivered) {
    decision = { kind: "text", text: `DELIVERED ${delivered[1]} ${delivered[2]}` };
  } else if (think) {
    decision = { kind: "text", text: `thought for ${think[1]} s`, delayMs: Number(think[1]) * 1000 };
  } else if (/\bCANCEL\b/.test(user)) {
    decision = { kind: "tool", name: "claw_cancel", args: {} };
  } else if (run) {
    decision = {
      kind: "tool",
      name: "claw_run",
      args: { kind: "exec", input: { program: "slow-job", args: [run[1]] }, label: "slow job", class: "long" },
    };
  } else {
    const progress = [...all.matchAll(/Background task ([0-9a-f-]+) .*? is running at (\d+%)/g)].map((m) => `${m[1]} ${m[2]}`);
    const text = user.replace(/^\[[^\]]*\]\s*/, "").split("\n")[0];
    decision = { kind: "text", text: `reply to: ${text}${progress.length ? ` | progress seen: ${progress.join(", ")}` : ""}` };
  }
  return { user, tool, all, messages: messages.map((m) => ({ role: m.role, text: textOf(m.content) })), decision };
}

async function send(res: ServerResponse, body: Body, d: Decision, n: number): Promise<void> {
  const id = `chatcmpl-mock-${n}`;
  const created = Math.floor(Date.now() / 1000);
  const model = body.model ?? "mock-1";
  const usage = { prompt_tokens: 10, completion_tokens: 5, total_tokens: 15 };
  res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
  const chunk = (delta: unknown, finish: string | null = null) =>
    res.write(`data: ${JSON.stringify({ id, object: "chat.completion.chunk", created, model, choices: [{ index: 0, delta, finish_reason: finish }] })}\n\n`);
  chunk({ role: "assistant", content: "" });
  if (d.kind === "text" && d.delayMs) {
    // Thinking: the turn runs until the delay is over or OpenClaw hangs up (an abort).
    await new Promise<void>((r) => {
      const timer = setTimeout(r, d.delayMs);
      res.once("close", () => (clearTimeout(timer), r()));
    });
    if (res.destroyed) return;
  }
  if (d.kind === "text") {
    chunk({ content: d.text });
    chunk({}, "stop");
  } else {
    chunk({ tool_calls: [{ index: 0, id: `call_mock_${n}`, type: "function", function: { name: d.name, arguments: "" } }] });
    chunk({ tool_calls: [{ index: 0, function: { arguments: JSON.stringify(d.args) } }] });
    chunk({}, "tool_calls");
  }
  if (body.stream_options?.include_usage) {
    res.write(`data: ${JSON.stringify({ id, object: "chat.completion.chunk", created, model, choices: [], usage })}\n\n`);
  }
  res.end("data: [DONE]\n\n");
}

export class MockLlm {
  readonly seen: Seen[] = [];
  readonly #server: Server;
  #n = 0;

  private constructor(server: Server) {
    this.#server = server;
  }

  static async start(): Promise<MockLlm & { url: string }> {
    let mock!: MockLlm;
    const server = createServer((req: IncomingMessage, res: ServerResponse) => {
      let raw = "";
      req.on("data", (c) => (raw += c));
      req.on("end", () => {
        if (req.method !== "POST" || !req.url?.startsWith("/v1/chat/completions")) {
          res.writeHead(404, { "content-type": "application/json" });
          return res.end(JSON.stringify({ error: { message: `no route ${req.method} ${req.url}` } }));
        }
        const body = JSON.parse(raw || "{}") as Body;
        const seen = { at: Date.now(), ...decide(body) };
        mock.seen.push(seen);
        void send(res, body, seen.decision, ++mock.#n);
      });
    });
    mock = new MockLlm(server);
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
    const address = server.address();
    const port = typeof address === "object" && address ? address.port : 0;
    return Object.assign(mock, { url: `http://127.0.0.1:${port}/v1` });
  }

  close(): Promise<void> {
    this.#server.closeAllConnections();
    return new Promise((r) => this.#server.close(() => r()));
  }
}
