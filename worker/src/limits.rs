//! Resource limits of a task's child processes (`[isolation]`), applied in the child between
//! fork and exec with `setrlimit(2)`, a process-group watchdog for the process count, and the
//! naming of an attempt that a limit ended (`limit_memory`, `limit_cpu`, ...).
//!
//! What each limit is, and what it does not cover without cgroups v2:
//!
//! - `memory_mb` → `RLIMIT_AS`, the address space of *each* process (not the sum over the
//!   group). An allocation past it fails (ENOMEM): how the program then ends is up to it
//!   (Python raises `MemoryError`, Rust and C++ abort, C may crash). The failure is named
//!   `limit_memory` when the program's stderr says so (see [`MEMORY_SIGNS`]); a program that
//!   dies silently of a failed allocation is an ordinary `exit_status` failure. Runtimes that
//!   reserve large virtual ranges up front (JVM, Node, Go with big arenas) need a higher limit.
//! - `cpu_s` → `RLIMIT_CPU`: SIGXCPU at the soft limit, SIGKILL a little later. Named
//!   `limit_cpu`. CPU seconds are per process, so a group of busy processes can use more.
//! - `open_files` → `RLIMIT_NOFILE`: an open past it fails with EMFILE; named `limit_files`
//!   when the program says "Too many open files".
//! - `processes` → a watchdog that counts the attempt's process group every
//!   [`WATCH_INTERVAL`] and kills the group past the limit (`limit_processes`). It works for
//!   root too, unlike `RLIMIT_NPROC`; a process that leaves the group (`setsid`) escapes it,
//!   and a fast fork bomb can create many processes between two looks.
//! - `uid_processes` → `RLIMIT_NPROC` (off by default): counted per *real user*, i.e. over every
//!   process and thread of the worker's uid, not per task, and ignored for root.
//!
//! Not covered without cgroups v2 (`memory.max`, `pids.max`, `cpu.max`): a limit on the
//! group's total memory, page cache and kernel memory; a hard cap on processes that no fork
//! can outrun; CPU *rate* limits; and accounting that follows processes out of the group.
//! Where the worker has a cgroup v2 of its own for its memory cap (`cgroup.rs`), its
//! children move out of it into `claw-tasks` before they exec, so a task's memory never counts
//! as the worker's; that cgroup has no limits of its own yet.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use claw_proto::TaskError;
use nix::sys::resource::{Resource, setrlimit};
use serde::Deserialize;

/// How often the process-count watchdog looks at a running attempt's group.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// Seconds between SIGXCPU (soft `RLIMIT_CPU`) and SIGKILL (hard).
const CPU_HARD_SLACK: u64 = 2;

/// Lower-cased stderr fragments that mean an allocation failed.
pub const MEMORY_SIGNS: &[&str] = &[
    "memoryerror",
    "out of memory",
    "cannot allocate memory",
    "memory allocation of",
    "bad_alloc",
    "xmalloc",
    "failed to allocate",
    "allocation failed",
];

/// Lower-cased stderr fragments that mean the file-descriptor limit was hit.
const FILE_SIGNS: &[&str] = &["too many open files"];

/// Lower-cased stderr fragments that mean a fork failed.
const FORK_SIGNS: &[&str] =
    &["cannot fork", "fork: resource temporarily unavailable", "fork failed"];

/// `[isolation]`: the limits of every child process a task runs in.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IsolationConfig {
    /// `RLIMIT_AS` of each process, in MiB. 0: none.
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// `RLIMIT_CPU` in seconds. Absent: the attempt's `timeout_s` (one core's worth of its wall
    /// time). 0: none.
    #[serde(default)]
    pub cpu_s: Option<u64>,
    /// `RLIMIT_NOFILE`. 0: inherited.
    #[serde(default = "default_open_files")]
    pub open_files: u64,
    /// Most processes in an attempt's process group (watchdog). 0: none.
    #[serde(default = "default_processes")]
    pub processes: u64,
    /// `RLIMIT_NPROC`: per real user, so it counts all the uid's processes. 0: not set.
    #[serde(default)]
    pub uid_processes: u64,
    /// The user every child process runs as: a name, or a number. Needs the worker to run as
    /// root (a worker that is not and has this set refuses to start). Unset (the default):
    /// children run as the worker's own user, so they can read what it can (its configuration,
    /// its secret files, and with root's capabilities its memory); a worker running as root
    /// then warns at start.
    #[serde(default)]
    pub user: Option<String>,
    /// The group children run as (a name or a number); default the user's own. Children get
    /// no supplementary groups.
    #[serde(default)]
    pub group: Option<String>,
}

