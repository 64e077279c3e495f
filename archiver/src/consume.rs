//! The consumer loop: pulls record revisions from the durable `archiver` consumer on `KV_tasks`,
//! writes what they change to the [`Store`] one transaction per batch (terminal revisions to the
//! archive, live ones and delete markers to the `live` table the reconciler picks from), then
//! acks the batch.
//!
//! Acks follow the commit, never precede it: a crash between the two means redelivery, which the
//! store's revision guard makes harmless. Because the consumer is durable, a restarted archiver
//! resumes after the last acked message, and one that was down catches up on what it missed:
//! nothing in the bucket expires, and a finished record leaves it only once archived
//! ([`crate::retention`]).
//!
//! A batch is at most `batch_max` messages, and never more than that is un-acked at once: the
//! loop asks the server for one message (waiting as long as it takes), then for up to
//! `batch_max - 1` more that arrive within `batch_wait`. Both requests end on the server side
//! (count reached or expired), so none is left behind to deliver into a dropped inbox.

use std::time::{Duration, Instant};

use async_nats::jetstream::Message;
use async_nats::jetstream::consumer::PullConsumer;
use claw_proto::topology::KV_SUBJECT_PREFIX;
use claw_proto::{TaskId, TaskRecord};
use futures::StreamExt;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::store::{Change, Entry, Live, Store};

/// How long one idle pull waits on the server. The client gives up five seconds after this if
/// the server never answers, so a dead or partitioned server costs one idle cycle, not a hang;
/// the connection's own pings (2 s) trigger the reconnect.
const IDLE_PULL: Duration = Duration::from_secs(5);

/// First pause after a failed pull or write; doubled up to [`MAX_RETRY_PAUSE`]. Un-acked
/// messages stay with the server meanwhile, so pausing loses nothing.
const RETRY_PAUSE: Duration = Duration::from_millis(250);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(10);

/// How often the backlog (`num_pending`) is logged.
const LAG_REPORT: Duration = Duration::from_secs(10);

/// The KV header that marks deletes and purges; puts carry `PUT` or no header at all.
const KV_OPERATION: &str = "KV-Operation";

/// How the consumer loop batches.
#[derive(Clone, Copy, Debug)]
pub struct Batching {
    pub max: usize,
    pub wait: Duration,
}

/// What one KV message at stream sequence `revision`, stored by the server at `written_at`,
/// changes in the store; `Err` with the reason when it is not a task record at all (logged,
/// then acked so it never blocks the stream).
pub fn decode(
    subject: &str,
    operation: Option<&str>,
    payload: &[u8],
    revision: u64,
    written_at: OffsetDateTime,
) -> Result<Change, String> {
    let Some(key) = subject.strip_prefix(KV_SUBJECT_PREFIX) else {
        return Err(format!("subject {subject:?} is not a record of the bucket"));
    };
    if operation.is_some_and(|op| op != "PUT") {
        let id = TaskId::parse(key).map_err(|e| format!("key {key:?}: {e}"))?;
        return Ok(Change::Gone { id, revision });
    }
    let record: TaskRecord =
        serde_json::from_slice(payload).map_err(|e| format!("not a task record: {e}"))?;
    if record.id.as_str() != key {
        // `get` looks rows up by the key the gateway missed in KV; a record filed under another
        // key would be unreachable there and shadow the real one.
        return Err(format!("record id {} stored under key {key}", record.id));
    }
    if !record.status.is_terminal() {
        return Ok(Change::Live(Box::new(Live::of(&record, revision, written_at, payload.len()))));
    }
    match std::str::from_utf8(payload) {
        Ok(json) => {
            Ok(Change::Terminal(Box::new(Entry { revision, record, json: json.to_owned() })))
        }
        Err(e) => Err(format!("not UTF-8: {e}")),
    }
}

