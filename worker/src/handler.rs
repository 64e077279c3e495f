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
//!
//! A pause only takes effect where the handler stops: at a checkpoint, or in a frozen child.
//! The context counts those stops (it is *parked*), and the attempt's timeout stands still only
//! while it is, so a paused handler that never reaches a checkpoint keeps running on its clock
//! and times out like any other.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use claw_proto::kinds::Catalog;
use claw_proto::{Class, Progress, TaskError, TaskRecord};
use futures::future::BoxFuture;
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::limits::ChildLimits;

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

    /// Whether long-class tasks of this kind may run in a `__run-task` child. A kind that needs
    /// the worker's configuration or secrets (the `llm` endpoint and key), which a child does
    /// not get, answers false and runs in-process in either class; it only waits on a socket.
    fn runs_in_child(&self) -> bool {
        true
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
    /// Output bytes dropped and not yet told in an event: over the buffer, or over the
    /// session's share of the event history ([`crate::shares`]).
    pub dropped: u64,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.progress.is_none() && self.output.is_empty() && self.dropped == 0
    }
}

/// Most output bytes buffered between two flushes of an attempt (about 2.5 MB/s per task at
/// the flush rate); also keeps each `output` event well under NATS's 1 MB payload limit.
pub const MAX_PENDING_OUTPUT: usize = 256 * 1024;

/// What a context buffers: the reports, and how much output did not fit.
#[derive(Debug, Default)]
struct Buffer {
    pending: Pending,
    dropped: u64,
}

/// A handler's view of its attempt: report progress and output, observe cancellation and pause.
#[derive(Clone, Debug)]
pub struct Context {
    cancel: CancellationToken,
    // A std mutex: reports are tiny critical sections that never cross an await, and handlers
    // can report from sync code.
    pending: Arc<Mutex<Buffer>>,
    /// The limits of child processes this attempt starts ([`crate::process::run`]).
    limits: Option<ChildLimits>,
    /// Set with the cancellation when there is no time for a grace period (a lost lease):
    /// child processes are killed at once.
    urgent: Arc<AtomicBool>,
    // A watch rather than a flag: waiters (checkpoints, the process supervisor) wake on change.
    paused: Arc<watch::Sender<bool>>,
    /// How many places of the attempt stand still for the pause right now: checkpoints waiting,
    /// a frozen child. A watch so the supervisor can stop and restart the timeout with it.
    parked: Arc<watch::Sender<usize>>,
    /// The bytes the handler says it holds ([`Context::report_memory`]).
    memory: Arc<AtomicU64>,
}

/// One place where an attempt stands still for its pause; counted in its [`Context`] until
/// dropped.
#[derive(Debug)]
pub(crate) struct Parked(Arc<watch::Sender<usize>>);

impl Drop for Parked {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Context {
    pub fn new(cancel: CancellationToken) -> Context {
        Context {
            cancel,
            pending: Arc::default(),
            limits: None,
            urgent: Arc::default(),
            paused: Arc::new(watch::Sender::new(false)),
            parked: Arc::new(watch::Sender::new(0)),
            memory: Arc::default(),
        }
    }

    /// The same context, whose child processes get `limits`.
    pub fn with_child_limits(mut self, limits: ChildLimits) -> Context {
        self.limits = Some(limits);
        self
    }

    /// The limits child processes of this attempt get (none when not run by a worker).
    pub fn child_limits(&self) -> Option<ChildLimits> {
        self.limits
    }

    /// Reports progress; `fraction` is clamped to 0..=1. Only the latest report of a burst is
    /// published.
    pub fn progress(&self, fraction: f64, message: Option<String>) {
        let fraction = if fraction.is_finite() { fraction.clamp(0.0, 1.0) } else { 0.0 };
        self.lock().pending.progress = Some(Progress { fraction, message });
    }

    /// Streams text; bursts are concatenated into one `output` event. At most
    /// [`MAX_PENDING_OUTPUT`] bytes wait between two flushes; the rest is dropped (and counted
    /// in a note in the next event), so a program that prints gigabytes costs the worker a
    /// bounded buffer, not its memory.
    pub fn output(&self, text: &str) {
        let mut buffer = self.lock();
        let room = MAX_PENDING_OUTPUT.saturating_sub(buffer.pending.output.len());
        if text.len() <= room {
            buffer.pending.output.push_str(text);
            return;
        }
        let mut cut = room;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        buffer.pending.output.push_str(&text[..cut]);
        buffer.dropped += (text.len() - cut) as u64;
    }

