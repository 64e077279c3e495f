//! The HTTP API (axum): routes, and the translation between HTTP and [`crate::tasks`].
//!
//! Bodies are read as bytes and parsed by `TaskSpec::parse`, so a malformed body gets our error
//! shape with the offending field instead of axum's plain-text rejection; the body limit turns
//! into 413 the same way.
//!
//! With API tokens, every `/v1/*` route and `/metrics` pass through [`authenticate`], which puts
//! the request's [`Caller`] in its extensions or answers 401. `/`, `/ui/*`, `/healthz` and
//! `/readyz` stay open: the page is static and asks for a token itself. `/v1/ws` checks its
//! token (or single-use ticket, which is how browsers come) in the upgrade.

use std::collections::HashMap;

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use claw_proto::api::{self, ListQuery};
use claw_proto::payloads::Part;
use claw_proto::spec::Invalid;
use claw_proto::task::{Session, Status};
use claw_proto::topology;

use crate::app::App;
use crate::auth::Caller;
use crate::error::Error;
use crate::tasks;

/// The gateway's HTTP routes, for `run` and for tests (`router(app).oneshot(request)`).
pub fn router(app: App) -> Router {
    let body_limit = app.config.body_limit;
    let authenticated = Router::new()
        .route("/v1/tasks", post(submit).get(list))
        .route("/v1/tasks/{id}", get(get_task))
        .route("/v1/tasks/{id}/{verb}", post(control).get(payload))
        .route("/v1/ws-ticket", post(ws_ticket))
        .route("/v1/usage", get(usage))
        .route("/v1/lanes", get(lanes))
        .route("/v1/lanes/{class}/{priority}/{action}", post(lane_control))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(app.clone(), authenticate));
    Router::new()
        .route("/", get(crate::ui::index))
        .route("/ui/{name}", get(crate::ui::asset))
        .route("/v1/ws", get(crate::ws::upgrade))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(authenticated)
        .layer(middleware::from_fn_with_state(app.clone(), crate::browser::guard))
        .layer(DefaultBodyLimit::max(body_limit))
        // A failed request is logged once, where its error is made (`Error::body`); the trace
        // layer's own ERROR line for every 5xx would say it twice.
        .layer(
            tower_http::trace::TraceLayer::new_for_http().on_failure(
                tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
            ),
        )
        .with_state(app)
}

/// Resolves the request's caller from `Authorization: Bearer` (401 without a known token when
/// the gateway has tokens) and hands it to the handler as an extension.
async fn authenticate(
    State(app): State<App>,
    mut request: Request,
    next: Next,
) -> Result<Response, Error> {
    let caller = app.auth.caller(request.headers())?;
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}

async fn submit(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Error> {
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => Error::TooLarge(app.config.body_limit),
        _ => Error::MalformedJson(rejection.body_text()),
    })?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str().map_err(|_| Invalid::field("Idempotency-Key", "must be visible ASCII"))?,
        ),
    };
    let trace = headers.get(claw_proto::trace::TRACEPARENT).and_then(|v| v.to_str().ok());
    let submitted = tasks::submit(&app, &caller, &body, key, trace).await?;
    let status = if submitted.created { StatusCode::ACCEPTED } else { StatusCode::OK };
    Ok((status, Json(submitted.record)).into_response())
}

/// `POST /v1/ws-ticket` → a single-use ticket for `/v1/ws?ticket=T` ([`crate::tickets`]).
async fn ws_ticket(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, Error> {
    Ok(Json(app.tickets.issue(&caller).await?).into_response())
}

/// `POST /v1/tasks/{id}/cancel|pause|resume|retry` → the record afterwards, or 409 with its
/// current status.
async fn control(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path((id, verb)): Path<(String, String)>,
) -> Result<Response, Error> {
    let verb = api::Verb::ALL
        .into_iter()
        .find(|v| v.as_str() == verb)
        .ok_or_else(|| Error::NotFound(format!("no verb {verb:?}")))?;
    Ok(Json(crate::control::apply(&app, &caller, &id, verb).await?).into_response())
}

/// `GET /v1/tasks/{id}/input|result` → the payload as JSON: from the record when it is inline,
/// streamed from the `payloads` object store when the record only refers to it. 404 when the
/// task has no result (yet); 410 when a stored payload was removed with its record.
async fn payload(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path((id, part)): Path<(String, String)>,
) -> Result<Response, Error> {
    let part = Part::parse(&part).ok_or_else(|| Error::NotFound(format!("no payload {part:?}")))?;
    let record = tasks::get(&app, &caller, &id).await?;
    match tasks::payload(&record, part)? {
        tasks::Payload::Stored(stored) => {
            let object = app.payloads.reader(stored).await?;
            let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(object));
            let headers = [
                (header::CONTENT_TYPE, "application/json".to_owned()),
                (header::CONTENT_LENGTH, stored.size.to_string()),
            ];
            Ok((headers, body).into_response())
        }
        tasks::Payload::Inline(value) => Ok(Json(value).into_response()),
    }
}

