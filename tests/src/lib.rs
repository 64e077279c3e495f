//! The end-to-end test harness: a real nats-server per test on a random port, the services
//! started in-process (through the same `run` functions `claw up` calls) or as real child
//! processes (the built `claw-*` binaries), and waits that poll a condition with a deadline.
//!
//! Set `KEEP_TEST_DIRS=1` to keep each test's directory (server log, store, SQLite file).
//!
//! [`deploy`] starts the deployment as shipped: nats-server from the repository's config files,
//! the services as processes running as their NATS roles.

pub mod deploy;
pub mod soak;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use claw_proto::connect::{self, NatsArgs};
use claw_proto::nats_server::{self, NatsServer};
use claw_proto::topology::{self, Settings, Topology};

/// A test's scratch directory; removed on drop unless `KEEP_TEST_DIRS=1`.
#[derive(Debug)]
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    pub fn new() -> TestDir {
        let dir = tempfile::Builder::new().prefix("claw-test-").tempdir().expect("temp dir");
        let path = dir.path().to_owned();
        if std::env::var_os("KEEP_TEST_DIRS").is_some() {
            eprintln!("test dir kept: {}", path.display());
            return TestDir { dir: None, path: dir.keep() };
        }
        TestDir { dir: Some(dir), path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for TestDir {
    fn default() -> Self {
        TestDir::new()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        drop(self.dir.take());
    }
}

/// A nats-server with JetStream, started for one test.
#[derive(Debug)]
pub struct Nats {
    pub server: NatsServer,
    pub dir: TestDir,
}

impl Nats {
    pub fn start() -> Nats {
        init_tracing();
        let dir = TestDir::new();
        let server = NatsServer::start(nats_server::Options::in_dir(dir.path().join("nats")))
            .unwrap_or_else(|e| panic!("starting nats-server: {e}"));
        Nats { server, dir }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn args(&self) -> NatsArgs {
        NatsArgs::url(self.url())
    }

    /// A fresh client, as a service would have.
    pub async fn client(&self) -> async_nats::Client {
        connect::connect(&self.args(), "claw-test").await.expect("connect to test nats-server")
    }

    pub async fn jetstream(&self) -> jetstream::Context {
        connect::jetstream(self.client().await)
    }

    /// Ensures the topology with test settings (see [`test_settings`]).
    pub async fn topology(&self, settings: &Settings) -> Topology {
        let js = self.jetstream().await;
        topology::ensure(&js, settings).await.expect("ensure topology")
    }
}

/// Settings for tests: a two-second ack deadline so redelivery is observable quickly.
pub fn test_settings() -> Settings {
    Settings { ack_wait_s: Some(2.0), ..Settings::standard() }
}

/// Waits until `check` returns `Some`, polling every 20 ms, or panics after `timeout` with
/// `what` and the last value seen by `describe`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The path of a binary built from this workspace (`cargo build --bins` first; the test
/// command does). Found next to the test executable: `target/<profile>/deps/e2e-*` → `target/<profile>/`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target profile dir");
    let path = dir.join(name);
    assert!(path.is_file(), "{} not built: run `cargo build --bins` first", path.display());
    path
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A service running in-process on the test's runtime, stopped by cancelling its token.
#[derive(Debug)]
pub struct Running {
    pub token: tokio_util::sync::CancellationToken,
    pub handle: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Cancels the service and waits for it to return.
    pub async fn stop(mut self) {
        self.token.cancel();
        let handle = std::mem::replace(&mut self.handle, tokio::spawn(async {}));
        let _ = tokio::time::timeout(Duration::from_secs(30), handle).await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// A gateway served in-process on a random loopback port.
#[derive(Debug)]
pub struct Gateway {
    pub url: String,
    pub running: Running,
}

impl Gateway {
    pub async fn start(topology: &Topology, args: &[&str]) -> Gateway {
        let config = claw_gateway::Config::from_args(args).expect("gateway flags");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let token = tokio_util::sync::CancellationToken::new();
        let (topology, run_token) = (topology.clone(), token.clone());
        let handle = tokio::spawn(async move {
            if let Err(e) = claw_gateway::run(topology, config, listener, run_token).await {
                panic!("gateway failed: {e}");
            }
        });
        Gateway { url, running: Running { token, handle } }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }
}

/// Messages currently in a stream.
pub async fn stream_messages(js: &jetstream::Context, stream: &str) -> u64 {
    let mut s = js.get_stream(stream).await.expect("stream");
    s.info().await.expect("stream info").state.messages
}

/// Keys currently in the `tasks` bucket (live records, not deleted).
pub async fn record_count(topology: &Topology) -> usize {
    use futures::TryStreamExt;
    match topology.tasks_kv.keys().await {
        Ok(keys) => keys.try_collect::<Vec<_>>().await.map(|k| k.len()).unwrap_or(0),
        Err(_) => 0,
    }
}

/// A worker run in-process with the given TOML configuration.
pub fn start_worker(topology: &Topology, toml: &str) -> Running {
    let config = claw_worker::Config::from_toml_str(toml).expect("worker config");
    let token = tokio_util::sync::CancellationToken::new();
    let (topology, run_token) = (topology.clone(), token.clone());
    let handle = tokio::spawn(async move {
        if let Err(e) = claw_worker::run(topology, config, run_token).await {
            panic!("worker failed: {e}");
        }
    });
    Running { token, handle }
}

/// The archiver's configuration as its binary's defaults give it, writing to `db`; tests
/// shorten what they need (`Config { retention: .., ..archiver_config(db) }`).
pub fn archiver_config(db: &Path) -> claw_archiver::Config {
    claw_archiver::Config::from_args([std::ffi::OsStr::new("--db"), db.as_os_str()])
        .expect("archiver flags")
}

/// The archiver run in-process with its default settings, writing to `db`.
pub fn start_archiver(topology: &Topology, db: &Path) -> Running {
    start_archiver_with(topology, archiver_config(db))
}

/// The archiver run in-process with `config`.
pub fn start_archiver_with(topology: &Topology, config: claw_archiver::Config) -> Running {
    let token = tokio_util::sync::CancellationToken::new();
    let (topology, run_token) = (topology.clone(), token.clone());
    let handle = tokio::spawn(async move {
        if let Err(e) = claw_archiver::run(topology, config, run_token).await {
            panic!("archiver failed: {e}");
        }
    });
    Running { token, handle }
}

/// The task ids in the archive's `tasks` table (read-only; only the archiver writes).
pub async fn archived_ids(db: &Path) -> std::collections::HashSet<String> {
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(db).read_only(true);
    let Ok(mut conn) = sqlx::ConnectOptions::connect(&options).await else {
        return Default::default();
    };
    sqlx::query_scalar("SELECT id FROM tasks")
        .fetch_all(&mut conn)
        .await
        .map(|ids| ids.into_iter().collect())
        .unwrap_or_default()
}

/// Rows in the archive's `tasks` table (read-only; only the archiver writes).
pub async fn archived_rows(db: &Path) -> i64 {
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(db).read_only(true);
    let Ok(mut conn) = sqlx::ConnectOptions::connect(&options).await else { return 0 };
    sqlx::query_scalar("SELECT count(*) FROM tasks").fetch_one(&mut conn).await.unwrap_or(0)
}

/// POSTs `body` as JSON (none: an empty body) and returns the answer's JSON, whatever its
/// status; panics on a transport error or an answer that is not JSON.
pub async fn post_json(
    http: &reqwest::Client,
    url: &str,
    body: Option<&serde_json::Value>,
) -> serde_json::Value {
    let mut request = http.post(url);
    if let Some(body) = body {
        request = request.header("content-type", "application/json").body(body.to_string());
    }
    let response = request.send().await.unwrap_or_else(|e| panic!("POST {url}: {e}"));
    response.json().await.unwrap_or_else(|e| panic!("POST {url}: the answer is not JSON: {e}"))
}

/// The `id` of a submit's answer; panics (showing the answer) when there is none.
pub fn id_of(answer: &serde_json::Value) -> String {
    answer["id"].as_str().unwrap_or_else(|| panic!("no task id in {answer}")).to_owned()
}

/// GETs `url` and returns the answer's JSON as `T`; panics on a transport error or an answer
/// that does not parse.
pub async fn get_json<T: serde::de::DeserializeOwned>(http: &reqwest::Client, url: &str) -> T {
    let response = http.get(url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    response.json().await.unwrap_or_else(|e| panic!("GET {url}: the answer does not parse: {e}"))
}

/// The record of `id` from the bucket, if present.
pub async fn record(topology: &Topology, id: &str) -> Option<claw_proto::TaskRecord> {
    let bytes = topology.tasks_kv.get(id).await.ok()??;
    serde_json::from_slice(&bytes).ok()
}

/// Sends `sig` to process `pid`; a stale pid at worst signals nothing.
pub fn signal(pid: u32, sig: libc::c_int) {
    use nix::sys::signal::{Signal, kill};
    if let (Ok(pid), Ok(sig)) = (i32::try_from(pid), Signal::try_from(sig)) {
        let _ = kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// Generous bound for any single wait in a test; tests normally finish far sooner.
pub const WAIT: Duration = Duration::from_secs(20);

/// The `queued` record the gateway would make of `spec` under `id`, admitted with the standard
/// limits and kinds; panics when the spec is not admissible.
pub fn admit(spec: serde_json::Value, id: &claw_proto::TaskId) -> claw_proto::TaskRecord {
    use claw_proto::kinds::Catalog;
    use claw_proto::spec::{Limits, TaskSpec};
    let spec: TaskSpec = serde_json::from_value(spec).expect("spec");
    let now = time::OffsetDateTime::now_utc();
    spec.admit(id.clone(), now, None, &Catalog::builtin(), &Limits::STANDARD).expect("admit")
}

/// Mimics the gateway's submit without one: admits `spec` into a `queued` record, creates it,
/// then publishes the spec to its lane and waits for the JetStream ack. Returns the id.
pub async fn submit_direct(topology: &Topology, spec: serde_json::Value) -> claw_proto::TaskId {
    let id = spec["id"]
        .as_str()
        .map(|id| claw_proto::TaskId::parse(id).expect("a valid id"))
        .unwrap_or_else(claw_proto::TaskId::generate);
    let record = admit(spec, &id);
    topology.records.create(&record).await.expect("create record");
    let lane = topology::Lane::new(record.class, record.priority);
    let body = serde_json::to_vec(&claw_proto::spec::TaskSpec::of_record(&record)).unwrap();
    topology.js.publish(lane.subject(), body.into()).await.unwrap().await.expect("publish ack");
    id
}

/// Waits until the record of `id` has `status`, and returns it.
pub async fn wait_status(
    topology: &Topology,
    id: &(impl std::fmt::Display + ?Sized),
    status: claw_proto::Status,
) -> claw_proto::TaskRecord {
    let id = id.to_string();
    wait_for(&format!("task {id} {status}"), WAIT, || async {
        record(topology, &id).await.filter(|r| r.status == status)
    })
    .await
}

/// Checks `holds` every 20 ms for `window`, panicking with `what` the first time it fails:
/// the opposite of `wait_for`, for "this does not happen" (no redelivery, no CPU while paused).
pub async fn holds_for<F, Fut>(what: &str, window: Duration, mut holds: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let end = Instant::now() + window;
    while Instant::now() < end {
        if let Err(seen) = holds().await {
            panic!("{what} stopped holding: {seen}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every message currently stored in `stream`, in order.
pub async fn stream_contents(
    js: &jetstream::Context,
    stream: &str,
) -> Vec<jetstream::message::StreamMessage> {
    let mut s = js.get_stream(stream).await.expect("stream");
    let info = s.info().await.expect("stream info");
    let mut out = Vec::new();
    for seq in info.state.first_sequence..=info.state.last_sequence {
        if let Ok(m) = s.get_raw_message(seq).await {
            out.push(m);
        }
    }
    out
}

/// The events of task `id` in `PROGRESS`, in stream order.
pub async fn events_of(
    js: &jetstream::Context,
    id: &(impl std::fmt::Display + ?Sized),
) -> Vec<claw_proto::event::Event> {
    let id = id.to_string();
    stream_contents(js, topology::PROGRESS_STREAM)
        .await
        .iter()
        .map(|m| serde_json::from_slice::<claw_proto::event::Event>(&m.payload).expect("event"))
        .filter(|e| e.task_id.as_str() == id)
        .collect()
}

/// The `(status, attempt)` of each status event.
pub fn statuses(events: &[claw_proto::event::Event]) -> Vec<(claw_proto::Status, u32)> {
    use claw_proto::event::EventBody;
    events
        .iter()
        .filter_map(|e| match e.body {
            EventBody::Status { status, attempt, .. } => Some((status, attempt)),
            _ => None,
        })
        .collect()
}

/// The `fraction` of each progress event.
pub fn fractions(events: &[claw_proto::event::Event]) -> Vec<f64> {
    use claw_proto::event::EventBody;
    events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Progress(p) => Some(p.fraction),
            _ => None,
        })
        .collect()
}

/// Writes an executable script.
pub fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A `claw-worker` process started with a TOML configuration; SIGKILLed when dropped.
#[derive(Debug)]
pub struct WorkerProcess {
    pub child: std::process::Child,
}

impl WorkerProcess {
    /// Starts `claw-worker --config <dir>/<name>.toml --nats-url <nats>`.
    pub fn start(nats: &Nats, name: &str, toml: &str) -> WorkerProcess {
        let config = nats.dir.path().join(format!("{name}.toml"));
        std::fs::write(&config, toml).unwrap();
        let child = std::process::Command::new(bin("claw-worker"))
            .arg("--config")
            .arg(&config)
            .arg("--nats-url")
            .arg(nats.url())
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn claw-worker");
        WorkerProcess { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The resident set size of process `pid` in bytes (`VmRSS`), if it runs.
pub fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|kb| kb * 1024)
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = stat.rsplit(')').next().unwrap_or("").trim_start().chars().next();
    !matches!(state, None | Some('Z'))
}

/// Asks worker `name` for its status (`claw.worker.<name>.status`).
pub async fn worker_status(
    client: &async_nats::Client,
    name: &str,
) -> Option<claw_worker::status::WorkerStatus> {
    let subject = claw_worker::status::subject_of(name);
    let reply =
        tokio::time::timeout(Duration::from_secs(2), client.request(subject, Vec::new().into()))
            .await
            .ok()?
            .ok()?;
    serde_json::from_slice(&reply.payload).ok()
}

/// The real path of `python3` (a pyenv shim does not work in a task's clean environment).
pub fn python3() -> PathBuf {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 runs");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

// ---- Per-role NATS users (`nats/accounts/claw.conf`) and a 3-node JetStream cluster. ----

/// The users of `nats/accounts/claw.conf`.
pub const ROLES: [&str; 8] =
    ["gateway", "worker", "archiver", "publisher", "operator", "admin", "sys", "openclaw"];

/// The test password of `role`.
pub fn role_password(role: &str) -> String {
    format!("test-{role}-password")
}

/// The server's errors of one connection (permission violations), as strings.
pub type ServerErrors = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// A client connected as one NATS user of the shipped config (password [`role_password`], its
/// own inbox prefix `_INBOX.<user>`, as the roles and the tenant template say) that records the
/// server's errors, so a test can wait for the server to refuse what the user may not do.
pub struct AsUser {
    pub user: &'static str,
    pub client: async_nats::Client,
    pub errors: ServerErrors,
}

impl AsUser {
    pub async fn connect(nats: &Nats, user: &'static str) -> AsUser {
        let errors = ServerErrors::default();
        let sink = errors.clone();
        let client =
            async_nats::ConnectOptions::with_user_and_password(user.into(), role_password(user))
                .custom_inbox_prefix(format!("_INBOX.{user}"))
                .request_timeout(Some(Duration::from_secs(5)))
                .event_callback(move |event| {
                    let sink = sink.clone();
                    async move {
                        if let async_nats::Event::ServerError(e) = event {
                            sink.lock().unwrap().push(e.to_string());
                        }
                    }
                })
                .connect(nats.url())
                .await
                .unwrap_or_else(|e| panic!("connect as {user}: {e}"));
        AsUser { user, client, errors }
    }

    pub fn js(&self) -> async_nats::jetstream::Context {
        claw_proto::connect::jetstream(self.client.clone())
    }

    /// Whether the server reported a permission violation naming `subject`.
    pub fn violated(&self, subject: &str) -> bool {
        self.errors.lock().unwrap().iter().any(|e| {
            e.to_lowercase().contains("permissions violation")
                && e.contains(&format!("\"{subject}\""))
        })
    }

    async fn await_violation(&self, what: &str, subject: &str) {
        let user = self.user;
        wait_for(&format!("{user} refused to {what} {subject}"), WAIT, || async {
            self.violated(subject).then_some(())
        })
        .await;
    }

    /// Publishes to `subject` and waits for the server to refuse it.
    pub async fn refused_publish(&self, subject: &str) {
        self.client.publish(subject.to_owned(), "{}".into()).await.unwrap();
        self.client.flush().await.unwrap();
        self.await_violation("publish to", subject).await;
    }

    /// Subscribes to `subject` and waits for the server to refuse it.
    pub async fn refused_subscribe(&self, subject: &str) {
        let _sub = self.client.subscribe(subject.to_owned()).await.unwrap();
        self.client.flush().await.unwrap();
        self.await_violation("subscribe to", subject).await;
    }

    /// No server error at all so far (what the user did before was allowed).
    pub fn clean(&self) {
        let errors = self.errors.lock().unwrap();
        assert!(errors.is_empty(), "{} saw server errors: {errors:?}", self.user);
    }
}

/// Writes `<dir>/claw.conf`: `nats/accounts/claw.conf` verbatim, after definitions of its
/// `$CLAW_<ROLE>_PASSWORD` variables (so the server needs no environment).
pub fn write_role_config(dir: &Path) -> PathBuf {
    write_tenant_config(dir, &[])
}

/// [`write_role_config`] with a user per name in `tenants`, made from the file's commented tenant
/// template as its instructions say (uncommented, `$TENANT_PASSWORD` → `$CLAW_<NAME>_PASSWORD`,
/// `TENANT` → the name); each password is [`role_password`] of the name.
pub fn write_tenant_config(dir: &Path, tenants: &[&str]) -> PathBuf {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../nats/accounts/claw.conf"))
            .expect("nats/accounts/claw.conf");
    let mut text = String::new();
    for role in ROLES.iter().chain(tenants) {
        text.push_str(&format!(
            "CLAW_{}_PASSWORD: {:?}\n",
            role.to_uppercase().replace('-', "_"),
            role_password(role)
        ));
    }
    if tenants.is_empty() {
        text.push_str(&shipped);
    } else {
        let (begin, end) = ("# BEGIN tenant template\n", "# END tenant template\n");
        let start = shipped.find(begin).expect("claw.conf: the tenant template") + begin.len();
        let len = shipped[start..].find(end).expect("claw.conf: the template's end");
        let template: String = shipped[start..start + len]
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| line.trim_start().strip_prefix('#').expect("a commented line"))
            .map(|line| format!("{}\n", line.strip_prefix(' ').unwrap_or(line)))
            .collect();
        let users: String = tenants
            .iter()
            .map(|name| {
                let variable = format!("$CLAW_{}_PASSWORD", name.to_uppercase().replace('-', "_"));
                template.replace("$TENANT_PASSWORD", &variable).replace("TENANT", name)
            })
            .collect();
        text.push_str(&shipped[..start]);
        text.push_str(&users);
        text.push_str(&shipped[start..]);
    }
    std::fs::create_dir_all(dir).expect("config dir");
    let path = dir.join("claw.conf");
    std::fs::write(&path, text).expect("write claw.conf");
    path
}

impl Nats {
    /// A server with the per-role users of `nats/accounts/claw.conf` (no anonymous access).
    pub fn start_secure() -> Nats {
        Nats::start_secure_with_tenants(&[])
    }

    /// [`Nats::start_secure`] with a tenant user per name ([`write_tenant_config`]).
    pub fn start_secure_with_tenants(tenants: &[&str]) -> Nats {
        init_tracing();
        let dir = TestDir::new();
        let config = write_tenant_config(&dir.path().join("conf"), tenants);
        let options = nats_server::Options {
            config: Some(config),
            ..nats_server::Options::in_dir(dir.path().join("nats"))
        };
        let server =
            NatsServer::start(options).unwrap_or_else(|e| panic!("starting nats-server: {e}"));
        Nats { server, dir }
    }

    /// Connection flags for `role`, with its own inbox prefix.
    pub fn role(&self, role: &str) -> NatsArgs {
        self.args().with_user(role, &role_password(role))
    }

    /// The topology as `role` sees it after `topology::ensure` (what each binary does at start).
    pub async fn role_topology(&self, role: &str, settings: &Settings) -> Topology {
        let client = connect::connect(&self.role(role), role).await.expect("connect as role");
        topology::ensure(&connect::jetstream(client), settings)
            .await
            .unwrap_or_else(|e| panic!("ensure the topology as {role}: {e}"))
    }
}

/// `n` distinct loopback ports that were free a moment ago (bound together, then released):
/// whoever uses them must cope with one being taken meanwhile.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> =
        (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("free port")).collect();
    listeners.iter().map(|l| l.local_addr().expect("addr").port()).collect()
}

/// Three nats-server processes forming one JetStream cluster on loopback (configs written like
/// `nats/cluster/n*.conf`, with free ports), each with its own store.
#[derive(Debug)]
pub struct Cluster {
    pub nodes: Vec<NatsServer>,
    pub dir: TestDir,
}

impl Cluster {
    pub fn start() -> Cluster {
        init_tracing();
        let dir = TestDir::new();
        let ports = free_ports(3);
        let routes: Vec<String> =
            ports.iter().map(|p| format!("\"nats-route://127.0.0.1:{p}\"")).collect();
        let nodes = (0..3)
            .map(|i| {
                let node = dir.path().join(format!("n{}", i + 1));
                std::fs::create_dir_all(&node).expect("node dir");
                let config = node.join("node.conf");
                // The harness gives the store (`-sd <node>/jetstream`) and the client port.
                let text = format!(
                    "server_name: n{}\n\
                     cluster {{\n  name: claw\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                    i + 1,
                    ports[i],
                    routes.join(", ")
                );
                std::fs::write(&config, text).expect("write node config");
                let options = nats_server::Options {
                    config: Some(config),
                    ..nats_server::Options::in_dir(&node)
                };
                NatsServer::start(options)
                    .unwrap_or_else(|e| panic!("starting node {}: {e}", i + 1))
            })
            .collect();
        Cluster { nodes, dir }
    }

    /// Every node's client URL, comma separated (what `--nats-url` takes).
    pub fn url(&self) -> String {
        self.nodes.iter().map(NatsServer::url).collect::<Vec<_>>().join(",")
    }

    pub fn args(&self) -> NatsArgs {
        NatsArgs::url(self.url())
    }

    /// Ensures the topology once the cluster has a meta leader (retrying until it has).
    pub async fn topology(&self, settings: &Settings) -> Topology {
        let client = connect::connect(&self.args(), "claw-test").await.expect("connect to cluster");
        let js = connect::jetstream(client);
        wait_for(
            "the cluster to elect a meta leader and take the topology",
            Duration::from_secs(60),
            || async {
                match topology::ensure(&js, settings).await {
                    Ok(t) => Some(t),
                    Err(e) => {
                        tracing::debug!(error = %e, "topology not ensured yet");
                        None
                    }
                }
            },
        )
        .await
    }

    /// The index of the node named by a `cluster.leader` (`n1`..`n3`).
    pub fn index_of(&self, server_name: &str) -> Option<usize> {
        server_name.strip_prefix('n')?.parse::<usize>().ok()?.checked_sub(1).filter(|&i| i < 3)
    }
}
