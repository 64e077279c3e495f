//! The web UI in a real browser: `tests/browser/ui.test.mjs` drives Debian's Chromium with
//! playwright-core against a real gateway, worker, archiver and nats-server started here. It
//! submits tasks and watches them live, pauses, resumes and cancels from the page, and asks for
//! a gateway restart half-way (a `RESTART` line on its stdout; this side answers `RESTARTED` on
//! its stdin once a new gateway serves the same port) to see the page reconnect by itself.
//!
//! A second script, `tests/browser/auth.test.mjs`, signs in to a gateway with API tokens.
//!
//! Needs Node.js, `/usr/bin/chromium` (or `CHROMIUM_PATH`) and `tests/browser/node_modules`:
//! `scripts/install-browser` installs them. `CLAW_SKIP_BROWSER=1` skips the test, loudly.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use claw_proto::topology::Topology;
use claw_tests::{
    Nats, Running, TestDir, bin, start_archiver, start_worker, test_settings, wait_for,
};

/// The whole script, restart included, normally takes well under a minute.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(240);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_ui_runs_controls_and_reconnects_in_a_real_browser() {
    let Some(script_dir) = scripts("the browser test") else { return };

    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    // Long tasks run as `claw-worker __run-task` children; the test binary cannot be that runner.
    let runner = bin("claw-worker");
    let _worker = start_worker(&topo, &format!("ack_deadline_s = 2.0\nrunner = {runner:?}\n"));
    let _archiver = start_archiver(&topo, &nats.dir.path().join("archive.sqlite"));
    let (mut gateway, addr) = start_gateway(&topo).await;
    let url = format!("http://{addr}");

    let out = TestDir::new();
    let mut child = Command::new("node")
        .arg(script_dir.join("ui.test.mjs"))
        .arg(&url)
        .arg(out.path())
        .current_dir(&script_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting node");
    let mut stdin = child.stdin.take().expect("piped stdin");

    // The script's stdout, line by line, from a thread: reading a pipe blocks.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stdout = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let deadline = tokio::time::Instant::now() + SCRIPT_TIMEOUT;
    let mut screenshot = None;
    let mut restarts = 0;
    let mut stales = 0;
    loop {
        let line = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(_) => {
                let _ = child.kill();
                panic!("the browser script did not finish within {SCRIPT_TIMEOUT:?}");
            }
        };
        println!("{line}");
        if line == "RESTART" {
            gateway.stop().await;
            gateway = restart_gateway(&topo, addr).await;
            restarts += 1;
            writeln!(stdin, "RESTARTED")
                .and_then(|()| stdin.flush())
                .expect("answering the script");
        } else if let Some(args) = line.strip_prefix("STALE ") {
            let (task, session) = args.split_once(' ').expect("STALE <task> <session>");
            store_late_queued_event(&topo, task, session).await;
            stales += 1;
            writeln!(stdin, "STALED").and_then(|()| stdin.flush()).expect("answering the script");
        } else if let Some(path) = line.strip_prefix("SCREENSHOT ") {
            screenshot = Some(PathBuf::from(path));
        }
    }
    let status = child.wait().expect("waiting for node");
    assert!(status.success(), "the browser script failed ({status}); its log is above");
    assert_eq!(restarts, 1, "the script asked for one gateway restart");
    assert_eq!(stales, 1, "the script asked for one late queued event");
    let screenshot = screenshot.expect("the script saved a screenshot");
    assert!(screenshot.is_file(), "{} missing", screenshot.display());
    println!("screenshot: {} (kept with KEEP_TEST_DIRS=1)", screenshot.display());
}

