//! Webhooks: signed HTTP POSTs telling operators' endpoints about approval events (tickets
//! created, approved, denied, expired, cancelled; grants created and revoked).
//!
//! This module owns delivery: one bounded queue and one task per configured webhook, the signed
//! request, retries with exponential backoff, and HTTP/1.1 over plain TCP or rustls (ring
//! provider, system trust store). It does not decide which events exist or what their `data`
//! holds (the approval code calling [`Webhooks::send`] does), and it never blocks or fails that
//! caller: a slow or unreachable receiver only delays its own queue, and when that queue is full
//! new events for it are dropped with a warning.
//!
//! # What a receiver gets
//!
//! Each event is one `POST` to the configured URL with the JSON body
//! `{"id": "<delivery id>", "event": "<kind>", "ts_ms": <when the event happened, Unix ms>,
//! "data": {...}}` and the headers:
//!
//! | header                  | value                                                        |
//! |-------------------------|--------------------------------------------------------------|
//! | `Content-Type`          | `application/json`                                           |
//! | `X-Agentgate-Event`     | the event kind, as in the body                               |
//! | `X-Agentgate-Delivery`  | the delivery id, as in the body; the same on every retry     |
//! | `X-Agentgate-Timestamp` | Unix seconds when this attempt was signed                    |
//! | `X-Agentgate-Signature` | `sha256=` + lowercase hex HMAC-SHA256 (RFC 2104) of the signed string |
//!
//! Any 2xx answer means delivered. Anything else (connection or TLS failure, timeout, another
//! status, redirects included: they are not followed) is retried after 200 ms, 400 ms, 800 ms...
//! (doubling, at most 30 s) until `max_attempts` attempts were made; then the event is logged
//! and dropped. Events for one webhook are delivered in the order they were sent, one at a time,
//! each attempt on a fresh connection. A receiver may therefore see an event more than once (it
//! answered 2xx but the answer was lost): deduplicate on the delivery id.
//!
//! # Verifying a delivery
//!
//! The secret is the bytes of the `secret_env` variable, or of the `secret_file` without one
//! trailing `\n` or `\r\n`. The signed string is the timestamp header's decimal digits, a `.`,
//! and the raw request body, byte for byte:
//!
//! ```text
//! signed   = X-Agentgate-Timestamp + "." + body
//! expected = "sha256=" + hex(HMAC-SHA256(secret, signed))
//! ```
//!
//! Compare `expected` with `X-Agentgate-Signature` in constant time ([`verify`] does), then
//! refuse timestamps far from your clock (say more than 5 minutes): signing the timestamp is
//! what stops a captured request from being replayed later. Retries are re-signed with a fresh
//! timestamp, so a late retry still passes that check.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde::Serialize;
use sha2::Sha256;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

use crate::config::WebhookConfig;
use crate::proxy::pgtls::SYSTEM_CA_BUNDLE;

/// Events waiting per webhook; when full, new events for that webhook are dropped.
pub const QUEUE_CAPACITY: usize = 1024;
/// Bytes of event data (as JSON) waiting or in delivery per webhook; beyond it new events for
/// that webhook are dropped too. Events carry statements agents chose, so their number alone
/// does not bound the memory a slow receiver keeps alive.
pub const QUEUE_MAX_BYTES: usize = 16 * 1024 * 1024;
/// Wait before the second attempt; each later wait doubles, up to [`BACKOFF_CAP`].
pub const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// Longest wait between two attempts.
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);

pub const EVENT_HEADER: HeaderName = HeaderName::from_static("x-agentgate-event");
pub const DELIVERY_HEADER: HeaderName = HeaderName::from_static("x-agentgate-delivery");
pub const TIMESTAMP_HEADER: HeaderName = HeaderName::from_static("x-agentgate-timestamp");
pub const SIGNATURE_HEADER: HeaderName = HeaderName::from_static("x-agentgate-signature");
/// What precedes the hex digest in [`SIGNATURE_HEADER`].
pub const SIGNATURE_PREFIX: &str = "sha256=";

/// Why the webhooks could not be started. `index` is the webhook's position in `webhooks:`.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhooks[{index}].secret_env: environment variable {var} is {reason}")]
    SecretEnv {
        index: usize,
        var: String,
        reason: &'static str,
    },
    #[error("webhooks[{index}].secret_file {}: {reason}", path.display())]
    SecretFile {
        index: usize,
        path: PathBuf,
        reason: String,
    },
    #[error("webhooks[{index}]: needs exactly one of secret_env or secret_file")]
    SecretSource { index: usize },
    #[error("webhooks[{index}].url {url:?}: {reason}")]
    InvalidUrl {
        index: usize,
        url: String,
        reason: String,
    },
    #[error(
        "webhooks[{index}].url is https:// but no usable root certificates were found at {SYSTEM_CA_BUNDLE}"
    )]
    NoRootCertificates { index: usize },
    #[error("webhooks[{index}]: TLS configuration: {source}")]
    TlsConfig { index: usize, source: rustls::Error },
    #[error("webhooks need a tokio runtime to start their delivery tasks")]
    NoRuntime,
}

/// One webhook's counters since start, in `webhooks:` order (see [`Webhooks::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WebhookStats {
    /// Events answered with a 2xx.
    pub delivered: u64,
    /// Events given up on after `max_attempts` attempts.
    pub failed: u64,
    /// Events never queued because the queue was full.
    pub dropped: u64,
    /// Attempts made, successful or not.
    pub attempts: u64,
}

/// The running webhooks. Cheap to clone; the delivery tasks end once every clone is dropped and
/// their queues are drained (or given up on).
#[derive(Clone)]
pub struct Webhooks {
    hooks: Arc<[Hook]>,
}

