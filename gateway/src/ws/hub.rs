//! One JetStream feed per watched session, shared by all of that session's sockets on this
//! gateway, and the short-lived replay behind `since`.
//!
//! Interest decides what a gateway receives: the first socket of a session starts a [`Feed`]
//! (an ordered pull consumer on `PROGRESS` filtered to the session's subjects,
//! `progress.[<owner>.]<session>.*`: each principal's sessions are its own), the last one to
//! leave stops it and deletes the consumer. So gateways run side by side and each receives only
//! the sessions its clients watch. An ordered consumer rather than a core subscription, because
//! every message it delivers carries its stream sequence (the resume position of `since`) and
//! it re-creates itself from the last sequence it saw when a message goes missing.
//!
//! A feed fans out over a bounded `tokio::sync::broadcast`: a message is parsed and turned into
//! its frame once, and each socket holds only a cursor into the ring, never its own queue.
//!
//! The hand-over between the stored past and the live feed is exact because the feed records
//! the sequence of the last frame it fanned out (`last`) under the same lock it sends under: a
//! socket that subscribes under that lock gets a receiver that sees every frame after `last`,
//! and nothing at or before it. The socket then replays `(since, last]` from the stream and
//! continues with the receiver, dropping anything at or below the last sequence it sent. Events
//! that arrive while it replays wait in the receiver, so there is no gap; the cursor makes
//! duplicates impossible.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::{Ordered, OrderedConfig};
use async_nats::jetstream::{self, Message};
use axum::extract::ws::Utf8Bytes;
use claw_proto::topology::{self, SessionScope};
use futures::StreamExt;
use serde_json::{Map, Value};
use tokio::sync::{OnceCell, broadcast};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::error::Error;

/// Frames a feed keeps for its slowest socket. A socket further behind than this is closed and
/// resumes with `since` from the stream: `PROGRESS` is the buffer, not the gateway's memory.
/// 256 frames is over ten seconds of the chattiest task (the worker flushes at most ~20 events
/// a second per task), and held only while some socket has not read them: a few MiB for
/// ordinary events, at most 256 × the NATS max payload.
pub const FEED_CAPACITY: usize = 256;

/// Messages one pull request of a feed or replay asks for. Bounds what the client library holds
/// per consumer (async-nats' ordered default is 500, up to 500 × max payload).
const PULL_BATCH: i64 = 64;

/// How long a replay waits for its next stored message before giving up; the messages exist
/// already, so a healthy server answers in milliseconds.
const REPLAY_IDLE: Duration = Duration::from_secs(5);

/// One outgoing event: the event JSON with its stream sequence added as `seq`, serialized once
/// per feed and shared (reference-counted) by every socket.
#[derive(Clone, Debug)]
pub struct Frame {
    pub seq: u64,
    pub text: Utf8Bytes,
}

impl Frame {
    /// `None` when the payload is not a JSON object: someone published garbage on a progress
    /// subject, which clients should not have to parse.
    pub fn of(seq: u64, payload: &[u8]) -> Option<Frame> {
        let mut object: Map<String, Value> = match serde_json::from_slice(payload) {
            Ok(object) => object,
            Err(e) => {
                tracing::debug!(seq, error = %e, "skipping a progress message that is not an event");
                return None;
            }
        };
        object.insert("seq".into(), seq.into());
        Some(Frame { seq, text: Value::Object(object).to_string().into() })
    }
}

/// The per-connection settings, from the gateway's configuration.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Longest a single send may wait for the client to read.
    pub send_timeout: Duration,
    pub ping_every: Duration,
    /// The largest frame the gateway sends (and so its write buffer's bound).
    pub max_frame: usize,
}

/// The WebSocket side of a gateway: live feeds by session, the sockets' task tracker and the
/// shutdown token they close on.
#[derive(Clone, Debug)]
pub struct Hub(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    js: jetstream::Context,
    feeds: Mutex<HashMap<SessionScope, Entry>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    settings: Settings,
}

#[derive(Debug)]
struct Entry {
    feed: Arc<Feed>,
    /// Sockets (and upgrades in progress) holding a [`Claim`] on `feed`.
    clients: usize,
}

