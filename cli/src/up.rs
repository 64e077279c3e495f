//! `claw up`: the embedded default. Everything lives under one data directory (mode 0700 when
//! `claw up` creates it): `nats/` (the JetStream store, the server's configuration and log, and
//! the users' credentials), `archive.sqlite` (the history).
//!
//! The embedded nats-server takes no anonymous connection: it runs with the role users of
//! `nats/accounts/claw.conf` (compiled in), each with a random password made on the data
//! directory's first start and kept in `nats/context/<role>.json` (mode 0600, in the `nats`
//! CLI's context format: `XDG_CONFIG_HOME=<data> nats --context admin ...`). So another local
//! user cannot reach the tasks around the gateway's API tokens; the files are protected by the
//! same Unix permissions as the store itself. The gateway, the worker and the archiver connect
//! as their roles, as in production.
//!
//! The services run through the same `run` functions their own binaries call, each with a child
//! of one cancellation token; the first to fail, or Ctrl-C / SIGTERM, stops them all, then the
//! embedded nats-server is stopped with SIGTERM so JetStream flushes its store.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use claw_proto::connect::{self, NatsArgs};
use claw_proto::nats_server::{self, NatsServer};
use claw_proto::topology::{self, Settings, Topology};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Directory for the JetStream store, the archive and logs.
    #[arg(long, env = "CLAW_DATA", default_value = "./.claw")]
    pub data: PathBuf,
    /// Address of the gateway (HTTP API and web UI).
    #[arg(long, env = "CLAW_HTTP", default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// Use this NATS server instead of starting one.
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,
    /// Client port of the embedded nats-server. Unset: 4222 when it is free, else a free one
    /// (another nats-server, or a second `claw up`, may hold 4222). A port given here is used
    /// or the start fails; 0 picks a free one.
    #[arg(long, env = "CLAW_NATS_PORT")]
    pub nats_port: Option<u16>,
    /// The worker's configuration file (TOML: programs for `exec`, pool sizes, ack deadline).
    #[arg(long, env = "CLAW_WORKER_CONFIG")]
    pub worker_config: Option<PathBuf>,
    #[command(flatten)]
    pub topology: Settings,
    #[command(flatten)]
    pub gateway: claw_gateway::Config,
    #[command(flatten)]
    pub retention: claw_archiver::retention::Settings,
    #[command(flatten)]
    pub reconcile: claw_archiver::reconcile::Settings,
}

/// How long the services get to drain after the stop signal before the process gives up on them.
const STOP_DEADLINE: Duration = Duration::from_secs(45);

/// The worker's configuration (`--worker-config`) with the secrets it names read. Called
/// before the runtime starts, so that the variables they came from can leave the environment
/// while the process has one thread (`claw_worker::Config::secret_vars`).
pub fn worker_config(args: &UpArgs) -> anyhow::Result<claw_worker::Config> {
    let mut config = match &args.worker_config {
        Some(path) => claw_worker::Config::load(path)?,
        None => claw_worker::Config::from_toml_str("")?,
    };
    config.read_secrets()?;
    Ok(config)
}

pub async fn run(
    args: UpArgs,
    worker_config: claw_worker::Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Before starting anything: a public address without tokens, or a bad tokens file.
    args.gateway.check_exposure(args.http)?;
    claw_gateway::auth::Auth::load(args.gateway.tokens.as_deref())?;
    let data = data_dir(&args.data)?;

    let mut server = None;
    let (nats_url, users) = match &args.nats_url {
        Some(url) => (url.clone(), None),
        None => {
            let dir = data.join("nats");
            let users = Users::load_or_make(&dir)?;
            let config = users.write_server_config(&dir)?;
            adopt_anonymous_store(&dir);
            let started = start_nats(dir, config, args.nats_port).await?;
            let url = started.url();
            users.write_contexts(&data.join("nats"), &url)?;
            server = Some(started);
            (url, Some(users))
        }
    };

    let result = serve(&args, &data, &nats_url, users.as_ref(), worker_config, shutdown).await;
    if let Some(mut server) = server {
        tokio::task::spawn_blocking(move || server.stop(Duration::from_secs(10))).await?;
    }
    result
}

