//! A 3-node JetStream cluster on loopback for the cluster figures: three nats-server processes,
//! each with its own store and a minimal config (server name and cluster routes, no users: the
//! role users of `nats/cluster/n*.conf` are not what is measured), on free ports in a temp dir.
//! Dropping the [`Cluster`] kills the three servers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub struct Cluster {
    nodes: Vec<Node>,
    /// The HTTP monitoring port of a [`Cluster::single_monitored`] server.
    monitor: Option<u16>,
    _dir: tempfile::TempDir,
}

/// The server's message and byte counters (`/varz`), client traffic included.
#[derive(Clone, Copy, Debug, Default)]
pub struct Traffic {
    pub in_msgs: u64,
    pub out_msgs: u64,
    pub in_bytes: u64,
    pub out_bytes: u64,
}

/// One nats-server child; dropping it kills it.
struct Node {
    child: Child,
    port: u16,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// `NATS_SERVER_BIN`, else what `scripts/install-nats-server` installs, else `nats-server` on
/// `PATH` (the same binary `claw up` would embed).
fn nats_server_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(bin);
    }
    let installed =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/nats-server/bin/nats-server");
    if installed.is_file() { installed } else { PathBuf::from("nats-server") }
}

/// Starts nats-server with `config` in `node` and waits for the client port it reports in its
/// ports file (`--ports_file_dir`).
fn start_node(bin: &Path, node: &Path, config: &Path) -> anyhow::Result<Node> {
    let ports_dir = node.join("ports");
    std::fs::create_dir_all(&ports_dir)?;
    let log = node.join("nats-server.log");
    let mut child = Command::new(bin)
        .arg("-c")
        .arg(config)
        .args(["-a", "127.0.0.1", "-p", "-1", "-js"])
        .arg("-sd")
        .arg(node.join("jetstream"))
        .arg("--ports_file_dir")
        .arg(&ports_dir)
        .arg("-l")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} (scripts/install-nats-server)", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(port) = read_ports(&ports_dir) {
            return Ok(Node { child, port });
        }
        if let Some(status) = child.try_wait()? {
            bail!("nats-server exited during start-up with {status} (log: {})", log.display());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("nats-server reported no ports within 20 s (log: {})", log.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn read_ports(dir: &Path) -> Option<u16> {
    let entry = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "ports"))?;
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(entry.path()).ok()?).ok()?;
    let url = json["nats"].get(0).or_else(|| json["client"].get(0))?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

impl Cluster {
    /// Starts the three nodes and waits until the cluster has a meta leader that can place a
    /// stream with 3 replicas (so `claw up`'s topology set-up succeeds at the first try).
    pub async fn start() -> anyhow::Result<Cluster> {
        let dir = tempfile::Builder::new().prefix("claw-bench-cluster-").tempdir()?;
        let listeners = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<Vec<_>, _>>()?;
        let ports = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<Result<Vec<_>, _>>()?;
        drop(listeners);
        let routes: Vec<String> =
            ports.iter().map(|p| format!("\"nats-route://127.0.0.1:{p}\"")).collect();
        let bin = nats_server_bin();
        let mut nodes = Vec::with_capacity(3);
        for (i, port) in ports.iter().enumerate() {
            let node = dir.path().join(format!("n{}", i + 1));
            std::fs::create_dir_all(&node)?;
            let config = node.join("node.conf");
            // start_node adds the client port, `-js` and the store (`-sd <node>/jetstream`).
            std::fs::write(
                &config,
                format!(
                    "server_name: n{}\ncluster {{\n  name: claw\n  listen: 127.0.0.1:{port}\n  routes: [{}]\n}}\n",
                    i + 1,
                    routes.join(", ")
                ),
            )?;
            let bin = bin.clone();
            let started = tokio::task::spawn_blocking(move || start_node(&bin, &node, &config))
                .await?
                .with_context(|| format!("starting cluster node n{}", i + 1))?;
            nodes.push(started);
        }
        let cluster = Cluster { nodes, monitor: None, _dir: dir };
        cluster.wait_for_leader().await?;
        Ok(cluster)
    }

