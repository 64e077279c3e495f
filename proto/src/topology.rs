//! The NATS topology: every subject, stream, consumer and bucket name, and the one idempotent
//! [`ensure`] that every binary and the test harness call at start.
//!
//! The definitions live once, as JetStream-API JSON under `nats/` (the files
//! `nats stream add --config` and `nats consumer add --config` read); they are compiled in here,
//! so the code and the operator's files cannot drift. [`Settings`] overrides the few fields a
//! deployment tunes (queue limit, replicas, ack deadline). No other file spells a
//! subject pattern.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use serde_json::{Map, Value};

use crate::payloads::{self, Payloads};
use crate::records::Records;
use crate::task::{Class, Priority, Session, TaskId};

pub const TASKS_STREAM: &str = "TASKS";
pub const PROGRESS_STREAM: &str = "PROGRESS";
pub const DLQ_STREAM: &str = "DLQ";
/// The KV bucket of task records, and the stream behind it.
pub const TASKS_BUCKET: &str = "tasks";
pub const TASKS_KV_STREAM: &str = "KV_tasks";
/// The KV bucket of single-use WebSocket tickets (`POST /v1/ws-ticket`), and the stream behind
/// it. Only the gateway reads and writes it.
pub const TICKETS_BUCKET: &str = "tickets";
pub const TICKETS_KV_STREAM: &str = "KV_tickets";
/// The KV bucket of concurrency slots: who holds a slot of each concurrency key (the worker's
/// `slots` module), and the stream behind it.
pub const SLOTS_BUCKET: &str = "slots";
pub const SLOTS_KV_STREAM: &str = "KV_slots";
/// The object store bucket of large task inputs and results (`claw_proto::payloads`), and the
/// stream behind it.
pub const PAYLOADS_BUCKET: &str = "payloads";
pub const PAYLOADS_STREAM: &str = "OBJ_payloads";

/// The subject of an object's chunks in [`PAYLOADS_BUCKET`] (`$O.payloads.C.<nuid>`, the
/// object store's layout): read one chunk at a time by direct get.
pub fn payload_chunks_subject(nuid: &str) -> String {
    format!("$O.{PAYLOADS_BUCKET}.C.{nuid}")
}
/// The durable consumer on [`TASKS_KV_STREAM`] that archivers before protocol 5 read the bucket
/// with, acking each revision; the archiver removes it at start.
pub const RETIRED_ARCHIVER_CONSUMER: &str = "archiver";
/// The name prefix of the archiver's ordered consumers on [`TASKS_KV_STREAM`] (ephemeral: it
/// keeps its position in its SQLite file).
pub const ARCHIVER_READER_PREFIX: &str = "archiver_";

/// Every progress event: what `nats sub 'progress.>'` watches.
pub const PROGRESS_ALL: &str = "progress.>";
/// Every dead letter.
pub const DLQ_ALL: &str = "dlq.>";
/// Where a message goes when it is not a task at all and has no lane of its own.
pub const DLQ_INVALID: &str = "dlq.invalid";

/// Control wake-ups to workers: `claw.control.<task_id>` (see `api::Control`).
pub const CONTROL_ALL: &str = "claw.control.*";

pub fn control_subject(id: &TaskId) -> String {
    format!("claw.control.{id}")
}

/// A worker's lease probe, `claw.lease.<probe>`: the worker sends a request to its own
/// subscription here, so an answer proves the server routes its messages (see the worker's
/// `lease` module). The worker role may publish and subscribe here, nobody else needs to.
pub fn lease_subject(probe: &str) -> String {
    format!("claw.lease.{probe}")
}

/// Every worker answers status requests here (gather the replies).
pub const WORKER_STATUS_ALL: &str = "claw.worker.status";

/// Only the worker called `name` answers here: `claw.worker.<name>.status`, with `.`, `*`, `>`
/// and spaces in the name made `_` so it stays one token.
pub fn worker_status_subject(name: &str) -> String {
    let token: String =
        name.chars().map(|c| if matches!(c, '.' | '*' | '>' | ' ') { '_' } else { c }).collect();
    format!("claw.worker.{token}.status")
}

