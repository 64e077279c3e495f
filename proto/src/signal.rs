//! The stop signal every binary listens for: Ctrl-C (SIGINT) or SIGTERM.

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
