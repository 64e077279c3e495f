//! The built-in kinds: `sleep` (demo and benchmark), `exec` (a configured program) and `llm`
//! (an OpenAI-compatible chat completion, only on workers with an `[llm]` section; elsewhere a
//! worker refuses it as an unknown kind).

pub mod exec;
pub mod llm;
pub mod sleep;

use crate::config::Config;
use crate::handler::Registry;

/// The built-in kinds, `exec` limited to the programs of `config`, `llm` when it is configured.
pub fn builtin(config: &Config) -> Registry {
    let registry = Registry::empty().with(sleep::Sleep).with(exec::Exec::new(config));
    match &config.llm {
        Some(llm) => registry.with(llm::Llm::new(llm)),
        None => registry,
    }
}

/// A kind's typed input (built-in or a custom [`crate::Handler`]'s); a malformed one fails the
/// task for good (`invalid_input`), since retrying the same input cannot help.
pub fn input<T: serde::de::DeserializeOwned>(
    task: &claw_proto::TaskRecord,
) -> Result<T, claw_proto::TaskError> {
    claw_proto::kinds::parse_input(&task.input)
        .map_err(|e| claw_proto::TaskError::new("invalid_input", e.to_string(), false))
}
