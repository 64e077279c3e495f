//! `claw-worker`: parse flags and the config file, start tracing, connect, ensure the topology
//! with this worker's ack deadline, and call [`claw_worker::run`] until SIGINT/SIGTERM.
//!
//! `claw-worker __run-task` is the child side of a long-class task
//! ([`claw_worker::child::run_task_main`]), checked before anything else.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use claw_proto::connect::{self, NatsArgs};
use claw_proto::topology::{self, Settings};
use claw_worker::{Config, child};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(name = "claw-worker", about = "Runs OpenClaw tasks from the JetStream lanes")]
struct Args {
    /// The worker's TOML configuration; without it every key has its default.
    #[arg(long, env = "CLAW_WORKER_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    settings: Settings,
}

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some(child::RUN_TASK_ARG) {
        std::process::exit(child::run_task_main());
    }
    let args = Args::parse();
    claw_proto::logs::init();
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::from_toml_str("")?,
    };
    tokio::runtime::Runtime::new()?.block_on(serve(args, config))
}

async fn serve(args: Args, config: Config) -> anyhow::Result<()> {
    let client = connect::connect(&args.nats, &config.name).await.context("connecting to NATS")?;
    let js = connect::jetstream(client);
    // The worker owns the lanes' ack deadline: its heartbeats and lease are timed by it.
    let settings = Settings { ack_wait_s: Some(config.ack_deadline_s), ..args.settings };
    let topology = topology::ensure(&js, &settings).await.context("ensuring the topology")?;

    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let term = async {
            match term.as_mut() {
                Some(term) => {
                    term.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = term => {}
        }
        tracing::info!("shutting down: draining");
        signal.cancel();
    });
    claw_worker::run(topology, config, shutdown).await?;
    Ok(())
}
