//! The worker's command line: what `claw-worker` runs, and what a team's own worker binary runs
//! with its own kinds (see `examples/custom-worker`): flags and the TOML file, logs, the
//! secrets read and scrubbed from the environment, connect, ensure the topology with this
//! worker's ack deadline, run until SIGINT/SIGTERM.
//!
//! The `__run-task` child side of long-class tasks is dispatched first, before any flag parsing,
//! because the worker starts this same executable for it.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use claw_proto::connect::{self, NatsArgs};
use claw_proto::topology::{self, Settings};

use crate::{Config, Registry, child};

#[derive(Debug, Parser)]
#[command(about = "Runs OpenClaw tasks from the JetStream lanes")]
struct Args {
    /// The worker's TOML configuration; without it every key has its default.
    #[arg(long, env = "CLAW_WORKER_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    settings: Settings,
    /// Serve Prometheus metrics on `GET http://ADDR/metrics` (e.g. `0.0.0.0:9101`); off when
    /// unset.
    #[arg(long, env = "CLAW_METRICS_ADDR", value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

/// Runs a worker process with the kinds `registry` builds from the configuration; long-class
/// tasks of in-process kinds run in `<this executable> __run-task` with `child_registry`,
/// which must know the same in-process kinds (a child gets no configuration).
///
/// Call it first thing in `main`, before any thread is started: it removes the secret
/// variables it read (`Config::secret_vars`) from the process's environment, which is only
/// sound while the process has one thread.
pub fn main_with(
    registry: impl FnOnce(&Config) -> Registry,
    child_registry: impl FnOnce() -> Registry,
) -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some(child::RUN_TASK_ARG) {
        std::process::exit(child::run_task_main_with(child_registry()));
    }
    let args = Args::parse();
    claw_proto::logs::init();
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::from_toml_str("")?,
    };
    config.read_secrets()?;
    // SAFETY: no other thread exists yet: the runtime starts below, and neither the flags,
    // the logger nor the configuration start one.
    #[allow(unsafe_code)]
    let scrubbed = unsafe { claw_proto::secrets::scrub_env(&config.secret_vars()) };
    if !scrubbed.is_empty() {
        tracing::info!(variables = ?scrubbed, "secrets read and removed from the environment");
    }
    // Task programs are the worker's children: none may read its memory or ptrace it.
    if let Err(e) = claw_proto::secrets::make_undumpable() {
        tracing::warn!(error = %e, "cannot make the worker non-dumpable");
    }
    let registry = registry(&config);
    tokio::runtime::Runtime::new()?.block_on(serve(args, config, registry))
}

async fn serve(args: Args, config: Config, registry: Registry) -> anyhow::Result<()> {
    let client = connect::connect(&args.nats, &config.name).await.context("connecting to NATS")?;
    let js = connect::jetstream(client);
    // The worker owns the lanes' ack deadline: its heartbeats and lease are timed by it.
    let settings = Settings { ack_wait_s: Some(config.ack_deadline_s), ..args.settings };
    let topology =
        topology::ensure_at_start(&js, &settings).await.context("ensuring the topology")?;
    let _metrics = claw_proto::metrics::Server::bind_if(args.metrics)
        .await
        .with_context(|| format!("serving metrics on {:?}", args.metrics))?;
    let shutdown = claw_proto::signal::cancel_on_shutdown();
    crate::run_with(topology, config, registry, shutdown).await?;
    Ok(())
}