/// The caller's limits and what it holds; 404 without API tokens (nobody has limits).
async fn usage(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, Error> {
    match app.quotas.view(&caller) {
        Some(view) => Ok(Json(view).into_response()),
        None => Err(Error::NotFound("no limits: the gateway runs without API tokens".into())),
    }
}

async fn lanes(State(app): State<App>) -> Result<Response, Error> {
    Ok(Json(api::Lanes { lanes: crate::lanes::list(&app).await? }).into_response())
}

/// Pausing a lane stops everyone's tasks in it, so with tokens only an admin may
/// ([`crate::lanes::may_control`]).
async fn lane_control(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path((class, priority, action)): Path<(String, String, String)>,
) -> Result<Response, Error> {
    crate::lanes::may_control(&caller)?;
    let lane = crate::lanes::parse(&class, &priority)?;
    let paused = match action.as_str() {
        "pause" => true,
        "resume" => false,
        other => return Err(Error::NotFound(format!("no lane action {other:?}"))),
    };
    Ok(Json(crate::lanes::set_paused(&app, lane, paused).await?).into_response())
}

async fn get_task(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    Ok(Json(tasks::get(&app, &caller, &id).await?).into_response())
}

/// `GET /v1/tasks?session=&status=&kind=&limit=&cursor=`. Empty parameters count as absent,
/// which is what an HTML form with an unset filter sends. There is no `owner` parameter: the
/// owner filter is the caller's (an unknown parameter, 422).
async fn list(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, Error> {
    let query = list_query(params)?;
    Ok(Json(tasks::list(&app, &caller, &query).await?).into_response())
}

fn list_query(params: HashMap<String, String>) -> Result<ListQuery, Error> {
    let mut query = ListQuery::default();
    for (key, value) in params {
        if value.is_empty() {
            continue;
        }
        match key.as_str() {
            "session" => {
                query.session = Some(
                    Session::parse(&value).map_err(|e| Invalid::field("session", e.to_string()))?,
                )
            }
            "status" => {
                query.status =
                    Some(Status::parse(&value).ok_or_else(|| {
                        Invalid::field("status", format!("unknown status {value:?}"))
                    })?)
            }
            "kind" => query.kind = Some(value),
            "limit" => {
                let limit = value.parse::<u32>().ok().filter(|n| (1..=api::MAX_PAGE).contains(n));
                query.limit = Some(limit.ok_or_else(|| {
                    Invalid::field("limit", format!("must be 1-{}", api::MAX_PAGE))
                })?);
            }
            "cursor" => query.cursor = Some(value),
            other => {
                return Err(Invalid::field(other, format!("unknown parameter {other:?}")).into());
            }
        }
    }
    Ok(query)
}

async fn healthz() -> &'static str {
    "ok"
}

/// Ready when NATS is connected and the topology is there.
async fn readyz(State(app): State<App>) -> Result<Response, Error> {
    app.ensure_connected()?;
    app.js
        .get_stream(topology::TASKS_STREAM)
        .await
        .map_err(|e| Error::Unavailable(format!("stream {}: {e}", topology::TASKS_STREAM)))?;
    Ok("ready".into_response())
}

async fn metrics(State(app): State<App>) -> Response {
    let text = crate::metrics::render(&app).await;
    ([(axum::http::header::CONTENT_TYPE, claw_proto::metrics::CONTENT_TYPE)], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn list_query_parses_and_names_bad_fields() {
        let q = list_query(params(&[("status", "failed"), ("limit", "10"), ("kind", "")]));
        let q = q.unwrap();
        assert_eq!(q.status, Some(Status::Failed));
        assert_eq!(q.limit, Some(10));
        assert_eq!(q.kind, None);
        for (k, v) in [("status", "done"), ("limit", "0"), ("limit", "x"), ("session", "a.b")] {
            match list_query(params(&[(k, v)])) {
                Err(Error::Invalid(i)) => assert_eq!(i.field.as_deref(), Some(k)),
                other => panic!("{k}={v}: {other:?}"),
            }
        }
        assert!(list_query(params(&[("colour", "red")])).is_err());
        // The owner filter is the caller's, never the query string's.
        assert!(list_query(params(&[("owner", "alice")])).is_err());
    }
}
