//! The archive in SQLite: one row per task holding its latest terminal record (`tasks`), and one
//! per task that is not finished (`live`).
//!
//! Only this module touches SQLite, and only the archiver uses it. The consumer loop writes
//! through [`Store::write`] (one transaction per batch); the `claw.archive.*` services read
//! through [`Store::get`] and [`Store::list`]; the retention sweep through
//! [`Store::due_for_removal`] and [`Store::mark_removed`]; the reconciler through
//! [`Store::stranded`] and [`Store::forget_live`]. The schema is in `archiver/migrations/`.
//!
//! Idempotency rests on revision guards: an archive row only moves to a strictly higher KV
//! revision, so a redelivered or replayed message never duplicates or regresses a row, while a
//! later terminal revision of the same id (after an explicit retry) replaces it. A live row
//! moves forward the same way, ends with a newer terminal revision or delete marker, and is
//! never brought back by a live revision older than the task's archived end.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use claw_proto::api::{ListPage, Usage, UsageReport};
use claw_proto::{Class, Priority, Session, Status, TaskId, TaskRecord};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite, SqliteConnection, SqlitePool};
use time::OffsetDateTime;

use crate::Error;

/// Connections in the pool: one for the consumer's write transaction, the rest for concurrent
/// `get`/`list` requests, which WAL lets read while the writer writes.
const POOL_SIZE: u32 = 8;

/// Bytes of an encoded page that are not its records: `{"tasks":[],"next_cursor":"..."}` with
/// a cursor of at most 20 digits, a dot and a 64-character id.
const PAGE_ENVELOPE: usize = 128;

/// Most stranded candidates one reconciler pass takes: the queue limit. More (a queue deeper
/// than that, thousands of long attempts) wait for the next pass, the longest untouched first.
pub const MAX_STRANDED: i64 = 10_000;

/// How long a statement waits for a lock before failing. Writers are serialized by SQLite; with
/// a single writer this only covers checkpoints and a reader holding the WAL, which are short.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// One terminal revision of a record, ready to be written.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// The KV revision: the stream sequence of the `KV_tasks` message that carried it.
    pub revision: u64,
    pub record: TaskRecord,
    /// The record's JSON exactly as it was in the bucket; `get` answers with these bytes.
    pub json: String,
}

/// A live revision of a record (queued, running, retrying, paused): what the reconciler needs
/// to pick the records that may be stranded. The reconciler re-reads the record itself before
/// it acts, so this is only where to look.
#[derive(Clone, Debug, PartialEq)]
pub struct Live {
    pub id: TaskId,
    pub revision: u64,
    pub status: Status,
    pub paused_from: Option<Status>,
    pub class: Class,
    pub priority: Priority,
    pub deadline: OffsetDateTime,
    /// The server's timestamp of the revision.
    pub written_at: OffsetDateTime,
    pub message_seq: Option<u64>,
    /// The principal whose task it is, and what the record holds ([`TaskRecord::stored_bytes`]):
    /// its share of the quotas.
    pub owner: Option<String>,
    pub bytes: u64,
}

impl Live {
    /// `record`, live, at `revision`, which the server stored at `written_at`, in `json_len`
    /// bytes of JSON.
    pub fn of(
        record: &TaskRecord,
        revision: u64,
        written_at: OffsetDateTime,
        json_len: usize,
    ) -> Live {
        Live {
            id: record.id.clone(),
            revision,
            status: record.status,
            paused_from: record.paused_from,
            class: record.class,
            priority: record.priority,
            deadline: record.deadline,
            written_at,
            message_seq: record.message_seq,
            owner: record.owner.clone(),
            bytes: record.stored_bytes(json_len),
        }
    }
}

/// What one message of the bucket changes in the store.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// A terminal revision: archived, and the end of the task's live row.
    Terminal(Box<Entry>),
    /// A live revision: the task's live row.
    Live(Box<Live>),
    /// A delete or purge marker at `revision`: the task has no record, so no live row.
    Gone { id: TaskId, revision: u64 },
}

/// A record the reconciler may have to repair: live, last written before its grace, in a state
/// where it must have a lane message (queued, retrying, running, paused while running).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stranded {
    pub id: TaskId,
    pub revision: u64,
}

/// An archived terminal revision: the bucket's message `revision` holds it, until the
/// retention sweep removes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Archived {
    pub id: String,
    pub revision: u64,
    /// The record refers to an input or result in the `payloads` object store, which goes with
    /// it.
    pub payloads: bool,
}

/// A position in the newest-first order: the key of the last row of a page.
///
/// Its string form, `<created_at unix micros>.<id>`, is opaque to callers: they only pass back
/// what `next_cursor` gave them. A '.' cannot occur in an id, so the split is unambiguous.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    created_at: i64,
    id: String,
}

impl Cursor {
    pub fn encode(&self) -> String {
        format!("{}.{}", self.created_at, self.id)
    }

    /// `None` for a string that no page produced.
    pub fn decode(s: &str) -> Option<Cursor> {
        let (micros, id) = s.split_once('.')?;
        let created_at = i64::from_str(micros).ok()?;
        let id = TaskId::parse(id).ok()?;
        Some(Cursor { created_at, id: id.as_str().to_owned() })
    }
}

/// A validated `list` query.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub session: Option<Session>,
    pub status: Option<Status>,
    pub kind: Option<String>,
    /// Only this owner's tasks; rows without an owner never match.
    pub owner: Option<String>,
    /// Rows per page, already checked against `MAX_PAGE`.
    pub limit: u32,
    /// Start strictly after this position.
    pub after: Option<Cursor>,
}

