//! Client frames: commands run through the same functions as HTTP ([`crate::tasks::submit`],
//! [`crate::control::apply`]) and answered with one `reply` frame each.
//!
//! `{"op": "submit", "ref": R, "task": {...}, "idempotency_key"?: K}` (the task's session
//! defaults to the socket's), `{"op": "cancel"|"pause"|"resume"|"retry", "ref": R, "id": ID}`.
//! `ref` is any JSON value, echoed back so the client can match replies. A frame that is not a
//! command gets an `invalid_request` reply; it never closes the socket.

use axum::extract::ws::Utf8Bytes;
use claw_proto::api::Verb;
use claw_proto::spec::Invalid;
use claw_proto::task::{Session, TaskRecord};
use serde_json::{Map, Value, json};

use crate::app::App;
use crate::auth::Caller;
use crate::error::Error;

/// Runs one client frame on behalf of the socket's `caller` and returns the reply frame.
pub async fn handle(app: &App, caller: &Caller, session: &Session, text: &str) -> Utf8Bytes {
    let (reference, outcome) = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(command)) => {
            let reference = command.get("ref").cloned().unwrap_or(Value::Null);
            (reference, run(app, caller, session, command).await)
        }
        Ok(_) => (Value::Null, Err(invalid(None, "a command is a JSON object with an \"op\""))),
        Err(e) => (Value::Null, Err(invalid(None, &format!("the frame is not JSON: {e}")))),
    };
    let reply = match outcome {
        Ok(Done { record, created }) => {
            let mut reply =
                json!({"type": "reply", "ref": reference, "ok": true, "record": record});
            if let Some(created) = created {
                reply["created"] = created.into();
            }
            reply
        }
        Err(e) => json!({"type": "reply", "ref": reference, "ok": false, "error": e.body().error}),
    };
    reply.to_string().into()
}

/// The reply frame for a binary client frame.
pub fn binary_refused() -> Utf8Bytes {
    let error = invalid(None, "binary frames are not understood; send JSON text frames").body();
    json!({"type": "reply", "ref": null, "ok": false, "error": error.error}).to_string().into()
}

struct Done {
    record: TaskRecord,
    /// For `submit`: whether a new task was created (else an idempotent repeat).
    created: Option<bool>,
}

async fn run(
    app: &App,
    caller: &Caller,
    session: &Session,
    mut command: Map<String, Value>,
) -> Result<Done, Error> {
    let op = match command.get("op") {
        Some(Value::String(op)) => op.clone(),
        _ => return Err(invalid(Some("op"), "expected \"op\": submit|cancel|pause|resume|retry")),
    };
    if op == "submit" {
        let Some(Value::Object(mut task)) = command.remove("task") else {
            return Err(invalid(Some("task"), "expected \"task\": the task spec object"));
        };
        task.entry("session").or_insert_with(|| session.as_str().into());
        let key = match command.get("idempotency_key") {
            None | Some(Value::Null) => None,
            Some(Value::String(key)) => Some(key.as_str()),
            Some(_) => return Err(invalid(Some("idempotency_key"), "expected a string")),
        };
        let body = serde_json::to_vec(&task).map_err(|e| Error::Internal(e.to_string()))?;
        let submitted = crate::tasks::submit(app, caller, &body, key, None).await?;
        return Ok(Done { record: submitted.record, created: Some(submitted.created) });
    }
    let Some(verb) = Verb::ALL.into_iter().find(|v| v.as_str() == op) else {
        return Err(invalid(Some("op"), &format!("unknown op {op:?}")));
    };
    let Some(Value::String(id)) = command.get("id") else {
        return Err(invalid(Some("id"), "expected \"id\": the task id"));
    };
    let record = crate::control::apply(app, caller, id, verb).await?;
    Ok(Done { record, created: None })
}

fn invalid(field: Option<&str>, message: &str) -> Error {
    Error::Invalid(Invalid { field: field.map(str::to_owned), message: message.to_owned() })
}
