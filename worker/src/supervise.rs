//! The supervise stage of a delivery ([`crate::attempt`]): runs the handler of a started attempt
//! until it returns or is stopped, and says how it ended ([`Outcome`]).
//!
//! Meanwhile it keeps the message (an in-progress ack every third of the ack deadline, paused
//! or not), publishes what the handler reported (coalesced, [`FLUSH_INTERVAL`]), saves progress
//! in the record (at most every [`PROGRESS_SAVE`]), and watches five clocks: the attempt's
//! timeout (which stands still while the paused handler does: parked at a checkpoint, or its
//! child frozen; a paused handler that runs on runs on its clock), the task's absolute
//! deadline, the lease (the worker's contact with the server), the drain deadline, and the
//! abort after a stop.
//!
//! The worker's memory cap ([`crate::memory`]) reaches an attempt whose handler runs in this
//! process through its registration: chosen as the largest, it is woken and stops with
//! [`Stop::Limit`].
//!
//! Control (cancel, pause, resume) reaches a running attempt through its record: the gateway
//! compare-and-sets the record, then wakes the worker ([`crate::control`]). The attempt
//! re-reads its record on a wake-up, on every heartbeat (so a lost wake-up costs one heartbeat),
//! and when one of its own writes meets a newer revision; see [`look`]. Only a record naming
//! another attempt means this one is superseded; a newer revision of its own is simply the
//! gateway's word to follow.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::connection::State;
use claw_proto::{Class, Progress, Status, TaskError, records};
use tokio::time::{Instant, MissedTickBehavior, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::attempt::{Delivery, Held, Worker, now, same_attempt};
use crate::child;
use crate::control::Registration;
use crate::events::{self, FLUSH_INTERVAL};
use crate::handler::Context;
use crate::outcome::{Outcome, Stop};

/// How often an attempt's lease watcher looks at the worker's contact with the server.
const LEASE_CHECK: Duration = Duration::from_millis(250);
/// Progress is saved in the record at most this often (events carry every flush).
const PROGRESS_SAVE: Duration = Duration::from_secs(1);
/// After a stop, the handler gets the kill grace plus this before its task is aborted.
const ABORT_SLACK: Duration = Duration::from_secs(1);

/// Runs the handler (in-process, or in a child for the long class) until it returns or the
/// attempt is stopped, keeping the message and the record alive meanwhile, and following the
/// record's control states (cancel, pause, resume).
pub(crate) async fn supervise(d: &Delivery, held: &mut Held, control: &Registration) -> Outcome {
    let w = &d.worker;
    let mut task = held.record.clone();
    let Some(handler) = w.registry.get(&task.kind) else {
        let message = format!("this worker has no handler for kind {:?}", task.kind);
        return Outcome::Failed(TaskError::new("unknown_kind", message, false));
    };
    // The handler sees the input itself, even when the record only refers to it.
    if task.input_ref.is_some() {
        match w.payloads.input_of(&task).await {
            Ok(input) => task.input = input,
            Err(e) => return Outcome::Failed(input_error(e)),
        }
    }
    let limits = w.config.isolation.for_attempt(task.timeout_s, w.child_user);
    let ctx = Context::new(CancellationToken::new()).with_child_limits(limits);
    let in_child =
        task.class == Class::Long && !handler.spawns_process() && handler.runs_in_child();
    if !in_child && !handler.spawns_process() {
        // Its memory is the worker's: a candidate for the memory cap ([`crate::memory`]).
        control.runs_in_process(&ctx);
    }
    let mut join = {
        let (ctx, runner, grace) = (ctx.clone(), w.runner.clone(), w.config.kill_grace());
        tokio::spawn(async move {
            if in_child {
                child::run_in_child(&runner, &task, &ctx, grace).await
            } else {
                handler.run(&task, &ctx).await
            }
        })
    };

    let start = Instant::now();
    // The effective limit is min(timeout_s, deadline - now), kept as two timers so the stop
    // says which ran out: only the attempt's own timeout is worth a retry.
    let mut clock = AttemptClock::new(Duration::from_secs(held.record.timeout_s));
    let mut parked = ctx.watch_parked();
    let to_deadline = Duration::try_from(held.record.deadline - now()).unwrap_or_default();
    let deadline = tokio::time::sleep(to_deadline);
    // Three beats per deadline: one lost or late heartbeat does not cost the message.
    let beat = w.ack_deadline / 3;
    let mut heartbeat = tokio::time::interval_at(start + beat, beat);
    let mut flush = tokio::time::interval_at(start + FLUSH_INTERVAL, FLUSH_INTERVAL);
    let mut lease = tokio::time::interval_at(start + LEASE_CHECK, LEASE_CHECK);
    for timer in [&mut heartbeat, &mut flush, &mut lease] {
        timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    }
    let lease_lost = Arc::new(AtomicBool::new(false));
    let _lease_watch = watch_lease(w.clone(), ctx.clone(), lease_lost.clone());
    // `running` is announced with the first flush, not at the start: a task that ends before
    // it (most short ones) sends one event, its end, instead of two.
    let mut running = RunningNews::default();
    let mut stopping = Stopping::default();
    let mut saver = ProgressSaver::default();
    // Set by whatever suggests the record changed; the look happens once, after the select.
    let mut look_now = false;
    tokio::pin!(deadline);

    let joined = loop {
        tokio::select! {
            joined = &mut join => break joined,
            () = clock.expired(), if stopping.why.is_none() && clock.is_running() => {
                // Both limits at once: the deadline is what counts, a retry could not start.
                if now() >= held.record.deadline {
                    tracing::warn!(deadline = %held.record.deadline, "task ran past its deadline");
                    stopping.why = Some(Stop::Deadline);
                } else {
                    tracing::warn!(timeout_s = held.record.timeout_s, "attempt timed out");
                    stopping.why = Some(Stop::Timeout);
                }
            }
            () = &mut deadline, if stopping.why.is_none() => {
                // The deadline runs on while paused: it is absolute, queueing included.
                tracing::warn!(deadline = %held.record.deadline, "task ran past its deadline");
                stopping.why = Some(Stop::Deadline);
            }
            () = w.hand_back.cancelled(), if stopping.why.is_none() => {
                tracing::info!("drain deadline passed; handing the task back");
                stopping.why = Some(Stop::Shutdown);
            }
            _ = parked.changed() => {
                // Stands still only while the handler does, whatever the record says.
                if *parked.borrow_and_update() > 0 { clock.pause() } else { clock.resume() }
            }
            () = control.woken() => match control.limit() {
                // The worker's memory cap chose this attempt; a record look can wait.
                Some(limit) if stopping.why.is_none() => {
                    tracing::warn!(?limit, "stopped to bring the worker under its memory cap");
                    stopping.why = Some(Stop::Limit(limit));
                }
                _ => look_now = true,
            },
            _ = lease.tick() => {
                if lease_lost.load(Ordering::SeqCst) && stopping.why.is_none() {
                    stopping.why = Some(Stop::LeaseLost);
                }
            }
            _ = heartbeat.tick() => {
                // Paused or not: a paused task keeps its lease, so it is not redelivered
                // however long it stays paused.
                d.heartbeat().await;
                look_now = true;
            }
            _ = flush.tick() => {
                let pending = ctx.take();
                saver.reported(pending.progress.as_ref());
                running.tell(w, &held.record).await;
                let untold = events::flush(&w.client, &w.shares, &held.record, pending, false);
                ctx.untold(untold.await);
                // A paused record takes no progress; it is saved after the resume.
                if stopping.why.is_none() && !ctx.is_paused() && !saver.save(d, held).await {
                    look_now = true;
                }
            }
            () = stopping.abort(), if stopping.abort_armed() => {
                tracing::warn!("handler did not stop within the kill grace; aborting it");
                join.abort();
                stopping.aborted = true;
            }
        }
        if look_now && stopping.why.is_none() {
            look_now = false;
            match look(d, held).await {
                Look::Run if ctx.is_paused() => {
                    tracing::info!("task resumed");
                    ctx.set_paused(false);
                }
                Look::Pause if !ctx.is_paused() => {
                    tracing::info!("task paused");
                    ctx.set_paused(true);
                }
                Look::Stop(why) => {
                    match why {
                        Stop::Cancelled => tracing::info!("task cancelled; stopping"),
                        _ => tracing::warn!("another attempt took the task over; stopping"),
                    }
                    stopping.why = Some(why);
                }
                Look::Run | Look::Pause | Look::Unknown => {}
            }
        }
        stopping.begin(&ctx, w.config.kill_grace() + ABORT_SLACK);
    };
    control.handler_ended();
    if stopping.why.is_none() && lease_lost.load(Ordering::SeqCst) {
        // The watcher stopped the handler before the loop saw the flag.
        stopping.why = Some(Stop::LeaseLost);
    }
    // Everything reported goes out before the terminal events, so order holds; the latest
    // progress rides along with the terminal write, which starts from this record.
    let last = ctx.take();
    if let Some(progress) = last.progress.clone().or(saver.unsaved) {
        held.record.progress = Some(progress);
    }
    // An attempt that lasted past the first flush (paused through it, say) or reported
    // something is announced running before its end all the same.
    if !last.is_empty() || start.elapsed() >= FLUSH_INTERVAL {
        running.tell(w, &held.record).await;
    }
    events::flush(&w.client, &w.shares, &held.record, last, true).await;
    if let Some(stop) = stopping.why {
        return Outcome::Stopped(stop);
    }
    match joined {
        Ok(Ok(value)) => Outcome::Done(value),
        Ok(Err(error)) => Outcome::Failed(error),
        Err(e) => Outcome::Failed(TaskError::new("panic", format!("handler: {e}"), true)),
    }
}

/// Why a stored input could not be had: retryable only while the bucket is unavailable.
fn input_error(e: claw_proto::payloads::Error) -> TaskError {
    use claw_proto::payloads::Error as E;
    let retryable = matches!(e, E::Unavailable(_));
    TaskError::new("input_unavailable", format!("the task's stored input: {e}"), retryable)
}

/// Watches the worker's contact with the server on its own task, and stops the handler (kills
/// the child, without grace) when it has been silent for two thirds of the ack deadline: the
/// supervise loop may be stuck in a NATS call while the server is unreachable, and the attempt
/// must be dead before the server can redeliver its message elsewhere, a third of a deadline
/// later.
fn watch_lease(w: Arc<Worker>, ctx: Context, lost: Arc<AtomicBool>) -> AbortOnDropHandle<()> {
    let lease_limit = w.ack_deadline * 2 / 3;
    AbortOnDropHandle::new(tokio::spawn(async move {
        let mut tick = tokio::time::interval(LEASE_CHECK);
        loop {
            tick.tick().await;
            let silence = w.contact.silence();
            if silence > lease_limit {
                let down = w.client.connection_state() != State::Connected;
                tracing::warn!(
                    ?silence,
                    down,
                    "NATS unreachable too long to heartbeat; lease lost"
                );
                lost.store(true, Ordering::SeqCst);
                ctx.cancel_now();
                return;
            }
        }
    }))
}

/// Why and since when the attempt is being stopped.
struct Stopping {
    why: Option<Stop>,
    /// The handler was told (its context cancelled) and the abort timer armed.
    begun: bool,
    /// Its task was aborted for not stopping within the grace.
    aborted: bool,
    abort: Pin<Box<Sleep>>,
}

impl Default for Stopping {
    fn default() -> Stopping {
        Stopping {
            why: None,
            begun: false,
            aborted: false,
            // Armed by `begin`; until then far off (a year) and not polled.
            abort: Box::pin(tokio::time::sleep(Duration::from_secs(86_400 * 365))),
        }
    }
}

impl Stopping {
    /// Once there is a reason, tells the handler (once) and gives it `grace` before the abort.
    /// A superseded attempt gets no grace: another attempt owns the task now, and its handler
    /// starts as soon as this one's child is gone ([`crate::claim::TAKEOVER_FENCE`]).
    fn begin(&mut self, ctx: &Context, grace: Duration) {
        if self.why.is_some() && !self.begun {
            self.begun = true;
            if self.why == Some(Stop::Superseded) {
                ctx.cancel_now();
            } else {
                ctx.cancel();
            }
            self.abort.as_mut().reset(Instant::now() + grace);
        }
    }

    fn abort_armed(&self) -> bool {
        self.begun && !self.aborted
    }

    async fn abort(&mut self) {
        self.abort.as_mut().await
    }
}

/// The latest progress the handler reported and whether it is in the record yet.
#[derive(Default)]
struct ProgressSaver {
    unsaved: Option<Progress>,
    last_save: Option<Instant>,
}

impl ProgressSaver {
    fn reported(&mut self, progress: Option<&Progress>) {
        if let Some(progress) = progress {
            self.unsaved = Some(progress.clone());
        }
    }

    /// Saves the unsaved progress if a save is due. Returns false when the record changed
    /// since the attempt last read it (a control verb, or another attempt): look at it then.
    async fn save(&mut self, d: &Delivery, held: &mut Held) -> bool {
        let due = self.last_save.is_none_or(|t| t.elapsed() >= PROGRESS_SAVE);
        let Some(progress) = self.unsaved.clone().filter(|_| due) else { return true };
        self.last_save = Some(Instant::now());
        let mut next = held.record.clone();
        if next.report_progress(progress).is_err() {
            return true; // not running (paused): nothing to save
        }
        match d.worker.records.update(&next, held.revision).await {
            Ok(revision) => {
                *held = Held { record: next, revision };
                self.unsaved = None;
                true
            }
            Err(records::Error::Conflict) => false,
            Err(e) => {
                tracing::debug!(error = %e, "could not save progress");
                true
            }
        }
    }
}

/// What the record asks of the attempt that holds it ([`look`]).
pub(crate) enum Look {
    /// Run (again, if it was paused).
    Run,
    /// Pause: freeze the child, hold the handler at its next checkpoint, keep the lease.
    Pause,
    Stop(Stop),
    /// The record could not be read; carry on as before.
    Unknown,
}

/// Re-reads the record and says what it asks of this attempt, which holds the task. The
/// fence is the attempt's identity, not the revision: a newer revision naming this attempt is
/// the gateway's (or this attempt's own) word, and `held` moves on to it.
pub(crate) async fn look(d: &Delivery, held: &mut Held) -> Look {
    let stored = match d.worker.records.read(&d.id).await {
        Ok(Some(stored)) => stored,
        // Gone (deleted by hand) or unreadable: nothing to act on; the next heartbeat looks
        // again, and the terminal write decides.
        Ok(None) => return Look::Unknown,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the record to reconcile");
            return Look::Unknown;
        }
    };
    let record = stored.record;
    if !same_attempt(&record, &held.record) {
        if record.message_seq.is_some_and(|live| live != d.stream_seq) {
            // Cancelled and retried: the task lives on in another message, so this one is
            // finished for good and is withdrawn (TERM, no write) like a cancel.
            return Look::Stop(Stop::Cancelled);
        }
        return Look::Stop(Stop::Superseded);
    }
    let look = if record.status == Status::Running {
        Look::Run
    } else if record.paused_while_running() {
        Look::Pause
    } else {
        // Cancelled by a user; or cancelled and already retried (queued again, with a new
        // message); or its hold released after a lost lease. Either way not this attempt's to
        // run any more, and whoever moved it wrote the record.
        Look::Stop(Stop::Cancelled)
    };
    *held = Held { record, revision: stored.revision };
    look
}

