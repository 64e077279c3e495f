// The bridge between OpenClaw sessions and the task system, without OpenClaw in it: what the
// tools do (`run`, `status`, `cancel`), and the service that follows every unfinished task of
// the outbox and brings its end to the session that asked. OpenClaw is behind `Host`
// (`index.ts` implements it with the plugin API), so the same code runs under a test host.
import { randomUUID } from "node:crypto";
import { Claw, ClawError, isTerminal, type TaskRecord, type TaskSpec } from "@openclaw-claw/client";
import { Kvm, type KV } from "@nats-io/kv";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import type { Config } from "./config.js";
import { Outbox, SETTLED_RETENTION_MS, sessionOf, type Entry, type Versioned } from "./outbox.js";
import { deliveryMarker, deliveryText, progressText } from "./text.js";

export interface Address {
  sessionKey: string;
  agentId: string;
}

/** What the bridge needs from OpenClaw. */
export interface Host {
  /** Starts a turn in the session with `text` as its message. */
  deliver(to: Address, text: string, idempotencyKey: string): Promise<void>;
  /** Whether the session's recent transcript holds a message containing `marker`. */
  transcriptHas(to: Address, marker: string): Promise<boolean>;
  /** Tells the session's agent something it sees on its next turn, replacing the last with this key. */
  notify(to: Address, text: string, contextKey: string): void;
  log(level: "info" | "warn", message: string): void;
}

export interface RunRequest {
  kind?: string | undefined;
  input?: unknown;
  label?: string | undefined;
  class?: "short" | "long" | undefined;
  priority?: "high" | "normal" | "low" | undefined;
  timeout_s?: number | undefined;
}

/** How long an outbox entry may wait for its task's record before it counts as never submitted. */
const SUBMIT_GRACE_MS = 120_000;

/** A refusal the agent should read and act on (the tool answers it as an error result). */
export class ToolError extends Error {}

export class Bridge {
  readonly config: Config;
  readonly claw: Claw;
  readonly outbox: Outbox;
  readonly #nc: NatsConnection;
  readonly #tasks: KV;
  readonly #host: Host;
  /** Who this process is in `claimed_by`. */
  readonly #me = `${process.pid}-${randomUUID().slice(0, 8)}`;
  /** Tasks followed by this process, by outbox key. */
  readonly #following = new Map<string, AbortController>();
  readonly #stop = new AbortController();
  #served: Promise<void> | undefined;

  private constructor(config: Config, nc: NatsConnection, claw: Claw, outbox: Outbox, tasks: KV, host: Host) {
    this.config = config;
    this.#nc = nc;
    this.claw = claw;
    this.outbox = outbox;
    this.#tasks = tasks;
    this.#host = host;
  }

  static async connect(config: Config, host: Host): Promise<Bridge> {
    const nc = await connect({
      name: "openclaw-claw-plugin",
      servers: config.nats.servers,
      pingInterval: 5_000,
      maxPingOut: 2,
      maxReconnectAttempts: -1,
      reconnectTimeWait: 500,
      ...(config.nats.user ? { user: config.nats.user } : {}),
      ...(config.nats.password ? { pass: config.nats.password } : {}),
      ...(config.nats.token ? { token: config.nats.token } : {}),
      ...(config.nats.inboxPrefix ? { inboxPrefix: config.nats.inboxPrefix } : {}),
    });
    try {
      const claw = config.gateway
        ? await Claw.connect({ http: { url: config.gateway.url, token: config.gateway.token } })
        : await Claw.connect({ nats: { nc } });
      const outbox = await Outbox.open(nc, config.bucket);
      const tasks = await new Kvm(nc).open("tasks");
      return new Bridge(config, nc, claw, outbox, tasks, host);
    } catch (e) {
      await nc.close();
      throw e;
    }
  }

  // ---- the tools -------------------------------------------------------------------------

  /** Submits a task for the session and records where its result goes; returns at once. */
  async run(from: Address, request: RunRequest): Promise<TaskRecord> {
    const kind = request.kind ?? this.config.defaultKind;
    if (this.config.kinds && !this.config.kinds.includes(kind)) {
      throw new ToolError(`kind ${kind} is not allowed here; allowed: ${this.config.kinds.join(", ")}`);
    }
    const session = sessionOf(from.agentId, from.sessionKey);
    const open = (await this.outbox.ofSession(session)).filter((v) => v.entry.state === "pending");
    if (open.length >= this.config.maxPerSession) {
      throw new ToolError(
        `this session already has ${open.length} unfinished tasks (at most ${this.config.maxPerSession}): ` +
          `${open.map((v) => v.entry.task).join(", ")}. Wait for one to finish or cancel one with claw_cancel.`,
      );
    }
    const id = randomUUID();
    const entry: Entry = {
      v: 1,
      task: id,
      session,
      session_key: from.sessionKey,
      agent_id: from.agentId,
      kind,
      label: request.label ?? null,
      state: "pending",
      created_at: new Date().toISOString(),
    };
    // The outbox first: a task whose entry is missing would finish with nobody to tell. An
    // entry whose submit never happened is removed by `follow` when the task is not found.
    const added = await this.outbox.add(entry);
    const spec: TaskSpec = { id, kind, input: (request.input ?? null) as TaskSpec["input"], session };
    if (request.class) spec.class = request.class;
    if (request.priority) spec.priority = request.priority;
    if (request.timeout_s !== undefined) spec.timeout_s = request.timeout_s;
    try {
      // The explicit id makes a repeat (after a lost reply) return the same task.
      const { record } = await this.claw.submit(spec);
      return record;
    } catch (e) {
      await this.outbox.remove(added.key).catch(() => undefined);
      if (e instanceof ClawError && !e.retryable) {
        throw new ToolError(`the task system refused it (${e.code}${e.field ? `, field ${e.field}` : ""}): ${e.message}`);
      }
      throw e;
    }
  }

