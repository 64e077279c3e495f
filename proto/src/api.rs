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
