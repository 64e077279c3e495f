//! The gateway's configuration: clap flags with environment equivalents, parsed once in `main`
//! (or by `claw up`) and passed to [`crate::run`].

use std::net::SocketAddr;
use std::path::PathBuf;

use claw_proto::kinds::Catalog;
use claw_proto::payloads;
use claw_proto::spec::Limits;
use claw_proto::task::Class;

use crate::error::Error;

#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// API tokens: a TOML file mapping principals to tokens (`[principals.alice] tokens =
    /// ["sha256:..."]`, optional `admin = true`; `claw token new` makes one). Without it the
    /// API has no authentication and the gateway serves loopback addresses only.
    #[arg(long = "tokens", env = "CLAW_TOKENS_FILE", value_name = "FILE")]
    pub tokens: Option<PathBuf>,
    /// Serve a non-loopback address without API tokens: whoever reaches it sees and controls
    /// every task. Only behind something else that authenticates.
    #[arg(long, env = "CLAW_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// Largest accepted request body in bytes: the task spec with its input. The default is
    /// the payload cap plus 64 KiB for the rest of the spec.
    #[arg(long, env = "CLAW_BODY_LIMIT", default_value_t = payloads::DEFAULT_MAX_BYTES + 64 * 1024)]
    pub body_limit: usize,
    /// Largest input in bytes of JSON. Inputs over 64 KiB are kept in the `payloads` object
    /// store, not in the task's record.
    #[arg(long, env = "CLAW_PAYLOAD_MAX_BYTES", default_value_t = payloads::DEFAULT_MAX_BYTES)]
    pub payload_max_bytes: usize,
    /// `Retry-After` seconds sent with 429 when the queue is full.
    #[arg(long, env = "CLAW_RETRY_AFTER_S", default_value_t = 1)]
    pub retry_after_s: u64,
    /// Extra task kinds a custom worker runs, as NAME=short|long (repeatable).
    #[arg(long = "kind", env = "CLAW_KINDS", value_delimiter = ',', value_parser = parse_kind)]
    pub kinds: Vec<(String, Class)>,
    /// Per-attempt timeout cap of short tasks, in seconds (1 to 300).
    #[arg(long, env = "CLAW_SHORT_TIMEOUT_CAP_S", default_value_t = Limits::STANDARD.short_timeout_cap_s,
          value_parser = clap::value_parser!(u64).range(1..=Limits::STANDARD.short_timeout_cap_s))]
    pub short_timeout_cap_s: u64,
    /// Per-attempt timeout cap of long tasks, in seconds (1 to 86 400).
    #[arg(long, env = "CLAW_LONG_TIMEOUT_CAP_S", default_value_t = Limits::STANDARD.long_timeout_cap_s,
          value_parser = clap::value_parser!(u64).range(1..=Limits::STANDARD.long_timeout_cap_s))]
    pub long_timeout_cap_s: u64,
    /// Longest absolute deadline from submission, in seconds (1 to 604 800). Like the timeout
    /// caps, bounded by the standard plan: the worker refuses larger ones, and a huge one would
    /// overflow the deadline's time arithmetic.
    #[arg(long, env = "CLAW_MAX_DEADLINE_S", default_value_t = Limits::STANDARD.max_deadline_s,
          value_parser = clap::value_parser!(u64).range(1..=Limits::STANDARD.max_deadline_s))]
    pub max_deadline_s: u64,
    /// Attempts of a task that does not say (1 to 20).
    #[arg(long, env = "CLAW_DEFAULT_MAX_ATTEMPTS", default_value_t = Limits::STANDARD.default_max_attempts,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(Limits::STANDARD.max_attempts_cap)))]
    pub default_max_attempts: u32,
    /// A browser origin allowed to open `/v1/ws` besides the gateway's own, as
    /// `scheme://host[:port]` (repeatable; `*` allows any). Requests without `Origin` (programs,
    /// not browsers) are always allowed.
    #[arg(long = "allowed-origin", env = "CLAW_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// A name the gateway answers besides its bound address (and `localhost` when that is
    /// loopback), as `host` (any port) or `host:port` (repeatable): the names a reverse proxy or
    /// users reach it by. Other `Host`s get 403, so a web page whose name was pointed at the
    /// gateway (DNS rebinding) cannot use it. Bound to `0.0.0.0` without this, any name is
    /// answered.
    #[arg(long = "allowed-host", env = "CLAW_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// The address the listener is bound to, filled in by [`crate::run`] (the `Host` rule).
    #[arg(skip)]
    pub bound: Option<SocketAddr>,
    /// Seconds one WebSocket send may stall before the client is dropped as too slow.
    #[arg(long, env = "CLAW_WS_SEND_TIMEOUT_S", default_value_t = 10.0, value_parser = parse_seconds)]
    pub ws_send_timeout_s: f64,
    /// Seconds between WebSocket pings; a client silent for three intervals is dropped.
    #[arg(long, env = "CLAW_WS_PING_S", default_value_t = 20.0, value_parser = parse_seconds)]
    pub ws_ping_s: f64,
    /// Seconds a WebSocket ticket (`POST /v1/ws-ticket`) stays valid; the `tickets` bucket
    /// drops entries after 60 s, so longer is not possible.
    #[arg(long, env = "CLAW_WS_TICKET_S", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=60))]
    pub ws_ticket_s: u64,
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err("expected seconds, more than 0 and at most 86400".into()),
    }
}

