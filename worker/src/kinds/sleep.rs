//! `sleep`: sleeps `seconds` in `steps` equal parts with a progress report after each, fails on
//! purpose for the first `fail_attempts` attempts, and returns `{"slept_s", "echo"}`. A pause
//! takes effect between steps (its checkpoints), so a paused sleep finishes its current step.
//!
//! `seconds = 0` is the throughput benchmark: it returns at once without touching a timer.

use std::time::Duration;

use claw_proto::kinds::SleepInput;
use claw_proto::{TaskError, TaskRecord};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::{Value, json};

use crate::handler::{Context, Handler};

#[derive(Clone, Copy, Debug)]
pub struct Sleep;

impl Handler for Sleep {
    fn kind(&self) -> &str {
        "sleep"
    }

    fn run<'a>(
        &'a self,
        task: &'a TaskRecord,
        ctx: &'a Context,
    ) -> BoxFuture<'a, Result<Value, TaskError>> {
        async move {
            let input: SleepInput = super::input(task)?;
            if task.attempt <= input.fail_attempts {
                let message = format!("planned failure of attempt {}", task.attempt);
                return Err(TaskError::new("planned_failure", message, input.retryable));
            }
            let steps = input.steps.max(1);
            if input.seconds > 0.0 {
                let step = Duration::from_secs_f64(input.seconds / f64::from(steps));
                for i in 1..=steps {
                    ctx.checkpoint().await;
                    tokio::select! {
                        () = tokio::time::sleep(step) => {}
                        () = ctx.cancelled() => {
                            return Err(TaskError::new("stopped", "sleep was stopped", true));
                        }
                    }
                    if input.steps > 0 {
                        let message = format!("step {i}/{steps}");
                        ctx.progress(f64::from(i) / f64::from(steps), Some(message));
                    }
                }
            }
            Ok(json!({"slept_s": input.seconds, "echo": input.echo}))
        }
        .boxed()
    }
}
