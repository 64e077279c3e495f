//! The gateway on its own, against a real nats-server: validation, limits, idempotency,
//! queue full, NATS down. No worker runs, so every accepted task stays queued.

use std::time::{Duration, Instant};

use claw_proto::topology::{self, Settings};
use claw_tests::{Gateway, Nats, record_count, stream_messages, test_settings};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn post(gw: &Gateway, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
    let response = reqwest::Client::new()
        .post(gw.url("/v1/tasks"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("gateway answers");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn bad_input_gets_the_right_4xx_and_stores_nothing() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let gw = Gateway::start(&topo, &["--body-limit", "4096"]).await;

    // (what, body, expected status, expected code, expected field)
    type Case = (&'static str, Vec<u8>, StatusCode, &'static str, Option<&'static str>);
    let cases: Vec<Case> = vec![
        ("malformed", b"{\"kind\": ".to_vec(), StatusCode::BAD_REQUEST, "malformed_json", None),
        ("empty", Vec::new(), StatusCode::BAD_REQUEST, "malformed_json", None),
        (
            "unknown kind",
            br#"{"kind": "teleport"}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            Some("kind"),
        ),
        (
            "wrong type",
            br#"{"kind": "sleep", "max_attempts": "three"}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            Some("max_attempts"),
        ),
        (
            "wrong input type",
            br#"{"kind": "sleep", "input": {"seconds": "long"}}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            Some("input.seconds"),
        ),
        (
            "bad priority",
            br#"{"kind": "sleep", "priority": 12}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            Some("priority"),
        ),
        (
            "oversized",
            json!({"kind": "sleep", "input": {"echo": "x".repeat(5000)}}).to_string().into_bytes(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            None,
        ),
    ];
    for (name, body, status, code, field) in cases {
        let (got, body) = post(&gw, body).await;
        assert_eq!(got, status, "{name}: {body}");
        assert_eq!(body["error"]["code"], code, "{name}: {body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{name}");
        assert_eq!(body["error"]["field"].as_str(), field, "{name}: {body}");
    }
    assert_eq!(stream_messages(&topo.js, topology::TASKS_STREAM).await, 0);
    assert_eq!(record_count(&topo).await, 0);
}

#[tokio::test]
async fn accepted_task_is_stored_queued_with_its_lane() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let gw = Gateway::start(&topo, &[]).await;

    // The caller's trace context travels with the task to the worker.
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = reqwest::Client::new()
        .post(gw.url("/v1/tasks"))
        .header("traceparent", trace)
        .header("content-type", "application/json")
        .body(json!({"kind": "sleep", "input": {"seconds": 1}, "priority": 9}).to_string())
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"], "queued");
    assert_eq!((body["class"].as_str(), body["priority"].as_str()), (Some("short"), Some("high")));
    let id = body["id"].as_str().unwrap();

    let mut lane = topo.js.get_stream(topology::TASKS_STREAM).await.unwrap();
    let msg = lane.get_last_raw_message_by_subject("tasks.short.high").await.unwrap();
    let spec: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(spec["id"], id);
    let carried = msg.headers.get("traceparent").expect("traceparent on the task message");
    let carried = claw_proto::trace::TraceParent::parse(carried.as_str()).unwrap();
    assert_eq!(carried.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(carried.parent_id, "00f067aa0ba902b7", "a child span, not the caller's");
    let _ = lane.info().await;

    let record = reqwest::get(gw.url(&format!("/v1/tasks/{id}"))).await.unwrap();
    assert_eq!(record.status(), StatusCode::OK);
    let record: Value = record.json().await.unwrap();
    assert_eq!(record["status"], "queued");
}

#[tokio::test]
async fn idempotency_key_returns_the_same_task() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let gw = Gateway::start(&topo, &[]).await;
    let client = reqwest::Client::new();
    let submit = || {
        client
            .post(gw.url("/v1/tasks"))
            .header("idempotency-key", "order-42")
            .header("content-type", "application/json")
            .body(json!({"kind": "sleep"}).to_string())
            .send()
    };
    let first = submit().await.unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first: Value = first.json().await.unwrap();
    let second = submit().await.unwrap();
    assert_eq!(second.status(), StatusCode::OK);
    let second: Value = second.json().await.unwrap();
    assert_eq!(first["id"], second["id"]);
    assert_eq!(stream_messages(&topo.js, topology::TASKS_STREAM).await, 1);
    assert_eq!(record_count(&topo).await, 1);
}

#[tokio::test]
async fn full_queue_gets_429_and_leaves_nothing_behind() {
    let nats = Nats::start();
    let topo = nats.topology(&Settings { queue_max: 3, ..test_settings() }).await;
    let gw = Gateway::start(&topo, &["--retry-after-s", "7"]).await;
    for _ in 0..3 {
        let (status, body) = post(&gw, json!({"kind": "sleep"}).to_string()).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let response = reqwest::Client::new()
        .post(gw.url("/v1/tasks"))
        .header("content-type", "application/json")
        .body(json!({"kind": "sleep"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "7");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "queue_full");
    assert_eq!(stream_messages(&topo.js, topology::TASKS_STREAM).await, 3);
    assert_eq!(record_count(&topo).await, 3);
    let kv = stream_messages(&topo.js, topology::TASKS_KV_STREAM).await;
    assert_eq!(kv, 3, "the refused task's record was removed, not just marked deleted");
}

#[tokio::test]
async fn nats_down_answers_503_quickly() {
    let mut nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let gw = Gateway::start(&topo, &[]).await;
    nats.server.kill();
    // The client notices the closed socket at once; the gateway then refuses without waiting.
    let client = topo.js.client();
    claw_tests::wait_for("client to see the server gone", Duration::from_secs(10), || async {
        (client.connection_state() != async_nats::connection::State::Connected).then_some(())
    })
    .await;
    let started = Instant::now();
    let (status, body) = post(&gw, json!({"kind": "sleep"}).to_string()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    let ready = reqwest::get(gw.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let health = reqwest::get(gw.url("/healthz")).await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

#[tokio::test]
async fn submit_over_nats_request_reply_uses_the_same_path() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let _gw = Gateway::start(&topo, &[]).await;
    let client = nats.client().await;
    let reply = claw_tests::wait_for("claw.api.submit to answer", Duration::from_secs(10), || {
        let client = client.clone();
        async move {
            client
                .request(
                    "claw.api.submit",
                    json!({"kind": "sleep", "session": "s1"}).to_string().into(),
                )
                .await
                .ok()
        }
    })
    .await;
    let record: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(record["status"], "queued");
    assert_eq!(record["session"], "s1");
    let id = record["id"].as_str().unwrap().to_owned();

    let got = client.request("claw.api.get", id.clone().into()).await.unwrap();
    let got: Value = serde_json::from_slice(&got.payload).unwrap();
    assert_eq!(got["id"], id.as_str());

    let bad = client.request("claw.api.submit", "{oops".into()).await.unwrap();
    let headers = bad.headers.as_ref().expect("error headers");
    assert_eq!(headers.get("Nats-Service-Error-Code").unwrap().as_str(), "400");
    let body: Value = serde_json::from_slice(&bad.payload).unwrap();
    assert_eq!(body["error"]["code"], "malformed_json");

    // Issue 12: an error message quoting the caller's text (here an unknown field's name) goes
    // into a header; line breaks in it must not end the header and start one of the caller's.
    let forged = r#"{"kind": "sleep", "x\r\nNats-Service-Error-Code: 200\r\nInjected: yes": 1}"#;
    let bad = client.request("claw.api.submit", forged.into()).await.unwrap();
    let headers = bad.headers.as_ref().expect("error headers");
    assert_eq!(headers.get("Injected"), None, "{headers:?}");
    let codes: Vec<_> = headers.get_all("Nats-Service-Error-Code").map(|v| v.as_str()).collect();
    assert_eq!(codes, ["422"], "{headers:?}");
    let message = headers.get("Nats-Service-Error").unwrap().as_str();
    assert!(!message.contains(['\r', '\n']) && message.contains("Injected: yes"), "{message:?}");
    let body: Value = serde_json::from_slice(&bad.payload).unwrap();
    assert_eq!(body["error"]["code"], "invalid_request", "the body keeps the whole message");
}

/// A keyed submit whose gateway died between the record's create and the lane publish leaves a
/// `queued` record with no message. A repeat with the same `Idempotency-Key` answers with that
/// task and publishes its message (JetStream's duplicate window would drop it had the first
/// publish landed), so the task runs instead of waiting forever.
#[tokio::test]
async fn a_repeat_of_an_orphaned_keyed_submit_queues_its_task() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let gw = Gateway::start(&topo, &[]).await;
    let spec = json!({"kind": "sleep", "input": {"seconds": 0}});
    // What submit_once wrote before its gateway died: the claimed record, no lane message.
    let id = claw_proto::TaskId::derived("idempotency-key", "orphan-1");
    let orphan = claw_tests::admit(spec.clone(), &id);
    topo.records.create(&orphan).await.unwrap();
    assert_eq!(stream_messages(&topo.js, topology::TASKS_STREAM).await, 0);

    let repeat = || async {
        let response = reqwest::Client::new()
            .post(gw.url("/v1/tasks"))
            .header("Idempotency-Key", "orphan-1")
            .header("content-type", "application/json")
            .body(spec.to_string())
            .send()
            .await
            .unwrap();
        (response.status(), response.json::<Value>().await.unwrap())
    };
    let (status, body) = repeat().await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["id"], id.as_str());
    assert_eq!(stream_messages(&topo.js, topology::TASKS_STREAM).await, 1, "its message is queued");
    // A second repeat within the duplicate window stores nothing more.
    assert_eq!(repeat().await.0, StatusCode::OK);
    assert_eq!(stream_messages(&topo.js, topology::TASKS_STREAM).await, 1, "deduplicated");
    let _worker = claw_tests::start_worker(&topo, "ack_deadline_s = 2.0");
    claw_tests::wait_status(&topo, &id, claw_proto::Status::Succeeded).await;
}

/// Issue 12, "browser-facing defaults": without tokens, a page of another site (a cross-site
/// request, CSRF) or a page whose name was pointed at the gateway (DNS rebinding) cannot use the
/// gateway; the web UI's own origin and programs (no `Origin`) can, and probes answer any name.
#[tokio::test]
async fn pages_of_other_origins_and_rebound_names_are_refused() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let gw = Gateway::start(&topo, &["--allowed-host", "claw.internal"]).await;
    let port = gw.url.rsplit(':').next().unwrap().to_owned();
    let http = reqwest::Client::new();
    let spec = json!({"kind": "sleep"}).to_string();
    let submit = |origin: Option<&str>, host: Option<String>| {
        let mut request = http
            .post(gw.url("/v1/tasks"))
            .header("content-type", "application/json")
            .body(spec.clone());
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        if let Some(host) = host {
            request = request.header("host", host);
        }
        request.send()
    };
    let refused = |response: reqwest::Response| async move {
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "forbidden", "{body}");
    };

    // A cross-site request carries the page's origin: refused, nothing stored.
    refused(submit(Some("https://evil.example"), None).await.unwrap()).await;
    refused(submit(Some("null"), None).await.unwrap()).await;
    assert_eq!(record_count(&topo).await, 0);
    // DNS rebinding: the page's origin and the Host agree, and are not the gateway's.
    let rebound = format!("evil.example:{port}");
    refused(submit(Some(&format!("http://{rebound}")), Some(rebound.clone())).await.unwrap()).await;
    let read = http.get(gw.url("/v1/tasks")).header("host", &rebound).send().await.unwrap();
    refused(read).await;
    let page = http.get(gw.url("/")).header("host", &rebound).send().await.unwrap();
    refused(page).await;
    assert_eq!(record_count(&topo).await, 0);

    // The UI's own origin (by address, by localhost, by a listed name), and programs, pass.
    let own = gw.url.clone();
    assert_eq!(submit(Some(&own), None).await.unwrap().status(), StatusCode::ACCEPTED);
    let local = format!("localhost:{port}");
    let by_name = submit(Some(&format!("http://{local}")), Some(local)).await.unwrap();
    assert_eq!(by_name.status(), StatusCode::ACCEPTED);
    let listed = submit(Some("https://claw.internal"), Some("claw.internal".into())).await;
    assert_eq!(listed.unwrap().status(), StatusCode::ACCEPTED);
    assert_eq!(submit(None, None).await.unwrap().status(), StatusCode::ACCEPTED);
    // Probes go by address, whatever name they use.
    let probe = http.get(gw.url("/readyz")).header("host", &rebound).send().await.unwrap();
    assert_eq!(probe.status(), StatusCode::OK);
}

/// What a page of another site may send without a CORS preflight (a form, `text/plain`) is
/// refused with 415 before anything is read, whatever its `Origin` says; JSON passes.
#[tokio::test]
async fn bodies_a_page_may_send_without_a_preflight_are_refused() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let gw = Gateway::start(&topo, &[]).await;
    let http = reqwest::Client::new();
    let spec = json!({"kind": "sleep"}).to_string();
    let send = |path: &str, content_type: Option<&str>, body: Option<&str>| {
        let mut request = http.post(gw.url(path));
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        if let Some(body) = body {
            request = request.body(body.to_owned());
        }
        request.send()
    };
    let refused = |response: reqwest::Response| async move {
        assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unsupported_media_type", "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("application/json"), "{body}");
    };
    refused(send("/v1/tasks", Some("text/plain"), Some(&spec)).await.unwrap()).await;
    refused(
        send("/v1/tasks", Some("application/x-www-form-urlencoded"), Some(&spec)).await.unwrap(),
    )
    .await;
    refused(send("/v1/tasks", None, Some(&spec)).await.unwrap()).await;
    assert_eq!(record_count(&topo).await, 0);

    let json_type = Some("application/json; charset=utf-8");
    let accepted = send("/v1/tasks", json_type, Some(&spec)).await.unwrap();
    assert_eq!(accepted.status(), StatusCode::ACCEPTED);
    let id = accepted.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    // A form that cancels: refused, the task still queued. Without a body a verb needs no type.
    let cancel = format!("/v1/tasks/{id}/cancel");
    let form = Some("application/x-www-form-urlencoded");
    refused(send(&cancel, form, Some("")).await.unwrap()).await;
    let record: Value =
        http.get(gw.url(&format!("/v1/tasks/{id}"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(record["status"], "queued", "{record}");
    let cancelled = send(&cancel, None, None).await.unwrap();
    assert_eq!(cancelled.status(), StatusCode::OK);
}
