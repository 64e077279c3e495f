//! The reconciler: finds records that say a task waits or runs although no lane message exists
//! for it, so nothing will ever move it, and repairs them.
//!
//! Such a record is stranded by a gateway that died between the record's create and the lane
//! publish (or whose undo failed), by a message that reached the `TASKS` stream's `max_age`
//! (7 days) while the task was retrying or waiting in a paused lane, or by a message deleted by
//! hand. Every `--reconcile-interval-s` a pass
//!
//! 1. takes the candidates from the store's `live` table: queued, retrying, running, and paused
//!    while running, last written longer than `--reconcile-grace-s` ago (longer than any
//!    publish that follows a record write, so a pass never races a submit, resume or retry);
//! 2. only if there are any, lists every task that has a message in `TASKS` ([`tasks_in_lanes`]:
//!    queued, waiting out a retry delay, or held by a worker, since a work queue keeps a message
//!    until it is acked);
//! 3. re-reads each candidate without a message, leaves it if its revision moved (someone is
//!    working on it), and otherwise repairs it as [`plan`] decides, with a compare-and-set: a task
//!    past its deadline fails (`cause: timeout`, `deadline_exceeded`); a queued or retrying one is
//!    published to its lane again; a running one too, after its record stops naming the lost
//!    message, so the next worker takes it over (`worker_lost`); one paused while running is
//!    released, so a resume queues it.
//!
//! Each repair is counted in `claw_reconciler_repairs_total{repair}` and logged with the task id
//! and why. The archiver runs as a single process by deployment (one durable consumer, one
//! SQLite file), so no lock elects the reconciler. Two by mistake would still not break a task:
//! every write is a compare-and-set and a re-publish of one revision has one message id, which
//! JetStream de-duplicates.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::{Client, StatusCode};
use claw_proto::event::Event;
use claw_proto::records::{self, Records, Stored};
use claw_proto::topology::{self, Topology, headers};
use claw_proto::{Cause, Status, TaskError, TaskId, TaskRecord, queue};
use futures::StreamExt;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::store::{Store, Stranded};

/// Messages per direct-get request of the lane scan: 20 requests for a full queue (10 000).
const SCAN_BATCH: usize = 512;
/// Bytes per direct-get request, so a batch of big tasks does not arrive as one huge burst.
const SCAN_BYTES: usize = 8 * 1024 * 1024;
/// How long the scan waits for the next message of a batch before it gives up on the pass.
const SCAN_WAIT: Duration = Duration::from_secs(5);

/// How often the reconciler looks, and how old a record must be before it counts as stranded.
#[derive(Clone, Debug, clap::Args)]
// clap names a flattened group after its type; `topology::Settings` has that name already.
#[group(id = "reconcile")]
pub struct Settings {
    /// How often the archiver looks for records stranded without a lane message, in seconds.
    #[arg(
        long = "reconcile-interval-s",
        env = "CLAW_RECONCILE_INTERVAL_S",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub interval_s: u64,
    /// How long a record must be unchanged before the reconciler may repair it, in seconds:
    /// longer than any lane publish that follows a record write (submit, resume, retry).
    #[arg(long = "reconcile-grace-s", env = "CLAW_RECONCILE_GRACE_S", default_value_t = 60)]
    pub grace_s: u64,
}

/// What a repair does, as the metric's `repair` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Published to its lane again.
    Republished,
    /// Failed: its deadline passed while it had no message.
    TimedOut,
    /// Paused while running, with its holder gone: released, so a resume queues it.
    Released,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Republished => "republished",
            Kind::TimedOut => "timed_out",
            Kind::Released => "released",
        }
    }
}

