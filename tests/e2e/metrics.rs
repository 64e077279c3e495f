//! `/metrics`: the gateway's exposition shows the gateway's, the worker's and the archiver's
//! metrics when they share a process (as in `claw up`), and a standalone `claw-worker --metrics`
//! serves its own.

use std::time::Duration;

use claw_proto::Status;
use claw_tests::{
    Gateway, Nats, TestDir, bin, start_archiver, start_worker, test_settings, wait_for, wait_status,
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

/// The value of the sample `name{labels}` (labels exactly as rendered, sorted by the exporter),
/// or of `name` without labels when `labels` is empty.
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let key = if labels.is_empty() { name.to_owned() } else { format!("{name}{{{labels}}}") };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(&key)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn scrape(url: &str) -> Option<String> {
    let response = reqwest::get(url).await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.text().await.ok()
}

async fn submit(gw: &Gateway, spec: Value) -> String {
    let response = reqwest::Client::new()
        .post(gw.url("/v1/tasks"))
        .json(&spec)
        .send()
        .await
        .expect("gateway answers");
    assert!(response.status().is_success(), "{}", response.status());
    let body: Value = response.json().await.expect("json");
    body["id"].as_str().expect("an id").to_owned()
}

#[tokio::test]
async fn gateway_metrics_show_all_three_services() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let dir = TestDir::new();
    let gw = Gateway::start(&topo, &[]).await;
    let _worker = start_worker(
        &topo,
        "name = \"w-metrics\"\nack_deadline_s = 2.0\n[retry]\ninitial_ms = 50\njitter = 0.0\n",
    );
    let _archiver = start_archiver(&topo, &dir.path().join("archive.db"));

    let ok = submit(&gw, json!({"kind": "sleep", "input": {"seconds": 0.0}})).await;
    let doomed =
        submit(&gw, json!({"kind": "sleep", "max_attempts": 2, "input": {"fail_attempts": 99}}))
            .await;
    wait_status(&topo, &ok, Status::Succeeded).await;
    wait_status(&topo, &doomed, Status::Failed).await;

    // Counters are process-wide and other tests share the process: check lower bounds.
    let url = gw.url("/metrics");
    let text = wait_for("the outcomes and the archived rows in /metrics", WAIT, || async {
        let text = scrape(&url).await?;
        let count = |name, labels| sample(&text, name, labels).unwrap_or(0.0);
        let done = count("claw_worker_outcomes_total", "class=\"short\",outcome=\"succeeded\"");
        let retried = count("claw_worker_outcomes_total", "class=\"short\",outcome=\"retry\"");
        let failed = count("claw_worker_outcomes_total", "class=\"short\",outcome=\"failed\"");
        let rows = count("claw_archiver_rows_written_total", "");
        (done >= 1.0 && retried >= 1.0 && failed >= 1.0 && rows >= 2.0).then_some(text)
    })
    .await;
    let at_least = |name: &str, labels: &str, min: f64| {
        let value = sample(&text, name, labels);
        assert!(value.is_some_and(|v| v >= min), "{name}{{{labels}}} = {value:?}\n{text}");
    };

    // Gateway: submits, their latency, and every lane's gauges.
    at_least("claw_gateway_submits_total", "outcome=\"created\"", 2.0);
    at_least("claw_gateway_submit_seconds_count", "", 2.0);
    for class in ["short", "long"] {
        for priority in ["high", "normal", "low"] {
            let labels = format!("class=\"{class}\",priority=\"{priority}\"");
            for gauge in ["claw_gateway_lane_depth", "claw_gateway_lane_in_flight"] {
                at_least(gauge, &labels, 0.0);
            }
            assert_eq!(sample(&text, "claw_gateway_lane_paused", &labels), Some(0.0), "{text}");
        }
    }
    // Worker: 1 + 2 attempts, the second a redelivery (its attempt number is the delivery
    // count); the doomed task dead-lettered for running out of attempts.
    at_least("claw_worker_attempts_total", "class=\"short\"", 3.0);
    at_least("claw_worker_redeliveries_total", "class=\"short\"", 1.0);
    at_least("claw_worker_retries_total", "class=\"short\"", 1.0);
    at_least("claw_worker_dead_letters_total", "reason=\"max_attempts\"", 1.0);
    at_least("claw_worker_attempt_seconds_count", "class=\"short\"", 3.0);
    at_least("claw_worker_pool_size", "class=\"short\"", 1.0);
    at_least("claw_worker_pool_max", "class=\"short\"", 1.0);
    at_least("claw_worker_pool_busy", "class=\"short\"", 0.0);
    at_least("claw_worker_pool_backlog", "class=\"short\"", 0.0);
    at_least("claw_worker_rss_bytes", "", 1.0);
    // Archiver: the lag is a gauge (0 once caught up), commits are timed.
    at_least("claw_archiver_lag", "", 0.0);
    at_least("claw_archiver_commit_seconds_count", "", 1.0);
}

