// What the agent reads: the tools' answers, progress notes, and the message that brings a task's
// end to its session. Each delivery carries a marker with the task id, by which a gateway that
// restarted mid-delivery finds out whether the message already reached the session.
import { isTerminal, type TaskRecord } from "@openclaw-claw/client";
import type { Entry } from "./outbox.js";

export function deliveryMarker(task: string): string {
  return `[claw-task ${task}]`;
}

function name(entry: Pick<Entry, "kind" | "label">): string {
  return entry.label ? `"${entry.label}" (${entry.kind})` : entry.kind;
}

function percent(record: TaskRecord): string | undefined {
  const fraction = record.progress?.fraction;
  return typeof fraction === "number" && Number.isFinite(fraction) ? `${Math.round(fraction * 100)}%` : undefined;
}

/** A short line for the agent about a running task, or nothing when there is nothing to say. */
export function progressText(entry: Entry, record: TaskRecord): string | undefined {
  const pct = percent(record);
  const message = record.progress?.message;
  if (record.status === "running" && pct === undefined && !message) return undefined;
  const parts = [`Background task ${record.id} ${name(entry)} is ${record.status}`];
  if (pct) parts.push(`at ${pct}`);
  if (message) parts.push(`(${message})`);
  return `${parts.join(" ")}. Its result will come as a message; no need to wait for it.`;
}

function cut(text: string, max: number): string {
  return text.length <= max ? text : `${text.slice(0, max)}… [${text.length - max} more characters: claw_status shows the whole result]`;
}

/** The message that starts the session's next turn with the task's end. */
export function deliveryText(entry: Entry, record: TaskRecord, value: unknown, maxChars: number): string {
  const head = `${deliveryMarker(record.id)} The background task ${name(entry)} you started with claw_run has ${record.status}.`;
  if (record.status === "succeeded") {
    const shown = typeof value === "string" ? value : JSON.stringify(value, null, 2);
    return `${head}\nResult:\n${cut(shown ?? "null", maxChars)}\n\nTell the user what it produced.`;
  }
  if (record.status === "failed") {
    const error = record.error ? `${record.error.code}: ${record.error.message}` : "no error recorded";
    return `${head}\nError after ${record.attempt} attempt(s): ${cut(error, maxChars)}\n\nTell the user it failed and why.`;
  }
  const cause = record.cause ? ` (cause: ${record.cause})` : "";
  return `${head}${cause}\nIt produced no result. Tell the user it was cancelled.`;
}

/** The tool's answer to claw_run: the id, and that the turn should go on without waiting. */
export function startedText(entry: Pick<Entry, "kind" | "label">, record: TaskRecord): string {
  return (
    `Started background task ${record.id} ${name(entry)}: ${record.status}, ${record.class} lane. ` +
    `It runs outside this turn; when it ends its result arrives in this session as a new message. ` +
    `Do not wait or poll for it: answer the user now (claw_status shows its progress, claw_cancel stops it).`
  );
}

/** One line per task for claw_status. */
export function statusLine(entry: Entry, record: TaskRecord | undefined, maxChars: number): string {
  if (!record) return `${entry.task} ${name(entry)}: not found in the task system (${entry.state})`;
  const parts = [`${record.id} ${name(entry)}: ${record.status}`];
  const pct = percent(record);
  if (pct && !isTerminal(record.status)) parts.push(pct);
  if (record.progress?.message) parts.push(record.progress.message);
  if (record.attempt > 1) parts.push(`attempt ${record.attempt}`);
  if (record.cause) parts.push(`cause ${record.cause}`);
  if (record.error) parts.push(`error ${record.error.code}: ${record.error.message}`);
  if (record.status === "succeeded" && record.result !== undefined && record.result !== null) {
    parts.push(`result ${cut(JSON.stringify(record.result), maxChars)}`);
  }
  if (record.result_ref) parts.push(`large result stored as ${record.result_ref.bucket}/${record.result_ref.name}`);
  parts.push(`delivery ${entry.state}`);
  return parts.join(", ");
}
