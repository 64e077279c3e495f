//! Concurrency keys: at most `limit` tasks of a key run at once, across every worker
//! ([`claw_proto::Concurrency`]; the gateway gives each principal's tasks the key
//! `principal:<name>` with its `running_tasks`).
//!
//! Each key has one entry in the KV bucket `slots`, named by the key's hex token: its limit and
//! the tasks holding a slot, each with when it took it. Every change is a compare-and-set on the
//! entry's revision, so two workers never both take the last slot.
//!
//! - **Acquire** (the claim, before the record's compare-and-set to `running`): a task already
//!   listed keeps its slot, and the entry is rewritten all the same, so a sweep that judged the
//!   task idle from an older read loses its compare-and-set; any other task takes a slot if fewer
//!   than `limit` are held.
//! - **Park**: a task that gets no slot is published to `parked.<token>` in `TASKS` (so it still
//!   counts against the queue limit, and the reconciler sees it has a message), its record says
//!   why it waits, and its lane message is acked: it holds no worker slot and blocks no other key
//!   in its lane.
//! - **Release** (after an attempt's last write, and when a claim finds a task that will not run:
//!   finished, paused, dead-lettered): the task leaves the entry, and the key is woken.
//! - **Wake**: while the key has a free slot and a parked task, the first parked task is given a
//!   slot (reserved in its name), published to its lane again, and its parked message deleted.
//!   Each step can be repeated: a waker that dies half-way leaves what the next one finishes (the
//!   lane publish has one message id per parked message, and JetStream drops a repeat).
//! - **Sweep** (every worker, every [`SWEEP_EVERY`]): for each key with parked tasks, the holders
//!   whose record says they are not running (finished, waiting, paused from the queue, gone) and
//!   took their slot over [`RESERVE_GRACE`] ago lose it, and the key is woken.
//!
//! A holder that dies keeps its slot: its record says `running` until the message's redelivery
//! starts it again (that claim finds it listed and keeps the slot), or the reconciler repairs it.
//! So a SIGKILLed worker's tasks neither leak a slot nor let their key run more than `limit`.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv, stream};
use claw_proto::records::Records;
use claw_proto::spec::TaskSpec;
use claw_proto::topology::{self, Lane, headers};
use claw_proto::{Concurrency, TaskId, TaskRecord};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::attempt::now;

/// How often each worker sweeps the keys that have parked tasks.
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// How long a slot given to a task that is not running yet is kept for it: the woken task is at
/// the back of its lane, and a deep lane takes a while to reach it.
pub const RESERVE_GRACE: Duration = Duration::from_secs(60);
/// Rounds of read → change → compare-and-set before an operation gives up on an entry.
const CAS_ROUNDS: usize = 16;
/// Tasks one wake-up moves from parked to their lane at most; the next release or sweep goes on.
const WAKE_MAX: usize = 256;

type Result<T> = std::result::Result<T, async_nats::Error>;

/// One key's entry in the bucket.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// The key itself, for whoever reads the bucket.
    pub key: String,
    /// As the last task to take a slot said.
    pub limit: u32,
    /// Task id → when it took its slot (Unix milliseconds).
    pub holders: BTreeMap<String, i64>,
}

impl Entry {
    /// Gives `id` a slot if it has one or one is free; whether it has one now.
    pub(crate) fn take(&mut self, id: &str, at_ms: i64) -> bool {
        if self.holders.contains_key(id) || self.holders.len() < self.limit as usize {
            self.holders.insert(id.to_owned(), at_ms);
            return true;
        }
        false
    }

    fn has_room(&self) -> bool {
        self.holders.len() < self.limit as usize
    }
}

/// Whether a holder whose record is `record` (`None`: gone) and who took its slot at `since_ms`
/// may lose it at `now_ms`: it is not running, and not newly given the slot.
pub(crate) fn idle(record: Option<&TaskRecord>, since_ms: i64, now_ms: i64) -> bool {
    let running = record.is_some_and(|r| r.maybe_held());
    let young = now_ms.saturating_sub(since_ms) < RESERVE_GRACE.as_millis() as i64;
    !running && !young
}

fn millis() -> i64 {
    (now().unix_timestamp_nanos() / 1_000_000) as i64
}

/// The bucket of slots and the queue's stream, which parked tasks wait in.
#[derive(Clone, Debug)]
pub(crate) struct Slots {
    js: jetstream::Context,
    kv: kv::Store,
    tasks: stream::Stream<()>,
}

/// What [`Slots::acquire_all`] came to.
pub(crate) enum Acquired {
    /// A slot of every key.
    All,
    /// None of `key` free (the slots of the keys before it were given back).
    Full(Concurrency),
}

impl Slots {
    pub(crate) fn new(js: jetstream::Context, kv: kv::Store, tasks: stream::Stream<()>) -> Slots {
        Slots { js, kv, tasks }
    }

