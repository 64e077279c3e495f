//! Running one attempt as a child process: its own process group, a clean environment (only
//! `PATH` and the program's configured variables: nothing of the worker's, so none of its
//! secrets), a fresh working directory, the `[isolation]` limits and user, stdout read as JSON
//! lines ([`crate::protocol`]), the stderr tail kept for the error, TERM → grace → KILL of the
//! whole group when the attempt is stopped, and SIGSTOP / SIGCONT of the whole group while the
//! attempt is paused.
//!
//! Both `exec` programs and `__run-task` children (long-class in-process kinds) go through
//! [`run`], so limits, stop and pause are handled in this one place.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use claw_proto::TaskError;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use crate::handler::Context;
use crate::limits;
use crate::protocol::{self, Line};

/// How much of stderr is kept for the error message: enough for a stack trace's last frames.
pub const STDERR_TAIL: usize = 4 * 1024;

/// After the group is killed, how long the pipe readers may take to see end-of-file. Only a
/// process that escaped the group (setsid) can hold a pipe open longer; it is not waited for.
const READER_GRACE: Duration = Duration::from_secs(2);

/// PATH for children when the worker has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// What to start.
#[derive(Clone, Debug)]
pub struct Spawn {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Added to an empty environment that only inherits `PATH`.
    pub env: BTreeMap<String, String>,
    pub stdin: Option<Vec<u8>>,
}

/// Kills the whole group when dropped, so an attempt that is aborted leaves nothing behind.
struct GroupGuard(Pid);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        // ESRCH (nothing left in the group) is the normal case.
        let _ = killpg(self.0, Signal::SIGKILL);
    }
}

/// The child's process group (its pid, as it leads its own group). Never 0: `killpg(0, ..)`
/// signals the caller's own group, the worker itself. The pid is gone only if the child was
/// already reaped, which cannot happen before it is watched; refused, rather than guessed.
fn group_of(pid: Option<u32>) -> Result<Pid, TaskError> {
    match pid.and_then(|p| i32::try_from(p).ok()) {
        Some(p) if p > 0 => Ok(Pid::from_raw(p)),
        _ => Err(TaskError::new(
            "spawn_failed",
            "the program's pid is unknown; not running it",
            true,
        )),
    }
}

