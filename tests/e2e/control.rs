//! Task control through the gateway: cancel, pause, resume and retry of queued and finished
//! tasks, the cancel-versus-pickup race, lane pause, and the same verbs over NATS.
//! (What a worker does with a task it holds is in `control_worker`.)

use std::time::Duration;

use claw_proto::Status;
use claw_proto::topology;
use claw_tests::{
    Gateway, Nats, record, start_archiver, start_worker, stream_messages, test_settings, wait_for,
    wait_status,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

struct Api {
    gw: Gateway,
    http: reqwest::Client,
}

impl Api {
    async fn submit(&self, spec: Value) -> String {
        let response = self
            .http
            .post(self.gw.url("/v1/tasks"))
            .header("content-type", "application/json")
            .body(spec.to_string())
            .send();
        let record: Value = response.await.unwrap().json().await.unwrap();
        record["id"].as_str().unwrap_or_else(|| panic!("submit refused: {record}")).to_owned()
    }

    async fn verb(&self, id: &str, verb: &str) -> (StatusCode, Value) {
        let response = self.http.post(self.gw.url(&format!("/v1/tasks/{id}/{verb}"))).send();
        let response = response.await.unwrap();
        (response.status(), response.json().await.unwrap())
    }
}

async fn api(topo: &topology::Topology) -> Api {
    Api { gw: Gateway::start(topo, &[]).await, http: reqwest::Client::new() }
}

#[tokio::test]
async fn cancel_of_a_queued_task_removes_it_and_it_never_starts() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let api = api(&topo).await;
    let id = api.submit(json!({"kind": "sleep", "input": {"seconds": 0.1}})).await;
    assert_eq!(stream_messages(&topo.js, topology::TASKS_STREAM).await, 1);

    let (status, body) = api.verb(&id, "cancel").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["status"].as_str(), body["cause"].as_str()),
        (Some("cancelled"), Some("user"))
    );
    assert_eq!(stream_messages(&topo.js, topology::TASKS_STREAM).await, 0, "gone from TASKS");

    // A repeat is harmless; other verbs on a cancelled task say why not.
    let (status, _) = api.verb(&id, "cancel").await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = api.verb(&id, "pause").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "conflict");
    assert_eq!(body["error"]["status"], "cancelled");

    // A worker that starts now runs later tasks but never this one.
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0\n");
    let other = api.submit(json!({"kind": "sleep"})).await;
    wait_status(&topo, &other, Status::Succeeded).await;
    let cancelled = record(&topo, &id).await.unwrap();
    assert_eq!((cancelled.status, cancelled.attempt), (Status::Cancelled, 0));
    assert_eq!(cancelled.started_at, None);

    let _archiver = start_archiver(&topo, &nats.dir.path().join("archive.sqlite"));
    let (status, body) = wait_for("the archive to answer", Duration::from_secs(10), || async {
        Some(api.verb("no-such-task", "cancel").await)
            .filter(|(status, _)| *status != StatusCode::SERVICE_UNAVAILABLE)
    })
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
}

/// Whether `TASKS` still holds a message of task `id` (by its `Nats-Msg-Id`, `<id>[:rev]`).
async fn queued_copies(topo: &topology::Topology, id: &str) -> usize {
    claw_tests::stream_contents(&topo.js, topology::TASKS_STREAM)
        .await
        .iter()
        .filter(|m| {
            m.headers.get(topology::headers::MSG_ID).is_some_and(|v| {
                let v = v.as_str();
                v == id || v.split_once(':').is_some_and(|(i, _)| i == id)
            })
        })
        .count()
}

#[tokio::test]
async fn cancel_and_pause_find_their_task_anywhere_in_a_deep_lane() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let api = api(&topo).await;
    let spec = json!({"kind": "sleep"});
    let head = api.submit(spec.clone()).await;
    // 300 others behind it, straight to the same lane; no worker runs.
    let mut acks = Vec::new();
    for _ in 0..300 {
        let body = spec.to_string().into_bytes().into();
        acks.push(topo.js.publish("tasks.short.normal", body).await.unwrap());
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let tail = api.submit(spec.clone()).await;
    assert_eq!(stream_messages(&topo.js, topology::TASKS_STREAM).await, 302);

    for (id, left) in [(&head, 301), (&tail, 300)] {
        let (status, body) = api.verb(id, "cancel").await;
        assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("cancelled")));
        assert_eq!(queued_copies(&topo, id).await, 0, "{id} still queued");
        assert_eq!(stream_messages(&topo.js, topology::TASKS_STREAM).await, left);
    }

    // Pause, resume (a new copy at the tail), pause again: the new copy is the one taken out.
    let task = api.submit(spec.clone()).await;
    for (verb, copies) in [("pause", 0), ("resume", 1), ("pause", 0)] {
        let (status, body) = api.verb(&task, verb).await;
        assert_eq!(status, StatusCode::OK, "{verb}: {body}");
        assert_eq!(queued_copies(&topo, &task).await, copies, "after {verb}");
    }
    assert_eq!(stream_messages(&topo.js, topology::TASKS_STREAM).await, 300);
}

