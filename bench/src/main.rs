//! `claw-bench`: measures a running system from the outside, the way users meet it.
//!
//! It starts `claw up` (the release build next to this binary) as a separate process with a
//! fresh data directory, waits for `/readyz`, and measures:
//! 1. submit latency: one client, sequential `POST /v1/tasks`, keep-alive; p50 / p99 / max;
//! 2. submit throughput: `--connections` clients submitting at once; accepted submits per second;
//! 3. end to end: `--e2e` no-op tasks (`sleep` 0 s) submitted as fast as the clients can, timed
//!    until every one of them is a row in the archive's SQLite file (which happens only after its
//!    record reached `succeeded` in the `tasks` bucket);
//! 4. the same from a NATS-native publisher: tasks published straight to `tasks.short.normal`
//!    with pipelined JetStream acks, no HTTP, timed the same way. This is the capacity of worker
//!    and archiver without the cost of HTTP clients on the same cores;
//! 5. WebSocket: the gateway memory per idle connection, and the events per second it fans out
//!    to the clients of one session (see `ws.rs`);
//! 6. the two end-to-end figures (3 and 4) again on a 3-node JetStream cluster (three
//!    nats-server processes on loopback, every stream and bucket with 3 replicas), `claw up`
//!    connected to all three nodes with `--nats-url` (see `cluster.rs`);
//! 7. traffic: the server's client messages and bytes, each way, per no-op task (`/varz` of a
//!    nats-server of its own with monitoring on), over HTTP and straight to NATS;
//! 8. control: the latency of cancelling a queued task at the head or the tail of a
//!    `--queue-depth` lane;
//! 9. peers: the phases of the peer harness (`../shared/peers`) measured the same way, for the
//!    side-by-side table with BullMQ: end-to-end latency at 200 tasks/s with an open-loop
//!    submitter, and the drain of a 50 000 backlog (see `peers.rs`);
//! 10. scaling: that drain with 1, 2 and 4 worker processes, and with 10, 1 000 and 100 000
//!     tasks queued (see `scaling.rs`).
//!
//! Client and server share this machine's cores, so the figures are for the whole system on one
//! box. Run: `cargo build --release --bins && target/release/claw-bench` (`--only tasks,cluster`
//! prints the single-node and the cluster end-to-end rows from one invocation).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;

mod cluster;
mod peers;
mod scaling;
mod ws;

#[derive(Debug, Parser)]
#[command(name = "claw-bench", about = "Benchmarks a claw up started by this command")]
struct Args {
    /// Sequential submits for the latency figure.
    #[arg(long, default_value_t = 5000)]
    latency: usize,
    /// Submits for the throughput figure.
    #[arg(long, default_value_t = 20000)]
    throughput: usize,
    /// Concurrent clients for throughput and end to end.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// No-op tasks for the end-to-end figure.
    #[arg(long, default_value_t = 20000)]
    e2e: usize,
    /// Idle WebSocket connections for the memory figure.
    #[arg(long, default_value_t = 10000)]
    ws_connections: usize,
    /// Sessions the idle connections are spread over.
    #[arg(long, default_value_t = 100)]
    ws_sessions: usize,
    /// WebSocket clients on one session for the fan-out figure.
    #[arg(long, default_value_t = 50)]
    fanout_clients: usize,
    /// Events published to that session for the fan-out figure.
    #[arg(long, default_value_t = 10000)]
    fanout_events: usize,
    /// Tasks queued in the lane for the cancel-of-a-queued-task figure.
    #[arg(long, default_value_t = 10000)]
    queue_depth: usize,
    /// No-op tasks for each per-task traffic figure.
    #[arg(long, default_value_t = 5000)]
    traffic: usize,
    /// Concurrent I/O-bound tasks in one worker for the concurrency figure.
    #[arg(long, default_value_t = 10000)]
    concurrent: usize,
    /// How long each of those tasks sleeps.
    #[arg(long, default_value_t = 10.0)]
    sleep_s: f64,
    /// No-op tasks queued before the lane is resumed, for the drain figure (the peers' phase d).
    #[arg(long, default_value_t = 50000)]
    backlog: usize,
    /// Run only these groups of figures (comma separated; default: all, in this order).
    #[arg(long, value_delimiter = ',', value_parser = ["tasks", "peers", "scaling", "concurrency", "ws", "cluster", "traffic", "control"])]
    only: Vec<String>,
}

