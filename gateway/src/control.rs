//! The control verbs (cancel, pause, resume, retry) behind `POST /v1/tasks/{id}/<verb>` and
//! `claw.api.<verb>`.
//!
//! The record in the `tasks` bucket is the truth. A verb is a compare-and-set of the record from
//! the state it was read in ([`plan`] decides the new record and the side effects, without I/O),
//! followed by the effects: take the task's message out of its lane (queued tasks leave the
//! queue), wake the worker that may hold it (`claw.control.<id>`), or publish the task again
//! (resume of a task that left the queue, retry). Because both the gateway and a worker claiming
//! the task write with compare-and-set, a cancel racing a pickup has exactly one winner: either
//! the worker's claim fails and it drops the message, or the cancel sees `running` and goes
//! through the worker. A worker that misses the wake-up still reads the record at its next
//! heartbeat, so no control is lost.

use async_nats::HeaderMap;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use claw_proto::api::{Control, Verb};
use claw_proto::event::Event;
use claw_proto::queue;
use claw_proto::records::{self, Stored};
use claw_proto::task::{Cause, Status, TaskId, TaskRecord};
use claw_proto::topology::{self, Lane, headers};
use time::OffsetDateTime;

use crate::app::App;
use crate::auth::Caller;
use crate::error::Error;
use crate::tasks;

/// What a verb does besides writing the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Remove the task's message from its lane: it must not run (cancel) or must wait (pause).
    Dequeue,
    /// Tell the worker that may hold the task to look at its record now.
    Wake,
    /// Publish the task to its lane again (resume of a task that left the queue, retry).
    Enqueue,
}

/// The outcome of [`plan`].
#[derive(Debug, PartialEq)]
pub enum Plan {
    /// The task is already where the verb would put it: a repeat, harmless.
    Unchanged,
    /// The verb does not apply to this state (409).
    Refused,
    Move(Box<TaskRecord>, Vec<Effect>),
}

/// Decides a verb on a record: the new record and its effects. Pure, so the table of verbs ×
/// states is tested without a server.
pub fn plan(verb: Verb, record: &TaskRecord, now: OffsetDateTime) -> Plan {
    use Status::*;
    let mut next = record.clone();
    let held = record.maybe_held();
    let queued = matches!(record.status, Queued | Retrying)
        || (record.status == Paused && !record.paused_while_running());
    let effects = match (verb, record.status) {
        (Verb::Cancel, Cancelled) | (Verb::Pause, Paused) => return Plan::Unchanged,
        (Verb::Resume, Queued | Running | Retrying) => return Plan::Unchanged,
        (Verb::Retry, Queued | Running | Retrying) => return Plan::Unchanged,
        (Verb::Cancel, _) => {
            if next.cancel(Cause::User, now).is_err() {
                return Plan::Refused;
            }
            // A paused-while-queued task's message is already gone; dequeuing again is a no-op.
            match (held, queued) {
                (true, _) => vec![Effect::Wake],
                (false, true) => vec![Effect::Dequeue],
                (false, false) => vec![],
            }
        }
        (Verb::Pause, _) => {
            if next.pause().is_err() {
                return Plan::Refused;
            }
            if held { vec![Effect::Wake] } else { vec![Effect::Dequeue] }
        }
        (Verb::Resume, _) => {
            if next.resume().is_err() {
                return Plan::Refused;
            }
            if held { vec![Effect::Wake] } else { vec![Effect::Enqueue] }
        }
        (Verb::Retry, _) => {
            if next.requeue(now).is_err() {
                return Plan::Refused;
            }
            vec![Effect::Enqueue]
        }
    };
    Plan::Move(Box::new(next), effects)
}

/// Compare-and-set rounds before giving up: more than a handful means the record is changing
/// faster than a person can click, and the caller is better served by an error to retry.
const CAS_ROUNDS: usize = 8;

