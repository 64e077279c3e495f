//! Dead-lettering: the original message, byte for byte, to `dlq.<class>.<priority>` (or
//! `dlq.invalid` without a lane) with the reason in `Claw-Dlq-*` headers.
//!
//! [`publish`] waits for the JetStream ack of the copy; only then does the caller TERM the
//! original, because TERM removes the task from the work queue for good.

use async_nats::HeaderMap;
use async_nats::jetstream;
use claw_proto::TaskId;
use claw_proto::topology::{self, Lane, headers};

use crate::Error;

/// Short codes of the `Claw-Dlq-Reason` header.
pub mod reason {
    /// Not a task: bad JSON, unknown kind or bad input. Dead-lettered on its first delivery.
    pub const INVALID_TASK: &str = "invalid_task";
    /// Retryable failures used up every attempt (or the worker died on each of them).
    pub const MAX_ATTEMPTS: &str = "max_attempts";
    /// The handler reported an error that retrying cannot fix.
    pub const NON_RETRYABLE: &str = "non_retryable";
    /// The task's absolute deadline passed before an attempt could start, or while it ran.
    pub const DEADLINE: &str = "deadline";
}

/// Copies `msg` to the DLQ with `reason` and `message` and waits until it is stored.
pub async fn publish(
    js: &jetstream::Context,
    msg: &jetstream::Message,
    lane: Option<Lane>,
    reason: &str,
    message: &str,
    task_id: Option<&TaskId>,
) -> Result<(), Error> {
    let subject = lane.map_or_else(|| topology::DLQ_INVALID.to_owned(), Lane::dlq_subject);
    let info = msg.info().ok();
    let deliveries = info.as_ref().map_or(1, |i| i.delivered);
    let mut h = HeaderMap::new();
    if let Some(info) = &info {
        // One copy per original message: a second try (a delivery after a lost ack, a retried
        // write) within the DLQ's duplicate window is dropped by JetStream.
        h.insert(headers::MSG_ID, format!("dlq:{}", info.stream_sequence).as_str());
    }
    h.insert(headers::DLQ_REASON, reason);
    // Header values cannot hold line breaks.
    h.insert(headers::DLQ_MESSAGE, headers::one_line(message).as_str());
    h.insert(headers::DLQ_SUBJECT, msg.subject.as_str());
    h.insert(headers::DLQ_DELIVERIES, deliveries.to_string().as_str());
    if let Some(id) = task_id {
        h.insert(headers::TASK_ID, id.as_str());
    }
    let ack = js
        .publish_with_headers(subject.clone(), h, msg.payload.clone())
        .await
        .map_err(|e| Error::nats(format!("DLQ publish to {subject}"), e))?;
    ack.await.map_err(|e| Error::nats(format!("DLQ publish ack from {subject}"), e))?;
    Ok(())
}
