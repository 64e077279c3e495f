//! The archiver: every task record that reaches a terminal state lands in SQLite, exactly once
//! per revision, and the history is served over NATS as `claw.archive.get` / `claw.archive.list`.
//! Once archived, a finished record leaves the `tasks` bucket after its retention: the archiver
//! is the only process that removes one. And it repairs records stranded without a lane message.
//!
//! It reads the `tasks` bucket through its own durable consumer (`archiver` on `KV_tasks`), so it
//! can be down for a while and catch up, and it is the only process that touches SQLite.
//!
//! Reading order: [`run`] (wires the parts together), [`consume`] (pull a batch, commit it,
//! then ack it), [`store`] (the table, the revision-guarded upsert, keyset paging),
//! [`service`] (request parsing and the error shape of the replies), [`retention`] (removing
//! archived records from the bucket once their retention has passed) and [`reconcile`] (finding
//! records that wait or run without a lane message, and repairing them).
//!
//! The archiver is a singleton by deployment: one process, one durable consumer, one SQLite
//! file (compose runs one; `claw up` has one).

pub mod consume;
pub mod reconcile;
pub mod retention;
pub mod service;
pub mod store;

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use claw_proto::topology::{ARCHIVER_CONSUMER, TASKS_KV_STREAM, Topology};
use tokio_util::sync::CancellationToken;

use crate::consume::Batching;
use crate::store::Store;

/// The archiver's configuration: `claw-archiver --help`, or the same flags flattened into
/// `claw up`.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// The SQLite file of the archive; created, with its schema, when missing.
    #[arg(long = "db", env = "CLAW_DB")]
    pub db: PathBuf,
    /// Most record revisions written in one SQLite transaction (and so most un-acked at once).
    ///
    /// One transaction per batch pays one fsync for many rows, which is what keeps up with a
    /// burst of finishing tasks; 256 rows commit in a few milliseconds. At most the consumer's
    /// `max_ack_pending` (10 000), beyond which the server would not deliver a full batch.
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

/// Sets `claw_archiver_lag` (the archiver consumer's `num_pending`: revisions of the bucket not
/// yet delivered to the archiver) and `claw_archiver_unacked` on every scrape of `/metrics`.
fn lag_gauge(consumer: PullConsumer) -> claw_proto::metrics::ScrapeHook {
    claw_proto::metrics::on_scrape(move || {
        let mut consumer = consumer.clone();
        async move {
            match consumer.info().await {
                Ok(info) => {
                    metrics::gauge!("claw_archiver_lag").set(info.num_pending as f64);
                    metrics::gauge!("claw_archiver_unacked").set(info.num_ack_pending as f64);
                }
                Err(e) => tracing::debug!(error = %e, "consumer info for the lag gauge failed"),
            }
        }
    })
}

/// Archives until `shutdown`, then finishes the batch in hand and returns. `topology` must be
/// ensured (the durable consumer exists). Returns early with an error only when the database or
/// the service cannot be set up, or the service stops; NATS and SQLite hiccups while running are
/// logged and retried, since un-acked revisions simply wait on the server.
pub async fn run(
    topology: Topology,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let store = Store::open(&config.db).await?;
    let consumer: PullConsumer = topology
        .js
        .get_consumer_from_stream(ARCHIVER_CONSUMER, TASKS_KV_STREAM)
        .await
        .map_err(|e| Error::Nats { what: "getting the archiver consumer", source: e.into() })?;
    let _lag = lag_gauge(consumer.clone());
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
            consume::consume(consumer, store.clone(), batching, stop.clone()).await;
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
    // The last acks are publishes still in the client's buffer; send them before returning so a
    // restart does not wait out the ack deadline for redeliveries.
    if let Err(e) = client.flush().await {
        tracing::warn!(error = %e, "flushing the last acks failed; they will be redelivered");
    }
    store.close().await;
    tracing::info!("archiver stopped");
    served
}
