//! `tokens_file`: the gateway's `--tokens FILE` ([`Tokens::parse`], `gateway/src/auth.rs`), any
//! UTF-8 text; when it loads, the tokens a request may present, looked up directly and through
//! the `Authorization: Bearer` header and the `claw.bearer.<token>` WebSocket subprotocol.
//!
//! Beyond "never panics": the header and the subprotocol find the principal the token itself
//! finds, and a principal's name is a valid session token (names become task owners).
#![no_main]

use arbitrary::Arbitrary;
use axum::http::{HeaderMap, HeaderValue, header};
use claw_gateway::auth::{Auth, Caller, Tokens, WS_BEARER_PREFIX, WS_PROTOCOL};
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
        let protocols = format!("{WS_PROTOCOL}, {WS_BEARER_PREFIX}{token}");
        ws.insert(header::SEC_WEBSOCKET_PROTOCOL, value(&protocols));
        for (headers, websocket) in [(&bearer, false), (&ws, true)] {
            let caller = auth.caller(headers, websocket).ok();
            let expected = found.clone().map(Caller::Principal);
            assert_eq!(caller, expected, "{headers:?}");
        }
    }
});

fn value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).expect("visible ASCII is a header value")
}
