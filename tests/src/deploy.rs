//! The deployment as shipped: nats-server started from the repository's own config files
//! (`nats/server/single.conf`, `nats/cluster/n1-3.conf`, with the per-role users of
//! `nats/accounts/claw.conf`), and the services as real processes (`claw-gateway`,
//! `claw-worker`, `claw-archiver`) connected as their roles with their default settings.
//!
//! The config files are used verbatim through a two-line wrapper in the test's directory that
//! includes the shipped file and points the JetStream store into the test directory (the files
//! name `/var/lib/nats` and `./.data`, and nats-server refuses `-sd` beside them). Client,
//! monitoring and cluster ports are the only other overrides, given as flags, so that tests can
//! run side by side and on a machine that already runs a nats-server.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use claw_proto::nats_server::{self, NatsServer};

use crate::{ROLES, TestDir, bin, init_tracing, role_password};

/// The repository root (the shipped files are read from there, not copied).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("repository root")
}

/// `CLAW_<ROLE>_PASSWORD` for every role: what the shipped configs read from the environment.
pub fn role_passwords() -> Vec<(String, String)> {
    ROLES
        .iter()
        .map(|r| (format!("CLAW_{}_PASSWORD", r.to_uppercase()), role_password(r)))
        .collect()
}

/// A relative path from `from` (a directory) to `to`: nats-server resolves an `include`
/// relative to the including file and does not take absolute ones.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from.components().collect();
    let to_parts: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to_parts).take_while(|(a, b)| a == b).count();
    let mut path = PathBuf::new();
    for _ in common..from.len() {
        path.push("..");
    }
    for part in &to_parts[common..] {
        path.push(part);
    }
    path
}

/// Writes `<dir>/server.conf`: the shipped `config` (a path under the repository) included
/// as it is, with the JetStream store in `<dir>/jetstream`.
fn wrap_config(dir: &Path, config: &str) -> PathBuf {
    std::fs::create_dir_all(dir).expect("server dir");
    let dir = dir.canonicalize().expect("server dir");
    let shipped = repo_root().join(config);
    let text = format!(
        "# The shipped {config}, with the store in this test's directory.\n\
         include {:?}\n\
         jetstream {{ store_dir: {:?} }}\n",
        relative(&dir, &shipped),
        dir.join("jetstream"),
    );
    let path = dir.join("server.conf");
    std::fs::write(&path, text).expect("write server.conf");
    path
}

fn shipped_options(dir: &Path, config: &str, extra_args: Vec<String>) -> nats_server::Options {
    nats_server::Options {
        config: Some(wrap_config(dir, config)),
        store_in_config: true,
        env: role_passwords(),
        // A random monitoring port: the files' 8222 may be taken.
        extra_args: [vec!["-m".into(), "-1".into()], extra_args].concat(),
        ..nats_server::Options::in_dir(dir)
    }
}

/// The lines of a server log that report a permissions violation.
pub fn violations(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Violation"))
        .map(str::to_owned)
        .collect()
}

/// One server or a cluster started from the shipped files.
#[derive(Debug)]
pub struct Shipped {
    pub nodes: Vec<NatsServer>,
    dirs: Vec<PathBuf>,
    pub dir: TestDir,
}

impl Shipped {
    /// `nats/server/single.conf`.
    pub fn single() -> Shipped {
        init_tracing();
        let dir = TestDir::new();
        let node = dir.path().join("nats");
        let options = shipped_options(&node, "nats/server/single.conf", Vec::new());
        let server = NatsServer::start(options)
            .unwrap_or_else(|e| panic!("starting nats-server from single.conf: {e}"));
        Shipped { nodes: vec![server], dirs: vec![node], dir }
    }

