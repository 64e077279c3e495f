//! What one principal may take of a shared gateway: submits per second, open WebSockets, and
//! watched sessions (each costs a JetStream consumer, and the account allows 1 000). Set in the
//! tokens file, for everyone under `[limits]` and per principal under
//! `[principals.<name>.limits]`:
//!
//! ```toml
//! [limits]                 # every principal (these are the defaults)
//! submits_per_s = 100      # sustained; a burst of `submit_burst` is allowed
//! submit_burst = 200
//! websockets = 100         # open at once, on this gateway
//! watched_sessions = 50    # distinct sessions its sockets watch at once, on this gateway
//!
//! [principals.batch.limits]
//! submits_per_s = 1000     # only what differs
//! ```
//!
//! A refusal is a 429 that names the limit (`limit` in the error body): `rate_limited` with
//! `Retry-After` for the rate, `quota_exceeded` for what frees up when a socket closes. Each is
//! counted in `/metrics` as `claw_gateway_refusals_total{limit}`. The counts are per gateway
//! process: behind N gateways a principal gets up to N times each.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use claw_proto::topology::SessionScope;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, RateLimiter};
use serde::Deserialize;

use crate::auth::Caller;
use crate::error::Error;

/// One principal's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quota {
    pub submits_per_s: u32,
    pub submit_burst: u32,
    pub websockets: u32,
    pub watched_sessions: u32,
}

impl Default for Quota {
    fn default() -> Quota {
        Quota { submits_per_s: 100, submit_burst: 200, websockets: 100, watched_sessions: 50 }
    }
}

/// What a principal's table overrides of the defaults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    submits_per_s: Option<u32>,
    submit_burst: Option<u32>,
    websockets: Option<u32>,
    watched_sessions: Option<u32>,
}

impl Quota {
    /// `self` with what `overrides` sets; refuses a zero rate or burst (use `websockets = 0` to
    /// keep a principal off sockets, but a principal that may never submit has no use for a
    /// token).
    pub fn with(self, overrides: &Overrides) -> Result<Quota, String> {
        let quota = Quota {
            submits_per_s: overrides.submits_per_s.unwrap_or(self.submits_per_s),
            submit_burst: overrides.submit_burst.unwrap_or(self.submit_burst),
            websockets: overrides.websockets.unwrap_or(self.websockets),
            watched_sessions: overrides.watched_sessions.unwrap_or(self.watched_sessions),
        };
        if quota.submits_per_s == 0 || quota.submit_burst == 0 {
            return Err("submits_per_s and submit_burst must be at least 1".into());
        }
        Ok(quota)
    }
}

/// One principal's use of its quota in this process.
#[derive(Debug)]
struct Usage {
    quota: Quota,
    submits: DefaultDirectRateLimiter,
    websockets: AtomicU32,
    watched: Mutex<HashMap<SessionScope, usize>>,
}

/// Every principal's usage, made once from the tokens file.
#[derive(Debug, Default)]
pub struct Quotas {
    usage: HashMap<String, Arc<Usage>>,
}

impl Quotas {
    pub fn new<'a>(principals: impl IntoIterator<Item = (&'a str, Quota)>) -> Quotas {
        let usage = principals
            .into_iter()
            .map(|(name, quota)| {
                let rate = NonZeroU32::new(quota.submits_per_s).unwrap_or(NonZeroU32::MIN);
                let burst = NonZeroU32::new(quota.submit_burst).unwrap_or(NonZeroU32::MIN);
                let limiter =
                    RateLimiter::direct(governor::Quota::per_second(rate).allow_burst(burst));
                let usage = Usage {
                    quota,
                    submits: limiter,
                    websockets: AtomicU32::new(0),
                    watched: Mutex::default(),
                };
                (name.to_owned(), Arc::new(usage))
            })
            .collect();
        Quotas { usage }
    }

    fn of(&self, caller: &Caller) -> Option<&Arc<Usage>> {
        self.usage.get(caller.owner()?)
    }

    /// One submit of `caller`'s, or 429 `rate_limited` with the seconds until the next.
    pub fn submit(&self, caller: &Caller) -> Result<(), Error> {
        let Some(usage) = self.of(caller) else { return Ok(()) };
        usage.submits.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            refused(
                "submits_per_s",
                format!(
                    "at most {} submits a second (bursts of {}) for this principal; retry later",
                    usage.quota.submits_per_s, usage.quota.submit_burst
                ),
                Some(wait.as_secs_f64().ceil().max(1.0) as u64),
            )
        })
    }

    /// A socket of `caller`'s, open while the permit lives; 429 `quota_exceeded` past the limit.
    pub fn socket(&self, caller: &Caller) -> Result<SocketPermit, Error> {
        let Some(usage) = self.of(caller) else { return Ok(SocketPermit(None)) };
        let limit = usage.quota.websockets;
        let taken = usage.websockets.fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
            (open < limit).then_some(open + 1)
        });
        match taken {
            Ok(_) => Ok(SocketPermit(Some(usage.clone()))),
            Err(_) => Err(refused(
                "websockets",
                format!("at most {limit} open WebSockets for this principal; close one first"),
                None,
            )),
        }
    }

    /// `caller`'s watch of `session` while the permit lives: a session already watched by
    /// another of its sockets costs nothing more; a new one past the limit is 429.
    pub fn watch(&self, caller: &Caller, session: &SessionScope) -> Result<WatchPermit, Error> {
        let Some(usage) = self.of(caller) else { return Ok(WatchPermit(None)) };
        let mut watched = usage.watched.lock().unwrap_or_else(PoisonError::into_inner);
        let limit = usage.quota.watched_sessions as usize;
        if !watched.contains_key(session) && watched.len() >= limit {
            return Err(refused(
                "watched_sessions",
                format!("at most {limit} sessions watched at once by this principal"),
                None,
            ));
        }
        *watched.entry(session.clone()).or_default() += 1;
        Ok(WatchPermit(Some((usage.clone(), session.clone()))))
    }
}