/// What a record without a lane message needs ([`plan`]).
#[derive(Debug, PartialEq)]
pub enum Plan {
    /// Nothing, for now or for good; the reason is logged.
    Leave(&'static str),
    Repair(Repair),
}

/// One repair: the record to write (a compare-and-set on the revision read), then whether to
/// publish the task to its lane again.
#[derive(Debug, PartialEq)]
pub struct Repair {
    pub kind: Kind,
    pub write: Option<Box<TaskRecord>>,
    pub publish: bool,
    /// Why, for the log line.
    pub why: &'static str,
}

/// Decides the repair of `record`, which has no message in `TASKS`, at `now`. Pure, so every
/// state is tested without a server.
pub fn plan(record: &TaskRecord, now: OffsetDateTime) -> Plan {
    let past_deadline = now > record.deadline;
    match record.status {
        Status::Queued | Status::Retrying if past_deadline => {
            timed_out(record, now, "the deadline passed while the task waited without a message")
        }
        Status::Queued | Status::Retrying => Plan::Repair(Repair {
            kind: Kind::Republished,
            write: None,
            publish: true,
            why: "its lane message is gone",
        }),
        Status::Running if past_deadline => {
            // An attempt that started before the deadline may run past it, and its message can
            // expire under it (the stream's max_age is the longest deadline); its worker then
            // still finishes it. Only once its timeout has passed too is nobody running it.
            let timeout = time::Duration::seconds(record.timeout_s.try_into().unwrap_or(i64::MAX));
            // An end past the calendar's (a nonsensical timeout) is an attempt that may run.
            let attempt_ends = record.started_at.map(|s| s.checked_add(timeout));
            if attempt_ends.is_some_and(|end| end.is_none_or(|end| now <= end)) {
                return Plan::Leave("its attempt may still be running past the deadline");
            }
            timed_out(
                record,
                now,
                "the deadline passed and the attempt's worker and message are gone",
            )
        }
        Status::Running => {
            let mut next = record.clone();
            // A record naming the lost message would make the next worker drop the new copy as
            // stale; cleared, the copy takes the task over. Already cleared: publish only.
            let write = match next.message_seq {
                Some(_) => next.message_lost().ok().map(|()| Box::new(next)),
                None => None,
            };
            Plan::Repair(Repair {
                kind: Kind::Republished,
                write,
                publish: true,
                why: "its worker's message is gone; the next worker takes it over",
            })
        }
        Status::Paused if record.paused_while_running() => {
            let mut next = record.clone();
            match next.release_pause() {
                Ok(()) => Plan::Repair(Repair {
                    kind: Kind::Released,
                    write: Some(Box::new(next)),
                    publish: false,
                    why: "its holder's message is gone; a resume queues it",
                }),
                Err(_) => Plan::Leave("it cannot be released"),
            }
        }
        Status::Paused => Plan::Leave("paused from the queue, it has no message until resumed"),
        Status::Succeeded | Status::Failed | Status::Cancelled => Plan::Leave("it is finished"),
    }
}

fn timed_out(record: &TaskRecord, now: OffsetDateTime, why: &'static str) -> Plan {
    let mut next = record.clone();
    let deadline = record.deadline.format(&Rfc3339).unwrap_or_else(|_| record.deadline.to_string());
    let message = format!("the task's deadline {deadline} passed while its lane message was gone");
    let error = TaskError::new("deadline_exceeded", message, false);
    match next.fail(error, Cause::Timeout, now) {
        Ok(()) => Plan::Repair(Repair {
            kind: Kind::TimedOut,
            write: Some(Box::new(next)),
            publish: false,
            why,
        }),
        Err(_) => Plan::Leave("it is finished"),
    }
}

/// Passes every `settings.interval_s` until `shutdown`. A failed pass is logged and the next
/// one tries again: a stranded record waits one interval longer, and nothing else is at stake.
pub async fn run(
    topology: Topology,
    store: Store,
    settings: Settings,
    shutdown: CancellationToken,
) {
    let reconciler = Reconciler {
        client: topology.js.client(),
        js: topology.js.clone(),
        records: topology.records.clone(),
        store,
        grace: Duration::from_secs(settings.grace_s),
    };
    let mut ticks = tokio::time::interval(Duration::from_secs(settings.interval_s));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        // Dropped mid-way by a shutdown, a pass leaves nothing a later one cannot finish: a
        // record written but not yet published is a candidate again after the grace.
        let passed = tokio::select! {
            () = shutdown.cancelled() => return,
            passed = reconciler.pass() => passed,
        };
        match passed {
            Ok(0) => {}
            Ok(repaired) => tracing::info!(repaired, "reconciler pass repaired stranded tasks"),
            Err(e) => tracing::warn!(error = %e, "reconciler pass failed; trying again later"),
        }
    }
}

