//! The JSON-lines protocol a task's child process speaks on stdout, shared by `exec` programs
//! and by `__run-task` children (so one reader serves both).
//!
//! One JSON object per line: `{"progress": 0.4, "message": "..."}`, `{"output": "..."}`,
//! `{"result": ...}` or `{"error": {"code", "message", "retryable"}}`. Any other line, JSON or
//! not, is program output and is passed on as text.

use claw_proto::{Progress, TaskError};
use serde::Deserialize;
use serde_json::{Value, json};

/// Longest stdout line kept; the rest of a longer line is dropped. Bounds the reader's memory
/// against a program that never prints a newline.
pub const MAX_LINE: usize = 64 * 1024;

/// One parsed stdout line.
#[derive(Clone, Debug, PartialEq)]
pub enum Line {
    Progress(Progress),
    Output(String),
    Result(Value),
    Error(TaskError),
}

#[derive(Deserialize)]
struct WireError {
    #[serde(default = "default_code")]
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    retryable: bool,
}

fn default_code() -> String {
    "error".to_owned()
}

/// Parses one line (without its newline).
pub fn parse_line(line: &str) -> Line {
    let text = || Line::Output(format!("{line}\n"));
    let Ok(Value::Object(map)) = serde_json::from_str::<Value>(line) else {
        return text();
    };
    if let Some(p) = map.get("progress").and_then(Value::as_f64) {
        let message = map.get("message").and_then(Value::as_str).map(str::to_owned);
        return Line::Progress(Progress { fraction: p.clamp(0.0, 1.0), message });
    }
    if let Some(Value::String(s)) = map.get("output") {
        return Line::Output(s.clone());
    }
    if let Some(v) = map.get("result") {
        return Line::Result(v.clone());
    }
    if let Some(e) = map.get("error")
        && let Ok(e) = serde_json::from_value::<WireError>(e.clone())
    {
        return Line::Error(TaskError::new(e.code, e.message, e.retryable));
    }
    text()
}

/// Encodes a line the way [`parse_line`] reads it back (used by `__run-task` children).
pub fn encode(line: &Line) -> String {
    let v = match line {
        Line::Progress(p) => match &p.message {
            Some(m) => json!({"progress": p.fraction, "message": m}),
            None => json!({"progress": p.fraction}),
        },
        Line::Output(s) => json!({"output": s}),
        Line::Result(v) => json!({"result": v}),
        Line::Error(e) => {
            json!({"error": {"code": e.code, "message": e.message, "retryable": e.retryable}})
        }
    };
    let mut s = v.to_string();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_kind_of_line() {
        assert_eq!(
            parse_line(r#"{"progress": 0.4, "message": "m"}"#),
            Line::Progress(Progress { fraction: 0.4, message: Some("m".into()) })
        );
        assert_eq!(
            parse_line(r#"{"progress": 7}"#),
            Line::Progress(Progress { fraction: 1.0, message: None })
        );
        assert_eq!(parse_line(r#"{"output": "tok"}"#), Line::Output("tok".into()));
        assert_eq!(parse_line(r#"{"result": {"a": 1}}"#), Line::Result(json!({"a": 1})));
        assert_eq!(
            parse_line(r#"{"error": {"code": "c", "message": "m", "retryable": true}}"#),
            Line::Error(TaskError::new("c", "m", true))
        );
    }

    #[test]
    fn anything_else_is_text() {
        assert_eq!(parse_line("hello"), Line::Output("hello\n".into()));
        assert_eq!(parse_line("[1,2]"), Line::Output("[1,2]\n".into()));
        assert_eq!(parse_line(r#"{"other": 1}"#), Line::Output("{\"other\": 1}\n".into()));
        assert_eq!(parse_line(r#"{"error": "x"}"#), Line::Output("{\"error\": \"x\"}\n".into()));
    }

    #[test]
    fn encode_round_trips() {
        for line in [
            Line::Progress(Progress { fraction: 0.5, message: Some("half".into()) }),
            Line::Progress(Progress { fraction: 0.0, message: None }),
            Line::Output("a\nb".into()),
            Line::Result(json!({"x": [1, null]})),
            Line::Error(TaskError::new("boom", "bad", false)),
        ] {
            let s = encode(&line);
            assert!(s.ends_with('\n') && s.matches('\n').count() == 1, "{s:?}");
            assert_eq!(parse_line(s.trim_end()), line);
        }
    }
}
