//! How every process dials NATS: one connection per process, with a short ping interval so a
//! frozen or vanished server is noticed in seconds rather than the client default of minutes.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event};

use crate::secrets;

/// Connection flags shared by every binary.
#[derive(Clone, Debug, clap::Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma separated.
    #[arg(long = "nats-url", env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// A credentials file (JWT + nkey seed).
    #[arg(long = "nats-creds", env = "NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// A token for token authentication.
    #[arg(long = "nats-token", env = "NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// User for user/password authentication (with --nats-password or --nats-password-file).
    #[arg(long = "nats-user", env = "NATS_USER")]
    pub nats_user: Option<String>,
    /// The user's password. Prefer --nats-password-file: a variable or an argument can be read
    /// by other processes of the same user (`/proc/<pid>/environ`, `ps`); the variable is
    /// removed from the environment at start, but only once the process runs.
    #[arg(long = "nats-password", env = "NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// A file holding the user's password (its text without a trailing newline), read at
    /// connect. Not with --nats-password.
    #[arg(
        long = "nats-password-file",
        env = "NATS_PASSWORD_FILE",
        conflicts_with = "nats_password"
    )]
    pub nats_password_file: Option<PathBuf>,
    /// A file holding an nkey seed (`SU...`) for nkey authentication.
    #[arg(long = "nats-nkey", env = "NATS_NKEY")]
    pub nats_nkey: Option<PathBuf>,
    /// Prefix of this process's reply subjects (default `_INBOX`). With per-role users the
    /// server lets each role subscribe only to its own inboxes (`_INBOX.<role>.>`), so no
    /// client can read another's replies; see `nats/accounts/claw.conf`.
    #[arg(long = "nats-inbox-prefix", env = "NATS_INBOX_PREFIX")]
    pub nats_inbox_prefix: Option<String>,
    /// CA certificate(s) (PEM) to verify the server with, instead of the system roots.
    #[arg(long = "nats-tls-ca", env = "NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS, with --nats-tls-key.
    #[arg(long = "nats-tls-cert", env = "NATS_TLS_CERT", requires = "nats_tls_key")]
    pub nats_tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long = "nats-tls-key", env = "NATS_TLS_KEY", requires = "nats_tls_cert")]
    pub nats_tls_key: Option<PathBuf>,
    /// Refuse to talk to a server that does not offer TLS (implied by the other TLS flags
    /// and by `tls://` URLs).
    #[arg(long = "nats-tls-required", env = "NATS_TLS_REQUIRED",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub nats_tls_required: bool,
}

impl NatsArgs {
    pub fn url(url: impl Into<String>) -> NatsArgs {
        NatsArgs {
            nats_url: url.into(),
            nats_creds: None,
            nats_token: None,
            nats_user: None,
            nats_password: None,
            nats_password_file: None,
            nats_nkey: None,
            nats_inbox_prefix: None,
            nats_tls_ca: None,
            nats_tls_cert: None,
            nats_tls_key: None,
            nats_tls_required: false,
        }
    }

    /// The same server as `self`, authenticated as `user` with `password`, with that role's
    /// own inbox prefix `_INBOX.<user>` (what `nats/accounts/claw.conf` allows it to read).
    pub fn with_user(&self, user: &str, password: &str) -> NatsArgs {
        NatsArgs {
            nats_user: Some(user.to_owned()),
            nats_password: Some(password.to_owned()),
            nats_password_file: None,
            nats_inbox_prefix: Some(format!("_INBOX.{user}")),
            ..self.clone()
        }
    }

    /// The password: `--nats-password`, or the text of `--nats-password-file` (read now, so a
    /// missing file is an error at start that names it).
    pub fn password(&self) -> Result<Option<String>, secrets::FileError> {
        match &self.nats_password_file {
            Some(path) => secrets::read_file(path).map(Some),
            None => Ok(self.nats_password.clone()),
        }
    }
}

/// How often the client pings the server. Two missed pongs mark the connection dead, so a frozen
/// server is noticed within about twice this; the worker's lease logic relies on that.
pub const PING_INTERVAL: Duration = Duration::from_secs(2);

/// Could not connect: names the URL, keeps the cause.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to NATS at {url}: {source}")]
pub struct ConnectError {
    pub url: String,
    #[source]
    pub source: async_nats::Error,
}

/// Connects with the options every service uses. `name` shows in `nats server report connections`.
pub async fn connect(args: &NatsArgs, name: &str) -> Result<Client, ConnectError> {
    connect_inner(args, name)
        .await
        .map_err(|source| ConnectError { url: args.nats_url.clone(), source })
}

async fn connect_inner(args: &NatsArgs, name: &str) -> Result<Client, async_nats::Error> {
    let mut options = ConnectOptions::new()
        .name(name)
        .ping_interval(PING_INTERVAL)
        .connection_timeout(Duration::from_secs(5))
        // Requests (KV gets, service calls) must not hang a handler when the server is gone.
        .request_timeout(Some(Duration::from_secs(5)))
        .event_callback(|event| async move {
            match event {
                Event::Disconnected => tracing::warn!("disconnected from NATS"),
                Event::Connected => tracing::info!("connected to NATS"),
                Event::SlowConsumer(sid) => tracing::warn!(sid, "slow consumer on NATS"),
                other => tracing::debug!(event = %other, "NATS event"),
            }
        });
    if let Some(creds) = &args.nats_creds {
        options = options.credentials_file(creds).await?;
    }
    if let Some(token) = &args.nats_token {
        options = options.token(token.clone());
    }
    if let (Some(user), Some(password)) = (&args.nats_user, args.password()?) {
        options = options.user_and_password(user.clone(), password);
    }
    if let Some(path) = &args.nats_nkey {
        let seed = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the nkey seed {}: {e}", path.display()))?;
        options = options.nkey(seed.trim().to_owned());
    }
    if let Some(prefix) = &args.nats_inbox_prefix {
        options = options.custom_inbox_prefix(prefix);
    }
    if let Some(ca) = &args.nats_tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&args.nats_tls_cert, &args.nats_tls_key) {
        options = options.add_client_certificate(cert.clone(), key.clone()).require_tls(true);
    }
    if args.nats_tls_required {
        options = options.require_tls(true);
    }
    let urls: Vec<async_nats::ServerAddr> =
        args.nats_url.split(',').map(|u| u.trim().parse()).collect::<Result<_, _>>()?;
    Ok(options.connect(urls).await?)
}

/// The JetStream context every service uses: publish acks and API calls time out after a few
/// seconds, so a submit answers 503 instead of hanging when JetStream has no leader.
pub fn jetstream(client: Client) -> async_nats::jetstream::Context {
    async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .ack_timeout(Duration::from_secs(5))
        .build(client)
}