  /** The session's tasks (newest first), or one of them. */
  async status(from: Address, id?: string): Promise<{ entry: Entry; record: TaskRecord | undefined }[]> {
    const session = sessionOf(from.agentId, from.sessionKey);
    let entries = (await this.outbox.ofSession(session)).map((v) => v.entry);
    if (id !== undefined) {
      entries = entries.filter((e) => e.task === id);
      if (entries.length === 0) throw new ToolError(`no task ${id} in this session`);
    }
    entries.sort((a, b) => b.created_at.localeCompare(a.created_at));
    return Promise.all(
      entries.map(async (entry) => ({ entry, record: await this.claw.get(entry.task).catch(() => undefined) })),
    );
  }

  /**
   * Cancels the session's unfinished tasks (or the one given) with `cause: user`. Their ends are
   * not delivered as messages: the session asked for it.
   */
  async cancel(from: Address, id?: string, why = "cancelled from the session"): Promise<TaskRecord[]> {
    const session = sessionOf(from.agentId, from.sessionKey);
    let open = (await this.outbox.ofSession(session)).filter((v) => v.entry.state === "pending");
    if (id !== undefined) {
      open = open.filter((v) => v.entry.task === id);
      if (open.length === 0) throw new ToolError(`no unfinished task ${id} in this session`);
    }
    const cancelled: TaskRecord[] = [];
    for (const v of open) {
      const dropped = await this.outbox.change(v, { ...v.entry, state: "dropped", done_at: new Date().toISOString(), outcome: why });
      if (!dropped) continue; // delivered or dropped meanwhile
      try {
        cancelled.push(await this.claw.cancel(v.entry.task));
      } catch (e) {
        // Already finished (409): nothing to stop. Anything else: say so, the entry stays dropped.
        if (!(e instanceof ClawError && e.code === "conflict")) this.#host.log("warn", `cancelling ${v.entry.task}: ${String(e)}`);
      }
    }
    return cancelled;
  }

  // ---- the service ------------------------------------------------------------------------

  /** Follows every unfinished task in the outbox (all of them, not only this process's) until `close`. */
  serve(): Promise<void> {
    this.#served ??= this.#serve();
    return this.#served;
  }

