//! The contracts every OpenClaw service shares: the task model and the NATS topology.
//!
//! Reading order: [`task`] (the record, its statuses and the legal moves between them, no I/O),
//! [`spec`] (what a submitter sends and how it becomes a record), [`kinds`] (typed inputs of the
//! built-in kinds, validated at the edge), [`event`] (what goes out on `progress.>`), [`api`]
//! (request/reply payloads), [`topology`] (subjects, streams, consumers, the `tasks` bucket and the
//! one idempotent `ensure`), [`records`] (reading, creating and compare-and-setting task records:
//! the one place every service does it), [`payloads`] (inputs and results too large for a record,
//! in the object store), [`queue`] (publishing a task back to its lane, and which task a lane
//! message carries), [`connect`] (how every process dials NATS), [`secrets`] (secrets from
//! files, and scrubbed from the environment before a child can read them) and [`nats_server`]
//! (finding and starting a local nats-server for `claw up` and the tests), [`logs`] (the
//! binaries' log set-up, text or JSON), [`metrics`] (the Prometheus recorder and `/metrics`), [`signal`] (the stop signal), [`trace`] (W3C `traceparent` from submit to worker).
//!
//! Only `topology`, `records`, `payloads`, `queue`, `connect`, `secrets`, `nats_server` and `metrics` do I/O; the model modules are plain data.

pub mod api;
pub mod connect;
pub mod event;
pub mod flags;
pub mod kinds;
pub mod logs;
pub mod metrics;
pub mod nats_server;
pub mod payloads;
pub mod queue;
pub mod records;
pub mod secrets;
pub mod signal;
pub mod spec;
pub mod task;
pub mod topology;
pub mod trace;

pub use task::{
    Cause, Class, Concurrency, PayloadRef, Priority, Progress, Session, Status, TaskError, TaskId,
    TaskRecord,
};
