//! Reading and compare-and-set writing of task records in the `tasks` bucket.
//!
//! Every write a worker makes is a CAS on the revision it last read: that is what keeps a stale
//! attempt (a worker that lost its lease but is still running) from overwriting the attempt that
//! replaced it.

use async_nats::jetstream::kv;
use claw_proto::{TaskId, TaskRecord};

/// Why a read or write did not happen.
#[derive(Debug)]
pub enum KvError {
    /// Someone wrote the record since we read it (or created it first).
    Conflict,
    /// The record is not valid JSON of a [`TaskRecord`].
    Corrupt(String),
    Nats(async_nats::Error),
}

impl std::fmt::Display for KvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvError::Conflict => f.write_str("the record changed since it was read"),
            KvError::Corrupt(e) => write!(f, "the record is not a task record: {e}"),
            KvError::Nats(e) => write!(f, "{e}"),
        }
    }
}

/// The record and its revision, if there is one.
pub async fn read(kv: &kv::Store, id: &TaskId) -> Result<Option<(TaskRecord, u64)>, KvError> {
    let entry = kv.entry(id.as_str()).await.map_err(|e| KvError::Nats(e.into()))?;
    let Some(entry) = entry else { return Ok(None) };
    let record =
        serde_json::from_slice(&entry.value).map_err(|e| KvError::Corrupt(e.to_string()))?;
    Ok(Some((record, entry.revision)))
}

/// Creates the record if there is none; `Conflict` if there is.
pub async fn create(kv: &kv::Store, record: &TaskRecord) -> Result<u64, KvError> {
    kv.create(record.id.as_str(), to_json(record)).await.map_err(|e| match e.kind() {
        kv::CreateErrorKind::AlreadyExists => KvError::Conflict,
        _ => KvError::Nats(e.into()),
    })
}

/// Writes `record` if the stored revision is still `revision`; returns the new revision.
pub async fn update(kv: &kv::Store, record: &TaskRecord, revision: u64) -> Result<u64, KvError> {
    kv.update(record.id.as_str(), to_json(record), revision).await.map_err(|e| match e.kind() {
        kv::UpdateErrorKind::WrongLastRevision => KvError::Conflict,
        _ => KvError::Nats(e.into()),
    })
}

fn to_json(record: &TaskRecord) -> bytes::Bytes {
    serde_json::to_vec(record).expect("a record serializes").into()
}
