//! The claim stage of a delivery ([`crate::attempt`]): what is this message, and may an attempt
//! of it start here?
//!
//! It parses the spec (an invalid one is dead-lettered at once), finds the record or creates it
//! from the message (a NATS-native publisher sends no record), and decides: a finished task's
//! message is a duplicate; a copy that is not the record's live message is stale; a paused task
//! has left the queue; a task past its deadline or out of attempts is dead-lettered; otherwise
//! the compare-and-set to `running` with `attempt + 1` starts the attempt. Everything but the
//! last is a [`Decision`] the delivery settles with; only a started attempt goes on to
//! [`crate::supervise`].

use std::time::Duration;

use claw_proto::api::{Control, Wake};
use claw_proto::records;
use claw_proto::spec::{Invalid, TaskSpec};
use claw_proto::topology;
use claw_proto::{Cause, Concurrency, Status, TaskError, TaskRecord};

use crate::attempt::{Delivery, Held, describe, now};
use crate::dlq::reason;
use crate::events;
use crate::outcome::Decision;
use crate::slots::Acquired;

/// Rounds of read → decide → compare-and-set before giving up on a record that keeps changing.
/// A conflict means someone else wrote (the gateway's create or a control verb); a few rounds
/// settle any ordinary race, more means something is wrong and redelivery is the better retry.
pub(crate) const CAS_ROUNDS: usize = 8;
/// How long a message waits before it is looked at again when its record is in a state this
/// code does not know (one added to the state machine later).
const UNKNOWN_RECHECK: Duration = Duration::from_secs(5);

/// What the claim came to.
pub(crate) enum Claim {
    /// An attempt started: the record says `running` for it, at this revision.
    Run(Box<Held>),
    /// No attempt: what the delivery is settled with (its record and DLQ work already done).
    Settle(Decision),
}

enum Load {
    Invalid(String),
    Nats(String),
}

/// How long after its publish a lane message whose submitter writes the record
/// ([`topology::headers::RECORD`]) waits for that record (at most a third of the ack deadline),
/// and the longest pause between two looks. Past it (the submitter's create failed, or the
/// header was sent by someone else) the record is built from the message, as for any
/// NATS-native task.
const RECORD_WAIT: Duration = Duration::from_secs(2);
const RECORD_RECHECK_MAX: Duration = Duration::from_millis(50);

/// What [`load_or_admit`] found.
enum Loaded {
    /// The record (the gateway's, or an earlier delivery's) and its revision.
    Found(TaskRecord, u64),
    /// There was none: the record was created already running as attempt 1 (the `queued`
    /// state it skipped was announced).
    Started(Held),
}

/// Claims the delivery's task for an attempt, or says why not.
pub(crate) async fn claim(d: &Delivery, spec: Result<TaskSpec, Invalid>, id_given: bool) -> Claim {
    let spec = match spec {
        Ok(spec) => spec,
        Err(invalid) => {
            return Claim::Settle(self::invalid(d, None, id_given, &describe(invalid)).await);
        }
    };
    match load_or_admit(d, &spec).await {
        Ok(Loaded::Found(record, revision)) => start(d, record, revision).await,
        Ok(Loaded::Started(mut held)) => {
            if too_late(d) {
                tracing::warn!(after = ?d.received.elapsed(),
                    "claimed too late to run; leaving the task to the redelivery");
                d.give_back(&mut held).await;
                return Claim::Settle(Decision::Release);
            }
            Claim::Run(Box::new(held))
        }
        Err(Load::Invalid(problem)) => Claim::Settle(invalid(d, Some(&spec), true, &problem).await),

        Err(Load::Nats(e)) => {
            tracing::warn!(error = %e, "cannot read or create the record; retrying soon");
            Claim::Settle(Decision::Unreachable(d.nats_retry()))
        }
    }
}

