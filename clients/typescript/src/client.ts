import { ClawError } from "./errors.js";
import { HttpTransport, type HttpOptions } from "./http.js";
import { NatsTransport, type NatsOptions } from "./nats.js";
import { backoff, sleep, type Submitted, type Transport, type WatchOptions } from "./transport.js";
import { isTerminal, type TaskRecord, type TaskSpec, type WatchedEvent } from "./types.js";

export type ConnectOptions = { http: HttpOptions } | { nats: NatsOptions };

export interface SubmitOptions {
  /**
   * The same key gives the same task (per principal): a repeat returns the first task instead
   * of creating another. With a key (or a spec with its own `id`), a submit refused because the
   * system was unreachable or the queue full is repeated (`retries` times), which is safe
   * exactly because of the key. The key decides the id (a UUIDv5 of it): give one or the other.
   */
  idempotencyKey?: string | undefined;
  /** Repeats of a keyed submit, or one with an explicit `id`, after `unavailable` or `queue_full` (default 5). */
  retries?: number | undefined;
  signal?: AbortSignal | undefined;
}

export interface ResultOptions {
  signal?: AbortSignal | undefined;
  /** Give up waiting after this long (default: wait as long as the task lives). */
  timeoutMs?: number | undefined;
  /** How often the record is read again when no event says it changed (default 5 000 ms). */
  pollMs?: number | undefined;
}

/**
 * A client of the OpenClaw task gateway, over HTTP (through a gateway) or NATS (directly):
 * the same calls, the same records, the same errors either way.
 *
 * ```ts
 * const claw = await Claw.connect({ http: { url: "http://127.0.0.1:8080", token } });
 * const { record } = await claw.submit({ kind: "sleep", input: { seconds: 2 } });
 * for await (const event of claw.watch(record.session)) console.log(event.type, event.data);
 * ```
 */
export class Claw {
  readonly transport: Transport;

  constructor(transport: Transport) {
    this.transport = transport;
  }

  static async connect(options: ConnectOptions): Promise<Claw> {
    if ("http" in options) return new Claw(new HttpTransport(options.http));
    return new Claw(await NatsTransport.connect(options.nats));
  }

