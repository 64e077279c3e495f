//! `claw up`: the embedded default. Everything lives under one data directory:
//! `nats/` (the JetStream store and the server log), `archive.sqlite` (the history).
//!
//! The services run through the same `run` functions their own binaries call, each with a child
//! of one cancellation token; the first to fail, or Ctrl-C / SIGTERM, stops them all, then the
//! embedded nats-server is stopped with SIGTERM so JetStream flushes its store.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use claw_proto::connect::{self, NatsArgs};
use claw_proto::nats_server::{self, NatsServer};
use claw_proto::topology::{self, Settings};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Directory for the JetStream store, the archive and logs.
    #[arg(long, env = "CLAW_DATA", default_value = "./.claw")]
    pub data: PathBuf,
    /// Address of the gateway (HTTP API and web UI).
    #[arg(long, env = "CLAW_HTTP", default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// Use this NATS server instead of starting one.
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,
    /// Client port of the embedded nats-server. Unset: 4222 when it is free, else a free one
    /// (another nats-server, or a second `claw up`, may hold 4222). A port given here is used
    /// or the start fails; 0 picks a free one.
    #[arg(long, env = "CLAW_NATS_PORT")]
    pub nats_port: Option<u16>,
    /// The worker's configuration file (TOML: programs for `exec`, pool sizes, ack deadline).
    #[arg(long, env = "CLAW_WORKER_CONFIG")]
    pub worker_config: Option<PathBuf>,
    #[command(flatten)]
    pub topology: Settings,
    #[command(flatten)]
    pub gateway: claw_gateway::Config,
    #[command(flatten)]
    pub retention: claw_archiver::retention::Settings,
    #[command(flatten)]
    pub reconcile: claw_archiver::reconcile::Settings,
}

/// How long the services get to drain after the stop signal before the process gives up on them.
const STOP_DEADLINE: Duration = Duration::from_secs(45);

/// The worker's configuration (`--worker-config`) with the secrets it names read. Called
/// before the runtime starts, so that the variables they came from can leave the environment
/// while the process has one thread (`claw_worker::Config::secret_vars`).
pub fn worker_config(args: &UpArgs) -> anyhow::Result<claw_worker::Config> {
    let mut config = match &args.worker_config {
        Some(path) => claw_worker::Config::load(path)?,
        None => claw_worker::Config::from_toml_str("")?,
    };
    config.read_secrets()?;
    Ok(config)
}

pub async fn run(
    args: UpArgs,
    worker_config: claw_worker::Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Before starting anything: a public address without tokens, or a bad tokens file.
    args.gateway.check_exposure(args.http)?;
    claw_gateway::auth::Auth::load(args.gateway.tokens.as_deref())?;
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("creating data directory {}", args.data.display()))?;
    let data = args.data.canonicalize()?;

    let mut server = None;
    let nats_url = match &args.nats_url {
        Some(url) => url.clone(),
        None => {
            let started = start_nats(data.join("nats"), args.nats_port).await?;
            let url = started.url();
            server = Some(started);
            url
        }
    };

    let result = serve(&args, &data, &nats_url, worker_config, shutdown).await;
    if let Some(mut server) = server {
        tokio::task::spawn_blocking(move || server.stop(Duration::from_secs(10))).await?;
    }
    result
}

/// NATS's own port, which `claw up` prefers so that `nats` CLI defaults reach it.
const NATS_DEFAULT_PORT: u16 = 4222;

/// Starts the embedded nats-server on `port` (see [`UpArgs::nats_port`]).
async fn start_nats(dir: PathBuf, port: Option<u16>) -> anyhow::Result<NatsServer> {
    let start = move |port: Option<u16>| {
        let mut options = nats_server::Options::in_dir(dir.clone());
        options.port = port;
        async move { tokio::task::spawn_blocking(move || NatsServer::start(options)).await }
    };
    let started = match port {
        Some(0) => start(None).await?,
        Some(port) => start(Some(port)).await?,
        None => match start(Some(NATS_DEFAULT_PORT)).await? {
            Err(e) if e.is_address_in_use() => {
                tracing::info!(
                    "port {NATS_DEFAULT_PORT} is taken; the embedded nats-server takes a free one"
                );
                start(None).await?
            }
            started => started,
        },
    };
    started.context("starting the embedded nats-server")
}

async fn serve(
    args: &UpArgs,
    data: &std::path::Path,
    nats_url: &str,
    worker_config: claw_worker::Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let client = connect::connect(&NatsArgs::url(nats_url), "claw-up").await?;
    let settings =
        Settings { ack_wait_s: Some(worker_config.ack_deadline_s), ..args.topology.clone() };
    let topology = topology::ensure_at_start(&connect::jetstream(client), &settings).await?;
    let listener = tokio::net::TcpListener::bind(args.http)
        .await
        .with_context(|| format!("binding {}", args.http))?;
    let http = listener.local_addr()?;

    // Before any service starts, so the worker's and the archiver's first counts are kept: all
    // three record into this process's one recorder, shown by the gateway's `/metrics`.
    claw_proto::metrics::install();
    let mut services = JoinSet::new();
    let (t, token) = (topology.clone(), shutdown.child_token());
    let gateway = args.gateway.clone();
    services.spawn(async move {
        (
            "gateway",
            claw_gateway::run(t, gateway, listener, token).await.map_err(anyhow::Error::from),
        )
    });
    let (t, token) = (topology.clone(), shutdown.child_token());
    services.spawn(async move {
        ("worker", claw_worker::run(t, worker_config, token).await.map_err(anyhow::Error::from))
    });
    let archiver = claw_archiver::Config {
        db: data.join("archive.sqlite"),
        batch_max: 256,
        batch_wait_ms: 20,
        retention: args.retention.clone(),
        reconcile: args.reconcile.clone(),
    };
    let (t, token) = (topology.clone(), shutdown.child_token());
    services.spawn(async move {
        ("archiver", claw_archiver::run(t, archiver, token).await.map_err(anyhow::Error::from))
    });

    println!("OpenClaw is up: http://{http}/");
    println!("  NATS:  {nats_url}");
    println!("  data:  {}", data.display());
    println!("Ctrl-C stops it.");

    // The first service to stop (with an error, or because of the signal) stops the rest.
    let mut failure = None;
    if let Some(Ok((name, Err(e)))) = services.join_next().await {
        failure = Some(e.context(format!("{name} failed")));
    }
    shutdown.cancel();
    let drained = tokio::time::timeout(STOP_DEADLINE, async {
        while let Some(joined) = services.join_next().await {
            if let Ok((name, Err(e))) = joined {
                tracing::error!(service = name, error = %e, "stopped with an error");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("services did not stop within {STOP_DEADLINE:?}; leaving them");
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
