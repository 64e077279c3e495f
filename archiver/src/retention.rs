//! Retention: a finished task's record leaves the `tasks` bucket only after it is archived and
//! its retention has passed, and only this sweep removes it.
//!
//! The bucket has no `max_age`, so nothing in it expires: a task paused from the queue for a
//! week, or a long attempt that writes nothing for a day, keeps its record. Every
//! `--retention-sweep-s` the sweep asks the [`Store`] for archived rows that finished more than
//! `--retention-s` ago and may still be in the bucket, deletes exactly that revision from the
//! bucket's stream ([`Records::remove`]), and marks the row removed. A revision already replaced
//! by a newer write (an explicit retry, which makes the task live again) is not there to
//! delete, which is the compare-and-set for free: a sweep can never remove a live record.
//!
//! A finished task's inputs and results in the `payloads` object store go with its record:
//! `GET /v1/tasks/{id}/result` of an older task answers 410 from then on, while the archive
//! keeps the record, and its reference, for good.
//!
//! Because only archived rows are swept, an archiver that is down longer than the retention
//! loses nothing: terminal records wait in the bucket (bounded by the account's storage) until
//! it is back, archives them, and then removes them. `claw_archiver_lag` says how far behind it
//! is; that, not the bucket's size, is the thing to alert on.

use std::time::Duration;

use claw_proto::payloads::Payloads;
use claw_proto::records::Records;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::store::Store;

/// Rows looked at per query. A sweep goes on while queries come back full, so a backlog (the
/// first sweep after an upgrade, an archiver back from a long outage) drains at the pace of one
/// stream delete per row, about a millisecond each, without one query holding thousands.
const SWEEP_BATCH: u32 = 256;

/// How long the bucket keeps a finished record, and how often the sweep looks.
#[derive(Clone, Debug, clap::Args)]
// clap names a flattened group after its type; `topology::Settings` has that name already.
#[group(id = "retention")]
pub struct Settings {
    /// How long a finished task's record stays in the `tasks` bucket after it finished, in
    /// seconds; then the archiver removes it, but only once it is archived. Reads of the task
    /// fall back to the archive afterwards.
    #[arg(long = "retention-s", env = "CLAW_RECORD_RETENTION_S", default_value_t = 86_400)]
    pub retention_s: u64,
    /// How often the archiver removes records whose retention has passed, in seconds.
    #[arg(
        long = "retention-sweep-s",
        env = "CLAW_RETENTION_SWEEP_S",
        default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub sweep_s: u64,
}

/// Sweeps every `settings.sweep_s` until `shutdown`. Failures are logged and the next sweep
/// tries again: a record left in the bucket a little longer is no harm.
pub async fn run(
    records: Records,
    payloads: Payloads,
    store: Store,
    settings: Settings,
    shutdown: CancellationToken,
) {
    let retention = Duration::from_secs(settings.retention_s);
    let mut ticks = tokio::time::interval(Duration::from_secs(settings.sweep_s));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        // Dropped mid-way by a shutdown, a sweep leaves at most a removed record whose row is
        // not marked yet; the next sweep removes it again (already gone: no error) and marks it.
        let swept = tokio::select! {
            () = shutdown.cancelled() => return,
            swept = sweep(&records, &payloads, &store, retention) => swept,
        };
        match swept {
            Ok(0) => {}
            Ok(removed) => {
                tracing::debug!(removed, "removed finished records past their retention")
            }
            Err(e) => tracing::warn!(error = %e, "the retention sweep failed; trying again later"),
        }
    }
}

/// One sweep: removes every archived record whose retention has passed, with its stored
/// payloads; returns how many.
pub async fn sweep(
    records: &Records,
    payloads: &Payloads,
    store: &Store,
    retention: Duration,
) -> Result<u64, Error> {
    let mut removed = 0;
    loop {
        let now = OffsetDateTime::now_utc();
        let due = store.due_for_removal(now - retention, SWEEP_BATCH).await?;
        for archived in &due {
            let current = records.remove(archived.revision).await.map_err(|e| Error::Nats {
                what: "removing a finished record",
                source: e.into(),
            })?;
            // Only when this revision was still the record's last: a task retried since then
            // is live again and needs its input. A sweep dropped between the two leaves the
            // objects behind, which costs space, never a task.
            if current
                && archived.payloads
                && let Ok(id) = claw_proto::TaskId::parse(&archived.id)
                && let Err(e) = payloads.remove(&id).await
            {
                tracing::warn!(task_id = %archived.id, error = %e,
                    "could not remove the payloads of a finished task; they stay");
            }
            store.mark_removed(archived, now).await?;
            // Counted once the row says so: the one place a record leaves the bucket this way.
            metrics::counter!("claw_archiver_records_removed_total").increment(1);
            removed += 1;
        }
        if due.len() < SWEEP_BATCH as usize {
            return Ok(removed);
        }
    }
}
