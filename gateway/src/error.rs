//! The gateway's one error type, and the one place it becomes a response (HTTP or NATS reply).
//!
//! Client mistakes carry their message; internal failures say little to the caller and are
//! logged once, here. The body is always `{"error": {"code", "message", "field"?}}`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use claw_proto::api::{ApiError, ErrorBody};
use claw_proto::spec::{Invalid, ParseError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The body is not JSON at all.
    #[error("{0}")]
    MalformedJson(String),
    /// JSON of the wrong shape, or a value out of range.
    #[error("{}", .0.message)]
    Invalid(Invalid),
    /// The sentence names what was not found ("no task abc", "no lane huge/low").
    #[error("{0}")]
    NotFound(String),
    /// No API token, or one the gateway does not know (401, with `WWW-Authenticate: Bearer`).
    #[error("{0}")]
    Unauthorized(String),
    /// The request is understood but not allowed (a WebSocket from a foreign `Origin`, a lane
    /// pause by a principal who is not an admin).
    #[error("{0}")]
    Forbidden(String),
    /// The verb does not apply to the task's current state (409, with that state).
    #[error("{message}")]
    Conflict { message: String, status: claw_proto::Status },
    /// A body that is not said to be JSON (a form, `text/plain`): what a page of another site
    /// may send without a CORS preflight.
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("request body exceeds {0} bytes")]
    TooLarge(usize),
    /// The task's record (the spec with what admission adds) would not fit in the bucket.
    #[error("the task's record would be {bytes} bytes; a record may have at most {max}")]
    RecordTooLarge { bytes: usize, max: usize },
    /// An input larger than the payload cap.
    #[error("the input is {bytes} bytes of JSON; at most {max} are accepted")]
    PayloadTooLarge { bytes: usize, max: usize },
    /// What was asked for existed but is not kept any more (a payload removed with its record
    /// after the retention).
    #[error("{0}")]
    Gone(String),
    #[error("the task queue is full; retry later")]
    QueueFull { retry_after_s: u64 },
    /// One of the caller's limits ([`crate::quota`]): a rate (with the seconds until the next
    /// is allowed) or a cap on what it holds at once.
    #[error("{message}")]
    Limited { limit: &'static str, message: String, retry_after_s: Option<u64> },
    /// NATS, JetStream or the archive cannot be reached; nothing was stored.
    #[error("{0}")]
    Unavailable(String),
    /// The gateway's configuration cannot be used (a tokens file that does not parse, a public
    /// address without tokens): a startup error, never a response.
    #[error("{0}")]
    Config(String),
    /// A bug or an unexpected reply; the detail goes to the log, not to the caller.
    #[error("internal error")]
    Internal(String),
}

impl From<ParseError> for Error {
    fn from(e: ParseError) -> Error {
        match e {
            ParseError::Syntax(m) => Error::MalformedJson(m),
            ParseError::Invalid(i) => Error::Invalid(i),
        }
    }
}

impl From<claw_proto::records::Error> for Error {
    /// For callers with nothing better to do; a [`records::Error::Conflict`] that matters to
    /// the caller (a race it can resolve) is handled before this.
    ///
    /// [`records::Error::Conflict`]: claw_proto::records::Error::Conflict
    fn from(e: claw_proto::records::Error) -> Error {
        use claw_proto::records::Error as E;
        match e {
            E::TooLarge { bytes, max } => Error::RecordTooLarge { bytes, max },
            E::Unavailable(e) => Error::Unavailable(format!("task records: {e}")),
            e @ (E::Conflict | E::Corrupt(_)) => Error::Internal(e.to_string()),
        }
    }
}

impl From<claw_proto::payloads::Error> for Error {
    fn from(e: claw_proto::payloads::Error) -> Error {
        use claw_proto::payloads::Error as E;
        match e {
            E::TooLarge { bytes, max, .. } => Error::PayloadTooLarge { bytes, max },
            E::NotFound(name) => Error::Gone(format!("payload {name} is no longer stored")),
            E::Unavailable(e) => Error::Unavailable(format!("payloads: {e}")),
            e @ E::Corrupt { .. } => Error::Internal(e.to_string()),
        }
    }
}

