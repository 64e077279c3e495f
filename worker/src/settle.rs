//! The settle stage of a delivery ([`crate::attempt`]): from the attempt's [`Outcome`] to the
//! [`Decision`] it ends with, made true in the record, the DLQ and the events.
//!
//! [`crate::outcome::decide`] picks the decision; this module writes its record transition with
//! a compare-and-set on the revision the attempt holds (following newer revisions of its own
//! record, giving way to another attempt's), keeps the outcome and the lease while the task is
//! paused, stores the DLQ copy of a task given up, and announces the result or error. The
//! decision it returns may differ from the first one (the record moved on meanwhile, the drain
//! deadline passed): it is what the delivery's one ack is mapped from.

use std::time::Duration;

use claw_proto::{PayloadRef, TaskError, TaskRecord, payloads, records};
use tokio::time::{Instant, MissedTickBehavior};

use crate::attempt::{Delivery, Held, now, same_attempt};
use crate::claim::CAS_ROUNDS;
use crate::control::Registration;
use crate::dlq::reason;
use crate::events;
use crate::outcome::{Decision, Outcome, Stop, decide};
use crate::supervise::{Look, look};

/// How long a finished attempt keeps trying to write its outcome (holding the lease meanwhile)
/// while the bucket is unavailable, e.g. during a leader election, before it leaves the task
/// to redelivery, which would run it again.
const FINAL_WRITE_PATIENCE: Duration = Duration::from_secs(60);
/// Longest pause between two tries of that write.
const FINAL_WRITE_RETRY_MAX: Duration = Duration::from_secs(2);

/// Settles a finished attempt: returns the decision it ended with.
pub(crate) async fn settle(
    d: &Delivery,
    mut held: Held,
    outcome: Outcome,
    control: &Registration,
) -> Decision {
    let w = &d.worker;
    let (attempt, max_attempts) = (held.record.attempt, held.record.max_attempts);
    let mut decision = decide(outcome, attempt, max_attempts, &w.config.retry);
    let mut dead_lettered = false;
    // Where a result too large for the record went, once it is stored.
    let mut stored: Option<PayloadRef> = None;
    loop {
        match &decision {
            Decision::Release => {
                tracing::warn!("attempt released without a write; the redelivery owns the task");
                return decision;
            }
            Decision::Withdraw => {
                tracing::info!("attempt stopped; the record already says why");
                return decision;
            }
            Decision::HandBack => {
                d.give_back(&mut held).await;
                return decision;
            }
            Decision::GiveUp { error, reason, .. } if !dead_lettered => {
                // The copy is stored before the record says so: a record never says
                // dead-lettered while the DLQ has nothing.
                if !d.dead_letter(reason, &error.to_string(), Some(&d.id)).await {
                    d.give_back(&mut held).await;
                    return Decision::HandBack;
                }
                dead_lettered = true;
            }
            Decision::Succeed(value)
                if stored.is_none() && payloads::json_size(value) > payloads::INLINE_MAX =>
            {
                match store_result(d, value).await {
                    Ok(reference) => stored = Some(reference),
                    Err(Unstored::TooLarge(error)) => {
                        let cause = claw_proto::Cause::Error;
                        decision = Decision::GiveUp { error, cause, reason: reason::NON_RETRYABLE };
                        continue;
                    }
                    Err(Unstored::Settled(Decision::HandBack)) => {
                        d.give_back(&mut held).await;
                        return Decision::HandBack;
                    }
                    Err(Unstored::Settled(instead)) => return instead,
                }
            }
            Decision::Succeed(_) | Decision::Retry { .. } | Decision::GiveUp { .. } => {}
            // A decision that no attempt ends with: nothing to write.
            _ => return decision,
        }
        match write_final(d, &mut held, &decision, stored.as_ref()).await {
            Written::Done => break,
            Written::Settled(Decision::HandBack) => {
                d.give_back(&mut held).await;
                return Decision::HandBack;
            }
            Written::Settled(instead) => return instead,
            Written::TooLarge(error) => {
                if matches!(decision, Decision::GiveUp { .. }) {
                    // Even the failure does not fit: nothing this attempt can write.
                    tracing::error!(%error, "the failed record is too large; releasing the task");
                    return Decision::Release;
                }
                // The outcome does not fit in a record: the task fails, saying so.
                tracing::warn!(%error, "the outcome is too large for the record");
                let cause = claw_proto::Cause::Error;
                decision = Decision::GiveUp { error, cause, reason: reason::NON_RETRYABLE };
            }
            Written::Paused => {
                // Paused as the handler finished: keep the outcome, and the lease, until the
                // task is resumed (then write it) or cancelled.
                tracing::info!("task paused with its outcome pending; holding it");
                if let Some(stop) = hold_paused(d, &mut held, control).await {
                    decision =
                        decide(Outcome::Stopped(stop), attempt, max_attempts, &w.config.retry);
                }
            }
        }
    }
    announce(d, &held.record, &decision).await;
    decision
}

