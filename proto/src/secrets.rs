//! Secrets a process is given, and keeping them from the processes it starts.
//!
//! A secret can come from a file (`--nats-password-file`, the llm kind's `api_key_file`):
//! then it never enters an environment. One that came in an environment variable
//! (`NATS_PASSWORD`, `NATS_TOKEN`, the llm kind's `api_key_env`) is removed from the process's
//! environment by [`scrub_env`] first thing in `main`, before any thread or child exists, so no
//! child inherits it. Removing a variable is not enough against a child that reads
//! `/proc/<parent>/environ`: that file shows the block the kernel wrote at exec, which
//! `unsetenv` leaves as it was, so [`scrub_env`] also overwrites the variable there.
//!
//! What this does not cover: a process of the same user can still read the secret files, and
//! ptrace the process or read its memory (where every secret it uses lives) unless it is made
//! non-dumpable ([`make_undumpable`]); a root process can do all of it. A boundary between a
//! service and the programs it runs needs another user for them (the worker's
//! `[isolation] user`).

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The variables of [`crate::connect::NatsArgs`] that hold a secret (every binary reads them).
pub const NATS_VARS: [&str; 2] = ["NATS_PASSWORD", "NATS_TOKEN"];

/// A secret file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read the secret file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the secret file {0} is empty")]
    Empty(PathBuf),
}

/// The secret in `path`: the file's text without its trailing newline (`\n` or `\r\n`), as
/// `echo secret > file` writes it. Nothing else is trimmed: a secret may end in a space.
pub fn read_file(path: &Path) -> Result<String, FileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| FileError::Read { path: path.to_owned(), source })?;
    let secret = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t));
    let secret = secret.unwrap_or(&text);
    if secret.is_empty() {
        return Err(FileError::Empty(path.to_owned()));
    }
    Ok(secret.to_owned())
}

/// Removes each of `names` from this process's environment, and overwrites its `NAME=value`
/// with zero bytes in the environment block the kernel gave the process at exec (what
/// `/proc/<pid>/environ` shows to anyone allowed to read it). Names that are not set are
/// skipped. Returns the names that were set.
///
/// Copies made before (a parsed flag, a key held by a handler) are untouched: they are how the
/// process uses its secrets.
///
/// # Safety
///
/// The same as [`std::env::remove_var`]'s: no other thread may exist that reads or writes the
/// environment. Call it in `main` before the async runtime (or anything else) starts a thread.
#[allow(unsafe_code)]
pub unsafe fn scrub_env<S: AsRef<OsStr>>(names: &[S]) -> Vec<String> {
    let names: Vec<&OsStr> = names
        .iter()
        .map(AsRef::as_ref)
        .filter(|n| !n.is_empty() && !n.as_bytes().iter().any(|&b| b == b'=' || b == 0))
        .filter(|n| std::env::var_os(n).is_some())
        .collect();
    if names.is_empty() {
        return Vec::new();
    }
    // Found before the variables go: after `remove_var` nothing points at their text any more,
    // which is what makes overwriting it harmless.
    let entries = initial_entries(&names);
    for name in &names {
        // SAFETY: the caller guarantees no other thread touches the environment.
        unsafe { std::env::remove_var(name) };
    }
    for (address, len) in entries {
        // SAFETY: `address..address + len` lies inside the process's initial environment block
        // (checked by `initial_entries` against the kernel's own bounds), which is writable
        // memory of the main thread's stack that neither Rust nor libc owns as an object. The
        // only pointers into this part of it were the environment's entries for `names`, which
        // `remove_var` has just dropped; no other thread exists to read it meanwhile.
        unsafe { std::ptr::write_bytes(address as *mut u8, 0, len) };
    }
    names.iter().map(|n| n.to_string_lossy().into_owned()).collect()
}

/// Where the `NAME=value` entries of `names` are in the initial environment block: (address,
/// length) pairs, from the block's bounds in `/proc/self/stat` and its text in
/// `/proc/self/environ`. Empty when `/proc` cannot tell (nothing can read the block there then
/// either).
fn initial_entries(names: &[&OsStr]) -> Vec<(usize, usize)> {
    let Some((start, end)) = env_block() else { return Vec::new() };
    let Ok(block) = std::fs::read("/proc/self/environ") else { return Vec::new() };
    if block.len() > end - start {
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut offset = 0;
    for entry in block.split(|&b| b == 0) {
        let is_secret = names.iter().any(|name| {
            let name = name.as_bytes();
            entry.len() > name.len() && entry.starts_with(name) && entry[name.len()] == b'='
        });
        if is_secret {
            found.push((start + offset, entry.len()));
        }
        offset += entry.len() + 1;
    }
    found
}

/// `env_start` and `env_end` of this process (fields 50 and 51 of `/proc/self/stat`).
fn env_block() -> Option<(usize, usize)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // After `(comm)` (which may hold spaces) the fields go on from field 3, `state`.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let start: usize = fields.get(50 - 3)?.parse().ok()?;
    let end: usize = fields.get(51 - 3)?.parse().ok()?;
    (start != 0 && end > start).then_some((start, end))
}

/// Makes this process non-dumpable (`PR_SET_DUMPABLE` 0): processes of the same user without
/// `CAP_SYS_PTRACE` (its children among them) can no longer ptrace it or read its memory,
/// environment or file descriptors through `/proc`, and it leaves no core dump with its
/// secrets in it. Root's processes still can. Programs it starts are dumpable again once they
/// exec. Returns why not, when the kernel refuses.
pub fn make_undumpable() -> Result<(), String> {
    nix::sys::prctl::set_dumpable(false).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_file_loses_its_trailing_newline_only() {
        let dir = tempfile_dir();
        let path = dir.join("secret");
        for (text, secret) in [("s3cret\n", "s3cret"), ("s3cret\r\n", "s3cret"), ("a b \n", "a b ")]
        {
            std::fs::write(&path, text).unwrap();
            assert_eq!(read_file(&path).unwrap(), secret);
        }
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(read_file(&path), Err(FileError::Empty(_))));
        let missing = dir.join("missing");
        let e = read_file(&missing).unwrap_err().to_string();
        assert!(e.contains(&missing.display().to_string()), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("claw-secrets-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_environment_block_is_found() {
        let (start, end) = env_block().expect("env_start and env_end in /proc/self/stat");
        let block = std::fs::read("/proc/self/environ").unwrap();
        assert_eq!(block.len(), end - start);
    }
}
