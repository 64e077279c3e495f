//! Control wake-ups: the gateway changes a task's record (cancel, pause, resume) and then
//! publishes `Control {id, verb}` on `claw.control.<id>`; this module routes each such message
//! to the attempts of this worker that run the task, which then re-read their record.
//!
//! The message carries no authority: the record is the truth, and the verb is not even looked
//! at. A lost wake-up (core NATS, at most once) only delays the reaction until the attempt's
//! next periodic look at its record, one heartbeat later. That is why one plain subscription per
//! worker process is enough, and why a message for a task this worker does not run is dropped.
//!
//! The same registry is how the worker's own limits reach an attempt: the memory watchdog
//! ([`crate::memory`]) picks the largest attempt whose handler runs in this process, marks it
//! with the [`Limit`] it is stopped for, and wakes it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::Client;
use claw_proto::TaskId;
use claw_proto::api::Control;
use claw_proto::topology;
use futures::StreamExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use crate::Error;
use crate::handler::Context;
use crate::outcome::Limit;

/// The attempts running on this worker, by task id. A task normally has one; two only in the
/// moment a redelivery of a task starts here while its stale attempt is still stopping.
#[derive(Debug, Default)]
pub(crate) struct Controls {
    // A std mutex: lookups and inserts are tiny and never cross an await.
    running: Mutex<HashMap<TaskId, Vec<Arc<Attempt>>>>,
}

/// One attempt in [`Controls`]: its wake-up, and what the worker's own limits know of it.
#[derive(Debug, Default)]
pub(crate) struct Attempt {
    wake: Notify,
    // Std mutexes for the same reason as the map's.
    /// Set while its handler runs in this process (not in a child, not a program of its own):
    /// the only attempts whose memory is the worker's.
    in_process: Mutex<Option<InProcess>>,
    /// The worker-wide limit it is to stop for, once one chose it.
    limit: Mutex<Option<Limit>>,
}

#[derive(Clone, Debug)]
struct InProcess {
    started: Instant,
    /// What its handler reports holding ([`Context::report_memory`]).
    memory: Arc<AtomicU64>,
}

/// An attempt's entry in [`Controls`]; removed when dropped, however the attempt ends.
#[derive(Debug)]
pub(crate) struct Registration {
    controls: Arc<Controls>,
    id: TaskId,
    attempt: Arc<Attempt>,
}

impl Controls {
    /// Registers an attempt of `id`. Wake-ups that arrive before the attempt waits are kept
    /// (one `Notify` permit), so registering before the record is claimed loses none.
    pub(crate) fn register(self: &Arc<Self>, id: &TaskId) -> Registration {
        let attempt = Arc::new(Attempt::default());
        self.lock().entry(id.clone()).or_default().push(attempt.clone());
        Registration { controls: self.clone(), id: id.clone(), attempt }
    }

    /// Wakes every attempt of `id` on this worker; false when there is none.
    pub(crate) fn wake(&self, id: &TaskId) -> bool {
        let running = self.lock();
        let Some(attempts) = running.get(id) else { return false };
        attempts.iter().for_each(|a| a.wake.notify_one());
        true
    }