impl fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.hooks.iter().map(|h| &h.target.label))
            .finish()
    }
}

/// The caller's side of one webhook.
struct Hook {
    /// Event kinds subscribed to; empty = all.
    events: Vec<String>,
    queue: mpsc::Sender<Event>,
    target: Arc<Target>,
}

/// Where and how one webhook delivers; shared with its task.
struct Target {
    index: usize,
    /// The URL without its query, which may carry a token, for logs.
    label: String,
    host: String,
    port: u16,
    /// `Host` header value: the URL's authority.
    authority: HeaderValue,
    path_and_query: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    secret: Vec<u8>,
    max_attempts: u32,
    timeout: Duration,
    backoff: Backoff,
    stats: Counters,
    /// Data bytes of the events queued or in delivery (see [`QUEUE_MAX_BYTES`]).
    queued_bytes: AtomicUsize,
}

#[derive(Default)]
struct Counters {
    delivered: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    attempts: AtomicU64,
}

/// One queued event.
struct Event {
    id: String,
    kind: HeaderValue,
    ts_ms: u64,
    data: Arc<serde_json::Value>,
    /// `data`'s size as JSON, counted in [`Target::queued_bytes`] while the event is queued.
    bytes: usize,
}

/// The JSON body; a struct rather than `json!` so the keys keep this order on the wire.
#[derive(Serialize)]
struct Envelope<'a> {
    id: &'a str,
    event: &'a str,
    ts_ms: u64,
    data: &'a serde_json::Value,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    pub(crate) base: Duration,
    pub(crate) cap: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            base: BACKOFF_BASE,
            cap: BACKOFF_CAP,
        }
    }
}

impl Backoff {
    /// The wait after failed attempt number `attempt` (1-based).
    fn after(self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }
}

/// What the tests change; production uses the defaults.
#[derive(Default)]
pub(crate) struct Options {
    pub(crate) backoff: Backoff,
    /// Trust anchors for https:// URLs instead of [`SYSTEM_CA_BUNDLE`].
    pub(crate) roots: Option<RootCertStore>,
}

impl Webhooks {
    /// Reads each webhook's secret, parses its URL, and spawns its delivery task on the current
    /// tokio runtime. The system trust store is read once, if any URL is https://.
    pub fn start(cfgs: &[WebhookConfig]) -> Result<Webhooks, WebhookError> {
        Webhooks::start_with(cfgs, Options::default())
    }

    pub(crate) fn start_with(
        cfgs: &[WebhookConfig],
        options: Options,
    ) -> Result<Webhooks, WebhookError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| WebhookError::NoRuntime)?;
        let mut roots = options.roots.map(Arc::new);
        let mut tls_config: Option<Arc<ClientConfig>> = None;
        let mut targets = Vec::with_capacity(cfgs.len());
        for (index, cfg) in cfgs.iter().enumerate() {
            let secret = read_secret(index, cfg)?;
            let url = parse_url(index, &cfg.url)?;
            let tls = if url.https {
                let config = match &tls_config {
                    Some(config) => config.clone(),
                    None => {
                        let roots = match &roots {
                            Some(roots) => roots.clone(),
                            None => roots.insert(Arc::new(system_roots(index)?)).clone(),
                        };
                        tls_config.insert(client_config(index, roots)?).clone()
                    }
                };
                let name = ServerName::try_from(url.host.clone()).map_err(|_| {
                    WebhookError::InvalidUrl {
                        index,
                        url: cfg.url.clone(),
                        reason: "host is not a valid TLS server name".to_owned(),
                    }
                })?;
                Some((TlsConnector::from(config), name))
            } else {
                None
            };
            targets.push((
                Target {
                    index,
                    label: url.label,
                    host: url.host,
                    port: url.port,
                    authority: url.authority,
                    path_and_query: url.path_and_query,
                    tls,
                    secret,
                    max_attempts: cfg.max_attempts.max(1),
                    timeout: Duration::from_millis(cfg.timeout_ms),
                    backoff: options.backoff,
                    stats: Counters::default(),
                    queued_bytes: AtomicUsize::new(0),
                },
                cfg.events.clone(),
            ));
        }
        // Spawn only once every webhook is known good, so a bad one starts nothing.
        let hooks = targets
            .into_iter()
            .map(|(target, events)| {
                let target = Arc::new(target);
                let (queue, rx) = mpsc::channel(QUEUE_CAPACITY);
                runtime.spawn(run(target.clone(), rx));
                Hook {
                    events,
                    queue,
                    target,
                }
            })
            .collect();
        Ok(Webhooks { hooks })
    }

    /// Queues `payload` as a `kind` event for every webhook subscribed to `kind`. Never waits and
    /// never fails: an event that cannot be queued (queue full, or a `kind` that is not a valid
    /// header value) is dropped with a log line.
    pub fn send(&self, kind: &str, payload: serde_json::Value) {
        let mut subscribed = self
            .hooks
            .iter()
            .filter(|h| h.events.is_empty() || h.events.iter().any(|e| e == kind))
            .peekable();
        if subscribed.peek().is_none() {
            return;
        }
        let Ok(kind_header) = HeaderValue::from_str(kind) else {
            tracing::error!(
                event = kind,
                "webhook event kind is not a valid header value; dropped"
            );
            return;
        };
        let ts_ms = unix_millis();
        let bytes = json_len(&payload);
        let data = Arc::new(payload);
        for hook in subscribed {
            let event = Event {
                id: delivery_id(),
                kind: kind_header.clone(),
                ts_ms,
                data: data.clone(),
                bytes,
            };
            let queued = &hook.target.queued_bytes;
            if queued
                .fetch_add(bytes, Ordering::AcqRel)
                .saturating_add(bytes)
                > QUEUE_MAX_BYTES
            {
                queued.fetch_sub(bytes, Ordering::AcqRel);
                hook.target.stats.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    webhook = hook.target.index,
                    url = %hook.target.label,
                    event = kind,
                    delivery = %event.id,
                    bytes,
                    "webhook queue full ({QUEUE_MAX_BYTES} bytes); event dropped"
                );
                continue;
            }
            match hook.queue.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(event)) => {
                    queued.fetch_sub(bytes, Ordering::AcqRel);
                    hook.target.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        webhook = hook.target.index,
                        url = %hook.target.label,
                        event = kind,
                        delivery = %event.id,
                        "webhook queue full ({QUEUE_CAPACITY} events); event dropped"
                    );
                }
                Err(mpsc::error::TrySendError::Closed(event)) => {
                    queued.fetch_sub(bytes, Ordering::AcqRel);
                    hook.target.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        webhook = hook.target.index,
                        url = %hook.target.label,
                        event = kind,
                        delivery = %event.id,
                        "webhook delivery task has stopped (runtime shutting down?); event dropped"
                    );
                }
            }
        }
    }

    /// Each webhook's counters, in `webhooks:` order.
    pub fn stats(&self) -> Vec<WebhookStats> {
        self.hooks
            .iter()
            .map(|h| {
                let c = &h.target.stats;
                WebhookStats {
                    delivered: c.delivered.load(Ordering::Relaxed),
                    failed: c.failed.load(Ordering::Relaxed),
                    dropped: c.dropped.load(Ordering::Relaxed),
                    attempts: c.attempts.load(Ordering::Relaxed),
                }
            })
            .collect()
    }
}

