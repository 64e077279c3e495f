//! Prometheus metrics shared by every binary: one process-wide recorder, installed on first use,
//! scrape hooks that refresh gauges just before rendering, and a tiny `GET /metrics` server for
//! the processes that have no HTTP API of their own (`claw-worker --metrics`,
//! `claw-archiver --metrics`).
//!
//! The `metrics` facade has one global recorder per process; `claw up` and the tests run several
//! services in one process, so installation is idempotent and every service records into the same
//! recorder (the gateway's `/metrics` then shows all of them). Without a recorder the `metrics`
//! macros are no-ops, so a process that exports nothing pays nothing.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Latency buckets for `*_seconds` (submit, commit): the targets are milliseconds.
const LATENCY_BUCKETS: &[f64] =
    &[0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// Attempt durations go from milliseconds (short tasks) to hours (long ones).
const ATTEMPT_BUCKETS: &[f64] =
    &[0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 14_400.0];

/// The worker's attempt-duration histogram, which gets [`ATTEMPT_BUCKETS`].
pub const ATTEMPT_SECONDS: &str = "claw_worker_attempt_seconds";

/// How long one scrape hook may take before the render goes on without it.
const HOOK_TIMEOUT: Duration = Duration::from_secs(2);

/// Installs the recorder if no other is installed yet.
pub fn install() {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(ATTEMPT_SECONDS.into()), ATTEMPT_BUCKETS)
            .ok()?
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .ok()?;
        builder.install_recorder().ok()
    });
}

type HookFn = dyn Fn() -> BoxFuture<'static, ()> + Send + Sync;

static HOOKS: Mutex<Vec<(u64, Arc<HookFn>)>> = Mutex::new(Vec::new());
static NEXT_HOOK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn hooks() -> std::sync::MutexGuard<'static, Vec<(u64, Arc<HookFn>)>> {
    HOOKS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A registered scrape hook; dropping it unregisters the hook.
#[must_use = "the hook is unregistered when this is dropped"]
#[derive(Debug)]
pub struct ScrapeHook(u64);

impl Drop for ScrapeHook {
    fn drop(&mut self) {
        hooks().retain(|(id, _)| *id != self.0);
    }
}

/// Runs `refresh` before every [`render`] (for gauges read from elsewhere: a semaphore, a
/// consumer's `num_pending`, the RSS), until the returned guard is dropped.
pub fn on_scrape<F, Fut>(refresh: F) -> ScrapeHook
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let id = NEXT_HOOK.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let hook: Arc<HookFn> = Arc::new(move || Box::pin(refresh()));
    hooks().push((id, hook));
    ScrapeHook(id)
}

/// Runs the scrape hooks, then renders every metric in the Prometheus text format (empty if no
/// recorder could be installed).
pub async fn render() -> String {
    install();
    let pending: Vec<Arc<HookFn>> = hooks().iter().map(|(_, h)| h.clone()).collect();
    futures::future::join_all(pending.iter().map(|hook| async move {
        let _ = tokio::time::timeout(HOOK_TIMEOUT, hook()).await;
    }))
    .await;
    HANDLE.get().and_then(Option::as_ref).map(PrometheusHandle::render).unwrap_or_default()
}

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// A `GET /metrics` server on its own task; stops when dropped.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    /// [`Server::bind`] when a `--metrics ADDR` was given; nothing (and no recorder) otherwise.
    pub async fn bind_if(addr: Option<SocketAddr>) -> std::io::Result<Option<Server>> {
        match addr {
            Some(addr) => Server::bind(addr).await.map(Some),
            None => Ok(None),
        }
    }

    /// Installs the recorder and serves `/metrics` on `addr` (port 0: any free port).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Server> {
        install();
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(|| async {
                ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], render().await)
            }),
        );
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
        tracing::info!(%addr, "serving /metrics");
        Ok(Server { addr, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hooks_run_before_render_until_dropped() {
        let hook = on_scrape(|| async {
            metrics::gauge!("claw_test_hooked").set(7.0);
        });
        let text = render().await;
        assert!(text.contains("claw_test_hooked 7"), "{text}");
        drop(hook);
        assert!(hooks().is_empty());
        metrics::histogram!(ATTEMPT_SECONDS, "class" => "long").record(100.0);
        let text = render().await;
        assert!(
            text.contains("claw_worker_attempt_seconds_bucket{class=\"long\",le=\"120\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn server_serves_metrics() {
        let server = Server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        metrics::counter!("claw_test_served_total").increment(1);
        let mut stream = tokio::net::TcpStream::connect(server.local_addr()).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).await.unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("claw_test_served_total 1"), "{body}");
    }
}
