//! `claw watch`: follows one task until it is over, or every task of a session until Ctrl-C.
//!
//! Over HTTP it polls `GET /v1/tasks/{id}` (the gateway has no WebSocket for this client yet),
//! so it sees status and progress but not streamed output. Over NATS it reads the task's
//! events from the `PROGRESS` stream with an ordered consumer that replays from the start, so
//! nothing published before `watch` started is missed, and takes the record from the `tasks`
//! bucket for the starting state and the final result.
//!
//! Events are published without waiting for an ack (a lost one is harmless by design), so the
//! record, not the event stream, decides that a task is over: a terminal `status` event is
//! confirmed against the record, and when the stream has been quiet for a while the record is
//! read again in case that event was lost or has aged out of the stream.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use claw_proto::connect;
use claw_proto::event::{Event, EventBody};
use claw_proto::records::Records;
use claw_proto::task::{Progress, Session, Status, TaskRecord};
use claw_proto::topology;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use crate::client::{Client, Nats, Op, parse};
use crate::error::Error;
use crate::render;

/// How a watch ended.
#[derive(Debug)]
pub enum Watched {
    /// The task reached a terminal state: this record.
    Finished(Box<TaskRecord>),
    /// Ctrl-C: the task goes on; only the watching stopped.
    Interrupted,
}

/// How often the HTTP watch polls: fast enough that a progress bar moves smoothly, slow enough
/// that a watcher costs the gateway nothing worth measuring.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How long the event stream must be silent before the NATS watch re-reads the record. Workers
/// flush events every few tens of milliseconds, so a second of silence means nothing is coming.
const QUIET: Duration = Duration::from_secs(1);

/// Follows task `id` until it is over (or Ctrl-C), drawing it on the terminal.
pub async fn task(client: &Client, id: &str, json: bool) -> Result<Watched, Error> {
    let mut screen = Screen::new(json);
    let followed = tokio::select! {
        followed = async {
            match client {
                Client::Http(_) => poll(client, id, &mut screen).await,
                Client::Nats(nats) => follow(client, nats, id, &mut screen).await,
            }
        } => followed,
        _ = tokio::signal::ctrl_c() => {
            screen.clear();
            eprintln!("claw: stopped watching; task '{id}' goes on (`claw cancel {id}` stops it)");
            return Ok(Watched::Interrupted);
        }
    };
    match followed {
        Ok((value, record)) => {
            screen.finish(&value, &record);
            Ok(Watched::Finished(Box::new(record)))
        }
        Err(e) => {
            screen.clear();
            Err(e)
        }
    }
}

/// Prints every event of a session's tasks (of `owner`'s namespace, or of the tasks without an
/// owner), one line each, until Ctrl-C. NATS only.
pub async fn session(
    client: &Client,
    owner: Option<&str>,
    session: &str,
    json: bool,
) -> Result<(), Error> {
    let Client::Nats(nats) = client else {
        return Err(Error::Usage(
            "watching a session needs --nats-url: over HTTP claw can only poll one task \
             (claw does not speak the gateway's WebSocket yet)"
                .into(),
        ));
    };
    let session =
        Session::parse(session).map_err(|e| Error::Usage(format!("--session {session:?}: {e}")))?;
    let js = connect::jetstream(nats.client.clone());
    if let Some(owner) = owner {
        Session::parse(owner).map_err(|e| Error::Usage(format!("--owner {owner:?}: {e}")))?;
    }
    let scope = topology::SessionScope::new(owner, session);
    let mut messages = ordered(&js, scope.filter()).await?;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        tokio::select! {
            _ = &mut interrupted => return Ok(()),
            message = messages.next() => {
                let message = next_message(message)?;
                if json {
                    println!("{}", String::from_utf8_lossy(&message.payload));
                } else if let Ok(event) = serde_json::from_slice::<Event>(&message.payload) {
                    print!("{}", session_lines(&event));
                }
                let _ = std::io::stdout().flush();
            }
        }
    }
}

