//! The soak's checker, in the style of Jepsen's queue checker: once the load has stopped, a
//! quiesce phase polls (with a deadline) until every accepted task is terminal in the `tasks`
//! bucket or the archive; then it reads what each part of the system says happened and
//! compares it with what the clients were told.
//!
//! Sources, all public: the submitter's answers (key → id), the record in KV (`tasks`, read as
//! the `operator` role), the `PROGRESS` stream (every stored event, by sequence), the archive's
//! SQLite file (read-only), the `TASKS` and `DLQ` streams' counts, the task program's
//! executions log (one `start`/`end` line per run, by key), and the WebSocket clients' logs.
//!
//! What counts as a broken promise is in [`Report::violations`]: accepted tasks lost, a task
//! with more than one terminal state, archive rows missing, unknown or stale, a task that ran
//! twice at once or more often than it has attempts, a WebSocket client that missed a stored
//! event of its session or got one twice, an idempotency key that named two tasks, a healthy
//! task that did not succeed, a service that crashed or did not recover.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use claw_proto::topology;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Config;
use super::faults::{FaultLog, FaultRecord};
use super::load::{Submissions, WsClients, WsLog};

/// How long, after every task is terminal, the archive may take to hold each of them.
const ARCHIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the WebSocket clients may take to receive the last stored event of their session.
const WS_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// Stream messages read at once while scanning `PROGRESS`.
const SCAN_CONCURRENCY: usize = 64;

/// Examples shown per finding in the text report (the JSON has all of them).
const SHOWN: usize = 10;

/// What the checker reads.
#[derive(Debug)]
pub struct Inputs<'a> {
    pub config: &'a Config,
    pub submissions: &'a Submissions,
    pub faults: &'a FaultLog,
    pub ws: &'a WsClients,
    /// A connection as the `operator` role.
    pub operator: &'a async_nats::Client,
    pub exec_log: &'a Path,
    pub db: &'a Path,
    /// The services' JSON logs, for the lines that name a task of a finding.
    pub logs_dir: &'a Path,
    pub started: Instant,
}

/// The checker's findings. `Display` is the readable form; the JSON form is `report.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub run: RunFigures,
    /// Logical tasks (keys) the submitter sent.
    pub keys: usize,
    /// Keys answered 202 or 200.
    pub accepted: usize,
    /// Accepted keys whose only acceptances were 200s (the 202 was lost in a fault).
    pub accepted_only_by_200: usize,
    /// Keys never accepted before the submitter gave up (the run ended).
    pub unresolved_keys: usize,
    pub submit_retries: BTreeMap<String, u64>,
    pub http_answers: BTreeMap<u16, u64>,
    pub unexpected_answers: Vec<String>,
    pub slowest_submit_ms: u64,
    /// Keys whose answers named more than one task id.
    pub idempotency_conflicts: Vec<String>,
    pub faults_by_kind: BTreeMap<String, u64>,
    pub faults: Vec<FaultRecord>,
    pub crashes: Vec<String>,
    /// Accepted tasks not terminal in KV nor in the archive by the quiesce deadline.
    pub lost: Vec<TaskEvidence>,
    /// Accepted tasks by final status.
    pub terminal: BTreeMap<String, u64>,
    /// Accepted tasks that ended other than `succeeded` (none should: every task is healthy and
    /// has attempts to spare).
    pub not_succeeded: Vec<TaskEvidence>,
    /// Tasks with more than one terminal status event in `PROGRESS`, or whose one terminal
    /// event disagrees with the record.
    pub duplicated_terminal: Vec<TaskEvidence>,
    /// Terminal tasks with no terminal event in `PROGRESS` (events are core publishes: one sent
    /// while the server was down is lost; the record is the truth, so this is not a violation).
    pub terminal_event_missing: Vec<String>,
    pub archive: ArchiveFigures,
    /// Accepted tasks by number of runs of the task program (0: never started it).
    pub executions: BTreeMap<u32, u64>,
    /// Accepted tasks by the record's final `attempt`.
    pub attempts: BTreeMap<u32, u64>,
    /// Tasks whose program ran more often than the record counts attempts.
    pub executions_beyond_attempts: Vec<TaskEvidence>,
    /// Tasks whose program ran twice at the same time.
    pub concurrent_executions: Vec<TaskEvidence>,
    /// Runs of the task program that went on after their worker was SIGKILLed (nothing kills
    /// a dead worker's children; with tasks longer than the ack deadline such a run overlaps
    /// the redelivered attempt). Reported, not a violation: the soak's tasks are short.
    pub runs_outliving_their_worker: Vec<String>,
    /// Runs of the program for keys that were never accepted (a submit that was stored but
    /// whose answer never came; allowed, counted).
    pub executions_of_unresolved_keys: usize,
    pub ws: Vec<WsFigures>,
    /// Messages left in `TASKS` once everything was terminal.
    pub queue_left: u64,
    /// When messages were left: the stream's and each lane consumer's state, and the first
    /// messages left (sequence, subject, task), to tell a stuck consumer from a stuck worker.
    pub queue_state: Vec<String>,
    pub dlq_messages: u64,
    /// Seconds the quiesce phase took (until every accepted task was terminal, or its deadline).
    pub quiesce_s: f64,
    /// WARN and ERROR lines of the services' logs, by `service LEVEL message`.
    pub log_warnings: BTreeMap<String, u64>,
    pub violations: Vec<String>,
}