#[tokio::test]
async fn pause_of_a_queued_task_takes_it_out_of_the_queue_until_resumed() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let api = api(&topo).await;
    let id = api.submit(json!({"kind": "sleep", "input": {"seconds": 0.1}})).await;

    let (status, body) = api.verb(&id, "pause").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "paused");
    assert_eq!(stream_messages(&topo.js, topology::TASKS_STREAM).await, 0);

    // A worker does not see it while it is paused...
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0\n");
    let other = api.submit(json!({"kind": "sleep"})).await;
    wait_status(&topo, &other, Status::Succeeded).await;
    assert_eq!(record(&topo, &id).await.unwrap().status, Status::Paused);

    // ...and runs it once resumed.
    let (status, body) = api.verb(&id, "resume").await;
    assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("queued")), "{body}");
    let done = wait_status(&topo, &id, Status::Succeeded).await;
    assert_eq!(done.attempt, 1);
}

#[tokio::test]
async fn retry_runs_a_cancelled_or_failed_task_again_under_the_same_id() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let api = api(&topo).await;

    // Cancelled while queued (no worker yet), then retried: it runs, once.
    let cancelled = api.submit(json!({"kind": "sleep", "input": {"echo": "again"}})).await;
    api.verb(&cancelled, "cancel").await;
    let (status, body) = api.verb(&cancelled, "retry").await;
    assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("queued")), "{body}");
    let (status, _) = api.verb(&cancelled, "retry").await;
    assert_eq!(status, StatusCode::OK, "a repeated retry is harmless");
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0\n");
    let done = wait_status(&topo, &cancelled, Status::Succeeded).await;
    assert_eq!(done.result.unwrap()["echo"], "again");
    assert_eq!(stream_messages(&topo.js, topology::TASKS_STREAM).await, 0, "ran once");
    let (status, body) = api.verb(&cancelled, "retry").await;
    assert_eq!(
        (status, body["error"]["status"].as_str()),
        (StatusCode::CONFLICT, Some("succeeded"))
    );

    // Failed for good (one attempt allowed), then retried: a new round runs.
    let failed = api
        .submit(json!({"kind": "sleep", "max_attempts": 1, "input": {"fail_attempts": 1}}))
        .await;
    let first = wait_status(&topo, &failed, Status::Failed).await;
    let (status, body) = api.verb(&failed, "retry").await;
    assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("queued")), "{body}");
    let second = wait_for("the retried task to finish again", Duration::from_secs(20), || async {
        record(&topo, &failed)
            .await
            .filter(|r| r.status.is_terminal() && r.finished_at > first.finished_at)
    })
    .await;
    assert_eq!(second.status, Status::Failed, "its planned failure is per attempt number");
}

/// 100 rounds of submit-then-cancel against a free worker: every task ends `cancelled` or
/// `succeeded`, never stuck `running`, and its program agrees with the record: a succeeded
/// task's program finished (it leaves a marker), and no cancelled task's program is left alive.
#[tokio::test]
async fn cancel_racing_pickup_always_has_one_winner() {
    const ROUNDS: usize = 100;
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let dir = nats.dir.path().join("race");
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("work.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nsleep 0.05\ntouch \"$1/done-$2\"\necho '{\"result\": \"ok\"}'\n",
    )
    .unwrap();
    let mut perms = std::fs::metadata(&script).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&script, perms).unwrap();
    let config = format!(
        "ack_deadline_s = 2.0\nkill_grace_s = 0.5\n[programs.work]\npath = {:?}\nargs = [{:?}]\n",
        script.display().to_string(),
        dir.display().to_string()
    );
    let _worker = start_worker(&topo, &config);
    let api = api(&topo).await;

    let mut ids = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let tag = format!("r{round}");
        let id = api
            .submit(json!({"kind": "exec", "class": "short",
                "input": {"program": "work", "args": [tag]}}))
            .await;
        // Spread the cancels over the pickup: some before, some during the claim, some while
        // the program runs.
        if round % 3 != 0 {
            tokio::time::sleep(Duration::from_millis((round % 7) as u64 * 3)).await;
        }
        let (status, body) = api.verb(&id, "cancel").await;
        assert!(status == StatusCode::OK || status == StatusCode::CONFLICT, "{body}");
        ids.push((id, tag));
    }
    for (id, tag) in &ids {
        let finished = wait_for(&format!("{id} to finish"), Duration::from_secs(30), || async {
            record(&topo, id).await.filter(|r| r.status.is_terminal())
        })
        .await;
        let marker = dir.join(format!("done-{tag}"));
        match finished.status {
            Status::Succeeded => assert!(marker.exists(), "{id} succeeded without running"),
            Status::Cancelled => {}
            other => panic!("{id} ended {other}"),
        }
    }
    // No cancelled task's program is still running, and none finishes later.
    wait_for("every program to be gone", Duration::from_secs(10), || async {
        let out = std::process::Command::new("pgrep").args(["-f", "race/work.sh"]).output().ok()?;
        out.stdout.is_empty().then_some(())
    })
    .await;
    assert_eq!(stream_messages(&topo.js, topology::TASKS_STREAM).await, 0);
}