/// Dead-letters a message that is not a valid task, with a `failed` record when the
/// publisher can find it (an id it gave, or a spec that parsed) and no record of that id
/// exists: an invalid message never fails a record it did not create.
async fn invalid(
    d: &Delivery,
    spec: Option<&TaskSpec>,
    write_record: bool,
    problem: &str,
) -> Decision {
    tracing::warn!(problem, "invalid task message; dead-lettering it");
    // The copy first: a record never says dead-lettered while the DLQ has nothing.
    let id = write_record.then_some(&d.id);
    if !d.dead_letter(reason::INVALID_TASK, problem, id).await {
        return Decision::HandBack;
    }
    if write_record {
        write_invalid_record(d, spec, problem).await;
    }
    Decision::Invalid
}

async fn write_invalid_record(d: &Delivery, spec: Option<&TaskSpec>, problem: &str) {
    let w = &d.worker;
    let error = TaskError::new(reason::INVALID_TASK, problem, false);
    // There is no admitted record to start from, so the `queued` shape admission would have
    // made is built here and immediately failed through the state machine.
    let mut record = TaskRecord {
        id: d.id.clone(),
        session: spec.and_then(|s| s.session.clone()).unwrap_or_default(),
        kind: spec.map(|s| s.kind.clone()).unwrap_or_default(),
        input: spec.map(|s| s.input.clone()).unwrap_or_default(),
        class: d.lane.class,
        priority: d.lane.priority,
        status: Status::Queued,
        attempt: 0,
        max_attempts: w.limits.default_max_attempts,
        timeout_s: w.limits.timeout_cap_s(d.lane.class),
        progress: None,
        result: None,
        error: None,
        cause: Some(Cause::User),
        created_at: d.published,
        started_at: None,
        finished_at: None,
        deadline: d.published,
        worker: Some(w.config.name.clone()),
        paused_from: None,
        message_seq: Some(d.stream_seq),
        owner: None,
        input_ref: spec.and_then(|s| s.input_ref.clone()),
        result_ref: None,
        concurrency: Vec::new(),
        waiting: None,
    };
    if record.fail(error.clone(), Cause::DeadLetter, now()).is_err() {
        return;
    }
    let mut created = w.records.create(&record).await;
    if let Err(records::Error::TooLarge { .. }) = created {
        // The input is what made the message invalid or too large: the record goes without it.
        record.input = serde_json::Value::Null;
        created = w.records.create(&record).await;
    }
    let written = match created {
        Ok(_) => Some(record),
        // A record of this id exists: another task's (perhaps another tenant's), whose id the
        // message only names, or this message's own from an earlier delivery, already failed.
        // Either way the invalid message fails nothing it did not create: the copy in the DLQ
        // is all it leaves.
        Err(records::Error::Conflict) => {
            tracing::warn!(
                "a record with this id exists; the invalid message is dead-lettered alone"
            );
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot write the failed record of an invalid task");
            None
        }
    };
    if let Some(record) = written {
        events::status(&w.client, &record).await;
    }
}

