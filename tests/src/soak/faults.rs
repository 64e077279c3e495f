//! The soak's faults: a schedule drawn from the seeded RNG, one fault every few seconds until
//! the load stops, each applied to the [`Stack`], followed by a wait (polling, with a deadline)
//! until every service answers again, and logged with its time.
//!
//! The kinds come in shuffled rounds, each round holding every kind once, so that even a short
//! run meets every fault: SIGKILL and restart of nats-server (same port and store), of the
//! gateway, of the archiver and of each worker; SIGSTOP of nats-server for longer than the
//! clients' ping interval; and a gateway restart by SIGTERM while the WebSockets are open.
//! Faults never overlap: the next one waits until the system has recovered from the last.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::load::WsClients;
use super::stack::{READY_TIMEOUT, Stack, WORKERS};
use super::{Config, Rng};

/// One kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL nats-server, leave it down for [`NATS_DOWN`], start it on the same port and store.
    NatsKill,
    /// SIGSTOP nats-server for [`NATS_FROZEN`], then SIGCONT.
    NatsStop,
    /// SIGKILL the gateway and start it again on its port.
    GatewayKill,
    /// SIGTERM the gateway (it closes WebSockets with 1012 and drains), then start it again.
    GatewayRestart,
    ArchiverKill,
    /// SIGKILL worker `i` of [`WORKERS`] and start it again (same name and config).
    WorkerKill(usize),
}

impl Fault {
    /// One of each.
    pub fn all() -> Vec<Fault> {
        let mut all = vec![
            Fault::NatsKill,
            Fault::NatsStop,
            Fault::GatewayKill,
            Fault::GatewayRestart,
            Fault::ArchiverKill,
        ];
        all.extend((0..WORKERS.len()).map(Fault::WorkerKill));
        all
    }

    /// Its name in logs and reports.
    pub fn name(self) -> String {
        match self {
            Fault::NatsKill => "nats_sigkill".into(),
            Fault::NatsStop => "nats_sigstop".into(),
            Fault::GatewayKill => "gateway_sigkill".into(),
            Fault::GatewayRestart => "gateway_sigterm_restart".into(),
            Fault::ArchiverKill => "archiver_sigkill".into(),
            Fault::WorkerKill(i) => format!("worker_sigkill {}", WORKERS[i]),
        }
    }
}

/// How long a killed nats-server stays down: long enough that clients see refused connections
/// and their reconnect loops run, not only a dropped socket.
pub const NATS_DOWN: Duration = Duration::from_secs(1);

/// How long nats-server is frozen: beyond two client ping intervals (2 s each,
/// `claw_proto::connect::PING_INTERVAL`), so every client marks the connection dead while the
/// server still holds its sockets. Below 2/3 of the shipped 30 s ack deadline, so workers keep
/// their leases in the long run; above 2/3 of the 5 s deadline of the short run, so there they
/// lose them and must kill their children.
pub const NATS_FROZEN: Duration = Duration::from_secs(5);

/// How long a SIGTERMed gateway may take to exit: its drain (WebSockets closed with 1012, HTTP
/// finished) plus slack. Past it, the soak reports it and kills the gateway.
const GATEWAY_TERM_GRACE: Duration = Duration::from_secs(35);

/// One fault as it happened.
#[derive(Clone, Debug, Serialize)]
pub struct FaultRecord {
    /// Seconds from the start of the run.
    pub at_s: f64,
    pub fault: String,
    pub detail: String,
    /// Seconds from the fault until every service answered again; `None`: not within
    /// [`READY_TIMEOUT`].
    pub recovered_s: Option<f64>,
    /// What went wrong while applying it or recovering (a finding each).
    pub problems: Vec<String>,
    /// The pid of the worker a `worker_sigkill` killed (its children's parent).
    pub killed_worker_pid: Option<u32>,
}

/// Everything the faults did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FaultLog {
    pub records: Vec<FaultRecord>,
    /// Services that exited on their own (each restarted, and a finding).
    pub crashes: Vec<String>,
}

impl FaultLog {
    /// Faults injected, by kind.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for r in &self.records {
            let kind = r.fault.split(' ').next().unwrap_or(&r.fault).to_owned();
            *counts.entry(kind).or_default() += 1;
        }
        counts
    }
}

