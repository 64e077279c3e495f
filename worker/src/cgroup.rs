//! A cgroup v2 of the worker's own, for its memory cap ([`crate::memory`]), where the worker's
//! cgroup allows it; otherwise nothing here changes anything.
//!
//! The worker moves itself only when that touches nobody else: its cgroup (from
//! `/proc/self/cgroup`, under the `cgroup2` mount of `/proc/self/mountinfo`) must offer the
//! memory controller (delegated to it, as systemd's `Delegate=yes` or a container with a
//! writable cgroupfs do) and hold no process but the worker. Then, under that cgroup:
//!
//! - `claw-worker/`: the worker moves in, the parent enables `+memory` for its children (which
//!   cgroup v2 only allows once the parent holds no process itself), and `memory.high` is set to
//!   the cap and `memory.max` to the cap plus [`HARD_HEADROOM`];
//! - `claw-tasks/`: every child process a task runs in moves there between fork and exec
//!   ([`crate::limits::install`]), so a long task's memory is not counted as the worker's; each
//!   child keeps its own `[isolation]` limits.
//!
//! Anything else (cgroup v1, a read-only cgroupfs as in most containers, a shared cgroup, no
//! permission) leaves the worker where it is, with the reason in the start-up log, and the RSS
//! watchdog alone enforces the cap. This module can only be exercised where such a cgroup
//! exists; its decisions are tested against a directory laid out like one.

use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The worker's own cgroup, under the one it started in.
const WORKER_GROUP: &str = "claw-worker";
/// Where the worker's child processes go.
const TASKS_GROUP: &str = "claw-tasks";

/// `memory.max` is this fraction of the cap above `memory.high` (a quarter): room for the
/// watchdog to stop an attempt while the kernel throttles at the cap, before it kills.
pub const HARD_HEADROOM: u64 = 4;

/// `claw-tasks/cgroup.procs`, once the worker is placed; for the children's pre-exec hook.
static TASKS_PROCS: OnceLock<CString> = OnceLock::new();
/// The outcome of the first placement: a process is placed once, whatever workers it runs.
static PLACED: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Moves this process into a cgroup of its own with `cap` bytes as its memory limit, as the
/// module docs describe. Returns that cgroup, or why not (nothing was changed then, unless the
/// reason says so).
pub(crate) fn place(cap: u64) -> Result<PathBuf, String> {
    PLACED
        .get_or_init(|| {
            let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
            let cgroup = read(Path::new("/proc/self/cgroup"))?;
            let dir = own_cgroup_dir(&mountinfo, &cgroup)?;
            let placed = place_in(&dir, std::process::id(), cap)?;
            let procs = placed.tasks.join("cgroup.procs");
            let procs = CString::new(procs.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
            let _ = TASKS_PROCS.set(procs);
            Ok(placed.worker)
        })
        .clone()
}

/// `claw-tasks/cgroup.procs` when the worker was placed: a child writes `0` to it to move.
pub(crate) fn tasks_procs() -> Option<&'static CStr> {
    TASKS_PROCS.get().map(CString::as_c_str)
}

/// The cgroups [`place_in`] made.
#[derive(Debug)]
struct Placed {
    worker: PathBuf,
    tasks: PathBuf,
}

/// The directory of this process's cgroup v2: the `cgroup2` mount point joined with the path
/// of the `0::` line of `/proc/self/cgroup` (relative to the mount's root).
fn own_cgroup_dir(mountinfo: &str, cgroup: &str) -> Result<PathBuf, String> {
    let own = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("the process is in no cgroup v2 hierarchy")?;
    // `id parent major:minor root mount-point options... - fstype source super-options`
    let (root, mount) = mountinfo
        .lines()
        .find_map(|line| {
            let (fields, fs) = line.split_once(" - ")?;
            if fs.split_whitespace().next() != Some("cgroup2") {
                return None;
            }
            let mut fields = fields.split_whitespace().skip(3);
            Some((fields.next()?, fields.next()?))
        })
        .ok_or("no cgroup2 file system is mounted")?;
    let relative = own
        .strip_prefix(root)
        .ok_or_else(|| format!("the cgroup {own} is outside the mounted {root}"))?;
    match relative.trim_start_matches('/') {
        "" => Ok(PathBuf::from(mount)),
        relative => Ok(Path::new(mount).join(relative)),
    }
}

