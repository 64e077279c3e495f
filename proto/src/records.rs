//! The one module that reads, creates and compare-and-sets task records in the `tasks` bucket.
//! The gateway, the worker and the archiver all go through [`Records`], so a rule about the
//! stored record is written once:
//!
//! - a delete or purge marker (`nats kv del tasks <id>`) is no record: [`Records::read`] answers
//!   `None`, and [`Records::create`] writes over it;
//! - a record must fit the server's `max_payload` with room for the KV headers, checked before
//!   anything is sent ([`Error::TooLarge`]), so an oversized record is refused up front instead
//!   of failing on the wire;
//! - every write but the first is a compare-and-set on the revision the writer read, and errors
//!   are typed: [`Error::Conflict`] means someone else wrote, [`Error::Unavailable`] that
//!   JetStream did not answer (a leader election, a dead connection), which callers may retry.

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use async_nats::jetstream::{self, stream};
use bytes::Bytes;

use crate::task::{TaskId, TaskRecord};

/// Bytes of a record's message that are not the record: the KV subject, the
/// `Nats-Expected-Last-Subject-Sequence` header and the protocol framing. Generous, so a record
/// that passes [`Records::encode`] is never refused by the server for its size.
pub const HEADROOM: usize = 1024;

/// Why a read or write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Someone wrote the record since it was read (update), or it exists (create).
    #[error("the record changed since it was read")]
    Conflict,
    /// The stored value is not a task record.
    #[error("the record is not a task record: {0}")]
    Corrupt(String),
    /// The encoded record is larger than the server takes in one message.
    #[error("the record is {bytes} bytes, more than the {max} bytes a record may have")]
    TooLarge { bytes: usize, max: usize },
    /// JetStream did not answer or refused for now; nothing is known to have been written.
    #[error("the tasks bucket is unavailable: {0}")]
    Unavailable(async_nats::Error),
}

/// A stored value as a record, or [`Error::Corrupt`]: what [`Records::read`] makes of the bytes
/// of a `PUT`. No I/O, so the fuzz target `record` (fuzz/) runs it on arbitrary bytes.
pub fn decode(value: &[u8]) -> Result<TaskRecord, Error> {
    serde_json::from_slice(value).map_err(|e| Error::Corrupt(e.to_string()))
}

/// A record as stored, with the revision a compare-and-set must name.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    pub record: TaskRecord,
    pub revision: u64,
}

/// The `tasks` bucket. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Records {
    kv: kv::Store,
    /// The stream behind the bucket, to remove one revision outright.
    stream: stream::Stream<()>,
    /// The largest encoded record: the server's `max_payload` less [`HEADROOM`].
    max_bytes: usize,
}

impl Records {
    /// The `tasks` bucket of `js`'s account (it must exist: `topology::ensure` makes it).
    pub async fn open(js: &jetstream::Context) -> Result<Records, Error> {
        use crate::topology::{TASKS_BUCKET, TASKS_KV_STREAM};
        let kv = js.get_key_value(TASKS_BUCKET).await.map_err(|e| Error::Unavailable(e.into()))?;
        let stream = js
            .get_stream_no_info(TASKS_KV_STREAM)
            .await
            .map_err(|e| Error::Unavailable(e.into()))?;
        Ok(Records::new(kv, stream, js.client().server_info().max_payload))
    }

    /// The bucket `kv`, whose stream is `stream`, on a server that takes messages of up to
    /// `max_payload` bytes.
    pub fn new(kv: kv::Store, stream: stream::Stream<()>, max_payload: usize) -> Records {
        Records { kv, stream, max_bytes: max_payload.saturating_sub(HEADROOM) }
    }

    /// The largest record the bucket takes, in bytes of JSON.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// The record's JSON, or [`Error::TooLarge`].
    pub fn encode(&self, record: &TaskRecord) -> Result<Bytes, Error> {
        let json = serde_json::to_vec(record).expect("a record serializes");
        if json.len() > self.max_bytes {
            return Err(Error::TooLarge { bytes: json.len(), max: self.max_bytes });
        }
        Ok(json.into())
    }

    /// The record of `id` and its revision; `None` when there is none, or only a delete or
    /// purge marker.
    pub async fn read(&self, id: &TaskId) -> Result<Option<Stored>, Error> {
        let entry = self.kv.entry(id.as_str()).await.map_err(|e| Error::Unavailable(e.into()))?;
        let Some(entry) = entry.filter(|e| e.operation == Operation::Put) else {
            return Ok(None);
        };
        Ok(Some(Stored { record: decode(&entry.value)?, revision: entry.revision }))
    }

    /// Creates the record unless one exists ([`Error::Conflict`]); a delete marker does not
    /// count as one. Returns the revision.
    pub async fn create(&self, record: &TaskRecord) -> Result<u64, Error> {
        let value = self.encode(record)?;
        self.kv.create(record.id.as_str(), value).await.map_err(|e| match e.kind() {
            CreateErrorKind::AlreadyExists => Error::Conflict,
            _ => Error::Unavailable(e.into()),
        })
    }

    /// Writes `record` if the stored revision is still `revision`; returns the new revision.
    pub async fn update(&self, record: &TaskRecord, revision: u64) -> Result<u64, Error> {
        let value = self.encode(record)?;
        self.kv.update(record.id.as_str(), value, revision).await.map_err(|e| match e.kind() {
            UpdateErrorKind::WrongLastRevision => Error::Conflict,
            _ => Error::Unavailable(e.into()),
        })
    }

    /// Removes revision `revision` outright, leaving no marker: a refused submit's record, a
    /// finished one past its retention. A revision already replaced by a newer write is gone
    /// anyway; that is not an error. Returns whether this call removed it, so a caller knows
    /// the revision was still the record's last.
    pub async fn remove(&self, revision: u64) -> Result<bool, Error> {
        use async_nats::jetstream::ErrorCode;
        use async_nats::jetstream::stream::DeleteMessageErrorKind;
        match self.stream.delete_message(revision).await {
            Ok(removed) => Ok(removed),
            Err(e) => match e.kind() {
                DeleteMessageErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::NO_MESSAGE_FOUND =>
                {
                    Ok(false)
                }
                _ => Err(Error::Unavailable(e.into())),
            },
        }
    }
}
