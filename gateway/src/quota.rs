//! What one principal may take of a shared system: tasks waiting to run, bytes stored, submits
//! per second, open WebSockets, and watched sessions (each costs a JetStream consumer, and the
//! account allows 1 000). Set in the tokens file, for everyone under `[limits]` and per
//! principal under `[principals.<name>.limits]`:
//!
//! ```toml
//! [limits]                      # every principal (these are the defaults)
//! queued_tasks = 2000           # queued, retrying or paused at once, in the whole system
//! running_tasks = 32            # running at once, on all workers (the others wait, queued)
//! stored_bytes = 1073741824     # records and payloads held in JetStream (1 GiB)
//! submits_per_s = 100           # sustained; a burst of `submit_burst` is allowed
//! submit_burst = 200
//! websockets = 100              # open at once, on this gateway
//! watched_sessions = 50         # distinct sessions its sockets watch at once, on this gateway
//!
//! [principals.batch.limits]
//! submits_per_s = 1000          # only what differs
//! ```
//!
//! A refusal is a 429 that names the limit (`limit` in the error body): `rate_limited` with
//! `Retry-After` for the rate, `quota_exceeded` for what frees up when tasks finish, records
//! leave or a socket closes. Each is counted in `/metrics` as
//! `claw_gateway_refusals_total{limit}`.
//!
//! The rate, sockets and watched sessions are counted per gateway process: behind N gateways a
//! principal gets up to N times each. Queued tasks and stored bytes are the system's: the
//! archiver counts them from the bucket (`claw.archive.usage`, its `live` table), every gateway
//! asks it once a second ([`refresh`]) and adds what it admitted since it asked. Another
//! gateway's admissions of the last second are not seen yet, so N gateways may overshoot by what
//! the principal's rate admits in a second on the other N-1. Without an answer for
//! [`STALE_AFTER`] (no archiver) these two limits are not enforced, rather than refusing every
//! principal's work; `claw_gateway_usage_age_seconds` says how old the counts are.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use claw_proto::api::UsageReport;
use claw_proto::topology::{self, SessionScope};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, RateLimiter};
use serde::{Deserialize, Serialize};

use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::auth::Caller;
use crate::error::Error;

/// How many of one principal's tasks wait at once by default: a fifth of the shipped queue
/// limit (10 000, `--queue-max`), so one principal's backlog cannot fill the queue for all.
pub const DEFAULT_QUEUED_TASKS: u64 = 2_000;

/// How many of one principal's tasks run at once by default, on all workers together: less
/// than one default worker's 50 (`max_concurrent`), so even on one worker a principal with a
/// deep backlog leaves slots to the others.
pub const DEFAULT_RUNNING_TASKS: u32 = 32;

/// One principal's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quota {
    pub queued_tasks: u64,
    pub running_tasks: u32,
    pub stored_bytes: u64,
    pub submits_per_s: u32,
    pub submit_burst: u32,
    pub websockets: u32,
    pub watched_sessions: u32,
}

impl Default for Quota {
    fn default() -> Quota {
        Quota {
            queued_tasks: DEFAULT_QUEUED_TASKS,
            running_tasks: DEFAULT_RUNNING_TASKS,
            stored_bytes: 1 << 30,
            submits_per_s: 100,
            submit_burst: 200,
            websockets: 100,
            watched_sessions: 50,
        }
    }
}

/// What a principal's table overrides of the defaults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    queued_tasks: Option<u64>,
    running_tasks: Option<u32>,
    stored_bytes: Option<u64>,
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
            queued_tasks: overrides.queued_tasks.unwrap_or(self.queued_tasks),
            running_tasks: overrides.running_tasks.unwrap_or(self.running_tasks),
            stored_bytes: overrides.stored_bytes.unwrap_or(self.stored_bytes),
            submits_per_s: overrides.submits_per_s.unwrap_or(self.submits_per_s),
            submit_burst: overrides.submit_burst.unwrap_or(self.submit_burst),
            websockets: overrides.websockets.unwrap_or(self.websockets),
            watched_sessions: overrides.watched_sessions.unwrap_or(self.watched_sessions),
        };
        if quota.submits_per_s == 0 || quota.submit_burst == 0 {
            return Err("submits_per_s and submit_burst must be at least 1".into());
        }
        if quota.running_tasks == 0 {
            return Err(
                "running_tasks must be at least 1 (a task that may never run is lost)".into()
            );
        }
        Ok(quota)
    }
}

/// How often a gateway asks the archiver what each principal holds.
pub const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// Counts older than this are not enforced: the archiver is gone, and refusing everyone's work
/// for it would turn its outage into the system's.
pub const STALE_AFTER: Duration = Duration::from_secs(10);

