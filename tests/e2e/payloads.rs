//! Inputs and results too large for a record: the gateway stores a large input in the
//! `payloads` object store and the record refers to it; the worker reads it back, stores a
//! large result the same way, and `GET /v1/tasks/{id}/input|result` (or the object store, over
//! NATS) give back exactly the JSON. Sizes over the caps get a clear 413 or a failed task, and
//! nothing is left half-stored.

use claw_proto::payloads::{self, Payloads};
use claw_proto::topology::{self, Topology};
use claw_proto::{Status, TaskRecord};
use claw_tests::{
    Gateway, Nats, WAIT, record, start_worker, stream_messages, test_settings, wait_for,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A `sleep` spec whose input (and so its result, which echoes it) is about `bytes` of JSON.
fn echo_spec(bytes: usize) -> Value {
    json!({"kind": "sleep", "input": {"seconds": 0, "echo": "x".repeat(bytes)}})
}

async fn submit(gw: &Gateway, spec: &Value) -> (StatusCode, Value) {
    let response = reqwest::Client::new()
        .post(gw.url("/v1/tasks"))
        .header("content-type", "application/json")
        .body(spec.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

async fn finished(topo: &Topology, id: &str) -> TaskRecord {
    wait_for(&format!("task {id} to finish"), WAIT, || async {
        record(topo, id).await.filter(|r| r.status.is_terminal())
    })
    .await
}

/// The bytes of `GET /v1/tasks/{id}/<part>`.
async fn fetch(gw: &Gateway, id: &str, part: &str) -> (StatusCode, Vec<u8>) {
    let response = reqwest::get(gw.url(&format!("/v1/tasks/{id}/{part}"))).await.unwrap();
    let status = response.status();
    (status, response.bytes().await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5_mib_input_and_result_go_through_the_object_store_and_read_back_whole() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let gw = Gateway::start(&topo, &[]).await;
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0");
    let spec = echo_spec(5 * 1024 * 1024);
    let (status, answer) = submit(&gw, &spec).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let id = answer["id"].as_str().unwrap().to_owned();
    // The answer and the record are small: the input is referred to, not carried.
    assert_eq!(answer["input"], Value::Null);
    assert_eq!(answer["input_ref"]["name"], format!("{id}/input"));

    let done = finished(&topo, &id).await;
    assert_eq!((done.status, done.attempt), (Status::Succeeded, 1), "{:?}", done.error);
    let stored = done.result_ref.clone().expect("the result is stored");
    assert_eq!(done.result, None);
    assert_eq!(stored.name, format!("{id}/result"));
    assert!(stored.digest.as_deref().is_some_and(|d| d.starts_with("SHA-256=")), "{stored:?}");

    // Over HTTP: exactly the JSON the handler returned and the JSON that was sent.
    let (status, result) = fetch(&gw, &id, "result").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(result.len() as u64, stored.size);
    let result: Value = serde_json::from_slice(&result).unwrap();
    assert_eq!(result["echo"], spec["input"]["echo"]);
    let (status, input) = fetch(&gw, &id, "input").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_slice::<Value>(&input).unwrap(), spec["input"]);

    // Over NATS, as a NATS-native client does: the record's reference, then the object.
    let direct = Payloads::open(&topo.js, payloads::DEFAULT_MAX_BYTES).await.unwrap();
    let bytes = direct.read(&stored).await.unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&bytes).unwrap(), result);
    // The succeeded event says where it is instead of carrying it.
    let events = claw_tests::events_of(&topo.js, &id).await;
    assert!(
        events.iter().any(|e| matches!(&e.body,
            claw_proto::event::EventBody::Status { result_ref: Some(r), result: None, .. }
                if *r == stored)),
        "no succeeded event with the result_ref: {events:?}"
    );
}

/// A body just under the old 1 MiB limit: accepted, its record (larger than the spec) written,
/// and the task runs. Before, the record did not fit the bucket: GET answered 404 forever while
/// the worker retried its create for a week.
#[tokio::test]
async fn a_spec_of_almost_a_mebibyte_is_accepted_and_runs() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let gw = Gateway::start(&topo, &[]).await;
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0");
    let spec = echo_spec(1024 * 1024 - 200);
    assert!(spec.to_string().len() < 1024 * 1024);
    let (status, answer) = submit(&gw, &spec).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let id = answer["id"].as_str().unwrap().to_owned();
    let got = reqwest::get(gw.url(&format!("/v1/tasks/{id}"))).await.unwrap();
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(finished(&topo, &id).await.status, Status::Succeeded);
}

/// An input over the cap is a 413 in our error shape, and nothing is stored: no record, no lane
/// message, no object.
#[tokio::test]
async fn an_input_over_the_cap_is_413_and_leaves_nothing() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let gw = Gateway::start(&topo, &["--payload-max-bytes", "200000"]).await;
    let (status, answer) = submit(&gw, &echo_spec(300_000)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert_eq!(answer["error"]["code"], "payload_too_large", "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("200000"), "{answer}");
    assert_eq!(stream_messages(&topo.js, topology::TASKS_STREAM).await, 0);
    assert_eq!(stream_messages(&topo.js, topology::TASKS_KV_STREAM).await, 0);
    assert_eq!(stream_messages(&topo.js, topology::PAYLOADS_STREAM).await, 0);
}

/// A result over the worker's cap fails the task once, saying why, instead of failing its
/// final write three times.
#[tokio::test]
async fn a_result_over_the_cap_fails_the_task_saying_so() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let gw = Gateway::start(&topo, &[]).await;
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0\npayload_max_bytes = 200000");
    // The 250 KB input is the gateway's to admit (its cap is 64 MiB); the result echoing it is
    // the worker's, over its 200 KB.
    let (status, answer) = submit(&gw, &echo_spec(250_000)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let id = answer["id"].as_str().unwrap().to_owned();
    let done = finished(&topo, &id).await;
    let error = done.error.expect("an error");
    assert_eq!(
        (done.status, done.attempt, error.code.as_str(), error.retryable),
        (Status::Failed, 1, "result_too_large", false)
    );
    assert!(error.message.contains("200000"), "{error:?}");
    assert_eq!(fetch(&gw, &id, "result").await.0, StatusCode::NOT_FOUND);
}

/// A NATS-native publisher's message may carry an input up to the server's message size; the
/// worker stores one over the inline limit as the gateway would, and the task runs.
#[tokio::test]
async fn a_large_nats_native_input_is_stored_by_the_worker() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0");
    let spec = json!({"id": "native-large", "kind": "sleep",
        "input": {"seconds": 0, "echo": "y".repeat(900_000)}});
    topo.js
        .publish("tasks.short.normal", spec.to_string().into())
        .await
        .unwrap()
        .await
        .expect("stored");
    let done = finished(&topo, "native-large").await;
    assert_eq!(done.status, Status::Succeeded, "{:?}", done.error);
    assert_eq!(done.input, Value::Null);
    assert_eq!(done.input_ref.as_ref().map(|r| r.name.as_str()), Some("native-large/input"));
    assert!(done.result_ref.is_some());
}
