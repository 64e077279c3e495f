//! The client verbs: their arguments (clap derive) and what each one does, written once
//! against [`Client`]. [`run`] is all `main` calls; it prints the one-line error and returns
//! the exit code (see [`crate::error`]).

use std::io::Write;

use claw_proto::api::{Lanes, ListPage, Verb};
use claw_proto::payloads::Part;
use claw_proto::task::{Status, TaskRecord};
use serde_json::{Map, Value};

use crate::client::{Client, ClientArgs, Op, parse};
use crate::error::{EXIT_OK, EXIT_REFUSED, Error};
use crate::render;
use crate::watch::{self, Watched};

/// The verbs beside `claw up`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Submit a task; prints its id (with --watch, then follows it).
    Submit(SubmitArgs),
    /// Show a task's record (with --result or --input, save that payload).
    Get(GetArgs),
    /// List finished tasks from the archive, newest first.
    Ls(LsArgs),
    /// Follow a task live until it is over (exit 0 if it succeeded), or a session's tasks until
    /// Ctrl-C.
    Watch(WatchArgs),
    /// Cancel a task: a queued one leaves the queue, a running one is stopped.
    Cancel(TaskArgs),
    /// Pause a task: a queued one leaves the queue, a running one is frozen.
    Pause(TaskArgs),
    /// Resume a paused task.
    Resume(TaskArgs),
    /// Run a finished task again, as a new attempt of the same id.
    Retry(TaskArgs),
    /// Show the lanes (class × priority): depth, tasks in flight, paused; or pause/resume one.
    Lanes(LanesArgs),
}

#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// The task kind: sleep, exec, llm, or a kind of your own worker.
    pub kind: String,
    /// The kind's input, as JSON (e.g. '{"seconds": 2, "steps": 4}').
    #[arg(long, value_name = "JSON")]
    pub input: Option<String>,
    /// The session the task belongs to (default: "default").
    #[arg(long)]
    pub session: Option<String>,
    /// high, normal, low, or 0-9 (9 is high, 0-2 low).
    #[arg(long)]
    pub priority: Option<String>,
    /// short or long (default: from --estimated-s, else the kind's default).
    #[arg(long)]
    pub class: Option<String>,
    /// Expected duration in seconds; chooses the class when --class is absent.
    #[arg(long, value_name = "N")]
    pub estimated_s: Option<String>,
    /// Timeout of each attempt in seconds.
    #[arg(long, value_name = "N")]
    pub timeout_s: Option<String>,
    /// Attempts before the task fails for good.
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<String>,
    /// No attempt starts later than this many seconds after submission.
    #[arg(long, value_name = "N")]
    pub deadline_s: Option<String>,
    /// Submitting again with the same key returns the first task instead of a new one.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// Follow the task after submitting it, like `claw watch`.
    #[arg(long)]
    pub watch: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, clap::Args)]
pub struct TaskArgs {
    /// The task id.
    pub id: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// The task id.
    pub id: String,
    /// Save the task's result (JSON) to FILE (`-` for stdout) instead of showing the record;
    /// a large one is read from the object store, whole.
    #[arg(long, value_name = "FILE", conflicts_with = "input")]
    pub result: Option<std::path::PathBuf>,
    /// Save the task's input (JSON) to FILE (`-` for stdout).
    #[arg(long, value_name = "FILE")]
    pub input: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, clap::Args)]
pub struct LsArgs {
    #[arg(long)]
    pub session: Option<String>,
    /// succeeded, failed or cancelled (the archive holds finished tasks).
    #[arg(long)]
    pub status: Option<String>,
    #[arg(long)]
    pub kind: Option<String>,
    /// Page size.
    #[arg(long, value_name = "N")]
    pub limit: Option<String>,
    /// The cursor a previous page printed, for the next page.
    #[arg(long)]
    pub cursor: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// The task to follow.
    #[arg(required_unless_present = "session", conflicts_with = "session")]
    pub id: Option<String>,
    /// Follow every task of this session instead (needs --nats-url), until Ctrl-C.
    #[arg(long)]
    pub session: Option<String>,
    /// The gateway principal whose session it is (each principal's sessions are its own);
    /// without it, the session of tasks without an owner (NATS-native ones).
    #[arg(long, requires = "session")]
    pub owner: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, clap::Args)]
