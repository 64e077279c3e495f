//! The worker: pulls tasks from the JetStream lanes and runs them, short ones as async tasks in
//! this process, long ones in child processes.
//!
//! Reading order: [`config`] (the TOML file), [`pool`] (a class's slots and the pull loop that
//! fills them from its lanes), [`capacity`] (the worker's total every slot also needs),
//! `attempt` (one delivery in three stages, and its one ack): `claim` (the record, and whether
//! an attempt may start), `supervise` (running the handler), `settle` (the outcome made true in
//! the record, the DLQ and the events); [`outcome`] (outcome → decision → ack, pure), `control`
//! (routing the gateway's cancel/pause/resume wake-ups, and the memory cap's, to running
//! attempts), [`events`] (progress subject), [`dlq`] (dead letters), [`handler`] (the
//! `Handler` trait and its context), [`kinds`] (`sleep`, `exec`), [`process`] and [`protocol`]
//! (running a child and reading its JSON lines), [`limits`] (`[isolation]`: the child's rlimits,
//! the process-count watchdog, naming a limit failure), [`child`] (the `__run-task` side),
//! [`sizing`] (pool sizes from backlog and memory), [`memory`] (the cap on the worker's own
//! memory: the RSS watchdog) and `cgroup` (a cgroup v2 of its own, where allowed), [`status`]
//! (`claw.worker.status`), `lease` (the worker's contact with the server, which times every
//! attempt's lease), `slots` (concurrency keys: slots across workers, parked tasks), `error`.
//!
//! [`run`] is what `claw-worker` and `claw up` call; a team's own worker binary calls
//! [`run_with`] with its own [`Registry`].

mod attempt;
pub mod capacity;
mod cgroup;
pub mod child;
mod claim;
pub mod cli;
pub mod config;
mod control;
pub mod dlq;
mod error;
pub mod events;
pub mod handler;
pub mod kinds;
mod lease;
pub mod limits;
pub mod memory;
pub mod outcome;
pub mod pool;
pub mod process;
pub mod protocol;
mod settle;
pub mod shares;
pub mod sizing;
mod slots;
pub mod status;
mod supervise;

use std::sync::Arc;
use std::time::Duration;

use claw_proto::Class;
use claw_proto::topology::{Lane, Topology};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
pub use error::Error;
pub use handler::{Context, Handler, Registry};

use crate::attempt::Worker;
use crate::capacity::Total;
use crate::control::Controls;
use crate::limits::ChildUser;
use crate::pool::Pool;

/// Runs a worker with the built-in kinds until `shutdown`, then drains (see [`run_with`]).
pub async fn run(
    topology: Topology,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let registry = kinds::builtin(&config);
    run_with(topology, config, registry, shutdown).await
}

/// Runs a worker with `registry`'s kinds until `shutdown`. Then it stops pulling, lets running
/// attempts finish for `drain_s`, and hands back (NAK, no delay) those still running so another
/// worker takes them at once. Anything not acked is redelivered by the server anyway, which is
/// what makes stopping, even abruptly, safe.
pub async fn run_with(
    topology: Topology,
    config: Config,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let client = topology.js.client();
    let runner =
        config.runner().map_err(|e| Error::Config(format!("cannot find the runner: {e}")))?;
    let child_user = child_user(&config.isolation)?;
    let ack_deadline = effective_ack_deadline(&topology, &config).await?;
    let worker = Arc::new(Worker {
        client: client.clone(),
        js: topology.js.clone(),
        records: topology.records.clone(),
        payloads: topology.payloads.with_max_bytes(config.payload_max_bytes),
        catalog: registry.catalog(),
        limits: config.admission_limits(),
        registry,
        runner,
        child_user,
        ack_deadline,
        hand_back: CancellationToken::new(),
        controls: Arc::new(Controls::default()),
        contact: Arc::new(lease::Contact::new()),
        shares: shares::Shares::new(&config.events),
        slots: slots::Slots::new(
            topology.js.clone(),
            topology.slots_kv.clone(),
            topology
                .js
                .get_stream_no_info(claw_proto::topology::TASKS_STREAM)
                .await
                .map_err(|e| Error::nats("stream TASKS", e))?,
        ),
        config,
    });
    // What a worker killed on this machine left running (its programs' own children).
    process::sweep_stale_workdirs();
    let _probe = lease::probe(&client, worker.contact.clone(), ack_deadline).await?;
    // Before any pool starts, so no attempt runs without its wake-ups; ends with this function.
    let _control = control::listen(&client, worker.controls.clone()).await?;
    let tracker = TaskTracker::new();
    let total = Total::new(worker.config.max_concurrent);
    // Before any pool starts, so no attempt runs uncapped; the watchdog ends with this function.
    let (memory, _watchdog) = memory::start(&worker.config, worker.controls.clone());
    let mut pools = Vec::new();
    let mut slots = Vec::new();
    for class in Class::ALL {
        if worker.config.slots(class) == 0 {
            continue;
        }
        let pool =
            Pool::new(worker.clone(), &topology, class, total.clone(), memory.clone()).await?;
        slots.push(pool.slots());
        pools.push(tokio::spawn(pool.run(tracker.clone(), shutdown.clone())));
    }
    let _gauges = pool_gauges(slots.clone(), total.clone(), memory.clone());
    let _sweep = sweep_slots(worker.clone());
    let _status = status::listen(&client, &worker.config.name, slots, total, memory).await?;
    tracing::info!(
        worker = %worker.config.name, max_concurrent = worker.config.max_concurrent,
        "worker running"
    );

    shutdown.cancelled().await;
    for pool in pools {
        let _ = pool.await;
    }
    tracker.close();
    let drain = worker.config.drain();
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        tracing::warn!(?drain, running = tracker.len(), "drain deadline passed; handing back");
        worker.hand_back.cancel();
        tracker.wait().await;
    }
    // Acks, NAKs and events are buffered by the client: make sure they left before returning.
    if let Err(e) = client.flush().await {
        tracing::warn!(error = %e, "could not flush the NATS connection");
    }
    tracing::info!("worker stopped");
    Ok(())
}