/// HTTP: polls the record until it is terminal.
async fn poll(
    client: &Client,
    id: &str,
    screen: &mut Screen,
) -> Result<(Value, TaskRecord), Error> {
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let value = client.call(Op::Get { id }).await?;
        let record: TaskRecord = parse(&value, "a task record")?;
        screen.json(&value);
        screen.record(&record);
        if record.status.is_terminal() {
            return Ok((value, record));
        }
    }
}

/// NATS: the record for the starting state, then the task's events until a terminal status
/// that the record confirms.
async fn follow(
    client: &Client,
    nats: &Nats,
    id: &str,
    screen: &mut Screen,
) -> Result<(Value, TaskRecord), Error> {
    let js = connect::jetstream(nats.client.clone());
    let records = Records::open(&js).await.map_err(|e| {
        Error::Unavailable(format!("opening the {} bucket: {e}", topology::TASKS_BUCKET))
    })?;
    let (value, record) = current(client, &records, id).await?;
    if record.status.is_terminal() {
        return Ok((value, record));
    }
    let mut messages = ordered(&js, record.progress_subject()).await?;
    let mut recheck = tokio::time::interval(QUIET / 2);
    let mut last_event = Instant::now();
    let mut status = record.status;
    loop {
        tokio::select! {
            message = messages.next() => {
                let message = next_message(message)?;
                last_event = Instant::now();
                // During the replay a terminal status may be an earlier attempt's (before a
                // retry); only the newest one, with nothing pending behind it, can end the watch.
                let caught_up = message.info().map_or(true, |info| info.pending == 0);
                let Ok(event) = serde_json::from_slice::<Event>(&message.payload) else {
                    continue;
                };
                if let EventBody::Status { status: s, .. } = &event.body {
                    status = *s;
                }
                screen.event(&message.payload, &event);
                if caught_up && status.is_terminal() {
                    let (value, record) = current(client, &records, id).await?;
                    if record.status.is_terminal() {
                        return Ok((value, record));
                    }
                }
            }
            _ = recheck.tick() => {
                if last_event.elapsed() < QUIET {
                    continue;
                }
                let (value, record) = current(client, &records, id).await?;
                if record.status.is_terminal() {
                    return Ok((value, record));
                }
                screen.record(&record);
            }
        }
    }
}

/// The record: live from the bucket, else (it left the bucket) through `claw.api.get`, which
/// falls back to the archive.
async fn current(
    client: &Client,
    records: &Records,
    id: &str,
) -> Result<(Value, TaskRecord), Error> {
    // A string that cannot be a key is not looked up: the API refuses it as `not_found`.
    let live = match claw_proto::TaskId::parse(id) {
        Ok(id) => records
            .read(&id)
            .await
            .map_err(|e| Error::Unavailable(format!("reading the record of {id}: {e}")))?,
        Err(_) => None,
    };
    let value = match live {
        Some(stored) => serde_json::to_value(&stored.record)
            .map_err(|e| Error::Unavailable(format!("the record of {id}: {e}")))?,
        None => client.call(Op::Get { id }).await?,
    };
    let record = parse(&value, "a task record")?;
    Ok((value, record))
}

type Messages = async_nats::jetstream::consumer::pull::Ordered;

/// An ordered consumer on `PROGRESS` from its first message: no state on the server beyond an
/// ephemeral consumer, and it re-creates itself if a message is skipped.
async fn ordered(js: &async_nats::jetstream::Context, filter: String) -> Result<Messages, Error> {
    let unavailable = |e: &dyn std::fmt::Display| {
        Error::Unavailable(format!("following {filter} on {}: {e}", topology::PROGRESS_STREAM))
    };
    let stream = js.get_stream(topology::PROGRESS_STREAM).await.map_err(|e| unavailable(&e))?;
    let config = OrderedConfig {
        filter_subject: filter.clone(),
        deliver_policy: DeliverPolicy::All,
        ..Default::default()
    };
    let consumer = stream.create_consumer(config).await.map_err(|e| unavailable(&e))?;
    consumer.messages().await.map_err(|e| unavailable(&e))
}