/// The run's parameters and phases.
#[derive(Clone, Debug, Serialize)]
pub struct RunFigures {
    pub duration_s: f64,
    pub rate: f64,
    pub fault_interval_s: f64,
    pub ack_deadline_s: f64,
    pub ack_deadline_shortened: bool,
    pub seed: u64,
    pub sessions: usize,
    pub dir: String,
    pub total_s: f64,
}

/// One task named in a finding, with what each source says about it.
#[derive(Clone, Debug, Serialize)]
pub struct TaskEvidence {
    pub id: String,
    pub key: String,
    /// What the submitter saw: when the key was first sent, how often, when it was accepted.
    pub submit: String,
    /// The record's status, attempt, cause, worker and error code, or where it was missing.
    pub record: String,
    /// Its status events in `PROGRESS`: `seq:status/attempt`.
    pub events: Vec<String>,
    /// Its program runs: `start..end pid` in seconds from the run's start.
    pub runs: Vec<String>,
    /// Service log lines that name it (`<log file>: <line>`).
    pub logs: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ArchiveFigures {
    pub rows: usize,
    /// Terminal accepted tasks without a row.
    pub missing: Vec<String>,
    /// Rows for ids that no submit named (neither accepted nor an unresolved key's task).
    pub unknown: Vec<String>,
    /// Rows for tasks of unresolved keys (stored, but the client never heard; allowed).
    pub unresolved_rows: usize,
    /// Rows whose status differs from the terminal record in KV.
    pub stale: Vec<String>,
}

/// One WebSocket client's figures, against the events `PROGRESS` stored for its session after
/// its first `hello`.
#[derive(Clone, Debug, Serialize)]
pub struct WsFigures {
    pub session: String,
    pub connects: u32,
    pub refused: u32,
    pub ends: BTreeMap<String, u64>,
    pub received: usize,
    pub stored: usize,
    /// Stored events of the session it never received (their sequences).
    pub missed: Vec<u64>,
    /// Of those, terminal status events: `seq task_id status`.
    pub missed_terminal: Vec<String>,
    /// Sequences it received more than once (or out of order).
    pub duplicates: Vec<u64>,
    /// Whether it had caught up with the stream when the check ended.
    pub caught_up: bool,
}

/// A record as the checker reads it: only the fields it needs, so additions to the record
/// never break it (readers ignore unknown fields, `docs/PROTOCOL.md`).
#[derive(Clone, Debug, Deserialize)]
struct RecordView {
    status: String,
    #[serde(default)]
    attempt: u32,
    #[serde(default)]
    cause: Option<String>,
    #[serde(default)]
    worker: Option<String>,
    #[serde(default)]
    error: Option<ErrorView>,
    #[serde(default)]
    input: Value,
}

#[derive(Clone, Debug, Deserialize)]
struct ErrorView {
    code: String,
}

impl RecordView {
    fn is_terminal(&self) -> bool {
        is_terminal(&self.status)
    }

    /// The task's key: the first argument of its program.
    fn key(&self) -> Option<&str> {
        self.input["args"][0].as_str()
    }

    fn describe(&self, source: &str) -> String {
        format!(
            "{source}: {} attempt {} cause {} worker {} error {}",
            self.status,
            self.attempt,
            self.cause.as_deref().unwrap_or("-"),
            self.worker.as_deref().unwrap_or("-"),
            self.error.as_ref().map_or("-", |e| e.code.as_str())
        )
    }
}

fn is_terminal(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "cancelled")
}

/// A stored `PROGRESS` event as the checker needs it.
#[derive(Clone, Debug)]
struct StoredEvent {
    seq: u64,
    session: String,
    task_id: String,
    /// `status` events only: the status and attempt.
    status: Option<(String, u32)>,
}

/// One run of the task program.
#[derive(Clone, Debug)]
struct Run {
    pid: u32,
    /// The worker process that started it.
    ppid: u32,
    start_ns: u128,
    end_ns: Option<u128>,
}

/// The `TASKS` stream's state, every lane consumer's, and the first messages still in it.
async fn queue_state(js: &async_nats::jetstream::Context) -> Vec<String> {
    let mut lines = Vec::new();
    let Ok(mut stream) = js.get_stream(topology::TASKS_STREAM).await else {
        return vec!["TASKS: no stream info".into()];
    };
    if let Ok(info) = stream.info().await {
        let st = &info.state;
        lines.push(format!(
            "TASKS: messages {}, first seq {}, last seq {}",
            st.messages, st.first_sequence, st.last_sequence
        ));
    }
    for lane in topology::Lane::ALL {
        match stream.consumer_info(lane.consumer()).await {
            Ok(c) => lines.push(format!(
                "{}: delivered {} (consumer {}), ack floor {}, pending {}, ack pending {}, redelivered {}, waiting pulls {}",
                lane.consumer(),
                c.delivered.stream_sequence,
                c.delivered.consumer_sequence,
                c.ack_floor.stream_sequence,
                c.num_pending,
                c.num_ack_pending,
                c.num_redelivered,
                c.num_waiting
            )),
            Err(e) => lines.push(format!("{}: {e}", lane.consumer())),
        }
    }
    // Whether the workers still pull: their pools' sizes and busy slots.
    let client = js.client();
    for name in super::stack::WORKERS {
        let subject = claw_proto::topology::worker_status_subject(name);
        let asked = client.request(subject, Vec::new().into());
        match tokio::time::timeout(Duration::from_secs(2), asked).await {
            Ok(Ok(reply)) => {
                lines.push(format!("{name}: {}", String::from_utf8_lossy(&reply.payload)))
            }
            _ => lines.push(format!("{name}: no status answer")),
        }
    }
    let first = stream.cached_info().state.first_sequence;
    let mut seq = first;
    for _ in 0..8 {
        let Ok(m) =
            stream.raw_message_builder().sequence(seq).next_by_subject("tasks.>").send().await
        else {
            break;
        };
        let id = serde_json::from_slice::<Value>(&m.payload)
            .ok()
            .and_then(|v| v["id"].as_str().map(str::to_owned))
            .unwrap_or_default();
        lines.push(format!("left: seq {} on {} at {}, task {id}", m.sequence, m.subject, m.time));
        seq = m.sequence + 1;
    }
    lines
}