fn refused(limit: &'static str, message: String, retry_after_s: Option<u64>) -> Error {
    metrics::counter!("claw_gateway_refusals_total", "limit" => limit).increment(1);
    Error::Limited { limit, message, retry_after_s }
}

/// An open socket, counted until dropped.
#[derive(Debug)]
pub struct SocketPermit(Option<Arc<Usage>>);

impl Drop for SocketPermit {
    fn drop(&mut self) {
        if let Some(usage) = &self.0 {
            usage.websockets.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A watched session, counted until dropped.
#[derive(Debug)]
pub struct WatchPermit(Option<(Arc<Usage>, SessionScope)>);

impl Drop for WatchPermit {
    fn drop(&mut self) {
        let Some((usage, session)) = &self.0 else { return };
        let mut watched = usage.watched.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = watched.get_mut(session) {
            *n -= 1;
            if *n == 0 {
                watched.remove(session);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Principal;
    use claw_proto::Session;

    fn caller(name: &str) -> Caller {
        Caller::Principal(Arc::new(Principal { name: name.into(), admin: false }))
    }

    fn quotas(quota: Quota) -> Quotas {
        Quotas::new([("alice", quota), ("bob", Quota::default())])
    }

    #[test]
    fn submits_beyond_the_burst_are_refused_with_a_retry_after() {
        let q = quotas(Quota { submits_per_s: 1, submit_burst: 3, ..Quota::default() });
        let alice = caller("alice");
        for _ in 0..3 {
            q.submit(&alice).unwrap();
        }
        match q.submit(&alice) {
            Err(Error::Limited { limit: "submits_per_s", retry_after_s: Some(s), .. }) => {
                assert!((1..=2).contains(&s), "{s}")
            }
            other => panic!("{other:?}"),
        }
        // Another principal, and the anonymous caller, are not touched by alice's use.
        q.submit(&caller("bob")).unwrap();
        q.submit(&Caller::Anonymous).unwrap();
    }

    #[test]
    fn sockets_and_watched_sessions_are_counted_while_held() {
        let q = quotas(Quota { websockets: 2, watched_sessions: 1, ..Quota::default() });
        let alice = caller("alice");
        let (a, b) = (q.socket(&alice).unwrap(), q.socket(&alice).unwrap());
        assert!(matches!(q.socket(&alice), Err(Error::Limited { limit: "websockets", .. })));
        drop(a);
        let _c = q.socket(&alice).unwrap();
        drop(b);

        let scope = |s: &str| SessionScope::new(Some("alice"), Session::parse(s).unwrap());
        let one = q.watch(&alice, &scope("one")).unwrap();
        let again = q.watch(&alice, &scope("one")).unwrap();
        let two = q.watch(&alice, &scope("two"));
        assert!(matches!(two, Err(Error::Limited { limit: "watched_sessions", .. })));
        drop(one);
        assert!(q.watch(&alice, &scope("two")).is_err(), "one is still watched by another");
        drop(again);
        q.watch(&alice, &scope("two")).unwrap();
    }

    #[test]
    fn overrides_replace_only_what_they_name() {
        let o: Overrides = toml::from_str("submits_per_s = 5").unwrap();
        let q = Quota::default().with(&o).unwrap();
        assert_eq!((q.submits_per_s, q.submit_burst), (5, 200));
        let zero: Overrides = toml::from_str("submit_burst = 0").unwrap();
        assert!(Quota::default().with(&zero).is_err());
        assert!(toml::from_str::<Overrides>("submits = 5").is_err());
    }
}
