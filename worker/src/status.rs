//! The worker's status over NATS: every worker answers requests on `claw.worker.status` (all
//! workers answer: gather the replies, e.g. `nats req claw.worker.status '' --replies 0`) and on
//! `claw.worker.<name>.status` (this worker only; `.`, `*`, `>` and spaces in the name become
//! `_`), with a JSON [`WorkerStatus`].

use std::collections::BTreeMap;
use std::sync::Arc;

use async_nats::Client;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::task::AbortOnDropHandle;

use crate::Error;
use crate::capacity::Total;
use crate::memory::{Mechanism, MemoryCap};
use crate::sizing::{PoolStatus, Slots, rss_bytes};

/// The subject every worker answers on.
pub const ALL_SUBJECT: &str = claw_proto::topology::WORKER_STATUS_ALL;

/// The subject only the worker called `name` answers on.
pub fn subject_of(name: &str) -> String {
    claw_proto::topology::worker_status_subject(name)
}

/// One worker's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub name: String,
    /// By class (`short`, `long`); a class this worker does not run is absent.
    pub pools: BTreeMap<String, PoolStatus>,
    /// `max_concurrent`: most attempts at once, both classes together.
    #[serde(default)]
    pub max_concurrent: usize,
    /// Attempts running now, both classes together (at most `max_concurrent`).
    #[serde(default)]
    pub busy: usize,
    /// The worker process's resident set size.
    pub rss_bytes: u64,
    /// `memory_max_mb` in bytes; 0: no cap.
    #[serde(default)]
    pub memory_max_bytes: u64,
    /// How the cap is enforced: `cgroup_v2`, `rss_watchdog` or `off`.
    #[serde(default = "unknown_mechanism")]
    pub memory_cap: Mechanism,
    /// Over the cap at the last look: the worker pulls nothing until it is below.
    #[serde(default)]
    pub memory_over: bool,
}

/// What a status from a worker that predates the memory cap had: none.
fn unknown_mechanism() -> Mechanism {
    Mechanism::Off
}

/// Answers status requests until the returned handle is dropped.
pub(crate) async fn listen(
    client: &Client,
    name: &str,
    pools: Vec<Arc<Slots>>,
    total: Arc<Total>,
    memory: Arc<MemoryCap>,
) -> Result<AbortOnDropHandle<()>, Error> {
    let mut subs = Vec::new();
    for subject in [ALL_SUBJECT.to_owned(), subject_of(name)] {
        let sub = client
            .subscribe(subject.clone())
            .await
            .map_err(|e| Error::nats(format!("subscribe {subject}"), e))?;
        subs.push(sub);
    }
    let mut requests = futures::stream::select_all(subs);
    let (client, name) = (client.clone(), name.to_owned());
    Ok(AbortOnDropHandle::new(tokio::spawn(async move {
        while let Some(msg) = requests.next().await {
            let Some(reply) = msg.reply else { continue };
            let (t, m) = (total.status(), memory.status());
            let status = WorkerStatus {
                name: name.clone(),
                pools: pools.iter().map(|s| (s.class.to_string(), s.status())).collect(),
                max_concurrent: t.max,
                busy: t.busy,
                rss_bytes: rss_bytes(),
                memory_max_bytes: m.max_bytes,
                memory_cap: m.mechanism,
                memory_over: m.over,
            };
            let body = serde_json::to_vec(&status).unwrap_or_default();
            if let Err(e) = client.publish(reply, body.into()).await {
                tracing::debug!(error = %e, "could not answer a status request");
            }
        }
    })))
}