/// Stores the `queued` status event a gateway sends when it accepts a task, as it lands when the
/// worker's `running` got to the stream first: after it.
async fn store_late_queued_event(topo: &Topology, task: &str, session: &str) {
    let at = time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339);
    let event = serde_json::json!({
        "type": "status", "task_id": task, "session": session, "at": at.expect("a time"),
        "data": {"status": "queued", "cause": "user", "attempt": 0},
    });
    let subject = format!("progress.{session}.{task}");
    let ack = topo.js.publish(subject, event.to_string().into()).await.expect("publish");
    ack.await.expect("PROGRESS stores the event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_ui_asks_for_a_token_and_signs_in() {
    let Some(script_dir) = scripts("the browser sign-in test") else { return };

    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0\n");
    let token = "claw_browser-0123456789abcdef";
    let tokens = nats.dir.path().join("tokens.toml");
    // One task at a time: the script checks that a second one says it waits for a slot.
    let principal = format!("[principals.web]\ntokens = [\"{token}\"]\n");
    std::fs::write(&tokens, principal + "[principals.web.limits]\nrunning_tasks = 1\n").unwrap();
    let gw = claw_tests::Gateway::start(&topo, &["--tokens", tokens.to_str().unwrap()]).await;

    let child = tokio::process::Command::new("node")
        .arg(script_dir.join("auth.test.mjs"))
        .arg(&gw.url)
        .arg(token)
        .current_dir(&script_dir)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starting node");
    let status = tokio::time::timeout(SCRIPT_TIMEOUT, child.wait_with_output())
        .await
        .expect("the sign-in script finished in time")
        .expect("waiting for node")
        .status;
    assert!(status.success(), "the sign-in script failed ({status}); its log is above");
}

/// The folder of the browser scripts, checked for what they need; `None` (said on stderr) when
/// `CLAW_SKIP_BROWSER=1` skips `test`.
fn scripts(test: &str) -> Option<PathBuf> {
    if std::env::var("CLAW_SKIP_BROWSER").as_deref() == Ok("1") {
        eprintln!("SKIPPED: {test} (CLAW_SKIP_BROWSER=1)");
        return None;
    }
    let script_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser");
    check_prerequisites(&script_dir);
    Some(script_dir)
}

/// Fails with what to run when the browser, Node or the script's packages are missing.
fn check_prerequisites(script_dir: &Path) {
    let fix = "run scripts/install-browser (as root: it apt-get installs chromium, then runs \
               npm ci in tests/browser), or set CLAW_SKIP_BROWSER=1 to skip this test";
    let chromium = std::env::var_os("CHROMIUM_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(chromium.is_file(), "{} not found: {fix}", chromium.display());
    let node = Command::new("node").arg("--version").output();
    assert!(node.is_ok_and(|o| o.status.success()), "node not found on PATH: {fix}");
    let package = script_dir.join("node_modules/playwright-core/package.json");
    assert!(package.is_file(), "{} not found: {fix}", package.display());
}

/// A gateway in-process on a loopback port of its own choosing.
async fn start_gateway(topology: &Topology) -> (Running, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the gateway");
    let addr = listener.local_addr().expect("local addr");
    (serve(topology, listener), addr)
}

/// A new gateway on the port the stopped one had, as after a deploy. Binding is retried
/// briefly in case the old socket is not released yet (tokio sets SO_REUSEADDR, so connections
/// in TIME_WAIT do not block it).
async fn restart_gateway(topology: &Topology, addr: SocketAddr) -> Running {
    let listener =
        wait_for(&format!("{addr} to be free again"), Duration::from_secs(10), || async {
            tokio::net::TcpListener::bind(addr).await.ok()
        })
        .await;
    serve(topology, listener)
}

fn serve(topology: &Topology, listener: tokio::net::TcpListener) -> Running {
    let config = claw_gateway::Config::from_args(std::iter::empty::<&str>()).expect("flags");
    let token = tokio_util::sync::CancellationToken::new();
    let (topology, run_token) = (topology.clone(), token.clone());
    let handle = tokio::spawn(async move {
        if let Err(e) = claw_gateway::run(topology, config, listener, run_token).await {
            panic!("gateway failed: {e}");
        }
    });
    Running { token, handle }
}
