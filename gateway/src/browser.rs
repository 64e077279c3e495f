//! What keeps web pages out. A browser lets any page send requests to `127.0.0.1:8080`, and
//! without API tokens the gateway cannot tell the user's page from another site's. Three rules:
//!
//! - **Host** (against DNS rebinding: a page of `evil.example` whose name then resolves to the
//!   gateway reads and writes as if same-origin): the gateway answers only the names it is
//!   reached by: its bound address (and `localhost` when that is loopback), and the names given
//!   with `--allowed-host`. Bound to an unspecified address (`0.0.0.0`) without a list, any name
//!   is answered: such a gateway needs API tokens, which a page of another origin does not have.
//! - **Origin** (against cross-site requests, CSRF): a request that changes something (any method
//!   but GET and HEAD) and a WebSocket upgrade from a page must come from the gateway's own origin
//!   (an `Origin` whose host is one of the names above, not merely the request's `Host`) or one
//!   listed with `--allowed-origin`. Requests without `Origin` are programs, and pass.
//! - **Content-Type** (against the requests a page may send cross-site without asking first: a
//!   form or a `text/plain` fetch, which older browsers and some extensions send without an
//!   `Origin`): a request that changes something and carries a body, or names its type, must be
//!   `application/json` (415 otherwise). A body of JSON is a request that browsers only send
//!   cross-site after a CORS preflight, which the gateway never grants.
//!
//! `/healthz` and `/readyz` answer any `Host` (probes use addresses), and say nothing.

use std::net::SocketAddr;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::Response;

use crate::app::App;
use crate::error::Error;

/// The names the gateway answers, or any.
#[derive(Clone, Debug, PartialEq)]
pub struct Hosts {
    /// `host:port` entries match exactly; an entry without a port matches the name on any port.
    names: Option<Vec<String>>,
}

impl Hosts {
    pub fn new(bound: Option<SocketAddr>, allowed: &[String]) -> Hosts {
        let mut names: Vec<String> =
            allowed.iter().map(|n| n.trim().to_ascii_lowercase()).collect();
        match bound {
            Some(addr) if !addr.ip().is_unspecified() => {
                let port = addr.port();
                names.push(addr.to_string());
                if addr.ip().is_loopback() {
                    names.extend([format!("localhost:{port}"), format!("127.0.0.1:{port}")]);
                    names.push(format!("[::1]:{port}"));
                }
            }
            _ if names.is_empty() => return Hosts { names: None },
            _ => {}
        }
        Hosts { names: Some(names) }
    }

    /// Whether a request for `host` (a `Host` header, or an `Origin`'s authority) is ours.
    pub fn allows(&self, host: &str) -> bool {
        let Some(names) = &self.names else { return true };
        let host = host.trim().to_ascii_lowercase();
        let name = match host.rsplit_once(':') {
            // Not a port: the `]` of a bare IPv6 address.
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host.as_str(),
        };
        names
            .iter()
            .any(|n| *n == host || (*n == name && !n.contains(':')) || is_bare_ipv6(n, name))
    }

    fn any(&self) -> bool {
        self.names.is_none()
    }
}

/// `[::1]` listed without a port matches `[::1]:8080`.
fn is_bare_ipv6(entry: &str, name: &str) -> bool {
    entry.starts_with('[') && entry.ends_with(']') && entry == name
}

/// The middleware of both rules, around every route.
pub async fn guard(
    State(app): State<App>,
    request: Request,
    next: Next,
) -> Result<Response, Error> {
    let path = request.uri().path();
    if path != "/healthz" && path != "/readyz" {
        let host = host_of(request.headers(), request.uri());
        if !app.hosts.allows(&host) {
            return Err(Error::Forbidden(format!(
                "this gateway does not answer for host {host:?} (only for its address and the names \
                 given with --allowed-host): a page whose name points here must not reach it"
            )));
        }
        if !matches!(*request.method(), Method::GET | Method::HEAD) {
            check_origin(request.headers(), &app)?;
            check_content_type(request.headers())?;
        }
    }
    Ok(next.run(request).await)
}

fn host_of(headers: &HeaderMap, uri: &axum::http::Uri) -> String {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| uri.authority().map(|a| a.to_string()))
        .unwrap_or_default()
}

/// Refuses a request that changes something with a body that is not said to be JSON (415).
/// Without a body and without a `Content-Type` (`curl -X POST .../cancel`) it passes.
pub fn check_content_type(headers: &HeaderMap) -> Result<(), Error> {
    let declared = match headers.get(header::CONTENT_TYPE) {
        Some(value) => value.to_str().unwrap_or("?"),
        None => {
            let empty = headers
                .get(header::CONTENT_LENGTH)
                .is_some_and(|n| n.to_str().is_ok_and(|n| n.trim() == "0"));
            if empty || !headers.contains_key(header::CONTENT_LENGTH) && !chunked(headers) {
                return Ok(());
            }
            ""
        }
    };
    let essence = declared.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        return Ok(());
    }
    let named =
        if declared.is_empty() { "no Content-Type".to_owned() } else { format!("{declared:?}") };
    Err(Error::UnsupportedMediaType(format!(
        "a request body must be JSON with `Content-Type: application/json`, not {named} (with \
         curl: -H 'content-type: application/json')"
    )))
}

fn chunked(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
}

