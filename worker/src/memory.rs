//! The cap on the worker's own memory (`memory_max_mb`, the plan's 500 MB).
//!
//! A watchdog reads the process's resident set size every [`WATCH_INTERVAL`]. Above the cap:
//!
//! 1. the pools stop pulling ([`MemoryCap::below_cap`]; running attempts go on), so nothing
//!    new adds to it;
//! 2. the largest attempt whose handler runs in this process is stopped and fails with
//!    `cause: limit`, code `limit_memory` (retried like any limit failure, and counted toward
//!    `max_attempts`); the watchdog waits for its handler to end, hands the freed memory back to
//!    the system (`malloc_trim`), and looks again: still over, the next largest goes.
//!
//! Below the cap again, the pools pull again. Long tasks in child processes are not the
//! worker's memory (they have their own `[isolation] memory_mb` each) and are never chosen.
//!
//! "Largest" is an estimate, said plainly: memory a Rust handler allocates is not attributable
//! to the task that allocated it without a counting global allocator, which a library cannot
//! impose on a team's worker binary. A handler that knows what it holds says so with
//! [`crate::Context::report_memory`], and the largest report goes first; among attempts that
//! report nothing (every built-in kind), the one started last goes, since it has the least
//! work to lose. A handler that allocates without ever reaching an `.await` cannot be stopped
//! by anything in-process: only the kernel's cap can, where there is one.
//!
//! Where the worker may manage a cgroup v2 of its own (`cgroup.rs`, `memory_cgroup`), it
//! moves into one whose `memory.high` is the cap and `memory.max` a little above: the kernel
//! then slows an allocation burst down at the cap (so the watchdog can act) and, should the
//! watchdog not bring it back, kills the worker at `memory.max` rather than let it grow. The
//! watchdog runs either way; the status and the start-up log say which mechanism is active.
//! What the RSS counts: the whole process, so under `claw up` the gateway and archiver too.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tokio_util::task::AbortOnDropHandle;

use crate::cgroup;
use crate::config::Config;
use crate::control::{Attempt, Controls};
use crate::outcome::Limit;
use crate::sizing::rss_bytes;

/// How often the watchdog reads the RSS. Reading `/proc/self/status` costs microseconds, so ten
/// times a second is nothing; a handler allocating a GB/s overshoots the cap by about 100 MB
/// before the watchdog sees it, which the kernel's cap (with cgroups) or the headroom of the
/// host has to absorb.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(100);

const MIB: u64 = 1024 * 1024;

/// How the worker's memory is capped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    /// A cgroup v2 of the worker's own (`memory.high` at the cap), and the RSS watchdog.
    CgroupV2,
    /// The RSS watchdog alone.
    RssWatchdog,
    /// `memory_max_mb = 0`.
    Off,
}

/// The worker's memory cap as the pools and the status see it.
#[derive(Debug)]
pub struct MemoryCap {
    /// Bytes; 0: no cap.
    max: u64,
    mechanism: Mechanism,
    /// Whether the RSS was over the cap at the watchdog's last look: the pools do not pull.
    over: watch::Sender<bool>,
}

/// What the status endpoint shows of the cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryStatus {
    pub max_bytes: u64,
    pub mechanism: Mechanism,
    pub over: bool,
}

impl MemoryCap {
    pub fn status(&self) -> MemoryStatus {
        MemoryStatus { max_bytes: self.max, mechanism: self.mechanism, over: self.is_over() }
    }

    pub fn is_over(&self) -> bool {
        *self.over.borrow()
    }

    /// Resolves once the worker is below its cap (at once when it is).
    pub async fn below_cap(&self) {
        let mut over = self.over.subscribe();
        // The sender lives in `self`, so the wait cannot fail.
        let _ = over.wait_for(|over| !*over).await;
    }
}

/// Sets the cap up from `config` and starts its watchdog, which stops attempts registered in
/// `controls`; the watchdog runs until the returned handle is dropped (none without a cap).
pub(crate) fn start(
    config: &Config,
    controls: Arc<Controls>,
) -> (Arc<MemoryCap>, Option<AbortOnDropHandle<()>>) {
    let max = config.memory_max_mb.saturating_mul(MIB);
    let (over, _) = watch::channel(false);
    if max == 0 {
        tracing::info!("memory cap: off (memory_max_mb = 0)");
        return (Arc::new(MemoryCap { max, mechanism: Mechanism::Off, over }), None);
    }
    let mechanism = if !config.memory_cgroup {
        tracing::info!(
            max_mb = config.memory_max_mb,
            "memory cap: RSS watchdog (memory_cgroup = false)"
        );
        Mechanism::RssWatchdog
    } else {
        match cgroup::place(max) {
            Ok(group) => {
                tracing::info!(max_mb = config.memory_max_mb, cgroup = %group.display(),
                    "memory cap: cgroup v2 memory.high and memory.max, and the RSS watchdog");
                Mechanism::CgroupV2
            }
            Err(why) => {
                tracing::info!(max_mb = config.memory_max_mb, cgroup = %why,
                    "memory cap: RSS watchdog (no cgroup v2 of its own)");
                Mechanism::RssWatchdog
            }
        }
    };
    let cap = Arc::new(MemoryCap { max, mechanism, over });
    let watchdog = AbortOnDropHandle::new(tokio::spawn(watch(cap.clone(), controls)));
    (cap, Some(watchdog))
}

/// The watchdog (see the module docs), forever.
async fn watch(cap: Arc<MemoryCap>, controls: Arc<Controls>) {
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The attempt told to stop, until its handler has ended.
    let mut victim: Option<Arc<Attempt>> = None;
    let mut was_over = false;
    let mut said_nobody = false;
    loop {
        tick.tick().await;
        let stopping = victim.as_ref().is_some_and(|v| v.runs_in_process());
        let mut rss = rss_bytes();
        if rss > cap.max && !stopping && (victim.take().is_some() || !was_over) {
            // Memory an attempt freed may still sit in the allocator's free lists: give it
            // back before judging that more must go.
            release_free_memory();
            rss = rss_bytes();
        }
        let over = rss > cap.max;
        let (rss_mb, cap_mb) = (rss / MIB, cap.max / MIB);
        if over != was_over {
            if over {
                tracing::warn!(rss_mb, cap_mb, "over the memory cap; not pulling");
            } else {
                tracing::info!(rss_mb, cap_mb, "below the memory cap again; pulling");
                said_nobody = false;
            }
            cap.over.send_replace(over);
            was_over = over;
        }
        if !over || stopping {
            continue;
        }
        match controls.largest_in_process() {
            Some((task_id, attempt)) => {
                tracing::warn!(%task_id, rss_mb, cap_mb,
                    "over the memory cap; stopping the largest in-process attempt");
                attempt.stop_for(Limit::Memory { cap_mb, rss_mb });
                victim = Some(attempt);
            }
            None if !said_nobody => {
                tracing::error!(
                    rss_mb,
                    cap_mb,
                    "over the memory cap with no in-process attempt to stop; not pulling until \
                     the worker is below it"
                );
                said_nobody = true;
            }
            None => {}
        }
    }
}

/// Hands memory the allocator keeps free back to the system, so the RSS shows what is in use.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_free_memory() {
    // SAFETY: malloc_trim(3) only walks glibc's own arenas under their locks and returns
    // unused pages with madvise; it takes no pointer from us and is safe from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators return freed memory on their own terms; nothing to ask.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}