/// The archive database. Cheap to clone: it is a pool handle.
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens (creating when missing) the SQLite file at `path` and applies the migrations.
    pub async fn open(path: &Path) -> Result<Store, Error> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            // WAL lets the services read while a batch commits.
            .journal_mode(SqliteJournalMode::Wal)
            // In WAL mode NORMAL only risks the last commits on power loss, never corruption;
            // those commits were not yet acked, so JetStream redelivers them.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT);
        let pool =
            SqlitePoolOptions::new().max_connections(POOL_SIZE).connect_with(options).await?;
        Store::migrated(pool).await
    }

    /// Applies the migrations to an existing pool (the tests' fresh databases come this way).
    pub async fn migrated(pool: SqlitePool) -> Result<Store, Error> {
        sqlx::migrate!().run(&pool).await?;
        Ok(Store { pool })
    }

    /// Writes every change in one transaction, in order, and moves the read position forward
    /// to `upto` (the bucket stream's sequence every change up to which is in `changes`) in the
    /// same transaction; returns how many archive rows were inserted or moved to a newer
    /// revision. A change at or below a row's revision changes nothing, and a position never
    /// moves back here ([`Store::rewind`] does that).
    ///
    /// `changes` are in the order of the bucket's stream (revisions increasing). They go in as a
    /// few multi-row statements rather than one per change: first every live revision, then
    /// every terminal one, then the ends of live rows (terminal revisions and markers). That
    /// ends in the same state as applying the changes one by one (the store test
    /// `a_batch_ends_where_its_changes_one_by_one_would`): every statement is guarded by
    /// revision, a live row is only ended by a strictly newer revision of its batch, and a live
    /// revision newer than an end in the same batch (a retry) survives it.
    pub async fn write(&self, changes: &[Change], upto: u64) -> Result<u64, Error> {
        let (mut live, mut terminal, mut ended) = (Vec::new(), Vec::new(), Vec::new());
        for change in changes {
            match change {
                Change::Terminal(entry) => {
                    terminal.push(&**entry);
                    ended.push((&entry.record.id, entry.revision));
                }
                Change::Live(row) => live.push(&**row),
                Change::Gone { id, revision } => ended.push((id, *revision)),
            }
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE position SET upto = max(upto, ?)")
            .bind(sql_revision(upto))
            .execute(&mut *tx)
            .await?;
        for rows in live.chunks(ROWS_PER_STATEMENT) {
            keep_live(&mut tx, rows).await?;
        }
        let mut archived = 0;
        for entries in terminal.chunks(ROWS_PER_STATEMENT) {
            archived += archive(&mut tx, entries).await?;
        }
        for ends in ended.chunks(ROWS_PER_STATEMENT) {
            end_live(&mut tx, ends).await?;
        }
        tx.commit().await?;
        Ok(archived)
    }

    /// The bucket stream's sequence up to which every revision is written: where the consumer
    /// loop reads on from (0 for a new archive).
    pub async fn position(&self) -> Result<u64, Error> {
        let upto: i64 =
            sqlx::query_scalar("SELECT upto FROM position").fetch_one(&self.pool).await?;
        Ok(u64::try_from(upto).unwrap_or(0))
    }

    /// Sets the read position back to `to`: the bucket's stream was made anew (its sequences
    /// start again below the position), and what it holds now is read from there. The revision
    /// guards make re-reading harmless.
    pub async fn rewind(&self, to: u64) -> Result<(), Error> {
        sqlx::query("UPDATE position SET upto = ?")
            .bind(sql_revision(to))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Live records last written at or before `cutoff` that must have a lane message: queued,
    /// retrying, running, or paused while running. The longest untouched first, at most
    /// [`MAX_STRANDED`].
    pub async fn stranded(&self, cutoff: OffsetDateTime) -> Result<Vec<Stranded>, Error> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT id, revision FROM live
             WHERE written_at <= ?
               AND (status IN ('queued', 'retrying', 'running')
                    OR (status = 'paused' AND paused_from = 'running'))
             ORDER BY written_at LIMIT ?",
        )
        .bind(micros(cutoff))
        .bind(MAX_STRANDED)
        .fetch_all(&self.pool)
        .await?;
        // Every id in the table was a `TaskId` when written.
        Ok(rows
            .into_iter()
            .filter_map(|(id, revision)| {
                let id = TaskId::parse(&id).ok()?;
                Some(Stranded { id, revision: u64::try_from(revision).unwrap_or(0) })
            })
            .collect())
    }

    /// What each principal holds: its live tasks by status and the bytes of its records still
    /// in the bucket (live rows, and archived revisions not yet removed; an archived task that
    /// runs again after a retry counts once, as its live row).
    pub async fn usage(&self) -> Result<UsageReport, Error> {
        let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT owner, sum(queued), sum(running), sum(bytes) FROM (
                 SELECT owner,
                        sum(status <> 'running') AS queued,
                        sum(status = 'running') AS running,
                        sum(bytes) AS bytes
                 FROM live WHERE owner IS NOT NULL GROUP BY owner
                 UNION ALL
                 SELECT owner, 0, 0, sum(bytes) FROM tasks
                 WHERE removed_at IS NULL AND owner IS NOT NULL
                   AND id NOT IN (SELECT id FROM live)
                 GROUP BY owner)
             GROUP BY owner",
        )
        .fetch_all(&self.pool)
        .await?;
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        let principals = rows
            .into_iter()
            .map(|(owner, queued, running, bytes)| {
                let usage =
                    Usage { queued: count(queued), running: count(running), bytes: count(bytes) };
                (owner, usage)
            })
            .collect();
        Ok(UsageReport { principals })
    }

    /// Drops the live row of `id` if it is still at `revision` or older: the record is gone
    /// from the bucket without a marker the consumer would have seen (removed outright).
    pub async fn forget_live(&self, id: &TaskId, revision: u64) -> Result<(), Error> {
        let mut conn = self.pool.acquire().await?;
        end_live(&mut conn, &[(id, revision.saturating_add(1))]).await
    }

    /// Archived revisions that may still be in the bucket and finished at or before `cutoff`,
    /// the longest finished first, at most `limit` of them.
    pub async fn due_for_removal(
        &self,
        cutoff: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<Archived>, Error> {
        let rows: Vec<(String, i64, bool)> = sqlx::query_as(
            "SELECT id, revision,
                    json_extract(record, '$.input_ref') IS NOT NULL
                    OR json_extract(record, '$.result_ref') IS NOT NULL
             FROM tasks
             WHERE removed_at IS NULL AND coalesce(finished_at, created_at) <= ?
             ORDER BY coalesce(finished_at, created_at) LIMIT ?",
        )
        .bind(micros(cutoff))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, revision, payloads)| Archived {
                id,
                revision: u64::try_from(revision).unwrap_or(0),
                payloads,
            })
            .collect())
    }

    /// Notes that `archived` is out of the bucket since `at`. A row that moved on to a newer
    /// revision meanwhile (an explicit retry that finished again) is left alone: that revision
    /// is in the bucket and waits for its own retention.
    pub async fn mark_removed(&self, archived: &Archived, at: OffsetDateTime) -> Result<(), Error> {
        sqlx::query("UPDATE tasks SET removed_at = ? WHERE id = ? AND revision = ?")
            .bind(micros(at))
            .bind(&archived.id)
            .bind(i64::try_from(archived.revision).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The archived record JSON of `id`, as it was in the bucket.
    pub async fn get(&self, id: &TaskId) -> Result<Option<String>, Error> {
        let json = sqlx::query_scalar("SELECT record FROM tasks WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(json)
    }

    /// One page, newest first by (created_at, id), with the cursor of the next page when there
    /// may be one. The page is at most `filter.limit` rows and, encoded as JSON, at most
    /// `max_bytes` (but always one row, when there is one): it goes out as one NATS message,
    /// and fifty records of 100 KB would not fit the server's `max_payload`. The cursor then
    /// continues after the last row the page holds.
    pub async fn list(&self, filter: &Filter, max_bytes: usize) -> Result<ListPage, Error> {
        let mut query = QueryBuilder::<Sqlite>::new("SELECT id, created_at, record FROM tasks");
        let mut sep = " WHERE ";
        if let Some(session) = &filter.session {
            query.push(sep).push("session = ").push_bind(session.as_str().to_owned());
            sep = " AND ";
        }
        if let Some(status) = filter.status {
            query.push(sep).push("status = ").push_bind(status.as_str());
            sep = " AND ";
        }
        if let Some(kind) = &filter.kind {
            query.push(sep).push("kind = ").push_bind(kind.clone());
            sep = " AND ";
        }
        if let Some(owner) = &filter.owner {
            query.push(sep).push("owner = ").push_bind(owner.clone());
            sep = " AND ";
        }
        if let Some(after) = &filter.after {
            // A row-value comparison is a range on the (.., created_at, id) indexes.
            query
                .push(sep)
                .push("(created_at, id) < (")
                .push_bind(after.created_at)
                .push(", ")
                .push_bind(after.id.clone())
                .push(")");
        }
        // One row more than asked tells whether a next page exists without a COUNT.
        query
            .push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(i64::from(filter.limit) + 1);
        let mut rows: Vec<(String, i64, String)> =
            query.build_query_as().fetch_all(&self.pool).await?;

        let mut more = rows.len() > filter.limit as usize;
        rows.truncate(filter.limit as usize);
        let mut tasks = Vec::with_capacity(rows.len());
        let mut bytes = PAGE_ENVELOPE;
        let mut last = None;
        for (id, created_at, json) in rows {
            let record: TaskRecord = serde_json::from_str(&json)
                .map_err(|source| Error::StoredRecord { id: id.clone(), source })?;
            // Measured as the reply will encode it (a record archived by an older version may
            // gain null fields), plus its comma.
            let size = serde_json::to_vec(&record).map_or(json.len(), |v| v.len()) + 1;
            if !tasks.is_empty() && bytes + size > max_bytes {
                more = true;
                break;
            }
            bytes += size;
            tasks.push(record);
            last = Some(Cursor { created_at, id });
        }
        let next_cursor = last.filter(|_| more).map(|cursor| cursor.encode());
        Ok(ListPage { tasks, next_cursor })
    }

    /// Closes the pool, checkpointing the WAL.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Unix microseconds: the sortable form of a timestamp in the table.
fn micros(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000) as i64
}

/// A revision as SQLite stores it. Stream sequences are far below 2^63; saturate rather than
/// wrap if one is not.
fn sql_revision(revision: u64) -> i64 {
    i64::try_from(revision).unwrap_or(i64::MAX)
}

/// Rows per multi-row statement: 12 columns a row stays far below SQLite's 32 766 variables.
const ROWS_PER_STATEMENT: usize = 500;

/// Archives terminal revisions (in order: a later one of the same id replaces an earlier);
/// returns how many rows were inserted or moved forward.
///
/// A row whose record has left the bucket (`removed_at`) is the only memory of that task: a
/// later record under the same id (a lane message that names it again, after JetStream's
/// duplicate window) is another task, and does not overwrite the row of another owner. It stays
/// in the bucket; a read by the first owner still finds the archived task (`tasks::get`).
async fn archive(conn: &mut SqliteConnection, entries: &[&Entry]) -> Result<u64, Error> {
    let mut query = QueryBuilder::<Sqlite>::new(
        "INSERT INTO tasks (id, revision, session, kind, status, class, priority,
                            created_at, finished_at, record, owner, bytes) ",
    );
    query.push_values(entries, |mut row, entry| {
        let r = &entry.record;
        row.push_bind(r.id.as_str())
            .push_bind(sql_revision(entry.revision))
            .push_bind(r.session.as_str())
            .push_bind(&r.kind)
            .push_bind(r.status.as_str())
            .push_bind(r.class.as_str())
            .push_bind(r.priority.as_str())
            .push_bind(micros(r.created_at))
            .push_bind(r.finished_at.map(micros))
            .push_bind(&entry.json)
            .push_bind(r.owner.as_deref())
            .push_bind(sql_revision(r.stored_bytes(entry.json.len())));
    });
    query.push(
        " ON CONFLICT (id) DO UPDATE SET
            revision = excluded.revision, session = excluded.session,
            kind = excluded.kind, status = excluded.status, class = excluded.class,
            priority = excluded.priority, created_at = excluded.created_at,
            finished_at = excluded.finished_at, record = excluded.record,
            owner = excluded.owner, bytes = excluded.bytes, removed_at = NULL
         WHERE excluded.revision > tasks.revision
           AND (tasks.removed_at IS NULL OR tasks.owner IS excluded.owner)",
    );
    let done = query.build().execute(&mut *conn).await?.rows_affected();
    if done < entries.len() as u64 {
        // Some changed nothing: replays (harmless), or an id that names another owner's
        // archived task, which is worth saying.
        for entry in entries {
            warn_if_taken(conn, entry).await?;
        }
    }
    Ok(done)
}

async fn warn_if_taken(conn: &mut SqliteConnection, entry: &Entry) -> Result<(), Error> {
    let r = &entry.record;
    let taken: Option<bool> = sqlx::query_scalar(
        "SELECT removed_at IS NOT NULL AND owner IS NOT ? AND revision < ?
         FROM tasks WHERE id = ?",
    )
    .bind(r.owner.as_deref())
    .bind(sql_revision(entry.revision))
    .bind(r.id.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    if taken == Some(true) {
        tracing::warn!(task_id = %r.id, owner = ?r.owner,
            "not archived: the id names an archived task of another owner");
        metrics::counter!("claw_archiver_reused_ids_total").increment(1);
    }
    Ok(())
}

/// The live rows of live revisions: each inserted, or moved forward to it; never older than
/// the row's revision, nor than the task's archived terminal revision (a replayed old revision
/// must not make a finished task look live).
async fn keep_live(conn: &mut SqliteConnection, rows: &[&Live]) -> Result<(), Error> {
    let mut query = QueryBuilder::<Sqlite>::new(
        "INSERT INTO live (id, revision, status, paused_from, class, priority, deadline,
                           written_at, message_seq, owner, bytes)
         SELECT * FROM (",
    );
    query.push_values(rows, |mut row, live| {
        row.push_bind(live.id.as_str())
            .push_bind(sql_revision(live.revision))
            .push_bind(live.status.as_str())
            .push_bind(live.paused_from.map(Status::as_str))
            .push_bind(live.class.as_str())
            .push_bind(live.priority.as_str())
            .push_bind(micros(live.deadline))
            .push_bind(micros(live.written_at))
            .push_bind(live.message_seq.map(sql_revision))
            .push_bind(live.owner.as_deref())
            .push_bind(sql_revision(live.bytes));
    });
    // `VALUES` names its columns column1, column2, ...
    query.push(
        ") AS v
         WHERE NOT EXISTS (SELECT 1 FROM tasks WHERE id = v.column1 AND revision > v.column2)
         ON CONFLICT (id) DO UPDATE SET
            revision = excluded.revision, status = excluded.status,
            paused_from = excluded.paused_from, class = excluded.class,
            priority = excluded.priority, deadline = excluded.deadline,
            written_at = excluded.written_at, message_seq = excluded.message_seq,
            owner = excluded.owner, bytes = excluded.bytes
         WHERE excluded.revision > live.revision",
    );
    query.build().execute(&mut *conn).await?;
    Ok(())
}

/// Ends the live row of each `(id, revision)` if it is older than that revision (a terminal
/// revision or a marker).
async fn end_live(conn: &mut SqliteConnection, ends: &[(&TaskId, u64)]) -> Result<(), Error> {
    let mut query = QueryBuilder::<Sqlite>::new("WITH ended (id, revision) AS (");
    query.push_values(ends, |mut row, (id, revision)| {
        row.push_bind(id.as_str()).push_bind(sql_revision(*revision));
    });
    // The `IN` finds the rows by primary key; only those are compared.
    query.push(
        ") DELETE FROM live WHERE id IN (SELECT id FROM ended)
           AND revision < (SELECT max(revision) FROM ended WHERE ended.id = live.id)",
    );
    query.build().execute(&mut *conn).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use claw_proto::api::DEFAULT_PAGE;
    use claw_proto::kinds::Catalog;
    use claw_proto::spec::{Limits, TaskSpec};
    use serde_json::json;

    use super::*;

    /// A terminal record of `kind` in `session`, created `offset_s` seconds after a fixed epoch.
    fn terminal(session: &str, kind: &str, status: Status, offset_s: i64) -> TaskRecord {
        let created = OffsetDateTime::UNIX_EPOCH
            + time::Duration::days(20_000)
            + time::Duration::seconds(offset_s);
        let input = match kind {
            "exec" => json!({"program": "x"}),
            _ => json!({"seconds": 1}),
        };
        let spec = TaskSpec {
            session: Some(Session::parse(session).unwrap()),
            ..TaskSpec::from_slice(json!({"kind": kind, "input": input}).to_string().as_bytes())
                .unwrap()
        };
        let mut r = spec
            .admit(TaskId::generate(), created, None, &Catalog::builtin(), &Limits::STANDARD)
            .unwrap();
        r.start(1, "w1", created).unwrap();
        match status {
            Status::Succeeded => r.succeed(json!("ok"), created).unwrap(),
            Status::Failed => r
                .fail(
                    claw_proto::TaskError::new("boom", "x", false),
                    claw_proto::Cause::Error,
                    created,
                )
                .unwrap(),
            Status::Cancelled => r.cancel(claw_proto::Cause::User, created).unwrap(),
            _ => unreachable!("only terminal records are archived"),
        }
        r
    }

    fn entry(revision: u64, record: &TaskRecord) -> Entry {
        Entry { revision, record: record.clone(), json: serde_json::to_string(record).unwrap() }
    }

    /// Archives terminal entries, as a batch of only those would.
    async fn upsert(store: &Store, entries: &[Entry]) -> Result<u64, Error> {
        let changes: Vec<_> =
            entries.iter().map(|e| Change::Terminal(Box::new(e.clone()))).collect();
        store.write(&changes, 0).await
    }

    async fn count(store: &Store) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM tasks").fetch_one(&store.pool).await.unwrap()
    }

    async fn revision(store: &Store, id: &TaskId) -> i64 {
        sqlx::query_scalar("SELECT revision FROM tasks WHERE id = ?")
            .bind(id.as_str())
            .fetch_one(&store.pool)
            .await
            .unwrap()
    }

    /// No byte limit on a page: only the row limit counts.
    const ANY_SIZE: usize = usize::MAX;

    fn all(limit: u32) -> Filter {
        Filter { limit, ..Filter::default() }
    }

    #[sqlx::test]
    async fn same_revision_twice_is_one_row(pool: SqlitePool) {
        let store = Store::migrated(pool).await.unwrap();
        let r = terminal("s1", "sleep", Status::Succeeded, 0);
        assert_eq!(upsert(&store, &[entry(7, &r)]).await.unwrap(), 1);
        assert_eq!(upsert(&store, &[entry(7, &r), entry(7, &r)]).await.unwrap(), 0);
        assert_eq!(count(&store).await, 1);
        assert_eq!(revision(&store, &r.id).await, 7);
    }

    #[sqlx::test]
    async fn an_older_revision_never_overwrites_a_newer_one(pool: SqlitePool) {
        let store = Store::migrated(pool).await.unwrap();
        let failed = terminal("s1", "sleep", Status::Failed, 0);
        // The same id retried explicitly and succeeded at a later revision.
        let mut succeeded = failed.clone();
        succeeded.requeue(succeeded.created_at).unwrap();
        succeeded.start(1, "w2", succeeded.created_at).unwrap();
        succeeded.succeed(json!(42), succeeded.created_at).unwrap();

        upsert(&store, &[entry(20, &succeeded)]).await.unwrap();
        assert_eq!(upsert(&store, &[entry(10, &failed)]).await.unwrap(), 0);
        let json = store.get(&failed.id).await.unwrap().unwrap();
        assert_eq!(serde_json::from_str::<TaskRecord>(&json).unwrap(), succeeded);

        // In order, within one batch, the later revision wins too.
        let store2 = store.clone();
        sqlx::query("DELETE FROM tasks").execute(&store2.pool).await.unwrap();
        upsert(&store, &[entry(10, &failed), entry(20, &succeeded)]).await.unwrap();
        assert_eq!(count(&store).await, 1);
        assert_eq!(revision(&store, &failed.id).await, 20);
        let page = store.list(&all(10), ANY_SIZE).await.unwrap();
        assert_eq!(page.tasks, [succeeded]);
    }

    #[sqlx::test]
    async fn get_returns_the_bytes_that_were_archived(pool: SqlitePool) {
        let store = Store::migrated(pool).await.unwrap();
        let r = terminal("s1", "sleep", Status::Cancelled, 0);
        let e = entry(3, &r);
        upsert(&store, std::slice::from_ref(&e)).await.unwrap();
        assert_eq!(store.get(&r.id).await.unwrap(), Some(e.json));
        assert_eq!(store.get(&TaskId::generate()).await.unwrap(), None);
    }

    #[sqlx::test]
    async fn list_filters_by_session_status_and_kind(pool: SqlitePool) {
        let store = Store::migrated(pool).await.unwrap();
        let records = [
            terminal("alice", "sleep", Status::Succeeded, 1),
            terminal("alice", "exec", Status::Failed, 2),
            terminal("bob", "sleep", Status::Failed, 3),
            terminal("bob", "exec", Status::Cancelled, 4),
        ];
        let entries: Vec<_> = records.iter().zip(1..).map(|(r, rev)| entry(rev, r)).collect();
        upsert(&store, &entries).await.unwrap();

        let store = &store;
        let ids = |f: Filter| async move {
            let page = store.list(&Filter { limit: DEFAULT_PAGE, ..f }, ANY_SIZE).await.unwrap();
            assert_eq!(page.next_cursor, None);
            page.tasks.into_iter().map(|t| t.id).collect::<Vec<_>>()
        };
        let id = |i: usize| records[i].id.clone();

        assert_eq!(ids(Filter::default()).await, [id(3), id(2), id(1), id(0)]);
        let alice = Some(Session::parse("alice").unwrap());
        assert_eq!(
            ids(Filter { session: alice.clone(), ..Filter::default() }).await,
            [id(1), id(0)]
        );
        let failed = Some(Status::Failed);
        assert_eq!(ids(Filter { status: failed, ..Filter::default() }).await, [id(2), id(1)]);
        let exec = Some("exec".to_owned());
        assert_eq!(ids(Filter { kind: exec.clone(), ..Filter::default() }).await, [id(3), id(1)]);
        let all_three = Filter { session: alice, status: failed, kind: exec, ..Filter::default() };
        assert_eq!(ids(all_three).await, [id(1)]);
        let running = Filter { status: Some(Status::Running), ..Filter::default() };
        assert!(ids(running).await.is_empty());
    }

    #[sqlx::test]
    async fn list_filters_by_owner_and_unowned_rows_never_match(pool: SqlitePool) {
        let store = Store::migrated(pool).await.unwrap();
        let mut alices = terminal("s", "sleep", Status::Succeeded, 1);
        alices.owner = Some("alice".into());
        let mut bobs = terminal("s", "sleep", Status::Succeeded, 2);
        bobs.owner = Some("bob".into());
        let nobodys = terminal("s", "sleep", Status::Succeeded, 3);
        upsert(&store, &[entry(1, &alices), entry(2, &bobs), entry(3, &nobodys)]).await.unwrap();

        let owned = |owner: &str| Filter { owner: Some(owner.into()), ..all(DEFAULT_PAGE) };
        let page = store.list(&owned("alice"), ANY_SIZE).await.unwrap();
        assert_eq!(page.tasks, [alices]);
        let page = store.list(&owned("carol"), ANY_SIZE).await.unwrap();
        assert!(page.tasks.is_empty());
        assert_eq!(store.list(&all(DEFAULT_PAGE), ANY_SIZE).await.unwrap().tasks.len(), 3);
    }

    #[sqlx::test]
    async fn cursor_pages_have_no_overlap_no_gap_and_keep_the_order(pool: SqlitePool) {
        let store = Store::migrated(pool).await.unwrap();
        // 23 records, several sharing a created_at so the id breaks ties.
        let records: Vec<_> =
            (0..23).map(|i| terminal("s", "sleep", Status::Succeeded, i / 3)).collect();
        let entries: Vec<_> = records.iter().zip(1..).map(|(r, rev)| entry(rev, r)).collect();
        upsert(&store, &entries).await.unwrap();

        let mut expected: Vec<_> = records.iter().map(|r| (r.created_at, r.id.clone())).collect();
        expected.sort();
        expected.reverse();

        let mut seen = Vec::new();
        let mut filter = all(5);
        let mut pages = 0;
        loop {
            let page = store.list(&filter, ANY_SIZE).await.unwrap();
            pages += 1;
            assert!(page.tasks.len() <= 5);
            seen.extend(page.tasks.iter().map(|t| (t.created_at, t.id.clone())));
            match page.next_cursor {
                Some(cursor) => filter.after = Some(Cursor::decode(&cursor).unwrap()),
                None => break,
            }
        }
        assert_eq!(pages, 5);
        assert_eq!(seen, expected);

        // An exact multiple of the page size ends without an empty extra page.
        let page = store.list(&all(23), ANY_SIZE).await.unwrap();
        assert_eq!((page.tasks.len(), page.next_cursor), (23, None));
    }

    #[sqlx::test]
    async fn a_page_stops_at_its_byte_limit_and_the_cursor_goes_on_from_there(pool: SqlitePool) {
        let store = Store::migrated(pool).await.unwrap();
        // 10 records of about 10 KB each, newest last.
        let records: Vec<_> = (0..10)
            .map(|i| {
                let mut r = terminal("s", "sleep", Status::Succeeded, i);
                r.result = Some(json!("x".repeat(10_000)));
                r
            })
            .collect();
        let entries: Vec<_> = records.iter().zip(1..).map(|(r, rev)| entry(rev, r)).collect();
        upsert(&store, &entries).await.unwrap();
        let size = serde_json::to_vec(&records[0]).unwrap().len();

        // Room for three records and a bit: pages of 3, 3, 3, 1, in order, none over the limit.
        let max_bytes = PAGE_ENVELOPE + 3 * (size + 1) + size / 2;
        let mut filter = all(DEFAULT_PAGE);
        let mut seen = Vec::new();
        let mut sizes = Vec::new();
        loop {
            let page = store.list(&filter, max_bytes).await.unwrap();
            assert!(serde_json::to_vec(&page).unwrap().len() <= max_bytes);
            sizes.push(page.tasks.len());
            seen.extend(page.tasks.into_iter().map(|t| t.id));
            match page.next_cursor {
                Some(cursor) => filter.after = Some(Cursor::decode(&cursor).unwrap()),
                None => break,
            }
        }
        assert_eq!(sizes, [3, 3, 3, 1]);
        assert_eq!(seen, records.iter().rev().map(|r| r.id.clone()).collect::<Vec<_>>());

        // A limit below one record still gives one per page: a page never comes back empty
        // while rows remain.
        let page = store.list(&all(DEFAULT_PAGE), 10).await.unwrap();
        assert_eq!(page.tasks.len(), 1);
        assert!(page.next_cursor.is_some());
    }

    #[sqlx::test]
    async fn rows_are_due_for_removal_once_finished_before_the_cutoff_until_marked(
        pool: SqlitePool,
    ) {
        let store = Store::migrated(pool).await.unwrap();
        let old = terminal("s", "sleep", Status::Failed, 0);
        let young = terminal("s", "sleep", Status::Succeeded, 100);
        upsert(&store, &[entry(1, &old), entry(2, &young)]).await.unwrap();
        let finished = |r: &TaskRecord| r.finished_at.unwrap();
        let archived =
            |r: &TaskRecord, revision| Archived { id: r.id.to_string(), revision, payloads: false };

        assert!(
            store
                .due_for_removal(finished(&old) - time::Duration::SECOND, 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.due_for_removal(finished(&old), 10).await.unwrap(), [archived(&old, 1)]);
        let both = store.due_for_removal(finished(&young), 10).await.unwrap();
        assert_eq!(both, [archived(&old, 1), archived(&young, 2)], "oldest first");
        assert_eq!(store.due_for_removal(finished(&young), 1).await.unwrap().len(), 1);

        // Marked: no longer due. A mark naming a revision the row has moved past is ignored.
        let now = OffsetDateTime::now_utc();
        store.mark_removed(&archived(&old, 1), now).await.unwrap();
        store.mark_removed(&archived(&young, 1), now).await.unwrap();
        assert_eq!(
            store.due_for_removal(finished(&young), 10).await.unwrap(),
            [archived(&young, 2)]
        );

        // An explicit retry finishes again at a newer revision: that one is in the bucket.
        let mut again = old.clone();
        again.requeue(finished(&old)).unwrap();
        again.start(1, "w2", finished(&old)).unwrap();
        again.succeed(json!("again"), finished(&old)).unwrap();
        upsert(&store, &[entry(5, &again)]).await.unwrap();
        let due = store.due_for_removal(finished(&young), 10).await.unwrap();
        assert_eq!(due, [archived(&old, 5), archived(&young, 2)]);
    }

    /// A `queued` record created at the fixed epoch.
    fn queued() -> TaskRecord {
        let created = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
        TaskSpec::from_slice(br#"{"kind": "sleep", "input": {"seconds": 1}}"#)
            .unwrap()
            .admit(TaskId::generate(), created, None, &Catalog::builtin(), &Limits::STANDARD)
            .unwrap()
    }

    fn live(record: &TaskRecord, revision: u64, written_at: OffsetDateTime) -> Change {
        let len = serde_json::to_vec(record).unwrap().len();
        Change::Live(Box::new(Live::of(record, revision, written_at, len)))
    }

    fn terminal_change(revision: u64, record: &TaskRecord) -> Change {
        Change::Terminal(Box::new(entry(revision, record)))
    }

    /// The live rows as `(id, revision, status)`.
    async fn live_rows(store: &Store) -> Vec<(String, i64, String)> {
        sqlx::query_as("SELECT id, revision, status FROM live ORDER BY id")
            .fetch_all(&store.pool)
            .await
            .unwrap()
    }

    async fn archive_rows(store: &Store) -> Vec<(String, i64, String)> {
        sqlx::query_as("SELECT id, revision, status FROM tasks ORDER BY id")
            .fetch_all(&store.pool)
            .await
            .unwrap()
    }

    /// The multi-row statements of a batch end in the state the changes would one by one:
    /// random lives of a few tasks (runs, retries, deletes) as the bucket's stream holds them,
    /// in revision order, written once change by change and once in batches of random sizes,
    /// with earlier batches now and then written again (a re-read after a failed commit or a
    /// rewind), compared table by table after every batch.
    #[sqlx::test]
    async fn a_batch_ends_where_its_changes_one_by_one_would(pool: SqlitePool) {
        let batched = Store::migrated(pool).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let single = Store::open(&dir.path().join("single.sqlite")).await.unwrap();
        let at = OffsetDateTime::now_utc();
        // A small deterministic generator (xorshift): the same run every time.
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let tasks: Vec<TaskRecord> = (0..6).map(|_| queued()).collect();
        let mut changes = Vec::new();
        for revision in 1..=600 {
            let mut r = tasks[next(tasks.len() as u64) as usize].clone();
            changes.push(match next(9) {
                0..=4 => live(&r, revision, at),
                5..=7 => {
                    r.start(1, "w", at).unwrap();
                    r.succeed(serde_json::json!({"n": revision}), at).unwrap();
                    terminal_change(revision, &r)
                }
                _ => Change::Gone { id: r.id.clone(), revision },
            });
        }
        let mut batches: Vec<std::ops::Range<usize>> = Vec::new();
        let (mut at_change, mut archived, mut lived) = (0, 0, 0);
        while at_change < changes.len() {
            let batch = if !batches.is_empty() && next(5) == 0 {
                batches[next(batches.len() as u64) as usize].clone()
            } else {
                let n = (1 + next(60) as usize).min(changes.len() - at_change);
                at_change += n;
                batches.push(at_change - n..at_change);
                at_change - n..at_change
            };
            let batch = &changes[batch];
            batched.write(batch, 0).await.unwrap();
            for change in batch {
                single.write(std::slice::from_ref(change), 0).await.unwrap();
            }
            // After every batch, not only at the end: later changes would hide a difference.
            let (a, l) = (archive_rows(&single).await, live_rows(&single).await);
            assert_eq!(archive_rows(&batched).await, a, "after change {at_change}");
            assert_eq!(live_rows(&batched).await, l, "after change {at_change}");
            (archived, lived) = (archived.max(a.len()), lived.max(l.len()));
        }
        assert!(archived > 0 && lived > 0, "the run had both kinds of rows");
    }

    #[sqlx::test]
    async fn a_live_row_follows_the_newest_live_revision_and_ends_with_the_task(pool: SqlitePool) {
        let store = Store::migrated(pool).await.unwrap();
        let at = OffsetDateTime::now_utc();
        let mut r = queued();
        let first = r.clone();
        let id = r.id.to_string();
        store.write(&[live(&first, 1, at)], 0).await.unwrap();
        assert_eq!(live_rows(&store).await, [(id.clone(), 1, "queued".into())]);

        // Forward in one batch; an older revision redelivered afterwards changes nothing.
        r.start(1, "w", at).unwrap();
        store.write(&[live(&first, 1, at), live(&r, 3, at)], 0).await.unwrap();
        store.write(&[live(&first, 1, at)], 0).await.unwrap();
        assert_eq!(live_rows(&store).await, [(id.clone(), 3, "running".into())]);

        // A terminal revision ends it, archived in the same transaction.
        r.succeed(json!(1), at).unwrap();
        assert_eq!(store.write(&[terminal_change(4, &r)], 0).await.unwrap(), 1);
        assert!(live_rows(&store).await.is_empty());

        // A delete marker ends a live row older than itself, and only that.
        let other = queued();
        store
            .write(&[live(&other, 10, at), Change::Gone { id: other.id.clone(), revision: 9 }], 0)
            .await
            .unwrap();
        assert_eq!(live_rows(&store).await.len(), 1);
        store.write(&[Change::Gone { id: other.id.clone(), revision: 11 }], 0).await.unwrap();
        assert!(live_rows(&store).await.is_empty());
    }

    #[sqlx::test]
    async fn a_replayed_live_revision_never_brings_a_finished_task_back(pool: SqlitePool) {
        let store = Store::migrated(pool).await.unwrap();
        let at = OffsetDateTime::now_utc();
        let mut r = queued();
        let before = r.clone();
        r.start(1, "w", at).unwrap();
        r.fail(claw_proto::TaskError::new("x", "y", false), claw_proto::Cause::Error, at).unwrap();
        store.write(&[terminal_change(5, &r)], 0).await.unwrap();
        // The consumer recreated, or a redelivery after the end: the old live revision.
        store.write(&[live(&before, 2, at)], 0).await.unwrap();
        assert!(live_rows(&store).await.is_empty());

        // An explicit retry is newer than the archived end: live again.
        r.requeue(at).unwrap();
        store.write(&[live(&r, 6, at)], 0).await.unwrap();
        assert_eq!(live_rows(&store).await, [(r.id.to_string(), 6, "queued".into())]);
    }

    #[sqlx::test]
    async fn the_position_moves_with_its_rows_and_only_forward(pool: SqlitePool) {
        let store = Store::migrated(pool).await.unwrap();
        assert_eq!(store.position().await.unwrap(), 0);
        let done = terminal("s", "sleep", Status::Succeeded, 0);
        store.write(&[terminal_change(7, &done)], 9).await.unwrap();
        assert_eq!((store.position().await.unwrap(), count(&store).await), (9, 1));
        // A batch of only skipped messages still moves it; an older one never moves it back.
        store.write(&[], 12).await.unwrap();
        store.write(&[], 10).await.unwrap();
        assert_eq!(store.position().await.unwrap(), 12);
        store.rewind(0).await.unwrap();
        assert_eq!(store.position().await.unwrap(), 0);
    }

    #[sqlx::test]
    async fn usage_counts_each_principals_live_tasks_and_the_bytes_still_in_the_bucket(
        pool: SqlitePool,
    ) {
        let store = Store::migrated(pool).await.unwrap();
        let at = OffsetDateTime::now_utc();
        let owned = |owner: Option<&str>| TaskRecord { owner: owner.map(Into::into), ..queued() };
        let size = |r: &TaskRecord| serde_json::to_vec(r).unwrap().len() as u64;
        let (a1, a2, b1, nobody) =
            (owned(Some("a")), owned(Some("a")), owned(Some("b")), owned(None));
        let mut running = a2.clone();
        running.start(1, "w", at).unwrap();
        let mut big = b1.clone();
        big.input_ref = Some(claw_proto::PayloadRef {
            bucket: "payloads".into(),
            name: format!("{}/input", big.id),
            size: 1_000_000,
            digest: None,
        });
        store
            .write(
                &[live(&a1, 1, at), live(&running, 2, at), live(&big, 3, at), live(&nobody, 4, at)],
                0,
            )
            .await
            .unwrap();
        let usage = store.usage().await.unwrap().principals;
        assert_eq!(usage.len(), 2, "tasks without an owner are nobody's: {usage:?}");
        let a = Usage { queued: 1, running: 1, bytes: size(&a1) + size(&running) };
        assert_eq!(usage["a"], a);
        assert_eq!(usage["b"], Usage { queued: 1, running: 0, bytes: size(&big) + 1_000_000 });

        // Finished: no longer queued or running, but its record is held until it is removed.
        let mut done = running.clone();
        let error = claw_proto::TaskError::new("x", "y", false);
        done.fail(error, claw_proto::Cause::Error, at).unwrap();
        store.write(&[terminal_change(5, &done)], 0).await.unwrap();
        let usage = store.usage().await.unwrap().principals;
        assert_eq!(usage["a"], Usage { queued: 1, running: 0, bytes: size(&a1) + size(&done) });
        // A retry of it runs again: counted once, as its live row.
        let mut again = done.clone();
        again.requeue(at).unwrap();
        store.write(&[live(&again, 6, at)], 0).await.unwrap();
        let usage = store.usage().await.unwrap().principals;
        assert_eq!(usage["a"], Usage { queued: 2, running: 0, bytes: size(&a1) + size(&again) });
        // Removed from the bucket by the retention sweep: it holds nothing any more.
        let mut over = again.clone();
        over.start(2, "w", at).unwrap();
        over.succeed(json!("r"), at).unwrap();
        store.write(&[terminal_change(7, &over)], 0).await.unwrap();
        let archived = Archived { id: over.id.to_string(), revision: 7, payloads: false };
        store.mark_removed(&archived, at).await.unwrap();
        let usage = store.usage().await.unwrap().principals;
        assert_eq!(usage["a"], Usage { queued: 1, running: 0, bytes: size(&a1) });
    }

    #[sqlx::test]
    async fn stranded_candidates_are_untouched_for_the_grace_and_need_a_message(pool: SqlitePool) {
        let store = Store::migrated(pool).await.unwrap();
        let now = OffsetDateTime::now_utc();
        let old = now - time::Duration::minutes(5);
        let at = |status: Status, paused_from: Option<Status>, written_at| {
            let r = TaskRecord { status, paused_from, ..queued() };
            (r.id.clone(), live(&r, 1, written_at))
        };
        let cases = [
            (at(Status::Queued, None, old), true),
            (at(Status::Retrying, None, old), true),
            (at(Status::Running, None, old), true),
            (at(Status::Paused, Some(Status::Running), old), true),
            // Paused from the queue: it has no message by design, and resume publishes one.
            (at(Status::Paused, Some(Status::Queued), old), false),
            (at(Status::Paused, Some(Status::Retrying), old), false),
            // Written within the grace: a publish may still be on its way.
            (at(Status::Queued, None, now), false),
        ];
        let changes: Vec<_> = cases.iter().map(|((_, change), _)| change.clone()).collect();
        store.write(&changes, 0).await.unwrap();

        let found: Vec<_> = store.stranded(now - time::Duration::minutes(1)).await.unwrap();
        let expected: Vec<_> = cases
            .iter()
            .filter(|(_, stranded)| *stranded)
            .map(|((id, _), _)| Stranded { id: id.clone(), revision: 1 })
            .collect();
        let mut found_ids: Vec<_> = found.iter().map(|s| s.id.clone()).collect();
        let mut expected_ids: Vec<_> = expected.iter().map(|s| s.id.clone()).collect();
        found_ids.sort();
        expected_ids.sort();
        assert_eq!(found_ids, expected_ids);

        // A record gone without a marker: its row goes, unless it moved on meanwhile.
        let first = &expected[0];
        store.forget_live(&first.id, 0).await.unwrap();
        let count = || async { store.stranded(now).await.unwrap().len() };
        assert_eq!(count().await, 5, "four old ones and the young one; revision 1 is newer than 0");
        store.forget_live(&first.id, 1).await.unwrap();
        assert_eq!(count().await, 4);
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let c = Cursor { created_at: 1_700_000_000_000_000, id: "abc-1".into() };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        for bad in ["", "x", "12", "12.", "a.b", "12.a.b", "12.a b"] {
            assert_eq!(Cursor::decode(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn open_creates_the_file_in_wal_mode_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("archive.sqlite");
        let store = Store::open(&path).await.unwrap();
        let mode: String =
            sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&store.pool).await.unwrap();
        assert_eq!(mode, "wal");
        let r = terminal("s", "sleep", Status::Succeeded, 0);
        upsert(&store, &[entry(1, &r)]).await.unwrap();
        store.close().await;

        // Migrations already applied are skipped; the data is still there.
        let store = Store::open(&path).await.unwrap();
        assert_eq!(count(&store).await, 1);
        store.close().await;
    }
}