/// Places process `pid`, which must be alone in the cgroup at `dir`, as the module docs say.
fn place_in(dir: &Path, pid: u32, cap: u64) -> Result<Placed, String> {
    let controllers = read(&dir.join("cgroup.controllers"))?;
    if !controllers.split_whitespace().any(|c| c == "memory") {
        return Err(format!(
            "the memory controller is not available in {} (it has: {})",
            dir.display(),
            controllers.trim()
        ));
    }
    let procs = read(&dir.join("cgroup.procs"))?;
    let others = procs.split_whitespace().filter(|p| *p != pid.to_string()).count();
    if others > 0 {
        return Err(format!(
            "{others} other processes share {}; the worker moves only out of a cgroup of its own",
            dir.display()
        ));
    }
    let worker = dir.join(WORKER_GROUP);
    let tasks = dir.join(TASKS_GROUP);
    for group in [&worker, &tasks] {
        match std::fs::create_dir(group) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", group.display())),
        }
    }
    write(&worker.join("cgroup.procs"), &pid.to_string())?;
    let subtree = read(&dir.join("cgroup.subtree_control"))?;
    if !subtree.split_whitespace().any(|c| c == "memory")
        && let Err(e) = write(&dir.join("cgroup.subtree_control"), "+memory")
    {
        // Back where it was, so the worker is not left in a cgroup that caps nothing.
        let back = write(&dir.join("cgroup.procs"), &pid.to_string());
        return Err(format!("{e} (moved back: {})", back.is_ok()));
    }
    let hard = cap.saturating_add(cap / HARD_HEADROOM);
    write(&worker.join("memory.high"), &cap.to_string())
        .and_then(|()| write(&worker.join("memory.max"), &hard.to_string()))
        .map_err(|e| format!("{e} (the worker now runs in {} without a cap)", worker.display()))?;
    Ok(Placed { worker, tasks })
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory laid out like a delegated cgroup holding `procs`.
    fn fake_cgroup(controllers: &str, procs: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), controllers).unwrap();
        std::fs::write(dir.path().join("cgroup.procs"), procs).unwrap();
        std::fs::write(dir.path().join("cgroup.subtree_control"), "").unwrap();
        dir
    }

    #[test]
    fn the_own_cgroup_is_found_under_the_cgroup2_mount() {
        let mountinfo = "24 30 0:22 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                         35 30 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        let cgroup = "4:memory:/x\n0::/system.slice/claw-worker.service\n";
        assert_eq!(
            own_cgroup_dir(mountinfo, cgroup).unwrap(),
            Path::new("/sys/fs/cgroup/unified/system.slice/claw-worker.service")
        );
        // A container's namespace: its cgroup is the mount's root.
        let mountinfo = "600 599 0:30 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(own_cgroup_dir(mountinfo, "0::/\n").unwrap(), Path::new("/sys/fs/cgroup"));
        assert!(own_cgroup_dir(mountinfo, "4:memory:/x\n").is_err());
        assert!(own_cgroup_dir("24 30 0:22 / /x rw - cgroup cgroup rw\n", "0::/\n").is_err());
    }

    #[test]
    fn a_worker_alone_with_the_memory_controller_moves_into_a_capped_cgroup() {
        let dir = fake_cgroup("cpu memory pids\n", "4242\n");
        let placed = place_in(dir.path(), 4242, 100 << 20).unwrap();
        let read = |p: &str| std::fs::read_to_string(dir.path().join(p)).unwrap();
        assert_eq!(placed.worker, dir.path().join("claw-worker"));
        assert_eq!(read("claw-worker/cgroup.procs"), "4242");
        assert_eq!(read("cgroup.subtree_control"), "+memory");
        assert_eq!(read("claw-worker/memory.high"), (100u64 << 20).to_string());
        assert_eq!(read("claw-worker/memory.max"), (125u64 << 20).to_string());
        assert!(placed.tasks.is_dir());
    }

    #[test]
    fn anything_else_leaves_the_worker_where_it_is() {
        let dir = fake_cgroup("cpu pids\n", "4242\n");
        let why = place_in(dir.path(), 4242, 100 << 20).unwrap_err();
        assert!(why.contains("memory controller is not available"), "{why}");
        let dir = fake_cgroup("cpu memory\n", "4242\n77\n");
        let why = place_in(dir.path(), 4242, 100 << 20).unwrap_err();
        assert!(why.contains("1 other processes share"), "{why}");
        // Nothing was created or moved.
        assert!(!dir.path().join("claw-worker").exists());
        assert_eq!(std::fs::read_to_string(dir.path().join("cgroup.procs")).unwrap(), "4242\n77\n");
    }
}
