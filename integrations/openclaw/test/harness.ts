// The real parts of the plugin's end-to-end test: the task system as `claw up` runs it (the
// `claw` binary from `cargo build`, its embedded nats-server with its users, a worker
// configuration with the test's `slow-job` program), and an OpenClaw gateway from npm (`scripts/install-openclaw`),
// offline, on a mock model, with this plugin loaded from its directory. Both on free ports in a
// temporary directory; the OpenClaw gateway can be killed and started again on the same state.
import { spawn, execFile, type ChildProcess } from "node:child_process";
import { mkdirSync, openSync, readFileSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

export const pluginDir = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
export const root = resolve(pluginDir, "..", "..");
const claw = process.env.CLAW_BIN ?? join(root, "target", "debug", "claw");
const natsServer = process.env.NATS_SERVER_BIN ?? join(root, ".tools", "nats-server", "bin", "nats-server");
const openclawDir = process.env.OPENCLAW_DIR ?? join(root, ".tools", "openclaw");
const openclaw = join(openclawDir, "node_modules", "openclaw", "openclaw.mjs");

/** Polls `check` until it returns a value other than `undefined`/`false`, or fails after `ms`. */
export async function waitFor<T>(what: string, ms: number, check: () => Promise<T | undefined | false> | T | undefined | false, every = 100): Promise<T> {
  const deadline = Date.now() + ms;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      const value = await check();
      if (value !== undefined && value !== false) return value as T;
    } catch (e) {
      last = e;
    }
    await new Promise((r) => setTimeout(r, every));
  }
  throw new Error(`timed out after ${ms} ms waiting for ${what}${last ? `: ${String(last)}` : ""}`);
}

export async function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() => resolvePort(typeof address === "object" && address ? address.port : 0));
    });
  });
}

class Proc {
  readonly child: ChildProcess;
  readonly exited: Promise<void>;
  readonly log: string;
  constructor(name: string, command: string, args: string[], dir: string, env: NodeJS.ProcessEnv) {
    this.log = join(dir, `${name}.log`);
    const fd = openSync(this.log, "a");
    // Its own process group, so that a kill reaches the children it started too.
    this.child = spawn(command, args, { stdio: ["ignore", fd, fd], env, detached: true });
    this.exited = new Promise((r) => this.child.once("exit", () => r()));
  }
  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }
  async stop(signal: NodeJS.Signals = "SIGTERM"): Promise<void> {
    if (this.running) {
      try {
        process.kill(-this.child.pid!, signal);
      } catch {
        this.child.kill(signal);
      }
    }
    await this.exited;
  }
  text(): string {
    // Colours even when redirected: strip them before matching lines.
    return readFileSync(this.log, "utf8").replace(/\x1b\[[0-9;]*m/g, "");
  }
}

/** A user of `claw up`'s NATS, as the plugin's `nats` settings name its credentials. */
export interface NatsUser {
  user: string;
  password: string;
  inboxPrefix: string;
}

/** `claw up` with the test's worker configuration. */
export class ClawUp {
  readonly httpUrl: string;
  readonly natsUrl: string;
  readonly #data: string;
  readonly #proc: Proc;
  private constructor(httpUrl: string, natsUrl: string, data: string, proc: Proc) {
    this.httpUrl = httpUrl;
    this.natsUrl = natsUrl;
    this.#data = data;
    this.#proc = proc;
  }

