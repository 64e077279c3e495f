//! The client behind every verb: one [`Op`] per API operation, and two backends that carry it,
//! the gateway's HTTP API ([`Http`], the default) or NATS request/reply ([`Nats`], with
//! `--nats-url`). Each verb is written once against [`Client::call`].
//!
//! Replies stay raw JSON ([`serde_json::Value`]) so `--json` prints exactly what the service
//! sent, fields this client does not know included; the verbs parse what they render.
//!
//! The client does not validate a task spec: the gateway is the one validator (its kind catalog
//! and limits are its configuration), and its answer names the field at fault.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::client::RequestErrorKind;
use claw_proto::api::{ApiError, ErrorBody, Verb};
use claw_proto::connect::{self, NatsArgs};
use claw_proto::payloads::{Part, Payloads};
use claw_proto::topology;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::error::{Error, root_cause};

/// How to reach OpenClaw; flattened into every client verb (not into `claw up`, whose
/// `--nats-url` means "use this server instead of starting one").
#[derive(Clone, Debug, clap::Args)]
pub struct ClientArgs {
    /// The gateway's base URL.
    #[arg(long, env = "CLAW_URL", default_value = "http://127.0.0.1:8080", global = true)]
    pub url: String,
    /// The gateway's API token (sent as `Authorization: Bearer`), when it runs with --tokens.
    #[arg(long, env = "CLAW_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Talk straight to NATS (request/reply and streams) instead of the gateway's HTTP API.
    #[arg(long = "nats-url", env = "NATS_URL", global = true)]
    pub nats_url: Option<String>,
    /// A NATS credentials file (JWT + nkey seed), with --nats-url.
    #[arg(long = "nats-creds", env = "NATS_CREDS", global = true)]
    pub nats_creds: Option<PathBuf>,
    /// A NATS token, with --nats-url.
    #[arg(long = "nats-token", env = "NATS_TOKEN", hide_env_values = true, global = true)]
    pub nats_token: Option<String>,
    /// A NATS user (with --nats-password), e.g. the `operator` or `publisher` role.
    #[arg(long = "nats-user", env = "NATS_USER", global = true)]
    pub nats_user: Option<String>,
    #[arg(long = "nats-password", env = "NATS_PASSWORD", hide_env_values = true, global = true)]
    pub nats_password: Option<String>,
    /// A file holding the NATS password (its text without a trailing newline), instead of
    /// --nats-password.
    #[arg(
        long = "nats-password-file",
        env = "NATS_PASSWORD_FILE",
        conflicts_with = "nats_password",
        global = true
    )]
    pub nats_password_file: Option<PathBuf>,
    /// Reply inbox prefix; role users may only read their own (`_INBOX.<user>`, the default
    /// when --nats-user is given).
    #[arg(long = "nats-inbox-prefix", env = "NATS_INBOX_PREFIX", global = true)]
    pub nats_inbox_prefix: Option<String>,
    /// CA certificate of a TLS-enabled NATS server.
    #[arg(long = "nats-tls-ca", env = "NATS_TLS_CA", global = true)]
    pub nats_tls_ca: Option<PathBuf>,
    /// Print the raw JSON reply instead of text, for scripts.
    #[arg(long, global = true)]
    pub json: bool,
}

/// An operation of the task API, whichever way it travels.
#[derive(Clone, Copy, Debug)]
pub enum Op<'a> {
    /// A task spec (JSON object) and an optional idempotency key.
    Submit {
        spec: &'a Value,
        idempotency_key: Option<&'a str>,
    },
    Get {
        id: &'a str,
    },
    /// Filters as name/value pairs (`session`, `status`, `kind`, `limit`, `cursor`).
    List {
        query: &'a [(&'a str, String)],
    },
    Control {
        verb: Verb,
        id: &'a str,
    },
    Lanes,
    /// `pause` or `resume` one class × priority lane.
    Lane {
        verb: &'a str,
        class: &'a str,
        priority: &'a str,
    },
}

