//! The fault-injection soak: the deployment as shipped (nats-server from `single.conf` with the
//! role users, `claw-gateway`, `claw-archiver` and two `claw-worker` processes), a steady load
//! of `exec` tasks submitted with `Idempotency-Key`s, a few WebSocket clients, and a fault every
//! few seconds (SIGKILL and restart of every process, SIGSTOP of nats-server past the clients'
//! ping interval, a gateway restart with WebSockets open). When the load stops a checker, in
//! the style of Jepsen's queue checker, waits for every accepted task to finish and reports what
//! the system promised and what it did.
//!
//! Reading order: [`stack`] (the processes and how to kill and restart them), [`load`] (the
//! submitter and the WebSocket clients), [`faults`] (the seeded schedule and its log),
//! [`check`] (the quiesce phase and the [`check::Report`]). [`run`] ties them together; the
//! 60-second version runs in `tests/e2e/soak.rs`, longer ones with `claw-soak --duration`.
//!
//! Only the system's public interfaces are used: HTTP, the WebSocket, the NATS subjects,
//! streams and bucket of `docs/PROTOCOL.md` (as the read-only `operator` role), the archive's
//! SQLite file opened read-only, and process signals. Internal refactors do not break it.

pub mod check;
pub mod faults;
pub mod load;
pub mod stack;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

pub use check::Report;

/// How one soak runs.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// How long the load and the faults go on; the quiesce phase comes after.
    pub duration: Duration,
    /// Logical tasks submitted per second (each retried under its key until accepted).
    pub rate: f64,
    /// Mean time between the end of one fault's recovery and the next fault.
    pub fault_interval: Duration,
    /// Seeds the fault schedule and every task's class, priority and running time.
    pub seed: u64,
    /// The workers' `ack_deadline_s`; `None` runs the shipped default (30 s).
    pub ack_deadline_s: Option<f64>,
    /// One WebSocket client per session; tasks are spread over the sessions.
    pub sessions: usize,
    /// How long the checker waits for every accepted task to be terminal.
    pub quiesce_timeout: Duration,
    /// Scripts, worker configs, service logs, the executions log, the archive and
    /// `report.json`.
    pub dir: PathBuf,
}

impl Config {
    /// The 60-second run of the test suite: a shortened ack deadline (5 s instead of 30 s) so
    /// that a killed worker's tasks come back well within the run. `tests/e2e/shipped.rs`
    /// covers the default deadline, and the documented long run (`claw-soak`) uses it.
    pub fn ci(dir: &Path) -> Config {
        Config {
            duration: Duration::from_secs(60),
            rate: 25.0,
            fault_interval: Duration::from_secs(4),
            seed: seed_from_clock(),
            ack_deadline_s: Some(5.0),
            sessions: 4,
            // Normally under 15 s; a lost task costs the whole of it, so not more.
            quiesce_timeout: Duration::from_secs(60),
            dir: dir.to_owned(),
        }
    }

    /// The ack deadline the lanes run with.
    pub fn ack_deadline(&self) -> Duration {
        Duration::from_secs_f64(self.ack_deadline_s.unwrap_or(SHIPPED_ACK_DEADLINE_S))
    }
}

/// The lanes' ack deadline as shipped (`nats/consumers/TASKS/*.json`, the worker's default).
pub const SHIPPED_ACK_DEADLINE_S: f64 = 30.0;

/// A seed from the clock and the pid, for runs that were not given one (it is printed and
/// reported, so any run can be repeated with `--seed`).
pub fn seed_from_clock() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// Runs one soak (see the module doc) and returns the checker's report, also written as
/// `<dir>/report.json`.
pub async fn run(config: &Config) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&config.dir)
        .with_context(|| format!("creating the run dir {}", config.dir.display()))?;
    eprintln!(
        "soak: {:?} at {}/s, a fault every ~{:?}, ack deadline {:?}, seed {}, dir {}",
        config.duration,
        config.rate,
        config.fault_interval,
        config.ack_deadline(),
        config.seed,
        config.dir.display()
    );
    let mut stack = stack::Stack::start(config).await?;
    let operator = stack.operator().await?;

    let started = Instant::now();
    let ws = load::WsClients::start(&stack.gateway_url(), config.sessions, started);
    ws.wait_connected(Duration::from_secs(30)).await?;
    let submitter = load::Submitter::start(config, &stack.gateway_url(), started);

    let mut rng = Rng::new(config.seed ^ FAULT_STREAM);
    let faults = faults::run(&mut stack, &ws, &mut rng, config, started).await;

    // No new tasks; submits still waiting for an answer keep retrying their key for a while, as
    // a client would, so that few keys end unresolved.
    let submissions = submitter.finish(SUBMIT_GRACE).await;
    eprintln!(
        "soak: load stopped at {:.1} s: {} keys, {} accepted",
        started.elapsed().as_secs_f64(),
        submissions.keys.len(),
        submissions.accepted()
    );
    still_there(&config.dir)?;
    let inputs = check::Inputs {
        config,
        submissions: &submissions,
        faults: &faults,
        ws: &ws,
        operator: &operator,
        exec_log: &stack.exec_log(),
        db: &stack.db(),
        logs_dir: &stack.logs_dir(),
        started,
    };
    let report = check::check(inputs).await;
    let mut ws = ws;
    ws.stop().await;
    stack.stop_and_keep_logs();

    still_there(&config.dir)?;
    let json = serde_json::to_vec_pretty(&report).context("report to JSON")?;
    std::fs::write(config.dir.join("report.json"), json).context("writing report.json")?;
    Ok(report)
}

/// Fails when the run dir has gone: something outside the soak removed it (a clean-up of the
/// temp dir while tests run), taking the archive and the logs with it, so no figure is valid.
fn still_there(dir: &Path) -> anyhow::Result<()> {
    if !dir.join("logs").is_dir() {
        anyhow::bail!(
            "the run dir {} was removed during the run by something outside the soak; \
             the archive and the logs went with it, so the run says nothing",
            dir.display()
        );
    }
    Ok(())
}

/// How long submits that are still retrying when the load stops may go on.
const SUBMIT_GRACE: Duration = Duration::from_secs(30);

/// Separates the fault schedule's random stream from the tasks' (both come from one seed).
const FAULT_STREAM: u64 = 0x5EED_FA17;

/// A small seeded PRNG (splitmix64): the same seed gives the same schedule and the same tasks.
/// Statistical quality is not a concern here; reproducibility is.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[low, high)`.
    pub fn between(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.unit()
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Shuffles `items` in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_numbers() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let xs: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        assert!((0..1000).map(|_| a.between(0.05, 2.0)).all(|x| (0.05..2.0).contains(&x)));
        let mut items = [1, 2, 3, 4, 5];
        a.shuffle(&mut items);
        items.sort();
        assert_eq!(items, [1, 2, 3, 4, 5]);
    }
}
