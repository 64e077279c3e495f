//! `llm`: one OpenAI-compatible `/v1/chat/completions` call with `stream: true`, the dialect
//! OpenAI, vLLM, Ollama and the llama.cpp server all speak. The server-sent events are parsed as
//! they arrive; each `choices[0].delta.content` goes to [`Context::output`], which the worker
//! coalesces into `output` events, so a UI sees tokens live without one NATS message per token.
//!
//! Errors are mapped by what a retry could change: 429 and 5xx, refused or dropped connections
//! and timeouts are retryable; any other 4xx is the request's fault and is not. A `Retry-After`
//! the server sends is honoured inside the attempt: the handler sleeps that long (bounded by
//! [`MAX_RETRY_AFTER`] and the attempt's remaining time) and calls again, so the second call never
//! comes sooner than the server asked. Without one, or when it is too long to wait here, the
//! attempt fails retryably and the worker's backoff decides when the next attempt runs.

use std::path::PathBuf;
use std::time::Duration;

use claw_proto::{TaskError, TaskRecord};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use crate::handler::{Context, Handler};

/// `[llm]` in the worker's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    /// e.g. `https://api.openai.com`, `http://127.0.0.1:11434` (Ollama), a vLLM or llama.cpp server.
    pub base_url: String,
    /// The environment variable holding the API key (never the key itself in the file). The
    /// worker reads it at start and then removes it from its environment, so no child process
    /// can read it there. Not with `api_key_file`.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// A file holding the API key (its text without a trailing newline), read at start: the key
    /// then never enters an environment. Not with `api_key_env`. A file that cannot be read
    /// stops the worker at start.
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// The model a task gets when it does not name one.
    pub model: String,
    /// The most completion tokens one task may ask for; a task's `max_tokens` is capped by it.
    #[serde(default = "default_max_tokens_cap")]
    pub max_tokens_cap: u32,
    /// The key once read from `api_key_file` or `api_key_env` ([`crate::Config::read_secrets`],
    /// at start, before the variable is removed); never from the TOML itself.
    #[serde(skip)]
    pub api_key: Option<ApiKey>,
}

/// An API key. Its `Debug` does not show it, so a logged configuration carries no secret.
#[derive(Clone)]
pub struct ApiKey(pub String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(..)")
    }
}

impl LlmConfig {
    /// The API key: the one already read, else `api_key_file`'s text, else `api_key_env`'s
    /// value; `None` when neither is configured. Err says why a configured key is missing.
    pub fn key(&self) -> Result<Option<ApiKey>, String> {
        if let Some(key) = &self.api_key {
            return Ok(Some(key.clone()));
        }
        match (&self.api_key_file, &self.api_key_env) {
            (Some(path), _) => match claw_proto::secrets::read_file(path) {
                Ok(key) => Ok(Some(ApiKey(key))),
                Err(e) => Err(format!("llm.api_key_file: {e}")),
            },
            (None, Some(var)) => match std::env::var(var) {
                Ok(key) if !key.is_empty() => Ok(Some(ApiKey(key))),
                _ => Err(format!("the environment variable {var} (llm.api_key_env) is not set")),
            },
            (None, None) => Ok(None),
        }
    }
}

fn default_max_tokens_cap() -> u32 {
    4096
}

/// The longest `Retry-After` waited out inside an attempt. Longer ones fail the attempt
/// retryably instead: a slot held asleep for minutes is a slot another task could use.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How many times one attempt calls again after a `Retry-After`. After that the attempt fails
/// retryably and the task's `max_attempts` takes over, so a server that always answers 429
/// still ends the task.
pub const MAX_CALLS_PER_ATTEMPT: u32 = 4;

/// Seconds to open a connection. A server that cannot be reached in this long is down for now.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest silence between two reads of the response. Generous because a loaded server
/// may take a while for its first token on a long prompt; the attempt's own timeout still
/// bounds the whole call.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// The most of an error response's body read for its message.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// What is left of an attempt's time is never waited to the last second: the retried call
/// needs some time of its own.
const RETRY_MARGIN: Duration = Duration::from_secs(5);

/// The `llm` handler. Built once per worker from `[llm]`.
#[derive(Clone, Debug)]
pub struct Llm {
    endpoint: String,
    model: String,
    max_tokens_cap: u32,
    /// Why every task must fail, when the configuration cannot work (the key's variable is not
    /// set): a clear non-retryable error beats the "unknown kind" a missing handler would give.
    broken: Option<String>,
    api_key: Option<ApiKey>,
    /// `None` only when `broken` says why.
    client: Option<reqwest::Client>,
}