impl Op<'_> {
    /// The task an operation is about, to name it in a not-found error.
    fn task_id(&self) -> Option<&str> {
        match self {
            Op::Get { id } | Op::Control { id, .. } => Some(id),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub enum Client {
    Http(Http),
    Nats(Nats),
}

impl Client {
    /// NATS when `--nats-url` is given, else HTTP. Connecting to NATS happens here, so an
    /// unreachable server is reported before anything is sent.
    pub async fn connect(args: &ClientArgs) -> Result<Client, Error> {
        match &args.nats_url {
            Some(url) => Ok(Client::Nats(Nats::connect(args, url).await?)),
            None => Ok(Client::Http(Http::new(&args.url, args.token.as_deref())?)),
        }
    }

    /// Writes task `id`'s input or result (JSON) to `file` (`-`: stdout): inline from the
    /// record, or streamed from the `payloads` object store when the record refers to it.
    pub async fn save_payload(&self, id: &str, part: Part, file: &Path) -> Result<(), Error> {
        let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = if file == Path::new("-") {
            Box::new(tokio::io::stdout())
        } else {
            let f = tokio::fs::File::create(file).await.map_err(|e| {
                Error::Usage(format!("cannot write {}: {}", file.display(), root_cause(&e)))
            })?;
            Box::new(f)
        };
        match self {
            Client::Http(http) => http.save_payload(id, part, &mut out).await?,
            Client::Nats(nats) => {
                let value = self.call(Op::Get { id }).await?;
                let record: claw_proto::TaskRecord = parse(&value, "a task record")?;
                nats.save_payload(&record, part, &mut out).await?;
            }
        }
        out.flush().await.map_err(|e| Error::Usage(format!("writing {}: {e}", file.display())))
    }

    pub async fn call(&self, op: Op<'_>) -> Result<Value, Error> {
        let result = match self {
            Client::Http(http) => http.call(op).await,
            Client::Nats(nats) => nats.call(op).await,
        };
        // The gateway says `no task <id>`; say which id the user typed, quoted, whatever the
        // backend, so a stray space or slash in it is visible.
        match (result, op.task_id()) {
            (Err(Error::Api { status, mut error }), Some(id)) if error.code == "not_found" => {
                error.message = format!("no task '{id}'");
                Err(Error::Api { status, error })
            }
            (result, _) => result,
        }
    }
}

/// Parses a reply into the type a verb renders; a reply of another shape means the service
/// and this client disagree about the contract.
pub fn parse<T: DeserializeOwned>(value: &Value, what: &str) -> Result<T, Error> {
    T::deserialize(value)
        .map_err(|e| Error::Unavailable(format!("unexpected reply for {what}: {e}: {value}")))
}

/// The gateway's HTTP API.
#[derive(Debug)]
pub struct Http {
    base: reqwest::Url,
    http: reqwest::Client,
}

/// Submit waits for JetStream's ack and the gateway answers 503 after its own 5 s timeouts, so
/// anything slower than this is a gateway that hangs, not one that is busy.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Reading a payload: 64 MiB at a slow 1 MB/s, with room to spare.
const PAYLOAD_TIMEOUT: Duration = Duration::from_secs(120);

impl Http {
    /// A client of the gateway at `base`, sending `token` as `Authorization: Bearer` with
    /// every request.
    pub fn new(base: &str, token: Option<&str>) -> Result<Http, Error> {
        let base = reqwest::Url::parse(base)
            .ok()
            .filter(|u| !u.cannot_be_a_base())
            .ok_or_else(|| Error::Usage(format!("--url {base:?} is not an http:// URL")))?;
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = token {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| Error::Usage("--token has characters a header cannot carry".into()))?;
            // Kept out of debug output and HTTP/2 header compression tables.
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(HTTP_TIMEOUT)
            .build()
            .map_err(|e| Error::Usage(format!("cannot build the HTTP client: {e}")))?;
        Ok(Http { base, http })
    }

    /// `base` + the path segments, each percent-encoded, so an id is always one segment.
    fn url(&self, segments: &[&str]) -> reqwest::Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    async fn call(&self, op: Op<'_>) -> Result<Value, Error> {
        let request = match op {
            Op::Submit { spec, idempotency_key } => {
                let mut request = self.http.post(self.url(&["v1", "tasks"])).json(spec);
                if let Some(key) = idempotency_key {
                    request = request.header("Idempotency-Key", key);
                }
                request
            }
            Op::Get { id } => self.http.get(self.url(&["v1", "tasks", id])),
            Op::List { query } => self.http.get(self.url(&["v1", "tasks"])).query(query),
            Op::Control { verb, id } => {
                self.http.post(self.url(&["v1", "tasks", id, verb.as_str()]))
            }
            Op::Lanes => self.http.get(self.url(&["v1", "lanes"])),
            Op::Lane { verb, class, priority } => {
                self.http.post(self.url(&["v1", "lanes", class, priority, verb]))
            }
        };
        let request = request.build().map_err(|e| Error::Usage(e.to_string()))?;
        let (method, path) = (request.method().clone(), request.url().path().to_owned());
        let response = self.http.execute(request).await.map_err(|e| self.transport(&e))?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(|e| self.transport(&e))?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&body).map_err(|e| {
                Error::Unavailable(format!(
                    "the gateway at {} sent a reply that is not JSON: {e}",
                    self.base
                ))
            });
        }
        if let Ok(ErrorBody { error }) = serde_json::from_slice(&body) {
            return Err(Error::Api { status, error });
        }
        // Not our error body: a route this gateway does not have, or something in between.
        let error = if status == 404 || status == 405 {
            ApiError {
                code: "not_supported".into(),
                message: format!(
                    "the gateway at {} has no {method} {path}: it is older than this claw",
                    self.base
                ),
                field: None,
                status: None,
                limit: None,
            }
        } else {
            let text = String::from_utf8_lossy(&body);
            ApiError {
                code: format!("http_{status}"),
                message: text.trim().into(),
                field: None,
                status: None,
                limit: None,
            }
        };
        Err(Error::Api { status, error })
    }

    /// `GET /v1/tasks/{id}/input|result`, copied to `out` as it arrives.
    async fn save_payload(
        &self,
        id: &str,
        part: Part,
        out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send),
    ) -> Result<(), Error> {
        // A payload may be 64 MiB: the whole-request timeout of the other calls does not fit.
        let url = self.url(&["v1", "tasks", id, part.as_str()]);
        let request = self.http.get(url).timeout(PAYLOAD_TIMEOUT);
        let mut response = request.send().await.map_err(|e| self.transport(&e))?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let body = response.bytes().await.map_err(|e| self.transport(&e))?;
            return Err(match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(ErrorBody { error }) => Error::Api { status, error },
                Err(_) => Error::Unavailable(format!("the gateway answered {status}")),
            });
        }
        while let Some(chunk) = response.chunk().await.map_err(|e| self.transport(&e))? {
            out.write_all(&chunk).await.map_err(|e| Error::Usage(format!("writing: {e}")))?;
        }
        Ok(())
    }

    fn transport(&self, e: &reqwest::Error) -> Error {
        let target = format!("the gateway at {}", self.base.as_str().trim_end_matches('/'));
        if e.is_timeout() {
            return Error::Unavailable(format!("{target} did not answer within {HTTP_TIMEOUT:?}"));
        }
        Error::Unreachable { target, detail: root_cause(e) }
    }
}

