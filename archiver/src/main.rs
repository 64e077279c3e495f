//! `claw-archiver`: the archiver as its own process. Parses flags, removes the NATS secrets it
//! was given in variables from its environment (`claw_proto::secrets`), starts tracing, connects,
//! ensures the topology, turns ctrl-c / SIGTERM into a cancellation, and calls
//! [`claw_archiver::run`] (the same function `claw up` and the tests call).

use anyhow::Context;
use clap::Parser;
use claw_proto::connect::{self, NatsArgs};
use claw_proto::topology::{self, Settings};

#[derive(Debug, Parser)]
#[command(name = "claw-archiver", version, about = "Archives finished tasks into SQLite")]
struct Cli {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    settings: Settings,
    #[command(flatten)]
    config: claw_archiver::Config,
    /// Serve Prometheus metrics on `GET http://ADDR/metrics` (e.g. `0.0.0.0:9102`); off when
    /// unset.
    #[arg(long, env = "CLAW_METRICS_ADDR", value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // SAFETY: the runtime, and with it every other thread, starts below.
    #[allow(unsafe_code)]
    unsafe {
        claw_proto::secrets::scrub_env(&claw_proto::secrets::NATS_VARS);
    }
    claw_proto::logs::init();
    tokio::runtime::Runtime::new()?.block_on(serve(cli))
}

async fn serve(cli: Cli) -> anyhow::Result<()> {
    let client = connect::connect(&cli.nats, "claw-archiver")
        .await
        .map_err(|e| anyhow::anyhow!(e))
        .with_context(|| format!("connecting to NATS at {}", cli.nats.nats_url))?;
    let js = connect::jetstream(client);
    let topology =
        topology::ensure_at_start(&js, &cli.settings).await.context("ensuring the topology")?;

    let _metrics = claw_proto::metrics::Server::bind_if(cli.metrics)
        .await
        .with_context(|| format!("serving metrics on {:?}", cli.metrics))?;
    let shutdown = claw_proto::signal::cancel_on_shutdown();
    claw_archiver::run(topology, cli.config, shutdown).await?;
    Ok(())
}
