// The protocol's types under short names. Every one of them comes from the generated
// `generated/protocol.ts` (from nats/schema/), so none can drift from what the system sends.
import type {
  ApiError,
  OpenClawLanes,
  OpenClawTaskEvent,
  OpenClawTaskRecord,
  OpenClawTaskSpec,
} from "./generated/protocol.js";

/** What you submit: `POST /v1/tasks`, `claw.api.submit`, a lane message. */
export type TaskSpec = OpenClawTaskSpec;
/** A task's record (KV `tasks`, the archive, every control verb's reply). */
export type TaskRecord = OpenClawTaskRecord;
/** A task event on `progress.<session>.<id>`, discriminated by `type`. */
export type TaskEvent = OpenClawTaskEvent;
/** The `claw.api.lanes` / `GET /v1/lanes` reply. */
export type Lanes = OpenClawLanes;
/** The `error` object of every error reply. */
export type ApiErrorBody = ApiError;

export type Status = TaskRecord["status"];
export type Cause = NonNullable<TaskRecord["cause"]>;
export type ErrorCode = ApiError["code"];
export type PayloadRef = NonNullable<TaskRecord["result_ref"]>;

/** An event with its `PROGRESS` stream sequence: its position, to resume a watch from. */
export type WatchedEvent = TaskEvent & { seq: number };

/** The verbs of `POST /v1/tasks/{id}/<verb>` and `claw.api.<verb>`. */
export type Verb = "cancel" | "pause" | "resume" | "retry";

const TERMINAL: ReadonlySet<Status> = new Set(["succeeded", "failed", "cancelled"]);

/** Whether a status is final: it changes only through an explicit `retry`. */
export function isTerminal(status: Status): boolean {
  return TERMINAL.has(status);
}