pub struct LanesArgs {
    #[command(subcommand)]
    pub action: Option<LaneAction>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum LaneAction {
    /// Stop workers from taking tasks from a lane; queued tasks wait.
    Pause(LaneArgs),
    /// Let workers take tasks from a paused lane again.
    Resume(LaneArgs),
}

#[derive(Debug, clap::Args)]
pub struct LaneArgs {
    /// short or long.
    pub class: String,
    /// high, normal or low.
    pub priority: String,
}

/// Runs a verb; errors are printed here, as one line on stderr.
pub async fn run(command: Command) -> u8 {
    let json = client_args(&command).json;
    match execute(command).await {
        Ok(code) => code,
        Err(e) => {
            if json && let Some(body) = e.body() {
                println!("{}", serde_json::to_string(&body).unwrap_or_default());
            }
            eprintln!("claw: {e}");
            e.exit_code()
        }
    }
}

fn client_args(command: &Command) -> &ClientArgs {
    match command {
        Command::Submit(a) => &a.client,
        Command::Get(a) => &a.client,
        Command::Cancel(a) | Command::Pause(a) | Command::Resume(a) => &a.client,
        Command::Retry(a) => &a.client,
        Command::Ls(a) => &a.client,
        Command::Watch(a) => &a.client,
        Command::Lanes(a) => &a.client,
    }
}

async fn execute(command: Command) -> Result<u8, Error> {
    let args = client_args(&command);
    let json = args.json;
    let client = Client::connect(args).await?;
    match &command {
        Command::Submit(a) => submit(&client, a, json).await,
        Command::Get(a) => {
            let part = match (&a.result, &a.input) {
                (Some(file), _) => Some((Part::Result, file)),
                (None, Some(file)) => Some((Part::Input, file)),
                (None, None) => None,
            };
            if let Some((part, file)) = part {
                client.save_payload(&a.id, part, file).await?;
                return Ok(EXIT_OK);
            }
            let value = client.call(Op::Get { id: &a.id }).await?;
            print_record(&value, json)?;
            Ok(EXIT_OK)
        }
        Command::Ls(a) => ls(&client, a, json).await,
        Command::Watch(a) => match (&a.id, &a.session) {
            (Some(id), _) => Ok(exit_code(watch::task(&client, id, json).await?)),
            (None, Some(session)) => {
                watch::session(&client, a.owner.as_deref(), session, json).await?;
                Ok(EXIT_OK)
            }
            (None, None) => Err(Error::Usage("watch needs a task id or --session".into())),
        },
        Command::Cancel(a) => control(&client, Verb::Cancel, &a.id, json).await,
        Command::Pause(a) => control(&client, Verb::Pause, &a.id, json).await,
        Command::Resume(a) => control(&client, Verb::Resume, &a.id, json).await,
        Command::Retry(a) => control(&client, Verb::Retry, &a.id, json).await,
        Command::Lanes(a) => lanes(&client, a.action.as_ref(), json).await,
    }
}

async fn submit(client: &Client, a: &SubmitArgs, json: bool) -> Result<u8, Error> {
    let spec = spec(a)?;
    let op = Op::Submit { spec: &spec, idempotency_key: a.idempotency_key.as_deref() };
    let value = client.call(op).await?;
    let record: TaskRecord = parse(&value, "the submitted task")?;
    if json {
        println!("{value}");
    } else {
        println!("{}", record.id);
    }
    let _ = std::io::stdout().flush();
    if !a.watch {
        return Ok(EXIT_OK);
    }
    Ok(exit_code(watch::task(client, record.id.as_str(), json).await?))
}

/// The task spec from the flags. Numbers are sent as numbers when they parse as one and as the
/// string otherwise, so the gateway, the one validator, names the field at fault
/// (`max_attempts: invalid type: string "x"`) instead of the CLI guessing at its limits.
pub fn spec(a: &SubmitArgs) -> Result<Value, Error> {
    let mut spec = Map::new();
    spec.insert("kind".into(), Value::from(a.kind.clone()));
    if let Some(input) = &a.input {
        let input: Value = serde_json::from_str(input)
            .map_err(|e| Error::Usage(format!("--input is not JSON: {e}")))?;
        spec.insert("input".into(), input);
    }
    let fields = [
        ("session", &a.session, false),
        ("priority", &a.priority, true),
        ("class", &a.class, false),
        ("estimated_s", &a.estimated_s, true),
        ("timeout_s", &a.timeout_s, true),
        ("max_attempts", &a.max_attempts, true),
        ("deadline_s", &a.deadline_s, true),
    ];
    for (name, value, numeric) in fields {
        if let Some(value) = value {
            let value = if numeric { number_or_string(value) } else { Value::from(value.clone()) };
            spec.insert(name.into(), value);
        }
    }
    Ok(Value::Object(spec))
}

fn number_or_string(s: &str) -> Value {
    let s = s.trim();
    if let Ok(n) = s.parse::<u64>() {
        return Value::from(n);
    }
    if let Ok(n) = s.parse::<i64>() {
        return Value::from(n);
    }
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() => Value::from(x),
        _ => Value::from(s),
    }
}

