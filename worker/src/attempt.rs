//! One delivery of a task message, from "what is this?" to its one ack, inside one tracing span
//! with `task_id` and `attempt`.
//!
//! A delivery goes through three stages, each in its own module and each returning a value:
//!
//! 1. [`crate::claim`]: parse the spec, find or create the record, decide whether an attempt
//!    may start and compare-and-set it to `running` → [`Claim::Run`] with the record held, or
//!    [`Claim::Settle`] with the [`Decision`] for a delivery that is no attempt (a duplicate, a
//!    stale copy, a task that left the queue, a record out of reach, an invalid task);
//! 2. [`crate::supervise`]: run the handler while heartbeating the message, coalescing events,
//!    saving progress, watching the timeout, the deadline, the lease and the drain deadline, and
//!    following the record's control states → an [`Outcome`](crate::outcome::Outcome);
//! 3. [`crate::settle`]: map the outcome to a decision ([`crate::outcome::decide`]) and make it
//!    true: the record transition, the DLQ copy, the events → the [`Decision`].
//!
//! Then [`Delivery::answer`] sends the one ack that goes with the decision
//! ([`crate::outcome::ack_of`]); no stage sends one. Stages do send in-progress acks
//! ([`Delivery::heartbeat`]) while they hold the message: those extend the lease, they do not
//! answer it.
//!
//! Attempts are counted in the record: starting one is the compare-and-set that writes
//! `running` with `attempt + 1`, before the handler runs. A worker that dies mid-attempt leaves
//! that write behind, so a task that kills its worker every time still ends, dead-lettered,
//! after `max_attempts`. A delivery that never got as far as that write (the record could not
//! be read or written while JetStream elected a leader) is not an attempt: it is NAKed with a
//! growing delay and costs the task nothing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::{self, AckKind};
use claw_proto::kinds::Catalog;
use claw_proto::payloads::Payloads;
use claw_proto::queue;
use claw_proto::records::{self, Records};
use claw_proto::spec::{Invalid, Limits, TaskSpec};
use claw_proto::topology::{Lane, headers};
use claw_proto::{TaskId, TaskRecord};
use time::OffsetDateTime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::capacity::Slot;
use crate::claim::{self, CAS_ROUNDS, Claim};
use crate::config::Config;
use crate::control::Controls;
use crate::dlq;
use crate::events;
use crate::handler::Registry;
use crate::lease::Contact;
use crate::limits::ChildUser;
use crate::outcome::{Decision, ack_of, label};
use crate::{settle, supervise};

/// A KV read or write failed before the attempt started: the message comes back after this,
/// doubled per delivery up to [`NATS_RETRY_MAX`], rather than after the ack deadline.
const NATS_RETRY: Duration = Duration::from_secs(1);
const NATS_RETRY_MAX: Duration = Duration::from_secs(15);
/// How long a worker tries to write a hand-back: it is draining past its deadline, or its claim
/// came too late to run; without the write the task merely loses the attempt.
const GIVE_BACK_PATIENCE: Duration = Duration::from_secs(2);
/// Longest wait between tries of a DLQ publish. The message is only terminated once its copy is
/// stored, so the worker keeps trying (and keeps the lease) for as long as JetStream refuses.
const DLQ_RETRY_MAX: Duration = Duration::from_secs(10);

/// What every attempt of a worker shares.
#[derive(Debug)]
pub(crate) struct Worker {
    pub client: Client,
    pub js: jetstream::Context,
    pub records: Records,
    /// Large inputs and results, capped at the configured payload size.
    pub payloads: Payloads,
    pub config: Config,
    pub registry: Registry,
    pub catalog: Catalog,
    pub limits: Limits,
    pub runner: PathBuf,
    /// Whom child processes run as (`[isolation] user`); `None`: the worker's own user.
    pub child_user: Option<ChildUser>,
    /// The shorter of the configured and the consumers' actual ack deadline.
    pub ack_deadline: Duration,
    /// Fired when the drain deadline passes: running attempts stop and hand their message back.
    pub hand_back: CancellationToken,
    /// The attempts running here, for control wake-ups.
    pub controls: Arc<Controls>,
    /// When the server last answered; the lease of every attempt is timed by it.
    pub contact: Arc<Contact>,
    /// Each session's and principal's share of the output events this worker publishes.
    pub shares: crate::shares::Shares,
    /// The slots of concurrency keys, shared by all workers.
    pub slots: crate::slots::Slots,
}