impl Llm {
    /// Takes the API key read at start, or reads it now ([`LlmConfig::key`]), once: a key
    /// rotated later needs a restart.
    pub fn new(config: &LlmConfig) -> Llm {
        let mut broken = None;
        let api_key = config.key().unwrap_or_else(|why| {
            tracing::warn!("llm tasks will fail: {why}");
            broken = Some(why);
            None
        });
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .build()
            .map_err(|e| {
                let why = format!("cannot build the HTTP client: {e}");
                tracing::warn!("llm tasks will fail: {why}");
                broken.get_or_insert(why);
            })
            .ok();
        if broken.is_none() {
            tracing::info!(base_url = %config.base_url, model = %config.model, "llm kind enabled");
        }
        Llm {
            endpoint: format!("{}/v1/chat/completions", config.base_url.trim_end_matches('/')),
            model: config.model.clone(),
            max_tokens_cap: config.max_tokens_cap,
            broken,
            api_key,
            client,
        }
    }

    async fn complete(&self, task: &TaskRecord, ctx: &Context) -> Result<Value, TaskError> {
        let (Some(client), None) = (&self.client, &self.broken) else {
            let why = self.broken.clone().unwrap_or_default();
            return Err(TaskError::new("llm_not_configured", why, false));
        };
        let input = LlmInput::parse(&task.input)?;
        let max_tokens = input.max_tokens.unwrap_or(self.max_tokens_cap).min(self.max_tokens_cap);
        let model = input.model.clone().unwrap_or_else(|| self.model.clone());
        let body = request_body(&input, &model, max_tokens);
        let attempt_ends = attempt_end(task);
        let mut calls = 0;
        loop {
            calls += 1;
            ctx.checkpoint().await;
            let response = tokio::select! {
                sent = self.send(client, &body) => sent?,
                () = ctx.cancelled() => return Err(stopped()),
            };
            let status = response.status();
            if status.is_success() {
                return tokio::select! {
                    done = read_stream(response, ctx, max_tokens) => done.map(|c| c.result(&model)),
                    () = ctx.cancelled() => Err(stopped()),
                };
            }
            let retry_after = retry_after(response.headers(), OffsetDateTime::now_utc());
            let error = error_of_status(response).await;
            let Some(wait) = retry_after else { return Err(error) };
            let left = attempt_ends
                .map(|end| Duration::try_from(end - OffsetDateTime::now_utc()).unwrap_or_default())
                .unwrap_or(MAX_RETRY_AFTER + RETRY_MARGIN);
            if !error.retryable
                || calls >= MAX_CALLS_PER_ATTEMPT
                || wait > MAX_RETRY_AFTER
                || wait + RETRY_MARGIN > left
            {
                return Err(error);
            }
            tracing::info!(?wait, code = %error.code, "llm server asked to retry later; waiting");
            ctx.progress(
                0.0,
                Some(format!("{}; retrying in {:.1} s", error.message, wait.as_secs_f64())),
            );
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = ctx.cancelled() => return Err(stopped()),
            }
        }
    }

    async fn send(
        &self,
        client: &reqwest::Client,
        body: &Value,
    ) -> Result<reqwest::Response, TaskError> {
        let mut request = client.post(&self.endpoint).json(body);
        if let Some(ApiKey(key)) = &self.api_key {
            request = request.bearer_auth(key);
        }
        request.send().await.map_err(|e| unavailable(&e))
    }
}

impl Handler for Llm {
    fn kind(&self) -> &str {
        "llm"
    }

    /// A `__run-task` child has neither the endpoint nor the key, and an LLM call only waits on
    /// a socket: long-class `llm` tasks run in-process too.
    fn runs_in_child(&self) -> bool {
        false
    }

    fn run<'a>(
        &'a self,
        task: &'a TaskRecord,
        ctx: &'a Context,
    ) -> BoxFuture<'a, Result<Value, TaskError>> {
        self.complete(task, ctx).boxed()
    }
}

/// A task's `input`: `messages` (the chat so far) or `prompt` (one user message), and optional
/// overrides of the configured model, the token limit and the temperature.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmInput {
    #[serde(default)]
    pub messages: Vec<Message>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f64>,
}

/// One chat message. `content` is usually a string; an array of parts (images) is passed on
/// as it is, for the servers that take one.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: String,
    pub content: Value,
}

