import fs from "node:fs";
import { definePluginEntry } from "openclaw/plugin-sdk/plugin-entry";

const LOG = process.env.CLAW_TRY_LOG || "/tmp/openclaw-try/state/claw-try.log";
function log(...a) {
  const line = `${new Date().toISOString()} [claw-try pid=${process.pid}] ${a.map((x) => (typeof x === "string" ? x : JSON.stringify(x))).join(" ")}\n`;
  try { fs.appendFileSync(LOG, line); } catch {}
}

// register() is called several times (modes "full", "discovery", "tool-discovery", ...).
// Only the api from the "full" registration can commit workflow side effects
// (enqueueNextTurnInjection returns {enqueued:false} on a discovery-mode api), so keep it.
let fullApi = null;

export default definePluginEntry({
  id: "claw-try",
  name: "Claw Try",
  description: "Test plugin: claw_echo tool + background service",
  register(apiArg) {
    const api = apiArg;
    log("register() called", { registrationMode: api.registrationMode, pluginConfig: api.pluginConfig });
    if (api.registrationMode === "full") { fullApi = api; globalThis.__clawTryFullApi = api; }
    const cfg = api.pluginConfig || {};
    const defaultFollowUp = cfg.followUp || "none";
    const delay = cfg.followUpDelayMs ?? 3000;

    async function doFollowUp(sessionKey, agentId, tag, followUp) {
      const marker = `INJECT-${tag}`;
      const api = fullApi ?? globalThis.__clawTryFullApi ?? apiArg;
      log("follow-up start", { followUp, sessionKey, agentId, marker, usingApiMode: api.registrationMode });
      const doInject = ["inject", "inject-heartbeat", "both"].includes(followUp);
      const doBeat = ["heartbeat", "inject-heartbeat", "both"].includes(followUp);
      if (doInject) {
        try {
          const r1 = await api.session.workflow.enqueueNextTurnInjection({
            sessionKey, agentId, text: `Background result ${marker}-inj is ready.`, idempotencyKey: `${marker}-inj`,
          });
          log("enqueueNextTurnInjection ->", r1);
        } catch (e) { log("enqueueNextTurnInjection ERR", String(e?.stack || e)); }
      }
      if (doBeat) {
        try {
          const r2 = api.runtime.system.enqueueSystemEvent(`Background task done ${marker}-sys`, { sessionKey, agentId, contextKey: `claw-try:${marker}` });
          log("enqueueSystemEvent ->", r2);
        } catch (e) { log("enqueueSystemEvent ERR", String(e?.stack || e)); }
        try {
          const r3 = api.runtime.system.requestHeartbeat({ source: "background-task", intent: "immediate", reason: "background-task", sessionKey, agentId });
          log("requestHeartbeat ->", r3 === undefined ? "undefined" : r3);
        } catch (e) { log("requestHeartbeat ERR", String(e?.stack || e)); }
      }
      if (followUp === "subagent" || followUp === "both") {
        try {
          const r = await api.runtime.subagent.run({ sessionKey, message: `Background result ${marker}-sub is ready.`, deliver: false, idempotencyKey: `${marker}-sub` });
          log("subagent.run ->", r);
          if (r?.runId && api.runtime.subagent.waitForRun) {
            const w = await api.runtime.subagent.waitForRun({ runId: r.runId, timeoutMs: 60000 });
            log("subagent.waitForRun ->", w);
          }
        } catch (e) { log("subagent.run ERR", String(e?.stack || e)); }
      }
    }

    api.registerTool((ctx) => {
      log("tool factory ctx", { sessionKey: ctx.sessionKey, sessionId: ctx.sessionId, agentId: ctx.agentId, messageChannel: ctx.messageChannel });
      return {
        name: "claw_echo",
        label: "Claw Echo",
        description: "Echo text back together with the session key",
        parameters: { type: "object", properties: { text: { type: "string" } }, required: ["text"], additionalProperties: false },
        async execute(toolCallId, params) {
          const text = `claw_echo: ${params?.text ?? ""} (sessionKey=${ctx.sessionKey})`;
          log("tool execute", { toolCallId, params, sessionKey: ctx.sessionKey, agentId: ctx.agentId });
          // "mode=<none|inject|heartbeat|inject-heartbeat|subagent|both>[@tool]" in the text overrides plugin config.
          // Default: the job is queued and run from the service's timer (outside the tool's async context).
          // "@tool": run from a setTimeout created inside execute() (inherits the tool call's async context).
          const m = /mode=([a-z-]+)(@tool)?/.exec(String(params?.text ?? ""));
          const followUp = m ? m[1] : defaultFollowUp;
          if (followUp !== "none") {
            const tag = Date.now().toString(36);
            const job = { sessionKey: ctx.sessionKey, agentId: ctx.agentId, tag, followUp, due: Date.now() + delay };
            if (m?.[2]) {
              setTimeout(() => { doFollowUp(job.sessionKey, job.agentId, tag, followUp).catch((e) => log("follow-up ERR", String(e))); }, delay);
            } else {
              (globalThis.__clawTryQueue ??= []).push(job);
              globalThis.__clawTryRunner = doFollowUp;
            }
          }
          return { content: [{ type: "text", text }], details: { echo: { text: params?.text, sessionKey: ctx.sessionKey } } };
        },
      };
    }, { name: "claw_echo" });

    api.on("agent_turn_prepare", (ev, hctx) => {
      log("hook agent_turn_prepare", { sessionKey: hctx?.sessionKey, queuedInjections: (ev?.queuedInjections || []).map((q) => ({ id: q.id, text: q.text })) });
    });

    api.registerService({
      id: "claw-try-service",
      start(ctx) {
        log("service start", { stateDir: ctx.stateDir });
        ctx.logger?.info?.("claw-try service started");
        globalThis.__clawTryRunner = doFollowUp;
        globalThis.__clawTryTimer = setInterval(() => {
          const q = globalThis.__clawTryQueue ?? [];
          const now = Date.now();
          for (const job of q.filter((j) => j.due <= now)) {
            q.splice(q.indexOf(job), 1);
            doFollowUp(job.sessionKey, job.agentId, job.tag, job.followUp).catch((e) => log("follow-up ERR", String(e)));
          }
        }, 500);
        globalThis.__clawTryTimer.unref?.();
      },
      stop() { log("service stop"); clearInterval(globalThis.__clawTryTimer); },
    });
  },
});