    /// Reads the entry, lets `change` decide (what to answer, and whether to write the entry
    /// as changed), and compare-and-sets, again on a conflict.
    async fn modify<T>(
        &self,
        token: &str,
        mut change: impl FnMut(&mut Entry) -> (T, bool),
    ) -> Result<T> {
        let mut last_error = None;
        for _ in 0..CAS_ROUNDS {
            let (mut entry, revision) = self.read(token).await?;
            let (answer, write) = change(&mut entry);
            if !write {
                return Ok(answer);
            }
            let value = serde_json::to_vec(&entry)?.into();
            let written = match revision {
                Some(revision) => self.kv.update(token, value, revision).await.map_err(Into::into),
                None => self.kv.create(token, value).await.map_err(Into::into),
            };
            match written {
                Ok(_) => return Ok(answer),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| "the slots entry kept changing".into()))
    }

    /// The entry of `token` and its revision (`None`: never written).
    async fn read(&self, token: &str) -> Result<(Entry, Option<u64>)> {
        match self.kv.entry(token).await? {
            None => Ok((Entry::default(), None)),
            Some(e) if e.operation != kv::Operation::Put => {
                Ok((Entry::default(), Some(e.revision)))
            }
            Some(e) => {
                let entry = serde_json::from_slice(&e.value).unwrap_or_else(|error| {
                    tracing::warn!(%error, token, "unreadable slots entry; starting it afresh");
                    Entry::default()
                });
                Ok((entry, Some(e.revision)))
            }
        }
    }

    /// A slot of `key` for `id`; `false` when all are held.
    pub(crate) async fn acquire(&self, key: &Concurrency, id: &TaskId) -> Result<bool> {
        let at = millis();
        let token = topology::slot_token(&key.key);
        self.modify(&token, |entry| {
            entry.key.clone_from(&key.key);
            entry.limit = key.limit;
            let took = entry.take(id.as_str(), at);
            (took, took)
        })
        .await
    }

    /// A slot of each of `keys`, in order. Never waits while holding: at the first full key
    /// the slots taken before it are given back.
    pub(crate) async fn acquire_all(&self, keys: &[Concurrency], id: &TaskId) -> Result<Acquired> {
        for (i, key) in keys.iter().enumerate() {
            match self.acquire(key, id).await {
                Ok(true) => {}
                outcome => {
                    for taken in &keys[..i] {
                        if let Err(e) = self.release(&taken.key, id).await {
                            tracing::warn!(error = %e, key = %taken.key, "cannot give a slot back");
                        }
                    }
                    return outcome.map(|_| Acquired::Full(key.clone()));
                }
            }
        }
        Ok(Acquired::All)
    }

    /// `id` gives its slot of `key` back (if it has one).
    pub(crate) async fn release(&self, key: &str, id: &TaskId) -> Result<()> {
        let token = topology::slot_token(key);
        self.modify(&token, |entry| ((), entry.holders.remove(id.as_str()).is_some())).await
    }

    /// Gives back `id`'s slots of `keys` and wakes each key; failures are logged (the sweep
    /// repairs what they leave).
    pub(crate) async fn release_all(&self, keys: &[Concurrency], id: &TaskId) {
        for key in keys {
            if let Err(e) = self.release(&key.key, id).await {
                tracing::warn!(error = %e, key = %key.key, "cannot give a slot back; the sweep will");
            }
            self.wake_logged(&key.key).await;
        }
    }

    /// Puts the task of `record` in `key`'s wait, as the message its lane would get again; the
    /// caller then acks the lane message, `lane_seq`.
    pub(crate) async fn park(
        &self,
        key: &Concurrency,
        record: &TaskRecord,
        lane_seq: u64,
    ) -> Result<()> {
        let message = serde_json::to_vec(&TaskSpec::of_record(record))?;
        let mut headers = HeaderMap::new();
        // One parked message per lane message: a redelivery of it parks nothing more, and a
        // task parked again after a wake-up (a new lane message) parks again.
        headers.insert(headers::MSG_ID, format!("{}:parked:{lane_seq}", record.id).as_str());
        let subject = topology::parked_subject(&topology::slot_token(&key.key));
        self.js.publish_with_headers(subject, headers, message.into()).await?.await?;
        metrics::counter!("claw_worker_parked_total").increment(1);
        Ok(())
    }

    /// [`Slots::wake`], logging a failure.
    pub(crate) async fn wake_logged(&self, key: &str) {
        let token = topology::slot_token(key);
        if let Err(e) = self.wake(&token).await {
            tracing::warn!(error = %e, key, "cannot wake the tasks waiting for a slot");
        }
    }

