//! The deployment as shipped, with nothing shortened: nats-server from `nats/server/single.conf`
//! (and from the 3-node `nats/cluster/n*.conf`) with the role users of
//! `nats/accounts/claw.conf`, and `claw-gateway`, `claw-worker`, `claw-archiver` as processes
//! connected as their roles with default settings, as compose.yaml runs them. Tasks start only
//! after the lanes' ack deadline (30 s as shipped) has passed since the worker started, and run
//! for up to 8 s, so anything that only works for a fraction of a deadline (a lease probe the
//! worker may not send, say) fails here. Every task must succeed on its first attempt, and no
//! node may log a permissions violation.

use std::time::Duration;

use async_nats::HeaderMap;
use claw_proto::{Cause, Status, TaskRecord};
use claw_tests::deploy::{GatewayService, Service, Shipped, wait_for_worker};
use claw_tests::{id_of, post_json, role_password, wait_for};
use serde_json::{Value, json};

async fn connect_as(nats: &Shipped, role: &str) -> async_nats::Client {
    let args = claw_proto::connect::NatsArgs::url(nats.url()).with_user(role, &role_password(role));
    claw_proto::connect::connect(&args, role)
        .await
        .unwrap_or_else(|e| panic!("connect as {role}: {e}"))
}

/// Runs the shipped services against `nats` and checks tasks of 0.1, 3 and 8 s end to end.
async fn tasks_succeed_first_time_as_shipped(nats: Shipped) {
    let dir = nats.dir.path();
    let gateway = GatewayService::start(dir, "gateway", &[], &nats.role_env("gateway")).await;
    let mut worker = Service::start(dir, "worker", "claw-worker", &[], &nats.role_env("worker"));
    let db = dir.join("archive.sqlite");
    let mut archiver = Service::start(
        dir,
        "archiver",
        "claw-archiver",
        &["--db", db.to_str().unwrap()],
        &nats.role_env("archiver"),
    );
    let operator = connect_as(&nats, "operator").await;
    wait_for_worker(&operator, &mut worker).await;
    let started = tokio::time::Instant::now();

    // The lanes' deadline is the shipped one, and it passes before any task is submitted.
    let js = claw_proto::connect::jetstream(operator.clone());
    let lanes = js.get_stream_no_info("TASKS").await.expect("TASKS");
    let ack_wait =
        lanes.consumer_info("short-normal").await.expect("lane consumer").config.ack_wait;
    assert_eq!(ack_wait, Duration::from_secs(30), "the ack deadline as shipped");
    // A wait for time itself, not for an event: the failure this test guards against appears
    // only once the worker has run for two thirds of the deadline.
    tokio::time::sleep_until(started + ack_wait + Duration::from_secs(2)).await;
    worker.assert_running();
    archiver.assert_running();

    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for (class, seconds) in
        [("short", 0.1), ("short", 3.0), ("short", 8.0), ("long", 3.0), ("long", 8.0)]
    {
        let spec = json!({"kind": "sleep", "session": "shipped", "class": class,
            "input": {"seconds": seconds}});
        let answer = post_json(&http, &gateway.url("/v1/tasks"), Some(&spec)).await;
        assert_eq!(answer["status"], "queued", "{answer}");
        ids.push(id_of(&answer));
    }
    // A task whose input and result are too large for a record: the object store, as the
    // gateway's and the worker's roles use it.
    let echo = "z".repeat(200_000);
    let spec =
        json!({"kind": "sleep", "session": "shipped", "input": {"seconds": 1, "echo": echo}});
    let answer = post_json(&http, &gateway.url("/v1/tasks"), Some(&spec)).await;
    assert!(answer["input_ref"].is_object(), "{}", answer["error"]);
    let large = id_of(&answer);
    ids.push(large.clone());
    // A NATS-native task, published by the publisher role straight to its lane.
    let publisher = connect_as(&nats, "publisher").await;
    let mut headers = HeaderMap::new();
    let native_id = format!("shipped-native-{}", uuid::Uuid::new_v4().simple());
    headers.insert("Nats-Msg-Id", native_id.as_str());
    let spec = json!({"kind": "sleep", "session": "publisher", "input": {"seconds": 3}});
    claw_proto::connect::jetstream(publisher.clone())
        .publish_with_headers("tasks.short.normal", headers, spec.to_string().into())
        .await
        .expect("publish")
        .await
        .expect("the publisher's task is stored");
    ids.push(native_id);

    for id in &ids {
        let record: TaskRecord =
            wait_for(&format!("task {id} to finish"), Duration::from_secs(60), || {
                let (http, url) = (&http, gateway.url(&format!("/v1/tasks/{id}")));
                async move {
                    let record: TaskRecord = http.get(url).send().await.ok()?.json().await.ok()?;
                    record.status.is_terminal().then_some(record)
                }
            })
            .await;
        assert_eq!(
            (record.status, record.attempt, record.cause),
            (Status::Succeeded, 1, Some(Cause::Worker)),
            "task {id}: {record:?}\nworker log:\n{}",
            worker.log_text()
        );
    }

    // The large result reads back over HTTP, and over NATS as the publisher role (a
    // NATS-native client follows the record's reference into the object store).
    let result: Value =
        claw_tests::get_json(&http, &gateway.url(&format!("/v1/tasks/{large}/result"))).await;
    assert_eq!(result["echo"].as_str().map(str::len), Some(200_000));
    let record: TaskRecord =
        claw_tests::get_json(&http, &gateway.url(&format!("/v1/tasks/{large}"))).await;
    let stored = record.result_ref.expect("the result is stored");
    let pub_js = claw_proto::connect::jetstream(publisher);
    let payloads = claw_proto::payloads::Payloads::open(&pub_js, usize::MAX)
        .await
        .expect("the bucket, as publisher");
    let bytes = payloads.read(&stored).await.expect("the result, as publisher");
    assert_eq!(serde_json::from_slice::<Value>(&bytes).unwrap(), result);

    // History comes from the archiver, as its role.
    let page: Value = wait_for("the archived history", Duration::from_secs(30), || {
        let url = gateway.url("/v1/tasks?session=shipped");
        let http = &http;
        async move {
            let page: Value = http.get(url).send().await.ok()?.json().await.ok()?;
            (page["tasks"].as_array()?.len() == 6).then_some(page)
        }
    })
    .await;
    assert!(page["tasks"].as_array().unwrap().iter().all(|t| t["status"] == "succeeded"), "{page}");

    worker.assert_running();
    archiver.assert_running();
    gateway_running(gateway);
    let violations = nats.violations();
    assert!(violations.is_empty(), "the server refused our services:\n{}", violations.join("\n"));
}

fn gateway_running(mut gateway: GatewayService) {
    gateway.service.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_as_shipped() {
    tasks_succeed_first_time_as_shipped(Shipped::single()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_cluster_as_shipped() {
    tasks_succeed_first_time_as_shipped(Shipped::cluster()).await;
}
