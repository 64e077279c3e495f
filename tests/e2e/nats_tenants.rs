//! Tenants on NATS: principals of the gateway's tokens file that talk NATS, each as a NATS user
//! made from the shipped tenant template of `nats/accounts/claw.conf`. A tenant's requests on
//! `claw.api.as.<name>.*` act as that principal (its tasks only, its quotas, lanes for admins);
//! the server refuses it every other tenant's subjects, the anonymous API and the JetStream API.

use async_nats::Message;
use claw_proto::topology::{self, Settings};
use claw_tests::{AsUser, Gateway, Nats, WAIT, start_worker, wait_for};
use futures::StreamExt;
use serde_json::{Value, json};

/// Tenants with a NATS user; `carol` is none of the gateway's principals.
const TENANTS: [&str; 4] = ["alice", "bob", "ops", "carol"];

/// The tokens file: alice may submit one task a second in bursts of four; ops is an admin.
fn tokens_file() -> String {
    "[principals.alice]\ntokens = [\"claw_alice-0123456789abcdef\"]\n\
     [principals.alice.limits]\nsubmits_per_s = 1\nsubmit_burst = 4\n\n\
     [principals.bob]\ntokens = [\"claw_bob-0123456789abcdef\"]\n\n\
     [principals.ops]\ntokens = [\"claw_ops-0123456789abcdef\"]\nadmin = true\n"
        .to_owned()
}

/// A tenant's connection (its own inbox prefix, as the template says) that records the server's
/// errors, with its requests on its own `claw.api.as.<name>.*`.
struct Tenant(AsUser);

impl std::ops::Deref for Tenant {
    type Target = AsUser;
    fn deref(&self) -> &AsUser {
        &self.0
    }
}

impl Tenant {
    async fn connect(nats: &Nats, name: &'static str) -> Tenant {
        Tenant(AsUser::connect(nats, name).await)
    }

    /// A request on this tenant's own `claw.api.as.<name>.<verb>`.
    async fn request(&self, verb: &str, body: Value) -> Message {
        let subject = topology::principal_api_subject(self.user, verb);
        self.client
            .request(subject.clone(), body.to_string().into())
            .await
            .unwrap_or_else(|e| panic!("{} requests {subject}: {e}", self.user))
    }

    /// A request that must succeed: the reply's JSON.
    async fn ok(&self, verb: &str, body: Value) -> Value {
        let reply = self.request(verb, body).await;
        assert_eq!(code_of(&reply), None, "{} {verb}: {}", self.user, text(&reply));
        serde_json::from_slice(&reply.payload).unwrap()
    }

    /// A request that must fail with `code`: the error body.
    async fn refused(&self, verb: &str, body: Value, code: &str) -> Value {
        let reply = self.request(verb, body).await;
        assert_eq!(
            code_of(&reply).as_deref(),
            Some(code),
            "{} {verb}: {}",
            self.user,
            text(&reply)
        );
        let body: Value = serde_json::from_slice(&reply.payload).unwrap();
        assert!(body["error"]["message"].is_string(), "our error body: {body}");
        body
    }
}

/// The gateway with the tokens file and a worker, each connected as its shipped role.
async fn serve(nats: &Nats) -> (Gateway, claw_tests::Running) {
    let gw_topo = nats.role_topology("gateway", &Settings::standard()).await;
    let tokens = nats.dir.path().join("tokens.toml");
    std::fs::write(&tokens, tokens_file()).unwrap();
    let gateway = Gateway::start(&gw_topo, &["--tokens", tokens.to_str().unwrap()]).await;
    let worker_topo = nats.role_topology("worker", &Settings::standard()).await;
    (gateway, start_worker(&worker_topo, "ack_deadline_s = 2.0\n"))
}

/// The micro error code of a reply (`Nats-Service-Error-Code`), none for a success.
fn code_of(reply: &Message) -> Option<String> {
    let headers = reply.headers.as_ref()?;
    headers.get(async_nats::service::NATS_SERVICE_ERROR_CODE).map(|v| v.as_str().to_owned())
}

