//! The gateway's WebSocket (`GET /v1/ws?session=S[&since=SEQ]`): live events in stream order,
//! resuming with `since` without gaps or duplicates (also while events pour in), one shared
//! feed per session, slow and silent clients dropped with the gateway's memory bounded, the
//! `Origin` rule, commands over the socket, and the 1012 close on shutdown.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use claw_proto::topology;
use claw_tests::{
    Gateway, Nats, WAIT, bin, start_worker, stream_contents, test_settings, wait_for, write_script,
};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// `ws://host:port/v1/ws?query` of a gateway's `http://host:port`.
fn ws_url(base: &str, query: &str) -> String {
    format!("{}/v1/ws?{query}", base.replacen("http://", "ws://", 1))
}

async fn connect(base: &str, query: &str) -> Socket {
    let (socket, _) = tokio_tungstenite::connect_async(ws_url(base, query))
        .await
        .unwrap_or_else(|e| panic!("connecting to {query}: {e}"));
    socket
}

/// The next text frame as JSON, within [`WAIT`].
async fn next_json(socket: &mut Socket) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, socket.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("socket ended")
            .expect("socket failed");
        match message {
            Message::Text(text) => return serde_json::from_str(text.as_str()).expect("JSON frame"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Reads the `hello` frame and returns its `seq`.
async fn hello(socket: &mut Socket, session: &str) -> u64 {
    let hello = next_json(socket).await;
    assert_eq!((hello["type"].as_str(), hello["session"].as_str()), (Some("hello"), Some(session)));
    hello["seq"].as_u64().unwrap_or_else(|| panic!("hello without seq: {hello}"))
}

/// Appends event frames to `events` until `done(events)` holds.
async fn collect_until(
    socket: &mut Socket,
    events: &mut Vec<Value>,
    done: impl Fn(&[Value]) -> bool,
) {
    while !done(events) {
        let frame = next_json(socket).await;
        assert!(frame["seq"].is_u64(), "an event frame without seq: {frame}");
        events.push(frame);
    }
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().map(|e| e["seq"].as_u64().unwrap()).collect()
}

fn has_status(events: &[Value], id: &str, status: &str) -> bool {
    events
        .iter()
        .any(|e| e["task_id"] == id && e["type"] == "status" && e["data"]["status"] == status)
}

fn assert_increasing(seqs: &[u64]) {
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "sequences not strictly increasing: {seqs:?}");
}

/// The session's events in `PROGRESS` with `seq > after`, as the socket sends them.
async fn stored(js: &async_nats::jetstream::Context, session: &str, after: u64) -> Vec<Value> {
    let prefix = format!("progress.{session}.");
    stream_contents(js, topology::PROGRESS_STREAM)
        .await
        .into_iter()
        .filter(|m| m.sequence > after && m.subject.starts_with(&prefix))
        .map(|m| {
            let mut v: Value = serde_json::from_slice(&m.payload).unwrap();
            v["seq"] = m.sequence.into();
            v
        })
        .collect()
}

async fn consumers_on_progress(js: &async_nats::jetstream::Context) -> usize {
    let mut stream = js.get_stream(topology::PROGRESS_STREAM).await.unwrap();
    stream.info().await.unwrap().state.consumer_count
}

async fn submit(base: &str, spec: Value) -> String {
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/tasks"))
        .header("content-type", "application/json")
        .body(spec.to_string());
    let record: Value = response.send().await.unwrap().json().await.unwrap();
    record["id"].as_str().unwrap_or_else(|| panic!("submit refused: {record}")).to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_events_arrive_once_in_stream_order_over_one_shared_feed() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let gw = Gateway::start(&topo, &[]).await;
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0\n");

    let mut first = connect(&gw.url, "session=alpha").await;
    let start = hello(&mut first, "alpha").await;
    let mut second = connect(&gw.url, "session=alpha").await;
    hello(&mut second, "alpha").await;
    assert_eq!(consumers_on_progress(&topo.js).await, 1, "one feed for the session's sockets");

    let spec = json!({"kind": "sleep", "session": "alpha", "input": {"seconds": 0.6, "steps": 3}});
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(submit(&gw.url, spec.clone()).await);
    }
    // A task of another session never reaches these sockets.
    let other = submit(&gw.url, json!({"kind": "sleep", "session": "beta"})).await;

    let all_done = |events: &[Value]| ids.iter().all(|id| has_status(events, id, "succeeded"));
    let mut events = Vec::new();
    collect_until(&mut first, &mut events, all_done).await;
    assert_increasing(&seqs(&events));
    assert!(events.iter().all(|e| e["session"] == "alpha" && e["task_id"] != other.as_str()));
    for id in &ids {
        let of_task: Vec<&Value> = events.iter().filter(|e| e["task_id"] == id.as_str()).collect();
        let position = |what: &dyn Fn(&Value) -> bool| of_task.iter().position(|e| what(e));
        let status = |s: &'static str| move |e: &Value| e["data"]["status"] == s;
        let queued = position(&status("queued")).expect("queued");
        let running = position(&status("running")).expect("running");
        let succeeded = position(&status("succeeded")).expect("succeeded");
        let progress: Vec<usize> =
            (0..of_task.len()).filter(|&i| of_task[i]["type"] == "progress").collect();
        assert!(!progress.is_empty(), "{of_task:?}");
        assert!(queued < succeeded && running < progress[0], "{of_task:?}");
        // The end is the last event, and it carries the result (protocol 5).
        assert!(progress[progress.len() - 1] < succeeded, "{of_task:?}");
        assert_eq!(succeeded, of_task.len() - 1, "{of_task:?}");
        assert!(of_task[succeeded]["data"]["result"].is_object(), "{of_task:?}");
    }

    // Exactly what the stream holds for the session since the hello, in the same order.
    let last = *seqs(&events).last().unwrap();
    let mut expected = stored(&topo.js, "alpha", start).await;
    expected.retain(|e| e["seq"].as_u64().unwrap() <= last);
    assert_eq!(events, expected);
    // The second socket of the session received the same frames from the same feed.
    let mut again = Vec::new();
    collect_until(&mut second, &mut again, |e| e.len() == events.len()).await;
    assert_eq!(again, events);

    drop((first, second));
    wait_for("the feed's consumer to go with its last socket", WAIT, || async {
        (consumers_on_progress(&topo.js).await == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_with_since_gets_what_was_missed_once_then_live_events() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let gw = Gateway::start(&topo, &[]).await;
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0\n");

    let mut socket = connect(&gw.url, "session=bravo").await;
    let start = hello(&mut socket, "bravo").await;
    let spec = json!({"kind": "sleep", "session": "bravo", "input": {"seconds": 3.0, "steps": 10}});
    let id = submit(&gw.url, spec).await;
    let progress = |events: &[Value]| events.iter().filter(|e| e["type"] == "progress").count();
    let mut before = Vec::new();
    collect_until(&mut socket, &mut before, |e| progress(e) >= 3).await;
    socket.close(None).await.unwrap();
    drop(socket);
    let seen = *seqs(&before).last().unwrap();

    // Away until at least two more events are stored.
    wait_for("events missed while away", WAIT, || async {
        (stored(&topo.js, "bravo", seen).await.len() >= 2).then_some(())
    })
    .await;
    let mut socket = connect(&gw.url, &format!("session=bravo&since={seen}")).await;
    let now = hello(&mut socket, "bravo").await;
    let mut after = Vec::new();
    collect_until(&mut socket, &mut after, |e| has_status(e, &id, "succeeded")).await;

    let after_seqs = seqs(&after);
    assert!(after_seqs[0] > seen, "nothing seen before is sent again: {after_seqs:?}");
    assert!(after_seqs.iter().any(|&s| s <= now), "the missed events were replayed");
    assert!(after_seqs.iter().any(|&s| s > now), "then live ones followed");
    let union: Vec<Value> = before.into_iter().chain(after).collect();
    assert_increasing(&seqs(&union));
    assert_eq!(union, stored(&topo.js, "bravo", start).await, "no gap, no duplicate");
}

/// Issue 12, event history: a `since` older than what `PROGRESS` still holds (its age, bytes
/// or per-subject limits evicted the rest) gets an explicit `gap` frame naming the sequences
/// that are gone, before the replay of what is left. Before, the replay silently started later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_since_older_than_the_stream_gets_a_gap_frame() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let gw = Gateway::start(&topo, &[]).await;
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0\n");
    let spec = json!({"kind": "sleep", "session": "gappy", "input": {"seconds": 0.2, "steps": 4}});
    let old = submit(&gw.url, spec.clone()).await;
    wait_for("the old task's events", WAIT, || async {
        has_status(&stored(&topo.js, "gappy", 0).await, &old, "succeeded").then_some(())
    })
    .await;
    // The stream forgets everything up to now, as its limits would.
    let mut stream = topo.js.get_stream(topology::PROGRESS_STREAM).await.unwrap();
    let evicted = stream.info().await.unwrap().state.last_sequence;
    stream.purge().sequence(evicted + 1).await.unwrap();
    let new = submit(&gw.url, spec).await;

    let mut socket = connect(&gw.url, "session=gappy&since=1").await;
    hello(&mut socket, "gappy").await;
    let gap = next_json(&mut socket).await;
    assert_eq!(gap, json!({"type": "gap", "from": 2, "to": evicted}), "{gap}");
    let mut after = Vec::new();
    collect_until(&mut socket, &mut after, |e| has_status(e, &new, "succeeded")).await;
    assert!(seqs(&after).iter().all(|&s| s > evicted), "then what is still stored");

    // A since within what is stored has no gap: the next frame is an event.
    let mut socket = connect(&gw.url, &format!("session=gappy&since={evicted}")).await;
    hello(&mut socket, "gappy").await;
    let first = next_json(&mut socket).await;
    assert_ne!(first["type"], "gap", "{first}");
    assert!(first["seq"].as_u64().unwrap() > evicted, "{first}");
}

/// The hand-over race: clients join with `since` in the past while events pour in, both onto a
/// feed that is already running (another socket keeps it) and onto one they start themselves.
/// Each must get exactly the stored events after its `since`, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_hands_over_to_the_live_feed_without_gap_or_duplicate_under_load() {
    const EVENTS: usize = 2000;
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let gw = Gateway::start(&topo, &[]).await;
    let mut keeper = connect(&gw.url, "session=busy").await;
    let base = hello(&mut keeper, "busy").await;

    let client = nats.client().await;
    let publisher = tokio::spawn(async move {
        let mut pace = tokio::time::interval(Duration::from_millis(2));
        let publish = async |session: &str, text: String| {
            let event = json!({"type": "output", "task_id": "t-1", "session": session,
                "at": "2026-01-01T00:00:00Z", "data": {"text": text}});
            let subject = format!("progress.{session}.t-1");
            client.publish(subject, event.to_string().into()).await.unwrap();
        };
        for i in 0..EVENTS {
            publish(if i % 4 == 0 { "fresh" } else { "busy" }, i.to_string()).await;
            if i % 5 == 4 {
                pace.tick().await;
            }
        }
        // The last event of each session says so, so every client knows when it has it all.
        publish("busy", "end".into()).await;
        publish("fresh", "end".into()).await;
        client.flush().await.unwrap();
    });

    let mut clients = Vec::new();
    for (k, session) in ["busy", "busy", "fresh", "busy", "busy"].into_iter().enumerate() {
        // Join once the stream is well ahead of `since`, so there is a past to replay.
        let since = base + 100 * k as u64;
        wait_for("the stream to grow", WAIT, || async {
            let mut s = topo.js.get_stream(topology::PROGRESS_STREAM).await.ok()?;
            let last = s.info().await.ok()?.state.last_sequence;
            (last > since + 150).then_some(())
        })
        .await;
        let mut socket = connect(&gw.url, &format!("session={session}&since={since}")).await;
        hello(&mut socket, session).await;
        clients.push(tokio::spawn(async move {
            let mut events = Vec::new();
            collect_until(&mut socket, &mut events, |e| {
                e.last().is_some_and(|e| e["data"]["text"] == "end")
            })
            .await;
            (session, since, events)
        }));
    }
    publisher.await.unwrap();
    for client in clients {
        let (session, since, events) = client.await.unwrap();
        let expected = stored(&topo.js, session, since).await;
        assert_eq!(seqs(&events), seqs(&expected), "session {session} since {since}");
        assert_eq!(events, expected);
    }
}

#[tokio::test]
async fn origin_is_checked_on_upgrade() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let gw = Gateway::start(&topo, &["--allowed-origin", "https://ui.example"]).await;
    let with_origin = |origin: &str| {
        let mut request = ws_url(&gw.url, "session=o").into_client_request().unwrap();
        request.headers_mut().insert("origin", origin.parse().unwrap());
        request
    };

    let mut socket = connect(&gw.url, "session=o").await;
    hello(&mut socket, "o").await;
    let same = gw.url.clone();
    for origin in [same.as_str(), "https://ui.example"] {
        let (mut socket, _) = tokio_tungstenite::connect_async(with_origin(origin))
            .await
            .unwrap_or_else(|e| panic!("origin {origin} refused: {e}"));
        hello(&mut socket, "o").await;
    }
    match tokio_tungstenite::connect_async(with_origin("https://evil.example")).await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["error"]["code"], "forbidden", "{body}");
        }
        other => panic!("a foreign origin connected: {other:?}"),
    }

    // DNS rebinding: a page of a name pointed at the gateway, its origin agreeing with its Host.
    let port = gw.url.rsplit(':').next().unwrap().to_owned();
    let mut rebound = with_origin(&format!("http://evil.example:{port}"));
    rebound.headers_mut().insert("host", format!("evil.example:{port}").parse().unwrap());
    match tokio_tungstenite::connect_async(rebound).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 403),
        other => panic!("a rebound page connected: {other:?}"),
    }

    // Bad parameters and plain GETs get our error shape, not a socket.
    let http = reqwest::Client::new();
    let response = http.get(gw.url("/v1/ws?session=o&since=x")).send().await.unwrap();
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        (body["error"]["code"].as_str(), body["error"]["field"].as_str()),
        (Some("invalid_request"), Some("since"))
    );
    let response = http.get(gw.url("/v1/ws?session=o")).send().await.unwrap();
    assert_eq!(response.status(), 422);
}