/// Request/reply services.
pub const API_SERVICE: &str = "claw-api";
pub const API_GROUP: &str = "claw.api";
/// The token after [`API_GROUP`] that starts a principal's own endpoints:
/// `claw.api.as.<principal>.<verb>` ([`principal_api_subject`]).
pub const API_AS: &str = "as";
pub const ARCHIVE_SERVICE: &str = "claw-archive";
pub const ARCHIVE_GROUP: &str = "claw.archive";
pub const ARCHIVE_GET: &str = "claw.archive.get";
pub const ARCHIVE_LIST: &str = "claw.archive.list";
/// Each principal's share of the system (queued and running tasks, bytes stored), which the
/// gateways' quotas read: [`crate::api::UsageReport`].
pub const ARCHIVE_USAGE: &str = "claw.archive.usage";

/// Headers the system reads or writes.
pub mod headers {
    /// `text` as one header value: a message may quote a caller's input, and a line break would
    /// end the header (async-nats refuses a value with one by panicking). Control characters
    /// become spaces.
    pub fn one_line(text: &str) -> String {
        text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
    }

    /// JetStream's de-duplication id; the gateway sets it to the task id.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// Why a message was dead-lettered: a short code (`invalid_task`, `max_attempts`, ...).
    pub const DLQ_REASON: &str = "Claw-Dlq-Reason";
    /// The human sentence behind the reason.
    pub const DLQ_MESSAGE: &str = "Claw-Dlq-Message";
    /// The subject the message was originally published to.
    pub const DLQ_SUBJECT: &str = "Claw-Dlq-Subject";
    /// The task id, when one could be determined.
    pub const TASK_ID: &str = "Claw-Task-Id";
    /// How many times the message had been delivered.
    pub const DLQ_DELIVERIES: &str = "Claw-Dlq-Deliveries";
    /// On a lane message whose record its publisher writes itself or found written (value
    /// [`RECORD_BY_SUBMITTER`]: the gateway's submit, a task published again from its record, a
    /// parked task woken): a worker reads the record first, and one that finds none yet waits
    /// for it a moment instead of building one from the message, which would not know the owner
    /// or its limits. Without it a first delivery creates the record straight away.
    pub const RECORD: &str = "Claw-Record";
    pub const RECORD_BY_SUBMITTER: &str = "submitter";
    /// On a `claw.api.payload` reply: the payload's whole size in bytes.
    pub const PAYLOAD_SIZE: &str = "Claw-Payload-Size";
    /// On a `claw.api.payload` reply of a stored payload: the `from` of the next chunk.
    pub const PAYLOAD_NEXT: &str = "Claw-Payload-Next";
}

/// One class × priority lane: a subject of `TASKS` and the durable consumer that drains it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lane {
    pub class: Class,
    pub priority: Priority,
}

impl Lane {
    pub const ALL: [Lane; 6] = [
        Lane { class: Class::Short, priority: Priority::High },
        Lane { class: Class::Short, priority: Priority::Normal },
        Lane { class: Class::Short, priority: Priority::Low },
        Lane { class: Class::Long, priority: Priority::High },
        Lane { class: Class::Long, priority: Priority::Normal },
        Lane { class: Class::Long, priority: Priority::Low },
    ];

    pub fn new(class: Class, priority: Priority) -> Lane {
        Lane { class, priority }
    }

    /// The lanes of one class, highest priority first.
    pub fn of_class(class: Class) -> [Lane; 3] {
        Priority::ALL.map(|priority| Lane { class, priority })
    }

    /// `tasks.<class>.<priority>`.
    pub fn subject(self) -> String {
        format!("tasks.{}.{}", self.class, self.priority)
    }

    /// The durable consumer name, `<class>-<priority>`.
    pub fn consumer(self) -> String {
        format!("{}-{}", self.class, self.priority)
    }

    /// `dlq.<class>.<priority>`.
    pub fn dlq_subject(self) -> String {
        format!("dlq.{}.{}", self.class, self.priority)
    }