/// Runs `spawn` to completion, or until `ctx` is cancelled (then TERM, `kill_grace`, KILL).
/// While `ctx` is paused the group is stopped (SIGSTOP), and continued (SIGCONT) on resume.
/// Progress and output lines go to `ctx`; the result is the `result` line (or null) on exit 0.
pub async fn run(spawn: Spawn, ctx: &Context, kill_grace: Duration) -> Result<Value, TaskError> {
    let workdir = tempfile::Builder::new()
        .prefix(&workdir_prefix(std::process::id()))
        .tempdir()
        .map_err(|e| TaskError::new("workdir", format!("cannot create a work dir: {e}"), true))?;
    let limits = ctx.child_limits().unwrap_or_default();
    if let Some(user) = limits.user {
        // Its own: the child starts in it, after it became that user (mode 0700 stays).
        std::os::unix::fs::chown(workdir.path(), Some(user.uid), Some(user.gid)).map_err(|e| {
            TaskError::new("workdir", format!("cannot give the work dir to {user:?}: {e}"), true)
        })?;
    }
    let path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_owned());
    let mut cmd = Command::new(&spawn.program);
    cmd.args(&spawn.args)
        .env_clear()
        .env("PATH", path)
        .envs(&spawn.env)
        .current_dir(workdir.path())
        // Its own group, so TERM/KILL and STOP/CONT reach every process it starts.
        .process_group(0)
        .stdin(if spawn.stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if ctx.child_limits().is_some() {
        limits::install(&mut cmd, limits);
    }
    // After `install`: a change of user clears the parent-death signal.
    die_with_the_worker(&mut cmd);
    let started = std::time::Instant::now();
    let mut child = cmd.spawn().map_err(|e| {
        let message = format!("cannot start {}: {e}", spawn.program.display());
        TaskError::new("spawn_failed", message, false)
    })?;
    let pgid = group_of(child.id())?;
    let _guard = GroupGuard(pgid);

    if let (Some(mut stdin), Some(bytes)) = (child.stdin.take(), spawn.stdin) {
        // A program that never reads its stdin must not block the attempt: write on the side.
        tokio::spawn(async move {
            let _ = stdin.write_all(&bytes).await;
        });
    }
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let reader_ctx = ctx.clone();
    let mut stdout_task =
        tokio::spawn(async move { read_protocol(BufReader::new(stdout), &reader_ctx).await });
    let mut stderr_task = tokio::spawn(read_tail(stderr));

    let mut paused = ctx.watch_paused();
    // A pause that came before the spawn applies at once.
    paused.mark_changed();
    let mut frozen = false;
    // Held while the group is stopped: the attempt's timeout stands still only then.
    let mut _parked = None;
    let mut follow_pause = true;
    let mut watchdog = tokio::time::interval(limits::WATCH_INTERVAL);
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            _ = watchdog.tick(), if limits.processes.is_some() => {
                let max = limits.processes.unwrap_or(u64::MAX);
                let count = limits::group_size(pgid.as_raw());
                if count as u64 > max {
                    tracing::warn!(pgid = pgid.as_raw(), count, max, "too many processes; killing the group");
                    stop_group(pgid, &mut child, Duration::ZERO, frozen).await;
                    return Err(limits::too_many_processes(count, max));
                }
            }
            () = ctx.cancelled() => {
                let grace = if ctx.is_urgent() { Duration::ZERO } else { kill_grace };
                stop_group(pgid, &mut child, grace, frozen).await;
                return Err(TaskError::new("stopped", "the attempt was stopped", true));
            }
            changed = paused.changed(), if follow_pause => {
                if changed.is_err() {
                    follow_pause = false; // the context is gone; nobody can pause any more
                    continue;
                }
                let want = *paused.borrow_and_update();
                if want != frozen {
                    let signal = if want { Signal::SIGSTOP } else { Signal::SIGCONT };
                    tracing::debug!(pgid = pgid.as_raw(), %signal, "task process group");
                    let _ = killpg(pgid, signal);
                    frozen = want;
                    _parked = want.then(|| ctx.park());
                }
            }
        }
    };
    // Whatever the leader left running in its group goes with it.
    let _ = killpg(pgid, Signal::SIGKILL);
    let (result, error) = match tokio::time::timeout(READER_GRACE, &mut stdout_task).await {
        Ok(Ok(lines)) => lines,
        _ => {
            stdout_task.abort();
            (None, None)
        }
    };
    let tail = match tokio::time::timeout(READER_GRACE, &mut stderr_task).await {
        Ok(Ok(tail)) => tail,
        _ => {
            stderr_task.abort();
            String::new()
        }
    };
    let status = status.map_err(|e| TaskError::new("wait_failed", e.to_string(), true))?;
    if error.is_none()
        && !status.success()
        && let Some(limit) = limits::classify(status, &tail, &limits, started.elapsed())
    {
        return Err(limit);
    }
    outcome(status, result, error, &tail)
}

/// Makes the child's leader die (SIGKILL) when the worker does. A worker that is SIGKILLed or
/// killed by the OOM killer cannot stop its children, and a program that ran on would be a
/// second run of its task beside the redelivered one (the soak counted up to 119 such runs in
/// a minute of faults). The signal is tied to the thread that spawned the child; attempts spawn
/// on the runtime's worker threads, which live as long as the worker. What the leader started
/// itself is not covered: [`sweep_stale_workdirs`] ends it at the next start of a worker.
#[allow(unsafe_code)]
fn die_with_the_worker(cmd: &mut Command) {
    let worker = nix::unistd::getpid();
    // SAFETY: runs in the forked child before exec, where only async-signal-safe calls are
    // allowed: prctl(2), getppid(2) and _exit(2), with a value copied in beforehand; no locks,
    // no heap.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
                .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
            // The worker died between the fork and the prctl: the signal will never come.
            if nix::unistd::getppid() != worker {
                nix::libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// `claw-task-<worker pid>-`: the prefix of a working directory, which says whose it is.
fn workdir_prefix(worker: u32) -> String {
    format!("claw-task-{worker}-")
}

/// Removes the working directories that workers which died without cleaning up left in the
/// temporary directory (their pid is not a live process), after killing what still runs in
/// them: the processes a task's program started, which outlived their leader. A process is
/// only killed when its working directory is that directory, so a reused pid is left alone.
/// One pass over `/proc`, however many directories are left.
pub(crate) fn sweep_stale_workdirs() {
    let tmp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&tmp) else { return };
    let stale: Vec<PathBuf> = entries
        .flatten()
        .filter(|entry| {
            let name = entry.file_name();
            let owner = name
                .to_str()
                .and_then(|n| n.strip_prefix("claw-task-"))
                .and_then(|rest| rest.split_once('-'))
                .and_then(|(pid, _)| pid.parse::<u32>().ok());
            owner.is_some_and(|pid| {
                pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            })
        })
        .map(|entry| entry.path())
        .collect();
    if stale.is_empty() {
        return;
    }
    let mut killed = 0;
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            if std::fs::read_link(p.path().join("cwd")).is_ok_and(|cwd| stale.contains(&cwd)) {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                killed += 1;
            }
        }
    }
    for dir in &stale {
        let _ = std::fs::remove_dir_all(dir);
    }
    tracing::info!(dirs = stale.len(), killed, "removed dead workers' task directories");
}

