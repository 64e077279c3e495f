//! `claw-custom-worker`: `claw-worker` with one more kind. The same flags and config file as
//! `claw-worker` ([`claw_worker::cli`]); the only differences are the registry the worker runs
//! with and the one a `__run-task` child gets, which must know the same in-process kinds.

fn main() -> anyhow::Result<()> {
    claw_worker::cli::main_with(claw_custom_worker::registry, claw_custom_worker::child_registry)
}