/// Applies `verb` to task `id` on behalf of `caller` and returns the record as it is
/// afterwards. A task the caller may not see is 404, as if it did not exist.
pub async fn apply(app: &App, caller: &Caller, id: &str, verb: Verb) -> Result<TaskRecord, Error> {
    let id = TaskId::parse(id).map_err(|_| tasks::not_found(id))?;
    app.ensure_connected()?;
    for _ in 0..CAS_ROUNDS {
        let Some(Stored { record, revision }) = app.records.read(&id).await? else {
            return not_live(app, caller, &id, verb).await;
        };
        if !caller.may_see(record.owner.as_deref()) {
            return Err(tasks::not_found(id.as_str()));
        }
        let (next, effects) = match plan(verb, &record, OffsetDateTime::now_utc()) {
            Plan::Unchanged => return Ok(record),
            Plan::Refused => return Err(refused(verb, &record)),
            Plan::Move(next, effects) => (*next, effects),
        };
        match app.records.update(&next, revision).await {
            Ok(revision) => {
                tracing::info!(task_id = %id, verb = verb.as_str(), from = %record.status,
                    to = %next.status, "control");
                metrics::counter!("claw_gateway_control_total", "verb" => verb.as_str())
                    .increment(1);
                for effect in effects {
                    if let Err(e) = run_effect(app, &next, revision, verb, effect).await {
                        undo(app, &record, &next, revision).await;
                        return Err(e);
                    }
                }
                let event = Event::status(&next);
                let _ = app.client.publish(next.progress_subject(), event.to_json()).await;
                return Ok(next);
            }
            Err(records::Error::Conflict) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Unavailable(format!("task {id} kept changing; try again")))
}

/// The record has left the bucket (finished, archived, and past its retention): the archive
/// has it, finished. Retry brings such a task back; the other verbs have nothing to act on.
async fn not_live(
    app: &App,
    caller: &Caller,
    id: &TaskId,
    verb: Verb,
) -> Result<TaskRecord, Error> {
    let archived = tasks::get(app, caller, id.as_str()).await?;
    if verb != Verb::Retry {
        return match plan(verb, &archived, OffsetDateTime::now_utc()) {
            Plan::Unchanged => Ok(archived),
            _ => Err(refused(verb, &archived)),
        };
    }
    let Plan::Move(next, _) = plan(verb, &archived, OffsetDateTime::now_utc()) else {
        return Err(refused(verb, &archived));
    };
    let revision = match app.records.create(&next).await {
        Ok(revision) => revision,
        // Another retry brought it back first.
        Err(records::Error::Conflict) => {
            return Err(Error::Unavailable(format!("task {id} changed meanwhile; try again")));
        }
        Err(e) => return Err(e.into()),
    };
    if let Err(e) = run_effect(app, &next, revision, verb, Effect::Enqueue).await {
        // Nothing was queued: the task stays where the archive has it.
        if let Err(undo) = app.records.remove(revision).await {
            tracing::warn!(task_id = %id, error = %undo, "could not undo a refused retry");
        }
        return Err(e);
    }
    Ok(*next)
}

/// Puts `before` back after the effect of a verb that moved it to `after` (at `revision`) was
/// refused (a full queue, JetStream down), so the record never says `queued` without a message
/// and a repeat of the verb does the work again. If the record changed meanwhile, or the write
/// fails, it is left to the archiver's reconciler, which publishes a queued task that has no
/// message.
async fn undo(app: &App, before: &TaskRecord, after: &TaskRecord, revision: u64) {
    match app.records.update(before, revision).await {
        Ok(_) => tracing::info!(task_id = %after.id, status = %before.status,
            "verb undone: its effect was refused"),
        Err(e) => tracing::warn!(task_id = %after.id, error = %e,
            "could not undo a verb whose effect was refused; the reconciler will repair it"),
    }
}

fn refused(verb: Verb, record: &TaskRecord) -> Error {
    Error::Conflict {
        message: format!("cannot {} a task that is {}", verb.as_str(), record.status),
        status: record.status,
    }
}

async fn run_effect(
    app: &App,
    record: &TaskRecord,
    revision: u64,
    verb: Verb,
    effect: Effect,
) -> Result<(), Error> {
    match effect {
        Effect::Dequeue => {
            let removed = dequeue(app, record).await;
            tracing::debug!(task_id = %record.id, removed, "dequeued");
            Ok(())
        }
        Effect::Wake => {
            let control = Control { id: record.id.clone(), verb: verb.into() };
            let payload =
                serde_json::to_vec(&control).map_err(|e| Error::Internal(e.to_string()))?;
            // A hint only: the worker re-reads the record at its next heartbeat anyway, so a
            // wake-up that cannot be sent does not undo the verb.
            if let Err(e) =
                app.client.publish(topology::control_subject(&record.id), payload.into()).await
            {
                tracing::warn!(task_id = %record.id, error = %e, "could not wake the worker");
            }
            Ok(())
        }
        Effect::Enqueue => enqueue(app, record, revision).await,
    }
}

/// Publishes the task to its lane again (`queue::republish`: the message id carries the
/// record's revision, so an earlier message of the task within the duplicate window does not
/// swallow it).
async fn enqueue(app: &App, record: &TaskRecord, revision: u64) -> Result<(), Error> {
    queue::republish(&app.js, record, revision).await.map_err(|e| tasks::publish_error(e, app))?;
    Ok(())
}

/// Takes this task's message out of its lane; returns how many messages it removed (0 or 1).
///
/// The lane is scanned on the server's subject index (`next_by_subject`), one round trip per
/// message looked at, but not from the lane's head: every copy of the task was published after
/// its record was created, so the scan starts at the first lane message stored since then
/// (less [`CLOCK_SKEW`]), which the server finds by time, and it stops at the first copy. A
/// cancel in a deep queue then looks at the few messages published around the task, not at
/// the thousands queued before it. A copy left behind (there is normally one at a time) is
/// harmless: the worker that gets it finds the record cancelled or paused and drops it.
async fn dequeue(app: &App, record: &TaskRecord) -> usize {
    let lane = Lane::new(record.class, record.priority);
    let stream = match app.js.get_stream_no_info(topology::TASKS_STREAM).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(error = %e, "cannot open the task stream to dequeue");
            return 0;
        }
    };
    let Some(mut sequence) = first_since(app, &lane, record.created_at - CLOCK_SKEW).await else {
        return 0; // nothing stored in the lane since the task was created
    };
    loop {
        let message = stream
            .raw_message_builder()
            .sequence(sequence)
            .next_by_subject(lane.subject())
            .send()
            .await;
        let message = match message {
            Ok(m) => m,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return 0,
            Err(e) => {
                tracing::warn!(error = %e, "scanning the lane to dequeue");
                return 0;
            }
        };
        sequence = message.sequence + 1;
        if is_task(&message.headers, &message.payload, &record.id) {
            return match stream.delete_message(message.sequence).await {
                Ok(_) => 1,
                // Already acked by a worker that lost the claim race, or deleted by another
                // gateway: either way it is gone.
                Err(e) => {
                    tracing::debug!(error = %e, "message already gone");
                    0
                }
            };
        }
    }
}

