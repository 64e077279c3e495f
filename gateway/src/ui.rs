//! The web UI: three static files from `ui/` (`index.html`, `app.js`, `style.css`), embedded in
//! the binary so a gateway needs nothing on disk to serve it. `/` is the page, `/ui/{name}` its
//! assets; any other name is a 404 in the API's error shape.
//!
//! The page is plain HTML, CSS and JavaScript with no build step: it talks to the same HTTP API
//! as every other client and follows live events over `GET /v1/ws`.

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::Error;

/// One embedded file: its bytes, content type and a validator for conditional requests.
struct Asset {
    body: &'static [u8],
    content_type: &'static str,
    etag: &'static str,
}

/// The strong validator of an asset: FNV-1a of its bytes, computed at compile time, so a new
/// build with a changed file gets a new tag and an unchanged file keeps answering 304.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

macro_rules! asset {
    ($file:literal, $content_type:literal) => {{
        const BODY: &[u8] = include_bytes!(concat!("../../ui/", $file));
        const HEX: [u8; 18] = {
            // `"` + 16 hex digits + `"`: an ETag is a quoted string.
            let hash = fnv1a(BODY);
            let digits = b"0123456789abcdef";
            let mut out = [b'"'; 18];
            let mut i = 0;
            while i < 16 {
                out[1 + i] = digits[((hash >> (60 - 4 * i)) & 0xf) as usize];
                i += 1;
            }
            out
        };
        const ETAG: &str = match std::str::from_utf8(&HEX) {
            Ok(s) => s,
            Err(_) => panic!("hex digits are UTF-8"),
        };
        Asset { body: BODY, content_type: $content_type, etag: ETAG }
    }};
}

const INDEX: Asset = asset!("index.html", "text/html; charset=utf-8");
const APP_JS: Asset = asset!("app.js", "text/javascript; charset=utf-8");
const STYLE_CSS: Asset = asset!("style.css", "text/css; charset=utf-8");

/// Browsers revalidate on every load (`no-cache` still stores the file): the ETag makes that a
/// 304 of a few bytes, and a gateway upgrade can never leave a stale script next to new HTML.
const CACHE_CONTROL: &str = "no-cache";

/// Only our own origin: the page loads no third-party script, style or font, and its socket
/// goes back to the gateway that served it (`'self'` covers `ws:` to the same host).
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data:; \
     connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// `GET /`: the page.
pub async fn index(headers: HeaderMap) -> Response {
    serve(&INDEX, &headers)
}

/// `GET /ui/{name}`: the page's script and style sheet.
pub async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match name.as_str() {
        "app.js" => serve(&APP_JS, &headers),
        "style.css" => serve(&STYLE_CSS, &headers),
        _ => Error::NotFound(format!("no UI file {name:?}")).into_response(),
    }
}

fn serve(asset: &Asset, request: &HeaderMap) -> Response {
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|t| t.trim() == asset.etag || t.trim() == "*"));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, asset.content_type)], asset.body).into_response()
    };
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(CACHE_CONTROL));
    headers.insert(header::ETAG, HeaderValue::from_static(asset.etag));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers
        .insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(asset: &Asset, if_none_match: Option<&str>) -> Response {
        let mut headers = HeaderMap::new();
        if let Some(tag) = if_none_match {
            headers.insert(header::IF_NONE_MATCH, HeaderValue::from_str(tag).unwrap());
        }
        serve(asset, &headers)
    }

    #[test]
    fn assets_have_types_tags_and_revalidate() {
        for (asset, ty) in
            [(&INDEX, "text/html"), (&APP_JS, "text/javascript"), (&STYLE_CSS, "text/css")]
        {
            let r = get(asset, None);
            assert_eq!(r.status(), StatusCode::OK);
            let h = r.headers();
            assert!(h[header::CONTENT_TYPE].to_str().unwrap().starts_with(ty));
            assert_eq!(h[header::CACHE_CONTROL], CACHE_CONTROL);
            assert_eq!(h[header::ETAG], asset.etag);
            assert_eq!(get(asset, Some(asset.etag)).status(), StatusCode::NOT_MODIFIED);
            assert_eq!(get(asset, Some("\"other\"")).status(), StatusCode::OK);
        }
        assert_eq!(INDEX.etag.len(), 18);
        assert_ne!(INDEX.etag, APP_JS.etag);
    }

    #[test]
    fn the_page_names_only_assets_that_exist() {
        let html = std::str::from_utf8(INDEX.body).unwrap();
        assert!(html.contains("/ui/app.js") && html.contains("/ui/style.css"));
    }

    #[tokio::test]
    async fn unknown_names_are_404() {
        let r = asset(Path("../Cargo.toml".into()), HeaderMap::new()).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let r = asset(Path("app.js".into()), HeaderMap::new()).await;
        assert_eq!(r.status(), StatusCode::OK);
    }
}