async fn ls(client: &Client, a: &LsArgs, json: bool) -> Result<u8, Error> {
    let filters = [
        ("session", &a.session),
        ("status", &a.status),
        ("kind", &a.kind),
        ("limit", &a.limit),
        ("cursor", &a.cursor),
    ];
    let query: Vec<(&str, String)> =
        filters.iter().filter_map(|(k, v)| v.as_ref().map(|v| (*k, v.clone()))).collect();
    let value = client.call(Op::List { query: &query }).await?;
    if json {
        println!("{value}");
        return Ok(EXIT_OK);
    }
    let page: ListPage = parse(&value, "a page of tasks")?;
    if page.tasks.is_empty() {
        println!("no tasks");
    } else {
        print!("{}", render::task_table(&page.tasks));
    }
    if let Some(cursor) = &page.next_cursor {
        println!("next page: --cursor {cursor}");
    }
    Ok(EXIT_OK)
}

async fn control(client: &Client, verb: Verb, id: &str, json: bool) -> Result<u8, Error> {
    let value = client.call(Op::Control { verb, id }).await?;
    if json {
        println!("{value}");
    } else {
        let record: TaskRecord = parse(&value, "a task record")?;
        println!("{}  {}", record.id, render::status_with_cause(&record));
    }
    Ok(EXIT_OK)
}

async fn lanes(client: &Client, action: Option<&LaneAction>, json: bool) -> Result<u8, Error> {
    let value = match action {
        None => client.call(Op::Lanes).await?,
        Some(LaneAction::Pause(l)) => lane(client, "pause", l).await?,
        Some(LaneAction::Resume(l)) => lane(client, "resume", l).await?,
    };
    if json {
        println!("{value}");
        return Ok(EXIT_OK);
    }
    let lanes = match action {
        None => parse::<Lanes>(&value, "the lanes")?.lanes,
        Some(_) => vec![parse(&value, "a lane")?],
    };
    print!("{}", render::lane_table(&lanes));
    Ok(EXIT_OK)
}

async fn lane(client: &Client, verb: &str, l: &LaneArgs) -> Result<Value, Error> {
    client.call(Op::Lane { verb, class: &l.class, priority: &l.priority }).await
}

fn print_record(value: &Value, json: bool) -> Result<(), Error> {
    if json {
        println!("{value}");
    } else {
        let record: TaskRecord = parse(value, "a task record")?;
        print!("{}", render::record(&record));
    }
    Ok(())
}

/// 0 when the watched task succeeded; 1 when it failed or was cancelled; 130 (the shell's
/// code for Ctrl-C) when the watching was interrupted.
fn exit_code(watched: Watched) -> u8 {
    match watched {
        Watched::Finished(r) if r.status == Status::Succeeded => EXIT_OK,
        Watched::Finished(_) => EXIT_REFUSED,
        Watched::Interrupted => 130,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    fn submit_args(args: &[&str]) -> SubmitArgs {
        let mut argv = vec!["claw", "submit"];
        argv.extend(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Submit(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn spec_passes_numbers_as_numbers_and_the_rest_for_the_gateway_to_judge() {
        let a = submit_args(&[
            "sleep",
            "--input",
            r#"{"seconds": 1}"#,
            "--priority",
            "9",
            "--max-attempts",
            "x",
            "--class",
            "long",
            "--timeout-s",
            "60",
        ]);
        let v = spec(&a).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"kind": "sleep", "input": {"seconds": 1}, "priority": 9,
                "max_attempts": "x", "class": "long", "timeout_s": 60})
        );
        let a = submit_args(&["sleep", "--priority", "high"]);
        assert_eq!(spec(&a).unwrap()["priority"], "high");
        let a = submit_args(&["sleep", "--input", "{oops"]);
        assert!(matches!(spec(&a), Err(Error::Usage(_))));
    }

    #[test]
    fn client_flags_go_after_the_verb_and_lane_actions() {
        let cli = Cli::try_parse_from(["claw", "lanes", "pause", "short", "high", "--json"]);
        match cli.unwrap().command {
            Command::Lanes(a) => {
                assert!(a.client.json);
                assert!(matches!(a.action, Some(LaneAction::Pause(_))));
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["claw", "watch"]).is_err());
        assert!(Cli::try_parse_from(["claw", "watch", "x", "--session", "s"]).is_err());
    }
}