/// What a pass needs.
struct Reconciler {
    client: Client,
    js: async_nats::jetstream::Context,
    records: Records,
    store: Store,
    grace: Duration,
}

impl Reconciler {
    /// One pass; returns how many records it repaired.
    async fn pass(&self) -> Result<u64, Error> {
        let candidates = self.store.stranded(OffsetDateTime::now_utc() - self.grace).await?;
        if candidates.is_empty() {
            return Ok(0);
        }
        let in_lanes = tasks_in_lanes(&self.client).await?;
        let mut repaired = 0;
        for candidate in candidates.iter().filter(|c| !in_lanes.contains(&c.id)) {
            match self.repair(candidate).await {
                Ok(true) => repaired += 1,
                Ok(false) => {}
                // One record out of reach does not stop the others.
                Err(e) => tracing::warn!(task_id = %candidate.id, error = %e,
                    "could not repair a stranded task; trying again next pass"),
            }
        }
        Ok(repaired)
    }

    /// Repairs one candidate that has no lane message; `false` when it needed nothing.
    async fn repair(&self, candidate: &Stranded) -> Result<bool, Error> {
        let nats = |what| move |e: records::Error| Error::Nats { what, source: e.into() };
        let Some(Stored { record, revision }) =
            self.records.read(&candidate.id).await.map_err(nats("reading a stranded record"))?
        else {
            // Removed outright, without a marker the consumer would have seen.
            self.store.forget_live(&candidate.id, candidate.revision).await?;
            return Ok(false);
        };
        if revision != candidate.revision {
            // Written since: someone is working on it, and the consumer brings the new revision.
            return Ok(false);
        }
        let repair = match plan(&record, OffsetDateTime::now_utc()) {
            Plan::Leave(why) => {
                tracing::debug!(task_id = %record.id, status = %record.status, why,
                    "a record without a lane message left alone");
                return Ok(false);
            }
            Plan::Repair(repair) => repair,
        };
        let (after, revision) = match repair.write {
            Some(next) => match self.records.update(&next, revision).await {
                Ok(revision) => (*next, revision),
                // Moved between the read and the write: no longer stranded by this revision.
                Err(records::Error::Conflict) => return Ok(false),
                Err(e) => return Err(nats("repairing a stranded record")(e)),
            },
            None => (record.clone(), revision),
        };
        // A running record that only stopped naming its lost message has no new state to
        // announce; the takeover that follows announces itself.
        if after.status != record.status || after.paused_from != record.paused_from {
            self.announce(&after).await;
        }
        if repair.publish {
            queue::republish(&self.js, &after, revision).await.map_err(|e| Error::Nats {
                what: "publishing a stranded task",
                source: e.into(),
            })?;
        }
        // Counted once done: the one place a repair is decided and made.
        metrics::counter!("claw_reconciler_repairs_total", "repair" => repair.kind.label())
            .increment(1);
        tracing::warn!(task_id = %record.id, status = %record.status, repair = repair.kind.label(),
            why = repair.why, "repaired a stranded task");
        Ok(true)
    }

    /// The event of a repaired record's change, as a worker would send it: its status, with the
    /// error of a task that failed.
    async fn announce(&self, record: &TaskRecord) {
        let event = Event::status(record);
        if let Err(e) = self.client.publish(record.progress_subject(), event.to_json()).await {
            tracing::warn!(task_id = %record.id, error = %e, "could not publish a task event");
        }
    }
}

