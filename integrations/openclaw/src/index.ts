// The OpenClaw side: the plugin entry registers the tools, the service that delivers results,
// and the hooks that cancel a stopped session's tasks, and implements `Host` with the plugin API.
//
// OpenClaw calls `register` several times in one process (a `full` registration at start,
// `discovery` ones when it builds a turn's tool list, each from a fresh copy of this module), and
// only the `full` registration's `api` may start turns. So the bridge (one NATS connection) and
// that `api` live on `globalThis`, shared by every copy.
import { appendFileSync } from "node:fs";
import { definePluginEntry, type PluginApi, type ToolContext } from "openclaw/plugin-sdk/plugin-entry";
import { Bridge, ToolError, type Address, type Host, type RunRequest } from "./bridge.js";
import { ConfigError, parseConfig, type Config } from "./config.js";
import { startedText, statusLine } from "./text.js";

interface Shared {
  fullApi?: PluginApi;
  bridge?: Promise<Bridge>;
  unsubscribe?: () => void;
  /** Bumped by each service start and stop: a connect loop of an older one gives up. */
  generation?: number;
}
const SHARED = Symbol.for("@openclaw-claw/openclaw-plugin");
const shared: Shared = ((globalThis as Record<symbol, Shared>)[SHARED] ??= {});

/** The agent of a session key `agent:<id>:...` (OpenClaw's canonical form), else `main`. */
function agentOf(sessionKey: string): string {
  return /^agent:([^:]+):/.exec(sessionKey)?.[1] ?? "main";
}

/** With CLAW_OPENCLAW_LOG set, every line the plugin logs also goes to that file. */
function trace(line: string): void {
  const file = process.env.CLAW_OPENCLAW_LOG;
  if (file) appendFileSync(file, `${new Date().toISOString()} pid=${process.pid} ${line}\n`);
}

function host(api: PluginApi): Host {
  const full = () => shared.fullApi ?? api;
  return {
    async deliver(to, text, idempotencyKey) {
      await full().runtime.subagent.run({ sessionKey: to.sessionKey, message: text, deliver: false, idempotencyKey });
    },
    async transcriptHas(to, marker) {
      const { messages } = await full().runtime.subagent.getSessionMessages({ sessionKey: to.sessionKey, limit: 200 });
      return (messages ?? []).some((m) => JSON.stringify(m).includes(marker));
    },
    notify(to, text, contextKey) {
      try {
        const accepted = full().runtime.system.enqueueSystemEvent(text, { sessionKey: to.sessionKey, agentId: to.agentId, contextKey, replace: true });
        trace(`progress note for ${to.sessionKey}: accepted=${JSON.stringify(accepted)} ${text}`);
      } catch (e) {
        full().logger.warn(`claw: progress note for ${to.sessionKey}: ${String(e)}`);
        trace(`progress note for ${to.sessionKey}: ${String(e)}`);
      }
    },
    log(level, message) {
      full().logger[level](`claw: ${message}`);
      trace(`${level} ${message}`);
    },
  };
}

/**
 * The one bridge of this process, connected on first use (by the service, or a tool call that
 * came first); a failed connect is tried again on the next use. Registrations after the first
 * share it whatever their copy of the config: OpenClaw hands discovery registrations the config
 * in other forms, and replacing the bridge would stop the service's delivery. A changed config
 * takes effect when OpenClaw restarts the service (stop closes the bridge).
 */
function bridge(api: PluginApi, config: Config): Promise<Bridge> {
  if (shared.bridge) return shared.bridge;
  const connecting = Bridge.connect(config, host(api));
  shared.bridge = connecting;
  connecting.catch(() => {
    if (shared.bridge === connecting) shared.bridge = undefined;
  });
  return connecting;
}

function text(message: string, details: Record<string, unknown> = {}) {
  return { content: [{ type: "text" as const, text: message }], details };
}

function addressOf(ctx: ToolContext): Address {
  if (!ctx.sessionKey) throw new ToolError("this tool needs a session (it was called outside one)");
  return { sessionKey: ctx.sessionKey, agentId: ctx.agentId ?? agentOf(ctx.sessionKey) };
}

async function cancelSession(api: PluginApi, config: Config, sessionKey: string | undefined, why: string): Promise<void> {
  if (!sessionKey || !config.cancelOnStop) return;
  try {
    const b = await bridge(api, config);
    const cancelled = await b.cancel({ sessionKey, agentId: agentOf(sessionKey) }, undefined, why);
    if (cancelled.length > 0) api.logger.info(`claw: ${why}: cancelled ${cancelled.map((r) => r.id).join(", ")}`);
  } catch (e) {
    api.logger.warn(`claw: cancelling the tasks of ${sessionKey} (${why}): ${String(e)}`);
  }
}

const KINDS_HELP =
  'Kinds: "exec" runs a program the task system\'s operator configured (input {"program": NAME, "args"?: [...], "stdin"?}); ' +
  '"llm" makes one model call (input {"prompt"} or {"messages"}); "sleep" waits (input {"seconds"}); others as the operator installed.';