fn parse_kind(s: &str) -> Result<(String, Class), String> {
    let (name, class) = s.split_once('=').ok_or("expected NAME=short|long")?;
    let class = Class::parse(class).ok_or("class must be short or long")?;
    if name.is_empty() {
        return Err("empty kind name".into());
    }
    Ok((name.to_owned(), class))
}

impl Config {
    /// Parses flags as the binary would (for tests and embedders): `Config::from_args(["--kind", "x=long"])`.
    pub fn from_args<I, T>(args: I) -> Result<Config, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        claw_proto::flags::parse("claw-gateway", args)
    }

    /// Refuses to serve `addr` beyond loopback without API tokens (unless `--insecure-no-auth`),
    /// because every caller would then be the one anonymous principal that sees everything.
    pub fn check_exposure(&self, addr: SocketAddr) -> Result<(), Error> {
        if self.tokens.is_some() || self.insecure_no_auth || addr.ip().is_loopback() {
            return Ok(());
        }
        Err(Error::Config(format!(
            "refusing to serve {addr} without API tokens: anyone who reaches it could see and \
             control every task. Give --tokens FILE (CLAW_TOKENS_FILE; `claw token new` makes a \
             token), bind a loopback address, or pass --insecure-no-auth if something in front \
             authenticates"
        )))
    }

    pub fn catalog(&self) -> Catalog {
        self.kinds.iter().fold(Catalog::builtin(), |c, (k, class)| c.with(k, *class))
    }

    pub fn limits(&self) -> Limits {
        Limits {
            short_timeout_cap_s: self.short_timeout_cap_s,
            long_timeout_cap_s: self.long_timeout_cap_s,
            max_deadline_s: self.max_deadline_s,
            default_max_attempts: self.default_max_attempts,
            ..Limits::STANDARD
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_addresses_need_tokens_or_the_escape_hatch() {
        let public: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let loopback: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let v6: SocketAddr = "[::1]:8080".parse().unwrap();
        let none = Config::from_args::<_, &str>([]).unwrap();
        assert!(none.check_exposure(loopback).is_ok() && none.check_exposure(v6).is_ok());
        let e = none.check_exposure(public).unwrap_err().to_string();
        assert!(e.contains("--tokens") && e.contains("0.0.0.0:8080"), "{e}");
        let tokens = Config::from_args(["--tokens", "t.toml"]).unwrap();
        assert!(tokens.check_exposure(public).is_ok());
        let insecure = Config::from_args(["--insecure-no-auth"]).unwrap();
        assert!(insecure.check_exposure(public).is_ok());
    }

    /// Issue 12: a huge cap overflowed the deadline arithmetic of the first submit using it.
    #[test]
    fn limits_beyond_the_standard_plan_are_refused_at_start() {
        for (flag, value) in [
            ("--max-deadline-s", "18446744073709551615"),
            ("--max-deadline-s", "0"),
            ("--long-timeout-cap-s", "86401"),
            ("--short-timeout-cap-s", "301"),
            ("--default-max-attempts", "21"),
        ] {
            let e = Config::from_args([flag, value]).unwrap_err().to_string();
            assert!(e.contains(flag) && e.contains("not in"), "{flag} {value}: {e}");
        }
        let ok = Config::from_args(["--max-deadline-s", "3600", "--default-max-attempts", "20"]);
        assert_eq!(ok.unwrap().limits().max_deadline_s, 3600);
    }
}
