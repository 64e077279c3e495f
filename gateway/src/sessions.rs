//! Who owns a session, when the gateway runs with API tokens.
//!
//! A session belongs to the principal that first uses it: the first submit into it or the first
//! WebSocket that watches it writes the principal's name under the session in the KV bucket
//! `sessions`, create-if-absent, so of two gateways racing for a new session exactly one
//! principal wins. Ownership never changes, which is what lets every gateway cache it: a known
//! session costs a submit nothing, and only its first sight in this process pays a KV round
//! trip. Listing history by session only reads the owner; it does not claim.
//!
//! Another principal's session answers 404 exactly like a task that does not exist. Admins and
//! the anonymous caller of a gateway without tokens are never checked and never claim.

use std::collections::HashMap;
use std::sync::Mutex;

use async_nats::jetstream::kv::{self, CreateErrorKind};
use claw_proto::task::Session;

use crate::app::App;
use crate::auth::Caller;
use crate::error::Error;

/// Owners remembered per gateway process. Far more sessions than a gateway sees in a day; when
/// it is full the cache starts over, which costs one KV read per session, not correctness.
const MAX_CACHED: usize = 100_000;

/// Whether a use of a session claims it when nobody owns it yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// Submit into it, watch it: the first such use makes the caller its owner.
    Claim,
    /// Read its history: an unowned session stays unowned (the listing is filtered by owner).
    Read,
}

/// The `sessions` bucket and this process's cache of it.
#[derive(Debug)]
pub struct Owners {
    kv: kv::Store,
    cache: Mutex<HashMap<Session, String>>,
}

impl Owners {
    pub fn new(kv: kv::Store) -> Owners {
        Owners { kv, cache: Mutex::new(HashMap::new()) }
    }

    fn cached(&self, session: &Session) -> Option<String> {
        self.cache.lock().expect("the cache lock is never poisoned").get(session).cloned()
    }

    fn remember(&self, session: &Session, owner: &str) {
        let mut cache = self.cache.lock().expect("the cache lock is never poisoned");
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(session.clone(), owner.to_owned());
    }

    /// The owner in the bucket, if any.
    async fn read(&self, session: &Session) -> Result<Option<String>, Error> {
        let value = self.kv.get(session.as_str()).await.map_err(|e| {
            Error::Unavailable(format!("reading the owner of session {session}: {e}"))
        })?;
        Ok(value.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }
}

/// Lets `caller` use `session`, or answers 404 when another principal owns it.
pub async fn access(app: &App, caller: &Caller, session: &Session, what: Use) -> Result<(), Error> {
    if caller.sees_all() {
        return Ok(());
    }
    // Principals exist only with tokens, and with tokens the bucket is open.
    let (Some(name), Some(owners)) = (caller.owner(), &app.sessions) else { return Ok(()) };
    let owner = match owners.cached(session) {
        Some(owner) => Some(owner),
        None => {
            let owner = match what {
                Use::Claim => {
                    app.ensure_connected()?;
                    match owners.kv.create(session.as_str(), name.as_bytes().to_vec().into()).await
                    {
                        Ok(_) => {
                            tracing::info!(%session, owner = name, "session claimed");
                            Some(name.to_owned())
                        }
                        Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
                            owners.read(session).await?
                        }
                        Err(e) => {
                            return Err(Error::Unavailable(format!(
                                "claiming session {session}: {e}"
                            )));
                        }
                    }
                }
                Use::Read => owners.read(session).await?,
            };
            if let Some(owner) = &owner {
                owners.remember(session, owner);
            }
            owner
        }
    };
    match owner {
        Some(owner) if owner != name => Err(not_found(session)),
        _ => Ok(()),
    }
}

/// The answer for a session the caller may not see: the same as for one that does not exist.
pub fn not_found(session: &Session) -> Error {
    Error::NotFound(format!("no session {session}"))
}
