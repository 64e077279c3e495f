import type { TaskRecord, TaskSpec, Verb, WatchedEvent } from "./types.js";

/** What `submit` answers: the record, and over HTTP whether this call created the task. */
export interface Submitted {
  record: TaskRecord;
  /** `true` for a new task (HTTP 202), `false` for a repeat (200); over NATS not told. */
  created: boolean | undefined;
}

/** Where a watch starts and how it ends. */
export interface WatchOptions {
  /** Deliver the session's stored events after this `PROGRESS` sequence first; absent: from now. */
  since?: number | undefined;
  /** Ends the watch (the iterator returns). */
  signal?: AbortSignal | undefined;
  /** Called once the watch is live: every event from then on will be delivered. */
  onLive?: (() => void) | undefined;
  /** Called when the watch lost its connection and is about to resume from `since`. */
  onReconnect?: ((since: number | undefined, cause: unknown) => void) | undefined;
  /**
   * Called when `PROGRESS` no longer holds the sequences `from`..`to` after `since` (its limits
   * evicted them): events of the session may have been among them, so re-read the records of
   * the tasks you follow. Over HTTP the gateway's `gap` frame says it; over NATS the stream's
   * first sequence does.
   */
  onGap?: ((from: number, to: number) => void) | undefined;
}

/** One way of talking to the system: HTTP + WebSocket through a gateway, or NATS directly. */
export interface Transport {
  submit(spec: TaskSpec, idempotencyKey?: string): Promise<Submitted>;
  get(id: string): Promise<TaskRecord>;
  control(id: string, verb: Verb): Promise<TaskRecord>;
  /** The session's events in stream order, resuming by sequence across disconnects. */
  watch(session: string, options: WatchOptions): AsyncGenerator<WatchedEvent>;
  /** Waits until the task's record changes or `timeoutMs` passes (a wake-up, not a value). */
  changes(record: TaskRecord, timeoutMs: number, signal?: AbortSignal): Promise<void>;
  /** The result value of a succeeded task, inline or read from the object store. */
  resultValue(record: TaskRecord): Promise<unknown>;
  close(): Promise<void>;
}

/** Sleeps, or rejects with the signal's reason once it aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** Reconnection delays: 100 ms doubling to 5 s, with ±20 % jitter so clients spread out. */
export function backoff(attempt: number): number {
  const base = Math.min(100 * 2 ** attempt, 5000);
  return base * (0.8 + Math.random() * 0.4);
}