    /// The lane of a `tasks.<class>.<priority>` subject.
    pub fn of_subject(subject: &str) -> Option<Lane> {
        let rest = subject.strip_prefix("tasks.")?;
        let (class, priority) = rest.split_once('.')?;
        Some(Lane { class: Class::parse(class)?, priority: Priority::parse(priority)? })
    }
}

/// Every lane, `tasks.*.*`.
pub const TASKS_ALL: &str = "tasks.*.*";
/// Every task waiting for a concurrency slot, `parked.<key>`: the other subjects of
/// [`TASKS_STREAM`].
pub const PARKED_ALL: &str = "parked.*";

/// Where tasks wait for a slot of a concurrency key: `parked.<token>`, in [`TASKS_STREAM`], so
/// they count against the queue limit and the reconciler sees that they have a message.
pub fn parked_subject(token: &str) -> String {
    format!("parked.{token}")
}

/// The key token of a [`parked_subject`].
pub fn parked_token(subject: &str) -> Option<&str> {
    subject.strip_prefix("parked.")
}

/// A concurrency key as one subject token and KV key: its bytes in lower-case hex, so any key
/// (a principal's name, a user's key with dots or spaces) fits both.
pub fn slot_token(key: &str) -> String {
    key.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The JetStream API subject of a direct get on `stream` (`$JS.API.DIRECT.GET.<stream>`), for a
/// request whose JSON body says what to get, and whose answer may be a batch of messages.
pub fn direct_get_subject(stream: &str) -> String {
    format!("$JS.API.DIRECT.GET.{stream}")
}

/// Every lane of one class, `tasks.<class>.*`: a worker's wake-up subscription.
pub fn class_subjects(class: Class) -> String {
    format!("tasks.{class}.*")
}

/// A core subject the gateway rings after resuming a lane of `class`, `claw.doorbell.<class>`:
/// a resume publishes no task, so without it an idle pool would find the lane's backlog only
/// at its next timed look.
pub fn doorbell_subject(class: Class) -> String {
    format!("claw.doorbell.{class}")
}

/// The KV subject of a record, `$KV.tasks.<id>`; the archiver reads ids back from it.
pub const KV_SUBJECT_PREFIX: &str = "$KV.tasks.";

/// A session as its events are addressed. Each principal's sessions are a namespace of its
/// own (alice's `default` is not bob's): their events go to `progress.<owner>.<session>.<id>`.
/// Tasks without an owner (NATS-native publishers, a gateway without API tokens) share the
/// namespace `progress.<session>.<id>`. A subscription to one never matches the other, because
/// `*` matches exactly one token: `progress.alice.*` is the unowned session `alice`, not a
/// session of alice's.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionScope {
    owner: Option<String>,
    session: Session,
}

impl SessionScope {
    pub fn new(owner: Option<&str>, session: Session) -> SessionScope {
        SessionScope { owner: owner.map(str::to_owned), session }
    }

    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The subject of one task's events.
    pub fn subject(&self, id: &TaskId) -> String {
        format!("{}.{id}", self.prefix())
    }

    /// Every event of the session: `progress.[<owner>.]<session>.*`.
    pub fn filter(&self) -> String {
        format!("{}.*", self.prefix())
    }

    fn prefix(&self) -> String {
        match &self.owner {
            None => format!("progress.{}", self.session),
            // Principal names are tokens (the tokens file is checked); an owner that is not one
            // (a record written by hand) goes to a namespace no session filter names.
            Some(owner) if Session::parse(owner).is_ok() => {
                format!("progress.{owner}.{}", self.session)
            }
            Some(_) => format!("progress.~.{}", self.session),
        }
    }
}

impl std::fmt::Display for SessionScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.owner {
            None => write!(f, "{}", self.session),
            Some(owner) => write!(f, "{owner}/{}", self.session),
        }
    }
}

/// The gateway's request/reply subject for a verb: `claw.api.<verb>`.
pub fn api_subject(verb: &str) -> String {
    format!("{API_GROUP}.{verb}")
}

