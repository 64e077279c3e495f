//! One WebSocket connection: the socket split into a writer loop (hello, replay, live events,
//! replies, pings, the closing frame) and a reader loop (commands, pongs), each a task; when
//! either ends the other is aborted.
//!
//! Nothing here queues without bound. Events are read from the feed's broadcast, whose capacity
//! is the only backlog a socket has ([`super::hub::FEED_CAPACITY`]); a socket that falls
//! further behind is closed with 1013 and resumes with `since`. A send that the client does not
//! read within the send timeout drops the connection: its kernel buffers are full and a close
//! frame could not get through either. Replies wait in a small channel, and the reader runs one
//! command at a time, so a client that floods commands without reading is slowed, then dropped.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, close_code};
use bytes::Bytes;
use claw_proto::task::Session;
use claw_proto::topology::SessionScope;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::command;
use super::hub::{Bounds, Frame, Hub, Replay, Settings, Subscription};
use crate::app::App;
use crate::auth::Caller;

/// Replies waiting for the writer.
const REPLY_QUEUE: usize = 8;

/// How long a closing frame may take to go out before the connection is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the upgrade decided: the socket's session and where its events start.
#[derive(Debug)]
pub struct Start {
    /// The session watched, in its owner's namespace.
    pub session: SessionScope,
    /// Who opened the socket: its commands run on that principal's behalf.
    pub caller: Caller,
    pub since: Option<u64>,
    /// What `PROGRESS` held, read after subscribing (so its last sequence is at least the feed's
    /// hand-over point): the `hello` frame's `seq` is its last, and a `since` before its first
    /// gets a `gap` frame.
    pub bounds: Bounds,
}

/// Why a socket ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The client closed or the connection broke.
    Client,
    /// A send waited past the send timeout.
    Stalled,
    /// The socket fell more than the feed's capacity behind.
    Lagged,
    /// The session's feed or the replay failed (NATS trouble).
    FeedLost,
    Shutdown,
}

/// Serves one upgraded connection until the client leaves, falls behind, or the gateway stops.
pub async fn serve(
    socket: WebSocket,
    app: App,
    subscription: Subscription,
    start: Start,
    hub: Hub,
) {
    let span = tracing::debug_span!("ws", session = %start.session);
    async move {
        metrics::gauge!("claw_gateway_ws_connections").increment(1.0);
        let _gauge = ConnectionGauge;
        let settings = hub.settings();
        let (sink, stream) = socket.split();
        let (replies_tx, replies_rx) = mpsc::channel(REPLY_QUEUE);
        let session = start.session.session().clone();
        let caller = start.caller.clone();
        let writer = Writer { sink, settings, cursor: 0 };
        let mut writer =
            tokio::spawn(writer.run(hub, subscription, start, replies_rx).in_current_span());
        let idle = settings.ping_every * 3;
        let mut reader = tokio::spawn(
            read_loop(stream, app, caller, session, replies_tx, idle).in_current_span(),
        );
        tokio::select! {
            end = &mut writer => {
                reader.abort();
                tracing::debug!(?end, "socket closed by the gateway");
            }
            _ = &mut reader => {
                writer.abort();
                tracing::debug!("socket closed by the client");
            }
        }
    }
    .instrument(span)
    .await
}

struct ConnectionGauge;

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        metrics::gauge!("claw_gateway_ws_connections").decrement(1.0);
    }
}

struct Writer {
    sink: SplitSink<WebSocket, Message>,
    settings: Settings,
    /// The sequence of the last event sent (or where the socket starts): nothing at or below
    /// it is sent again.
    cursor: u64,
}

