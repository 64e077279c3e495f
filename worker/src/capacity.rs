//! The worker's total: at most `max_concurrent` attempts at once, whatever their class. Every
//! attempt holds a [`Slot`], which is a permit of its class's pool ([`crate::sizing::Slots`])
//! *and* one of the worker's [`Total`], so however the pools are sized their running attempts
//! never add up to more than the total.
//!
//! A pool's pull loop takes its own permit first and only then waits for one of the total: a
//! pool whose slots are all busy never sits on a permit of the total that the other pool could
//! use. It counts free slots in such pairs, so it never fetches more messages than it can start
//! at once ([`crate::pool`]). The total is a tokio semaphore, which serves waiters first come,
//! first served: when both pools wait for it, the slots that come free go to them in turn.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::sizing::Slots;

/// The worker-wide limit on running attempts (`max_concurrent`).
#[derive(Debug)]
pub struct Total {
    sem: Arc<Semaphore>,
    max: usize,
    /// Slots held, both classes: what the status reports as busy.
    busy: AtomicUsize,
}

/// What the status endpoint shows of the total.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TotalStatus {
    pub max: usize,
    pub busy: usize,
}

/// One attempt's place on the worker: a slot of its class's pool and one of the total, given
/// back when dropped.
#[derive(Debug)]
pub struct Slot {
    /// `None` once retired: the pool shrank and the permit was forgotten.
    pool: Option<OwnedSemaphorePermit>,
    _total: OwnedSemaphorePermit,
    slots: Arc<Slots>,
    worker: Arc<Total>,
}

impl Total {
    pub fn new(max: usize) -> Arc<Total> {
        Arc::new(Total { sem: Arc::new(Semaphore::new(max)), max, busy: AtomicUsize::new(0) })
    }

    pub fn status(&self) -> TotalStatus {
        TotalStatus { max: self.max, busy: self.busy.load(Ordering::Relaxed) }
    }

    /// Waits for a slot of `pool`, then for one of the total. `None` only if a semaphore was
    /// closed, which none ever is.
    pub async fn slot(self: &Arc<Self>, pool: &Arc<Slots>) -> Option<Slot> {
        let permit = pool.semaphore().acquire_owned().await.ok()?;
        let total = self.sem.clone().acquire_owned().await.ok()?;
        Some(Slot::new(permit, total, pool, self))
    }

    /// A slot of `pool` and one of the total if both are free now.
    pub fn try_slot(self: &Arc<Self>, pool: &Arc<Slots>) -> Option<Slot> {
        let permit = pool.semaphore().try_acquire_owned().ok()?;
        let total = self.sem.clone().try_acquire_owned().ok()?;
        Some(Slot::new(permit, total, pool, self))
    }
}

impl Slot {
    fn new(
        pool: OwnedSemaphorePermit,
        total: OwnedSemaphorePermit,
        slots: &Arc<Slots>,
        worker: &Arc<Total>,
    ) -> Slot {
        slots.occupy();
        worker.busy.fetch_add(1, Ordering::Relaxed);
        Slot { pool: Some(pool), _total: total, slots: slots.clone(), worker: worker.clone() }
    }

    /// Gives the total's permit back and forgets the pool's: the pool is one slot smaller.
    pub fn retire(mut self) {
        if let Some(permit) = self.pool.take() {
            permit.forget();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.vacate();
        self.worker.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use claw_proto::Class;

    use super::*;

    #[tokio::test]
    async fn the_pools_together_never_hold_more_than_the_total() {
        let total = Total::new(3);
        let short = Slots::new(Class::Short, 3, 3);
        let long = Slots::new(Class::Long, 3, 3);
        let mut held: Vec<Slot> = (0..2).map(|_| total.try_slot(&short).unwrap()).collect();
        held.push(total.try_slot(&long).unwrap());
        // Each pool has a free slot of its own, but the total is used up.
        assert!(total.try_slot(&short).is_none());
        assert!(total.try_slot(&long).is_none());
        // A refused try gives the pool's permit back at once.
        assert_eq!((short.status().size, short.semaphore().available_permits()), (3, 1));
        assert_eq!(total.status(), TotalStatus { max: 3, busy: 3 });
        assert_eq!((short.status().busy, long.status().busy), (2, 1));

        // A waiting pool gets the next slot that comes free, whichever class it was.
        let waiting = tokio::spawn({
            let (total, long) = (total.clone(), long.clone());
            async move { total.slot(&long).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(held.remove(0));
        let slot = tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!((short.status().busy, long.status().busy, total.status().busy), (1, 2, 3));

        // Retiring a slot shrinks its pool and frees a place in the total.
        slot.retire();
        assert_eq!(long.semaphore().available_permits(), 1);
        assert_eq!(total.status().busy, 2);
        assert!(total.try_slot(&short).is_some());
    }
}
