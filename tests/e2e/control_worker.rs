//! What a worker does with a task it holds when the task is controlled: cancel, pause, resume,
//! and the timeouts it enforces on its own. The tests drive control the way the gateway does —
//! CAS the record with the `TaskRecord` transition methods, then publish `Control` on
//! `claw.control.<id>` — and watch real processes (`/proc`), the record and the streams.
//! (Control through the gateway's API is in `control`.)

use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use claw_proto::api::{Control, Verb};
use claw_proto::event::{Event, EventBody};
use claw_proto::spec::TaskSpec;
use claw_proto::topology::{self, Topology, headers};
use claw_proto::{Cause, Status, TaskId, TaskRecord};
use claw_tests::{
    Nats, WAIT, events_of, holds_for, record, start_worker, statuses, stream_messages,
    submit_direct as submit, test_settings, wait_for, wait_status, write_script,
};
use serde_json::json;
use time::OffsetDateTime;

/// The test topology's ack deadline (`test_settings`).
const ACK_WAIT: Duration = Duration::from_secs(2);
const KILL_GRACE: Duration = Duration::from_millis(500);

fn worker_toml(name: &str, script: Option<&Path>) -> String {
    let mut toml = format!(
        "name = {name:?}\nack_deadline_s = 2.0\nkill_grace_s = {}\n\
         [retry]\ninitial_ms = 200\njitter = 0.0\n",
        KILL_GRACE.as_secs_f64()
    );
    if let Some(script) = script {
        toml.push_str(&format!("[programs.script]\npath = {script:?}\n"));
    }
    toml
}

/// Mimics the gateway's control verbs: CAS the record with `change`, then, if a worker may
/// have held the task before the change, wake it up on the control subject. Returns the new
/// record and its revision.
async fn control(
    topology: &Topology,
    client: &async_nats::Client,
    id: &TaskId,
    verb: Verb,
    change: impl Fn(&mut TaskRecord),
) -> (TaskRecord, u64) {
    let (record, revision) = loop {
        let entry = topology.tasks_kv.entry(id.as_str()).await.unwrap().expect("record");
        let mut record: TaskRecord = serde_json::from_slice(&entry.value).unwrap();
        let held = record.maybe_held();
        change(&mut record);
        let bytes = serde_json::to_vec(&record).unwrap();
        match topology.tasks_kv.update(id.as_str(), bytes.into(), entry.revision).await {
            Ok(revision) if held => break (record, revision),
            Ok(revision) => return (record, revision),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
            Err(e) => panic!("{verb:?}: {e}"),
        }
    };
    let wake = serde_json::to_vec(&Control { id: id.clone(), verb: verb.into() }).unwrap();
    client.publish(topology::control_subject(id), wake.into()).await.unwrap();
    client.flush().await.unwrap();
    (record, revision)
}

/// The pid the script wrote to `file`, once it has.
async fn read_pid(file: &Path) -> String {
    wait_for(&format!("{}", file.display()), WAIT, || async {
        let pid = std::fs::read_to_string(file).ok()?;
        pid.ends_with('\n').then(|| pid.trim().to_owned())
    })
    .await
}

/// `/proc/<pid>/stat` after the command name: state, ppid, ... (field 3 onwards).
fn proc_stat(pid: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat.rsplit_once(')')?.1.split_whitespace().map(str::to_owned).collect())
}

/// Gone, or a zombie waiting for a reaper that is not ours (an orphaned grandchild).
fn is_dead(pid: &str) -> bool {
    proc_stat(pid).is_none_or(|f| f[0] == "Z")
}

