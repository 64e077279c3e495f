//! The web UI, embedded in the binary and served at `/`.
//! (Being built: see issue "Live progress over WebSocket, and the web UI".)

use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

pub async fn index() -> Html<&'static str> {
    Html("<!doctype html><title>OpenClaw</title><p>The web UI is coming.</p>")
}

pub async fn asset(Path(_name): Path<String>) -> Response {
    StatusCode::NOT_FOUND.into_response()
}
