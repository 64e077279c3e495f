//! The [`Handler`] trait a task kind implements, the [`Context`] it reports through, and the
//! [`Registry`] of kinds a worker runs.
//!
//! A handler never touches NATS: it reports progress and output into its context, which only
//! buffers them (latest progress wins, output is concatenated). The attempt that owns the context
//! drains the buffer on a timer and publishes at most a few events per second, so a chatty
//! handler (LLM tokens) cannot flood NATS. Cancellation (timeout, lost lease, shutdown, a
//! user's cancel) is a token the handler observes; a user's pause is a flag an in-process
//! handler observes at its [`Context::checkpoint`]s. Child processes are killed, frozen and
//! thawed by the worker with signals instead ([`crate::process`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use claw_proto::kinds::Catalog;
use claw_proto::{Class, Progress, TaskError, TaskRecord};
use futures::future::BoxFuture;
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// A task kind. Register it in a [`Registry`] and pass that to [`crate::run_with`]; a custom
/// worker binary must also route `__run-task` to [`crate::child::run_task_main_with`] so its
/// long-class tasks can run in child processes.
pub trait Handler: Send + Sync + 'static {
    /// The `kind` of the tasks this handler runs.
    fn kind(&self) -> &str;

    /// The class a task of this kind gets when its spec says nothing.
    fn default_class(&self) -> Class {
        Class::Short
    }

    /// Whether the handler starts its own child process (as `exec` does). Long-class tasks of
    /// other kinds are run in a `__run-task` child so they are isolated from the worker.
    fn spawns_process(&self) -> bool {
        false
    }

    /// Runs one attempt. `task.attempt` is the attempt number (1-based). Return promptly once
    /// `ctx.cancelled()` fires; what is returned after that is ignored. Await
    /// `ctx.checkpoint()` between steps so a paused task stops there until resumed.
    fn run<'a>(
        &'a self,
        task: &'a TaskRecord,
        ctx: &'a Context,
    ) -> BoxFuture<'a, Result<Value, TaskError>>;
}

/// What a handler has reported since the last flush.
#[derive(Debug, Default)]
pub struct Pending {
    pub progress: Option<Progress>,
    pub output: String,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.progress.is_none() && self.output.is_empty()
    }
}

/// A handler's view of its attempt: report progress and output, observe cancellation and pause.
#[derive(Clone, Debug)]
pub struct Context {
    cancel: CancellationToken,
    // A std mutex: reports are tiny critical sections that never cross an await, and handlers
    // can report from sync code.
    pending: Arc<Mutex<Pending>>,
    // A watch rather than a flag: waiters (checkpoints, the process supervisor) wake on change.
    paused: Arc<watch::Sender<bool>>,
}

impl Context {
    pub fn new(cancel: CancellationToken) -> Context {
        Context { cancel, pending: Arc::default(), paused: Arc::new(watch::Sender::new(false)) }
    }

    /// Reports progress; `fraction` is clamped to 0..=1. Only the latest report of a burst is
    /// published.
    pub fn progress(&self, fraction: f64, message: Option<String>) {
        let fraction = if fraction.is_finite() { fraction.clamp(0.0, 1.0) } else { 0.0 };
        self.lock().progress = Some(Progress { fraction, message });
    }

    /// Streams text; bursts are concatenated into one `output` event.
    pub fn output(&self, text: &str) {
        self.lock().output.push_str(text);
    }

    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    pub(crate) fn cancel(&self) {
        self.cancel.cancel()
    }

    /// Waits while the task is paused; returns at once when it is not, and as soon as the
    /// attempt is cancelled (a paused task can be cancelled, and must then stop, not wait).
    pub async fn checkpoint(&self) {
        if !*self.paused.borrow() {
            return;
        }
        let mut paused = self.paused.subscribe();
        tokio::select! {
            _ = paused.wait_for(|p| !*p) => {}
            () = self.cancel.cancelled() => {}
        }
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Pauses (`true`) or resumes (`false`) the attempt. Returns whether that changed anything.
    pub(crate) fn set_paused(&self, paused: bool) -> bool {
        self.paused.send_if_modified(|p| std::mem::replace(p, paused) != paused)
    }

    /// Follows the pause flag; for the supervisor of a child process, which turns it into
    /// SIGSTOP / SIGCONT of the process group.
    pub(crate) fn watch_paused(&self) -> watch::Receiver<bool> {
        self.paused.subscribe()
    }

    /// Takes what was reported since the last call.
    pub(crate) fn take(&self) -> Pending {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A poisoned lock only means a reporter panicked mid-push; the data is still usable.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The kinds a worker runs, by name.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: BTreeMap<String, Arc<dyn Handler>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.handlers.keys()).finish()
    }
}

impl Registry {
    pub fn empty() -> Registry {
        Registry::default()
    }

    /// Adds a handler; a later one with the same kind replaces the earlier.
    pub fn with(mut self, handler: impl Handler) -> Registry {
        self.handlers.insert(handler.kind().to_owned(), Arc::new(handler));
        self
    }

    pub fn get(&self, kind: &str) -> Option<Arc<dyn Handler>> {
        self.handlers.get(kind).cloned()
    }

    /// The admission catalog: the built-in kinds plus every registered one with its class.
    pub fn catalog(&self) -> Catalog {
        self.handlers.values().fold(Catalog::builtin(), |c, h| c.with(h.kind(), h.default_class()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn checkpoint_waits_while_paused_and_not_once_cancelled() {
        let ctx = Context::new(CancellationToken::new());
        ctx.checkpoint().await; // not paused: returns at once
        assert!(ctx.set_paused(true));
        assert!(!ctx.set_paused(true));
        let waiting = tokio::spawn({
            let ctx = ctx.clone();
            async move { ctx.checkpoint().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a paused checkpoint waits");
        ctx.set_paused(false);
        tokio::time::timeout(Duration::from_secs(1), waiting).await.unwrap().unwrap();

        ctx.set_paused(true);
        ctx.cancel();
        tokio::time::timeout(Duration::from_secs(1), ctx.checkpoint()).await.unwrap();
    }
}