impl Writer {
    async fn run(
        mut self,
        hub: Hub,
        subscription: Subscription,
        start: Start,
        replies: mpsc::Receiver<Utf8Bytes>,
    ) -> End {
        let Err(end) = self.write(&hub, subscription, start, replies).await;
        let (code, why) = match end {
            End::Client => return end,
            End::Stalled => {
                metrics::counter!("claw_gateway_ws_slow_disconnects_total", "reason" => "stalled")
                    .increment(1);
                return end;
            }
            End::Lagged => {
                metrics::counter!("claw_gateway_ws_slow_disconnects_total", "reason" => "lagged")
                    .increment(1);
                (close_code::AGAIN, "client too slow")
            }
            End::FeedLost => (close_code::AGAIN, "event feed interrupted"),
            End::Shutdown => (close_code::RESTART, "gateway restarting"),
        };
        let reason = format!("{why}; reconnect with since={}", self.cursor);
        let close = Message::Close(Some(CloseFrame { code, reason: reason.into() }));
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.sink.send(close)).await;
        end
    }

    /// Hello, the replay of `(since, boundary]`, then live events after the cursor, with
    /// replies and pings in between; returns only by ending.
    async fn write(
        &mut self,
        hub: &Hub,
        mut subscription: Subscription,
        start: Start,
        mut replies: mpsc::Receiver<Utf8Bytes>,
    ) -> Result<Infallible, End> {
        let shutdown = hub.shutdown();
        let last = start.bounds.last;
        let hello = json!({"type": "hello", "session": start.session.session(), "seq": last});
        self.send(Message::Text(hello.to_string().into())).await?;
        // Events the stream no longer holds are said, not skipped silently: the client re-reads
        // its tasks' records for what it missed.
        if let Some((from, to)) = start.since.and_then(|since| start.bounds.gap_after(since)) {
            metrics::counter!("claw_gateway_ws_gaps_total").increment(1);
            let gap = json!({"type": "gap", "from": from, "to": to});
            self.send(Message::Text(gap.to_string().into())).await?;
        }
        // A `since` beyond the stream's end (a stream re-created since) means "from now".
        self.cursor = start.since.map_or(last, |s| s.min(last));
        let mut replay = None;
        if self.cursor < subscription.boundary {
            let replaying = hub.replay(&start.session, self.cursor, subscription.boundary).await;
            replay = Some(replaying.map_err(|e| {
                tracing::warn!(error = %e, "cannot replay");
                End::FeedLost
            })?);
        }
        let every = self.settings.ping_every;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let replaying = replay.is_some();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Err(End::Shutdown),
                // Before events, so a busy feed cannot starve the keepalive (it is ready only
                // once per interval, so it cannot starve the events either).
                _ = ping.tick() => self.send(Message::Ping(Bytes::new())).await?,
                reply = replies.recv() => match reply {
                    Some(text) => self.send(Message::Text(text)).await?,
                    None => return Err(End::Client),
                },
                stored = next_stored(&mut replay) => match stored {
                    Ok(Some(frame)) => self.event(frame).await?,
                    Ok(None) => replay = None,
                    Err(e) => {
                        tracing::warn!(error = %e, "replay failed");
                        return Err(End::FeedLost);
                    }
                },
                // Live events wait in the receiver until the replay is done.
                live = subscription.rx.recv(), if !replaying => match live {
                    Ok(frame) => self.event(frame).await?,
                    Err(RecvError::Lagged(_)) => return Err(End::Lagged),
                    Err(RecvError::Closed) => return Err(End::FeedLost),
                },
            }
        }
    }

    async fn event(&mut self, frame: Frame) -> Result<(), End> {
        if frame.seq <= self.cursor {
            return Ok(());
        }
        self.send(Message::Text(frame.text)).await?;
        self.cursor = frame.seq;
        metrics::counter!("claw_gateway_ws_events_sent_total").increment(1);
        Ok(())
    }

    async fn send(&mut self, message: Message) -> Result<(), End> {
        match tokio::time::timeout(self.settings.send_timeout, self.sink.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Client),
            Err(_) => Err(End::Stalled),
        }
    }
}

async fn next_stored(replay: &mut Option<Replay>) -> Result<Option<Frame>, crate::Error> {
    match replay {
        Some(replay) => replay.next().await,
        None => std::future::pending().await,
    }
}

/// Runs the client's commands, one at a time, until it closes, breaks, or is silent for
/// `idle` (three ping intervals: a live client answers every ping).
async fn read_loop(
    mut stream: SplitStream<WebSocket>,
    app: App,
    caller: Caller,
    session: Session,
    replies: mpsc::Sender<Utf8Bytes>,
    idle: Duration,
) {
    loop {
        let message = match tokio::time::timeout(idle, stream.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(_)) | None) => return,
            Err(_) => {
                tracing::debug!("client silent past the ping deadline");
                return;
            }
        };
        let reply = match message {
            Message::Text(text) => command::handle(&app, &caller, &session, text.as_str()).await,
            Message::Binary(_) => command::binary_refused(),
            // Reading on lets the library answer the close and end the stream.
            Message::Close(_) | Message::Ping(_) | Message::Pong(_) => continue,
        };
        if replies.send(reply).await.is_err() {
            return;
        }
    }
}
