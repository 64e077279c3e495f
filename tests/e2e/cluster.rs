//! A 3-node JetStream cluster: the topology with 3 replicas, gateway + workers + archiver on the
//! cluster's URL list, a steady load of HTTP submits while the `TASKS` stream leader is
//! SIGKILLed and later restarted. Every accepted task (202) ends `succeeded` exactly once (one
//! record, one archive row, nothing left in the queue or the DLQ); no submit hangs while there
//! is no leader: each answers within the JetStream request timeout (5 s) plus slack, 503 if it
//! could not be stored.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use claw_proto::Status;
use claw_proto::topology::Settings;
use claw_tests::{Cluster, Gateway, archived_ids, record, start_archiver, start_worker, wait_for};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Longest a submit may take: the 5 s JetStream publish-ack timeout, plus slack for a loaded CI.
const SUBMIT_BOUND: Duration = Duration::from_secs(8);

#[derive(Debug, Default)]
struct Load {
    accepted: Vec<String>,
    unavailable: usize,
    other: Vec<String>,
    slowest: Duration,
}

async fn stream_leader(js: &jetstream::Context, stream: &str) -> Option<String> {
    let mut s = js.get_stream(stream).await.ok()?;
    s.info().await.ok()?.cluster.as_ref()?.leader.clone()
}

/// Whether every replica of `stream` is current (a restarted node has caught up).
async fn replicas_current(js: &jetstream::Context, stream: &str) -> bool {
    let Ok(mut s) = js.get_stream(stream).await else { return false };
    let Ok(info) = s.info().await else { return false };
    info.cluster.as_ref().is_some_and(|c| {
        c.leader.is_some()
            && c.replicas.len() == 2
            && c.replicas.iter().all(|r| r.current && !r.offline)
    })
}

