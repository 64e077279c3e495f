//! The `claw` command. [`up`] runs the whole system in one process: an embedded nats-server
//! (unless `--nats-url` points at one), the gateway, a worker and the archiver, sharing one
//! NATS connection, all stopped together on Ctrl-C.
//!
//! The other verbs are clients. Reading order: [`error`] (the one error type and the exit codes),
//! [`client`] (each API operation, carried over the gateway's HTTP API or NATS request/reply),
//! [`render`] (tables and text), [`watch`] (following a task live) and [`commands`] (the verbs'
//! arguments and what each does). [`token`] makes API tokens for the gateway's tokens file.

pub mod client;
pub mod commands;
pub mod error;
pub mod render;
pub mod token;
pub mod up;
pub mod watch;
