//! The `llm` kind against an OpenAI-compatible server the test starts: axum on `127.0.0.1:0`
//! speaking `POST /v1/chat/completions` with `stream: true` as server-sent events, as OpenAI,
//! vLLM, Ollama and llama.cpp do. What the fake server does depends on the prompt: stream
//! tokens, answer 429 with `Retry-After: 1` once, refuse with 400, or stream slowly forever.
//! A real worker (in-process, real nats-server) runs the tasks; the effects are read from the
//! record, the `PROGRESS` stream and the requests the server saw.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use claw_proto::api::{Control, Verb};
use claw_proto::event::EventBody;
use claw_proto::topology::{self, Topology};
use claw_proto::{Cause, Status, TaskId, TaskRecord};
use claw_tests::{
    Nats, WAIT, events_of, record, start_worker, statuses, submit_direct as submit, test_settings,
    wait_for, wait_status,
};
use serde_json::{Value, json};
use time::OffsetDateTime;

/// What the fake model says, one SSE chunk per token.
const TOKENS: [&str; 12] = [
    "The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ",", " again",
    ".",
];

/// Between two streamed tokens: long enough that a stream spans several of the worker's
/// 100 ms output flushes, so ordering across events is tested, not just within one.
const TOKEN_GAP: Duration = Duration::from_millis(40);

/// One request as the fake server saw it.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    prompt: String,
    body: Value,
    auth: Option<String>,
}

#[derive(Default)]
struct Fake {
    seen: Mutex<Vec<Seen>>,
    /// Set when a client went away in the middle of a `slow` stream.
    hung_up: AtomicBool,
}

impl Fake {
    fn seen(&self, prompt: &str) -> Vec<Seen> {
        self.seen.lock().unwrap().iter().filter(|s| s.prompt == prompt).cloned().collect()
    }
}

/// Starts the fake server; returns its base URL.
async fn start_fake(fake: Arc<Fake>) -> String {
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(completions))
        .with_state(fake);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

async fn completions(
    State(fake): State<Arc<Fake>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let prompt = body["messages"][0]["content"].as_str().unwrap_or_default().to_owned();
    let auth = headers.get(header::AUTHORIZATION).map(|v| v.to_str().unwrap().to_owned());
    let earlier = {
        let mut seen = fake.seen.lock().unwrap();
        let earlier = seen.iter().filter(|s| s.prompt == prompt).count();
        seen.push(Seen { at: Instant::now(), prompt: prompt.clone(), body, auth });
        earlier
    };
    match prompt.as_str() {
        "rate-limit-once" if earlier == 0 => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "1")],
            Json(json!({"error": {"message": "slow down", "type": "rate_limit"}})),
        )
            .into_response(),
        "bad" => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"message": "model fake has no such option", "type": "invalid_request_error"}})),
        )
            .into_response(),
        "slow" => sse(fake, 10_000, Duration::from_millis(50)),
        _ => sse(fake, TOKENS.len(), TOKEN_GAP),
    }
}

