//! `claw-custom-worker`: `claw-worker` with one more kind. The same flags and config file as
//! `claw-worker`; the only differences are the registry passed to [`claw_worker::run_with`] and
//! the one the `__run-task` child side gets, which must know the same kinds.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use claw_proto::connect::{self, NatsArgs};
use claw_proto::topology::{self, Settings};
use claw_worker::{Config, child};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(name = "claw-custom-worker", about = "An OpenClaw worker with the `wordcount` kind")]
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
    // First thing: a long-class task of an in-process kind runs in `<this binary> __run-task`,
    // which reads the task from stdin and must know the same in-process kinds as the worker.
    if std::env::args().nth(1).as_deref() == Some(child::RUN_TASK_ARG) {
        std::process::exit(child::run_task_main_with(claw_custom_worker::child_registry()));
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
    let registry = claw_custom_worker::registry(&config);
    claw_worker::run_with(topology, config, registry, shutdown).await?;
    Ok(())
}
