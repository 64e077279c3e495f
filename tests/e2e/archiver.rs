//! The archiver against a real nats-server and a real SQLite file: every terminal record lands
//! once per revision even when the archiver was down, a restart reads on from the position it
//! committed and replays nothing, and the
//! `claw.archive.*` services answer history with the shared error shape.
//!
//! The worker is not needed: the tests write record revisions into the `tasks` bucket the way a
//! worker does (create `queued`, then compare-and-set each transition). Rows are counted with
//! sqlx straight from the file; that is the test observing, the archiver is still the only writer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::kv;
use claw_proto::api::{ErrorBody, GetRequest, ListPage, ListQuery};
use claw_proto::kinds::Catalog;
use claw_proto::spec::{Limits, TaskSpec};
use claw_proto::topology::{
    ARCHIVE_GET, ARCHIVE_LIST, ARCHIVER_READER_PREFIX, TASKS_KV_STREAM, Topology,
};
use claw_proto::{Cause, Session, Status, TaskError, TaskId, TaskRecord};
use claw_tests::{Nats, test_settings, wait_for};
use futures::StreamExt;
use serde_json::json;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};
use time::OffsetDateTime;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

/// An archiver running in-process through `claw_archiver::run`, stopped by its own token.
struct Archiver {
    token: CancellationToken,
    handle: JoinHandle<Result<(), claw_archiver::Error>>,
}

impl Archiver {
    fn start(topology: &Topology, db: &Path) -> Archiver {
        let config = claw_tests::archiver_config(db);
        let token = CancellationToken::new().child_token();
        let handle = tokio::spawn(claw_archiver::run(topology.clone(), config, token.clone()));
        Archiver { token, handle }
    }

    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.handle)
            .await
            .expect("the archiver stops within 15 s of cancellation")
            .expect("the archiver task does not panic")
            .expect("the archiver returns Ok");
    }
}

/// A `queued` record as the gateway admits it: `created_at` is explicit so listing order is
/// known in advance.
fn admitted(session: &str, kind: &str, created_at: OffsetDateTime) -> TaskRecord {
    let input = if kind == "exec" { json!({"program": "x"}) } else { json!({"seconds": 1}) };
    let spec = TaskSpec {
        session: Some(Session::parse(session).unwrap()),
        ..TaskSpec::from_slice(json!({"kind": kind, "input": input}).to_string().as_bytes())
            .unwrap()
    };
    spec.admit(TaskId::generate(), created_at, None, &Catalog::builtin(), &Limits::STANDARD)
        .unwrap()
}

fn bytes(record: &TaskRecord) -> bytes::Bytes {
    serde_json::to_vec(record).unwrap().into()
}

async fn create(kv: &kv::Store, record: &TaskRecord) -> u64 {
    kv.create(record.id.as_str(), bytes(record)).await.expect("create the queued record")
}

async fn update(kv: &kv::Store, record: &TaskRecord, revision: u64) -> u64 {
    kv.update(record.id.as_str(), bytes(record), revision).await.expect("CAS the next revision")
}

/// Moves a running record to `end`.
fn finish(record: &mut TaskRecord, end: Status) {
    let now = OffsetDateTime::now_utc();
    match end {
        Status::Succeeded => record.succeed(json!({"ok": true}), now).unwrap(),
        Status::Failed => {
            record.fail(TaskError::new("boom", "planned", false), Cause::Error, now).unwrap()
        }
        Status::Cancelled => record.cancel(Cause::User, now).unwrap(),
        other => panic!("{other} is not terminal"),
    }
}

/// The whole life of a task as a worker writes it: queued → running → `end`. Returns the final
/// record and its revision.
async fn run_task(kv: &kv::Store, mut record: TaskRecord, end: Status) -> (TaskRecord, u64) {
    let revision = create(kv, &record).await;
    record.start(1, "test-worker", OffsetDateTime::now_utc()).unwrap();
    let revision = update(kv, &record, revision).await;
    finish(&mut record, end);
    let revision = update(kv, &record, revision).await;
    (record, revision)
}

