//! API tokens and the principals they stand for: a principal sees only its own tasks and sessions.
//!
//! With `--tokens FILE` every `/v1/*` request names a principal with `Authorization: Bearer
//! <token>` (a browser's WebSocket, which cannot set headers, gives a single-use ticket instead:
//! [`crate::tickets`]). A principal sees only its own tasks and sessions; an
//! admin principal sees everything. Without a tokens file there is one anonymous caller who
//! sees everything, and the gateway serves loopback only ([`crate::Config::check_exposure`]).
//!
//! The file maps principals to tokens, in TOML:
//!
//! ```toml
//! [principals.alice]
//! tokens = ["sha256:4a6f...e1"]   # the SHA-256 of the token, hex (`claw token new` prints it)
//!
//! [principals.ops]
//! tokens = ["sha256:9c1d...07", "claw_0f3a..."]   # a plain token works too, but is a secret
//! admin = true
//!
//! [limits]                  # every principal's limits ([`crate::quota`]), and one's own:
//! submits_per_s = 100
//! [principals.ops.limits]
//! submits_per_s = 1000
//! ```
//!
//! Only SHA-256 digests are kept in memory. A presented token is hashed and compared with every
//! known digest in constant time (`subtle`), all of them every time, so neither the comparison
//! nor the position of a match leaks through timing.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::Error;
use crate::quota::{Overrides, Quota};

/// The WebSocket subprotocol of `/v1/ws`, echoed when a client offers it.
pub const WS_PROTOCOL: &str = "claw.v1";
/// Plain tokens shorter than this are refused when the file is loaded: they could be guessed.
pub const MIN_TOKEN_LEN: usize = 16;
/// How the file marks a digest rather than a plain token.
const SHA256_PREFIX: &str = "sha256:";
/// What `claw token new` puts before the random part, so a leaked token is recognizable.
const TOKEN_PREFIX: &str = "claw_";

/// Who is calling: the one anonymous caller of a gateway without tokens, or a principal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    Anonymous,
    Principal(Arc<Principal>),
}

/// A named holder of API tokens, from the tokens file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    /// Sees every task and session, including those without an owner; may pause lanes.
    pub admin: bool,
}

impl Caller {
    /// What a task this caller submits records as its `owner`.
    pub fn owner(&self) -> Option<&str> {
        match self {
            Caller::Anonymous => None,
            Caller::Principal(p) => Some(&p.name),
        }
    }

    /// Whether this caller sees every task and session: no tokens, or an admin.
    pub fn sees_all(&self) -> bool {
        match self {
            Caller::Anonymous => true,
            Caller::Principal(p) => p.admin,
        }
    }

    /// Whether a task or session owned by `owner` is visible to this caller. Unowned ones
    /// (NATS-native tasks) are visible only to callers who see everything.
    pub fn may_see(&self, owner: Option<&str>) -> bool {
        self.sees_all() || (owner.is_some() && owner == self.owner())
    }

    /// The owner filter of this caller's history listing: `None` lists everything.
    pub fn list_filter(&self) -> Option<String> {
        if self.sees_all() { None } else { self.owner().map(str::to_owned) }
    }
}

/// The gateway's authentication: off (no tokens file), or the loaded tokens.
#[derive(Debug)]
pub enum Auth {
    Off,
    Tokens(Tokens),
}

/// The digests of every known token, each with its principal.
#[derive(Debug)]
pub struct Tokens {
    entries: Vec<([u8; 32], Arc<Principal>)>,
    /// Each principal's limits, defaults applied.
    quotas: Vec<(String, Quota)>,
}