impl Hub {
    pub fn new(app: &App, shutdown: CancellationToken) -> Hub {
        // Room for the event JSON plus the `seq` added to it.
        let max_frame = app.client.server_info().max_payload.max(1024 * 1024) + 1024;
        let settings = Settings {
            send_timeout: Duration::from_secs_f64(app.config.ws_send_timeout_s),
            ping_every: Duration::from_secs_f64(app.config.ws_ping_s),
            max_frame,
        };
        Hub(Arc::new(Inner {
            js: app.js.clone(),
            feeds: Mutex::default(),
            shutdown,
            tracker: TaskTracker::new(),
            settings,
        }))
    }

    pub fn settings(&self) -> Settings {
        self.0.settings
    }

    pub fn tracker(&self) -> TaskTracker {
        self.0.tracker.clone()
    }

    pub fn shutdown(&self) -> CancellationToken {
        self.0.shutdown.clone()
    }

    /// Waits up to `deadline` for every socket to close (they close themselves with 1012 once
    /// the shutdown token is cancelled) and every feed to delete its consumer.
    pub async fn closed(&self, deadline: Duration) {
        self.0.tracker.close();
        if tokio::time::timeout(deadline, self.0.tracker.wait()).await.is_err() {
            tracing::warn!(
                sockets = self.0.tracker.len(),
                "WebSockets still open at the drain deadline"
            );
        }
    }

    /// Joins the session's feed, starting it for the first client.
    pub async fn subscribe(&self, session: &SessionScope) -> Result<Subscription, Error> {
        let claim = {
            let mut feeds = lock(&self.0.feeds);
            let entry = feeds.entry(session.clone()).or_insert_with(|| Entry::new(session, self));
            if entry.feed.has_ended() {
                // Its pump stopped on an error and its sockets are closing; start afresh.
                *entry = Entry::new(session, self);
            }
            entry.clients += 1;
            Claim { hub: self.clone(), feed: entry.feed.clone() }
        };
        claim.feed.start(self).await?;
        let (rx, boundary) = claim.feed.receiver().ok_or_else(|| {
            Error::Unavailable(format!("the event feed of session {session} ended; retry"))
        })?;
        Ok(Subscription { rx, boundary, _claim: claim })
    }

    /// The last sequence of `PROGRESS` (all sessions): "now" for a client.
    pub async fn stream_last_sequence(&self) -> Result<u64, Error> {
        Ok(self.stream_bounds().await?.last)
    }

    /// The first and last sequence `PROGRESS` holds now.
    pub async fn stream_bounds(&self) -> Result<Bounds, Error> {
        let stream = self.0.js.get_stream(topology::PROGRESS_STREAM).await.map_err(|e| {
            Error::Unavailable(format!("stream {}: {e}", topology::PROGRESS_STREAM))
        })?;
        let state = &stream.cached_info().state;
        Ok(Bounds { first: state.first_sequence, last: state.last_sequence })
    }

    /// The stored events of `session` with `after < seq <= upto`, through a short-lived ordered
    /// consumer (one round trip per batch, not per message).
    pub async fn replay(
        &self,
        session: &SessionScope,
        after: u64,
        upto: u64,
    ) -> Result<Replay, Error> {
        let (messages, consumer, pending) = self.ordered(session, after + 1).await?;
        Ok(Replay { messages, upto, done: pending == 0 || after >= upto, _consumer: consumer })
    }

    /// An ordered consumer on the session's events from `start`, and how many it has pending.
    async fn ordered(
        &self,
        session: &SessionScope,
        start: u64,
    ) -> Result<(Ordered, ConsumerGuard, u64), Error> {
        let name = format!("ws_{}", uuid::Uuid::new_v4().simple());
        let config = OrderedConfig {
            name: Some(name.clone()),
            filter_subject: session.filter(),
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: start.max(1) },
            max_batch: PULL_BATCH,
            ..Default::default()
        };
        let unavailable = |e: &dyn std::fmt::Display| {
            Error::Unavailable(format!("following session {session} on PROGRESS: {e}"))
        };
        let consumer = self
            .0
            .js
            .create_consumer_on_stream(config, topology::PROGRESS_STREAM)
            .await
            .map_err(|e| unavailable(&e))?;
        let guard = ConsumerGuard { js: self.0.js.clone(), name };
        let pending = consumer.cached_info().num_pending;
        let messages = consumer.messages().await.map_err(|e| unavailable(&e))?;
        Ok((messages, guard, pending))
    }

    /// Called when a claim is dropped: the last client of a feed stops it.
    fn release(&self, feed: &Arc<Feed>) {
        let mut feeds = lock(&self.0.feeds);
        let Some(entry) = feeds.get_mut(&feed.session) else { return };
        // A replaced feed's remaining claims are no longer counted.
        if !Arc::ptr_eq(&entry.feed, feed) {
            return;
        }
        entry.clients -= 1;
        if entry.clients == 0 {
            feeds.remove(&feed.session);
            feed.stop.cancel();
        }
    }
}

