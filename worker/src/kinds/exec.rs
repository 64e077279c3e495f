//! `exec`: runs a program named in the worker's `[programs]` table, never a command from the
//! task. The task picks the program by name and adds arguments and stdin; the configuration
//! fixes the path, leading arguments and environment.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use claw_proto::kinds::ExecInput;
use claw_proto::{Class, TaskError, TaskRecord};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::Value;

use crate::config::{Config, Program};
use crate::handler::{Context, Handler};
use crate::process::{self, Spawn};

#[derive(Clone, Debug)]
pub struct Exec {
    programs: Arc<BTreeMap<String, Program>>,
    kill_grace: Duration,
}

impl Exec {
    pub fn new(config: &Config) -> Exec {
        Exec { programs: Arc::new(config.programs.clone()), kill_grace: config.kill_grace() }
    }

    /// What to start for `input`, or why it may not run.
    fn spawn_of(&self, input: ExecInput) -> Result<Spawn, TaskError> {
        let program = self.programs.get(&input.program).ok_or_else(|| {
            let message = format!("program {:?} is not configured on this worker", input.program);
            TaskError::new("unknown_program", message, false)
        })?;
        Ok(Spawn {
            program: program.path.clone(),
            args: program.args.iter().cloned().chain(input.args).collect(),
            env: program.env.clone(),
            stdin: input.stdin.map(String::into_bytes),
        })
    }
}

impl Handler for Exec {
    fn kind(&self) -> &str {
        "exec"
    }

    fn default_class(&self) -> Class {
        Class::Long
    }

    fn spawns_process(&self) -> bool {
        true
    }

    fn run<'a>(
        &'a self,
        task: &'a TaskRecord,
        ctx: &'a Context,
    ) -> BoxFuture<'a, Result<Value, TaskError>> {
        async move {
            let input: ExecInput = super::input(task)?;
            let spawn = self.spawn_of(input)?;
            process::run(spawn, ctx, self.kill_grace).await
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_configured_programs_run() {
        let config = Config::from_toml_str(
            "[programs.p]\npath = \"/bin/echo\"\nargs = [\"a\"]\nenv = { K = \"v\" }",
        )
        .unwrap();
        let exec = Exec::new(&config);
        let input = |p: &str| ExecInput { program: p.into(), args: vec!["b".into()], stdin: None };
        let spawn = exec.spawn_of(input("p")).unwrap();
        assert_eq!(spawn.args, ["a", "b"]);
        assert_eq!(spawn.env["K"], "v");
        let e = exec.spawn_of(input("/bin/sh")).unwrap_err();
        assert_eq!((e.code.as_str(), e.retryable), ("unknown_program", false));
    }
}