    /// Moves parked tasks of the key `token` to their lanes while it has free slots, each with
    /// a slot reserved in its name; how many moved.
    async fn wake(&self, token: &str) -> Result<usize> {
        let subject = topology::parked_subject(token);
        let mut woken = 0;
        while woken < WAKE_MAX {
            let parked = match self.tasks.direct_get_first_for_subject(subject.clone()).await {
                Ok(parked) => parked,
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(e.into()),
            };
            let lane_and_id = TaskSpec::from_slice(&parked.payload).ok().and_then(|spec| {
                let lane = Lane::new(spec.class?, spec.priority?);
                Some((lane, spec.id?))
            });
            let Some((lane, id)) = lane_and_id else {
                // Only workers write here, and always a record's spec: nothing to run.
                tracing::warn!(seq = parked.sequence, "a parked message without its task; removed");
                self.tasks.delete_message(parked.sequence).await?;
                continue;
            };
            let at = millis();
            // Its slot: free, or already its own (it was parked twice by a redelivery).
            let slot = self
                .modify(token, |entry| {
                    if entry.holders.contains_key(id.as_str()) {
                        (true, false)
                    } else if entry.has_room() {
                        (entry.take(id.as_str(), at), true)
                    } else {
                        (false, false)
                    }
                })
                .await?;
            if !slot {
                break;
            }
            let mut headers = HeaderMap::new();
            let msg_id = format!("{id}:unparked:{}", parked.sequence);
            headers.insert(headers::MSG_ID, msg_id.as_str());
            // Its record exists (it says why the task waited): the worker reads it first.
            headers.insert(headers::RECORD, headers::RECORD_BY_SUBMITTER);
            self.js
                .publish_with_headers(lane.subject(), headers, parked.payload.clone())
                .await?
                .await?;
            self.tasks.delete_message(parked.sequence).await?;
            metrics::counter!("claw_worker_unparked_total").increment(1);
            tracing::debug!(task_id = %id, "a parked task got a slot; back in its lane");
            woken += 1;
        }
        Ok(woken)
    }

    /// One sweep: for each key with parked tasks, the idle holders ([`idle`]) lose their slot,
    /// and the key is woken.
    pub(crate) async fn sweep(&self, records: &Records) -> Result<()> {
        let mut tokens = Vec::new();
        let mut subjects = self.tasks.info_with_subjects(topology::PARKED_ALL).await?;
        while let Some(subject) = subjects.next().await {
            let (subject, _count) = subject?;
            if let Some(token) = topology::parked_token(&subject) {
                tokens.push(token.to_owned());
            }
        }
        for token in tokens {
            self.prune(&token, records).await?;
            self.wake(&token).await?;
        }
        Ok(())
    }

    /// Takes the slots of the key `token` from its idle holders, in one compare-and-set on the
    /// revision they were judged at (a holder that acquired since rewrote the entry, so the
    /// write fails and the next sweep judges again).
    async fn prune(&self, token: &str, records: &Records) -> Result<()> {
        let (mut entry, revision) = self.read(token).await?;
        let Some(revision) = revision else { return Ok(()) };
        if entry.has_room() {
            return Ok(());
        }
        let now = millis();
        let mut dropped = Vec::new();
        for (id, since) in &entry.holders {
            let record = match TaskId::parse(id) {
                Ok(task) => records.read(&task).await?.map(|s| s.record),
                Err(_) => None,
            };
            if idle(record.as_ref(), *since, now) {
                dropped.push(id.clone());
            }
        }
        if dropped.is_empty() {
            return Ok(());
        }
        for id in &dropped {
            entry.holders.remove(id);
        }
        let value = serde_json::to_vec(&entry)?.into();
        if self.kv.update(token, value, revision).await.is_ok() {
            tracing::info!(key = %entry.key, ?dropped, "slots of tasks that are not running freed");
            metrics::counter!("claw_worker_slots_freed_total").increment(dropped.len() as u64);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(limit: u32, holders: &[&str]) -> Entry {
        let holders = holders.iter().map(|h| (h.to_string(), 0)).collect();
        Entry { key: "principal:a".into(), limit, holders }
    }

    #[test]
    fn a_slot_is_taken_while_one_is_free_and_kept_by_its_holder() {
        let mut e = entry(2, &["a"]);
        assert!(e.take("b", 1));
        assert!(!e.take("c", 2), "both slots are held");
        assert!(e.take("a", 3), "a holder keeps its slot, and its time is renewed");
        assert_eq!(e.holders["a"], 3);
        assert_eq!(e.holders.len(), 2);
        let mut lowered = entry(1, &["a", "b"]);
        assert!(!lowered.take("c", 0), "a lowered limit admits nobody until it is met");
        assert!(lowered.take("b", 0));
    }

    #[test]
    fn only_a_holder_that_is_not_running_and_not_newly_given_its_slot_is_idle() {
        let grace = RESERVE_GRACE.as_millis() as i64;
        let spec = TaskSpec::parse(br#"{"kind":"sleep","input":{"seconds":1}}"#).unwrap();
        let catalog = claw_proto::kinds::Catalog::builtin();
        let limits = claw_proto::spec::Limits::STANDARD;
        let mut record = spec.admit(TaskId::generate(), now(), None, &catalog, &limits).unwrap();
        assert!(!idle(Some(&record), 0, grace - 1), "just given its slot: it is on its way");
        assert!(idle(Some(&record), 0, grace), "queued for longer than the grace");
        assert!(idle(None, 0, grace), "no record at all");
        record.start(1, "w", now()).unwrap();
        assert!(!idle(Some(&record), 0, 10 * grace), "running, however long");
        record.pause().unwrap();
        assert!(!idle(Some(&record), 0, 10 * grace), "paused while running: its worker holds it");
    }
}
