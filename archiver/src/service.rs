//! The `claw-archive` NATS micro service: `claw.archive.get` and `claw.archive.list`, the history
//! the gateway serves on `GET /v1/tasks/{id}` (after a KV miss) and `GET /v1/tasks`, and
//! `claw.archive.usage`, what each principal holds (its queued and running tasks, its bytes in
//! the bucket and the object store), which the gateways' quotas count against.
//!
//! Every reply is JSON. A failure is a normal reply whose body is the shared error shape
//! `{"error": {"code", "message", "field"?}}`, so callers parse one thing; it also carries the
//! micro-service headers `Nats-Service-Error` / `Nats-Service-Error-Code` (an HTTP-like status)
//! for tools that look there. Bad input is always an `invalid_request` reply, never a panic.

use std::time::Duration;

use async_nats::service::{self, ServiceExt};
use async_nats::{Client, HeaderMap};
use claw_proto::TaskId;
use claw_proto::api::{ApiError, DEFAULT_PAGE, ErrorBody, GetRequest, ListQuery, MAX_PAGE};
use claw_proto::topology::{ARCHIVE_GROUP, ARCHIVE_SERVICE};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::store::{Cursor, Filter, Store};

/// Requests handled at once per endpoint; more wait in the subscription. Above the pool size so
/// SQLite, not this number, is what limits concurrent reads.
const MAX_IN_FLIGHT: usize = 16;

/// How long shutdown waits for requests already being answered.
const DRAIN: Duration = Duration::from_secs(5);

/// A failed request: the status for the micro headers and the body for the caller.
#[derive(Debug)]
pub struct Failure {
    pub status: u16,
    pub error: ApiError,
}

impl Failure {
    fn invalid(field: Option<String>, message: impl Into<String>) -> Failure {
        Failure {
            status: 400,
            error: ApiError {
                code: "invalid_request".into(),
                message: message.into(),
                field,
                status: None,
                limit: None,
            },
        }
    }

    fn not_found(id: &TaskId) -> Failure {
        Failure {
            status: 404,
            error: ApiError {
                code: "not_found".into(),
                message: format!("no archived task {id}"),
                field: None,
                status: None,
                limit: None,
            },
        }
    }

    /// The store failed: logged here, once; the caller only learns that it was not its fault.
    fn internal(e: &Error) -> Failure {
        tracing::error!(error = %e, "archive request failed");
        Failure {
            status: 500,
            error: ApiError {
                code: "internal".into(),
                message: "the archive could not answer".into(),
                field: None,
                status: None,
                limit: None,
            },
        }
    }
}

