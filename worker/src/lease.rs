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
    let subject = claw_proto::topology::lease_subject(&uuid::Uuid::new_v4().simple().to_string());
    let mut echo = client
        .subscribe(subject.clone())
        .await
        .map_err(|e| Error::nats(format!("subscribe {subject}"), e))?;
    let every = probe_interval(ack_deadline);
    let answer = client.clone();
    // Lives as long as the probe loop, which owns it and is aborted (dropping it) with the handle.
    let echoer = AbortOnDropHandle::new(tokio::spawn(async move {
        while let Some(msg) = echo.next().await {
            if let Some(reply) = msg.reply {
                let _ = answer.publish(reply, bytes::Bytes::new()).await;
            }
        }
    }));
    // One round trip before any attempt depends on it: a probe the server refuses (a NATS user
    // without the rights on `claw.lease.*`) would otherwise only show as every attempt losing
    // its lease two thirds of an ack deadline after start.
    let first = client.request(subject.clone(), bytes::Bytes::new());
    match tokio::time::timeout(FIRST_PROBE, first).await {
        Ok(Ok(_)) => contact.heard(),
        Ok(Err(e)) => return Err(refused(&subject, e.to_string())),
        Err(_) => return Err(refused(&subject, format!("no answer within {FIRST_PROBE:?}"))),
    }
    let client = client.clone();
    Ok(AbortOnDropHandle::new(tokio::spawn(async move {
        let _echoer = echoer;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            let asked = client.request(subject.clone(), bytes::Bytes::new());
            let answered = matches!(tokio::time::timeout(every * 2, asked).await, Ok(Ok(_)));
            if answered {
                contact.heard();
            }
            // Logged on the change only: a frozen server would otherwise log every probe.
            if answered == failing {
                failing = !answered;
                if failing {
                    tracing::warn!(%subject, "the server stopped answering the lease probe");
                } else {
                    tracing::info!(%subject, "the server answers the lease probe again");
                }
            }
        }
    })))
}

/// How long the first probe may take: the connection was just made, so only a server that
/// refuses the probe (or is overloaded) takes longer.
const FIRST_PROBE: Duration = Duration::from_secs(5);

fn refused(subject: &str, why: String) -> Error {
    let why = format!(
        "{why}; the worker's NATS user must be allowed to publish and subscribe to \
         claw.lease.* (nats/accounts/claw.conf)"
    );
    Error::nats(format!("the lease probe on {subject}"), why)
}