/// Sweeps the concurrency keys that have parked tasks every [`slots::SWEEP_EVERY`] (with a
/// random offset, so many workers do not sweep in step), until the handle is dropped.
fn sweep_slots(worker: Arc<Worker>) -> tokio_util::task::AbortOnDropHandle<()> {
    tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        let offset = Duration::from_millis(u64::from(uuid::Uuid::new_v4().as_u128() as u16) % 2000);
        tokio::time::sleep(offset).await;
        let mut tick = tokio::time::interval(slots::SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = worker.slots.sweep(&worker.records).await {
                tracing::warn!(error = %e, "cannot sweep the concurrency slots");
            }
        }
    }))
}

/// Sets the pools' gauges (what `claw.worker.status` answers), the total's, the memory cap's
/// and the RSS on every scrape of `/metrics`, until the returned hook is dropped.
fn pool_gauges(
    pools: Vec<Arc<sizing::Slots>>,
    total: Arc<Total>,
    memory: Arc<memory::MemoryCap>,
) -> claw_proto::metrics::ScrapeHook {
    claw_proto::metrics::on_scrape(move || {
        let t = total.status();
        metrics::gauge!("claw_worker_max_concurrent").set(t.max as f64);
        metrics::gauge!("claw_worker_busy").set(t.busy as f64);
        let m = memory.status();
        metrics::gauge!("claw_worker_memory_max_bytes").set(m.max_bytes as f64);
        metrics::gauge!("claw_worker_memory_over").set(if m.over { 1.0 } else { 0.0 });
        for slots in &pools {
            let s = slots.status();
            let class = slots.class.as_str();
            metrics::gauge!("claw_worker_pool_size", "class" => class).set(s.size as f64);
            metrics::gauge!("claw_worker_pool_busy", "class" => class).set(s.busy as f64);
            metrics::gauge!("claw_worker_pool_min", "class" => class).set(s.min as f64);
            metrics::gauge!("claw_worker_pool_max", "class" => class).set(s.max as f64);
            metrics::gauge!("claw_worker_pool_backlog", "class" => class).set(s.backlog as f64);
        }
        metrics::gauge!("claw_worker_rss_bytes").set(sizing::rss_bytes() as f64);
        std::future::ready(())
    })
}

/// Whom child processes run as, checked once at start: `[isolation] user` needs a worker that
/// runs as root, and a worker that runs as root without it says once that its task programs
/// run as root too.
fn child_user(isolation: &limits::IsolationConfig) -> Result<Option<ChildUser>, Error> {
    let euid = nix::unistd::geteuid().as_raw();
    let user = isolation.child_user(euid).map_err(Error::Config)?;
    match user {
        None if euid == 0 => tracing::warn!(
            "the worker runs as root and [isolation] user is not set: task programs run as root \
             too, and can read the worker's secrets and memory; set [isolation] user (e.g. \
             \"nobody\")"
        ),
        None => {}
        Some(ChildUser { uid, gid }) => tracing::info!(uid, gid, "child processes run as"),
    }
    Ok(user)
}

/// The ack deadline heartbeats and the lease are timed by: the configured one, or the lane
/// consumers' if that is shorter (someone else ensured the topology with other settings).
async fn effective_ack_deadline(topology: &Topology, config: &Config) -> Result<Duration, Error> {
    let mut deadline = config.ack_deadline();
    for lane in Lane::ALL {
        if config.slots(lane.class) == 0 {
            continue;
        }
        let mut consumer = topology.lane_consumer(lane).await?;
        let info = consumer.info().await.map_err(|e| Error::nats(lane.consumer(), e))?;
        let actual = info.config.ack_wait;
        if actual != deadline {
            tracing::warn!(
                lane = %lane.consumer(), ?actual, configured = ?deadline,
                "lane ack deadline differs from the worker's ack_deadline_s"
            );
        }
        if !actual.is_zero() {
            deadline = deadline.min(actual);
        }
    }
    Ok(deadline)
}
