//! The limits of one worker: at most `max_concurrent` attempts at once
//! across both classes; a configuration whose numbers are out of range refused at start, by
//! the `claw-worker` process, with a sentence that names the key and what is allowed; and the
//! cap on the worker's own memory, which fails the in-process attempt that grew past it with
//! `cause: limit` while the worker goes on serving. Tests that start `claw-worker` need
//! `cargo build --bins` first.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use claw_proto::topology::{Lane, headers};
use claw_proto::{Cause, Class, Priority, Status, TaskError, TaskId, TaskRecord};
use claw_tests::{
    Nats, WAIT, bin, holds_for, record, start_worker, submit_direct as submit, test_settings,
    wait_for, wait_status, worker_status,
};
use claw_worker::handler::{Context, Handler, Registry};
use claw_worker::memory::Mechanism;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

/// The most intervals `[start, end)` that overlap at any instant.
fn peak_overlap(intervals: &[(OffsetDateTime, OffsetDateTime)]) -> usize {
    let mut edges: Vec<(OffsetDateTime, i32)> =
        intervals.iter().flat_map(|&(start, end)| [(start, 1), (end, -1)]).collect();
    // An end and a start at the same instant do not overlap: ends first.
    edges.sort();
    let (mut now, mut peak) = (0i32, 0i32);
    for (_, step) in edges {
        now += step;
        peak = peak.max(now);
    }
    peak as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_never_runs_more_than_its_total_across_both_classes() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let client = nats.client().await;
    // Each pool could run 3 on its own; together they may run only 3.
    let toml = "name = \"w-total\"\nack_deadline_s = 2.0\nmax_concurrent = 3\n\
         [pools.long]\nmin = 3\nmax = 3\n\
         [programs.nap]\npath = \"/bin/sleep\"\nargs = [\"1\"]\n";
    let mut ids: Vec<TaskId> = Vec::new();
    // Queued before the worker starts, so both pools meet a backlog at once.
    for _ in 0..6 {
        ids.push(submit(&topology, json!({"kind": "sleep", "input": {"seconds": 1}})).await);
        ids.push(submit(&topology, json!({"kind": "exec", "input": {"program": "nap"}})).await);
    }
    let worker = start_worker(&topology, toml);

    // While it works: the status never shows more than the total busy.
    let busiest = &AtomicUsize::new(0);
    let (ids, topology, client) = (&ids, &topology, &client);
    let records: Vec<TaskRecord> =
        wait_for("all twelve tasks to succeed", WAIT * 2, || async move {
            if let Some(s) = worker_status(client, "w-total").await {
                assert_eq!(s.max_concurrent, 3, "{s:?}");
                let by_class: usize = s.pools.values().map(|p| p.busy).sum();
                assert!(s.busy <= 3 && by_class <= 3, "over the total: {s:?}");
                busiest.fetch_max(s.busy, Ordering::Relaxed);
            }
            let mut done = Vec::new();
            for id in ids {
                done.push(record(topology, id.as_str()).await.filter(|r| r.status.is_terminal())?);
            }
            Some(done)
        })
        .await;
    for r in &records {
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
    }
    // Every attempt's record interval lies inside the time it held its slot, so the records'
    // overlap is a lower bound of the slots'; it must reach the total and never pass it.
    let intervals: Vec<_> =
        records.iter().map(|r| (r.started_at.unwrap(), r.finished_at.unwrap())).collect();
    let peak = peak_overlap(&intervals);
    eprintln!("peak overlap {peak}, busiest status {}", busiest.load(Ordering::Relaxed));
    assert_eq!(peak, 3, "{intervals:?}");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_settings_are_refused_at_start_naming_the_key_and_range() {
    let nats = Nats::start();
    let cases = [
        (
            "max_concurrent = 20\n[pools.long]\nmax = 30\n",
            "pools.long.max = 30 is above max_concurrent = 20",
        ),
        ("[pools.long]\nmin = 5\nmax = 3\n", "pools.long.min = 5 is above pools.long.max = 3"),
        ("max_concurrent = 0\n", "max_concurrent = 0 is out of range: allowed 1 to 10000"),
    ];
    for (i, (toml, says)) in cases.into_iter().enumerate() {
        let config = nats.dir.path().join(format!("bad-{i}.toml"));
        std::fs::write(&config, toml).unwrap();
        let child = tokio::process::Command::new(bin("claw-worker"))
            .arg("--config")
            .arg(&config)
            .arg("--nats-url")
            .arg(nats.url())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let out = tokio::time::timeout(WAIT, child.wait_with_output()).await;
        let out = out.unwrap_or_else(|_| panic!("{toml:?}: the worker did not exit")).unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{toml:?} was accepted");
        assert!(text.contains("invalid worker config") && text.contains(says), "{toml:?}: {text}");
    }
}

/// What the hog adds at a time: 8 MiB every 20 ms is 400 MB/s, a burst the watchdog (10 looks a
/// second) must catch within a few chunks.
const CHUNK: usize = 8 << 20;

/// A kind that allocates on purpose. Once the file `input.go` exists it adds a [`CHUNK`] every
/// 20 ms, writing every byte so the memory is resident, and reports what it holds; stopped, it
/// keeps its memory `input.linger_ms` longer (a handler slow to let go), so the test can see
/// the worker not pulling meanwhile. Past 2 GiB it gives up and succeeds: the cap failed.
struct Hog;

impl Handler for Hog {
    fn kind(&self) -> &str {
        "hog"
    }

    fn run<'a>(
        &'a self,
        task: &'a TaskRecord,
        ctx: &'a Context,
    ) -> BoxFuture<'a, Result<Value, TaskError>> {
        async move {
            let go = PathBuf::from(task.input["go"].as_str().unwrap_or_default());
            let linger = Duration::from_millis(task.input["linger_ms"].as_u64().unwrap_or(0));
            let mut held: Vec<Vec<u8>> = Vec::new();
            while held.len() * CHUNK < 2 << 30 {
                if go.exists() {
                    held.push(vec![1u8; CHUNK]);
                    ctx.report_memory((held.len() * CHUNK) as u64);
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                    () = ctx.cancelled() => {
                        tokio::time::sleep(linger).await;
                        let message = format!("stopped holding {} MiB", (held.len() * CHUNK) >> 20);
                        return Err(TaskError::new("stopped", message, true));
                    }
                }
            }
            Ok(json!({"held_mb": (held.len() * CHUNK) >> 20}))
        }
        .boxed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_grows_past_the_memory_cap_fails_with_limit_and_the_worker_serves_on() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let client = nats.client().await;
    // The worker runs in this test process: its cap is what the process has now and 128 MiB
    // more. The cgroup is turned off so the RSS watchdog is tested on any machine.
    let baseline_mb = claw_worker::sizing::rss_bytes() >> 20;
    let cap_mb = (baseline_mb + 128).max(64);
    let toml = format!(
        "name = \"w-memory\"\nack_deadline_s = 2.0\nkill_grace_s = 3.0\n\
         memory_max_mb = {cap_mb}\nmemory_cgroup = false\n"
    );
    let config = claw_worker::Config::from_toml_str(&toml).unwrap();
    let registry = Registry::empty().with(claw_worker::kinds::sleep::Sleep).with(Hog);
    let token = CancellationToken::new();
    let run =
        tokio::spawn(claw_worker::run_with(topology.clone(), config, registry, token.clone()));

    // The hog starts first and waits; a sleep starts after it, so "the one started last" would
    // be the sleep: only the hog's report makes it the largest.
    let go = nats.dir.path().join("go");
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, "hog-1");
    let body = json!({"kind": "hog", "max_attempts": 1,
                      "input": {"go": go, "linger_ms": 1500}});
    let lane = Lane::new(Class::Short, Priority::Normal);
    let js = &topology.js;
    js.publish_with_headers(lane.subject(), h, body.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    wait_status(&topology, "hog-1", Status::Running).await;
    let nap = submit(&topology, json!({"kind": "sleep", "input": {"seconds": 4}})).await;
    wait_status(&topology, &nap, Status::Running).await;
    std::fs::write(&go, "").unwrap();

    // Over the cap: the status says so, and nothing new is pulled while it lasts.
    let over = wait_for("the worker over its memory cap", WAIT, || async {
        worker_status(&client, "w-memory").await.filter(|s| s.memory_over)
    })
    .await;
    assert_eq!((over.memory_cap, over.memory_max_bytes), (Mechanism::RssWatchdog, cap_mb << 20));
    assert!(over.rss_bytes > cap_mb << 20, "{over:?}");
    let late = submit(&topology, json!({"kind": "sleep", "input": {"echo": "late"}})).await;
    let seen_waiting = &AtomicBool::new(false);
    let (topology_ref, client_ref, late_ref) = (&topology, &client, &late);
    holds_for("a task waiting while over the cap", Duration::from_millis(500), || async move {
        let before = worker_status(client_ref, "w-memory").await.is_some_and(|s| s.memory_over);
        let r = record(topology_ref, late_ref.as_str()).await.expect("record");
        let after = worker_status(client_ref, "w-memory").await.is_some_and(|s| s.memory_over);
        if before && after {
            if r.status != Status::Queued {
                return Err(format!("pulled while over the cap: {r:?}"));
            }
            seen_waiting.store(true, Ordering::Relaxed);
        }
        Ok(())
    })
    .await;
    assert!(seen_waiting.load(Ordering::Relaxed), "the over-cap window was never observed");

    // The hog failed with the limit; the sleep beside it and the task that waited did not.
    let r = wait_status(&topology, "hog-1", Status::Failed).await;
    let error = r.error.as_ref().unwrap();
    assert_eq!((r.cause, error.code.as_str(), r.attempt), (Some(Cause::Limit), "limit_memory", 1));
    assert!(error.message.contains(&format!("cap of {cap_mb} MiB")), "{error}");
    let r = wait_status(&topology, &nap, Status::Succeeded).await;
    assert_eq!(r.attempt, 1);
    let r = wait_status(&topology, &late, Status::Succeeded).await;
    assert_eq!(r.result, Some(json!({"slept_s": 0.0, "echo": "late"})));
    let after = worker_status(&client, "w-memory").await.expect("status");
    assert!(!after.memory_over, "{after:?}");
    eprintln!(
        "cap {cap_mb} MiB over a {baseline_mb} MiB baseline; RSS {} MiB when seen over, {} MiB \
         after",
        over.rss_bytes >> 20,
        after.rss_bytes >> 20
    );
    token.cancel();
    run.await.unwrap().unwrap();
}