/// Serves the endpoints (get, list, usage) until `shutdown`, then drains the requests in hand.
pub async fn serve(client: Client, store: Store, shutdown: CancellationToken) -> Result<(), Error> {
    let nats = |what: &'static str| move |source| Error::Nats { what, source };
    let service = client
        .service_builder()
        .description("History of finished tasks: get by id, list by session/status/kind")
        .start(ARCHIVE_SERVICE, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(nats("starting the claw-archive service"))?;
    let group = service.group(ARCHIVE_GROUP);
    let get =
        group.endpoint_builder().name("get").add("get").await.map_err(nats("endpoint get"))?;
    let list =
        group.endpoint_builder().name("list").add("list").await.map_err(nats("endpoint list"))?;
    let usage = group
        .endpoint_builder()
        .name("usage")
        .add("usage")
        .await
        .map_err(nats("endpoint usage"))?;
    // Every gateway asks about once a second; one query a second answers them all.
    let cache = UsageCache::default();

    let serving = futures::future::join3(
        get.for_each_concurrent(MAX_IN_FLIGHT, |request| {
            let store = store.clone();
            async move {
                let reply = get_reply(&store, &request.message.payload).await;
                answer(request, reply).await;
            }
        }),
        list.for_each_concurrent(MAX_IN_FLIGHT, |request| {
            let store = store.clone();
            // Read per request: a reconnect may land on a server with another limit.
            let max_bytes = page_bytes(client.server_info().max_payload);
            async move {
                let reply = list_reply(&store, &request.message.payload, max_bytes).await;
                answer(request, reply).await;
            }
        }),
        usage.for_each_concurrent(MAX_IN_FLIGHT, |request| {
            let (store, cache) = (store.clone(), cache.clone());
            async move { answer(request, cache.reply(&store).await).await }
        }),
    );
    tokio::pin!(serving);
    tokio::select! {
        _ = &mut serving => {
            // Only a closed connection ends the subscriptions unasked.
            return Err(Error::Nats {
                what: "serving claw-archive",
                source: "the endpoint subscriptions closed".into(),
            });
        }
        () = shutdown.cancelled() => {}
    }
    // Unsubscribes the endpoints; their streams end once the requests in hand are answered.
    let _ = service.stop().await;
    if tokio::time::timeout(DRAIN, serving).await.is_err() {
        tracing::warn!("archive requests still running at shutdown were dropped");
    }
    Ok(())
}

async fn answer(request: service::Request, reply: Result<Vec<u8>, Failure>) {
    let (body, headers) = match reply {
        Ok(body) => (body, HeaderMap::new()),
        Err(failure) => {
            let mut headers = HeaderMap::new();
            let line = claw_proto::topology::headers::one_line(&failure.error.message);
            headers.insert(service::NATS_SERVICE_ERROR, line.as_str());
            headers.insert(service::NATS_SERVICE_ERROR_CODE, failure.status.to_string().as_str());
            let body = serde_json::to_vec(&ErrorBody { error: failure.error })
                .expect("the error body always serializes");
            (body, headers)
        }
    };
    if let Err(e) = request.respond_with_headers(Ok(body.into()), headers).await {
        tracing::warn!(subject = %request.message.subject, error = %e, "archive reply failed");
    }
}

/// How long one answer of `claw.archive.usage` is reused.
const USAGE_FRESH: Duration = Duration::from_millis(500);

/// The last usage report, shared by the requests of this process: many gateways asking at
/// once cost one query (the lock is held while it runs, so the others wait for its answer).
#[derive(Clone, Debug, Default)]
struct UsageCache(std::sync::Arc<tokio::sync::Mutex<Option<Answered>>>);

/// When a usage reply was made, and its body.
type Answered = (tokio::time::Instant, Vec<u8>);

impl UsageCache {
    /// `claw.archive.usage` (the request body is ignored) → a [`UsageReport`].
    ///
    /// [`UsageReport`]: claw_proto::api::UsageReport
    async fn reply(&self, store: &Store) -> Result<Vec<u8>, Failure> {
        let mut last = self.0.lock().await;
        if let Some((at, body)) = &*last
            && at.elapsed() < USAGE_FRESH
        {
            return Ok(body.clone());
        }
        let report = store.usage().await.map_err(|e| Failure::internal(&e))?;
        let body = serde_json::to_vec(&report).expect("a usage report always serializes");
        *last = Some((tokio::time::Instant::now(), body.clone()));
        Ok(body)
    }
}

/// `claw.archive.get`: `{"id": "..."}` (or, for `nats req`, the bare id) → the record JSON.
pub async fn get_reply(store: &Store, payload: &[u8]) -> Result<Vec<u8>, Failure> {
    let id = parse_get(payload)?;
    match store.get(&id).await {
        Ok(Some(json)) => Ok(json.into_bytes()),
        Ok(None) => Err(Failure::not_found(&id)),
        Err(e) => Err(Failure::internal(&e)),
    }
}

fn parse_get(payload: &[u8]) -> Result<TaskId, Failure> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| Failure::invalid(None, "the request is not UTF-8"))?
        .trim();
    if text.starts_with('{') {
        return parse_json::<GetRequest>(text.as_bytes()).map(|r| r.id);
    }
    TaskId::parse(text).map_err(|e| Failure::invalid(Some("id".into()), e.to_string()))
}

/// The largest page a reply may carry on a server that takes messages of `max_payload` bytes:
/// the same room for the framing as a record in the bucket has.
pub fn page_bytes(max_payload: usize) -> usize {
    max_payload.saturating_sub(claw_proto::records::HEADROOM)
}

