//! From an attempt's outcome to what happens next: the [`Decision`] (record transition, events,
//! DLQ) and its one-to-one ack ([`ack_of`]). Pure functions, so the mapping is tested without a
//! server. Deliveries that never become an attempt (a duplicate, a stale copy, a record out of
//! reach) are [`Decision`]s too, so every delivery ends in exactly one ack, from one function.

use std::time::Duration;

use async_nats::jetstream::AckKind;
use backoff::backoff::Backoff;
use claw_proto::{Cause, TaskError};
use serde_json::Value;

use crate::config::RetryConfig;
use crate::dlq::reason;

/// Why the worker stopped an attempt before its handler finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The attempt ran past the task's `timeout_s` (time spent paused not counted).
    Timeout,
    /// The task ran past its absolute deadline: no later attempt could start, so no retry.
    Deadline,
    /// The record says the task is no longer to be run by this attempt, which holds it: a user
    /// cancelled it (the gateway wrote `cancelled`), or cancelled and retried it (a new message).
    Cancelled,
    /// The NATS connection was down too long to keep heartbeating: the message will be
    /// redelivered, and the redelivered copy owns the task.
    LeaseLost,
    /// Another attempt wrote the record: this one is stale.
    Superseded,
    /// The worker is shutting down and the drain deadline passed.
    Shutdown,
    /// A limit of the whole worker needed room and this attempt was chosen to make it: the
    /// worker's memory cap ([`crate::memory`]). A failure with `cause: limit`, retried like the
    /// limits of a child process.
    Limit(Limit),
}

/// A worker-wide limit that stopped an attempt, with the numbers its error reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// The worker's RSS was `rss_mb` over its `memory_max_mb` = `cap_mb`, and this was the
    /// largest of its in-process attempts.
    Memory { cap_mb: u64, rss_mb: u64 },
}

impl Limit {
    /// The attempt's error: `limit_memory`, the same code a child's memory limit gets, and
    /// retryable like it (the next attempt may land on a worker with room).
    pub fn error(self) -> TaskError {
        match self {
            Limit::Memory { cap_mb, rss_mb } => TaskError::new(
                "limit_memory",
                format!(
                    "limit: memory (the worker's cap of {cap_mb} MiB); its RSS was {rss_mb} MiB \
                     and this was its largest in-process attempt"
                ),
                true,
            ),
        }
    }
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Done(Value),
    Failed(TaskError),
    Stopped(Stop),
}

/// What becomes of one delivery: the record transition, events and DLQ copy that the stages
/// made, and the one ack that [`ack_of`] maps it to. The first six end an attempt; the rest
/// settle a delivery that never became one (the claim stage found no attempt to start).
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// `succeed` the record, publish the result.
    Succeed(Value),
    /// `retry_later`; the message comes back after `delay`.
    Retry { error: TaskError, cause: Cause, delay: Duration },
    /// `fail` the record and dead-letter the message with `reason` (also for a task that cannot
    /// start at all: past its deadline, out of attempts).
    GiveUp { error: TaskError, cause: Cause, reason: &'static str },
    /// Touch nothing: the task belongs to whoever gets the redelivered message.
    Release,
    /// Put the message back at once (a drain): the next worker takes the task over.
    HandBack,
    /// Touch nothing and remove the message for good: whoever stopped the task (the gateway,
    /// on a user's cancel) already wrote the record.
    Withdraw,
    /// The task already finished: a duplicate delivery, dropped.
    Duplicate,
    /// Another message of the task is the live one (a cancel and a quick retry left this copy
    /// behind): taking over would run the task twice, so this copy is removed.
    StaleCopy,
    /// The task left the queue (paused while queued, or paused while held by a worker that is
    /// gone): its message is removed, and a resume publishes it again.
    LeftQueue,
    /// Every slot of one of the task's concurrency keys is held: the task waits, parked, for
    /// one (its copy is stored in `parked.<key>`), and its lane message is removed.
    Parked,
    /// The record is in a state this worker does not know (one added later): look again then.
    RecheckLater(Duration),
    /// The record could not be read or written: no attempt was made, and the message comes
    /// back after the delay at no cost to the task.
    Unreachable(Duration),
    /// Not a valid task: dead-lettered (the copy is stored), with a `failed` record where the
    /// publisher can find one.
    Invalid,
}

impl Decision {
    /// Whether this decision ends an attempt that ran (as opposed to a delivery settled before
    /// one could start).
    pub fn ends_attempt(&self) -> bool {
        matches!(
            self,
            Decision::Succeed(_)
                | Decision::Retry { .. }
                | Decision::GiveUp { .. }
                | Decision::Release
                | Decision::HandBack
                | Decision::Withdraw
        )
    }
}

