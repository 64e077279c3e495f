//! End-to-end tests, one binary (matklad's "Delete Cargo Integration Tests"): every module is a
//! behaviour that crosses a process boundary, against a real nats-server.

mod archiver;
mod auth;
mod browser;
mod cli;
mod cluster;
mod control;
mod control_worker;
mod custom_kind;
mod gateway;
mod interop;
mod isolation;
mod limits;
mod llm;
mod metrics;
mod nats_tenants;
mod payloads;
mod permissions;
mod pipeline;
mod reconcile;
mod retention;
mod secrets;
mod shipped;
mod soak;
mod tenants;
mod topology;
mod up;
mod worker;
mod ws;