/// `claw.archive.list`: a `ListQuery` (an empty body is all defaults) → a `ListPage` of at most
/// `max_bytes` ([`page_bytes`]).
pub async fn list_reply(
    store: &Store,
    payload: &[u8],
    max_bytes: usize,
) -> Result<Vec<u8>, Failure> {
    let filter = parse_list(payload)?;
    match store.list(&filter, max_bytes).await {
        Ok(page) => Ok(serde_json::to_vec(&page).expect("a page always serializes")),
        Err(e) => Err(Failure::internal(&e)),
    }
}

fn parse_list(payload: &[u8]) -> Result<Filter, Failure> {
    let query = if payload.iter().all(u8::is_ascii_whitespace) {
        ListQuery::default()
    } else {
        parse_json::<ListQuery>(payload)?
    };
    let limit = match query.limit {
        None => DEFAULT_PAGE,
        Some(n) if (1..=MAX_PAGE).contains(&n) => n,
        Some(_) => {
            return Err(Failure::invalid(Some("limit".into()), format!("must be 1-{MAX_PAGE}")));
        }
    };
    let after = match query.cursor.as_deref() {
        None => None,
        Some(s) => Some(Cursor::decode(s).ok_or_else(|| {
            Failure::invalid(Some("cursor".into()), "not a cursor this archive gave out")
        })?),
    };
    Ok(Filter {
        session: query.session,
        status: query.status,
        kind: query.kind,
        owner: query.owner,
        limit,
        after,
    })
}

/// Parses JSON, naming the field at fault the way the gateway's HTTP errors do.
fn parse_json<T: DeserializeOwned>(payload: &[u8]) -> Result<T, Failure> {
    let de = &mut serde_json::Deserializer::from_slice(payload);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        // "." is the whole document, "?" a position serde could not name (truncated JSON).
        let field = (path != "." && path != "?").then_some(path);
        Failure::invalid(field, e.inner().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid_field<T: std::fmt::Debug>(r: Result<T, Failure>) -> Option<String> {
        let f = r.unwrap_err();
        assert_eq!((f.status, f.error.code.as_str()), (400, "invalid_request"));
        f.error.field
    }

    #[test]
    fn get_takes_json_or_a_bare_id() {
        assert_eq!(parse_get(br#"{"id": "abc"}"#).unwrap().as_str(), "abc");
        assert_eq!(parse_get(b" abc\n").unwrap().as_str(), "abc");
        assert_eq!(invalid_field(parse_get(br#"{"id": "a.b"}"#)).as_deref(), Some("id"));
        assert_eq!(invalid_field(parse_get(b"a b")).as_deref(), Some("id"));
        assert_eq!(invalid_field(parse_get(b"")).as_deref(), Some("id"));
        assert_eq!(invalid_field(parse_get(b"{")), None);
        assert_eq!(invalid_field(parse_get(b"\xff")), None);
    }

    #[test]
    fn list_defaults_and_limits() {
        let f = parse_list(b"").unwrap();
        assert_eq!((f.limit, f.after.is_none()), (DEFAULT_PAGE, true));
        assert_eq!(parse_list(b"{}").unwrap().limit, DEFAULT_PAGE);
        assert_eq!(parse_list(br#"{"limit": 500}"#).unwrap().limit, MAX_PAGE);
        assert_eq!(invalid_field(parse_list(br#"{"limit": 501}"#)).as_deref(), Some("limit"));
        assert_eq!(invalid_field(parse_list(br#"{"limit": 0}"#)).as_deref(), Some("limit"));
        assert_eq!(invalid_field(parse_list(br#"{"limit": -1}"#)).as_deref(), Some("limit"));
        assert_eq!(invalid_field(parse_list(br#"{"status": "nope"}"#)).as_deref(), Some("status"));
        assert_eq!(invalid_field(parse_list(br#"{"cursor": "x"}"#)).as_deref(), Some("cursor"));
        assert_eq!(invalid_field(parse_list(br#"{"bogus": 1}"#)).as_deref(), Some("bogus"));
        assert_eq!(invalid_field(parse_list(b"[")), None);
    }
}
