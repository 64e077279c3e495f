//! The `TASKS` queue as the services use it: publishing a task back to its lane
//! ([`republish`]), and which task a lane message carries ([`given_id`], [`derived_id`],
//! [`task_id`]).
//!
//! The gateway's resume and retry and the archiver's reconciler publish a record again through
//! [`republish`], so both write the same message. The worker names the task of a delivery with
//! [`given_id`] and [`derived_id`], and the reconciler, which lists the tasks that have a
//! message, with [`task_id`] (the same two rules): if the two disagreed, the reconciler would
//! count a task without a message as queued, or publish a second copy of one that has one.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishError, publish::PublishAck};
use time::OffsetDateTime;

use crate::spec::TaskSpec;
use crate::task::{TaskId, TaskRecord};
use crate::topology::{Lane, headers};

/// Publishes `record`'s task (its normalized spec) to its lane and waits for JetStream's ack.
///
/// The message id is `<id>:<revision>`: the task id alone would be dropped by JetStream's
/// de-duplication when the first message was published less than its window (2 min) ago, and
/// the revision makes a repeat of the same publish (a retried request, two reconciler passes
/// over the same record) one message.
pub async fn republish(
    js: &jetstream::Context,
    record: &TaskRecord,
    revision: u64,
) -> Result<PublishAck, PublishError> {
    let message = serde_json::to_vec(&TaskSpec::of_record(record)).expect("a spec serializes");
    let mut headers = HeaderMap::new();
    headers.insert(headers::MSG_ID, message_id(&record.id, revision).as_str());
    // The record exists: the worker reads it rather than trying to create it.
    headers.insert(headers::RECORD, headers::RECORD_BY_SUBMITTER);
    let lane = Lane::new(record.class, record.priority);
    js.publish_with_headers(lane.subject(), headers, message.into()).await?.await
}

/// The `Nats-Msg-Id` of a task published again from revision `revision` of its record.
pub fn message_id(id: &TaskId, revision: u64) -> String {
    format!("{id}:{revision}")
}

/// The id a lane message names: the spec's `id`, else its `Nats-Msg-Id` when that is a valid
/// id as a whole. (A gateway's `<id>:<revision>` is not, and does not need to be: its spec
/// names the id.)
pub fn given_id(spec_id: Option<&TaskId>, msg_id: Option<&str>) -> Option<TaskId> {
    spec_id.cloned().or_else(|| msg_id.and_then(|m| TaskId::parse(m).ok()))
}

/// The id of a lane message that names none: a UUIDv5 of its stream sequence and publish time,
/// which do not change on redelivery, so every delivery of it is the same task.
pub fn derived_id(stream_seq: u64, published: OffsetDateTime) -> TaskId {
    TaskId::derived("nats-msg", &format!("{stream_seq}:{}", published.unix_timestamp_nanos()))
}

/// The task a stored lane message carries, as the worker that gets it will decide: given
/// ([`given_id`], from a payload that parses as a spec) or derived ([`derived_id`]).
pub fn task_id(
    payload: &[u8],
    msg_id: Option<&str>,
    stream_seq: u64,
    published: OffsetDateTime,
) -> TaskId {
    let spec = TaskSpec::from_slice(payload).ok();
    given_id(spec.as_ref().and_then(|s| s.id.as_ref()), msg_id)
        .unwrap_or_else(|| derived_id(stream_seq, published))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> TaskId {
        TaskId::parse(s).unwrap()
    }

    #[test]
    fn the_spec_id_wins_then_a_valid_message_id_then_the_derived_one() {
        let at = OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(1_700_000_000);
        let spec = br#"{"id": "from-spec", "kind": "sleep"}"#;
        assert_eq!(task_id(spec, Some("from-header"), 7, at), id("from-spec"));
        let bare = br#"{"kind": "sleep"}"#;
        assert_eq!(task_id(bare, Some("from-header"), 7, at), id("from-header"));
        // The gateway's re-publishes carry `<id>:<revision>` and the id in the spec.
        let republished = br#"{"id": "t-1", "kind": "sleep"}"#;
        assert_eq!(task_id(republished, Some(&message_id(&id("t-1"), 42)), 7, at), id("t-1"));
        // Neither: the same derived id on every look, and another for another message.
        assert_eq!(task_id(bare, None, 7, at), derived_id(7, at));
        assert_eq!(task_id(bare, Some("not:a-token"), 7, at), derived_id(7, at));
        assert_ne!(derived_id(7, at), derived_id(8, at));
        // A payload that is not a spec names no id, however its `id` field reads: the worker
        // dead-letters it under the header's id or the derived one.
        let invalid = br#"{"id": "from-spec", "kind": "sleep", "bogus": 1}"#;
        assert_eq!(task_id(invalid, None, 7, at), derived_id(7, at));
    }
}