fn next_message(
    message: Option<Result<async_nats::jetstream::Message, impl std::fmt::Display>>,
) -> Result<async_nats::jetstream::Message, Error> {
    match message {
        Some(Ok(message)) => Ok(message),
        Some(Err(e)) => {
            Err(Error::Unavailable(format!("reading {}: {e}", topology::PROGRESS_STREAM)))
        }
        None => Err(Error::Unavailable(format!("the {} stream ended", topology::PROGRESS_STREAM))),
    }
}

/// One session event as text lines, each prefixed by the task id.
fn session_lines(event: &Event) -> String {
    let id = &event.task_id;
    match &event.body {
        EventBody::Status { status, cause, attempt, result, result_ref, error } => {
            let mut lines = format!(
                "{id}  {}\n",
                status_line(*status, cause.map(render::cause_name), *attempt)
            );
            // Protocol 5 carries the outcome in the status; earlier workers sent it before.
            if let Some(e) = error {
                lines.insert_str(0, &error_line(id, e));
            }
            match (result, result_ref) {
                (_, Some(r)) => lines.insert_str(0, &stored_result_line(id, r)),
                (Some(v), None) => lines.insert_str(0, &format!("{id}  result: {v}\n")),
                (None, None) => {}
            }
            lines
        }
        EventBody::Progress(p) => format!("{id}  {}\n", render::progress(p)),
        EventBody::Output { text } => text.lines().map(|l| format!("{id}  | {l}\n")).collect(),
        EventBody::Result(v) => format!("{id}  result: {v}\n"),
        EventBody::ResultRef(r) => stored_result_line(id, r),
        EventBody::Error(e) => error_line(id, e),
    }
}

fn stored_result_line(id: &claw_proto::TaskId, r: &claw_proto::PayloadRef) -> String {
    format!("{id}  result: {} bytes stored as {} (claw get {id} --result FILE)\n", r.size, r.name)
}

fn error_line(id: &claw_proto::TaskId, e: &claw_proto::TaskError) -> String {
    format!("{id}  error: {e}\n")
}

fn status_line(status: Status, cause: Option<String>, attempt: u32) -> String {
    match cause {
        Some(cause) => format!("{status} (attempt {attempt}, {cause})"),
        None => format!("{status} (attempt {attempt})"),
    }
}

/// Where a task watch draws: a progress bar on a terminal, plain lines when piped (so a log or
/// a test sees every step), or JSON lines with `--json`.
struct Screen {
    style: Style,
    /// What is on screen already, so a poll or a replayed event that changes nothing prints
    /// nothing.
    shown_status: Option<(Status, u32)>,
    shown_progress: Option<(i64, Option<String>)>,
    last_json: Option<Value>,
    /// Lines mode: whether the cursor is at the start of a line (streamed output may end
    /// mid-line).
    at_line_start: bool,
    /// Bar mode: streamed output not yet ended by a newline; printed whole lines at a time so
    /// the bar never splits one.
    partial: String,
}

enum Style {
    Bar(ProgressBar),
    Lines,
    Json,
}

/// The bar counts in thousandths, fine enough for any fraction a handler reports.
const BAR_LENGTH: u64 = 1000;