impl Auth {
    /// Loads the tokens file when there is one; a file that does not parse is an error that
    /// names the file and the problem.
    pub fn load(path: Option<&Path>) -> Result<Auth, Error> {
        let Some(path) = path else { return Ok(Auth::Off) };
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("tokens file {}: {e}", path.display())))?;
        let tokens = Tokens::parse(&text)
            .map_err(|e| Error::Config(format!("tokens file {}: {e}", path.display())))?;
        Ok(Auth::Tokens(tokens))
    }

    pub fn is_on(&self) -> bool {
        matches!(self, Auth::Tokens(_))
    }

    /// The caller a NATS request on `claw.api.as.<name>.*` acts as: the principal `name` of the
    /// tokens file. NATS permissions, not a token, prove the requester is that principal
    /// (`nats/accounts/claw.conf`, the tenant template). 401 when there is no tokens file or it
    /// names no such principal: the subject was reachable, but the gateway cannot honour it.
    pub fn named(&self, name: &str) -> Result<Caller, Error> {
        let Auth::Tokens(tokens) = self else {
            return Err(Error::Unauthorized(format!(
                "the gateway has no tokens file, so it knows no principal {name:?}: \
                 use the un-prefixed claw.api.* subjects"
            )));
        };
        tokens
            .principal(name)
            .map(Caller::Principal)
            .ok_or_else(|| Error::Unauthorized(format!("the gateway knows no principal {name:?}")))
    }

    /// The caller of a request, from `Authorization: Bearer`. 401 when auth is on and no known
    /// token is presented.
    pub fn caller(&self, headers: &HeaderMap) -> Result<Caller, Error> {
        let Auth::Tokens(tokens) = self else { return Ok(Caller::Anonymous) };
        let Some(token) = bearer(headers) else {
            return Err(Error::Unauthorized(
                "an API token is required: Authorization: Bearer <token>".into(),
            ));
        };
        tokens
            .lookup(token)
            .map(Caller::Principal)
            .ok_or_else(|| Error::Unauthorized("the API token is not valid".into()))
    }
}

impl Tokens {
    /// Parses the TOML of a tokens file (see the module docs).
    pub fn parse(text: &str) -> Result<Tokens, String> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            /// Every principal's limits (`crate::quota`); each may override some.
            #[serde(default)]
            limits: Quota,
            #[serde(default)]
            principals: BTreeMap<String, Entry>,
        }
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Entry {
            tokens: Vec<String>,
            #[serde(default)]
            admin: bool,
            #[serde(default)]
            limits: Overrides,
        }
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        if file.principals.is_empty() {
            return Err("no principals: add a [principals.<name>] table with tokens".into());
        }
        let mut entries = Vec::new();
        let mut quotas = Vec::new();
        let mut seen = HashSet::new();
        file.limits.with(&Overrides::default()).map_err(|e| format!("[limits]: {e}"))?;
        for (name, entry) in file.principals {
            if claw_proto::Session::parse(&name).is_err() {
                return Err(format!(
                    "principal {name:?}: a name is 1-64 characters of A-Z, a-z, 0-9, '_' or '-'"
                ));
            }
            if entry.tokens.is_empty() {
                return Err(format!("principal {name:?} has no tokens"));
            }
            let quota =
                file.limits.with(&entry.limits).map_err(|e| format!("principal {name:?}: {e}"))?;
            quotas.push((name.clone(), quota));
            let principal = Arc::new(Principal { name: name.clone(), admin: entry.admin });
            for token in entry.tokens {
                let digest = digest_of_entry(&token)
                    .map_err(|problem| format!("principal {name:?}: {problem}"))?;
                if !seen.insert(digest) {
                    return Err(format!("principal {name:?}: a token is listed twice"));
                }
                entries.push((digest, principal.clone()));
            }
        }
        Ok(Tokens { entries, quotas })
    }

    /// Each principal's limits.
    pub fn quotas(&self) -> impl Iterator<Item = (&str, Quota)> {
        self.quotas.iter().map(|(name, quota)| (name.as_str(), *quota))
    }

    /// The principal named `name`.
    pub fn principal(&self, name: &str) -> Option<Arc<Principal>> {
        self.entries.iter().find(|(_, p)| p.name == name).map(|(_, p)| p.clone())
    }

    /// The principal of `token`. Every digest is compared, in constant time, whatever matches.
    pub fn lookup(&self, token: &str) -> Option<Arc<Principal>> {
        let digest = hash(token);
        let mut found = None;
        for (known, principal) in &self.entries {
            if bool::from(known.ct_eq(&digest)) {
                found = Some(principal.clone());
            }
        }
        found
    }
}