    /// `nats/cluster/n1.conf`, `n2.conf`, `n3.conf`: three nodes of one JetStream cluster.
    pub fn cluster() -> Shipped {
        init_tracing();
        let dir = TestDir::new();
        // Bound and released: a port taken meanwhile by another test fails the start, which
        // is retried with new ports.
        for _ in 0..5 {
            let ports = crate::free_ports(3);
            let routes: Vec<String> =
                ports.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect();
            let mut nodes = Vec::new();
            let mut dirs = Vec::new();
            for (i, port) in ports.iter().enumerate() {
                let node = dir.path().join(format!("n{}", i + 1));
                let args = vec![
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{port}"),
                    "--routes".into(),
                    routes.join(","),
                ];
                let config = format!("nats/cluster/n{}.conf", i + 1);
                match NatsServer::start(shipped_options(&node, &config, args)) {
                    Ok(server) => nodes.push(server),
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster node did not start; new ports");
                        break;
                    }
                }
                dirs.push(node);
            }
            if nodes.len() == 3 {
                return Shipped { nodes, dirs, dir };
            }
        }
        panic!("could not start the shipped 3-node cluster");
    }

    /// Every node's client URL, comma separated (what `NATS_URL` takes).
    pub fn url(&self) -> String {
        self.nodes.iter().map(NatsServer::url).collect::<Vec<_>>().join(",")
    }

    /// Streams and consumers need as many replicas as there are nodes.
    pub fn replicas(&self) -> usize {
        self.nodes.len()
    }

    /// Every permissions violation any node logged.
    pub fn violations(&self) -> Vec<String> {
        self.dirs.iter().flat_map(|d| violations(&d.join("nats-server.log"))).collect()
    }

    /// The environment of a service connecting as `role`, as compose.yaml sets it.
    pub fn role_env(&self, role: &str) -> Vec<(String, String)> {
        vec![
            ("NATS_URL".into(), self.url()),
            ("NATS_USER".into(), role.into()),
            ("NATS_PASSWORD".into(), role_password(role)),
            ("NATS_INBOX_PREFIX".into(), format!("_INBOX.{role}")),
            ("CLAW_REPLICAS".into(), self.replicas().to_string()),
        ]
    }
}

/// A service binary running as a child process, its output (logs go to stdout, errors at start
/// to stderr) in `<dir>/<name>.log`; killed on drop.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

/// Variables a test run may have set that would change a service's defaults.
const CLEARED: [&str; 11] = [
    "CLAW_ACK_WAIT_S",
    "CLAW_RECORD_RETENTION_S",
    "CLAW_RETENTION_SWEEP_S",
    "CLAW_RECONCILE_INTERVAL_S",
    "CLAW_RECONCILE_GRACE_S",
    "CLAW_WORKER_CONFIG",
    "CLAW_QUEUE_MAX",
    "CLAW_TOKENS_FILE",
    "CLAW_HTTP",
    "CLAW_REPLICAS",
    "NATS_URL",
];

impl Service {
    /// Starts `bin_name` (a workspace binary) with `args` and `env`, and nothing else of the
    /// test's environment that would change its defaults; its output goes to `<dir>/<name>.log`.
    pub fn start(
        dir: &Path,
        name: &str,
        bin_name: &str,
        args: &[&str],
        env: &[(String, String)],
    ) -> Service {
        let log = dir.join(format!("{name}.log"));
        let stdout = std::fs::File::create(&log).expect("service log");
        let stderr = stdout.try_clone().expect("service log");
        let mut command = Command::new(bin(bin_name));
        for var in CLEARED {
            command.env_remove(var);
        }
        let child = command
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {bin_name}: {e}"));
        Service { name: name.to_owned(), child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics, showing its log, if it has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited with {status}:\n{}", self.name, self.log_text());
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `claw-gateway` process on a free loopback port, ready (its `/readyz` answers 200).
#[derive(Debug)]
pub struct GatewayService {
    pub service: Service,
    pub url: String,
}

impl GatewayService {
    pub async fn start(
        dir: &Path,
        name: &str,
        args: &[&str],
        env: &[(String, String)],
    ) -> GatewayService {
        let http = reqwest::Client::new();
        for _ in 0..5 {
            let port =
                std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let address = format!("127.0.0.1:{port}");
            let args = [&["--http", address.as_str()], args].concat();
            let mut service = Service::start(dir, name, "claw-gateway", &args, env);
            let url = format!("http://{address}");
            let ready = wait_for_ready(&http, &url, &mut service).await;
            if ready {
                return GatewayService { service, url };
            }
            // The port was taken between our look and the gateway's bind: another one.
        }
        panic!("the gateway could not bind a free port");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }
}

/// Waits for `/readyz`; false if the process exited because its port was taken.
async fn wait_for_ready(http: &reqwest::Client, url: &str, service: &mut Service) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(format!("{url}/readyz")).send().await
            && r.status().is_success()
        {
            return true;
        }
        if let Ok(Some(status)) = service.child.try_wait() {
            let log = service.log_text();
            if log.contains("binding") && log.contains("in use") {
                return false;
            }
            panic!("claw-gateway exited with {status}:\n{log}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "claw-gateway not ready after 60 s:\n{}",
            service.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until a worker answers `claw.worker.status` on `client`, panicking with `worker`'s log
/// if it exits first.
pub async fn wait_for_worker(client: &async_nats::Client, worker: &mut Service) {
    let subject = claw_worker::status::ALL_SUBJECT;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        worker.assert_running();
        let asked = client.request(subject, Vec::new().into());
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), asked).await {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no worker status:\n{}", worker.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
