//! The NATS face of the API: a NATS micro service `claw-api` with endpoints `claw.api.submit`,
//! `claw.api.get`, `claw.api.payload` (a large input or result, a chunk per request),
//! `claw.api.{cancel,pause,resume,retry}`, `claw.api.lanes` and `claw.api.lanes.{pause,resume}`,
//! calling the same functions as HTTP, and the same endpoints again under
//! `claw.api.as.<principal>.` for the principals of the tokens file.
//!
//! Who the caller is comes from the subject. On `claw.api.as.<principal>.<verb>` the request acts
//! as that principal, exactly as its HTTP token would: what it submits is owned by it and counts
//! against its quotas, it sees and controls only its own tasks (404 otherwise) unless it is an
//! admin, and only an admin may pause a lane. NATS permissions are what make this an identity:
//! each tenant's NATS user may publish only on its own `claw.api.as.<name>.>`
//! (`nats/accounts/claw.conf`, the tenant template). A principal the gateway does not know, or a
//! gateway without a tokens file, gets a 401 error reply. The un-prefixed subjects act as the
//! anonymous caller (every task visible, submits unowned): they are for trusted roles only
//! (operators, the OpenClaw plugin, NATS-native publishers), which NATS permissions name.
//!
//! Replies carry the record JSON, or our error body with the micro error headers
//! (`Nats-Service-Error`, `Nats-Service-Error-Code` = the HTTP status) so `nats req` shows them.

use async_nats::HeaderMap;
use async_nats::service::{self, Request, ServiceExt};
use claw_proto::api::{GetRequest, LaneRequest, Lanes, PayloadRequest, Verb};
use claw_proto::payloads::Part;
use claw_proto::spec::Invalid;
use claw_proto::topology::{self, Lane};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::auth::Caller;
use crate::error::Error;
use crate::{control, lanes, tasks};

/// Whom an endpoint's requests act as.
#[derive(Clone, Copy, Debug)]
enum Face {
    /// `claw.api.<verb>`: the anonymous caller.
    Anonymous,
    /// `claw.api.as.<principal>.<verb>`: the principal named by the subject.
    Principal,
}

/// What an endpoint does.
#[derive(Clone, Copy, Debug)]
enum Op {
    Submit,
    Get,
    Payload,
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
    // `*` is the principal: one token, since a principal's name has no `.` (auth::Tokens::parse).
    // `claw.api.as.*.<verb>` has five tokens or more, so it meets no un-prefixed subject.
    let principal = api.group(topology::API_AS).group("*");
    let mut requests = Vec::new();
    for (face, group) in [(Face::Anonymous, &api), (Face::Principal, &principal)] {
        let lanes = group.group("lanes");
        let mut endpoints = vec![
            (group, "submit", Op::Submit),
            (group, "get", Op::Get),
            (group, "payload", Op::Payload),
            (group, "lanes", Op::Lanes),
            (&lanes, "pause", Op::LanePause(true)),
            (&lanes, "resume", Op::LanePause(false)),
        ];
        endpoints.extend(Verb::ALL.map(|verb| (group, verb.as_str(), Op::Control(verb))));
        for (group, name, op) in endpoints {
            let mut builder = group.endpoint_builder();
            if let Face::Principal = face {
                // Unnamed, an endpoint is named by its subject, which here has a `*`; micro
                // endpoint names are `A-Z a-z 0-9 - _`, so these get their own (`as-submit`).
                let lane = if matches!(op, Op::LanePause(_)) { "lanes-" } else { "" };
                builder = builder.name(format!("as-{lane}{name}"));
            }
            let endpoint = builder
                .add(name)
                .await
                .map_err(|e| Error::Unavailable(format!("endpoint {name}: {e}")))?;
            requests.push(endpoint.map(move |request| (face, op, request)).boxed());
        }
    }
    let mut requests = futures::stream::select_all(requests);
    let tracker = TaskTracker::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some((face, op, request)) = requests.next() => {
                let app = app.clone();
                tracker.spawn(async move {
                    let result = match caller_of(&app, face, &request) {
                        Ok(caller) => handle(&app, &caller, op, &request).await,
                        Err(e) => Err(e),
                    };
                    answer(&request, result).await
                });
            }
            else => break,
        }
    }
    tracker.close();
    tracker.wait().await;
    let _ = service.stop().await;
    Ok(())
}