    /// One server with HTTP monitoring on, for the per-task traffic figures ([`Cluster::varz`]).
    pub async fn single_monitored() -> anyhow::Result<Cluster> {
        let dir = tempfile::Builder::new().prefix("claw-bench-single-").tempdir()?;
        let monitor = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let node = dir.path().join("n1");
        std::fs::create_dir_all(&node)?;
        let config = node.join("node.conf");
        std::fs::write(&config, format!("server_name: n1\nhttp: 127.0.0.1:{monitor}\n"))?;
        let bin = nats_server_bin();
        let started = tokio::task::spawn_blocking(move || start_node(&bin, &node, &config))
            .await?
            .context("starting the monitored nats-server")?;
        Ok(Cluster { nodes: vec![started], monitor: Some(monitor), _dir: dir })
    }

    /// How many servers: the replicas `claw up` should ask for.
    pub fn replicas(&self) -> usize {
        self.nodes.len()
    }

    /// The counters of a [`Cluster::single_monitored`] server.
    pub async fn varz(&self) -> anyhow::Result<Traffic> {
        let port = self.monitor.context("this server has no monitoring port")?;
        let v: serde_json::Value =
            reqwest::get(format!("http://127.0.0.1:{port}/varz")).await?.json().await?;
        let n = |k: &str| v[k].as_u64().with_context(|| format!("varz has no {k}"));
        Ok(Traffic {
            in_msgs: n("in_msgs")?,
            out_msgs: n("out_msgs")?,
            in_bytes: n("in_bytes")?,
            out_bytes: n("out_bytes")?,
        })
    }

    /// Every node's client URL, comma separated (what `claw up --nats-url` takes).
    pub fn url(&self) -> String {
        self.nodes.iter().map(Node::url).collect::<Vec<_>>().join(",")
    }

    /// Retries creating (then deleting) an R3 probe stream until it works: that needs a meta
    /// leader and all three peers known to it.
    async fn wait_for_leader(&self) -> anyhow::Result<()> {
        let client = connect(&self.url()).await?;
        let js = async_nats::jetstream::new(client);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let probe = async_nats::jetstream::stream::Config {
                name: "CLAW_BENCH_PROBE".into(),
                subjects: vec!["claw-bench.probe".into()],
                num_replicas: 3,
                storage: async_nats::jetstream::stream::StorageType::Memory,
                ..Default::default()
            };
            match js.get_or_create_stream(probe).await {
                Ok(_) => {
                    js.delete_stream("CLAW_BENCH_PROBE").await?;
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => {
                    bail!("the 3-node cluster has no meta leader after 60 s: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// Connects to one URL or a comma-separated list of them (async-nats does not split a string).
/// A `user:password@` in the first URL (how `start_claw` names the admin user of `claw up`'s
/// embedded server) becomes the connection's credentials, which async-nats does not take from a
/// URL itself.
pub async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    let urls: Vec<async_nats::ServerAddr> =
        url.split(',').map(|u| u.trim().parse()).collect::<Result<_, _>>()?;
    let options = match urls.first().map(|u| (u.username(), u.password())) {
        Some((Some(user), Some(password))) => {
            async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        }
        _ => async_nats::ConnectOptions::new(),
    };
    Ok(options.connect(urls).await?)
}

/// Fails unless every stream (the task lanes, the KV buckets, progress) has 3 replicas, so a row
/// labelled R3 is one.
pub async fn check_r3(nats_url: &str) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(connect(nats_url).await?);
    let mut streams = js.streams();
    let mut seen = 0;
    while let Some(info) = futures::StreamExt::next(&mut streams).await {
        let info = info?;
        if info.config.num_replicas != 3 {
            bail!("stream {} has {} replicas, not 3", info.config.name, info.config.num_replicas);
        }
        seen += 1;
    }
    if seen == 0 {
        bail!("no streams on the cluster");
    }
    Ok(())
}