/// A file entry's digest: `sha256:<64 hex>`, or a plain token hashed here.
fn digest_of_entry(entry: &str) -> Result<[u8; 32], String> {
    if let Some(hex_digest) = entry.strip_prefix(SHA256_PREFIX) {
        let mut digest = [0u8; 32];
        hex::decode_to_slice(hex_digest, &mut digest)
            .map_err(|_| "a sha256: entry is 64 hex digits".to_owned())?;
        return Ok(digest);
    }
    if entry.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "a plain token has at least {MIN_TOKEN_LEN} characters (`claw token new` makes one)"
        ));
    }
    if !entry.bytes().all(is_token_char) {
        return Err("a token is visible ASCII without spaces, quotes or separators".into());
    }
    Ok(hash(entry))
}

/// Characters a token may have: those of an HTTP token (RFC 9110 `tchar`), so it fits both an
/// `Authorization` header and a WebSocket subprotocol name.
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The SHA-256 of a token.
pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A new random token (256 bits from the OS) and the line of the tokens file that lists its
/// digest.
pub fn generate() -> Result<(String, String), Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::Internal(format!("no randomness from the OS: {e}")))?;
    let token = format!("{TOKEN_PREFIX}{}", hex::encode(bytes));
    let line = format!("tokens = [\"{SHA256_PREFIX}{}\"]", hex::encode(hash(&token)));
    Ok((token, line))
}

