//! WebSocket figures: the memory an idle connection costs the gateway, and how many events per
//! second the gateway fans out to the clients of one session.
//!
//! Idle: `n` sockets spread over `sessions` sessions, each waiting after its `hello`; the
//! gateway's RSS is read from `/proc/<pid>/status` before and after (the embedded nats-server is
//! a separate process and is not counted). Fan-out: `clients` sockets on one session, then
//! `events` events published straight to `progress.<session>.<task>` with core NATS (the way
//! workers publish them); timed from the first publish until every client has every event.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a socket on `session` and waits for its `hello`, so the gateway's subscription for the
/// session exists before anything is published.
async fn open(url: &str, session: &str) -> anyhow::Result<Socket> {
    let ws_url = format!("{}/v1/ws?session={session}", url.replacen("http", "ws", 1));
    let (mut socket, _) = tokio_tungstenite::connect_async(&ws_url).await?;
    loop {
        match socket.next().await.context("closed before hello")?? {
            Message::Text(text) if text.contains("\"hello\"") => return Ok(socket),
            _ => {}
        }
    }
}

pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

pub async fn idle(url: &str, pid: u32, n: usize, sessions: usize) -> anyhow::Result<()> {
    let before = rss_kib(pid)?;
    let started = Instant::now();
    let mut sockets = Vec::with_capacity(n);
    // Opened 200 at a time: a burst of 10 000 handshakes at once only measures the accept queue.
    for chunk in (0..n).collect::<Vec<_>>().chunks(200) {
        let opened = futures::future::join_all(chunk.iter().map(|i| {
            let session = format!("idle-{}", i % sessions);
            async move { open(url, &session).await }
        }))
        .await;
        for socket in opened {
            sockets.push(socket?);
        }
    }
    let opened_in = started.elapsed();
    // Let allocator and buffers settle before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid)?;
    let per = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
    println!(
        "| idle WebSocket connections, {sessions} sessions | {n} | {:.1} KiB RSS per connection | gateway RSS {:.0} → {:.0} MiB | opened in {:.1} s |",
        per / 1024.0,
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        opened_in.as_secs_f64()
    );
    for mut socket in sockets {
        let _ = socket.close(None).await;
    }
    Ok(())
}

/// Events published per round of the fan-out: below the gateway's per-session backlog (256), so
/// the benchmark measures delivery, not the slow-client cut-off it would otherwise trigger.
const ROUND: usize = 128;

pub async fn fanout(
    url: &str,
    nats_url: &str,
    clients: usize,
    events: usize,
) -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let session = "fanout";
    let mut sockets = Vec::with_capacity(clients);
    for _ in 0..clients {
        sockets.push(open(url, session).await?);
    }
    let received: Vec<Arc<AtomicUsize>> = (0..clients).map(|_| Arc::default()).collect();
    let readers: Vec<_> = sockets
        .into_iter()
        .zip(received.iter().cloned())
        .map(|(mut socket, count)| {
            tokio::spawn(async move {
                while count.load(Ordering::Relaxed) < events {
                    match socket.next().await {
                        Some(Ok(Message::Text(text))) if text.contains("\"progress\"") => {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(anyhow::Error::from(e)),
                        None => bail!("closed after {} events", count.load(Ordering::Relaxed)),
                    }
                }
                Ok(())
            })
        })
        .collect();
    let client = crate::cluster::connect(nats_url).await?;
    let started = Instant::now();
    let mut published = 0;
    while published < events {
        let round = ROUND.min(events - published);
        for i in published..published + round {
            let event = serde_json::json!({"type": "progress", "task_id": "t1", "session": session,
                "at": "2026-11-24T00:00:00Z", "data": {"fraction": i as f64 / events as f64}});
            client.publish(format!("progress.{session}.t1"), event.to_string().into()).await?;
        }
        client.flush().await?;
        published += round;
        let deadline = Instant::now() + Duration::from_secs(60);
        while received.iter().any(|c| c.load(Ordering::Relaxed) < published) {
            if Instant::now() > deadline {
                bail!("fan-out stalled at {published} events");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let elapsed = started.elapsed();
    for reader in readers {
        reader.await??;
    }
    let delivered = clients * events;
    println!(
        "| event fan-out, {clients} clients on one session | {events} events | {:.0} events/s delivered | {:.2} s total | rounds of {ROUND} |",
        delivered as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
    );
    Ok(())
}
