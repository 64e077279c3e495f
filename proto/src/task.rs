//! The task record and its state machine.
//!
//! A [`TaskRecord`] is the JSON stored under the task's id in the `tasks` KV bucket and, once it
//! is terminal, in the archive. Its serde form is a public wire contract (`docs/PROTOCOL.md`):
//! NATS-native users read it with `nats kv get tasks <id>`. Every change of `status` goes through
//! a method here that refuses illegal moves, so no service can invent a transition.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

/// A task's id: a KV key and a subject token, so only `[A-Za-z0-9_-]`, at most 64 characters.
/// Ids the system makes are UUIDv7 (time-ordered); NATS-native publishers may bring their own.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct TaskId(String);

/// A session groups the tasks of one conversation or user; it is the second token of the
/// progress subject, so it follows the same rules as a [`TaskId`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Session(String);

/// Why an id or session was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")]
pub struct InvalidToken;

fn check_token(s: &str) -> Result<(), InvalidToken> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(InvalidToken) }
}

impl TaskId {
    /// A fresh UUIDv7: sortable by creation time, which keeps archive pages in order.
    pub fn generate() -> TaskId {
        TaskId(uuid::Uuid::now_v7().to_string())
    }

    /// A stable id derived from `name` (UUIDv5). Used where the same input must always give
    /// the same task: an `Idempotency-Key`, or a NATS message that came without an id.
    pub fn derived(namespace: &str, name: &str) -> TaskId {
        let ns = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, namespace.as_bytes());
        TaskId(uuid::Uuid::new_v5(&ns, name.as_bytes()).to_string())
    }

    pub fn parse(s: &str) -> Result<TaskId, InvalidToken> {
        check_token(s)?;
        Ok(TaskId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Session {
    pub const DEFAULT: &'static str = "default";

    pub fn parse(s: &str) -> Result<Session, InvalidToken> {
        check_token(s)?;
        Ok(Session(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Session {
    fn default() -> Session {
        Session(Session::DEFAULT.to_owned())
    }
}

macro_rules! token_serde {
    ($ty:ident) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<$ty, D::Error> {
                let s = String::deserialize(d)?;
                $ty::parse(&s).map_err(serde::de::Error::custom)
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}
token_serde!(TaskId);
token_serde!(Session);

/// Short tasks run as async tasks inside a worker; long ones in child processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Short,
    Long,
}

impl Class {
    pub const ALL: [Class; 2] = [Class::Short, Class::Long];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Short => "short",
            Class::Long => "long",
        }
    }

    pub fn parse(s: &str) -> Option<Class> {
        match s {
            "short" => Some(Class::Short),
            "long" => Some(Class::Long),
            _ => None,
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The lane within a class. Serialized as a word; submitters may also send an integer 0-9
/// (the original plan's scale: 9 is "priority > 8" = high, 0-2 low, the rest normal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    Normal,
    Low,
}

impl Priority {
    /// Highest first: the order in which a worker looks at its lanes.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    pub fn parse(s: &str) -> Option<Priority> {
        match s {
            "high" => Some(Priority::High),
            "normal" => Some(Priority::Normal),
            "low" => Some(Priority::Low),
            _ => None,
        }
    }

    pub fn from_level(level: u8) -> Option<Priority> {
        match level {
            9 => Some(Priority::High),
            3..=8 => Some(Priority::Normal),
            0..=2 => Some(Priority::Low),
            _ => None,
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Priority {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Priority, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            Level(i64),
        }
        let bad = || serde::de::Error::custom("expected \"high\", \"normal\", \"low\" or 0-9");
        match Raw::deserialize(d).map_err(|_| bad())? {
            Raw::Word(w) => Priority::parse(&w).ok_or_else(bad),
            Raw::Level(n) => u8::try_from(n).ok().and_then(Priority::from_level).ok_or_else(bad),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Running,
    Retrying,
    Paused,
    Succeeded,
    Failed,
    Cancelled,
}

impl Status {
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Retrying => "retrying",
            Status::Paused => "paused",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        serde_json::from_value(Value::String(s.to_owned())).ok()
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who or what made the last transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// Submitted, or moved by a person or program through the API.
    User,
    /// A worker picked it up, or the handler finished.
    Worker,
    /// The handler reported an error.
    Error,
    /// An attempt ran past its timeout, or the task past its absolute deadline.
    Timeout,
    /// The worker lost its lease (could not heartbeat) and stopped the attempt.
    LeaseLost,
    /// The message came back after its ack deadline: the worker running it is presumed dead.
    WorkerLost,
    /// A resource limit (memory, CPU, files) killed the attempt.
    Limit,
    /// The task was sent to the dead-letter stream.
    DeadLetter,
    /// A worker draining for a restart gave the task back before its attempt ended; the
    /// attempt does not count.
    HandedBack,
}

/// A handler's progress report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// 0.0 ..= 1.0.
    pub fraction: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Why an attempt failed. `retryable` decides between a retry with backoff and giving up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct TaskError {
    pub code: String,
    pub message: String,
    pub retryable: bool,
}

impl TaskError {
    pub fn new(code: impl Into<String>, message: impl Into<String>, retryable: bool) -> TaskError {
        TaskError { code: code.into(), message: message.into(), retryable }
    }
}

/// A task's input or result kept in the `payloads` object store instead of in its record,
/// because it is larger than [`crate::payloads::INLINE_MAX`]: the record, every revision of it,
/// the lane message and the events stay small, and a payload can be larger than a NATS message.
/// `GET /v1/tasks/{id}/input` and `/result` read it; so does `nats object get payloads <name>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadRef {
    /// The object store bucket (`payloads`).
    pub bucket: String,
    /// The object's name: `<task_id>/input` or `<task_id>/result`.
    pub name: String,
    /// Bytes of JSON.
    pub size: u64,
    /// The object store's digest, `SHA-256=<base64url>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// The record of one task: the value under its id in the `tasks` bucket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: TaskId,
    pub session: Session,
    pub kind: String,
    pub input: Value,
    pub class: Class,
    pub priority: Priority,
    pub status: Status,
    /// The attempt now running or last run; 0 until a worker first starts it.
    pub attempt: u32,
    pub max_attempts: u32,
    /// Per-attempt timeout in seconds, already capped by the class.
    pub timeout_s: u64,
    #[serde(default)]
    pub progress: Option<Progress>,
    #[serde(default)]
    pub result: Option<Value>,
    #[serde(default)]
    pub error: Option<TaskError>,
    #[serde(default)]
    pub cause: Option<Cause>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    /// The absolute deadline: no attempt starts after it, queueing and retries included.
    #[serde(with = "time::serde::rfc3339")]
    pub deadline: OffsetDateTime,
    /// The worker running the task, or the last one that did.
    #[serde(default)]
    pub worker: Option<String>,
    /// While `paused`: the state it was paused from. `running` means a worker still holds the
    /// task (its process is frozen, its lease kept); anything else means the task left the queue
    /// and `resume` puts it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_from: Option<Status>,
    /// The `TASKS` stream sequence of the message the current (or last) attempt was delivered
    /// from. After a cancel and a retry two messages of one task can exist for a moment; this
    /// says which one is live, so a worker holding the other drops it instead of taking over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_seq: Option<u64>,
    /// The gateway principal that submitted the task over HTTP or the WebSocket, when the
    /// gateway runs with API tokens. Absent for tasks from NATS-native publishers,
    /// `claw.api.submit`, and a gateway without tokens; only admin principals see those.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Where the input is when it is too large to be inline (`input` is then `null`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_ref: Option<PayloadRef>,
    /// Where the result is when it is too large to be inline (`result` is then `null`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_ref: Option<PayloadRef>,
    /// The concurrency keys the task runs under: at most `limit` tasks of a key run at once,
    /// across all workers. The gateway adds one per principal (`principal:<owner>`, its
    /// `running_tasks`); a task over a limit waits, `queued`, without holding a worker slot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub concurrency: Vec<Concurrency>,
    /// Why a `queued` task is not running although a worker looked at it (e.g. `concurrency
    /// principal:alice (limit 4)`); cleared when an attempt starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
}

/// One concurrency key of a task ([`TaskRecord::concurrency`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Concurrency {
    pub key: String,
    /// At least 1.
    pub limit: u32,
}

impl Concurrency {
    /// The key of a principal's `running_tasks` limit.
    pub fn principal(name: &str, limit: u32) -> Concurrency {
        Concurrency { key: format!("principal:{name}"), limit: limit.max(1) }
    }
}

/// A move the state machine does not allow, with the state it was refused in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {verb} a task that is {from}")]
pub struct IllegalTransition {
    pub verb: &'static str,
    pub from: Status,
}

impl TaskRecord {
    /// The bytes this record holds in the system when its JSON is `json_len` bytes long: the
    /// record itself and the objects its refs name (what a principal's `stored_bytes` quota
    /// counts).
    pub fn stored_bytes(&self, json_len: usize) -> u64 {
        let refs = [&self.input_ref, &self.result_ref];
        let objects: u64 = refs.into_iter().flatten().map(|r| r.size).sum();
        (json_len as u64).saturating_add(objects)
    }

    fn refuse(&self, verb: &'static str) -> IllegalTransition {
        IllegalTransition { verb, from: self.status }
    }

    /// A worker starts attempt `attempt` (the record's `attempt + 1`: attempts are counted
    /// here). Allowed from `queued` and `retrying`, and from `running` when the message was
    /// redelivered after the previous holder died or lost its lease.
    pub fn start(
        &mut self,
        attempt: u32,
        worker: &str,
        now: OffsetDateTime,
    ) -> Result<(), IllegalTransition> {
        let cause = match self.status {
            Status::Queued | Status::Retrying => Cause::Worker,
            Status::Running => Cause::WorkerLost,
            _ => return Err(self.refuse("start")),
        };
        self.status = Status::Running;
        self.cause = Some(cause);
        self.attempt = attempt;
        self.started_at = Some(now);
        self.worker = Some(worker.to_owned());
        self.progress = None;
        self.waiting = None;
        Ok(())
    }

    pub fn report_progress(&mut self, progress: Progress) -> Result<(), IllegalTransition> {
        if self.status != Status::Running {
            return Err(self.refuse("report progress for"));
        }
        self.progress = Some(progress);
        Ok(())
    }

    pub fn succeed(&mut self, result: Value, now: OffsetDateTime) -> Result<(), IllegalTransition> {
        self.succeed_with(Some(result), None, now)
    }

    /// Succeeds with a result kept in the object store ([`PayloadRef`]).
    pub fn succeed_stored(
        &mut self,
        result: PayloadRef,
        now: OffsetDateTime,
    ) -> Result<(), IllegalTransition> {
        self.succeed_with(None, Some(result), now)
    }

    fn succeed_with(
        &mut self,
        result: Option<Value>,
        result_ref: Option<PayloadRef>,
        now: OffsetDateTime,
    ) -> Result<(), IllegalTransition> {
        if self.status != Status::Running {
            return Err(self.refuse("complete"));
        }
        self.status = Status::Succeeded;
        self.cause = Some(Cause::Worker);
        self.result = result;
        self.result_ref = result_ref;
        self.error = None;
        self.finished_at = Some(now);
        if let Some(p) = &mut self.progress {
            p.fraction = 1.0;
        }
        Ok(())
    }

    /// The attempt failed and another will follow after a backoff.
    pub fn retry_later(&mut self, error: TaskError, cause: Cause) -> Result<(), IllegalTransition> {
        if self.status != Status::Running {
            return Err(self.refuse("schedule a retry of"));
        }
        self.status = Status::Retrying;
        self.cause = Some(cause);
        self.error = Some(error);
        Ok(())
    }

    /// Give up: the last attempt failed, attempts or time ran out, or the task cannot run at all.
    /// Allowed from every non-terminal state (a task can be dead-lettered before it ever ran).
    pub fn fail(
        &mut self,
        error: TaskError,
        cause: Cause,
        now: OffsetDateTime,
    ) -> Result<(), IllegalTransition> {
        if self.status.is_terminal() {
            return Err(self.refuse("fail"));
        }
        self.status = Status::Failed;
        self.cause = Some(cause);
        self.error = Some(error);
        self.finished_at = Some(now);
        Ok(())
    }

    pub fn cancel(&mut self, cause: Cause, now: OffsetDateTime) -> Result<(), IllegalTransition> {
        if self.status.is_terminal() {
            return Err(self.refuse("cancel"));
        }
        self.status = Status::Cancelled;
        self.cause = Some(cause);
        self.finished_at = Some(now);
        Ok(())
    }

    /// Whether a message with stream sequence `seq` is a stale copy: the record says the task
    /// runs (or is held paused) from another message.
    pub fn is_stale_copy(&self, seq: u64) -> bool {
        self.maybe_held() && self.message_seq.is_some_and(|live| live != seq)
    }

    /// Whether a worker may be running this task right now (so a control message must reach it).
    pub fn maybe_held(&self) -> bool {
        self.status == Status::Running || self.paused_while_running()
    }

    pub fn pause(&mut self) -> Result<(), IllegalTransition> {
        if !matches!(self.status, Status::Queued | Status::Running | Status::Retrying) {
            return Err(self.refuse("pause"));
        }
        self.paused_from = Some(self.status);
        self.status = Status::Paused;
        self.cause = Some(Cause::User);
        Ok(())
    }

    /// Whether a worker holds this paused task (it was paused while running).
    pub fn paused_while_running(&self) -> bool {
        self.status == Status::Paused && self.paused_from == Some(Status::Running)
    }

    /// The worker that held a paused-while-running task is gone: the task is no longer held by
    /// anyone, so `resume` must queue it again.
    pub fn release_pause(&mut self) -> Result<(), IllegalTransition> {
        if !self.paused_while_running() {
            return Err(self.refuse("release the hold of"));
        }
        self.paused_from = Some(Status::Queued);
        self.cause = Some(Cause::WorkerLost);
        Ok(())
    }

    /// The message this running task was delivered from is gone (expired, deleted by hand), so
    /// no copy of it is live any more: whichever copy is published next may take it over (a
    /// worker starts it as a takeover, `worker_lost`), instead of being dropped as stale.
    pub fn message_lost(&mut self) -> Result<(), IllegalTransition> {
        if self.status != Status::Running {
            return Err(self.refuse("lose the message of"));
        }
        self.message_seq = None;
        Ok(())
    }

    /// Resume a paused task: back to `running` if a worker still holds it, else `queued`.
    pub fn resume(&mut self) -> Result<(), IllegalTransition> {
        if self.status != Status::Paused {
            return Err(self.refuse("resume"));
        }
        self.status = if self.paused_while_running() { Status::Running } else { Status::Queued };
        self.paused_from = None;
        self.cause = Some(Cause::User);
        Ok(())
    }

    /// A worker draining for a restart (a rolling deploy) gives back the task it holds: queued
    /// again, or, if it was paused while held, no longer held (a resume queues it). The attempt
    /// it was running does not count (the next start writes the same number again), so
    /// restarts never use up a long task's attempts.
    pub fn hand_back(&mut self) -> Result<(), IllegalTransition> {
        if self.status == Status::Running {
            self.status = Status::Queued;
        } else if self.paused_while_running() {
            self.paused_from = Some(Status::Queued);
        } else {
            return Err(self.refuse("hand back"));
        }
        self.attempt = self.attempt.saturating_sub(1);
        self.cause = Some(Cause::HandedBack);
        self.progress = None;
        Ok(())
    }

    /// An explicit retry of a finished task: a new round of attempts of the same id. The
    /// absolute deadline starts again from now, as long as the first one was (within what
    /// admission allows: a record written by hand with a deadline before its creation, or
    /// centuries after it, gets one from now to seven days, never a time that cannot be
    /// written back).
    pub fn requeue(&mut self, now: OffsetDateTime) -> Result<(), IllegalTransition> {
        if !matches!(self.status, Status::Failed | Status::Cancelled) {
            return Err(self.refuse("retry"));
        }
        let longest = time::Duration::seconds(crate::spec::Limits::STANDARD.max_deadline_s as i64);
        let span = (self.deadline - self.created_at).clamp(time::Duration::ZERO, longest);
        self.deadline = now + span;
        self.status = Status::Queued;
        // A new round: the next start is attempt 1 again, with all of max_attempts ahead.
        self.attempt = 0;
        self.cause = Some(Cause::User);
        self.result = None;
        self.result_ref = None;
        self.finished_at = None;
        self.progress = None;
        self.paused_from = None;
        Ok(())
    }

    /// The session as its events are addressed: its owner's namespace.
    pub fn scope(&self) -> crate::topology::SessionScope {
        crate::topology::SessionScope::new(self.owner.as_deref(), self.session.clone())
    }

    /// The subject this task's events go to: `progress.[<owner>.]<session>.<id>`.
    pub fn progress_subject(&self) -> String {
        self.scope().subject(&self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn record(status: Status) -> TaskRecord {
        let now = OffsetDateTime::now_utc();
        TaskRecord {
            id: TaskId::generate(),
            session: Session::default(),
            kind: "sleep".into(),
            input: serde_json::json!({}),
            class: Class::Short,
            priority: Priority::Normal,
            status,
            attempt: 0,
            max_attempts: 3,
            timeout_s: 300,
            progress: None,
            result: None,
            error: None,
            cause: Some(Cause::User),
            created_at: now,
            started_at: None,
            finished_at: None,
            deadline: now + time::Duration::days(7),
            worker: None,
            paused_from: None,
            message_seq: None,
            owner: None,
            input_ref: None,
            result_ref: None,
            concurrency: Vec::new(),
            waiting: None,
        }
    }

    #[test]
    fn happy_path() {
        let now = OffsetDateTime::now_utc();
        let mut r = record(Status::Queued);
        r.start(1, "w1", now).unwrap();
        assert_eq!((r.status, r.attempt, r.cause), (Status::Running, 1, Some(Cause::Worker)));
        r.retry_later(TaskError::new("boom", "x", true), Cause::Error).unwrap();
        assert_eq!(r.status, Status::Retrying);
        r.start(2, "w2", now).unwrap();
        r.succeed(serde_json::json!(42), now).unwrap();
        assert_eq!(r.status, Status::Succeeded);
        assert_eq!(r.error, None);
    }

    #[test]
    fn terminal_states_never_change_except_by_retry() {
        let now = OffsetDateTime::now_utc();
        for s in [Status::Succeeded, Status::Failed, Status::Cancelled] {
            let mut r = record(s);
            assert!(r.start(1, "w", now).is_err());
            assert!(r.succeed(Value::Null, now).is_err());
            assert!(r.fail(TaskError::new("x", "y", false), Cause::Error, now).is_err());
            assert!(r.cancel(Cause::User, now).is_err());
            assert!(r.pause().is_err());
            assert_eq!(r.requeue(now).is_ok(), s != Status::Succeeded);
        }
    }

    #[test]
    fn an_explicit_retry_starts_a_new_round_of_attempts() {
        let now = OffsetDateTime::now_utc();
        let mut r = record(Status::Queued);
        r.start(1, "w", now).unwrap();
        r.fail(TaskError::new("x", "y", false), Cause::Error, now).unwrap();
        r.requeue(now).unwrap();
        assert_eq!((r.status, r.attempt), (Status::Queued, 0));
    }

    #[test]
    fn redelivery_of_a_running_task_says_the_worker_was_lost() {
        let now = OffsetDateTime::now_utc();
        let mut r = record(Status::Running);
        r.start(2, "w2", now).unwrap();
        assert_eq!(r.cause, Some(Cause::WorkerLost));
    }

    #[test]
    fn a_hand_back_gives_the_attempt_back() {
        let now = OffsetDateTime::now_utc();
        let mut r = record(Status::Queued);
        r.max_attempts = 1;
        for _ in 0..3 {
            r.start(r.attempt + 1, "w", now).unwrap();
            assert_eq!(r.attempt, 1);
            r.hand_back().unwrap();
            assert_eq!(
                (r.status, r.attempt, r.cause),
                (Status::Queued, 0, Some(Cause::HandedBack))
            );
        }
        r.start(1, "w", now).unwrap();
        r.pause().unwrap();
        r.hand_back().unwrap();
        assert_eq!((r.status, r.paused_from, r.attempt), (Status::Paused, Some(Status::Queued), 0));
        assert!(!r.maybe_held());
        r.resume().unwrap();
        assert_eq!(r.status, Status::Queued);
        assert!(r.hand_back().is_err(), "only a held task can be handed back");
    }

    #[test]
    fn pause_remembers_where_it_came_from() {
        let now = OffsetDateTime::now_utc();
        let mut r = record(Status::Queued);
        r.pause().unwrap();
        assert!(!r.maybe_held());
        r.resume().unwrap();
        assert_eq!((r.status, r.paused_from), (Status::Queued, None));

        r.start(1, "w", now).unwrap();
        r.pause().unwrap();
        assert!(r.paused_while_running() && r.maybe_held());
        r.resume().unwrap();
        assert_eq!(r.status, Status::Running);

        r.pause().unwrap();
        r.release_pause().unwrap();
        assert!(!r.maybe_held());
        r.resume().unwrap();
        assert_eq!(r.status, Status::Queued);
    }

    #[test]
    fn only_the_live_message_may_take_a_held_task_over() {
        let now = OffsetDateTime::now_utc();
        let mut r = record(Status::Queued);
        assert!(!r.is_stale_copy(7), "nothing holds a queued task");
        r.start(1, "w", now).unwrap();
        r.message_seq = Some(7);
        assert!(!r.is_stale_copy(7), "its own redelivery takes over");
        assert!(r.is_stale_copy(9), "another copy does not");
        r.pause().unwrap();
        assert!(r.is_stale_copy(9));
        r.message_seq = None;
        assert!(!r.is_stale_copy(9), "records written before the field existed");
    }

    #[test]
    fn a_running_task_whose_message_is_lost_is_taken_over_by_the_next_copy() {
        let now = OffsetDateTime::now_utc();
        let mut r = record(Status::Queued);
        assert!(r.message_lost().is_err(), "only a running task has a message of its own");
        r.start(1, "w", now).unwrap();
        r.message_seq = Some(7);
        assert!(r.is_stale_copy(9));
        r.message_lost().unwrap();
        assert!(!r.is_stale_copy(9));
        r.start(2, "w2", now).unwrap();
        assert_eq!(r.cause, Some(Cause::WorkerLost));
    }

    #[test]
    fn retry_gives_a_fresh_deadline() {
        let now = OffsetDateTime::now_utc();
        let mut r = record(Status::Failed);
        let span = r.deadline - r.created_at;
        let later = now + time::Duration::days(30);
        r.requeue(later).unwrap();
        assert_eq!((r.status, r.deadline), (Status::Queued, later + span));
    }

    #[test]
    fn illegal_moves_name_the_state() {
        let mut r = record(Status::Queued);
        let e = r.resume().unwrap_err();
        assert_eq!(e.to_string(), "cannot resume a task that is queued");
    }

    #[test]
    fn priority_accepts_words_and_levels() {
        let p = |v: Value| serde_json::from_value::<Priority>(v);
        assert_eq!(p("high".into()).unwrap(), Priority::High);
        assert_eq!(p(9.into()).unwrap(), Priority::High);
        assert_eq!(p(5.into()).unwrap(), Priority::Normal);
        assert_eq!(p(0.into()).unwrap(), Priority::Low);
        assert!(p(10.into()).is_err());
        assert!(p((-1).into()).is_err());
        assert!(p("urgent".into()).is_err());
        assert_eq!(serde_json::to_value(Priority::Low).unwrap(), "low");
    }

    #[test]
    fn tokens_are_subject_safe() {
        assert!(TaskId::parse("abc-DEF_123").is_ok());
        for bad in ["", "a.b", "a b", "a*", ">", &"x".repeat(65)] {
            assert!(TaskId::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(TaskId::derived("k", "a"), TaskId::derived("k", "a"));
        assert_ne!(TaskId::derived("k", "a"), TaskId::derived("k", "b"));
    }

    #[test]
    fn record_round_trips_through_json() {
        let r = record(Status::Queued);
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<TaskRecord>(&json).unwrap(), r);
    }

    #[test]
    fn owner_is_optional_on_the_wire() {
        // Records written before owners existed (and by NATS-native publishers) parse, and a
        // record without an owner is written without the field.
        let r = record(Status::Queued);
        let json = serde_json::to_value(&r).unwrap();
        assert!(json.get("owner").is_none(), "{json}");
        let mut owned = r.clone();
        owned.owner = Some("alice".into());
        let json = serde_json::to_value(&owned).unwrap();
        assert_eq!(json["owner"], "alice");
        assert_eq!(serde_json::from_value::<TaskRecord>(json).unwrap(), owned);
    }

    #[test]
    fn a_retry_of_a_record_with_a_nonsense_deadline_gets_one_that_can_be_written() {
        let now = OffsetDateTime::now_utc();
        let mut record = record(Status::Running);
        record.fail(TaskError::new("boom", "x", false), Cause::Error, now).unwrap();
        // Found by the fuzz target `record`: created in year 4052, due in 2026.
        record.created_at = now + time::Duration::days(365 * 2026);
        record.requeue(now).unwrap();
        assert_eq!(record.deadline, now);
        serde_json::to_vec(&record).expect("the record can be written back");
        record.cancel(Cause::User, now).unwrap();
        record.created_at = now - time::Duration::days(3000);
        record.requeue(now).unwrap();
        assert_eq!(record.deadline, now + time::Duration::days(7));
        serde_json::to_vec(&record).expect("the record can be written back");
    }
}
