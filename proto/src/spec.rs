//! What a submitter sends, and how it is admitted into a [`TaskRecord`].
//!
//! The same [`TaskSpec`] JSON is the body of `POST /v1/tasks`, the payload of `claw.api.submit`
//! and the message on `tasks.<class>.<priority>`, so a NATS-native publisher needs nothing but
//! this shape. [`TaskSpec::admit`] is the one place where defaults are applied and limits
//! enforced; the gateway calls it before publishing, the worker when a message arrives without
//! a record (published straight to NATS).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::kinds::Catalog;
use crate::task::{Cause, Class, PayloadRef, Priority, Session, Status, TaskId, TaskRecord};

/// A task as submitted. Unknown fields are refused so that a typo is an error, not a default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<TaskId>,
    pub kind: String,
    #[serde(default)]
    pub input: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<Session>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<Class>,
    /// A hint used to choose the class when `class` is absent: under 60 s is short.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Seconds from submission after which no attempt starts (queueing and retries included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_s: Option<u64>,
    /// Set by the gateway (or a worker) on the lane message of a task whose input is in the
    /// `payloads` object store; `input` is then `null`. A submitter never sets it: a worker
    /// takes only the object named after the task's own id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_ref: Option<PayloadRef>,
}

/// The limits admission enforces. The caps are configuration of the gateway (and of the worker
/// for tasks that arrive straight over NATS).
#[derive(Clone, Debug)]
pub struct Limits {
    pub short_timeout_cap_s: u64,
    pub long_timeout_cap_s: u64,
    pub max_deadline_s: u64,
    pub default_max_attempts: u32,
    pub max_attempts_cap: u32,
}

impl Limits {
    /// The plan's numbers: short 5 min, long 24 h, absolute 7 days, 3 attempts.
    pub const STANDARD: Limits = Limits {
        short_timeout_cap_s: 300,
        long_timeout_cap_s: 86_400,
        max_deadline_s: 7 * 86_400,
        default_max_attempts: 3,
        max_attempts_cap: 20,
    };

    pub fn timeout_cap_s(&self, class: Class) -> u64 {
        match class {
            Class::Short => self.short_timeout_cap_s,
            Class::Long => self.long_timeout_cap_s,
        }
    }
}

/// Estimated durations under this many seconds make a short task.
pub const SHORT_ESTIMATE_LIMIT_S: f64 = 60.0;

/// Why a spec was refused: the offending field (when there is one) and a sentence.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct Invalid {
    pub field: Option<String>,
    pub message: String,
}

impl Invalid {
    pub fn field(field: &str, message: impl Into<String>) -> Invalid {
        Invalid { field: Some(field.to_owned()), message: message.into() }
    }
}

/// Why raw bytes are not a spec: not JSON at all (a 400), or JSON of the wrong shape (a 422).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ParseError {
    #[error("malformed JSON: {0}")]
    Syntax(String),
    #[error(transparent)]
    Invalid(Invalid),
}

impl TaskSpec {
    /// Parses a spec from raw bytes, telling malformed JSON (the whole body is not one JSON
    /// value) apart from a wrong shape, whose field at fault it names (`serde_path_to_error`).
    pub fn parse(bytes: &[u8]) -> Result<TaskSpec, ParseError> {
        // JSON is UTF-8, checked here for the whole body: serde_json checks only the strings it
        // keeps, and skips those of a field it ignores (an unknown one of `input_ref`).
        let text = std::str::from_utf8(bytes)
            .map_err(|e| ParseError::Syntax(format!("the body is not UTF-8: {e}")))?;
        let mut de = serde_json::Deserializer::from_str(text);
        let e = match serde_path_to_error::deserialize(&mut de) {
            // Nothing but whitespace may follow the spec.
            Ok(spec) => {
                return de.end().map(|()| spec).map_err(|e| ParseError::Syntax(e.to_string()));
            }
            Err(e) => e,
        };
        // Whether the body is JSON is asked of all of it, as a `Value`, not of serde's category
        // of the error: the deserializer stops at the first field of the wrong shape before
        // reading the rest, and it calls some wrong shapes syntax (an integer where a word of
        // an enum goes, `"class": 3`).
        if let Err(not_json) = serde_json::from_str::<Value>(text) {
            return Err(ParseError::Syntax(not_json.to_string()));
        }
        let path = e.path().to_string();
        let field = (path != ".").then_some(path);
        Err(ParseError::Invalid(Invalid { field, message: e.inner().to_string() }))
    }

