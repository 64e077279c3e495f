//! The whole path in one process: HTTP submit → lane → worker → record in KV → row in SQLite →
//! history endpoint; and an `exec` task whose script reports progress.

use std::time::Duration;

use claw_proto::Status;
use claw_tests::{
    Gateway, Nats, archived_rows, id_of, post_json, record, start_archiver, start_worker,
    test_settings, wait_for,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test]
async fn sleep_task_over_http_succeeds_into_kv_sqlite_and_history() {
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let db = nats.dir.path().join("archive.sqlite");
    let _archiver = start_archiver(&topo, &db);
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0\n");
    let gw = Gateway::start(&topo, &[]).await;
    let http = reqwest::Client::new();

    let spec = json!({"kind": "sleep", "session": "s1",
        "input": {"seconds": 0.2, "steps": 2, "echo": {"answer": 42}}});
    let id = id_of(&post_json(&http, &gw.url("/v1/tasks"), Some(&spec)).await);

    let done = wait_for("the task to succeed in KV", Duration::from_secs(20), || async {
        record(&topo, &id).await.filter(|r| r.status == Status::Succeeded)
    })
    .await;
    assert_eq!(done.attempt, 1);
    assert_eq!(done.result.as_ref().unwrap()["echo"], json!({"answer": 42}));

    wait_for("the row in SQLite", Duration::from_secs(20), || async {
        (archived_rows(&db).await == 1).then_some(())
    })
    .await;

    let page: Value = http
        .get(gw.url("/v1/tasks?session=s1&status=succeeded"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let tasks = page["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 1, "{page}");
    assert_eq!(tasks[0]["id"], id.as_str());
    assert_eq!(tasks[0]["status"], "succeeded");

    // Once the record has left the bucket, GET falls back to the archive.
    topo.tasks_kv.purge(&id).await.unwrap();
    let archived = http.get(gw.url(&format!("/v1/tasks/{id}"))).send().await.unwrap();
    assert_eq!(archived.status(), StatusCode::OK);
    let archived: Value = archived.json().await.unwrap();
    assert_eq!(archived["status"], "succeeded");

    let missing = http.get(gw.url("/v1/tasks/no-such-task")).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
}

/// The archiver is down while 500 tasks run through gateway and worker; started afterwards it
/// archives every one of them exactly once, and a restart adds nothing.
#[tokio::test]
async fn archiver_down_while_500_tasks_complete_catches_up_exactly_once() {
    const N: usize = 500;
    let nats = Nats::start();
    let topo = nats.topology(&test_settings()).await;
    let db = nats.dir.path().join("archive.sqlite");
    let _worker = start_worker(&topo, "ack_deadline_s = 2.0\n");
    let gw = Gateway::start(&topo, &[]).await;
    let http = reqwest::Client::new();

    let mut ids = Vec::with_capacity(N);
    for chunk in 0..N / 50 {
        let submits = (0..50).map(|i| {
            let body = json!({"kind": "sleep", "session": "batch",
                "input": {"echo": chunk * 50 + i}});
            http.post(gw.url("/v1/tasks"))
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
        });
        for response in futures::future::join_all(submits).await {
            let record: Value = response.unwrap().json().await.unwrap();
            ids.push(record["id"].as_str().unwrap().to_owned());
        }
    }
    wait_for("all 500 tasks to succeed", Duration::from_secs(60), || async {
        for id in &ids {
            if record(&topo, id).await.is_none_or(|r| r.status != Status::Succeeded) {
                return None;
            }
        }
        Some(())
    })
    .await;
    assert_eq!(archived_rows(&db).await, 0, "the archiver has not run yet");

    let archiver = start_archiver(&topo, &db);
    wait_for("500 rows", Duration::from_secs(30), || async {
        (archived_rows(&db).await == N as i64).then_some(())
    })
    .await;
    archiver.stop().await;

    // Started again, it has nothing to add: the consumer resumed where it stopped.
    let _archiver = start_archiver(&topo, &db);
    let page: Value = wait_for("the restarted archiver to answer", Duration::from_secs(10), || {
        let http = http.clone();
        let url = gw.url("/v1/tasks?session=batch&limit=500");
        async move {
            let response = http.get(url).send().await.ok()?;
            response.status().is_success().then_some(response.json().await.ok()?)
        }
    })
    .await;
    let listed = page["tasks"].as_array().unwrap();
    assert_eq!(listed.len(), N);
    let mut unique: Vec<&str> = listed.iter().map(|t| t["id"].as_str().unwrap()).collect();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), N, "no duplicates");
    assert_eq!(archived_rows(&db).await, N as i64);
}
