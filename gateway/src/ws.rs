//! The WebSocket of a session's live events: `GET /v1/ws?session=S[&since=SEQ]`.
//!
//! A socket receives, as text frames of one JSON object each: a `hello` naming the stream's
//! last sequence at connect time, then (with `since`) every event of the session after `since`
//! still in `PROGRESS`, then the live events, each with its stream sequence `seq`, each sequence
//! at most once and in increasing order. The client may send commands (`submit`, `cancel`,
//! `pause`, `resume`, `retry`), which run through the same functions as HTTP and are answered
//! with a `reply` frame. `docs/PROTOCOL.md` has the wire contract.
//!
//! The upgrade needs an API token when the gateway has them: `Authorization: Bearer` from
//! programs, or, from browsers (which cannot set headers on a WebSocket), `ticket=T` from
//! `POST /v1/ws-ticket` ([`crate::tickets`]): single-use and short-lived, so the URL a proxy
//! logs holds nothing that still opens a socket. A session
//! is always the caller's own: each principal's sessions are a namespace of their own
//! ([`SessionScope`]), so there is nothing to claim and no other party's events to replay. An
//! admin (or anyone, without tokens) may watch another namespace with `owner=<principal>`, or
//! `owner=~` for the tasks without an owner.
//!
//! Reading order: this file (the upgrade: auth, origin check, parameters, subscription), [`hub`] (one
//! JetStream feed per watched session, shared by its sockets, and the replay for `since`),
//! [`socket`] (one connection: a writer loop and a reader loop), [`command`] (client frames).
//! The `Origin` and `Host` rules are [`crate::browser`]'s.

pub mod command;
pub mod hub;
pub mod socket;

use std::collections::HashMap;

use axum::Extension;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use claw_proto::spec::Invalid;
use claw_proto::task::Session;
use claw_proto::topology::SessionScope;

use crate::app::App;
use crate::auth::Caller;
use crate::error::Error;

pub use hub::Hub;

/// Read buffer of a socket. Tungstenite allocates it eagerly per connection (128 KiB by
/// default); clients send only small command frames, and a larger frame still arrives whole
/// (the buffer grows for it), so 4 KiB keeps ten thousand idle sockets at ~40 MiB.
const READ_BUFFER: usize = 4 * 1024;

/// What a client may put in a command frame beyond the task spec itself (the envelope:
/// `op`, `ref`, `idempotency_key`).
const COMMAND_ENVELOPE: usize = 4 * 1024;