/// The gateway's request/reply subject for a verb acting as a principal of its tokens file:
/// `claw.api.as.<principal>.<verb>`. A principal name is one subject token (1-64 characters of
/// `A-Z a-z 0-9 _ -`, as a session's), so NATS permissions can pin `claw.api.as.<name>.>` to the
/// user who is that principal.
pub fn principal_api_subject(principal: &str, verb: &str) -> String {
    format!("{API_GROUP}.{API_AS}.{principal}.{verb}")
}

/// What a deployment tunes; everything else comes from the files under `nats/`.
#[derive(Clone, Debug, clap::Args)]
pub struct Settings {
    /// Queue limit: messages in `TASKS` before submits get 429.
    #[arg(long = "queue-max", env = "CLAW_QUEUE_MAX", default_value_t = 10_000)]
    pub queue_max: i64,
    /// Replicas of every stream (3 on a 3-node cluster).
    #[arg(long = "replicas", env = "CLAW_REPLICAS", default_value_t = 1)]
    pub replicas: usize,
    /// The lane consumers' ack deadline in seconds. Only processes that set it (the worker does,
    /// from its config) change it; others leave an existing consumer's value alone.
    #[arg(long = "ack-wait-s", env = "CLAW_ACK_WAIT_S")]
    pub ack_wait_s: Option<f64>,
}

impl Settings {
    /// The values of the files under `nats/`.
    pub fn standard() -> Settings {
        Settings { queue_max: 10_000, replicas: 1, ack_wait_s: None }
    }

    pub fn ack_wait(&self) -> Option<Duration> {
        self.ack_wait_s.map(Duration::from_secs_f64)
    }
}

/// What went wrong while ensuring the topology.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("NATS request for {what} failed: {source}")]
    Nats {
        what: String,
        #[source]
        source: async_nats::Error,
    },
    /// The object exists with settings that differ and the server refused to change them.
    #[error(
        "{what} exists with different settings ({diffs}) and cannot be updated: {reason}; \
         remove it (`nats {what}` rm) or align the settings"
    )]
    Conflict { what: String, diffs: String, reason: String },
    #[error("definition {file} is invalid: {reason}")]
    Definition { file: &'static str, reason: String },
}

/// Handles on the ensured topology.
#[derive(Clone, Debug)]
pub struct Topology {
    pub js: jetstream::Context,
    /// The `tasks` bucket itself; services read and write records through [`Topology::records`].
    pub tasks_kv: kv::Store,
    /// Task records: the one way services read, create and compare-and-set them.
    pub records: Records,
    /// Large inputs and results, capped at [`payloads::DEFAULT_MAX_BYTES`]; a service with
    /// another cap takes `payloads.with_max_bytes(..)`.
    pub payloads: Payloads,
    /// Who holds a slot of each concurrency key (the worker's `slots` module).
    pub slots_kv: kv::Store,
}

impl Topology {
    /// The durable pull consumer of a lane.
    pub async fn lane_consumer(&self, lane: Lane) -> Result<consumer::PullConsumer, Error> {
        self.js.get_consumer_from_stream(lane.consumer(), TASKS_STREAM).await.map_err(|e| {
            Error::Nats { what: format!("consumer {}", lane.consumer()), source: e.into() }
        })
    }
}

struct Definition {
    file: &'static str,
    json: &'static str,
}

macro_rules! def {
    ($path:literal) => {
        Definition {
            file: concat!("nats/", $path),
            json: include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../nats/", $path)),
        }
    };
}

const STREAMS: [Definition; 7] = [
    def!("streams/TASKS.json"),
    def!("streams/PROGRESS.json"),
    def!("streams/DLQ.json"),
    def!("streams/KV_tasks.json"),
    def!("streams/KV_tickets.json"),
    def!("streams/KV_slots.json"),
    def!("streams/OBJ_payloads.json"),
];

const LANE_CONSUMERS: [Definition; 6] = [
    def!("consumers/TASKS/short-high.json"),
    def!("consumers/TASKS/short-normal.json"),
    def!("consumers/TASKS/short-low.json"),
    def!("consumers/TASKS/long-high.json"),
    def!("consumers/TASKS/long-normal.json"),
    def!("consumers/TASKS/long-low.json"),
];

fn nanos(d: Duration) -> Value {
    Value::from(d.as_nanos() as u64)
}