/// The user and group a child process is switched to before it execs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChildUser {
    pub uid: u32,
    pub gid: u32,
}

impl IsolationConfig {
    /// The user children run as, from `user` and `group`, for a worker whose effective uid is
    /// `euid`: `None` when unset; an error when the names are unknown, or when it is set and
    /// the worker is not root (only root can switch users).
    pub fn child_user(&self, euid: u32) -> Result<Option<ChildUser>, String> {
        let Some(user) = &self.user else {
            if self.group.is_some() {
                return Err("isolation.group is set without isolation.user".into());
            }
            return Ok(None);
        };
        let entry = match user.parse::<u32>() {
            Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
            Err(_) => nix::unistd::User::from_name(user),
        };
        let entry = entry.map_err(|e| format!("isolation.user = {user:?}: {e}"))?;
        let (uid, user_gid) = match (entry, user.parse::<u32>()) {
            (Some(e), _) => (e.uid.as_raw(), Some(e.gid.as_raw())),
            (None, Ok(uid)) => (uid, None),
            (None, Err(_)) => return Err(format!("isolation.user = {user:?}: no such user")),
        };
        let gid = match &self.group {
            None => user_gid.ok_or_else(|| {
                format!("isolation.user = {user:?} has no entry in the user database: set isolation.group")
            })?,
            Some(group) => match group.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => nix::unistd::Group::from_name(group)
                    .map_err(|e| format!("isolation.group = {group:?}: {e}"))?
                    .ok_or_else(|| format!("isolation.group = {group:?}: no such group"))?
                    .gid
                    .as_raw(),
            },
        };
        if euid != 0 {
            return Err(format!(
                "isolation.user = {user:?} needs the worker to run as root (it runs as uid \
                 {euid}), to switch its children to that user; unset it, or start the worker \
                 as root"
            ));
        }
        Ok(Some(ChildUser { uid, gid }))
    }
}

/// The limits of one attempt's child, resolved from [`IsolationConfig`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChildLimits {
    pub address_space: Option<u64>,
    pub cpu_s: Option<u64>,
    pub open_files: Option<u64>,
    pub processes: Option<u64>,
    pub uid_processes: Option<u64>,
    /// Whom the child runs as; `None`: the worker's own user.
    pub user: Option<ChildUser>,
}

impl IsolationConfig {
    pub fn standard() -> IsolationConfig {
        IsolationConfig {
            memory_mb: default_memory_mb(),
            cpu_s: None,
            open_files: default_open_files(),
            processes: default_processes(),
            uid_processes: 0,
            user: None,
            group: None,
        }
    }

    /// The limits of an attempt whose timeout is `timeout_s`, its child running as `user`
    /// (resolved once at start, [`IsolationConfig::child_user`]).
    pub fn for_attempt(&self, timeout_s: u64, user: Option<ChildUser>) -> ChildLimits {
        let some = |v: u64| (v > 0).then_some(v);
        ChildLimits {
            address_space: some(self.memory_mb.saturating_mul(1024 * 1024)),
            cpu_s: some(self.cpu_s.unwrap_or(timeout_s)),
            open_files: some(self.open_files),
            processes: some(self.processes),
            uid_processes: some(self.uid_processes),
            user,
        }
    }
}

fn default_memory_mb() -> u64 {
    // The plan's 500 MB cap.
    500
}

fn default_open_files() -> u64 {
    256
}

fn default_processes() -> u64 {
    256
}