/// NATS request/reply: the gateway's `claw.api.*` service and the archiver's `claw.archive.*`.
#[derive(Debug)]
pub struct Nats {
    pub client: async_nats::Client,
    pub url: String,
}

impl Nats {
    async fn connect(args: &ClientArgs, url: &str) -> Result<Nats, Error> {
        let mut nats_args = NatsArgs::url(url);
        if let Some(user) = &args.nats_user
            && (args.nats_password.is_some() || args.nats_password_file.is_some())
        {
            nats_args.nats_user = Some(user.clone());
            nats_args.nats_inbox_prefix = Some(format!("_INBOX.{user}"));
        }
        // Read here, so that a file that cannot be read is named (a connect error would be
        // reported by its root cause alone, "entity not found").
        nats_args.nats_password = match &args.nats_password_file {
            Some(path) => Some(
                claw_proto::secrets::read_file(path).map_err(|e| Error::Usage(e.to_string()))?,
            ),
            None => args.nats_password.clone(),
        };
        nats_args.nats_creds.clone_from(&args.nats_creds);
        nats_args.nats_token.clone_from(&args.nats_token);
        if args.nats_inbox_prefix.is_some() {
            nats_args.nats_inbox_prefix.clone_from(&args.nats_inbox_prefix);
        }
        nats_args.nats_tls_ca.clone_from(&args.nats_tls_ca);
        let client = connect::connect(&nats_args, "claw").await.map_err(|e| {
            Error::Unreachable { target: format!("NATS at {url}"), detail: root_cause(&e) }
        })?;
        Ok(Nats { client, url: url.to_owned() })
    }

