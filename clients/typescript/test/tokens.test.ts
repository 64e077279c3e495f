// The client against a gateway with API tokens: its HTTP watch opens each socket with a
// single-use ticket (POST /v1/ws-ticket), never with the token, across a gateway restart too;
// and a watch from a sequence the stream no longer holds reports the gap (over HTTP and NATS).
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { connect } from "@nats-io/transport-node";
import { jetstreamManager } from "@nats-io/jetstream";
import { Claw, ClawError, type WatchedEvent } from "../src/index.js";
import { System, waitFor } from "./harness.js";

const ALICE = "claw_alice-ts-0123456789abcdef";
let system: System;
let alice: Claw;

before(async () => {
  system = await System.start({ tokens: `[principals.alice]\ntokens = ["${ALICE}"]\n` });
  alice = await Claw.connect({ http: { url: system.httpUrl, token: ALICE } });
});

after(async () => {
  await alice?.close();
  await system?.stop();
});

describe("a watch with an API token", () => {
  it("opens its sockets with tickets and sees its session's events across a restart", async () => {
    const session = "ts-tokens";
    const received: WatchedEvent[] = [];
    const reconnects: unknown[] = [];
    const stop = new AbortController();
    const watching = (async () => {
      const options = { since: 0, signal: stop.signal, onReconnect: (_s: unknown, cause: unknown) => reconnects.push(cause) };
      for await (const event of alice.watch(session, options)) received.push(event);
    })();
    const succeeded = (id: string) => () =>
      received.some((e) => e.task_id === id && e.type === "status" && (e.data as { status?: string }).status === "succeeded");
    try {
      const first = (await alice.submit({ kind: "sleep", session, input: { seconds: 0.1 } })).record;
      await waitFor("the first task's end on the watch", 30_000, succeeded(first.id));
      // A restart drops the socket: the reconnect needs a new ticket (the first one is spent).
      await system.restartGateway("SIGKILL");
      await waitFor("the watch to reconnect", 30_000, () => reconnects.length > 0);
      const second = (await alice.submit({ kind: "sleep", session, input: { seconds: 0.1 } }, { retries: 20 })).record;
      await waitFor("the second task's end on the watch", 30_000, succeeded(second.id));
    } finally {
      stop.abort();
      await watching;
    }
  });

  it("a wrong token ends the watch with unauthorized", async () => {
    const mallory = await Claw.connect({ http: { url: system.httpUrl, token: "claw_wrong-0123456789abcdef" } });
    try {
      const watch = mallory.watch("ts-tokens", { since: 0 });
      await assert.rejects(watch.next(), (e: ClawError) => e instanceof ClawError && e.code === "unauthorized");
    } finally {
      await mallory.close();
    }
  });
});

describe("a watch from a sequence the stream no longer holds", () => {
  it("reports the gap, over HTTP and over NATS, then delivers what is stored", async () => {
    const nats = await Claw.connect({ nats: { servers: system.natsUrl } });
    const nc = await connect({ servers: system.natsUrl });
    try {
      const session = "ts-gap";
      // alice's tasks are in her namespace, the NATS ones in the unowned one: one pair per way.
      const ways = [["http", alice], ["nats", nats]] as const;
      const run = async (claw: Claw) => {
        const { record } = await claw.submit({ kind: "sleep", session, input: { seconds: 0.05 } });
        assert.equal((await claw.result(record.id, { timeoutMs: 30_000 })).status, "succeeded");
        return record.id;
      };
      for (const [, claw] of ways) await run(claw);
      // The stream forgets everything up to now, as its limits would.
      const jsm = await jetstreamManager(nc);
      const evicted = (await jsm.streams.info("PROGRESS")).state.last_seq;
      await jsm.streams.purge("PROGRESS", { seq: evicted + 1 });
      for (const [via, claw] of ways) {
        const fresh = await run(claw);
        const gaps: [number, number][] = [];
        const events: WatchedEvent[] = [];
        const stop = new AbortController();
        for await (const e of claw.watch(session, { since: 1, signal: stop.signal, onGap: (from, to) => gaps.push([from, to]) })) {
          events.push(e);
          if (e.task_id === fresh && e.type === "status" && (e.data as { status?: string }).status === "succeeded") break;
        }
        assert.deepEqual(gaps, [[2, evicted]], `${via}: the gap`);
        assert.ok(events.every((e) => e.seq > evicted), `${via}: then what is stored`);
      }
    } finally {
      await nc.close();
      await nats.close();
    }
  });
});
