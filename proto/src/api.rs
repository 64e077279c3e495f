//! Request and reply payloads shared by the HTTP API and the NATS services
//! (`claw.api.*` by the gateway, `claw.archive.*` by the archiver).
//!
//! Errors have one shape everywhere: `{"error": {"code", "message", "field"?}}`.

use serde::{Deserialize, Serialize};

use crate::task::{Session, Status, TaskId, TaskRecord};

/// The error object of every failed reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// With `conflict` (409): the task's current status, which did not allow the verb.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// With `rate_limited` and `quota_exceeded` (429): which of the caller's limits refused it
    /// (`submits_per_s`, `websockets`, `watched_sessions`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
}

/// A control verb on one task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verb {
    Cancel,
    Pause,
    Resume,
    Retry,
}

impl Verb {
    pub const ALL: [Verb; 4] = [Verb::Cancel, Verb::Pause, Verb::Resume, Verb::Retry];

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Cancel => "cancel",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::Retry => "retry",
        }
    }
}

/// Why a worker holding a task is woken on `claw.control.<task_id>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Wake {
    /// The gateway wrote a control verb into the record.
    Cancel,
    Pause,
    Resume,
    Retry,
    /// Another worker started a new attempt of the task (its message came back after the ack
    /// deadline): a holder that is still alive must stop at once.
    Takeover,
}

impl From<Verb> for Wake {
    fn from(verb: Verb) -> Wake {
        match verb {
            Verb::Cancel => Wake::Cancel,
            Verb::Pause => Wake::Pause,
            Verb::Resume => Wake::Resume,
            Verb::Retry => Wake::Retry,
        }
    }
}

impl Wake {
    pub fn as_str(self) -> &'static str {
        match self {
            Wake::Cancel => "cancel",
            Wake::Pause => "pause",
            Wake::Resume => "resume",
            Wake::Retry => "retry",
            Wake::Takeover => "takeover",
        }
    }
}

/// The message on `claw.control.<task_id>` after the record of a task a worker may hold
/// changed. The record is the truth; this only wakes the worker up to look at it now instead of
/// at its next periodic check.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Control {
    pub id: TaskId,
    pub verb: Wake,
}

/// A lane as `GET /v1/lanes` and `claw.api.lanes` show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LaneInfo {
    pub class: crate::task::Class,
    pub priority: crate::task::Priority,
    pub subject: String,
    pub consumer: String,
    /// Messages waiting in the lane (not yet delivered).
    pub depth: u64,
    /// Delivered and not yet acknowledged: running, or waiting out a retry delay.
    pub in_flight: u64,
    pub paused: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lanes {
    pub lanes: Vec<LaneInfo>,
}

/// `claw.api.lanes.pause` / `resume` request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LaneRequest {
    pub class: crate::task::Class,
    pub priority: crate::task::Priority,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ApiError,
}

/// `claw.archive.get` request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GetRequest {
    pub id: TaskId,
}

/// `claw.api.[as.<principal>.]payload` request: a chunk of a task's input or result, for a
/// reader that may not use the object store itself (a tenant). `from` is the reply's
/// `Claw-Payload-Next` of the chunk before (0 or absent: the first).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadRequest {
    pub id: TaskId,
    /// `input` or `result`.
    pub part: String,
    #[serde(default)]
    pub from: u64,
}

/// `claw.archive.list` request, and the query string of `GET /v1/tasks`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<Session>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Page size, 1..=MAX_PAGE (default DEFAULT_PAGE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page; opaque.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// Only tasks of this owner (tasks without one never match). Set by the gateway from the
    /// caller's principal, never from the HTTP query string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

pub const DEFAULT_PAGE: u32 = 50;
pub const MAX_PAGE: u32 = 500;

/// One page of history, newest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListPage {
    pub tasks: Vec<TaskRecord>,
    /// Present when there may be more: pass it back as `cursor`.
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// What one principal holds of the system, as the archiver last saw the bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tasks waiting to run: `queued`, `retrying` (waiting out a backoff) and `paused`.
    pub queued: u64,
    pub running: u64,
    /// Bytes its records take in the bucket (finished ones until their retention has passed
    /// and the archiver removes them) and its inputs and results in the object store.
    pub bytes: u64,
}

/// The reply of `claw.archive.usage` (an empty request): every principal that holds anything.
/// Tasks without an owner (NATS-native publishers', anonymous callers') are not counted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    pub principals: std::collections::BTreeMap<String, Usage>,
}
