//! `task_spec`: the body of `POST /v1/tasks` (and of `claw.api.submit`), as the gateway takes it:
//! [`TaskSpec::parse`], then on success [`TaskSpec::admit`] with the standard limits and the
//! built-in catalog.
//!
//! Beyond "never panics": a 400 (`Syntax`) is exactly a body that is not JSON, and an accepted
//! body is JSON; an admitted record is within the limits, survives its trip through the `tasks`
//! bucket (JSON out and back), and its lane message (the normalized spec) rebuilds the same
//! record in a worker that never saw it; a refusal names its field.
#![no_main]

use claw_proto::kinds::Catalog;
use claw_proto::records;
use claw_proto::spec::{Limits, ParseError, TaskSpec};
use claw_proto::{Status, TaskId};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use time::OffsetDateTime;

fuzz_target!(|body: &[u8]| {
    let is_json = serde_json::from_slice::<Value>(body).is_ok();
    let spec = match TaskSpec::parse(body) {
        Ok(spec) => spec,
        Err(ParseError::Syntax(_)) => return assert!(!is_json, "valid JSON refused as malformed"),
        Err(ParseError::Invalid(_)) => return assert!(is_json, "malformed JSON taken for a shape"),
    };
    assert!(is_json, "malformed JSON accepted as a spec");

    // What the gateway does with a spec it parsed: the id is the spec's or a fresh one.
    let id = spec.id.clone().unwrap_or_else(|| TaskId::parse("fuzz-task").unwrap());
    let created_at = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
    let (catalog, limits) = (Catalog::builtin(), Limits::STANDARD);
    let record = match spec.admit(id.clone(), created_at, None, &catalog, &limits) {
        Ok(record) => record,
        Err(invalid) => return assert!(invalid.field.is_some(), "{invalid:?} names no field"),
    };
    assert_eq!((record.id.clone(), record.status, record.attempt), (id, Status::Queued, 0));
    assert!((1..=limits.timeout_cap_s(record.class)).contains(&record.timeout_s));
    assert!((1..=limits.max_attempts_cap).contains(&record.max_attempts));
    let window = (record.deadline - record.created_at).whole_seconds();
    assert!(window >= 1 && window as u64 <= limits.max_deadline_s);

    let stored = serde_json::to_vec(&record).unwrap();
    assert_eq!(records::decode(&stored).unwrap(), record, "the bucket changes the record");

    // The lane message, published at once: a worker rebuilds the record from it alone, as
    // `claim` does for a task whose record it cannot find.
    let message = serde_json::to_vec(&TaskSpec::of_record_at(&record, created_at)).unwrap();
    let lane = Some((record.class, record.priority));
    let rebuilt = TaskSpec::from_slice(&message).unwrap().admit(
        record.id.clone(),
        created_at,
        lane,
        &catalog,
        &limits,
    );
    assert_eq!(rebuilt.unwrap(), record, "the lane message rebuilds another record");
});