/// Decides what follows `outcome` of attempt `attempt` out of `max_attempts`.
pub fn decide(outcome: Outcome, attempt: u32, max_attempts: u32, retry: &RetryConfig) -> Decision {
    let (error, cause) = match outcome {
        Outcome::Done(value) => return Decision::Succeed(value),
        Outcome::Stopped(Stop::LeaseLost | Stop::Superseded) => return Decision::Release,
        Outcome::Stopped(Stop::Shutdown) => return Decision::HandBack,
        Outcome::Stopped(Stop::Cancelled) => return Decision::Withdraw,
        Outcome::Stopped(Stop::Timeout) => {
            let error = TaskError::new("timeout", "the attempt ran past its timeout", true);
            (error, Cause::Timeout)
        }
        Outcome::Stopped(Stop::Limit(limit)) => (limit.error(), Cause::Limit),
        Outcome::Stopped(Stop::Deadline) => {
            let message = "the task ran past its deadline";
            let error = TaskError::new("deadline_exceeded", message, false);
            return Decision::GiveUp { error, cause: Cause::Timeout, reason: reason::DEADLINE };
        }
        Outcome::Failed(error) => {
            // A resource limit ended it (`limit_memory`, ...): retried like any failure, so it
            // counts toward max_attempts, but the record says which limit.
            let cause = if error.code.starts_with("limit_") { Cause::Limit } else { Cause::Error };
            (error, cause)
        }
    };
    if !error.retryable {
        return Decision::GiveUp { error, cause, reason: reason::NON_RETRYABLE };
    }
    if attempt >= max_attempts {
        return Decision::GiveUp { error, cause, reason: reason::MAX_ATTEMPTS };
    }
    Decision::Retry { error, cause, delay: retry_delay(retry, attempt) }
}

/// The ack that goes with a decision: done → Ack, retry after d → Nak(d), give up or withdraw →
/// Term, hand back → Nak now. `None`: send nothing and let the ack deadline pass. The only
/// mapping from what happened to what the server is told; `attempt::handle` sends it once.
pub fn ack_of(decision: &Decision) -> Option<AckKind> {
    match decision {
        Decision::Succeed(_) | Decision::Duplicate | Decision::Parked => Some(AckKind::Ack),
        Decision::Retry { delay, .. } => Some(AckKind::Nak(Some(*delay))),
        Decision::RecheckLater(delay) | Decision::Unreachable(delay) => {
            Some(AckKind::Nak(Some(*delay)))
        }
        Decision::GiveUp { .. }
        | Decision::Withdraw
        | Decision::StaleCopy
        | Decision::LeftQueue
        | Decision::Invalid => Some(AckKind::Term),
        Decision::Release => None,
        Decision::HandBack => Some(AckKind::Nak(None)),
    }
}

/// The label of a decision: `outcome` of `claw_worker_outcomes_total` for the ones that end an
/// attempt, `reason` of `claw_worker_skipped_total` for the others.
pub fn label(decision: &Decision) -> &'static str {
    match decision {
        Decision::Succeed(_) => "succeeded",
        Decision::Retry { .. } => "retry",
        Decision::GiveUp { .. } => "failed",
        Decision::Release => "released",
        Decision::HandBack => "handed_back",
        Decision::Withdraw => "cancelled",
        Decision::Duplicate => "duplicate",
        Decision::StaleCopy => "stale_copy",
        Decision::LeftQueue => "left_queue",
        Decision::Parked => "parked",
        Decision::RecheckLater(_) => "recheck",
        Decision::Unreachable(_) => "unreachable",
        Decision::Invalid => "invalid",
    }
}