/// Rows as `(id, revision, status)`; `None` until the archiver has created the table.
async fn archived(db: &Path) -> Option<Vec<(String, i64, String)>> {
    let mut conn = SqliteConnectOptions::new().filename(db).connect().await.ok()?;
    let rows = sqlx::query_as("SELECT id, revision, status FROM tasks ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .ok();
    let _ = conn.close().await;
    rows
}

async fn count(db: &Path) -> Option<usize> {
    archived(db).await.map(|r| r.len())
}

async fn wait_for_rows(db: &Path, n: usize) -> Vec<(String, i64, String)> {
    wait_for(&format!("{n} archived rows"), WAIT, || async {
        archived(db).await.filter(|r| r.len() == n)
    })
    .await
}

/// The position committed in the archive's file: every revision up to it is decided on.
async fn position(db: &Path) -> Option<u64> {
    let mut conn = SqliteConnectOptions::new().filename(db).connect().await.ok()?;
    let upto: Option<i64> =
        sqlx::query_scalar("SELECT upto FROM position").fetch_optional(&mut conn).await.ok()?;
    let _ = conn.close().await;
    upto.map(|u| u as u64)
}

/// Waits until the archive's committed position is the bucket stream's last sequence:
/// everything written so far has been decided on (archived or skipped); returns it.
async fn wait_for_caught_up(topology: &Topology, db: &Path) -> u64 {
    wait_for("the archive's position to reach the bucket's last revision", WAIT, || async {
        let stream = topology.js.get_stream(TASKS_KV_STREAM).await.ok()?;
        let last = stream.cached_info().state.last_sequence;
        (position(db).await? == last).then_some(last)
    })
    .await
}

/// The archiver's ordered consumers on the bucket's stream: name → revisions delivered.
async fn readers(topology: &Topology) -> HashMap<String, u64> {
    let stream = topology.js.get_stream(TASKS_KV_STREAM).await.unwrap();
    let infos: Vec<_> = stream.consumers().collect().await;
    infos
        .into_iter()
        .map(Result::unwrap)
        .filter(|info| info.name.starts_with(ARCHIVER_READER_PREFIX))
        .map(|info| (info.name, info.delivered.consumer_sequence))
        .collect()
}

fn db_path(nats: &Nats) -> PathBuf {
    nats.dir.path().join("archive.sqlite")
}

#[tokio::test]
async fn a_stopped_archiver_catches_up_once_and_a_restart_replays_nothing() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let kv = topology.tasks_kv.clone();
    let db = db_path(&nats);

    // 500 tasks complete while no archiver runs.
    let finals: HashMap<String, u64> = futures::stream::iter(0..500)
        .map(|i| {
            let kv = kv.clone();
            async move {
                let record = admitted(&format!("s{}", i % 5), "sleep", OffsetDateTime::now_utc());
                let (record, revision) = run_task(&kv, record, Status::Succeeded).await;
                (record.id.to_string(), revision)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert_eq!(finals.len(), 500);
    assert_eq!(count(&db).await, None, "nothing is archived while the archiver is down");

    let archiver = Archiver::start(&topology, &db);
    let rows = wait_for_rows(&db, 500).await;
    let upto = wait_for_caught_up(&topology, &db).await;
    archiver.stop().await;
    let before = readers(&topology).await;
    // Each row holds the final revision of its task, and nothing but succeeded records.
    for (id, revision, status) in &rows {
        assert_eq!(Some(&(*revision as u64)), finals.get(id), "revision of {id}");
        assert_eq!(status, "succeeded");
    }
    assert_eq!(archived(&db).await.unwrap().len(), 500, "no duplicates after the stop");

    // Restarted, it reads on from its position: the next delivery is a new task, not a replay.
    let archiver = Archiver::start(&topology, &db);
    let sentinel = admitted("s0", "sleep", OffsetDateTime::now_utc());
    let (sentinel, revision) = run_task(&kv, sentinel, Status::Failed).await;
    let rows = wait_for_rows(&db, 501).await;
    assert!(wait_for_caught_up(&topology, &db).await > upto);
    let after = readers(&topology).await;
    archiver.stop().await;
    assert!(rows.contains(&(sentinel.id.to_string(), revision as i64, "failed".into())));
    // Deliveries only for the sentinel (1 to 3: the bucket keeps one revision per key, so an
    // archiver slower than the writes sees only the latest), none for the 500 before it.
    let delivered: u64 =
        after.iter().filter(|(name, _)| !before.contains_key(*name)).map(|(_, n)| n).sum();
    assert!((1..=3).contains(&delivered), "{delivered} deliveries after the restart");
}

#[tokio::test]
async fn a_record_finishing_while_the_archiver_runs_lands_once_with_its_final_revision() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let kv = topology.tasks_kv.clone();
    let db = db_path(&nats);
    let archiver = Archiver::start(&topology, &db);

    let mut record = admitted("live", "sleep", OffsetDateTime::now_utc());
    let revision = create(&kv, &record).await;
    record.start(1, "test-worker", OffsetDateTime::now_utc()).unwrap();
    let revision = update(&kv, &record, revision).await;
    // Something that is not a record must not block what follows it.
    kv.put("junk", "not a task record".into()).await.unwrap();
    wait_for_caught_up(&topology, &db).await;
    assert_eq!(count(&db).await, Some(0), "live revisions leave no row");

    finish(&mut record, Status::Failed);
    let failed_revision = update(&kv, &record, revision).await;
    let rows = wait_for_rows(&db, 1).await;
    assert_eq!(rows, [(record.id.to_string(), failed_revision as i64, "failed".into())]);

    // An explicit retry runs the same id again; its new terminal revision replaces the row.
    record.requeue(OffsetDateTime::now_utc()).unwrap();
    let revision = update(&kv, &record, failed_revision).await;
    record.start(1, "test-worker", OffsetDateTime::now_utc()).unwrap();
    let revision = update(&kv, &record, revision).await;
    finish(&mut record, Status::Succeeded);
    let final_revision = update(&kv, &record, revision).await;
    let expected = vec![(record.id.to_string(), final_revision as i64, "succeeded".to_owned())];
    wait_for("the retried task's final revision in its row", WAIT, || async {
        archived(&db).await.filter(|r| *r == expected)
    })
    .await;
    wait_for_caught_up(&topology, &db).await;
    archiver.stop().await;
    assert_eq!(archived(&db).await.unwrap(), expected);
}

/// The server loses the archiver's reader under it (a stream leader change takes an ordered
/// consumer along; here it is deleted outright), and later the bucket's stream is made anew
/// with its sequences starting over below the archive's position: in both cases reading
/// resumes from what was committed, and no record finishing meanwhile is missed.
#[tokio::test]
async fn a_lost_reader_or_a_stream_made_anew_costs_no_record() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let kv = topology.tasks_kv.clone();
    let db = db_path(&nats);
    let archiver = Archiver::start(&topology, &db);
    for _ in 0..20 {
        run_task(&kv, admitted("a", "sleep", OffsetDateTime::now_utc()), Status::Succeeded).await;
    }
    wait_for_rows(&db, 20).await;

    let stream = topology.js.get_stream(TASKS_KV_STREAM).await.unwrap();
    for name in readers(&topology).await.into_keys() {
        stream.delete_consumer(&name).await.unwrap();
    }
    for _ in 0..20 {
        run_task(&kv, admitted("b", "sleep", OffsetDateTime::now_utc()), Status::Succeeded).await;
    }
    wait_for_rows(&db, 40).await;
    let upto = wait_for_caught_up(&topology, &db).await;
    archiver.stop().await;

    // Made anew: 3 revisions, far below the position the archive holds.
    topology.js.delete_stream(TASKS_KV_STREAM).await.unwrap();
    let topology = nats.topology(&test_settings()).await;
    let (late, _) = run_task(
        &topology.tasks_kv,
        admitted("c", "sleep", OffsetDateTime::now_utc()),
        Status::Failed,
    )
    .await;
    assert!(stream_ends_below(&topology, upto).await);
    let archiver = Archiver::start(&topology, &db);
    let rows = wait_for_rows(&db, 41).await;
    assert!(rows.iter().any(|(id, _, status)| *id == late.id.as_str() && status == "failed"));
    wait_for_caught_up(&topology, &db).await;
    archiver.stop().await;
}

/// Whether the bucket's stream now ends below `upto` (it was made anew).
async fn stream_ends_below(topology: &Topology, upto: u64) -> bool {
    let stream = topology.js.get_stream(TASKS_KV_STREAM).await.unwrap();
    stream.cached_info().state.last_sequence < upto
}

/// The durable consumer archivers before protocol 5 read the bucket with is removed when an
/// archiver starts: left alone it would count revisions delivered to nobody, forever.
#[tokio::test]
async fn the_durable_consumer_of_earlier_versions_is_removed() {
    use async_nats::jetstream::consumer;
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let stream = topology.js.get_stream(TASKS_KV_STREAM).await.unwrap();
    let old = consumer::pull::Config {
        durable_name: Some(claw_proto::topology::RETIRED_ARCHIVER_CONSUMER.into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ..Default::default()
    };
    stream.create_consumer(old).await.unwrap();
    let db = db_path(&nats);
    let archiver = Archiver::start(&topology, &db);
    wait_for("the old durable consumer to be removed", WAIT, || async {
        let names: Vec<_> = stream.consumer_names().collect().await;
        let names: Vec<String> = names.into_iter().map(Result::unwrap).collect();
        (!names.iter().any(|n| n == claw_proto::topology::RETIRED_ARCHIVER_CONSUMER)).then_some(())
    })
    .await;
    archiver.stop().await;
}

/// A request to an archive endpoint; retried while the service is not yet subscribed.
async fn request(client: &async_nats::Client, subject: &str, body: Vec<u8>) -> async_nats::Message {
    let body = bytes::Bytes::from(body);
    wait_for(&format!("a reply on {subject}"), WAIT, || async {
        client.request(subject.to_owned(), body.clone()).await.ok()
    })
    .await
}

async fn list(client: &async_nats::Client, query: &ListQuery) -> ListPage {
    let reply = request(client, ARCHIVE_LIST, serde_json::to_vec(query).unwrap()).await;
    serde_json::from_slice(&reply.payload)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&reply.payload)))
}

