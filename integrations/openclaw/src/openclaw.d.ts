// The part of OpenClaw's plugin SDK (openclaw 2026.9.x) this plugin uses, declared here so that
// it compiles without installing OpenClaw; at run time OpenClaw resolves the import itself.
declare module "openclaw/plugin-sdk/plugin-entry" {
  export interface ToolContext {
    sessionKey?: string;
    sessionId?: string;
    agentId?: string;
    messageChannel?: string;
  }
  export interface ToolResult {
    content: { type: "text"; text: string }[];
    details?: Record<string, unknown>;
  }
  export interface Tool<P> {
    name: string;
    label?: string;
    description: string;
    parameters: Record<string, unknown>;
    execute(toolCallId: string, params: P): Promise<ToolResult>;
  }
  export interface AgentEvent {
    runId?: string;
    sessionKey?: string;
    agentId?: string;
    stream?: string;
    data?: unknown;
  }
  export interface Logger {
    info(message: string): void;
    warn(message: string): void;
    error(message: string): void;
  }
  export interface PluginApi {
    registrationMode?: string;
    pluginConfig?: unknown;
    logger: Logger;
    // eslint-disable-next-line @typescript-eslint/no-explicit-any
    registerTool(factory: (ctx: ToolContext) => Tool<any>, options: { name: string }): void;
    registerHook(event: string, handler: (event: any) => unknown, options: { name: string; description?: string }): void;
    on(hook: string, handler: (event: any, ctx: any) => unknown): void;
    registerService(service: { id: string; start(ctx: unknown): void | Promise<void>; stop?(): void | Promise<void> }): void;
    runtime: {
      subagent: {
        run(params: { sessionKey: string; message: string; deliver?: boolean; idempotencyKey?: string }): Promise<{ runId: string; sessionKey?: string }>;
        getSessionMessages(params: { sessionKey: string; limit?: number }): Promise<{ messages?: unknown[] }>;
      };
      system: {
        enqueueSystemEvent(text: string, options: { sessionKey: string; agentId?: string; contextKey?: string; replace?: boolean }): unknown;
      };
      events: {
        onAgentEvent(listener: (event: AgentEvent) => void): () => void;
      };
    };
  }
  export function definePluginEntry<T extends { id: string; name: string; description: string; register(api: PluginApi): void }>(entry: T): T;
}
