//! Large task inputs and results in the JetStream object store bucket `payloads`.
//!
//! A record is rewritten at every transition and every progress save, travels in the lane
//! message and must fit one NATS message; an input or result larger than [`INLINE_MAX`] would
//! make all of that heavy, and one larger than the server's `max_payload` impossible. Such a
//! payload is stored once as the object `<task_id>/input` or `<task_id>/result` (up to a
//! configured cap, [`DEFAULT_MAX_BYTES`]) and the record keeps a [`PayloadRef`] with its size and
//! digest instead (`input_ref`, `result_ref`, with `input` / `result` `null`). The gateway stores
//! large inputs at submit; a worker stores large results, and the input of a NATS-native task
//! that would not fit its record; both read them back here. Objects are named after their task
//! id, and a worker reads only the input object named after the task it runs.

use async_nats::jetstream::{self, object_store};
use serde_json::Value;
use tokio::io::AsyncReadExt;

use crate::task::{PayloadRef, TaskId, TaskRecord};
use crate::topology::{PAYLOADS_BUCKET, PAYLOADS_STREAM};

/// Inputs and results whose JSON is larger than this go to the object store. 64 KiB keeps a
/// record, rewritten a few times per task, cheap to write and to replay over a WebSocket, while
/// the prompts and tool results of most agent tasks stay inline.
pub const INLINE_MAX: usize = 64 * 1024;

/// The default cap on a stored input or result: 64 MiB.
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;

/// Which payload of a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Input,
    Result,
}

impl Part {
    /// `input` or `result`.
    pub fn parse(name: &str) -> Option<Part> {
        match name {
            "input" => Some(Part::Input),
            "result" => Some(Part::Result),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Part::Input => "input",
            Part::Result => "result",
        }
    }
}

/// The object name of a task's payload: `<task_id>/input` or `<task_id>/result`.
pub fn object_name(id: &TaskId, part: Part) -> String {
    format!("{id}/{}", part.as_str())
}

/// Why a payload was not stored or read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the {part} is {bytes} bytes, more than the {max} bytes a payload may have")]
    TooLarge { part: &'static str, bytes: usize, max: usize },
    /// The object is not in the bucket (never stored, or removed with its record).
    #[error("payload {0} is not in the object store")]
    NotFound(String),
    /// It is there but is not what the reference says (size, JSON).
    #[error("payload {name}: {why}")]
    Corrupt { name: String, why: String },
    /// JetStream did not answer or refused for now.
    #[error("the payloads bucket is unavailable: {0}")]
    Unavailable(async_nats::Error),
}

/// The `payloads` bucket. Cheap to clone.
#[derive(Clone)]
pub struct Payloads {
    store: object_store::ObjectStore,
    /// The stream behind the bucket, for reading an object chunk by chunk ([`Payloads::chunk`]).
    stream: jetstream::stream::Stream<()>,
    max_bytes: usize,
}

/// One chunk of a stored payload ([`Payloads::chunk`]).
#[derive(Debug)]
pub struct Chunk {
    pub bytes: bytes::Bytes,
    /// Where the next chunk is looked for: pass it as `from`. The payload is whole once the
    /// chunks read add up to its size.
    pub next: u64,
}

impl std::fmt::Debug for Payloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The store handle has no Debug of its own.
        f.debug_struct("Payloads").field("max_bytes", &self.max_bytes).finish_non_exhaustive()
    }
}

/// The size of `value` as compact JSON.
pub fn json_size(value: &Value) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX, |v| v.len())
}

impl Payloads {
    /// The bucket of `js`'s account (`topology::ensure` makes it); payloads are capped at
    /// `max_bytes`.
    pub async fn open(js: &jetstream::Context, max_bytes: usize) -> Result<Payloads, Error> {
        let store =
            js.get_object_store(PAYLOADS_BUCKET).await.map_err(|e| Error::Unavailable(e.into()))?;
        let stream = js
            .get_stream_no_info(PAYLOADS_STREAM)
            .await
            .map_err(|e| Error::Unavailable(e.into()))?;
        Ok(Payloads { store, stream, max_bytes })
    }

    /// The largest payload stored, in bytes.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// The same bucket with another cap.
    pub fn with_max_bytes(&self, max_bytes: usize) -> Payloads {
        Payloads { store: self.store.clone(), stream: self.stream.clone(), max_bytes }
    }

    /// Stores `json` as `part` of task `id` (replacing an earlier one) and returns its reference.
    pub async fn put(&self, id: &TaskId, part: Part, json: &[u8]) -> Result<PayloadRef, Error> {
        if json.len() > self.max_bytes {
            let (part, bytes, max) = (part.as_str(), json.len(), self.max_bytes);
            return Err(Error::TooLarge { part, bytes, max });
        }
        let name = object_name(id, part);
        let meta = object_store::ObjectMetadata {
            name: name.clone(),
            description: Some("application/json".into()),
            ..Default::default()
        };
        let mut reader = json;
        let info =
            self.store.put(meta, &mut reader).await.map_err(|e| Error::Unavailable(e.into()))?;
        Ok(PayloadRef {
            bucket: PAYLOADS_BUCKET.to_owned(),
            name,
            size: info.size as u64,
            digest: info.digest,
        })
    }

