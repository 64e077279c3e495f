//! The seed's limits on one worker (issue 10, §5): at most `max_concurrent` attempts at once
//! across both classes, and a configuration whose numbers are out of range refused at start,
//! by the `claw-worker` process, with a sentence that names the key and what is allowed.
//! Tests that start `claw-worker` need `cargo build --bins` first.

use std::sync::atomic::{AtomicUsize, Ordering};

use claw_proto::{Status, TaskId, TaskRecord};
use claw_tests::{
    Nats, WAIT, bin, record, start_worker, submit_direct as submit, test_settings, wait_for,
    worker_status,
};
use serde_json::json;
use time::OffsetDateTime;

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
