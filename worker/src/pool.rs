//! A class's pool: a named semaphore of slots and the pull loop that fills them from the class's
//! three lanes.
//!
//! The loop never holds more messages than free slots: it waits for a free slot, counts the free
//! slots n, and sweeps the lanes high → normal → low with no-wait fetches of at most the slots
//! still free (a prefetched message would age toward its ack deadline while it waits, and starve
//! other workers). A free slot is one of the pool's and one of the worker's total together
//! ([`crate::capacity`]): with the other class holding the rest of the total, a pool with slots
//! of its own to spare still fetches only what the total lets it start. While the worker is
//! over its memory cap ([`crate::memory`]) the loop fetches nothing at all.
//!
//! When a sweep finds nothing, the loop sleeps until a publish to the class rings the doorbell
//! (a core subscription to `tasks.<class>.*`), or [`IDLE_RESWEEP`] passes, which catches what
//! a publish does not announce: NAK-delayed retries and redeliveries.
//!
//! A resume of a lane publishes no task; the gateway rings `claw.doorbell.<class>` instead
//! ([`topology::doorbell_subject`]), which the pool listens to all along (it is rung only then).
//!
//! The doorbell is a copy of every task message, so it is only subscribed while it can help:
//! from the first empty sweep (followed by one more sweep, for what was published before the
//! subscription took effect) until a sweep fills every free slot. A saturated pool waits for
//! slots, not for publishes, and does not pay for a second delivery of each task.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use claw_proto::Class;
use claw_proto::topology::{self, Lane, Topology};
use futures::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

use crate::Error;
use crate::attempt::{self, Worker};
use crate::capacity::{Slot, Total};
use crate::memory::MemoryCap;
use crate::sizing::{self, Slots};

/// A lower lane that was passed over this many sweeps in a row, while higher lanes took every
/// free slot, goes first in the next sweep. 16 keeps strict priority for any burst that clears
/// within a few seconds, yet bounds a low task's wait under a sustained high load to about one
/// slot's worth of work in every 17.
pub const STARVATION_SWEEPS: u32 = 16;

/// Re-sweep after this long without a doorbell: the latency bound for retries and redeliveries
/// on an idle worker, at the cost of three empty fetches per second per class.
pub const IDLE_RESWEEP: Duration = Duration::from_secs(1);

/// How long a no-wait fetch may go without its next message or end before it is given up. The
/// server answers one at once; this only ends a request that was lost with a consumer leader.
/// Messages that still arrive for it later come back after the ack deadline.
pub const FETCH_ANSWER: Duration = Duration::from_secs(5);

/// One class's pull loop.
pub(crate) struct Pool {
    class: Class,
    worker: Arc<Worker>,
    /// The class's slots: one permit per running attempt; resized by [`crate::sizing`].
    slots: Arc<Slots>,
    /// The worker's total, which every attempt needs a place in besides its pool's slot.
    total: Arc<Total>,
    /// The worker's memory cap: over it, nothing is pulled.
    memory: Arc<MemoryCap>,
    lanes: [(Lane, PullConsumer); 3],
    doorbell: Arc<Notify>,
    /// The task draining the doorbell subscription while there is one; dropping it
    /// unsubscribes.
    ringer: Option<AbortOnDropHandle<()>>,
    /// Consecutive sweeps each lane (high, normal, low) was passed over while it may have had
    /// messages.
    skipped: [u32; 3],
    /// Whether each lane may hold messages: its last fetch was full, or it was never fetched.
    maybe_pending: [bool; 3],
}

impl Pool {
    pub(crate) async fn new(
        worker: Arc<Worker>,
        topology: &Topology,
        class: Class,
        total: Arc<Total>,
        memory: Arc<MemoryCap>,
    ) -> Result<Pool, Error> {
        let (min, max) = worker.config.pool_range(class);
        let mut lanes = Vec::with_capacity(3);
        for lane in Lane::of_class(class) {
            lanes.push((lane, topology.lane_consumer(lane).await?));
        }
        let lanes: [(Lane, PullConsumer); 3] = lanes.try_into().map_err(|_| {
            Error::Config("a class has exactly three lanes".into()) // unreachable by construction
        })?;
        let doorbell = Arc::new(Notify::new());
        Ok(Pool {
            class,
            worker,
            slots: Slots::new(class, min, max),
            total,
            memory,
            lanes,
            doorbell,
            ringer: None,
            skipped: [0; 3],
            maybe_pending: [true; 3],
        })
    }