/// utime + stime in clock ticks (fields 14 and 15).
fn cpu_ticks(pid: &str) -> u64 {
    let f = proc_stat(pid).expect("process alive");
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn error_code(r: &TaskRecord) -> Option<&str> {
    r.error.as_ref().map(|e| e.code.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_a_running_process_tree_and_ends_the_task() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let client = nats.client().await;
    let dir = nats.dir.path();
    // Ignores TERM (and so does its grandchild, which inherits the ignored disposition): only
    // the KILL after the grace ends them.
    let script = write_script(
        dir,
        "stubborn.sh",
        "#!/bin/sh\ntrap '' TERM\necho $$ > \"$1/leader.pid\"\nsleep 1000 &\n\
         echo $! > \"$1/grandchild.pid\"\nwait\n",
    );
    let worker = start_worker(&topology, &worker_toml("w-cancel", Some(&script)));
    let dir_arg = dir.to_str().unwrap();
    let spec = json!({"kind": "exec", "input": {"program": "script", "args": [dir_arg]}});
    let id = submit(&topology, spec).await;
    let leader = read_pid(&dir.join("leader.pid")).await;
    let grandchild = read_pid(&dir.join("grandchild.pid")).await;
    wait_status(&topology, &id, Status::Running).await;
    assert!(!is_dead(&leader) && !is_dead(&grandchild));

    let (_, revision) = control(&topology, &client, &id, Verb::Cancel, |r| {
        r.cancel(Cause::User, OffsetDateTime::now_utc()).unwrap();
    })
    .await;
    let cancelled_at = Instant::now();
    wait_for("the whole process tree to die", WAIT, || async {
        (is_dead(&leader) && is_dead(&grandchild)).then_some(())
    })
    .await;
    let took = cancelled_at.elapsed();
    assert!(took <= KILL_GRACE + Duration::from_secs(1), "tree died after {took:?}");

    let js = &topology.js;
    wait_for("the message to leave TASKS", WAIT, || async {
        (stream_messages(js, topology::TASKS_STREAM).await == 0).then_some(())
    })
    .await;
    // Nothing more happens: the worker wrote nothing (the revision is the gateway's), and no
    // attempt starts, across more than one ack deadline.
    holds_for("the cancelled record", ACK_WAIT * 2, || async {
        let entry = topology.tasks_kv.entry(id.as_str()).await.unwrap().unwrap();
        let r: TaskRecord = serde_json::from_slice(&entry.value).unwrap();
        let fine = entry.revision == revision
            && r.status == Status::Cancelled
            && r.cause == Some(Cause::User)
            && r.attempt == 1;
        if fine { Ok(()) } else { Err(format!("revision {}: {r:?}", entry.revision)) }
    })
    .await;
    // The worker announced no end (at most its `running`, if the cancel came after its first
    // flush): the cancel is the gateway's to announce.
    let seen = statuses(&events_of(js, &id).await);
    assert!(seen.iter().all(|s| *s == (Status::Running, 1)), "{seen:?}");
    assert_eq!(stream_messages(js, topology::DLQ_STREAM).await, 0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_freezes_a_process_and_keeps_its_lease_until_resume() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let client = nats.client().await;
    let dir = nats.dir.path();
    // Burns CPU until the test creates the marker file.
    let script = write_script(
        dir,
        "busy.sh",
        "#!/bin/sh\necho $$ > \"$1/busy.pid\"\nwhile [ ! -e \"$1/done\" ]; do :; done\n\
         echo '{\"result\": {\"done\": true}}'\n",
    );
    let worker = start_worker(&topology, &worker_toml("w-pause", Some(&script)));
    let dir_arg = dir.to_str().unwrap();
    // The attempt's timeout (5 s) is shorter than the time it spends paused plus running: it
    // only succeeds because the timeout clock stands still while paused.
    let spec = json!({"kind": "exec", "timeout_s": 5, "max_attempts": 1,
                      "input": {"program": "script", "args": [dir_arg]}});
    let id = submit(&topology, spec).await;
    let pid = read_pid(&dir.join("busy.pid")).await;
    wait_status(&topology, &id, Status::Running).await;
    let before = cpu_ticks(&pid);
    wait_for("the loop to burn CPU", WAIT, || async { (cpu_ticks(&pid) > before).then_some(()) })
        .await;

    control(&topology, &client, &id, Verb::Pause, |r| r.pause().unwrap()).await;
    wait_for("SIGSTOP", WAIT, || async {
        (proc_stat(&pid).expect("alive")[0] == "T").then_some(())
    })
    .await;
    let frozen = cpu_ticks(&pid);
    // Three ack deadlines and a bit: no CPU, no redelivery, the record still this attempt's.
    holds_for("the pause", ACK_WAIT * 3 + Duration::from_millis(500), || async {
        let ticks = cpu_ticks(&pid);
        let r = record(&topology, id.as_str()).await.expect("record");
        let fine = ticks == frozen && r.status == Status::Paused && r.attempt == 1;
        if fine { Ok(()) } else { Err(format!("cpu {ticks} (was {frozen}), {r:?}")) }
    })
    .await;

    control(&topology, &client, &id, Verb::Resume, |r| r.resume().unwrap()).await;
    wait_for("CPU to advance again", WAIT, || async { (cpu_ticks(&pid) > frozen).then_some(()) })
        .await;
    std::fs::write(dir.join("done"), "").unwrap();
    let r = wait_status(&topology, &id, Status::Succeeded).await;
    assert_eq!((r.attempt, r.result), (1, Some(json!({"done": true}))));
    let js = &topology.js;
    let events = wait_for("the succeeded event", WAIT, || async {
        let e = events_of(js, &id).await;
        statuses(&e).contains(&(Status::Succeeded, 1)).then_some(e)
    })
    .await;
    assert_eq!(statuses(&events), [(Status::Running, 1), (Status::Succeeded, 1)]);
    wait_for("TASKS empty", WAIT, || async {
        (stream_messages(js, topology::TASKS_STREAM).await == 0).then_some(())
    })
    .await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_an_in_process_task_at_its_next_step() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let client = nats.client().await;
    let worker = start_worker(&topology, &worker_toml("w-steps", None));
    let spec = json!({"kind": "sleep", "input": {"seconds": 2, "steps": 4, "echo": "z"}});
    let id = submit(&topology, spec).await;
    let js = &topology.js;
    let progress_events = |events: &[Event]| {
        events.iter().filter(|e| matches!(e.body, EventBody::Progress(_))).count()
    };
    wait_for("the first step", WAIT, || async {
        (progress_events(&events_of(js, &id).await) >= 1).then_some(())
    })
    .await;

    control(&topology, &client, &id, Verb::Pause, |r| r.pause().unwrap()).await;
    // The step under way may finish; then nothing, for longer than the rest of the sleep.
    let at_pause = progress_events(&events_of(js, &id).await);
    holds_for("the pause", Duration::from_secs(3), || async {
        let seen = progress_events(&events_of(js, &id).await);
        let r = record(&topology, id.as_str()).await.expect("record");
        let fine = seen <= at_pause + 1 && r.status == Status::Paused;
        if fine { Ok(()) } else { Err(format!("{seen} steps (was {at_pause}), {r:?}")) }
    })
    .await;

    control(&topology, &client, &id, Verb::Resume, |r| r.resume().unwrap()).await;
    let r = wait_status(&topology, &id, Status::Succeeded).await;
    assert_eq!((r.attempt, r.result), (1, Some(json!({"slept_s": 2.0, "echo": "z"}))));
    // The events follow the record write: wait for the last one, not only for the steps.
    let events = wait_for("all four steps and the succeeded status", WAIT, || async {
        let e = events_of(js, &id).await;
        let done = statuses(&e).contains(&(Status::Succeeded, 1));
        (progress_events(&e) == 4 && done).then_some(e)
    })
    .await;
    assert_eq!(statuses(&events), [(Status::Running, 1), (Status::Succeeded, 1)]);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_handler_that_never_reaches_a_checkpoint_still_times_out() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let client = nats.client().await;
    let worker = start_worker(&topology, &worker_toml("w-no-checkpoint", None));
    // One step of 30 s: the sleep's only checkpoint is before it, so a pause never holds it,
    // and the attempt's 2 s timeout must not stand still for a pause that does not happen.
    let spec = json!({"kind": "sleep", "timeout_s": 2, "max_attempts": 1,
                      "input": {"seconds": 30}});
    let id = submit(&topology, spec).await;
    wait_status(&topology, &id, Status::Running).await;
    control(&topology, &client, &id, Verb::Pause, |r| r.pause().unwrap()).await;

    let r = wait_status(&topology, &id, Status::Failed).await;
    assert_eq!((r.cause, error_code(&r)), (Some(Cause::Timeout), Some("timeout")));
    // It was paused when its time ran out, and ran no longer than its timeout and the grace.
    assert_eq!(r.paused_from, Some(Status::Running));
    let ran = r.finished_at.unwrap() - r.started_at.unwrap();
    assert!(ran >= time::Duration::seconds(2), "stopped after {ran}");
    assert!(ran < time::Duration::seconds(2) + KILL_GRACE + time::Duration::seconds(1), "{ran}");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempt_timeouts_retry_but_the_deadline_does_not() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let worker = start_worker(&topology, &worker_toml("w-time", None));
    let slow = submit(
        &topology,
        json!({"kind": "sleep", "timeout_s": 1, "max_attempts": 2, "input": {"seconds": 5}}),
    )
    .await;
    let late = submit(
        &topology,
        json!({"kind": "sleep", "deadline_s": 2, "max_attempts": 3,
               "input": {"seconds": 10, "steps": 10}}),
    )
    .await;

    let js = &topology.js;
    let r = wait_status(&topology, &slow, Status::Failed).await;
    assert_eq!((r.attempt, r.cause, error_code(&r)), (2, Some(Cause::Timeout), Some("timeout")));
    let events = wait_for("slow's failed event", WAIT, || async {
        let e = events_of(js, &slow).await;
        statuses(&e).contains(&(Status::Failed, 2)).then_some(e)
    })
    .await;
    assert_eq!(
        statuses(&events),
        [(Status::Running, 1), (Status::Retrying, 1), (Status::Running, 2), (Status::Failed, 2)]
    );

    let r = wait_status(&topology, &late, Status::Failed).await;
    let code = error_code(&r);
    assert_eq!((r.attempt, r.cause, code), (1, Some(Cause::Timeout), Some("deadline_exceeded")));
    assert_eq!(r.error.as_ref().map(|e| e.retryable), Some(false));
    let ran = r.finished_at.unwrap() - r.started_at.unwrap();
    assert!(ran < time::Duration::seconds(4), "stopped after {ran}");
    let events = wait_for("late's failed event", WAIT, || async {
        let e = events_of(js, &late).await;
        statuses(&e).contains(&(Status::Failed, 1)).then_some(e)
    })
    .await;
    assert_eq!(statuses(&events), [(Status::Running, 1), (Status::Failed, 1)]);

    wait_for("TASKS empty", WAIT, || async {
        (stream_messages(js, topology::TASKS_STREAM).await == 0).then_some(())
    })
    .await;
    let reason_of = |id: &TaskId| {
        let id = id.clone();
        async move {
            let mut dlq = js.get_stream(topology::DLQ_STREAM).await.unwrap();
            let info = dlq.info().await.unwrap();
            for seq in info.state.first_sequence..=info.state.last_sequence {
                let Ok(m) = dlq.get_raw_message(seq).await else { continue };
                if m.headers.get(headers::TASK_ID).map(|v| v.as_str()) == Some(id.as_str()) {
                    return m.headers.get(headers::DLQ_REASON).map(|v| v.as_str().to_owned());
                }
            }
            None
        }
    };
    assert_eq!(reason_of(&slow).await.as_deref(), Some("max_attempts"));
    assert_eq!(reason_of(&late).await.as_deref(), Some("deadline"));
    worker.stop().await;
}

/// Publishes the task's lane message again, as the gateway does on resume of a task that left
/// the queue and on retry: with a `Nats-Msg-Id` of its own so de-duplication keeps it.
async fn republish(topology: &Topology, record: &TaskRecord, msg_id: &str) {
    let lane = topology::Lane::new(record.class, record.priority);
    let body = serde_json::to_vec(&TaskSpec::of_record(record)).unwrap();
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::MSG_ID, msg_id);
    let ack = topology.js.publish_with_headers(lane.subject(), h, body.into()).await.unwrap();
    ack.await.expect("publish ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_task_leaves_the_queue_and_a_lost_holder_releases_it() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let client = nats.client().await;
    let js = &topology.js;

    // Paused while queued: the worker drops the message instead of running it.
    let queued = submit(&topology, json!({"kind": "sleep", "input": {"echo": "q"}})).await;
    control(&topology, &client, &queued, Verb::Pause, |r| r.pause().unwrap()).await;
    let config = nats.dir.path().join("holder.toml");
    std::fs::write(&config, worker_toml("holder", None)).unwrap();
    let mut holder = std::process::Command::new(claw_tests::bin("claw-worker"))
        .arg("--config")
        .arg(&config)
        .arg("--nats-url")
        .arg(nats.url())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn claw-worker");
    wait_for("the paused task to leave TASKS", WAIT, || async {
        (stream_messages(js, topology::TASKS_STREAM).await == 0).then_some(())
    })
    .await;
    let r = record(&topology, queued.as_str()).await.unwrap();
    assert_eq!((r.status, r.paused_from, r.attempt), (Status::Paused, Some(Status::Queued), 0));

    // Paused while running, then its worker dies: the redelivered message finds the hold
    // orphaned, releases it (resume will queue the task) and is dropped, not run.
    let held =
        submit(&topology, json!({"kind": "sleep", "input": {"seconds": 30, "steps": 30}})).await;
    wait_status(&topology, &held, Status::Running).await;
    control(&topology, &client, &held, Verb::Pause, |r| r.pause().unwrap()).await;
    holder.kill().expect("SIGKILL the worker");
    holder.wait().unwrap();
    let worker = start_worker(&topology, &worker_toml("rescuer", None));
    let r = wait_for("the hold to be released", WAIT, || async {
        record(&topology, held.as_str()).await.filter(|r| r.paused_from == Some(Status::Queued))
    })
    .await;
    assert_eq!((r.status, r.cause, r.attempt), (Status::Paused, Some(Cause::WorkerLost), 1));
    wait_for("TASKS empty", WAIT, || async {
        (stream_messages(js, topology::TASKS_STREAM).await == 0).then_some(())
    })
    .await;

    // Resume queues both again (the gateway re-publishes them), and they run.
    for (id, input) in [(&queued, json!({"echo": "q"})), (&held, json!({"seconds": 0.2}))] {
        let (r, _) = control(&topology, &client, id, Verb::Resume, |r| {
            r.resume().unwrap();
            r.input = input.clone(); // shorter, so the test does not wait 30 s
        })
        .await;
        assert_eq!(r.status, Status::Queued);
        republish(&topology, &r, &format!("{id}-resume")).await;
    }
    let r = wait_status(&topology, &queued, Status::Succeeded).await;
    assert_eq!((r.attempt, r.worker.as_deref()), (1, Some("rescuer")));
    let r = wait_status(&topology, &held, Status::Succeeded).await;
    assert_eq!(r.worker.as_deref(), Some("rescuer"));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_in_process_task_stops_and_a_retry_runs_it_again() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let client = nats.client().await;
    let js = &topology.js;
    let worker = start_worker(&topology, &worker_toml("w-retry", None));
    let spec = json!({"kind": "sleep", "input": {"seconds": 30, "steps": 30, "echo": 1}});
    let id = submit(&topology, spec).await;
    let first = wait_status(&topology, &id, Status::Running).await;
    control(&topology, &client, &id, Verb::Cancel, |r| {
        r.cancel(Cause::User, OffsetDateTime::now_utc()).unwrap();
    })
    .await;
    wait_for("the message to leave TASKS", WAIT, || async {
        (stream_messages(js, topology::TASKS_STREAM).await == 0).then_some(())
    })
    .await;

    // Retry: back to queued (a finished task is not held: no wake-up), and a new message.
    let (r, _) = control(&topology, &client, &id, Verb::Retry, |r| {
        r.requeue(OffsetDateTime::now_utc()).unwrap();
        r.input = json!({"seconds": 0.2, "echo": 2});
    })
    .await;
    republish(&topology, &r, &format!("{id}-retry-1")).await;
    let r = wait_status(&topology, &id, Status::Succeeded).await;
    // An explicit retry starts a new round of attempts, here on the same worker: the old
    // attempt's fields are not mistaken for this one.
    assert_eq!((r.attempt, r.worker.as_deref()), (1, Some("w-retry")));
    assert_eq!(r.result, Some(json!({"slept_s": 0.2, "echo": 2})));
    assert!(r.started_at > first.started_at);
    let events = wait_for("the succeeded event", WAIT, || async {
        let e = events_of(js, &id).await;
        statuses(&e).contains(&(Status::Succeeded, 1)).then_some(e)
    })
    .await;
    // The retried attempt ran 200 ms, so its `running` went out with its first flush; the
    // cancelled one's did only if it was cancelled after its first 100 ms (protocol 5).
    let seen = statuses(&events);
    assert_eq!(seen[seen.len() - 2..], [(Status::Running, 1), (Status::Succeeded, 1)], "{seen:?}");
    assert!(seen[..seen.len() - 2].iter().all(|s| *s == (Status::Running, 1)), "{seen:?}");
    wait_for("TASKS empty", WAIT, || async {
        (stream_messages(js, topology::TASKS_STREAM).await == 0).then_some(())
    })
    .await;
    worker.stop().await;
}

/// A holder that is still alive when another worker takes its task over (its heartbeats were
/// late, its process not dead) hears of it from the takeover wake-up, finds another attempt in
/// the record, and kills its child at once (no kill grace: the new attempt owns the task), well
/// within the new attempt's fence (`claim::TAKEOVER_FENCE`, 1 s); and it writes nothing over
/// the new attempt. The takeover is made here the way a worker's claim makes it: the record is
/// moved to a new attempt of the same message, then `takeover` goes out on the control subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_holder_that_is_taken_over_kills_its_child_within_the_fence() {
    use claw_proto::api::Wake;
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let client = nats.client().await;
    let dir = nats.dir.path();
    // Ignores TERM: only a KILL ends it, and a KILL after a grace would take 5 s here.
    let script = write_script(
        dir,
        "stubborn.sh",
        "#!/bin/sh\ntrap '' TERM\necho $$ > \"$1/leader.pid\"\nwhile :; do sleep 0.05; done\n",
    );
    let toml = worker_toml("w-holder", Some(&script))
        .replace(&format!("kill_grace_s = {}", KILL_GRACE.as_secs_f64()), "kill_grace_s = 5.0");
    let _worker = start_worker(&topology, &toml);
    let spec =
        json!({"kind": "exec", "input": {"program": "script", "args": [dir.to_str().unwrap()]}});
    let id = submit(&topology, spec).await;
    let leader = read_pid(&dir.join("leader.pid")).await;
    let held = wait_status(&topology, &id, Status::Running).await;

    let taken_over = loop {
        let entry = topology.tasks_kv.entry(id.as_str()).await.unwrap().expect("record");
        let mut record: TaskRecord = serde_json::from_slice(&entry.value).unwrap();
        record.start(record.attempt + 1, "w-new", OffsetDateTime::now_utc()).unwrap();
        let bytes = serde_json::to_vec(&record).unwrap();
        match topology.tasks_kv.update(id.as_str(), bytes.into(), entry.revision).await {
            Ok(_) => break record,
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
            Err(e) => panic!("takeover: {e}"),
        }
    };
    let wake = serde_json::to_vec(&Control { id: id.clone(), verb: Wake::Takeover }).unwrap();
    let woken = Instant::now();
    client.publish(topology::control_subject(&id), wake.into()).await.unwrap();
    client.flush().await.unwrap();
    wait_for("the superseded holder's child to die", WAIT, || async {
        is_dead(&leader).then_some(())
    })
    .await;
    let overlap = woken.elapsed();
    assert!(
        overlap < Duration::from_secs(1),
        "the holder's child lived {overlap:?} past the takeover"
    );

    // The holder released the task: the record is still the new attempt's.
    holds_for("the new attempt's record", Duration::from_secs(1), || async {
        let now = record(&topology, id.as_str()).await.ok_or("no record")?;
        if (now.attempt, now.worker.as_deref()) == (taken_over.attempt, Some("w-new")) {
            Ok(())
        } else {
            Err(format!("{now:?}"))
        }
    })
    .await;
    assert_eq!(held.attempt + 1, taken_over.attempt);
}
