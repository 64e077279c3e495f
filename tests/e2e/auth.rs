//! API tokens and principals: a gateway started with a tokens file of two principals
//! (alice, bob) and an admin (ops), on a real nats-server with a worker and the archiver.
//! Without a known token every `/v1/*` route is 401; a principal sees, controls, lists and
//! watches only its own tasks and sessions (404 otherwise, as for what does not exist); an admin
//! sees everything, NATS-native tasks included. The real `claw-gateway` refuses a public
//! address without tokens, and `claw --token` reaches a gateway that has them.

use std::process::Stdio;
use std::time::Duration;

use claw_proto::topology;
use claw_tests::{
    Gateway, Nats, Running, WAIT, bin, start_archiver, start_worker, test_settings, wait_for,
};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

const ALICE: &str = "claw_alice-0123456789abcdef";
const BOB: &str = "claw_bob-0123456789abcdef";
const OPS: &str = "claw_ops-0123456789abcdef";

/// The tokens file: alice's token listed by its SHA-256 (as `claw token new` prints it), bob's
/// and the admin's as plain tokens.
fn tokens_file() -> String {
    let digest: String =
        claw_gateway::auth::hash(ALICE).iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "[principals.alice]\ntokens = [\"sha256:{digest}\"]\n\n\
         [principals.bob]\ntokens = [\"{BOB}\"]\n\n\
         [principals.ops]\ntokens = [\"{OPS}\"]\nadmin = true\n"
    )
}

struct Stack {
    nats: Nats,
    gw: Gateway,
    _worker: Running,
    _archiver: Running,
}

async fn stack() -> Stack {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let tokens = nats.dir.path().join("tokens.toml");
    std::fs::write(&tokens, tokens_file()).unwrap();
    let _archiver = start_archiver(&topo, &nats.dir.path().join("archive.sqlite"));
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0\n");
    let gw = Gateway::start(&topo, &["--tokens", tokens.to_str().unwrap()]).await;
    let client = nats.client().await;
    wait_for("the archiver and the gateway to answer", WAIT, || async {
        client.request(topology::ARCHIVE_LIST, "{}".into()).await.ok()?;
        let ready = reqwest::get(gw.url("/readyz")).await.ok()?;
        ready.status().is_success().then_some(())
    })
    .await;
    Stack { nats, gw, _worker, _archiver }
}

