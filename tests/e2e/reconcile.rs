//! The archiver's reconciler against a real nats-server: a record that says a task waits or runs
//! while no lane message exists for it (a gateway died between create and publish, the message
//! expired, its holder died with it) is found and repaired, and each repair is counted.
//!
//! The reconciler looks every second with a second's grace here (the archiver's configuration);
//! the shipped defaults (30 s, 60 s) run in `shipped.rs`. Messages are made to expire by
//! shortening the `TASKS` stream's `max_age` once the services have started, as the 7 days of
//! the shipped stream would after a week.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::Context;
use claw_proto::event::EventBody;
use claw_proto::kinds::Catalog;
use claw_proto::spec::{Limits, TaskSpec};
use claw_proto::topology::{TASKS_STREAM, Topology};
use claw_proto::{Cause, Status, TaskId, TaskRecord, queue};
use claw_tests::{
    Gateway, Nats, Running, WorkerProcess, archiver_config, events_of, holds_for, id_of, post_json,
    record, signal, start_archiver_with, start_worker, stream_contents, test_settings, wait_for,
    wait_status,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

/// An archiver that reconciles every second, with a second's grace.
fn start_archiver(topology: &Topology, db: &Path) -> Running {
    let mut config = archiver_config(db);
    config.reconcile.interval_s = 1;
    config.reconcile.grace_s = 1;
    start_archiver_with(topology, config)
}

/// The value of `claw_reconciler_repairs_total{repair="<repair>"}` in this process.
async fn repairs(repair: &str) -> f64 {
    let text = claw_proto::metrics::render().await;
    let key = format!("claw_reconciler_repairs_total{{repair=\"{repair}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&key)?.trim().parse().ok()).unwrap_or(0.0)
}

async fn wait_for_repairs(repair: &str) {
    wait_for(&format!("a {repair} repair counted"), WAIT, || async {
        (repairs(repair).await >= 1.0).then_some(())
    })
    .await;
}

/// Makes every message of `TASKS` expire `age` after it was published (the duplicate window
/// may not be longer than that).
async fn expire_messages_after(js: &Context, age: Duration) {
    let mut stream = js.get_stream(TASKS_STREAM).await.expect("TASKS");
    let mut config = stream.info().await.expect("stream info").config.clone();
    config.max_age = age;
    config.duplicate_window = age;
    js.update_stream(config).await.expect("shorten TASKS max_age");
}

/// Waits until the task has failed with `cause: timeout` and `deadline_exceeded`, with its
/// `failed` status event (carrying the error) sent.
async fn wait_timed_out(topo: &Topology, id: &str) -> TaskRecord {
    let failed = wait_status(topo, id, Status::Failed).await;
    assert_eq!(failed.cause, Some(Cause::Timeout), "{failed:?}");
    let error = failed.error.clone().expect("an error");
    assert_eq!(error.code, "deadline_exceeded", "{error:?}");
    wait_for("the failed event with its error", WAIT, || async {
        let events = events_of(&topo.js, id).await;
        events
            .iter()
            .any(|e| {
                matches!(
                    &e.body,
                    EventBody::Status {
                        status: Status::Failed,
                        cause: Some(Cause::Timeout),
                        error: Some(error),
                        ..
                    } if error.code == "deadline_exceeded"
                )
            })
            .then_some(())
    })
    .await;
    failed
}

#[tokio::test]
async fn an_orphaned_queued_record_is_published_again_and_runs() {
    claw_proto::metrics::install();
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let _archiver = start_archiver(&topo, &nats.dir.path().join("archive.sqlite"));

    // What a gateway that died between the record's create and the lane publish leaves: a
    // queued record, and no message.
    let spec = TaskSpec::from_slice(br#"{"kind": "sleep", "input": {"seconds": 0.1}}"#).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let orphan =
        spec.admit(TaskId::generate(), now, None, &Catalog::builtin(), &Limits::STANDARD).unwrap();
    let revision = topo.records.create(&orphan).await.unwrap();

    // The reconciler publishes it to its lane, under the revision it found, once.
    let msg_id = queue::message_id(&orphan.id, revision);
    wait_for("the orphan's message in its lane", WAIT, || async {
        let messages = stream_contents(&topo.js, TASKS_STREAM).await;
        messages
            .iter()
            .any(|m| m.headers.get("Nats-Msg-Id").map(|v| v.as_str()) == Some(msg_id.as_str()))
            .then_some(())
    })
    .await;
    wait_for_repairs("republished").await;
    holds_for("one repair: later passes find the message", Duration::from_secs(3), || async {
        match repairs("republished").await {
            1.0 => Ok(()),
            n => Err(format!("{n} repairs")),
        }
    })
    .await;

    // And it runs.
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0\n");
    let done = wait_status(&topo, &orphan.id, Status::Succeeded).await;
    assert_eq!((done.attempt, done.cause), (1, Some(Cause::Worker)));
}

#[tokio::test]
async fn a_retrying_task_whose_message_expires_ends_failed_with_timeout() {
    claw_proto::metrics::install();
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let _archiver = start_archiver(&topo, &nats.dir.path().join("archive.sqlite"));
    // A retry waits ten minutes: long past the message's life.
    let _worker = start_worker(
        &topo,
        "ack_deadline_s = 2.0\n[retry]\ninitial_ms = 600000\nmax_ms = 600000\njitter = 0.0\n",
    );
    let gw = Gateway::start(&topo, &[]).await;
    let http = reqwest::Client::new();
    expire_messages_after(&topo.js, Duration::from_secs(3)).await;

    // Its deadline (2 s) is before its message's end (3 s), as 7 days of deadline are at most
    // the 7 days of the stream.
    let spec = json!({"kind": "sleep", "deadline_s": 2, "max_attempts": 3,
        "input": {"seconds": 0, "fail_attempts": 1}});
    let id = id_of(&post_json(&http, &gw.url("/v1/tasks"), Some(&spec)).await);
    wait_status(&topo, &id, Status::Retrying).await;

    let failed = wait_timed_out(&topo, &id).await;
    assert_eq!(failed.attempt, 1, "no attempt after the deadline");
    wait_for_repairs("timed_out").await;
}

#[tokio::test]
async fn a_queued_task_in_a_paused_lane_whose_message_expires_ends_failed_with_timeout() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let _archiver = start_archiver(&topo, &nats.dir.path().join("archive.sqlite"));
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0\n");
    let gw = Gateway::start(&topo, &[]).await;
    let http = reqwest::Client::new();
    expire_messages_after(&topo.js, Duration::from_secs(3)).await;

    let paused = post_json(&http, &gw.url("/v1/lanes/short/low/pause"), None).await;
    assert_eq!(paused["paused"], true, "{paused}");
    let spec =
        json!({"kind": "sleep", "priority": "low", "deadline_s": 2, "input": {"seconds": 0}});
    let id = id_of(&post_json(&http, &gw.url("/v1/tasks"), Some(&spec)).await);
    assert_eq!(record(&topo, &id).await.map(|r| r.status), Some(Status::Queued));

    let failed = wait_timed_out(&topo, &id).await;
    assert_eq!(failed.attempt, 0, "it never ran");
}

#[tokio::test]
async fn a_task_paused_while_running_whose_holder_and_message_are_gone_is_released() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let _archiver = start_archiver(&topo, &nats.dir.path().join("archive.sqlite"));
    let holder = WorkerProcess::start(&nats, "holder", "name = \"holder\"\nack_deadline_s = 2.0\n");
    let gw = Gateway::start(&topo, &[]).await;
    let http = reqwest::Client::new();

    let spec = json!({"kind": "sleep", "input": {"seconds": 3, "steps": 30}});
    let id = id_of(&post_json(&http, &gw.url("/v1/tasks"), Some(&spec)).await);
    let running = wait_status(&topo, &id, Status::Running).await;
    let paused = post_json(&http, &gw.url(&format!("/v1/tasks/{id}/pause")), None).await;
    assert_eq!(paused["paused_from"], "running", "{paused}");

    // The holder dies, and its message with it (as max_age would take it): nothing will ever
    // come back to release the hold.
    signal(holder.pid(), libc::SIGKILL);
    let stream = topo.js.get_stream_no_info(TASKS_STREAM).await.unwrap();
    stream.delete_message(running.message_seq.expect("the held message")).await.unwrap();

    let released = wait_for("the hold released", WAIT, || async {
        record(&topo, &id).await.filter(|r| r.paused_from == Some(Status::Queued))
    })
    .await;
    assert_eq!((released.status, released.cause), (Status::Paused, Some(Cause::WorkerLost)));

    // A resume now queues it, and another worker runs it.
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0\n");
    let resumed = post_json(&http, &gw.url(&format!("/v1/tasks/{id}/resume")), None).await;
    assert_eq!(resumed["status"], "queued", "{resumed}");
    let done = wait_status(&topo, &id, Status::Succeeded).await;
    assert_eq!(done.attempt, 2);
}

#[tokio::test]
async fn a_running_task_whose_holder_and_message_are_gone_is_taken_over() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let _archiver = start_archiver(&topo, &nats.dir.path().join("archive.sqlite"));
    let holder = WorkerProcess::start(&nats, "holder", "name = \"holder\"\nack_deadline_s = 2.0\n");
    let gw = Gateway::start(&topo, &[]).await;
    let http = reqwest::Client::new();

    let spec = json!({"kind": "sleep", "input": {"seconds": 2, "steps": 20}});
    let id = id_of(&post_json(&http, &gw.url("/v1/tasks"), Some(&spec)).await);
    let running = wait_status(&topo, &id, Status::Running).await;
    signal(holder.pid(), libc::SIGKILL);
    let stream = topo.js.get_stream_no_info(TASKS_STREAM).await.unwrap();
    stream.delete_message(running.message_seq.expect("the held message")).await.unwrap();

    // Published again, the task is taken over by the next worker, as after a redelivery: the
    // record no longer names the lost message, so the new copy is not dropped as stale.
    let _worker = start_worker(&topo, "name = \"next\"\nack_deadline_s = 2.0\n");
    let done = wait_status(&topo, &id, Status::Succeeded).await;
    assert_eq!((done.attempt, done.worker.as_deref()), (2, Some("next")));
    let taken_over = events_of(&topo.js, &id).await.iter().any(|e| {
        matches!(
            e.body,
            EventBody::Status {
                status: Status::Running,
                cause: Some(Cause::WorkerLost),
                attempt: 2,
                ..
            }
        )
    });
    assert!(taken_over, "attempt 2 started as a takeover");
}

