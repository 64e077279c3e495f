//! `claw up` as a user runs it: a real `claw` process with its embedded nats-server; a task
//! runs to completion; Ctrl-C stops everything, the nats-server child included. NATS's port
//! 4222 taken (another nats-server, a second `claw up`) is no reason to fail. The embedded
//! server takes no anonymous connection, only its users, whose credentials `claw up` writes
//! into the data directory for this user alone.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use claw_proto::connect::{self, NatsArgs};
use claw_proto::nats_server::{self, NatsServer};
use claw_tests::{TestDir, bin, id_of, post_json, submit_direct, test_settings, wait_for};
use serde_json::{Value, json};

/// A running `claw up` and what its banner said.
struct Up {
    child: Child,
    base: String,
    nats_url: String,
    banner: String,
    data: PathBuf,
    /// Kept open: `claw up` prints more, and a closed pipe would kill it.
    _stdout: BufReader<std::process::ChildStdout>,
}

impl Drop for Up {
    /// SIGTERM first, so that `claw up` stops its nats-server (a SIGKILLed one leaves it
    /// running), and SIGKILL if it has not exited after a while (a test that failed midway).
    fn drop(&mut self) {
        claw_tests::signal(self.child.id(), libc::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `claw up --http <free port> --data <dir>/data` with `args` and reads its banner.
fn claw_up(dir: &TestDir, args: &[&str]) -> Up {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let data = dir.path().join("data");
    let mut child = Command::new(bin("claw"))
        .args(["up", "--http", &format!("127.0.0.1:{port}"), "--data"])
        .arg(&data)
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
    loop {
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "claw up exited: {banner}");
        if let Some(url) = line.trim().strip_prefix("NATS:") {
            nats_url = Some(url.trim().to_owned());
        }
        banner.push_str(&line);
        if line.starts_with("Ctrl-C") {
            break;
        }
    }
    assert!(banner.contains(&format!("http://127.0.0.1:{port}/")), "{banner}");
    let nats_url = nats_url.unwrap_or_else(|| panic!("the banner names the NATS URL: {banner}"));
    let data = data.canonicalize().unwrap();
    Up { child, base: format!("http://127.0.0.1:{port}"), nats_url, banner, data, _stdout: stdout }
}

/// Runs a long-class task through `up` and waits for it to succeed; returns its id.
async fn run_a_task(up: &Up) -> String {
    let http = reqwest::Client::new();
    let spec = json!({"kind": "sleep", "class": "long", "input": {"seconds": 0.2}});
    let id = id_of(&post_json(&http, &format!("{}/v1/tasks", up.base), Some(&spec)).await);
    wait_succeeded(up, &id).await;
    id
}

async fn wait_succeeded(up: &Up, id: &str) {
    let http = reqwest::Client::new();
    wait_for(&format!("task {id} to succeed"), Duration::from_secs(30), || {
        let (http, url) = (http.clone(), format!("{}/v1/tasks/{id}", up.base));
        async move {
            let record: Value = http.get(url).send().await.ok()?.json().await.ok()?;
            (record["status"] == "succeeded").then_some(())
        }
    })
    .await;
}

/// The credentials `claw up` wrote for `role`: its `nats` CLI context file.
fn context(up: &Up, role: &str) -> Value {
    let file = up.data.join("nats").join("context").join(format!("{role}.json"));
    serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap()
}

/// Connects to `up`'s NATS with the credentials of `role` as its context file gives them.
async fn connect_as(up: &Up, role: &str) -> async_nats::Client {
    let context = context(up, role);
    assert_eq!(context["url"], up.nats_url.as_str());
    let mut args = NatsArgs::url(up.nats_url.as_str())
        .with_user(context["user"].as_str().unwrap(), context["password"].as_str().unwrap());
    args.nats_inbox_prefix = context["inbox_prefix"].as_str().map(str::to_owned);
    connect::connect(&args, role).await.unwrap_or_else(|e| panic!("connect as {role}: {e}"))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
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
    let address = up.nats_url.trim_start_matches("nats://");
    assert!(std::net::TcpStream::connect(address).is_err(), "nats-server still running");
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

/// Fails before issue 12's change: the embedded server took anyone's connection, so any local
/// user could read every task and submit as anyone, around the gateway's API tokens.
#[tokio::test]
async fn claw_ups_nats_refuses_strangers_and_takes_the_users_it_wrote_down() {
    let dir = TestDir::new();
    let up = claw_up(&dir, &["--nats-port", "0"]);
    match async_nats::connect(up.nats_url.as_str()).await {
        Err(e) => assert_eq!(
            e.kind(),
            async_nats::ConnectErrorKind::AuthorizationViolation,
            "an anonymous connection: {e}"
        ),
        Ok(_) => panic!("the embedded nats-server took an anonymous connection"),
    }
    // The credentials: for this user only, and named in the banner.
    let nats = up.data.join("nats");
    assert!(up.banner.contains(&nats.join("context").display().to_string()), "{}", up.banner);
    assert_eq!((mode(&up.data), mode(&nats), mode(&nats.join("context"))), (0o700, 0o700, 0o700));
    for file in ["server.conf", "context/operator.json", "context/admin.json"] {
        assert_eq!(mode(&nats.join(file)), 0o600, "{file}");
    }
    // claw up's own services work as their roles: a task goes end to end.
    let id = run_a_task(&up).await;
    // The operator reads it over NATS as the context file says (`nats kv get tasks <id>`) and
    // asks the workers for their status; the admin may do anything.
    let operator = connect_as(&up, "operator").await;
    let kv = connect::jetstream(operator.clone()).get_key_value("tasks").await.unwrap();
    let record: Value = serde_json::from_slice(&kv.get(&id).await.unwrap().unwrap()).unwrap();
    assert_eq!(record["status"], "succeeded");
    let status = operator.request("claw.worker.status", "".into()).await.unwrap();
    assert!(serde_json::from_slice::<Value>(&status.payload).unwrap()["pools"].is_object());
    let admin = connect_as(&up, "admin").await;
    connect::jetstream(admin).get_stream("TASKS").await.unwrap();
    let violations = claw_tests::deploy::violations(&nats.join("nats-server.log"));
    let refused: Vec<_> = violations.iter().filter(|l| l.contains("Permissions")).collect();
    assert!(refused.is_empty(), "the server refused claw up's own services: {refused:?}");
    stop(up).await;

    // The users stay with the data directory: a client configured with a password still
    // connects after a restart, and the task is still there.
    let password = context_password(&dir, "openclaw");
    let up = claw_up(&dir, &["--nats-port", "0"]);
    assert_eq!(context(&up, "openclaw")["password"].as_str(), Some(password.as_str()));
    connect_as(&up, "openclaw").await;
    wait_succeeded(&up, &id).await;
    stop(up).await;
}

fn context_password(dir: &TestDir, role: &str) -> String {
    let file = dir.path().join("data/nats/context").join(format!("{role}.json"));
    let context: Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    context["password"].as_str().unwrap().to_owned()
}

/// A data directory from before `claw up` had users: its JetStream store belongs to the
/// anonymous account. `claw up` moves it to the users' account, so its tasks go on.
#[tokio::test]
async fn claw_up_keeps_the_tasks_of_a_data_directory_from_before_it_had_users() {
    let dir = TestDir::new();
    let nats_dir = dir.path().join("data").join("nats");
    let mut old = NatsServer::start(nats_server::Options::in_dir(&nats_dir)).unwrap();
    let client = connect::connect(&NatsArgs::url(old.url()), "old").await.unwrap();
    let topology =
        claw_proto::topology::ensure(&connect::jetstream(client), &test_settings()).await.unwrap();
    let spec = json!({"kind": "sleep", "input": {"seconds": 0.1}});
    let id = submit_direct(&topology, spec).await;
    drop(topology);
    old.stop(Duration::from_secs(10));

    let up = claw_up(&dir, &["--nats-port", "0"]);
    wait_succeeded(&up, id.as_str()).await;
    stop(up).await;
}