#[tokio::test]
async fn a_paused_lane_holds_its_tasks_while_others_run() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0\n");
    let api = api(&topo).await;

    let paused = api.http.post(api.gw.url("/v1/lanes/short/low/pause")).send().await.unwrap();
    assert_eq!(paused.status(), StatusCode::OK);
    let lane: Value = paused.json().await.unwrap();
    assert_eq!(
        (lane["paused"].as_bool(), lane["consumer"].as_str()),
        (Some(true), Some("short-low"))
    );

    let mut low = Vec::new();
    for _ in 0..3 {
        low.push(api.submit(json!({"kind": "sleep", "priority": "low"})).await);
    }
    let normal = api.submit(json!({"kind": "sleep", "priority": "normal"})).await;
    wait_status(&topo, &normal, Status::Succeeded).await;
    let lanes: Value =
        api.http.get(api.gw.url("/v1/lanes")).send().await.unwrap().json().await.unwrap();
    let short_low = lanes["lanes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["consumer"] == "short-low")
        .unwrap()
        .clone();
    assert_eq!(short_low["paused"], true);
    assert_eq!(short_low["depth"], 3, "{lanes}");
    for id in &low {
        assert_eq!(record(&topo, id).await.unwrap().status, Status::Queued);
    }

    // A resume rings the class's doorbell: idle pools look at once, not at their next timed look.
    let client = nats.client().await;
    let mut doorbell = client.subscribe("claw.doorbell.short").await.unwrap();
    client.flush().await.unwrap();
    let resumed = api.http.post(api.gw.url("/v1/lanes/short/low/resume")).send().await.unwrap();
    let lane: Value = resumed.json().await.unwrap();
    assert_eq!(lane["paused"], false);
    tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut doorbell))
        .await
        .expect("the resume rings the doorbell");
    for id in &low {
        wait_status(&topo, id, Status::Succeeded).await;
    }
    let unknown = api.http.post(api.gw.url("/v1/lanes/huge/low/pause")).send().await.unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
}

/// Each verb over NATS request/reply gives what HTTP gives: the same record changes, the same
/// refusals with the same error body.
#[tokio::test]
async fn every_verb_over_nats_matches_http() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let _archiver = start_archiver(&topo, &nats.dir.path().join("archive.sqlite"));
    let api = api(&topo).await;
    let client = nats.client().await;
    let nats_verb = |verb: &'static str, id: String| {
        let client = client.clone();
        async move {
            let reply = client.request(format!("claw.api.{verb}"), id.into()).await.unwrap();
            let code = reply
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Service-Error-Code"))
                .map(|v| v.as_str().to_owned());
            (code, serde_json::from_slice::<Value>(&reply.payload).unwrap())
        }
    };
    let shape =
        |v: &Value| json!([v["status"], v["cause"], v["error"]["code"], v["error"]["status"]]);

    for (verb, setup) in
        [("pause", None), ("resume", Some("pause")), ("cancel", None), ("retry", Some("cancel"))]
    {
        let (a, b) = (
            api.submit(json!({"kind": "sleep"})).await,
            api.submit(json!({"kind": "sleep"})).await,
        );
        if let Some(first) = setup {
            api.verb(&a, first).await;
            api.verb(&b, first).await;
        }
        let (http_status, over_http) = api.verb(&a, verb).await;
        let (code, over_nats) = nats_verb(verb, b.clone()).await;
        assert_eq!(http_status, StatusCode::OK, "{verb}: {over_http}");
        assert_eq!(code, None, "{verb}: {over_nats}");
        assert_eq!(shape(&over_http), shape(&over_nats), "{verb}");
        assert_eq!(over_nats["id"], b.as_str());
    }
    // Refusals: the same 409 body and status.
    let done = api.submit(json!({"kind": "sleep"})).await;
    api.verb(&done, "cancel").await;
    let (http_status, over_http) = api.verb(&done, "pause").await;
    let (code, over_nats) = nats_verb("pause", done.clone()).await;
    assert_eq!((http_status.as_u16().to_string(), code.as_deref()), ("409".into(), Some("409")));
    assert_eq!(over_http, over_nats);
    let missing = wait_for("the archive to answer", Duration::from_secs(10), || async {
        Some(nats_verb("cancel", "nope".into()).await.1)
            .filter(|body| body["error"]["code"] != "unavailable")
    })
    .await;
    assert_eq!(missing["error"]["code"], "not_found");

    // Lanes too.
    let lanes = client.request("claw.api.lanes", "{}".into()).await.unwrap();
    let lanes: Value = serde_json::from_slice(&lanes.payload).unwrap();
    assert_eq!(lanes["lanes"].as_array().unwrap().len(), 6);
    let paused = client
        .request(
            "claw.api.lanes.pause",
            json!({"class": "long", "priority": "high"}).to_string().into(),
        )
        .await
        .unwrap();
    let paused: Value = serde_json::from_slice(&paused.payload).unwrap();
    assert_eq!(paused["paused"], true);
}