/// Makes `cmd`'s child apply `limits` to itself before it execs, leave the worker's own
/// cgroup for the tasks' one when the worker has one (`cgroup.rs`): a task's memory is
/// not the worker's; and then become `limits.user`, when set. The switch comes last because the
/// steps before it need root's rights; the parent-death signal, which a change of user clears,
/// is set after this hook (`process.rs`).
#[allow(unsafe_code)]
pub fn install(cmd: &mut tokio::process::Command, limits: ChildLimits) {
    let tasks_cgroup = crate::cgroup::tasks_procs();
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed. It calls setrlimit(2) (through nix, which passes a stack value to
    // libc) with numbers copied into the closure beforehand, open(2), write(2) and close(2)
    // on a path that was a `&'static CStr` before the fork, and setgroups(2), setgid(2) and
    // setuid(2) with ids copied in; it builds an io::Error from an errno on failure (no
    // allocation): no locks, no heap, no shared state.
    unsafe {
        cmd.pre_exec(move || {
            apply(&limits)?;
            if let Some(procs) = tasks_cgroup {
                join_cgroup(procs);
            }
            if let Some(user) = limits.user {
                become_user(user)?;
            }
            Ok(())
        });
    }
}

/// Switches the calling (forked, not yet exec'd) process to `user`: no supplementary groups,
/// then the group, then the user, in that order because each step needs the rights the next
/// one gives up. `setuid` as root sets the real, effective and saved uid, so the program can
/// never switch back.
#[allow(unsafe_code)]
fn become_user(user: ChildUser) -> io::Result<()> {
    let check = |rc: libc::c_int| if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) };
    // SAFETY: plain syscalls on integers; a failure is only a return value and errno.
    unsafe {
        check(libc::setgroups(0, std::ptr::null()))?;
        check(libc::setgid(user.gid))?;
        check(libc::setuid(user.uid))?;
    }
    Ok(())
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `procs` (writing `0`
/// means "me"). A failure is ignored: the child then counts toward the worker's cgroup, which
/// is what it did before cgroups, and it still has its own limits.
#[allow(unsafe_code)]
fn join_cgroup(procs: &std::ffi::CStr) {
    // SAFETY: `procs` is a valid NUL-terminated path; the buffer is a static byte; every call
    // is a plain syscall whose failure is only a return value.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
        }
    }
}

fn apply(limits: &ChildLimits) -> io::Result<()> {
    let set = |resource, soft: u64, hard: u64| {
        setrlimit(resource, soft, hard).map_err(|e| io::Error::from_raw_os_error(e as i32))
    };
    if let Some(bytes) = limits.address_space {
        set(Resource::RLIMIT_AS, bytes, bytes)?;
    }
    if let Some(s) = limits.cpu_s {
        set(Resource::RLIMIT_CPU, s, s + CPU_HARD_SLACK)?;
    }
    if let Some(n) = limits.open_files {
        set(Resource::RLIMIT_NOFILE, n, n)?;
    }
    if let Some(n) = limits.uid_processes {
        set(Resource::RLIMIT_NPROC, n, n)?;
    }
    Ok(())
}

/// Live processes whose process group is `pgid` (from `/proc/<pid>/stat`; threads and zombies
/// not counted).
pub fn group_size(pgid: i32) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    dir.filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .filter(|e| {
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { return false };
            // After the `(comm)` field: state, ppid, pgrp.
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let mut fields = rest.split_whitespace();
            let state = fields.next();
            let pgrp = fields.nth(1).and_then(|p| p.parse::<i32>().ok());
            state != Some("Z") && pgrp == Some(pgid)
        })
        .count()
}

/// The named limit failure of a child that ended with `status` after `elapsed`, given what its
/// stderr said; `None` when nothing points at a limit.
pub fn classify(
    status: ExitStatus,
    stderr_tail: &str,
    limits: &ChildLimits,
    elapsed: Duration,
) -> Option<TaskError> {
    let signal = status.signal();
    let said = stderr_tail.to_lowercase();
    let says = |signs: &[&str]| signs.iter().any(|s| said.contains(s));
    let how = match (status.code(), signal) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "ended abnormally".to_owned(),
    };
    let named = |what: &str, limit: String| {
        let mut message = format!("limit: {what} ({limit}); the program {how}");
        if !stderr_tail.is_empty() {
            message.push_str(&format!("; stderr: {stderr_tail}"));
        }
        Some(TaskError::new(format!("limit_{what}"), message, true))
    };
    if let Some(cpu) = limits.cpu_s {
        let killed_late = signal == Some(libc::SIGKILL) && elapsed.as_secs() >= cpu;
        if signal == Some(libc::SIGXCPU) || killed_late {
            return named("cpu", format!("{cpu} CPU seconds"));
        }
    }
    if let Some(bytes) = limits.address_space
        && says(MEMORY_SIGNS)
    {
        return named("memory", format!("{} MiB of address space", bytes / (1024 * 1024)));
    }
    if let Some(n) = limits.open_files
        && says(FILE_SIGNS)
    {
        return named("files", format!("{n} open files"));
    }
    if says(FORK_SIGNS) && (limits.uid_processes.is_some() || limits.processes.is_some()) {
        return named("processes", "cannot fork".to_owned());
    }
    None
}