impl LlmInput {
    /// Parses and checks `input`; every refusal is a non-retryable `invalid_input`.
    pub fn parse(input: &Value) -> Result<LlmInput, TaskError> {
        let invalid = |m: String| TaskError::new("invalid_input", m, false);
        let mut parsed: LlmInput =
            serde_json::from_value(input.clone()).map_err(|e| invalid(e.to_string()))?;
        match (parsed.prompt.take(), parsed.messages.is_empty()) {
            (Some(_), false) => return Err(invalid("give either `prompt` or `messages`".into())),
            (None, true) => return Err(invalid("`messages` (or `prompt`) is required".into())),
            (Some(prompt), true) => {
                parsed.messages = vec![Message { role: "user".into(), content: prompt.into() }];
            }
            (None, false) => {}
        }
        if let Some(m) = parsed.messages.iter().find(|m| m.role.trim().is_empty()) {
            return Err(invalid(format!("a message has an empty role: {m:?}")));
        }
        if parsed.max_tokens == Some(0) {
            return Err(invalid("`max_tokens` must be at least 1".into()));
        }
        if let Some(t) = parsed.temperature.filter(|t| !(0.0..=2.0).contains(t)) {
            return Err(invalid(format!("`temperature` must be in 0..=2, not {t}")));
        }
        Ok(parsed)
    }
}

fn request_body(input: &LlmInput, model: &str, max_tokens: u32) -> Value {
    let messages: Vec<Value> =
        input.messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect();
    let mut body = json!({
        "model": model,
        "messages": messages,
        "stream": true,
        // Without it the stream carries no token counts; servers that do not know the option
        // ignore it and the result's `usage` is null.
        "stream_options": {"include_usage": true},
        "max_tokens": max_tokens,
    });
    if let Some(t) = input.temperature {
        body["temperature"] = json!(t);
    }
    body
}

/// When this attempt will be stopped: its timeout after its start, or the task's deadline.
fn attempt_end(task: &TaskRecord) -> Option<OffsetDateTime> {
    let timeout = time::Duration::seconds(i64::try_from(task.timeout_s).ok()?);
    let end = task.started_at.map(|s| s + timeout);
    Some(end.map_or(task.deadline, |end| end.min(task.deadline)))
}

/// What a stream delivered.
#[derive(Debug, Default, PartialEq)]
struct Completion {
    text: String,
    model: Option<String>,
    usage: Option<Value>,
    finish_reason: Option<String>,
    done: bool,
    /// Content deltas seen; each is about one token on every server we know.
    deltas: u32,
}

impl Completion {
    fn result(self, requested: &str) -> Value {
        json!({
            "text": self.text,
            "model": self.model.unwrap_or_else(|| requested.to_owned()),
            "usage": self.usage,
            "finish_reason": self.finish_reason,
        })
    }

    /// Takes one `data:` payload. Returns `Ok(true)` when the stream is over for us: `[DONE]`,
    /// or more deltas than `max_tokens` (a server that ignores the limit is cut off here).
    fn take(&mut self, data: &str, ctx: &Context, max_tokens: u32) -> Result<bool, TaskError> {
        let data = data.trim();
        if data == "[DONE]" {
            self.done = true;
            return Ok(true);
        }
        if data.is_empty() {
            return Ok(false);
        }
        let chunk: Value = serde_json::from_str(data).map_err(|e| {
            TaskError::new(
                "llm_bad_response",
                format!("not a JSON chunk ({e}): {data:.200}"),
                false,
            )
        })?;
        if let Some(error) = chunk.get("error") {
            // vLLM and llama.cpp report failures after the 200 as an `error` chunk: the server
            // broke, not the request.
            return Err(TaskError::new("llm_unavailable", message_of(error), true));
        }
        if let Some(model) = chunk.get("model").and_then(Value::as_str) {
            self.model.get_or_insert_with(|| model.to_owned());
        }
        if let Some(usage) = chunk.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(usage.clone());
        }
        let choice = chunk.get("choices").and_then(|c| c.get(0));
        let text = choice.and_then(|c| c.pointer("/delta/content")).and_then(Value::as_str);
        if let Some(text) = text.filter(|t| !t.is_empty()) {
            if self.deltas >= max_tokens {
                self.finish_reason = Some("length".into());
                return Ok(true);
            }
            self.deltas += 1;
            self.text.push_str(text);
            ctx.output(text);
        }
        if let Some(reason) = choice.and_then(|c| c.get("finish_reason")).and_then(Value::as_str) {
            self.finish_reason = Some(reason.to_owned());
        }
        Ok(false)
    }
}

