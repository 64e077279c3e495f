//! The WebSocket of a session's live events: `GET /v1/ws?session=S[&since=SEQ]`.
//! (Being built: see issue "Live progress over WebSocket, and the web UI".)

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::app::App;

pub async fn upgrade(State(_app): State<App>) -> Response {
    StatusCode::NOT_IMPLEMENTED.into_response()
}