#[tokio::test]
async fn commands_over_the_socket_run_like_http_and_bad_frames_get_error_replies() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let gw = Gateway::start(&topo, &[]).await;
    let mut socket = connect(&gw.url, "session=cmd").await;
    hello(&mut socket, "cmd").await;

    async fn command(socket: &mut Socket, frame: &str) -> Value {
        socket.send(Message::text(frame)).await.unwrap();
        loop {
            let frame = next_json(socket).await;
            if frame["type"] == "reply" {
                return frame;
            }
            assert!(frame["seq"].is_u64(), "{frame}");
        }
    }

    let submit = json!({"op": "submit", "ref": "s1",
        "task": {"kind": "sleep", "input": {"seconds": 5}}});
    let reply = command(&mut socket, &submit.to_string()).await;
    assert_eq!((reply["ref"].as_str(), reply["ok"].as_bool()), (Some("s1"), Some(true)), "{reply}");
    assert_eq!(reply["created"], true);
    let record = &reply["record"];
    assert_eq!(
        (record["status"].as_str(), record["session"].as_str()),
        (Some("queued"), Some("cmd"))
    );
    let id = record["id"].as_str().unwrap().to_owned();

    let reply =
        command(&mut socket, &json!({"op": "cancel", "ref": 2, "id": id}).to_string()).await;
    assert_eq!((reply["ref"].as_i64(), reply["ok"].as_bool()), (Some(2), Some(true)), "{reply}");
    assert_eq!(reply["record"]["status"], "cancelled");
    let reply =
        command(&mut socket, &json!({"op": "pause", "ref": "p", "id": id}).to_string()).await;
    assert_eq!(reply["ok"], false);
    assert_eq!(
        (reply["error"]["code"].as_str(), reply["error"]["status"].as_str()),
        (Some("conflict"), Some("cancelled"))
    );

    for (frame, field) in [
        ("not json", None),
        (r#"["submit"]"#, None),
        (r#"{"ref": "x", "op": "explode"}"#, Some("op")),
        (r#"{"ref": "x", "op": "submit", "task": 7}"#, Some("task")),
        (r#"{"ref": "x", "op": "cancel"}"#, Some("id")),
        (
            r#"{"ref": "x", "op": "submit", "task": {"kind": "sleep", "priority": "urgent"}}"#,
            Some("priority"),
        ),
    ] {
        let reply = command(&mut socket, frame).await;
        assert_eq!(reply["ok"], false, "{frame}: {reply}");
        assert_eq!(reply["error"]["code"], "invalid_request", "{frame}: {reply}");
        assert_eq!(reply["error"]["field"].as_str(), field, "{frame}: {reply}");
        if frame.contains("\"ref\"") {
            assert_eq!(reply["ref"], "x");
        }
    }
    let reply = command(&mut socket, r#"{"op": "cancel", "ref": "n", "id": "no-such-task"}"#).await;
    // Not in the bucket, so the archive is asked, as over HTTP; none runs in this test.
    assert_eq!((reply["ref"].as_str(), reply["ok"].as_bool()), (Some("n"), Some(false)));
    assert_eq!(reply["error"]["code"], "unavailable", "{reply}");

    // Still open after all that.
    let submit =
        json!({"op": "submit", "ref": "s2", "task": {"kind": "sleep", "session": "elsewhere"}});
    let reply = command(&mut socket, &submit.to_string()).await;
    assert_eq!(
        (reply["ok"].as_bool(), reply["record"]["session"].as_str()),
        (Some(true), Some("elsewhere"))
    );
}

#[tokio::test]
async fn shutdown_closes_sockets_with_1012_and_a_resume_hint() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let gw = Gateway::start(&topo, &[]).await;
    let mut socket = connect(&gw.url, "session=bye").await;
    let start = hello(&mut socket, "bye").await;

    let stop = tokio::spawn(gw.running.stop());
    let close = loop {
        let message = tokio::time::timeout(WAIT, socket.next()).await.expect("a close frame");
        match message {
            Some(Ok(Message::Close(frame))) => break frame.expect("a close code"),
            Some(Ok(Message::Ping(_))) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close.code, CloseCode::Restart);
    assert!(close.reason.contains(&format!("since={start}")), "{}", close.reason);
    tokio::time::timeout(WAIT, stop).await.expect("the gateway stops").unwrap();
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_missing_pongs() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let gw = Gateway::start(&topo, &["--ws-ping-s", "0.2"]).await;
    // A raw handshake, then silence: nothing reads the pings, so nothing answers them.
    let addr = gw.url.trim_start_matches("http://").to_owned();
    let mut tcp = TcpStream::connect(&addr).await.unwrap();
    let handshake = format!(
        "GET /v1/ws?session=quiet HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(handshake.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut received = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut received))
        .await
        .expect("the gateway drops a client that answers no ping")
        .ok();
    assert!(String::from_utf8_lossy(&received).starts_with("HTTP/1.1 101"));
    assert!(started.elapsed() >= Duration::from_millis(500), "dropped only after three pings");
}

/// A `claw-gateway` process, killed on drop.
struct GatewayProcess {
    child: Child,
    url: String,
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl GatewayProcess {
    async fn start(nats_url: &str, args: &[&str]) -> GatewayProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(bin("claw-gateway"))
            .args(["--nats-url", nats_url, "--http", &format!("127.0.0.1:{port}")])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let gw = GatewayProcess { child, url: format!("http://127.0.0.1:{port}") };
        let http = reqwest::Client::new();
        wait_for("the gateway process to be ready", WAIT, || async {
            let response = http.get(format!("{}/readyz", gw.url)).send().await.ok()?;
            response.status().is_success().then_some(())
        })
        .await;
        gw
    }

    /// Resident memory in bytes, from `/proc/<pid>/status`.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }

    async fn metrics(&self) -> HashMap<String, f64> {
        let text =
            reqwest::get(format!("{}/metrics", self.url)).await.unwrap().text().await.unwrap();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .filter_map(|(name, value)| Some((name.to_owned(), value.parse().ok()?)))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_and_gateway_memory_stays_bounded() {
    const LINE: usize = 30_000;
    const LINES: usize = 400; // 12 MB in 50 bursts of 8 lines, ~240 KB per 100 ms flush
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let gw = GatewayProcess::start(&nats.url(), &["--ws-send-timeout-s", "2"]).await;
    let script = write_script(
        nats.dir.path(),
        "flood.sh",
        &format!(
            r#"#!/bin/sh
line=$(head -c {LINE} /dev/zero | tr '\0' x)
i=0
while [ $i -lt {} ]; do
  for j in 1 2 3 4 5 6 7 8; do echo "{{\"output\": \"$line\"}}"; done
  sleep 0.1
  i=$((i+1))
done
echo '{{"result": {{"done": true}}}}'
"#,
            LINES / 8
        ),
    );
    // The flood must reach the stream: shares far above the defaults (64 KiB/s a session).
    let toml = format!(
        "ack_deadline_s = 2.0\nrunner = {:?}\n[programs.flood]\npath = {:?}\n\
         [events]\nsession_output_bytes_per_s = 100000000\n\
         principal_output_bytes_per_s = 100000000\n",
        bin("claw-worker"),
        script
    );
    let _worker = start_worker(&topo, &toml);
    let rss_before = gw.rss();

    // The slow client: a tiny receive buffer, and it never reads.
    let addr: std::net::SocketAddr = gw.url.trim_start_matches("http://").parse().unwrap();
    let tcp = tokio::net::TcpSocket::new_v4().unwrap();
    tcp.set_recv_buffer_size(4096).unwrap();
    let tcp = tcp.connect(addr).await.unwrap();
    let (mut slow, _) = tokio_tungstenite::client_async(
        ws_url(&gw.url, "session=flood"),
        MaybeTlsStream::Plain(tcp),
    )
    .await
    .unwrap();
    let mut good = connect(&gw.url, "session=flood").await;
    hello(&mut good, "flood").await;

    let id =
        submit(&gw.url, json!({"kind": "exec", "session": "flood", "input": {"program": "flood"}}))
            .await;
    let reader = {
        let id = id.clone();
        tokio::spawn(async move {
            let mut events = Vec::new();
            collect_until(&mut good, &mut events, |e| has_status(e, &id, "succeeded")).await;
            events
        })
    };
    let mut rss_peak = rss_before;
    while !reader.is_finished() {
        rss_peak = rss_peak.max(gw.rss());
        tokio::time::sleep(Duration::from_millis(50)).await; // sampling, not waiting for an event
    }
    let events = reader.await.unwrap();

    let text = |events: &[Value]| -> usize {
        events
            .iter()
            .filter(|e| e["type"] == "output")
            .map(|e| e["data"]["text"].as_str().unwrap().len())
            .sum()
    };
    let stored_events = stored(&topo.js, "flood", 0).await;
    // An event the worker could not publish (a burst over the NATS max payload when the machine
    // stalls) is simply not stored; the point is that the flood happened and arrived whole.
    assert!(text(&stored_events) > 8_000_000, "the flood was stored: {}", text(&stored_events));
    assert_eq!(text(&events), text(&stored_events), "the reading client got all of it");

    let metrics = wait_for("the slow client to be dropped", WAIT, || async {
        let metrics = gw.metrics().await;
        let dropped = metrics
            .iter()
            .filter(|(k, _)| k.starts_with("claw_gateway_ws_slow_disconnects_total"))
            .map(|(_, v)| v)
            .sum::<f64>();
        (dropped >= 1.0).then_some(metrics)
    })
    .await;
    assert!(metrics.get("claw_gateway_ws_events_sent_total").is_some_and(|&n| n > 0.0));
    let grown = rss_peak.saturating_sub(rss_before);
    assert!(grown < 100 << 20, "gateway RSS grew by {} MiB", grown >> 20);

    // What the slow client finds when it finally reads: what the kernel held, then the end.
    let drained = tokio::time::timeout(WAIT, async {
        let mut frames = Vec::new();
        while let Some(Ok(message)) = slow.next().await {
            if let Message::Text(text) = message {
                frames.push(serde_json::from_str::<Value>(text.as_str()).unwrap());
            }
        }
        frames
    })
    .await
    .expect("the slow client's connection was closed by the gateway");
    assert!(!has_status(&drained, &id, "succeeded"), "it was dropped before the end");
    assert!(drained.len() < events.len(), "{} of {} frames", drained.len(), events.len());
}