#[tokio::test]
async fn tasks_survive_a_sigkilled_stream_leader() {
    let mut cluster = Cluster::start();
    let settings = Settings { replicas: 3, ack_wait_s: Some(2.0), ..Settings::standard() };
    let topo = cluster.topology(&settings).await;
    let js = topo.js.clone();
    let tasks_info = js.get_stream("TASKS").await.unwrap().info().await.unwrap().clone();
    assert_eq!(tasks_info.config.num_replicas, 3);

    let db = cluster.dir.path().join("archive.sqlite");
    let _archiver = start_archiver(&topo, &db);
    let _w1 = start_worker(&topo, "name = \"w1\"\nack_deadline_s = 2.0\n");
    let _w2 = start_worker(&topo, "name = \"w2\"\nack_deadline_s = 2.0\n");
    let gw = Gateway::start(&topo, &[]).await;

    // Four submitters, each one request at a time with a short pause: a steady load.
    let load = Arc::new(Mutex::new(Load::default()));
    let stop = CancellationToken::new();
    let http = reqwest::Client::builder().timeout(SUBMIT_BOUND * 2).build().unwrap();
    let mut submitters = Vec::new();
    for n in 0..4 {
        let (load, stop, http) = (load.clone(), stop.clone(), http.clone());
        let url = gw.url("/v1/tasks");
        submitters.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.is_cancelled() {
                i += 1;
                let body = json!({"kind": "sleep", "session": format!("load-{n}"),
                                  "input": {"seconds": 0.05, "echo": i}});
                let started = Instant::now();
                let result = match http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await
                {
                    Ok(r) => {
                        let status = r.status();
                        r.json::<Value>().await.map(|v| (status, v)).map_err(|e| e.to_string())
                    }
                    Err(e) => Err(e.to_string()),
                };
                let took = started.elapsed();
                {
                    let mut load = load.lock().unwrap();
                    load.slowest = load.slowest.max(took);
                    match result {
                        Ok((StatusCode::ACCEPTED, v)) => {
                            load.accepted.push(v["id"].as_str().expect("an id").to_owned());
                        }
                        Ok((StatusCode::SERVICE_UNAVAILABLE, _)) => load.unavailable += 1,
                        Ok((status, v)) => load.other.push(format!("{status} after {took:?}: {v}")),
                        Err(e) => load.other.push(format!("{e} after {took:?}")),
                    }
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        }));
    }
    let accepted = || load.lock().unwrap().accepted.len();
    let wait_accepted = |more: usize, what: &'static str| {
        let target = accepted() + more;
        let accepted = &accepted;
        async move {
            wait_for(what, Duration::from_secs(60), || async {
                (accepted() >= target).then_some(())
            })
            .await
        }
    };
    wait_accepted(30, "30 tasks accepted before the kill").await;

    // SIGKILL the node that leads TASKS.
    let leader =
        wait_for("the TASKS leader", Duration::from_secs(20), || stream_leader(&js, "TASKS")).await;
    let victim = cluster.index_of(&leader).unwrap_or_else(|| panic!("unknown leader {leader}"));
    cluster.nodes[victim].kill();
    let killed_at = Instant::now();
    let new_leader = wait_for("a new TASKS leader", Duration::from_secs(60), || async {
        stream_leader(&js, "TASKS").await.filter(|l| *l != leader)
    })
    .await;
    let leaderless = killed_at.elapsed();
    wait_accepted(30, "30 tasks accepted on the new leader").await;

    // Restart it; it catches up and the load goes on.
    cluster.nodes[victim].restart().expect("restart the killed node");
    wait_for("the restarted node to catch up", Duration::from_secs(60), || async {
        replicas_current(&js, "TASKS").await.then_some(())
    })
    .await;
    wait_accepted(30, "30 tasks accepted after the restart").await;
    stop.cancel();
    for s in submitters {
        s.await.unwrap();
    }

    let load = std::mem::take(&mut *load.lock().unwrap());
    eprintln!(
        "cluster: leader {leader} killed, {new_leader} led after {leaderless:?}; {} accepted, \
         {} unavailable, slowest submit {:?}",
        load.accepted.len(),
        load.unavailable,
        load.slowest
    );
    assert!(load.other.is_empty(), "submits answered neither 202 nor 503: {:?}", load.other);
    assert!(load.slowest <= SUBMIT_BOUND, "a submit hung for {:?}", load.slowest);
    if leaderless > Duration::from_secs(2) {
        assert!(load.unavailable > 0, "no submit met the {leaderless:?} without a leader");
    }

    // Every accepted task succeeds, and exactly once: one archive row each, nothing left over.
    let mut ids = load.accepted.clone();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), load.accepted.len(), "an id was accepted twice");
    // One deadline for all: a task still not terminal then is reported with its record.
    let all_done = Instant::now() + Duration::from_secs(60);
    let mut late = Vec::new();
    for id in &ids {
        loop {
            let r = record(&topo, id).await;
            if let Some(r) = r.as_ref().filter(|r| r.status.is_terminal()) {
                assert_eq!(r.status, Status::Succeeded, "task {id}: {r:?}");
                break;
            }
            if Instant::now() > all_done {
                late.push(format!("{id}: {r:?}"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(late.is_empty(), "accepted tasks not done 60 s on: {late:#?}");

    // One archive row per accepted task. A 503 whose publish timed out may still have been
    // stored (the ack was lost with the leader): such a task runs too, as its own row, which is
    // why a client resubmits with an Idempotency-Key. So at most `unavailable` extra rows.
    let accepted: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
    let archive_done = Instant::now() + Duration::from_secs(60);
    let extra = loop {
        let rows = archived_ids(&db).await;
        let missing: Vec<&&str> = accepted.iter().filter(|id| !rows.contains(**id)).collect();
        if missing.is_empty() {
            break rows.len() - accepted.len();
        }
        if Instant::now() > archive_done {
            let kv = js.get_stream("KV_tasks").await.unwrap();
            let state = &kv.cached_info().state;
            panic!("not archived 60 s on: {missing:?}; the bucket's stream: {state:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(extra <= load.unavailable, "{extra} archived tasks were neither accepted nor 503");
    wait_for("the queue to drain", Duration::from_secs(30), || async {
        let mut s = js.get_stream("TASKS").await.ok()?;
        (s.info().await.ok()?.state.messages == 0).then_some(())
    })
    .await;
    let mut dlq = js.get_stream("DLQ").await.unwrap();
    assert_eq!(dlq.info().await.unwrap().state.messages, 0, "nothing was dead-lettered");
}

/// The checked-in cluster and single-node configs parse (`nats-server -t`).
#[test]
fn checked_in_server_configs_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = claw_proto::nats_server::locate().expect("nats-server");
    for file in [
        "nats/server/single.conf",
        "nats/cluster/n1.conf",
        "nats/cluster/n2.conf",
        "nats/cluster/n3.conf",
        "nats/cluster/compose.conf",
    ] {
        let mut cmd = std::process::Command::new(&bin);
        cmd.arg("-c").arg(root.join(file)).arg("-t").env("NATS_SERVER_NAME", "nats-1");
        for role in claw_tests::ROLES {
            cmd.env(format!("CLAW_{}_PASSWORD", role.to_uppercase()), "x");
        }
        let out = cmd.output().expect("run nats-server -t");
        assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
    }
}
