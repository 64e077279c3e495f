// The real system for the client's tests: a nats-server (the pinned one, `scripts/install-
// nats-server`) and `claw-gateway`, `claw-worker` and `claw-archiver` (`cargo build --bins`) as processes, on free
// ports in a temporary directory. The gateway can be restarted alone, on the same port.
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, openSync, rmSync, writeFileSync } from "node:fs";
import { connect as tcpConnect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..", "..");
const bins = process.env.CLAW_BIN_DIR ?? join(root, "target", "debug");
const natsServer = process.env.NATS_SERVER_BIN ?? join(root, ".tools", "nats-server", "bin", "nats-server");

/** Polls `check` until it returns a value other than `undefined`/`false`, or fails after `ms`. */
export async function waitFor<T>(what: string, ms: number, check: () => Promise<T | undefined | false> | T | undefined | false): Promise<T> {
  const deadline = Date.now() + ms;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      const value = await check();
      if (value !== undefined && value !== false) return value as T;
    } catch (e) {
      last = e;
    }
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`timed out after ${ms} ms waiting for ${what}${last ? `: ${String(last)}` : ""}`);
}

async function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() => resolvePort(typeof address === "object" && address ? address.port : 0));
    });
  });
}

/** Whether something accepts connections on the port. */
function listening(port: number): Promise<boolean> {
  return new Promise((resolveOpen) => {
    const socket = tcpConnect(port, "127.0.0.1");
    socket.once("connect", () => (socket.destroy(), resolveOpen(true)));
    socket.once("error", () => resolveOpen(false));
  });
}

class Proc {
  readonly child: ChildProcess;
  readonly exited: Promise<void>;
  constructor(name: string, command: string, args: string[], dir: string, env: Record<string, string> = {}) {
    const log = openSync(join(dir, `${name}.log`), "a");
    this.child = spawn(command, args, { stdio: ["ignore", log, log], env: { ...process.env, RUST_LOG: "info", ...env } });
    this.exited = new Promise((r) => this.child.once("exit", () => r()));
  }
  async stop(signal: NodeJS.Signals = "SIGTERM"): Promise<void> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill(signal);
    await this.exited;
  }
}

export class System {
  readonly dir: string;
  readonly natsUrl: string;
  readonly httpUrl: string;
  readonly #httpAddr: string;
  #nats: Proc;
  readonly #natsPort: number;
  #gateway: Proc;
  readonly #worker: Proc;
  readonly #archiver: Proc;

  private constructor(dir: string, natsUrl: string, httpAddr: string, nats: Proc, gateway: Proc, worker: Proc, archiver: Proc) {
    this.dir = dir;
    this.#natsPort = Number(new URL(natsUrl.replace("nats://", "http://")).port);
    this.natsUrl = natsUrl;
    this.#httpAddr = httpAddr;
    this.httpUrl = `http://${httpAddr}`;
    this.#nats = nats;
    this.#gateway = gateway;
    this.#worker = worker;
    this.#archiver = archiver;
  }

  /** Starts the system; with `tokens` (a tokens file's TOML) the gateway has API tokens. */
  static async start(options: { tokens?: string } = {}): Promise<System> {
    const dir = mkdtempSync(join(tmpdir(), "claw-ts-"));
    if (options.tokens !== undefined) writeFileSync(join(dir, "tokens.toml"), options.tokens);
    const [natsPort, httpPort] = [await freePort(), await freePort()];
    const natsUrl = `nats://127.0.0.1:${natsPort}`;
    const nats = System.#startNats(dir, natsPort);
    await waitFor("nats-server to listen", 30_000, () => listening(natsPort));
    const httpAddr = `127.0.0.1:${httpPort}`;
    const gateway = System.#startGateway(dir, natsUrl, httpAddr);
    const config = join(dir, "worker.toml");
    // A 5 s ack deadline (30 s as shipped; the Rust suite's shipped.rs runs that), so that tasks
    // a nats-server restart cut off come back within the test.
    writeFileSync(config, 'name = "ts-client-worker"\nack_deadline_s = 5.0\n');
    const worker = new Proc("worker", join(bins, "claw-worker"), ["--config", config, "--nats-url", natsUrl], dir);
    const archiver = new Proc("archiver", join(bins, "claw-archiver"), ["--db", join(dir, "archive.sqlite"), "--nats-url", natsUrl], dir);
    const system = new System(dir, natsUrl, httpAddr, nats, gateway, worker, archiver);
    await system.ready();
    return system;
  }

  static #startNats(dir: string, port: number): Proc {
    return new Proc("nats-server", natsServer, ["-a", "127.0.0.1", "-p", String(port), "-js", "-sd", join(dir, "js")], dir);
  }

  /** SIGKILLs nats-server and starts it again on the same port and store; every client reconnects. */
  async restartNats(): Promise<void> {
    await this.#nats.stop("SIGKILL");
    this.#nats = System.#startNats(this.dir, this.#natsPort);
    await waitFor("nats-server to listen again", 30_000, () => listening(this.#natsPort));
    await this.ready();
  }

  static #startGateway(dir: string, natsUrl: string, httpAddr: string): Proc {
    const tokens = join(dir, "tokens.toml");
    const auth = existsSync(tokens) ? ["--tokens", tokens] : [];
    return new Proc("gateway", join(bins, "claw-gateway"), ["--http", httpAddr, "--nats-url", natsUrl, ...auth], dir);
  }

  /** Waits until the gateway answers `/readyz`. */
  async ready(): Promise<void> {
    await waitFor("the gateway to be ready", 60_000, async () => (await fetch(`${this.httpUrl}/readyz`)).ok);
  }

  /** Stops the gateway (SIGTERM: sockets close with 1012; SIGKILL: they just drop), starts it again. */
  async restartGateway(signal: NodeJS.Signals): Promise<void> {
    await this.#gateway.stop(signal);
    this.#gateway = System.#startGateway(this.dir, this.natsUrl, this.#httpAddr);
    await this.ready();
  }

  async stop(): Promise<void> {
    await Promise.all([this.#gateway.stop(), this.#worker.stop(), this.#archiver.stop()]);
    await this.#nats.stop();
    if (!process.env.CLAW_KEEP_TEST_DIR) rmSync(this.dir, { recursive: true, force: true });
  }
}
