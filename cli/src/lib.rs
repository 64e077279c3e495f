//! The `claw` command. [`up`] runs the whole system in one process: an embedded nats-server
//! (unless `--nats-url` points at one), the gateway, a worker and the archiver, sharing one
//! NATS connection, all stopped together on Ctrl-C.

pub mod up;
