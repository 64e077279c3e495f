// The client against the real system (see harness.ts): every call over HTTP and over NATS, and
// a watch that survives gateway restarts with nothing skipped or repeated.
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { Claw, ClawError, isTerminal, type TaskRecord, type WatchedEvent } from "../src/index.js";
import { System, waitFor } from "./harness.js";

let system: System;
const clients: Record<"http" | "nats", Claw> = {} as never;

before(async () => {
  system = await System.start();
  clients.http = await Claw.connect({ http: { url: system.httpUrl } });
  clients.nats = await Claw.connect({ nats: { servers: system.natsUrl } });
});

after(async () => {
  await Promise.all(Object.values(clients).map((c) => c.close()));
  await system?.stop();
});

/** Collects a session's events from `since` until `done` says the list is complete. */
async function collect(claw: Claw, session: string, since: number | undefined, done: (events: WatchedEvent[]) => boolean) {
  const events: WatchedEvent[] = [];
  const stop = new AbortController();
  const timer = setTimeout(() => stop.abort(new Error(`watch of ${session} incomplete: ${JSON.stringify(events.map((e) => [e.seq, e.type]))}`)), 60_000);
  try {
    for await (const event of claw.watch(session, { since, signal: stop.signal })) {
      events.push(event);
      if (done(events)) break;
    }
  } finally {
    clearTimeout(timer);
  }
  if (stop.signal.aborted) throw stop.signal.reason;
  return events;
}

const ended = (ids: string[]) => (events: WatchedEvent[]) =>
  ids.every((id) => events.some((e) => e.task_id === id && e.type === "status" && isTerminal(e.data.status)));

async function running(claw: Claw, id: string): Promise<TaskRecord> {
  return waitFor(`${id} running`, 30_000, async () => {
    const r = await claw.get(id);
    return r.status === "running" ? r : undefined;
  });
}

for (const via of ["http", "nats"] as const) {
  describe(`over ${via}`, () => {
    it("submits once per key, watches the task's events in order and waits for its result", async () => {
      const claw = clients[via];
      const session = `ts-${via}-basic`;
      const key = `ts-${via}-${Date.now()}`;
      const spec = { kind: "sleep", session, input: { seconds: 0.3, steps: 3, echo: "hi" } };
      const first = await claw.submit(spec, { idempotencyKey: key });
      assert.equal(first.record.status, "queued");
      const again = await claw.submit(spec, { idempotencyKey: key });
      assert.equal(again.record.id, first.record.id, "the same key, the same task");
      if (via === "http") assert.deepEqual([first.created, again.created], [true, false]);

      const id = first.record.id;
      const done = await claw.result(id, { timeoutMs: 30_000 });
      assert.equal(done.status, "succeeded");
      assert.deepEqual(done.result, { slept_s: 0.3, echo: "hi" });
      assert.deepEqual(await claw.resultValue(id), done.result);

      const events = (await collect(claw, session, 0, ended([id]))).filter((e) => e.task_id === id);
      const statuses = events.flatMap((e) => (e.type === "status" ? [e.data.status] : []));
      // The gateway's `queued` may land after the worker's `running` (PROTOCOL, "Events").
      assert.deepEqual([...statuses].sort(), ["queued", "running", "succeeded"]);
      assert.equal(statuses.at(-1), "succeeded");
      assert.ok(events.some((e) => e.type === "progress"), "progress events");
      // Protocol 5: the end is one event, the succeeded status, and it carries the result.
      const end = events.at(-1);
      assert.ok(end?.type === "status" && end.data.status === "succeeded", "the end is the last event");
      assert.deepEqual((end.data as { result?: unknown }).result, { slept_s: 0.3, echo: "hi" });
      assert.ok(!events.some((e) => e.type === "result"), "no separate result event");
      const seqs = events.map((e) => e.seq);
      assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b));
      assert.equal(new Set(seqs).size, seqs.length);
    });

    it("answers errors with PROTOCOL's codes", async () => {
      const claw = clients[via];
      await assert.rejects(claw.get("no-such-task"), (e: ClawError) => e instanceof ClawError && e.code === "not_found" && e.status === 404);
      await assert.rejects(
        claw.submit({ kind: "sleep", input: { seconds: -1 } }),
        (e: ClawError) => e.code === "invalid_request" && e.status === 422 && e.field === "input.seconds" && !e.retryable,
      );
      const { record } = await claw.submit({ kind: "sleep", session: `ts-${via}-errors`, input: { seconds: 0 } });
      await claw.result(record.id, { timeoutMs: 30_000 });
      await assert.rejects(claw.pause(record.id), (e: ClawError) => e.code === "conflict" && e.status === 409 && e.taskStatus === "succeeded");
    });

    it("pauses, resumes, cancels and retries a running task", async () => {
      const claw = clients[via];
      const { record } = await claw.submit({ kind: "sleep", session: `ts-${via}-control`, input: { seconds: 60, steps: 60 } });
      await running(claw, record.id);
      assert.equal((await claw.pause(record.id)).status, "paused");
      assert.equal((await claw.resume(record.id)).status, "running");
      const cancelled = await claw.cancel(record.id);
      assert.deepEqual([cancelled.status, cancelled.cause], ["cancelled", "user"]);
      const end = await claw.result(record.id, { timeoutMs: 30_000 });
      assert.equal(end.status, "cancelled", "a cancelled task is a result, not an error");
      assert.equal((await claw.retry(record.id)).status, "queued");
      await running(claw, record.id);
      assert.equal((await claw.cancel(record.id)).status, "cancelled");
    });

    it("resumes a watch from any sequence with nothing skipped or repeated", async () => {
      const claw = clients[via];
      const session = `ts-${via}-since`;
      const ids: string[] = [];
      for (let i = 0; i < 4; i++) {
        ids.push((await claw.submit({ kind: "sleep", session, input: { seconds: 0.05, steps: 2 } })).record.id);
      }
      const all = await collect(claw, session, 0, ended(ids));
      for (const cut of [0, 1, Math.floor(all.length / 2), all.length - 2]) {
        const since = all[cut]!.seq;
        const rest = await collect(claw, session, since, (events) => events.at(-1)?.seq === all.at(-1)!.seq);
        assert.deepEqual(rest.map((e) => e.seq), all.slice(cut + 1).map((e) => e.seq), `since ${since}`);
      }
    });

    it("reads a result too large for the record from the object store", async () => {
      const claw = clients[via];
      const echo = "x".repeat(200 * 1024);
      const { record } = await claw.submit({ kind: "sleep", session: `ts-${via}-large`, input: { seconds: 0, echo } });
      const done = await claw.result(record.id, { timeoutMs: 30_000 });
      assert.equal(done.status, "succeeded");
      assert.ok(done.result_ref, "stored, not inline");
      assert.equal(done.result, null);
      assert.deepEqual(await claw.resultValue(done), { slept_s: 0, echo });
    });
  });
}