/// The record of this task. When there is none yet (the task was published straight to
/// NATS, or the gateway's create is still in flight) it is admitted from the spec and
/// created in one write already `running` as this delivery's attempt 1: one write instead
/// of a `queued` create and a `running` update. Both states are announced, as if written.
///
/// The first delivery of a message whose record nobody else writes (a NATS-native publisher's)
/// tries the create straight away and reads only when that conflicts: one round trip fewer
/// for the common case. A message whose sender wrote the record, or a redelivery, reads first.
async fn load_or_admit(d: &Delivery, spec: &TaskSpec) -> Result<Loaded, Load> {
    let w = &d.worker;
    let mut read_first = by_submitter(d) || d.delivered > 1;
    for _ in 0..CAS_ROUNDS {
        let read = if read_first { w.records.read(&d.id).await } else { Ok(None) };
        read_first = true;
        match read {
            Ok(Some(stored)) => return Ok(Loaded::Found(stored.record, stored.revision)),
            Ok(None) if by_submitter(d) => {
                if let Some(stored) = wait_for_submitters_record(d).await? {
                    return Ok(Loaded::Found(stored.record, stored.revision));
                }
            }
            Ok(None) => {}
            Err(records::Error::Corrupt(e)) => return Err(Load::Invalid(format!("record: {e}"))),
            Err(e) => return Err(Load::Nats(e.to_string())),
        }
        let lane = Some((d.lane.class, d.lane.priority));
        let mut queued = spec
            .admit(d.id.clone(), d.published, lane, &w.catalog, &w.limits)
            .map_err(|e| Load::Invalid(describe(e)))?;
        // A NATS-native message may carry an input up to the server's message size: one over
        // the inline limit is stored as the gateway would have stored it.
        if let Err(e) = w.payloads.externalize_input(&mut queued).await {
            return Err(match e {
                e @ claw_proto::payloads::Error::TooLarge { .. } => Load::Invalid(e.to_string()),
                e => Load::Nats(e.to_string()),
            });
        }
        let now = now();
        if now > queued.deadline {
            // Too late to start: created `queued`, and `start` dead-letters it.
            match w.records.create(&queued).await {
                Ok(revision) => {
                    events::status(&w.client, &queued).await;
                    return Ok(Loaded::Found(queued, revision));
                }
                Err(records::Error::Conflict) => continue,
                Err(e) => return Err(load_error(e)),
            }
        }
        let mut running = queued.clone();
        running.start(1, &w.config.name, now).map_err(|e| Load::Invalid(e.to_string()))?;
        running.message_seq = Some(d.stream_seq);
        match w.records.create(&running).await {
            Ok(revision) => {
                // Never stored `queued`, so not announced so: `running` goes out with the
                // attempt's first flush (`supervise`).
                tracing::Span::current().record("attempt", 1);
                return Ok(Loaded::Started(Held { record: running, revision }));
            }
            Err(records::Error::Conflict) => continue,
            Err(e) => return Err(load_error(e)),
        }
    }
    Err(Load::Nats("the record kept changing".into()))
}

/// Whether the message says its submitter writes the record ([`topology::headers::RECORD`]).
fn by_submitter(d: &Delivery) -> bool {
    let header = d.msg.headers.as_ref().and_then(|h| h.get(topology::headers::RECORD));
    header.map(|v| v.as_str()) == Some(topology::headers::RECORD_BY_SUBMITTER)
}

/// Waits, looking again with growing pauses, for the record the message's submitter is writing
/// (the gateway sends it right after the lane message, so it is usually there within a
/// millisecond); `None` once [`RECORD_WAIT`] after the publish has passed without it.
async fn wait_for_submitters_record(d: &Delivery) -> Result<Option<records::Stored>, Load> {
    let w = &d.worker;
    let wait = RECORD_WAIT.min(w.ack_deadline / 3);
    let mut pause = Duration::from_millis(1);
    loop {
        let age = now() - d.published;
        let left = wait.saturating_sub(Duration::try_from(age).unwrap_or_default());
        if left.is_zero() || d.received.elapsed() >= wait {
            tracing::info!("the submitter's record did not come; building it from the message");
            return Ok(None);
        }
        tokio::time::sleep(pause.min(left)).await;
        pause = (pause * 2).min(RECORD_RECHECK_MAX);
        match w.records.read(&d.id).await {
            Ok(Some(stored)) => return Ok(Some(stored)),
            Ok(None) => {}
            Err(records::Error::Corrupt(e)) => return Err(Load::Invalid(format!("record: {e}"))),
            Err(e) => return Err(Load::Nats(e.to_string())),
        }
    }
}

/// A record the spec admits but the bucket cannot hold is as invalid as a bad spec.
fn load_error(e: records::Error) -> Load {
    match e {
        e @ records::Error::TooLarge { .. } => Load::Invalid(e.to_string()),
        e => Load::Nats(e.to_string()),
    }
}