    async fn call(&self, op: Op<'_>) -> Result<Value, Error> {
        let (subject, payload, key) = match op {
            Op::Submit { spec, idempotency_key } => {
                (topology::api_subject("submit"), spec.clone(), idempotency_key)
            }
            Op::Get { id } => (topology::api_subject("get"), json!({ "id": id }), None),
            Op::List { query } => {
                let object = query.iter().map(|(k, v)| (k.to_string(), list_value(k, v)));
                (topology::ARCHIVE_LIST.to_owned(), Value::Object(object.collect()), None)
            }
            Op::Control { verb, id } => {
                (topology::api_subject(verb.as_str()), json!({ "id": id }), None)
            }
            Op::Lanes => (topology::api_subject("lanes"), json!({}), None),
            Op::Lane { verb, class, priority } => (
                topology::api_subject(&format!("lanes.{verb}")),
                json!({ "class": class, "priority": priority }),
                None,
            ),
        };
        let payload = serde_json::to_vec(&payload).expect("JSON values serialize").into();
        let reply = match key {
            Some(key) => {
                let mut headers = HeaderMap::new();
                headers.insert("Idempotency-Key", key);
                self.client.request_with_headers(subject.clone(), headers, payload).await
            }
            None => self.client.request(subject.clone(), payload).await,
        };
        let reply = reply.map_err(|e| match e.kind() {
            RequestErrorKind::NoResponders => Error::Unavailable(format!(
                "nothing answers on {subject} at {}: is the {} running?",
                self.url,
                if subject.starts_with(topology::ARCHIVE_GROUP) { "archiver" } else { "gateway" }
            )),
            RequestErrorKind::TimedOut => {
                Error::Unavailable(format!("{subject} did not answer in time"))
            }
            _ => Error::Unavailable(format!("request on {subject} failed: {e}")),
        })?;
        let status = reply
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error-Code"))
            .and_then(|v| v.as_str().parse::<u16>().ok());
        if let Some(status) = status {
            let error = match serde_json::from_slice::<ErrorBody>(&reply.payload) {
                Ok(body) => body.error,
                Err(_) => ApiError {
                    code: format!("error_{status}"),
                    message: reply
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Service-Error"))
                        .map_or_else(|| "no detail".to_owned(), |v| v.as_str().to_owned()),
                    field: None,
                    status: None,
                    limit: None,
                },
            };
            return Err(Error::Api { status, error });
        }
        serde_json::from_slice(&reply.payload)
            .map_err(|e| Error::Unavailable(format!("the reply on {subject} is not JSON: {e}")))
    }
}

impl Nats {
    /// The payload of `record`: inline, or read from the `payloads` object store (which the
    /// `operator` and `publisher` roles may read).
    async fn save_payload(
        &self,
        record: &claw_proto::TaskRecord,
        part: Part,
        out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send),
    ) -> Result<(), Error> {
        let (inline, stored) = match part {
            Part::Input => (Some(&record.input), &record.input_ref),
            Part::Result => (record.result.as_ref(), &record.result_ref),
        };
        let write = |e: std::io::Error| Error::Usage(format!("writing: {e}"));
        let Some(stored) = stored else {
            let value = inline.ok_or_else(|| {
                Error::Usage(format!("task {} has no result: it is {}", record.id, record.status))
            })?;
            let json = serde_json::to_vec(value).expect("JSON values serialize");
            return out.write_all(&json).await.map_err(write);
        };
        let js = connect::jetstream(self.client.clone());
        let unavailable = |e: claw_proto::payloads::Error| Error::Unavailable(e.to_string());
        let payloads = Payloads::open(&js, usize::MAX).await.map_err(unavailable)?;
        let mut object = payloads.reader(stored).await.map_err(unavailable)?;
        tokio::io::copy(&mut object, out).await.map_err(write)?;
        Ok(())
    }
}

/// A list filter as the archiver's JSON wants it: `limit` as a number when it is one. A limit
/// that is not a number is sent as the string, so the archiver names the field at fault.
fn list_value(name: &str, value: &str) -> Value {
    match (name, value.parse::<u64>()) {
        ("limit", Ok(n)) => Value::from(n),
        _ => Value::from(value),
    }
}