  /** Submits a task; resolves once it is durably stored (`queued`). */
  async submit(spec: TaskSpec, options: SubmitOptions = {}): Promise<Submitted> {
    // A repeat of the same key or id returns the first task: only then is a retry safe.
    const retries = options.idempotencyKey || spec.id ? (options.retries ?? 5) : 0;
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.transport.submit(spec, options.idempotencyKey);
      } catch (e) {
        if (!(e instanceof ClawError) || !e.retryable || attempt >= retries) throw e;
        const wait = e.retryAfterS !== undefined ? e.retryAfterS * 1000 : backoff(attempt);
        await sleep(wait, options.signal);
      }
    }
  }

  /** The task's record: live, or from the archive once it finished. */
  get(id: string): Promise<TaskRecord> {
    return this.transport.get(id);
  }

  /** Cancels a queued, running or paused task (`cause: user`); harmless when already cancelled. */
  cancel(id: string): Promise<TaskRecord> {
    return this.transport.control(id, "cancel");
  }

  /** Pauses a queued task (it leaves the queue) or a running one (frozen, lease kept). */
  pause(id: string): Promise<TaskRecord> {
    return this.transport.control(id, "pause");
  }

  /** Resumes a paused task where it was. */
  resume(id: string): Promise<TaskRecord> {
    return this.transport.control(id, "resume");
  }

  /** Runs a failed or cancelled task again under the same id, with a fresh round of attempts. */
  retry(id: string): Promise<TaskRecord> {
    return this.transport.control(id, "retry");
  }

  /**
   * The session's events in stream order, each with its `seq`. With `since`, the stored events
   * after that sequence come first, then live ones; without, live ones from now. A lost
   * connection (a gateway restart, a NATS reconnect) is resumed from the last `seq` delivered,
   * so no event is skipped or delivered twice. Ends when `signal` aborts or the loop breaks.
   */
  watch(session: string, options: WatchOptions = {}): AsyncGenerator<WatchedEvent> {
    return this.transport.watch(session, options);
  }

  /**
   * Waits for the task to finish and resolves with its terminal record (`succeeded`, `failed`
   * or `cancelled`: a failure is a record, not a rejection). Rejects with a `ClawError` when the
   * task does not exist, or `timeoutMs` passed (`unavailable`), or with `signal`'s reason.
   */
  async result(id: string, options: ResultOptions = {}): Promise<TaskRecord> {
    const deadline = options.timeoutMs === undefined ? Infinity : Date.now() + options.timeoutMs;
    const pollMs = options.pollMs ?? 5_000;
    const stop = new AbortController();
    const abort = () => stop.abort(options.signal?.reason);
    options.signal?.addEventListener("abort", abort, { once: true });
    try {
      // A gateway restarting or a NATS reconnect is not the task's end: read again until the
      // deadline. Anything else (`not_found`, a bad token) is final.
      const read = async (): Promise<TaskRecord> => {
        for (let attempt = 0; ; attempt++) {
          try {
            return await this.get(id);
          } catch (e) {
            if (!(e instanceof ClawError) || !e.retryable || Date.now() >= deadline) throw e;
            await sleep(Math.min(backoff(attempt), Math.max(deadline - Date.now(), 0)), stop.signal);
          }
        }
      };
      let record = await read();
      if (isTerminal(record.status)) return record;
      // A wake-up for the task's end on its session; the record is the truth. Read again once
      // the watch is live, in case the task ended before it was.
      const woken = this.#wakeOnEvents(record, stop.signal);
      await Promise.race([woken.live, sleep(Math.min(pollMs, 2_000), stop.signal).catch(() => undefined)]);
      record = await read();
      while (!isTerminal(record.status)) {
        const left = deadline - Date.now();
        if (left <= 0) {
          throw new ClawError({ code: "unavailable", message: `task ${id} still ${record.status} after ${options.timeoutMs} ms` });
        }
        await Promise.race([woken.next(), this.transport.changes(record, Math.min(pollMs, left), stop.signal)]);
        if (options.signal?.aborted) throw options.signal.reason;
        record = await read();
      }
      return record;
    } finally {
      options.signal?.removeEventListener("abort", abort);
      stop.abort();
    }
  }

  /** The result value of a succeeded task: inline in its record, or read from the object store. */
  async resultValue(idOrRecord: string | TaskRecord): Promise<unknown> {
    const record = typeof idOrRecord === "string" ? await this.get(idOrRecord) : idOrRecord;
    return this.transport.resultValue(record);
  }

  /**
   * Resolves `next()` each time the task's terminal status event arrives on its session, and
   * `live` once the watch delivers every event from then on.
   */
  #wakeOnEvents(record: TaskRecord, signal: AbortSignal): { live: Promise<void>; next(): Promise<void> } {
    let wake: (() => void) | undefined;
    let pending = false;
    let onLive!: () => void;
    const live = new Promise<void>((resolve) => (onLive = resolve));
    (async () => {
      try {
        for await (const event of this.watch(record.session, { signal, onLive })) {
          if (event.task_id === record.id && event.type === "status" && isTerminal(event.data.status)) {
            pending = true;
            wake?.();
          }
        }
      } catch {
        // The poll goes on without the wake-ups.
      }
    })();
    return {
      live,
      next: () =>
        new Promise<void>((resolve) => {
          if (pending) {
            pending = false;
            return resolve();
          }
          wake = () => {
            pending = false;
            resolve();
          };
          signal.addEventListener("abort", () => resolve(), { once: true });
        }),
    };
  }

  /** Closes the NATS connection this client opened (HTTP holds none). */
  close(): Promise<void> {
    return this.transport.close();
  }
}
