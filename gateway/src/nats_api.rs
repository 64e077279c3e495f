//! The NATS face of the API: a NATS micro service `claw-api` with endpoints `claw.api.submit`,
//! `claw.api.get`, `claw.api.{cancel,pause,resume,retry}`, `claw.api.lanes` and
//! `claw.api.lanes.{pause,resume}`, calling the same functions as HTTP.
//!
//! There is no caller identity here: every request acts as the anonymous caller (it sees every
//! task, and what it submits has no `owner`). NATS permissions (`nats/accounts/claw.conf`)
//! decide who may send these requests at all.
//!
//! Replies carry the record JSON, or our error body with the micro error headers
//! (`Nats-Service-Error`, `Nats-Service-Error-Code` = the HTTP status) so `nats req` shows them.

use async_nats::HeaderMap;
use async_nats::service::{self, Request, ServiceExt};
use claw_proto::api::{GetRequest, LaneRequest, Lanes, Verb};
use claw_proto::spec::Invalid;
use claw_proto::topology::{self, Lane};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::auth::Caller;
use crate::error::Error;
use crate::{control, lanes, tasks};

/// What an endpoint does.
#[derive(Clone, Copy, Debug)]
enum Op {
    Submit,
    Get,
    Control(Verb),
    Lanes,
    LanePause(bool),
}

/// Serves the endpoints until `shutdown`; requests in flight are answered before it returns.
pub async fn serve(app: App, shutdown: CancellationToken) -> Result<(), Error> {
    let service = app
        .client
        .service_builder()
        .description("OpenClaw task API: the same operations as the gateway's HTTP API")
        .start(topology::API_SERVICE, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| Error::Unavailable(format!("starting {}: {e}", topology::API_SERVICE)))?;
    let api = service.group(topology::API_GROUP);
    let lanes = api.group("lanes");
    let mut endpoints = vec![
        (&api, "submit", Op::Submit),
        (&api, "get", Op::Get),
        (&api, "lanes", Op::Lanes),
        (&lanes, "pause", Op::LanePause(true)),
        (&lanes, "resume", Op::LanePause(false)),
    ];
    endpoints.extend(Verb::ALL.map(|verb| (&api, verb.as_str(), Op::Control(verb))));
    let mut requests = Vec::new();
    for (group, name, op) in endpoints {
        let endpoint = group
            .endpoint(name)
            .await
            .map_err(|e| Error::Unavailable(format!("endpoint {name}: {e}")))?;
        requests.push(endpoint.map(move |request| (op, request)).boxed());
    }
    let mut requests = futures::stream::select_all(requests);
    let tracker = TaskTracker::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some((op, request)) = requests.next() => {
                let app = app.clone();
                tracker.spawn(async move { answer(&request, handle(&app, op, &request).await).await });
            }
            else => break,
        }
    }
    tracker.close();
    tracker.wait().await;
    let _ = service.stop().await;
    Ok(())
}

async fn handle(app: &App, op: Op, request: &Request) -> Result<Vec<u8>, Error> {
    match op {
        Op::Submit => on_submit(app, request).await,
        Op::Get => json(&tasks::get(app, &Caller::Anonymous, &id_of(request)).await?),
        Op::Control(verb) => {
            json(&control::apply(app, &Caller::Anonymous, &id_of(request), verb).await?)
        }
        Op::Lanes => json(&Lanes { lanes: lanes::list(app).await? }),
        Op::LanePause(paused) => {
            let LaneRequest { class, priority } = serde_json::from_slice(&request.message.payload)
                .map_err(|e| {
                    Error::Invalid(Invalid {
                        field: None,
                        message: format!("expected {{\"class\", \"priority\"}}: {e}"),
                    })
                })?;
            json(&lanes::set_paused(app, Lane::new(class, priority), paused).await?)
        }
    }
}

fn json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value).map_err(|e| Error::Internal(e.to_string()))
}

/// The task id of a request: `{"id": "..."}` or the bare id, so `nats req claw.api.get <id>`
/// works.
fn id_of(request: &Request) -> String {
    let payload = &request.message.payload;
    match serde_json::from_slice::<GetRequest>(payload) {
        Ok(r) => r.id.to_string(),
        Err(_) => String::from_utf8_lossy(payload).trim().to_owned(),
    }
}

async fn on_submit(app: &App, request: &Request) -> Result<Vec<u8>, Error> {
    let key = request
        .message
        .headers
        .as_ref()
        .and_then(|h| h.get("Idempotency-Key"))
        .map(|v| v.as_str().to_owned());
    let trace = request
        .message
        .headers
        .as_ref()
        .and_then(|h| h.get(claw_proto::trace::TRACEPARENT))
        .map(|v| v.as_str().to_owned());
    let submitted = tasks::submit(
        app,
        &Caller::Anonymous,
        &request.message.payload,
        key.as_deref(),
        trace.as_deref(),
    )
    .await?;
    json(&submitted.record)
}

async fn answer(request: &Request, result: Result<Vec<u8>, Error>) {
    let sent = match result {
        Ok(body) => request.respond(Ok(body.into())).await,
        Err(e) => {
            let mut headers = HeaderMap::new();
            // The message may quote the caller's text; the body keeps it whole.
            let line = claw_proto::topology::headers::one_line(&e.to_string());
            headers.insert(service::NATS_SERVICE_ERROR, line.as_str());
            headers.insert(service::NATS_SERVICE_ERROR_CODE, e.status().as_str());
            let body = serde_json::to_vec(&e.body()).unwrap_or_default();
            request.respond_with_headers(Ok(body.into()), headers).await
        }
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "reply not sent");
    }
}
