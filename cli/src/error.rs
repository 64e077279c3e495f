//! The one error type of the client verbs, and the exit code each kind of failure means.
//!
//! Every failure becomes one line on stderr (`claw: <what went wrong>`), so the variants carry
//! what that line needs and nothing else. The exit codes are part of the command's contract
//! (documented in `claw --help`): scripts branch on them.

use claw_proto::api::{ApiError, ErrorBody};

/// Success; for `watch` (and `submit --watch`), the task succeeded.
pub const EXIT_OK: u8 = 0;
/// The request was refused (a 4xx: not found, invalid, conflict, no or a wrong API token), or
/// the watched task failed or was cancelled.
pub const EXIT_REFUSED: u8 = 1;
/// A usage error: clap's own code for bad flags, reused for the mistakes only we can see.
pub const EXIT_USAGE: u8 = 2;
/// The gateway or NATS cannot be reached, or cannot serve the request now (503 and other 5xx).
pub const EXIT_UNAVAILABLE: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The service answered with our error body: `status` is the HTTP status (over NATS, the
    /// `Nats-Service-Error-Code` header).
    #[error("{}", api_line(.error))]
    Api { status: u16, error: ApiError },
    /// Nothing answers at that address.
    #[error("cannot reach {target}: {detail}")]
    Unreachable { target: String, detail: String },
    /// Reached, but it could not serve the request: no responders, a timeout, a reply we cannot
    /// read.
    #[error("{0}")]
    Unavailable(String),
    /// A mistake in the arguments that clap cannot see (`--input` that is not JSON).
    #[error("{0}")]
    Usage(String),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Api { status, .. } if (400..500).contains(status) => EXIT_REFUSED,
            Error::Api { .. } | Error::Unreachable { .. } | Error::Unavailable(_) => {
                EXIT_UNAVAILABLE
            }
            Error::Usage(_) => EXIT_USAGE,
        }
    }

    /// The service's error body, for `--json`: scripts get the same object the API sent.
    pub fn body(&self) -> Option<ErrorBody> {
        match self {
            Error::Api { error, .. } => Some(ErrorBody { error: error.clone() }),
            _ => None,
        }
    }
}

/// `invalid request: max_attempts: invalid type ... (invalid_request)`, `no task 'x' (not_found)`.
fn api_line(error: &ApiError) -> String {
    let ApiError { code, message, field, .. } = error;
    match (code.as_str(), field) {
        ("invalid_request", Some(field)) => format!("invalid request: {field}: {message} ({code})"),
        ("invalid_request", None) => format!("invalid request: {message} ({code})"),
        ("unauthorized", _) => {
            format!("{message} ({code}); give the gateway's API token with --token or CLAW_TOKEN")
        }
        _ => format!("{message} ({code})"),
    }
}

/// The innermost cause of an error, said briefly: `connection refused` rather than three
/// nested wrappers ending in `Connection refused (os error 111)`.
pub fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    match current.downcast_ref::<std::io::Error>() {
        Some(io) if io.kind() != std::io::ErrorKind::Other => io.kind().to_string(),
        _ => current.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, code: &str, field: Option<&str>) -> Error {
        let error = ApiError {
            code: code.into(),
            message: "m".into(),
            field: field.map(str::to_owned),
            status: None,
            limit: None,
        };
        Error::Api { status, error }
    }

    #[test]
    fn lines_and_exit_codes() {
        let e = api(422, "invalid_request", Some("max_attempts"));
        assert_eq!(e.to_string(), "invalid request: max_attempts: m (invalid_request)");
        assert_eq!(e.exit_code(), EXIT_REFUSED);
        assert_eq!(api(404, "not_found", None).to_string(), "m (not_found)");
        assert_eq!(api(409, "conflict", None).exit_code(), EXIT_REFUSED);
        assert_eq!(api(503, "unavailable", None).exit_code(), EXIT_UNAVAILABLE);
        assert_eq!(api(500, "internal", None).exit_code(), EXIT_UNAVAILABLE);
        assert_eq!(Error::Usage("u".into()).exit_code(), EXIT_USAGE);
        let e = api(401, "unauthorized", None);
        assert_eq!(e.exit_code(), EXIT_REFUSED);
        assert!(e.to_string().contains("--token or CLAW_TOKEN"), "{e}");
    }

    #[test]
    fn root_cause_names_the_io_kind() {
        #[derive(Debug, thiserror::Error)]
        #[error("wrapper")]
        struct Wrapper(#[source] std::io::Error);
        let e = Wrapper(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(root_cause(&e), "connection refused");
    }
}