/// An SSE response of `n` tokens `gap` apart (cycling through [`TOKENS`]), then the finish,
/// the usage chunk and `[DONE]`, as OpenAI sends them with `include_usage`.
fn sse(fake: Arc<Fake>, n: usize, gap: Duration) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(4);
    tokio::spawn(async move {
        let chunk = |v: Value| format!("data: {v}\n\n");
        let mut events = vec![chunk(json!({
            "object": "chat.completion.chunk", "model": "fake-1",
            "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": null}],
        }))];
        events.extend((0..n).map(|i| {
            chunk(json!({
                "object": "chat.completion.chunk", "model": "fake-1",
                "choices": [{"index": 0, "delta": {"content": TOKENS[i % TOKENS.len()]}, "finish_reason": null}],
            }))
        }));
        events.push(chunk(json!({
            "object": "chat.completion.chunk", "model": "fake-1",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        })));
        events.push(chunk(json!({
            "object": "chat.completion.chunk", "model": "fake-1", "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": n + 5},
        })));
        events.push("data: [DONE]\n\n".to_owned());
        for event in events {
            if tx.send(event).await.is_err() {
                // The body was dropped: the client hung up.
                fake.hung_up.store(true, Ordering::SeqCst);
                return;
            }
            tokio::time::sleep(gap).await;
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, std::io::Error>(e), rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// A worker whose `[llm]` points at the fake server. Its "key" is `$PATH`, a variable that is
/// surely set, so the test sees the worker read the variable it was told to.
fn worker_toml(base_url: &str) -> String {
    format!(
        "name = \"w-llm\"\nack_deadline_s = 2.0\n[retry]\ninitial_ms = 200\njitter = 0.0\n\
         [llm]\nbase_url = {base_url:?}\nmodel = \"fake\"\napi_key_env = \"PATH\"\nmax_tokens_cap = 100\n"
    )
}

async fn submit_llm(topology: &Topology, input: Value) -> TaskId {
    submit(topology, json!({"kind": "llm", "input": input, "max_attempts": 3})).await
}

/// The concatenated `output` events of `id`, once its terminal status event is in the stream.
async fn output_when(js: &jetstream::Context, id: &TaskId, terminal: Status) -> (String, usize) {
    let events = wait_for("terminal event", WAIT, || async {
        let e = events_of(js, id).await;
        statuses(&e).iter().any(|(s, _)| *s == terminal).then_some(e)
    })
    .await;
    let outputs: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Output { text } => Some(text.clone()),
            _ => None,
        })
        .collect();
    (outputs.concat(), outputs.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_tokens_stream_as_output_events_in_order_and_the_result_is_whole() {
    let fake = Arc::new(Fake::default());
    let url = start_fake(fake.clone()).await;
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let _worker = start_worker(&topology, &worker_toml(&url));

    let id = submit_llm(&topology, json!({"prompt": "hello", "max_tokens": 1000})).await;
    let r = wait_status(&topology, &id, Status::Succeeded).await;
    let full = TOKENS.concat();
    assert_eq!(
        r.result,
        Some(json!({
            "text": full,
            "model": "fake-1",
            "usage": {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17},
            "finish_reason": "stop",
        }))
    );
    let (output, n_events) = output_when(&topology.js, &id, Status::Succeeded).await;
    assert_eq!(output, full, "output events, concatenated in stream order");
    assert!(n_events >= 2, "tokens stream while the call runs, not in one event at the end");

    // What went over the wire: the OpenAI streaming request, the task's max_tokens capped by
    // the worker's max_tokens_cap, the key from the named variable.
    let seen = fake.seen("hello");
    assert_eq!(seen.len(), 1);
    let body = &seen[0].body;
    assert_eq!(body["model"], "fake");
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"], json!({"include_usage": true}));
    assert_eq!(body["max_tokens"], 100);
    assert_eq!(body["messages"], json!([{"role": "user", "content": "hello"}]));
    assert_eq!(seen[0].auth, Some(format!("Bearer {}", std::env::var("PATH").unwrap())));

    // A server that streams past the task's max_tokens is cut off by the worker.
    let id = submit_llm(
        &topology,
        json!({"messages": [{"role": "user", "content": "capped"}], "max_tokens": 3, "model": "other"}),
    )
    .await;
    let r = wait_status(&topology, &id, Status::Succeeded).await;
    let result = r.result.unwrap();
    assert_eq!(result["text"], TOKENS[..3].concat());
    assert_eq!(result["finish_reason"], "length");
    assert_eq!(fake.seen("capped")[0].body["model"], "other");

    // A long-class llm task runs in the worker too (a `__run-task` child has no endpoint).
    let id =
        submit(&topology, json!({"kind": "llm", "class": "long", "input": {"prompt": "long one"}}))
            .await;
    let r = wait_status(&topology, &id, Status::Succeeded).await;
    assert_eq!(r.result.unwrap()["text"], full);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_waits_out_retry_after_of_a_429_then_succeeds() {
    let fake = Arc::new(Fake::default());
    let url = start_fake(fake.clone()).await;
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let _worker = start_worker(&topology, &worker_toml(&url));

    let id = submit_llm(&topology, json!({"prompt": "rate-limit-once"})).await;
    let r = wait_status(&topology, &id, Status::Succeeded).await;
    assert_eq!(r.result.as_ref().unwrap()["text"], TOKENS.concat());
    let seen = fake.seen("rate-limit-once");
    assert_eq!(seen.len(), 2, "one 429, one 200");
    let gap = seen[1].at - seen[0].at;
    assert!(gap >= Duration::from_secs(1), "the second call came {gap:?} after the 429");
    assert!(gap < Duration::from_secs(3), "and not much later: {gap:?}");
    // Waited out inside the attempt: the worker's shorter backoff (200 ms) never applied.
    assert_eq!(r.attempt, 1);
    let events = events_of(&topology.js, &id).await;
    assert!(!statuses(&events).iter().any(|(s, _)| *s == Status::Retrying), "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_a_400_fails_the_task_without_retry() {
    let fake = Arc::new(Fake::default());
    let url = start_fake(fake.clone()).await;
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let _worker = start_worker(&topology, &worker_toml(&url));

    let id = submit_llm(&topology, json!({"prompt": "bad"})).await;
    let r = wait_status(&topology, &id, Status::Failed).await;
    let error = r.error.expect("error");
    assert_eq!((error.code.as_str(), error.retryable), ("llm_rejected", false));
    assert!(error.message.contains("model fake has no such option"), "{}", error.message);
    assert_eq!((r.attempt, fake.seen("bad").len()), (1, 1), "no retry");

    // Bad input never reaches the server.
    let id = submit_llm(&topology, json!({"prompt": "x", "temperature": 7})).await;
    let r = wait_status(&topology, &id, Status::Failed).await;
    assert_eq!(r.error.unwrap().code, "invalid_input");
    assert!(fake.seen("x").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_cancel_mid_stream_hangs_up_on_the_server() {
    let fake = Arc::new(Fake::default());
    let url = start_fake(fake.clone()).await;
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let _worker = start_worker(&topology, &worker_toml(&url));

    let id = submit_llm(&topology, json!({"prompt": "slow"})).await;
    // Mid-stream: some tokens are out.
    wait_for("first output event", WAIT, || async {
        let events = events_of(&topology.js, &id).await;
        events.iter().any(|e| matches!(e.body, EventBody::Output { .. })).then_some(())
    })
    .await;
    cancel(&topology, &nats.client().await, &id).await;

    let r = wait_status(&topology, &id, Status::Cancelled).await;
    assert_eq!(r.cause, Some(Cause::User));
    wait_for("the worker to hang up on the stream", Duration::from_secs(5), || async {
        fake.hung_up.load(Ordering::SeqCst).then_some(())
    })
    .await;
    assert_eq!(fake.seen("slow").len(), 1);
    let r = record(&topology, id.as_str()).await.unwrap();
    assert_eq!(r.status, Status::Cancelled, "the cancelled record stays cancelled");
}

/// Cancels `id` as the gateway does: CAS the record to `cancelled`, then wake the worker that
/// holds it on its control subject.
async fn cancel(topology: &Topology, client: &async_nats::Client, id: &TaskId) {
    loop {
        let entry = topology.tasks_kv.entry(id.as_str()).await.unwrap().expect("record");
        let mut r: TaskRecord = serde_json::from_slice(&entry.value).unwrap();
        r.cancel(Cause::User, OffsetDateTime::now_utc()).unwrap();
        let bytes = serde_json::to_vec(&r).unwrap();
        if topology.tasks_kv.update(id.as_str(), bytes.into(), entry.revision).await.is_ok() {
            break;
        }
    }
    let wake = serde_json::to_vec(&Control { id: id.clone(), verb: Verb::Cancel.into() }).unwrap();
    client.publish(topology::control_subject(id), wake.into()).await.unwrap();
    client.flush().await.unwrap();
}