/// Injects faults until `config.duration` has passed since `started`.
pub async fn run(
    stack: &mut Stack,
    ws: &WsClients,
    rng: &mut Rng,
    config: &Config,
    started: Instant,
) -> FaultLog {
    let end = started + config.duration;
    let mut log = FaultLog::default();
    let mut round: Vec<Fault> = Vec::new();
    loop {
        let gap = config.fault_interval.mul_f64(rng.between(0.75, 1.25));
        if Instant::now() + gap >= end {
            // The spacing of faults is the one wait for time itself.
            tokio::time::sleep_until(end.into()).await;
            break;
        }
        tokio::time::sleep(gap).await;
        log.crashes.extend(restart_crashed(stack, started).await);
        if round.is_empty() {
            round = Fault::all();
            rng.shuffle(&mut round);
        }
        let fault = round.pop().expect("a non-empty round");
        let closes_before = ws.ends_with("1012");
        let killed_worker_pid = match fault {
            Fault::WorkerKill(i) => stack.workers[i].pid(),
            _ => None,
        };
        let at = Instant::now();
        let (detail, mut problems) = apply(stack, fault).await;
        let not_ready = stack.wait_ready(READY_TIMEOUT).await;
        let recovered_s = not_ready.is_empty().then(|| at.elapsed().as_secs_f64());
        if !not_ready.is_empty() {
            problems
                .push(format!("not recovered after {READY_TIMEOUT:?}: {}", not_ready.join(", ")));
        }
        let detail = match fault {
            Fault::GatewayRestart | Fault::GatewayKill => {
                let closes = ws.ends_with("1012") - closes_before;
                format!("{detail}; WebSockets closed with 1012: {closes}")
            }
            _ => detail,
        };
        let record = FaultRecord {
            at_s: at.duration_since(started).as_secs_f64(),
            fault: fault.name(),
            detail,
            recovered_s,
            problems,
            killed_worker_pid,
        };
        eprintln!(
            "soak: {:7.2} s  {:<26} {} (recovered in {})",
            record.at_s,
            record.fault,
            record.detail,
            record.recovered_s.map_or("-".to_owned(), |s| format!("{s:.2} s"))
        );
        for p in &record.problems {
            eprintln!("soak:            problem: {p}");
        }
        log.records.push(record);
    }
    log.crashes.extend(restart_crashed(stack, started).await);
    log
}

/// Applies `fault` and restarts what it stopped; returns what was done and any problem.
async fn apply(stack: &mut Stack, fault: Fault) -> (String, Vec<String>) {
    let mut problems = Vec::new();
    let detail = match fault {
        Fault::NatsKill => {
            let pid = stack.nats_server().pid();
            stack.nats_server().kill();
            tokio::time::sleep(NATS_DOWN).await;
            // The start waits for the server's ports file: a blocking wait of up to 20 s.
            let restarted = tokio::task::block_in_place(|| stack.nats_server().restart());
            if let Err(e) = restarted {
                problems.push(format!("nats-server did not restart: {e}"));
            }
            format!(
                "pid {pid:?} killed, down {NATS_DOWN:?}, restarted as {:?}",
                stack.nats_server().pid()
            )
        }
        Fault::NatsStop => {
            let pid = stack.nats_server().pid();
            stack.nats_server().freeze();
            tokio::time::sleep(NATS_FROZEN).await;
            stack.nats_server().thaw();
            format!("pid {pid:?} stopped for {NATS_FROZEN:?}")
        }
        Fault::GatewayKill => {
            let pid = stack.gateway.pid();
            stack.gateway.kill();
            if let Err(e) = stack.restart_gateway().await {
                problems.push(format!("{e:#}"));
            }
            format!("pid {pid:?} killed, restarted as {:?}", stack.gateway.pid())
        }
        Fault::GatewayRestart => {
            let pid = stack.gateway.pid();
            let exit = stack.gateway.terminate(GATEWAY_TERM_GRACE).await;
            if exit.is_none() {
                problems.push(format!(
                    "the gateway did not exit within {GATEWAY_TERM_GRACE:?} of SIGTERM: killed"
                ));
            }
            if let Err(e) = stack.restart_gateway().await {
                problems.push(format!("{e:#}"));
            }
            format!(
                "pid {pid:?} exited {} after SIGTERM, restarted as {:?}",
                exit.map_or("(killed)".to_owned(), |d| format!("{:.2} s", d.as_secs_f64())),
                stack.gateway.pid()
            )
        }
        Fault::ArchiverKill => {
            let pid = stack.archiver.pid();
            stack.archiver.kill();
            if let Err(e) = stack.archiver.spawn() {
                problems.push(format!("{e:#}"));
            }
            format!("pid {pid:?} killed, restarted as {:?}", stack.archiver.pid())
        }
        Fault::WorkerKill(i) => {
            let worker = &mut stack.workers[i];
            let pid = worker.pid();
            worker.kill();
            if let Err(e) = worker.spawn() {
                problems.push(format!("{e:#}"));
            }
            format!("pid {pid:?} killed, restarted as {:?}", worker.pid())
        }
    };
    (detail, problems)
}

/// Restarts every service that exited on its own, and says which did and how.
async fn restart_crashed(stack: &mut Stack, started: Instant) -> Vec<String> {
    let mut crashes = Vec::new();
    let mut gateway_crashed = false;
    for process in stack.processes() {
        let Some(status) = process.exited() else { continue };
        let line = format!(
            "{:.1} s: {} (incarnation {}) exited on its own with {status}; its log ends:\n{}",
            started.elapsed().as_secs_f64(),
            process.name,
            process.incarnations,
            process.log_tail(15)
        );
        eprintln!("soak: CRASH {line}");
        crashes.push(line);
        process.reap();
        if process.name == "gateway" {
            gateway_crashed = true;
        } else if let Err(e) = process.spawn() {
            crashes.push(format!("{} could not be restarted: {e:#}", process.name));
        }
    }
    if gateway_crashed && let Err(e) = stack.restart_gateway().await {
        crashes.push(format!("the gateway could not be restarted: {e:#}"));
    }
    crashes
}