/// The failure of an attempt whose group the watchdog killed with `count` processes.
pub fn too_many_processes(count: usize, limit: u64) -> TaskError {
    let message =
        format!("limit: processes ({limit} in the process group); {count} seen, group killed");
    TaskError::new("limit_processes", message, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    fn signalled(sig: i32) -> ExitStatus {
        ExitStatus::from_raw(sig)
    }

    #[test]
    fn defaults_and_zero_means_none() {
        let c = IsolationConfig::standard();
        let l = c.for_attempt(60, None);
        assert_eq!(l.address_space, Some(500 * 1024 * 1024));
        assert_eq!(
            (l.cpu_s, l.open_files, l.processes, l.uid_processes),
            (Some(60), Some(256), Some(256), None)
        );
        let c = IsolationConfig { memory_mb: 0, cpu_s: Some(0), open_files: 0, ..c };
        let l = c.for_attempt(60, None);
        assert_eq!((l.address_space, l.cpu_s, l.open_files), (None, None, None));
    }

    #[test]
    fn the_child_user_is_resolved_and_needs_root() {
        let with = |user: Option<&str>, group: Option<&str>| IsolationConfig {
            user: user.map(str::to_owned),
            group: group.map(str::to_owned),
            ..IsolationConfig::standard()
        };
        assert_eq!(with(None, None).child_user(1000), Ok(None));
        let root = nix::unistd::User::from_name("root").unwrap().expect("a root entry");
        assert_eq!(
            with(Some("root"), None).child_user(0),
            Ok(Some(ChildUser { uid: 0, gid: root.gid.as_raw() }))
        );
        assert_eq!(
            with(Some("12345"), Some("54321")).child_user(0),
            Ok(Some(ChildUser { uid: 12345, gid: 54321 }))
        );
        let e = with(Some("root"), None).child_user(1000).unwrap_err();
        assert!(e.contains("needs the worker to run as root") && e.contains("1000"), "{e}");
        let e = with(Some("no-such-user-here"), None).child_user(0).unwrap_err();
        assert!(e.contains("no such user"), "{e}");
        assert!(with(None, Some("root")).child_user(0).unwrap_err().contains("without"));
    }

    #[test]
    fn limits_are_named() {
        let l = IsolationConfig::standard().for_attempt(10, None);
        let code =
            |s, tail: &str, secs| classify(s, tail, &l, Duration::from_secs(secs)).map(|e| e.code);
        assert_eq!(code(exit(1), "Traceback...\nMemoryError", 1).as_deref(), Some("limit_memory"));
        assert_eq!(
            code(signalled(libc::SIGABRT), "memory allocation of 1024 bytes failed", 1).as_deref(),
            Some("limit_memory")
        );
        assert_eq!(code(signalled(libc::SIGXCPU), "", 10).as_deref(), Some("limit_cpu"));
        assert_eq!(code(signalled(libc::SIGKILL), "", 12).as_deref(), Some("limit_cpu"));
        assert_eq!(code(signalled(libc::SIGKILL), "", 1), None);
        assert_eq!(
            code(exit(1), "OSError: [Errno 24] Too many open files", 1).as_deref(),
            Some("limit_files")
        );
        assert_eq!(code(exit(3), "plain failure", 1), None);
        let e = classify(exit(1), "MemoryError", &l, Duration::ZERO).unwrap();
        assert!(e.retryable && e.message.starts_with("limit: memory"), "{e}");
    }
}