impl Definition {
    fn parse(&self) -> Result<Map<String, Value>, Error> {
        match serde_json::from_str(self.json) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) => Err(Error::Definition { file: self.file, reason: "not an object".into() }),
            Err(e) => Err(Error::Definition { file: self.file, reason: e.to_string() }),
        }
    }
}

/// The stream definitions with `settings` applied, by name.
fn desired_streams(settings: &Settings) -> Result<Vec<Map<String, Value>>, Error> {
    STREAMS
        .iter()
        .map(|def| {
            let mut map = def.parse()?;
            map.insert("num_replicas".into(), settings.replicas.into());
            if map.get("name").and_then(Value::as_str) == Some(TASKS_STREAM) {
                map.insert("max_msgs".into(), settings.queue_max.into());
            }
            Ok(map)
        })
        .collect()
}

/// Creates what is missing and updates what differs from the definitions. Safe to call from
/// many processes at once: creating an existing identical object is a no-op for the server.
pub async fn ensure(js: &jetstream::Context, settings: &Settings) -> Result<Topology, Error> {
    for desired in desired_streams(settings)? {
        ensure_stream(js, desired).await?;
    }
    for def in &LANE_CONSUMERS {
        let mut desired = def.parse()?;
        let keep_existing_ack_wait = match settings.ack_wait() {
            Some(ack_wait) => {
                desired.insert("ack_wait".into(), nanos(ack_wait));
                false
            }
            None => true,
        };
        ensure_consumer(js, TASKS_STREAM, desired, keep_existing_ack_wait).await?;
    }
    let tasks_kv = js
        .get_key_value(TASKS_BUCKET)
        .await
        .map_err(|e| Error::Nats { what: format!("bucket {TASKS_BUCKET}"), source: e.into() })?;
    let kv_stream = js
        .get_stream_no_info(TASKS_KV_STREAM)
        .await
        .map_err(|e| Error::Nats { what: format!("stream {TASKS_KV_STREAM}"), source: e.into() })?;
    let max_payload = js.client().server_info().max_payload;
    let records = Records::new(tasks_kv.clone(), kv_stream, max_payload);
    let payloads = Payloads::open(js, payloads::DEFAULT_MAX_BYTES)
        .await
        .map_err(|e| Error::Nats { what: format!("bucket {PAYLOADS_BUCKET}"), source: e.into() })?;
    let slots_kv = js
        .get_key_value(SLOTS_BUCKET)
        .await
        .map_err(|e| Error::Nats { what: format!("bucket {SLOTS_BUCKET}"), source: e.into() })?;
    Ok(Topology { js: js.clone(), tasks_kv, records, payloads, slots_kv })
}

/// How long a process starting up waits for JetStream to take the topology (see
/// [`ensure_at_start`]): a cluster that was started at the same time needs a few seconds to
/// elect its meta leader, and a node restarting under a supervisor longer.
pub const START_PATIENCE: Duration = Duration::from_secs(60);