    /// [`TaskSpec::parse`] where malformed JSON is one more way to be invalid (no field): what
    /// a worker, which has no 400 to answer, makes of a lane message.
    pub fn from_slice(bytes: &[u8]) -> Result<TaskSpec, Invalid> {
        TaskSpec::parse(bytes).map_err(|e| match e {
            ParseError::Syntax(message) => Invalid { field: None, message },
            ParseError::Invalid(invalid) => invalid,
        })
    }

    /// The class this spec asks for: explicit, else from `estimated_s`, else the kind's default.
    pub fn resolve_class(&self, catalog: &Catalog) -> Result<Class, Invalid> {
        if let Some(class) = self.class {
            return Ok(class);
        }
        if let Some(est) = self.estimated_s {
            if !(est.is_finite() && est >= 0.0) {
                return Err(Invalid::field("estimated_s", "must be a non-negative number"));
            }
            return Ok(if est < SHORT_ESTIMATE_LIMIT_S { Class::Short } else { Class::Long });
        }
        catalog
            .default_class(&self.kind)
            .ok_or_else(|| Invalid::field("kind", format!("unknown kind {:?}", self.kind)))
    }

    /// Admits the spec: applies defaults, enforces limits and the kind's input shape, and returns
    /// the `queued` record. `lane` overrides class and priority when the message already sits in
    /// a lane (published straight to `tasks.<class>.<priority>`): the subject wins.
    pub fn admit(
        &self,
        id: TaskId,
        created_at: OffsetDateTime,
        lane: Option<(Class, Priority)>,
        catalog: &Catalog,
        limits: &Limits,
    ) -> Result<TaskRecord, Invalid> {
        if !catalog.knows(&self.kind) {
            return Err(Invalid::field("kind", format!("unknown kind {:?}", self.kind)));
        }
        match &self.input_ref {
            // Checked when it was stored, by whoever stored it; its content is not here.
            Some(stored) => {
                if stored.name != crate::payloads::object_name(&id, crate::payloads::Part::Input) {
                    return Err(Invalid::field("input_ref", "names another task's payload"));
                }
            }
            None => catalog.validate_input(&self.kind, &self.input)?,
        }
        let (class, priority) = match lane {
            Some(lane) => lane,
            None => (self.resolve_class(catalog)?, self.priority.unwrap_or(Priority::Normal)),
        };
        let cap = limits.timeout_cap_s(class);
        let timeout_s = match self.timeout_s {
            None => cap,
            Some(0) => return Err(Invalid::field("timeout_s", "must be at least 1")),
            Some(t) if t > cap => {
                return Err(Invalid::field(
                    "timeout_s",
                    format!("at most {cap} s for a {class} task"),
                ));
            }
            Some(t) => t,
        };
        let max_attempts = match self.max_attempts {
            None => limits.default_max_attempts,
            Some(n) if (1..=limits.max_attempts_cap).contains(&n) => n,
            Some(_) => {
                return Err(Invalid::field(
                    "max_attempts",
                    format!("must be 1-{}", limits.max_attempts_cap),
                ));
            }
        };
        let deadline_s = match self.deadline_s {
            None => limits.max_deadline_s,
            Some(0) => return Err(Invalid::field("deadline_s", "must be at least 1")),
            Some(d) if d > limits.max_deadline_s => {
                return Err(Invalid::field(
                    "deadline_s",
                    format!("at most {} s (7 days)", limits.max_deadline_s),
                ));
            }
            Some(d) => d,
        };
        Ok(TaskRecord {
            id,
            session: self.session.clone().unwrap_or_default(),
            kind: self.kind.clone(),
            input: self.input.clone(),
            class,
            priority,
            status: Status::Queued,
            attempt: 0,
            max_attempts,
            timeout_s,
            progress: None,
            result: None,
            error: None,
            cause: Some(Cause::User),
            created_at,
            started_at: None,
            finished_at: None,
            deadline: created_at + time::Duration::seconds(deadline_s as i64),
            worker: None,
            paused_from: None,
            message_seq: None,
            owner: None,
            input_ref: self.input_ref.clone(),
            result_ref: None,
            concurrency: Vec::new(),
            waiting: None,
        })
    }

