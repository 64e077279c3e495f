//! `claw`: the OpenClaw command. `claw up` runs the whole system; more verbs follow.
//!
//! When a worker runs a long task in a child process it starts this same executable with the
//! hidden first argument `__run-task`; that is handled before anything else.

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "claw",
    version,
    about = "OpenClaw: an asynchronous task gateway on NATS JetStream"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run everything on this machine: nats-server, gateway, worker, archiver, web UI.
    Up(claw_cli::up::UpArgs),
}

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("__run-task") {
        std::process::exit(claw_worker::child::run_task_main());
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        match cli.command {
            Command::Up(args) => {
                let shutdown = CancellationToken::new();
                tokio::spawn(cancel_on_signal(shutdown.clone()));
                claw_cli::up::run(args, shutdown).await
            }
        }
    })
}

async fn cancel_on_signal(token: CancellationToken) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping");
    token.cancel();
}
