//! What a worker promises about the work it holds (issue 5): a task's child cannot exceed its
//! limits or hurt the worker, a handler panic costs one attempt, the pools size themselves from
//! the backlog, a worker cut off from NATS kills its children before the task runs elsewhere,
//! and SIGTERM hands running tasks back at once. Real processes throughout (`/proc` is read to
//! check them); tests that start `claw-worker` need `cargo build --bins` first.

use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use claw_proto::event::EventBody;
use claw_proto::topology::{self, Settings, headers};
use claw_proto::{Cause, Class, Status, TaskError, TaskRecord};
use claw_tests::{
    Nats, WAIT, WorkerProcess, alive, events_of, python3, record, rss_of, signal, start_worker,
    statuses, stream_contents, submit_direct as submit, test_settings, wait_for, wait_status,
    worker_status, write_script,
};
use claw_worker::handler::{Context, Handler, Registry};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::{Value, json};

fn code(r: &TaskRecord) -> Option<&str> {
    r.error.as_ref().map(|e| e.code.as_str())
}

/// The pid a script wrote as the first line of `file`.
fn first_pid(file: &Path) -> Option<u32> {
    std::fs::read_to_string(file).ok()?.lines().next()?.trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_end_attempts_with_a_named_cause_and_the_worker_keeps_serving() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let dir = nats.dir.path();
    let python = python3();
    let group_file = dir.join("forker.pgid");
    let forker = write_script(
        dir,
        "forker.sh",
        &format!(
            "#!/bin/sh\necho $$ > {group_file:?}\ni=0\nwhile [ $i -lt 200 ]; do sleep 30 & i=$((i+1)); done\nwait\n"
        ),
    );
    let toml = format!(
        "name = \"w-limits\"\nack_deadline_s = 2.0\nkill_grace_s = 0.2\n\
         [retry]\ninitial_ms = 100\njitter = 0.0\n\
         [isolation]\nmemory_mb = 300\ncpu_s = 1\nopen_files = 64\nprocesses = 20\n\
         [programs.hog]\npath = {python:?}\nargs = [\"-c\", \"b = bytearray(600 * 1024 * 1024)\"]\n\
         [programs.fds]\npath = {python:?}\n\
         args = [\"-c\", \"fs = [open('/dev/null') for _ in range(10000)]\"]\n\
         [programs.spin]\npath = \"/bin/sh\"\nargs = [\"-c\", \"while :; do :; done\"]\n\
         [programs.forker]\npath = {forker:?}\n"
    );
    let worker = start_worker(&topology, &toml);
    let exec = |program: &str, max_attempts: u32| {
        json!({"kind": "exec", "max_attempts": max_attempts, "timeout_s": 20,
               "input": {"program": program}})
    };
    let hog = submit(&topology, exec("hog", 2)).await;
    let fds = submit(&topology, exec("fds", 1)).await;
    let spin = submit(&topology, exec("spin", 1)).await;
    let forker = submit(&topology, exec("forker", 1)).await;
    // Submitted while the others run: the worker keeps serving.
    let nap = submit(&topology, json!({"kind": "sleep", "input": {"seconds": 0.5}})).await;
    let r = wait_status(&topology, nap.as_str(), Status::Succeeded).await;
    assert_eq!(r.attempt, 1);

    // Memory: fails on each attempt, so the limit counts toward max_attempts.
    let r = wait_status(&topology, hog.as_str(), Status::Failed).await;
    assert_eq!((r.cause, code(&r), r.attempt), (Some(Cause::Limit), Some("limit_memory"), 2));
    let tries = statuses(&events_of(&topology.js, hog.as_str()).await);
    assert!(tries.contains(&(Status::Retrying, 1)), "{tries:?}");
    assert!(r.error.as_ref().unwrap().message.contains("MemoryError"), "{:?}", r.error);

    let r = wait_status(&topology, fds.as_str(), Status::Failed).await;
    assert_eq!((r.cause, code(&r)), (Some(Cause::Limit), Some("limit_files")));
    let r = wait_status(&topology, spin.as_str(), Status::Failed).await;
    assert_eq!((r.cause, code(&r)), (Some(Cause::Limit), Some("limit_cpu")));
    let r = wait_status(&topology, forker.as_str(), Status::Failed).await;
    assert_eq!((r.cause, code(&r)), (Some(Cause::Limit), Some("limit_processes")));
    // The whole group went with it: not one of its `sleep 30`s is left.
    let pgid: i32 = std::fs::read_to_string(&group_file).unwrap().trim().parse().unwrap();
    wait_for("the fork bomb's group to be gone", WAIT, || async {
        (claw_worker::limits::group_size(pgid) == 0).then_some(())
    })
    .await;

    // And the worker still runs tasks after all that.
    let after = submit(&topology, json!({"kind": "sleep", "input": {"echo": "still here"}})).await;
    let r = wait_status(&topology, after.as_str(), Status::Succeeded).await;
    assert_eq!(r.result, Some(json!({"slept_s": 0.0, "echo": "still here"})));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gigabyte_of_stdout_does_not_grow_the_worker() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    // One endless line, and a million lines of a kilobyte: 1 GB each.
    let toml = "name = \"w-output\"\nack_deadline_s = 2.0\n\
         [programs.line]\npath = \"/bin/sh\"\n\
         args = [\"-c\", \"head -c 1000000000 /dev/zero | tr '\\\\0' x\"]\n\
         [programs.lines]\npath = \"/bin/sh\"\n\
         args = [\"-c\", \"yes $(head -c 999 /dev/zero | tr '\\\\0' y) | head -c 1000000000\"]\n";
    let worker = WorkerProcess::start(&nats, "w-output", toml);
    let idle = wait_for("the worker to run", WAIT, || async {
        let client = nats.client().await;
        worker_status(&client, "w-output").await.and_then(|_| rss_of(worker.pid()))
    })
    .await;
    let spec = |p: &str| json!({"kind": "exec", "timeout_s": 120, "input": {"program": p}});
    let line = submit(&topology, spec("line")).await;
    let lines = submit(&topology, spec("lines")).await;
    let mut peak = idle;
    let started = Instant::now();
    loop {
        peak = peak.max(rss_of(worker.pid()).expect("the worker runs"));
        let mut done = true;
        for id in [&line, &lines] {
            done &= record(&topology, id.as_str()).await.is_some_and(|r| r.status.is_terminal());
        }
        if done {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "2 GB of output took too long");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in [&line, &lines] {
        let r = record(&topology, id.as_str()).await.unwrap();
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
    }
    let grew = peak.saturating_sub(idle);
    eprintln!("worker RSS idle {} MB, peak {} MB", idle >> 20, peak >> 20);
    assert!(grew < 64 << 20, "the worker grew by {} MB", grew >> 20);
    // What did not fit the output buffer was dropped, and said so.
    let events = events_of(&topology.js, lines.as_str()).await;
    let dropped = events.iter().any(|e| {
        matches!(&e.body, EventBody::Output { text } if text.contains("bytes of output dropped"))
    });
    assert!(dropped);
}

/// A kind whose handler panics.
struct Boom;

impl Handler for Boom {
    fn kind(&self) -> &str {
        "boom"
    }

    fn run<'a>(
        &'a self,
        _: &'a TaskRecord,
        _: &'a Context,
    ) -> BoxFuture<'a, Result<Value, TaskError>> {
        async { panic!("boom handler panicked on purpose") }.boxed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_panic_fails_one_attempt_and_the_pool_keeps_its_slot() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    // One short slot: if the panic lost it, nothing after would run.
    let config = claw_worker::Config::from_toml_str(
        "name = \"w-panic\"\nshort_slots = 1\nlong_slots = 0\nack_deadline_s = 2.0",
    )
    .unwrap();
    let registry = Registry::empty().with(claw_worker::kinds::sleep::Sleep).with(Boom);
    let token = tokio_util::sync::CancellationToken::new();
    let run =
        tokio::spawn(claw_worker::run_with(topology.clone(), config, registry, token.clone()));
    // `boom` is this worker's own kind: published straight to its lane, admitted by the worker.
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, "boom-1");
    let body = json!({"kind": "boom", "max_attempts": 1}).to_string();
    let lane = topology::Lane::new(Class::Short, claw_proto::Priority::Normal);
    topology.js.publish_with_headers(lane.subject(), h, body.into()).await.unwrap().await.unwrap();
    let r = wait_status(&topology, "boom-1", Status::Failed).await;
    assert_eq!((code(&r), r.attempt), (Some("panic"), 1));
    for i in 0..3 {
        let next = submit(&topology, json!({"kind": "sleep", "input": {"echo": i}})).await;
        wait_status(&topology, next.as_str(), Status::Succeeded).await;
    }
    let client = nats.client().await;
    let status = worker_status(&client, "w-panic").await.expect("status");
    assert_eq!(status.pools["short"].size, 1);
    token.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_long_pool_grows_with_the_backlog_and_shrinks_when_idle() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let toml = "name = \"w-size\"\nack_deadline_s = 2.0\nshort_slots = 2\n\
         [pools.long]\nmin = 2\nmax = 10\n[sizing]\ninterval_s = 0.3\n\
         [programs.nap]\npath = \"/bin/sleep\"\nargs = [\"0.2\"]\n";
    let client = nats.client().await;
    // Queued before the worker starts, so it meets a backlog of 200.
    let mut ids = Vec::new();
    for _ in 0..200 {
        ids.push(submit(&topology, json!({"kind": "exec", "input": {"program": "nap"}})).await);
    }
    let worker = start_worker(&topology, toml);
    let first = wait_for("the status", WAIT, || worker_status(&client, "w-size")).await;
    assert_eq!((first.pools["long"].min, first.pools["long"].max), (2, 10));
    assert!(first.pools["long"].size <= 10);
    let grown = wait_for("the long pool at its max", WAIT, || async {
        let s = worker_status(&client, "w-size").await?;
        (s.pools["long"].size == 10).then_some(s)
    })
    .await;
    assert!(grown.pools["long"].backlog > 0, "{grown:?}");
    assert!(grown.rss_bytes > 0);
    for id in &ids {
        wait_status(&topology, id.as_str(), Status::Succeeded).await;
    }
    let idle = wait_for("the long pool back at its min", WAIT, || async {
        let s = worker_status(&client, "w-size").await?;
        (s.pools["long"].size == 2).then_some(s)
    })
    .await;
    assert_eq!((idle.pools["long"].busy, idle.pools["long"].backlog), (0, 0), "{idle:?}");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_nats_kills_its_child_before_the_task_runs_again() {
    let nats = Nats::start();
    let ack = Duration::from_secs(3);
    let settings = Settings { ack_wait_s: Some(ack.as_secs_f64()), ..test_settings() };
    let topology = nats.topology(&settings).await;
    let pids = nats.dir.path().join("attempts.pid");
    let script = write_script(
        nats.dir.path(),
        "slow.sh",
        &format!("#!/bin/sh\necho $$ >> {pids:?}\nsleep 6\necho '{{\"result\": \"done\"}}'\n"),
    );
    let toml = format!(
        "name = \"w-cut\"\nack_deadline_s = 3.0\nkill_grace_s = 0.2\nshort_slots = 1\n\
         [pools.long]\nmin = 1\nmax = 1\n[programs.slow]\npath = {script:?}\n"
    );
    let _worker = WorkerProcess::start(&nats, "w-cut", &toml);
    let id = submit(&topology, json!({"kind": "exec", "input": {"program": "slow"}})).await;
    let first = wait_for("the first attempt's pid", WAIT, || async { first_pid(&pids) }).await;
    assert!(alive(first));

    // The worker cannot reach the server: its lease runs out at 2/3 of the ack deadline, and
    // its child must be dead before the server could hand the task to anyone (the deadline).
    nats.server.freeze();
    let frozen = Instant::now();
    wait_for("the child to be killed", WAIT, || async { (!alive(first)).then_some(()) }).await;
    let killed_after = frozen.elapsed();
    assert!(killed_after < ack, "the child lived {killed_after:?} into the freeze");
    tokio::time::sleep((ack + Duration::from_millis(500)).saturating_sub(frozen.elapsed())).await;
    nats.server.thaw();

    // Redelivered after the deadline, run again, and finished exactly once.
    let r = wait_status(&topology, id.as_str(), Status::Succeeded).await;
    assert_eq!(r.attempt, 2);
    let all = std::fs::read_to_string(&pids).unwrap();
    assert_eq!(all.lines().count(), 2, "{all}");
    let events = events_of(&topology.js, id.as_str()).await;
    let ends: Vec<_> = statuses(&events).into_iter().filter(|(s, _)| s.is_terminal()).collect();
    assert_eq!(ends, [(Status::Succeeded, 2)], "{events:?}");
    eprintln!("child killed {killed_after:?} after the freeze");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_hands_tasks_to_another_worker_at_once() {
    let nats = Nats::start();
    // A long ack deadline: a hand-over within seconds can only be the NAK, not a redelivery.
    let settings = Settings { ack_wait_s: Some(30.0), ..test_settings() };
    let topology = nats.topology(&settings).await;
    let pids = nats.dir.path().join("drain.pid");
    let script = write_script(
        nats.dir.path(),
        "long.sh",
        &format!("#!/bin/sh\necho $$ >> {pids:?}\nsleep 60\n"),
    );
    let program = format!("[programs.long]\npath = {script:?}\n");
    let drain = Duration::from_secs(1);
    let toml = format!(
        "name = \"w-leaving\"\nack_deadline_s = 30.0\ndrain_s = 1.0\nkill_grace_s = 0.2\n\
         short_slots = 1\nlong_slots = 3\n{program}"
    );
    let mut leaving = WorkerProcess::start(&nats, "w-leaving", &toml);
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(submit(&topology, json!({"kind": "exec", "input": {"program": "long"}})).await);
    }
    for id in &ids {
        let r = wait_status(&topology, id.as_str(), Status::Running).await;
        assert_eq!(r.worker.as_deref(), Some("w-leaving"));
    }
    let children: Vec<u32> = wait_for("three children", WAIT, || async {
        let all = std::fs::read_to_string(&pids).unwrap_or_default();
        let p: Vec<u32> = all.lines().filter_map(|l| l.trim().parse().ok()).collect();
        (p.len() == 3).then_some(p)
    })
    .await;

    signal(leaving.pid(), libc::SIGTERM);
    let term = Instant::now();
    let status = loop {
        if let Some(status) = leaving.child.try_wait().unwrap() {
            break status;
        }
        assert!(term.elapsed() < WAIT, "the worker did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let exited = term.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(exited < drain + Duration::from_secs(2), "exited {exited:?} after SIGTERM");
    assert!(children.iter().all(|&p| !alive(p)), "children left: {children:?}");

    let staying = start_worker(
        &topology,
        // A short drain and grace: stopping it at the end should not wait out its 60 s tasks.
        &format!(
            "name = \"w-staying\"\nack_deadline_s = 30.0\ndrain_s = 0.5\nkill_grace_s = 0.2\n\
             long_slots = 3\n{program}"
        ),
    );
    for id in &ids {
        let r = wait_for("the hand-over", WAIT, || async {
            record(&topology, id.as_str())
                .await
                .filter(|r| r.worker.as_deref() == Some("w-staying"))
        })
        .await;
        // A hand-back gives the attempt back.
        assert_eq!((r.status, r.attempt), (Status::Running, 1));
    }
    let taken = term.elapsed();
    assert!(taken < Duration::from_secs(10), "taken {taken:?} after SIGTERM (ack deadline 30 s)");
    let dlq = stream_contents(&topology.js, topology::DLQ_STREAM).await;
    assert!(dlq.is_empty());
    staying.stop().await;
}

/// A worker SIGKILLed (or OOM-killed) cannot stop its children, and a program that ran on would
/// be a second run of its task beside the redelivered one. The leader dies with the worker
/// (parent-death signal); what the leader started itself is killed, and the task's working
/// directory removed, by the next worker that starts on the machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_programs_die_with_it_or_at_the_next_start() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let dir = nats.dir.path();
    let script = write_script(
        dir,
        "orphan.sh",
        &format!(
            "#!/bin/sh\necho $$ > {:?}\nsleep 600 &\necho $! > {:?}\nwait\n",
            dir.join("leader.pid"),
            dir.join("grandchild.pid")
        ),
    );
    let toml = format!(
        "name = \"w-doomed\"\nack_deadline_s = 2.0\n[programs.orphan]\npath = {script:?}\n"
    );
    let mut doomed = WorkerProcess::start(&nats, "w-doomed", &toml);
    submit(&topology, json!({"kind": "exec", "input": {"program": "orphan"}})).await;
    let leader =
        wait_for("the leader's pid", WAIT, || async { first_pid(&dir.join("leader.pid")) }).await;
    let grandchild =
        wait_for("the grandchild's pid", WAIT, || async { first_pid(&dir.join("grandchild.pid")) })
            .await;
    let workdir = std::fs::read_link(format!("/proc/{leader}/cwd")).expect("the leader's cwd");
    assert!(workdir.file_name().unwrap().to_str().unwrap().starts_with("claw-task-"));

    doomed.child.kill().unwrap();
    doomed.child.wait().unwrap();
    let killed = Instant::now();
    wait_for("the leader to die with its worker", Duration::from_secs(2), || async {
        (!alive(leader)).then_some(())
    })
    .await;
    eprintln!("leader gone {:?} after its worker", killed.elapsed());
    assert!(alive(grandchild), "the grandchild outlives the leader until a worker starts");

    let _next = WorkerProcess::start(&nats, "w-next", &toml);
    wait_for("the next worker to end the grandchild", WAIT, || async {
        (!alive(grandchild)).then_some(())
    })
    .await;
    wait_for("the dead worker's task directory to go", WAIT, || async {
        (!workdir.exists()).then_some(())
    })
    .await;
}