/// TERM the group, give it `grace`, then KILL it, and reap the leader. A `frozen` (SIGSTOPped)
/// group is continued right after the TERM: a stopped process cannot act on TERM, and would
/// only see it after the grace, when KILL comes anyway.
async fn stop_group(pgid: Pid, child: &mut tokio::process::Child, grace: Duration, frozen: bool) {
    let _ = killpg(pgid, Signal::SIGTERM);
    if frozen {
        let _ = killpg(pgid, Signal::SIGCONT);
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        tracing::info!(pgid = pgid.as_raw(), "task process ignored SIGTERM; killing it");
    }
    let _ = killpg(pgid, Signal::SIGKILL);
    let _ = child.wait().await;
}

/// The attempt's outcome from how the process ended and what it said.
fn outcome(
    status: ExitStatus,
    result: Option<Value>,
    error: Option<TaskError>,
    stderr_tail: &str,
) -> Result<Value, TaskError> {
    if let Some(error) = error {
        return Err(error);
    }
    if status.success() {
        return Ok(result.unwrap_or(Value::Null));
    }
    use std::os::unix::process::ExitStatusExt;
    let how = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "ended abnormally".to_owned(),
    };
    let message =
        if stderr_tail.is_empty() { how } else { format!("{how}; stderr: {stderr_tail}") };
    Err(TaskError::new("exit_status", message, true))
}

/// Reads stdout lines into `ctx`, returning the last `result` and `error` lines.
async fn read_protocol<R: AsyncBufRead + Unpin>(
    mut reader: R,
    ctx: &Context,
) -> (Option<Value>, Option<TaskError>) {
    let (mut result, mut error) = (None, None);
    let mut line = Vec::new();
    while read_bounded_line(&mut reader, &mut line).await {
        match protocol::parse_line(&String::from_utf8_lossy(&line)) {
            Line::Progress(p) => ctx.progress(p.fraction, p.message),
            Line::Output(text) => ctx.output(&text),
            Line::Result(v) => result = Some(v),
            Line::Error(e) => error = Some(e),
        }
    }
    (result, error)
}

/// Reads one line (without the newline) into `line`, keeping at most [`protocol::MAX_LINE`]
/// bytes of it. Returns false at end of input with nothing read.
async fn read_bounded_line<R: AsyncBufRead + Unpin>(reader: &mut R, line: &mut Vec<u8>) -> bool {
    line.clear();
    let mut any = false;
    loop {
        let buf = match reader.fill_buf().await {
            Ok(buf) => buf,
            Err(_) => return any,
        };
        if buf.is_empty() {
            return any;
        }
        any = true;
        let (chunk, used, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], i + 1, true),
            None => (buf, buf.len(), false),
        };
        let room = protocol::MAX_LINE.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        reader.consume(used);
        if done {
            return true;
        }
    }
}

