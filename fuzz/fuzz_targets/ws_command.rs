//! `ws_command`: a text frame a client sends over `/v1/ws`, as the gateway parses it
//! ([`command::parse`], `gateway/src/ws/command.rs`) before it runs anything; a `submit`'s task
//! then goes through [`TaskSpec::parse`] as an HTTP body does.
//!
//! Beyond "never panics": a frame that is no command is an `invalid_request` whose reply frame
//! can be written; a `submit` carries a JSON object with the socket's session filled in, which
//! is never refused as malformed JSON.
#![no_main]

use claw_gateway::ws::command::{self, Command};
use claw_proto::Session;
use claw_proto::spec::{ParseError, TaskSpec};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

fuzz_target!(|frame: &str| {
    let session = Session::parse("fuzz-session").unwrap();
    let (reference, command) = command::parse(&session, frame);
    match command {
        Ok(Command::Submit { body, idempotency_key: _ }) => {
            let task: Value = serde_json::from_slice(&body).expect("a submit's task is JSON");
            assert!(task.get("session").is_some(), "no session in {task}");
            if let Err(ParseError::Syntax(e)) = TaskSpec::parse(&body) {
                panic!("the task of a submit is not JSON: {e}");
            }
        }
        Ok(Command::Control { .. }) => {}
        Err(e) => {
            assert_eq!(e.code(), "invalid_request", "{e:?}");
            let reply =
                json!({"type": "reply", "ref": reference, "ok": false, "error": e.body().error});
            serde_json::from_str::<Value>(&reply.to_string()).expect("the reply frame is JSON");
        }
    }
});