/// Why a result was not stored.
enum Unstored {
    /// Larger than the payload cap: the task fails, saying so.
    TooLarge(TaskError),
    /// The bucket stayed unavailable: the delivery ends like an unwritable outcome.
    Settled(Decision),
}

/// Stores a result too large for the record in the `payloads` object store, retrying while the
/// bucket is unavailable under the same patience, and with the same lease, as the record write.
async fn store_result(d: &Delivery, value: &serde_json::Value) -> Result<PayloadRef, Unstored> {
    let w = &d.worker;
    let json = serde_json::to_vec(value).expect("a JSON value serializes");
    let patience = Instant::now() + FINAL_WRITE_PATIENCE;
    let lease_limit = w.ack_deadline * 2 / 3;
    let mut wait = Duration::from_millis(100);
    loop {
        let e = match w.payloads.put(&d.id, payloads::Part::Result, &json).await {
            Ok(reference) => return Ok(reference),
            Err(e @ payloads::Error::TooLarge { .. }) => {
                return Err(Unstored::TooLarge(TaskError::new(
                    "result_too_large",
                    e.to_string(),
                    false,
                )));
            }
            Err(e) => e,
        };
        if Instant::now() + wait > patience || w.contact.silence() > lease_limit {
            tracing::warn!(error = %e, "could not store the result; leaving the task to redelivery");
            return Err(Unstored::Settled(Decision::Release));
        }
        tracing::warn!(error = %e, ?wait, "cannot store the result yet; retrying");
        d.heartbeat().await;
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = w.hand_back.cancelled() => return Err(Unstored::Settled(Decision::HandBack)),
        }
        wait = (wait * 2).min(FINAL_WRITE_RETRY_MAX);
    }
}

/// What became of a terminal write ([`write_final`]).
enum Written {
    /// Written: `held` is the new record.
    Done,
    /// Not written, and not to be: the record moved on (`Withdraw`), the drain deadline passed
    /// (`HandBack`), or the task is left to redelivery (`Release`).
    Settled(Decision),
    /// Not written: the record is paused (with this attempt holding it).
    Paused,
    /// Not written: the record with this outcome would be larger than the bucket takes.
    TooLarge(TaskError),
}

/// The event of a written outcome: the new status, carrying the result or the error.
async fn announce(d: &Delivery, record: &TaskRecord, decision: &Decision) {
    let (client, js) = (&d.worker.client, &d.worker.js);
    match decision {
        Decision::Succeed(_) => {
            tracing::info!("attempt succeeded");
            events::ending(js, record).await;
        }
        Decision::Retry { error, delay, .. } => {
            tracing::info!(%error, ?delay, "attempt failed; will retry");
            events::status(client, record).await;
        }
        Decision::GiveUp { error, reason, .. } => {
            tracing::warn!(%error, reason, "task failed and dead-lettered");
            events::ending(js, record).await;
        }
        _ => {}
    }
}

