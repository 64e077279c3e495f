//! `claw-gateway`: the gateway as its own process (production layout). Parses configuration,
//! refuses a public address without API tokens and a tokens file that does not parse (before
//! touching NATS, so the mistake is the first thing said), connects to NATS, ensures the topology, binds the HTTP address and calls
//! [`claw_gateway::run`] until SIGINT or SIGTERM. The NATS secrets it was given in variables
//! leave its environment before any thread starts (`claw_proto::secrets`).

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use claw_proto::connect::{self, NatsArgs};
use claw_proto::topology::{self, Settings};

#[derive(Debug, Parser)]
#[command(name = "claw-gateway", version, about = "OpenClaw gateway: HTTP and NATS front door")]
struct Cli {
    /// Address to serve HTTP on. Without API tokens (--tokens) only a loopback address is
    /// accepted.
    #[arg(long, env = "CLAW_HTTP", default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    topology: Settings,
    #[command(flatten)]
    gateway: claw_gateway::Config,
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
    cli.gateway.check_exposure(cli.http)?;
    claw_gateway::auth::Auth::load(cli.gateway.tokens.as_deref())?;
    let client = connect::connect(&cli.nats, "claw-gateway").await?;
    let topology = topology::ensure_at_start(&connect::jetstream(client), &cli.topology).await?;
    let listener = tokio::net::TcpListener::bind(cli.http)
        .await
        .with_context(|| format!("binding {}", cli.http))?;
    let shutdown = claw_proto::signal::cancel_on_shutdown();
    claw_gateway::run(topology, cli.gateway, listener, shutdown).await?;
    Ok(())
}
