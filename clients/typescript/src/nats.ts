import { Kvm } from "@nats-io/kv";
import { DeliverPolicy, jetstream, type JetStreamClient } from "@nats-io/jetstream";
import { Objm } from "@nats-io/obj";
import { connect, headers, type ConnectionOptions, type NatsConnection } from "@nats-io/transport-node";
import { ClawError } from "./errors.js";
import { type Submitted, type Transport, type WatchOptions } from "./transport.js";
import type { TaskEvent, TaskRecord, TaskSpec, Verb, WatchedEvent } from "./types.js";

export interface NatsOptions {
  /** Server URL(s), e.g. `nats://127.0.0.1:4222`. */
  servers?: string | string[] | undefined;
  /** Further nats.js connection options (user/pass, token, TLS, `inboxPrefix` for role users). */
  connection?: Partial<ConnectionOptions> | undefined;
  /** A connection of your own instead; the client then does not close it. */
  nc?: NatsConnection | undefined;
  /** Request timeout in ms (default 10 000). */
  timeoutMs?: number | undefined;
}

const STREAM = "PROGRESS";
const BUCKET = "tasks";

/** The system's NATS API directly: `claw.api.*` request/reply, `PROGRESS`, KV `tasks`. */
export class NatsTransport implements Transport {
  readonly #nc: NatsConnection;
  readonly #owned: boolean;
  readonly #js: JetStreamClient;
  readonly #timeoutMs: number;

  private constructor(nc: NatsConnection, owned: boolean, timeoutMs: number) {
    this.#nc = nc;
    this.#owned = owned;
    this.#js = jetstream(nc);
    this.#timeoutMs = timeoutMs;
  }

  static async connect(options: NatsOptions): Promise<NatsTransport> {
    const timeoutMs = options.timeoutMs ?? 10_000;
    if (options.nc) return new NatsTransport(options.nc, false, timeoutMs);
    try {
      const nc = await connect({
        name: "claw-client",
        // A frozen or vanished server is noticed within seconds, not minutes.
        pingInterval: 5_000,
        maxPingOut: 2,
        maxReconnectAttempts: -1,
        // Back within half a second of a restarted server (2 s by default).
        reconnectTimeWait: 500,
        ...options.connection,
        servers: options.servers ?? options.connection?.servers ?? "nats://127.0.0.1:4222",
      });
      return new NatsTransport(nc, true, timeoutMs);
    } catch (e) {
      throw ClawError.unreachable("connecting to NATS", e);
    }
  }

  /** The connection, for what this client does not wrap (lanes, the archive). */
  get connection(): NatsConnection {
    return this.#nc;
  }

  async #request(subject: string, body: unknown, key?: string): Promise<unknown> {
    const h = headers();
    if (key) h.set("Idempotency-Key", key);
    let reply;
    try {
      reply = await this.#nc.request(subject, JSON.stringify(body), { timeout: this.#timeoutMs, headers: h });
    } catch (e) {
      // No gateway answering (no responders), a timeout, a closed connection: nothing stored.
      throw ClawError.unreachable(subject, e);
    }
    const code = reply.headers?.get("Nats-Service-Error-Code");
    const json = reply.data.length === 0 ? null : reply.json();
    if (code) throw ClawError.fromBody(json, Number(code));
    return json;
  }

  async submit(spec: TaskSpec, idempotencyKey?: string): Promise<Submitted> {
    const record = (await this.#request("claw.api.submit", spec, idempotencyKey)) as TaskRecord;
    return { record, created: undefined };
  }

  async get(id: string): Promise<TaskRecord> {
    return (await this.#request("claw.api.get", { id })) as TaskRecord;
  }

  async control(id: string, verb: Verb): Promise<TaskRecord> {
    return (await this.#request(`claw.api.${verb}`, { id })) as TaskRecord;
  }

  async resultValue(record: TaskRecord): Promise<unknown> {
    const stored = record.result_ref;
    if (!stored) return record.result;
    try {
      const store = await new Objm(this.#js).open(stored.bucket);
      const bytes = await store.getBlob(stored.name);
      if (bytes === null) {
        throw new ClawError({ code: "gone", message: `the result of ${record.id} is no longer stored` });
      }
      return JSON.parse(new TextDecoder().decode(bytes));
    } catch (e) {
      if (e instanceof ClawError) throw e;
      throw ClawError.unreachable(`reading ${stored.bucket}/${stored.name}`, e);
    }
  }

  async changes(record: TaskRecord, timeoutMs: number, signal?: AbortSignal): Promise<void> {
    // The bucket's own watch of the one key: it starts with the current value, so a change made
    // before the watch began is seen too.
    const kv = await new Kvm(this.#js).open(BUCKET);
    const watch = await kv.watch({ key: record.id });
    const stop = () => watch.stop();
    const timer = setTimeout(stop, timeoutMs);
    signal?.addEventListener("abort", stop, { once: true });
    try {
      for await (const entry of watch) {
        if (entry.operation !== "PUT") return;
        const now = entry.json<TaskRecord>();
        if (now.status !== record.status || now.attempt !== record.attempt) return;
      }
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener("abort", stop);
      watch.stop();
    }
  }

  async *watch(session: string, options: WatchOptions): AsyncGenerator<WatchedEvent> {
    // An ordered consumer: the server sends the session's events in stream order, and the
    // client library recreates the consumer from the last sequence it saw whenever the
    // connection or the server drops it, so a disconnect neither skips nor repeats an event.
    const from =
      options.since === undefined
        ? { deliver_policy: DeliverPolicy.New }
        : { deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: options.since + 1 };
    let messages;
    try {
      const consumer = await this.#js.consumers.get(STREAM, {
        filter_subjects: `progress.${session}.*`,
        ...from,
      });
      // Pull requests of 5 s (30 s by default), so a consumer lost with a restarted server is
      // noticed and recreated within seconds rather than half a minute.
      messages = await consumer.consume({ expires: 5_000 });
      if (options.since !== undefined && options.onGap) {
        // Read after the consumer exists: whatever is stored from here on, it delivers.
        const { first_seq: first, last_seq: lastSeq } = (await (await this.#js.streams.get(STREAM)).info()).state;
        if (options.since < lastSeq && options.since + 1 < first) options.onGap(options.since + 1, first - 1);
      }
      options.onLive?.();
    } catch (e) {
      throw ClawError.unreachable(`watching ${session}`, e);
    }
    const stop = () => void messages.stop();
    options.signal?.addEventListener("abort", stop, { once: true });
    let last = options.since ?? 0;
    try {
      for await (const m of messages) {
        if (m.seq <= last) continue;
        last = m.seq;
        yield { ...m.json<TaskEvent>(), seq: m.seq } as WatchedEvent;
      }
    } finally {
      options.signal?.removeEventListener("abort", stop);
      await messages.close().catch(() => undefined);
    }
  }

  async close(): Promise<void> {
    if (this.#owned) await this.#nc.drain().catch(() => this.#nc.close());
  }
}