/// Refuses a request from a page of a foreign origin with 403.
pub fn check_origin(headers: &HeaderMap, app: &App) -> Result<(), Error> {
    let Some(origin) = headers.get(header::ORIGIN) else { return Ok(()) };
    let origin = origin.to_str().unwrap_or("").trim();
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    if origin_allowed(origin, host, &app.hosts, &app.config.allowed_origins) {
        return Ok(());
    }
    Err(Error::Forbidden(format!(
        "a page of origin {origin:?} may not do this; the gateway allows its own origin and those \
         given with --allowed-origin"
    )))
}

/// Whether a page at `origin` may act on a gateway that answers `hosts`, reached as `host`.
pub fn origin_allowed(origin: &str, host: &str, hosts: &Hosts, allowed: &[String]) -> bool {
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
    let without_default = |a: &str| a.strip_suffix(default_port).unwrap_or(a).to_owned();
    if hosts.any() {
        // No names to go by: the page's origin must be the host it asked.
        let host = host.to_ascii_lowercase();
        return !host.is_empty() && without_default(authority) == without_default(&host);
    }
    hosts.allows(authority) || hosts.allows(&without_default(authority))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn a_loopback_gateway_answers_its_address_and_localhost_only() {
        let hosts = Hosts::new(bound("127.0.0.1:8080"), &[]);
        for ok in ["127.0.0.1:8080", "localhost:8080", "LOCALHOST:8080", "[::1]:8080"] {
            assert!(hosts.allows(ok), "{ok}");
        }
        for refused in ["evil.example:8080", "evil.example", "127.0.0.1:8081", "localhost", ""] {
            assert!(!hosts.allows(refused), "{refused}");
        }
        let named = Hosts::new(bound("127.0.0.1:8080"), &["claw.internal".into(), "gw:9".into()]);
        assert!(named.allows("claw.internal") && named.allows("claw.internal:443"));
        assert!(named.allows("gw:9") && !named.allows("gw:10") && !named.allows("gw"));
    }

    #[test]
    fn an_unspecified_bind_answers_any_name_unless_given_a_list() {
        assert!(Hosts::new(bound("0.0.0.0:8080"), &[]).allows("anything.example"));
        assert!(Hosts::new(None, &[]).allows("anything"));
        let listed = Hosts::new(bound("0.0.0.0:8080"), &["claw.example.com".into()]);
        assert!(listed.allows("claw.example.com") && !listed.allows("10.0.0.5:8080"));
    }

    #[test]
    fn the_own_origin_is_one_of_the_hosts_not_whatever_host_was_asked() {
        let hosts = Hosts::new(bound("127.0.0.1:8080"), &[]);
        let none: &[String] = &[];
        assert!(origin_allowed("http://127.0.0.1:8080", "127.0.0.1:8080", &hosts, none));
        assert!(origin_allowed("http://localhost:8080/", "localhost:8080", &hosts, none));
        // DNS rebinding: the page's origin and the Host agree, and both are foreign.
        assert!(!origin_allowed("http://evil.example:8080", "evil.example:8080", &hosts, none));
        assert!(!origin_allowed("http://127.0.0.1:8081", "127.0.0.1:8080", &hosts, none));
        assert!(!origin_allowed("null", "127.0.0.1:8080", &hosts, none));

        let named = Hosts::new(bound("0.0.0.0:8080"), &["gateway.example".into()]);
        assert!(origin_allowed("https://gateway.example", "gateway.example", &named, none));
        assert!(origin_allowed("https://gateway.example:443", "x", &named, none));
        assert!(!origin_allowed("https://evil.example", "gateway.example", &named, none));

        let listed = ["https://app.example/".to_owned()];
        assert!(origin_allowed("https://APP.example", "127.0.0.1:8080", &hosts, &listed));
        assert!(!origin_allowed("http://app.example", "127.0.0.1:8080", &hosts, &listed));
        assert!(origin_allowed("http://anything", "127.0.0.1:8080", &hosts, &["*".to_owned()]));
    }

    #[test]
    fn a_body_must_be_said_to_be_json() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (name, value) in pairs {
                h.insert(*name, value.parse().unwrap());
            }
            h
        };
        let passes = |pairs: &[(&'static str, &'static str)]| check_content_type(&headers(pairs));
        assert!(passes(&[("content-type", "application/json")]).is_ok());
        assert!(passes(&[("content-type", "Application/JSON; charset=utf-8")]).is_ok());
        assert!(passes(&[]).is_ok(), "no body, no type: a control verb");
        assert!(passes(&[("content-length", "0")]).is_ok());
        for refused in [
            &[("content-type", "text/plain"), ("content-length", "20")][..],
            &[("content-type", "application/x-www-form-urlencoded"), ("content-length", "0")],
            &[("content-type", "multipart/form-data; boundary=x")],
            &[("content-type", "application/jsonx")],
            &[("content-length", "20")],
            &[("transfer-encoding", "chunked")],
        ] {
            let Err(Error::UnsupportedMediaType(message)) = passes(refused) else {
                panic!("{refused:?} passed");
            };
            assert!(message.contains("application/json"), "{message}");
        }
    }

    #[test]
    fn without_names_the_origin_must_match_the_host_asked() {
        let any = Hosts::new(bound("0.0.0.0:8080"), &[]);
        let none: &[String] = &[];
        assert!(origin_allowed("http://Gateway.example", "gateway.example:80", &any, none));
        assert!(origin_allowed("https://gateway.example:443", "gateway.example", &any, none));
        assert!(!origin_allowed("http://evil.example", "gateway.example", &any, none));
        assert!(!origin_allowed("http://gateway.example", "", &any, none));
    }
}