/// How far a gateway's clock may run ahead of the server's: the lane scan of [`dequeue`] starts
/// this much before the record's `created_at`. A gateway further ahead than this (no NTP) would
/// start after the task and leave its message queued; that only costs the queue slot until a
/// worker gets the message and drops it for the cancelled or paused record.
const CLOCK_SKEW: time::Duration = time::Duration::seconds(1);

/// The sequence of the first message of `lane` stored at or after `since`: `None` when there is
/// none, the stream's first sequence when the server cannot tell (the scan is then longer, not
/// wrong).
async fn first_since(app: &App, lane: &Lane, since: OffsetDateTime) -> Option<u64> {
    use async_nats::jetstream::response::Response;
    let since = since.format(&time::format_description::well_known::Rfc3339).ok();
    let request = serde_json::json!({"start_time": since, "next_by_subj": lane.subject()});
    let subject = format!("STREAM.MSG.GET.{}", topology::TASKS_STREAM);
    match app.js.request::<_, _, Response<serde_json::Value>>(subject, &request).await {
        Ok(Response::Ok(found)) => Some(found["message"]["seq"].as_u64().unwrap_or(1)),
        Ok(Response::Err { error }) if error.error_code() == NO_MESSAGE_FOUND => None,
        Ok(Response::Err { error }) => {
            tracing::debug!(%error, "finding the lane position by time; scanning from the start");
            Some(1)
        }
        Err(e) => {
            tracing::debug!(error = %e, "finding the lane position by time; scanning from the start");
            Some(1)
        }
    }
}

/// JetStream's "no message found" (10037).
const NO_MESSAGE_FOUND: async_nats::jetstream::ErrorCode =
    async_nats::jetstream::ErrorCode::NO_MESSAGE_FOUND;