/// The caller of a request: anonymous, or the principal its subject names.
fn caller_of(app: &App, face: Face, request: &Request) -> Result<Caller, Error> {
    match face {
        Face::Anonymous => Ok(Caller::Anonymous),
        Face::Principal => {
            let prefix = format!("{}.{}.", topology::API_GROUP, topology::API_AS);
            let name = request
                .message
                .subject
                .strip_prefix(prefix.as_str())
                .and_then(|rest| rest.split('.').next())
                .unwrap_or_default();
            app.auth.named(name)
        }
    }
}

/// A successful reply: its body, and headers when it has any.
struct Reply {
    body: Vec<u8>,
    headers: Option<HeaderMap>,
}

async fn handle(app: &App, caller: &Caller, op: Op, request: &Request) -> Result<Reply, Error> {
    match op {
        Op::Submit => on_submit(app, caller, request).await,
        Op::Get => json(&tasks::get(app, caller, &id_of(request)).await?),
        Op::Payload => on_payload(app, caller, request).await,
        Op::Control(verb) => json(&control::apply(app, caller, &id_of(request), verb).await?),
        Op::Lanes => json(&Lanes { lanes: lanes::list(app).await? }),
        Op::LanePause(paused) => {
            lanes::may_control(caller)?;
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

fn json<T: serde::Serialize>(value: &T) -> Result<Reply, Error> {
    let body = serde_json::to_vec(value).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(Reply { body, headers: None })
}

/// A task's input or result as JSON bytes, for the callers who may read the task: inline ones
/// whole, stored ones a chunk per request, `Claw-Payload-Size` on every reply and
/// `Claw-Payload-Next` (the next request's `from`) on a stored payload's. The caller asks until
/// it has the size, and checks the record's `digest`.
async fn on_payload(app: &App, caller: &Caller, request: &Request) -> Result<Reply, Error> {
    let PayloadRequest { id, part, from } = serde_json::from_slice(&request.message.payload)
        .map_err(|e| {
            Error::Invalid(Invalid {
                field: None,
                message: format!(
                    "expected {{\"id\", \"part\": \"input\"|\"result\", \"from\"}}: {e}"
                ),
            })
        })?;
    let part = Part::parse(&part).ok_or_else(|| Invalid::field("part", "is input or result"))?;
    let record = tasks::get(app, caller, id.as_str()).await?;
    let mut headers = HeaderMap::new();
    let reply = match tasks::payload(&record, part)? {
        tasks::Payload::Stored(stored) => {
            let chunk = app.payloads.chunk(stored, from).await?;
            headers.insert(topology::headers::PAYLOAD_SIZE, stored.size.to_string().as_str());
            headers.insert(topology::headers::PAYLOAD_NEXT, chunk.next.to_string().as_str());
            Reply { body: chunk.bytes.to_vec(), headers: None }
        }
        tasks::Payload::Inline(value) => {
            let reply = json(value)?;
            headers.insert(topology::headers::PAYLOAD_SIZE, reply.body.len().to_string().as_str());
            reply
        }
    };
    Ok(Reply { headers: Some(headers), ..reply })
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

async fn on_submit(app: &App, caller: &Caller, request: &Request) -> Result<Reply, Error> {
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
    let submitted =
        tasks::submit(app, caller, &request.message.payload, key.as_deref(), trace.as_deref())
            .await?;
    json(&submitted.record)
}

async fn answer(request: &Request, result: Result<Reply, Error>) {
    let sent = match result {
        Ok(Reply { body, headers: None }) => request.respond(Ok(body.into())).await,
        Ok(Reply { body, headers: Some(headers) }) => {
            request.respond_with_headers(Ok(body.into()), headers).await
        }
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
