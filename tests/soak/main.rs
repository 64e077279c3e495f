//! `claw-soak`: the fault-injection soak of `claw_tests::soak` as a command, for runs longer
//! than the test suite's 60 s (`docs/RELIABILITY.md`). Build the services first
//! (`cargo build --workspace --bins`); they are found next to this executable.
//!
//! Prints the report and leaves it, with every service's log, the executions log and the
//! archive, in the run dir. Exit status: 0 when every promise held, 1 when an accepted task was
//! lost or a task had more than one terminal state, 2 for any other broken promise, 3 when the
//! soak itself could not run.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use claw_tests::soak::{self, Config};

#[derive(Debug, Parser)]
#[command(name = "claw-soak", about = "Fault-injection soak of the OpenClaw task gateway")]
struct Args {
    /// How long the load and the faults go on, in seconds (`600` or `600s`).
    #[arg(long, default_value = "600", value_parser = seconds)]
    duration: Duration,
    /// New tasks per second.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Seeds the fault schedule and the tasks (default: from the clock; the report names it).
    #[arg(long)]
    seed: Option<u64>,
    /// Mean seconds between faults (each fault waits for the recovery from the last).
    #[arg(long, default_value = "10", value_parser = seconds)]
    fault_interval_s: Duration,
    /// The workers' ack deadline in seconds; default: as shipped (30 s).
    #[arg(long)]
    ack_deadline_s: Option<f64>,
    /// WebSocket clients, one per session.
    #[arg(long, default_value_t = 4)]
    sessions: usize,
    /// How long the checker waits for every accepted task to finish, in seconds.
    #[arg(long, default_value = "300", value_parser = seconds)]
    quiesce_timeout_s: Duration,
    /// Where the run's files go (default: a new `claw-soak-<time>` in the temp dir). Kept.
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Seconds as `600` or `600s`.
fn seconds(text: &str) -> Result<Duration, String> {
    let number = text.strip_suffix('s').unwrap_or(text);
    match number.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 => Ok(Duration::from_secs_f64(s)),
        _ => Err(format!("expected seconds, like 600 or 600s, not {text:?}")),
    }
}

fn main() {
    let args = Args::parse();
    // The soak's own diagnostics (its NATS client reconnecting through the faults) go to
    // stderr, errors only unless RUST_LOG says otherwise, so stdout holds the report.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let dir = args.dir.unwrap_or_else(|| {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        std::env::temp_dir().join(format!("claw-soak-{stamp}"))
    });
    let config = Config {
        duration: args.duration,
        rate: args.rate,
        fault_interval: args.fault_interval_s,
        seed: args.seed.unwrap_or_else(soak::seed_from_clock),
        ack_deadline_s: args.ack_deadline_s,
        sessions: args.sessions.max(1),
        quiesce_timeout: args.quiesce_timeout_s,
        dir,
    };
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let report = match runtime.block_on(soak::run(&config)) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("claw-soak: {e:#}");
            std::process::exit(3);
        }
    };
    println!("{report}");
    println!("report: {}", config.dir.join("report.json").display());
    let code = if report.lost_or_duplicated() {
        1
    } else if !report.passed() {
        2
    } else {
        0
    };
    std::process::exit(code);
}
