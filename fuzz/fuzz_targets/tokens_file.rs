//! `tokens_file`: the gateway's `--tokens FILE` ([`Tokens::parse`], `gateway/src/auth.rs`), any
//! UTF-8 text; when it loads, the tokens a request may present, looked up directly and through
//! the `Authorization: Bearer` header, and offered as a `claw.bearer.<token>` WebSocket
//! subprotocol (which protocol 2 no longer reads: browsers use tickets).
//!
//! Beyond "never panics": the header finds the principal the token itself finds, the
//! subprotocol finds nobody, a principal's name is a valid session token (names become task
//! owners), and every principal has limits a rate limiter can be made of.
#![no_main]

use arbitrary::Arbitrary;
use axum::http::{HeaderMap, HeaderValue, header};
use claw_gateway::auth::{Auth, Caller, Tokens, WS_PROTOCOL};
use claw_proto::Session;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    presented: Vec<&'a str>,
    file: &'a str,
}

fuzz_target!(|input: Input| {
    let Ok(tokens) = Tokens::parse(input.file) else { return };
    let auth = Auth::Tokens(tokens);
    let Auth::Tokens(tokens) = &auth else { unreachable!("just made") };
    for (name, quota) in tokens.quotas() {
        assert!(quota.submits_per_s > 0 && quota.submit_burst > 0, "{name}: {quota:?}");
    }
    for token in input.presented {
        let found = tokens.lookup(token);
        if let Some(principal) = &found {
            assert!(Session::parse(&principal.name).is_ok(), "{principal:?}");
        }
        // A token as a header carries it: visible ASCII, no spaces or commas.
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
            continue;
        }
        let mut bearer = HeaderMap::new();
        bearer.insert(header::AUTHORIZATION, value(&format!("Bearer {token}")));
        let mut ws = HeaderMap::new();
        let protocols = format!("{WS_PROTOCOL}, claw.bearer.{token}");
        ws.insert(header::SEC_WEBSOCKET_PROTOCOL, value(&protocols));
        let expected = found.clone().map(Caller::Principal);
        assert_eq!(auth.caller(&bearer).ok(), expected, "{bearer:?}");
        assert_eq!(auth.caller(&ws).ok(), None, "a subprotocol token is not read: {ws:?}");
    }
});

fn value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).expect("visible ASCII is a header value")
}