/// Runs until `shutdown`, finishing the batch in hand first. Failures of NATS or SQLite are
/// logged and retried with pauses rather than returned: un-acked messages wait on the server,
/// so an outage delays the archive and loses nothing.
pub async fn consume(
    consumer: PullConsumer,
    store: Store,
    batching: Batching,
    shutdown: CancellationToken,
) {
    let batch_max = batching.max.max(1);
    let mut pause = Pause::default();
    let mut lag = LagReport::new();
    loop {
        lag.maybe_report(&consumer).await;
        let first = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            first = pull(&consumer, 1, IDLE_PULL) => first,
        };
        let mut batch = match first {
            Ok(batch) if batch.is_empty() => {
                pause.reset();
                continue;
            }
            Ok(batch) => batch,
            Err(e) => {
                tracing::warn!(error = %e, "pulling from the archiver consumer failed; retrying");
                pause.wait(&shutdown).await;
                continue;
            }
        };
        if batch_max > 1 {
            // Not cancelled by shutdown: this wait is at most `batch_wait`, and finishing the
            // batch in hand is what a clean stop means.
            match pull(&consumer, batch_max - 1, batching.wait).await {
                Ok(more) => batch.extend(more),
                // What was pulled stays un-acked and comes back after the ack deadline.
                Err(e) => tracing::warn!(error = %e, "pulling the rest of a batch failed"),
            }
        }
        write_then_ack(&store, &batch, &shutdown, &mut pause).await;
        pause.reset();
    }
}

/// Asks for up to `n` messages, waiting at most `expires` for them; an empty vector when none
/// came. A stream error after some messages keeps those (they are valid deliveries).
async fn pull(
    consumer: &PullConsumer,
    n: usize,
    expires: Duration,
) -> Result<Vec<Message>, async_nats::Error> {
    let mut messages = Vec::with_capacity(n);
    // A zero expiry would mean "wait forever" to the server; a millisecond is "what is there".
    let expires = expires.max(Duration::from_millis(1));
    let mut batch = consumer.batch().max_messages(n).expires(expires).messages().await?;
    while let Some(message) = batch.next().await {
        match message {
            Ok(message) => messages.push(message),
            Err(e) if messages.is_empty() => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "a pull ended early");
                break;
            }
        }
    }
    Ok(messages)
}

/// Commits what `batch` changes, then acks every message of it. A failed commit is
/// retried (with pauses) until it succeeds or shutdown; then nothing is acked and the server
/// redelivers the batch to the next run.
async fn write_then_ack(
    store: &Store,
    batch: &[Message],
    shutdown: &CancellationToken,
    pause: &mut Pause,
) {
    let mut changes = Vec::with_capacity(batch.len());
    for message in batch {
        let (revision, written_at) = match message.info() {
            Ok(info) => (info.stream_sequence, info.published),
            Err(e) => {
                // Without JetStream metadata it is not a consumer delivery; it cannot be acked
                // meaningfully either.
                tracing::warn!(subject = %message.subject, error = %e, "message without metadata");
                continue;
            }
        };
        let operation = message.headers.as_ref().and_then(|h| h.get(KV_OPERATION));
        let operation = operation.map(|v| v.as_str());
        match decode(&message.subject, operation, &message.payload, revision, written_at) {
            Ok(change) => changes.push(change),
            Err(reason) => {
                tracing::warn!(subject = %message.subject, revision, %reason,
                    "skipping a message that is not a task record");
            }
        }
    }

    if !changes.is_empty() {
        loop {
            let started = Instant::now();
            match store.write(&changes).await {
                Ok(changed) => {
                    metrics::histogram!("claw_archiver_commit_seconds")
                        .record(started.elapsed().as_secs_f64());
                    metrics::counter!("claw_archiver_rows_written_total").increment(changed);
                    tracing::debug!(messages = batch.len(), changed, "archived a batch");
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, messages = batch.len(),
                        "writing a batch to the archive failed; retrying");
                    if shutdown.is_cancelled() {
                        return;
                    }
                    pause.wait(shutdown).await;
                }
            }
        }
    }

    // One ack per message, not one cumulative ack per batch: after a consumer leader change
    // the new leader may count as delivered messages that never reached this archiver, and a
    // cumulative ack would take those along unread; an explicit ack leaves them to redelivery.
    for message in batch {
        // An ack that does not arrive means one redelivery, absorbed by the revision guard.
        if let Err(e) = message.ack().await {
            tracing::warn!(subject = %message.subject, error = %e, "ack failed");
        }
    }
}