    /// The pool's slots, for the status endpoint.
    pub(crate) fn slots(&self) -> Arc<Slots> {
        self.slots.clone()
    }

    /// Pulls until `shutdown`; attempts are spawned on `tracker` and outlive the loop. The
    /// sizer runs alongside and stops with the loop.
    pub(crate) async fn run(mut self, tracker: TaskTracker, shutdown: CancellationToken) {
        let status = self.slots.status();
        tracing::info!(class = %self.class, size = status.size, min = status.min, max = status.max, "pool started");
        let lanes = self.lanes.iter().map(|(_, c)| c.clone()).collect();
        let config = &self.worker.config;
        let (interval, soft_mb) = (config.sizing.interval(), config.memory_soft_mb());
        let sizer = sizing::run(self.slots.clone(), lanes, interval, soft_mb);
        let _sizer = AbortOnDropHandle::new(tokio::spawn(sizer));
        let _resumes = self.listen_for_resumes().await;
        loop {
            // Over the memory cap: take nothing new until the worker is below it again.
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.memory.below_cap() => {}
            }
            let first = tokio::select! {
                () = shutdown.cancelled() => break,
                slot = self.total.slot(&self.slots) => match slot {
                    Some(slot) => slot,
                    None => break, // never closed
                },
            };
            let mut free = vec![first];
            while let Some(slot) = self.total.try_slot(&self.slots) {
                free.push(slot);
            }
            // A shrinking pool retires the slots that came back; with none left, wait again.
            self.slots.trim(&mut free);
            if free.is_empty() || self.memory.is_over() {
                continue;
            }
            let n_free = free.len();
            let started = self.sweep(&mut free, &tracker).await;
            drop(free);
            if started == n_free {
                // Saturated: the next wait is for a slot, and a doorbell would be wasted.
                self.ringer = None;
            } else if started == 0 {
                if self.ringer.is_none() && self.listen().await {
                    // Sweep once more now that it listens: a publish between the empty fetches
                    // and the subscription rang no bell.
                    continue;
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = self.doorbell.notified() => {}
                    () = tokio::time::sleep(IDLE_RESWEEP) => {}
                }
            }
        }
        tracing::info!(class = %self.class, "pool stopped pulling");
    }

    /// Rings the doorbell whenever a lane of the class is resumed; `None` if the subscription
    /// failed (then a resumed lane is found at the next [`IDLE_RESWEEP`]).
    async fn listen_for_resumes(&self) -> Option<AbortOnDropHandle<()>> {
        self.ring_on(topology::doorbell_subject(self.class)).await
    }

    /// Subscribes the doorbell to the class's lanes; false if that failed. Without it the pool
    /// still finds every message, within [`IDLE_RESWEEP`].
    async fn listen(&mut self) -> bool {
        self.ringer = self.ring_on(topology::class_subjects(self.class)).await;
        self.ringer.is_some()
    }

    /// A task ringing the doorbell for every message on `subject` until it is dropped; `None`
    /// (logged) if the subscription failed.
    async fn ring_on(&self, subject: String) -> Option<AbortOnDropHandle<()>> {
        let mut sub = match self.worker.client.subscribe(subject.clone()).await {
            Ok(sub) => sub,
            Err(e) => {
                tracing::warn!(%subject, error = %e, "doorbell not subscribed; polling instead");
                return None;
            }
        };
        let ring = self.doorbell.clone();
        // Drained continuously so the subscription never backs up; `notify_one` stores one
        // wake-up when nobody waits, so a publish during a sweep is not lost.
        Some(AbortOnDropHandle::new(tokio::spawn(async move {
            while sub.next().await.is_some() {
                ring.notify_one();
            }
        })))
    }

    /// One sweep over the lanes with `free.len()` free slots; returns the attempts started.
    async fn sweep(&mut self, free: &mut Vec<Slot>, tracker: &TaskTracker) -> usize {
        let mut reached = [false; 3];
        let mut started = 0;
        for i in sweep_order(&self.skipped) {
            if free.is_empty() {
                break;
            }
            reached[i] = true;
            let (lane, consumer) = &self.lanes[i];
            let wanted = free.len();
            let mut batch = match consumer.fetch().max_messages(wanted).messages().await {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!(lane = %lane.consumer(), error = %e, "fetch failed");
                    continue;
                }
            };
            let mut got = 0;
            loop {
                // A no-wait fetch is answered at once; one whose request was lost (the
                // consumer's leader died with it) would otherwise be waited for forever.
                let msg = match tokio::time::timeout(FETCH_ANSWER, batch.next()).await {
                    Ok(Some(Ok(msg))) => msg,
                    Ok(None) => break,
                    Ok(Some(Err(e))) => {
                        tracing::warn!(lane = %lane.consumer(), error = %e, "fetch ended early");
                        break;
                    }
                    Err(_) => {
                        tracing::warn!(lane = %lane.consumer(), "fetch unanswered; pulling again");
                        break;
                    }
                };
                let Some(slot) = free.pop() else {
                    // The server never sends more than asked; if it did, the message simply
                    // waits for its ack deadline.
                    break;
                };
                got += 1;
                tracker.spawn(attempt::handle(self.worker.clone(), *lane, msg, slot));
            }
            self.maybe_pending[i] = got == wanted;
            started += got;
        }
        self.skipped = next_skips(self.skipped, reached, self.maybe_pending);
        started
    }
}

