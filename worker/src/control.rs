//! Control wake-ups: the gateway changes a task's record (cancel, pause, resume) and then
//! publishes `Control {id, verb}` on `claw.control.<id>`; this module routes each such message
//! to the attempts of this worker that run the task, which then re-read their record.
//!
//! The message carries no authority: the record is the truth, and the verb is not even looked
//! at. A lost wake-up (core NATS, at most once) only delays the reaction until the attempt's
//! next periodic look at its record, one heartbeat later. That is why one plain subscription per
//! worker process is enough, and why a message for a task this worker does not run is dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::Client;
use claw_proto::TaskId;
use claw_proto::api::Control;
use claw_proto::topology;
use futures::StreamExt;
use tokio::sync::Notify;
use tokio_util::task::AbortOnDropHandle;

use crate::Error;

/// The attempts running on this worker, by task id. A task normally has one; two only in the
/// moment a redelivery of a task starts here while its stale attempt is still stopping.
#[derive(Debug, Default)]
pub(crate) struct Controls {
    // A std mutex: lookups and inserts are tiny and never cross an await.
    running: Mutex<HashMap<TaskId, Vec<Arc<Notify>>>>,
}

/// An attempt's entry in [`Controls`]; removed when dropped, however the attempt ends.
#[derive(Debug)]
pub(crate) struct Registration {
    controls: Arc<Controls>,
    id: TaskId,
    wake: Arc<Notify>,
}

impl Controls {
    /// Registers an attempt of `id`. Wake-ups that arrive before the attempt waits are kept
    /// (one `Notify` permit), so registering before the record is claimed loses none.
    pub(crate) fn register(self: &Arc<Self>, id: &TaskId) -> Registration {
        let wake = Arc::new(Notify::new());
        self.lock().entry(id.clone()).or_default().push(wake.clone());
        Registration { controls: self.clone(), id: id.clone(), wake }
    }

    /// Wakes every attempt of `id` on this worker; false when there is none.
    pub(crate) fn wake(&self, id: &TaskId) -> bool {
        let running = self.lock();
        let Some(attempts) = running.get(id) else { return false };
        attempts.iter().for_each(|n| n.notify_one());
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, Vec<Arc<Notify>>>> {
        // A poisoned lock only means a panic between two map operations; the map is still whole.
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Registration {
    /// Resolves at the next wake-up (or at once if one came since the last).
    pub(crate) async fn woken(&self) {
        self.wake.notified().await
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut running = self.controls.lock();
        if let Some(attempts) = running.get_mut(&self.id) {
            attempts.retain(|n| !Arc::ptr_eq(n, &self.wake));
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
}
