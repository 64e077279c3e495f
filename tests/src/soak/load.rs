//! The soak's clients: a [`Submitter`] that sends a steady rate of `exec` tasks to
//! `POST /v1/tasks`, each with its own `Idempotency-Key`, and [`WsClients`] that watch the
//! sessions over `GET /v1/ws` and record every event they get.
//!
//! The submitter follows the documented client contract: on a 503, a 429, a connection error or
//! a timeout it sends the same key again (with a capped backoff) until it gets 202 or 200, or
//! the run ends. A key therefore names one logical task however often it was sent; the checker
//! counts tasks by key. A WebSocket client that loses its socket reconnects with
//! `since=<last seq>`, as `docs/PROTOCOL.md` tells clients to.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::stack::PROGRAM;
use super::{Config, Rng};

/// Share of tasks in the long class (child processes in the long pool, 2-20 slots a worker by
/// default); the rest are short. Kept low enough that two workers' long pools keep up.
const LONG_SHARE: f64 = 0.3;

/// Attempts each task may use. Every worker kill and every lost lease costs the tasks it held
/// an attempt; 20 (the most the gateway allows) keeps healthy tasks from being dead-lettered by
/// the faults alone.
pub const MAX_ATTEMPTS: u32 = 20;

/// Running time of a task, drawn per task: short enough for a high rate, long enough that
/// faults catch tasks mid-run.
const SECONDS: (f64, f64) = (0.05, 2.0);

/// Submits in flight at once; beyond it the submitter waits (an outage piles up retries).
const MAX_IN_FLIGHT: usize = 2_000;

/// One HTTP request's limit: above the gateway's 5 s JetStream publish timeout, so a slow
/// answer is seen as the gateway's 503 rather than our own timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the submitter did, by key.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Submissions {
    pub keys: BTreeMap<String, KeySubmission>,
    /// Why a key was sent again: `503`, `429`, `timeout`, `connect`, ...
    pub retries: BTreeMap<String, u64>,
    /// Answers by HTTP status (transport errors are in `retries`).
    pub answers: BTreeMap<u16, u64>,
    /// Answers that are neither an acceptance nor retryable per the contract (a 4xx for a
    /// valid spec, a 500): each is a finding.
    pub unexpected: Vec<String>,
    /// The longest any single request took, in milliseconds.
    pub slowest_ms: u64,
}

/// One logical task.
#[derive(Clone, Debug, Serialize)]
pub struct KeySubmission {
    /// The id of the first acceptance (202 or 200).
    pub id: Option<String>,
    /// Whether some answer was a 202 (created); a key accepted only by 200s had its 202 lost.
    pub created: bool,
    /// Requests sent for this key.
    pub tries: u32,
    /// Seconds from the start of the run.
    pub first_sent_s: f64,
    pub accepted_s: Option<f64>,
    /// Ids other than `id` that later answers for the same key named: idempotency broken.
    pub other_ids: Vec<String>,
    pub session: String,
    pub class: String,
    pub seconds: f64,
}

impl Submissions {
    pub fn accepted(&self) -> usize {
        self.keys.values().filter(|k| k.id.is_some()).count()
    }

    fn note_retry(&mut self, reason: &str) {
        *self.retries.entry(reason.to_owned()).or_default() += 1;
    }
}

/// The running submitter.
#[derive(Debug)]
pub struct Submitter {
    state: Arc<Mutex<Submissions>>,
    /// No new keys after this.
    stop: CancellationToken,
    /// Submits still retrying give up after this.
    abort: CancellationToken,
    tracker: TaskTracker,
}

