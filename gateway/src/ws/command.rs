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
    let (reference, command) = parse(session, text);
    let outcome = match command {
        Ok(command) => run(app, caller, command).await,
        Err(e) => Err(e),
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

/// What a client frame asks for, once parsed.
#[derive(Debug)]
pub enum Command {
    /// `submit`: the task spec's JSON (its session filled in from the socket's when absent),
    /// parsed and admitted by [`crate::tasks::submit`] as an HTTP body is.
    Submit { body: Vec<u8>, idempotency_key: Option<String> },
    /// `cancel`, `pause`, `resume` or `retry` of the task `id` (not checked here: a malformed
    /// id is simply not found).
    Control { verb: Verb, id: String },
}

/// Parses a client text frame of a socket watching `session`: the `ref` to echo (`null` when
/// the frame has none or is no JSON object) and the command, or the `invalid_request` error its
/// reply carries. No I/O, so the fuzz target `ws_command` (fuzz/) runs it on arbitrary text.
pub fn parse(session: &Session, text: &str) -> (Value, Result<Command, Error>) {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(command)) => {
            let reference = command.get("ref").cloned().unwrap_or(Value::Null);
            (reference, parse_command(session, command))
        }
        Ok(_) => (Value::Null, Err(invalid(None, "a command is a JSON object with an \"op\""))),
        Err(e) => (Value::Null, Err(invalid(None, &format!("the frame is not JSON: {e}")))),
    }
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

fn parse_command(session: &Session, mut command: Map<String, Value>) -> Result<Command, Error> {
    let op = match command.get("op") {
        Some(Value::String(op)) => op.clone(),
        _ => return Err(invalid(Some("op"), "expected \"op\": submit|cancel|pause|resume|retry")),
    };
    if op == "submit" {
        let Some(Value::Object(mut task)) = command.remove("task") else {
            return Err(invalid(Some("task"), "expected \"task\": the task spec object"));
        };
        task.entry("session").or_insert_with(|| session.as_str().into());
        let idempotency_key = match command.get("idempotency_key") {
            None | Some(Value::Null) => None,
            Some(Value::String(key)) => Some(key.clone()),
            Some(_) => return Err(invalid(Some("idempotency_key"), "expected a string")),
        };
        let body = serde_json::to_vec(&task).map_err(|e| Error::Internal(e.to_string()))?;
        return Ok(Command::Submit { body, idempotency_key });
    }
    let Some(verb) = Verb::ALL.into_iter().find(|v| v.as_str() == op) else {
        return Err(invalid(Some("op"), &format!("unknown op {op:?}")));
    };
    let Some(Value::String(id)) = command.get("id") else {
        return Err(invalid(Some("id"), "expected \"id\": the task id"));
    };
    Ok(Command::Control { verb, id: id.clone() })
}

async fn run(app: &App, caller: &Caller, command: Command) -> Result<Done, Error> {
    match command {
        Command::Submit { body, idempotency_key } => {
            let key = idempotency_key.as_deref();
            let submitted = crate::tasks::submit(app, caller, &body, key, None).await?;
            Ok(Done { record: submitted.record, created: Some(submitted.created) })
        }
        Command::Control { verb, id } => {
            let record = crate::control::apply(app, caller, &id, verb).await?;
            Ok(Done { record, created: None })
        }
    }
}

fn invalid(field: Option<&str>, message: &str) -> Error {
    Error::Invalid(Invalid { field: field.map(str::to_owned), message: message.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session::parse("s1").unwrap()
    }

    #[test]
    fn a_submit_takes_the_sockets_session_unless_it_names_one() {
        let frame =
            r#"{"op": "submit", "ref": 7, "task": {"kind": "sleep"}, "idempotency_key": "k"}"#;
        let (reference, command) = parse(&session(), frame);
        assert_eq!(reference, json!(7));
        let Ok(Command::Submit { body, idempotency_key }) = command else { panic!("{command:?}") };
        let task: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(task, json!({"kind": "sleep", "session": "s1"}));
        assert_eq!(idempotency_key.as_deref(), Some("k"));
        let frame = r#"{"op": "submit", "task": {"kind": "sleep", "session": "other"}}"#;
        let Ok(Command::Submit { body, .. }) = parse(&session(), frame).1 else { panic!() };
        assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["session"], "other");
    }

    #[test]
    fn a_frame_that_is_no_command_names_what_is_wrong() {
        let field = |frame: &str| match parse(&session(), frame) {
            (_, Err(Error::Invalid(i))) => i.field,
            (_, other) => panic!("{frame}: {other:?}"),
        };
        assert_eq!(field("not json"), None);
        assert_eq!(field("[1]"), None);
        assert_eq!(field(r#"{"ref": 1}"#).as_deref(), Some("op"));
        assert_eq!(field(r#"{"op": "explode"}"#).as_deref(), Some("op"));
        assert_eq!(field(r#"{"op": "submit", "task": []}"#).as_deref(), Some("task"));
        let keyed = r#"{"op": "submit", "task": {}, "idempotency_key": 1}"#;
        assert_eq!(field(keyed).as_deref(), Some("idempotency_key"));
        assert_eq!(field(r#"{"op": "cancel", "id": 3}"#).as_deref(), Some("id"));
        let (reference, command) = parse(&session(), r#"{"op": "pause", "ref": "r", "id": "t"}"#);
        assert_eq!(reference, json!("r"));
        assert!(matches!(command, Ok(Command::Control { verb: Verb::Pause, id }) if id == "t"));
    }
}