/// The delay after failed attempt `attempt` (1-based): the `attempt`-th step of the configured
/// exponential backoff, never above `max_ms` (jitter included).
pub fn retry_delay(retry: &RetryConfig, attempt: u32) -> Duration {
    let mut backoff = retry.backoff();
    let max = Duration::from_millis(retry.max_ms);
    let mut delay = max;
    for _ in 0..attempt.max(1) {
        delay = backoff.next_backoff().unwrap_or(max);
    }
    delay.min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry(jitter: f64) -> RetryConfig {
        RetryConfig { initial_ms: 1000, max_ms: 10_000, multiplier: 2.0, jitter }
    }

    fn err(retryable: bool) -> Outcome {
        Outcome::Failed(TaskError::new("e", "m", retryable))
    }

    #[test]
    fn each_outcome_maps_to_one_ack() {
        let r = retry(0.0);
        let ack = |o, attempt| ack_of(&decide(o, attempt, 3, &r));
        assert!(matches!(ack(Outcome::Done(Value::Null), 1), Some(AckKind::Ack)));
        assert!(
            matches!(ack(err(true), 1), Some(AckKind::Nak(Some(d))) if d == Duration::from_secs(1))
        );
        assert!(matches!(ack(err(true), 3), Some(AckKind::Term)));
        assert!(matches!(ack(err(false), 1), Some(AckKind::Term)));
        assert!(matches!(ack(Outcome::Stopped(Stop::Timeout), 1), Some(AckKind::Nak(Some(_)))));
        assert!(ack(Outcome::Stopped(Stop::LeaseLost), 1).is_none());
        assert!(ack(Outcome::Stopped(Stop::Superseded), 1).is_none());
        assert!(matches!(ack(Outcome::Stopped(Stop::Shutdown), 1), Some(AckKind::Nak(None))));
        assert!(matches!(ack(Outcome::Stopped(Stop::Cancelled), 1), Some(AckKind::Term)));
        assert!(matches!(ack(Outcome::Stopped(Stop::Deadline), 1), Some(AckKind::Term)));
        let secs = Duration::from_secs;
        assert!(matches!(ack_of(&Decision::Duplicate), Some(AckKind::Ack)));
        assert!(matches!(ack_of(&Decision::Parked), Some(AckKind::Ack)));
        assert!(!Decision::Parked.ends_attempt());
        for d in [Decision::StaleCopy, Decision::LeftQueue, Decision::Invalid] {
            assert!(matches!(ack_of(&d), Some(AckKind::Term)), "{d:?}");
            assert!(!d.ends_attempt());
        }
        assert!(
            matches!(ack_of(&Decision::Unreachable(secs(2))), Some(AckKind::Nak(Some(d))) if d == secs(2))
        );
        assert!(
            matches!(ack_of(&Decision::RecheckLater(secs(5))), Some(AckKind::Nak(Some(d))) if d == secs(5))
        );
        let labelled = |o, attempt| label(&decide(o, attempt, 3, &r));
        assert_eq!(labelled(Outcome::Done(Value::Null), 1), "succeeded");
        assert_eq!(labelled(err(true), 1), "retry");
        assert_eq!(labelled(err(true), 3), "failed");
        assert_eq!(labelled(Outcome::Stopped(Stop::Superseded), 1), "released");
        assert_eq!(labelled(Outcome::Stopped(Stop::Shutdown), 1), "handed_back");
        assert_eq!(labelled(Outcome::Stopped(Stop::Cancelled), 1), "cancelled");
    }

    #[test]
    fn giving_up_says_why() {
        let r = retry(0.0);
        let reason_of = |o, attempt| match decide(o, attempt, 3, &r) {
            Decision::GiveUp { reason, cause, .. } => (reason, cause),
            d => panic!("{d:?}"),
        };
        assert_eq!(reason_of(err(false), 1), (reason::NON_RETRYABLE, Cause::Error));
        assert_eq!(reason_of(err(true), 3), (reason::MAX_ATTEMPTS, Cause::Error));
        assert_eq!(
            reason_of(Outcome::Stopped(Stop::Timeout), 3),
            (reason::MAX_ATTEMPTS, Cause::Timeout)
        );
        // An attempt's timeout is retried; the task's deadline is not, even on attempt 1.
        assert!(matches!(
            decide(Outcome::Stopped(Stop::Timeout), 1, 3, &r),
            Decision::Retry { cause: Cause::Timeout, .. }
        ));
        assert_eq!(
            reason_of(Outcome::Stopped(Stop::Deadline), 1),
            (reason::DEADLINE, Cause::Timeout)
        );
        // The worker's memory cap: a limit failure, retried, counted toward max_attempts.
        let memory = Outcome::Stopped(Stop::Limit(Limit::Memory { cap_mb: 500, rss_mb: 512 }));
        match decide(memory.clone(), 1, 3, &r) {
            Decision::Retry { error, cause, .. } => {
                assert_eq!((error.code.as_str(), cause), ("limit_memory", Cause::Limit));
                assert!(error.message.contains("500 MiB"), "{error}");
            }
            d => panic!("{d:?}"),
        }
        assert_eq!(reason_of(memory, 3), (reason::MAX_ATTEMPTS, Cause::Limit));
        match decide(Outcome::Stopped(Stop::Deadline), 1, 3, &r) {
            Decision::GiveUp { error, .. } => {
                assert_eq!((error.code.as_str(), error.retryable), ("deadline_exceeded", false));
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn backoff_grows_then_caps() {
        let r = retry(0.0);
        let delays: Vec<u64> = (1..=6).map(|k| retry_delay(&r, k).as_millis() as u64).collect();
        assert_eq!(delays, [1000, 2000, 4000, 8000, 10_000, 10_000]);
        let r = retry(0.5);
        for k in 1..=8 {
            let d = retry_delay(&r, k);
            assert!(d <= Duration::from_secs(10), "{k}: {d:?}");
            assert!(d >= Duration::from_millis(500), "{k}: {d:?}");
        }
    }
}
