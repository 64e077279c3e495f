import type { ApiErrorBody, ErrorCode, Status } from "./types.js";

/** The HTTP status of each code, as `docs/PROTOCOL.md` ("Errors") gives it. */
const STATUS: Record<ErrorCode, number> = {
  malformed_json: 400,
  invalid_request: 422,
  unauthorized: 401,
  not_found: 404,
  forbidden: 403,
  conflict: 409,
  gone: 410,
  payload_too_large: 413,
  unsupported_media_type: 415,
  queue_full: 429,
  rate_limited: 429,
  quota_exceeded: 429,
  unavailable: 503,
  internal: 500,
};

/**
 * An error reply of the gateway (HTTP body, `claw.api.*` reply, WebSocket reply frame), or the
 * gateway not being reachable at all, which is reported as `unavailable` like the gateway's own
 * 503: in both cases nothing was stored, and a submit with an idempotency key is safe to repeat.
 */
export class ClawError extends Error {
  override readonly name = "ClawError";
  /** One of PROTOCOL's codes. */
  readonly code: ErrorCode;
  /** The HTTP status (over NATS: `Nats-Service-Error-Code`). */
  readonly status: number;
  /** With `invalid_request`: the offending field (`input.seconds`), when there is one. */
  readonly field: string | undefined;
  /** With `conflict`: the task's current status, which did not allow the verb. */
  readonly taskStatus: Status | undefined;
  /** With `queue_full` and `rate_limited` over HTTP: the `Retry-After` seconds. */
  readonly retryAfterS: number | undefined;
  /** With `rate_limited` and `quota_exceeded`: which of the principal's limits refused it. */
  readonly limit: string | undefined;

  constructor(
    body: ApiErrorBody,
    opts: { status?: number; retryAfterS?: number; cause?: unknown } = {},
  ) {
    super(body.message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.code = body.code;
    this.status = opts.status ?? STATUS[body.code] ?? 500;
    this.field = body.field ?? undefined;
    this.taskStatus = body.status ?? undefined;
    this.retryAfterS = opts.retryAfterS;
    this.limit = body.limit ?? undefined;
  }

  /** Whether the same request may succeed later: the system was unreachable, the queue full, or the principal over its rate. */
  get retryable(): boolean {
    return this.code === "unavailable" || this.code === "queue_full" || this.code === "rate_limited";
  }

  /** The gateway (or NATS) could not be reached: `unavailable`, with what went wrong as cause. */
  static unreachable(what: string, cause: unknown): ClawError {
    const detail = cause instanceof Error ? cause.message : String(cause);
    return new ClawError({ code: "unavailable", message: `${what}: ${detail}` }, { cause });
  }

  /** Parses an error body, or says what came instead. */
  static fromBody(body: unknown, status: number, retryAfterS?: number): ClawError {
    const error = (body as { error?: ApiErrorBody } | null)?.error;
    if (error && typeof error.code === "string" && typeof error.message === "string") {
      return new ClawError(error, { status, retryAfterS });
    }
    return new ClawError(
      { code: status >= 500 ? "internal" : "invalid_request", message: `unexpected reply (${status}): ${JSON.stringify(body)}` },
      { status },
    );
  }
}
