//! A NATS client in another language uses the system through `docs/PROTOCOL.md` alone:
//! `tests/interop/interop.py` (Python, `nats-py`) publishes tasks to a lane with `Nats-Msg-Id`,
//! watches their progress subjects, reads their records from the `tasks` bucket, cancels one
//! with `claw.api.cancel`, reads dead letters from `DLQ`, submits over `claw.api.submit`,
//! pauses a lane and reads the archive, and validates everything it reads against the JSON
//! Schemas in `nats/schema/`, so those cannot drift from the Rust types unnoticed.
//!
//! Needs `python3` with the pinned packages that `scripts/install-interop` puts in
//! `.tools/python` (`nats-py`, `jsonschema`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use claw_tests::{Gateway, Nats, python3, start_archiver, start_worker, test_settings};

/// The script normally takes a few seconds; its own bound is 180 s.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(200);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

/// `.tools/python` first, then whatever `PYTHONPATH` the caller had.
fn python_path() -> String {
    let tools = root().join(".tools/python");
    match std::env::var("PYTHONPATH") {
        Ok(rest) if !rest.is_empty() => format!("{}:{rest}", tools.display()),
        _ => tools.display().to_string(),
    }
}

fn python() -> tokio::process::Command {
    let mut command = tokio::process::Command::new(python3());
    command.env("PYTHONPATH", python_path()).env("PYTHONDONTWRITEBYTECODE", "1");
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_nats_client_drives_the_system_by_the_documented_protocol() {
    let probe =
        python().args(["-c", "import nats, jsonschema"]).output().await.expect("python3 runs");
    assert!(
        probe.status.success(),
        "the interop test needs the Python packages nats-py and jsonschema in .tools/python: \
         run scripts/install-interop (scripts/test does)\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );

    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let _archiver = start_archiver(&topo, &nats.dir.path().join("archive.sqlite"));
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0\n");
    let _gateway = Gateway::start(&topo, &[]).await;

    let script = root().join("tests/interop/interop.py");
    let child = python()
        .arg(&script)
        .arg(nats.url())
        .current_dir(root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting python3");
    let out = tokio::time::timeout(SCRIPT_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{} ran past {SCRIPT_TIMEOUT:?}", script.display()))
        .expect("waiting for python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} failed ({}):\n--- stdout\n{stdout}--- stderr\n{stderr}",
        script.display(),
        out.status
    );
    assert!(stdout.contains("interop: all checks hold"), "{stdout}");
    eprintln!("{stdout}");
}
