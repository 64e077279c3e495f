//! Long-class tasks of in-process kinds run in a child: the worker starts
//! `<runner> __run-task`, writes the [`TaskRecord`] JSON to its stdin, and reads the JSON-lines
//! protocol ([`crate::protocol`]) from its stdout with the same reader as `exec` programs.
//!
//! [`run_task_main`] is the child's side. Every binary that can be a runner (`claw-worker`,
//! `claw`, a team's own worker) checks `std::env::args().nth(1) == Some("__run-task")` first
//! thing in `main` and exits with its return value.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use claw_proto::{TaskError, TaskRecord};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::events::FLUSH_INTERVAL;
use crate::handler::{Context, Registry};
use crate::kinds::sleep::Sleep;
use crate::process::{self, Spawn};
use crate::protocol::{self, Line};

/// The first argument that turns a worker binary into a task runner.
pub const RUN_TASK_ARG: &str = "__run-task";

/// The child side for the built-in in-process kinds. Returns the process exit code.
pub fn run_task_main() -> i32 {
    run_task_main_with(registry())
}

/// The in-process kinds a `__run-task` child of the built-in worker knows.
pub fn registry() -> Registry {
    Registry::empty().with(Sleep)
}

/// The child side with a custom registry. The task's outcome is a `result` or `error` line and
/// exit code 0; a non-zero code means the runner itself failed.
pub fn run_task_main_with(registry: Registry) -> i32 {
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("__run-task: cannot read the task from stdin: {e}");
        return 2;
    }
    let task: TaskRecord = match serde_json::from_slice(&input) {
        Ok(task) => task,
        Err(e) => {
            eprintln!("__run-task: stdin is not a task record: {e}");
            return 2;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("__run-task: cannot start a runtime: {e}");
            return 2;
        }
    };
    let outcome = runtime.block_on(run_in_this_process(&registry, task));
    let line = match outcome {
        Ok(value) => Line::Result(value),
        Err(error) => Line::Error(error),
    };
    if write_line(&line).is_err() {
        return 3;
    }
    0
}

async fn run_in_this_process(registry: &Registry, task: TaskRecord) -> Result<Value, TaskError> {
    let Some(handler) = registry.get(&task.kind) else {
        let message = format!("kind {:?} is not known to the runner", task.kind);
        return Err(TaskError::new("unknown_kind", message, false));
    };
    let cancel = CancellationToken::new();
    // The parent stops an attempt with SIGTERM; turn it into the handler's cancellation so an
    // in-process kind can stop at its next checkpoint (KILL follows after the grace period).
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            term.recv().await;
            cancel.cancel();
        });
    }
    let ctx = Context::new(cancel);
    let mut run = std::pin::pin!(handler.run(&task, &ctx));
    let mut flush = tokio::time::interval(FLUSH_INTERVAL);
    let result = loop {
        tokio::select! {
            result = &mut run => break result,
            _ = flush.tick() => flush_to_stdout(&ctx),
        }
    };
    flush_to_stdout(&ctx);
    result
}

fn flush_to_stdout(ctx: &Context) {
    let pending = ctx.take();
    if let Some(p) = pending.progress {
        let _ = write_line(&Line::Progress(p));
    }
    if !pending.output.is_empty() {
        let _ = write_line(&Line::Output(pending.output));
    }
}

fn write_line(line: &Line) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(protocol::encode(line).as_bytes())?;
    out.flush()
}

/// The parent side: runs `task` in `<runner> __run-task` and reports into `ctx`.
pub async fn run_in_child(
    runner: &Path,
    task: &TaskRecord,
    ctx: &Context,
    kill_grace: Duration,
) -> Result<Value, TaskError> {
    let stdin = serde_json::to_vec(task).expect("a record serializes");
    let spawn = Spawn {
        program: runner.to_owned(),
        args: vec![RUN_TASK_ARG.to_owned()],
        env: BTreeMap::new(),
        stdin: Some(stdin),
    };
    process::run(spawn, ctx, kill_grace).await
}
