//! The consumer loop: reads the `KV_tasks` stream (every revision of the `tasks` bucket) in
//! order from the archive's own position, writes what each batch changes to the [`Store`] in
//! one transaction (terminal revisions to the archive, live ones and delete markers to the
//! `live` table the reconciler picks from), and moves the position to the batch's last revision
//! in that same transaction.
//!
//! The position lives in SQLite, not in a consumer on the server: the reading is an ordered
//! consumer (ephemeral, no acks) started just past it. A crash before a commit re-reads the
//! batch, which the store's revision guards make harmless; nothing is acked, so the server does
//! no ack bookkeeping and the archiver sends nothing back per revision; and a consumer lost
//! with a stream leader, or recreated after a gap, cannot skip a revision, because where
//! reading resumes is decided by what was committed. Nothing in the bucket expires, and a
//! finished record leaves it only once archived ([`crate::retention`]), so an archiver that
//! was down catches up on everything it missed.
//!
//! A batch is at most `batch_max` revisions: the first that arrives (waiting as long as it
//! takes), then what else arrives within `batch_wait`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::{Ordered, OrderedConfig};
use async_nats::jetstream::{self, Message};
use claw_proto::topology::{
    ARCHIVER_READER_PREFIX, KV_SUBJECT_PREFIX, RETIRED_ARCHIVER_CONSUMER, TASKS_KV_STREAM,
};
use claw_proto::{TaskId, TaskRecord};
use futures::StreamExt;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::store::{Change, Entry, Live, Store};

/// First pause after a failed read or write; doubled up to [`MAX_RETRY_PAUSE`]. What was not
/// committed is read again from the position, so pausing loses nothing.
const RETRY_PAUSE: Duration = Duration::from_millis(250);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(10);

/// How often the backlog (revisions of the bucket past the position) is logged.
const LAG_REPORT: Duration = Duration::from_secs(10);

/// The KV header that marks deletes and purges; puts carry `PUT` or no header at all.
const KV_OPERATION: &str = "KV-Operation";

/// How the consumer loop batches.
#[derive(Clone, Copy, Debug)]
pub struct Batching {
    pub max: usize,
    pub wait: Duration,
}

/// The committed read position, shared with the `/metrics` lag gauge.
#[derive(Clone, Debug, Default)]
pub struct Position(Arc<AtomicU64>);

impl Position {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, upto: u64) {
        self.0.store(upto, Ordering::Relaxed);
    }
}

/// How many revisions of the bucket are past `position`: written but not yet archived.
pub async fn lag(js: &jetstream::Context, position: &Position) -> Result<u64, async_nats::Error> {
    let stream = js.get_stream(TASKS_KV_STREAM).await?;
    Ok(stream.cached_info().state.last_sequence.saturating_sub(position.get()))
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
/// logged and retried with pauses rather than returned: what is not committed is read again
/// from the position, so an outage delays the archive and loses nothing.
pub async fn consume(
    js: jetstream::Context,
    store: Store,
    batching: Batching,
    position: Position,
    shutdown: CancellationToken,
) {
    retire_the_old_durable(&js).await;
    let mut pause = Pause::default();
    let mut lag = LagReport::new();
    while !shutdown.is_cancelled() {
        let mut revisions = match follow(&js, &store, &position).await {
            Ok(revisions) => revisions,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the bucket's revisions; retrying");
                pause.wait(&shutdown).await;
                continue;
            }
        };
        loop {
            lag.maybe_report(&js, &position).await;
            match next_batch(&mut revisions, batching, &shutdown).await {
                Ok(batch) if batch.is_empty() => return,
                Ok(batch) => {
                    if !write(&store, &batch, &position, &shutdown, &mut pause).await {
                        return;
                    }
                    pause.reset();
                }
                Err(e) => {
                    // Reading resumes from what was committed: the batch in hand comes again.
                    tracing::warn!(error = %e, "reading the bucket's revisions failed; resuming");
                    pause.wait(&shutdown).await;
                    break;
                }
            }
        }
    }
}

/// Removes the durable consumer an earlier version read with, if it is there: left alone it
/// would keep an ever-growing count of revisions it delivered to nobody.
async fn retire_the_old_durable(js: &jetstream::Context) {
    let Ok(stream) = js.get_stream_no_info(TASKS_KV_STREAM).await else { return };
    match stream.delete_consumer(RETIRED_ARCHIVER_CONSUMER).await {
        Ok(_) => tracing::info!("removed the durable consumer earlier versions archived with"),
        Err(e) => tracing::debug!(error = %e, "no old archiver consumer to remove"),
    }
}

