//! The stop signal every binary listens for: Ctrl-C (SIGINT) or SIGTERM.

use tokio_util::sync::CancellationToken;

/// Resolves on the first SIGINT or SIGTERM. If SIGTERM cannot be hooked (it always can on
/// Linux), Ctrl-C alone stops the process.
pub async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
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
}

/// A token cancelled by the first SIGINT or SIGTERM: what every `main` hands to its `run`.
pub fn cancel_on_shutdown() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        shutdown().await;
        tracing::info!("stop signal: shutting down");
        cancel.cancel();
    });
    token
}
