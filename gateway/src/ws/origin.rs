//! The `Origin` rule of the WebSocket upgrade. Browsers attach cookies and ambient credentials
//! to cross-site WebSocket requests and do not apply CORS to them, so a page on another site
//! could otherwise watch and drive a user's sessions. Allowed: requests without `Origin`
//! (programs, not browsers), the gateway's own origin (the `Origin`'s host and port equal the
//! request's `Host`), and the origins listed with `--allowed-origin` (`*` for any).

use axum::http::{HeaderMap, header};

use crate::error::Error;

/// Refuses a foreign origin with 403.
pub fn check(headers: &HeaderMap, allowed: &[String]) -> Result<(), Error> {
    let Some(origin) = headers.get(header::ORIGIN) else { return Ok(()) };
    let origin = origin.to_str().unwrap_or("").trim();
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    if is_allowed(origin, host, allowed) {
        Ok(())
    } else {
        Err(Error::Forbidden(format!(
            "origin {origin:?} may not open this WebSocket; the gateway allows its own origin \
             and those given with --allowed-origin"
        )))
    }
}

/// Whether a browser page at `origin` may connect to a gateway reached as `host`.
pub fn is_allowed(origin: &str, host: &str, allowed: &[String]) -> bool {
    let origin = origin.trim_end_matches('/').to_ascii_lowercase();
    if allowed.iter().any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(&origin)) {
        return true;
    }
    let Some((scheme, authority)) = origin.split_once("://") else {
        // `null` (sandboxed frames, file pages) and garbage are foreign.
        return false;
    };
    let default_port = match scheme {
        "http" | "ws" => ":80",
        "https" | "wss" => ":443",
        _ => return false,
    };
    let host = host.to_ascii_lowercase();
    let without_default = |a: &str| a.strip_suffix(default_port).unwrap_or(a).to_owned();
    !host.is_empty() && without_default(authority) == without_default(&host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_origin_listed_and_foreign() {
        let none: &[String] = &[];
        assert!(is_allowed("http://127.0.0.1:8080", "127.0.0.1:8080", none));
        assert!(is_allowed("http://Gateway.example", "gateway.example:80", none));
        assert!(is_allowed("https://gateway.example:443", "gateway.example", none));
        assert!(!is_allowed("http://127.0.0.1:8081", "127.0.0.1:8080", none));
        assert!(!is_allowed("http://evil.example", "gateway.example", none));
        assert!(!is_allowed("null", "gateway.example", none));
        assert!(!is_allowed("http://gateway.example", "", none));

        let listed = ["https://app.example/".to_owned()];
        assert!(is_allowed("https://APP.example", "gateway.example", &listed));
        assert!(!is_allowed("http://app.example", "gateway.example", &listed));
        assert!(is_allowed("http://anything", "gateway.example", &["*".to_owned()]));
    }

    #[test]
    fn without_origin_is_allowed() {
        let mut headers = HeaderMap::new();
        assert!(check(&headers, &[]).is_ok());
        headers.insert(header::HOST, "gw:1".parse().unwrap());
        headers.insert(header::ORIGIN, "http://other:1".parse().unwrap());
        assert!(matches!(check(&headers, &[]), Err(Error::Forbidden(_))));
    }
}
