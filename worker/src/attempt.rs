//! One delivery of a task message, from "what is this?" to its ack, inside one tracing span
//! with `task_id` and `attempt`.
//!
//! The steps: parse the spec (invalid → DLQ at once); find or create the record; decide whether
//! an attempt may start (finished → drop the duplicate, paused → drop the message until resume,
//! past the deadline or out of attempts → DLQ) and CAS it to `running`; run the handler while
//! heartbeating the message, coalescing events, saving progress, watching the timeout, the
//! deadline, the lease and the drain deadline, and reconciling with the record; then map the
//! outcome to a record transition, events and one ack ([`crate::outcome`]).
//!
//! Control (cancel, pause, resume) reaches a running attempt through its record: the gateway
//! CAS-writes the record, then wakes the worker up ([`crate::control`]). The attempt re-reads
//! its record on a wake-up, on every heartbeat (so a lost wake-up costs one heartbeat), and
//! when one of its own CAS writes meets a newer revision; see [`Delivery::look`]. Only a record
//! naming another attempt means this one is superseded; a newer revision of its own is simply
//! the gateway's word to follow.
//!
//! Attempts are counted in the record: starting one is the CAS that writes `running` with
//! `attempt + 1`, before the handler runs. A worker that dies mid-attempt leaves that write
//! behind, so a task that kills its worker every time still ends, dead-lettered, after
//! `max_attempts`. A delivery that never got as far as that write (the record could not be
//! read or written while JetStream elected a leader) is not an attempt: it is NAKed with a
//! growing delay and costs the task nothing.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, kv};
use async_nats::{Client, connection::State};
use claw_proto::event::EventBody;
use claw_proto::kinds::Catalog;
use claw_proto::spec::{Invalid, Limits, TaskSpec};
use claw_proto::topology::{Lane, headers};
use claw_proto::{Cause, Class, Progress, Status, TaskError, TaskId, TaskRecord};
use time::OffsetDateTime;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, MissedTickBehavior, Sleep};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::child;
use crate::config::Config;
use crate::control::{Controls, Registration};
use crate::dlq::{self, reason};
use crate::events::{self, FLUSH_INTERVAL};
use crate::handler::{Context, Registry};
use crate::lease::Contact;
use crate::outcome::{Decision, Outcome, Stop, ack_of, decide, label};
use crate::record::{self, KvError};

/// Rounds of read → decide → compare-and-set before giving up on a record that keeps changing.
/// A conflict means someone else wrote (the gateway's create or a control verb); a few rounds
/// settle any ordinary race, more means something is wrong and redelivery is the better retry.
const CAS_ROUNDS: usize = 8;
/// A KV read or write failed before the attempt started: the message comes back after this,
/// doubled per delivery up to [`NATS_RETRY_MAX`], rather than after the ack deadline.
const NATS_RETRY: Duration = Duration::from_secs(1);
const NATS_RETRY_MAX: Duration = Duration::from_secs(15);
/// How long a finished attempt keeps trying to write its outcome (holding the lease meanwhile)
/// while the bucket is unavailable, e.g. during a leader election, before it leaves the task
/// to redelivery, which would run it again.
const FINAL_WRITE_PATIENCE: Duration = Duration::from_secs(60);
/// Longest pause between two tries of that write.
const FINAL_WRITE_RETRY_MAX: Duration = Duration::from_secs(2);
/// How long a message waits before it is looked at again when its record is in a state this
/// code does not know (one added to the state machine later).
const UNKNOWN_RECHECK: Duration = Duration::from_secs(5);
/// How often an attempt's lease watcher looks at the worker's contact with the server.
const LEASE_CHECK: Duration = Duration::from_millis(250);
/// Progress is saved in the record at most this often (events carry every flush).
const PROGRESS_SAVE: Duration = Duration::from_secs(1);
/// After a stop, the handler gets the kill grace plus this before its task is aborted.
const ABORT_SLACK: Duration = Duration::from_secs(1);
/// Longest wait between tries of a DLQ publish. The message is only terminated once its copy is
/// stored, so the worker keeps trying (and keeps the lease) for as long as JetStream refuses.
const DLQ_RETRY_MAX: Duration = Duration::from_secs(10);

/// What every attempt of a worker shares.
#[derive(Debug)]
pub(crate) struct Worker {
    pub client: Client,
    pub js: jetstream::Context,
    pub kv: kv::Store,
    pub config: Config,
    pub registry: Registry,
    pub catalog: Catalog,
    pub limits: Limits,
    pub runner: PathBuf,
    /// The shorter of the configured and the consumers' actual ack deadline.
    pub ack_deadline: Duration,
    /// Fired when the drain deadline passes: running attempts stop and hand their message back.
    pub hand_back: CancellationToken,
    /// The attempts running here, for control wake-ups.
    pub controls: Arc<Controls>,
    /// When the server last answered; the lease of every attempt is timed by it.
    pub contact: Arc<Contact>,
}