  /** The credentials of `role` on the embedded server, from the context file `claw up`
   *  writes for it into its data directory (`nats/context/<role>.json`, the `nats` CLI's format). */
  natsUser(role: string): NatsUser {
    const context = JSON.parse(readFileSync(join(this.#data, "nats", "context", `${role}.json`), "utf8"));
    return { user: context.user, password: context.password, inboxPrefix: context.inbox_prefix };
  }
  static async start(dir: string): Promise<ClawUp> {
    const [http, nats] = [await freePort(), await freePort()];
    const data = join(dir, "claw");
    const workerConfig = join(dir, "worker.toml");
    writeFileSync(workerConfig, `[programs.slow-job]\npath = "${join(pluginDir, "test", "slow-job.sh")}"\n`);
    const proc = new Proc(
      "claw-up",
      claw,
      ["up", "--data", data, "--http", `127.0.0.1:${http}`, "--nats-port", String(nats), "--worker-config", workerConfig],
      dir,
      { ...process.env, RUST_LOG: "info", NATS_SERVER_BIN: natsServer, CLAW_NATS_SERVER: natsServer },
    );
    const up = new ClawUp(`http://127.0.0.1:${http}`, `nats://127.0.0.1:${nats}`, data, proc);
    await waitFor("claw up to be ready", 60_000, async () => {
      if (!proc.running) throw new Error(`claw up exited:\n${proc.text().slice(-2000)}`);
      return (await fetch(`${up.httpUrl}/readyz`).catch(() => undefined))?.ok;
    });
    return up;
  }
  stop(): Promise<void> {
    return this.#proc.stop();
  }
}

const TOKEN = "claw-e2e-token-0123456789abcdef";

/** An OpenClaw gateway, offline, on the mock model, with the plugin loaded from its directory. */
export class OpenClaw {
  readonly port: number;
  readonly #dir: string;
  readonly #env: NodeJS.ProcessEnv;
  #proc: Proc | undefined;
  #starts = 0;

  private constructor(dir: string, port: number, env: NodeJS.ProcessEnv) {
    this.#dir = dir;
    this.port = port;
    this.#env = env;
  }

  static async create(dir: string, modelUrl: string, pluginConfig: Record<string, unknown>): Promise<OpenClaw> {
    const port = await freePort();
    const state = join(dir, "openclaw");
    for (const d of ["state", "home", "logs"]) mkdirSync(join(state, d), { recursive: true });
    const config = {
      gateway: { mode: "local", port, bind: "loopback", auth: { mode: "token", token: TOKEN }, http: { endpoints: { chatCompletions: { enabled: true } } } },
      // With a loopback model OpenClaw turns on tool search, which hides plugin tools behind
      // tool_search/tool_call; the test's model calls claw_run directly.
      tools: { toolSearch: false },
      update: { checkOnStart: false },
      logging: { file: join(state, "logs", "openclaw.log") },
      discovery: { mdns: { mode: "off" } },
      models: {
        mode: "replace",
        providers: {
          mock: {
            baseUrl: modelUrl,
            apiKey: "sk-local",
            api: "openai-completions",
            models: [{ id: "mock-1", name: "Mock", reasoning: false, input: ["text"], cost: { input: 0, output: 0, cacheRead: 0, cacheWrite: 0 }, contextWindow: 200000, maxTokens: 4096 }],
          },
        },
      },
      agents: { defaults: { model: { primary: "mock/mock-1" }, skipBootstrap: true } },
      plugins: { load: { paths: [pluginDir] }, entries: { claw: { enabled: true, config: pluginConfig } } },
    };
    const configPath = join(state, "openclaw.json");
    writeFileSync(configPath, JSON.stringify(config, null, 2));
    const env = {
      ...process.env,
      OPENCLAW_HOME: join(state, "home"),
      OPENCLAW_STATE_DIR: join(state, "state"),
      OPENCLAW_CONFIG_PATH: configPath,
      OPENCLAW_NO_AUTO_UPDATE: "1",
      OPENCLAW_DISABLE_BONJOUR: "1",
      OPENCLAW_SKIP_CHANNELS: "1",
      OPENCLAW_OFFLINE: "1",
      OPENCLAW_GATEWAY_TOKEN: TOKEN,
      OPENCLAW_GATEWAY_URL: `ws://127.0.0.1:${port}`,
      CLAW_OPENCLAW_LOG: join(dir, "plugin.log"),
    };
    return new OpenClaw(dir, port, env);
  }

  /** Starts the gateway and waits for `[gateway] ready` (15-25 s on two shared cores). */
  async start(): Promise<void> {
    const proc = new Proc(`openclaw-${++this.#starts}`, process.execPath, [openclaw, "gateway", "run", "--port", String(this.port), "--bind", "loopback", "--auth", "token", "--token", TOKEN], this.#dir, this.#env);
    this.#proc = proc;
    await waitFor("the OpenClaw gateway to be ready", 120_000, () => {
      if (!proc.running) throw new Error(`openclaw exited:\n${proc.text().slice(-3000)}`);
      return /\[gateway\] ready\s*$/m.test(proc.text());
    }, 250);
  }

  /** Kills the gateway and every process it started, without letting it clean up. */
  async kill(): Promise<void> {
    await this.#proc?.stop("SIGKILL");
  }

  async stop(): Promise<void> {
    await this.#proc?.stop("SIGTERM");
  }

  log(): string {
    return this.#proc?.text() ?? "";
  }

  /** One turn through the OpenAI-compatible endpoint: waits for it and returns its final text. */
  async chat(sessionKey: string, message: string): Promise<string> {
    const res = await fetch(`http://127.0.0.1:${this.port}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: `Bearer ${TOKEN}`, "content-type": "application/json", "x-openclaw-session-key": sessionKey },
      body: JSON.stringify({ model: "openclaw", messages: [{ role: "user", content: message }] }),
    });
    const body = (await res.json()) as { choices?: { message?: { content?: string } }[] };
    if (!res.ok) throw new Error(`chat ${res.status}: ${JSON.stringify(body)}`);
    return body.choices?.[0]?.message?.content ?? "";
  }

  /** A gateway RPC through OpenClaw's own CLI (`openclaw gateway call`). */
  async call(method: string, params: unknown): Promise<any> {
    const { stdout } = await promisify(execFile)(process.execPath, [openclaw, "gateway", "call", method, "--params", JSON.stringify(params), "--json"], {
      env: this.#env,
      maxBuffer: 64 * 1024 * 1024,
    });
    return JSON.parse(stdout);
  }

  /**
   * One operator connection to the gateway's WebSocket, as the Control UI and the TUI hold: a
   * turn it starts with chat.send is its own, so the same connection may stop it.
   */
  async connect(): Promise<{ call(method: string, params: unknown): Promise<any>; close(): void }> {
    const ws = new WebSocket(`ws://127.0.0.1:${this.port}`);
    const waiting = new Map<string, { resolve(v: any): void; reject(e: Error): void }>();
    let n = 0;
    let challenged!: () => void;
    const challenge = new Promise<void>((r) => (challenged = r));
    ws.addEventListener("message", (m) => {
      const frame = JSON.parse(String(m.data));
      if (frame.type === "event" && frame.event === "connect.challenge") challenged();
      if (frame.type === "res") {
        const w = waiting.get(frame.id);
        waiting.delete(frame.id);
        if (frame.ok) w?.resolve(frame.payload);
        else w?.reject(new Error(`${JSON.stringify(frame.error)}`));
      }
    });
    const call = (method: string, params: unknown) =>
      new Promise<any>((resolve, reject) => {
        const id = `r${++n}`;
        waiting.set(id, { resolve, reject });
        ws.send(JSON.stringify({ type: "req", id, method, params }));
      });
    await new Promise<void>((resolve, reject) => {
      ws.addEventListener("open", () => resolve(), { once: true });
      ws.addEventListener("error", () => reject(new Error("websocket error")), { once: true });
    });
    await challenge;
    await call("connect", {
      minProtocol: 4,
      maxProtocol: 4,
      client: { id: "cli", version: "0.1.0", platform: "linux", mode: "cli" },
      role: "operator",
      scopes: ["operator.read", "operator.write"],
      auth: { token: TOKEN },
    });
    return { call, close: () => ws.close() };
  }

  /** The session's transcript: role and text of each message. */
  async history(sessionKey: string): Promise<{ role: string; text: string }[]> {
    const h = await this.call("chat.history", { sessionKey, limit: 500 });
    return (h.messages ?? []).map((m: { role: string; content: unknown }) => ({
      role: m.role,
      text: typeof m.content === "string" ? m.content : Array.isArray(m.content) ? m.content.map((p: { text?: string }) => p.text ?? "").join("") : "",
    }));
  }
}