/// `GET /v1/ws?session=S[&since=SEQ][&owner=P][&ticket=T]`: checks the token or ticket (401), `Origin` (403) and the
/// namespace (404 for another principal's), subscribes to the session's feed (so a NATS failure is a 503 before the upgrade,
/// not a socket that closes at once) and hands the connection to [`socket::serve`].
pub async fn upgrade(
    State(app): State<App>,
    hub: Option<Extension<Hub>>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, Error> {
    crate::browser::check_origin(&headers, &app)?;
    let Query(params) = query.map_err(|e| invalid(e.body_text()))?;
    let params = Params::parse(params)?;
    let ws = ws.map_err(|e| invalid(format!("expected a WebSocket upgrade: {}", e.body_text())))?;
    let caller = match &params.ticket {
        Some(ticket) => app.tickets.redeem(&app.auth, ticket).await?,
        None => app.auth.caller(&headers)?,
    };
    let session = params.scope(&caller)?;
    // Held by the socket until it closes.
    let permits = (app.quotas.socket(&caller)?, app.quotas.watch(&caller, &session)?);
    let Some(Extension(hub)) = hub else {
        return Err(Error::Unavailable("this router serves no WebSocket hub".into()));
    };
    let subscription = hub.subscribe(&session).await?;
    // Read after subscribing, so it is at least the feed's hand-over point (see `socket`).
    let bounds = hub.stream_bounds().await?;
    let start = socket::Start { session, caller, since: params.since, bounds };
    let settings = hub.settings();
    let max_message = app.config.body_limit + COMMAND_ENVELOPE;
    let ws = ws
        // Echoes `claw.v1` when offered.
        .protocols([crate::auth::WS_PROTOCOL])
        .read_buffer_size(READ_BUFFER)
        // Frames are written out at once and each send is flushed, so a write buffer to batch
        // small frames would only cost memory per connection.
        .write_buffer_size(0)
        // What is not yet written to the kernel: one frame at most, as each send waits for its
        // flush. An event is one NATS message, so the largest is the server's max payload.
        .max_write_buffer_size(settings.max_frame)
        .max_message_size(max_message)
        .max_frame_size(max_message);
    let tracker = hub.tracker();
    Ok(ws.on_upgrade(move |websocket| {
        tracker.track_future(async move {
            let _permits = permits;
            socket::serve(websocket, app, subscription, start, hub).await
        })
    }))
}

fn invalid(message: String) -> Error {
    Error::Invalid(Invalid { field: None, message })
}

/// The query of `/v1/ws`.
#[derive(Debug, PartialEq)]
struct Params {
    session: Session,
    since: Option<u64>,
    /// Another namespace than the caller's: `Some(None)` is `owner=~`, the tasks without one.
    owner: Option<Option<String>>,
    /// A single-use ticket instead of `Authorization` (browsers).
    ticket: Option<String>,
}

/// What `owner=` names for the tasks without an owner.
const NO_OWNER: &str = "~";

impl Params {
    /// `session` defaults to `default`, like a submitted task's; empty values count as absent.
    fn parse(params: HashMap<String, String>) -> Result<Params, Error> {
        let mut parsed =
            Params { session: Session::default(), since: None, owner: None, ticket: None };
        for (key, value) in params {
            if value.is_empty() {
                continue;
            }
            match key.as_str() {
                "session" => {
                    parsed.session = Session::parse(&value)
                        .map_err(|e| Invalid::field("session", e.to_string()))?
                }
                "since" => {
                    parsed.since = Some(value.parse::<u64>().map_err(|_| {
                        Invalid::field("since", "must be a stream sequence (an integer ≥ 0)")
                    })?)
                }
                "ticket" => parsed.ticket = Some(value),
                "owner" if value == NO_OWNER => parsed.owner = Some(None),
                "owner" => {
                    // Principal names are session-like tokens (the tokens file checks them).
                    Session::parse(&value).map_err(|e| Invalid::field("owner", e.to_string()))?;
                    parsed.owner = Some(Some(value));
                }
                other => {
                    return Err(
                        Invalid::field(other, format!("unknown parameter {other:?}")).into()
                    );
                }
            }
        }
        Ok(parsed)
    }

    /// The namespace watched: the caller's own, or (for a caller who sees everything) the one
    /// `owner` names. Naming another principal's is 404, like a session that does not exist.
    fn scope(&self, caller: &Caller) -> Result<SessionScope, Error> {
        let own = caller.owner();
        let owner = match &self.owner {
            None => own,
            Some(asked) if caller.sees_all() || asked.as_deref() == own => asked.as_deref(),
            Some(_) => return Err(Error::NotFound(format!("no session {}", self.session))),
        };
        Ok(SessionScope::new(owner, self.session.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Result<Params, Error> {
        Params::parse(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn allowed_origins_repeat_or_come_comma_separated() {
        let args =
            ["--allowed-origin", "https://a.example", "--allowed-origin", "https://b,https://c"];
        let config = crate::Config::from_args(args).unwrap();
        assert_eq!(config.allowed_origins, ["https://a.example", "https://b", "https://c"]);
        assert!(crate::Config::from_args(["--ws-ping-s", "0"]).is_err());
    }

    #[test]
    fn parameters() {
        let chat = Session::parse("chat-1").unwrap();
        let p = params(&[("session", "chat-1"), ("since", "42")]).unwrap();
        assert_eq!(p, Params { session: chat.clone(), since: Some(42), owner: None, ticket: None });
        let p = params(&[("since", "")]).unwrap();
        assert_eq!(
            p,
            Params { session: Session::default(), since: None, owner: None, ticket: None }
        );
        let p = params(&[("owner", "~")]).unwrap();
        assert_eq!(p.owner, Some(None));
        let p = params(&[("owner", "alice")]).unwrap();
        assert_eq!(p.owner, Some(Some("alice".into())));
        for (k, v) in [
            ("since", "-1"),
            ("since", "x"),
            ("session", "a.b"),
            ("colour", "red"),
            ("owner", "a.b"),
            ("owner", "*"),
        ] {
            match params(&[(k, v)]) {
                Err(Error::Invalid(i)) => assert_eq!(i.field.as_deref(), Some(k)),
                other => panic!("{k}={v}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_socket_watches_its_callers_namespace_unless_an_admin_names_another() {
        use crate::auth::Principal;
        use std::sync::Arc;
        let principal =
            |name: &str, admin| Caller::Principal(Arc::new(Principal { name: name.into(), admin }));
        let (alice, root) = (principal("alice", false), principal("root", true));
        let scope = |caller: &Caller, pairs: &[(&str, &str)]| {
            params(pairs).unwrap().scope(caller).map(|s| s.filter())
        };
        assert_eq!(scope(&alice, &[]).unwrap(), "progress.alice.default.*");
        assert_eq!(scope(&alice, &[("owner", "alice")]).unwrap(), "progress.alice.default.*");
        assert!(matches!(scope(&alice, &[("owner", "bob")]), Err(Error::NotFound(_))));
        assert!(matches!(scope(&alice, &[("owner", "~")]), Err(Error::NotFound(_))));
        assert_eq!(scope(&root, &[("session", "s")]).unwrap(), "progress.root.s.*");
        assert_eq!(scope(&root, &[("owner", "bob")]).unwrap(), "progress.bob.default.*");
        assert_eq!(scope(&root, &[("owner", "~")]).unwrap(), "progress.default.*");
        assert_eq!(scope(&Caller::Anonymous, &[]).unwrap(), "progress.default.*");
    }
}