/// Handles one delivery; `_permit` is the pool slot it occupies until it returns.
pub(crate) async fn handle(
    worker: Arc<Worker>,
    lane: Lane,
    msg: jetstream::Message,
    _permit: OwnedSemaphorePermit,
) {
    let (delivered, stream_seq, published) = match msg.info() {
        Ok(i) => {
            (u32::try_from(i.delivered).unwrap_or(u32::MAX).max(1), i.stream_sequence, i.published)
        }
        Err(e) => {
            tracing::warn!(error = %e, subject = %msg.subject, "not a JetStream message; ignored");
            return;
        }
    };
    let spec = TaskSpec::from_slice(&msg.payload);
    let header_id = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::MSG_ID))
        .and_then(|v| TaskId::parse(v.as_str()).ok());
    let given_id = spec.as_ref().ok().and_then(|s| s.id.clone()).or(header_id);
    // Stable across redeliveries: the stream sequence and publish time do not change.
    let id = given_id.clone().unwrap_or_else(|| {
        let name = format!("{stream_seq}:{}", published.unix_timestamp_nanos());
        TaskId::derived("nats-msg", &name)
    });
    // The submitter's trace (W3C traceparent header), so the task's log lines join its trace.
    let trace_id = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(claw_proto::trace::TRACEPARENT))
        .and_then(|v| claw_proto::trace::TraceParent::parse(v.as_str()))
        .map(|t| t.trace_id);
    if delivered > 1 {
        // Decided here: the delivery count is the server's word that this message came back.
        metrics::counter!("claw_worker_redeliveries_total", "class" => lane.class.as_str())
            .increment(1);
    }
    // `attempt` is filled in once the record says which attempt this delivery starts.
    let span = tracing::info_span!("task", task_id = %id, delivered,
        attempt = tracing::field::Empty, lane = %lane.consumer(),
        trace_id = trace_id.as_deref().unwrap_or(""));
    let delivery = Delivery { worker, lane, msg, delivered, id, published, stream_seq };
    delivery.run(spec, given_id.is_some()).instrument(span).await
}

struct Delivery {
    worker: Arc<Worker>,
    lane: Lane,
    msg: jetstream::Message,
    /// JetStream's delivery count of this message (not the attempt: see the module docs).
    delivered: u32,
    id: TaskId,
    published: OffsetDateTime,
    /// This message's sequence in `TASKS`; the record names the live one (`message_seq`).
    stream_seq: u64,
}

/// The record as this attempt last wrote or read it, and that revision: the CAS fence.
struct Held {
    record: TaskRecord,
    revision: u64,
}

enum Load {
    Invalid(String),
    Nats(String),
}

/// What [`Delivery::load_or_admit`] found.
enum Loaded {
    /// The record (the gateway's, or an earlier delivery's) and its revision.
    Found(TaskRecord, u64),
    /// There was none: the record was created already running as attempt 1 (the `queued`
    /// state it skipped was announced).
    Started(Held),
}