/// Reads to the end, keeping the last [`STDERR_TAIL`] bytes.
async fn read_tail<R: AsyncRead + Unpin>(mut reader: R) -> String {
    let mut tail = Vec::with_capacity(STDERR_TAIL * 2);
    let mut buf = [0u8; 4096];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > STDERR_TAIL {
                    tail.drain(..tail.len() - STDERR_TAIL);
                }
            }
        }
    }
    String::from_utf8_lossy(&tail).trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::sync::CancellationToken;

    /// Issue 12: an unknown pid became group 0, and every signal meant for the task's group
    /// (the kill on drop among them) would have gone to the worker's own.
    #[test]
    fn a_group_is_never_the_workers_own() {
        assert_eq!(group_of(Some(4242)).unwrap(), Pid::from_raw(4242));
        for unknown in [None, Some(0), Some(u32::MAX)] {
            assert_eq!(group_of(unknown).unwrap_err().code, "spawn_failed", "{unknown:?}");
        }
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_reading_continues() {
        let long = "x".repeat(protocol::MAX_LINE + 10);
        let input = format!("{long}\n{{\"result\": 1}}\nlast");
        let mut reader = BufReader::new(input.as_bytes());
        let mut line = Vec::new();
        assert!(read_bounded_line(&mut reader, &mut line).await);
        assert_eq!(line.len(), protocol::MAX_LINE);
        assert!(read_bounded_line(&mut reader, &mut line).await);
        assert_eq!(line, br#"{"result": 1}"#);
        assert!(read_bounded_line(&mut reader, &mut line).await);
        assert_eq!(line, b"last");
        assert!(!read_bounded_line(&mut reader, &mut line).await);
    }

    #[tokio::test]
    async fn stderr_tail_keeps_the_end() {
        let input = format!("{}END", "a".repeat(10_000));
        let tail = read_tail(input.as_bytes()).await;
        assert_eq!(tail.len(), STDERR_TAIL);
        assert!(tail.ends_with("END"));
    }

    fn sh(script: &str) -> Spawn {
        Spawn {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: BTreeMap::new(),
            stdin: None,
        }
    }

    #[tokio::test]
    async fn a_script_reports_and_returns_its_result() {
        let ctx = Context::new(CancellationToken::new());
        let script = r#"echo '{"progress": 0.5}'; echo hi; echo '{"result": {"ok": true}}'"#;
        let v = run(sh(script), &ctx, Duration::from_secs(1)).await.unwrap();
        assert_eq!(v, serde_json::json!({"ok": true}));
        let pending = ctx.take();
        assert_eq!(pending.progress.unwrap().fraction, 0.5);
        assert_eq!(pending.output, "hi\n");
    }

    #[tokio::test]
    async fn failure_carries_the_stderr_tail() {
        let ctx = Context::new(CancellationToken::new());
        let e = run(sh("echo oops >&2; exit 3"), &ctx, Duration::from_secs(1)).await.unwrap_err();
        assert_eq!((e.code.as_str(), e.retryable), ("exit_status", true));
        assert!(e.message.contains("status 3") && e.message.contains("oops"), "{e}");
    }

    #[tokio::test]
    async fn cancel_kills_the_whole_group() {
        let cancel = CancellationToken::new();
        let ctx = Context::new(cancel.clone());
        // The shell ignores TERM and has a grandchild, so only KILL of the group ends both.
        let script = "trap '' TERM; sleep 30 & echo ready; wait";
        let started = std::time::Instant::now();
        let probe = ctx.clone();
        let run =
            tokio::spawn(async move { run(sh(script), &ctx, Duration::from_millis(200)).await });
        let mut seen = String::new();
        while !seen.contains("ready") {
            assert!(started.elapsed() < Duration::from_secs(5), "script did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
            seen.push_str(&probe.take().output);
        }
        cancel.cancel();
        let e = run.await.unwrap().unwrap_err();
        assert_eq!(e.code, "stopped");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// The state letter of `/proc/<pid>/stat` (R, S, T, Z, ...).
    fn proc_state(pid: &str) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit(')').next()?.trim_start().chars().next()
    }

    async fn poll(what: &str, mut check: impl FnMut() -> bool) {
        let started = std::time::Instant::now();
        while !check() {
            assert!(started.elapsed() < Duration::from_secs(5), "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn pause_stops_the_group_and_cancel_still_ends_it() {
        let ctx = Context::new(CancellationToken::new());
        let probe = ctx.clone();
        let run = tokio::spawn({
            let ctx = ctx.clone();
            async move { run(sh("echo $$; exec sleep 30"), &ctx, Duration::from_secs(5)).await }
        });
        let mut pid = String::new();
        poll("the pid", || {
            pid.push_str(&probe.take().output);
            pid.ends_with('\n')
        })
        .await;
        let pid = pid.trim();
        assert!(!ctx.is_parked());
        ctx.set_paused(true);
        poll("SIGSTOP", || proc_state(pid) == Some('T')).await;
        // Frozen: the attempt stands still (its timeout with it) until it is continued.
        poll("parked", || ctx.is_parked()).await;
        ctx.set_paused(false);
        poll("SIGCONT", || proc_state(pid) == Some('S')).await;
        poll("no longer parked", || !ctx.is_parked()).await;
        ctx.set_paused(true);
        poll("SIGSTOP again", || proc_state(pid) == Some('T')).await;
        // A frozen `sleep` dies of the TERM at once (it is continued to receive it), long
        // before the 5 s grace.
        let started = std::time::Instant::now();
        ctx.cancel();
        assert_eq!(run.await.unwrap().unwrap_err().code, "stopped");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }
}
