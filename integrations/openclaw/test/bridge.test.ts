// The bridge (what the tools and the delivery service do, without OpenClaw) against the
// deployment as shipped, connected as the shipped `openclaw` role: the role's permissions are
// exactly what the plugin needs. OpenClaw is replaced by a host that records what it was asked
// to do; the plugin in a real OpenClaw is openclaw.e2e.test.ts.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { Bridge, ToolError, type Address, type Host } from "../src/bridge.js";
import { parseConfig, type Config } from "../src/config.js";
import { sessionOf, type Entry } from "../src/outbox.js";
import { deliveryMarker } from "../src/text.js";
import { waitFor } from "./harness.js";
import { password, Shipped } from "./shipped.js";

class RecordingHost implements Host {
  readonly delivered: { to: Address; text: string; key: string }[] = [];
  readonly notes: { to: Address; text: string; key: string }[] = [];
  /** Markers the session's transcript already holds. */
  readonly transcript = new Set<string>();
  deliver(to: Address, text: string, key: string): Promise<void> {
    this.delivered.push({ to, text, key });
    return Promise.resolve();
  }
  transcriptHas(_to: Address, marker: string): Promise<boolean> {
    return Promise.resolve(this.transcript.has(marker));
  }
  notify(to: Address, text: string, key: string): void {
    this.notes.push({ to, text, key });
  }
  log(): void {}
  deliveriesOf(id: string) {
    return this.delivered.filter((d) => d.text.includes(deliveryMarker(id)));
  }
}

const dir = mkdtempSync(join(tmpdir(), "claw-openclaw-bridge-"));
let system: Shipped;

function config(extra: Record<string, unknown> = {}): Config {
  return parseConfig({
    nats: { servers: system.natsUrl, user: "openclaw", password: password("openclaw"), inboxPrefix: "_INBOX.openclaw" },
    defaultKind: "sleep",
    ...extra,
  });
}

before(async () => {
  system = await Shipped.start(dir);
});

after(async () => {
  await system?.stop();
  if (!process.env.KEEP_TEST_DIR) rmSync(dir, { recursive: true, force: true });
});

async function entryOf(bridge: Bridge, from: Address, id: string): Promise<Entry | undefined> {
  return (await bridge.outbox.read(`${sessionOf(from.agentId, from.sessionKey)}.${id}`))?.entry;
}