impl Submitter {
    /// Starts submitting `config.rate` new keys a second to the gateway at `base`.
    pub fn start(config: &Config, base: &str, started: Instant) -> Submitter {
        let state = Arc::new(Mutex::new(Submissions::default()));
        let (stop, abort, tracker) =
            (CancellationToken::new(), CancellationToken::new(), TaskTracker::new());
        let http =
            reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build().expect("an HTTP client");
        let url = format!("{base}/v1/tasks");
        let (rate, sessions, seed) = (config.rate, config.sessions.max(1), config.seed);
        let schedule = {
            let (state, stop, abort, tracker) =
                (state.clone(), stop.clone(), abort.clone(), tracker.clone());
            async move {
                let mut rng = Rng::new(seed);
                let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
                // A steady arrival rate; a tick missed while the machine was busy is not made
                // up with a burst.
                let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                for n in 0u64.. {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = ticks.tick() => {}
                    }
                    let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
                    let task = Task::draw(&mut rng, seed, n, sessions);
                    let (http, url, state, abort) =
                        (http.clone(), url.clone(), state.clone(), abort.clone());
                    tracker.spawn(async move {
                        submit(&http, &url, task, &state, &abort, started).await;
                        drop(permit);
                    });
                }
            }
        };
        tracker.spawn(schedule);
        Submitter { state, stop, abort, tracker }
    }

    /// Stops sending new keys, lets keys still unanswered retry for up to `grace`, and returns
    /// what happened.
    pub async fn finish(self, grace: Duration) -> Submissions {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_err() {
            self.abort.cancel();
            self.tracker.wait().await;
        }
        self.state.lock().expect("submissions").clone()
    }
}

/// One logical task's parameters, drawn from the seeded RNG.
#[derive(Clone, Debug)]
struct Task {
    key: String,
    session: String,
    class: &'static str,
    priority: &'static str,
    seconds: f64,
    /// Seeds the jitter of this key's retries, so that keys refused together do not all come
    /// back together.
    retry_seed: u64,
}

impl Task {
    fn draw(rng: &mut Rng, seed: u64, n: u64, sessions: usize) -> Task {
        let class = if rng.unit() < LONG_SHARE { "long" } else { "short" };
        let priority = ["high", "normal", "normal", "normal", "low"][rng.below(5)];
        // Milliseconds, so the argument is a plain decimal every `sleep` accepts.
        let seconds = (rng.between(SECONDS.0, SECONDS.1) * 1000.0).round() / 1000.0;
        Task {
            key: format!("soak-{seed:x}-{n}"),
            session: session_name(n as usize % sessions),
            class,
            priority,
            seconds,
            retry_seed: rng.next_u64(),
        }
    }

    fn spec(&self) -> Value {
        json!({
            "kind": "exec",
            "session": self.session,
            "class": self.class,
            "priority": self.priority,
            "max_attempts": MAX_ATTEMPTS,
            "input": {"program": PROGRAM, "args": [self.key, format!("{:.3}", self.seconds)]},
        })
    }
}

/// The name of session `i`.
pub fn session_name(i: usize) -> String {
    format!("soak-{i}")
}

/// What one request for a key came to.
enum Answer {
    Accepted { id: String, created: bool },
    Retry(String),
    Refused(String),
}