/// Runs the quiesce phase and every check.
pub async fn check(inputs: Inputs<'_>) -> Report {
    let Inputs { config, submissions, faults, ws, operator, exec_log, db, logs_dir, started } =
        inputs;
    let js = claw_proto::connect::jetstream(operator.clone());
    let kv = js.get_key_value(topology::TASKS_BUCKET).await.ok();

    let accepted: BTreeMap<String, String> = submissions
        .keys
        .iter()
        .filter_map(|(key, k)| k.id.clone().map(|id| (id, key.clone())))
        .collect();
    let quiesce_started = Instant::now();
    let mut finals = quiesce(kv.as_ref(), db, &accepted, config.quiesce_timeout).await;
    let quiesce_s = quiesce_started.elapsed().as_secs_f64();
    let terminal_ids: BTreeSet<String> =
        finals.iter().filter(|(_, r)| r.1.is_terminal()).map(|(id, _)| id.clone()).collect();
    let rows = wait_archived(db, &terminal_ids).await;
    // The archive may have finished what KV had not yet shown terminal, or the other way round.
    for (id, row) in &rows {
        if accepted.contains_key(id) && !finals.get(id).is_some_and(|f| f.1.is_terminal()) {
            finals.insert(id.clone(), ("archive".into(), row.clone()));
        }
    }

    let events = scan_progress(&js).await;
    let ws_logs = catch_up(ws, &events).await;
    let runs = read_runs(exec_log);
    let start_wall = wall_ns_of(started);
    let queue_left = stream_messages(&js, topology::TASKS_STREAM).await;
    let queue_state = if queue_left > 0 { queue_state(&js).await } else { Vec::new() };
    let dlq_messages = stream_messages(&js, topology::DLQ_STREAM).await;

    let mut by_task: HashMap<&str, Vec<&StoredEvent>> = HashMap::new();
    for e in &events {
        by_task.entry(e.task_id.as_str()).or_default().push(e);
    }
    let evidence = |id: &str, key: &str| -> TaskEvidence {
        let record = match finals.get(id) {
            Some((source, r)) => r.describe(source),
            None => "no record in KV or the archive".to_owned(),
        };
        let events = by_task
            .get(id)
            .map(|es| {
                es.iter()
                    .filter_map(|e| e.status.as_ref().map(|(s, a)| format!("{}:{s}/{a}", e.seq)))
                    .collect()
            })
            .unwrap_or_default();
        let runs = runs
            .get(key)
            .map(|rs| rs.iter().map(|r| describe_run(r, start_wall)).collect())
            .unwrap_or_default();
        let submit = submissions.keys.get(key).map_or("never sent".to_owned(), |k| {
            format!(
                "sent at {:.2} s, {} tries, accepted at {} ({})",
                k.first_sent_s,
                k.tries,
                k.accepted_s.map_or("-".to_owned(), |s| format!("{s:.2} s")),
                if k.created { "202" } else { "200 only" }
            )
        });
        TaskEvidence {
            id: id.to_owned(),
            key: key.to_owned(),
            submit,
            record,
            events,
            runs,
            logs: Vec::new(),
        }
    };

    let mut report = Report {
        run: RunFigures {
            duration_s: config.duration.as_secs_f64(),
            rate: config.rate,
            fault_interval_s: config.fault_interval.as_secs_f64(),
            ack_deadline_s: config.ack_deadline().as_secs_f64(),
            ack_deadline_shortened: config.ack_deadline_s.is_some(),
            seed: config.seed,
            sessions: config.sessions,
            dir: config.dir.display().to_string(),
            total_s: 0.0,
        },
        keys: submissions.keys.len(),
        accepted: accepted.len(),
        accepted_only_by_200: submissions
            .keys
            .values()
            .filter(|k| k.id.is_some() && !k.created)
            .count(),
        unresolved_keys: submissions.keys.values().filter(|k| k.id.is_none()).count(),
        submit_retries: submissions.retries.clone(),
        http_answers: submissions.answers.clone(),
        unexpected_answers: submissions.unexpected.clone(),
        slowest_submit_ms: submissions.slowest_ms,
        idempotency_conflicts: submissions
            .keys
            .iter()
            .filter(|(_, k)| !k.other_ids.is_empty())
            .map(|(key, k)| format!("{key}: {:?} and {:?}", k.id, k.other_ids))
            .collect(),
        faults_by_kind: faults.counts(),
        faults: faults.records.clone(),
        crashes: faults.crashes.clone(),
        lost: Vec::new(),
        terminal: BTreeMap::new(),
        not_succeeded: Vec::new(),
        duplicated_terminal: Vec::new(),
        terminal_event_missing: Vec::new(),
        archive: ArchiveFigures { rows: rows.len(), ..ArchiveFigures::default() },
        executions: BTreeMap::new(),
        attempts: BTreeMap::new(),
        executions_beyond_attempts: Vec::new(),
        concurrent_executions: Vec::new(),
        runs_outliving_their_worker: outliving(&runs, faults, start_wall),
        executions_of_unresolved_keys: 0,
        ws: Vec::new(),
        queue_left,
        queue_state,
        dlq_messages,
        quiesce_s,
        log_warnings: BTreeMap::new(),
        violations: Vec::new(),
    };

    for (id, key) in &accepted {
        let final_record = finals.get(id).map(|(_, r)| r);
        match final_record {
            Some(r) if r.is_terminal() => {
                *report.terminal.entry(r.status.clone()).or_default() += 1;
                *report.attempts.entry(r.attempt).or_default() += 1;
                if r.status != "succeeded" {
                    report.not_succeeded.push(evidence(id, key));
                }
                match rows.get(id) {
                    None => report.archive.missing.push(id.clone()),
                    Some(row) if row.status != r.status => report
                        .archive
                        .stale
                        .push(format!("{id}: archive {}, record {}", row.status, r.status)),
                    Some(_) => {}
                }
                let ends: Vec<&(String, u32)> = by_task
                    .get(id.as_str())
                    .map(|es| {
                        es.iter()
                            .filter_map(|e| e.status.as_ref())
                            .filter(|(s, _)| is_terminal(s))
                            .collect()
                    })
                    .unwrap_or_default();
                match ends.as_slice() {
                    [] => report.terminal_event_missing.push(id.clone()),
                    [(status, _)] if *status == r.status => {}
                    _ => report.duplicated_terminal.push(evidence(id, key)),
                }
                let task_runs = runs.get(key).map(Vec::as_slice).unwrap_or_default();
                *report.executions.entry(task_runs.len() as u32).or_default() += 1;
                if task_runs.len() as u32 > r.attempt {
                    report.executions_beyond_attempts.push(evidence(id, key));
                }
                if overlapping(task_runs) {
                    report.concurrent_executions.push(evidence(id, key));
                }
            }
            _ => report.lost.push(evidence(id, key)),
        }
    }

    let unresolved: HashSet<&str> = submissions
        .keys
        .iter()
        .filter(|(_, k)| k.id.is_none())
        .map(|(key, _)| key.as_str())
        .collect();
    for (id, row) in &rows {
        if accepted.contains_key(id) {
            continue;
        }
        match row.key() {
            Some(key) if unresolved.contains(key) => report.archive.unresolved_rows += 1,
            _ => report.archive.unknown.push(id.clone()),
        }
    }
    report.executions_of_unresolved_keys =
        unresolved.iter().map(|k| runs.get(*k).map_or(0, Vec::len)).sum();
    report.ws = ws_figures(&ws_logs, &events);
    attach_logs(&mut report, logs_dir);
    report.violations = violations(&report);
    report.run.total_s = started.elapsed().as_secs_f64();
    report
}

