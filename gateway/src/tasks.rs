//! The task operations behind both front doors (HTTP in [`crate::http`], NATS request/reply in
//! [`crate::nats_api`]): submit, get, list. One code path, so the two cannot disagree.
//!
//! Submit is the hot path. It admits the spec, then sends the task message to its lane and the
//! `queued` record to the `tasks` bucket back to back and waits for both acks together: one
//! round trip, and 202 only once JetStream has stored the task. The record is created with
//! create-if-absent, so a worker that was faster and already wrote `running` is never
//! overwritten. If the lane refuses the message (queue full) the record is removed again by its
//! revision, so a refused submit leaves nothing behind.

use std::future::IntoFuture;
use std::time::Instant;

use async_nats::HeaderMap;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::{self, ErrorCode};
use bytes::Bytes;
use claw_proto::api::{ErrorBody, GetRequest, ListPage, ListQuery};
use claw_proto::event::Event;
use claw_proto::payloads;
use claw_proto::records::{self, Stored};
use claw_proto::spec::{Invalid, TaskSpec};
use claw_proto::task::{TaskId, TaskRecord};
use claw_proto::topology::{self, Lane, headers};
use claw_proto::trace::{TRACEPARENT, TraceParent};
use serde::de::DeserializeOwned;
use time::OffsetDateTime;
use tracing::Instrument;

use crate::app::App;
use crate::auth::Caller;
use crate::error::Error;

/// What a submit produced: a new task (202), or the one an earlier submit with the same
/// idempotency key (or explicit id) created (200).
#[derive(Debug)]
pub struct Submitted {
    pub record: TaskRecord,
    pub created: bool,
}

/// Longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Submits a task on behalf of `caller`, who becomes its `owner` (its session is one of the
/// caller's own).
pub async fn submit(
    app: &App,
    caller: &Caller,
    body: &[u8],
    idempotency_key: Option<&str>,
    traceparent: Option<&str>,
) -> Result<Submitted, Error> {
    let started = Instant::now();
    // The caller's trace, or a new one: the task message carries a child of it to the worker.
    let trace = traceparent.and_then(TraceParent::parse).unwrap_or_else(TraceParent::generate);
    let span = tracing::info_span!("submit", trace_id = %trace.trace_id,
        task_id = tracing::field::Empty);
    let result = submit_inner(app, caller, body, idempotency_key, &trace).instrument(span).await;
    let outcome = match &result {
        Ok(s) if s.created => "created",
        Ok(_) => "existing",
        Err(e) => e.code(),
    };
    metrics::counter!("claw_gateway_submits_total", "outcome" => outcome).increment(1);
    metrics::histogram!("claw_gateway_submit_seconds").record(started.elapsed().as_secs_f64());
    result
}

async fn submit_inner(
    app: &App,
    caller: &Caller,
    body: &[u8],
    idempotency_key: Option<&str>,
    trace: &TraceParent,
) -> Result<Submitted, Error> {
    // Before anything is read: a flood of bad bodies costs its sender's rate as well.
    app.quotas.submit(caller)?;
    let spec = TaskSpec::parse(body)?;
    if let Some(key) = idempotency_key
        && (key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY)
    {
        return Err(Invalid::field("Idempotency-Key", "must be 1-255 characters").into());
    }
    let id = match (idempotency_key, &spec.id) {
        // Keys are per principal: two principals using the same key make two tasks.
        (Some(key), _) => match caller.owner() {
            None => TaskId::derived("idempotency-key", key),
            Some(owner) => TaskId::derived(&format!("idempotency-key/{owner}"), key),
        },
        (None, Some(id)) => {
            if caller.owner().is_some() && is_key_derived(id) {
                let message = "may not be a UUID of version 5: those name the tasks of \
                               Idempotency-Keys (send the key instead, or another id)";
                return Err(Invalid::field("id", message).into());
            }
            id.clone()
        }
        (None, None) => TaskId::generate(),
    };
    if spec.input_ref.is_some() {
        let message = "is set by the gateway for a large input; send the input itself";
        return Err(Invalid::field("input_ref", message).into());
    }
    tracing::Span::current().record("task_id", id.as_str());
    let mut record = spec.admit(id, OffsetDateTime::now_utc(), None, &app.catalog, &app.limits)?;
    record.owner = caller.owner().map(str::to_owned);
    record.concurrency.extend(app.quotas.running_key(caller));
    let keyed = idempotency_key.is_some() || spec.id.is_some();
    // An input that may be over the inline limit (the body is larger than it) is measured; one
    // that is goes to the object store, after every check that could still refuse the task.
    let large = body.len() > payloads::INLINE_MAX
        && payloads::json_size(&record.input) > payloads::INLINE_MAX;
    if !large {
        // Before anything is stored: a record that cannot be written must not have a message.
        app.records.encode(&record)?;
    }
    app.ensure_connected()?;
    // A caller-chosen id (idempotency key or explicit id) is looked up first: a repeat answers
    // with the first task (and stores nothing, a large input included). One extra round trip,
    // paid only by callers who ask for idempotency.
    if keyed && let Some(found) = existing(app, caller, &record.id, trace).await? {
        return Ok(found);
    }
    // What the task will hold: its body, or its input where that goes to the object store.
    let held = if large { payloads::json_size(&record.input) } else { body.len() };
    app.quotas.admit(caller, held as u64)?;
    if large {
        let bytes = payloads::json_size(&record.input);
        if bytes > app.payloads.max_bytes() {
            return Err(Error::PayloadTooLarge { bytes, max: app.payloads.max_bytes() });
        }
        app.payloads.externalize_input(&mut record).await?;
        if let Err(e) = app.records.encode(&record) {
            forget_input(app, &record).await;
            return Err(e.into());
        }
    }
    let submitted = submit_new(app, record.clone(), trace).await;
    match &submitted {
        Ok(s) if s.created => announce(app, &s.record).await,
        // Refused after the input was stored (queue full, JetStream down): nothing is left.
        Err(_) if large => forget_input(app, &record).await,
        // A keyed repeat that raced the first submit of the same key past the check above
        // wrote the same object name; the key promises the same task, so it stays.
        _ => {}
    }
    submitted
}

