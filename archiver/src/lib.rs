//! The archiver: every task record that reaches a terminal state lands in SQLite, exactly once
//! per revision, and the history is served over NATS as `claw.archive.get` / `claw.archive.list`.
//! Once archived, a finished record leaves the `tasks` bucket after its retention: the archiver
//! is the only process that removes one. And it repairs records stranded without a lane message.
//!
//! It reads the `tasks` bucket's stream in order from a position kept in its own SQLite file,
//! committed with the rows, so it can be down for a while and catch up, and it is the only
//! process that touches SQLite.
//!
//! Reading order: [`run`] (wires the parts together), [`consume`] (read a batch from the
//! position, commit it with the position after it), [`store`] (the table, the revision-guarded upsert, keyset paging),
//! [`service`] (request parsing and the error shape of the replies), [`retention`] (removing
//! archived records from the bucket once their retention has passed) and [`reconcile`] (finding
//! records that wait or run without a lane message, and repairing them).
//!
//! The archiver is a singleton by deployment: one process, one SQLite file (compose runs one;
//! `claw up` has one).

pub mod consume;
pub mod reconcile;
pub mod retention;
pub mod service;
pub mod store;

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream;
use claw_proto::topology::Topology;
use tokio_util::sync::CancellationToken;

use crate::consume::{Batching, Position};
use crate::store::Store;

/// The archiver's configuration: `claw-archiver --help`, or the same flags flattened into
/// `claw up`.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// The SQLite file of the archive; created, with its schema, when missing.
    #[arg(long = "db", env = "CLAW_DB")]
    pub db: PathBuf,
    /// Most record revisions written in one SQLite transaction.
    ///
    /// One transaction per batch pays one fsync for many rows, which is what keeps up with a
    /// burst of finishing tasks; 256 rows commit in a few milliseconds.
    #[arg(
        long = "batch-max",
        env = "CLAW_ARCHIVER_BATCH_MAX",
        default_value_t = 256,
        value_parser = clap::value_parser!(u16).range(1..=10_000)
    )]
    pub batch_max: u16,
    /// Once a revision arrived, how long to wait for more to share its transaction.
    ///
    /// Short, so a finished task is in the history almost at once even when traffic is light.
    #[arg(long = "batch-wait-ms", env = "CLAW_ARCHIVER_BATCH_WAIT_MS", default_value_t = 20)]
    pub batch_wait_ms: u64,
    #[command(flatten)]
    pub retention: retention::Settings,
    #[command(flatten)]
    pub reconcile: reconcile::Settings,
}

impl Config {
    /// Parses flags as the binary would (for tests and embedders):
    /// `Config::from_args(["--db", "archive.sqlite"])`.
    pub fn from_args<I, T>(args: I) -> Result<Config, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        claw_proto::flags::parse("claw-archiver", args)
    }
}

/// What stops the archiver.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("archive database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("archive schema migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("NATS, {what}: {source}")]
    Nats {
        what: &'static str,
        #[source]
        source: async_nats::Error,
    },
    /// A row whose JSON no longer parses as a record: the model changed incompatibly.
    #[error("archived record {id} does not parse: {source}")]
    StoredRecord {
        id: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Sets `claw_archiver_lag` (revisions of the bucket past the archive's committed position:
/// written but not yet archived) on every scrape of `/metrics`.
fn lag_gauge(js: jetstream::Context, position: Position) -> claw_proto::metrics::ScrapeHook {
    claw_proto::metrics::on_scrape(move || {
        let (js, position) = (js.clone(), position.clone());
        async move {
            match consume::lag(&js, &position).await {
                Ok(lag) => metrics::gauge!("claw_archiver_lag").set(lag as f64),
                Err(e) => tracing::debug!(error = %e, "stream info for the lag gauge failed"),
            }
        }
    })
}

/// Archives until `shutdown`, then finishes the batch in hand and returns. `topology` must be
/// ensured (the bucket exists). Returns early with an error only when the database or
/// the service cannot be set up, or the service stops; NATS and SQLite hiccups while running are
/// logged and retried, since what is not committed is read again from the position.
pub async fn run(
    topology: Topology,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let store = Store::open(&config.db).await?;
    let position = Position::default();
    let _lag = lag_gauge(topology.js.clone(), position.clone());
    let client = topology.js.client();
    let batching = Batching {
        max: usize::from(config.batch_max),
        wait: Duration::from_millis(config.batch_wait_ms),
    };
    tracing::info!(db = %config.db.display(), batch_max = batching.max,
        retention_s = config.retention.retention_s, "archiver running");

    // Either the service or the consumer ending stops everything: an archive that cannot answer
    // is as broken as one that does not archive, and a supervisor restart is the cure for both.
    // The sweep and the reconciler only end when told to.
    let stop = shutdown.child_token();
    let (served, (), (), ()) = tokio::join!(
        async {
            let served = service::serve(client.clone(), store.clone(), stop.clone()).await;
            stop.cancel();
            served
        },
        async {
            let js = topology.js.clone();
            consume::consume(js, store.clone(), batching, position, stop.clone()).await;
            stop.cancel();
        },
        retention::run(
            topology.records.clone(),
            topology.payloads.clone(),
            store.clone(),
            config.retention,
            stop.clone(),
        ),
        reconcile::run(topology.clone(), store.clone(), config.reconcile, stop.clone()),
    );
    // The reconciler's and the retention sweep's last writes may be in the client's buffer.
    if let Err(e) = client.flush().await {
        tracing::warn!(error = %e, "flushing the last writes failed");
    }
    store.close().await;
    tracing::info!("archiver stopped");
    served
}
