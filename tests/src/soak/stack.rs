//! The soak's deployment and what the faults do to it: nats-server from the shipped
//! `nats/server/single.conf` ([`Shipped::single`]) and the services as processes running as
//! their NATS roles ([`Shipped::role_env`]), each of which can be SIGKILLed, SIGTERMed and
//! started again in place.
//!
//! The services are spawned here rather than through `deploy::Service`, for three reasons: a
//! restart must keep the gateway's port (clients and WebSockets come back to the same address),
//! each incarnation gets its own log file (a restart must not truncate the evidence of the one
//! before), and `claw-soak` runs from `target/<profile>/` rather than `deps/`, where
//! `claw_tests::bin` looks.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use claw_proto::connect::{self, NatsArgs};

use crate::deploy::Shipped;
use crate::role_password;

use super::Config;

/// How long a restarted service may take to be ready again before the soak says so.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The workers' names: fixed, so a restarted worker is the same worker (its config file is).
pub const WORKERS: [&str; 2] = ["soak-w1", "soak-w2"];

/// The `exec` program every soak task runs (`[programs.soak]` in the workers' TOML).
pub const PROGRAM: &str = "soak";

/// The deployment.
#[derive(Debug)]
pub struct Stack {
    pub nats: Shipped,
    pub gateway: Proc,
    pub archiver: Proc,
    pub workers: Vec<Proc>,
    gateway_port: u16,
    dir: PathBuf,
    http: reqwest::Client,
    /// For readiness checks: worker status and archive requests.
    probe: async_nats::Client,
}

impl Stack {
    /// Writes the task program and the worker configs into the run dir, then starts
    /// nats-server, the gateway, the archiver and both workers, each ready before the next.
    pub async fn start(config: &Config) -> anyhow::Result<Stack> {
        let dir = config.dir.clone();
        std::fs::create_dir_all(dir.join("logs")).context("creating the logs dir")?;
        let program = write_program(&dir)?;
        let nats = tokio::task::block_in_place(Shipped::single);
        let probe = connect_as(&nats, "operator").await?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;

        let (gateway, gateway_port) = start_gateway(&nats, &dir, &http).await?;
        let db = dir.join("archive.sqlite");
        // With the shortened ack deadline (the 60 s run), the reconciler also looks every 5 s
        // at records quiet for 15 s (shipped: 30 s and 60 s), so a stranded task is repaired
        // well within the quiesce phase; the long run and tests/e2e/shipped.rs run the
        // archiver as shipped.
        let mut archiver_args = vec!["--db", path_str(&db)?];
        if config.ack_deadline_s.is_some() {
            archiver_args.extend(["--reconcile-interval-s", "5", "--reconcile-grace-s", "15"]);
        }
        let mut archiver =
            Proc::new("archiver", "claw-archiver", &archiver_args, nats.role_env("archiver"), &dir);
        archiver.spawn()?;
        let mut workers = Vec::new();
        for name in WORKERS {
            let toml = worker_toml(name, config.ack_deadline_s, &program, &dir.join(EXEC_LOG));
            let file = dir.join(format!("{name}.toml"));
            std::fs::write(&file, toml).context("writing a worker config")?;
            let mut worker = Proc::new(
                name,
                "claw-worker",
                &["--config", path_str(&file)?],
                nats.role_env("worker"),
                &dir,
            );
            worker.spawn()?;
            workers.push(worker);
        }
        let mut stack = Stack { nats, gateway, archiver, workers, gateway_port, dir, http, probe };
        let not_ready = stack.wait_ready(READY_TIMEOUT).await;
        if !not_ready.is_empty() {
            bail!("the deployment did not start: {}", not_ready.join("; "));
        }
        Ok(stack)
    }

