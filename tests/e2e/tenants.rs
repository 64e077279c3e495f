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
    submit_with(&reqwest::Client::new(), gw, token, &body).await
}

/// [`submit`] on `http`'s connection pool.
async fn submit_with(
    http: &reqwest::Client,
    gw: &Gateway,
    token: &str,
    body: &Value,
) -> (StatusCode, Value) {
    let response = http
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

/// The twin of the test above at the shipped limits (no `[limits]` in the tokens file). They
/// let one principal fill the queue for everyone: its `queued_tasks` (10 000) was the queue's
/// own limit. Now a principal at its default rate fills its 2 000 and is refused, and another
/// principal's task is still taken.
#[tokio::test(flavor = "multi_thread")]
async fn at_the_shipped_limits_one_principal_cannot_fill_the_queue() {
    use claw_gateway::quota::DEFAULT_QUEUED_TASKS;

    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let tokens = nats.dir.path().join("tokens.toml");
    std::fs::write(&tokens, tokens_file("")).unwrap();
    let _archiver = start_archiver(&topo, &nats.dir.path().join("archive.sqlite"));
    let gw = Gateway::start(&topo, &["--tokens", tokens.to_str().unwrap()]).await;

    // No worker: every task waits. Submitted as fast as alice's default rate lets her, eight at
    // a time on one connection pool.
    let task = json!({"kind": "sleep", "input": {"seconds": 1}});
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let one = async |_| loop {
        assert!(std::time::Instant::now() < deadline, "alice's tasks not all taken in 120 s");
        let (status, body) = submit_with(&http, &gw, ALICE, &task).await;
        match status {
            StatusCode::ACCEPTED => return,
            // Past the burst: the rate admits one every 10 ms.
            StatusCode::TOO_MANY_REQUESTS if body["error"]["limit"] == "submits_per_s" => {
                tokio::time::sleep(std::time::Duration::from_millis(40)).await;
            }
            _ => panic!("{status} {body}"),
        }
    };
    futures::StreamExt::for_each_concurrent(futures::stream::iter(0..DEFAULT_QUEUED_TASKS), 8, one)
        .await;
    wait_for("the archiver to count alice's tasks", WAIT, || async {
        (usage(&gw, ALICE).await["holds"]["queued"] == DEFAULT_QUEUED_TASKS).then_some(())
    })
    .await;
    let answer = loop {
        let answer = submit(&gw, ALICE, task.clone()).await;
        if answer.1["error"]["limit"] != "submits_per_s" {
            break answer;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    refused(&answer, "queued_tasks");
    let (status, body) = submit(&gw, BOB, task.clone()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "bob's task is taken: {body}");
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

/// Before this change nothing held a principal to a share of the workers: with a backlog it took
/// every slot of every worker until the backlog drained. Now at most its `running_tasks` run at
/// once, on all workers together, including while a worker holding one of them is SIGKILLed;
/// the others wait `queued`, saying why, without a worker slot, and another principal's tasks
/// start at once beside them.
#[tokio::test(flavor = "multi_thread")]
async fn running_tasks_hold_a_principal_to_its_share_of_all_workers_even_when_one_is_killed() {
    use claw_proto::{Status, TaskRecord};
    use claw_tests::{WorkerProcess, record, signal, worker_status};
    use std::collections::HashMap;
    use std::time::Duration;

    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let tokens = nats.dir.path().join("tokens.toml");
    // bob keeps the shipped default.
    std::fs::write(&tokens, tokens_file("[principals.alice.limits]\nrunning_tasks = 2\n")).unwrap();
    let gw = Gateway::start(&topo, &["--tokens", tokens.to_str().unwrap()]).await;
    // Three worker processes of four slots: twelve slots, of which alice may hold two.
    let mut workers: HashMap<String, WorkerProcess> = HashMap::new();
    for i in 1..=3 {
        let name = format!("w{i}");
        let toml = format!("name = \"{name}\"\nack_deadline_s = 2.0\nmax_concurrent = 4\n");
        workers.insert(name.clone(), WorkerProcess::start(&nats, &name, &toml));
        let client = topo.js.client();
        wait_for(&format!("worker {name}"), WAIT, || worker_status(&client, &name)).await;
    }

    let sleep = |s: f64| json!({"kind": "sleep", "input": {"seconds": s}});
    let mut alice = Vec::new();
    for _ in 0..8 {
        let (status, body) = submit(&gw, ALICE, sleep(3.0)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        assert_eq!(body["concurrency"], json!([{"key": "principal:alice", "limit": 2}]));
        alice.push(body["id"].as_str().unwrap().to_owned());
    }
    let records = async |ids: &[String]| -> Vec<TaskRecord> {
        let mut out = Vec::new();
        for id in ids {
            out.extend(record(&topo, id).await);
        }
        out
    };
    let running = |rs: &[TaskRecord]| -> Vec<TaskRecord> {
        rs.iter().filter(|r| r.status == Status::Running).cloned().collect()
    };

    // Two run; the others wait, queued, and say for what.
    let waiter = wait_for("two of alice's tasks running, the others parked", WAIT, || async {
        let rs = records(&alice).await;
        let waiter = rs.iter().find(|r| r.status == Status::Queued && r.waiting.is_some());
        waiter.filter(|_| running(&rs).len() == 2).cloned()
    })
    .await;
    assert_eq!(waiter.waiting.as_deref(), Some("concurrency principal:alice (limit 2)"));
    assert_eq!(usage(&gw, ALICE).await["limits"]["running_tasks"], 2);

    // bob's tasks start at once beside alice's six waiting ones, under the default limit.
    let mut bob = Vec::new();
    for _ in 0..3 {
        let (status, body) = submit(&gw, BOB, sleep(0.1)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let default = claw_gateway::quota::DEFAULT_RUNNING_TASKS;
        assert_eq!(body["concurrency"], json!([{"key": "principal:bob", "limit": default}]));
        bob.push(body["id"].as_str().unwrap().to_owned());
    }
    let bobs = wait_for("bob's tasks succeeded", WAIT, || async {
        let rs = records(&bob).await;
        rs.iter().all(|r| r.status == Status::Succeeded).then_some(rs)
    })
    .await;
    for r in &bobs {
        let waited = (r.started_at.unwrap() - r.created_at).as_seconds_f64();
        assert!(waited < 1.0, "bob's task waited {waited:.2} s behind alice's");
    }

    // SIGKILL the worker of a running task of alice's: its slot stays with the task, which the
    // redelivery runs again elsewhere; nothing else of alice's takes the slot meanwhile.
    let victim = running(&records(&alice).await).into_iter().next().expect("one of alice's runs");
    let killed = workers.remove(victim.worker.as_deref().unwrap()).unwrap();
    signal(killed.pid(), libc::SIGKILL);
    drop(killed);

    let mut most = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let finished = loop {
        let rs = records(&alice).await;
        most = most.max(running(&rs).len());
        if rs.len() == alice.len() && rs.iter().all(|r| r.status == Status::Succeeded) {
            break rs;
        }
        assert!(tokio::time::Instant::now() < deadline, "alice's tasks did not all succeed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(most <= 2, "{most} of alice's tasks were seen running at once");

    // From the records: never more than two of alice's attempts overlapped, and two did.
    let mut edges: Vec<(time::OffsetDateTime, i32)> = finished
        .iter()
        .flat_map(|r| [(r.started_at.unwrap(), 1), (r.finished_at.unwrap(), -1)])
        .collect();
    edges.sort();
    let (mut now, mut peak) = (0, 0);
    for (_, step) in edges {
        now += step;
        peak = peak.max(now);
    }
    assert_eq!(peak, 2, "alice's attempts overlapped {peak} at most");
    let rerun = finished.iter().find(|r| r.id == victim.id).unwrap();
    assert_eq!(rerun.attempt, 2, "the killed worker's task ran again: {rerun:?}");
    assert_ne!(rerun.worker, victim.worker);
}