/// Every task that has a message in `TASKS` now: queued, waiting out a retry delay, or held by
/// a worker (a work queue keeps each message until it is acked or terminated), named as the
/// worker that gets it names it ([`queue::task_id`]).
///
/// Read with batched direct gets: a request for up to [`SCAN_BATCH`] messages from a sequence
/// on (`{"seq", "batch", "max_bytes", "next_by_subj"}` to `$JS.API.DIRECT.GET.TASKS`) is answered
/// on one inbox by the messages (with `Nats-Sequence` and `Nats-Time-Stamp` headers beside their
/// own), then an end-of-batch status 204 with `Nats-Num-Pending`; the next request starts after
/// the last message seen, until nothing is pending (or a 404: no message at or after it). A full
/// queue of 10 000 is 20 requests. Needs nats-server 2.11 or later.
pub async fn tasks_in_lanes(client: &Client) -> Result<HashSet<TaskId>, Error> {
    let nats = |what| move |source| Error::Nats { what, source };
    let inbox = client.new_inbox();
    let mut replies = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| nats("subscribing to the lane scan")(e.into()))?;
    let subject = topology::direct_get_subject(topology::TASKS_STREAM);
    let mut ids = HashSet::new();
    let mut from = 1;
    loop {
        let request = serde_json::json!({"seq": from, "batch": SCAN_BATCH,
            "max_bytes": SCAN_BYTES, "next_by_subj": ">"});
        client
            .publish_with_reply(subject.clone(), inbox.clone(), request.to_string().into())
            .await
            .map_err(|e| nats("requesting a batch of lane messages")(e.into()))?;
        let mut last = None;
        let pending = loop {
            let message = match tokio::time::timeout(SCAN_WAIT, replies.next()).await {
                Ok(Some(message)) => message,
                Ok(None) => {
                    return Err(nats("scanning the lanes")("the subscription closed".into()));
                }
                Err(_) => return Err(nats("scanning the lanes")("no answer within 5 s".into())),
            };
            match message.status {
                None | Some(StatusCode::OK) => {
                    let seq = header(&message, SEQUENCE).and_then(|v| v.parse().ok());
                    let at = header(&message, TIME_STAMP)
                        .and_then(|v| OffsetDateTime::parse(v, &Rfc3339).ok());
                    let (Some(seq), Some(at)) = (seq, at) else {
                        return Err(nats("scanning the lanes")(
                            "a message without its sequence or time".into(),
                        ));
                    };
                    let msg_id = header(&message, headers::MSG_ID);
                    ids.insert(queue::task_id(&message.payload, msg_id, seq, at));
                    last = Some(seq);
                }
                Some(StatusCode::NOT_FOUND) => return Ok(ids),
                Some(status) if status.as_u16() == END_OF_BATCH => {
                    break header(&message, NUM_PENDING).and_then(|v| v.parse::<u64>().ok());
                }
                Some(status) => {
                    let why = format!("direct get answered {status} {:?}", message.description);
                    return Err(nats("scanning the lanes")(why.into()));
                }
            }
        };
        match (last, pending) {
            (Some(last), Some(pending)) if pending > 0 => from = last + 1,
            // No count given: look once more from after the last; a 404 ends it.
            (Some(last), None) => from = last + 1,
            _ => return Ok(ids),
        }
    }
}

/// The status of the message that ends a batch of a direct get ("EOB").
const END_OF_BATCH: u16 = 204;
/// Headers the server adds to a direct get's answers: the message's stream sequence and the
/// time it was stored (RFC 3339), and on the end of a batch how many messages are left.
const SEQUENCE: &str = "Nats-Sequence";
const TIME_STAMP: &str = "Nats-Time-Stamp";
const NUM_PENDING: &str = "Nats-Num-Pending";

fn header<'m>(message: &'m async_nats::Message, name: &str) -> Option<&'m str> {
    message.headers.as_ref()?.get(name).map(|v| v.as_str())
}

#[cfg(test)]
mod tests {
    use claw_proto::kinds::Catalog;
    use claw_proto::spec::{Limits, TaskSpec};

    use super::*;

    const HOUR: time::Duration = time::Duration::HOUR;