/// [`ensure`] for a process starting up: while JetStream does not answer (a cluster still
/// electing its meta leader, a stream leader moving) it tries again, logging why, for up to
/// [`START_PATIENCE`]. A definition the server refuses is reported at once: waiting would not
/// change it.
pub async fn ensure_at_start(
    js: &jetstream::Context,
    settings: &Settings,
) -> Result<Topology, Error> {
    let give_up = tokio::time::Instant::now() + START_PATIENCE;
    let mut pause = Duration::from_millis(250);
    loop {
        match ensure(js, settings).await {
            Err(Error::Nats { what, source }) if tokio::time::Instant::now() + pause < give_up => {
                tracing::warn!(%what, error = %source, "JetStream not ready; waiting for it");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            result => return result,
        }
    }
}

/// Whether `existing` already has `value` for `key`. A key the server omits counts as equal when
/// the wanted value is the server's default (false, 0, -1, empty).
fn same(existing: &Map<String, Value>, key: &str, value: &Value) -> bool {
    match existing.get(key) {
        Some(v) => v == value,
        None => match value {
            Value::Bool(b) => !b,
            Value::Number(n) => n.as_i64().is_some_and(|n| n == 0 || n == -1),
            Value::String(s) => s.is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::Null => true,
            Value::Object(o) => o.is_empty(),
        },
    }
}

fn differences(existing: &Map<String, Value>, desired: &Map<String, Value>) -> Vec<String> {
    desired
        .iter()
        .filter(|(k, v)| !same(existing, k, v))
        .map(|(k, v)| {
            let was = existing.get(k).map_or_else(|| "unset".to_owned(), Value::to_string);
            format!("{k}: {was} -> {v}")
        })
        .collect()
}

fn to_map<T: serde::Serialize>(value: &T) -> Map<String, Value> {
    match serde_json::to_value(value) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

fn from_map<T: serde::de::DeserializeOwned>(
    what: &str,
    map: Map<String, Value>,
) -> Result<T, Error> {
    serde_json::from_value(Value::Object(map)).map_err(|e| Error::Conflict {
        what: what.to_owned(),
        diffs: String::new(),
        reason: format!("merged configuration does not parse: {e}"),
    })
}

async fn ensure_stream(js: &jetstream::Context, desired: Map<String, Value>) -> Result<(), Error> {
    let name = desired.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
    let what = format!("stream {name}");
    let nats = |source: async_nats::Error| Error::Nats { what: what.clone(), source };
    match js.get_stream(&name).await {
        Ok(stream) => {
            let existing = to_map(&stream.cached_info().config);
            let diffs = differences(&existing, &desired);
            if diffs.is_empty() {
                return Ok(());
            }
            let mut merged = existing;
            merged.extend(desired);
            let config: stream::Config = from_map(&what, merged)?;
            js.update_stream(config).await.map_err(|e| Error::Conflict {
                what: what.clone(),
                diffs: diffs.join(", "),
                reason: e.to_string(),
            })?;
            tracing::info!(stream = %name, changes = %diffs.join(", "), "updated stream");
            Ok(())
        }
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j)
            if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            let config: stream::Config = from_map(&what, desired)?;
            match js.create_stream(config).await {
                Ok(_) => {
                    tracing::info!(stream = %name, "created stream");
                    Ok(())
                }
                // Another process created it between our look and our create: check again.
                Err(_) if js.get_stream(&name).await.is_ok() => Ok(()),
                Err(e) => Err(nats(e.into())),
            }
        }
        Err(e) => Err(nats(e.into())),
    }
}

