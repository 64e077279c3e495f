//! How the cost grows (issue 13): the drain rate of a backlog with 1, 2 and 4 worker processes
//! (`claw up`'s own worker plus `claw-worker` processes connected to its embedded server as the
//! worker role), and with 10, 1 000 and 100 000 tasks queued.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::peers::drain_on;
use crate::{System, cluster, start_system};

/// A `claw-worker` process; killed when dropped.
struct ExtraWorker(Child);

impl Drop for ExtraWorker {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// Starts `claw-worker` `name` against `system`'s embedded server, as the worker role.
fn extra_worker(system: &System, name: &str) -> anyhow::Result<ExtraWorker> {
    let exe = std::env::current_exe()?;
    let binary = exe.parent().context("exe dir")?.join("claw-worker");
    let context = system.data().join("nats").join("context").join("worker.json");
    let context: serde_json::Value = serde_json::from_slice(&std::fs::read(&context)?)?;
    let password = context["password"].as_str().context("a password in worker.json")?;
    let config = system.data().join(format!("{name}.toml"));
    std::fs::write(&config, format!("name = \"{name}\"\n"))?;
    let url = system.nats_url.split('@').next_back().unwrap_or_default();
    let child = Command::new(binary)
        .arg("--config")
        .arg(&config)
        .args(["--nats-url", &format!("nats://{url}"), "--nats-user", "worker"])
        .args(["--nats-password", password, "--nats-inbox-prefix", "_INBOX.worker"])
        // The topology as `claw up` ensured it for the bench (a worker may not change it).
        .args(["--queue-max", "1000000"])
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null())
        .spawn()?;
    Ok(ExtraWorker(child))
}

/// Waits until worker `name` answers `claw.worker.<name>.status`.
async fn answers(client: &async_nats::Client, name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let subject = format!("claw.worker.{name}.status");
    while Instant::now() < deadline {
        let reply = client.request(subject.clone(), bytes::Bytes::new());
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), reply).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("worker {name} did not answer within 30 s")
}

/// The drain of `n` tasks with 1, 2 and 4 worker processes.
pub async fn workers(n: usize) -> anyhow::Result<()> {
    for processes in [1, 2, 4] {
        let system = start_system().await?;
        let client = cluster::connect(&system.nats_url).await?;
        let mut extra = Vec::new();
        for i in 1..processes {
            let name = format!("bench-extra-{i}");
            extra.push(extra_worker(&system, &name)?);
            answers(&client, &name).await?;
        }
        let d = drain_on(&system, n).await?;
        println!(
            "| drain of a {n} backlog, {processes} worker process{} | {n} | {:.0} completions/s | all archived {:.2} s after the resume | |",
            if processes == 1 { "" } else { "es" },
            d.rate,
            d.archived_s,
        );
        drop(extra);
    }
    Ok(())
}

/// The drain with 10, 1 000 and 100 000 tasks queued, one worker.
pub async fn depth() -> anyhow::Result<()> {
    for n in [10, 1_000, 100_000] {
        let system = start_system().await?;
        let d = drain_on(&system, n).await?;
        println!(
            "| drain of a {n} backlog, 1 worker process | {n} | {:.0} completions/s | last completion {:.3} s after the resume ({:.3} ms a task) | all archived {:.2} s after |",
            d.rate,
            d.to_last_s,
            d.to_last_s * 1000.0 / n as f64,
            d.archived_s,
        );
    }
    Ok(())
}
