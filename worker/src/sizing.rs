//! Dynamic pool sizing: a pool's slots are the permits of a semaphore whose size moves between
//! the pool's min and max. Every `[sizing] interval_s` the sizer reads the backlog of the
//! pool's three lanes (their consumers' `num_pending`: messages no worker has taken yet, shared
//! by every worker on those consumers) and the worker's resident memory, and sets a target
//! ([`target`]). Growing adds permits at once; shrinking forgets permits as they are free — at
//! the sizer's look, or when the pull loop gets them back — so a running attempt is never
//! stopped to shrink a pool.
//!
//! A pool's slots are its own share; every attempt also needs one of the worker's total
//! (`max_concurrent`, [`crate::capacity`]), so a pool at its max may still wait for the other
//! class to give a slot back.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use claw_proto::Class;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::capacity::Slot;

/// How long a consumer-info request may take before the sizer skips that look.
const INFO_TIMEOUT: Duration = Duration::from_secs(2);

/// A pool's slots: a semaphore and the number of permits it should have.
#[derive(Debug)]
pub struct Slots {
    pub class: Class,
    pub min: usize,
    pub max: usize,
    sem: Arc<Semaphore>,
    /// `(size, target)`: permits that exist (free or held), and how many there should be.
    state: Mutex<(usize, usize)>,
    /// The lanes' backlog at the last look.
    backlog: AtomicU64,
    /// Slots held with one of the total too ([`Slot`]): attempts running, and for the moment of
    /// a fetch the slots the pull loop is filling. A permit the loop holds while it waits for
    /// the total is not busy.
    occupied: AtomicUsize,
}

/// What the status endpoint shows of a pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PoolStatus {
    pub size: usize,
    pub busy: usize,
    pub min: usize,
    pub max: usize,
    pub backlog: u64,
}

impl Slots {
    /// A pool starting at `min` slots (at least one, so a pool never waits for the sizer to
    /// take its first task).
    pub fn new(class: Class, min: usize, max: usize) -> Arc<Slots> {
        let start = min.max(1).min(max);
        Arc::new(Slots {
            class,
            min,
            max,
            sem: Arc::new(Semaphore::new(start)),
            state: Mutex::new((start, start)),
            backlog: AtomicU64::new(0),
            occupied: AtomicUsize::new(0),
        })
    }

    pub fn semaphore(&self) -> Arc<Semaphore> {
        self.sem.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, usize)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn status(&self) -> PoolStatus {
        let (size, _) = *self.lock();
        PoolStatus {
            size,
            busy: self.occupied.load(Ordering::Relaxed),
            min: self.min,
            max: self.max,
            backlog: self.backlog.load(Ordering::Relaxed),
        }
    }

    /// Sets the target (clamped to min..=max): grows at once, shrinks by the free permits now
    /// and the rest as they come back ([`Slots::trim`]).
    pub fn resize(&self, target: usize) {
        let target = target.clamp(self.min, self.max);
        let mut state = self.lock();
        state.1 = target;
        if target > state.0 {
            self.sem.add_permits(target - state.0);
            state.0 = target;
        }
        while state.0 > target {
            match self.sem.try_acquire() {
                Ok(permit) => {
                    permit.forget();
                    state.0 -= 1;
                }
                Err(_) => break,
            }
        }
    }

    /// Retires slots the pull loop just got while the pool is above its target.
    pub fn trim(&self, slots: &mut Vec<Slot>) {
        let mut state = self.lock();
        while state.0 > state.1 {
            let Some(slot) = slots.pop() else { break };
            slot.retire();
            state.0 -= 1;
        }
    }

    pub(crate) fn occupy(&self) {
        self.occupied.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn vacate(&self) {
        self.occupied.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The slot count a pool of `size` slots, `busy` of them running, should have with `backlog`
/// messages waiting: what is running plus what waits, within `min..=max`. Above the memory soft
/// limit it never grows, and shrinks to what is running.
pub fn target(size: usize, busy: usize, backlog: u64, min: usize, max: usize, over: bool) -> usize {
    let want = busy.saturating_add(usize::try_from(backlog).unwrap_or(usize::MAX));
    let want = if over { want.min(size).min(busy) } else { want };
    want.clamp(min, max)
}

/// The resident set size of this process, from `/proc/self/status` (0 if unknown).
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Resizes `slots` from its lanes' backlog and the memory (no growth above `soft_mb` of RSS; 0:
/// no such rule), every `interval`, forever (the pool aborts it when it stops).
pub async fn run(
    slots: Arc<Slots>,
    mut lanes: Vec<PullConsumer>,
    interval: Duration,
    soft_mb: u64,
) {
    let soft = soft_mb.saturating_mul(1024 * 1024);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut backlog = 0;
        let mut known = true;
        for consumer in &mut lanes {
            match tokio::time::timeout(INFO_TIMEOUT, consumer.info()).await {
                Ok(Ok(info)) => backlog += info.num_pending,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "consumer info failed; sizing skipped");
                    known = false;
                }
                Err(_) => known = false,
            }
        }
        if !known {
            continue;
        }
        slots.backlog.store(backlog, Ordering::Relaxed);
        let rss = rss_bytes();
        let over = soft > 0 && rss > soft;
        let now = slots.status();
        let next = target(now.size, now.busy, backlog, slots.min, slots.max, over);
        if next != now.size {
            tracing::info!(
                class = %slots.class, from = now.size, to = next, busy = now.busy, backlog,
                rss_mb = rss / (1024 * 1024), over_memory = over, "resizing pool"
            );
        }
        slots.resize(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_follows_backlog_and_memory() {
        // Idle: the min. A backlog: running + waiting, capped at max.
        assert_eq!(target(5, 0, 0, 2, 10, false), 2);
        assert_eq!(target(2, 2, 200, 2, 10, false), 10);
        assert_eq!(target(2, 2, 3, 2, 10, false), 5);
        // Busy, nothing waiting: keep what runs.
        assert_eq!(target(10, 7, 0, 2, 10, false), 7);
        // Over the memory soft limit: no growth, shrink toward what runs, never below min.
        assert_eq!(target(4, 4, 200, 2, 10, true), 4);
        assert_eq!(target(8, 3, 200, 2, 10, true), 3);
        assert_eq!(target(8, 0, 200, 2, 10, true), 2);
    }

    #[tokio::test]
    async fn shrinking_forgets_permits_as_they_come_back() {
        let slots = Slots::new(Class::Long, 2, 10);
        assert_eq!(slots.status().size, 2);
        slots.resize(10);
        assert_eq!(slots.semaphore().available_permits(), 10);
        let total = crate::capacity::Total::new(10);
        let mut held: Vec<_> = (0..6).map(|_| total.try_slot(&slots).unwrap()).collect();
        slots.resize(0); // clamped to min 2; 4 free permits go at once
        let s = slots.status();
        assert_eq!((s.size, s.busy), (6, 6));
        slots.trim(&mut held);
        assert_eq!((slots.status().size, held.len()), (2, 2));
        drop(held);
        assert_eq!(slots.semaphore().available_permits(), 2);
        assert_eq!((slots.status().busy, total.status().busy), (0, 0));
    }

    #[test]
    fn rss_is_read() {
        assert!(rss_bytes() > 0);
    }
}