impl Entry {
    fn new(session: &SessionScope, hub: &Hub) -> Entry {
        let (tx, _) = broadcast::channel(FEED_CAPACITY);
        let feed = Feed {
            session: session.clone(),
            state: Mutex::new(FeedState { last: 0, tx: Some(tx) }),
            started: OnceCell::new(),
            stop: hub.0.shutdown.child_token(),
        };
        Entry { feed: Arc::new(feed), clients: 0 }
    }
}

/// What `PROGRESS` holds: sequences below `first` were evicted (its age, bytes or per-subject
/// limits) or never existed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    pub first: u64,
    pub last: u64,
}

impl Bounds {
    /// The sequences after `since` that are no longer stored, as `(from, to)`, when there are
    /// any: events of the session may have been among them. A `since` beyond the stream's end
    /// (the stream was re-created) is "from now", not a gap the stream can name.
    pub fn gap_after(&self, since: u64) -> Option<(u64, u64)> {
        (since < self.last && since + 1 < self.first).then(|| (since + 1, self.first - 1))
    }
}

/// A socket's membership of a feed: the receiver and the hand-over point.
#[derive(Debug)]
pub struct Subscription {
    pub rx: broadcast::Receiver<Frame>,
    /// The sequence of the last frame fanned out before `rx` was created (or the stream's last
    /// sequence when the feed started): `rx` yields exactly the session's events after it.
    pub boundary: u64,
    _claim: Claim,
}

/// Counts a client of a feed while alive.
#[derive(Debug)]
struct Claim {
    hub: Hub,
    feed: Arc<Feed>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.hub.release(&self.feed);
    }
}

#[derive(Debug)]
struct Feed {
    session: SessionScope,
    state: Mutex<FeedState>,
    started: OnceCell<()>,
    stop: CancellationToken,
}

#[derive(Debug)]
struct FeedState {
    /// The stream sequence of the last message fanned out (or skipped), or the stream's last
    /// sequence when the feed started.
    last: u64,
    /// `None` once the pump has ended: receivers drain and then see `Closed`.
    tx: Option<broadcast::Sender<Frame>>,
}

impl Feed {
    /// Creates the consumer and spawns the pump, once; a failed start is retried by the next
    /// subscriber.
    async fn start(self: &Arc<Feed>, hub: &Hub) -> Result<(), Error> {
        self.started
            .get_or_try_init(|| async {
                let last = hub.stream_last_sequence().await?;
                let (messages, consumer, _) = hub.ordered(&self.session, last + 1).await?;
                lock(&self.state).last = last;
                hub.0.tracker.spawn(pump(self.clone(), messages, consumer));
                Ok(())
            })
            .await
            .map(|_| ())
    }

    fn receiver(&self) -> Option<(broadcast::Receiver<Frame>, u64)> {
        let state = lock(&self.state);
        Some((state.tx.as_ref()?.subscribe(), state.last))
    }

    fn has_ended(&self) -> bool {
        lock(&self.state).tx.is_none()
    }

    fn fan_out(&self, message: &Message) {
        let Ok(info) = message.info() else { return };
        let seq = info.stream_sequence;
        let frame = Frame::of(seq, &message.payload);
        let mut state = lock(&self.state);
        // A re-created ordered consumer that had seen nothing yet starts from the session's
        // first stored event; what the feed already covers is not news.
        if seq <= state.last {
            return;
        }
        state.last = seq;
        if let (Some(frame), Some(tx)) = (frame, &state.tx) {
            // An error only means no socket is listening right now.
            let _ = tx.send(frame);
        }
    }
}