    /// Says how many bytes this attempt holds now (its buffers, a model, a document), for a
    /// handler that knows. When the worker is over its memory cap it stops the in-process
    /// attempt that reports the most; without reports, the one started last. Memory a handler
    /// allocates is not otherwise attributable to it: Rust's allocator does not count per task.
    pub fn report_memory(&self, bytes: u64) {
        self.memory.store(bytes, Ordering::Relaxed);
    }

    /// Where [`Context::report_memory`] writes; for the worker's registry of attempts.
    pub(crate) fn memory_report(&self) -> Arc<AtomicU64> {
        self.memory.clone()
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

    /// Cancels without a grace period: child processes get SIGKILL, not SIGTERM first.
    pub(crate) fn cancel_now(&self) {
        self.urgent.store(true, Ordering::SeqCst);
        self.cancel.cancel()
    }

    /// Whether the cancellation allows no grace period ([`Context::cancel_now`]).
    pub(crate) fn is_urgent(&self) -> bool {
        self.urgent.load(Ordering::SeqCst)
    }

    /// Waits while the task is paused; returns at once when it is not, and as soon as the
    /// attempt is cancelled (a paused task can be cancelled, and must then stop, not wait).
    /// While it waits, the attempt's timeout stands still.
    pub async fn checkpoint(&self) {
        if !*self.paused.borrow() {
            return;
        }
        let mut paused = self.paused.subscribe();
        let _parked = self.park();
        tokio::select! {
            _ = paused.wait_for(|p| !*p) => {}
            () = self.cancel.cancelled() => {}
        }
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Whether the attempt stands still: a checkpoint waits, or its child is frozen.
    pub fn is_parked(&self) -> bool {
        *self.parked.borrow() > 0
    }

    /// Counts a place where the attempt stands still, until the guard is dropped.
    pub(crate) fn park(&self) -> Parked {
        self.parked.send_modify(|n| *n += 1);
        Parked(self.parked.clone())
    }

    /// Follows how many places stand still; for the supervisor, which stops the attempt's
    /// timeout while any does.
    pub(crate) fn watch_parked(&self) -> watch::Receiver<usize> {
        self.parked.subscribe()
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
        let mut buffer = self.lock();
        let mut pending = std::mem::take(&mut buffer.pending);
        pending.dropped = std::mem::take(&mut buffer.dropped);
        pending
    }

    /// Output bytes a flush dropped without telling: the next event says so.
    pub(crate) fn untold(&self, bytes: u64) {
        self.lock().dropped += bytes;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buffer> {
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

    #[test]
    fn output_between_flushes_is_bounded() {
        let ctx = Context::new(CancellationToken::new());
        let chunk = "é".repeat(50_000); // 100 kB, two bytes a char
        for _ in 0..100 {
            ctx.output(&chunk);
        }
        let p = ctx.take();
        assert!(p.output.len() <= MAX_PENDING_OUTPUT, "{}", p.output.len());
        assert_eq!(p.output.len() as u64 + p.dropped, 100 * chunk.len() as u64);
        ctx.output("next");
        let p = ctx.take();
        assert_eq!((p.output.as_str(), p.dropped), ("next", 0));
    }

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
        let mut parked = ctx.watch_parked();
        tokio::time::timeout(Duration::from_secs(1), parked.wait_for(|&n| n == 1))
            .await
            .unwrap()
            .unwrap();
        assert!(!waiting.is_finished(), "a paused checkpoint waits");
        assert!(ctx.is_paused() && ctx.is_parked());
        ctx.set_paused(false);
        tokio::time::timeout(Duration::from_secs(1), waiting).await.unwrap().unwrap();
        assert!(!ctx.is_parked(), "a checkpoint that returned stands still no more");

        ctx.set_paused(true);
        ctx.cancel();
        tokio::time::timeout(Duration::from_secs(1), ctx.checkpoint()).await.unwrap();
    }
}
