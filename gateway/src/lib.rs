//! The gateway: the front door of OpenClaw. It accepts a task over HTTP or NATS request/reply,
//! stores it in JetStream, and answers with the task's id as soon as JetStream has it; it never
//! waits for the work itself.
//!
//! Reading order: [`config`], [`app`] (shared state), [`auth`] (API tokens, principals, who
//! sees what), [`quota`] (what one principal may take), [`tickets`] (single-use WebSocket tickets), [`tasks`] (the operations, the submit hot
//! path), [`control`] (cancel, pause, resume, retry), [`lanes`] (lane depth and pause), [`http`]
//! (axum routes), [`nats_api`] (the same operations as a NATS service), [`ws`] (live events of
//! a session), [`ui`] (the embedded web page), [`error`] (one error type, one mapping to
//! responses), [`metrics`].

pub mod app;
pub mod auth;
pub mod browser;
pub mod config;
pub mod control;
pub mod error;
pub mod http;
pub mod lanes;
pub mod metrics;
pub mod nats_api;
pub mod quota;
pub mod tasks;
pub mod tickets;
pub mod ui;
pub mod ws;

use claw_proto::topology::Topology;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use app::App;
pub use config::Config;
pub use error::Error;
pub use http::router;

/// How long shutdown waits for WebSockets to take their closing frame (1012, "reconnect with
/// since").
const WS_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves HTTP on `listener` and the NATS API until `shutdown` is cancelled. The topology must
/// already be ensured (the binary's `main` or `claw up` does it). Refuses a listener beyond
/// loopback without API tokens ([`Config::check_exposure`]) and a tokens file that does not
/// parse.
pub async fn run(
    topology: Topology,
    mut config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    if let Ok(addr) = listener.local_addr() {
        config.check_exposure(addr)?;
        config.bound = Some(addr);
    }
    metrics::install();
    let app = App::new(topology, config).await?;
    if !app.auth.is_on() {
        tracing::info!("no API tokens: every caller sees and controls every task");
    }
    let nats = tokio::spawn(nats_api::serve(app.clone(), shutdown.clone()));
    tokio::spawn(quota::refresh(app.clone(), shutdown.clone()));
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, "gateway listening");
    let http_shutdown = shutdown.clone();
    let ws = ws::Hub::new(&app, shutdown.clone());
    axum::serve(listener, router(app).layer(axum::Extension(ws.clone())))
        .with_graceful_shutdown(async move { http_shutdown.cancelled().await })
        .await
        .map_err(|e| Error::Internal(format!("HTTP server: {e}")))?;
    shutdown.cancel();
    // Upgraded connections are not HTTP requests, so `serve` does not wait for them.
    ws.closed(WS_DRAIN).await;
    match nats.await {
        Ok(result) => result,
        Err(e) => Err(Error::Internal(format!("NATS API task: {e}"))),
    }
}
