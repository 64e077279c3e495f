//! Each session's and each principal's share of the event history.
//!
//! `PROGRESS` is one stream for everyone (1 GiB, one hour, the oldest dropped first), and an
//! attempt may stream up to [`MAX_PENDING_OUTPUT`] bytes of output per flush, about 2.5 MB/s:
//! a few chatty tasks would evict every other session's history within minutes. So this worker
//! lets each session, and each principal over all its sessions, publish output events at a
//! bounded rate (`[events]` in the configuration; token buckets of governor, keyed by session
//! and by owner). Output past its share is dropped from the events, and the next event says how
//! many bytes were ("[claw: N bytes of output over this session's share of the event history
//! dropped]"); progress, status and the end of a task are never held back, and the record and
//! the result are not affected.
//!
//! At the defaults one session publishes at most 64 KiB/s on one worker and one principal 256
//! KiB/s, so one principal alone needs over an hour per worker to write the stream's 1 GiB,
//! which is the stream's age limit: it cannot evict the others' last hour unless it has tasks
//! on several workers. Tasks without an owner (NATS-native publishers, a gateway without
//! tokens) are held only to the session rate.
//!
//! [`MAX_PENDING_OUTPUT`]: crate::handler::MAX_PENDING_OUTPUT

use std::num::NonZeroU32;

use claw_proto::TaskRecord;
use claw_proto::topology::SessionScope;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Deserialize;

use crate::handler::MAX_PENDING_OUTPUT;

/// `[events]` of the worker's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Output bytes a second one session's tasks may publish from this worker.
    pub session_output_bytes_per_s: u32,
    /// Output bytes a second all of one principal's tasks may publish from this worker.
    pub principal_output_bytes_per_s: u32,
}

impl Default for EventsConfig {
    fn default() -> EventsConfig {
        EventsConfig {
            session_output_bytes_per_s: 64 * 1024,
            principal_output_bytes_per_s: 256 * 1024,
        }
    }
}

impl EventsConfig {
    pub fn check(&self) -> Result<(), String> {
        if self.session_output_bytes_per_s < 1024 || self.principal_output_bytes_per_s < 1024 {
            return Err("events: the output rates must be at least 1024 bytes a second".into());
        }
        Ok(())
    }
}

/// Keys a limiter holds before the idle ones are let go (a key whose bucket is full again is
/// the same as a new one).
const PRUNE_ABOVE: usize = 4096;

/// The smallest piece of output worth sending when less than a flush's worth may go.
const SMALLEST_PIECE: usize = 1024;

/// The buckets of every session and principal that published from this worker lately.
#[derive(Debug)]
pub struct Shares {
    sessions: DefaultKeyedRateLimiter<SessionScope>,
    principals: DefaultKeyedRateLimiter<String>,
}

impl Shares {
    pub fn new(config: &EventsConfig) -> Shares {
        Shares {
            sessions: RateLimiter::keyed(quota(config.session_output_bytes_per_s)),
            principals: RateLimiter::keyed(quota(config.principal_output_bytes_per_s)),
        }
    }

    /// How many of `wanted` output bytes of `record`'s may go out now: all of them, a prefix
    /// (halved until it fits, down to 1 KiB), or none.
    pub fn output(&self, record: &TaskRecord, wanted: usize) -> usize {
        self.prune();
        let session = record.scope();
        let mut n = wanted;
        while n > 0 {
            if self.allows(&session, record.owner.as_ref(), n) {
                return n;
            }
            n = if n / 2 >= SMALLEST_PIECE { n / 2 } else { 0 };
        }
        0
    }

    fn allows(&self, session: &SessionScope, owner: Option<&String>, n: usize) -> bool {
        let Some(n) = u32::try_from(n).ok().and_then(NonZeroU32::new) else { return true };
        // The principal's bucket first: a session refused by it spends nothing of its own.
        if let Some(owner) = owner
            && !matches!(self.principals.check_key_n(owner, n), Ok(Ok(())))
        {
            return false;
        }
        matches!(self.sessions.check_key_n(session, n), Ok(Ok(())))
    }

    fn prune(&self) {
        for limiter in [&self.principals.len(), &self.sessions.len()] {
            if *limiter > PRUNE_ABOVE {
                self.principals.retain_recent();
                self.sessions.retain_recent();
                return;
            }
        }
    }
}

/// `per_s` bytes a second, in bursts of sixteen seconds' worth and at least one flush's most.
fn quota(per_s: u32) -> Quota {
    let rate = NonZeroU32::new(per_s).unwrap_or(NonZeroU32::MIN);
    let burst = per_s.saturating_mul(16).max(MAX_PENDING_OUTPUT as u32 + 256);
    Quota::per_second(rate).allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN))
}

#[cfg(test)]
mod tests {
    use claw_proto::TaskId;
    use claw_proto::kinds::Catalog;
    use claw_proto::spec::{Limits, TaskSpec};
    use time::OffsetDateTime;

    use super::*;

    fn task(session: &str, owner: Option<&str>) -> TaskRecord {
        let spec = format!(r#"{{"kind": "sleep", "session": "{session}"}}"#);
        let mut r = TaskSpec::from_slice(spec.as_bytes())
            .unwrap()
            .admit(
                TaskId::generate(),
                OffsetDateTime::now_utc(),
                None,
                &Catalog::builtin(),
                &Limits::STANDARD,
            )
            .unwrap();
        r.owner = owner.map(Into::into);
        r
    }

    #[test]
    fn a_session_past_its_share_is_cut_and_others_are_not() {
        let config = EventsConfig {
            session_output_bytes_per_s: 1024,
            principal_output_bytes_per_s: 1 << 30,
        };
        let shares = Shares::new(&config);
        let chatty = task("chatty", None);
        // The burst (at least a flush's most) goes; then nothing, or a small piece, until the
        // bucket refills at 1 KiB/s.
        assert_eq!(shares.output(&chatty, MAX_PENDING_OUTPUT), MAX_PENDING_OUTPUT);
        assert!(shares.output(&chatty, MAX_PENDING_OUTPUT) < 2048);
        assert_eq!(shares.output(&chatty, MAX_PENDING_OUTPUT), 0);
        // Another session, and the same name in another principal's namespace, have their own.
        assert_eq!(shares.output(&task("quiet", None), 100), 100);
        assert_eq!(shares.output(&task("chatty", Some("bob")), 100), 100);
    }

    #[test]
    fn a_principal_shares_one_bucket_over_all_its_sessions() {
        let config = EventsConfig {
            session_output_bytes_per_s: 1 << 30,
            principal_output_bytes_per_s: 1024,
        };
        let shares = Shares::new(&config);
        let mut sent = 0;
        for n in 0..100 {
            sent += shares.output(&task(&format!("s{n}"), Some("alice")), 64 * 1024);
        }
        assert!(sent <= MAX_PENDING_OUTPUT + 256 + 2048, "alice sent {sent} over 100 sessions");
        assert_eq!(
            shares.output(&task("s0", Some("bob")), 64 * 1024),
            64 * 1024,
            "bob has his own"
        );
        assert_eq!(shares.output(&task("s0", None), 64 * 1024), 64 * 1024, "unowned: no principal");
    }

    #[test]
    fn rates_below_a_kibibyte_are_refused() {
        let low = EventsConfig { session_output_bytes_per_s: 10, ..EventsConfig::default() };
        assert!(low.check().is_err());
        assert!(EventsConfig::default().check().is_ok());
    }
}
