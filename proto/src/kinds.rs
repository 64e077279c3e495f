//! The kinds the system knows, their default class, and the typed inputs of the built-in ones.
//!
//! The gateway validates a built-in kind's input at the edge with the same types the worker
//! runs it with, so a malformed `sleep` is a 422, not a failed task. Custom kinds (a team's own
//! worker binary) are registered by name and class; their input is passed through unchecked.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::spec::Invalid;
use crate::task::Class;

/// `sleep`: the demo and benchmark kind. Sleeps `seconds` in `steps` equal parts, reporting
/// progress after each, and fails on purpose for the first `fail_attempts` attempts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SleepInput {
    #[serde(default)]
    pub seconds: f64,
    #[serde(default)]
    pub steps: u32,
    /// Attempts 1..=fail_attempts fail with a retryable error (use a large number for "always").
    #[serde(default)]
    pub fail_attempts: u32,
    /// Whether planned failures are retryable (default) or final.
    #[serde(default = "yes")]
    pub retryable: bool,
    /// Returned as the result, so tests can check a payload round trip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo: Option<Value>,
}

fn yes() -> bool {
    true
}

/// The longest sleep accepted: a week, the absolute deadline.
pub const MAX_SLEEP_S: f64 = 7.0 * 86_400.0;

/// `exec`: run a program named in the worker's configuration (never a command from the task).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecInput {
    pub program: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
}

/// The kinds a gateway accepts, with the class each one gets when the spec does not say.
#[derive(Clone, Debug)]
pub struct Catalog {
    kinds: BTreeMap<String, Class>,
}

impl Catalog {
    /// `sleep` (short), `exec` (long: it runs a program), `llm` (short: it waits on a socket).
    pub fn builtin() -> Catalog {
        let kinds = [("sleep", Class::Short), ("exec", Class::Long), ("llm", Class::Short)]
            .into_iter()
            .map(|(k, c)| (k.to_owned(), c))
            .collect();
        Catalog { kinds }
    }

    /// Adds (or re-classes) a custom kind.
    pub fn with(mut self, kind: &str, class: Class) -> Catalog {
        self.kinds.insert(kind.to_owned(), class);
        self
    }

    pub fn knows(&self, kind: &str) -> bool {
        self.kinds.contains_key(kind)
    }

    pub fn default_class(&self, kind: &str) -> Option<Class> {
        self.kinds.get(kind).copied()
    }

    pub fn kinds(&self) -> impl Iterator<Item = (&str, Class)> {
        self.kinds.iter().map(|(k, c)| (k.as_str(), *c))
    }

    /// Checks a built-in kind's input against its type; custom kinds pass.
    pub fn validate_input(&self, kind: &str, input: &Value) -> Result<(), Invalid> {
        match kind {
            "sleep" => {
                let s: SleepInput = parse_input(input)?;
                if !(s.seconds.is_finite() && (0.0..=MAX_SLEEP_S).contains(&s.seconds)) {
                    return Err(Invalid::field("input.seconds", "must be 0 to 604800"));
                }
                Ok(())
            }
            "exec" => {
                let e: ExecInput = parse_input(input)?;
                if e.program.is_empty() {
                    return Err(Invalid::field("input.program", "must name a configured program"));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Parses a kind's input, reporting the failing path as `input.<path>`. `null` reads as `{}`.
pub fn parse_input<T: serde::de::DeserializeOwned>(input: &Value) -> Result<T, Invalid> {
    let owned;
    let input = if input.is_null() {
        owned = Value::Object(Default::default());
        &owned
    } else {
        input
    };
    serde_path_to_error::deserialize(input).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "input".to_owned() } else { format!("input.{path}") };
        Invalid { field: Some(field), message: e.inner().to_string() }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sleep_input_is_checked() {
        let c = Catalog::builtin();
        assert!(c.validate_input("sleep", &json!({"seconds": 0.5, "steps": 3})).is_ok());
        assert!(c.validate_input("sleep", &Value::Null).is_ok());
        let e = c.validate_input("sleep", &json!({"seconds": -1})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("input.seconds"));
        let e = c.validate_input("sleep", &json!({"steps": -1})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("input.steps"));
        let e = c.validate_input("sleep", &json!("x")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("input"));
    }

    #[test]
    fn exec_needs_a_program() {
        let c = Catalog::builtin();
        let e = c.validate_input("exec", &json!({})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("input"));
        assert!(c.validate_input("exec", &json!({"program": "p", "args": ["a"]})).is_ok());
    }

    #[test]
    fn custom_kinds_pass_through() {
        let c = Catalog::builtin().with("resize", Class::Long);
        assert_eq!(c.default_class("resize"), Some(Class::Long));
        assert!(c.validate_input("resize", &json!("anything")).is_ok());
    }
}
