//! Events on `progress.<session>.<task_id>` (stream `PROGRESS`): what the UI, `claw watch` and
//! `nats sub 'progress.>'` see while a task lives.
//!
//! The wire form is `{"type": "status|progress|output", "task_id", "session", "at", "data"}`.
//! Since protocol 5 a task's end is one event, its terminal `status`, which carries the result or
//! the error; the separate `result`, `result_ref` and `error` events of earlier workers are still
//! parsed (a stream may hold them). The per-stream sequence a WebSocket client resumes from is
//! the JetStream sequence of the message, not a field of the payload.

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
    /// A transition of the record (see PROTOCOL for the ones a fast task leaves out).
    Status {
        status: Status,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cause: Option<Cause>,
        attempt: u32,
        /// On `succeeded`: the result (`null` included), unless it is stored (`result_ref`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<Value>,
        /// On `succeeded`, for a result too large for an event: where it is stored
        /// (`GET /v1/tasks/{id}/result` reads it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result_ref: Option<PayloadRef>,
        /// On `retrying` and `failed`: why the attempt (or the task) failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<TaskError>,
    },
    Progress(Progress),
    /// Streamed text (LLM tokens, a program's `output` lines), coalesced by the worker.
    Output {
        text: String,
    },
    /// Protocol 4 and earlier: the result, just before the `succeeded` status. Parsed, no
    /// longer sent.
    Result(Value),
    /// Protocol 4 and earlier: instead of `Result` for a stored result. Parsed, no longer sent.
    #[serde(rename = "result_ref")]
    ResultRef(PayloadRef),
    /// Protocol 4 and earlier: before a `retrying` or `failed` status. Parsed, no longer sent.
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

    /// The `status` event announcing a record's current state, with its outcome when it has
    /// one: the result of a `succeeded` record, the error of a `retrying` or `failed` one.
    pub fn status(record: &TaskRecord) -> Event {
        let (mut result, mut result_ref, mut error) = (None, None, None);
        match record.status {
            Status::Succeeded => match &record.result_ref {
                Some(stored) => result_ref = Some(stored.clone()),
                None => result = Some(record.result.clone().unwrap_or(Value::Null)),
            },
            Status::Retrying | Status::Failed => error = record.error.clone(),
            _ => {}
        }
        let body = EventBody::Status {
            status: record.status,
            cause: record.cause,
            attempt: record.attempt,
            result,
            result_ref,
            error,
        };
        Event::new(record, body)
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

    #[test]
    fn a_terminal_status_carries_the_outcome() {
        use crate::kinds::Catalog;
        use crate::spec::{Limits, TaskSpec};
        let spec = TaskSpec::from_slice(br#"{"kind": "sleep", "input": {"seconds": 0}}"#).unwrap();
        let at = OffsetDateTime::UNIX_EPOCH;
        let id = TaskId::parse("t1").unwrap();
        let queued = spec.admit(id, at, None, &Catalog::builtin(), &Limits::STANDARD).unwrap();
        let data = |r: &TaskRecord| serde_json::to_value(Event::status(r)).unwrap()["data"].clone();
        assert_eq!(
            data(&queued),
            serde_json::json!({"status": "queued", "cause": "user", "attempt": 0})
        );

        let mut running = queued.clone();
        running.start(1, "w", at).unwrap();
        let mut done = running.clone();
        done.succeed(serde_json::json!({"n": 1}), at).unwrap();
        assert_eq!(data(&done)["result"], serde_json::json!({"n": 1}));
        let mut nothing = running.clone();
        nothing.succeed(Value::Null, at).unwrap();
        let d = data(&nothing);
        assert!(d.as_object().unwrap().contains_key("result") && d["result"].is_null(), "{d}");

        let mut failed = running.clone();
        failed.fail(TaskError::new("boom", "no", false), Cause::Error, at).unwrap();
        assert_eq!(data(&failed)["error"]["code"], "boom");
        assert!(data(&failed).get("result").is_none());
    }
}
