//! `claw up` as a user runs it: a real `claw` process with its embedded nats-server; a task
//! runs to completion; Ctrl-C stops everything, the nats-server child included. NATS's port
//! 4222 taken (another nats-server, a second `claw up`) is no reason to fail.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use claw_tests::{TestDir, bin, id_of, post_json, wait_for};
use serde_json::{Value, json};

/// A running `claw up` and what its banner said.
struct Up {
    child: Child,
    base: String,
    nats_url: String,
    /// Kept open: `claw up` prints more, and a closed pipe would kill it.
    _stdout: BufReader<std::process::ChildStdout>,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `claw up --http <free port> --data <dir>/data` with `args` and reads its banner.
fn claw_up(dir: &TestDir, args: &[&str]) -> Up {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new(bin("claw"))
        .args(["up", "--http", &format!("127.0.0.1:{port}"), "--data"])
        .arg(dir.path().join("data"))
        .args(args)
        .env_remove("CLAW_NATS_PORT")
        .env_remove("NATS_URL")
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
    let nats_url = nats_url.unwrap_or_else(|| panic!("the banner names the NATS URL: {banner}"));
    Up { child, base: format!("http://127.0.0.1:{port}"), nats_url, _stdout: stdout }
}

/// Runs a long-class task through `up` and waits for it to succeed.
async fn run_a_task(up: &Up) {
    let http = reqwest::Client::new();
    let spec = json!({"kind": "sleep", "class": "long", "input": {"seconds": 0.2}});
    let id = id_of(&post_json(&http, &format!("{}/v1/tasks", up.base), Some(&spec)).await);
    wait_for("the long task to succeed", Duration::from_secs(30), || {
        let (http, url) = (http.clone(), format!("{}/v1/tasks/{id}", up.base));
        async move {
            let record: Value = http.get(url).send().await.ok()?.json().await.ok()?;
            (record["status"] == "succeeded").then_some(())
        }
    })
    .await;
}

/// Ctrl-C, then `claw up` exits cleanly and its nats-server is gone.
async fn stop(mut up: Up) {
    claw_tests::signal(up.child.id(), libc::SIGINT);
    let status = wait_for("claw up to exit", Duration::from_secs(60), || {
        let status = up.child.try_wait().unwrap();
        async move { status }
    })
    .await;
    assert!(status.success(), "{status:?}");
    assert!(async_nats::connect(up.nats_url.as_str()).await.is_err(), "nats-server still running");
}

#[tokio::test]
async fn claw_up_serves_runs_a_task_and_stops_on_ctrl_c() {
    let dir = TestDir::new();
    let up = claw_up(&dir, &["--nats-port", "0"]);
    run_a_task(&up).await;
    stop(up).await;
}

#[tokio::test]
async fn claw_up_takes_a_free_nats_port_when_4222_is_taken() {
    let dir = TestDir::new();
    // Held here for the test; if something else holds it already, it is just as taken.
    let _held = std::net::TcpListener::bind("127.0.0.1:4222");
    let up = claw_up(&dir, &[]);
    assert!(up.nats_url.starts_with("nats://127.0.0.1:"), "{}", up.nats_url);
    assert!(!up.nats_url.ends_with(":4222"), "{}", up.nats_url);
    run_a_task(&up).await;
    stop(up).await;
}

#[tokio::test]
async fn claw_up_says_why_the_port_it_was_given_cannot_be_used() {
    let dir = TestDir::new();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    let out = Command::new(bin("claw"))
        .args(["up", "--http", "127.0.0.1:0", "--nats-port", &port, "--data"])
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("starting the embedded nats-server"), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(stderr.contains("address already in use"), "{stderr}");
}
