//! The worker's one error type: what can stop [`crate::run`] or a worker process from starting.
//!
//! Failures of a single task are not errors of the worker: they are [`claw_proto::TaskError`]s
//! that end up in the task's record, and NATS hiccups while a task runs are logged and left to
//! redelivery. Only set-up problems reach a caller.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}: {source}")]
    ConfigRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid worker config: {0}")]
    Config(String),
    #[error("NATS request for {what} failed: {source}")]
    Nats {
        what: String,
        #[source]
        source: async_nats::Error,
    },
    #[error(transparent)]
    Topology(#[from] claw_proto::topology::Error),
}

impl Error {
    pub(crate) fn nats(what: impl Into<String>, source: impl Into<async_nats::Error>) -> Error {
        Error::Nats { what: what.into(), source: source.into() }
    }
}