/// `sha256=` + hex HMAC-SHA256(`secret`, `"<timestamp>.<body>"`): the [`SIGNATURE_HEADER`] value.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let digest = signing_mac(secret, timestamp, body).finalize().into_bytes();
    format!("{SIGNATURE_PREFIX}{}", hex::encode(digest))
}

/// Whether `header` (a [`SIGNATURE_HEADER`] value) signs `timestamp` and `body` under `secret`.
/// The digest is compared in constant time. The timestamp's freshness is the caller's check.
pub fn verify(secret: &[u8], timestamp: u64, body: &[u8], header: &str) -> bool {
    let Some(digest) = header
        .strip_prefix(SIGNATURE_PREFIX)
        .and_then(|h| hex::decode(h).ok())
    else {
        return false;
    };
    signing_mac(secret, timestamp, body)
        .verify_slice(&digest)
        .is_ok()
}

fn signing_mac(secret: &[u8], timestamp: u64, body: &[u8]) -> Hmac<Sha256> {
    // RFC 2104 section 2: keys longer than the block are hashed, shorter ones padded, so HMAC
    // takes any key and `new_from_slice` cannot fail.
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

fn read_secret(index: usize, cfg: &WebhookConfig) -> Result<Vec<u8>, WebhookError> {
    let secret = match (&cfg.secret_env, &cfg.secret_file) {
        (Some(var), None) => {
            let env_err = |reason| WebhookError::SecretEnv {
                index,
                var: var.clone(),
                reason,
            };
            let value = std::env::var(var).map_err(|e| match e {
                std::env::VarError::NotPresent => env_err("not set"),
                std::env::VarError::NotUnicode(_) => env_err("not valid UTF-8"),
            })?;
            if value.is_empty() {
                return Err(env_err("empty"));
            }
            value.into_bytes()
        }
        (None, Some(path)) => read_secret_file(index, path)?,
        _ => return Err(WebhookError::SecretSource { index }),
    };
    Ok(secret)
}

fn read_secret_file(index: usize, path: &Path) -> Result<Vec<u8>, WebhookError> {
    let file_err = |reason: String| WebhookError::SecretFile {
        index,
        path: path.to_owned(),
        reason,
    };
    let mut secret = std::fs::read(path).map_err(|e| file_err(e.to_string()))?;
    // `echo secret > file` leaves a newline that is not part of the secret.
    if secret.last() == Some(&b'\n') {
        secret.pop();
        if secret.last() == Some(&b'\r') {
            secret.pop();
        }
    }
    if secret.is_empty() {
        return Err(file_err("empty".to_owned()));
    }
    warn_if_readable_by_others(index, path);
    Ok(secret)
}

fn warn_if_readable_by_others(index: usize, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            webhook = index,
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "webhook secret file is accessible to group or others"
        );
    }
}

/// The parts of a webhook URL a request needs.
struct ParsedUrl {
    https: bool,
    /// Without IPv6 brackets: what is connected to and sent as SNI.
    host: String,
    port: u16,
    authority: HeaderValue,
    path_and_query: String,
    label: String,
}

fn parse_url(index: usize, url: &str) -> Result<ParsedUrl, WebhookError> {
    let invalid = |reason: &str| WebhookError::InvalidUrl {
        index,
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: Uri = url
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| invalid(&e.to_string()))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(invalid("scheme must be http or https")),
    };
    let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
    if authority.as_str().contains('@') {
        // Credentials in the URL would be silently ignored; the HMAC signature authenticates.
        return Err(invalid("user:password@ in the URL is not supported"));
    }
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(invalid("no host"));
    }
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path_and_query = match uri.path_and_query().map(|p| p.as_str()) {
        None | Some("") => "/".to_owned(),
        Some(p) => p.to_owned(),
    };
    let authority_header =
        HeaderValue::from_str(authority.as_str()).map_err(|_| invalid("invalid host"))?;
    Ok(ParsedUrl {
        https,
        host: host.to_owned(),
        port,
        authority: authority_header,
        label: format!(
            "{}://{}{}",
            if https { "https" } else { "http" },
            authority.as_str(),
            uri.path()
        ),
        path_and_query,
    })
}