/// Whether a lane message is task `id`: by its message id (`<id>` or `<id>:<revision>`), else
/// by the `id` in its payload (NATS-native publishers may set only that).
fn is_task(headers: &HeaderMap, payload: &[u8], id: &TaskId) -> bool {
    if let Some(msg_id) = headers.get(headers::MSG_ID) {
        let msg_id = msg_id.as_str();
        if msg_id == id.as_str() || msg_id.split_once(':').is_some_and(|(i, _)| i == id.as_str()) {
            return true;
        }
    }
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: Option<String>,
    }
    serde_json::from_slice::<IdOnly>(payload).is_ok_and(|m| m.id.as_deref() == Some(id.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use claw_proto::kinds::Catalog;
    use claw_proto::spec::{Limits, TaskSpec};

    fn record(status: Status) -> TaskRecord {
        let now = OffsetDateTime::now_utc();
        let spec = TaskSpec::from_slice(br#"{"kind":"sleep"}"#).unwrap();
        let mut r = spec
            .admit(TaskId::generate(), now, None, &Catalog::builtin(), &Limits::STANDARD)
            .unwrap();
        match status {
            Status::Queued => {}
            Status::Running => r.start(1, "w", now).unwrap(),
            Status::Retrying => {
                r.start(1, "w", now).unwrap();
                r.retry_later(claw_proto::TaskError::new("x", "y", true), Cause::Error).unwrap();
            }
            Status::Paused => r.pause().unwrap(),
            Status::Succeeded => {
                r.start(1, "w", now).unwrap();
                r.succeed(serde_json::Value::Null, now).unwrap();
            }
            Status::Failed => {
                r.fail(claw_proto::TaskError::new("x", "y", false), Cause::Error, now).unwrap()
            }
            Status::Cancelled => r.cancel(Cause::User, now).unwrap(),
        }
        r
    }

    fn effects(verb: Verb, status: Status) -> Result<Vec<Effect>, &'static str> {
        match plan(verb, &record(status), OffsetDateTime::now_utc()) {
            Plan::Move(_, effects) => Ok(effects),
            Plan::Unchanged => Err("unchanged"),
            Plan::Refused => Err("refused"),
        }
    }

    #[test]
    fn cancel() {
        assert_eq!(effects(Verb::Cancel, Status::Queued), Ok(vec![Effect::Dequeue]));
        assert_eq!(effects(Verb::Cancel, Status::Retrying), Ok(vec![Effect::Dequeue]));
        assert_eq!(effects(Verb::Cancel, Status::Running), Ok(vec![Effect::Wake]));
        assert_eq!(effects(Verb::Cancel, Status::Paused), Ok(vec![Effect::Dequeue]));
        assert_eq!(effects(Verb::Cancel, Status::Cancelled), Err("unchanged"));
        assert_eq!(effects(Verb::Cancel, Status::Succeeded), Err("refused"));
        assert_eq!(effects(Verb::Cancel, Status::Failed), Err("refused"));
    }

    #[test]
    fn pause_and_resume() {
        assert_eq!(effects(Verb::Pause, Status::Queued), Ok(vec![Effect::Dequeue]));
        assert_eq!(effects(Verb::Pause, Status::Running), Ok(vec![Effect::Wake]));
        assert_eq!(effects(Verb::Pause, Status::Paused), Err("unchanged"));
        assert_eq!(effects(Verb::Pause, Status::Succeeded), Err("refused"));
        assert_eq!(effects(Verb::Resume, Status::Paused), Ok(vec![Effect::Enqueue]));
        assert_eq!(effects(Verb::Resume, Status::Running), Err("unchanged"));
        assert_eq!(effects(Verb::Resume, Status::Failed), Err("refused"));

        let now = OffsetDateTime::now_utc();
        let mut held = record(Status::Running);
        held.pause().unwrap();
        let Plan::Move(resumed, effects) = plan(Verb::Resume, &held, now) else { panic!() };
        assert_eq!((resumed.status, effects), (Status::Running, vec![Effect::Wake]));
        let Plan::Move(_, effects) = plan(Verb::Cancel, &held, now) else { panic!() };
        assert_eq!(effects, vec![Effect::Wake]);
    }

    #[test]
    fn retry() {
        assert_eq!(effects(Verb::Retry, Status::Failed), Ok(vec![Effect::Enqueue]));
        assert_eq!(effects(Verb::Retry, Status::Cancelled), Ok(vec![Effect::Enqueue]));
        assert_eq!(effects(Verb::Retry, Status::Queued), Err("unchanged"));
        assert_eq!(effects(Verb::Retry, Status::Succeeded), Err("refused"));
        assert_eq!(effects(Verb::Retry, Status::Paused), Err("refused"));
    }

    #[test]
    fn messages_are_matched_by_id() {
        let id = TaskId::parse("t-1").unwrap();
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, "t-1");
        assert!(is_task(&h, b"", &id));
        h.insert(headers::MSG_ID, "t-1:42");
        assert!(is_task(&h, b"", &id));
        h.insert(headers::MSG_ID, "t-10");
        assert!(!is_task(&h, b"", &id));
        assert!(is_task(&HeaderMap::new(), br#"{"id":"t-1","kind":"x"}"#, &id));
        assert!(!is_task(&HeaderMap::new(), b"garbage", &id));
    }
}