/// An ordered consumer on the bucket's stream from just past the committed position. A position
/// past the stream's last sequence means the stream was made anew: the archive reads it from
/// its start (the revision guards keep what is there already).
async fn follow(
    js: &jetstream::Context,
    store: &Store,
    position: &Position,
) -> Result<Ordered, async_nats::Error> {
    let mut upto = store.position().await?;
    let stream = js.get_stream(TASKS_KV_STREAM).await?;
    let last = stream.cached_info().state.last_sequence;
    if upto > last {
        tracing::warn!(
            position = upto,
            last,
            "the bucket's stream ends before the archive's position: it was made anew; reading it from its start"
        );
        store.rewind(0).await?;
        upto = 0;
    }
    position.set(upto);
    let deliver_policy = match upto {
        0 => DeliverPolicy::All,
        n => DeliverPolicy::ByStartSequence { start_sequence: n + 1 },
    };
    let config = OrderedConfig {
        name: Some(format!("{ARCHIVER_READER_PREFIX}{}", uuid::Uuid::new_v4().simple())),
        description: Some("The archiver, reading on from the position in its SQLite file".into()),
        filter_subject: format!("{KV_SUBJECT_PREFIX}>"),
        deliver_policy,
        ..Default::default()
    };
    let consumer = stream.create_consumer(config).await?;
    tracing::info!(from = upto + 1, "reading the bucket's revisions");
    Ok(consumer.messages().await?)
}

/// The next batch: the first revision that arrives (however long that takes), then what else
/// arrives within `batching.wait`, up to `batching.max`. Empty on shutdown before the first.
async fn next_batch(
    revisions: &mut Ordered,
    batching: Batching,
    shutdown: &CancellationToken,
) -> Result<Vec<Message>, async_nats::Error> {
    let first = tokio::select! {
        biased;
        () = shutdown.cancelled() => return Ok(Vec::new()),
        first = revisions.next() => first,
    };
    let mut batch = vec![one(first)?];
    let until = tokio::time::Instant::now() + batching.wait;
    while batch.len() < batching.max.max(1) {
        // Not cut short by shutdown: this wait is at most `batch_wait`, and finishing the batch
        // in hand is what a clean stop means. A read that times out leaves the stream intact.
        match tokio::time::timeout_at(until, revisions.next()).await {
            Ok(next) => batch.push(one(next)?),
            Err(_) => break,
        }
    }
    Ok(batch)
}

fn one(
    next: Option<Result<Message, jetstream::consumer::pull::OrderedError>>,
) -> Result<Message, async_nats::Error> {
    match next {
        Some(Ok(message)) => Ok(message),
        Some(Err(e)) => Err(e.into()),
        None => Err("the ordered consumer ended".into()),
    }
}

/// Commits what `batch` changes and the position after it, retrying (with pauses) until that
/// succeeds; `false` when shutdown came first (then nothing of the batch is committed, and the
/// next run reads it again).
async fn write(
    store: &Store,
    batch: &[Message],
    position: &Position,
    shutdown: &CancellationToken,
    pause: &mut Pause,
) -> bool {
    let mut changes = Vec::with_capacity(batch.len());
    let mut upto = position.get();
    for message in batch {
        let (revision, written_at) = match message.info() {
            Ok(info) => (info.stream_sequence, info.published),
            Err(e) => {
                // Without JetStream metadata it is not a delivery of the stream at all.
                tracing::warn!(subject = %message.subject, error = %e, "message without metadata");
                continue;
            }
        };
        upto = upto.max(revision);
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

    loop {
        let started = Instant::now();
        match store.write(&changes, upto).await {
            Ok(changed) => {
                metrics::histogram!("claw_archiver_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!("claw_archiver_rows_written_total").increment(changed);
                tracing::debug!(messages = batch.len(), changed, upto, "archived a batch");
                position.set(upto);
                return true;
            }
            Err(e) => {
                tracing::error!(error = %e, messages = batch.len(),
                    "writing a batch to the archive failed; retrying");
                if shutdown.is_cancelled() {
                    return false;
                }
                pause.wait(shutdown).await;
            }
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

/// Logs the backlog every [`LAG_REPORT`]: how far the archive is behind the bucket.
#[derive(Debug)]
struct LagReport {
    last: Instant,
}

impl LagReport {
    fn new() -> LagReport {
        LagReport { last: Instant::now() }
    }

    async fn maybe_report(&mut self, js: &jetstream::Context, position: &Position) {
        if self.last.elapsed() < LAG_REPORT {
            return;
        }
        self.last = Instant::now();
        match lag(js, position).await {
            Ok(0) => tracing::debug!("archiver caught up"),
            Ok(behind) => tracing::info!(behind, position = position.get(), "archiver lag"),
            Err(e) => tracing::debug!(error = %e, "stream info for the lag report failed"),
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
