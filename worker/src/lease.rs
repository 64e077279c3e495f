//! The worker's contact with the NATS server, which an attempt's lease is timed by.
//!
//! A connection can look fine while the server is gone: a frozen server (or a dead network
//! path) keeps the TCP connection open, and the client only notices after missed pings. So
//! the worker measures contact itself: a probe task sends a request through the server to the
//! worker's own subscription every [`probe_interval`], and records when one came back. An
//! attempt whose worker has had no contact for two thirds of the ack deadline stops (kills its
//! child), so it is dead before the server redelivers the message elsewhere.

use std::sync::Mutex;
use std::time::Duration;

use async_nats::Client;
use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use crate::Error;

/// When the worker last heard back from the server.
#[derive(Debug)]
pub(crate) struct Contact {
    last: Mutex<Instant>,
}

impl Contact {
    pub(crate) fn new() -> Contact {
        Contact { last: Mutex::new(Instant::now()) }
    }

    /// How long since the server last answered a probe.
    pub(crate) fn silence(&self) -> Duration {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).elapsed()
    }

    fn heard(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }
}

/// A probe every eighth of the ack deadline, between 50 ms and 1 s: a lease limit of two
/// thirds of the deadline then spans several probes.
pub(crate) fn probe_interval(ack_deadline: Duration) -> Duration {
    (ack_deadline / 8).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// Probes the server until the returned handle is dropped, recording answers in `contact`.
pub(crate) async fn probe(
    client: &Client,
    contact: std::sync::Arc<Contact>,
    ack_deadline: Duration,
) -> Result<AbortOnDropHandle<()>, Error> {
    let subject = format!("_CLAW.lease.{}", uuid::Uuid::new_v4().simple());
    let mut echo = client
        .subscribe(subject.clone())
        .await
        .map_err(|e| Error::nats(format!("subscribe {subject}"), e))?;
    let every = probe_interval(ack_deadline);
    let client = client.clone();
    Ok(AbortOnDropHandle::new(tokio::spawn(async move {
        let answer = client.clone();
        // Lives as long as the probe loop, which is aborted (dropping it) with the handle.
        let _echoer = AbortOnDropHandle::new(tokio::spawn(async move {
            while let Some(msg) = echo.next().await {
                if let Some(reply) = msg.reply {
                    let _ = answer.publish(reply, bytes::Bytes::new()).await;
                }
            }
        }));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let asked = client.request(subject.clone(), bytes::Bytes::new());
            if let Ok(Ok(_)) = tokio::time::timeout(every * 2, asked).await {
                contact.heard();
            }
        }
    })))
}