    /// A reader of the object `payload` refers to, for streaming it out.
    pub async fn reader(&self, payload: &PayloadRef) -> Result<object_store::Object, Error> {
        use async_nats::jetstream::object_store::GetErrorKind;
        self.store.get(&payload.name).await.map_err(|e| match e.kind() {
            GetErrorKind::NotFound => Error::NotFound(payload.name.clone()),
            _ => Error::Unavailable(e.into()),
        })
    }

    /// The chunk of the object `payload` refers to that is stored first at or after stream
    /// sequence `from` (the first chunk for 0), for a reader that may not use the object store
    /// itself (a tenant over NATS, `claw.api.as.<principal>.payload`). Each chunk is one
    /// message of the object (128 KiB at most), so every read is one direct get: a 64 MiB result
    /// is read in 512 requests, none of them re-reading what came before.
    pub async fn chunk(&self, payload: &PayloadRef, from: u64) -> Result<Chunk, Error> {
        use async_nats::jetstream::object_store::InfoErrorKind;
        use async_nats::jetstream::stream::DirectGetErrorKind;
        let info = self.store.info(&payload.name).await.map_err(|e| match e.kind() {
            InfoErrorKind::NotFound => Error::NotFound(payload.name.clone()),
            _ => Error::Unavailable(e.into()),
        })?;
        let subject = crate::topology::payload_chunks_subject(&info.nuid);
        let message = self
            .stream
            .direct_get_next_for_subject(subject, Some(from.max(1)))
            .await
            .map_err(|e| match e.kind() {
                DirectGetErrorKind::NotFound => {
                    Error::NotFound(format!("{}: no chunk from sequence {from} on", payload.name))
                }
                _ => Error::Unavailable(e.into()),
            })?;
        Ok(Chunk { bytes: message.payload, next: message.sequence + 1 })
    }

    /// The whole object `payload` refers to, if it is within this bucket handle's cap,
    /// checked against the reference's size.
    pub async fn read(&self, payload: &PayloadRef) -> Result<Vec<u8>, Error> {
        if payload.size > self.max_bytes as u64 {
            let max = self.max_bytes;
            return Err(Error::TooLarge { part: "payload", bytes: payload.size as usize, max });
        }
        self.read_whole(payload).await
    }

    async fn read_whole(&self, payload: &PayloadRef) -> Result<Vec<u8>, Error> {
        let mut object = self.reader(payload).await?;
        let mut bytes = Vec::with_capacity(payload.size as usize);
        object.read_to_end(&mut bytes).await.map_err(|e| Error::Unavailable(e.into()))?;
        if bytes.len() as u64 != payload.size {
            let why = format!("{} bytes, the reference says {}", bytes.len(), payload.size);
            return Err(Error::Corrupt { name: payload.name.clone(), why });
        }
        Ok(bytes)
    }

    /// Removes both payloads of task `id`, if there are any.
    pub async fn remove(&self, id: &TaskId) -> Result<(), Error> {
        use async_nats::jetstream::object_store::DeleteErrorKind;
        for part in [Part::Input, Part::Result] {
            match self.store.delete(object_name(id, part)).await {
                Ok(()) => {}
                Err(e) if e.kind() == DeleteErrorKind::NotFound => {}
                Err(e) => return Err(Error::Unavailable(e.into())),
            }
        }
        Ok(())
    }

    /// Moves `record`'s input to the object store when it is larger than [`INLINE_MAX`];
    /// returns whether it did.
    pub async fn externalize_input(&self, record: &mut TaskRecord) -> Result<bool, Error> {
        if record.input_ref.is_some() {
            return Ok(false);
        }
        let json = serde_json::to_vec(&record.input).expect("a JSON value serializes");
        if json.len() <= INLINE_MAX {
            return Ok(false);
        }
        record.input_ref = Some(self.put(&record.id, Part::Input, &json).await?);
        record.input = Value::Null;
        Ok(true)
    }

    /// The input of `record`: inline, or read back from the store. Only the object named after
    /// the record's own id is read, whatever the reference says. Not capped here: whoever
    /// stored the input admitted its size under its own cap (the gateway's, or a worker's for a
    /// NATS-native message, which is at most a NATS message).
    pub async fn input_of(&self, record: &TaskRecord) -> Result<Value, Error> {
        let Some(stored) = &record.input_ref else { return Ok(record.input.clone()) };
        let own = object_name(&record.id, Part::Input);
        if stored.name != own {
            let why = format!("names {}, not this task's {own}", stored.name);
            return Err(Error::Corrupt { name: stored.name.clone(), why });
        }
        let bytes = self.read_whole(stored).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::Corrupt { name: stored.name.clone(), why: e.to_string() })
    }
}