    pub fn gateway_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.gateway_port)
    }

    /// The `(task key, pid, time)` lines the task program appends when it starts and ends.
    pub fn exec_log(&self) -> PathBuf {
        self.dir.join(EXEC_LOG)
    }

    /// Every service incarnation's log, and nats-server's once the stack has stopped.
    pub fn logs_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    pub fn db(&self) -> PathBuf {
        self.dir.join("archive.sqlite")
    }

    /// A new connection as the read-only `operator` role, for the checker.
    pub async fn operator(&self) -> anyhow::Result<async_nats::Client> {
        connect_as(&self.nats, "operator").await
    }

    pub fn nats_server(&mut self) -> &mut claw_proto::nats_server::NatsServer {
        &mut self.nats.nodes[0]
    }

    /// Starts the gateway again on its port (after a kill or a SIGTERM).
    pub async fn restart_gateway(&mut self) -> anyhow::Result<()> {
        self.gateway.spawn()?;
        let deadline = Instant::now() + READY_TIMEOUT;
        while !self.gateway_ready().await {
            if let Some(status) = self.gateway.exited() {
                bail!("the restarted gateway exited with {status}: {}", self.gateway.log_tail(20));
            }
            if Instant::now() > deadline {
                bail!("the restarted gateway not ready after {READY_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Whether the gateway's `/readyz` answers 200 (NATS reachable, topology there).
    pub async fn gateway_ready(&self) -> bool {
        let url = format!("{}/readyz", self.gateway_url());
        matches!(self.http.get(url).send().await, Ok(r) if r.status().is_success())
    }

    /// Whether worker `name` answers its status subject.
    pub async fn worker_ready(&self, name: &str) -> bool {
        let subject = claw_worker::status::subject_of(name);
        let asked = self.probe.request(subject, Vec::new().into());
        matches!(tokio::time::timeout(Duration::from_secs(2), asked).await, Ok(Ok(_)))
    }

    /// Whether the archiver answers `claw.archive.list`: it is connected and serving.
    pub async fn archiver_ready(&self) -> bool {
        let subject = claw_proto::topology::ARCHIVE_LIST;
        let asked = self.probe.request(subject, br#"{"limit": 1}"#.to_vec().into());
        matches!(tokio::time::timeout(Duration::from_secs(2), asked).await, Ok(Ok(_)))
    }

    /// Waits until every service answers, and returns the ones that did not by `timeout`.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut not_ready = Vec::new();
            if !self.gateway_ready().await {
                not_ready.push("gateway".to_owned());
            }
            if !self.archiver_ready().await {
                not_ready.push("archiver".to_owned());
            }
            for name in WORKERS {
                if !self.worker_ready(name).await {
                    not_ready.push(name.to_owned());
                }
            }
            let exited: Vec<String> = self
                .processes()
                .filter_map(|p| p.exited().map(|s| format!("{} exited with {s}", p.name)))
                .collect();
            if not_ready.is_empty() || !exited.is_empty() || Instant::now() > deadline {
                return [not_ready, exited].concat();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every service process (not nats-server).
    pub fn processes(&mut self) -> impl Iterator<Item = &mut Proc> {
        [&mut self.gateway, &mut self.archiver].into_iter().chain(self.workers.iter_mut())
    }

    /// Stops everything and copies nats-server's log into the run dir (the server's own
    /// directory is removed with it unless `KEEP_TEST_DIRS` is set).
    pub fn stop_and_keep_logs(&mut self) {
        for process in self.processes() {
            process.kill();
        }
        self.nats.nodes[0].kill();
        let log = self.nats.dir.path().join("nats").join("nats-server.log");
        let _ = std::fs::copy(log, self.dir.join("logs").join("nats-server.log"));
    }
}

/// The executions log in the run dir.
const EXEC_LOG: &str = "executions.log";

/// A service process that can be killed and started again with the same command line; each
/// incarnation logs (stdout and stderr) to `<dir>/logs/<name>.<n>.log`.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    bin: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    logs: PathBuf,
    child: Option<Child>,
    /// How many times it was started.
    pub incarnations: u32,
}

impl Proc {
    pub fn new(
        name: &str,
        bin_name: &str,
        args: &[&str],
        env: Vec<(String, String)>,
        dir: &Path,
    ) -> Proc {
        Proc {
            name: name.to_owned(),
            bin: bin(bin_name),
            args: args.iter().map(|a| a.to_string()).collect(),
            env,
            logs: dir.join("logs"),
            child: None,
            incarnations: 0,
        }
    }

    /// Starts a new incarnation (the previous one must be gone: `kill` or `terminate`).
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        self.incarnations += 1;
        let log = self.log_path();
        let stdout =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        // The services log to stdout; a panic goes to stderr. Both land in the one file.
        let stderr = stdout.try_clone().context("cloning the log file handle")?;
        let mut command = Command::new(&self.bin);
        // Only what the service is given: nothing of the caller's environment (a CLAW_* or
        // NATS_* variable of the shell) changes its defaults.
        command.env_clear();
        for keep in ["PATH", "HOME", "TMPDIR"] {
            if let Some(value) = std::env::var_os(keep) {
                command.env(keep, value);
            }
        }
        let child = command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            // One JSON object a line, so the checker can pick out a task's lines by its id.
            .env("CLAW_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits up to `grace` for the process to exit (SIGKILL after that).
    /// Returns how long it took, or `None` if it had to be killed.
    pub async fn terminate(&mut self, grace: Duration) -> Option<Duration> {
        let mut child = self.child.take()?;
        crate::signal(child.id(), libc::SIGTERM);
        let asked = Instant::now();
        while asked.elapsed() < grace {
            if let Ok(Some(_)) = child.try_wait() {
                return Some(asked.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// The exit status if the current incarnation has exited on its own.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Forgets an incarnation that exited on its own (so it can be spawned again).
    pub fn reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.logs.join(format!("{}.{}.log", self.name, self.incarnations))
    }

    /// The last `lines` lines of the current incarnation's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A workspace binary: next to the running executable, which is `target/<profile>/deps/e2e-*`
/// for the test and `target/<profile>/claw-soak` for the soak binary.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("the executable's dir").to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(path.is_file(), "{} not built: run `cargo build --workspace --bins`", path.display());
    path
}

/// Starts the gateway on a free loopback port and waits for `/readyz`. The port is bound and
/// released here: one taken meanwhile by another process fails the start, and another is tried.
async fn start_gateway(
    nats: &Shipped,
    dir: &Path,
    http: &reqwest::Client,
) -> anyhow::Result<(Proc, u16)> {
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let address = format!("127.0.0.1:{port}");
        let mut gateway = Proc::new(
            "gateway",
            "claw-gateway",
            &["--http", &address],
            nats.role_env("gateway"),
            dir,
        );
        gateway.spawn()?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let ready = http.get(format!("http://{address}/readyz")).send().await;
            if matches!(ready, Ok(r) if r.status().is_success()) {
                return Ok((gateway, port));
            }
            if let Some(status) = gateway.exited() {
                let log = gateway.log_tail(20);
                if log.contains("in use") {
                    break;
                }
                bail!("claw-gateway exited with {status}:\n{log}");
            }
            if Instant::now() > deadline {
                bail!("claw-gateway not ready after {READY_TIMEOUT:?}:\n{}", gateway.log_tail(20));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    bail!("the gateway could not bind a free port")
}

async fn connect_as(nats: &Shipped, role: &str) -> anyhow::Result<async_nats::Client> {
    let args = NatsArgs::url(nats.url()).with_user(role, &role_password(role));
    connect::connect(&args, &format!("soak-{role}"))
        .await
        .with_context(|| format!("connecting as {role}"))
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str().with_context(|| format!("{} is not UTF-8", path.display()))
}

/// The task program: appends `start <key> <pid> <parent pid> <unix ns>` to `$SOAK_LOG` (one
/// `write` with O_APPEND, so lines of concurrent runs never interleave), sleeps the seconds it
/// is given, appends `end ...`, and prints its result. The key is the task's
/// `Idempotency-Key`, passed as the first argument, because `exec` gives a program no task id.
/// The parent is the worker process that started it.
fn write_program(dir: &Path) -> anyhow::Result<PathBuf> {
    let script = "#!/bin/sh\n\
        # A soak task: <key> <seconds>. Logs its start and end, sleeps, prints its result.\n\
        echo \"start $1 $$ $PPID $(date +%s%N)\" >> \"$SOAK_LOG\"\n\
        sleep \"$2\"\n\
        echo \"end $1 $$ $PPID $(date +%s%N)\" >> \"$SOAK_LOG\"\n\
        printf '{\"result\": {\"key\": \"%s\"}}\\n' \"$1\"\n";
    Ok(crate::write_script(dir, "soak-task.sh", script))
}

/// A worker's TOML: its name, the ack deadline when shortened, and the task program.
fn worker_toml(name: &str, ack_deadline_s: Option<f64>, program: &Path, log: &Path) -> String {
    let mut toml = format!("# The soak's worker {name}.\nname = {name:?}\n");
    if let Some(seconds) = ack_deadline_s {
        toml.push_str(&format!(
            "# Shortened from the shipped 30 s so redeliveries happen within the run.\n\
             ack_deadline_s = {seconds:?}\n"
        ));
    }
    toml.push_str(&format!(
        "[programs.{PROGRAM}]\npath = {program:?}\nenv = {{ SOAK_LOG = {log:?} }}\n"
    ));
    toml
}