/// One request as `token` (none: no `Authorization`); the status and the JSON body.
async fn call(
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = reqwest::Client::new().request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.header("content-type", "application/json").body(body.to_string());
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn get(s: &Stack, path: &str, token: &str) -> (StatusCode, Value) {
    call(reqwest::Method::GET, s.gw.url(path), Some(token), None).await
}

async fn post(s: &Stack, path: &str, token: &str, body: Option<Value>) -> (StatusCode, Value) {
    call(reqwest::Method::POST, s.gw.url(path), Some(token), body).await
}

async fn submit(s: &Stack, token: &str, spec: Value) -> Value {
    let (status, record) = post(s, "/v1/tasks", token, Some(spec)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{record}");
    record
}

fn assert_not_found((status, body): (StatusCode, Value)) {
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "not_found", "{body}");
}

/// The ids of the history page `GET /v1/tasks?<query>` as `token` sees it.
async fn listed(s: &Stack, query: &str, token: &str) -> Vec<String> {
    let (status, page) = get(s, &format!("/v1/tasks?{query}"), token).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page["tasks"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap().into()).collect()
}

async fn wait_status(s: &Stack, id: &str, token: &str, status: &str) {
    wait_for(&format!("task {id} {status}"), WAIT, || async {
        let (code, record) = get(s, &format!("/v1/tasks/{id}"), token).await;
        (code == StatusCode::OK && record["status"] == status).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_gate_the_api_and_a_principal_sees_only_its_own_tasks() {
    let s = stack().await;

    // No token, or an unknown one: 401 with our error shape and a Bearer challenge.
    for token in [None, Some("claw_nobody-0123456789abcdef"), Some("")] {
        for (method, path) in [
            (reqwest::Method::GET, "/v1/tasks"),
            (reqwest::Method::POST, "/v1/tasks"),
            (reqwest::Method::GET, "/v1/tasks/x"),
            (reqwest::Method::POST, "/v1/tasks/x/cancel"),
            (reqwest::Method::GET, "/v1/lanes"),
            (reqwest::Method::GET, "/metrics"),
        ] {
            let mut request = reqwest::Client::new().request(method.clone(), s.gw.url(path));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{method} {path} {token:?}");
            let challenge = response.headers()["www-authenticate"].to_str().unwrap().to_owned();
            assert!(challenge.starts_with("Bearer"), "{challenge}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "unauthorized", "{body}");
        }
    }
    // The page, its assets and the probes stay open.
    for path in ["/", "/ui/app.js", "/healthz", "/readyz"] {
        let response = reqwest::get(s.gw.url(path)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    assert_eq!(get(&s, "/metrics", BOB).await.0, StatusCode::OK);

    // alice's task: hers and the admin's to see, 404 for bob, as if it did not exist.
    let spec = json!({"kind": "sleep", "session": "alice-s", "input": {"seconds": 0.2}});
    let record = submit(&s, ALICE, spec).await;
    assert_eq!(record["owner"], "alice", "{record}");
    let id = record["id"].as_str().unwrap().to_owned();
    let task = format!("/v1/tasks/{id}");
    assert_not_found(get(&s, &task, BOB).await);
    let (_, missing) = get(&s, "/v1/tasks/no-such-task", BOB).await;
    let (_, hidden) = get(&s, &task, BOB).await;
    assert_eq!(hidden["error"]["message"], format!("no task {id}"));
    assert_eq!(missing["error"]["message"], "no task no-such-task");
    for verb in ["cancel", "pause", "resume", "retry"] {
        assert_not_found(post(&s, &format!("{task}/{verb}"), BOB, None).await);
    }
    assert_eq!(get(&s, &task, ALICE).await.0, StatusCode::OK);
    assert_eq!(get(&s, &task, OPS).await.0, StatusCode::OK);
    // Sessions are per principal: bob's "alice-s" is a session of his own, not alice's.
    let into_alices = json!({"kind": "sleep", "session": "alice-s", "input": {"seconds": 0.1}});
    let bobs_alice_s = submit(&s, BOB, into_alices).await;
    assert_eq!(bobs_alice_s["owner"], "bob", "{bobs_alice_s}");
    // The owner filter is the caller's, never the query's.
    assert_eq!(get(&s, "/v1/tasks?owner=bob", ALICE).await.0, StatusCode::UNPROCESSABLE_ENTITY);

    // History: alice and the admin list the finished task, bob does not.
    wait_status(&s, &id, ALICE, "succeeded").await;
    wait_for("alice's task in her history", WAIT, || async {
        listed(&s, "session=alice-s", ALICE).await.contains(&id).then_some(())
    })
    .await;
    assert!(listed(&s, "", ALICE).await.contains(&id));
    assert!(listed(&s, "", OPS).await.contains(&id));
    assert!(!listed(&s, "", BOB).await.contains(&id));
    assert!(!listed(&s, "session=alice-s", BOB).await.contains(&id));

    // Control: bob's cancel is a 404 and changes nothing; alice's goes through.
    let long = json!({"kind": "sleep", "session": "alice-s", "input": {"seconds": 30}});
    let long_id = submit(&s, ALICE, long).await["id"].as_str().unwrap().to_owned();
    assert_not_found(post(&s, &format!("/v1/tasks/{long_id}/cancel"), BOB, None).await);
    let (status, record) = get(&s, &format!("/v1/tasks/{long_id}"), ALICE).await;
    assert!(status == StatusCode::OK && record["status"] != "cancelled", "{record}");
    let (status, record) = post(&s, &format!("/v1/tasks/{long_id}/cancel"), ALICE, None).await;
    assert_eq!((status, record["status"].as_str()), (StatusCode::OK, Some("cancelled")));

    // Idempotency keys are per principal: bob's repeat of alice's key is a task of his own.
    let keyed = |token: &'static str, session: &'static str| {
        let url = s.gw.url("/v1/tasks");
        async move {
            let response = reqwest::Client::new()
                .post(url)
                .bearer_auth(token)
                .header("Idempotency-Key", "order-42")
                .header("content-type", "application/json")
                .body(
                    json!({"kind": "sleep", "session": session, "input": {"seconds": 0.1}})
                        .to_string(),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::ACCEPTED);
            response.json::<Value>().await.unwrap()
        }
    };
    let (alices, bobs) = (keyed(ALICE, "alice-s").await, keyed(BOB, "bob-s").await);
    assert_ne!(alices["id"], bobs["id"]);
    assert_eq!((alices["owner"].as_str(), bobs["owner"].as_str()), (Some("alice"), Some("bob")));

    // A NATS-native task has no owner: only the admin sees it.
    let js = s.nats.jetstream().await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "native-1");
    let spec = json!({"kind": "sleep", "session": "native", "input": {"seconds": 0.1}});
    js.publish_with_headers("tasks.short.normal", headers, spec.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    wait_status(&s, "native-1", OPS, "succeeded").await;
    assert_not_found(get(&s, "/v1/tasks/native-1", ALICE).await);
    assert_not_found(post(&s, "/v1/tasks/native-1/retry", ALICE, None).await);
    wait_for("the native task in the admin's history", WAIT, || async {
        listed(&s, "", OPS).await.contains(&"native-1".to_owned()).then_some(())
    })
    .await;
    assert!(!listed(&s, "", ALICE).await.contains(&"native-1".to_owned()));

    // Lanes are shared: anyone may look, only an admin may pause one.
    assert_eq!(get(&s, "/v1/lanes", ALICE).await.0, StatusCode::OK);
    let (status, body) = post(&s, "/v1/lanes/long/low/pause", ALICE, None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    assert_eq!(post(&s, "/v1/lanes/long/low/pause", OPS, None).await.0, StatusCode::OK);
    assert_eq!(post(&s, "/v1/lanes/long/low/resume", OPS, None).await.0, StatusCode::OK);
}

/// `ws://.../v1/ws?<query>` (`session=S`, `session=S&owner=P&since=0`) with the given extra
/// headers.
fn ws_request(
    gw: &Gateway,
    query: &str,
    headers: &[(&'static str, String)],
) -> tungstenite::handshake::client::Request {
    let url = format!("{}/v1/ws?{query}", gw.url.replacen("http://", "ws://", 1));
    let mut request = url.into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(*name, value.parse().unwrap());
    }
    request
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Reads frames until one satisfies `wanted`, within [`WAIT`].
async fn frame_where(socket: &mut Socket, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    frames_until(socket, what, wanted).await.pop().expect("the wanted frame")
}

/// Every frame up to and including the first that satisfies `wanted`, within [`WAIT`]. Frames
/// come in stream order, so this holds every event stored before that one.
async fn frames_until(
    socket: &mut Socket,
    what: &str,
    wanted: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut frames = Vec::new();
    loop {
        let frame = tokio::time::timeout_at(deadline, socket.next())
            .await
            .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
            .expect("socket ended")
            .expect("socket failed");
        if let Message::Text(text) = frame {
            let frame: Value = serde_json::from_str(text.as_str()).expect("JSON frame");
            let done = wanted(&frame);
            frames.push(frame);
            if done {
                return frames;
            }
        }
    }
}

/// The upgrade is refused with `status` and our error `code`.
async fn refused(request: tungstenite::handshake::client::Request, status: u16, code: &str) {
    match tokio_tungstenite::connect_async(request).await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), status);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["error"]["code"], code, "{body}");
        }
        other => panic!("expected {status} {code}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_need_a_token_and_watch_only_the_callers_sessions() {
    let s = stack().await;
    let subprotocol = || ("sec-websocket-protocol", "claw.v1".to_owned());
    let bearer = |token: &str| ("authorization", format!("Bearer {token}"));

    refused(ws_request(&s.gw, "session=alice-ws", &[]), 401, "unauthorized").await;
    let wrong = bearer("claw_nobody-0123456789abcdef");
    refused(ws_request(&s.gw, "session=alice-ws", &[wrong]), 401, "unauthorized").await;
    // A token in a subprotocol (which proxies log) is not read any more (protocol 2).
    let offered = ("sec-websocket-protocol", format!("claw.v1, claw.bearer.{ALICE}"));
    refused(ws_request(&s.gw, "session=alice-ws", &[offered]), 401, "unauthorized").await;

    // alice watches her session with a ticket, as the browser does, offering `claw.v1`.
    let (status, issued) = post(&s, "/v1/ws-ticket", ALICE, None).await;
    assert_eq!((status, issued["expires_in_s"].as_u64()), (StatusCode::OK, Some(30)), "{issued}");
    let ticket = issued["ticket"].as_str().unwrap().to_owned();
    let with_ticket = format!("session=alice-ws&ticket={ticket}");
    let request = ws_request(&s.gw, &with_ticket, &[subprotocol()]);
    let (mut socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "claw.v1");
    // A ticket works once: a second upgrade with it (a replay from a log) is refused.
    refused(ws_request(&s.gw, &with_ticket, &[]), 401, "unauthorized").await;
    let forged = format!("session=alice-ws&ticket=ct_{}", "0".repeat(64));
    refused(ws_request(&s.gw, &forged, &[]), 401, "unauthorized").await;
    // The bucket keeps the ticket's digest, never the ticket.
    let tickets = s.nats.jetstream().await.get_key_value("tickets").await.unwrap();
    let digest: String =
        claw_gateway::auth::hash(&ticket).iter().map(|b| format!("{b:02x}")).collect();
    assert!(tickets.get(&ticket).await.unwrap().is_none());
    let spent = tickets.entry(&digest).await.unwrap().expect("the ticket's digest is the key");
    assert_eq!(spent.operation, async_nats::jetstream::kv::Operation::Purge, "spent");

    // bob may not name her namespace, with his token or with a ticket of his.
    let alices = "session=alice-ws&owner=alice";
    refused(ws_request(&s.gw, alices, &[bearer(BOB)]), 404, "not_found").await;
    let bobs = post(&s, "/v1/ws-ticket", BOB, None).await.1["ticket"].as_str().unwrap().to_owned();
    refused(ws_request(&s.gw, &format!("{alices}&ticket={bobs}"), &[]), 404, "not_found").await;
    refused(ws_request(&s.gw, "session=alice-ws&owner=~", &[bearer(BOB)]), 404, "not_found").await;

    // alice's live events arrive.
    let spec = json!({"kind": "sleep", "session": "alice-ws", "input": {"seconds": 0.1}});
    let id = submit(&s, ALICE, spec).await["id"].as_str().unwrap().to_owned();
    frame_where(&mut socket, "alice's task to succeed on her socket", |f| {
        f["task_id"] == id.as_str() && f["data"]["status"] == "succeeded"
    })
    .await;

    // Commands on alice's socket act as alice: bob's task is not there for her.
    let bobs = json!({"kind": "sleep", "session": "bob-s", "input": {"seconds": 30}});
    let bob_id = submit(&s, BOB, bobs).await["id"].as_str().unwrap().to_owned();
    let command = json!({"op": "cancel", "ref": 1, "id": bob_id});
    futures::SinkExt::send(&mut socket, Message::Text(command.to_string().into())).await.unwrap();
    let reply = frame_where(&mut socket, "the cancel reply", |f| f["type"] == "reply").await;
    assert_eq!(
        (reply["ok"].as_bool(), reply["error"]["code"].as_str()),
        (Some(false), Some("not_found"))
    );

    // The admin watches any principal's session by naming its owner: alice's past events too.
    let request = ws_request(&s.gw, "session=alice-ws&owner=alice&since=0", &[bearer(OPS)]);
    let (mut admins, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    frame_where(&mut admins, "alice's task on the admin's socket", |f| {
        f["task_id"] == id.as_str() && f["data"]["status"] == "succeeded"
    })
    .await;

    // A plain GET (no upgrade) is refused.
    let http = reqwest::Client::new();
    let plain = http.get(s.gw.url("/v1/ws?session=fresh-ws")).bearer_auth(BOB).send().await;
    assert_eq!(plain.unwrap().status(), 422);
}

/// A ticket expires: one older than `--ws-ticket-s` is refused, unused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_ticket_expires() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let tokens = nats.dir.path().join("tokens.toml");
    std::fs::write(&tokens, tokens_file()).unwrap();
    let args = ["--tokens", tokens.to_str().unwrap(), "--ws-ticket-s", "1"];
    let gw = Gateway::start(&topo, &args).await;
    let issue = || async {
        let (status, issued) =
            call(reqwest::Method::POST, gw.url("/v1/ws-ticket"), Some(ALICE), None).await;
        assert_eq!(status, StatusCode::OK, "{issued}");
        issued["ticket"].as_str().unwrap().to_owned()
    };
    let fresh = issue().await;
    let stale = issue().await;
    let request = ws_request(&gw, &format!("ticket={fresh}"), &[]);
    tokio_tungstenite::connect_async(request).await.expect("a fresh ticket opens a socket");
    // Expiry is a matter of time: wait it out (1 s), then the unused ticket is refused.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    refused(ws_request(&gw, &format!("ticket={stale}"), &[]), 401, "unauthorized").await;
}

/// Issue 12, sessions: a session is a namespace of its principal's. Before, a session used by
/// an admin or a NATS publisher was unclaimed, so the first principal to watch it with
/// `since=0` claimed it and replayed the others' events; and `default` belonged to whoever used
/// it first, so every other principal's default submit and socket was a 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_namespaces_of_their_principal() {
    let s = stack().await;
    let bearer = |token: &str| ("authorization", format!("Bearer {token}"));

    // Someone else's past in the session "shared": an admin's task and a NATS-native one.
    let spec = json!({"kind": "sleep", "session": "shared", "input": {"seconds": 0.1}});
    let admins = submit(&s, OPS, spec.clone()).await["id"].as_str().unwrap().to_owned();
    let js = s.nats.jetstream().await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "native-shared");
    js.publish_with_headers("tasks.short.normal", headers, spec.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    wait_status(&s, &admins, OPS, "succeeded").await;
    wait_status(&s, "native-shared", OPS, "succeeded").await;

    // alice's replay of "shared" from the start holds only her own task's events.
    let request = ws_request(&s.gw, "session=shared&since=0", &[bearer(ALICE)]);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let hers = submit(&s, ALICE, spec.clone()).await["id"].as_str().unwrap().to_owned();
    // The others' events are older than hers: had she any, they would come first.
    let others = frames_until(&mut socket, "alice's own task", |f| {
        f["task_id"] == hers.as_str() && f["data"]["status"] == "succeeded"
    })
    .await;
    let theirs = |f: &&Value| f["task_id"] == admins.as_str() || f["task_id"] == "native-shared";
    assert!(others.iter().find(theirs).is_none(), "alice saw another party's event: {others:?}");

    // Everyone's `default` is their own: bob's default submit and socket work beside alice's.
    let quick = json!({"kind": "sleep", "input": {"seconds": 0.1}});
    let alices_default = submit(&s, ALICE, quick.clone()).await;
    wait_status(&s, alices_default["id"].as_str().unwrap(), ALICE, "succeeded").await;
    let bobs_default = submit(&s, BOB, quick).await;
    assert_eq!(
        (alices_default["session"].as_str(), bobs_default["session"].as_str()),
        (Some("default"), Some("default"))
    );
    let bobs = bobs_default["id"].as_str().unwrap();
    let alices = alices_default["id"].as_str().unwrap();
    let request = ws_request(&s.gw, "since=0", &[bearer(BOB)]);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.expect("bob's default");
    // alice's task finished before bob's began: her events would come first.
    let seen = frames_until(&mut socket, "bob's default task", |f| {
        f["task_id"] == bobs && f["data"]["status"] == "succeeded"
    })
    .await;
    assert!(seen.iter().all(|f| f["task_id"] != alices), "bob saw alice's default: {seen:?}");

    // The admin reaches the unowned namespace (NATS-native tasks) with `owner=~`.
    let request = ws_request(&s.gw, "session=shared&owner=~&since=0", &[bearer(OPS)]);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    frame_where(&mut socket, "the native task's past", |f| f["task_id"] == "native-shared").await;

    // Events are addressed by namespace on NATS too: alice's are under `progress.alice.`.
    let stored = js.get_stream(topology::PROGRESS_STREAM).await.unwrap();
    let last =
        stored.get_last_raw_message_by_subject(&format!("progress.alice.shared.{hers}")).await;
    assert!(last.is_ok(), "alice's events are on progress.alice.shared.{hers}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claw_sends_its_token_and_says_when_it_has_none() {
    let s = stack().await;
    let claw = |args: &[&str], token: Option<&str>| {
        let mut command = tokio::process::Command::new(bin("claw"));
        command
            .args(args)
            .args(["--url", s.gw.url.as_str()])
            .env_remove("CLAW_URL")
            .env_remove("NATS_URL")
            .env_remove("RUST_LOG")
            .env_remove("CLAW_TOKEN")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(token) = token {
            command.env("CLAW_TOKEN", token);
        }
        async move {
            let out = tokio::time::timeout(Duration::from_secs(60), command.output())
                .await
                .expect("claw finished")
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            (out.status.code().unwrap(), stdout, String::from_utf8_lossy(&out.stderr).into_owned())
        }
    };

    let spec = json!({"kind": "sleep", "session": "alice-cli", "input": {"seconds": 0.1}});
    let id = submit(&s, ALICE, spec).await["id"].as_str().unwrap().to_owned();

    let (code, stdout, stderr) = claw(&["get", &id, "--json", "--token", ALICE], None).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap()["id"], id.as_str());
    let (code, _, stderr) = claw(&["get", &id], Some(ALICE)).await;
    assert_eq!(code, 0, "CLAW_TOKEN works too: {stderr}");

    // Without a token: refused (exit 1) with one line that says what to do.
    let (code, _, stderr) = claw(&["get", &id], None).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("(unauthorized)") && stderr.contains("--token"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    // bob's token reaches the gateway, but not alice's task.
    let (code, _, stderr) = claw(&["get", &id], Some(BOB)).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not_found"), "{stderr}");
}

/// Runs the real `claw-gateway` with `args` and returns its exit code and stderr.
async fn gateway_process(nats: &Nats, args: &[&str]) -> (Option<i32>, String) {
    let mut command = tokio::process::Command::new(bin("claw-gateway"));
    command
        .args(args)
        .args(["--nats-url", &nats.url()])
        .env_remove("CLAW_TOKENS_FILE")
        .env_remove("CLAW_INSECURE_NO_AUTH")
        .env_remove("CLAW_HTTP")
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("claw-gateway exited by itself")
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn the_gateway_refuses_a_public_address_without_tokens() {
    let nats = Nats::start();
    let (code, stderr) = gateway_process(&nats, &["--http", "0.0.0.0:0"]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("refusing to serve 0.0.0.0:0 without API tokens"), "{stderr}");
    assert!(stderr.contains("--tokens") && stderr.contains("--insecure-no-auth"), "{stderr}");

    // A tokens file that does not parse is named, with the reason, before anything starts.
    let bad = nats.dir.path().join("bad-tokens.toml");
    std::fs::write(&bad, "[principals.alice]\ntokens = [\"short\"]\n").unwrap();
    let args = ["--http", "0.0.0.0:0", "--tokens", bad.to_str().unwrap()];
    let (code, stderr) = gateway_process(&nats, &args).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("bad-tokens.toml") && stderr.contains("at least 16"), "{stderr}");
}

/// Issue 12: ids derived from an idempotency key are predictable (a UUIDv5 of the principal and
/// the key), so before, alice could submit with bob's future id as her explicit `id`, and every
/// submit of bob's with that key was a 422 "taken". A principal's explicit id may not be a
/// UUIDv5; any other id is still hers to choose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_id_cannot_take_another_principals_key() {
    let s = stack().await;
    let bobs_future = claw_proto::TaskId::derived("idempotency-key/bob", "order-7");
    let squat = json!({"kind": "sleep", "id": bobs_future.as_str()});
    let (status, body) = post(&s, "/v1/tasks", ALICE, Some(squat)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "id", "{body}");

    let response = reqwest::Client::new()
        .post(s.gw.url("/v1/tasks"))
        .bearer_auth(BOB)
        .header("content-type", "application/json")
        .header("Idempotency-Key", "order-7")
        .body(json!({"kind": "sleep"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let record: Value = response.json().await.unwrap();
    assert_eq!(
        (record["id"].as_str(), record["owner"].as_str()),
        (Some(bobs_future.as_str()), Some("bob"))
    );

    // Other explicit ids (a UUIDv4 or v7, a name) are the caller's to choose, as before.
    let own = json!({"kind": "sleep", "id": uuid::Uuid::new_v4().to_string()});
    assert_eq!(post(&s, "/v1/tasks", ALICE, Some(own)).await.0, StatusCode::ACCEPTED);
    let named = json!({"kind": "sleep", "id": "alice-job-1"});
    assert_eq!(post(&s, "/v1/tasks", ALICE, Some(named)).await.0, StatusCode::ACCEPTED);
}

/// The race of a fast worker with a submit: the worker finds no record yet and builds one from
/// the lane message, which does not say who submitted the task. The gateway writes the owner
/// into that record (keeping the worker's state), or creates the record when there is none.
#[tokio::test]
async fn a_record_a_worker_built_first_gets_its_submitters_owner() {
    use claw_proto::kinds::Catalog;
    use claw_proto::spec::{Limits, TaskSpec};
    use claw_proto::{Status, TaskId};
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let tokens = nats.dir.path().join("tokens.toml");
    std::fs::write(&tokens, tokens_file()).unwrap();
    let config = claw_gateway::Config::from_args(["--tokens", tokens.to_str().unwrap()]).unwrap();
    let app = claw_gateway::App::new(topo.clone(), config).await.unwrap();
    let now = time::OffsetDateTime::now_utc();
    let spec = TaskSpec::parse(br#"{"kind": "sleep", "session": "alice-s"}"#).unwrap();
    let admit =
        || spec.admit(TaskId::generate(), now, None, &Catalog::builtin(), &Limits::STANDARD);

    // The worker's record: running, no owner.
    let mut built = admit().unwrap();
    built.start(1, "w1", now).unwrap();
    topo.tasks_kv
        .create(built.id.as_str(), serde_json::to_vec(&built).unwrap().into())
        .await
        .unwrap();
    let mut submitted = built.clone();
    submitted.owner = Some("alice".into());
    claw_gateway::tasks::adopt(&app, &submitted).await.unwrap();
    let stored = claw_tests::record(&topo, built.id.as_str()).await.unwrap();
    assert_eq!((stored.owner.as_deref(), stored.status), (Some("alice"), Status::Running));

    // No record at all (the submit's create failed): created, queued, with the owner.
    let mut lost = admit().unwrap();
    lost.owner = Some("alice".into());
    claw_gateway::tasks::adopt(&app, &lost).await.unwrap();
    let stored = claw_tests::record(&topo, lost.id.as_str()).await.unwrap();
    assert_eq!((stored.owner.as_deref(), stored.status), (Some("alice"), Status::Queued));
}

/// The same race closed at its source: the gateway's lane message says its submitter writes the
/// record (`Claw-Record: submitter`), so a worker that gets it first waits for that record
/// instead of building one without the owner (whose events would go to the unowned subject,
/// and whose attempt would run without the principal's slot). Before, the worker built the
/// record at once and the submitter's create failed. A message whose record never comes runs
/// all the same once the wait is over.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_waits_for_the_record_its_submitter_is_writing() {
    use async_nats::HeaderMap;
    use claw_proto::kinds::Catalog;
    use claw_proto::spec::{Limits, TaskSpec};
    use claw_proto::topology::headers;
    use claw_proto::{Concurrency, Status, TaskId};
    use futures::StreamExt;

    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let _worker = claw_tests::start_worker(&topo, "ack_deadline_s = 2.0\n");
    let mut unowned = topo.js.client().subscribe("progress.late.*").await.unwrap();
    let mut owned = topo.js.client().subscribe("progress.alice.late.*").await.unwrap();
    let publish = async |id: &TaskId| {
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, id.as_str());
        h.insert(headers::RECORD, headers::RECORD_BY_SUBMITTER);
        let spec = json!({"id": id.as_str(), "kind": "sleep", "session": "late"});
        let ack = topo.js.publish_with_headers("tasks.short.normal", h, spec.to_string().into());
        ack.await.unwrap().await.unwrap();
    };

    // The lane message first, the record 200 ms later: the worker waits, then runs the record.
    let id = TaskId::generate();
    publish(&id).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let spec = TaskSpec::parse(br#"{"kind": "sleep", "session": "late"}"#).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let mut record =
        spec.admit(id.clone(), now, None, &Catalog::builtin(), &Limits::STANDARD).unwrap();
    record.owner = Some("alice".into());
    record.concurrency = vec![Concurrency::principal("alice", 1)];
    topo.records.create(&record).await.expect("the worker did not write the record first");
    let done = claw_tests::wait_status(&topo, id.as_str(), Status::Succeeded).await;
    assert_eq!((done.owner.as_deref(), done.concurrency.len()), (Some("alice"), 1));
    // Its last event on alice's subject: one publisher, one subscriber connection, so an event
    // of the task sent to the unowned subject before it would be here already.
    let ended = tokio::time::timeout(WAIT, async {
        while let Some(event) = owned.next().await {
            if std::str::from_utf8(&event.payload).unwrap().contains("\"succeeded\"") {
                return;
            }
        }
    });
    ended.await.expect("alice's task ends on her own subject");
    let leaked = futures::FutureExt::now_or_never(unowned.next());
    assert!(leaked.is_none(), "an event of alice's task on the unowned subject: {leaked:?}");

    // No record ever comes: built from the message once the wait is over, and run.
    let orphan = TaskId::generate();
    publish(&orphan).await;
    let done = claw_tests::wait_status(&topo, orphan.as_str(), Status::Succeeded).await;
    assert_eq!(done.owner, None);
}

/// Issue 12, quotas: each principal's limits from the tokens file. A principal over its submit
/// rate gets 429 `rate_limited` naming the limit, with `Retry-After`; past its open sockets or
/// watched sessions, 429 `quota_exceeded`; another principal is not touched; `/metrics` counts
/// each refusal by limit. Before, nothing limited a principal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_over_its_limits_gets_429s_that_name_them() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let tokens = nats.dir.path().join("tokens.toml");
    let limited = "[principals.alice.limits]\nsubmits_per_s = 1\nsubmit_burst = 3\n\
                   websockets = 2\nwatched_sessions = 1\n";
    std::fs::write(&tokens, format!("{}\n{limited}", tokens_file())).unwrap();
    let gw = Gateway::start(&topo, &["--tokens", tokens.to_str().unwrap()]).await;
    let submit = |token: &'static str| {
        let url = gw.url("/v1/tasks");
        async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(json!({"kind": "sleep"}).to_string())
                .send()
                .await
                .unwrap()
        }
    };
    for _ in 0..3 {
        assert_eq!(submit(ALICE).await.status(), StatusCode::ACCEPTED);
    }
    let refused_submit = submit(ALICE).await;
    assert_eq!(refused_submit.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after = refused_submit.headers()["retry-after"].to_str().unwrap().parse::<u64>();
    assert!(matches!(retry_after, Ok(1..=2)), "{retry_after:?}");
    let body: Value = refused_submit.json().await.unwrap();
    assert_eq!(
        (body["error"]["code"].as_str(), body["error"]["limit"].as_str()),
        (Some("rate_limited"), Some("submits_per_s")),
        "{body}"
    );
    // bob has the defaults, untouched by alice's use.
    assert_eq!(submit(BOB).await.status(), StatusCode::ACCEPTED);

    // Sockets: two open at once, over one watched session.
    let open = |query: &'static str| {
        tokio_tungstenite::connect_async(ws_request(
            &gw,
            query,
            &[("authorization", format!("Bearer {ALICE}"))],
        ))
    };
    let (first, _) = open("session=one").await.unwrap();
    let quota = |query: &'static str, limit: &'static str| async move {
        match open(query).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 429);
                let body: Value =
                    serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
                assert_eq!(body["error"]["code"], "quota_exceeded", "{body}");
                assert_eq!(body["error"]["limit"], limit, "{body}");
            }
            other => panic!("expected 429 {limit}, got {other:?}"),
        }
    };
    quota("session=two", "watched_sessions").await;
    let (_second, _) = open("session=one").await.expect("the same session costs no more");
    quota("session=one", "websockets").await;
    // Closing a socket gives its place back.
    drop(first);
    wait_for("a socket's place back", WAIT, || async { open("session=one").await.ok() }).await;

    let metrics = reqwest::Client::new()
        .get(gw.url("/metrics"))
        .bearer_auth(BOB)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for limit in ["submits_per_s", "websockets", "watched_sessions"] {
        let line = format!("claw_gateway_refusals_total{{limit=\"{limit}\"}}");
        assert!(metrics.contains(&line), "{line} in /metrics:\n{metrics}");
    }
}