/// The system bundle, read leniently as `proxy::pgtls` does: large bundles may hold a few
/// certificates webpki rejects.
fn system_roots(index: usize) -> Result<RootCertStore, WebhookError> {
    let pem =
        std::fs::read(SYSTEM_CA_BUNDLE).map_err(|_| WebhookError::NoRootCertificates { index })?;
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok));
    if roots.is_empty() {
        return Err(WebhookError::NoRootCertificates { index });
    }
    Ok(roots)
}

fn client_config(
    index: usize,
    roots: Arc<RootCertStore>,
) -> Result<Arc<ClientConfig>, WebhookError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| WebhookError::TlsConfig { index, source })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// One webhook's delivery task: its events, one at a time, in order.
async fn run(target: Arc<Target>, mut queue: mpsc::Receiver<Event>) {
    while let Some(event) = queue.recv().await {
        deliver(&target, &event).await;
        target.queued_bytes.fetch_sub(event.bytes, Ordering::AcqRel);
    }
}

/// The length of `value` as compact JSON, without building the text.
fn json_len(value: &serde_json::Value) -> usize {
    struct Count(usize);
    impl io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 = self.0.saturating_add(buf.len());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail, nor can serializing a `Value`.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

async fn deliver(target: &Target, event: &Event) {
    let kind = String::from_utf8_lossy(event.kind.as_bytes());
    let envelope = Envelope {
        id: &event.id,
        event: &kind,
        ts_ms: event.ts_ms,
        data: &event.data,
    };
    let body = match serde_json::to_vec(&envelope) {
        Ok(body) => Bytes::from(body),
        Err(e) => {
            target.stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(webhook = target.index, event = %kind, delivery = %event.id, error = %e, "webhook event not serializable; dropped");
            return;
        }
    };
    let mut last_error = None;
    for attempt in 1..=target.max_attempts {
        target.stats.attempts.fetch_add(1, Ordering::Relaxed);
        let result = match tokio::time::timeout(target.timeout, post(target, event, &body)).await {
            Ok(result) => result,
            Err(_) => Err(AttemptError::Timeout(target.timeout)),
        };
        match result {
            Ok(()) => {
                target.stats.delivered.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(webhook = target.index, url = %target.label, event = %kind, delivery = %event.id, attempt, "webhook delivered");
                return;
            }
            Err(e) if e.is_permanent() => {
                last_error = Some(e);
                break;
            }
            Err(e) => {
                if attempt < target.max_attempts {
                    let wait = target.backoff.after(attempt);
                    tracing::warn!(webhook = target.index, url = %target.label, event = %kind, delivery = %event.id, attempt, error = %e, retry_in = ?wait, "webhook delivery failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                last_error = Some(e);
            }
        }
    }
    target.stats.failed.fetch_add(1, Ordering::Relaxed);
    let error = last_error.map(|e| e.to_string()).unwrap_or_default();
    tracing::error!(webhook = target.index, url = %target.label, event = %kind, delivery = %event.id, attempts = target.max_attempts, %error, "webhook delivery given up; event dropped");
}

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("connect to {host}:{port}: {source}")]
    Connect {
        host: String,
        port: u16,
        source: io::Error,
    },
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("building the request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("receiver answered {0}")]
    Status(StatusCode),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl AttemptError {
    /// A request we cannot build will not build on a retry either.
    fn is_permanent(&self) -> bool {
        matches!(self, AttemptError::Request(_))
    }
}

/// One attempt: connect, send the signed request, read the status line and headers.
async fn post(target: &Target, event: &Event, body: &Bytes) -> Result<(), AttemptError> {
    let timestamp = unix_millis() / 1000;
    let signature = sign(&target.secret, timestamp, body);
    let request = Request::builder()
        .method(Method::POST)
        .uri(target.path_and_query.as_str())
        .header(header::HOST, target.authority.clone())
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            header::USER_AGENT,
            concat!("agentgate/", env!("CARGO_PKG_VERSION")),
        )
        .header(EVENT_HEADER, event.kind.clone())
        .header(DELIVERY_HEADER, event.id.as_str())
        .header(TIMESTAMP_HEADER, timestamp)
        .header(SIGNATURE_HEADER, signature)
        .body(Full::new(body.clone()))?;
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|source| AttemptError::Connect {
            host: target.host.clone(),
            port: target.port,
            source,
        })?;
    // Best effort: the request is written in one go anyway.
    let _ = tcp.set_nodelay(true);
    let status = match &target.tls {
        None => exchange(TokioIo::new(tcp), request).await?,
        Some((connector, name)) => {
            let tls = connector
                .connect(name.clone(), tcp)
                .await
                .map_err(AttemptError::Tls)?;
            exchange(TokioIo::new(tls), request).await?
        }
    };
    if status.is_success() {
        Ok(())
    } else {
        Err(AttemptError::Status(status))
    }
}

/// Sends `request` on a fresh HTTP/1.1 connection over `io` and returns the response status.
/// The connection is driven here rather than in a spawned task so that a timeout dropping this
/// future closes it too.
async fn exchange<T>(io: T, request: Request<Full<Bytes>>) -> Result<StatusCode, AttemptError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    let mut response = std::pin::pin!(sender.send_request(request));
    let closed = tokio::select! {
        biased;
        response = &mut response => return Ok(response?.status()),
        closed = conn => closed,
    };
    // The connection ended (and is dropped by now): the response may still have arrived in the
    // same poll, or the pending request was failed when the connection went away.
    closed?;
    Ok(response.await?.status())
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// 32 hex digits: a per-process random half and a counter. Receivers only need ids to be unique
/// to deduplicate retries, which this gives without a UUID dependency.
fn delivery_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    static PROCESS: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let process = *PROCESS.get_or_init(|| {
        // `RandomState` is seeded from the OS's random source.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        hasher.write_u32(std::process::id());
        hasher.finish()
    });
    format!(
        "{process:016x}{:016x}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;
    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Mutex;
    use std::time::Instant;

    use http_body_util::BodyExt;
    use hyper::HeaderMap;
    use rustls_pki_types::PrivateKeyDer;
    use tokio::net::TcpListener;

    const SECRET: &[u8] = b"webhook test secret";
    const DEADLINE: Duration = Duration::from_secs(10);

    /// A secret file in its own temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "agentgate-webhook-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, contents).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn config(url: &str, secret_file: &Path) -> WebhookConfig {
        WebhookConfig {
            url: url.to_owned(),
            secret_env: None,
            secret_file: Some(secret_file.to_owned()),
            events: Vec::new(),
            max_attempts: 5,
            timeout_ms: 2000,
        }
    }

    fn fast() -> Options {
        Options {
            backoff: Backoff {
                base: Duration::from_millis(1),
                cap: Duration::from_millis(4),
            },
            roots: None,
        }
    }

    /// One request as the receiver read it.
    #[derive(Debug)]
    struct Seen {
        path: String,
        headers: HeaderMap,
        body: Bytes,
        /// The status the receiver answered.
        status: StatusCode,
        /// The SNI name, for TLS receivers.
        sni: Option<String>,
    }

    impl Seen {
        fn header(&self, name: &str) -> &str {
            self.headers
                .get(name)
                .unwrap_or_else(|| panic!("no {name} header"))
                .to_str()
                .unwrap()
        }

        fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).unwrap()
        }

        fn signature_ok(&self) -> bool {
            let ts: u64 = self.header("x-agentgate-timestamp").parse().unwrap();
            verify(SECRET, ts, &self.body, self.header("x-agentgate-signature"))
        }
    }

    /// A local HTTP receiver on 127.0.0.1: answers requests with `script`'s statuses in turn
    /// (200 once it runs out) and reports each request it read.
    struct Receiver {
        addr: SocketAddr,
        seen: mpsc::UnboundedReceiver<Seen>,
    }

    impl Receiver {
        async fn start(script: &[u16]) -> Receiver {
            Receiver::start_inner(script, None).await
        }

        async fn start_tls(script: &[u16], tls: Arc<rustls::ServerConfig>) -> Receiver {
            Receiver::start_inner(script, Some(tokio_rustls::TlsAcceptor::from(tls))).await
        }

        async fn start_inner(script: &[u16], tls: Option<tokio_rustls::TlsAcceptor>) -> Receiver {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (tx, seen) = mpsc::unbounded_channel();
            let script: Arc<Mutex<VecDeque<StatusCode>>> = Arc::new(Mutex::new(
                script
                    .iter()
                    .map(|s| StatusCode::from_u16(*s).unwrap())
                    .collect(),
            ));
            tokio::spawn(async move {
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    let tx = tx.clone();
                    let script = script.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        match tls {
                            None => serve(TokioIo::new(stream), tx, script, None).await,
                            Some(acceptor) => {
                                // A client refusing our certificate ends here.
                                let Ok(stream) = acceptor.accept(stream).await else {
                                    return;
                                };
                                let sni = stream.get_ref().1.server_name().map(str::to_owned);
                                serve(TokioIo::new(stream), tx, script, sni).await;
                            }
                        }
                    });
                }
            });
            Receiver { addr, seen }
        }

        fn url(&self, scheme: &str, host: &str) -> String {
            format!(
                "{scheme}://{host}:{}/hooks/agentgate?token=t",
                self.addr.port()
            )
        }

        async fn next(&mut self) -> Seen {
            tokio::time::timeout(DEADLINE, self.seen.recv())
                .await
                .expect("no request before the deadline")
                .unwrap()
        }
    }

    async fn serve<T>(
        io: T,
        tx: mpsc::UnboundedSender<Seen>,
        script: Arc<Mutex<VecDeque<StatusCode>>>,
        sni: Option<String>,
    ) where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let tx = tx.clone();
            let script = script.clone();
            let sni = sni.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                let status = script.lock().unwrap().pop_front().unwrap_or(StatusCode::OK);
                let _ = tx.send(Seen {
                    path: parts.uri.to_string(),
                    headers: parts.headers,
                    body,
                    status,
                    sni,
                });
                let mut resp = hyper::Response::new(Full::new(Bytes::from_static(b"ok")));
                *resp.status_mut() = status;
                Ok::<_, Infallible>(resp)
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .await;
    }

    /// Polls `cond` until it holds or the deadline passes.
    async fn eventually(what: &str, cond: impl Fn() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    // ---------- signing ----------

    #[test]
    fn signature_matches_an_independent_hmac() {
        // printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac secret
        assert_eq!(
            sign(b"secret", 1_700_000_000, br#"{"a":1}"#),
            "sha256=49f24e537407743fa4a0242bb63b94b9a47ee99cbbe071ccd8a22550ae411686"
        );
    }

    #[test]
    fn verify_accepts_only_the_exact_signature() {
        let body = br#"{"id":"x"}"#;
        let good = sign(SECRET, 42, body);
        assert!(verify(SECRET, 42, body, &good));
        assert!(verify(
            SECRET,
            42,
            body,
            &good.to_uppercase().replace("SHA256=", "sha256=")
        ));
        assert!(!verify(SECRET, 43, body, &good), "other timestamp");
        assert!(!verify(SECRET, 42, br#"{"id":"y"}"#, &good), "other body");
        assert!(!verify(b"other secret", 42, body, &good), "other secret");
        assert!(
            !verify(SECRET, 42, body, &good["sha256=".len()..]),
            "no prefix"
        );
        assert!(
            !verify(SECRET, 42, body, &good[..good.len() - 2]),
            "truncated"
        );
        assert!(!verify(SECRET, 42, body, &format!("{good}00")), "extended");
        assert!(!verify(SECRET, 42, body, "sha256=zz"), "not hex");
        assert!(!verify(SECRET, 42, body, ""), "empty");
        // "4.2<body>" must not verify as "42.<body>".
        assert!(!verify(SECRET, 4, b"2.{\"id\":\"x\"}", &good));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = Backoff::default();
        let waits: Vec<u128> = (1..=10).map(|a| b.after(a).as_millis()).collect();
        assert_eq!(
            waits,
            [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]
        );
        assert_eq!(b.after(u32::MAX), BACKOFF_CAP);
    }

    #[test]
    fn delivery_ids_are_distinct() {
        let a = delivery_id();
        let b = delivery_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    }

    // ---------- configuration ----------

    #[test]
    fn urls_are_split_into_what_a_request_needs() {
        let u = parse_url(0, "http://example.com/hook?token=s3cret").unwrap();
        assert!(!u.https);
        assert_eq!((u.host.as_str(), u.port), ("example.com", 80));
        assert_eq!(u.authority, "example.com");
        assert_eq!(u.path_and_query, "/hook?token=s3cret");
        assert_eq!(u.label, "http://example.com/hook", "no query in logs");

        let u = parse_url(0, "https://hooks.example.com").unwrap();
        assert!(u.https);
        assert_eq!(u.port, 443);
        assert_eq!(u.path_and_query, "/");

        let u = parse_url(0, "https://[::1]:8443/x").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 8443));
        assert_eq!(u.authority, "[::1]:8443");

        for (url, why) in [
            ("ftp://example.com/", "scheme"),
            ("example.com/hook", "invalid format"),
            ("http://:80/hook", "no host"),
            ("/hook", "scheme"),
            ("http://user:pw@example.com/", "user:password"),
            ("http://exa mple.com/", "invalid"),
        ] {
            let err = parse_url(3, url).err().unwrap();
            let msg = err.to_string();
            assert!(msg.starts_with("webhooks[3].url"), "{msg}");
            assert!(matches!(err, WebhookError::InvalidUrl { index: 3, .. }));
            assert!(msg.contains(why), "{url}: {msg}");
        }
    }

    #[tokio::test]
    async fn start_errors_name_the_webhook_and_what_is_missing() {
        let dir = TempDir::new();
        let good = dir.file("good", b"s3cret\n");
        let cfg = config("http://127.0.0.1:9/", &good);

        let mut missing_env = cfg.clone();
        missing_env.secret_file = None;
        missing_env.secret_env = Some("AGENTGATE_WEBHOOK_TEST_UNSET_VARIABLE".into());
        let err = Webhooks::start(&[cfg.clone(), missing_env]).unwrap_err();
        assert!(
            matches!(err, WebhookError::SecretEnv { index: 1, .. }),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "webhooks[1].secret_env: environment variable AGENTGATE_WEBHOOK_TEST_UNSET_VARIABLE is not set"
        );

        let mut missing_file = cfg.clone();
        missing_file.secret_file = Some(dir.0.join("nope"));
        let err = Webhooks::start(&[missing_file]).unwrap_err();
        assert!(
            matches!(err, WebhookError::SecretFile { index: 0, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("nope"), "{err}");

        let mut empty = cfg.clone();
        empty.secret_file = Some(dir.file("empty", b"\r\n"));
        let err = Webhooks::start(&[empty]).unwrap_err();
        assert!(err.to_string().ends_with(": empty"), "{err}");

        let mut both = cfg.clone();
        both.secret_env = Some("PATH".into());
        let err = Webhooks::start(&[both]).unwrap_err();
        assert!(
            matches!(err, WebhookError::SecretSource { index: 0 }),
            "{err}"
        );

        let mut bad_url = cfg.clone();
        bad_url.url = "gopher://example.com/".into();
        let err = Webhooks::start(&[cfg.clone(), cfg.clone(), bad_url]).unwrap_err();
        assert!(
            matches!(err, WebhookError::InvalidUrl { index: 2, .. }),
            "{err}"
        );

        // The environment variable's value is the secret as is.
        let mut env = cfg.clone();
        env.secret_file = None;
        env.secret_env = Some("PATH".into());
        assert!(Webhooks::start(&[env]).is_ok());
    }

    #[test]
    fn start_needs_a_runtime() {
        let dir = TempDir::new();
        let cfg = config("http://127.0.0.1:9/", &dir.file("s", SECRET));
        let err = Webhooks::start(&[cfg]).unwrap_err();
        assert!(matches!(err, WebhookError::NoRuntime), "{err}");
    }

    // ---------- delivery ----------

    #[tokio::test]
    async fn event_is_delivered_signed_with_headers_and_envelope() {
        let dir = TempDir::new();
        // The trailing newline is not part of the secret.
        let secret = dir.file("secret", b"webhook test secret\n");
        let mut receiver = Receiver::start(&[]).await;
        let hooks = Webhooks::start_with(
            &[config(&receiver.url("http", "127.0.0.1"), &secret)],
            fast(),
        )
        .unwrap();
        let before = unix_millis();
        hooks.send(
            "ticket_created",
            serde_json::json!({"ticket": 7, "agent": "a1"}),
        );

        let seen = receiver.next().await;
        assert_eq!(seen.path, "/hooks/agentgate?token=t");
        assert_eq!(seen.header("content-type"), "application/json");
        assert_eq!(
            seen.header("host"),
            format!("127.0.0.1:{}", receiver.addr.port())
        );
        assert_eq!(seen.header("x-agentgate-event"), "ticket_created");
        assert!(
            seen.signature_ok(),
            "signature: {}",
            seen.header("x-agentgate-signature")
        );
        let ts: u64 = seen.header("x-agentgate-timestamp").parse().unwrap();
        assert!(ts.abs_diff(unix_millis() / 1000) <= 5, "timestamp {ts}");

        let body = seen.json();
        let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 4, "{body}");
        assert_eq!(body["id"], seen.header("x-agentgate-delivery"));
        assert_eq!(body["event"], "ticket_created");
        assert_eq!(
            body["data"],
            serde_json::json!({"ticket": 7, "agent": "a1"})
        );
        let ts_ms = body["ts_ms"].as_u64().unwrap();
        assert!(ts_ms >= before && ts_ms <= unix_millis(), "ts_ms {ts_ms}");

        eventually("delivered stat", || hooks.stats()[0].delivered == 1).await;
        assert_eq!(
            hooks.stats(),
            [WebhookStats {
                delivered: 1,
                attempts: 1,
                ..Default::default()
            }]
        );
    }

    #[tokio::test]
    async fn failed_attempts_are_retried_until_a_2xx() {
        let dir = TempDir::new();
        let secret = dir.file("secret", SECRET);
        let mut receiver = Receiver::start(&[500, 500, 204]).await;
        let hooks = Webhooks::start_with(
            &[config(&receiver.url("http", "127.0.0.1"), &secret)],
            fast(),
        )
        .unwrap();
        hooks.send("ticket_approved", serde_json::json!({"ticket": 1}));

        let attempts = [
            receiver.next().await,
            receiver.next().await,
            receiver.next().await,
        ];
        let statuses: Vec<u16> = attempts.iter().map(|s| s.status.as_u16()).collect();
        assert_eq!(statuses, [500, 500, 204]);
        for seen in &attempts {
            assert!(seen.signature_ok(), "every attempt is signed");
            assert_eq!(
                seen.body, attempts[0].body,
                "the body is the same on retries"
            );
            assert_eq!(
                seen.header("x-agentgate-delivery"),
                attempts[0].header("x-agentgate-delivery")
            );
        }
        eventually("delivered stat", || hooks.stats()[0].delivered == 1).await;
        assert_eq!(hooks.stats()[0].attempts, 3);

        // Delivered once: the next request the receiver sees is the next event.
        hooks.send("ticket_denied", serde_json::json!({"ticket": 2}));
        assert_eq!(receiver.next().await.json()["event"], "ticket_denied");
        assert_eq!(hooks.stats()[0].attempts, 4);
    }

    #[tokio::test]
    async fn unreachable_receiver_never_delays_the_caller() {
        let dir = TempDir::new();
        let secret = dir.file("secret", SECRET);
        // A port nothing listens on any more.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let mut cfg = config(&format!("http://127.0.0.1:{port}/"), &secret);
        cfg.max_attempts = 3;
        let hooks = Webhooks::start_with(&[cfg], fast()).unwrap();

        let start = Instant::now();
        for n in 0..10 {
            hooks.send("ticket_created", serde_json::json!({"n": n}));
        }
        assert!(start.elapsed() < Duration::from_millis(100), "send waited");

        eventually("all given up", || hooks.stats()[0].failed == 10).await;
        assert_eq!(
            hooks.stats()[0],
            WebhookStats {
                failed: 10,
                attempts: 30,
                ..Default::default()
            }
        );
    }

    #[tokio::test]
    async fn a_receiver_that_never_answers_times_out() {
        let dir = TempDir::new();
        let secret = dir.file("secret", SECRET);
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut cfg = config(
            &format!("http://{}/", silent.local_addr().unwrap()),
            &secret,
        );
        cfg.max_attempts = 2;
        cfg.timeout_ms = 50;
        let hooks = Webhooks::start_with(&[cfg], fast()).unwrap();
        let accepted = tokio::spawn(async move {
            // Hold both connections open without answering.
            let a = silent.accept().await.unwrap();
            let b = silent.accept().await.unwrap();
            (a, b)
        });
        hooks.send("ticket_expired", serde_json::json!({}));
        eventually("given up", || hooks.stats()[0].failed == 1).await;
        assert_eq!(hooks.stats()[0].attempts, 2);
        assert!(accepted.is_finished());
    }

    #[tokio::test]
    async fn a_full_queue_drops_new_events() {
        let dir = TempDir::new();
        let secret = dir.file("secret", SECRET);
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cfg = config(
            &format!("http://{}/", silent.local_addr().unwrap()),
            &secret,
        );
        let hooks = Webhooks::start_with(&[cfg], fast()).unwrap();
        // The single-threaded test runtime cannot run the delivery task before the next await,
        // so none of these leave the queue.
        for n in 0..QUEUE_CAPACITY + 2 {
            hooks.send("ticket_created", serde_json::json!({"n": n}));
        }
        assert_eq!(hooks.stats()[0].dropped, 2);
    }

    #[tokio::test]
    async fn a_queue_full_of_bytes_drops_new_events() {
        let dir = TempDir::new();
        let secret = dir.file("secret", SECRET);
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cfg = config(
            &format!("http://{}/", silent.local_addr().unwrap()),
            &secret,
        );
        let hooks = Webhooks::start_with(&[cfg], fast()).unwrap();
        // Far fewer events than the queue has places for, but more bytes than it may keep.
        let big = "x".repeat(1024 * 1024);
        for _ in 0..20 {
            hooks.send("ticket_created", serde_json::json!({ "statement": big }));
        }
        assert_eq!(hooks.stats()[0].dropped, 20 - 15);
        // Small events still fit.
        hooks.send("ticket_created", serde_json::json!({"n": 1}));
        assert_eq!(hooks.stats()[0].dropped, 5);
    }

    #[test]
    fn json_len_is_the_length_of_the_json() {
        let v = serde_json::json!({"a": [1, "two\n", null], "b": {"c": true}});
        assert_eq!(json_len(&v), serde_json::to_vec(&v).unwrap().len());
    }

    #[tokio::test]
    async fn only_subscribed_events_are_sent() {
        let dir = TempDir::new();
        let secret = dir.file("secret", SECRET);
        let mut only = Receiver::start(&[]).await;
        let mut all = Receiver::start(&[]).await;
        let mut only_cfg = config(&only.url("http", "127.0.0.1"), &secret);
        only_cfg.events = vec!["ticket_approved".into(), "grant_created".into()];
        let all_cfg = config(&all.url("http", "127.0.0.1"), &secret);
        let hooks = Webhooks::start_with(&[only_cfg, all_cfg], fast()).unwrap();

        for kind in [
            "ticket_created",
            "ticket_approved",
            "grant_revoked",
            "grant_created",
        ] {
            hooks.send(kind, serde_json::json!({}));
        }
        let mut to_all = Vec::new();
        for _ in 0..4 {
            to_all.push(all.next().await.header("x-agentgate-event").to_owned());
        }
        assert_eq!(
            to_all,
            [
                "ticket_created",
                "ticket_approved",
                "grant_revoked",
                "grant_created"
            ]
        );
        // In-order delivery: had the unsubscribed kinds been queued, they would come first.
        assert_eq!(
            only.next().await.header("x-agentgate-event"),
            "ticket_approved"
        );
        assert_eq!(
            only.next().await.header("x-agentgate-event"),
            "grant_created"
        );
        eventually("stats", || hooks.stats()[0].delivered == 2).await;
        assert_eq!(hooks.stats()[0].attempts, 2);
        // Ids are per delivery, not shared between webhooks.
        hooks.send("grant_created", serde_json::json!({}));
        let a = only.next().await;
        let b = all.next().await;
        assert_ne!(
            a.header("x-agentgate-delivery"),
            b.header("x-agentgate-delivery")
        );
    }

    #[tokio::test]
    async fn events_arrive_in_order_despite_retries() {
        let dir = TempDir::new();
        let secret = dir.file("secret", SECRET);
        // Every third request fails once.
        let script: Vec<u16> = (0..40)
            .map(|i| if i % 3 == 1 { 503 } else { 200 })
            .collect();
        let mut receiver = Receiver::start(&script).await;
        let hooks = Webhooks::start_with(
            &[config(&receiver.url("http", "127.0.0.1"), &secret)],
            fast(),
        )
        .unwrap();
        for n in 0..20 {
            hooks.send("ticket_created", serde_json::json!({"n": n}));
        }
        let mut delivered = Vec::new();
        while delivered.len() < 20 {
            let seen = receiver.next().await;
            if seen.status.is_success() {
                delivered.push(seen.json()["data"]["n"].as_u64().unwrap());
            }
        }
        assert_eq!(delivered, (0..20).collect::<Vec<u64>>());
    }

    #[tokio::test]
    async fn https_is_verified_and_sends_sni() {
        let dir = TempDir::new();
        let secret = dir.file("secret", SECRET);
        let (cert, key) = self_signed_localhost(&dir);
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
        let mut receiver = Receiver::start_tls(&[], Arc::new(server)).await;

        // Trusted: delivered, with the URL's host as SNI.
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let options = Options {
            roots: Some(roots),
            ..fast()
        };
        let hooks = Webhooks::start_with(
            &[config(&receiver.url("https", "localhost"), &secret)],
            options,
        )
        .unwrap();
        hooks.send("grant_revoked", serde_json::json!({"grant": 3}));
        let seen = receiver.next().await;
        assert_eq!(seen.sni.as_deref(), Some("localhost"));
        assert!(seen.signature_ok());
        assert_eq!(seen.json()["data"]["grant"], 3);

        // Not trusted (the system roots do not know this certificate): never delivered.
        let mut cfg = config(&receiver.url("https", "localhost"), &secret);
        cfg.max_attempts = 2;
        let untrusted = Webhooks::start_with(&[cfg], fast()).unwrap();
        untrusted.send("grant_revoked", serde_json::json!({}));
        eventually("given up", || untrusted.stats()[0].failed == 1).await;
        assert_eq!(untrusted.stats()[0].delivered, 0);
    }

    /// A self-signed end-entity certificate for `localhost` and 127.0.0.1, made with openssl.
    fn self_signed_localhost(dir: &TempDir) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let cert = dir.0.join("cert.pem");
        let key = dir.0.join("key.pem");
        let out = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
            .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .args(["-addext", "extendedKeyUsage=serverAuth"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            CertificateDer::from_pem_file(&cert).unwrap(),
            PrivateKeyDer::from_pem_file(&key).unwrap(),
        )
    }
}