/// Sends `task` under its key until it is accepted, refused outright, or `abort` fires.
async fn submit(
    http: &reqwest::Client,
    url: &str,
    task: Task,
    state: &Mutex<Submissions>,
    abort: &CancellationToken,
    started: Instant,
) {
    let body = task.spec().to_string();
    state.lock().expect("submissions").keys.insert(
        task.key.clone(),
        KeySubmission {
            id: None,
            created: false,
            tries: 0,
            first_sent_s: started.elapsed().as_secs_f64(),
            accepted_s: None,
            other_ids: Vec::new(),
            session: task.session.clone(),
            class: task.class.to_owned(),
            seconds: task.seconds,
        },
    );
    let mut backoff = Duration::from_millis(100);
    let mut rng = Rng::new(task.retry_seed);
    loop {
        let sent = Instant::now();
        let answer = match http
            .post(url)
            .header("Idempotency-Key", &task.key)
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await
        {
            Ok(response) => {
                let status = response.status().as_u16();
                *state.lock().expect("submissions").answers.entry(status).or_default() += 1;
                let text = response.text().await.unwrap_or_default();
                classify(status, &text)
            }
            Err(e) if e.is_timeout() => Answer::Retry("timeout".into()),
            Err(e) if e.is_connect() => Answer::Retry("connect".into()),
            Err(_) => Answer::Retry("transport".into()),
        };
        let took = sent.elapsed();
        {
            let mut s = state.lock().expect("submissions");
            s.slowest_ms = s.slowest_ms.max(took.as_millis() as u64);
            let entry = s.keys.get_mut(&task.key).expect("inserted above");
            entry.tries += 1;
            match answer {
                Answer::Accepted { id, created } => {
                    entry.created |= created;
                    match &entry.id {
                        None => {
                            entry.id = Some(id);
                            entry.accepted_s = Some(started.elapsed().as_secs_f64());
                        }
                        Some(first) if *first != id => entry.other_ids.push(id),
                        Some(_) => {}
                    }
                    return;
                }
                Answer::Refused(why) => {
                    let line = format!("{}: {why}", task.key);
                    s.unexpected.push(line);
                    return;
                }
                Answer::Retry(reason) => {
                    if reason.starts_with("500") {
                        let line = format!("{}: {reason}", task.key);
                        s.unexpected.push(line);
                    }
                    s.note_retry(reason.split(' ').next().unwrap_or("?"));
                }
            }
        }
        let pause = backoff.mul_f64(rng.between(0.5, 1.5));
        tokio::select! {
            _ = abort.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// What an HTTP answer means under the client contract.
fn classify(status: u16, text: &str) -> Answer {
    match status {
        200 | 202 => match serde_json::from_str::<Value>(text)
            .ok()
            .and_then(|v| v["id"].as_str().map(str::to_owned))
        {
            Some(id) => Answer::Accepted { id, created: status == 202 },
            // A cut-off body: we do not know the id yet, so ask again.
            None => Answer::Retry("bad_body".into()),
        },
        // 503: NATS unreachable or the publish not acknowledged; 429: queue full. 502/504 would
        // be a proxy's; none is here, but they mean the same to a client.
        503 | 429 | 502 | 504 => Answer::Retry(status.to_string()),
        // A bug; the request may or may not have been acted on, so the key is sent again.
        500 => Answer::Retry(format!("500 {text}")),
        _ => Answer::Refused(format!("{status} {text}")),
    }
}

// ---- WebSocket clients ----

/// One client's view of its session.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WsLog {
    pub session: String,
    /// The `seq` of the first `hello`: the client promises itself every event after it.
    pub first_seq: Option<u64>,
    /// The last `seq` received (or `first_seq`): the `since` of the next connection.
    pub cursor: u64,
    pub connects: u32,
    /// Connection attempts that failed (gateway down, 503 while NATS is).
    pub refused: u32,
    /// How connections ended: `1012`, `1013`, `error`, `ended`, `silent`.
    pub ends: BTreeMap<String, u64>,
    /// Sequences received again, or out of order (at or below the cursor).
    pub duplicates: Vec<u64>,
    /// Every event received, in order.
    #[serde(skip)]
    pub events: Vec<WsEvent>,
}

/// An event frame as the checker needs it.
#[derive(Clone, Debug)]
pub struct WsEvent {
    pub seq: u64,
    pub task_id: String,
    /// `status` events only.
    pub status: Option<String>,
}

/// The WebSocket clients, one per session.
#[derive(Debug)]
pub struct WsClients {
    pub logs: Vec<Arc<Mutex<WsLog>>>,
    stop: CancellationToken,
    tracker: TaskTracker,
}

/// A socket that says nothing for this long is taken for dead (the gateway pings every 20 s).
const WS_SILENCE: Duration = Duration::from_secs(70);

impl WsClients {
    pub fn start(base: &str, sessions: usize, started: Instant) -> WsClients {
        let (stop, tracker) = (CancellationToken::new(), TaskTracker::new());
        let mut logs = Vec::new();
        for i in 0..sessions {
            let log = Arc::new(Mutex::new(WsLog { session: session_name(i), ..WsLog::default() }));
            logs.push(log.clone());
            let url = format!("{}/v1/ws", base.replacen("http://", "ws://", 1));
            tracker.spawn(watch(url, log, stop.clone(), started));
        }
        WsClients { logs, stop, tracker }
    }

    /// Waits until every client has had its first `hello`.
    pub async fn wait_connected(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.logs.iter().all(|l| l.lock().expect("ws log").first_seq.is_some()) {
            if Instant::now() > deadline {
                anyhow::bail!("WebSocket clients not connected after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Connections, over all clients, that ended with `end` (a close code, `error`, ...).
    pub fn ends_with(&self, end: &str) -> u64 {
        let ends = |l: &Arc<Mutex<WsLog>>| l.lock().expect("ws log").ends.get(end).copied();
        self.logs.iter().map(|l| ends(l).unwrap_or(0)).sum()
    }

    /// A copy of every client's log.
    pub fn snapshot(&self) -> Vec<WsLog> {
        self.logs.iter().map(|l| l.lock().expect("ws log").clone()).collect()
    }

    pub async fn stop(&mut self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// One client: connect, read until the socket ends, reconnect with `since`, until `stop`.
async fn watch(url: String, log: Arc<Mutex<WsLog>>, stop: CancellationToken, started: Instant) {
    let session = log.lock().expect("ws log").session.clone();
    let mut backoff = Duration::from_millis(100);
    while !stop.is_cancelled() {
        let query = {
            let l = log.lock().expect("ws log");
            match l.first_seq {
                None => format!("{url}?session={session}"),
                Some(_) => format!("{url}?session={session}&since={}", l.cursor),
            }
        };
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            c = tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(query)) => c,
        };
        let mut socket = match connected {
            Ok(Ok((socket, _))) => socket,
            _ => {
                log.lock().expect("ws log").refused += 1;
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        log.lock().expect("ws log").connects += 1;
        let end = loop {
            let frame = tokio::select! {
                _ = stop.cancelled() => return,
                f = tokio::time::timeout(WS_SILENCE, socket.next()) => f,
            };
            let text = match frame {
                Err(_) => break "silent".to_owned(),
                Ok(None) => break "ended".to_owned(),
                Ok(Some(Err(_))) => break "error".to_owned(),
                Ok(Some(Ok(Message::Close(frame)))) => {
                    break frame.map_or("close".to_owned(), |f| u16::from(f.code).to_string());
                }
                Ok(Some(Ok(Message::Text(text)))) => text,
                Ok(Some(Ok(_))) => continue,
            };
            let Ok(frame) = serde_json::from_str::<Value>(text.as_str()) else { continue };
            record_frame(&mut log.lock().expect("ws log"), &frame);
        };
        let at = started.elapsed().as_secs_f64();
        tracing::debug!(%session, %end, at, "WebSocket ended; reconnecting");
        *log.lock().expect("ws log").ends.entry(end).or_default() += 1;
    }
}

/// Notes a `hello` or an event frame; replies and anything else are ignored.
fn record_frame(log: &mut WsLog, frame: &Value) {
    if frame["type"] == "hello" {
        if log.first_seq.is_none() {
            let seq = frame["seq"].as_u64().unwrap_or(0);
            log.first_seq = Some(seq);
            log.cursor = seq;
        }
        return;
    }
    let Some(seq) = frame["seq"].as_u64() else { return };
    if seq <= log.cursor {
        log.duplicates.push(seq);
        return;
    }
    log.cursor = seq;
    let status = (frame["type"] == "status")
        .then(|| frame["data"]["status"].as_str().map(str::to_owned))
        .flatten();
    let task_id = frame["task_id"].as_str().unwrap_or_default().to_owned();
    log.events.push(WsEvent { seq, task_id, status });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_follow_the_client_contract() {
        assert!(matches!(classify(202, r#"{"id": "a"}"#), Answer::Accepted { created: true, .. }));
        assert!(matches!(classify(200, r#"{"id": "a"}"#), Answer::Accepted { created: false, .. }));
        assert!(matches!(classify(202, "{"), Answer::Retry(_)));
        assert!(matches!(classify(503, ""), Answer::Retry(_)));
        assert!(matches!(classify(429, ""), Answer::Retry(_)));
        assert!(matches!(classify(422, ""), Answer::Refused(_)));
    }

    #[test]
    fn frames_below_the_cursor_are_duplicates() {
        let mut log = WsLog::default();
        record_frame(&mut log, &json!({"type": "hello", "seq": 10}));
        record_frame(
            &mut log,
            &json!({"type": "status", "seq": 11, "task_id": "t",
            "data": {"status": "succeeded"}}),
        );
        record_frame(&mut log, &json!({"type": "progress", "seq": 11, "task_id": "t"}));
        record_frame(&mut log, &json!({"type": "hello", "seq": 50}));
        assert_eq!(
            (log.first_seq, log.cursor, log.duplicates.as_slice()),
            (Some(10), 11, &[11][..])
        );
        assert_eq!(log.events[0].status.as_deref(), Some("succeeded"));
    }
}
