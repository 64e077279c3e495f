//! Retention of records in the `tasks` bucket: a live record never expires, however long it
//! waits; a finished one leaves the bucket after its retention, but only once the archiver has
//! archived it, and a read of the task answers throughout, from the bucket and then from the
//! archive. The retention is shortened to a second through the archiver's configuration; the
//! shipped default (a day) runs in `shipped.rs`.

use std::path::Path;
use std::time::Duration;

use claw_proto::Status;
use claw_proto::topology::Topology;
use claw_tests::{
    Gateway, Nats, Running, archiver_config, holds_for, id_of, post_json, record,
    start_archiver_with, start_worker, test_settings, wait_for, wait_status,
};
use serde_json::{Value, json};

/// The retention of these tests: short, so waiting past it takes seconds.
const RETENTION: Duration = Duration::from_secs(1);

/// How long a test watches for something that must not happen: several retentions and sweeps.
const WATCH: Duration = Duration::from_secs(4);

fn start_archiver(topology: &Topology, db: &Path) -> Running {
    let mut config = archiver_config(db);
    config.retention.retention_s = RETENTION.as_secs();
    config.retention.sweep_s = 1;
    start_archiver_with(topology, config)
}

/// `GET /v1/tasks/{id}` through the gateway: the status it answers, or the HTTP status.
async fn get_status(http: &reqwest::Client, gw: &Gateway, id: &str) -> Result<String, String> {
    let response =
        http.get(gw.url(&format!("/v1/tasks/{id}"))).send().await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("HTTP {}", response.status()));
    }
    let body: Value = response.json().await.map_err(|e| e.to_string())?;
    Ok(body["status"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn a_task_paused_from_the_queue_outlives_the_retention_and_resumes() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let _archiver = start_archiver(&topo, &nats.dir.path().join("archive.sqlite"));
    let gw = Gateway::start(&topo, &[]).await;
    let http = reqwest::Client::new();

    // No worker yet: the task waits in its lane, and is paused from there.
    let spec = json!({"kind": "sleep", "input": {"seconds": 0.1}});
    let id = id_of(&post_json(&http, &gw.url("/v1/tasks"), Some(&spec)).await);
    let paused = post_json(&http, &gw.url(&format!("/v1/tasks/{id}/pause")), None).await;
    assert_eq!(
        (paused["status"].as_str(), paused["paused_from"].as_str()),
        (Some("paused"), Some("queued")),
        "{paused}"
    );

    // Well past the retention, the paused record is still in the bucket.
    holds_for("the paused record stays in the bucket", WATCH, || async {
        match record(&topo, &id).await {
            Some(r) if r.status == Status::Paused => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // And it can be resumed, and runs.
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0\n");
    let resumed = post_json(&http, &gw.url(&format!("/v1/tasks/{id}/resume")), None).await;
    assert_eq!(resumed["status"], "queued", "{resumed}");
    let done = wait_status(&topo, &id, Status::Succeeded).await;
    assert_eq!(done.attempt, 1);
}

#[tokio::test]
async fn a_finished_record_leaves_the_bucket_only_once_archived_and_its_retention_passed() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let db = nats.dir.path().join("archive.sqlite");
    let archiver = start_archiver(&topo, &db);
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0\n");
    let gw = Gateway::start(&topo, &[]).await;
    let http = reqwest::Client::new();
    let spec = json!({"kind": "sleep", "input": {"seconds": 0.1}});

    // With the archiver running: archived, then out of the bucket after the retention. The
    // gateway answers all along, from the bucket and then from the archive.
    let first = id_of(&post_json(&http, &gw.url("/v1/tasks"), Some(&spec)).await);
    wait_status(&topo, &first, Status::Succeeded).await;
    wait_for("the finished record to leave the bucket", Duration::from_secs(20), || async {
        assert_eq!(get_status(&http, &gw, &first).await.as_deref(), Ok("succeeded"));
        record(&topo, &first).await.is_none().then_some(())
    })
    .await;
    assert_eq!(
        get_status(&http, &gw, &first).await.as_deref(),
        Ok("succeeded"),
        "from the archive"
    );

    // With the archiver stopped, a record that finishes stays past its retention: nothing else
    // removes it, and it is not archived yet.
    archiver.stop().await;
    let second = id_of(&post_json(&http, &gw.url("/v1/tasks"), Some(&spec)).await);
    wait_status(&topo, &second, Status::Succeeded).await;
    holds_for("the unarchived record stays in the bucket", WATCH, || async {
        match (record(&topo, &second).await, get_status(&http, &gw, &second).await) {
            (Some(r), Ok(status)) if r.status == Status::Succeeded && status == "succeeded" => {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Back, the archiver archives it and then removes it; the gateway still answers.
    let _archiver = start_archiver(&topo, &db);
    wait_for("the record archived, then out of the bucket", Duration::from_secs(20), || async {
        assert_eq!(get_status(&http, &gw, &second).await.as_deref(), Ok("succeeded"));
        record(&topo, &second).await.is_none().then_some(())
    })
    .await;
    assert_eq!(
        get_status(&http, &gw, &second).await.as_deref(),
        Ok("succeeded"),
        "from the archive"
    );
    assert!(claw_tests::archived_ids(&db).await.contains(&second));
}

/// A finished task's stored payloads go with its record: once the retention removed the record
/// from the bucket, its input and result objects are gone, `GET .../result` answers 410 Gone,
/// and the archive still has the record with its references.
#[tokio::test]
async fn stored_payloads_leave_with_their_record() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let db = nats.dir.path().join("archive.sqlite");
    let _archiver = start_archiver(&topo, &db);
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0\n");
    let gw = Gateway::start(&topo, &[]).await;
    let http = reqwest::Client::new();
    let spec = json!({"kind": "sleep", "input": {"seconds": 0, "echo": "p".repeat(100_000)}});
    let id = id_of(&post_json(&http, &gw.url("/v1/tasks"), Some(&spec)).await);
    wait_status(&topo, &id, Status::Succeeded).await;
    let result = http.get(gw.url(&format!("/v1/tasks/{id}/result"))).send().await.unwrap();
    assert_eq!(result.status(), reqwest::StatusCode::OK);

    wait_for("the record and its payloads to leave", Duration::from_secs(20), || async {
        let gone = http.get(gw.url(&format!("/v1/tasks/{id}/result"))).send().await.ok()?;
        (record(&topo, &id).await.is_none() && gone.status() == reqwest::StatusCode::GONE)
            .then_some(())
    })
    .await;
    let archived: Value =
        http.get(gw.url(&format!("/v1/tasks/{id}"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(archived["result_ref"]["name"], format!("{id}/result"), "{archived}");
    let objects =
        claw_tests::stream_messages(&topo.js, claw_proto::topology::PAYLOADS_STREAM).await;
    assert!(objects <= 2, "only the two deleted markers are left, not the chunks: {objects}");
}

/// Issue 12, forged ids: once bob's finished record has left the bucket, the archive is the only
/// memory of his task. A lane message that names the same id again (a NATS publisher, after the
/// duplicate window: here through the spec's `id` under another `Nats-Msg-Id`) runs as another
/// task, but its record does not overwrite bob's archived row, and bob's read still finds his
/// own task. Before, the new terminal record replaced the row, and bob got 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_named_again_after_its_record_left_does_not_overwrite_the_archived_task() {
    use async_nats::HeaderMap;
    use claw_proto::topology::headers;
    const BOB: &str = "claw_bob-retention-0123456789";
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let _archiver = start_archiver(&topo, &nats.dir.path().join("archive.sqlite"));
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0\n");
    let tokens = nats.dir.path().join("tokens.toml");
    std::fs::write(&tokens, format!("[principals.bob]\ntokens = [\"{BOB}\"]\n")).unwrap();
    let gw = Gateway::start(&topo, &["--tokens", tokens.to_str().unwrap()]).await;
    let http = reqwest::Client::new();
    let bobs_get = |id: String| {
        let request = http.get(gw.url(&format!("/v1/tasks/{id}"))).bearer_auth(BOB).send();
        async move {
            let response = request.await.map_err(|e| e.to_string())?;
            let status = response.status();
            let body: Value = response.json().await.map_err(|e| e.to_string())?;
            if status.is_success() { Ok(body) } else { Err(format!("{status}: {body}")) }
        }
    };

    let spec = json!({"kind": "sleep", "input": {"seconds": 0.1, "echo": "bob's"}});
    let submitted = http
        .post(gw.url("/v1/tasks"))
        .bearer_auth(BOB)
        .header("content-type", "application/json")
        .body(spec.to_string())
        .send()
        .await
        .unwrap();
    let id = id_of(&submitted.json().await.unwrap());
    wait_status(&topo, &id, Status::Succeeded).await;
    wait_for("bob's record to leave the bucket", Duration::from_secs(20), || async {
        record(&topo, &id).await.is_none().then_some(())
    })
    .await;

    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, "forged-1");
    let forged = json!({"kind": "sleep", "id": id, "input": {"seconds": 0.1, "echo": "forged"}});
    topo.js
        .publish_with_headers("tasks.short.normal", h, forged.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    wait_for("the forged task to finish", Duration::from_secs(20), || async {
        let forged = record(&topo, &id).await?;
        (forged.status == Status::Succeeded).then_some(())
    })
    .await;
    // Several retentions and sweeps: bob's task stays his, in the archive and to his reads.
    holds_for("bob's archived task stays his", WATCH, || async {
        let body = bobs_get(id.clone()).await?;
        match (body["owner"].as_str(), body["result"]["echo"].as_str()) {
            (Some("bob"), Some("bob's")) => Ok(()),
            _ => Err(format!("bob reads {body}")),
        }
    })
    .await;
}