struct System {
    child: Child,
    url: String,
    nats_url: String,
    db: PathBuf,
    _dir: tempfile::TempDir,
    /// The external cluster `claw up` is connected to, if any; dropped (killed) after `claw up`.
    servers: Option<cluster::Cluster>,
}

impl System {
    /// `claw up`'s data directory.
    fn data(&self) -> &Path {
        self._dir.path()
    }
}

impl Drop for System {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn start_system() -> anyhow::Result<System> {
    start_system_with("").await
}

/// Starts `claw up` with `worker_toml` as the worker's configuration.
async fn start_system_with(worker_toml: &str) -> anyhow::Result<System> {
    start_claw(worker_toml, None).await
}

/// Starts `claw up`: with its embedded nats-server, or connected to `cluster` (all its nodes,
/// every stream and bucket with 3 replicas).
async fn start_claw(
    worker_toml: &str,
    cluster: Option<cluster::Cluster>,
) -> anyhow::Result<System> {
    let exe = std::env::current_exe()?;
    let claw = exe.parent().context("exe dir")?.join("claw");
    if !claw.is_file() {
        bail!("{} not built: cargo build --release --bins", claw.display());
    }
    let dir = tempfile::Builder::new().prefix("claw-bench-").tempdir()?;
    let port = free_port()?;
    let nats_port = free_port()?;
    let worker_config = dir.path().join("worker.toml");
    std::fs::write(&worker_config, worker_toml)?;
    let mut command = Command::new(&claw);
    command
        .arg("up")
        .arg("--worker-config")
        .arg(&worker_config)
        .arg("--data")
        .arg(dir.path())
        .arg("--http")
        .arg(format!("127.0.0.1:{port}"))
        .args(["--queue-max", "1000000"]);
    let nats_url = match &cluster {
        Some(cluster) => {
            let url = cluster.url();
            command.args(["--nats-url", &url, "--replicas", &cluster.replicas().to_string()]);
            url
        }
        None => {
            command.args(["--nats-port", &nats_port.to_string()]);
            // Its admin user's password is known once `claw up` has written it (below).
            format!("nats://127.0.0.1:{nats_port}")
        }
    };
    let child = command.env("RUST_LOG", "warn").stdout(Stdio::null()).spawn()?;
    let url = format!("http://127.0.0.1:{port}");
    let db = dir.path().join("archive.sqlite");
    let mut system = System { child, url, nats_url, db, _dir: dir, servers: cluster };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("{}/readyz", system.url)).send().await
            && r.status().is_success()
        {
            if system.servers.is_none() {
                system.nats_url = embedded_admin_url(system._dir.path(), nats_port)?;
            }
            return Ok(system);
        }
        if let Some(status) = system.child.try_wait()? {
            bail!("claw up exited during start-up with {status}");
        }
        if Instant::now() > deadline {
            bail!("claw up not ready after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `nats://admin:<password>@127.0.0.1:<port>`: the embedded server's admin user, from the
/// context file `claw up` writes into its data directory (`cluster::connect` takes the
/// credentials out of the URL).
fn embedded_admin_url(data: &Path, port: u16) -> anyhow::Result<String> {
    let file = data.join("nats").join("context").join("admin.json");
    let context: serde_json::Value = serde_json::from_slice(&std::fs::read(&file)?)?;
    let password = context["password"].as_str().context("a password in admin.json")?;
    Ok(format!("nats://admin:{password}@127.0.0.1:{port}"))
}

const NOOP: &str = r#"{"kind":"sleep","input":{"seconds":0}}"#;

async fn submit(client: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let r = client
        .post(format!("{url}/v1/tasks"))
        .header("content-type", "application/json")
        .body(NOOP)
        .send()
        .await?;
    if r.status() != reqwest::StatusCode::ACCEPTED {
        bail!("submit answered {}: {}", r.status(), r.text().await.unwrap_or_default());
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn latency(system: &System, n: usize) -> anyhow::Result<()> {
    latency_labelled(system, n, "").await
}

/// The submit latency as the peers' phase (a) measures it: no worker consuming (the lane is
/// paused on a system of its own), so the figure is the client's and the broker's cost alone.
async fn latency_unconsumed(n: usize) -> anyhow::Result<()> {
    let system = start_system().await?;
    let http = reqwest::Client::new();
    let r = http.post(format!("{}/v1/lanes/short/normal/pause", system.url)).send().await?;
    if !r.status().is_success() {
        bail!("pausing the lane answered {}", r.status());
    }
    latency_labelled(&system, n, ", no worker consuming (the peers' phase a)").await
}

async fn latency_labelled(system: &System, n: usize, label: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    for _ in 0..200 {
        submit(&client, &system.url).await?; // warm-up: connection, allocator, JIT-free paths
    }
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        submit(&client, &system.url).await?;
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "| submit latency, 1 client, sequential{label} | {n} | p50 {:.3} ms | p99 {:.3} ms | max {:.3} ms |",
        ms(percentile(&times, 0.5)),
        ms(percentile(&times, 0.99)),
        ms(*times.last().unwrap_or(&Duration::ZERO)),
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Submits `n` tasks from `connections` concurrent clients; returns the elapsed time.
async fn flood(system: &System, n: usize, connections: usize) -> anyhow::Result<Duration> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(connections).build()?;
    let left = Arc::new(AtomicUsize::new(n));
    let started = Instant::now();
    let workers = (0..connections).map(|_| {
        let (client, url, left) = (client.clone(), system.url.clone(), left.clone());
        tokio::spawn(async move {
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(1))
                .is_ok()
            {
                submit(&client, &url).await?;
            }
            anyhow::Ok(())
        })
    });
    for result in futures::future::join_all(workers).await {
        result??;
    }
    Ok(started.elapsed())
}

async fn throughput(system: &System, n: usize, connections: usize) -> anyhow::Result<()> {
    let elapsed = flood(system, n, connections).await?;
    println!(
        "| submit throughput, {connections} clients | {n} | {:.0} submits/s | {:.2} s total | |",
        n as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    Ok(())
}

async fn archived(db: &Path) -> anyhow::Result<i64> {
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(db).read_only(true);
    let mut conn = sqlx::ConnectOptions::connect(&options).await?;
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM tasks").fetch_one(&mut conn).await?;
    Ok(n)
}

/// `label` prefixes the row's measure (empty for the single node).
async fn end_to_end(
    system: &System,
    n: usize,
    connections: usize,
    label: &str,
) -> anyhow::Result<()> {
    let before = archived(&system.db).await.unwrap_or(0);
    let started = Instant::now();
    let submitted = flood(system, n, connections).await?;
    wait_archived(&system.db, before + n as i64, n).await?;
    let elapsed = started.elapsed();
    println!(
        "| {label}no-op tasks end to end (submit → succeeded → SQLite), {connections} clients | {n} | {:.0} tasks/s | {:.2} s total (submits done at {:.2} s) | |",
        n as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        submitted.as_secs_f64()
    );
    Ok(())
}

async fn wait_archived(db: &Path, target: i64, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let rows = archived(db).await.unwrap_or(0);
        if rows >= target {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {} of {n} tasks archived after 600 s", n as i64 - (target - rows));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes `n` tasks straight to a lane, keeping up to 4096 acks in flight.
/// Publishes `n` no-op tasks straight to `tasks.short.normal`, up to 4096 acks in flight.
async fn publish_pipelined(nats_url: &str, n: usize) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(cluster::connect(nats_url).await?);
    let mut acks = futures::stream::FuturesUnordered::new();
    for _ in 0..n {
        if acks.len() >= 4096 {
            futures::StreamExt::next(&mut acks).await.context("ack stream")??;
        }
        let ack =
            js.publish("tasks.short.normal", bytes::Bytes::from_static(NOOP.as_bytes())).await?;
        acks.push(std::future::IntoFuture::into_future(ack));
    }
    while let Some(ack) = futures::StreamExt::next(&mut acks).await {
        ack?;
    }
    Ok(())
}

async fn end_to_end_nats(system: &System, n: usize, label: &str) -> anyhow::Result<()> {
    let before = archived(&system.db).await.unwrap_or(0);
    let started = Instant::now();
    publish_pipelined(&system.nats_url, n).await?;
    let published = started.elapsed();
    wait_archived(&system.db, before + n as i64, n).await?;
    let elapsed = started.elapsed();
    println!(
        "| {label}no-op tasks end to end, published straight to NATS (pipelined acks) | {n} | {:.0} tasks/s | {:.2} s total (published at {:.2} s) | |",
        n as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        published.as_secs_f64()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!("| measure | n | result | | |");
    println!("|---|---|---|---|---|");
    let run = |group: &str| args.only.is_empty() || args.only.iter().any(|only| only == group);
    if run("tasks") {
        tasks(&args).await?;
    }
    if run("peers") {
        peers::latency_at_rate().await?;
        peers::drain(args.backlog).await?;
    }
    if run("scaling") {
        scaling::workers(args.backlog).await?;
        scaling::depth().await?;
    }
    if run("concurrency") {
        concurrency(&args).await?;
    }
    if run("ws") {
        let system = start_system().await?;
        ws::idle(&system.url, system.child.id(), args.ws_connections, args.ws_sessions).await?;
        drop(system);
        let system = start_system().await?;
        ws::fanout(&system.url, &system.nats_url, args.fanout_clients, args.fanout_events).await?;
    }
    if run("cluster") {
        cluster_tasks(&args).await?;
    }
    if run("traffic") {
        traffic(&args).await?;
    }
    if run("control") {
        cancel_queued(&args).await?;
    }
    Ok(())
}

/// Cancel of a queued task in a lane `queue_depth` deep (its consumer paused, so nothing runs):
/// 100 tasks submitted before the fill (at the head of the queue) and 100 after it (at the
/// tail), each cancelled over HTTP; the latency of the cancel, which answers once the task's
/// message is out of the queue.
async fn cancel_queued(args: &Args) -> anyhow::Result<()> {
    const EACH: usize = 100;
    let system = start_system().await?;
    let http = reqwest::Client::new();
    let r = http.post(format!("{}/v1/lanes/short/normal/pause", system.url)).send().await?;
    if !r.status().is_success() {
        bail!("pausing the lane answered {}", r.status());
    }
    let submit_one = || async {
        let r = http
            .post(format!("{}/v1/tasks", system.url))
            .header("content-type", "application/json")
            .body(NOOP)
            .send()
            .await?;
        let v: serde_json::Value = r.json().await?;
        v["id"].as_str().map(str::to_owned).context("no id in the submit answer")
    };
    let mut head = Vec::with_capacity(EACH);
    for _ in 0..EACH {
        head.push(submit_one().await?);
    }
    // The lane's fill is more than the gateway's clock-skew margin (1 s) away from the tasks
    // cancelled, as a queue that built up over time is; within it the scan starts earlier.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    publish_pipelined(&system.nats_url, args.queue_depth).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut tail = Vec::with_capacity(EACH);
    for _ in 0..EACH {
        tail.push(submit_one().await?);
    }
    for (place, ids) in [("head", head), ("tail", tail)] {
        let mut times = Vec::with_capacity(ids.len());
        for id in ids {
            let t = Instant::now();
            let r = http.post(format!("{}/v1/tasks/{id}/cancel", system.url)).send().await?;
            times.push(t.elapsed());
            if !r.status().is_success() {
                bail!("cancel of {id} answered {}", r.status());
            }
        }
        times.sort();
        println!(
            "| cancel of a queued task at the {place} of a {} deep lane | {EACH} | p50 {:.3} ms | p99 {:.3} ms | |",
            args.queue_depth + 2 * EACH,
            ms(percentile(&times, 0.5)),
            ms(percentile(&times, 0.99)),
        );
    }
    Ok(())
}

/// What one no-op task costs the server, in client messages and bytes each way (nats-server's
/// `/varz` before and after `n` tasks, on a server of its own with monitoring on). Unlike the
/// rates, these counts do not depend on what else the machine is doing.
async fn traffic(args: &Args) -> anyhow::Result<()> {
    let n = args.traffic;
    for over_http in [true, false] {
        let server = cluster::Cluster::single_monitored().await?;
        let system = start_claw("", Some(server)).await?;
        let server = system.servers.as_ref().context("the monitored server")?;
        let before = server.varz().await?;
        let rows = archived(&system.db).await.unwrap_or(0);
        if over_http {
            flood(&system, n, args.connections).await?;
        } else {
            publish_pipelined(&system.nats_url, n).await?;
        }
        wait_archived(&system.db, rows + n as i64, n).await?;
        // Trailing acks (the archiver's last batch, the last tasks') land within a moment.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = server.varz().await?;
        let per = |a: u64, b: u64| (b - a) as f64 / n as f64;
        println!(
            "| server traffic per no-op task, {} | {n} | {:.2} msgs in, {:.2} msgs out | {:.0} bytes in, {:.0} bytes out | |",
            if over_http { "submitted over HTTP" } else { "published straight to NATS" },
            per(before.in_msgs, after.in_msgs),
            per(before.out_msgs, after.out_msgs),
            per(before.in_bytes, after.in_bytes),
            per(before.out_bytes, after.out_bytes),
        );
    }
    Ok(())
}

/// `n` tasks that each sleep `sleep_s`, all running at once in one worker process with `n`
/// short slots: the time until every one is archived, and the peak RSS of the `claw up` process
/// (gateway, worker and archiver; the nats-server is a separate process).
async fn concurrency(args: &Args) -> anyhow::Result<()> {
    let n = args.concurrent;
    // The total must make room for them too: it is what bounds the short pool.
    let system = start_system_with(&format!("max_concurrent = {n}\nshort_slots = {n}\n")).await?;
    let pid = system.child.id();
    let idle = ws::rss_kib(pid)?;
    let client = cluster::connect(&system.nats_url).await?;
    let js = async_nats::jetstream::new(client);
    let task = format!(r#"{{"kind":"sleep","input":{{"seconds":{}}}}}"#, args.sleep_s);
    let started = Instant::now();
    let mut acks = futures::stream::FuturesUnordered::new();
    for _ in 0..n {
        if acks.len() >= 4096 {
            futures::StreamExt::next(&mut acks).await.context("ack stream")??;
        }
        let ack = js.publish("tasks.short.normal", task.clone().into()).await?;
        acks.push(std::future::IntoFuture::into_future(ack));
    }
    while let Some(ack) = futures::StreamExt::next(&mut acks).await {
        ack?;
    }
    let mut peak = idle;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        peak = peak.max(ws::rss_kib(pid)?);
        if archived(&system.db).await.unwrap_or(0) >= n as i64 {
            break;
        }
        if Instant::now() > deadline {
            bail!("not all {n} tasks archived after 600 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    println!(
        "| concurrent sleep({} s) tasks in one worker ({n} short slots) | {n} | all done in {:.1} s | peak RSS {:.0} MiB (idle {:.0} MiB) | {:.1} KiB per task |",
        args.sleep_s,
        elapsed.as_secs_f64(),
        peak as f64 / 1024.0,
        idle as f64 / 1024.0,
        (peak - idle) as f64 / n as f64,
    );
    Ok(())
}

async fn tasks(args: &Args) -> anyhow::Result<()> {
    latency_unconsumed(args.latency).await?;
    let system = start_system().await?;
    latency(&system, args.latency).await?;
    throughput(&system, args.throughput, args.connections).await?;
    drop(system);
    // A fresh system, so the end-to-end run does not also drain the throughput run's backlog.
    let system = start_system().await?;
    end_to_end(&system, args.e2e, args.connections, "").await?;
    drop(system);
    let system = start_system().await?;
    end_to_end_nats(&system, args.e2e, "").await?;
    Ok(())
}

/// The two end-to-end figures on a fresh 3-node cluster each (R3 streams and buckets).
async fn cluster_tasks(args: &Args) -> anyhow::Result<()> {
    const LABEL: &str = "3-node cluster, R3: ";
    let system = start_claw("", Some(cluster::Cluster::start().await?)).await?;
    cluster::check_r3(&system.nats_url).await?;
    end_to_end(&system, args.e2e, args.connections, LABEL).await?;
    drop(system);
    let system = start_claw("", Some(cluster::Cluster::start().await?)).await?;
    cluster::check_r3(&system.nats_url).await?;
    end_to_end_nats(&system, args.e2e, LABEL).await?;
    Ok(())
}
