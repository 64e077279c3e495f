// The deployment as shipped, for the bridge's tests: nats-server from `nats/server/single.conf`
// with the role users of `nats/accounts/claw.conf` (through a two-line wrapper that only moves
// the store into the test's directory), and claw-gateway, claw-worker and claw-archiver as
// processes connected as their roles with default settings, as compose.yaml runs them. The
// plugin then connects as the `openclaw` role.
import { spawn, type ChildProcess } from "node:child_process";
import { mkdirSync, openSync, readFileSync, writeFileSync } from "node:fs";
import { connect as tcpConnect } from "node:net";
import { join, relative } from "node:path";
import { freePort, root, waitFor } from "./harness.js";

const bins = process.env.CLAW_BIN_DIR ?? join(root, "target", "debug");
const natsServer = process.env.NATS_SERVER_BIN ?? join(root, ".tools", "nats-server", "bin", "nats-server");
const ROLES = ["gateway", "worker", "archiver", "publisher", "operator", "admin", "sys", "openclaw"];

export function password(role: string): string {
  return `test-${role}-password`;
}

function listening(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = tcpConnect(port, "127.0.0.1");
    socket.once("connect", () => (socket.destroy(), resolve(true)));
    socket.once("error", () => resolve(false));
  });
}

export class Shipped {
  readonly natsUrl: string;
  readonly httpUrl: string;
  readonly #dir: string;
  readonly #procs: ChildProcess[];

  private constructor(dir: string, natsUrl: string, httpUrl: string, procs: ChildProcess[]) {
    this.#dir = dir;
    this.natsUrl = natsUrl;
    this.httpUrl = httpUrl;
    this.#procs = procs;
  }

  static async start(dir: string): Promise<Shipped> {
    const node = join(dir, "nats");
    mkdirSync(node, { recursive: true });
    // nats-server resolves an include relative to the including file.
    const shipped = relative(node, join(root, "nats", "server", "single.conf"));
    writeFileSync(join(node, "server.conf"), `include "${shipped}"\njetstream { store_dir: "${join(node, "jetstream")}" }\n`);
    const passwords = Object.fromEntries(ROLES.map((r) => [`CLAW_${r.toUpperCase()}_PASSWORD`, password(r)]));
    const port = await freePort();
    const spawnLogged = (name: string, command: string, args: string[], env: NodeJS.ProcessEnv) => {
      const log = openSync(join(dir, `${name}.log`), "a");
      return spawn(command, args, { stdio: ["ignore", log, log], env });
    };
    const procs = [spawnLogged("nats-server", natsServer, ["-c", join(node, "server.conf"), "-a", "127.0.0.1", "-p", String(port), "-m", "-1"], { ...process.env, ...passwords })];
    await waitFor("nats-server", 20_000, () => listening(port));
    const natsUrl = `nats://127.0.0.1:${port}`;
    const role = (r: string) => ({
      ...process.env,
      RUST_LOG: "info",
      NATS_URL: natsUrl,
      NATS_USER: r,
      NATS_PASSWORD: password(r),
      NATS_INBOX_PREFIX: `_INBOX.${r}`,
    });
    // The gateway first: it provisions the topology, which the other roles may not create.
    const http = await freePort();
    procs.push(spawnLogged("gateway", join(bins, "claw-gateway"), ["--http", `127.0.0.1:${http}`], role("gateway")));
    const httpUrl = `http://127.0.0.1:${http}`;
    const system = new Shipped(dir, natsUrl, httpUrl, procs);
    await waitFor("the gateway to be ready", 60_000, async () => (await fetch(`${httpUrl}/readyz`).catch(() => undefined))?.ok);
    procs.push(spawnLogged("worker", join(bins, "claw-worker"), [], role("worker")));
    procs.push(spawnLogged("archiver", join(bins, "claw-archiver"), ["--db", join(dir, "archive.sqlite")], role("archiver")));
    return system;
  }

  /** The server log's permission violations: none may happen. */
  violations(): string[] {
    return readFileSync(join(this.#dir, "nats-server.log"), "utf8").split("\n").filter((l) => l.includes("Violation"));
  }

  async stop(): Promise<void> {
    for (const p of [...this.#procs].reverse()) {
      if (p.exitCode === null && p.signalCode === null) {
        p.kill("SIGTERM");
        await new Promise((r) => p.once("exit", r));
      }
    }
  }
}