fn text(reply: &Message) -> String {
    String::from_utf8_lossy(&reply.payload).into_owned()
}

#[tokio::test]
async fn a_tenant_on_nats_is_its_principal_and_nobody_else() {
    let nats = Nats::start_secure_with_tenants(&TENANTS);
    let (_gw, _worker) = serve(&nats).await;

    let alice = Tenant::connect(&nats, "alice").await;
    let bob = Tenant::connect(&nats, "bob").await;
    let ops = Tenant::connect(&nats, "ops").await;
    let carol = Tenant::connect(&nats, "carol").await;
    wait_for("the gateway's claw-api to answer alice", WAIT, || async {
        let subject = topology::principal_api_subject("alice", "lanes");
        let reply = alice.client.request(subject, "{}".into()).await.ok()?;
        (code_of(&reply).is_none()).then_some(())
    })
    .await;

    // alice follows her session, and submits into it: the task is hers.
    let mut events = alice.client.subscribe("progress.alice.s1.*").await.unwrap();
    let spec = json!({"kind": "sleep", "session": "s1", "input": {"seconds": 60, "steps": 60}});
    let record = alice.ok("submit", spec).await;
    let id = record["id"].as_str().unwrap().to_owned();
    assert_eq!(record["owner"], "alice", "{record}");
    wait_for(&format!("alice's task {id} to run"), WAIT, || async {
        let record = alice.ok("get", json!({"id": id})).await;
        (record["status"] == "running").then_some(())
    })
    .await;

    // bob, through his own subjects, cannot see or touch it: 404, as if it did not exist ...
    bob.refused("get", json!({"id": id}), "404").await;
    bob.refused("cancel", json!({"id": id}), "404").await;
    // ... and the server refuses him alice's subjects and her events.
    bob.refused_publish(&topology::principal_api_subject("alice", "cancel")).await;
    bob.refused_subscribe("progress.alice.*.*").await;
    alice.refused_subscribe("progress.bob.*.*").await;
    // Nor may a tenant use the anonymous API (which sees every task) or read records directly.
    alice.refused_publish(&topology::api_subject("get")).await;
    alice.refused_publish(&format!("$JS.API.DIRECT.GET.KV_tasks.$KV.tasks.{id}")).await;

    // The admin sees it; a NATS user the tokens file does not name gets a clear 401.
    assert_eq!(ops.ok("get", json!({"id": id})).await["owner"], "alice");
    let unknown = carol.refused("get", json!({"id": id}), "401").await;
    assert!(unknown["error"]["message"].as_str().unwrap().contains("carol"), "{unknown}");

    // Lanes are for admins, as over HTTP.
    let lane = json!({"class": "long", "priority": "low"});
    alice.refused("lanes.pause", lane.clone(), "403").await;
    assert_eq!(ops.ok("lanes.pause", lane.clone()).await["paused"], true);
    assert_eq!(ops.ok("lanes.resume", lane).await["paused"], false);

    // alice cancels her running task; it ends cancelled, and she saw it on her session's subject.
    alice.ok("cancel", json!({"id": id})).await;
    wait_for(&format!("alice's task {id} cancelled"), WAIT, || async {
        let record = alice.ok("get", json!({"id": id})).await;
        (record["status"] == "cancelled").then_some(())
    })
    .await;
    let subject = format!("progress.alice.s1.{id}");
    let cancelled = tokio::time::timeout(WAIT, async {
        while let Some(event) = events.next().await {
            assert_eq!(event.subject.as_str(), subject, "an event of alice's session");
            let event: Value = serde_json::from_slice(&event.payload).unwrap();
            if event["type"] == "status" && event["data"]["status"] == "cancelled" {
                return event;
            }
        }
        panic!("alice's events ended");
    })
    .await
    .expect("alice sees her task's cancelled event");
    assert_eq!(cancelled["task_id"], id.as_str(), "{cancelled}");

    // Her quota applies: past her burst, a submit is refused, naming the limit.
    let refusal = tokio::time::timeout(WAIT, async {
        loop {
            let reply = alice.request("submit", json!({"kind": "sleep", "session": "s1"})).await;
            if code_of(&reply).is_some() {
                return reply;
            }
        }
    })
    .await
    .expect("alice's submits refused within her burst");
    assert_eq!(code_of(&refusal).as_deref(), Some("429"), "{}", text(&refusal));
    let body: Value = serde_json::from_slice(&refusal.payload).unwrap();
    assert_eq!(body["error"]["limit"], "submits_per_s", "{body}");
    assert!(alice.errors.lock().unwrap().iter().all(|e| !e.contains("claw.api.as.alice")));
}