/// An attempt's own timeout, which stands still while the attempt is parked (its handler waits
/// at a checkpoint of a paused task, or its child is frozen): the time left is kept when it
/// parks and the timer re-armed with it when it moves again.
struct AttemptClock {
    timer: Pin<Box<Sleep>>,
    left: Duration,
    /// When the timer was last armed; `None` while paused.
    armed_at: Option<Instant>,
}

impl AttemptClock {
    fn new(limit: Duration) -> AttemptClock {
        let now = Instant::now();
        AttemptClock {
            timer: Box::pin(tokio::time::sleep(limit)),
            left: limit,
            armed_at: Some(now),
        }
    }

    fn is_running(&self) -> bool {
        self.armed_at.is_some()
    }

    /// Resolves when the time is up; only poll it while running.
    async fn expired(&mut self) {
        self.timer.as_mut().await
    }

    fn pause(&mut self) {
        if let Some(at) = self.armed_at.take() {
            self.left = self.left.saturating_sub(at.elapsed());
        }
    }

    fn resume(&mut self) {
        if self.armed_at.is_none() {
            let now = Instant::now();
            self.armed_at = Some(now);
            self.timer.as_mut().reset(now + self.left);
        }
    }
}

/// Whether the attempt's `running` status has gone out: once, with the first flush that finds
/// the record running, or before the last flush when the attempt lasted past the first or the
/// handler reported anything.
#[derive(Debug, Default)]
struct RunningNews {
    told: bool,
}

impl RunningNews {
    async fn tell(&mut self, w: &Worker, record: &claw_proto::TaskRecord) {
        if !self.told && record.status == Status::Running {
            self.told = true;
            events::status(&w.client, record).await;
        }
    }
}