    /// The largest attempt whose handler runs in this process and that no limit chose yet:
    /// the most memory its handler reports, and among equals (most report nothing) the one
    /// started last, which has the least work to lose.
    pub(crate) fn largest_in_process(&self) -> Option<(TaskId, Arc<Attempt>)> {
        let running = self.lock();
        running
            .iter()
            .flat_map(|(id, attempts)| attempts.iter().map(move |a| (id, a)))
            .filter(|(_, a)| a.chosen().is_none())
            .filter_map(|(id, a)| {
                let p = lock(&a.in_process).clone()?;
                Some(((p.memory.load(Ordering::Relaxed), p.started), id, a))
            })
            .max_by_key(|(size, _, _)| *size)
            .map(|(_, id, a)| (id.clone(), a.clone()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, Vec<Arc<Attempt>>>> {
        // A poisoned lock only means a panic between two map operations; the map is still whole.
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Attempt {
    /// Whether its handler still runs in this process.
    pub(crate) fn runs_in_process(&self) -> bool {
        lock(&self.in_process).is_some()
    }

    /// Chooses it to stop for `limit`, and wakes it to do so.
    pub(crate) fn stop_for(&self, limit: Limit) {
        *lock(&self.limit) = Some(limit);
        self.wake.notify_one();
    }

    fn chosen(&self) -> Option<Limit> {
        *lock(&self.limit)
    }
}

impl Registration {
    /// Resolves at the next wake-up (or at once if one came since the last).
    pub(crate) async fn woken(&self) {
        self.attempt.wake.notified().await
    }

    /// The worker-wide limit this attempt was chosen to stop for, if any.
    pub(crate) fn limit(&self) -> Option<Limit> {
        self.attempt.chosen()
    }

    /// Its handler now runs in this process, reporting its memory into `ctx`.
    pub(crate) fn runs_in_process(&self, ctx: &Context) {
        let running = InProcess { started: Instant::now(), memory: ctx.memory_report() };
        *lock(&self.attempt.in_process) = Some(running);
    }

    /// Its handler returned (or was aborted): its memory is given back.
    pub(crate) fn handler_ended(&self) {
        *lock(&self.attempt.in_process) = None;
    }
}

/// A poisoned lock only means a panic between two assignments of a plain value; it is whole.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut running = self.controls.lock();
        if let Some(attempts) = running.get_mut(&self.id) {
            attempts.retain(|a| !Arc::ptr_eq(a, &self.attempt));
            if attempts.is_empty() {
                running.remove(&self.id);
            }
        }
    }
}

/// Subscribes to every task's control subject and routes the wake-ups into `controls` until
/// the returned handle is dropped. The subscription is made before this returns, so no
/// attempt can start before it.
pub(crate) async fn listen(
    client: &Client,
    controls: Arc<Controls>,
) -> Result<AbortOnDropHandle<()>, Error> {
    let mut sub = client
        .subscribe(topology::CONTROL_ALL)
        .await
        .map_err(|e| Error::nats(format!("subscribe {}", topology::CONTROL_ALL), e))?;
    Ok(AbortOnDropHandle::new(tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            // The id is read from the payload, not the subject, so there is one parser of the
            // contract; a malformed message wakes nobody.
            match serde_json::from_slice::<Control>(&msg.payload) {
                Ok(control) => {
                    let here = controls.wake(&control.id);
                    tracing::debug!(task_id = %control.id, verb = control.verb.as_str(), here,
                        "control wake-up");
                }
                Err(e) => {
                    tracing::debug!(error = %e, subject = %msg.subject, "bad control message")
                }
            }
        }
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wake_ups_reach_registered_attempts_and_are_kept_until_awaited() {
        let controls = Arc::new(Controls::default());
        let id = TaskId::parse("t1").unwrap();
        assert!(!controls.wake(&id));
        let first = controls.register(&id);
        let second = controls.register(&id);
        assert!(controls.wake(&id));
        // Both got the permit although neither was waiting yet.
        tokio::time::timeout(std::time::Duration::from_secs(1), first.woken()).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), second.woken()).await.unwrap();
        drop(first);
        assert!(controls.wake(&id));
        drop(second);
        assert!(!controls.wake(&id));
        assert!(controls.lock().is_empty());
    }

    #[tokio::test]
    async fn the_largest_in_process_attempt_is_chosen_once() {
        let controls = Arc::new(Controls::default());
        let (a, b, c) =
            (TaskId::parse("a").unwrap(), TaskId::parse("b").unwrap(), TaskId::parse("c").unwrap());
        let (ra, rb, rc) = (controls.register(&a), controls.register(&b), controls.register(&c));
        // Registered but not running in-process (claiming, or in a child): never chosen.
        assert!(controls.largest_in_process().is_none());
        let (ca, cb) = (Context::new(Default::default()), Context::new(Default::default()));
        ra.runs_in_process(&ca);
        // Not a wait for anything: the two start times must differ for the order to be known.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        rb.runs_in_process(&cb);
        // Nothing reported: the one started last.
        assert_eq!(controls.largest_in_process().unwrap().0, b);
        // The one reporting the most, however old.
        ca.report_memory(64 << 20);
        cb.report_memory(1 << 20);
        let (id, chosen) = controls.largest_in_process().unwrap();
        assert_eq!(id, a);
        let limit = Limit::Memory { cap_mb: 100, rss_mb: 120 };
        chosen.stop_for(limit);
        assert_eq!(ra.limit(), Some(limit));
        tokio::time::timeout(std::time::Duration::from_secs(1), ra.woken()).await.unwrap();
        // Chosen once: the next choice is another attempt, and one that ended is none.
        assert_eq!(controls.largest_in_process().unwrap().0, b);
        rb.handler_ended();
        assert!(controls.largest_in_process().is_none());
        assert!(chosen.runs_in_process());
        ra.handler_ended();
        assert!(!chosen.runs_in_process());
        assert_eq!((rb.limit(), rc.limit()), (None, None));
    }
}