fn describe(invalid: Invalid) -> String {
    match invalid.field {
        Some(field) => format!("{field}: {}", invalid.message),
        None => invalid.message,
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

impl Delivery {
    async fn run(self, spec: Result<TaskSpec, Invalid>, id_was_given: bool) {
        let spec = match spec {
            Ok(spec) => spec,
            Err(invalid) => return self.invalid(None, id_was_given, &describe(invalid)).await,
        };
        // Registered before the claim: the gateway only wakes a worker for a record that is
        // running, so every wake-up for this attempt comes after registration and is kept.
        let control = self.worker.controls.register(&self.id);
        let mut held = match self.load_or_admit(&spec).await {
            Ok(Loaded::Found(record, revision)) => {
                let Some(held) = self.start(record, revision).await else { return };
                held
            }
            Ok(Loaded::Started(held)) => held,
            Err(Load::Invalid(problem)) => return self.invalid(Some(&spec), true, &problem).await,
            Err(Load::Nats(e)) => {
                tracing::warn!(error = %e, "cannot read or create the record; retrying soon");
                return self.ack(AckKind::Nak(Some(self.nats_retry()))).await;
            }
        };
        events::status(&self.worker.client, &held.record).await;
        tracing::debug!("attempt started");
        let class = self.lane.class.as_str();
        metrics::counter!("claw_worker_attempts_total", "class" => class).increment(1);
        let started = Instant::now();
        let outcome = self.supervise(&mut held, &control).await;
        let decision = self.finish(held, outcome, &control).await;
        // The one place an attempt's outcome is counted: the decision its ack was mapped from.
        let outcome = label(&decision);
        metrics::counter!("claw_worker_outcomes_total", "class" => class, "outcome" => outcome)
            .increment(1);
        if let Decision::Retry { .. } = decision {
            metrics::counter!("claw_worker_retries_total", "class" => class).increment(1);
        }
        metrics::histogram!(claw_proto::metrics::ATTEMPT_SECONDS, "class" => class)
            .record(started.elapsed().as_secs_f64());
    }

    /// Dead-letters a message that is not a valid task, with a `failed` record when the
    /// publisher can find it (an id it gave, or a spec that parsed).
    async fn invalid(&self, spec: Option<&TaskSpec>, write_record: bool, problem: &str) {
        tracing::warn!(problem, "invalid task message; dead-lettering it");
        if write_record {
            self.write_invalid_record(spec, problem).await;
        }
        let id = write_record.then_some(&self.id);
        if self.dead_letter(reason::INVALID_TASK, problem, id).await {
            self.ack(AckKind::Term).await;
        }
    }

    async fn write_invalid_record(&self, spec: Option<&TaskSpec>, problem: &str) {
        let w = &self.worker;
        let error = TaskError::new(reason::INVALID_TASK, problem, false);
        // There is no admitted record to start from, so the `queued` shape admission would have
        // made is built here and immediately failed through the state machine.
        let mut record = TaskRecord {
            id: self.id.clone(),
            session: spec.and_then(|s| s.session.clone()).unwrap_or_default(),
            kind: spec.map(|s| s.kind.clone()).unwrap_or_default(),
            input: spec.map(|s| s.input.clone()).unwrap_or_default(),
            class: self.lane.class,
            priority: self.lane.priority,
            status: Status::Queued,
            attempt: 0,
            max_attempts: w.limits.default_max_attempts,
            timeout_s: w.limits.timeout_cap_s(self.lane.class),
            progress: None,
            result: None,
            error: None,
            cause: Some(Cause::User),
            created_at: self.published,
            started_at: None,
            finished_at: None,
            deadline: self.published,
            worker: Some(w.config.name.clone()),
            paused_from: None,
            message_seq: Some(self.stream_seq),
            owner: None,
        };
        if record.fail(error.clone(), Cause::DeadLetter, now()).is_err() {
            return;
        }
        let written = match record::create(&w.kv, &record).await {
            Ok(_) => Some(record),
            // A record exists (the gateway made it, or an earlier delivery): fail that one.
            Err(KvError::Conflict) => match record::read(&w.kv, &self.id).await {
                Ok(Some((mut existing, revision))) => {
                    let failed = existing.fail(error.clone(), Cause::DeadLetter, now()).is_ok();
                    let saved = failed && record::update(&w.kv, &existing, revision).await.is_ok();
                    saved.then_some(existing)
                }
                _ => None,
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot write the failed record of an invalid task");
                None
            }
        };
        if let Some(record) = written {
            events::publish(&w.client, &record, EventBody::Error(error)).await;
            events::status(&w.client, &record).await;
        }
    }

    /// The record of this task. When there is none yet (the task was published straight to
    /// NATS, or the gateway's create is still in flight) it is admitted from the spec and
    /// created in one write already `running` as this delivery's attempt 1: one write instead
    /// of a `queued` create and a `running` update. Both states are announced, as if written.
    async fn load_or_admit(&self, spec: &TaskSpec) -> Result<Loaded, Load> {
        let w = &self.worker;
        for _ in 0..CAS_ROUNDS {
            match record::read(&w.kv, &self.id).await {
                Ok(Some((record, revision))) => return Ok(Loaded::Found(record, revision)),
                Ok(None) => {}
                Err(KvError::Corrupt(e)) => return Err(Load::Invalid(format!("record: {e}"))),
                Err(e) => return Err(Load::Nats(e.to_string())),
            }
            let lane = Some((self.lane.class, self.lane.priority));
            let queued = spec
                .admit(self.id.clone(), self.published, lane, &w.catalog, &w.limits)
                .map_err(|e| Load::Invalid(describe(e)))?;
            let now = now();
            if now > queued.deadline {
                // Too late to start: created `queued`, and `start` dead-letters it.
                match record::create(&w.kv, &queued).await {
                    Ok(revision) => {
                        events::status(&w.client, &queued).await;
                        return Ok(Loaded::Found(queued, revision));
                    }
                    Err(KvError::Conflict) => continue,
                    Err(e) => return Err(Load::Nats(e.to_string())),
                }
            }
            let mut running = queued.clone();
            running.start(1, &w.config.name, now).map_err(|e| Load::Invalid(e.to_string()))?;
            running.message_seq = Some(self.stream_seq);
            match record::create(&w.kv, &running).await {
                Ok(revision) => {
                    // `queued` here; `running` once the caller has the attempt in hand.
                    events::status(&w.client, &queued).await;
                    tracing::Span::current().record("attempt", 1);
                    return Ok(Loaded::Started(Held { record: running, revision }));
                }
                Err(KvError::Conflict) => continue,
                Err(e) => return Err(Load::Nats(e.to_string())),
            }
        }
        Err(Load::Nats("the record kept changing".into()))
    }

    /// Moves the record to `running` for this attempt, or settles the message when no attempt
    /// may start. `None`: the message has been dealt with.
    async fn start(&self, mut record: TaskRecord, mut revision: u64) -> Option<Held> {
        let w = &self.worker;
        for _ in 0..CAS_ROUNDS {
            if record.status.is_terminal() {
                tracing::info!(status = %record.status, "task already finished; dropping duplicate");
                self.ack(AckKind::Ack).await;
                return None;
            }
            if record.is_stale_copy(self.stream_seq) {
                // Another message of this task is the live one (a cancel and a retry left this
                // copy behind): taking over would run the task twice.
                tracing::info!(live = ?record.message_seq, "a stale copy of a held task; dropping it");
                self.ack(AckKind::Term).await;
                return None;
            }
            if record.paused_while_running() {
                // A paused task is held by the worker that runs it, and that worker keeps the
                // message with heartbeats. Its message is here, so that worker is gone: release
                // the hold so `resume` queues the task again, and drop this copy.
                let mut next = record.clone();
                if next.release_pause().is_ok() {
                    match record::update(&w.kv, &next, revision).await {
                        Ok(_) => {
                            tracing::info!("paused task's holder is gone; released, dropping it");
                            events::status(&w.client, &next).await;
                            self.ack(AckKind::Term).await;
                            return None;
                        }
                        Err(KvError::Conflict) => match record::read(&w.kv, &self.id).await {
                            Ok(Some(fresh)) => {
                                (record, revision) = fresh;
                                continue;
                            }
                            _ => break,
                        },
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot release a paused task; retrying");
                            break;
                        }
                    }
                }
            }
            if record.status == Status::Paused {
                // Paused while queued or retrying: the task leaves the queue; the gateway
                // publishes it again on resume.
                tracing::info!("task is paused; dropping its message until it is resumed");
                self.ack(AckKind::Term).await;
                return None;
            }
            let now = now();
            let attempt = record.attempt.saturating_add(1);
            let refusal = if now > record.deadline {
                let error = TaskError::new(
                    "deadline_exceeded",
                    format!(
                        "the task's deadline {} passed before attempt {attempt}",
                        record.deadline
                    ),
                    false,
                );
                Some((error, Cause::Timeout, reason::DEADLINE))
            } else if attempt > record.max_attempts {
                let message = if record.status == Status::Running {
                    // Its holder died (or lost its lease) during the last attempt.
                    format!(
                        "attempt {} of {} ended with its worker; no attempts left",
                        record.attempt, record.max_attempts
                    )
                } else {
                    format!("{} of {} attempts made", record.attempt, record.max_attempts)
                };
                Some((
                    TaskError::new("max_attempts", message, false),
                    Cause::DeadLetter,
                    reason::MAX_ATTEMPTS,
                ))
            } else {
                None
            };
            let mut next = record.clone();
            let moved = match &refusal {
                Some((error, cause, _)) => next.fail(error.clone(), *cause, now),
                None => next.start(attempt, &w.config.name, now),
            };
            next.message_seq = Some(self.stream_seq);
            if let Err(illegal) = moved {
                // Only a state added to the machine after this code was written gets here.
                tracing::warn!(%illegal, "cannot start the task; looking again later");
                self.ack(AckKind::Nak(Some(UNKNOWN_RECHECK))).await;
                return None;
            }
            match record::update(&w.kv, &next, revision).await {
                Ok(revision) => {
                    let Some((error, _, reason)) = refusal else {
                        tracing::Span::current().record("attempt", attempt);
                        return Some(Held { record: next, revision });
                    };
                    tracing::warn!(reason, %error, "task cannot run; dead-lettering it");
                    events::publish(&w.client, &next, EventBody::Error(error.clone())).await;
                    events::status(&w.client, &next).await;
                    if self.dead_letter(reason, &error.message, Some(&self.id)).await {
                        self.ack(AckKind::Term).await;
                    }
                    return None;
                }
                Err(KvError::Conflict) => match record::read(&w.kv, &self.id).await {
                    Ok(Some(fresh)) => (record, revision) = fresh,
                    _ => break,
                },
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the task; retrying soon");
                    break;
                }
            }
        }
        self.ack(AckKind::Nak(Some(self.nats_retry()))).await;
        None
    }

    /// How long a delivery that could not reach the record waits before it comes back: one
    /// second, doubled per delivery, at most [`NATS_RETRY_MAX`].
    fn nats_retry(&self) -> Duration {
        let doublings = self.delivered.saturating_sub(1).min(4);
        (NATS_RETRY * 2u32.pow(doublings)).min(NATS_RETRY_MAX)
    }

    /// Runs the handler (in-process, or in a child for the long class) until it returns or the
    /// attempt is stopped, keeping the message and the record alive meanwhile, and following
    /// the record's control states (cancel, pause, resume).
    async fn supervise(&self, held: &mut Held, control: &Registration) -> Outcome {
        let w = &self.worker;
        let task = held.record.clone();
        let Some(handler) = w.registry.get(&task.kind) else {
            let message = format!("this worker has no handler for kind {:?}", task.kind);
            return Outcome::Failed(TaskError::new("unknown_kind", message, false));
        };
        let limits = w.config.isolation.for_attempt(task.timeout_s);
        let ctx = Context::new(CancellationToken::new()).with_child_limits(limits);
        let in_child =
            task.class == Class::Long && !handler.spawns_process() && handler.runs_in_child();
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
        // Stop well before the server's deadline so the attempt is dead before the redelivered
        // copy can start: two thirds leaves a third for the kill and the reconnect.
        let lease_limit = w.ack_deadline * 2 / 3;
        // The lease is watched on its own task, which stops the handler (kills the child) by
        // itself: the loop below can be stuck in a NATS call while the server is unreachable.
        let lease_lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let _lease_watch = {
            let (w, ctx, lost) = (w.clone(), ctx.clone(), lease_lost.clone());
            tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
                let mut tick = tokio::time::interval(LEASE_CHECK);
                loop {
                    tick.tick().await;
                    let silence = w.contact.silence();
                    let down = w.client.connection_state() != State::Connected;
                    if silence > lease_limit {
                        tracing::warn!(
                            ?silence,
                            down,
                            "NATS unreachable too long to heartbeat; lease lost"
                        );
                        lost.store(true, std::sync::atomic::Ordering::SeqCst);
                        // No grace: the redelivered copy may start a third of a deadline on.
                        ctx.cancel_now();
                        return;
                    }
                }
            }))
        };
        let mut stop: Option<Stop> = None;
        let mut stopping = false;
        let abort = tokio::time::sleep(Duration::from_secs(86_400 * 365));
        let mut aborted = false;
        let mut unsaved: Option<Progress> = None;
        let mut last_save: Option<Instant> = None;
        // Set by whatever suggests the record changed; the look happens once, after the select.
        let mut look_now = false;
        tokio::pin!(deadline, abort);

        let joined = loop {
            tokio::select! {
                joined = &mut join => break joined,
                () = clock.expired(), if stop.is_none() && clock.is_running() => {
                    // Both limits at once: the deadline is what counts, a retry could not start.
                    if now() >= held.record.deadline {
                        tracing::warn!(deadline = %held.record.deadline, "task ran past its deadline");
                        stop = Some(Stop::Deadline);
                    } else {
                        tracing::warn!(timeout_s = held.record.timeout_s, "attempt timed out");
                        stop = Some(Stop::Timeout);
                    }
                }
                () = &mut deadline, if stop.is_none() => {
                    // The deadline runs on while paused: it is absolute, queueing included.
                    tracing::warn!(deadline = %held.record.deadline, "task ran past its deadline");
                    stop = Some(Stop::Deadline);
                }
                () = w.hand_back.cancelled(), if stop.is_none() => {
                    tracing::info!("drain deadline passed; handing the task back");
                    stop = Some(Stop::Shutdown);
                }
                () = control.woken() => look_now = true,
                _ = lease.tick() => {
                    if lease_lost.load(std::sync::atomic::Ordering::SeqCst) && stop.is_none() {
                        stop = Some(Stop::LeaseLost);
                    }
                }
                _ = heartbeat.tick() => {
                    // Paused or not: a paused task keeps its lease, so it is not redelivered
                    // however long it stays paused.
                    if let Err(e) = self.msg.ack_with(AckKind::Progress).await {
                        tracing::debug!(error = %e, "heartbeat failed");
                    }
                    look_now = true;
                }
                _ = flush.tick() => {
                    let pending = ctx.take();
                    if pending.progress.is_some() {
                        unsaved.clone_from(&pending.progress);
                    }
                    events::flush(&w.client, &held.record, pending).await;
                    let due = last_save.is_none_or(|t| t.elapsed() >= PROGRESS_SAVE);
                    // A paused record takes no progress; it is saved after the resume.
                    let can_save = stop.is_none() && !ctx.is_paused();
                    if let (Some(progress), true, true) = (&unsaved, due, can_save) {
                        last_save = Some(Instant::now());
                        if self.save_progress(held, progress.clone()).await {
                            unsaved = None;
                        } else {
                            look_now = true;
                        }
                    }
                }
                () = &mut abort, if !aborted => {
                    tracing::warn!("handler did not stop within the kill grace; aborting it");
                    join.abort();
                    aborted = true;
                }
            }
            if look_now && stop.is_none() {
                look_now = false;
                match self.look(held).await {
                    Look::Run if ctx.is_paused() => {
                        tracing::info!("task resumed");
                        ctx.set_paused(false);
                        clock.resume();
                    }
                    Look::Pause if !ctx.is_paused() => {
                        tracing::info!("task paused");
                        ctx.set_paused(true);
                        clock.pause();
                    }
                    Look::Stop(why) => {
                        match why {
                            Stop::Cancelled => tracing::info!("task cancelled; stopping"),
                            _ => tracing::warn!("another attempt took the task over; stopping"),
                        }
                        stop = Some(why);
                    }
                    Look::Run | Look::Pause | Look::Unknown => {}
                }
            }
            if stop.is_some() && !stopping {
                stopping = true;
                ctx.cancel();
                abort.as_mut().reset(Instant::now() + w.config.kill_grace() + ABORT_SLACK);
            }
        };
        if stop.is_none() && lease_lost.load(std::sync::atomic::Ordering::SeqCst) {
            // The watcher stopped the handler before the loop saw the flag.
            stop = Some(Stop::LeaseLost);
        }
        // Everything reported goes out before the terminal events, so order holds; the latest
        // progress rides along with the terminal write, which starts from this record.
        let last = ctx.take();
        if let Some(progress) = last.progress.clone().or(unsaved) {
            held.record.progress = Some(progress);
        }
        events::flush(&w.client, &held.record, last).await;
        if let Some(stop) = stop {
            return Outcome::Stopped(stop);
        }
        match joined {
            Ok(Ok(value)) => Outcome::Done(value),
            Ok(Err(error)) => Outcome::Failed(error),
            Err(e) => Outcome::Failed(TaskError::new("panic", format!("handler: {e}"), true)),
        }
    }

    /// Re-reads the record and says what it asks of this attempt, which holds the task. The
    /// fence is the attempt's identity, not the revision: a newer revision naming this attempt
    /// is the gateway's (or this attempt's own) word, and `held` moves on to it.
    async fn look(&self, held: &mut Held) -> Look {
        let (record, revision) = match record::read(&self.worker.kv, &self.id).await {
            Ok(Some(found)) => found,
            // Gone (expired or deleted by hand) or unreadable: nothing to act on; the next
            // heartbeat looks again, and the terminal write decides.
            Ok(None) => return Look::Unknown,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the record to reconcile");
                return Look::Unknown;
            }
        };
        if !same_attempt(&record, &held.record) {
            if record.message_seq.is_some_and(|live| live != self.stream_seq) {
                // Cancelled and retried: the task lives on in another message, so this one
                // is finished for good and is withdrawn (TERM, no write) like a cancel.
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
            // message); or its hold released after a lost lease. Either way not this attempt's
            // to run any more, and whoever moved it wrote the record.
            Look::Stop(Stop::Cancelled)
        };
        *held = Held { record, revision };
        look
    }

    /// Saves progress in the record. Returns false when the record changed since this attempt
    /// last read it (a control verb, or another attempt): the caller then looks at it.
    async fn save_progress(&self, held: &mut Held, progress: Progress) -> bool {
        let mut next = held.record.clone();
        if next.report_progress(progress).is_err() {
            return true; // not running (paused): nothing to save
        }
        match record::update(&self.worker.kv, &next, held.revision).await {
            Ok(revision) => {
                *held = Held { record: next, revision };
                true
            }
            Err(KvError::Conflict) => false,
            Err(e) => {
                tracing::debug!(error = %e, "could not save progress");
                true
            }
        }
    }

    /// Applies the decision: record, events, DLQ, and the one ack that goes with it.
    /// Returns the decision the attempt ended with (after any pause held its outcome back).
    async fn finish(&self, mut held: Held, outcome: Outcome, control: &Registration) -> Decision {
        let w = &self.worker;
        let (attempt, max_attempts) = (held.record.attempt, held.record.max_attempts);
        let mut decision = decide(outcome, attempt, max_attempts, &w.config.retry);
        loop {
            match &decision {
                Decision::Release => {
                    tracing::warn!(
                        "attempt released without a write; the redelivery owns the task"
                    );
                    return decision;
                }
                Decision::Withdraw => {
                    tracing::info!("attempt stopped; the record already says why");
                }
                Decision::HandBack => {}
                Decision::Succeed(_) | Decision::Retry { .. } | Decision::GiveUp { .. } => {
                    match self.write_final(&mut held, &decision).await {
                        Written::Done => {}
                        Written::Settled(instead) => return instead,
                        Written::Paused => {
                            // Paused as the handler finished: keep the outcome, and the lease,
                            // until the task is resumed (then write it) or cancelled.
                            tracing::info!("task paused with its outcome pending; holding it");
                            match self.hold_paused(&mut held, control).await {
                                None => continue,
                                Some(stop) => {
                                    let outcome = Outcome::Stopped(stop);
                                    decision =
                                        decide(outcome, attempt, max_attempts, &w.config.retry);
                                    continue;
                                }
                            }
                        }
                    }
                    self.announce(&held.record, &decision).await;
                    if let Decision::GiveUp { error, reason, .. } = &decision
                        && !self.dead_letter(reason, &error.to_string(), Some(&self.id)).await
                    {
                        // Handed back unterminated at the drain deadline; see dead_letter.
                        return Decision::HandBack;
                    }
                }
            }
            break;
        }
        if let Some(kind) = ack_of(&decision) {
            self.ack(kind).await;
        }
        decision
    }

    /// The events of a written outcome: the result or error, then the new status.
    async fn announce(&self, record: &TaskRecord, decision: &Decision) {
        let client = &self.worker.client;
        match decision {
            Decision::Succeed(value) => {
                tracing::info!("attempt succeeded");
                events::publish(client, record, EventBody::Result(value.clone())).await;
            }
            Decision::Retry { error, delay, .. } => {
                tracing::info!(%error, ?delay, "attempt failed; will retry");
                events::publish(client, record, EventBody::Error(error.clone())).await;
            }
            Decision::GiveUp { error, reason, .. } => {
                tracing::warn!(%error, reason, "task failed; dead-lettering it");
                events::publish(client, record, EventBody::Error(error.clone())).await;
            }
            Decision::Release | Decision::HandBack | Decision::Withdraw => return,
        }
        events::status(client, record).await;
    }

    /// Waits, heartbeating, while the record says paused; `None` once it is running again,
    /// else why the attempt ends instead.
    async fn hold_paused(&self, held: &mut Held, control: &Registration) -> Option<Stop> {
        let w = &self.worker;
        let beat = w.ack_deadline / 3;
        let mut heartbeat = tokio::time::interval_at(Instant::now() + beat, beat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = heartbeat.tick() => self.ack(AckKind::Progress).await,
                () = control.woken() => {}
                () = w.hand_back.cancelled() => return Some(Stop::Shutdown),
            }
            match self.look(held).await {
                Look::Run => return None,
                Look::Stop(stop) => return Some(stop),
                Look::Pause | Look::Unknown => {}
            }
        }
    }

    /// CAS-writes the decision's transition on the revision this attempt holds, following
    /// newer revisions of its own record. While the bucket is unavailable (a leader election)
    /// it keeps trying, and keeps the lease, for up to [`FINAL_WRITE_PATIENCE`]: giving up
    /// means redelivery, and redelivery means running the task again.
    async fn write_final(&self, held: &mut Held, decision: &Decision) -> Written {
        let w = &self.worker;
        let patience = Instant::now() + FINAL_WRITE_PATIENCE;
        let lease_limit = w.ack_deadline * 2 / 3;
        let mut wait = Duration::from_millis(100);
        let mut conflicts = 0;
        // Set after a conflict: the record is read again before the next write.
        let mut stale = false;
        loop {
            let failure = if stale {
                match record::read(&w.kv, &self.id).await {
                    Ok(Some((fresh, rev))) if same_attempt(&fresh, &held.record) => {
                        *held = Held { record: fresh, revision: rev };
                        stale = false;
                        continue;
                    }
                    Ok(Some(_)) => {
                        tracing::info!("another attempt took the task over; dropping this outcome");
                        return Written::Settled(Decision::Release);
                    }
                    Ok(None) | Err(KvError::Corrupt(_)) => {
                        tracing::warn!(
                            "the record is gone or unreadable; leaving the task to redelivery"
                        );
                        return Written::Settled(Decision::Release);
                    }
                    Err(e) => e,
                }
            } else {
                let mut next = held.record.clone();
                let now = now();
                let moved = match decision {
                    Decision::Succeed(value) => next.succeed(value.clone(), now),
                    Decision::Retry { error, cause, .. } => next.retry_later(error.clone(), *cause),
                    Decision::GiveUp { error, cause, .. } => next.fail(error.clone(), *cause, now),
                    Decision::Release | Decision::HandBack | Decision::Withdraw => {
                        return Written::Settled(decision.clone());
                    }
                };
                if let Err(illegal) = moved {
                    if held.record.paused_while_running() {
                        return Written::Paused;
                    }
                    // Moved by someone else while it ran (a user's cancel, maybe already
                    // retried): the message is of no further use, whatever the new state.
                    tracing::info!(%illegal, "the record moved on while the attempt ran");
                    self.ack(AckKind::Term).await;
                    return Written::Settled(Decision::Withdraw);
                }
                match record::update(&w.kv, &next, held.revision).await {
                    Ok(revision) => {
                        *held = Held { record: next, revision };
                        return Written::Done;
                    }
                    Err(KvError::Conflict) => {
                        conflicts += 1;
                        if conflicts >= CAS_ROUNDS {
                            tracing::warn!(
                                "the record keeps changing; leaving the task to redelivery"
                            );
                            return Written::Settled(Decision::Release);
                        }
                        stale = true;
                        continue;
                    }
                    Err(e) => e,
                }
            };
            // JetStream did not answer or refused for now: keep the message and try again.
            if Instant::now() + wait > patience || w.contact.silence() > lease_limit {
                tracing::warn!(error = %failure, "could not record the outcome; leaving the task to redelivery");
                return Written::Settled(Decision::Release);
            }
            tracing::warn!(error = %failure, ?wait, "cannot record the outcome yet; retrying");
            self.ack(AckKind::Progress).await;
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = w.hand_back.cancelled() => {
                    tracing::warn!("drain deadline passed with the outcome unrecorded; handing it back");
                    self.ack(AckKind::Nak(None)).await;
                    return Written::Settled(Decision::HandBack);
                }
            }
            wait = (wait * 2).min(FINAL_WRITE_RETRY_MAX);
        }
    }

    /// Stores the message in DLQ, trying until JetStream takes it: the caller terminates the
    /// original afterwards, and a TERM before the copy is stored would lose the task. The lease
    /// is kept with in-progress acks meanwhile. Only the drain deadline stops the tries; the
    /// message is then handed back unterminated and `false` returned: the caller must not TERM.
    #[must_use]
    async fn dead_letter(&self, reason: &'static str, message: &str, id: Option<&TaskId>) -> bool {
        let w = &self.worker;
        let mut wait = Duration::from_millis(250);
        loop {
            match dlq::publish(&w.js, &self.msg, Some(self.lane), reason, message, id).await {
                Ok(()) => {
                    // Counted once stored: the one place the worker dead-letters a message.
                    metrics::counter!("claw_worker_dead_letters_total", "reason" => reason)
                        .increment(1);
                    return true;
                }
                Err(e) => tracing::warn!(error = %e, ?wait, "DLQ publish failed; retrying"),
            }
            self.ack(AckKind::Progress).await;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = w.hand_back.cancelled() => {
                    tracing::error!("draining with the dead letter not stored; handing it back");
                    self.ack(AckKind::Nak(None)).await;
                    return false;
                }
            }
            wait = (wait * 2).min(DLQ_RETRY_MAX);
        }
    }

    async fn ack(&self, kind: AckKind) {
        if let Err(e) = self.msg.ack_with(kind).await {
            tracing::warn!(error = %e, "ack failed; the message will be redelivered");
        }
    }
}

/// Whether `a` and `b` are the same attempt of the task (the CAS fence's identity check). The
/// start time is part of it because an explicit retry starts counting attempts from 1 again,
/// possibly on the same worker.
fn same_attempt(a: &TaskRecord, b: &TaskRecord) -> bool {
    a.attempt == b.attempt && a.worker == b.worker && a.started_at == b.started_at
}

/// What the record asks of the attempt that holds it ([`Delivery::look`]).
enum Look {
    /// Run (again, if it was paused).
    Run,
    /// Pause: freeze the child, hold the handler at its next checkpoint, keep the lease.
    Pause,
    Stop(Stop),
    /// The record could not be read; carry on as before.
    Unknown,
}

/// What became of a terminal write ([`Delivery::write_final`]).
enum Written {
    /// Written: `held` is the new record.
    Done,
    /// Not written, and the message already dealt with: terminated (`Withdraw`), handed back
    /// (`HandBack`) or left to redelivery (`Release`); what the attempt's outcome is counted as.
    Settled(Decision),
    /// Not written: the record is paused (with this attempt holding it).
    Paused,
}

/// An attempt's own timeout, which stands still while the task is paused: the time left is
/// kept at the pause and the timer re-armed with it on resume.
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