/// Whether `id` has the form of an id derived from an idempotency key (a UUID of version 5).
/// Derived ids are predictable, so a principal who could give one explicitly could take the id
/// of another principal's key before its first use and make that principal's submits 422.
fn is_key_derived(id: &TaskId) -> bool {
    uuid::Uuid::parse_str(id.as_str()).is_ok_and(|u| u.get_version_num() == 5)
}

/// Removes the stored input of a task whose submit was refused.
async fn forget_input(app: &App, record: &TaskRecord) {
    if let Err(e) = app.payloads.remove(&record.id).await {
        tracing::warn!(task_id = %record.id, error = %e, "could not remove a refused task's input");
    }
}

/// The task a keyed submit names, if it exists: what a repeat answers (200), if the caller may
/// see it, after a re-publish when it is an orphan ([`republish_if_young`]).
async fn existing(
    app: &App,
    caller: &Caller,
    id: &TaskId,
    trace: &TraceParent,
) -> Result<Option<Submitted>, Error> {
    let Some(Stored { record, .. }) = app.records.read(id).await? else { return Ok(None) };
    if !caller.may_see(record.owner.as_deref()) {
        return Err(Invalid::field("id", "is taken by another task").into());
    }
    republish_if_young(app, &record, trace).await?;
    Ok(Some(Submitted { record, created: false }))
}

/// Publishes the task and creates its record together: both are sent back to back on the one
/// connection and their acks awaited together, one round trip. The lane message goes first
/// and carries the task id as `Nats-Msg-Id`, so a record never lands without its message before
/// it (a gateway that dies, a reply lost in a freeze: the soak found both when keyed submits
/// created the record first), and a second publish of the same id within the duplicate window
/// (a concurrent first submit of one key, a retry after a timeout) is dropped by JetStream.
async fn submit_new(
    app: &App,
    record: TaskRecord,
    trace: &TraceParent,
) -> Result<Submitted, Error> {
    let message = encode_message(&record)?;
    let ack = publish(app, &record, message, trace).await.map_err(|e| publish_error(e, app))?;
    let (ack, created) = tokio::join!(ack.into_future(), app.records.create(&record));
    if let Err(e) = ack {
        if let Ok(revision) = created {
            forget(app, revision).await;
        }
        return Err(publish_error(e, app));
    }
    match created {
        Ok(_) => {}
        // A worker picked the task up before our create landed (its record wins, but it was
        // built from the message, which does not say who submitted the task), or another
        // submit of the same key did: either way the owner must be there.
        Err(records::Error::Conflict) => {
            if let Err(e) = adopt(app, &record).await {
                tracing::warn!(task_id = %record.id, error = %e, "owner not written; retrying");
                tokio::spawn(adopt_patiently(app.clone(), record.clone()));
            }
        }
        // The task is stored, which is what 202 promises; the worker rebuilds the record from
        // the message when it finds none, and the owner follows as soon as the bucket answers.
        Err(e) => {
            tracing::warn!(task_id = %record.id, error = %e, "queued record not created");
            tokio::spawn(adopt_patiently(app.clone(), record.clone()));
        }
    }
    Ok(Submitted { record, created: true })
}