describe("a watch over HTTP", () => {
  it("ends with the gateway's error when the watch is refused for good", async () => {
    const watch = clients.http.watch("not a session!", { since: 0 });
    await assert.rejects(watch.next(), (e: ClawError) => e instanceof ClawError && e.code === "invalid_request" && e.field === "session");
  });

  it("goes on across gateway restarts (SIGTERM and SIGKILL) without a gap or a duplicate", async () => {
    const session = "ts-restart";
    const reconnects: unknown[] = [];
    const received: WatchedEvent[] = [];
    const stop = new AbortController();
    const watching = (async () => {
      for await (const event of clients.http.watch(session, { since: 0, signal: stop.signal, onReconnect: (_s, cause) => reconnects.push(cause) })) {
        received.push(event);
      }
    })();
    try {
      // Keyed submits over NATS: one refused while the gateway is down is repeated until it is in.
      const ids: string[] = [];
      const submitSome = async (n: number) => {
        for (let i = 0; i < n; i++) {
          const spec = { kind: "sleep", session, input: { seconds: 0.2, steps: 4 } };
          const key = `ts-restart-${ids.length}-${Date.now()}`;
          ids.push((await clients.nats.submit(spec, { idempotencyKey: key, retries: 20 })).record.id);
        }
      };
      // Each round: tasks whose events are published while the gateway restarts, then the
      // watch's reconnection, then every one of those tasks' ends through the new gateway.
      for (const [round, signal] of (["SIGTERM", "SIGKILL"] as const).entries()) {
        await submitSome(5);
        await system.restartGateway(signal);
        await waitFor(`the watch to reconnect after the ${signal}`, 30_000, () => reconnects.length > round);
        for (const id of ids) assert.equal((await clients.nats.result(id, { timeoutMs: 60_000 })).status, "succeeded");
        await waitFor(`every task's end after the ${signal}`, 60_000, () => ended(ids)(received));
      }
    } finally {
      stop.abort();
      await watching;
    }

    assert.ok(reconnects.length >= 2, `reconnected after each restart: ${reconnects.length}`);
    // What the stream holds for the session, read straight from NATS, up to the last received.
    const last = received.at(-1)!.seq;
    const stored = await collect(clients.nats, session, 0, (events) => events.at(-1)!.seq >= last);
    assert.deepEqual(received.map((e) => e.seq), stored.map((e) => e.seq));
  });
});

describe("a watch over NATS", () => {
  it("goes on across a nats-server SIGKILL and restart without a gap or a duplicate", async () => {
    const session = "ts-nats-restart";
    const received: WatchedEvent[] = [];
    const stop = new AbortController();
    const watching = (async () => {
      for await (const event of clients.nats.watch(session, { since: 0, signal: stop.signal })) received.push(event);
    })();
    const ids: string[] = [];
    const submitSome = async (n: number) => {
      for (let i = 0; i < n; i++) {
        const spec = { kind: "sleep", session, input: { seconds: 0.2, steps: 4 } };
        const key = `ts-nats-restart-${ids.length}-${Date.now()}`;
        ids.push((await clients.nats.submit(spec, { idempotencyKey: key, retries: 20 })).record.id);
      }
    };
    try {
      await submitSome(5);
      await system.restartNats();
      // A submit sent while the client reconnects can go unanswered: it is repeated after the
      // request timeout (10 s), under its key.
      await submitSome(5);
      for (const id of ids) assert.equal((await clients.nats.result(id, { timeoutMs: 60_000 })).status, "succeeded");
      // The ordered consumer notices its server went away within a pull (5 s) and resumes.
      await waitFor("every task's end after the restart", 30_000, () => ended(ids)(received));
    } finally {
      stop.abort();
      await watching;
    }
    const last = received.at(-1)!.seq;
    const stored = await collect(clients.http, session, 0, (events) => events.at(-1)!.seq >= last);
    assert.deepEqual(received.map((e) => e.seq), stored.map((e) => e.seq));
  });
});
