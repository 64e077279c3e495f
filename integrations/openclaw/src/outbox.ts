// The outbox: one entry per task the agent handed off, in a KV bucket of the task system (not
// in OpenClaw's memory), keyed `<claw session>.<task id>`. It says which OpenClaw session asked,
// and how far the result's delivery got:
//
//   pending ──(task ended, a gateway claims it)──▶ delivering ──(message in the session)──▶ delivered
//      └──(the session stopped it: /stop, claw_cancel)──▶ dropped
//
// Every change is a compare-and-set on the entry's revision, so of several OpenClaw gateways (or
// one restarted mid-delivery) exactly one delivers; a claim older than the lease is taken over,
// after checking the session's transcript for the message (see `Bridge.deliver`).
import { createHash } from "node:crypto";
import { Kvm, type KV, type KvEntry } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/transport-node";

export type State = "pending" | "delivering" | "delivered" | "dropped";

export interface Entry {
  v: 1;
  task: string;
  /** The task system's session of the task (derived from the OpenClaw session, see `sessionOf`). */
  session: string;
  /** Where the result goes. */
  session_key: string;
  agent_id: string;
  kind: string;
  label: string | null;
  state: State;
  created_at: string;
  /** With `delivering`: who claimed the delivery, and when. */
  claimed_by?: string;
  claimed_at?: string;
  /** With `delivered` / `dropped`. */
  done_at?: string;
  /** The terminal status delivered, or why it was dropped. */
  outcome?: string;
}

export interface Versioned {
  key: string;
  entry: Entry;
  revision: number;
}

/**
 * The task system's session for an OpenClaw session: `oc-` and 22 characters of the SHA-256 of
 * the agent and session key, so a token (`A-Z a-z 0-9 _ -`) whatever the key looks like, the
 * same for the same session, and not revealing the key.
 */
export function sessionOf(agentId: string, sessionKey: string): string {
  const digest = createHash("sha256").update(`${agentId}\n${sessionKey}`).digest("base64url");
  return `oc-${digest.slice(0, 22)}`;
}

/** The bucket's settings: one value per key (changes are compare-and-set on its revision). */
const BUCKET = {
  history: 1,
  // ~500 bytes an entry: room for about half a million, far from the account's 10 GiB.
  max_bytes: 256 * 1024 * 1024,
  description: "OpenClaw plugin: which session a task's result goes to, and its delivery",
};

/** A delivered or dropped entry is removed this long after it settled. */
export const SETTLED_RETENTION_MS = 7 * 24 * 3600 * 1000;

export class Outbox {
  readonly kv: KV;

  private constructor(kv: KV) {
    this.kv = kv;
  }

  /** Opens the bucket, creating it if it does not exist. */
  static async open(nc: NatsConnection, bucket: string): Promise<Outbox> {
    return new Outbox(await new Kvm(nc).create(bucket, BUCKET));
  }

  static key(entry: Pick<Entry, "session" | "task">): string {
    return `${entry.session}.${entry.task}`;
  }

  /** Adds an entry; fails if one exists for the task. */
  async add(entry: Entry): Promise<Versioned> {
    const key = Outbox.key(entry);
    const revision = await this.kv.create(key, JSON.stringify(entry));
    return { key, entry, revision };
  }

  async read(key: string): Promise<Versioned | undefined> {
    return parse(await this.kv.get(key));
  }

  /** Moves an entry on if nobody changed it since `from` was read; `undefined` when someone did. */
  async change(from: Versioned, entry: Entry): Promise<Versioned | undefined> {
    try {
      const revision = await this.kv.update(from.key, JSON.stringify(entry), from.revision);
      return { key: from.key, entry, revision };
    } catch (e) {
      if (isWrongRevision(e)) return undefined;
      throw e;
    }
  }

  async remove(key: string): Promise<void> {
    await this.kv.purge(key);
  }

  /** The entries of one task-system session (one OpenClaw session). */
  async ofSession(session: string): Promise<Versioned[]> {
    const keys: string[] = [];
    for await (const key of await this.kv.keys(`${session}.*`)) keys.push(key);
    const found = await Promise.all(keys.map((key) => this.read(key)));
    return found.filter((v): v is Versioned => v !== undefined);
  }

  /** Every entry now, then every change, until `signal` aborts. */
  async *watch(signal: AbortSignal): AsyncGenerator<Versioned> {
    const watch = await this.kv.watch({ key: ">", ignoreDeletes: true });
    const stop = () => watch.stop();
    signal.addEventListener("abort", stop, { once: true });
    try {
      for await (const e of watch) {
        const v = parse(e);
        if (v) yield v;
      }
    } finally {
      signal.removeEventListener("abort", stop);
      watch.stop();
    }
  }
}

function parse(e: KvEntry | null): Versioned | undefined {
  if (!e || e.operation !== "PUT") return undefined;
  try {
    const entry = e.json<Entry>();
    if (entry?.v !== 1 || typeof entry.task !== "string") return undefined;
    return { key: e.key, entry, revision: e.revision };
  } catch {
    return undefined;
  }
}

function isWrongRevision(e: unknown): boolean {
  const text = String((e as { message?: string })?.message ?? e);
  return /wrong last sequence|10071|key exists/i.test(text);
}
