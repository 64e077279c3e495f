//! Events on `progress.<session>.<task_id>` (stream `PROGRESS`): what the UI, `claw watch` and
//! `nats sub 'progress.>'` see while a task lives.
//!
//! The wire form is `{"type": "status|progress|output|result|result_ref|error", "task_id", "session",
//! "at", "data"}`. The per-stream sequence a WebSocket client resumes from is the JetStream
//! sequence of the message, not a field of the payload.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::task::{Cause, PayloadRef, Progress, Session, Status, TaskError, TaskId, TaskRecord};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub task_id: TaskId,
    pub session: Session,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    #[serde(flatten)]
    pub body: EventBody,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub enum EventBody {
    /// Every transition of the record.
    Status {
        status: Status,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cause: Option<Cause>,
        attempt: u32,
    },
    Progress(Progress),
    /// Streamed text (LLM tokens, a program's `output` lines), coalesced by the worker.
    Output {
        text: String,
    },
    Result(Value),
    /// The result of a task whose result is too large for an event: where it is stored
    /// (`GET /v1/tasks/{id}/result` reads it).
    #[serde(rename = "result_ref")]
    ResultRef(PayloadRef),
    Error(TaskError),
}

impl Event {
    pub fn new(record: &TaskRecord, body: EventBody) -> Event {
        Event {
            task_id: record.id.clone(),
            session: record.session.clone(),
            at: OffsetDateTime::now_utc(),
            body,
        }
    }

    /// The `status` event announcing a record's current state.
    pub fn status(record: &TaskRecord) -> Event {
        Event::new(
            record,
            EventBody::Status {
                status: record.status,
                cause: record.cause,
                attempt: record.attempt,
            },
        )
    }

    pub fn to_json(&self) -> bytes::Bytes {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_vec(self).expect("event serializes").into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form() {
        let e = Event {
            task_id: TaskId::parse("t1").unwrap(),
            session: Session::default(),
            at: OffsetDateTime::UNIX_EPOCH,
            body: EventBody::Progress(Progress { fraction: 0.5, message: Some("half".into()) }),
        };
        let v: Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "progress", "task_id": "t1", "session": "default",
                "at": "1970-01-01T00:00:00Z", "data": {"fraction": 0.5, "message": "half"}})
        );
        assert_eq!(serde_json::from_value::<Event>(v).unwrap(), e);
    }
}
