// The plugin in a real OpenClaw gateway (openclaw 2026.9.6 from npm) against the task system as
// `claw up` runs it, with a mock model that calls claw_run (test/mock-llm.ts).
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { Kvm, type KV } from "@nats-io/kv";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { Claw, isTerminal, type TaskRecord } from "@openclaw-claw/client";
import { ClawUp, OpenClaw, waitFor } from "./harness.js";
import { MockLlm } from "./mock-llm.js";
import { sessionOf, type Entry } from "../src/outbox.js";

const dir = mkdtempSync(join(tmpdir(), "claw-openclaw-e2e-"));
let up: ClawUp;
let mock: Awaited<ReturnType<typeof MockLlm.start>>;
let oc: OpenClaw;
let nc: NatsConnection;
let claw: Claw;
let outbox: KV;

before(async () => {
  up = await ClawUp.start(dir);
  mock = await MockLlm.start();
  // The plugin connects as the `openclaw` user, as docs/OPENCLAW.md says; the test looks on
  // as the read-only `operator`.
  oc = await OpenClaw.create(dir, mock.url, { nats: { servers: up.natsUrl, ...up.natsUser("openclaw") }, defaultKind: "exec" });
  await oc.start();
  const operator = up.natsUser("operator");
  nc = await connect({ servers: up.natsUrl, user: operator.user, pass: operator.password, inboxPrefix: operator.inboxPrefix });
  claw = await Claw.connect({ nats: { nc } });
  outbox = await waitFor("the plugin to create its outbox", 30_000, async () => {
    const kv = await new Kvm(nc).open("openclaw");
    await kv.status(); // throws while the bucket does not exist
    return kv;
  });
});

after(async () => {
  await oc?.stop().catch(() => undefined);
  await nc?.close().catch(() => undefined);
  await mock?.close().catch(() => undefined);
  await up?.stop().catch(() => undefined);
  if (process.env.KEEP_TEST_DIR) {
    writeFileSync(join(dir, "mock-seen.json"), JSON.stringify(mock?.seen ?? [], null, 1));
    console.log(`kept ${dir}`);
  }
  else rmSync(dir, { recursive: true, force: true });
});

/** The outbox entry of a task started from `sessionKey`. */
async function entry(sessionKey: string, id: string): Promise<Entry | undefined> {
  const e = await outbox.get(`${sessionOf("main", sessionKey)}.${id}`);
  return e?.operation === "PUT" ? e.json<Entry>() : undefined;
}

/** Sends `RUN <seconds>` and returns the task id from the tool's answer the turn ended with. */
async function startTask(sessionKey: string, seconds: number): Promise<{ id: string; toolMs: number }> {
  const before = mock.seen.length;
  const reply = await oc.chat(sessionKey, `RUN ${seconds}`);
  const id = /^started: Started background task ([0-9a-f-]{36})/.exec(reply)?.[1];
  assert.ok(id, `the turn ended with the tool's answer, got: ${reply}`);
  // The model's tool call went out with the answer to one request; the tool's answer came back
  // in the next one: the time between them is the tool's (plus OpenClaw's own step).
  const mine = mock.seen.slice(before);
  const call = mine.findIndex((s) => s.decision.kind === "tool");
  const answer = mine.findIndex((s, i) => i > call && s.tool !== undefined);
  assert.ok(call >= 0 && answer > call, "the model called claw_run and got its answer");
  return { id, toolMs: mine[answer]!.at - mine[call]!.at };
}

/** The session's transcript messages that deliver `id`'s end. */
async function deliveries(sessionKey: string, id: string): Promise<{ role: string; text: string }[]> {
  return (await oc.history(sessionKey)).filter((m) => m.text.includes(`[claw-task ${id}]`) || m.text.includes(`DELIVERED ${id}`));
}

async function delivered(sessionKey: string, id: string): Promise<{ role: string; text: string }[]> {
  await waitFor(`${id} delivered`, 120_000, async () => (await entry(sessionKey, id))?.state === "delivered", 250);
  // The delivery's turn: its message, then the model's answer to it.
  return waitFor(`the answer to ${id}'s delivery`, 60_000, async () => {
    const found = await deliveries(sessionKey, id);
    return found.some((m) => m.role === "assistant") ? found : undefined;
  }, 1_000);
}

