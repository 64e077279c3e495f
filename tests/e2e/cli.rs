//! The `claw` client verbs as a user runs them: the built `claw` binary as a real process
//! against a gateway, worker and archiver (in-process) on a real nats-server, over the
//! gateway's HTTP API and straight over NATS. Checks what is printed, the one-line errors on
//! stderr and the exit codes.

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use claw_proto::topology;
use claw_tests::{
    Gateway, Nats, Running, bin, start_archiver, start_worker, test_settings, wait_for,
};
use serde_json::Value;

/// Everything a client verb talks to.
struct Stack {
    nats: Nats,
    gw: Gateway,
    _worker: Running,
    _archiver: Running,
}

async fn stack(worker_toml: &str) -> Stack {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let db = nats.dir.path().join("archive.sqlite");
    let _archiver = start_archiver(&topo, &db);
    let _worker = start_worker(&topo, worker_toml);
    let gw = Gateway::start(&topo, &[]).await;
    // Every verb must meet a stack that answers: the archiver's and the gateway's services
    // registered, the HTTP listener serving.
    let client = nats.client().await;
    wait_for("the archiver and the gateway to answer", Duration::from_secs(20), || async {
        client.request(topology::ARCHIVE_LIST, "{}".into()).await.ok()?;
        client.request(topology::api_subject("get"), "x".into()).await.ok()?;
        let ready = reqwest::get(gw.url("/readyz")).await.ok()?;
        ready.status().is_success().then_some(())
    })
    .await;
    Stack { nats, gw, _worker, _archiver }
}

const WORKER: &str = "ack_deadline_s = 2.0\n";
/// No verb here should take long; a hung `claw` fails the test instead of hanging it.
const CLAW_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Output {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {self:?}"))
    }

    /// The error line: stderr must be exactly one line.
    fn error_line(&self) -> &str {
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one line on stderr: {self:?}");
        lines[0]
    }
}