  async #serve(): Promise<void> {
    const signal = this.#stop.signal;
    this.#sweep().catch((e) => this.#host.log("warn", `outbox sweep: ${String(e)}`));
    while (!signal.aborted) {
      try {
        for await (const v of this.outbox.watch(signal)) {
          if (v.entry.state === "pending" || v.entry.state === "delivering") this.#follow(v.key);
          else this.#following.get(v.key)?.abort();
        }
      } catch (e) {
        if (!signal.aborted) this.#host.log("warn", `outbox watch: ${String(e)}; watching again`);
      }
      if (!signal.aborted) await pause(1_000, signal);
    }
  }

  /** Settled entries older than the retention leave the bucket. */
  async #sweep(): Promise<void> {
    const now = Date.now();
    for await (const key of await this.outbox.kv.keys(">")) {
      const v = await this.outbox.read(key);
      if (v?.entry.done_at && now - Date.parse(v.entry.done_at) > SETTLED_RETENTION_MS) await this.outbox.remove(key);
    }
  }

  #follow(key: string): void {
    if (this.#following.has(key)) return;
    const stop = new AbortController();
    this.#following.set(key, stop);
    const signal = AbortSignal.any([stop.signal, this.#stop.signal]);
    this.#followTask(key, signal)
      .then(
        () => {
          if (this.#following.get(key) === stop) this.#following.delete(key);
        },
        (e) => {
          if (this.#following.get(key) === stop) this.#following.delete(key);
          if (signal.aborted) return;
          // Still unsettled (OpenClaw starting, NATS away): followed again shortly.
          this.#host.log("warn", `following ${key}: ${String(e)}`);
          setTimeout(() => void this.#retry(key), 2_000).unref();
        },
      );
  }

  async #retry(key: string): Promise<void> {
    const v = await this.outbox.read(key).catch(() => undefined);
    if (v && (v.entry.state === "pending" || v.entry.state === "delivering")) this.#follow(key);
  }

  /** Watches the task's record: progress to the session's agent, then its end to the session. */
  async #followTask(key: string, signal: AbortSignal): Promise<void> {
    let v = await this.outbox.read(key);
    if (!v) return;
    const to = { sessionKey: v.entry.session_key, agentId: v.entry.agent_id };
    let lastProgress: string | undefined;
    while (!signal.aborted) {
      const record = await this.#read(v.entry);
      // The entry is written before the submit, so its record may not exist yet; one that is
      // still missing after this long was never submitted (its gateway died in between).
      const missingFor = SUBMIT_GRACE_MS - (Date.now() - Date.parse(v.entry.created_at));
      if (record === "missing" && missingFor <= 0) {
        this.#host.log("warn", `${v.entry.task} was never submitted; removing its outbox entry`);
        await this.outbox.remove(key);
        return;
      }
      if (record !== "missing" && isTerminal(record.status)) {
        await this.#deliver(v, record, signal);
        return;
      }
      // The record's own watch: its current version (or its first, the moment it is stored),
      // then every change, progress included.
      const watch = await this.#tasks.watch({ key: v.entry.task });
      const stop = () => watch.stop();
      signal.addEventListener("abort", stop, { once: true });
      const timer = record === "missing" ? setTimeout(stop, missingFor) : undefined;
      try {
        for await (const e of watch) {
          if (e.operation !== "PUT") break; // archived and removed: read it from the archive
          const now = e.json<TaskRecord>();
          if (isTerminal(now.status)) break;
          const progress = progressText(v.entry, now);
          if (this.config.progress && progress && progress !== lastProgress) {
            lastProgress = progress;
            this.#host.notify(to, progress, `claw:${now.id}`);
          }
        }
      } finally {
        clearTimeout(timer);
        signal.removeEventListener("abort", stop);
        watch.stop();
      }
      v = (await this.outbox.read(key)) ?? v;
    }
  }

  async #read(entry: Entry): Promise<TaskRecord | "missing"> {
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.claw.get(entry.task);
      } catch (e) {
        if (e instanceof ClawError && e.code === "not_found") return "missing";
        if (!(e instanceof ClawError && e.retryable)) throw e;
        await pause(Math.min(250 * 2 ** attempt, 5_000));
      }
    }
  }

  /**
   * Brings the task's end to its session, once. The claim is a compare-and-set, so one gateway
   * delivers; a claim left by a gateway that died is taken over after the lease, and the
   * session's transcript is checked first, so a message that went out just before the crash is
   * not sent again.
   */
  async #deliver(from: Versioned, record: TaskRecord, signal: AbortSignal): Promise<void> {
    let v: Versioned | undefined = from;
    while (!signal.aborted) {
      v = await this.outbox.read(from.key);
      if (!v || v.entry.state === "delivered" || v.entry.state === "dropped") return;
      const to = { sessionKey: v.entry.session_key, agentId: v.entry.agent_id };
      const marker = deliveryMarker(v.entry.task);
      if (v.entry.state === "delivering" && v.entry.claimed_by !== this.#me) {
        const age = Date.now() - Date.parse(v.entry.claimed_at ?? v.entry.created_at);
        if (age < this.config.deliveryLeaseMs) {
          await pause(Math.min(this.config.deliveryLeaseMs - age + 100, 5_000), signal);
          continue;
        }
      }
      const claimed = await this.outbox.change(v, {
        ...v.entry,
        state: "delivering",
        claimed_by: this.#me,
        claimed_at: new Date().toISOString(),
      });
      if (!claimed) continue; // another gateway moved it: look again
      if (v.entry.state === "delivering" && (await this.#host.transcriptHas(to, marker))) {
        this.#host.log("info", `${v.entry.task}: its result is already in the session (a delivery before a restart)`);
      } else {
        const value = record.status === "succeeded" ? await this.claw.resultValue(record).catch((e) => ({ unreadable: String(e) })) : undefined;
        await this.#host.deliver(to, deliveryText(v.entry, record, value, this.config.maxResultChars), `claw-task-${v.entry.task}`);
      }
      const done = await this.outbox.change(claimed, {
        ...claimed.entry,
        state: "delivered",
        done_at: new Date().toISOString(),
        outcome: record.status,
      });
      if (done) this.#host.log("info", `${v.entry.task} ${record.status}: delivered to ${to.sessionKey}`);
      return;
    }
  }

  async close(): Promise<void> {
    this.#stop.abort();
    for (const stop of this.#following.values()) stop.abort();
    await this.#served?.catch(() => undefined);
    await this.claw.close().catch(() => undefined);
    await this.#nc.drain().catch(() => this.#nc.close());
  }
}

function pause(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done, { once: true });
  });
}