#[tokio::test]
async fn standalone_worker_serves_its_own_metrics() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let child = std::process::Command::new(bin("claw-worker"))
        .args(["--nats-url", &nats.url(), "--metrics", &addr])
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn claw-worker");
    let _kill = Kill(child);

    let id =
        claw_tests::submit_direct(&topo, json!({"kind": "sleep", "input": {"seconds": 0.0}})).await;
    wait_status(&topo, id.as_str(), Status::Succeeded).await;
    let url = format!("http://{addr}/metrics");
    let text = wait_for("the worker's own /metrics to count the attempt", WAIT, || async {
        let text = scrape(&url).await?;
        let done =
            sample(&text, "claw_worker_outcomes_total", "class=\"short\",outcome=\"succeeded\"");
        (done == Some(1.0)).then_some(text)
    })
    .await;
    assert_eq!(sample(&text, "claw_worker_attempts_total", "class=\"short\""), Some(1.0), "{text}");
    for class in ["short", "long"] {
        let size = sample(&text, "claw_worker_pool_size", &format!("class=\"{class}\""));
        assert!(size.is_some_and(|s| s >= 1.0), "{class}: {size:?}\n{text}");
    }
    assert!(sample(&text, "claw_worker_rss_bytes", "").is_some_and(|r| r > 0.0), "{text}");
    // Only the worker records in its process.
    assert!(!text.contains("claw_gateway_"), "{text}");
    assert!(!text.contains("claw_archiver_"), "{text}");
}

#[tokio::test]
async fn standalone_archiver_serves_its_lag() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let dir = TestDir::new();
    let addr = format!("127.0.0.1:{}", free_port());
    let db = dir.path().join("archive.db");
    let child = std::process::Command::new(bin("claw-archiver"))
        .args(["--nats-url", &nats.url(), "--metrics", &addr, "--db"])
        .arg(&db)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn claw-archiver");
    let _kill = Kill(child);

    // A finished record written straight to the bucket, as a worker would.
    let id = claw_tests::submit_direct(&topo, json!({"kind": "sleep"})).await;
    let mut record = claw_tests::record(&topo, id.as_str()).await.expect("the record");
    let now = time::OffsetDateTime::now_utc();
    record.start(1, "w", now).expect("start");
    record.succeed(json!(null), now).expect("succeed");
    let body = serde_json::to_vec(&record).expect("json");
    topo.tasks_kv.put(id.as_str(), body.into()).await.expect("put");

    let url = format!("http://{addr}/metrics");
    let text = wait_for("the archiver's own /metrics to count the row", WAIT, || async {
        let text = scrape(&url).await?;
        let rows = sample(&text, "claw_archiver_rows_written_total", "");
        (rows == Some(1.0) && sample(&text, "claw_archiver_lag", "") == Some(0.0)).then_some(text)
    })
    .await;
    assert!(sample(&text, "claw_archiver_commit_seconds_count", "").is_some(), "{text}");
    assert!(!text.contains("claw_worker_"), "{text}");
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("local addr").port()
}

/// Kills and reaps a child process when dropped.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
