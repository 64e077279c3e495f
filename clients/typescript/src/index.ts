export { Claw, type ConnectOptions, type ResultOptions, type SubmitOptions } from "./client.js";
export { ClawError } from "./errors.js";
export { HttpTransport, type HttpOptions } from "./http.js";
export { NatsTransport, type NatsOptions } from "./nats.js";
export type { Submitted, Transport, WatchOptions } from "./transport.js";
export * from "./types.js";