/// The order of the next sweep: high, normal, low — except that a lane passed over
/// [`STARVATION_SWEEPS`] times goes first (the most starved one; ties favour higher priority).
pub fn sweep_order(skipped: &[u32; 3]) -> [usize; 3] {
    let starving = (0..3)
        .filter(|&i| skipped[i] >= STARVATION_SWEEPS)
        .max_by_key(|&i| (skipped[i], std::cmp::Reverse(i)));
    match starving {
        Some(0) | None => [0, 1, 2],
        Some(1) => [1, 0, 2],
        Some(_) => [2, 0, 1],
    }
}

/// The skip counts after a sweep: a lane that was fetched from starts over; one the sweep did
/// not reach counts up if it may hold messages.
pub fn next_skips(skipped: [u32; 3], reached: [bool; 3], maybe_pending: [bool; 3]) -> [u32; 3] {
    std::array::from_fn(|i| match (reached[i], maybe_pending[i]) {
        (true, _) | (false, false) => 0,
        (false, true) => skipped[i].saturating_add(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates sweeps with `slots` free slots over lanes holding `queued` messages; returns
    /// the lane index of every message taken, in order.
    fn simulate(mut queued: [usize; 3], slots: usize, sweeps: usize) -> Vec<usize> {
        let (mut skipped, mut maybe) = ([0; 3], [true; 3]);
        let mut taken = Vec::new();
        for _ in 0..sweeps {
            let mut free = slots;
            let mut reached = [false; 3];
            for i in sweep_order(&skipped) {
                if free == 0 {
                    break;
                }
                reached[i] = true;
                let wanted = free;
                let got = queued[i].min(wanted);
                queued[i] -= got;
                free -= got;
                maybe[i] = got == wanted;
                taken.extend(std::iter::repeat_n(i, got));
            }
            skipped = next_skips(skipped, reached, maybe);
        }
        taken
    }

    #[test]
    fn high_goes_before_low() {
        // One slot, 20 low then 5 high queued: the 5 high run first.
        let taken = simulate([5, 0, 20], 1, 25);
        assert_eq!(&taken[..5], &[0; 5]);
        assert_eq!(taken.len(), 25);
    }

    #[test]
    fn low_is_not_starved_forever() {
        let taken = simulate([1000, 0, 1000], 1, 100);
        let first_low = taken.iter().position(|&l| l == 2).expect("low ran");
        // The never-fetched normal lane gets its one look first, then low.
        assert!(first_low <= STARVATION_SWEEPS as usize + 2, "first low at {first_low}");
        let lows = taken.iter().filter(|&&l| l == 2).count();
        assert!((4..=7).contains(&lows), "{lows} low of 100");
    }

    #[test]
    fn starving_lane_goes_first_once() {
        assert_eq!(sweep_order(&[0, 0, 0]), [0, 1, 2]);
        assert_eq!(sweep_order(&[0, 3, 15]), [0, 1, 2]);
        assert_eq!(sweep_order(&[0, 3, 16]), [2, 0, 1]);
        assert_eq!(sweep_order(&[0, 16, 16]), [1, 0, 2]);
        let after = next_skips([0, 0, 16], [false, false, true], [true, true, true]);
        assert_eq!(after, [1, 1, 0]);
        assert_eq!(sweep_order(&after), [0, 1, 2]);
    }

    #[test]
    fn empty_lanes_do_not_count_as_starved() {
        assert_eq!(next_skips([5, 5, 5], [true, false, false], [true, false, true]), [0, 0, 6]);
    }
}