async fn ensure_consumer(
    js: &jetstream::Context,
    stream_name: &str,
    mut desired: Map<String, Value>,
    keep_existing_ack_wait: bool,
) -> Result<(), Error> {
    let name = desired.get("durable_name").and_then(Value::as_str).unwrap_or_default().to_owned();
    let what = format!("consumer {stream_name}/{name}");
    let nats = |source: async_nats::Error| Error::Nats { what: what.clone(), source };
    let stream = js.get_stream_no_info(stream_name).await.map_err(|e| nats(e.into()))?;
    match stream.consumer_info(&name).await {
        Ok(info) => {
            let existing = to_map(&info.config);
            if keep_existing_ack_wait {
                desired.remove("ack_wait");
            }
            let diffs = differences(&existing, &desired);
            if diffs.is_empty() {
                return Ok(());
            }
            let mut merged = existing;
            merged.extend(desired.clone());
            let config: consumer::Config = from_map(&what, merged)?;
            match stream.update_consumer(config).await {
                Ok(_) => {
                    tracing::info!(consumer = %name, changes = %diffs.join(", "), "updated consumer");
                    Ok(())
                }
                // Refused, saying why: deleting a lane consumer would lose the acks in flight.
                Err(e) => Err(Error::Conflict {
                    what: what.clone(),
                    diffs: diffs.join(", "),
                    reason: e.to_string(),
                }),
            }
        }
        Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => {
            let config: consumer::Config = from_map(&what, desired)?;
            stream.create_consumer(config).await.map_err(|e| nats(e.into()))?;
            tracing::info!(consumer = %name, "created consumer");
            Ok(())
        }
        Err(e) => Err(nats(e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_definition_parses_into_its_config() {
        for def in &STREAMS {
            let map = def.parse().unwrap();
            let _: stream::Config = serde_json::from_value(Value::Object(map)).unwrap();
        }
        for def in &LANE_CONSUMERS {
            let map = def.parse().unwrap();
            let _: consumer::Config = serde_json::from_value(Value::Object(map)).unwrap();
        }
    }

    #[test]
    fn lane_files_match_lane_names() {
        for (def, lane) in LANE_CONSUMERS.iter().zip(Lane::ALL) {
            let map = def.parse().unwrap();
            assert_eq!(map["durable_name"], lane.consumer().as_str());
            assert_eq!(map["filter_subject"], lane.subject().as_str());
        }
    }

    #[test]
    fn the_queue_is_every_lane_and_every_parked_key() {
        let tasks = STREAMS[0].parse().unwrap();
        assert_eq!(tasks["name"], TASKS_STREAM);
        assert_eq!(tasks["subjects"], serde_json::json!([TASKS_ALL, PARKED_ALL]));
        let subject = parked_subject(&slot_token("principal:a.b c"));
        assert_eq!(parked_token(&subject), Some(slot_token("principal:a.b c").as_str()));
        assert_eq!(slot_token("principal:a.b c").len(), 2 * "principal:a.b c".len());
        assert!(slot_token("k.>*").bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn lanes_round_trip_through_subjects() {
        for lane in Lane::ALL {
            assert_eq!(Lane::of_subject(&lane.subject()), Some(lane));
        }
        assert_eq!(Lane::of_subject("tasks.short"), None);
        assert_eq!(Lane::of_subject("tasks.huge.high"), None);
    }

    #[test]
    fn settings_override_the_files() {
        let s = Settings { queue_max: 5, replicas: 3, ack_wait_s: None };
        let streams = desired_streams(&s).unwrap();
        let tasks = streams.iter().find(|m| m["name"] == TASKS_STREAM).unwrap();
        assert_eq!(tasks["max_msgs"], 5);
        assert_eq!(tasks["num_replicas"], 3);
        // A live record never expires: the archiver removes terminal ones after archiving.
        let kv = streams.iter().find(|m| m["name"] == TASKS_KV_STREAM).unwrap();
        assert_eq!(kv["max_age"], 0);
    }

    /// "No file but topology.rs spells a subject": every service's source (tests aside) is
    /// searched for string literals that start like one of our subjects. `bench/` is left out:
    /// it measures the system from outside, as a NATS-native client would, without our crates.
    #[test]
    fn no_other_source_spells_a_subject() {
        const SUBJECT_STARTS: [&str; 12] = [
            "\"tasks.",
            "\"parked.",
            "\"progress.",
            "\"dlq.",
            "\"claw.api",
            "\"claw.archive",
            "\"claw.control",
            "\"claw.lease",
            "\"claw.worker",
            "\"$KV.",
            "\"$O.",
            "\"_CLAW",
        ];
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut found = Vec::new();
        let mut dirs: Vec<_> = ["proto", "gateway", "worker", "archiver", "cli", "examples"]
            .iter()
            .map(|d| root.join(d))
            .collect();
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                if path.extension().is_none_or(|e| e != "rs") || path.ends_with("topology.rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                // Unit tests may spell subjects to check them.
                let code = text.split("#[cfg(test)]").next().unwrap_or_default();
                for (n, line) in code.lines().enumerate() {
                    if SUBJECT_STARTS.iter().any(|s| line.contains(s)) {
                        found.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                    }
                }
            }
        }
        assert!(found.is_empty(), "subjects spelled outside topology.rs:\n{}", found.join("\n"));
    }

    #[test]
    fn absent_defaults_are_not_differences() {
        let existing = to_map(&serde_json::json!({"a": 1}));
        let desired = to_map(&serde_json::json!({"a": 1, "deny_purge": false, "b": -1}));
        assert!(differences(&existing, &desired).is_empty());
        let desired = to_map(&serde_json::json!({"a": 2}));
        assert_eq!(differences(&existing, &desired), ["a: 1 -> 2"]);
    }
}
