//! `claw up` as a user runs it: a real `claw` process with its embedded nats-server; a task
//! runs to completion; Ctrl-C stops everything, the nats-server child included.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use claw_tests::{TestDir, bin, id_of, post_json, wait_for};
use serde_json::{Value, json};

#[tokio::test]
async fn claw_up_serves_runs_a_task_and_stops_on_ctrl_c() {
    let dir = TestDir::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new(bin("claw"))
        .args(["up", "--nats-port", "0", "--http", &format!("127.0.0.1:{port}"), "--data"])
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    let mut nats_url = None;
    for _ in 0..3 {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        if let Some(url) = line.trim().strip_prefix("NATS:") {
            nats_url = Some(url.trim().to_owned());
        }
        banner.push_str(&line);
    }
    assert!(banner.contains(&format!("http://127.0.0.1:{port}/")), "{banner}");
    let nats_url = nats_url.expect("the banner names the NATS URL");

    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let spec = json!({"kind": "sleep", "class": "long", "input": {"seconds": 0.2}});
    let id = id_of(&post_json(&http, &format!("{base}/v1/tasks"), Some(&spec)).await);
    wait_for("the long task to succeed", Duration::from_secs(30), || {
        let (http, url) = (http.clone(), format!("{base}/v1/tasks/{id}"));
        async move {
            let record: Value = http.get(url).send().await.ok()?.json().await.ok()?;
            (record["status"] == "succeeded").then_some(())
        }
    })
    .await;

    claw_tests::signal(child.id(), libc::SIGINT);
    let status = wait_for("claw up to exit", Duration::from_secs(60), || {
        let status = child.try_wait().unwrap();
        async move { status }
    })
    .await;
    assert!(status.success(), "{status:?}");
    assert!(async_nats::connect(nats_url.as_str()).await.is_err(), "nats-server still running");
}
