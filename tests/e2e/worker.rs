//! The worker against a real nats-server: tasks are published straight to the lanes (as the
//! gateway or a NATS-native publisher would) and the worker's effects are read back from the
//! `tasks` bucket and the `PROGRESS`, `DLQ` and `TASKS` streams.
//!
//! Tests that spawn `claw-worker` (as a process, or as the `__run-task` runner of long tasks)
//! need `cargo build -p claw-worker --bins` first.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::StreamMessage};
use claw_proto::event::{Event, EventBody};
use claw_proto::topology::{self, Topology, headers};
use claw_proto::{Cause, Status, TaskId};
use claw_tests::{
    Nats, WAIT, bin, events_of, record, statuses, stream_contents as stream_messages,
    submit_direct as submit, test_settings, wait_for, wait_status, write_script,
};
use serde_json::json;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

/// A worker run in-process through `claw_worker::run`; stopped when dropped.
struct Worker {
    token: CancellationToken,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl Worker {
    fn start(topology: &Topology, toml: &str) -> Worker {
        let config = claw_worker::Config::from_toml_str(toml).expect("worker config");
        let token = CancellationToken::new();
        let (topology, run_token) = (topology.clone(), token.clone());
        let handle = tokio::spawn(async move {
            claw_worker::run(topology, config, run_token).await.expect("worker run");
        });
        Worker { token, handle: Some(handle) }
    }

    async fn stop(mut self) {
        self.token.cancel();
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(WAIT, handle).await.expect("worker stops").expect("no panic");
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// A `claw-worker` process; SIGKILLed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Publishes raw bytes to a lane subject like a NATS-native client, optionally with a
/// `Nats-Msg-Id`.
async fn publish_raw(js: &jetstream::Context, subject: &str, msg_id: Option<&str>, body: Vec<u8>) {
    let mut h = HeaderMap::new();
    if let Some(id) = msg_id {
        h.insert(headers::MSG_ID, id);
    }
    js.publish_with_headers(subject.to_owned(), h, body.into()).await.unwrap().await.unwrap();
}

async fn stream_count(js: &jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream).await.unwrap().info().await.unwrap().state.messages
}

/// When each task's (last) attempt started, once it succeeded.
async fn started_at(topology: &Topology, ids: &[TaskId]) -> Vec<OffsetDateTime> {
    let mut out = Vec::new();
    for id in ids {
        let r = wait_status(topology, id.as_str(), Status::Succeeded).await;
        out.push(r.started_at.expect("started_at"));
    }
    out
}

fn header<'a>(m: &'a StreamMessage, name: &str) -> Option<&'a str> {
    m.headers.get(name).map(|v| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_long_sleep_report_progress_and_succeed() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let script = write_script(
        nats.dir.path(),
        "report.sh",
        r#"#!/bin/sh
echo '{"progress": 0.25, "message": "quarter"}'
sleep 0.3
echo '{"progress": 0.75, "message": "three quarters"}'
sleep 0.3
echo "plain text"
read line
echo "{\"result\": {\"stdin\": \"$line\", \"arg\": \"$1\", \"env\": \"$GREETING\"}}"
"#,
    );
    let toml = format!(
        "name = \"w-exec\"\nack_deadline_s = 2.0\nrunner = {:?}\n\
         [programs.report]\npath = {:?}\nenv = {{ GREETING = \"hi\" }}\n",
        bin("claw-worker"),
        script
    );
    let worker = Worker::start(&topology, &toml);

    let exec = submit(
        &topology,
        json!({"kind": "exec", "input": {"program": "report", "args": ["A"], "stdin": "hello\n"}}),
    )
    .await;
    // A long-class `sleep` runs in a `claw-worker __run-task` child.
    let sleep = submit(
        &topology,
        json!({"kind": "sleep", "class": "long", "input": {"seconds": 0.6, "steps": 3, "echo": 7}}),
    )
    .await;

    let r = wait_status(&topology, exec.as_str(), Status::Succeeded).await;
    assert_eq!(r.result, Some(json!({"stdin": "hello", "arg": "A", "env": "hi"})));
    assert_eq!((r.attempt, r.worker.as_deref()), (1, Some("w-exec")));
    let r = wait_status(&topology, sleep.as_str(), Status::Succeeded).await;
    assert_eq!(r.result, Some(json!({"slept_s": 0.6, "echo": 7})));

    let js = &topology.js;
    let events = wait_for("exec events", WAIT, || async {
        let e = events_of(js, exec.as_str()).await;
        statuses(&e).contains(&(Status::Succeeded, 1)).then_some(e)
    })
    .await;
    let fractions = claw_tests::fractions(&events);
    assert_eq!(fractions, [0.25, 0.75], "{events:?}");
    assert!(events.iter().any(|e| e.body == EventBody::Output { text: "plain text\n".into() }));
    // Progress and output precede the terminal status, which carries the result.
    let pos = |f: &dyn Fn(&EventBody) -> bool| events.iter().position(|e| f(&e.body)).unwrap();
    let result_at = pos(&|b| {
        matches!(b, EventBody::Status { status: Status::Succeeded, result: Some(r), .. }
            if r["stdin"] == "hello")
    });
    assert!(pos(&|b| matches!(b, EventBody::Output { .. })) < result_at);
    assert_eq!(statuses(&events), [(Status::Running, 1), (Status::Succeeded, 1)]);

    let events = events_of(js, sleep.as_str()).await;
    let progress = events.iter().filter(|e| matches!(e.body, EventBody::Progress(_))).count();
    assert!(progress >= 2, "step progress from the child: {events:?}");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_overtakes_queued_low() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let worker = Worker::start(
        &topology,
        "name = \"w-prio\"\nshort_slots = 1\nlong_slots = 0\nack_deadline_s = 2.0",
    );
    let busy = submit(&topology, json!({"kind": "sleep", "input": {"seconds": 1.5}})).await;
    wait_status(&topology, busy.as_str(), Status::Running).await;

    let mut low = Vec::new();
    for i in 0..20 {
        let spec = json!({"kind": "sleep", "priority": "low", "input": {"echo": i}});
        low.push(submit(&topology, spec).await);
    }
    let mut high = Vec::new();
    for i in 0..5 {
        let spec = json!({"kind": "sleep", "priority": "high", "input": {"echo": i}});
        high.push(submit(&topology, spec).await);
    }
    // Still busy: the whole queue was in place before the slot freed.
    assert_eq!(record(&topology, busy.as_str()).await.unwrap().status, Status::Running);

    let high_started = started_at(&topology, &high).await;
    let low_started = started_at(&topology, &low).await;
    let last_high = high_started.iter().max().unwrap();
    let first_low = low_started.iter().min().unwrap();
    assert!(last_high < first_low, "high {high_started:?} vs low {low_started:?}");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_back_off_then_succeed_or_dead_letter() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let worker = Worker::start(
        &topology,
        "name = \"w-retry\"\nack_deadline_s = 2.0\n[retry]\ninitial_ms = 200\njitter = 0.0",
    );
    let flaky = submit(
        &topology,
        json!({"kind": "sleep", "max_attempts": 5, "input": {"fail_attempts": 2, "echo": "ok"}}),
    )
    .await;
    let doomed = submit(
        &topology,
        json!({"kind": "sleep", "max_attempts": 3, "input": {"fail_attempts": 99}}),
    )
    .await;

    let r = wait_status(&topology, flaky.as_str(), Status::Succeeded).await;
    assert_eq!((r.attempt, r.result.clone()), (3, Some(json!({"slept_s": 0.0, "echo": "ok"}))));
    let js = &topology.js;
    let events = wait_for("flaky's events", WAIT, || async {
        let e = events_of(js, flaky.as_str()).await;
        statuses(&e).contains(&(Status::Succeeded, 3)).then_some(e)
    })
    .await;
    // Each attempt fails at once, so each ends within its first flush and announces only its
    // end, with the error it failed with (protocol 5).
    let ends: Vec<OffsetDateTime> = events
        .iter()
        .filter(|e| {
            matches!(&e.body, EventBody::Status { status: Status::Retrying, error: Some(e), .. }
                if e.code == "planned_failure")
                || matches!(e.body, EventBody::Status { status: Status::Succeeded, .. })
        })
        .map(|e| e.at)
        .collect();
    assert_eq!(ends.len(), 3, "{events:?}");
    // Backoff: 200 ms after attempt 1, 400 ms after attempt 2 (multiplier 2, no jitter).
    let gap = |i: usize| ends[i + 1] - ends[i];
    assert!(gap(0) >= time::Duration::milliseconds(200), "gap {}", gap(0));
    assert!(gap(1) >= time::Duration::milliseconds(400), "gap {}", gap(1));
    assert_eq!(
        statuses(&events),
        [(Status::Retrying, 1), (Status::Retrying, 2), (Status::Succeeded, 3)]
    );

    let r = wait_status(&topology, doomed.as_str(), Status::Failed).await;
    assert_eq!(r.attempt, 3);
    assert_eq!(r.error.as_ref().map(|e| e.code.as_str()), Some("planned_failure"));
    wait_for("TASKS empty", WAIT, || async {
        (stream_count(js, topology::TASKS_STREAM).await == 0).then_some(())
    })
    .await;
    let dlq = stream_messages(js, topology::DLQ_STREAM).await;
    assert_eq!(dlq.len(), 1, "exactly one dead letter");
    assert_eq!(header(&dlq[0], headers::DLQ_REASON), Some("max_attempts"));
    assert_eq!(header(&dlq[0], headers::TASK_ID), Some(doomed.as_str()));
    assert_eq!(header(&dlq[0], headers::DLQ_DELIVERIES), Some("3"));
    assert_eq!(dlq[0].subject.as_str(), "dlq.short.normal");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_process_task_is_taken_over_once() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let config = nats.dir.path().join("victim.toml");
    std::fs::write(&config, "name = \"victim\"\nlong_slots = 0\nack_deadline_s = 2.0\n").unwrap();
    let mut victim = Process(
        Command::new(bin("claw-worker"))
            .arg("--config")
            .arg(&config)
            .arg("--nats-url")
            .arg(nats.url())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn claw-worker"),
    );
    let id = submit(&topology, json!({"kind": "sleep", "input": {"seconds": 3, "steps": 3}})).await;
    let r = wait_status(&topology, id.as_str(), Status::Running).await;
    assert_eq!(r.worker.as_deref(), Some("victim"));
    victim.0.kill().expect("SIGKILL the worker");
    victim.0.wait().unwrap();

    let rescuer =
        Worker::start(&topology, "name = \"rescuer\"\nlong_slots = 0\nack_deadline_s = 2.0");
    let r = wait_status(&topology, id.as_str(), Status::Succeeded).await;
    assert_eq!((r.worker.as_deref(), r.attempt), (Some("rescuer"), 2));
    let js = &topology.js;
    let events = wait_for("the succeeded event", WAIT, || async {
        let e = events_of(js, id.as_str()).await;
        statuses(&e).contains(&(Status::Succeeded, 2)).then_some(e)
    })
    .await;
    let succeeded = statuses(&events).iter().filter(|(s, _)| *s == Status::Succeeded).count();
    assert_eq!(succeeded, 1, "{events:?}");
    let takeover = events.iter().find_map(|e| match e.body {
        EventBody::Status { status: Status::Running, attempt: 2, cause, .. } => Some(cause),
        _ => None,
    });
    assert_eq!(takeover, Some(Some(Cause::WorkerLost)));
    rescuer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_native_tasks_run_and_garbage_is_dead_lettered_once() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let js = &topology.js;
    let client = nats.client().await;
    let mut announced = client.subscribe("progress.default.*").await.unwrap();
    client.flush().await.unwrap();
    let worker = Worker::start(&topology, "name = \"w-native\"\nack_deadline_s = 2.0");
    let lane = "tasks.short.normal";

    // An id from the Nats-Msg-Id header, no record beforehand.
    let spec = json!({"kind": "sleep", "input": {"echo": "by-header"}});
    publish_raw(js, lane, Some("native-1"), spec.to_string().into_bytes()).await;
    let r = wait_status(&topology, "native-1", Status::Succeeded).await;
    assert_eq!(r.result, Some(json!({"slept_s": 0.0, "echo": "by-header"})));

    // No id at all: the worker derives one and announces it on the progress subject.
    let spec = json!({"kind": "sleep", "input": {"echo": "anonymous"}});
    publish_raw(js, lane, None, spec.to_string().into_bytes()).await;
    let derived = tokio::time::timeout(WAIT, async {
        use futures::StreamExt;
        loop {
            let msg = announced.next().await.expect("progress subscription");
            let Ok(event) = serde_json::from_slice::<Event>(&msg.payload) else { continue };
            // Its first event: a task that ends within its first flush announces only its end.
            if matches!(event.body, EventBody::Status { .. })
                && event.task_id.as_str() != "native-1"
            {
                break event.task_id;
            }
        }
    })
    .await
    .expect("the derived id is announced");
    let r = wait_status(&topology, derived.as_str(), Status::Succeeded).await;
    assert_eq!(r.result, Some(json!({"slept_s": 0.0, "echo": "anonymous"})));

    // Garbage, and a well-formed message of an unknown kind with an id: both dead-lettered on
    // their first delivery; the latter also gets a failed record saying why.
    publish_raw(js, lane, None, b"\x00not json{".to_vec()).await;
    publish_raw(js, lane, Some("native-bad"), br#"{"kind": "nope"}"#.to_vec()).await;
    let r = wait_status(&topology, "native-bad", Status::Failed).await;
    assert_eq!(r.cause, Some(Cause::DeadLetter));
    assert_eq!(r.error.as_ref().map(|e| e.code.as_str()), Some("invalid_task"));
    wait_for("TASKS empty", WAIT, || async {
        (stream_count(js, topology::TASKS_STREAM).await == 0).then_some(())
    })
    .await;
    let dlq = wait_for("two dead letters", WAIT, || async {
        let m = stream_messages(js, topology::DLQ_STREAM).await;
        (m.len() >= 2).then_some(m)
    })
    .await;
    assert_eq!(dlq.len(), 2, "each invalid message exactly once");
    let garbage = dlq.iter().find(|m| m.payload.as_ref() == b"\x00not json{").expect("garbage");
    assert_eq!(header(garbage, headers::DLQ_REASON), Some("invalid_task"));
    assert_eq!(header(garbage, headers::DLQ_SUBJECT), Some(lane));
    assert_eq!(header(garbage, headers::DLQ_DELIVERIES), Some("1"));
    let bad = dlq.iter().find(|m| header(m, headers::TASK_ID) == Some("native-bad"));
    assert_eq!(bad.map(|m| header(m, headers::DLQ_REASON)), Some(Some("invalid_task")));
    worker.stop().await;
}

/// Issue 12, "forged dead letters": an unparsable message naming another task's id (by its
/// `Nats-Msg-Id`, as any publisher can once the duplicate window has passed) is dead-lettered
/// alone. It fails no record it did not create: the named task runs on and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_invalid_copy_of_a_task_fails_nothing_but_itself() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let js = &topology.js;
    let worker = Worker::start(&topology, "name = \"w-forged\"\nack_deadline_s = 2.0");
    let lane = "tasks.short.normal";
    // The victim's own lane message carries another message id, so the forgery below is past
    // the stream's deduplication as it would be two minutes later.
    let victim = json!({"id": "victim", "kind": "sleep", "input": {"seconds": 3, "steps": 3}});
    publish_raw(js, lane, Some("victim-lane-message"), victim.to_string().into_bytes()).await;
    wait_status(&topology, "victim", Status::Running).await;

    publish_raw(js, lane, Some("victim"), b"\x00forged{".to_vec()).await;
    let dlq = wait_for("the forgery dead-lettered", WAIT, || async {
        let m = stream_messages(js, topology::DLQ_STREAM).await;
        (!m.is_empty()).then_some(m)
    })
    .await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].payload.as_ref(), b"\x00forged{");
    assert_eq!(header(&dlq[0], headers::DLQ_REASON), Some("invalid_task"));

    let r = wait_for("the victim finished", WAIT, || async {
        record(&topology, "victim").await.filter(|r| r.status.is_terminal())
    })
    .await;
    assert_eq!((r.status, r.attempt, r.error), (Status::Succeeded, 1, None), "the victim ran on");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_attempt_is_killed_and_fails() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    // The script ignores TERM and leaves a grandchild: only KILL of the group ends both.
    let pid_file = nats.dir.path().join("grandchild.pid");
    let body = format!("#!/bin/sh\ntrap '' TERM\nsleep 60 &\necho $! > {pid_file:?}\nwait\n");
    let script = write_script(nats.dir.path(), "hang.sh", &body);
    let toml = format!(
        "name = \"w-timeout\"\nack_deadline_s = 2.0\nkill_grace_s = 0.2\n\
         [programs.hang]\npath = {script:?}\n"
    );
    let worker = Worker::start(&topology, &toml);
    let spec =
        json!({"kind": "exec", "timeout_s": 1, "max_attempts": 1, "input": {"program": "hang"}});
    let id = submit(&topology, spec).await;
    let r = wait_status(&topology, id.as_str(), Status::Failed).await;
    assert_eq!(r.cause, Some(Cause::Timeout));
    assert_eq!(r.error.as_ref().map(|e| e.code.as_str()), Some("timeout"));
    let dlq = stream_messages(&topology.js, topology::DLQ_STREAM).await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(header(&dlq[0], headers::DLQ_REASON), Some("max_attempts"));
    let pid = std::fs::read_to_string(&pid_file).expect("pid file");
    let stat = format!("/proc/{}/stat", pid.trim());
    wait_for("the grandchild to be killed", WAIT, || async {
        // Gone, or a zombie waiting for a reaper that is not ours.
        let state = std::fs::read_to_string(&stat).unwrap_or_default();
        let state = state.rsplit(')').next().unwrap_or("").trim_start().chars().next();
        matches!(state, None | Some('Z')).then_some(())
    })
    .await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_hands_running_tasks_back_at_once() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let first = Worker::start(&topology, "name = \"leaving\"\nack_deadline_s = 2.0\ndrain_s = 0.3");
    let spec = json!({"kind": "sleep", "input": {"seconds": 30, "steps": 30}});
    let id = submit(&topology, spec).await;
    wait_status(&topology, id.as_str(), Status::Running).await;
    let stopping = std::time::Instant::now();
    first.stop().await;
    assert!(stopping.elapsed() < Duration::from_secs(3), "drain took {:?}", stopping.elapsed());

    // NAKed without delay: the next worker gets it well before the 2 s ack deadline.
    let next = Worker::start(&topology, "name = \"staying\"\nack_deadline_s = 2.0\ndrain_s = 0.3");
    let r = wait_for("the hand-over", WAIT, || async {
        record(&topology, id.as_str()).await.filter(|r| r.worker.as_deref() == Some("staying"))
    })
    .await;
    assert!(
        stopping.elapsed() < Duration::from_millis(1900),
        "taken after {:?}",
        stopping.elapsed()
    );
    // The hand-back gave the attempt back: the next worker runs attempt 1 again.
    assert_eq!((r.status, r.attempt), (Status::Running, 1));
    let events = events_of(&topology.js, &id).await;
    assert!(
        events.iter().any(|e| matches!(
            e.body,
            EventBody::Status { status: Status::Queued, cause: Some(Cause::HandedBack), .. }
        )),
        "{events:?}"
    );
    next.stop().await;
}