/// Reads the event stream of a 200 to its end.
async fn read_stream(
    mut response: reqwest::Response,
    ctx: &Context,
    max_tokens: u32,
) -> Result<Completion, TaskError> {
    let mut completion = Completion::default();
    let mut events = SseParser::default();
    loop {
        let Some(bytes) = response.chunk().await.map_err(|e| unavailable(&e))? else { break };
        for data in events.push(&bytes) {
            if completion.take(&data, ctx, max_tokens)? {
                // Dropping the response closes the connection, which tells the server to stop.
                return Ok(completion);
            }
        }
    }
    for data in events.finish() {
        if completion.take(&data, ctx, max_tokens)? {
            return Ok(completion);
        }
    }
    // Ollama and older llama.cpp servers may end without `[DONE]`; a finish reason says the
    // answer is whole all the same. Neither means the connection dropped mid-answer.
    if completion.finish_reason.is_none() {
        let message = "the event stream ended before the answer was complete";
        return Err(TaskError::new("llm_unavailable", message, true));
    }
    Ok(completion)
}

/// Server-sent events, fed with bytes as they arrive: yields each event's `data`, its `data:`
/// lines joined by newlines, once the blank line that ends the event has been read.
#[derive(Debug, Default)]
struct SseParser {
    /// Bytes after the last newline: a line cut in two by the network (or a UTF-8 character).
    partial: Vec<u8>,
    data: Option<String>,
}

impl SseParser {
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.partial.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            self.line(line.trim_end_matches(['\n', '\r']), &mut out);
        }
        out
    }

    fn finish(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            self.line(String::from_utf8_lossy(&rest).trim_end_matches('\r'), &mut out);
        }
        out.extend(self.data.take());
        out
    }

    fn line(&mut self, line: &str, out: &mut Vec<String>) {
        if line.is_empty() {
            out.extend(self.data.take());
        } else if let Some(value) = line.strip_prefix("data:") {
            let value = value.strip_prefix(' ').unwrap_or(value);
            match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            }
        }
        // Comments (`: keep-alive`), `event:`, `id:` and `retry:` lines carry nothing we use.
    }
}

/// `Retry-After` as a wait from `now`: delay-seconds or an HTTP date (RFC 9110 §10.2.3).
fn retry_after(headers: &reqwest::header::HeaderMap, now: OffsetDateTime) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let at = time::PrimitiveDateTime::parse(value, &format).ok()?.assume_utc();
    Some(Duration::try_from(at - now).unwrap_or_default())
}

/// The error of a non-2xx answer, with the server's own message when it gives one.
async fn error_of_status(mut response: reqwest::Response) -> TaskError {
    let status = response.status();
    // Error bodies are small JSON; a server that sends megabytes gets read only this far.
    let mut bytes = Vec::new();
    while bytes.len() < MAX_ERROR_BODY {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let body = String::from_utf8_lossy(&bytes);
    let detail = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v.get("error").map(message_of))
        .unwrap_or_else(|| body.chars().take(500).collect());
    let message = format!("the LLM server answered {status}: {detail}");
    if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        TaskError::new("llm_rate_limited", message, true)
    } else if status.is_server_error() {
        TaskError::new("llm_unavailable", message, true)
    } else {
        TaskError::new("llm_rejected", message, false)
    }
}

/// `{"message": ...}` (OpenAI, vLLM, llama.cpp) or a bare string (Ollama).
fn message_of(error: &Value) -> String {
    match error {
        Value::String(s) => s.clone(),
        Value::Object(o) => o
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| Value::Object(Map::clone(o)).to_string(), str::to_owned),
        other => other.to_string(),
    }
}

fn unavailable(e: &reqwest::Error) -> TaskError {
    // reqwest's Display omits the cause ("error sending request"); the source says why.
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    TaskError::new("llm_unavailable", message, true)
}

fn stopped() -> TaskError {
    TaskError::new("stopped", "the llm call was stopped", true)
}

#[cfg(test)]
mod tests {
    use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
    use tokio_util::sync::CancellationToken;

    use super::*;

