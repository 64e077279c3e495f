//! The NATS face of the API: a NATS micro service `claw-api` with endpoints
//! `claw.api.submit` and `claw.api.get`, calling the same [`crate::tasks`] functions as HTTP.
//!
//! Replies carry the record JSON, or our error body with the micro error headers
//! (`Nats-Service-Error`, `Nats-Service-Error-Code` = the HTTP status) so `nats req` shows them.

use async_nats::HeaderMap;
use async_nats::service::{Request, ServiceExt};
use claw_proto::api::GetRequest;
use claw_proto::topology;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::error::Error;
use crate::tasks;

/// Serves the endpoints until `shutdown`; requests in flight are answered before it returns.
pub async fn serve(app: App, shutdown: CancellationToken) -> Result<(), Error> {
    let service = app
        .client
        .service_builder()
        .description("OpenClaw task API: the same operations as the gateway's HTTP API")
        .start(topology::API_SERVICE, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| Error::Unavailable(format!("starting {}: {e}", topology::API_SERVICE)))?;
    let group = service.group(topology::API_GROUP);
    let endpoint = |name: &'static str| {
        let group = &group;
        async move {
            group
                .endpoint(name)
                .await
                .map_err(|e| Error::Unavailable(format!("endpoint {name}: {e}")))
        }
    };
    let mut submit = endpoint("submit").await?;
    let mut get = endpoint("get").await?;
    let tracker = TaskTracker::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(request) = submit.next() => {
                let app = app.clone();
                tracker.spawn(async move { answer(&request, on_submit(&app, &request).await).await });
            }
            Some(request) = get.next() => {
                let app = app.clone();
                tracker.spawn(async move { answer(&request, on_get(&app, &request).await).await });
            }
            else => break,
        }
    }
    tracker.close();
    tracker.wait().await;
    let _ = service.stop().await;
    Ok(())
}

async fn on_submit(app: &App, request: &Request) -> Result<Vec<u8>, Error> {
    let key = request
        .message
        .headers
        .as_ref()
        .and_then(|h| h.get("Idempotency-Key"))
        .map(|v| v.as_str().to_owned());
    let submitted = tasks::submit(app, &request.message.payload, key.as_deref()).await?;
    serde_json::to_vec(&submitted.record).map_err(|e| Error::Internal(e.to_string()))
}

/// Accepts `{"id": "..."}` or the bare id, so `nats req claw.api.get <id>` works.
async fn on_get(app: &App, request: &Request) -> Result<Vec<u8>, Error> {
    let payload = &request.message.payload;
    let id = match serde_json::from_slice::<GetRequest>(payload) {
        Ok(r) => r.id.to_string(),
        Err(_) => String::from_utf8_lossy(payload).trim().to_owned(),
    };
    let record = tasks::get(app, &id).await?;
    serde_json::to_vec(&record).map_err(|e| Error::Internal(e.to_string()))
}

async fn answer(request: &Request, result: Result<Vec<u8>, Error>) {
    let sent = match result {
        Ok(body) => request.respond(Ok(body.into())).await,
        Err(e) => {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Service-Error", e.to_string().as_str());
            headers.insert("Nats-Service-Error-Code", e.status().as_str());
            let body = serde_json::to_vec(&e.body()).unwrap_or_default();
            request.respond_with_headers(Ok(body.into()), headers).await
        }
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "reply not sent");
    }
}