    /// A record of the sleep kind in `status`, created an hour before `now` with a deadline
    /// `deadline_in` after `now` (negative: passed).
    fn record(status: Status, now: OffsetDateTime, deadline_in: time::Duration) -> TaskRecord {
        let created = now - HOUR;
        let mut r = TaskSpec::from_slice(br#"{"kind": "sleep"}"#)
            .unwrap()
            .admit(TaskId::generate(), created, None, &Catalog::builtin(), &Limits::STANDARD)
            .unwrap();
        r.deadline = now + deadline_in;
        let started = created + time::Duration::MINUTE;
        match status {
            Status::Queued => {}
            Status::Running => r.start(1, "w", started).unwrap(),
            Status::Retrying => {
                r.start(1, "w", started).unwrap();
                r.retry_later(TaskError::new("x", "y", true), Cause::Error).unwrap();
            }
            Status::Paused => {
                r.start(1, "w", started).unwrap();
                r.pause().unwrap();
            }
            _ => unreachable!(),
        }
        r.message_seq = r.maybe_held().then_some(7);
        r
    }

    fn kind(plan: &Plan) -> Option<Kind> {
        match plan {
            Plan::Repair(r) => Some(r.kind),
            Plan::Leave(_) => None,
        }
    }

    #[test]
    fn waiting_tasks_are_published_again_until_their_deadline_then_time_out() {
        let now = OffsetDateTime::now_utc();
        for status in [Status::Queued, Status::Retrying] {
            let plan = plan(&record(status, now, HOUR), now);
            let Plan::Repair(repair) = plan else { panic!("{status}: {plan:?}") };
            assert_eq!(
                (repair.kind, repair.write, repair.publish),
                (Kind::Republished, None, true)
            );

            let Plan::Repair(repair) = super::plan(&record(status, now, -HOUR), now) else {
                panic!()
            };
            let failed = repair.write.expect("a write");
            assert_eq!((repair.kind, repair.publish), (Kind::TimedOut, false));
            assert_eq!((failed.status, failed.cause), (Status::Failed, Some(Cause::Timeout)));
            let error = failed.error.unwrap();
            assert_eq!((error.code.as_str(), error.retryable), ("deadline_exceeded", false));
            assert!(error.message.contains("lane message was gone"), "{}", error.message);
        }
    }

    #[test]
    fn a_running_task_without_its_message_is_published_for_a_takeover() {
        let now = OffsetDateTime::now_utc();
        let running = record(Status::Running, now, HOUR);
        let Plan::Repair(repair) = plan(&running, now) else { panic!() };
        assert_eq!((repair.kind, repair.publish), (Kind::Republished, true));
        let next = repair.write.expect("the record stops naming the lost message");
        assert_eq!((next.status, next.message_seq), (Status::Running, None));
        assert!(!next.is_stale_copy(99), "the new copy is not stale");

        // A second pass, after a publish that failed: the record already names no message.
        let Plan::Repair(repair) = plan(&next, now) else { panic!() };
        assert_eq!((repair.kind, repair.write, repair.publish), (Kind::Republished, None, true));
    }

    #[test]
    fn a_running_task_past_its_deadline_times_out_once_its_attempt_is_over() {
        let now = OffsetDateTime::now_utc();
        let mut running = record(Status::Running, now, -time::Duration::MINUTE);
        // Started 59 minutes ago with a 300 s timeout: over.
        assert_eq!(kind(&plan(&running, now)), Some(Kind::TimedOut));
        // Started a minute ago: its worker may still finish it, after its message expired.
        running.started_at = Some(now - time::Duration::MINUTE);
        assert_eq!(
            plan(&running, now),
            Plan::Leave("its attempt may still be running past the deadline")
        );
    }

    #[test]
    fn a_task_paused_while_running_is_released_and_one_paused_from_the_queue_left_alone() {
        let now = OffsetDateTime::now_utc();
        let held = record(Status::Paused, now, HOUR);
        let Plan::Repair(repair) = plan(&held, now) else { panic!() };
        let released = repair.write.expect("a write");
        assert_eq!((repair.kind, repair.publish), (Kind::Released, false));
        assert_eq!((released.status, released.paused_from), (Status::Paused, Some(Status::Queued)));
        assert_eq!(released.cause, Some(Cause::WorkerLost));
        assert!(!released.maybe_held());
        // Past its deadline too: released, not failed; a resume then fails it at its claim.
        assert_eq!(kind(&plan(&record(Status::Paused, now, -HOUR), now)), Some(Kind::Released));

        assert!(matches!(plan(&released, now), Plan::Leave(_)), "paused from the queue");
    }

    #[test]
    fn finished_tasks_are_left_alone() {
        let now = OffsetDateTime::now_utc();
        let mut r = record(Status::Running, now, HOUR);
        r.succeed(serde_json::Value::Null, now).unwrap();
        assert_eq!(plan(&r, now), Plan::Leave("it is finished"));
    }
}