/// Rolling restarts: a task handed back by three draining workers in a row still has every
/// attempt it had. With `max_attempts` 1 it would be dead-lettered at the first hand-back if a
/// drain used up an attempt.
#[tokio::test]
async fn three_drains_of_one_task_use_up_no_attempt() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let toml = |name: &str| format!("name = {name:?}\nack_deadline_s = 2.0\ndrain_s = 0.2");
    let mut holder = Worker::start(&topology, &toml("w1"));
    let spec = json!({"kind": "sleep", "max_attempts": 1, "input": {"seconds": 3, "steps": 3}});
    let id = submit(&topology, spec).await;
    wait_status(&topology, id.as_str(), Status::Running).await;
    for n in 2..=4 {
        let next = Worker::start(&topology, &toml(&format!("w{n}")));
        holder.stop().await;
        let name = format!("w{n}");
        let r = wait_for(&format!("{name} to take the task over"), WAIT, || async {
            record(&topology, id.as_str()).await.filter(|r| {
                r.status == Status::Running && r.worker.as_deref() == Some(name.as_str())
            })
        })
        .await;
        assert_eq!(r.attempt, 1, "drain {}: {r:?}", n - 1);
        holder = next;
    }
    let done = wait_for("the task to finish", WAIT, || async {
        record(&topology, id.as_str()).await.filter(|r| r.status.is_terminal())
    })
    .await;
    assert_eq!(
        (done.status, done.attempt, done.worker.as_deref()),
        (Status::Succeeded, 1, Some("w4"))
    );
    assert_eq!(stream_count(&topology.js, topology::DLQ_STREAM).await, 0, "nothing dead-lettered");
    let handed_back = statuses(&events_of(&topology.js, &id).await)
        .into_iter()
        .filter(|&(s, a)| (s, a) == (Status::Queued, 0))
        .count();
    assert!(handed_back >= 3, "three hand-backs announced, then queued: {handed_back}");
    holder.stop().await;
}