impl Screen {
    fn new(json: bool) -> Screen {
        let style = if json {
            Style::Json
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(BAR_LENGTH), ProgressDrawTarget::stderr());
            let template = "{prefix:>10} [{bar:30}] {percent:>3}% {wide_msg}";
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            Style::Bar(bar)
        } else {
            Style::Lines
        };
        Screen {
            style,
            shown_status: None,
            shown_progress: None,
            last_json: None,
            at_line_start: true,
            partial: String::new(),
        }
    }

    /// `--json`: prints a reply or record, once per change.
    fn json(&mut self, value: &Value) {
        if matches!(self.style, Style::Json) && self.last_json.as_ref() != Some(value) {
            println!("{value}");
            self.last_json = Some(value.clone());
        }
    }

    fn event(&mut self, raw: &[u8], event: &Event) {
        if matches!(self.style, Style::Json) {
            println!("{}", String::from_utf8_lossy(raw));
            return;
        }
        match &event.body {
            EventBody::Status { status, cause, attempt, .. } => {
                self.status(*status, cause.map(render::cause_name), *attempt)
            }
            EventBody::Progress(p) => self.progress(p),
            EventBody::Output { text } => self.output(text),
            // The outcome is printed from the final record, which holds both.
            _ => {}
        }
    }

    /// Shows what a (polled or re-read) record says, where it differs from the screen.
    fn record(&mut self, r: &TaskRecord) {
        if matches!(self.style, Style::Json) {
            return;
        }
        // A new attempt resets the progress, so its status goes first; a finished task's last
        // progress goes before its final status.
        if r.status.is_terminal() {
            r.progress.iter().for_each(|p| self.progress(p));
        }
        self.status(r.status, r.cause.map(render::cause_name), r.attempt);
        if !r.status.is_terminal() {
            r.progress.iter().for_each(|p| self.progress(p));
        }
    }

    fn status(&mut self, status: Status, cause: Option<String>, attempt: u32) {
        if self.shown_status == Some((status, attempt)) {
            return;
        }
        if status == Status::Running && self.shown_status.is_some_and(|(_, a)| a != attempt) {
            // A new attempt starts from nothing.
            self.shown_progress = None;
            if let Style::Bar(bar) = &self.style {
                bar.set_position(0);
                bar.set_message("");
            }
        }
        self.shown_status = Some((status, attempt));
        if status.is_terminal() {
            // The outcome printed at the end says it, with the result or the error.
            return;
        }
        let line = status_line(status, cause, attempt);
        match &self.style {
            Style::Bar(bar) => {
                bar.set_prefix(status.to_string());
                bar.println(line);
            }
            Style::Lines => self.line(&line),
            Style::Json => {}
        }
    }

    fn progress(&mut self, p: &Progress) {
        let permille = (p.fraction.clamp(0.0, 1.0) * BAR_LENGTH as f64).round() as i64;
        let shown = Some((permille, p.message.clone()));
        if self.shown_progress == shown {
            return;
        }
        self.shown_progress = shown;
        match &self.style {
            Style::Bar(bar) => {
                bar.set_position(permille as u64);
                bar.set_message(p.message.clone().unwrap_or_default());
            }
            Style::Lines => self.line(&render::progress(p)),
            Style::Json => {}
        }
    }

    /// Streamed output, printed above the bar as it comes.
    fn output(&mut self, text: &str) {
        match &self.style {
            Style::Bar(bar) => {
                self.partial.push_str(text);
                if let Some(end) = self.partial.rfind('\n') {
                    let whole: String = self.partial.drain(..=end).collect();
                    bar.suspend(|| {
                        print!("{whole}");
                        let _ = std::io::stdout().flush();
                    });
                }
            }
            Style::Lines => {
                print!("{text}");
                let _ = std::io::stdout().flush();
                if !text.is_empty() {
                    self.at_line_start = text.ends_with('\n');
                }
            }
            Style::Json => {}
        }
    }

    fn line(&mut self, line: &str) {
        if !self.at_line_start {
            println!();
            self.at_line_start = true;
        }
        println!("{line}");
    }

    /// Removes the bar and ends any half-printed line.
    fn clear(&mut self) {
        if let Style::Bar(bar) = &self.style {
            bar.finish_and_clear();
            if !self.partial.is_empty() {
                println!("{}", std::mem::take(&mut self.partial));
            }
        }
        if !self.at_line_start {
            println!();
            self.at_line_start = true;
        }
    }

    fn finish(&mut self, value: &Value, record: &TaskRecord) {
        if matches!(self.style, Style::Json) {
            self.json(value);
            return;
        }
        self.clear();
        print!("{}", render::outcome(record));
        let _ = std::io::stdout().flush();
    }
}