/// Waits, heartbeating, while the record says paused; `None` once it is running again, else
/// why the attempt ends instead.
async fn hold_paused(d: &Delivery, held: &mut Held, control: &Registration) -> Option<Stop> {
    let w = &d.worker;
    let beat = w.ack_deadline / 3;
    let mut heartbeat = tokio::time::interval_at(Instant::now() + beat, beat);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = heartbeat.tick() => d.heartbeat().await,
            () = control.woken() => {}
            () = w.hand_back.cancelled() => return Some(Stop::Shutdown),
        }
        match look(d, held).await {
            Look::Run => return None,
            Look::Stop(stop) => return Some(stop),
            Look::Pause | Look::Unknown => {}
        }
    }
}

/// Compare-and-set-writes the decision's transition on the revision this attempt holds,
/// following newer revisions of its own record. While the bucket is unavailable (a leader
/// election) it keeps trying, and keeps the lease, for up to [`FINAL_WRITE_PATIENCE`]: giving
/// up means redelivery, and redelivery means running the task again.
async fn write_final(
    d: &Delivery,
    held: &mut Held,
    decision: &Decision,
    stored: Option<&PayloadRef>,
) -> Written {
    let w = &d.worker;
    let patience = Instant::now() + FINAL_WRITE_PATIENCE;
    let lease_limit = w.ack_deadline * 2 / 3;
    let mut wait = Duration::from_millis(100);
    let mut conflicts = 0;
    // Set after a conflict: the record is read again before the next write.
    let mut stale = false;
    loop {
        let failure = if stale {
            match w.records.read(&d.id).await {
                Ok(Some(fresh)) if same_attempt(&fresh.record, &held.record) => {
                    *held = Held { record: fresh.record, revision: fresh.revision };
                    stale = false;
                    continue;
                }
                Ok(Some(_)) => {
                    tracing::info!("another attempt took the task over; dropping this outcome");
                    return Written::Settled(Decision::Release);
                }
                Ok(None) | Err(records::Error::Corrupt(_)) => {
                    tracing::warn!(
                        "the record is gone or unreadable; leaving the task to redelivery"
                    );
                    return Written::Settled(Decision::Release);
                }
                Err(e) => e,
            }
        } else {
            let mut next = held.record.clone();
            let now = now();
            let moved = match decision {
                Decision::Succeed(value) => match stored {
                    Some(reference) => next.succeed_stored(reference.clone(), now),
                    None => next.succeed(value.clone(), now),
                },
                Decision::Retry { error, cause, .. } => next.retry_later(error.clone(), *cause),
                Decision::GiveUp { error, cause, .. } => next.fail(error.clone(), *cause, now),
                _ => return Written::Settled(decision.clone()),
            };
            if let Err(illegal) = moved {
                if held.record.paused_while_running() {
                    return Written::Paused;
                }
                // Moved by someone else while it ran (a user's cancel, maybe already
                // retried): the message is of no further use, whatever the new state.
                tracing::info!(%illegal, "the record moved on while the attempt ran");
                return Written::Settled(Decision::Withdraw);
            }
            match w.records.update(&next, held.revision).await {
                Ok(revision) => {
                    *held = Held { record: next, revision };
                    return Written::Done;
                }
                Err(records::Error::Conflict) => {
                    conflicts += 1;
                    if conflicts >= CAS_ROUNDS {
                        tracing::warn!("the record keeps changing; leaving the task to redelivery");
                        return Written::Settled(Decision::Release);
                    }
                    stale = true;
                    continue;
                }
                Err(e @ records::Error::TooLarge { .. }) => {
                    let error = TaskError::new("result_too_large", e.to_string(), false);
                    return Written::TooLarge(error);
                }
                Err(e) => e,
            }
        };
        // JetStream did not answer or refused for now: keep the message and try again.
        if Instant::now() + wait > patience || w.contact.silence() > lease_limit {
            tracing::warn!(error = %failure, "could not record the outcome; leaving the task to redelivery");
            return Written::Settled(Decision::Release);
        }
        tracing::warn!(error = %failure, ?wait, "cannot record the outcome yet; retrying");
        d.heartbeat().await;
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = w.hand_back.cancelled() => {
                tracing::warn!("drain deadline passed with the outcome unrecorded; handing it back");
                return Written::Settled(Decision::HandBack);
            }
        }
        wait = (wait * 2).min(FINAL_WRITE_RETRY_MAX);
    }
}
