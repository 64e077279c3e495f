//! Publishing a task's events to `progress.<session>.<task_id>`.
//!
//! Events go out as plain core-NATS publishes: the `PROGRESS` stream captures them, and the hot
//! path does not wait for a JetStream ack (a lost progress event is harmless; the record in KV
//! is the source of truth). Progress and output are coalesced by the attempt's flush timer, see
//! [`FLUSH_INTERVAL`].

use std::time::Duration;

use async_nats::Client;
use claw_proto::TaskRecord;
use claw_proto::event::{Event, EventBody};

use crate::handler::Pending;

/// How often an attempt publishes what its handler reported. Each flush sends at most one
/// `progress` and one `output` event, so a task emits at most ~20 of them per second however
/// chatty its handler is.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Publishes `body` for `record`. Failures are logged, not returned: the client buffers through
/// short disconnections, and an event is never worth failing a task for.
pub async fn publish(client: &Client, record: &TaskRecord, body: EventBody) {
    let event = Event::new(record, body);
    if let Err(e) = client.publish(record.progress_subject(), event.to_json()).await {
        tracing::warn!(error = %e, "could not publish a task event");
    }
}

/// Announces the record's current status.
pub async fn status(client: &Client, record: &TaskRecord) {
    let event = Event::status(record);
    if let Err(e) = client.publish(record.progress_subject(), event.to_json()).await {
        tracing::warn!(error = %e, "could not publish a status event");
    }
}

/// Publishes what was reported since the last flush: the latest progress, then the output.
pub async fn flush(client: &Client, record: &TaskRecord, pending: Pending) {
    if let Some(progress) = pending.progress {
        publish(client, record, EventBody::Progress(progress)).await;
    }
    if !pending.output.is_empty() {
        publish(client, record, EventBody::Output { text: pending.output }).await;
    }
}
