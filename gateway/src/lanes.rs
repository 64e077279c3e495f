//! Lane control: the depth, in-flight count and paused state of every class × priority lane,
//! and pausing or resuming a whole lane. A paused lane is a paused JetStream consumer: workers
//! keep pulling, the server hands them nothing from that lane, and its messages wait in order.

use async_nats::jetstream::consumer::PullConsumer;
use claw_proto::api::LaneInfo;
use claw_proto::topology::{self, Lane};
use claw_proto::{Class, Priority};
use time::OffsetDateTime;

use crate::app::App;
use crate::auth::Caller;
use crate::error::Error;

/// How far in the future "paused until resumed" is: JetStream pauses until a time, and a
/// century is indistinguishable from forever for an operator's lane switch.
const PAUSE_FOREVER: time::Duration = time::Duration::days(36_500);

pub async fn list(app: &App) -> Result<Vec<LaneInfo>, Error> {
    app.ensure_connected()?;
    let infos = futures::future::join_all(Lane::ALL.into_iter().map(|lane| info(app, lane))).await;
    infos.into_iter().collect()
}

pub async fn info(app: &App, lane: Lane) -> Result<LaneInfo, Error> {
    let mut consumer: PullConsumer = app
        .js
        .get_consumer_from_stream(lane.consumer(), topology::TASKS_STREAM)
        .await
        .map_err(|e| Error::Unavailable(format!("lane {}: {e}", lane.consumer())))?;
    let info = consumer
        .info()
        .await
        .map_err(|e| Error::Unavailable(format!("lane {}: {e}", lane.consumer())))?;
    Ok(LaneInfo {
        class: lane.class,
        priority: lane.priority,
        subject: lane.subject(),
        consumer: lane.consumer(),
        depth: info.num_pending,
        in_flight: info.num_ack_pending as u64,
        paused: info.paused,
    })
}

/// Parses the lane of `/v1/lanes/{class}/{priority}`; an unknown one is a 404.
pub fn parse(class: &str, priority: &str) -> Result<Lane, Error> {
    match (Class::parse(class), Priority::parse(priority)) {
        (Some(class), Some(priority)) => Ok(Lane::new(class, priority)),
        _ => Err(Error::NotFound(format!("no lane {class}/{priority}"))),
    }
}

/// Pausing a lane stops everyone's tasks in it, so with tokens only an admin may (over HTTP and
/// over a principal's NATS subjects alike).
pub fn may_control(caller: &Caller) -> Result<(), Error> {
    if caller.sees_all() {
        Ok(())
    } else {
        Err(Error::Forbidden("pausing or resuming a lane needs an admin principal".into()))
    }
}

pub async fn set_paused(app: &App, lane: Lane, paused: bool) -> Result<LaneInfo, Error> {
    app.ensure_connected()?;
    let stream = app
        .js
        .get_stream_no_info(topology::TASKS_STREAM)
        .await
        .map_err(|e| Error::Unavailable(format!("stream {}: {e}", topology::TASKS_STREAM)))?;
    let result = if paused {
        stream.pause_consumer(&lane.consumer(), OffsetDateTime::now_utc() + PAUSE_FOREVER).await
    } else {
        stream.resume_consumer(&lane.consumer()).await
    };
    result.map_err(|e| Error::Unavailable(format!("lane {}: {e}", lane.consumer())))?;
    tracing::info!(lane = %lane.consumer(), paused, "lane control");
    if !paused {
        // Idle pools of the class look at once; a lost ring costs their next timed look.
        let subject = topology::doorbell_subject(lane.class);
        if let Err(e) = app.js.client().publish(subject, bytes::Bytes::new()).await {
            tracing::warn!(error = %e, "could not ring the lane's doorbell");
        }
    }
    info(app, lane).await
}