/// Every page of `query`, following `next_cursor`.
async fn list_all(client: &async_nats::Client, mut query: ListQuery) -> Vec<Vec<TaskId>> {
    let mut pages = Vec::new();
    loop {
        let page = list(client, &query).await;
        pages.push(page.tasks.iter().map(|t| t.id.clone()).collect());
        match page.next_cursor {
            Some(cursor) => query.cursor = Some(cursor),
            None => return pages,
        }
    }
}

/// The error of a failed reply, with its micro-service status header.
async fn error(client: &async_nats::Client, subject: &str, body: &[u8]) -> (ErrorBody, String) {
    let reply = request(client, subject, body.to_vec()).await;
    let status = reply
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::service::NATS_SERVICE_ERROR_CODE))
        .map(|v| v.to_string())
        .unwrap_or_default();
    let body = serde_json::from_slice(&reply.payload)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&reply.payload)));
    (body, status)
}

#[tokio::test]
async fn archive_get_and_list_answer_over_nats() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let kv = topology.tasks_kv.clone();
    let db = db_path(&nats);
    let archiver = Archiver::start(&topology, &db);
    let client = nats.client().await;

    // 20 tasks a second apart: alice's 12 succeed (sleep), bob's 5 exec fail, 3 sleep cancelled.
    let base = OffsetDateTime::now_utc() - time::Duration::hours(1);
    let mut all = Vec::new();
    for i in 0..20 {
        let (session, kind, end) = match i {
            0..12 => ("alice", "sleep", Status::Succeeded),
            12..17 => ("bob", "exec", Status::Failed),
            _ => ("bob", "sleep", Status::Cancelled),
        };
        let record = admitted(session, kind, base + time::Duration::seconds(i));
        all.push(run_task(&kv, record, end).await.0);
    }
    wait_for_rows(&db, 20).await;
    let newest_first = |pick: &dyn Fn(&TaskRecord) -> bool| -> Vec<TaskId> {
        all.iter().rev().filter(|r| pick(r)).map(|r| r.id.clone()).collect()
    };

    // get: the archived record is exactly what the bucket held.
    let reply = request(
        &client,
        ARCHIVE_GET,
        serde_json::to_vec(&GetRequest { id: all[3].id.clone() }).unwrap(),
    )
    .await;
    let in_kv = kv.get(all[3].id.as_str()).await.unwrap().unwrap();
    assert_eq!(reply.payload, in_kv);
    assert!(reply.headers.is_none_or(|h| h.get(async_nats::service::NATS_SERVICE_ERROR).is_none()));

    // list: everything, newest first, in one default page.
    let page = list(&client, &ListQuery::default()).await;
    assert_eq!(page.tasks, all.iter().rev().cloned().collect::<Vec<_>>());
    assert_eq!(page.next_cursor, None);
    // An empty body means the defaults too.
    let reply = request(&client, ARCHIVE_LIST, Vec::new()).await;
    assert_eq!(serde_json::from_slice::<ListPage>(&reply.payload).unwrap(), page);

    // Filters.
    let q = |session: Option<&str>, status: Option<Status>, kind: Option<&str>| ListQuery {
        session: session.map(|s| Session::parse(s).unwrap()),
        status,
        kind: kind.map(str::to_owned),
        ..ListQuery::default()
    };
    let ids = |page: ListPage| page.tasks.into_iter().map(|t| t.id).collect::<Vec<_>>();
    assert_eq!(
        ids(list(&client, &q(Some("alice"), None, None)).await),
        newest_first(&|r| r.session.as_str() == "alice")
    );
    assert_eq!(
        ids(list(&client, &q(None, Some(Status::Failed), None)).await),
        newest_first(&|r| r.status == Status::Failed)
    );
    assert_eq!(
        ids(list(&client, &q(None, None, Some("exec"))).await),
        newest_first(&|r| r.kind == "exec")
    );
    assert_eq!(
        ids(list(&client, &q(Some("bob"), Some(Status::Cancelled), Some("sleep"))).await),
        newest_first(&|r| r.status == Status::Cancelled)
    );
    assert!(list(&client, &q(Some("carol"), None, None)).await.tasks.is_empty());

    // Paging: 12 of alice's by 5 is 5 + 5 + 2, no overlap, no gap, order kept.
    let query = ListQuery { limit: Some(5), ..q(Some("alice"), None, None) };
    let pages = list_all(&client, query).await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [5, 5, 2]);
    assert_eq!(pages.concat(), newest_first(&|r| r.session.as_str() == "alice"));
    // And across all 20 by 7.
    let pages = list_all(&client, ListQuery { limit: Some(7), ..ListQuery::default() }).await;
    assert_eq!(pages.concat(), newest_first(&|_| true));

    // Errors: the shared shape, and the micro-service status header.
    let unknown = serde_json::to_vec(&GetRequest { id: TaskId::generate() }).unwrap();
    let (body, status) = error(&client, ARCHIVE_GET, &unknown).await;
    assert_eq!((body.error.code.as_str(), status.as_str()), ("not_found", "404"));

    let (body, status) = error(&client, ARCHIVE_LIST, br#"{"limit": 501}"#).await;
    assert_eq!(body.error.code, "invalid_request");
    assert_eq!(body.error.field.as_deref(), Some("limit"));
    assert_eq!(status, "400");

    for (subject, bad) in [
        (ARCHIVE_LIST, &br#"{"limit": 0}"#[..]),
        (ARCHIVE_LIST, b"{not json"),
        (ARCHIVE_LIST, br#"{"status": "exploded"}"#),
        (ARCHIVE_LIST, br#"{"cursor": "not-a-cursor"}"#),
        (ARCHIVE_LIST, br#"{"unknown": 1}"#),
        (ARCHIVE_GET, br#"{"id": "a.b"}"#),
        (ARCHIVE_GET, b""),
        (ARCHIVE_GET, b"[1, 2]"),
    ] {
        let (body, status) = error(&client, subject, bad).await;
        let what = format!("{subject} {}", String::from_utf8_lossy(bad));
        assert_eq!(body.error.code, "invalid_request", "{what}");
        assert_eq!(status, "400", "{what}");
    }

    // Still serving after all that bad input.
    assert_eq!(list(&client, &ListQuery::default()).await.tasks.len(), 20);
    archiver.stop().await;
}

#[tokio::test]
async fn a_page_of_big_records_fits_in_one_message() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let kv = topology.tasks_kv.clone();
    let db = db_path(&nats);
    let archiver = Archiver::start(&topology, &db);
    let client = nats.client().await;
    let max_payload = client.server_info().max_payload;

    // 30 records of about 100 KB each: 3 MB, three times what one message may carry.
    let base = OffsetDateTime::now_utc() - time::Duration::hours(1);
    let mut all = Vec::new();
    for i in 0..30 {
        let mut record = admitted("big", "sleep", base + time::Duration::seconds(i));
        record.input = json!({"seconds": 1, "echo": "x".repeat(100_000)});
        all.push(run_task(&kv, record, Status::Succeeded).await.0);
    }
    wait_for_rows(&db, 30).await;

    // However many rows are asked for, each reply fits, and the pages together hold every
    // record once, newest first.
    let mut query = ListQuery { limit: Some(500), ..ListQuery::default() };
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let reply = request(&client, ARCHIVE_LIST, serde_json::to_vec(&query).unwrap()).await;
        assert!(reply.payload.len() <= max_payload, "{} bytes", reply.payload.len());
        let page: ListPage = serde_json::from_slice(&reply.payload)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&reply.payload)));
        assert!(!page.tasks.is_empty());
        pages += 1;
        seen.extend(page.tasks.into_iter().map(|t| t.id));
        match page.next_cursor {
            Some(cursor) => query.cursor = Some(cursor),
            None => break,
        }
    }
    assert!(pages >= 3, "{pages} pages");
    assert_eq!(seen, all.iter().rev().map(|r| r.id.clone()).collect::<Vec<_>>());
    archiver.stop().await;
}
