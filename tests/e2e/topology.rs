//! The topology from `nats/` is created, is idempotent, and is updated when settings change.

use claw_proto::topology::{self, Lane, Settings};
use claw_tests::{Nats, test_settings};

#[tokio::test]
async fn ensure_creates_then_is_idempotent_then_updates() {
    let nats = Nats::start();
    let js = nats.jetstream().await;
    topology::ensure(&js, &test_settings()).await.unwrap();
    topology::ensure(&js, &test_settings()).await.unwrap();

    let mut tasks = js.get_stream(topology::TASKS_STREAM).await.unwrap();
    let info = tasks.info().await.unwrap();
    assert_eq!(info.config.max_messages, 10_000);
    for lane in Lane::ALL {
        let c = tasks.consumer_info(lane.consumer()).await.unwrap();
        assert_eq!(c.config.ack_wait.as_secs_f64(), 2.0);
        assert_eq!(c.config.filter_subject, lane.subject());
    }

    // A process without an ack deadline of its own leaves the worker's in place.
    topology::ensure(&js, &Settings::standard()).await.unwrap();
    let c = tasks.consumer_info(Lane::ALL[0].consumer()).await.unwrap();
    assert_eq!(c.config.ack_wait.as_secs_f64(), 2.0);

    // A changed setting is applied to the existing stream.
    let settings = Settings { queue_max: 7, ..test_settings() };
    topology::ensure(&js, &settings).await.unwrap();
    let info = tasks.info().await.unwrap();
    assert_eq!(info.config.max_messages, 7);
}

/// Streams made by an older version are brought up to date when any service starts: the
/// bucket loses the 24 h TTL that removed live records (a live record never expires), and the
/// queue allows the direct gets the reconciler lists it with.
#[tokio::test]
async fn ensure_updates_the_streams_of_an_older_version() {
    let nats = Nats::start();
    let js = nats.jetstream().await;
    topology::ensure(&js, &test_settings()).await.unwrap();
    let mut kv = js.get_stream(topology::TASKS_KV_STREAM).await.unwrap();
    let mut old = kv.info().await.unwrap().config.clone();
    old.max_age = std::time::Duration::from_secs(86_400);
    js.update_stream(old).await.unwrap();
    assert_eq!(kv.info().await.unwrap().config.max_age.as_secs(), 86_400);
    let mut tasks = js.get_stream(topology::TASKS_STREAM).await.unwrap();
    let mut old = tasks.info().await.unwrap().config.clone();
    old.allow_direct = false;
    js.update_stream(old).await.unwrap();
    assert!(!tasks.info().await.unwrap().config.allow_direct);

    topology::ensure(&js, &Settings::standard()).await.unwrap();
    assert_eq!(kv.info().await.unwrap().config.max_age, std::time::Duration::ZERO);
    assert!(tasks.info().await.unwrap().config.allow_direct);
}