/// Cancel a running task and retry it before its worker noticed the cancel (the wake-up is
/// lost, so the old attempt only looks at its next heartbeat, after the retry started): the old
/// attempt's message must not come back and take over the new attempt. The record names the
/// live message, so the task runs to `succeeded` exactly once.
#[tokio::test]
async fn cancel_then_retry_before_the_worker_noticed_runs_the_task_once() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0\n");
    let api = api(&topo).await;
    // Long enough that the new attempt still runs when the old message would be redelivered.
    let id = api.submit(json!({"kind": "sleep", "input": {"seconds": 4, "steps": 4}})).await;
    wait_status(&topo, &id, Status::Running).await;

    // The cancel, as the gateway writes it, minus the wake-up.
    let entry = topo.tasks_kv.entry(&id).await.unwrap().unwrap();
    let mut cancelled: claw_proto::TaskRecord = serde_json::from_slice(&entry.value).unwrap();
    cancelled.cancel(claw_proto::Cause::User, time::OffsetDateTime::now_utc()).unwrap();
    let value = serde_json::to_vec(&cancelled).unwrap();
    topo.tasks_kv.update(&id, value.into(), entry.revision).await.unwrap();
    let (status, body) = api.verb(&id, "retry").await;
    assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("queued")));
    wait_status(&topo, &id, Status::Succeeded).await;

    // Past two ack deadlines nothing else happens: no redelivered copy takes the task over.
    claw_tests::holds_for("the task stays succeeded", Duration::from_secs(5), || async {
        let r = record(&topo, &id).await.ok_or("record gone")?;
        (r.status == Status::Succeeded).then_some(()).ok_or(format!("{:?}", r.status))
    })
    .await;
    let statuses = claw_tests::statuses(&claw_tests::events_of(&topo.js, &id).await);
    let count = |s: Status| statuses.iter().filter(|(x, _)| *x == s).count();
    assert_eq!(count(Status::Succeeded), 1, "{statuses:?}");
    assert_eq!(count(Status::Running), 2, "the first attempt and the retry: {statuses:?}");
    assert_eq!(stream_messages(&topo.js, topology::TASKS_STREAM).await, 0);
}

/// A resume whose publish the full queue refuses answers 429 with `Retry-After` and leaves the
/// task paused, so nothing says `queued` without a message; repeated once there is room, it
/// queues the task for real. (It used to answer 503, leave a `queued` record with no message,
/// and answer every repeat 200 without publishing anything.)
#[tokio::test]
async fn a_resume_refused_by_a_full_queue_is_undone_and_a_repeat_queues_the_task() {
    use claw_proto::topology::Settings;
    let nats = Nats::start();
    let topo = nats.topology(&Settings { queue_max: 2, ..test_settings() }).await;
    let api = Api {
        gw: Gateway::start(&topo, &["--retry-after-s", "3"]).await,
        http: reqwest::Client::new(),
    };
    let paused = api.submit(json!({"kind": "sleep", "input": {"seconds": 0}})).await;
    assert_eq!(api.verb(&paused, "pause").await.0, StatusCode::OK);
    let first = api.submit(json!({"kind": "sleep"})).await;
    api.submit(json!({"kind": "sleep"})).await;
    assert_eq!(stream_messages(&topo.js, topology::TASKS_STREAM).await, 2, "the queue is full");

    let response =
        api.http.post(api.gw.url(&format!("/v1/tasks/{paused}/resume"))).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "3");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "queue_full", "{body}");
    assert_eq!(record(&topo, &paused).await.unwrap().status, Status::Paused, "undone");

    assert_eq!(api.verb(&first, "cancel").await.0, StatusCode::OK);
    let (status, body) = api.verb(&paused, "resume").await;
    assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("queued")), "{body}");
    assert_eq!(stream_messages(&topo.js, topology::TASKS_STREAM).await, 2, "its message is back");
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0");
    wait_status(&topo, &paused, Status::Succeeded).await;
}