/// Fills in the log lines of every task named in a finding, and counts the services' WARN and
/// ERROR lines by message.
fn attach_logs(report: &mut Report, dir: &Path) {
    let mut named: HashMap<String, Vec<String>> = HashMap::new();
    for t in report.findings() {
        named.insert(t.id.clone(), Vec::new());
    }
    let mut files: Vec<_> =
        std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    files.sort();
    for file in files {
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // `soak-w1.3.log` is service `soak-w1`, incarnation 3.
        let service = name.split('.').next().unwrap_or(&name).to_owned();
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for line in text.lines() {
            let json = serde_json::from_str::<Value>(line).ok();
            if let Some(v) = &json
                && let Some(level @ ("WARN" | "ERROR")) = v["level"].as_str()
            {
                let message = v["fields"]["message"].as_str().unwrap_or("?");
                let entry = format!("{service} {level} {message}");
                *report.log_warnings.entry(entry).or_default() += 1;
            }
            for (id, lines) in named.iter_mut() {
                if line.contains(id.as_str()) && lines.len() < MAX_LOG_LINES {
                    let shown = json.as_ref().map_or_else(|| line.to_owned(), compact);
                    lines.push(format!("{name}: {shown}"));
                }
            }
        }
    }
    for t in report.findings_mut() {
        t.logs = named.get(&t.id).cloned().unwrap_or_default();
    }
}

/// A JSON log line as `time LEVEL target: message k=v ... [span fields]`.
fn compact(v: &Value) -> String {
    let mut out = format!(
        "{} {} {}: {}",
        v["timestamp"].as_str().unwrap_or("?"),
        v["level"].as_str().unwrap_or("?"),
        v["target"].as_str().unwrap_or("?"),
        v["fields"]["message"].as_str().unwrap_or("")
    );
    if let Some(fields) = v["fields"].as_object() {
        for (k, value) in fields.iter().filter(|(k, _)| *k != "message") {
            out.push_str(&format!(" {k}={value}"));
        }
    }
    if let Some(span) = v["span"].as_object() {
        let fields: Vec<String> = span.iter().map(|(k, value)| format!("{k}={value}")).collect();
        out.push_str(&format!(" [{}]", fields.join(" ")));
    }
    out.chars().take(500).collect()
}

