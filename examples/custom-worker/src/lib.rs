//! The kinds of this example worker: one, `wordcount`, written the way a team writes its own.
//!
//! A kind is a type that implements [`claw_worker::Handler`]: its name, its default class, and
//! `run`, which parses the task's input, does the work while reporting progress through the
//! [`Context`], stops when the context is cancelled, and returns the result as JSON or a
//! [`TaskError`] that says whether a retry could help. The binary (`main.rs`) registers it
//! beside the built-in kinds; tests can do the same in-process with [`registry`].

use std::collections::BTreeMap;
use std::time::Duration;

use claw_proto::{Class, TaskError, TaskRecord};
use claw_worker::{Config, Context, Handler, Registry};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Value, json};

/// The built-in kinds of `config` plus this crate's own: what the worker runs.
pub fn registry(config: &Config) -> Registry {
    claw_worker::kinds::builtin(config).with(WordCount)
}

/// What a `__run-task` child runs: the in-process kinds, which need no configuration. (A child
/// gets neither the worker's flags nor its environment; `exec` starts its own process and never
/// runs in one.)
pub fn child_registry() -> Registry {
    Registry::empty().with(claw_worker::kinds::sleep::Sleep).with(WordCount)
}

/// `wordcount`: counts lines, words and characters of `text` a few lines at a time, reporting
/// progress after each batch, and returns the counts and the most frequent words.
#[derive(Clone, Copy, Debug)]
pub struct WordCount;

/// `wordcount`'s input. Unknown fields are refused: the gateway passes a custom kind's input
/// through unchecked, so this is where a typo is caught.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WordCountInput {
    pub text: String,
    /// Lines per batch (and per progress report).
    #[serde(default = "one")]
    pub batch_lines: usize,
    /// A pause after each batch, to make progress visible in a demo.
    #[serde(default)]
    pub delay_ms: u64,
    /// How many of the most frequent words to return.
    #[serde(default = "five")]
    pub top: usize,
}

fn one() -> usize {
    1
}

fn five() -> usize {
    5
}

impl Handler for WordCount {
    fn kind(&self) -> &str {
        "wordcount"
    }

    /// In-process: the work is small and cannot crash the worker. A kind that runs untrusted
    /// code or big allocations says `Class::Long` to get a child process with limits.
    fn default_class(&self) -> Class {
        Class::Short
    }

    fn run<'a>(
        &'a self,
        task: &'a TaskRecord,
        ctx: &'a Context,
    ) -> BoxFuture<'a, Result<Value, TaskError>> {
        async move {
            // Bad input never gets better by retrying: `invalid_input`, not retryable.
            let input: WordCountInput = claw_worker::kinds::input(task)?;
            let lines: Vec<&str> = input.text.lines().collect();
            let batches = lines.chunks(input.batch_lines.max(1)).count();
            let mut words: BTreeMap<String, u64> = BTreeMap::new();
            let mut n_words = 0u64;
            for (i, batch) in lines.chunks(input.batch_lines.max(1)).enumerate() {
                // A paused task waits here until resumed (or cancelled).
                ctx.checkpoint().await;
                for word in batch.iter().flat_map(|line| line.split_whitespace()) {
                    n_words += 1;
                    let word = word.trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase();
                    if !word.is_empty() {
                        *words.entry(word).or_default() += 1;
                    }
                }
                let done = i + 1;
                ctx.progress(done as f64 / batches as f64, Some(format!("batch {done}/{batches}")));
                if input.delay_ms > 0 {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(input.delay_ms)) => {}
                        // Return promptly once cancelled; what is returned is ignored.
                        () = ctx.cancelled() => {
                            return Err(TaskError::new("stopped", "wordcount was stopped", true));
                        }
                    }
                }
            }
            let mut top: Vec<(String, u64)> = words.into_iter().collect();
            // Most frequent first; ties alphabetically, so the result is deterministic.
            top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            top.truncate(input.top);
            let top: Vec<Value> = top.iter().map(|(w, n)| json!({"word": w, "count": n})).collect();
            Ok(json!({
                "lines": lines.len(),
                "words": n_words,
                "chars": input.text.chars().count(),
                "top": top,
            }))
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_is_checked() {
        let parse = |v: Value| serde_json::from_value::<WordCountInput>(v);
        assert_eq!(parse(json!({"text": "a"})).unwrap().batch_lines, 1);
        assert!(parse(json!({"txt": "a"})).is_err());
    }
}