describe("the bridge, as the shipped openclaw role", () => {
  test("a task's progress reaches the session, its end is delivered once, a cancel is not", async () => {
    const host = new RecordingHost();
    const bridge = await Bridge.connect(config(), host);
    void bridge.serve();
    try {
      const from = { sessionKey: "agent:main:bridge-1", agentId: "main" };
      const done = await bridge.run(from, { input: { seconds: 2, steps: 4 }, label: "nap" });
      assert.equal(done.status, "queued");
      assert.equal(done.session, sessionOf("main", from.sessionKey));
      // A result over 64 KiB is in the object store: read through the role's rights.
      const large = await bridge.run(from, { input: { seconds: 0.5, echo: "e".repeat(100_000) } });
      const stopped = await bridge.run(from, { input: { seconds: 600 } });

      await waitFor("the task delivered", 30_000, async () => (await entryOf(bridge, from, done.id))?.state === "delivered");
      assert.equal(host.deliveriesOf(done.id).length, 1);
      const delivery = host.deliveriesOf(done.id)[0]!;
      assert.deepEqual(delivery.to, from);
      assert.equal(delivery.key, `claw-task-${done.id}`);
      assert.match(delivery.text, /"nap" \(sleep\) you started with claw_run has succeeded\.\nResult:\n[^]*"slept_s": 2/);
      assert.ok(host.notes.some((n) => n.key === `claw:${done.id}` && /is running at (25|50|75)%/.test(n.text)), JSON.stringify(host.notes));

      await waitFor("the large result delivered", 30_000, () => host.deliveriesOf(large.id).length === 1);
      assert.match(host.deliveriesOf(large.id)[0]!.text, /"echo": "e{100,}…? ?/);
      assert.match(host.deliveriesOf(large.id)[0]!.text, /more characters: claw_status shows the whole result/);

      const status = await bridge.status(from);
      assert.deepEqual(new Set(status.map((s) => s.entry.task)), new Set([done.id, large.id, stopped.id]));

      const cancelled = await bridge.cancel(from);
      assert.deepEqual(cancelled.map((r) => r.id), [stopped.id]);
      assert.equal(cancelled[0]!.status, "cancelled");
      assert.equal(cancelled[0]!.cause, "user");
      assert.equal((await entryOf(bridge, from, stopped.id))?.state, "dropped");
      // The cancel is the session's own doing: no message about it follows.
      await waitFor("the cancel to be final", 10_000, async () => (await bridge.claw.get(stopped.id)).status === "cancelled");
      assert.equal(host.deliveriesOf(stopped.id).length, 0);
    } finally {
      await bridge.close();
    }
  });

  test("refusals: an unknown kind names the system's reason and leaves no outbox entry; the per-session limit", async () => {
    const host = new RecordingHost();
    const bridge = await Bridge.connect(config({ maxPerSession: 2 }), host);
    try {
      const from = { sessionKey: "agent:main:bridge-2", agentId: "main" };
      await assert.rejects(bridge.run(from, { kind: "no-such-kind", input: {} }), (e: unknown) => e instanceof ToolError && /refused it \(invalid_request, field kind\)/.test(e.message));
      assert.deepEqual(await bridge.outbox.ofSession(sessionOf("main", from.sessionKey)), []);
      const a = await bridge.run(from, { input: { seconds: 600 } });
      const b = await bridge.run(from, { input: { seconds: 600 } });
      await assert.rejects(bridge.run(from, { input: { seconds: 1 } }), (e: unknown) => e instanceof ToolError && e.message.includes(a.id) && e.message.includes(b.id));
      // Another session is not limited by this one.
      await bridge.run({ sessionKey: "agent:main:bridge-2b", agentId: "main" }, { input: { seconds: 0.1 } });
      await bridge.cancel(from);
    } finally {
      await bridge.close();
    }
  });

  test("two gateways on one outbox: each result is delivered by one of them, once", async () => {
    const hosts = [new RecordingHost(), new RecordingHost()];
    const bridges = await Promise.all(hosts.map((h) => Bridge.connect(config({ maxPerSession: 10 }), h)));
    bridges.forEach((b) => void b.serve());
    try {
      const from = { sessionKey: "agent:main:bridge-3", agentId: "main" };
      const ids = [];
      for (let i = 0; i < 6; i++) ids.push((await bridges[i % 2]!.run(from, { input: { seconds: 0.2 } })).id);
      for (const id of ids) {
        await waitFor(`${id} delivered`, 30_000, async () => (await entryOf(bridges[0]!, from, id))?.state === "delivered");
      }
      for (const id of ids) {
        assert.equal(hosts[0]!.deliveriesOf(id).length + hosts[1]!.deliveriesOf(id).length, 1, id);
      }
    } finally {
      await Promise.all(bridges.map((b) => b.close()));
    }
  });

  test("a delivery left half done by a gateway that died is taken over after the lease, not sent twice", async () => {
    const host = new RecordingHost();
    const bridge = await Bridge.connect(config({ deliveryLeaseS: 5 }), host);
    try {
      const from = { sessionKey: "agent:main:bridge-4", agentId: "main" };
      const session = sessionOf("main", from.sessionKey);
      // Two finished tasks whose deliveries a dead gateway claimed: one message reached the
      // session before it died (the transcript has it), the other did not.
      const ids: string[] = [];
      for (const _ of [0, 1]) {
        const { record } = await bridge.claw.submit({ kind: "sleep", input: { seconds: 0.1 }, session });
        await waitFor(`${record.id} done`, 30_000, async () => (await bridge.claw.get(record.id)).status === "succeeded");
        ids.push(record.id);
      }
      const [reached, lost] = ids as [string, string];
      const claimedAt = new Date(Date.now() - 2_000).toISOString();
      for (const id of ids) {
        await bridge.outbox.add({
          v: 1, task: id, session, session_key: from.sessionKey, agent_id: "main", kind: "sleep", label: null,
          state: "delivering", claimed_by: "dead-gateway", claimed_at: claimedAt, created_at: claimedAt,
        });
      }
      host.transcript.add(deliveryMarker(reached));
      const started = Date.now();
      void bridge.serve();
      for (const id of ids) {
        await waitFor(`${id} settled`, 30_000, async () => (await entryOf(bridge, from, id))?.state === "delivered");
      }
      // Not before the dead gateway's lease (5 s from its claim) ran out.
      assert.ok(Date.now() - started >= 2_500, `taken over after the lease (${Date.now() - started} ms)`);
      assert.equal(host.deliveriesOf(reached).length, 0, "the message already in the session is not sent again");
      assert.equal(host.deliveriesOf(lost).length, 1, "the lost one is sent");
    } finally {
      await bridge.close();
    }
  });

  test("with gateway.url, submits and cancels go through the gateway's HTTP API; the delivery is the same", async () => {
    const host = new RecordingHost();
    const bridge = await Bridge.connect(config({ gateway: { url: system.httpUrl } }), host);
    void bridge.serve();
    try {
      const from = { sessionKey: "agent:main:bridge-http", agentId: "main" };
      const done = await bridge.run(from, { input: { seconds: 0.5 } });
      const stopped = await bridge.run(from, { input: { seconds: 600 } });
      await waitFor("the task delivered", 30_000, async () => (await entryOf(bridge, from, done.id))?.state === "delivered");
      assert.equal(host.deliveriesOf(done.id).length, 1);
      const [cancelled] = await bridge.cancel(from, stopped.id);
      assert.equal(cancelled?.cause, "user");
      await assert.rejects(bridge.run(from, { kind: "no-such-kind", input: {} }), (e: unknown) => e instanceof ToolError && /invalid_request, field kind/.test(e.message));
    } finally {
      await bridge.close();
    }
  });

  test("no permission violations in the server's log", () => {
    assert.deepEqual(system.violations(), []);
  });
});
