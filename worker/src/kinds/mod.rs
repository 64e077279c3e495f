//! The built-in kinds: `sleep` (demo and benchmark) and `exec` (a configured program).
//! `llm` comes with a later issue; until then a worker refuses it as an unknown kind.

pub mod exec;
pub mod llm;
pub mod sleep;

use crate::config::Config;
use crate::handler::Registry;

/// The built-in kinds, `exec` limited to the programs of `config`.
pub fn builtin(config: &Config) -> Registry {
    Registry::empty().with(sleep::Sleep).with(exec::Exec::new(config))
}