/// Moves the session's messages from the consumer into the broadcast until the last client
/// leaves, the gateway stops, or the consumer fails (then the sockets close and their clients
/// resume with `since` on a fresh feed).
async fn pump(feed: Arc<Feed>, mut messages: Ordered, _consumer: ConsumerGuard) {
    metrics::gauge!("claw_gateway_ws_sessions").increment(1.0);
    loop {
        let message = tokio::select! {
            _ = feed.stop.cancelled() => break,
            message = messages.next() => message,
        };
        match message {
            Some(Ok(message)) => feed.fan_out(&message),
            Some(Err(e)) => {
                tracing::warn!(session = %feed.session, error = %e, "session event feed failed");
                break;
            }
            None => break,
        }
    }
    lock(&feed.state).tx = None;
    metrics::gauge!("claw_gateway_ws_sessions").decrement(1.0);
}

/// The stored events of one session in a sequence range, in order.
pub struct Replay {
    messages: Ordered,
    upto: u64,
    done: bool,
    _consumer: ConsumerGuard,
}

impl Replay {
    /// The next stored event, or `None` at the end of the range.
    pub async fn next(&mut self) -> Result<Option<Frame>, Error> {
        while !self.done {
            let message = match tokio::time::timeout(REPLAY_IDLE, self.messages.next()).await {
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(e))) => return Err(Error::Unavailable(format!("replaying: {e}"))),
                Ok(None) => return Err(Error::Unavailable("replay ended early".into())),
                Err(_) => return Err(Error::Unavailable("replay stalled".into())),
            };
            let info = message.info().map_err(|e| Error::Internal(format!("message info: {e}")))?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            if seq > self.upto {
                // The live feed has this one.
                self.done = true;
                return Ok(None);
            }
            // `pending == 0`: nothing more was stored when this was delivered, so the live
            // feed (which starts at or before `upto`) covers whatever comes next.
            self.done = seq == self.upto || pending == 0;
            if let Some(frame) = Frame::of(seq, &message.payload) {
                return Ok(Some(frame));
            }
        }
        Ok(None)
    }
}

/// Deletes an ephemeral consumer when dropped, instead of leaving it on the server until its
/// inactivity threshold (30 s). A consumer the ordered client re-created under a new name
/// (`<name>_<n>`) is left to that threshold.
#[derive(Debug)]
struct ConsumerGuard {
    js: jetstream::Context,
    name: String,
}

impl Drop for ConsumerGuard {
    fn drop(&mut self) {
        let (js, name) = (self.js.clone(), std::mem::take(&mut self.name));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) =
                    js.delete_consumer_from_stream(&name, topology::PROGRESS_STREAM).await
                {
                    tracing::debug!(consumer = %name, error = %e, "ephemeral consumer not deleted");
                }
            });
        }
    }
}

/// The feeds' locks guard plain data and never cross an await; a panic while holding one
/// leaves that data consistent, so poisoning is ignored.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_is_what_was_evicted_after_since() {
        let held = Bounds { first: 100, last: 500 };
        assert_eq!(held.gap_after(0), Some((1, 99)));
        assert_eq!(held.gap_after(98), Some((99, 99)));
        assert_eq!(held.gap_after(99), None, "the next one is stored");
        assert_eq!(held.gap_after(300), None);
        assert_eq!(held.gap_after(900), None, "beyond the end: from now");
        // Everything purged: first is last + 1.
        assert_eq!(Bounds { first: 501, last: 500 }.gap_after(10), Some((11, 500)));
        assert_eq!(Bounds { first: 0, last: 0 }.gap_after(0), None, "a new stream");
    }

    #[test]
    fn frames_carry_the_sequence() {
        let frame = Frame::of(7, br#"{"type":"output","data":{"text":"hi"}}"#).unwrap();
        let v: Value = serde_json::from_str(frame.text.as_str()).unwrap();
        assert_eq!(v, serde_json::json!({"seq": 7, "type": "output", "data": {"text": "hi"}}));
        assert!(Frame::of(8, b"not json").is_none());
        assert!(Frame::of(9, b"[1]").is_none());
    }
}