#[tokio::test]
async fn the_lane_scan_names_every_task_with_a_message_as_its_worker_would() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let client = nats.client().await;
    let js = &topo.js;

    // 1300 messages, more than two batches of the scan: ids in the spec, in the header only,
    // both (the gateway's `<id>:<revision>`), and none at all.
    let mut expected = HashSet::new();
    for i in 0..1300 {
        let mut headers = HeaderMap::new();
        let spec = match i % 4 {
            0 => {
                expected.insert(format!("spec-{i}"));
                json!({"id": format!("spec-{i}"), "kind": "sleep"})
            }
            1 => {
                expected.insert(format!("header-{i}"));
                headers.insert("Nats-Msg-Id", format!("header-{i}").as_str());
                json!({"kind": "sleep"})
            }
            2 => {
                expected.insert(format!("gw-{i}"));
                headers.insert("Nats-Msg-Id", format!("gw-{i}:17").as_str());
                json!({"id": format!("gw-{i}"), "kind": "sleep"})
            }
            _ => json!({"kind": "sleep"}),
        };
        let lane = ["tasks.short.normal", "tasks.long.low", "tasks.short.high"][i % 3];
        js.publish_with_headers(lane, headers, spec.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // The worker names a message without an id by its sequence and publish time.
    for message in stream_contents(js, TASKS_STREAM).await {
        let msg_id = message.headers.get("Nats-Msg-Id").map(|v| v.as_str());
        if msg_id.is_none() && !message.payload.starts_with(b"{\"id\"") {
            expected.insert(queue::derived_id(message.sequence, message.time).to_string());
        }
    }
    assert_eq!(expected.len(), 1300);

    let found = claw_archiver::reconcile::tasks_in_lanes(&client).await.expect("the lane scan");
    let found: HashSet<String> = found.into_iter().map(|id| id.to_string()).collect();
    assert_eq!(found, expected);
}

#[tokio::test]
async fn a_task_held_by_a_worker_is_seen_by_the_scan_under_the_id_its_worker_gave_it() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0\n");

    // A NATS-native task with no id anywhere: the worker derives one and builds its record.
    let spec = json!({"kind": "sleep", "input": {"seconds": 3}});
    let ack = topo
        .js
        .publish("tasks.short.normal", spec.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let stored = topo
        .js
        .get_stream_no_info(TASKS_STREAM)
        .await
        .unwrap()
        .get_raw_message(ack.sequence)
        .await
        .unwrap();
    let id = queue::derived_id(ack.sequence, stored.time);
    wait_status(&topo, &id, Status::Running).await;

    let found = claw_archiver::reconcile::tasks_in_lanes(&nats.client().await).await.unwrap();
    assert!(found.contains(&id), "{id} not in {found:?}");
}
