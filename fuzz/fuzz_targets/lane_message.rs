//! `lane_message`: what a worker makes of a message on a lane `tasks.<class>.<priority>`, which a
//! NATS-native publisher may send with any headers and payload: the task id
//! ([`queue::given_id`] from the spec or `Nats-Msg-Id`, else [`queue::derived_id`]), the trace of
//! its `traceparent`, and the spec ([`TaskSpec::from_slice`]), admitted in the message's lane at
//! its publish time when the worker finds no record (`worker/src/attempt.rs`, `claim.rs`).
//!
//! Beyond "never panics": the worker's id is the reconciler's ([`queue::task_id`]); an admitted
//! record sits in the message's lane under that id; and the sentence of a refusal fits the
//! `Claw-Dlq-Message` header of the dead-letter copy (async-nats panics on a line break).
#![no_main]

use std::str::FromStr;

use arbitrary::Arbitrary;
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use claw_proto::kinds::Catalog;
use claw_proto::queue;
use claw_proto::spec::{Limits, TaskSpec};
use claw_proto::topology::{Lane, headers};
use claw_proto::trace::{TRACEPARENT, TraceParent};
use libfuzzer_sys::fuzz_target;
use time::OffsetDateTime;

#[derive(Arbitrary, Debug)]
struct Message<'a> {
    /// Which of the six lanes it was delivered from.
    lane: u8,
    stream_seq: u64,
    /// The server's publish time, seconds since 1970 (any time up to 2106).
    published_s: u32,
    headers: Vec<(Name<'a>, &'a str)>,
    payload: &'a [u8],
}

/// The headers the worker reads are named most of the time; any other name now and then.
#[derive(Arbitrary, Debug)]
enum Name<'a> {
    MsgId,
    TraceParent,
    Other(&'a str),
}

fuzz_target!(|m: Message| {
    let lane = Lane::ALL[usize::from(m.lane) % Lane::ALL.len()];
    let published = OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(m.published_s.into());
    let headers = header_map(&m.headers);

    // attempt::handle: the spec, then the id.
    let spec = TaskSpec::from_slice(m.payload);
    let msg_id = headers.get(headers::MSG_ID).map(HeaderValue::as_str);
    let given = queue::given_id(spec.as_ref().ok().and_then(|s| s.id.as_ref()), msg_id);
    let id = given.unwrap_or_else(|| queue::derived_id(m.stream_seq, published));
    let listed = queue::task_id(m.payload, msg_id, m.stream_seq, published);
    assert_eq!(id, listed, "the worker and the reconciler name different tasks");

    if let Some(trace) = headers.get(TRACEPARENT).and_then(|v| TraceParent::parse(v.as_str())) {
        assert_eq!(TraceParent::parse(&trace.to_header()), Some(trace));
    }

    // claim::load_or_admit, for a message without a record.
    let refusal = match &spec {
        Ok(spec) => {
            let lanes = Some((lane.class, lane.priority));
            match spec.admit(id.clone(), published, lanes, &Catalog::builtin(), &Limits::STANDARD) {
                Ok(record) => {
                    assert_eq!(
                        (&record.id, record.class, record.priority),
                        (&id, lane.class, lane.priority)
                    );
                    None
                }
                Err(invalid) => Some(invalid),
            }
        }
        Err(invalid) => Some(invalid.clone()),
    };
    if let Some(invalid) = refusal {
        // dlq::publish: these inserts panic on a value async-nats refuses.
        let mut dlq = HeaderMap::new();
        let sentence = format!("{}: {}", invalid.field.unwrap_or_default(), invalid.message);
        dlq.insert(headers::DLQ_MESSAGE, headers::one_line(&sentence).as_str());
        dlq.insert(headers::TASK_ID, id.as_str());
    }
});

/// The headers as async-nats hands them over: it parses names and values off the wire, so a
/// name it would refuse, or a value with a line break, never reaches the worker, and a value
/// comes trimmed.
fn header_map(pairs: &[(Name, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        let name = match name {
            Name::MsgId => headers::MSG_ID,
            Name::TraceParent => TRACEPARENT,
            Name::Other(name) => name,
        };
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_str(name), HeaderValue::from_str(value.trim()))
        {
            map.append(name, value);
        }
    }
    map
}
