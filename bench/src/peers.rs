//! The phases of the peer harness (`../shared/peers`, run on the same machine), measured the same
//! way on us, so the two sets of figures can stand side by side:
//!
//! - (c) end-to-end latency at a fixed rate: an open-loop submitter sends a task every 5 ms
//!   (200/s) for 15 s, each at its scheduled time whether or not earlier ones have answered;
//!   latency runs from that time to the moment the submitter can read the result, which for us is
//!   the task's `succeeded` status event (which carries the result) arriving on a core subscription to its session (what a WebSocket
//!   client or `nats sub` sees). Over HTTP, and published straight to NATS;
//! - (d) the drain of a backlog: 50 000 no-op tasks queued while the lane is paused (the peers
//!   queue with no worker running), then the lane resumed; completions per second from the first
//!   to the last `succeeded` event, and the time from the resume until the last one is archived
//!   in SQLite (which the peers do not have).
//!
//! (e), 2 000 tasks of 10 s at once, is the `concurrency` group with `--concurrent 2000`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;

use crate::{System, cluster, ms, percentile, start_system};

/// The session the measured tasks use, so their events are on `progress.bench.<id>`.
const SESSION: &str = "bench";
/// Tasks per second of the open-loop submitter, and for how long.
const RATE: u32 = 200;
const FOR: Duration = Duration::from_secs(15);
const WARM_UP: usize = 200;

/// How a task is submitted.
#[derive(Clone, Copy)]
enum Via {
    Http,
    Nats,
}

