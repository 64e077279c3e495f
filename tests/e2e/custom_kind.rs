//! A team's own kind: the example crate `claw-custom-worker` registers `wordcount` beside the
//! built-in kinds and runs it through `claw_worker::run_with` (in-process here, the way its
//! `main` does), and its binary runs the same kind in a `__run-task` child for long-class tasks.
//! The tasks arrive as NATS-native publishers send them (a spec on a lane subject, no record
//! yet): the worker admits the kind because its registry knows it.
//!
//! Needs `cargo build --bins` first (the long task's runner is the `claw-custom-worker` binary).

use async_nats::jetstream;
use claw_proto::topology::Lane;
use claw_proto::{Class, Priority, Status, TaskId};
use claw_tests::{
    Nats, Running, WAIT, bin, events_of, statuses, test_settings, wait_for, wait_status,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const TEXT: &str = "the cat sat\non the mat\nthe end\nof the story";

/// Publishes a spec to a lane like a NATS-native client, with the id in the body.
async fn publish(js: &jetstream::Context, class: Class, input: Value) -> TaskId {
    let id = TaskId::generate();
    let spec = json!({"id": id, "kind": "wordcount", "class": class, "input": input});
    let subject = Lane::new(class, Priority::Normal).subject();
    js.publish(subject, serde_json::to_vec(&spec).unwrap().into()).await.unwrap().await.unwrap();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_kind_runs_with_progress_in_process_and_in_a_child() {
    let nats = Nats::start();
    let topology = nats.topology(&test_settings()).await;
    let toml = format!(
        "name = \"w-custom\"\nack_deadline_s = 2.0\nrunner = {:?}\n",
        bin("claw-custom-worker")
    );
    let config = claw_worker::Config::from_toml_str(&toml).unwrap();
    let registry = claw_custom_worker::registry(&config);
    let token = CancellationToken::new();
    let handle = tokio::spawn({
        let (topology, token) = (topology.clone(), token.clone());
        async move { claw_worker::run_with(topology, config, registry, token).await.unwrap() }
    });
    let worker = Running { token, handle };

    let expected = json!({
        "lines": 4, "words": 11, "chars": TEXT.chars().count(),
        "top": [{"word": "the", "count": 4}, {"word": "cat", "count": 1}],
    });
    let input = json!({"text": TEXT, "delay_ms": 150, "top": 2});
    let short = publish(&topology.js, Class::Short, input.clone()).await;
    let long = publish(&topology.js, Class::Long, input).await;

    for id in [&short, &long] {
        let r = wait_status(&topology, id, Status::Succeeded).await;
        assert_eq!(r.result.as_ref(), Some(&expected), "{id}");
        assert_eq!(r.worker.as_deref(), Some("w-custom"));
        let progress = r.progress.expect("progress");
        assert_eq!((progress.fraction, progress.message.as_deref()), (1.0, Some("batch 4/4")));

        let events = wait_for("result event", WAIT, || async {
            let e = events_of(&topology.js, id).await;
            statuses(&e).contains(&(Status::Succeeded, 1)).then_some(e)
        })
        .await;
        let fractions = claw_tests::fractions(&events);
        assert!(fractions.len() >= 2, "progress is reported as it goes: {fractions:?}");
        assert!(fractions.windows(2).all(|w| w[0] <= w[1]), "{fractions:?}");
        assert_eq!(fractions.last(), Some(&1.0));
    }

    // Bad input of a custom kind fails for good (the gateway passes it through unchecked).
    let id = publish(&topology.js, Class::Short, json!({"txt": "typo"})).await;
    let r = wait_status(&topology, &id, Status::Failed).await;
    let error = r.error.unwrap();
    assert_eq!((error.code.as_str(), error.retryable), ("invalid_input", false));
    worker.stop().await;
}
