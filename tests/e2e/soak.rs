//! The 60-second fault-injection soak (`claw_tests::soak`): the shipped deployment as
//! processes under a steady load of tasks with Idempotency-Keys, with nats-server, the gateway,
//! the archiver and both workers SIGKILLed and restarted, nats-server SIGSTOPped past the ping
//! interval and the gateway restarted with WebSockets open, every few seconds. Every accepted
//! task must end once, succeeded, archived once, and every WebSocket client must see every
//! stored event of its session once.
//!
//! The workers' ack deadline is shortened to 5 s so a killed worker's tasks come back within
//! the run; `shipped.rs` covers the default deadline, and `claw-soak --duration 600` (the long
//! run of `docs/RELIABILITY.md`) runs the soak with it.

use claw_tests::TestDir;
use claw_tests::soak::{self, Config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_60s_with_faults_loses_and_duplicates_nothing() {
    claw_tests::init_tracing();
    let dir = TestDir::new();
    let config = Config::ci(dir.path());
    let report = soak::run(&config).await.expect("the soak runs");
    eprintln!("{report}");
    assert!(report.lost.is_empty(), "accepted tasks lost:\n{report}");
    assert!(report.duplicated_terminal.is_empty(), "more than one terminal state:\n{report}");
    let archive = &report.archive;
    assert!(
        archive.missing.is_empty() && archive.unknown.is_empty() && archive.stale.is_empty(),
        "archive rows missing, unknown or stale:\n{report}"
    );
    assert!(report.passed(), "broken promises: {:?}\n{report}", report.violations);
}