/// Creates the data directory, readable by this user only (its store and archive hold every
/// task). One that exists is left as it is, with a warning when other users may read it.
fn data_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating data directory {}", dir.display()))?;
    let data = dir.canonicalize()?;
    let mode = std::fs::metadata(&data)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            dir = %data.display(),
            mode = format!("{:o}", mode & 0o777),
            "the data directory is open to other users, and holds every task's input and result \
             (the JetStream store, the archive): chmod 700 it"
        );
    }
    Ok(data)
}

/// The role users of `nats/accounts/claw.conf`, as the embedded server runs them.
const ACCOUNTS: &str =
    include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../nats/accounts/claw.conf"));

/// Every user of [`ACCOUNTS`]: the services', the outside clients' and the break-glass ones.
pub const ROLES: [&str; 8] =
    ["gateway", "worker", "archiver", "publisher", "operator", "openclaw", "admin", "sys"];

/// The users' passwords. `Debug` shows the roles only.
pub struct Users {
    passwords: BTreeMap<&'static str, String>,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users").field("roles", &self.passwords.keys()).finish()
    }
}

/// Where the credentials of `role` are: a `nats` CLI context file.
pub fn context_file(nats_dir: &Path, role: &str) -> PathBuf {
    nats_dir.join("context").join(format!("{role}.json"))
}

impl Users {
    /// The passwords kept in `<nats_dir>/context/`, and a new random one for each role that has
    /// none yet (the first start). Kept rather than made anew at every start, so a client
    /// configured with one (the OpenClaw plugin) still connects after a restart; to change
    /// them, delete the files.
    fn load_or_make(nats_dir: &Path) -> anyhow::Result<Users> {
        let mut passwords = BTreeMap::new();
        for role in ROLES {
            let kept = std::fs::read(context_file(nats_dir, role))
                .ok()
                .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
                .and_then(|v| v["password"].as_str().map(str::to_owned))
                .filter(|p| is_password(p));
            let password = match kept {
                Some(password) => password,
                None => random_password()?,
            };
            passwords.insert(role, password);
        }
        Ok(Users { passwords })
    }

    pub fn password(&self, role: &str) -> &str {
        &self.passwords[role]
    }

    /// Connection flags of `role` on the server at `url`, with its own inbox prefix.
    fn args(&self, url: &str, role: &str) -> NatsArgs {
        NatsArgs::url(url).with_user(role, self.password(role))
    }

    /// Writes `<nats_dir>/server.conf` (mode 0600) from [`ACCOUNTS`] and returns its path.
    fn write_server_config(&self, nats_dir: &Path) -> anyhow::Result<PathBuf> {
        private_dir(nats_dir)?;
        let path = nats_dir.join("server.conf");
        write_private(&path, server_config(&self.passwords)?.as_bytes())?;
        Ok(path)
    }

    /// Writes `<nats_dir>/context/<role>.json` (mode 0600, the directory 0700) for every role:
    /// the server's URL, the user, its password and its inbox prefix.
    fn write_contexts(&self, nats_dir: &Path, url: &str) -> anyhow::Result<()> {
        let dir = nats_dir.join("context");
        private_dir(&dir)?;
        for (role, password) in &self.passwords {
            let context = serde_json::json!({
                "description": format!("claw up: the {role} user of {}", nats_dir.display()),
                "url": url,
                "user": role,
                "password": password,
                "inbox_prefix": format!("_INBOX.{role}"),
            });
            let text = serde_json::to_vec_pretty(&context).expect("JSON serializes");
            write_private(&context_file(nats_dir, role), &text)?;
        }
        Ok(())
    }
}

/// Passwords are made here; anything else in a context file (an edit gone wrong) is replaced.
fn is_password(p: &str) -> bool {
    p.len() >= 32 && p.bytes().all(|b| b.is_ascii_hexdigit())
}