/// Handles one delivery; `_slot` is its place in the pool and the worker's total until it
/// returns.
pub(crate) async fn handle(worker: Arc<Worker>, lane: Lane, msg: jetstream::Message, _slot: Slot) {
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
    // The rules the archiver's reconciler uses too when it lists the tasks that have a message.
    let msg_id = msg.headers.as_ref().and_then(|h| h.get(headers::MSG_ID));
    let given_id =
        queue::given_id(spec.as_ref().ok().and_then(|s| s.id.as_ref()), msg_id.map(|v| v.as_str()));
    let id = given_id.clone().unwrap_or_else(|| queue::derived_id(stream_seq, published));
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
    let received = Instant::now();
    let delivery = Delivery { worker, lane, msg, delivered, id, published, stream_seq, received };
    async move {
        let decision = delivery.process(spec, given_id.is_some()).await;
        delivery.answer(&decision).await;
    }
    .instrument(span)
    .await
}

/// One delivery of a task message, as every stage sees it.
pub(crate) struct Delivery {
    pub worker: Arc<Worker>,
    pub lane: Lane,
    pub msg: jetstream::Message,
    /// JetStream's delivery count of this message (not the attempt: see the module docs).
    pub delivered: u32,
    pub id: TaskId,
    pub published: OffsetDateTime,
    /// This message's sequence in `TASKS`; the record names the live one (`message_seq`).
    pub stream_seq: u64,
    /// When this worker got the message: its ack deadline runs from about then.
    pub received: Instant,
}

/// The record as this attempt last wrote or read it, and that revision: the CAS fence.
#[derive(Debug)]
pub(crate) struct Held {
    pub record: TaskRecord,
    pub revision: u64,
}

impl Delivery {
    /// The three stages; returns what the delivery came to.
    async fn process(&self, spec: Result<TaskSpec, Invalid>, id_was_given: bool) -> Decision {
        // Registered before the claim: the gateway only wakes a worker for a record that is
        // running, so every wake-up for this attempt comes after registration and is kept.
        let control = self.worker.controls.register(&self.id);
        let mut held = match claim::claim(self, spec, id_was_given).await {
            Claim::Run(held) => *held,
            Claim::Settle(decision) => return decision,
        };
        tracing::debug!("attempt started");
        let keys = held.record.concurrency.clone();
        let class = self.lane.class.as_str();
        metrics::counter!("claw_worker_attempts_total", "class" => class).increment(1);
        let started = Instant::now();
        let outcome = supervise::supervise(self, &mut held, &control).await;
        let decision = settle::settle(self, held, outcome, &control).await;
        // The slot goes with the attempt, except to a redelivery that will run it again.
        if !keys.is_empty() && !matches!(decision, Decision::Release) {
            self.worker.slots.release_all(&keys, &self.id).await;
        }
        metrics::histogram!(claw_proto::metrics::ATTEMPT_SECONDS, "class" => class)
            .record(started.elapsed().as_secs_f64());
        decision
    }

    /// Sends the one ack of `decision`, and counts the decision: the one place either happens.
    async fn answer(&self, decision: &Decision) {
        let class = self.lane.class.as_str();
        let label = label(decision);
        if decision.ends_attempt() {
            metrics::counter!("claw_worker_outcomes_total", "class" => class, "outcome" => label)
                .increment(1);
        } else {
            metrics::counter!("claw_worker_skipped_total", "class" => class, "reason" => label)
                .increment(1);
        }
        if let Decision::Retry { .. } = decision {
            metrics::counter!("claw_worker_retries_total", "class" => class).increment(1);
        }
        if let Some(kind) = ack_of(decision) {
            self.send(kind).await;
        }
    }

