//! W3C trace context carried from submit to completion, so one task is one trace.
//!
//! The gateway takes the caller's `traceparent` (HTTP header, or NATS header on
//! `claw.api.submit`) or starts a trace, and publishes the task message with a child
//! `traceparent` header; the worker puts the trace id on the task's span, so every log line of
//! the task, in every process, carries the same `trace_id`. NATS-native publishers may set the
//! header themselves. (Exporting spans to a collector is not wired; the ids are what it needs.)

/// The header name, as W3C Trace Context spells it (lower case; NATS headers keep case).
pub const TRACEPARENT: &str = "traceparent";

/// A parsed `traceparent`: `00-<trace id, 32 hex>-<parent id, 16 hex>-<flags, 2 hex>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: String,
    pub parent_id: String,
    pub flags: u8,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl TraceParent {
    /// Parses version 00; an invalid or all-zero id is no trace context at all.
    pub fn parse(header: &str) -> Option<TraceParent> {
        let mut parts = header.trim().split('-');
        let (version, trace_id, parent_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let valid = version == "00"
            && parts.next().is_none()
            && is_hex(trace_id, 32)
            && is_hex(parent_id, 16)
            && is_hex(flags, 2)
            && trace_id.bytes().any(|b| b != b'0')
            && parent_id.bytes().any(|b| b != b'0');
        valid.then(|| TraceParent {
            trace_id: trace_id.to_owned(),
            parent_id: parent_id.to_owned(),
            flags: u8::from_str_radix(flags, 16).unwrap_or(0),
        })
    }

    /// A new trace, sampled.
    pub fn generate() -> TraceParent {
        TraceParent {
            trace_id: uuid::Uuid::new_v4().simple().to_string(),
            parent_id: span_id(),
            flags: 1,
        }
    }

    /// The context to hand to the next hop: the same trace, a new parent span.
    pub fn child(&self) -> TraceParent {
        TraceParent { trace_id: self.trace_id.clone(), parent_id: span_id(), flags: self.flags }
    }

    pub fn to_header(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.parent_id, self.flags)
    }
}

fn span_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..16].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_round_trips() {
        let h = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceParent::parse(h).unwrap();
        assert_eq!(t.to_header(), h);
        let child = t.child();
        assert_eq!(child.trace_id, t.trace_id);
        assert_ne!(child.parent_id, t.parent_id);
        let fresh = TraceParent::generate();
        assert_eq!(TraceParent::parse(&fresh.to_header()), Some(fresh));
    }

    #[test]
    fn refuses_what_is_not_version_00() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }
}