    #[test]
    fn prompt_is_one_user_message_and_bad_input_is_refused() {
        let i = LlmInput::parse(&json!({"prompt": "hi", "max_tokens": 5})).unwrap();
        assert_eq!(i.messages, [Message { role: "user".into(), content: json!("hi") }]);
        let body = request_body(&i, "m", 5);
        assert_eq!(body["stream"], true);
        assert_eq!(body["messages"], json!([{"role": "user", "content": "hi"}]));
        assert!(body.get("temperature").is_none());

        for bad in [
            json!({}),
            json!({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}),
            json!({"prompt": 3}),
            json!({"prompt": "a", "temperature": 9}),
            json!({"prompt": "a", "max_tokens": 0}),
            json!({"prompt": "a", "extra": 1}),
            json!({"messages": [{"role": "", "content": "b"}]}),
        ] {
            let e = LlmInput::parse(&bad).unwrap_err();
            assert_eq!((e.code.as_str(), e.retryable), ("invalid_input", false), "{bad}");
        }
    }

    #[test]
    fn sse_lines_cut_anywhere_come_out_whole() {
        let stream = "data: {\"a\":1}\r\n\r\n: keep-alive\n\ndata: é\n\nevent: x\ndata: [DONE]\n\n";
        let bytes = stream.as_bytes();
        for cut in 0..bytes.len() {
            let mut p = SseParser::default();
            let mut out = p.push(&bytes[..cut]);
            out.extend(p.push(&bytes[cut..]));
            out.extend(p.finish());
            assert_eq!(out, ["{\"a\":1}", "é", "[DONE]"], "cut at {cut}");
        }
        let mut p = SseParser::default();
        assert!(p.push(b"data: a\ndata: b\n").is_empty());
        assert_eq!(p.finish(), ["a\nb"]);
    }

    #[test]
    fn chunks_become_text_usage_and_a_capped_length() {
        let ctx = Context::new(CancellationToken::new());
        let mut c = Completion::default();
        let chunk = |t: &str| json!({"model": "m1", "choices": [{"delta": {"content": t}}]});
        assert!(!c.take(&chunk("Hel").to_string(), &ctx, 3).unwrap());
        assert!(!c.take(&chunk("lo").to_string(), &ctx, 3).unwrap());
        let end = json!({"choices": [{"delta": {}, "finish_reason": "stop"}]});
        assert!(!c.take(&end.to_string(), &ctx, 3).unwrap());
        let usage = json!({"choices": [], "usage": {"total_tokens": 7}});
        assert!(!c.take(&usage.to_string(), &ctx, 3).unwrap());
        assert!(c.take("[DONE]", &ctx, 3).unwrap());
        assert_eq!(ctx.take().output, "Hello");
        assert_eq!(
            c.result("asked"),
            json!({"text": "Hello", "model": "m1", "usage": {"total_tokens": 7}, "finish_reason": "stop"})
        );

        let mut c = Completion::default();
        assert!(!c.take(&chunk("a").to_string(), &ctx, 1).unwrap());
        assert!(c.take(&chunk("b").to_string(), &ctx, 1).unwrap());
        assert_eq!((c.text.as_str(), c.finish_reason.as_deref()), ("a", Some("length")));

        let e = c.take(r#"{"error": {"message": "oom"}}"#, &ctx, 9).unwrap_err();
        assert_eq!(
            (e.code.as_str(), e.message.as_str(), e.retryable),
            ("llm_unavailable", "oom", true)
        );
        assert!(!c.take("{nope", &ctx, 9).unwrap_err().retryable);
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = time::macros::datetime!(2015-10-21 07:28:00 UTC);
        let of = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
            retry_after(&h, now)
        };
        assert_eq!(of("3"), Some(Duration::from_secs(3)));
        assert_eq!(of("Wed, 21 Oct 2015 07:28:10 GMT"), Some(Duration::from_secs(10)));
        assert_eq!(of("Wed, 21 Oct 2015 07:27:00 GMT"), Some(Duration::ZERO));
        assert_eq!(of("soon"), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn a_missing_key_fails_tasks_for_good() {
        let config = LlmConfig {
            base_url: "http://127.0.0.1:9".into(),
            api_key_env: Some("CLAW_TEST_SURELY_UNSET_KEY".into()),
            api_key_file: None,
            model: "m".into(),
            max_tokens_cap: 10,
            api_key: None,
        };
        let llm = Llm::new(&config);
        let e = llm.broken.clone().unwrap();
        assert!(e.contains("CLAW_TEST_SURELY_UNSET_KEY"), "{e}");
    }
}