/// Log lines kept per task of a finding.
const MAX_LOG_LINES: usize = 40;

/// Polls until every accepted task is terminal (in KV, or else in the archive), or `timeout`.
/// Returns the last record seen of each, with where it was read.
async fn quiesce(
    kv: Option<&jetstream::kv::Store>,
    db: &Path,
    accepted: &BTreeMap<String, String>,
    timeout: Duration,
) -> BTreeMap<String, (String, RecordView)> {
    let deadline = Instant::now() + timeout;
    let mut finals: BTreeMap<String, (String, RecordView)> = BTreeMap::new();
    let mut pending: Vec<String> = accepted.keys().cloned().collect();
    let mut said = Instant::now();
    loop {
        let mut still = Vec::new();
        for id in pending {
            let record = match kv {
                Some(kv) => kv.get(&id).await.ok().flatten(),
                None => None,
            };
            match record.and_then(|b| serde_json::from_slice::<RecordView>(&b).ok()) {
                Some(r) if r.is_terminal() => {
                    finals.insert(id, ("kv".into(), r));
                }
                Some(r) => {
                    finals.insert(id.clone(), ("kv".into(), r));
                    still.push(id);
                }
                None => still.push(id),
            }
        }
        if !still.is_empty() {
            // A record may have left the bucket already; the archive then has the last word.
            let rows = archive_rows_of(db, &still).await;
            still.retain(|id| match rows.get(id) {
                Some(row) if row.is_terminal() => {
                    finals.insert(id.clone(), ("archive".into(), row.clone()));
                    false
                }
                _ => true,
            });
        }
        pending = still;
        if pending.is_empty() || Instant::now() > deadline {
            return finals;
        }
        if said.elapsed() > Duration::from_secs(10) {
            eprintln!("soak: quiescing, {} accepted tasks not terminal yet", pending.len());
            said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Polls the archive until it has a row for each of `ids`, or [`ARCHIVE_TIMEOUT`]; returns
/// every row.
async fn wait_archived(db: &Path, ids: &BTreeSet<String>) -> BTreeMap<String, RecordView> {
    let deadline = Instant::now() + ARCHIVE_TIMEOUT;
    loop {
        let rows = archive_rows(db).await;
        if ids.iter().all(|id| rows.contains_key(id)) || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The archive's rows for `ids` (a whole-table read when there are many).
async fn archive_rows_of(db: &Path, ids: &[String]) -> BTreeMap<String, RecordView> {
    if ids.len() > 200 {
        return archive_rows(db).await;
    }
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(db).read_only(true);
    let Ok(mut conn) = sqlx::ConnectOptions::connect(&options).await else {
        return BTreeMap::new();
    };
    let mut rows = BTreeMap::new();
    for id in ids {
        let row: Option<(String, String)> =
            sqlx::query_as("SELECT status, record FROM tasks WHERE id = ?")
                .bind(id)
                .fetch_optional(&mut conn)
                .await
                .ok()
                .flatten();
        if let Some((status, record)) = row {
            rows.insert(id.clone(), record_view(status, &record));
        }
    }
    rows
}

/// Every row of the archive, by id, with the record it holds (read-only; only the archiver
/// writes). Empty if the file cannot be read yet.
async fn archive_rows(db: &Path) -> BTreeMap<String, RecordView> {
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(db).read_only(true);
    let Ok(mut conn) = sqlx::ConnectOptions::connect(&options).await else {
        return BTreeMap::new();
    };
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT id, status, record FROM tasks")
            .fetch_all(&mut conn)
            .await
            .unwrap_or_default();
    rows.into_iter().map(|(id, status, record)| (id, record_view(status, &record))).collect()
}

/// A row as a record: its JSON, with the `status` column, which is what listing filters on.
fn record_view(status: String, record: &str) -> RecordView {
    let view = serde_json::from_str::<RecordView>(record).unwrap_or(RecordView {
        status: status.clone(),
        attempt: 0,
        cause: None,
        worker: None,
        error: None,
        input: Value::Null,
    });
    RecordView { status, ..view }
}

/// Every event stored in `PROGRESS`, in sequence order.
async fn scan_progress(js: &jetstream::Context) -> Vec<StoredEvent> {
    let Ok(mut stream) = js.get_stream(topology::PROGRESS_STREAM).await else {
        return Vec::new();
    };
    let Ok(info) = stream.info().await else { return Vec::new() };
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let stream = &stream;
    let mut events: Vec<StoredEvent> = futures::stream::iter(first..=last)
        .map(|seq| async move {
            // A read that fails is retried: a gap here would be blamed on the WebSocket.
            for _ in 0..3 {
                if let Ok(m) = stream.get_raw_message(seq).await {
                    return parse_event(seq, &m.subject, &m.payload);
                }
            }
            None
        })
        .buffer_unordered(SCAN_CONCURRENCY)
        .filter_map(|e| async move { e })
        .collect()
        .await;
    events.sort_by_key(|e| e.seq);
    events
}

fn parse_event(seq: u64, subject: &str, payload: &[u8]) -> Option<StoredEvent> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    // `progress.[<owner>.]<session>.<task_id>`: the subject is what a session's feed filters on
    // (the soak's gateway has no tokens, so its tasks have no owner).
    let parts: Vec<&str> = subject.split('.').collect();
    let (session, task_id) = match parts[..] {
        ["progress", session, task_id] | ["progress", _, session, task_id] => (session, task_id),
        _ => return None,
    };
    let status = (v["type"] == "status")
        .then(|| {
            let status = v["data"]["status"].as_str()?.to_owned();
            Some((status, v["data"]["attempt"].as_u64().unwrap_or(0) as u32))
        })
        .flatten();
    Some(StoredEvent { seq, session: session.to_owned(), task_id: task_id.to_owned(), status })
}

/// Waits until each WebSocket client has received up to the last stored event of its session
/// (or [`WS_CATCH_UP_TIMEOUT`]), and returns their logs.
async fn catch_up(ws: &WsClients, events: &[StoredEvent]) -> Vec<(WsLog, bool)> {
    let mut last: HashMap<&str, u64> = HashMap::new();
    for e in events {
        last.insert(e.session.as_str(), e.seq);
    }
    let deadline = Instant::now() + WS_CATCH_UP_TIMEOUT;
    loop {
        let logs = ws.snapshot();
        let caught: Vec<bool> = logs
            .iter()
            .map(|l| l.cursor >= last.get(l.session.as_str()).copied().unwrap_or(0))
            .collect();
        if caught.iter().all(|c| *c) || Instant::now() > deadline {
            return logs.into_iter().zip(caught).collect();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ws_figures(logs: &[(WsLog, bool)], events: &[StoredEvent]) -> Vec<WsFigures> {
    logs.iter()
        .map(|(log, caught_up)| {
            let from = log.first_seq.unwrap_or(u64::MAX);
            let stored: Vec<&StoredEvent> = events
                .iter()
                .filter(|e| e.session == log.session && e.seq > from && e.seq <= log.cursor)
                .collect();
            let received: HashSet<u64> = log.events.iter().map(|e| e.seq).collect();
            let missed: Vec<&&StoredEvent> =
                stored.iter().filter(|e| !received.contains(&e.seq)).collect();
            WsFigures {
                session: log.session.clone(),
                connects: log.connects,
                refused: log.refused,
                ends: log.ends.clone(),
                received: log.events.len(),
                stored: stored.len(),
                missed: missed.iter().map(|e| e.seq).collect(),
                missed_terminal: missed
                    .iter()
                    .filter_map(|e| {
                        let (status, _) = e.status.as_ref()?;
                        is_terminal(status).then(|| format!("{} {} {status}", e.seq, e.task_id))
                    })
                    .collect(),
                duplicates: log.duplicates.clone(),
                caught_up: *caught_up,
            }
        })
        .collect()
}

/// The executions log, by key. Lines: `start|end <key> <pid> <parent pid> <unix ns>`.
fn read_runs(log: &Path) -> HashMap<String, Vec<Run>> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut runs: HashMap<String, Vec<Run>> = HashMap::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [what, key, pid, ppid, ns] = parts.as_slice() else { continue };
        let (Ok(pid), Ok(ppid), Ok(ns)) = (pid.parse(), ppid.parse(), ns.parse::<u128>()) else {
            continue;
        };
        let task_runs = runs.entry((*key).to_owned()).or_default();
        match *what {
            "start" => task_runs.push(Run { pid, ppid, start_ns: ns, end_ns: None }),
            "end" => {
                if let Some(run) = task_runs.iter_mut().rev().find(|r| r.pid == pid) {
                    run.end_ns = Some(ns);
                }
            }
            _ => {}
        }
    }
    runs
}

/// Whether any run started before an earlier one of the same task had ended.
fn overlapping(runs: &[Run]) -> bool {
    let mut sorted: Vec<&Run> = runs.iter().collect();
    sorted.sort_by_key(|r| r.start_ns);
    sorted.windows(2).any(|w| w[0].end_ns.is_some_and(|end| w[1].start_ns < end))
}

/// The wall-clock time (Unix nanoseconds) of `started`: the program's log is in wall-clock
/// time, the soak's own times are from its start.
fn wall_ns_of(started: Instant) -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        .saturating_sub(started.elapsed().as_nanos())
}

/// Seconds from the run's start of wall-clock nanoseconds `ns`.
fn since_start(ns: u128, start_wall: u128) -> f64 {
    ns.saturating_sub(start_wall) as f64 / 1e9
}

fn describe_run(run: &Run, start_wall: u128) -> String {
    let at = |ns: u128| since_start(ns, start_wall);
    let end = run.end_ns.map_or("(no end)".to_owned(), |end| format!("{:.3}", at(end)));
    format!("{:.3}..{end} s pid {} worker pid {}", at(run.start_ns), run.pid, run.ppid)
}

/// Runs that were still going after their worker was SIGKILLed, and ended later: the child
/// outlived its worker (and its lease). One line each.
fn outliving(runs: &HashMap<String, Vec<Run>>, faults: &FaultLog, start_wall: u128) -> Vec<String> {
    let kills: HashMap<u32, f64> =
        faults.records.iter().filter_map(|f| Some((f.killed_worker_pid?, f.at_s))).collect();
    let mut lines = Vec::new();
    for (key, task_runs) in runs {
        for run in task_runs {
            let (Some(killed_at), Some(end)) = (kills.get(&run.ppid), run.end_ns) else {
                continue;
            };
            let (start, end) =
                (since_start(run.start_ns, start_wall), since_start(end, start_wall));
            if start < *killed_at && end > *killed_at {
                lines.push(format!(
                    "{key}: pid {} ran {start:.3}..{end:.3} s; its worker (pid {}) was killed at {killed_at:.3} s",
                    run.pid, run.ppid
                ));
            }
        }
    }
    lines.sort();
    lines
}

async fn stream_messages(js: &jetstream::Context, name: &str) -> u64 {
    match js.get_stream(name).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Every broken promise, one line each.
fn violations(r: &Report) -> Vec<String> {
    let mut v = Vec::new();
    let mut say = |count: usize, what: &str| {
        if count > 0 {
            v.push(format!("{count} {what}"));
        }
    };
    say(r.lost.len(), "accepted tasks lost (not terminal anywhere by the quiesce deadline)");
    say(r.duplicated_terminal.len(), "tasks with more than one terminal state");
    say(r.archive.missing.len(), "terminal tasks missing from the archive");
    say(r.archive.unknown.len(), "archive rows for tasks nobody submitted");
    say(r.archive.stale.len(), "archive rows disagreeing with the final record");
    say(r.idempotency_conflicts.len(), "Idempotency-Keys that named two tasks");
    say(r.not_succeeded.len(), "healthy tasks that did not succeed");
    say(r.concurrent_executions.len(), "tasks whose program ran twice at once");
    say(r.executions_beyond_attempts.len(), "tasks that ran more often than they have attempts");
    say(r.unexpected_answers.len(), "submits answered outside the contract (500 or 4xx)");
    say(r.crashes.len(), "services that exited on their own");
    let problems: usize = r.faults.iter().map(|f| f.problems.len()).sum();
    say(problems, "problems applying or recovering from faults");
    let missed: usize = r.ws.iter().map(|w| w.missed.len()).sum();
    say(missed, "stored events a WebSocket client never received");
    let duplicates: usize = r.ws.iter().map(|w| w.duplicates.len()).sum();
    say(duplicates, "events a WebSocket client received twice");
    let behind = r.ws.iter().filter(|w| !w.caught_up).count();
    say(behind, "WebSocket clients that never caught up with the stream");
    if r.lost.is_empty() && r.queue_left > 0 {
        v.push(format!("{} messages left in TASKS after every task finished", r.queue_left));
    }
    v
}

impl Report {
    /// Every task named in a finding.
    fn findings(&self) -> impl Iterator<Item = &TaskEvidence> {
        self.lost
            .iter()
            .chain(&self.duplicated_terminal)
            .chain(&self.not_succeeded)
            .chain(&self.executions_beyond_attempts)
            .chain(&self.concurrent_executions)
    }

    fn findings_mut(&mut self) -> impl Iterator<Item = &mut TaskEvidence> {
        self.lost
            .iter_mut()
            .chain(&mut self.duplicated_terminal)
            .chain(&mut self.not_succeeded)
            .chain(&mut self.executions_beyond_attempts)
            .chain(&mut self.concurrent_executions)
    }

    /// Whether every promise held.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// Whether the two first promises broke (`claw-soak` exits with 1 for these, 2 for others).
    pub fn lost_or_duplicated(&self) -> bool {
        !self.lost.is_empty() || !self.duplicated_terminal.is_empty()
    }
}

fn counts<K: fmt::Display>(map: &BTreeMap<K, u64>) -> String {
    if map.is_empty() {
        return "none".to_owned();
    }
    map.iter().map(|(k, n)| format!("{k}: {n}")).collect::<Vec<_>>().join(", ")
}

fn show_tasks(f: &mut fmt::Formatter<'_>, what: &str, tasks: &[TaskEvidence]) -> fmt::Result {
    writeln!(f, "{what}: {}", tasks.len())?;
    for t in tasks.iter().take(SHOWN) {
        writeln!(f, "  {} (key {})", t.id, t.key)?;
        writeln!(f, "    submit  {}", t.submit)?;
        writeln!(f, "    record  {}", t.record)?;
        writeln!(f, "    events  {}", t.events.join(" "))?;
        writeln!(f, "    runs    {}", t.runs.join("; "))?;
        for line in t.logs.iter().take(SHOWN) {
            writeln!(f, "    log     {line}")?;
        }
        if t.logs.len() > SHOWN {
            writeln!(f, "    log     ... {} more lines (report.json)", t.logs.len() - SHOWN)?;
        }
    }
    if tasks.len() > SHOWN {
        writeln!(f, "  ... and {} more (report.json)", tasks.len() - SHOWN)?;
    }
    Ok(())
}

fn show_list(f: &mut fmt::Formatter<'_>, what: &str, items: &[String]) -> fmt::Result {
    writeln!(f, "{what}: {}", items.len())?;
    for item in items.iter().take(SHOWN) {
        writeln!(f, "  {item}")?;
    }
    if items.len() > SHOWN {
        writeln!(f, "  ... and {} more (report.json)", items.len() - SHOWN)?;
    }
    Ok(())
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let run = &self.run;
        writeln!(
            f,
            "soak: {:.0} s at {}/s, a fault every ~{:.1} s, ack deadline {:.1} s{}, seed {}, {} sessions",
            run.duration_s,
            run.rate,
            run.fault_interval_s,
            run.ack_deadline_s,
            if run.ack_deadline_shortened { " (shortened)" } else { " (as shipped)" },
            run.seed,
            run.sessions
        )?;
        writeln!(
            f,
            "run dir: {}; took {:.1} s, quiesce {:.1} s",
            run.dir, run.total_s, self.quiesce_s
        )?;
        writeln!(
            f,
            "tasks: {} keys, {} accepted ({} only by 200), {} unresolved when the run ended",
            self.keys, self.accepted, self.accepted_only_by_200, self.unresolved_keys
        )?;
        writeln!(
            f,
            "submits: answers {}; retries {}; slowest {} ms",
            counts(&self.http_answers),
            counts(&self.submit_retries),
            self.slowest_submit_ms
        )?;
        let total: u64 = self.faults_by_kind.values().sum();
        writeln!(f, "faults: {total} ({})", counts(&self.faults_by_kind))?;
        for fault in &self.faults {
            writeln!(
                f,
                "  {:7.2} s  {:<26} recovered {}  {}",
                fault.at_s,
                fault.fault,
                fault.recovered_s.map_or("never".to_owned(), |s| format!("{s:.2} s")),
                fault.detail
            )?;
            for p in &fault.problems {
                writeln!(f, "             problem: {p}")?;
            }
        }
        show_list(f, "crashes", &self.crashes)?;
        writeln!(f, "terminal: {}", counts(&self.terminal))?;
        show_tasks(f, "LOST", &self.lost)?;
        show_tasks(f, "duplicated terminal states", &self.duplicated_terminal)?;
        show_tasks(f, "not succeeded", &self.not_succeeded)?;
        let a = &self.archive;
        writeln!(
            f,
            "archive: {} rows; missing {}, unknown {}, stale {}, tasks of unresolved keys {}",
            a.rows,
            a.missing.len(),
            a.unknown.len(),
            a.stale.len(),
            a.unresolved_rows
        )?;
        for id in a.missing.iter().chain(&a.unknown).chain(&a.stale).take(SHOWN) {
            writeln!(f, "  {id}")?;
        }
        writeln!(f, "executions per task: {}", counts(&self.executions))?;
        writeln!(f, "attempts per task: {}", counts(&self.attempts))?;
        writeln!(f, "runs of unresolved keys' tasks: {}", self.executions_of_unresolved_keys)?;
        show_tasks(f, "concurrent executions", &self.concurrent_executions)?;
        show_tasks(f, "executions beyond attempts", &self.executions_beyond_attempts)?;
        show_list(f, "runs outliving their SIGKILLed worker", &self.runs_outliving_their_worker)?;
        writeln!(f, "WebSocket clients:")?;
        for w in &self.ws {
            writeln!(
                f,
                "  {}: {} connects ({} refused), ends {}; received {} of {} stored, missed {} \
                 ({} terminal), duplicates {}{}",
                w.session,
                w.connects,
                w.refused,
                counts(&w.ends),
                w.received,
                w.stored,
                w.missed.len(),
                w.missed_terminal.len(),
                w.duplicates.len(),
                if w.caught_up { "" } else { ", NOT caught up" }
            )?;
            for m in w.missed_terminal.iter().take(SHOWN) {
                writeln!(f, "    missed {m}")?;
            }
        }
        writeln!(
            f,
            "terminal tasks without a terminal event in PROGRESS: {}",
            self.terminal_event_missing.len()
        )?;
        writeln!(f, "left in TASKS: {}; DLQ: {}", self.queue_left, self.dlq_messages)?;
        for line in &self.queue_state {
            writeln!(f, "  {line}")?;
        }
        writeln!(f, "service log warnings and errors:")?;
        let mut warnings: Vec<(&String, &u64)> = self.log_warnings.iter().collect();
        warnings.sort_by(|a, b| b.1.cmp(a.1));
        for (line, n) in warnings.iter().take(2 * SHOWN) {
            writeln!(f, "  {n:6} {line}")?;
        }
        show_list(f, "unexpected submit answers", &self.unexpected_answers)?;
        show_list(f, "idempotency conflicts", &self.idempotency_conflicts)?;
        if self.violations.is_empty() {
            writeln!(f, "VIOLATIONS: none")
        } else {
            writeln!(f, "VIOLATIONS:")?;
            for v in &self.violations {
                writeln!(f, "  {v}")?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_overlap_only_when_one_starts_before_the_other_ends() {
        let run = |start_ns, end_ns| Run { pid: 1, ppid: 2, start_ns, end_ns };
        assert!(!overlapping(&[run(0, Some(10)), run(20, Some(30))]));
        assert!(overlapping(&[run(20, Some(30)), run(0, Some(25))]));
        // A run killed before it ended (no end line) cannot be said to overlap.
        assert!(!overlapping(&[run(0, None), run(5, Some(8))]));
    }

    #[test]
    fn events_parse_from_subject_and_payload() {
        let payload = br#"{"type": "status", "task_id": "t1", "data": {"status": "succeeded", "attempt": 2}}"#;
        let e = parse_event(7, "progress.soak-1.t1", payload).unwrap();
        assert_eq!((e.session.as_str(), e.task_id.as_str()), ("soak-1", "t1"));
        assert_eq!(e.status, Some(("succeeded".to_owned(), 2)));
        let e = parse_event(8, "progress.soak-1.t1", br#"{"type": "progress"}"#).unwrap();
        assert_eq!(e.status, None);
    }
}
