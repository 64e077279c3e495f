// The plugin's settings (`plugins.entries.claw.config`), checked once with their defaults. The
// manifest's configSchema is what OpenClaw validates; this is what the code relies on.

export interface Config {
  nats: { servers: string[]; user?: string; password?: string; token?: string; inboxPrefix?: string };
  gateway?: { url: string; token?: string };
  defaultKind: string;
  kinds?: string[];
  maxPerSession: number;
  bucket: string;
  progress: boolean;
  maxResultChars: number;
  deliveryLeaseMs: number;
  cancelOnStop: boolean;
}

export class ConfigError extends Error {}

type Raw = Record<string, unknown>;

function object(value: unknown, what: string): Raw {
  if (value === undefined || value === null) return {};
  if (typeof value !== "object" || Array.isArray(value)) throw new ConfigError(`${what} must be an object`);
  return value as Raw;
}

function str(raw: Raw, key: string, what: string): string | undefined {
  const v = raw[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "string" || v.length === 0) throw new ConfigError(`${what}.${key} must be a non-empty string`);
  return v;
}

function int(raw: Raw, key: string, min: number, max: number, fallback: number): number {
  const v = raw[key];
  if (v === undefined || v === null) return fallback;
  if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max) {
    throw new ConfigError(`${key} must be an integer from ${min} to ${max}`);
  }
  return v;
}

function bool(raw: Raw, key: string, fallback: boolean): boolean {
  const v = raw[key];
  if (v === undefined || v === null) return fallback;
  if (typeof v !== "boolean") throw new ConfigError(`${key} must be true or false`);
  return v;
}

export function parseConfig(value: unknown): Config {
  const raw = object(value, "config");
  const nats = object(raw.nats, "nats");
  const servers = typeof nats.servers === "string" ? [nats.servers] : nats.servers;
  if (!Array.isArray(servers) || servers.length === 0 || !servers.every((s) => typeof s === "string" && s.length > 0)) {
    throw new ConfigError("nats.servers is required: the task system's NATS URL, e.g. nats://127.0.0.1:4222");
  }
  const config: Config = {
    nats: { servers: servers as string[] },
    defaultKind: str(raw, "defaultKind", "config") ?? "exec",
    maxPerSession: int(raw, "maxPerSession", 1, 1000, 4),
    bucket: str(raw, "bucket", "config") ?? "openclaw",
    progress: bool(raw, "progress", true),
    maxResultChars: int(raw, "maxResultChars", 100, 200_000, 4000),
    deliveryLeaseMs: int(raw, "deliveryLeaseS", 5, 3600, 60) * 1000,
    cancelOnStop: bool(raw, "cancelOnStop", true),
  };
  if (!/^[A-Za-z0-9_-]{1,64}$/.test(config.bucket)) throw new ConfigError("bucket must be 1-64 characters of A-Z a-z 0-9 _ -");
  for (const key of ["user", "password", "token", "inboxPrefix"] as const) {
    const v = str(nats, key, "nats");
    if (v !== undefined) config.nats[key] = v;
  }
  if (raw.gateway !== undefined && raw.gateway !== null) {
    const gateway = object(raw.gateway, "gateway");
    const url = str(gateway, "url", "gateway");
    if (!url) throw new ConfigError("gateway.url is required when gateway is given");
    config.gateway = { url };
    const token = str(gateway, "token", "gateway");
    if (token !== undefined) config.gateway.token = token;
  }
  if (raw.kinds !== undefined && raw.kinds !== null) {
    if (!Array.isArray(raw.kinds) || !raw.kinds.every((k) => typeof k === "string" && k.length > 0)) {
      throw new ConfigError("kinds must be a list of kind names");
    }
    config.kinds = raw.kinds as string[];
    if (!config.kinds.includes(config.defaultKind)) throw new ConfigError(`defaultKind ${config.defaultKind} is not in kinds`);
  }
  return config;
}