/// One principal's use of its quota in this process.
#[derive(Debug)]
struct Usage {
    quota: Quota,
    submits: DefaultDirectRateLimiter,
    websockets: AtomicU32,
    watched: Mutex<HashMap<SessionScope, usize>>,
    /// Tasks and bytes this gateway admitted, ever: what the archiver's counts do not include
    /// yet is what was admitted since they were asked for.
    admitted: Mutex<Admitted>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Admitted {
    tasks: u64,
    bytes: u64,
}

/// What the archiver last said a principal holds, and how much this gateway had admitted when
/// it asked.
#[derive(Clone, Copy, Debug)]
struct Held {
    at: Instant,
    usage: claw_proto::api::Usage,
    admitted: Admitted,
}

/// Every principal's usage, made once from the tokens file.
#[derive(Debug, Default)]
pub struct Quotas {
    usage: HashMap<String, Arc<Usage>>,
    held: Mutex<HashMap<String, Held>>,
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
                    admitted: Mutex::default(),
                };
                (name.to_owned(), Arc::new(usage))
            })
            .collect();
        Quotas { usage, held: Mutex::default() }
    }

    /// Whether any principal has limits (a tokens file is in use).
    pub fn is_empty(&self) -> bool {
        self.usage.is_empty()
    }

    /// What each principal had admitted here, taken just before the archiver is asked.
    fn admitted(&self) -> HashMap<String, Admitted> {
        self.usage.iter().map(|(name, u)| (name.clone(), *lock(&u.admitted))).collect()
    }

    /// The archiver's `report`, asked for when this gateway had admitted `before`.
    fn seen(&self, report: &UsageReport, before: HashMap<String, Admitted>, at: Instant) {
        let held = before
            .into_iter()
            .map(|(name, admitted)| {
                let usage = report.principals.get(&name).copied().unwrap_or_default();
                (name, Held { at, usage, admitted })
            })
            .collect();
        *lock(&self.held) = held;
    }

    /// `GET /v1/usage`: the caller's limits and what it holds as this gateway counts it; `None`
    /// for a caller without limits (no tokens).
    pub fn view(&self, caller: &Caller) -> Option<View> {
        let usage = self.of(caller)?;
        let name = caller.owner().unwrap_or_default();
        let held = lock(&self.held).get(name).copied();
        let admitted = *lock(&usage.admitted);
        let (holds, age) = match held {
            Some(h) => {
                let since = |now: u64, then: u64| now - then;
                let holds = claw_proto::api::Usage {
                    queued: h.usage.queued + since(admitted.tasks, h.admitted.tasks),
                    running: h.usage.running,
                    bytes: h.usage.bytes + since(admitted.bytes, h.admitted.bytes),
                };
                (Some(holds), Some(h.at.elapsed().as_secs_f64()))
            }
            None => (None, None),
        };
        Some(View { principal: name.to_owned(), limits: usage.quota, holds, counted_s_ago: age })
    }

    /// The concurrency key of `caller`'s tasks: at most its `running_tasks` run at once, on all
    /// workers (`worker/src/slots.rs` enforces it). `None` for a caller without limits.
    pub fn running_key(&self, caller: &Caller) -> Option<claw_proto::Concurrency> {
        let usage = self.of(caller)?;
        let name = caller.owner()?;
        Some(claw_proto::Concurrency::principal(name, usage.quota.running_tasks))
    }

    /// A new task of `bytes` for `caller`, held until it finishes: 429 `quota_exceeded` when the
    /// principal already has `queued_tasks` waiting, or it would hold more than `stored_bytes`.
    pub fn admit(&self, caller: &Caller, bytes: u64) -> Result<(), Error> {
        let Some(usage) = self.of(caller) else { return Ok(()) };
        let name = caller.owner().unwrap_or_default();
        let held = lock(&self.held).get(name).copied();
        let mut admitted = lock(&usage.admitted);
        if let Some(held) = held.filter(|h| h.at.elapsed() < STALE_AFTER) {
            let quota = usage.quota;
            let queued = held.usage.queued + (admitted.tasks - held.admitted.tasks);
            if queued >= quota.queued_tasks {
                let message = format!(
                    "at most {} tasks waiting to run for this principal; retry once some have \
                     started",
                    quota.queued_tasks
                );
                return Err(refused("queued_tasks", message, None));
            }
            let stored = held.usage.bytes + (admitted.bytes - held.admitted.bytes);
            if stored.saturating_add(bytes) > quota.stored_bytes {
                let message = format!(
                    "this principal holds {stored} bytes of tasks and may hold at most {}; \
                     finished tasks free theirs when their retention has passed",
                    quota.stored_bytes
                );
                return Err(refused("stored_bytes", message, None));
            }
        }
        admitted.tasks += 1;
        admitted.bytes += bytes;
        Ok(())
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

/// A principal's limits and use, as `GET /v1/usage` shows them.
#[derive(Clone, Debug, Serialize)]
pub struct View {
    pub principal: String,
    pub limits: Quota,
    /// What it holds: the archiver's counts (running is only theirs) plus what this gateway
    /// admitted since; absent until the archiver has answered once.
    pub holds: Option<claw_proto::api::Usage>,
    /// How old the archiver's counts are; past [`STALE_AFTER`] they are not enforced.
    pub counted_s_ago: Option<f64>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Asks the archiver what each principal holds every [`REFRESH_EVERY`] until `shutdown`; the
/// counts [`Quotas::admit`] checks. Does nothing without principals.
pub async fn refresh(app: App, shutdown: CancellationToken) {
    if app.quotas.is_empty() {
        return;
    }
    let mut last = None::<Instant>;
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let before = app.quotas.admitted();
        let asked = Instant::now();
        match ask(&app).await {
            Ok(report) => {
                if last.is_some_and(|at| at.elapsed() >= STALE_AFTER) {
                    tracing::info!("the archiver counts each principal's tasks again");
                }
                app.quotas.seen(&report, before, asked);
                last = Some(asked);
            }
            Err(e) if last.is_some_and(|at| at.elapsed() < STALE_AFTER) => {
                tracing::debug!(error = %e, "no usage counts from the archiver");
            }
            Err(e) if last.is_none_or(|at| at.elapsed() < STALE_AFTER + REFRESH_EVERY) => {
                tracing::warn!(error = %e, "no usage counts from the archiver: the queued_tasks \
                    and stored_bytes limits are not enforced until it answers");
            }
            Err(_) => {}
        }
        let age = last.map_or(f64::INFINITY, |at| at.elapsed().as_secs_f64());
        metrics::gauge!("claw_gateway_usage_age_seconds").set(age);
    }
}

async fn ask(app: &App) -> Result<UsageReport, String> {
    let request = app.client.request(topology::ARCHIVE_USAGE, bytes::Bytes::new());
    let reply = tokio::time::timeout(REFRESH_EVERY * 2, request)
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&reply.payload).map_err(|e| format!("unexpected reply: {e}"))
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
    fn queued_tasks_and_stored_bytes_count_the_archivers_view_and_what_was_admitted_since() {
        let q = quotas(Quota { queued_tasks: 3, stored_bytes: 1_000, ..Quota::default() });
        let (alice, bob) = (caller("alice"), caller("bob"));
        // No counts yet (no archiver): not enforced.
        for _ in 0..5 {
            q.admit(&alice, 10).unwrap();
        }
        // The archiver saw two of alice's waiting; three more were admitted since asking.
        let before = q.admitted();
        q.admit(&alice, 10).unwrap();
        let held = claw_proto::api::Usage { queued: 2, running: 7, bytes: 500 };
        let report = UsageReport { principals: [("alice".to_owned(), held)].into() };
        q.seen(&report, before, Instant::now());
        match q.admit(&alice, 10) {
            Err(Error::Limited { limit: "queued_tasks", retry_after_s: None, .. }) => {}
            other => panic!("2 seen and 1 admitted since leave no room under 3: {other:?}"),
        }
        // Tasks ran: room again, until the bytes would pass the limit.
        let held = claw_proto::api::Usage { queued: 0, running: 3, bytes: 900 };
        let report = UsageReport { principals: [("alice".to_owned(), held)].into() };
        q.seen(&report, q.admitted(), Instant::now());
        q.admit(&alice, 100).unwrap();
        assert!(matches!(q.admit(&alice, 1), Err(Error::Limited { limit: "stored_bytes", .. })));
        // Bob holds nothing; the anonymous caller has no limits.
        q.admit(&bob, 1_000).unwrap();
        q.admit(&Caller::Anonymous, u64::MAX).unwrap();
        // Counts from an archiver that stopped answering are not enforced.
        let stale = Instant::now() - STALE_AFTER;
        let held = claw_proto::api::Usage { queued: 100, running: 0, bytes: 0 };
        let report = UsageReport { principals: [("alice".to_owned(), held)].into() };
        q.seen(&report, q.admitted(), stale);
        q.admit(&alice, 1).unwrap();
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