    /// The normalized spec of an admitted record: what the gateway publishes to the lane, now.
    /// Everything is explicit so a worker that never sees the record rebuilds the same one.
    pub fn of_record(record: &TaskRecord) -> TaskSpec {
        TaskSpec::of_record_at(record, OffsetDateTime::now_utc())
    }

    /// [`TaskSpec::of_record`] for a message published at `now`. Its `deadline_s` counts from
    /// the message, as a worker rebuilding the record counts it, so the rebuilt deadline is the
    /// record's. (Counted from `created_at` it outgrew the 7 days once a retry or a resume days
    /// later had moved the deadline, and the rebuild dead-lettered the task.)
    pub fn of_record_at(record: &TaskRecord, now: OffsetDateTime) -> TaskSpec {
        let left = record.deadline - now;
        // Rounded up: a rebuilt deadline is never earlier than the record's.
        let remaining =
            (left.whole_seconds() + i64::from(left.subsec_nanoseconds() > 0)).max(1) as u64;
        TaskSpec {
            id: Some(record.id.clone()),
            kind: record.kind.clone(),
            input: record.input.clone(),
            session: Some(record.session.clone()),
            priority: Some(record.priority),
            class: Some(record.class),
            estimated_s: None,
            timeout_s: Some(record.timeout_s),
            max_attempts: Some(record.max_attempts),
            deadline_s: Some(remaining),
            input_ref: record.input_ref.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn admit(v: Value) -> Result<TaskRecord, Invalid> {
        let spec = TaskSpec::from_slice(v.to_string().as_bytes())?;
        spec.admit(
            TaskId::generate(),
            OffsetDateTime::now_utc(),
            None,
            &Catalog::builtin(),
            &Limits::STANDARD,
        )
    }

    #[test]
    fn defaults() {
        let r = admit(json!({"kind": "sleep", "input": {"seconds": 1}})).unwrap();
        assert_eq!((r.class, r.priority, r.max_attempts), (Class::Short, Priority::Normal, 3));
        assert_eq!(r.timeout_s, 300);
        assert_eq!(r.session.as_str(), "default");
        assert_eq!(r.status, Status::Queued);
    }

    #[test]
    fn class_from_estimate_then_kind() {
        let r = admit(json!({"kind": "sleep", "input": {"seconds": 1}, "estimated_s": 600}));
        assert_eq!(r.unwrap().class, Class::Long);
        let r = admit(json!({"kind": "exec", "input": {"program": "x"}})).unwrap();
        assert_eq!(r.class, Class::Long);
        let r = admit(json!({"kind": "exec", "input": {"program": "x"}, "estimated_s": 3}));
        assert_eq!(r.unwrap().class, Class::Short);
    }

    #[test]
    fn errors_name_the_field() {
        let e = admit(json!({"kind": "nope"})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("kind"));
        let e = admit(json!({"kind": "sleep", "priority": true})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("priority"));
        let e = admit(json!({"kind": "sleep", "max_attempts": "x"})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("max_attempts"));
        let e = admit(json!({"kind": "sleep", "timeout_s": 301})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("timeout_s"));
        let e = admit(json!({"kind": "sleep", "prority": 1})).unwrap_err();
        assert!(e.message.contains("prority"), "{e}");
        let e = admit(json!({"kind": "sleep", "input": {"seconds": "x"}})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("input.seconds"));
        let e = admit(json!({"kind": "sleep", "session": "a.b"})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("session"));
    }

    #[test]
    fn parse_tells_syntax_from_shape() {
        assert!(matches!(TaskSpec::parse(b"{not json"), Err(ParseError::Syntax(_))));
        assert!(matches!(TaskSpec::parse(b""), Err(ParseError::Syntax(_))));
        match TaskSpec::parse(br#"{"kind": 3}"#) {
            Err(ParseError::Invalid(i)) => assert_eq!(i.field.as_deref(), Some("kind")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(TaskSpec::parse(b"[]"), Err(ParseError::Invalid(_))));
    }

    /// Issue 12 (fuzz target `task_spec`): a body that is not JSON is a 400 whatever field comes
    /// first, and one that is JSON is no 400. The deserializer stops at the first field of the
    /// wrong shape, so `{"kin:d""llm"}` was a 422 for its unknown field; it never looked past
    /// the spec, so a body with something after the object was taken as that spec, by the
    /// gateway and by a worker; and serde calls `"class": 3` a syntax error.
    #[test]
    fn malformed_json_is_malformed_whatever_the_first_field_is() {
        for body in [
            &br#"{"kin:d""llm","input":{}}"#[..],
            br#"{"kind": 3, oops"#,
            br#"{"kind": "sleep"} {"kind": "exec"}"#,
            br#"{"kind": "sleep"}]"#,
            b"{\"kid\": 1, \"kind\": \"sl\xffeep\"}",
            b"{\"kind\": \"sleep\", \"input_ref\": {\"bucket\": \"b\", \"name\": \"n\", \"size\": 1, \"x\": \"\xff\"}}",
        ] {
            let text = String::from_utf8_lossy(body);
            assert!(matches!(TaskSpec::parse(body), Err(ParseError::Syntax(_))), "{text}");
            assert!(TaskSpec::from_slice(body).is_err(), "{text}");
        }
        // And a wrong shape of JSON is no malformed JSON.
        match TaskSpec::parse(br#"{"kind": "sleep", "class": 3}"#) {
            Err(ParseError::Invalid(i)) => assert_eq!(i.field.as_deref(), Some("class")),
            other => panic!("{other:?}"),
        }
        // Whitespace after the spec is still JSON.
        assert!(TaskSpec::parse(b" {\"kind\": \"sleep\"}\n").is_ok());
    }

    /// Issue 12 (fuzz target `task_spec`): a number of the input is the same number after the
    /// record's trip through the bucket. serde_json's default parsing of floats is not correctly
    /// rounded, so `4.000018445e-22` read back as `4.0000184450000004e-22`: a record's numbers
    /// drifted on every write and read (the workspace now turns on `float_roundtrip`).
    #[test]
    fn an_admitted_records_numbers_survive_the_bucket() {
        let r = admit(json!({"kind": "llm", "input": 0.0000000000000000000004000018445})).unwrap();
        let stored = serde_json::to_vec(&r).unwrap();
        assert_eq!(crate::records::decode(&stored).unwrap(), r);
    }

    #[test]
    fn the_lane_of_a_message_wins() {
        let spec = TaskSpec::from_slice(br#"{"kind":"sleep","class":"long"}"#).unwrap();
        let r = spec
            .admit(
                TaskId::generate(),
                OffsetDateTime::now_utc(),
                Some((Class::Short, Priority::Low)),
                &Catalog::builtin(),
                &Limits::STANDARD,
            )
            .unwrap();
        assert_eq!((r.class, r.priority), (Class::Short, Priority::Low));
    }

    #[test]
    fn of_record_rebuilds_the_same_record() {
        let r = admit(json!({"kind": "sleep", "priority": 9, "deadline_s": 100})).unwrap();
        let spec = TaskSpec::of_record(&r);
        assert_eq!(spec.deadline_s, Some(100), "rounded up, a moment after admission");
        let spec = TaskSpec::of_record_at(&r, r.created_at);
        let again = spec
            .admit(r.id.clone(), r.created_at, None, &Catalog::builtin(), &Limits::STANDARD)
            .unwrap();
        assert_eq!(again, r);
    }

    /// Issue 12: a task retried six days after it was created has a deadline a full window
    /// from the retry. Its lane message must still be a valid spec that rebuilds that deadline
    /// (counted from `created_at` its `deadline_s` was 13 days, refused, dead-lettered).
    #[test]
    fn a_retried_tasks_message_rebuilds_its_moved_deadline() {
        let mut r = admit(json!({"kind": "sleep"})).unwrap();
        let created = r.created_at - time::Duration::days(6);
        r.deadline = created + (r.deadline - r.created_at);
        r.created_at = created;
        r.status = Status::Failed;
        let now = OffsetDateTime::now_utc();
        r.requeue(now).unwrap();
        let published = now + time::Duration::seconds(2);
        let spec = TaskSpec::of_record_at(&r, published);
        let rebuilt =
            spec.admit(r.id.clone(), published, None, &Catalog::builtin(), &Limits::STANDARD);
        let rebuilt = rebuilt.expect("the message is a valid spec");
        assert!((rebuilt.deadline - r.deadline).abs() < time::Duration::seconds(1));
    }
}
