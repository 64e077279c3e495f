//! `claw-worker`: the worker as its own process, with the built-in kinds. Everything but the
//! choice of kinds lives in [`claw_worker::cli`], which a team's own worker binary reuses.

fn main() -> anyhow::Result<()> {
    claw_worker::cli::main_with(claw_worker::kinds::builtin, claw_worker::child::registry)
}
