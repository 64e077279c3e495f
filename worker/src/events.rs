//! Publishing a task's events to `progress.<session>.<task_id>`.
//!
//! Events go out as plain core-NATS publishes: the `PROGRESS` stream captures them, and the hot
//! path does not wait for a JetStream ack (a lost progress event is harmless; the record in KV
//! is the source of truth). Progress and output are coalesced by the attempt's flush timer, see
//! [`FLUSH_INTERVAL`].

use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream;
use claw_proto::TaskRecord;
use claw_proto::event::{Event, EventBody};
use claw_proto::topology::headers;

use crate::handler::Pending;
use crate::shares::Shares;

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

/// How long the events of a task's end are retried until `PROGRESS` has them: long enough to
/// outlast a server restart or a freeze of a few seconds, short enough that a worker whose
/// server is gone for good moves on (the record says how the task ended either way).
pub const ENDING_PATIENCE: Duration = Duration::from_secs(15);

/// Publishes the event of a task's end (its terminal status, which carries the result or the
/// error) and waits until the `PROGRESS` stream has stored it, retrying while it does not
/// answer, for up to [`ENDING_PATIENCE`]. A core publish sent while the server is down or
/// frozen is gone, and then a watcher never sees the task end (the soak counted up to a hundred
/// such tasks in ten minutes of faults); this is the event a watcher must not miss.
/// `Nats-Msg-Id` makes a retry after a lost ack, or a second worker's resend, store it once.
pub async fn ending(js: &jetstream::Context, record: &TaskRecord) {
    let deadline = tokio::time::Instant::now() + ENDING_PATIENCE;
    let event = Event::status(record).to_json();
    // The record's finish time tells ends apart (a retry after `retry` ends again later).
    let at = record.finished_at.map_or(0, |t| t.unix_timestamp_nanos());
    let msg_id = format!("{}:end:{at}", record.id);
    let mut wait = Duration::from_millis(100);
    loop {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(headers::MSG_ID, msg_id.as_str());
        let sent = js.publish_with_headers(record.progress_subject(), headers, event.clone()).await;
        let stored = match sent {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        if stored {
            return;
        }
        if tokio::time::Instant::now() + wait > deadline {
            tracing::warn!("the event of the task's end was not stored");
            return;
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

/// How long after a task ended its ending event may be sent again: inside `PROGRESS`'s
/// two-minute duplicate window, so a second send is dropped rather than stored twice.
pub const ENDING_RESEND_WINDOW: time::Duration = time::Duration::seconds(100);

/// Whether a worker that finds `record` already finished sends its ending event again, in case
/// the worker that finished it died before it was stored: a task that succeeded or failed
/// within [`ENDING_RESEND_WINDOW`] (a cancelled one was announced by the gateway).
pub fn resend_ending(record: &TaskRecord) -> bool {
    use claw_proto::Status;
    let recent = record
        .finished_at
        .is_some_and(|t| time::OffsetDateTime::now_utc() - t < ENDING_RESEND_WINDOW);
    recent && matches!(record.status, Status::Succeeded | Status::Failed)
}

/// Publishes what was reported since the last flush: the latest progress, then the output.
///
/// Output goes out as far as the session's share allows ([`Shares`]); the rest is dropped, and
/// the next output event ends with a note of how many bytes were (the `last` flush of an
/// attempt always tells). Returns the dropped bytes not told yet, for the next flush.
pub async fn flush(
    client: &Client,
    shares: &Shares,
    record: &TaskRecord,
    pending: Pending,
    last: bool,
) -> u64 {
    if let Some(progress) = pending.progress {
        publish(client, record, EventBody::Progress(progress)).await;
    }
    let mut text = pending.output;
    let mut dropped = pending.dropped;
    if !text.is_empty() {
        let mut room = shares.output(record, text.len());
        while !text.is_char_boundary(room) {
            room -= 1;
        }
        let cut = (text.len() - room) as u64;
        if cut > 0 {
            text.truncate(room);
            dropped += cut;
            metrics::counter!("claw_worker_output_dropped_bytes_total").increment(cut);
        }
    }
    if dropped > 0 && (last || !text.is_empty()) {
        // A note is a few bytes: it goes out whatever the share says.
        text.push_str(&format!(
            "\n[claw: {dropped} bytes of output dropped (over the output buffer or this \
             session's share of the event history)]\n"
        ));
        dropped = 0;
    }
    if !text.is_empty() {
        publish(client, record, EventBody::Output { text }).await;
    }
    dropped
}
