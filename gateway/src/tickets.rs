//! Single-use WebSocket tickets: how a browser opens `/v1/ws` without putting its API token
//! where proxies log it. A browser cannot set headers on a WebSocket, so the token would have
//! to travel in the URL or a subprotocol, both of which access logs keep. Instead the page asks
//! `POST /v1/ws-ticket` (with its token in `Authorization`, like any request) for a ticket, and
//! opens `/v1/ws?ticket=T`: the ticket names the principal, works once, and only for
//! [`Config::ws_ticket_s`](crate::Config) seconds (30 by default), so a logged one is spent.
//!
//! Tickets live in the KV bucket `tickets` (any gateway redeems what another issued; entries
//! leave the bucket after 60 s), keyed by the SHA-256 of the ticket, so the bucket holds nothing
//! a reader could redeem. Redeeming reads the entry and purges it on condition that it is
//! still the revision read: of two upgrades racing with one ticket, exactly one gets through.

use std::time::Duration;

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::auth::{Auth, Caller};
use crate::error::Error;

/// What `POST /v1/ws-ticket` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct Issued {
    /// Give it as `/v1/ws?ticket=<ticket>`, once.
    pub ticket: String,
    /// Seconds from now until it expires.
    pub expires_in_s: u64,
}

/// What the bucket holds under a ticket's digest.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    principal: String,
    #[serde(with = "time::serde::rfc3339")]
    expires_at: OffsetDateTime,
}

/// The `tickets` bucket (none without API tokens, where nothing needs a ticket).
#[derive(Debug)]
pub struct Tickets {
    kv: Option<kv::Store>,
    ttl: Duration,
}

/// What every refused ticket answers: which of used, expired or unknown is nobody's business.
fn refused() -> Error {
    Error::Unauthorized(
        "the WebSocket ticket is not valid (each works once, briefly): ask POST /v1/ws-ticket for \
         a new one"
            .into(),
    )
}

impl Tickets {
    pub fn new(kv: Option<kv::Store>, ttl: Duration) -> Tickets {
        Tickets { kv, ttl }
    }

    /// A new ticket for `caller`. Without API tokens nothing needs a ticket, and the one
    /// answered is not stored (an upgrade does not check it).
    pub async fn issue(&self, caller: &Caller) -> Result<Issued, Error> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)
            .map_err(|e| Error::Internal(format!("no randomness from the OS: {e}")))?;
        let ticket = format!("ct_{}", hex::encode(bytes));
        let issued = Issued { ticket, expires_in_s: self.ttl.as_secs() };
        let (Caller::Principal(principal), Some(kv)) = (caller, &self.kv) else {
            return Ok(issued);
        };
        let entry = Entry {
            principal: principal.name.clone(),
            expires_at: OffsetDateTime::now_utc() + self.ttl,
        };
        let value = serde_json::to_vec(&entry).map_err(|e| Error::Internal(e.to_string()))?;
        kv.create(key(&issued.ticket), value.into())
            .await
            .map_err(|e| Error::Unavailable(format!("storing a WebSocket ticket: {e}")))?;
        Ok(issued)
    }

    /// The caller `ticket` stands for, spending it; 401 when it is used, expired or unknown.
    pub async fn redeem(&self, auth: &Auth, ticket: &str) -> Result<Caller, Error> {
        let (Auth::Tokens(tokens), Some(kv)) = (auth, &self.kv) else {
            return Ok(Caller::Anonymous);
        };
        if !ticket.starts_with("ct_") || ticket.len() != 67 {
            return Err(refused());
        }
        let key = key(ticket);
        let found = kv
            .entry(&key)
            .await
            .map_err(|e| Error::Unavailable(format!("reading a WebSocket ticket: {e}")))?;
        let Some(found) = found.filter(|e| e.operation == kv::Operation::Put) else {
            return Err(refused());
        };
        // Spent before it is checked: a ticket that fails is gone too.
        if kv.purge_expect_revision(&key, Some(found.revision)).await.is_err() {
            return Err(refused());
        }
        let entry: Entry = serde_json::from_slice(&found.value).map_err(|_| refused())?;
        if entry.expires_at < OffsetDateTime::now_utc() {
            return Err(refused());
        }
        // The principal as the tokens file says now (an admin flag, or a principal removed).
        tokens.principal(&entry.principal).map(Caller::Principal).ok_or_else(refused)
    }
}

/// The bucket key of a ticket: its SHA-256, hex.
fn key(ticket: &str) -> String {
    hex::encode(crate::auth::hash(ticket))
}