/// 24 random bytes, hex: a password no one guesses, that needs no quoting in a config file.
fn random_password() -> anyhow::Result<String> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// [`ACCOUNTS`] with each `$CLAW_<ROLE>_PASSWORD` replaced by its password, and the `CLAW`
/// account's JetStream limits lifted (`jetstream: enabled`): those are sized for a server of
/// its own (10 GB of disk, 256 MB of memory), and nats-server refuses to start where less is
/// free, which a laptop's `claw up` should not. The server's own limits (three quarters of the
/// free disk and memory) apply instead, as they did before `claw up` had users.
fn server_config(passwords: &BTreeMap<&'static str, String>) -> anyhow::Result<String> {
    let mut text = ACCOUNTS.to_owned();
    for (role, password) in passwords {
        let variable = format!("${}", password_variable(role));
        anyhow::ensure!(text.contains(&variable), "claw.conf has no {variable}");
        text = text.replace(&variable, &format!("\"{password}\""));
    }
    anyhow::ensure!(!text.contains("$CLAW_"), "claw.conf names a password claw up does not make");
    let start = text.find("jetstream: {").context("claw.conf: the account's jetstream block")?;
    let len = text[start..].find('}').context("claw.conf: the end of the jetstream block")? + 1;
    text.replace_range(start..start + len, "jetstream: enabled");
    Ok(format!(
        "# Written by `claw up` at every start: nats/accounts/claw.conf with this data directory's\n\
         # passwords (see context/), and no JetStream limits of its own.\n\n{text}"
    ))
}

/// `CLAW_<ROLE>_PASSWORD`: the variable `nats/accounts/claw.conf` takes `role`'s password from.
fn password_variable(role: &str) -> String {
    format!("CLAW_{}_PASSWORD", role.to_uppercase())
}

/// Creates `dir` if needed and makes it this user's only (0700).
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", dir.display()))
}

/// Writes `bytes` to `path` through a file created with mode 0600 and renamed over it, so the
/// secret is never readable by others, not even for a moment, and a reader never sees half.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes).with_context(|| format!("writing {}", tmp.display()))?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Moves a store written before `claw up` had users (JetStream's anonymous account `$G`) to
/// the `CLAW` account the users belong to, so the tasks of an existing data directory are still
/// there. A directory of each is a JetStream account's whole store on a single server.
fn adopt_anonymous_store(nats_dir: &Path) {
    let accounts = nats_dir.join("jetstream").join("jetstream");
    let (old, new) = (accounts.join("$G"), accounts.join("CLAW"));
    if !old.is_dir() {
        return;
    }
    if new.exists() {
        tracing::warn!(
            old = %old.display(),
            "a store of the anonymous account is left beside the CLAW account's; not used"
        );
        return;
    }
    match std::fs::rename(&old, &new) {
        Ok(()) => tracing::info!(
            store = %new.display(),
            "moved the store of a claw up without users to the CLAW account"
        ),
        Err(e) => tracing::warn!(error = %e, old = %old.display(), "cannot move the old store"),
    }
}

/// NATS's own port, which `claw up` prefers so that `nats` CLI defaults reach it.
const NATS_DEFAULT_PORT: u16 = 4222;

/// Starts the embedded nats-server with `config` on `port` (see [`UpArgs::nats_port`]).
async fn start_nats(
    dir: PathBuf,
    config: PathBuf,
    port: Option<u16>,
) -> anyhow::Result<NatsServer> {
    let start = move |port: Option<u16>| {
        let mut options = nats_server::Options::in_dir(dir.clone());
        options.config = Some(config.clone());
        options.port = port;
        async move { tokio::task::spawn_blocking(move || NatsServer::start(options)).await }
    };
    let started = match port {
        Some(0) => start(None).await?,
        Some(port) => start(Some(port)).await?,
        None => match start(Some(NATS_DEFAULT_PORT)).await? {
            Err(e) if e.is_address_in_use() => {
                tracing::info!(
                    "port {NATS_DEFAULT_PORT} is taken; the embedded nats-server takes a free one"
                );
                start(None).await?
            }
            started => started,
        },
    };
    started.context("starting the embedded nats-server")
}

/// Connects as `role` (as the user of that name on the embedded server, anonymously to a
/// server of `--nats-url`) and ensures the topology as that role sees it: the gateway first,
/// since only it may create the topology.
async fn connect_as(
    nats_url: &str,
    users: Option<&Users>,
    role: &str,
    settings: &Settings,
) -> anyhow::Result<Topology> {
    let args = match users {
        Some(users) => users.args(nats_url, role),
        None => NatsArgs::url(nats_url),
    };
    let client = connect::connect(&args, &format!("claw-up-{role}")).await?;
    let topology = topology::ensure_at_start(&connect::jetstream(client), settings)
        .await
        .with_context(|| format!("ensuring the topology as {role}"))?;
    Ok(topology)
}