/// A record removed by hand (`nats kv del tasks <id>`, which leaves a delete marker) is no
/// record: the worker rebuilds it from the lane message and runs the task, rather than reading
/// the marker as a corrupt record and dead-lettering the task as invalid.
#[tokio::test]
async fn a_record_deleted_by_hand_is_rebuilt_from_its_message() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let id = submit(&topo, json!({"kind": "sleep", "input": {"seconds": 0}})).await;
    topo.tasks_kv.delete(id.as_str()).await.expect("kv del");
    let marker = topo.tasks_kv.entry(id.as_str()).await.unwrap().expect("a delete marker");
    assert_eq!(marker.operation, async_nats::jetstream::kv::Operation::Delete);

    let worker = Worker::start(&topo, "");
    let done = wait_status(&topo, &id, Status::Succeeded).await;
    assert_eq!(done.attempt, 1, "{done:?}");
    assert_eq!(stream_count(&topo.js, topology::DLQ_STREAM).await, 0, "nothing dead-lettered");
    worker.stop().await;
}

/// A worker that dies between a task's final record write and its ending events leaves a
/// finished task that no watcher sees end. The next delivery of the task's message finds it
/// finished and sends the ending events (result, then the terminal status) again, to
/// JetStream, under ids that store each once however many deliveries do it.
#[tokio::test]
async fn a_finished_tasks_missing_ending_events_are_sent_by_the_next_delivery() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let id = submit(&topology, json!({"kind": "sleep", "input": {"seconds": 0}})).await;
    // What its worker wrote before it died: the record succeeded, no events.
    let stored = topology.records.read(&id).await.unwrap().expect("record");
    let mut done = stored.record.clone();
    let now = OffsetDateTime::now_utc();
    done.start(1, "w-died", now).unwrap();
    done.succeed(json!({"slept_s": 0.0}), now).unwrap();
    topology.records.update(&done, stored.revision).await.unwrap();
    // A second copy of its message, as a redelivery after a restart may bring.
    publish_raw(
        &topology.js,
        "tasks.short.normal",
        None,
        serde_json::to_vec(&claw_proto::spec::TaskSpec::of_record(&done)).unwrap(),
    )
    .await;

    let worker = Worker::start(&topology, "ack_deadline_s = 2.0");
    wait_for("both copies settled", WAIT, || async {
        (stream_count(&topology.js, topology::TASKS_STREAM).await == 0).then_some(())
    })
    .await;
    let events = events_of(&topology.js, &id).await;
    let ended = statuses(&events).into_iter().filter(|(s, _)| *s == Status::Succeeded).count();
    assert_eq!(ended, 1, "{events:?}");
    worker.stop().await;
}