/// A tenant has no JetStream API, so before `claw.api.as.<name>.payload` it could not read an
/// input or result over 64 KiB (kept in the object store) over NATS at all. Now it reads its own
/// a chunk per request, the same bytes as `GET /v1/tasks/{id}/result`; another tenant gets 404.
#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_reads_its_large_result_over_nats_a_chunk_at_a_time() {
    use claw_proto::topology::headers;

    let nats = Nats::start_secure_with_tenants(&TENANTS);
    let (gw, _worker) = serve(&nats).await;
    let (alice, bob) = (Tenant::connect(&nats, "alice").await, Tenant::connect(&nats, "bob").await);

    // 300 KB of echo: the input and the result each go to the object store (three chunks).
    let echo = "e".repeat(300_000);
    let spec = json!({"kind": "sleep", "input": {"seconds": 0, "echo": echo}});
    let id = alice.ok("submit", spec).await["id"].as_str().unwrap().to_owned();
    let record = wait_for("alice's large task to succeed", WAIT, || async {
        let record = alice.ok("get", json!({"id": id})).await;
        (record["status"] == "succeeded").then_some(record)
    })
    .await;
    assert!(record["result_ref"]["size"].as_u64().unwrap() > 300_000, "{record}");

    let read = async |part: &str| -> Vec<u8> {
        let (mut bytes, mut from) = (Vec::new(), 0u64);
        loop {
            let reply =
                alice.request("payload", json!({"id": id, "part": part, "from": from})).await;
            assert_eq!(code_of(&reply), None, "payload {part}: {}", text(&reply));
            let h = reply.headers.as_ref().expect("payload headers");
            let size: usize = h.get(headers::PAYLOAD_SIZE).unwrap().as_str().parse().unwrap();
            bytes.extend_from_slice(&reply.payload);
            assert!(bytes.len() <= size, "more than the payload's size");
            if bytes.len() == size {
                return bytes;
            }
            from = h
                .get(headers::PAYLOAD_NEXT)
                .expect("where the next chunk is")
                .as_str()
                .parse()
                .unwrap();
        }
    };
    let result = read("result").await;
    let over_http = reqwest::Client::new()
        .get(gw.url(&format!("/v1/tasks/{id}/result")))
        .bearer_auth("claw_alice-0123456789abcdef")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(result, over_http.to_vec(), "the same bytes as over HTTP");
    let result: Value = serde_json::from_slice(&result).unwrap();
    assert_eq!(result["echo"].as_str().map(str::len), Some(300_000));
    let input: Value = serde_json::from_slice(&read("input").await).unwrap();
    assert_eq!(input["echo"].as_str().map(str::len), Some(300_000));

    // Inline payloads come whole; another tenant's reads are 404, as if the task did not exist.
    let small = alice.ok("submit", json!({"kind": "sleep", "input": {"seconds": 0}})).await;
    let reply = alice.request("payload", json!({"id": small["id"], "part": "input"})).await;
    assert_eq!(serde_json::from_slice::<Value>(&reply.payload).unwrap(), json!({"seconds": 0}));
    bob.refused("payload", json!({"id": id, "part": "result"}), "404").await;
    alice.refused("payload", json!({"id": id, "part": "output"}), "422").await;
}