impl From<Invalid> for Error {
    fn from(i: Invalid) -> Error {
        Error::Invalid(i)
    }
}

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Error::MalformedJson(_) => StatusCode::BAD_REQUEST,
            Error::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::Conflict { .. } => StatusCode::CONFLICT,
            Error::TooLarge(_) | Error::RecordTooLarge { .. } | Error::PayloadTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Error::Gone(_) => StatusCode::GONE,
            Error::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::QueueFull { .. } | Error::Limited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Config(_) | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Error::MalformedJson(_) => "malformed_json",
            Error::Invalid(_) => "invalid_request",
            Error::NotFound(_) => "not_found",
            Error::Unauthorized(_) => "unauthorized",
            Error::Forbidden(_) => "forbidden",
            Error::Conflict { .. } => "conflict",
            Error::TooLarge(_) | Error::RecordTooLarge { .. } | Error::PayloadTooLarge { .. } => {
                "payload_too_large"
            }
            Error::Gone(_) => "gone",
            Error::UnsupportedMediaType(_) => "unsupported_media_type",
            Error::QueueFull { .. } => "queue_full",
            Error::Limited { retry_after_s: Some(_), .. } => "rate_limited",
            Error::Limited { retry_after_s: None, .. } => "quota_exceeded",
            Error::Unavailable(_) => "unavailable",
            Error::Config(_) | Error::Internal(_) => "internal",
        }
    }

    /// The body sent to the caller (HTTP or NATS), logging internal errors once.
    pub fn body(&self) -> ErrorBody {
        match self {
            Error::Internal(detail) | Error::Config(detail) => {
                tracing::error!(%detail, "internal error")
            }
            Error::Unavailable(detail) => tracing::warn!(%detail, "dependency unavailable"),
            _ => {}
        }
        let field = match self {
            Error::Invalid(i) => i.field.clone(),
            _ => None,
        };
        let status = match self {
            Error::Conflict { status, .. } => Some(*status),
            _ => None,
        };
        let limit = match self {
            Error::Limited { limit, .. } => Some((*limit).to_owned()),
            _ => None,
        };
        ErrorBody {
            error: ApiError {
                code: self.code().into(),
                message: self.to_string(),
                field,
                status,
                limit,
            },
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        match self {
            Error::QueueFull { retry_after_s }
            | Error::Limited { retry_after_s: Some(retry_after_s), .. } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
            }
            Error::Unauthorized(_) => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"claw\""),
                );
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code the gateway answers with is one the error schema (`nats/schema/`, from which
    /// the TypeScript client's types are generated) lists, and the schema lists no other.
    #[test]
    fn every_code_is_in_the_error_schema() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../nats/schema/error.schema.json")).unwrap();
        let listed: std::collections::BTreeSet<&str> =
            schema["$defs"]["api_error"]["properties"]["code"]["enum"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap())
                .collect();
        let s = || String::new();
        let every = [
            Error::MalformedJson(s()),
            Error::Invalid(Invalid { field: None, message: s() }),
            Error::NotFound(s()),
            Error::Unauthorized(s()),
            Error::Forbidden(s()),
            Error::Conflict { message: s(), status: claw_proto::Status::Queued },
            Error::TooLarge(0),
            Error::RecordTooLarge { bytes: 0, max: 0 },
            Error::PayloadTooLarge { bytes: 0, max: 0 },
            Error::Gone(s()),
            Error::UnsupportedMediaType(s()),
            Error::QueueFull { retry_after_s: 1 },
            Error::Limited { limit: "submits_per_s", message: s(), retry_after_s: Some(1) },
            Error::Limited { limit: "websockets", message: s(), retry_after_s: None },
            Error::Unavailable(s()),
            Error::Config(s()),
            Error::Internal(s()),
        ];
        let answered: std::collections::BTreeSet<&str> = every.iter().map(Error::code).collect();
        assert_eq!(answered, listed);
    }
}