fn command(args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(bin("claw"));
    command
        .args(args)
        // The user's environment must not pick the backend or add logs.
        .env_remove("CLAW_URL")
        .env_remove("NATS_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Runs `claw args...` to completion.
async fn claw(args: &[&str]) -> Output {
    let child = command(args).spawn().expect("spawn claw");
    let out = tokio::time::timeout(CLAW_DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("claw {args:?} did not finish within {CLAW_DEADLINE:?}"))
        .expect("claw output");
    Output {
        code: out.status.code().expect("claw exited, not killed by a signal"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `claw` against the gateway's HTTP API.
async fn http(gw: &Gateway, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend(["--url", gw.url.as_str()]);
    claw(&all).await
}

/// `claw` straight over NATS.
async fn nats(nats: &Nats, args: &[&str]) -> Output {
    let url = nats.url();
    let mut all = args.to_vec();
    all.extend(["--nats-url", url.as_str()]);
    claw(&all).await
}

/// Waits until `claw ls --json ...` lists task `id` (the archiver writes it once it is over).
async fn listed(run: impl AsyncFn(&[&str]) -> Output, session: &str, id: &str) -> Value {
    wait_for("the task in `claw ls`", Duration::from_secs(20), || async {
        let out = run(&["ls", "--session", session, "--json"]).await;
        let page = (out.code == 0).then(|| out.json())?;
        page["tasks"].as_array()?.iter().find(|t| t["id"] == id).cloned()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_watch_get_and_ls_over_http() {
    let s = stack(WORKER).await;
    let out = http(
        &s.gw,
        &["submit", "sleep", "--input", r#"{"seconds":1,"steps":4}"#, "--session", "cli-http"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let first = out.stdout.trim();
    assert!(uuid::Uuid::parse_str(first).is_ok(), "submit prints the id: {out:?}");

    let out = http(
        &s.gw,
        &[
            "submit",
            "sleep",
            "--input",
            r#"{"seconds":1,"steps":4}"#,
            "--session",
            "cli-http",
            "--watch",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stderr, "", "{out:?}");
    let id = out.stdout.lines().next().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "the id comes first: {out:?}");
    // Piped, the watch prints a line per change: steps with their percentage, then the outcome.
    assert!(out.stdout.contains("% step "), "progress lines: {out:?}");
    assert!(out.stdout.contains("running (attempt 1"), "{out:?}");
    let last = out.stdout.lines().rev().find(|l| !l.starts_with("result:")).unwrap();
    assert!(last.starts_with("succeeded"), "ends with the outcome: {out:?}");
    assert!(out.stdout.contains("result: {") && out.stdout.contains("\"slept_s\":1.0"), "{out:?}");

    let out = http(&s.gw, &["get", &id, "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let record = out.json();
    assert_eq!((record["id"].as_str(), record["status"].as_str()), (Some(&*id), Some("succeeded")));
    assert_eq!(record["progress"]["message"], "step 4/4");

    let out = http(&s.gw, &["get", &id]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("succeeded (worker)"), "{out:?}");
    assert!(out.stdout.contains("100% step 4/4"), "{out:?}");

    let row = listed(async |args: &[&str]| http(&s.gw, args).await, "cli-http", &id).await;
    assert_eq!(row["status"], "succeeded");
    let out = http(&s.gw, &["ls", "--session", "cli-http"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let mut lines = out.stdout.lines();
    let header = lines.next().unwrap();
    for column in ["ID", "STATUS", "KIND", "SESSION", "ATTEMPT", "CREATED", "FINISHED"] {
        assert!(header.contains(column), "{out:?}");
    }
    let row = lines.find(|l| l.starts_with(id.as_str())).expect("a row for the task");
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[1..5], ["succeeded", "sleep", "cli-http", "1/3"], "{out:?}");
}

/// Over NATS the watch replays the task's events from the stream, so it sees every step and
/// the program's streamed output even when it starts after they happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_get_watch_and_ls_over_nats() {
    let dir = claw_tests::TestDir::new();
    let script = dir.path().join("talk.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho 'hello from the task'\necho '{\"progress\": 0.5, \"message\": \"half\"}'\n\
         sleep 0.3\necho 'second line'\necho '{\"result\": {\"said\": 2}}'\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let toml = format!("ack_deadline_s = 2.0\n[programs.talk]\npath = {script:?}\n");
    let s = stack(&toml).await;

    let out = nats(&s.nats, &["submit", "sleep", "--input", r#"{"seconds":0.4,"steps":2}"#]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let id = out.stdout.trim().to_owned();
    let out = nats(&s.nats, &["watch", &id]).await;
    assert_eq!(out.code, 0, "{out:?}");
    for expected in [" 50% step 1/2", "100% step 2/2", "running (attempt 1, worker)"] {
        assert!(out.stdout.contains(expected), "{expected:?} in {out:?}");
    }
    let out = nats(&s.nats, &["get", &id, "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["status"], "succeeded");

    let out = nats(
        &s.nats,
        &["submit", "exec", "--input", r#"{"program":"talk"}"#, "--session", "cli-nats", "--watch"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    for expected in
        ["hello from the task\n", " 50% half\n", "second line\n", r#"result: {"said":2}"#]
    {
        assert!(out.stdout.contains(expected), "{expected:?} in {out:?}");
    }
    let exec_id = out.stdout.lines().next().unwrap().to_owned();
    let row = listed(async |args: &[&str]| nats(&s.nats, args).await, "cli-nats", &exec_id).await;
    assert_eq!(row["kind"], "exec");

    // The same verbs over NATS and HTTP print the same record.
    let over_http = http(&s.gw, &["get", &exec_id, "--json"]).await.json();
    let over_nats = nats(&s.nats, &["get", &exec_id, "--json"]).await.json();
    assert_eq!(over_http, over_nats);
}

#[tokio::test]
async fn errors_are_one_line_on_stderr_with_their_exit_code() {
    let s = stack(WORKER).await;

    let out = http(&s.gw, &["get", "no-such-task"]).await;
    assert_eq!((out.code, out.error_line()), (1, "claw: no task 'no-such-task' (not_found)"));
    let out = nats(&s.nats, &["get", "no-such-task"]).await;
    assert_eq!((out.code, out.error_line()), (1, "claw: no task 'no-such-task' (not_found)"));
    let out = http(&s.gw, &["get", "no-such-task", "--json"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(out.json()["error"]["code"], "not_found", "--json also prints the error body");

    let out = http(&s.gw, &["submit", "sleep", "--max-attempts", "x"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    let line = out.error_line();
    assert!(line.starts_with("claw: invalid request: max_attempts: invalid type"), "{line}");
    assert!(line.ends_with("(invalid_request)"), "{line}");
    let out = nats(&s.nats, &["submit", "teleport"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.error_line().contains("unknown kind \"teleport\""), "{out:?}");

    let out = http(&s.gw, &["submit", "sleep", "--input", "{oops"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.error_line().starts_with("claw: --input is not JSON"), "{out:?}");
    let out = http(&s.gw, &["watch", "--session", "s"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.error_line().contains("needs --nats-url"), "{out:?}");
    let out = claw(&["submit"]).await;
    assert_eq!(out.code, 2, "clap's usage error: {out:?}");
    let missing = s.nats.dir.path().join("no-such-password-file");
    let missing = missing.to_str().unwrap();
    let out =
        nats(&s.nats, &["get", "x", "--nats-user", "u", "--nats-password-file", missing]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.error_line().starts_with(&format!("claw: cannot read the secret file {missing}")),
        "{out:?}"
    );

    // Nothing listens on a port we just had and closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let out = claw(&["get", "x", "--url", &url]).await;
    assert_eq!(out.code, 3, "{out:?}");
    assert_eq!(
        out.error_line(),
        format!("claw: cannot reach the gateway at {url}: connection refused")
    );
    let url = format!("nats://127.0.0.1:{port}");
    let out = claw(&["submit", "sleep", "--nats-url", &url]).await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.error_line().starts_with(&format!("claw: cannot reach NATS at {url}: ")),
        "{out:?}"
    );

    // A NATS server without a gateway: nothing answers the request.
    s.gw.running.stop().await;
    let out = nats(&s.nats, &["get", "x"]).await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.error_line().contains("is the gateway running?"), "{out:?}");
}

/// Task and lane control: a task queued in a paused lane is cancelled; a running one is
/// cancelled while `claw watch` follows it, which then ends with a non-zero exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_tasks_and_pause_lanes() {
    let s = stack(WORKER).await;

    let out = http(&s.gw, &["lanes"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.starts_with("LANE"), "{out:?}");
    assert_eq!(out.stdout.lines().count(), 7, "a header and six lanes: {out:?}");
    assert!(out.stdout.lines().any(|l| l.starts_with("short low")), "{out:?}");

    let out = http(&s.gw, &["lanes", "pause", "short", "low"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let row = out.stdout.lines().nth(1).unwrap_or_default();
    assert!(row.starts_with("short low") && row.ends_with("yes"), "{out:?}");
    let out = nats(&s.nats, &["lanes", "--json"]).await;
    let lanes = out.json();
    let paused: Vec<&Value> =
        lanes["lanes"].as_array().unwrap().iter().filter(|l| l["paused"] == true).collect();
    assert_eq!(paused.len(), 1, "{lanes}");
    assert_eq!((&paused[0]["class"], &paused[0]["priority"]), (&"short".into(), &"low".into()));

    let out =
        http(&s.gw, &["submit", "sleep", "--priority", "low", "--input", r#"{"seconds":1}"#]).await;
    let queued = out.stdout.trim().to_owned();
    let out = http(&s.gw, &["cancel", &queued]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("cancelled"), "{out:?}");
    let out = nats(&s.nats, &["get", &queued, "--json"]).await;
    assert_eq!(out.json()["status"], "cancelled");
    // A repeat is harmless; a verb the state does not allow is refused with exit 1.
    let out = http(&s.gw, &["cancel", &queued]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let out = nats(&s.nats, &["pause", &queued]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(out.error_line(), "claw: cannot pause a task that is cancelled (conflict)");

    let out = nats(&s.nats, &["lanes", "resume", "short", "low"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.lines().nth(1).unwrap_or_default().ends_with("no"), "{out:?}");

    // A running task, followed by `claw watch` over NATS while it is cancelled.
    let out = http(&s.gw, &["submit", "sleep", "--input", r#"{"seconds":30,"steps":30}"#]).await;
    let running = out.stdout.trim().to_owned();
    let url = s.nats.url();
    let watch = command(&["watch", &running, "--nats-url", &url]).spawn().unwrap();
    wait_for("the task to run", Duration::from_secs(20), || async {
        let out = http(&s.gw, &["get", &running, "--json"]).await;
        (out.json()["status"] == "running").then_some(())
    })
    .await;
    let out = nats(&s.nats, &["cancel", &running]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let watched = tokio::time::timeout(CLAW_DEADLINE, watch.wait_with_output())
        .await
        .expect("the watch ends when the task is cancelled")
        .unwrap();
    let stdout = String::from_utf8_lossy(&watched.stdout);
    assert_eq!(watched.status.code(), Some(1), "{stdout}");
    assert!(stdout.lines().last().unwrap_or_default().starts_with("cancelled"), "{stdout}");
}

/// `claw get --result FILE` saves a result whole, whether inline or in the object store, over
/// HTTP and over NATS; `--input` does the same for the input. `claw get` shows where a stored
/// payload is instead of printing it.
#[tokio::test]
async fn get_saves_a_stored_result_whole_over_http_and_nats() {
    let s = stack(WORKER).await;
    // Over the 64 KiB inline limit, under the 128 KiB an argument may have.
    let echo = "e".repeat(100_000);
    let spec = serde_json::json!({"seconds": 0, "echo": echo}).to_string();
    let out = http(&s.gw, &["submit", "sleep", "--input", &spec, "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let id = out.json()["id"].as_str().unwrap().to_owned();
    let url = s.gw.url(&format!("/v1/tasks/{id}"));
    wait_for("the task to succeed", Duration::from_secs(20), || async {
        let r: Value = reqwest::get(&url).await.ok()?.json().await.ok()?;
        (r["status"] == "succeeded").then_some(())
    })
    .await;

    let shown = http(&s.gw, &["get", &id]).await;
    assert!(shown.stdout.contains(&format!("stored as {id}/result")), "{shown:?}");
    assert!(!shown.stdout.contains(&echo[..1000]), "the payload is not printed");
    for (backend, file) in [("http", "r-http.json"), ("nats", "r-nats.json")] {
        let path = s.nats.dir.path().join(file);
        let path = path.to_str().unwrap();
        let out = match backend {
            "http" => http(&s.gw, &["get", &id, "--result", path]).await,
            _ => nats(&s.nats, &["get", &id, "--result", path]).await,
        };
        assert_eq!(out.code, 0, "{backend}: {out:?}");
        let saved: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        assert_eq!(saved["echo"].as_str(), Some(echo.as_str()), "{backend}");
    }
    let path = s.nats.dir.path().join("input.json");
    let out = nats(&s.nats, &["get", &id, "--input", path.to_str().unwrap()]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let input: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(input, serde_json::from_str::<Value>(&spec).unwrap());
}