async fn serve(
    args: &UpArgs,
    data: &std::path::Path,
    nats_url: &str,
    users: Option<&Users>,
    worker_config: claw_worker::Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let settings =
        Settings { ack_wait_s: Some(worker_config.ack_deadline_s), ..args.topology.clone() };
    let gateway_topology = connect_as(nats_url, users, "gateway", &settings).await?;
    let worker_topology = connect_as(nats_url, users, "worker", &settings).await?;
    let archiver_topology = connect_as(nats_url, users, "archiver", &settings).await?;
    let listener = tokio::net::TcpListener::bind(args.http)
        .await
        .with_context(|| format!("binding {}", args.http))?;
    let http = listener.local_addr()?;

    // Before any service starts, so the worker's and the archiver's first counts are kept: all
    // three record into this process's one recorder, shown by the gateway's `/metrics`.
    claw_proto::metrics::install();
    let mut services = JoinSet::new();
    let (t, token) = (gateway_topology, shutdown.child_token());
    let gateway = args.gateway.clone();
    services.spawn(async move {
        (
            "gateway",
            claw_gateway::run(t, gateway, listener, token).await.map_err(anyhow::Error::from),
        )
    });
    let (t, token) = (worker_topology, shutdown.child_token());
    services.spawn(async move {
        ("worker", claw_worker::run(t, worker_config, token).await.map_err(anyhow::Error::from))
    });
    let archiver = claw_archiver::Config {
        db: data.join("archive.sqlite"),
        batch_max: 256,
        batch_wait_ms: 20,
        retention: args.retention.clone(),
        reconcile: args.reconcile.clone(),
    };
    let (t, token) = (archiver_topology, shutdown.child_token());
    services.spawn(async move {
        ("archiver", claw_archiver::run(t, archiver, token).await.map_err(anyhow::Error::from))
    });

    println!("OpenClaw is up: http://{http}/");
    println!("  NATS:  {nats_url}");
    if users.is_some() {
        let contexts = data.join("nats").join("context");
        println!(
            "  users: {}/<role>.json (admin, operator, publisher, openclaw, ...)",
            contexts.display()
        );
        println!("         XDG_CONFIG_HOME={} nats --context admin stream ls", data.display());
    }
    println!("  data:  {}", data.display());
    println!("Ctrl-C stops it.");

    // The first service to stop (with an error, or because of the signal) stops the rest.
    let mut failure = None;
    if let Some(Ok((name, Err(e)))) = services.join_next().await {
        failure = Some(e.context(format!("{name} failed")));
    }
    shutdown.cancel();
    let drained = tokio::time::timeout(STOP_DEADLINE, async {
        while let Some(joined) = services.join_next().await {
            if let Ok((name, Err(e))) = joined {
                tracing::error!(service = name, error = %e, "stopped with an error");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("services did not stop within {STOP_DEADLINE:?}; leaving them");
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users() -> BTreeMap<&'static str, String> {
        ROLES.iter().enumerate().map(|(i, &r)| (r, format!("{i:0>48}"))).collect()
    }

    #[test]
    fn the_server_config_is_the_shipped_one_with_passwords_and_without_account_limits() {
        let passwords = users();
        let text = server_config(&passwords).unwrap();
        assert!(!text.contains("$CLAW_"), "{text}");
        for (role, password) in &passwords {
            let found = text.matches(&format!("\"{password}\"")).count();
            assert_eq!(found, 1, "{role}'s password in the config");
        }
        assert!(text.contains("jetstream: enabled"));
        assert!(!text.contains("max_file"), "{text}");
        // Every permission of the shipped file is still there.
        assert_eq!(
            text.matches("permissions: {").count(),
            ACCOUNTS.matches("permissions: {").count()
        );
    }

    #[test]
    fn passwords_are_kept_across_starts_and_files_are_private() {
        let dir = std::env::temp_dir().join(format!("claw-up-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = Users::load_or_make(&dir).unwrap();
        assert!(is_password(first.password("admin")));
        assert_ne!(first.password("admin"), first.password("operator"));
        first.write_contexts(&dir, "nats://127.0.0.1:1").unwrap();
        let again = Users::load_or_make(&dir).unwrap();
        assert_eq!(first.passwords, again.passwords);
        let file = context_file(&dir, "operator");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&file), mode(&dir.join("context"))), (0o600, 0o700));
        let context: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(context["user"], "operator");
        assert_eq!(context["inbox_prefix"], "_INBOX.operator");
        assert!(!format!("{again:?}").contains(again.password("admin")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
