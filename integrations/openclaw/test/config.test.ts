// The plugin's settings: defaults, and a clear error for each wrong one. The manifest's schema
// is checked to name the same keys, so what OpenClaw validates and what the code reads agree.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { ConfigError, parseConfig } from "../src/config.js";
import { sessionOf } from "../src/outbox.js";
import { pluginDir } from "./harness.js";

test("defaults, with only the NATS URL given", () => {
  const c = parseConfig({ nats: { servers: "nats://127.0.0.1:4222" } });
  assert.deepEqual(c, {
    nats: { servers: ["nats://127.0.0.1:4222"] },
    defaultKind: "exec",
    maxPerSession: 4,
    bucket: "openclaw",
    progress: true,
    maxResultChars: 4000,
    deliveryLeaseMs: 60_000,
    cancelOnStop: true,
  });
});

test("each wrong setting is refused with what is wrong", () => {
  const cases: [unknown, RegExp][] = [
    [undefined, /nats.servers is required/],
    [{ nats: { servers: [] } }, /nats.servers is required/],
    [{ nats: { servers: "nats://x" }, maxPerSession: 0 }, /maxPerSession must be an integer from 1 to 1000/],
    [{ nats: { servers: "nats://x" }, bucket: "a.b" }, /bucket must be 1-64 characters/],
    [{ nats: { servers: "nats://x" }, kinds: ["llm"] }, /defaultKind exec is not in kinds/],
    [{ nats: { servers: "nats://x" }, gateway: {} }, /gateway.url is required/],
    [{ nats: { servers: "nats://x" }, progress: "yes" }, /progress must be true or false/],
  ];
  for (const [raw, message] of cases) assert.throws(() => parseConfig(raw), (e: unknown) => e instanceof ConfigError && message.test(e.message), String(message));
});

test("the manifest's config schema names exactly the settings the code reads", () => {
  const manifest = JSON.parse(readFileSync(join(pluginDir, "openclaw.plugin.json"), "utf8"));
  assert.deepEqual(Object.keys(manifest.configSchema.properties).sort(), [
    "bucket", "cancelOnStop", "defaultKind", "deliveryLeaseS", "gateway", "kinds", "maxPerSession", "maxResultChars", "nats", "progress",
  ]);
  assert.deepEqual(manifest.contracts.tools, ["claw_run", "claw_status", "claw_cancel"]);
});

test("a session's task-system session is a token, stable, and apart per agent", () => {
  const s = sessionOf("main", "agent:main:telegram:dm:+15551234567");
  assert.match(s, /^oc-[A-Za-z0-9_-]{22}$/);
  assert.equal(s, sessionOf("main", "agent:main:telegram:dm:+15551234567"));
  assert.notEqual(s, sessionOf("other", "agent:main:telegram:dm:+15551234567"));
});