    /// An in-progress ack: the message stays with this worker for another ack deadline.
    pub(crate) async fn heartbeat(&self) {
        if let Err(e) = self.msg.ack_with(AckKind::Progress).await {
            tracing::debug!(error = %e, "heartbeat failed");
        }
    }

    async fn send(&self, kind: AckKind) {
        if let Err(e) = self.msg.ack_with(kind).await {
            tracing::warn!(error = %e, "ack failed; the message will be redelivered");
        }
    }

    /// How long a delivery that could not reach the record waits before it comes back: one
    /// second, doubled per delivery, at most [`NATS_RETRY_MAX`].
    pub(crate) fn nats_retry(&self) -> Duration {
        let doublings = self.delivered.saturating_sub(1).min(4);
        (NATS_RETRY * 2u32.pow(doublings)).min(NATS_RETRY_MAX)
    }

    /// Gives the held task back ([`claw_proto::TaskRecord::hand_back`]): it is queued again
    /// without using up the attempt it was running. If the write does not happen (the bucket is
    /// unavailable, another attempt took over), the message is handed back all the same, and
    /// the next start counts the attempt as ended with its worker.
    pub(crate) async fn give_back(&self, held: &mut Held) {
        let write = async {
            for _ in 0..CAS_ROUNDS {
                let mut next = held.record.clone();
                if next.hand_back().is_err() {
                    return;
                }
                match self.worker.records.update(&next, held.revision).await {
                    Ok(revision) => {
                        *held = Held { record: next, revision };
                        events::status(&self.worker.client, &held.record).await;
                        tracing::info!("handed back; the attempt does not count");
                        return;
                    }
                    Err(records::Error::Conflict) => match self.worker.records.read(&self.id).await
                    {
                        Ok(Some(fresh)) if same_attempt(&fresh.record, &held.record) => {
                            *held = Held { record: fresh.record, revision: fresh.revision };
                        }
                        _ => return,
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "hand-back not recorded; the attempt will count");
                        return;
                    }
                }
            }
        };
        if tokio::time::timeout(GIVE_BACK_PATIENCE, write).await.is_err() {
            tracing::warn!("hand-back not recorded in time; the attempt will count");
        }
    }

    /// Stores the message in DLQ, trying until JetStream takes it: the caller's decision then
    /// terminates the original, and a TERM before the copy is stored would lose the task. The
    /// lease is kept with in-progress acks meanwhile. Only the drain deadline stops the tries:
    /// then `false`, and the caller must hand the message back instead of terminating it.
    #[must_use]
    pub(crate) async fn dead_letter(
        &self,
        reason: &'static str,
        message: &str,
        id: Option<&TaskId>,
    ) -> bool {
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
            self.heartbeat().await;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = w.hand_back.cancelled() => {
                    tracing::error!("draining with the dead letter not stored; handing it back");
                    return false;
                }
            }
            wait = (wait * 2).min(DLQ_RETRY_MAX);
        }
    }
}

/// Whether `a` and `b` are the same attempt of the task (the CAS fence's identity check). The
/// start time is part of it because an explicit retry starts counting attempts from 1 again,
/// possibly on the same worker.
pub(crate) fn same_attempt(a: &TaskRecord, b: &TaskRecord) -> bool {
    a.attempt == b.attempt && a.worker == b.worker && a.started_at == b.started_at
}

pub(crate) fn describe(invalid: Invalid) -> String {
    match invalid.field {
        Some(field) => format!("{field}: {}", invalid.message),
        None => invalid.message,
    }
}

pub(crate) fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}
