import { ClawError } from "./errors.js";
import { backoff, sleep, type Submitted, type Transport, type WatchOptions } from "./transport.js";
import type { TaskRecord, TaskSpec, Verb, WatchedEvent } from "./types.js";

export interface HttpOptions {
  /** The gateway's base URL, e.g. `http://127.0.0.1:8080`. */
  url: string;
  /** An API token, when the gateway has `--tokens`. */
  token?: string | undefined;
  /** Per-request timeout in ms (default 10 000). */
  timeoutMs?: number | undefined;
}

/** The gateway's HTTP API and its WebSocket (`docs/PROTOCOL.md`). */
export class HttpTransport implements Transport {
  readonly #base: URL;
  readonly #token: string | undefined;
  readonly #timeoutMs: number;

  constructor(options: HttpOptions) {
    this.#base = new URL(options.url);
    this.#token = options.token;
    this.#timeoutMs = options.timeoutMs ?? 10_000;
  }

  async #request(method: string, path: string, body?: unknown, headers: Record<string, string> = {}) {
    const all: Record<string, string> = { accept: "application/json", ...headers };
    if (this.#token) all.authorization = `Bearer ${this.#token}`;
    if (body !== undefined) all["content-type"] = "application/json";
    let response: Response;
    try {
      response = await fetch(new URL(path, this.#base), {
        method,
        headers: all,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(this.#timeoutMs),
      });
    } catch (e) {
      throw ClawError.unreachable(`${method} ${path}`, e);
    }
    const text = await response.text();
    let json: unknown;
    try {
      json = text === "" ? null : JSON.parse(text);
    } catch {
      json = text;
    }
    if (!response.ok) {
      const retryAfter = Number(response.headers.get("retry-after"));
      throw ClawError.fromBody(json, response.status, Number.isFinite(retryAfter) && retryAfter > 0 ? retryAfter : undefined);
    }
    return { status: response.status, json };
  }

  async submit(spec: TaskSpec, idempotencyKey?: string): Promise<Submitted> {
    const headers: Record<string, string> = idempotencyKey ? { "idempotency-key": idempotencyKey } : {};
    const { status, json } = await this.#request("POST", "/v1/tasks", spec, headers);
    return { record: json as TaskRecord, created: status === 202 };
  }

  async get(id: string): Promise<TaskRecord> {
    return (await this.#request("GET", `/v1/tasks/${encodeURIComponent(id)}`)).json as TaskRecord;
  }

  async control(id: string, verb: Verb): Promise<TaskRecord> {
    return (await this.#request("POST", `/v1/tasks/${encodeURIComponent(id)}/${verb}`)).json as TaskRecord;
  }

  async resultValue(record: TaskRecord): Promise<unknown> {
    if (!record.result_ref) return record.result;
    return (await this.#request("GET", `/v1/tasks/${encodeURIComponent(record.id)}/result`)).json;
  }

  async changes(_record: TaskRecord, timeoutMs: number, signal?: AbortSignal): Promise<void> {
    // HTTP has no per-record feed: `result` watches the session for the wake-up, and this is
    // the poll behind it.
    await sleep(timeoutMs, signal);
  }

  async *watch(session: string, options: WatchOptions): AsyncGenerator<WatchedEvent> {
    let since = options.since;
    let failures = 0;
    while (!options.signal?.aborted) {
      let url = this.#wsUrl(session, since);
      let socket: SocketFeed | undefined;
      let cause: unknown;
      try {
        // A WebSocket cannot carry headers: a single-use ticket stands in for the token.
        if (this.#token) url = await this.#withTicket(url);
        socket = new SocketFeed(url, options.signal);
      } catch (e) {
        if (e instanceof ClawError && !e.retryable) throw e;
        cause = e;
      }
      if (socket === undefined) {
        if (options.signal?.aborted) return;
        options.onReconnect?.(since, cause);
        try {
          await sleep(backoff(failures++), options.signal);
        } catch {
          return;
        }
        continue;
      }
      try {
        for await (const frame of socket) {
          if (frame.type === "hello") {
            failures = 0;
            options.onLive?.();
            // From now: the hello's sequence is where a reconnect resumes if no event came.
            since ??= frame.seq as number;
            continue;
          }
          if (frame.type === "gap") {
            options.onGap?.(frame.from as number, frame.to as number);
            continue;
          }
          if (frame.type === "reply" || typeof frame.seq !== "number") continue;
          // A sequence is never sent twice; this guard keeps that true across reconnects.
          if (since !== undefined && frame.seq <= since) continue;
          since = frame.seq;
          yield frame as WatchedEvent;
        }
        cause = socket.closeReason;
      } catch (e) {
        cause = e;
      } finally {
        socket.close();
      }
      if (options.signal?.aborted) return;
      if (!socket.greeted) {
        // Refused before the upgrade: a bad token, session or parameter is final; anything
        // else (the gateway down or restarting, NATS trouble) is worth another try.
        await this.#refusal(session, since);
      }
      options.onReconnect?.(since, cause);
      try {
        await sleep(backoff(failures++), options.signal);
      } catch {
        return;
      }
    }
  }

  /** `url` with a fresh ticket from `POST /v1/ws-ticket`. */
  async #withTicket(url: URL): Promise<URL> {
    const issued = (await this.#request("POST", "/v1/ws-ticket")).json as { ticket: string };
    const withTicket = new URL(url);
    withTicket.searchParams.set("ticket", issued.ticket);
    return withTicket;
  }

  #wsUrl(session: string, since: number | undefined): URL {
    const url = new URL("/v1/ws", this.#base);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("session", session);
    if (since !== undefined) url.searchParams.set("since", String(since));
    return url;
  }

  /** Asks the upgrade's URL over plain HTTP why it was refused; throws if it is for good. */
  async #refusal(session: string, since: number | undefined): Promise<void> {
    const url = this.#wsUrl(session, since);
    url.protocol = url.protocol === "wss:" ? "https:" : "http:";
    try {
      await this.#request("GET", url.pathname + url.search);
    } catch (e) {
      if (!(e instanceof ClawError) || e.retryable) return;
      // Everything checked, only the upgrade missing: the refusal was not ours to keep.
      if (e.code === "invalid_request" && e.message.includes("WebSocket upgrade")) return;
      throw e;
    }
  }

  async close(): Promise<void> {}
}

type Frame = { type: string; seq?: number; [key: string]: unknown };

/** One WebSocket as an async iterator of its JSON frames; ends when the socket closes. */
class SocketFeed implements AsyncIterable<Frame> {
  readonly #ws: WebSocket;
  readonly #queue: Frame[] = [];
  #wake: (() => void) | undefined;
  #done = false;
  #error: unknown;
  greeted = false;
  closeReason: { code: number; reason: string } | undefined;

  constructor(url: URL, signal?: AbortSignal) {
    this.#ws = new WebSocket(url, ["claw.v1"]);
    this.#ws.addEventListener("message", (event) => {
      try {
        const frame = JSON.parse(String(event.data)) as Frame;
        if (frame.type === "hello") this.greeted = true;
        this.#queue.push(frame);
      } catch (e) {
        this.#error = e;
      }
      this.#notify();
    });
    this.#ws.addEventListener("close", (event) => {
      this.closeReason = { code: event.code, reason: event.reason };
      this.#done = true;
      this.#notify();
    });
    this.#ws.addEventListener("error", () => {
      this.#done = true;
      this.#notify();
    });
    signal?.addEventListener("abort", () => this.close(), { once: true });
  }

  #notify() {
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }

  close() {
    if (this.#ws.readyState === WebSocket.CONNECTING || this.#ws.readyState === WebSocket.OPEN) {
      this.#ws.close(1000);
    }
    this.#done = true;
    this.#notify();
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<Frame> {
    while (true) {
      const frame = this.#queue.shift();
      if (frame) {
        yield frame;
        continue;
      }
      if (this.#error !== undefined) throw this.#error;
      if (this.#done) return;
      await new Promise<void>((resolve) => (this.#wake = resolve));
    }
  }
}