/// A doubling pause between retries, cut short by shutdown.
#[derive(Debug, Default)]
struct Pause {
    next: Option<Duration>,
}

impl Pause {
    async fn wait(&mut self, shutdown: &CancellationToken) {
        let d = self.next.unwrap_or(RETRY_PAUSE);
        self.next = Some((d * 2).min(MAX_RETRY_PAUSE));
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(d) => {}
        }
    }

    fn reset(&mut self) {
        self.next = None;
    }
}

/// Logs the consumer's backlog every [`LAG_REPORT`]: how far the archive is behind the bucket.
#[derive(Debug)]
struct LagReport {
    last: Instant,
}

impl LagReport {
    fn new() -> LagReport {
        LagReport { last: Instant::now() }
    }

    async fn maybe_report(&mut self, consumer: &PullConsumer) {
        if self.last.elapsed() < LAG_REPORT {
            return;
        }
        self.last = Instant::now();
        match consumer.get_info().await {
            Ok(info) if info.num_pending > 0 || info.num_ack_pending > 0 => tracing::info!(
                pending = info.num_pending,
                ack_pending = info.num_ack_pending,
                "archiver lag"
            ),
            Ok(_) => tracing::debug!("archiver caught up"),
            Err(e) => tracing::debug!(error = %e, "consumer info for the lag report failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use claw_proto::{Status, TaskError};
    use serde_json::json;

    use super::*;

    fn record(status: Status) -> TaskRecord {
        let json = json!({
            "id": "t1", "session": "s", "kind": "sleep", "input": {}, "class": "short",
            "priority": "normal", "status": status, "attempt": 1, "max_attempts": 3,
            "timeout_s": 300, "created_at": "2025-01-01T00:00:00Z",
            "deadline": "2025-01-08T00:00:00Z",
        });
        serde_json::from_value(json).unwrap()
    }

    fn bytes(r: &TaskRecord) -> Vec<u8> {
        serde_json::to_vec(r).unwrap()
    }

    const AT: OffsetDateTime = OffsetDateTime::UNIX_EPOCH;

    #[test]
    fn terminal_records_are_archived_at_the_message_revision() {
        let mut r = record(Status::Running);
        r.fail(TaskError::new("x", "y", false), claw_proto::Cause::Error, r.created_at).unwrap();
        let payload = bytes(&r);
        match decode("$KV.tasks.t1", Some("PUT"), &payload, 42, AT) {
            Ok(Change::Terminal(e)) => {
                assert_eq!((e.revision, &e.record), (42, &r));
                assert_eq!(e.json.as_bytes(), payload);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(decode("$KV.tasks.t1", None, &payload, 1, AT), Ok(Change::Terminal(_))));
    }

    #[test]
    fn live_revisions_keep_their_row_and_markers_end_it() {
        let later = AT + time::Duration::seconds(5);
        for s in [Status::Queued, Status::Running, Status::Retrying, Status::Paused] {
            let r = record(s);
            let expected = Change::Live(Box::new(Live::of(&r, 3, later, bytes(&r).len())));
            assert_eq!(decode("$KV.tasks.t1", None, &bytes(&r), 3, later), Ok(expected));
        }
        let gone = |revision| Ok(Change::Gone { id: TaskId::parse("t1").unwrap(), revision });
        assert_eq!(decode("$KV.tasks.t1", Some("DEL"), b"", 4, AT), gone(4));
        assert_eq!(decode("$KV.tasks.t1", Some("PURGE"), b"", 5, AT), gone(5));
    }

    #[test]
    fn garbage_is_invalid_not_fatal() {
        let ok = bytes(&record(Status::Succeeded));
        for (subject, payload) in [
            ("$KV.tasks.t1", &b"{"[..]),
            ("$KV.tasks.t1", b"{\"id\": \"t1\"}"),
            ("$KV.tasks.other", &ok[..]),
            ("elsewhere", &ok[..]),
        ] {
            assert!(decode(subject, None, payload, 1, AT).is_err(), "{subject} {payload:?}");
        }
    }
}