describe("the claw plugin in a real OpenClaw gateway", () => {
  test("a 20 s task: the tool returns at once, the session answers meanwhile, the result arrives once", async () => {
    const session = "agent:main:claw-e2e-run";
    const { id, toolMs } = await startTask(session, 20);
    assert.ok(toolMs < 1_000, `claw_run answered within a second (${toolMs} ms)`);
    const running = await waitFor("progress", 30_000, async () => {
      const r = await claw.get(id);
      return (r.progress?.fraction ?? 0) >= 0.1 ? r : undefined;
    });
    assert.equal(running.status, "running");
    assert.equal(running.session, sessionOf("main", session));

    // The session is not blocked: another message is answered while the task runs, and the
    // agent has been told the task's progress.
    // (Through chat.send, as the Control UI and the TUI send: OpenClaw gives queued system
    // events to those turns, not to its OpenAI-compatible HTTP endpoint's.)
    const operator = await oc.connect();
    let reply: string;
    try {
      await operator.call("chat.send", { sessionKey: session, message: "how is it going?", idempotencyKey: `ask-${id}` });
      reply = await waitFor("the answer to the second message", 60_000, async () =>
        (await oc.history(session)).map((m) => m.text).find((t) => t.startsWith("reply to: how is it going?")),
      1_000);
    } finally {
      operator.close();
    }
    assert.match(reply, new RegExp(`progress seen: ${id} \\d+%`));
    assert.ok(!isTerminal((await claw.get(id)).status), "answered while the task still ran");

    const found = await delivered(session, id);
    assert.equal((await claw.get(id)).status, "succeeded");
    assert.deepEqual(
      found.map((m) => m.role),
      ["user", "assistant"],
      `one delivery and one answer: ${JSON.stringify(found)}`,
    );
    assert.match(found[0]!.text, /has succeeded\.\nResult:\n[^]*"answer": 42/);
    assert.equal(found[1]!.text, `DELIVERED ${id} succeeded`);
  });

  test("the OpenClaw gateway killed while the task runs: the result still arrives, once", async () => {
    const session = "agent:main:claw-e2e-restart";
    const { id } = await startTask(session, 20);
    await waitFor("the task to run", 30_000, async () => (await claw.get(id)).status === "running");
    await oc.kill();
    await oc.start();
    const found = await delivered(session, id);
    assert.equal((await claw.get(id)).status, "succeeded");
    assert.deepEqual(found.map((m) => m.role), ["user", "assistant"], `one delivery and one answer: ${JSON.stringify(found)}`);
  });

  /** Starts a `slow-job` of `seconds` in the session and returns its id and its program's pid. */
  async function runningProgram(session: string, seconds: number): Promise<{ id: string; pid: number }> {
    const { id } = await startTask(session, seconds);
    const record: TaskRecord = await waitFor("the program's pid", 30_000, async () => {
      const r = await claw.get(id);
      return /pid \d+/.test(r.progress?.message ?? "") ? r : undefined;
    });
    const pid = Number(/pid (\d+)/.exec(record.progress!.message!)![1]);
    process.kill(pid, 0); // alive
    return { id, pid };
  }

  async function cancelledAndGone(session: string, id: string, pid: number): Promise<void> {
    const cancelled = await waitFor("the task cancelled", 30_000, async () => {
      const r = await claw.get(id);
      return r.status === "cancelled" ? r : undefined;
    });
    assert.equal(cancelled.cause, "user");
    await waitFor(`pid ${pid} gone`, 30_000, () => {
      try {
        process.kill(pid, 0);
        return false;
      } catch (e) {
        return (e as NodeJS.ErrnoException).code === "ESRCH";
      }
    });
    // The session asked for it: no delivery turn follows.
    assert.equal((await entry(session, id))?.state, "dropped");
  }

  test("/stop while the agent works cancels the session's tasks: cancelled, cause user, process gone", async () => {
    const session = "agent:main:claw-e2e-stop";
    const { id, pid } = await runningProgram(session, 300);
    // A later turn still running (the model thinking), stopped the way the Control UI and the
    // TUI stop one: `/stop` through chat.send.
    const thinking = mock.seen.length;
    const operator = await oc.connect();
    try {
      await operator.call("chat.send", { sessionKey: session, message: "THINK 120", idempotencyKey: `think-${id}` });
      await waitFor("the model to be thinking", 60_000, () => mock.seen.slice(thinking).some((s) => /THINK 120/.test(s.user)));
      const stop = await operator.call("chat.send", { sessionKey: session, message: "/stop", idempotencyKey: `stop-${id}` });
      assert.equal(stop.aborted, true, `the turn was aborted: ${JSON.stringify(stop)}`);
    } finally {
      operator.close();
    }
    await cancelledAndGone(session, id, pid);
  });

  test("asking the agent to cancel (claw_cancel) cancels the session's task", async () => {
    const session = "agent:main:claw-e2e-cancel";
    const { id, pid } = await runningProgram(session, 300);
    const reply = await oc.chat(session, "CANCEL");
    assert.match(reply, new RegExp(`^started: Cancelled ${id}\\.`));
    await cancelledAndGone(session, id, pid);
  });
});