/// The dead letter comes first: the DLQ stored a task's copy before the bucket stored the record
/// that says `failed`, by the server's own clock (both streams are on one server, whose store
/// time stamps each message as it lands). Were the record written first, a worker dying between
/// the two writes would leave a record that says dead-lettered with no dead letter anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_says_dead_lettered_only_once_the_dlq_has_its_copy() {
    use futures::StreamExt as _;
    const TASKS: usize = 20;
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let js = &topology.js;
    let mut watch = topology.tasks_kv.watch_all().await.expect("watch the bucket");
    let worker = Worker::start(&topology, "name = \"w-dlq-order\"\nack_deadline_s = 2.0\n");
    let mut doomed = std::collections::HashSet::new();
    for _ in 0..TASKS {
        let spec = json!({"kind": "sleep", "max_attempts": 1, "input": {"fail_attempts": 99}});
        doomed.insert(submit(&topology, spec).await.as_str().to_owned());
    }

    // When the bucket stored each task's failed record.
    let mut failed_at = std::collections::HashMap::new();
    tokio::time::timeout(WAIT, async {
        while failed_at.len() < TASKS {
            let entry = watch.next().await.expect("watch open").expect("watch entry");
            if entry.operation != async_nats::jetstream::kv::Operation::Put {
                continue;
            }
            let r: claw_proto::TaskRecord = serde_json::from_slice(&entry.value).expect("record");
            if r.status == Status::Failed {
                failed_at.entry(r.id.as_str().to_owned()).or_insert(entry.created);
            }
        }
    })
    .await
    .expect("every doomed task fails");
    let ids: std::collections::HashSet<String> = failed_at.keys().cloned().collect();
    assert_eq!(ids, doomed);

    let dlq = stream_messages(js, topology::DLQ_STREAM).await;
    assert_eq!(dlq.len(), TASKS, "one copy each");
    for copy in &dlq {
        let id = header(copy, headers::TASK_ID).expect("the copy names its task");
        let failed = failed_at[id];
        assert!(
            copy.time <= failed,
            "{id}: the record said failed at {failed}, its DLQ copy was stored later, at {}",
            copy.time
        );
    }
    worker.stop().await;
}