/// The token of `Authorization: Bearer <token>`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &str = "alice-token-0123456789";
    const OPS: &str = "claw_ops-token-abcdefghij";

    fn file() -> String {
        format!(
            "[principals.alice]\ntokens = [\"sha256:{}\"]\n\n\
             [principals.ops]\ntokens = [\"{OPS}\"]\nadmin = true\n",
            hex::encode(hash(ALICE))
        )
    }

    #[test]
    fn tokens_map_to_their_principals() {
        let tokens = Tokens::parse(&file()).unwrap();
        let alice = tokens.lookup(ALICE).unwrap();
        assert_eq!((alice.name.as_str(), alice.admin), ("alice", false));
        let ops = tokens.lookup(OPS).unwrap();
        assert_eq!((ops.name.as_str(), ops.admin), ("ops", true));
        assert_eq!(tokens.lookup("alice-token-012345678"), None);
        assert_eq!(tokens.lookup(""), None);
        // A digest is not a token: knowing the file does not let one in.
        assert_eq!(tokens.lookup(&hex::encode(hash(ALICE))), None);
    }

    #[test]
    fn a_principal_is_named_only_by_a_tokens_file() {
        let auth = Auth::Tokens(Tokens::parse(&file()).unwrap());
        let Caller::Principal(alice) = auth.named("alice").unwrap() else { panic!("anonymous") };
        assert_eq!((alice.name.as_str(), alice.admin), ("alice", false));
        assert!(auth.named("ops").unwrap().sees_all());
        assert!(
            matches!(auth.named("mallory"), Err(Error::Unauthorized(m)) if m.contains("mallory"))
        );
        assert!(
            matches!(Auth::Off.named("alice"), Err(Error::Unauthorized(m)) if m.contains("no tokens file"))
        );
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let digest = hex::encode(hash(ALICE));
        for (text, expected) in [
            ("", "no principals"),
            ("[principals.a]\ntokens = []\n", "has no tokens"),
            ("[principals.a]\ntokens = [\"short\"]\n", "at least 16"),
            ("[principals.a]\ntokens = [\"sha256:abc\"]\n", "64 hex"),
            ("[principals.\"a b\"]\ntokens = [\"sha256:x\"]\n", "a name is"),
            ("[principals.a]\ntokens = [\"0123456789abcdef\"]\nadmn = true\n", "unknown field"),
            ("[principals.a]\ntokens = [\"has space 0123456789\"]\n", "visible ASCII"),
            ("principals = 1\n", "invalid type"),
            (
                "[limits]\nsubmit_burst = 0\n[principals.a]\ntokens = [\"0123456789abcdef\"]\n",
                "[limits]",
            ),
            (
                "[principals.a]\ntokens = [\"0123456789abcdef\"]\nlimits = { rate = 1 }\n",
                "unknown field",
            ),
        ] {
            let e = Tokens::parse(text).err().unwrap_or_else(|| panic!("{text:?} parsed"));
            assert!(e.contains(expected), "{text:?}: {e}");
        }
        let twice = format!(
            "[principals.a]\ntokens = [\"sha256:{digest}\"]\n\
             [principals.b]\ntokens = [\"{ALICE}\"]\n"
        );
        assert!(Tokens::parse(&twice).unwrap_err().contains("listed twice"));
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let e = Auth::load(Some(&path)).unwrap_err().to_string();
        assert!(e.contains("tokens.toml"), "{e}");
        std::fs::write(&path, "[principals.a]\ntokens = []\n").unwrap();
        let e = Auth::load(Some(&path)).unwrap_err().to_string();
        assert!(e.contains("tokens.toml") && e.contains("no tokens"), "{e}");
        std::fs::write(&path, file()).unwrap();
        assert!(Auth::load(Some(&path)).unwrap().is_on());
        assert!(!Auth::load(None).unwrap().is_on());
    }

    #[test]
    fn generated_tokens_are_accepted_through_their_line() {
        let (token, line) = generate().unwrap();
        assert!(token.starts_with(TOKEN_PREFIX) && token.len() == TOKEN_PREFIX.len() + 64);
        let tokens = Tokens::parse(&format!("[principals.x]\n{line}\n")).unwrap();
        assert_eq!(tokens.lookup(&token).unwrap().name, "x");
        assert_ne!(generate().unwrap().0, token);
    }

    #[test]
    fn callers_come_from_the_header_only() {
        let auth = Auth::Tokens(Tokens::parse(&file()).unwrap());
        let mut headers = HeaderMap::new();
        assert!(matches!(auth.caller(&headers), Err(Error::Unauthorized(_))));
        assert_eq!(Auth::Off.caller(&headers).unwrap(), Caller::Anonymous);

        headers.insert(header::AUTHORIZATION, format!("Bearer {ALICE}").parse().unwrap());
        assert_eq!(auth.caller(&headers).unwrap().owner(), Some("alice"));
        headers.insert(header::AUTHORIZATION, "Bearer nope-nope-nope-nope".parse().unwrap());
        assert!(matches!(auth.caller(&headers), Err(Error::Unauthorized(_))));

        // A token in a subprotocol (where proxies log it) is not read: browsers use tickets.
        let mut ws = HeaderMap::new();
        let protocols = format!("{WS_PROTOCOL}, claw.bearer.{OPS}");
        ws.insert(header::SEC_WEBSOCKET_PROTOCOL, protocols.parse().unwrap());
        assert!(auth.caller(&ws).is_err());
        let Auth::Tokens(tokens) = &auth else { unreachable!() };
        assert_eq!(tokens.principal("ops").map(|p| p.admin), Some(true));
        assert!(tokens.principal("nobody").is_none());
    }

    #[test]
    fn visibility() {
        let alice = Caller::Principal(Arc::new(Principal { name: "alice".into(), admin: false }));
        let ops = Caller::Principal(Arc::new(Principal { name: "ops".into(), admin: true }));
        assert!(alice.may_see(Some("alice")));
        assert!(!alice.may_see(Some("bob")));
        assert!(!alice.may_see(None));
        assert!(ops.may_see(Some("bob")) && ops.may_see(None));
        assert!(Caller::Anonymous.may_see(None) && Caller::Anonymous.may_see(Some("bob")));
        assert_eq!(alice.list_filter().as_deref(), Some("alice"));
        assert_eq!(ops.list_filter(), None);
        assert_eq!(Caller::Anonymous.owner(), None);
    }
}