export default definePluginEntry({
  id: "claw",
  name: "Claw task gateway",
  description: "Hand long work to the OpenClaw async task gateway; results come back to the session once.",
  register(api: PluginApi) {
    let config: Config;
    try {
      config = parseConfig(api.pluginConfig);
    } catch (e) {
      if (e instanceof ConfigError) {
        api.logger.error(`claw: plugin config: ${e.message}`);
        return;
      }
      throw e;
    }
    trace(`register mode=${api.registrationMode}`);
    if (api.registrationMode === "full") shared.fullApi = api;

    api.registerTool(
      (ctx: ToolContext) => ({
        name: "claw_run",
        label: "Run in the background",
        description:
          "Hand long work (minutes to hours) to the background task system and return at once with its task id. " +
          "The result comes back to this session as a new message when the task ends; do not wait for it. " +
          KINDS_HELP,
        parameters: {
          type: "object",
          additionalProperties: false,
          properties: {
            kind: { type: "string", description: `The task kind (default ${config.defaultKind}).` },
            input: { description: "The kind's input (JSON)." },
            label: { type: "string", description: "A short name for the task, shown with its result." },
            class: { type: "string", enum: ["short", "long"], description: "Lane class: short (< 60 s expected) or long." },
            priority: { type: "string", enum: ["high", "normal", "low"] },
            timeout_s: { type: "integer", minimum: 1, description: "Per attempt." },
          },
          required: ["input"],
        },
        async execute(_toolCallId: string, params: RunRequest) {
          const b = await bridge(api, config);
          const from = addressOf(ctx);
          const record = await b.run(from, params ?? {});
          return text(startedText({ kind: record.kind, label: params?.label ?? null }, record), {
            task_id: record.id,
            status: record.status,
            session: record.session,
          });
        },
      }),
      { name: "claw_run" },
    );

    api.registerTool(
      (ctx: ToolContext) => ({
        name: "claw_status",
        label: "Background task status",
        description: "The status, progress and (once done) result of this session's background tasks, or of one by id.",
        parameters: {
          type: "object",
          additionalProperties: false,
          properties: { id: { type: "string", description: "A task id from claw_run (default: all of this session's)." } },
        },
        async execute(_toolCallId: string, params: { id?: string }) {
          const b = await bridge(api, config);
          const rows = await b.status(addressOf(ctx), params?.id);
          if (rows.length === 0) return text("This session has no background tasks.", { tasks: [] });
          return text(rows.map((r) => statusLine(r.entry, r.record, config.maxResultChars)).join("\n"), {
            tasks: rows.map((r) => ({ id: r.entry.task, status: r.record?.status ?? null, delivery: r.entry.state })),
          });
        },
      }),
      { name: "claw_status" },
    );

    api.registerTool(
      (ctx: ToolContext) => ({
        name: "claw_cancel",
        label: "Cancel background tasks",
        description: "Cancel one of this session's background tasks by id, or all of its unfinished ones.",
        parameters: {
          type: "object",
          additionalProperties: false,
          properties: { id: { type: "string", description: "The task id (default: every unfinished task of this session)." } },
        },
        async execute(_toolCallId: string, params: { id?: string }) {
          const b = await bridge(api, config);
          const cancelled = await b.cancel(addressOf(ctx), params?.id, "claw_cancel");
          const ids = cancelled.map((r) => r.id);
          return text(ids.length === 0 ? "Nothing was running." : `Cancelled ${ids.join(", ")}.`, { cancelled: ids });
        },
      }),
      { name: "claw_cancel" },
    );

    // /stop in a channel chat, and (below) an aborted turn, /new, /reset: the session's tasks stop.
    api.registerHook(
      "command:stop",
      async (event: { sessionKey?: string }) => cancelSession(api, config, event?.sessionKey, "/stop"),
      { name: "claw-cancel-on-stop", description: "Cancels the session's background tasks on /stop" },
    );
    api.on("session_end", async (event: { reason?: string; sessionKey?: string }, ctx: { sessionKey?: string }) => {
      if (["new", "reset", "deleted"].includes(event?.reason ?? "")) {
        await cancelSession(api, config, ctx?.sessionKey ?? event?.sessionKey, `session ${event.reason}`);
      }
    });

    api.registerService({
      id: "claw-bridge",
      start() {
        shared.unsubscribe?.();
        shared.unsubscribe = api.runtime.events.onAgentEvent((event) => {
          const data = event?.data as { phase?: string; aborted?: boolean } | undefined;
          if (event?.stream === "lifecycle" && data?.phase === "end" && data.aborted === true) {
            void cancelSession(api, config, event.sessionKey, "turn aborted");
          }
        });
        // Not awaited: OpenClaw starts whether or not the task system is up; a tool call or the
        // retry below connects later.
        const generation = (shared.generation = (shared.generation ?? 0) + 1);
        const serve = async () => {
          while (shared.generation === generation) {
            try {
              const b = await bridge(api, config);
              api.logger.info(`claw: connected to ${config.nats.servers.join(", ")}; following the outbox ${config.bucket}`);
              await b.serve();
              return;
            } catch (e) {
              api.logger.warn(`claw: task system not reachable (${String(e)}); trying again in 5 s`);
              await new Promise((r) => setTimeout(r, 5_000).unref());
            }
          }
        };
        void serve();
      },
      async stop() {
        shared.generation = (shared.generation ?? 0) + 1; // ends a retry loop still waiting to connect
        shared.unsubscribe?.();
        shared.unsubscribe = undefined;
        const b = shared.bridge;
        shared.bridge = undefined;
        await b?.then((x) => x.close()).catch(() => undefined);
      },
    });
  },
});