/// How long a submit keeps trying, in the background, to get its owner into a record that a
/// worker created (or that could not be created at submit).
const ADOPT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// Makes the stored record of a task this gateway just accepted carry its submitter: creates
/// it if there is still none, or writes `owner` (compare-and-set) into the one a worker built
/// from the message. Nothing to do without an owner (no tokens) or when it is there already.
/// The id is a fresh one of this gateway's, so no other submitter can hold it.
pub async fn adopt(app: &App, record: &TaskRecord) -> Result<(), Error> {
    if record.owner.is_none() {
        return Ok(());
    }
    for _ in 0..8 {
        let Some(Stored { record: mut stored, revision }) = app.records.read(&record.id).await?
        else {
            match app.records.create(record).await {
                Ok(_) => return Ok(()),
                Err(records::Error::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        if stored.owner.is_some() {
            return Ok(());
        }
        stored.owner.clone_from(&record.owner);
        // Its limits too: the next attempt holds the principal's slot.
        stored.concurrency.clone_from(&record.concurrency);
        match app.records.update(&stored, revision).await {
            Ok(_) => return Ok(()),
            // The worker wrote meanwhile: read its newer revision and try again.
            Err(records::Error::Conflict) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Unavailable(format!("owner of {}: the record kept changing", record.id)))
}

/// [`adopt`], retried with pauses for up to [`ADOPT_PATIENCE`].
async fn adopt_patiently(app: App, record: TaskRecord) {
    let deadline = tokio::time::Instant::now() + ADOPT_PATIENCE;
    let mut pause = std::time::Duration::from_millis(200);
    loop {
        match adopt(&app, &record).await {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() + pause > deadline => {
                tracing::error!(task_id = %record.id, error = %e,
                    "the task's record does not name its owner; only admins will see it");
                return;
            }
            Err(_) => tokio::time::sleep(pause).await,
        }
        pause = (pause * 2).min(std::time::Duration::from_secs(5));
    }
}

/// How long after its first publish JetStream drops a second message with the same
/// `Nats-Msg-Id` (the `TASKS` stream's duplicate window, less a margin for clock skew).
const DEDUPLICATED_FOR: time::Duration = time::Duration::seconds(110);

/// A repeat of a keyed submit that found the task still `queued` and never started: its first
/// submit may have been refused (a full queue) and died before it removed its record, leaving
/// a record with no message. Within the duplicate window it is published again under the task id:
/// JetStream drops the copy if the first one was stored, and stores it if not. Later, the
/// archiver's reconciler finds such a record (it scans the lanes) and publishes it.
async fn republish_if_young(
    app: &App,
    record: &TaskRecord,
    trace: &TraceParent,
) -> Result<(), Error> {
    let young = OffsetDateTime::now_utc() - record.created_at < DEDUPLICATED_FOR;
    let never_started = record.status == claw_proto::Status::Queued && record.attempt == 0;
    if !(young && never_started && record.message_seq.is_none()) {
        return Ok(());
    }
    let message = encode_message(record)?;
    let ack = publish(app, record, message, trace).await.map_err(|e| publish_error(e, app))?;
    ack.into_future().await.map_err(|e| publish_error(e, app))?;
    Ok(())
}

/// The lane message of a task: its normalized spec.
fn encode_message(record: &TaskRecord) -> Result<Bytes, Error> {
    let message = serde_json::to_vec(&TaskSpec::of_record(record))
        .map_err(|e| Error::Internal(e.to_string()))?;
    Ok(message.into())
}

/// Sends the task to its lane; the returned future resolves with JetStream's ack.
async fn publish(
    app: &App,
    record: &TaskRecord,
    message: Bytes,
    trace: &TraceParent,
) -> Result<jetstream::context::PublishAckFuture, PublishError> {
    let mut headers = HeaderMap::new();
    // JetStream drops a second message with the same id inside its duplicate window.
    headers.insert(headers::MSG_ID, record.id.as_str());
    headers.insert(TRACEPARENT, trace.child().to_header().as_str());
    // The record is on its way (sent right after): a worker waits for it rather than build one
    // from the message without the owner.
    headers.insert(headers::RECORD, headers::RECORD_BY_SUBMITTER);
    let lane = Lane::new(record.class, record.priority);
    app.js.publish_with_headers(lane.subject(), headers, message).await
}

/// Removes a record whose task was refused, so the refusal leaves nothing behind.
async fn forget(app: &App, revision: u64) {
    if let Err(e) = app.records.remove(revision).await {
        tracing::warn!(revision, error = %e, "could not remove the record of a refused task");
    }
}

pub(crate) fn publish_error(e: PublishError, app: &App) -> Error {
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => Error::TooLarge(app.config.body_limit),
        PublishErrorKind::Other if is_store_full(&e) => {
            Error::QueueFull { retry_after_s: app.config.retry_after_s }
        }
        _ => Error::Unavailable(format!("JetStream did not store the task: {e}")),
    }
}

/// JetStream refuses a message with "store failed" (10077) when a discard-new limit is hit.
fn is_store_full(e: &PublishError) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .is_some_and(|j| j.error_code() == ErrorCode::STREAM_STORE_FAILED)
}

/// Announces the new task on its progress subject. A core publish: the PROGRESS stream stores
/// it, and the submitter does not wait for that.
async fn announce(app: &App, record: &TaskRecord) {
    let event = Event::status(record);
    if let Err(e) = app.client.publish(record.progress_subject(), event.to_json()).await {
        tracing::debug!(task_id = %record.id, error = %e, "queued event not sent");
    }
}

/// The record as `caller` may see it: live from the bucket, else from the archive. A task of
/// another principal is 404 exactly like one that does not exist.
pub async fn get(app: &App, caller: &Caller, id: &str) -> Result<TaskRecord, Error> {
    let id = TaskId::parse(id).map_err(|_| not_found(id))?;
    app.ensure_connected()?;
    let live = app.records.read(&id).await?;
    if let Some(stored) = &live
        && caller.may_see(stored.record.owner.as_deref())
    {
        return Ok(stored.record.clone());
    }
    // Not in the bucket, or someone else's record under an id that was the caller's: an id
    // named again after its record left the bucket is another task, and the archive keeps the
    // first one (`claw-archiver`'s store).
    let archived = archived(app, &id).await;
    match archived {
        Ok(record) if caller.may_see(record.owner.as_deref()) => Ok(record),
        Ok(_) => Err(not_found(id.as_str())),
        Err(Error::NotFound(_)) => Err(not_found(id.as_str())),
        // The bucket answered that the task is not the caller's; the archive's trouble does
        // not change that.
        Err(_) if live.is_some() => Err(not_found(id.as_str())),
        Err(e) => Err(e),
    }
}

/// The record as the archive keeps it.
async fn archived(app: &App, id: &TaskId) -> Result<TaskRecord, Error> {
    let request = GetRequest { id: id.clone() };
    archive_request(app, topology::ARCHIVE_GET, &request).await
}

/// The answer for a task that does not exist or that the caller may not see.
pub fn not_found(id: &str) -> Error {
    Error::NotFound(format!("no task {id}"))
}

/// History from the archive, as `caller` may see it: the owner filter comes from the caller,
/// whatever the query says, so a session names one of the caller's own.
pub async fn list(app: &App, caller: &Caller, query: &ListQuery) -> Result<ListPage, Error> {
    let query = ListQuery { owner: caller.list_filter(), ..query.clone() };
    app.ensure_connected()?;
    archive_request(app, topology::ARCHIVE_LIST, &query).await
}

async fn archive_request<Q: serde::Serialize, T: DeserializeOwned>(
    app: &App,
    subject: &'static str,
    request: &Q,
) -> Result<T, Error> {
    use async_nats::client::RequestErrorKind;
    let payload = serde_json::to_vec(request).map_err(|e| Error::Internal(e.to_string()))?;
    let reply = app.client.request(subject, payload.into()).await.map_err(|e| match e.kind() {
        RequestErrorKind::NoResponders => Error::Unavailable("the archive is not running".into()),
        _ => Error::Unavailable(format!("the archive did not answer: {e}")),
    })?;
    // A success parses as T; otherwise the reply is our error body.
    if let Ok(value) = serde_json::from_slice::<T>(&reply.payload) {
        return Ok(value);
    }
    match serde_json::from_slice::<ErrorBody>(&reply.payload) {
        Ok(ErrorBody { error }) => Err(match error.code.as_str() {
            "not_found" => Error::NotFound(error.message),
            "invalid_request" => {
                Error::Invalid(Invalid { field: error.field, message: error.message })
            }
            _ => Error::Unavailable(format!("archive: {}", error.message)),
        }),
        Err(e) => Err(Error::Internal(format!("unexpected reply from {subject}: {e}"))),
    }
}

/// Where a task's input or result is: in its record, or in the object store.
pub enum Payload<'a> {
    Inline(&'a serde_json::Value),
    Stored(&'a claw_proto::PayloadRef),
}

/// The `part` of `record` (`GET /v1/tasks/{id}/input|result`, `claw.api.payload`); 404 when the
/// task has no result (yet).
pub fn payload(
    record: &TaskRecord,
    part: claw_proto::payloads::Part,
) -> Result<Payload<'_>, Error> {
    use claw_proto::payloads::Part;
    let (inline, stored) = match part {
        Part::Input => (Some(&record.input), &record.input_ref),
        Part::Result => (record.result.as_ref(), &record.result_ref),
    };
    match (stored, inline) {
        (Some(stored), _) => Ok(Payload::Stored(stored)),
        (None, Some(value)) => Ok(Payload::Inline(value)),
        (None, None) => Err(Error::NotFound(format!(
            "task {} has no result: it is {}",
            record.id, record.status
        ))),
    }
}