/// Moves the record to `running` for this attempt, or settles the delivery when no attempt
/// may start.
async fn start(d: &Delivery, mut record: TaskRecord, mut revision: u64) -> Claim {
    let w = &d.worker;
    // Set once the DLQ holds this message, so a retried write does not store a second copy.
    let mut dead_lettered = false;
    for _ in 0..CAS_ROUNDS {
        if record.status.is_terminal() {
            tracing::info!(status = %record.status, "task already finished; dropping duplicate");
            // Its worker may have died between the record's write and its ending events.
            if events::resend_ending(&record) {
                events::ending(&w.js, &record).await;
            }
            // ... or a slot was given to it while it waited, parked, and it was cancelled.
            w.slots.release_all(&record.concurrency, &d.id).await;
            return Claim::Settle(Decision::Duplicate);
        }
        if record.is_stale_copy(d.stream_seq) {
            tracing::info!(live = ?record.message_seq, "a stale copy of a held task; dropping it");
            return Claim::Settle(Decision::StaleCopy);
        }
        if record.paused_while_running() {
            // A paused task is held by the worker that runs it, and that worker keeps the
            // message with heartbeats. Its message is here, so that worker is gone: release
            // the hold so `resume` queues the task again, and drop this copy.
            let mut next = record.clone();
            if next.release_pause().is_ok() {
                match w.records.update(&next, revision).await {
                    Ok(_) => {
                        tracing::info!("paused task's holder is gone; released, dropping it");
                        events::status(&w.client, &next).await;
                        w.slots.release_all(&next.concurrency, &d.id).await;
                        return Claim::Settle(Decision::LeftQueue);
                    }
                    Err(records::Error::Conflict) => match w.records.read(&d.id).await {
                        Ok(Some(fresh)) => {
                            (record, revision) = (fresh.record, fresh.revision);
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
            w.slots.release_all(&record.concurrency, &d.id).await;
            return Claim::Settle(Decision::LeftQueue);
        }
        let now = now();
        let attempt = record.attempt.saturating_add(1);
        let refusal = refusal(&record, attempt, now);
        if refusal.is_none() && !record.concurrency.is_empty() {
            match w.slots.acquire_all(&record.concurrency, &d.id).await {
                Ok(Acquired::All) => {}
                Ok(Acquired::Full(key)) => {
                    return Claim::Settle(park(d, record, revision, key).await);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot take a concurrency slot; retrying soon");
                    return Claim::Settle(Decision::Unreachable(d.nats_retry()));
                }
            }
        }
        let mut next = record.clone();
        let moved = match &refusal {
            Some((error, cause, _)) => next.fail(error.clone(), *cause, now),
            None => next.start(attempt, &w.config.name, now),
        };
        next.message_seq = Some(d.stream_seq);
        if let Err(illegal) = moved {
            // Only a state added to the machine after this code was written gets here.
            tracing::warn!(%illegal, "cannot start the task; looking again later");
            return Claim::Settle(Decision::RecheckLater(UNKNOWN_RECHECK));
        }
        if let Some((error, _, reason)) = &refusal
            && !dead_lettered
        {
            // The copy first: a record never says dead-lettered while the DLQ has nothing.
            tracing::warn!(reason, %error, "task cannot run; dead-lettering it");
            if !d.dead_letter(reason, &error.message, Some(&d.id)).await {
                return Claim::Settle(Decision::HandBack);
            }
            dead_lettered = true;
        }
        match w.records.update(&next, revision).await {
            Ok(revision) => {
                let Some((error, cause, reason)) = refusal else {
                    let mut held = Held { record: next, revision };
                    if too_late(d) {
                        // The claim landed so long after the delivery (a server that froze, a
                        // box starved of CPU) that the server may have given the message to
                        // another worker already: running it here could run the task twice at
                        // once. The attempt is given back and the message left to whoever has
                        // it now, or gets it at the ack deadline.
                        tracing::warn!(after = ?d.received.elapsed(),
                            "claimed too late to run; leaving the task to the redelivery");
                        d.give_back(&mut held).await;
                        return Claim::Settle(Decision::Release);
                    }
                    tracing::Span::current().record("attempt", attempt);
                    if record.status == Status::Running {
                        fence_off_the_holder(d).await;
                    }
                    return Claim::Run(Box::new(held));
                };
                events::ending(&w.js, &next).await;
                w.slots.release_all(&next.concurrency, &d.id).await;
                return Claim::Settle(Decision::GiveUp { error, cause, reason });
            }
            Err(records::Error::Conflict) => match w.records.read(&d.id).await {
                Ok(Some(fresh)) => (record, revision) = (fresh.record, fresh.revision),
                _ => break,
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the task; retrying soon");
                break;
            }
        }
    }
    Claim::Settle(Decision::Unreachable(d.nats_retry()))
}

/// Every slot of `key` is held: the task waits in `key`'s parked queue, holding no worker slot,
/// and its record says why. The lane message is acked (by the decision) only once the parked
/// copy is stored; a slot freed meanwhile is found by the wake-up that follows.
async fn park(d: &Delivery, record: TaskRecord, revision: u64, key: Concurrency) -> Decision {
    let w = &d.worker;
    if let Err(e) = w.slots.park(&key, &record, d.stream_seq).await {
        tracing::warn!(error = %e, "cannot park the task; retrying soon");
        return Decision::Unreachable(d.nats_retry());
    }
    let why = format!("concurrency {} (limit {})", key.key, key.limit);
    tracing::info!(key = %key.key, limit = key.limit, "every slot of the key is held; parked");
    if record.waiting.as_deref() != Some(why.as_str()) {
        let mut next = record;
        next.waiting = Some(why);
        // Only what the record shows: a write that loses to another is of no consequence.
        if w.records.update(&next, revision).await.is_ok() {
            events::status(&w.client, &next).await;
        }
    }
    w.slots.wake_logged(&key.key).await;
    Decision::Parked
}

/// Whether the delivery's lease may have run out before its claim landed: two thirds of the
/// ack deadline have passed since the message arrived, the same limit that stops a running
/// attempt whose worker lost contact (`supervise`). The message comes back to the lanes after
/// the full deadline, so up to that limit nobody else can have it.
fn too_late(d: &Delivery) -> bool {
    d.received.elapsed() > d.worker.ack_deadline * 2 / 3
}

/// How long a takeover waits before its handler starts. The previous holder, if it is alive
/// after all (its heartbeats were late, not its process dead), reads its record on the wake-up,
/// finds another attempt there, and kills its child at once: milliseconds. A second bounds the
/// overlap of the two attempts to nothing in that case, for a second's delay on a takeover,
/// which happens only after a full ack deadline without heartbeats anyway.
pub(crate) const TAKEOVER_FENCE: Duration = Duration::from_secs(1);

/// The record said `running` under another attempt, and this one has just replaced it there:
/// wakes the previous holder (`claw.control.<id>`, `takeover`), so a holder that is still alive
/// stops now rather than at its next look, a third of an ack deadline later, and gives it
/// [`TAKEOVER_FENCE`] to do so. A lost wake-up leaves the holder's next look (its heartbeat) to
/// find the takeover, and its lease, timed by the same deadline, to end it.
async fn fence_off_the_holder(d: &Delivery) {
    let control = Control { id: d.id.clone(), verb: Wake::Takeover };
    let payload = serde_json::to_vec(&control).expect("a control message serializes");
    let subject = topology::control_subject(&d.id);
    if let Err(e) = d.worker.client.publish(subject, payload.into()).await {
        tracing::warn!(error = %e, "could not wake the previous holder of the task");
    }
    tracing::info!(fence = ?TAKEOVER_FENCE, "took the task over; fencing off its previous holder");
    tokio::time::sleep(TAKEOVER_FENCE).await;
}

/// Why attempt `attempt` of `record` may not start at `now`: the error, cause and DLQ reason.
fn refusal(
    record: &TaskRecord,
    attempt: u32,
    now: time::OffsetDateTime,
) -> Option<(TaskError, Cause, &'static str)> {
    if now > record.deadline {
        let message =
            format!("the task's deadline {} passed before attempt {attempt}", record.deadline);
        let error = TaskError::new("deadline_exceeded", message, false);
        return Some((error, Cause::Timeout, reason::DEADLINE));
    }
    if attempt > record.max_attempts {
        let message = if record.status == Status::Running {
            // Its holder died (or lost its lease) during the last attempt.
            format!(
                "attempt {} of {} ended with its worker; no attempts left",
                record.attempt, record.max_attempts
            )
        } else {
            format!("{} of {} attempts made", record.attempt, record.max_attempts)
        };
        let error = TaskError::new("max_attempts", message, false);
        return Some((error, Cause::DeadLetter, reason::MAX_ATTEMPTS));
    }
    None
}