fn spec(id: &str) -> String {
    format!(r#"{{"id":"{id}","kind":"sleep","session":"{SESSION}","input":{{"seconds":0}}}}"#)
}

/// (c): the open-loop latency at [`RATE`] over HTTP and straight to NATS, each on a fresh
/// system.
pub async fn latency_at_rate() -> anyhow::Result<()> {
    for via in [Via::Http, Via::Nats] {
        let system = start_system().await?;
        let times = open_loop(&system, via).await?;
        let name = match via {
            Via::Http => "HTTP submit",
            Via::Nats => "published straight to NATS",
        };
        println!(
            "| end-to-end latency at {RATE} tasks/s, open loop, {name} → result | {} | p50 {:.3} ms | p99 {:.3} ms | max {:.3} ms |",
            times.len(),
            ms(percentile(&times, 0.5)),
            ms(percentile(&times, 0.99)),
            ms(*times.last().unwrap_or(&Duration::ZERO)),
        );
    }
    Ok(())
}

/// Sends a task every `1/RATE` s for [`FOR`] and returns each one's time from its scheduled
/// send to its result (the `succeeded` status), sorted.
async fn open_loop(system: &System, via: Via) -> anyhow::Result<Vec<Duration>> {
    let client = cluster::connect(&system.nats_url).await?;
    let js = async_nats::jetstream::new(client.clone());
    let http = reqwest::Client::new();
    let mut results = client.subscribe(format!("progress.{SESSION}.*")).await?;
    // id → when it was due to be sent; the succeeded statuses are matched to it as they come.
    let due: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let done: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let listener = {
        let (due, done) = (due.clone(), done.clone());
        tokio::spawn(async move {
            while let Some(message) = results.next().await {
                let arrived = Instant::now();
                let Ok(event) = serde_json::from_slice::<serde_json::Value>(&message.payload)
                else {
                    continue;
                };
                // The result is read from the terminal status (protocol 5), the first moment a
                // watcher can have it.
                if event["type"] != "status" || event["data"]["status"] != "succeeded" {
                    continue;
                }
                let id = event["task_id"].as_str().unwrap_or_default();
                if let Some(at) = due.lock().unwrap().remove(id) {
                    done.lock().unwrap().push(arrived - at);
                }
            }
        })
    };
    let send = async |id: String| -> anyhow::Result<()> {
        match via {
            Via::Http => {
                let r = http
                    .post(format!("{}/v1/tasks", system.url))
                    .header("content-type", "application/json")
                    .body(spec(&id))
                    .send()
                    .await?;
                if r.status() != reqwest::StatusCode::ACCEPTED {
                    bail!("submit answered {}", r.status());
                }
            }
            Via::Nats => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", id.as_str());
                js.publish_with_headers("tasks.short.normal", headers, spec(&id).into())
                    .await?
                    .await?;
            }
        }
        Ok(())
    };
    // Warm-up, one at a time and not measured: connections, pools, the first pulls.
    for _ in 0..WARM_UP {
        send(uuid::Uuid::new_v4().to_string()).await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let n = (RATE as u64 * FOR.as_secs()) as usize;
    let every = Duration::from_secs(1) / RATE;
    let start = Instant::now() + Duration::from_millis(100);
    let mut sends = futures::stream::FuturesUnordered::new();
    for i in 0..n {
        let at = start + every * i as u32;
        let id = uuid::Uuid::new_v4().to_string();
        due.lock().unwrap().insert(id.clone(), at);
        sends.push(async move {
            tokio::time::sleep_until(at.into()).await;
            send(id).await
        });
    }
    while let Some(sent) = sends.next().await {
        sent?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.lock().unwrap().len() < n {
        if Instant::now() > deadline {
            bail!("{} of {n} results after 60 s", done.lock().unwrap().len());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    listener.abort();
    let mut times = std::mem::take(&mut *done.lock().unwrap());
    times.sort();
    Ok(times)
}

/// (d): `n` no-op tasks queued in a paused lane, then the lane resumed.
pub async fn drain(n: usize) -> anyhow::Result<()> {
    let system = start_system().await?;
    let d = drain_on(&system, n).await?;
    println!(
        "| drain of a {n} backlog (queued in a paused lane, then resumed) | {n} | {:.0} completions/s first → last | {:.2} s from the resume to the last completion | all archived {:.2} s after the resume |",
        d.rate, d.to_last_s, d.archived_s,
    );
    Ok(())
}

/// What a drain came to.
pub struct Drained {
    /// Completions per second from the first to the last.
    pub rate: f64,
    /// From the resume to the last completion.
    pub to_last_s: f64,
    /// From the resume until the last one is in SQLite.
    pub archived_s: f64,
}

/// Queues `n` no-op tasks in `system`'s paused `short/normal` lane, resumes it, and times the
/// completions (the `succeeded` events) and the archive.
pub async fn drain_on(system: &System, n: usize) -> anyhow::Result<Drained> {
    let http = reqwest::Client::new();
    let lane = |verb: &str| format!("{}/v1/lanes/short/normal/{verb}", system.url);
    let r = http.post(lane("pause")).send().await?;
    if !r.status().is_success() {
        bail!("pausing the lane answered {}", r.status());
    }
    let client = cluster::connect(&system.nats_url).await?;
    let mut events = client.subscribe(format!("progress.{SESSION}.*")).await?;
    let js = async_nats::jetstream::new(client.clone());
    let task = format!(r#"{{"kind":"sleep","session":"{SESSION}","input":{{"seconds":0}}}}"#);
    let mut acks = futures::stream::FuturesUnordered::new();
    for _ in 0..n {
        if acks.len() >= 4096 {
            acks.next().await.context("ack stream")??;
        }
        acks.push(std::future::IntoFuture::into_future(
            js.publish("tasks.short.normal", task.clone().into()).await?,
        ));
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    let before = crate::archived(&system.db).await.unwrap_or(0);
    let resumed = Instant::now();
    let r = http.post(lane("resume")).send().await?;
    if !r.status().is_success() {
        bail!("resuming the lane answered {}", r.status());
    }
    let (mut first, mut last, mut count) = (None, resumed, 0);
    let deadline = resumed + Duration::from_secs(300);
    while count < n {
        let message = tokio::time::timeout_at(deadline.into(), events.next())
            .await
            .map_err(|_| anyhow::anyhow!("{count} of {n} completions after 300 s"))?
            .context("the event subscription ended")?;
        // The worker's terminal status event says `succeeded`.
        if !message.payload.windows(11).any(|w| w == b"\"succeeded\"") {
            continue;
        }
        let now = Instant::now();
        first.get_or_insert(now);
        last = now;
        count += 1;
    }
    crate::wait_archived(&system.db, before + n as i64, n).await?;
    let span = (last - first.unwrap_or(resumed)).as_secs_f64();
    Ok(Drained {
        rate: if span > 0.0 { n as f64 / span } else { f64::INFINITY },
        to_last_s: (last - resumed).as_secs_f64(),
        archived_s: resumed.elapsed().as_secs_f64(),
    })
}
