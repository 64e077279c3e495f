//! Many tenants on one system: each principal's share of what the whole system holds (tasks
//! waiting to run, bytes stored), counted across gateways from the archiver's view of the
//! bucket (`claw.archive.usage`), and refused with a 429 that names the limit.

use claw_tests::{Gateway, Nats, WAIT, start_archiver, test_settings, wait_for};
use reqwest::StatusCode;
use serde_json::{Value, json};

const ALICE: &str = "claw_alice-0123456789abcdef";
const BOB: &str = "claw_bob-0123456789abcdef";

fn tokens_file(limits: &str) -> String {
    format!(
        "[principals.alice]\ntokens = [\"{ALICE}\"]\n\n[principals.bob]\ntokens = [\"{BOB}\"]\n\n\
         {limits}"
    )
}

async fn submit(gw: &Gateway, token: &str, body: Value) -> (StatusCode, Value) {
    let response = reqwest::Client::new()
        .post(gw.url("/v1/tasks"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

async fn usage(gw: &Gateway, token: &str) -> Value {
    let response =
        reqwest::Client::new().get(gw.url("/v1/usage")).bearer_auth(token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

fn refused(answer: &(StatusCode, Value), limit: &str) {
    let (status, body) = answer;
    assert_eq!(*status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "quota_exceeded", "{body}");
    assert_eq!(body["error"]["limit"], limit, "{body}");
}

/// Before this change the queue limit was the system's (10 000 for everyone together) and
/// nothing counted bytes: one principal could fill the queue and the account for all.
#[tokio::test(flavor = "multi_thread")]
async fn queued_tasks_and_stored_bytes_are_each_principals_across_gateways() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let tokens = nats.dir.path().join("tokens.toml");
    let limits = "[principals.alice.limits]\nqueued_tasks = 3\n\n\
                  [principals.bob.limits]\nstored_bytes = 40000\n";
    std::fs::write(&tokens, tokens_file(limits)).unwrap();
    let _archiver = start_archiver(&topo, &nats.dir.path().join("archive.sqlite"));
    let args = ["--tokens", tokens.to_str().unwrap()];
    let (a, b) = (Gateway::start(&topo, &args).await, Gateway::start(&topo, &args).await);

    // No worker: alice's tasks wait. Three through gateway b; its own count refuses a fourth.
    let sleep = json!({"kind": "sleep", "input": {"seconds": 1}});
    for _ in 0..3 {
        assert_eq!(submit(&b, ALICE, sleep.clone()).await.0, StatusCode::ACCEPTED);
    }
    // Gateway a admitted none of them: it learns of them from the archiver.
    wait_for("gateway a to count alice's three waiting tasks", WAIT, || async {
        (usage(&a, ALICE).await["holds"]["queued"] == 3).then_some(())
    })
    .await;
    let answer = submit(&a, ALICE, sleep.clone()).await;
    refused(&answer, "queued_tasks");
    refused(&submit(&b, ALICE, sleep.clone()).await, "queued_tasks");
    // Bob is not touched by alice's queue.
    assert_eq!(submit(&a, BOB, sleep.clone()).await.0, StatusCode::ACCEPTED);

    // Bob may hold 40 000 bytes: 30 000 through a, then 15 000 more through b is too much.
    let big = |n: usize| json!({"kind": "sleep", "input": {"seconds": 1, "echo": "x".repeat(n)}});
    assert_eq!(submit(&a, BOB, big(30_000)).await.0, StatusCode::ACCEPTED);
    wait_for("gateway b to count bob's bytes", WAIT, || async {
        (usage(&b, BOB).await["holds"]["bytes"].as_u64()? > 30_000).then_some(())
    })
    .await;
    refused(&submit(&b, BOB, big(15_000)).await, "stored_bytes");
    assert_eq!(submit(&b, BOB, big(1_000)).await.0, StatusCode::ACCEPTED, "what still fits");

    let view = usage(&a, ALICE).await;
    assert_eq!(
        (view["principal"].as_str(), &view["limits"]["queued_tasks"]),
        (Some("alice"), &json!(3))
    );
    let metrics = reqwest::Client::new().get(a.url("/metrics")).bearer_auth(BOB).send();
    let metrics = metrics.await.unwrap().text().await.unwrap();
    assert!(metrics.contains("claw_gateway_refusals_total{limit=\"queued_tasks\"}"), "{metrics}");
    assert!(metrics.contains("claw_gateway_usage_age_seconds"), "{metrics}");
}

/// Before this change a task streamed up to 2.5 MB/s of output into `PROGRESS` (1 GiB for
/// everyone): a few chatty tasks evicted every other session's event history in minutes. With
/// the worker's default shares (64 KiB/s a session, bursts of 1 MiB) a task that prints 50 MB in lines of 100 bytes
/// puts little more than the burst into the stream, says what it dropped, and succeeds; a quiet
/// session beside it loses nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_chatty_session_gets_its_share_of_the_event_history_and_no_more() {
    use claw_proto::Status;
    use claw_proto::event::EventBody;
    use claw_tests::{events_of, start_worker, submit_direct, wait_status};

    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    // The shipped defaults: no [events] section.
    let toml = "ack_deadline_s = 2.0\n\
        [programs.flood]\npath = \"/bin/sh\"\n\
        args = [\"-c\", \"yes $(head -c 99 /dev/zero | tr '\\\\0' y) | head -c 50000000\"]\n\
        [programs.hello]\npath = \"/bin/sh\"\nargs = [\"-c\", \"echo hello; echo world\"]\n";
    let _worker = start_worker(&topo, toml);
    let spec = |session: &str, program: &str| json!({"kind": "exec", "session": session, "timeout_s": 120, "input": {"program": program}});
    let chatty = submit_direct(&topo, spec("chatty", "flood")).await;
    let quiet = submit_direct(&topo, spec("quiet", "hello")).await;
    let flooded = wait_status(&topo, &chatty, Status::Succeeded).await;
    wait_status(&topo, &quiet, Status::Succeeded).await;

    let output = |events: &[claw_proto::event::Event]| -> String {
        events
            .iter()
            .filter_map(|e| match &e.body {
                EventBody::Output { text } => Some(text.as_str()),
                _ => None,
            })
            .collect()
    };
    let chatty_out = output(&events_of(&topo.js, &chatty).await);
    let ran_s = (flooded.finished_at.unwrap() - flooded.started_at.unwrap()).as_seconds_f64();
    let share = 1024 * 1024 + 64 * 1024 * (ran_s.ceil() as usize + 1) + 64 * 1024;
    assert!(
        chatty_out.len() <= share,
        "{} bytes of events in {ran_s:.1} s: over the session's share of {share}",
        chatty_out.len()
    );
    assert!(chatty_out.contains("bytes of output dropped"), "the drop is told");
    assert_eq!(output(&events_of(&topo.js, &quiet).await), "hello\nworld\n", "quiet loses nothing");
}
