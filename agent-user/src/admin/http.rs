//! The loopback HTTP admin API: the unix socket's requests as JSON over HTTP/1.1, for callers
//! that authenticate with a JWT (`Authorization: Bearer`, RFC 6750).
//!
//! This module owns the transport: accepting connections, HTTP limits and timeouts, finding and
//! verifying the bearer token, and mapping routes to [`Request`]s and [`Response`]s to status
//! codes. What a request does is `admin::dispatch`'s business; how a token is checked is
//! `admin::jwt`'s. Governed agents never reach it: the daemon adds its address to the kernel's
//! protected endpoints, so their connects fail with `EPERM`.
//!
//! | method | path                            | request                 |
//! |--------|---------------------------------|-------------------------|
//! | GET    | `/v1/status`                    | `status`                |
//! | GET    | `/v1/approvals[?all=true]`      | `approvals_list`        |
//! | POST   | `/v1/approvals/{id}/approve`    | `approve`               |
//! | POST   | `/v1/approvals/{id}/deny`       | `deny`                  |
//! | GET    | `/v1/grants[?all=true]`         | `grants_list`           |
//! | POST   | `/v1/grants`                    | `grant`                 |
//! | DELETE | `/v1/grants/{id}`               | `revoke`                |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;

use super::jwt::{JwtError, Verifier};
use super::{Caller, ErrorKind, Request, Response};
use crate::daemon::Daemon;

/// Largest request body read; larger ones get 413.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest request head (request line and headers); larger ones get 431.
pub const MAX_HEADER_SIZE: usize = 16 * 1024;
/// Time allowed to send a request head, and how long an idle keep-alive connection stays open.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed to send a request body once its head has arrived.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 64;
/// How long one connection is served; then it is closed once its current request is answered.
pub const MAX_CONNECTION_TIME: Duration = Duration::from_secs(60);
/// Time a response may wait on a client that does not read it. Without it, a local process that
/// sends requests and never reads the answers would keep its connection slot for ever, and
/// [`MAX_CONNECTIONS`] of those would lock the approvers out.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What answers a routed request. The daemon in production; a stand-in in this module's tests.
pub(crate) trait Dispatch: Send + Sync + 'static {
    fn dispatch(&self, caller: Caller, req: Request) -> impl Future<Output = Response> + Send + '_;
}

impl Dispatch for Daemon {
    async fn dispatch(&self, caller: Caller, req: Request) -> Response {
        super::dispatch(self, &caller, req).await
    }
}

/// Serves the admin API on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, verifier: Arc<Verifier>, daemon: Arc<Daemon>) {
    serve_with(listener, verifier, daemon).await;
}

pub(crate) async fn serve_with<D: Dispatch>(
    listener: TcpListener,
    verifier: Arc<Verifier>,
    dispatcher: Arc<D>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "admin http accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "admin http: too many connections; closing");
            continue;
        };
        let verifier = verifier.clone();
        let dispatcher = dispatcher.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let verifier = verifier.clone();
                let dispatcher = dispatcher.clone();
                async move { Ok::<_, Infallible>(answer(req, peer, &verifier, &*dispatcher).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_header_size(MAX_HEADER_SIZE)
                .serve_connection(
                    TokioIo::new(StallLimit::new(stream, WRITE_STALL_TIMEOUT)),
                    service,
                );
            tokio::pin!(conn);
            // A client that keeps its connection busy (a request now and then, a response read
            // a little at a time) is asked to leave after a while: the request in hand is
            // answered, then the connection closes and its slot is free.
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = tokio::time::sleep(MAX_CONNECTION_TIME) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "admin http connection ended");
            }
            drop(slot);
        });
    }
}

/// A stream whose writes fail with `TimedOut` once one has waited `limit` without progress
/// (hyper has a timeout for reading a request head, none for writing a response).
struct StallLimit<S> {
    io: S,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> StallLimit<S> {
    fn new(io: S, limit: Duration) -> Self {
        StallLimit {
            io,
            limit,
            stalled: None,
        }
    }

    /// Called when the stream could not take more: Ready(error) once the limit has passed.
    fn waited_too_long(&mut self, cx: &mut TaskContext<'_>) -> Poll<std::io::Error> {
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        sleep.as_mut().poll(cx).map(|()| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client read nothing for {limit:?}"),
            )
        })
    }

    fn progress<T>(
        &mut self,
        cx: &mut TaskContext<'_>,
        r: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        match r {
            Poll::Pending => self.waited_too_long(cx).map(Err),
            done => {
                self.stalled = None;
                done
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallLimit<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallLimit<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.progress(cx, r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.progress(cx, r)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.progress(cx, r)
    }
}

type HttpResponse = hyper::Response<Full<Bytes>>;

async fn answer<D: Dispatch>(
    req: hyper::Request<Incoming>,
    peer: SocketAddr,
    verifier: &Verifier,
    dispatcher: &D,
) -> HttpResponse {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let method = parts.method;
    let subject = match bearer(&parts.headers).and_then(|t| verifier.verify(t)) {
        Ok(subject) => subject,
        Err(e) => {
            // The token itself is never logged, only why it was refused.
            tracing::warn!(%peer, %method, %path, reason = %e, "admin http: unauthenticated request refused");
            return unauthorized(&e);
        }
    };
    let body = match read_body(body, &parts.headers).await {
        Ok(b) => b,
        Err(refusal) => {
            tracing::info!(%peer, %subject, %method, %path, status = refusal.status.as_u16(), "admin http: request refused");
            return refusal.into_response();
        }
    };
    let request = match route(&method, &path, parts.uri.query(), &body) {
        Ok(r) => r,
        Err(refusal) => {
            tracing::info!(%peer, %subject, %method, %path, status = refusal.status.as_u16(), error = %refusal.message, "admin http: request refused");
            return refusal.into_response();
        }
    };
    let caller = Caller::Http {
        subject: subject.clone(),
    };
    let response = dispatcher.dispatch(caller, request).await;
    let status = status_of(&response);
    tracing::info!(%peer, %subject, %method, %path, status = status.as_u16(), "admin http request");
    json_response(status, &response)
}

/// The token of an `Authorization: Bearer <token>` header (RFC 6750 2.1; the scheme is
/// case-insensitive).
fn bearer(headers: &HeaderMap) -> Result<&str, JwtError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(JwtError::MissingToken);
    };
    if values.next().is_some() {
        return Err(JwtError::Malformed("several Authorization headers".into()));
    }
    let value = value
        .to_str()
        .map_err(|_| JwtError::Malformed("Authorization header is not ASCII".into()))?;
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(JwtError::Malformed(
            "Authorization scheme is not Bearer".into(),
        ));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(JwtError::MissingToken);
    }
    Ok(token)
}

fn unauthorized(e: &JwtError) -> HttpResponse {
    // RFC 6750 3.1: no error code when the request carried no credentials at all.
    let challenge = match e {
        JwtError::MissingToken => r#"Bearer realm="agentgate""#,
        _ => r#"Bearer realm="agentgate", error="invalid_token""#,
    };
    let mut resp = json_response(StatusCode::UNAUTHORIZED, &refused(e.to_string()));
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    resp
}

async fn read_body(body: Incoming, headers: &HeaderMap) -> Result<Bytes, Refusal> {
    let too_large = || {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {MAX_BODY} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(BODY_READ_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
        Err(_) => Err(Refusal::new(
            StatusCode::REQUEST_TIMEOUT,
            "request body too slow".into(),
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("reading the request body: {e}"),
        )),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// Why a request was refused before it reached the daemon.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub status: StatusCode,
    pub message: String,
    /// The methods a path answers, for 405's `Allow` header.
    pub allow: Option<&'static str>,
}

impl Refusal {
    fn new(status: StatusCode, message: String) -> Refusal {
        Refusal {
            status,
            message,
            allow: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::BAD_REQUEST, message.into())
    }

    fn into_response(self) -> HttpResponse {
        let mut resp = json_response(self.status, &refused(self.message));
        if let Some(allow) = self.allow {
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        resp
    }
}

fn refused(message: String) -> Response {
    Response {
        ok: false,
        error: Some(message),
        ..Default::default()
    }
}

fn json_response(status: StatusCode, body: &Response) -> HttpResponse {
    let bytes = serde_json::to_vec(body)
        .unwrap_or_else(|_| br#"{"ok":false,"error":"response not serializable"}"#.to_vec());
    let mut resp = hyper::Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The status code for a dispatched request's answer.
pub(crate) fn status_of(resp: &Response) -> StatusCode {
    if resp.ok {
        return StatusCode::OK;
    }
    match resp.error_kind {
        Some(ErrorKind::BadRequest) => StatusCode::BAD_REQUEST,
        Some(ErrorKind::Forbidden) => StatusCode::FORBIDDEN,
        Some(ErrorKind::NotFound) => StatusCode::NOT_FOUND,
        Some(ErrorKind::Conflict) => StatusCode::CONFLICT,
        Some(ErrorKind::Internal) | None => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApproveBody {
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default, rename = "for")]
    for_: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DenyBody {
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantBody {
    agent: String,
    role: String,
    #[serde(rename = "for")]
    for_: String,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    #[serde(default)]
    reason: Option<String>,
}

/// Maps a request line and body to an admin [`Request`]. Pure: no I/O, no daemon.
pub(crate) fn route(
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> Result<Request, Refusal> {
    let not_found = || Refusal::new(StatusCode::NOT_FOUND, format!("no route for {path}"));
    let Some(rest) = path.strip_prefix("/v1/") else {
        return Err(not_found());
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let allow = |allow: &'static str| Refusal {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!("{method} is not allowed on {path} (allowed: {allow})"),
        allow: Some(allow),
    };
    match segments.as_slice() {
        ["status"] => match *method {
            Method::GET => {
                no_query(query)?;
                Ok(Request::Status)
            }
            _ => Err(allow("GET")),
        },
        ["approvals"] => match *method {
            Method::GET => Ok(Request::ApprovalsList {
                all: all_param(query)?,
            }),
            _ => Err(allow("GET")),
        },
        ["approvals", id, "approve"] => match *method {
            Method::POST => {
                no_query(query)?;
                let id = parse_id(id)?;
                let b: ApproveBody = json_body(body)?.unwrap_or_default();
                Ok(Request::Approve {
                    id,
                    sha256: b.sha256,
                    for_secs: b.for_.as_deref().map(duration_secs).transpose()?,
                    reason: b.reason,
                })
            }
            _ => Err(allow("POST")),
        },
        ["approvals", id, "deny"] => match *method {
            Method::POST => {
                no_query(query)?;
                let id = parse_id(id)?;
                let b: DenyBody = json_body(body)?.unwrap_or_default();
                match b.reason {
                    Some(reason) if !reason.trim().is_empty() => Ok(Request::Deny { id, reason }),
                    _ => Err(Refusal::bad_request("a denial needs a `reason`")),
                }
            }
            _ => Err(allow("POST")),
        },
        ["grants"] => match *method {
            Method::GET => Ok(Request::GrantsList {
                all: all_param(query)?,
            }),
            Method::POST => {
                no_query(query)?;
                let Some(b) = json_body::<GrantBody>(body)? else {
                    return Err(Refusal::bad_request(
                        "a grant needs a body: {\"agent\", \"role\", \"for\", \"reason\"?}",
                    ));
                };
                Ok(Request::Grant {
                    agent: b.agent,
                    role: b.role,
                    for_secs: duration_secs(&b.for_)?,
                    reason: b.reason,
                })
            }
            _ => Err(allow("GET, POST")),
        },
        ["grants", id] => match *method {
            Method::DELETE => {
                no_query(query)?;
                let id = parse_id(id)?;
                let b: RevokeBody = json_body(body)?.unwrap_or_default();
                Ok(Request::Revoke {
                    id,
                    reason: b.reason,
                })
            }
            _ => Err(allow("DELETE")),
        },
        _ => Err(not_found()),
    }
}

/// An id path segment: decimal digits only (no sign, no spaces).
fn parse_id(segment: &str) -> Result<u64, Refusal> {
    if segment.is_empty() || !segment.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Refusal::bad_request(format!(
            "`{segment}` is not a numeric id"
        )));
    }
    segment
        .parse()
        .map_err(|_| Refusal::bad_request(format!("id `{segment}` is out of range")))
}

/// A JSON object body, or None when the body is empty. Only an object: serde would also read a
/// struct from an array.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<Option<T>, Refusal> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let bad = |e: serde_json::Error| Refusal::bad_request(format!("bad JSON body: {e}"));
    match serde_json::from_slice(body).map_err(bad)? {
        object @ serde_json::Value::Object(_) => {
            serde_json::from_value(object).map(Some).map_err(bad)
        }
        _ => Err(Refusal::bad_request("the body must be a JSON object")),
    }
}

/// A humantime duration (`30m`, `1h 30m`) in whole seconds, at least one.
fn duration_secs(text: &str) -> Result<u64, Refusal> {
    let d = humantime::parse_duration(text)
        .map_err(|e| Refusal::bad_request(format!("bad duration `{text}` for `for`: {e}")))?;
    match d.as_secs() {
        0 => Err(Refusal::bad_request(format!(
            "duration `{text}` for `for` is under one second"
        ))),
        secs => Ok(secs),
    }
}

fn no_query(query: Option<&str>) -> Result<(), Refusal> {
    match query {
        None | Some("") => Ok(()),
        Some(q) => Err(Refusal::bad_request(format!(
            "this route takes no query parameters (got `{q}`)"
        ))),
    }
}

/// `all=true|false|1|0`, the only query parameter the list routes take.
fn all_param(query: Option<&str>) -> Result<bool, Refusal> {
    let mut all = false;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, "true"));
        if key != "all" {
            return Err(Refusal::bad_request(format!(
                "unknown query parameter `{key}` (only `all`)"
            )));
        }
        all = match value {
            "true" | "1" => true,
            "false" | "0" => false,
            _ => {
                return Err(Refusal::bad_request(format!(
                    "`all` must be true or false (got `{value}`)"
                )));
            }
        };
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use std::sync::Mutex;
    use std::time::{SystemTime, UNIX_EPOCH};

    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::config::{JwtAlgorithm, JwtConfig};

    fn get(path: &str, query: Option<&str>) -> Result<Request, Refusal> {
        route(&Method::GET, path, query, b"")
    }

    fn post(path: &str, body: &str) -> Result<Request, Refusal> {
        route(&Method::POST, path, None, body.as_bytes())
    }

    fn status(r: Result<Request, Refusal>) -> StatusCode {
        r.expect_err("a refusal").status
    }

    #[test]
    fn status_and_lists() {
        assert!(matches!(get("/v1/status", None), Ok(Request::Status)));
        assert!(matches!(
            get("/v1/approvals", None),
            Ok(Request::ApprovalsList { all: false })
        ));
        assert!(matches!(
            get("/v1/approvals", Some("all=true")),
            Ok(Request::ApprovalsList { all: true })
        ));
        assert!(matches!(
            get("/v1/approvals", Some("all")),
            Ok(Request::ApprovalsList { all: true })
        ));
        assert!(matches!(
            get("/v1/grants", Some("all=0")),
            Ok(Request::GrantsList { all: false })
        ));
        assert!(matches!(
            get("/v1/grants", Some("")),
            Ok(Request::GrantsList { all: false })
        ));
    }

    #[test]
    fn bad_query_parameters_are_400() {
        assert_eq!(
            status(get("/v1/approvals", Some("all=maybe"))),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(get("/v1/grants", Some("limit=5"))),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(get("/v1/status", Some("x=1"))),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn approve_with_and_without_a_body() {
        match post("/v1/approvals/42/approve", "") {
            Ok(Request::Approve {
                id: 42,
                sha256: None,
                for_secs: None,
                reason: None,
            }) => {}
            other => panic!("{other:?}"),
        }
        let body = json!({"sha256": "ab12", "for": "30m", "reason": "looks fine"}).to_string();
        match post("/v1/approvals/7/approve", &body) {
            Ok(Request::Approve {
                id: 7,
                sha256: Some(h),
                for_secs: Some(1800),
                reason: Some(r),
            }) => {
                assert_eq!(h, "ab12");
                assert_eq!(r, "looks fine");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn approve_refuses_bad_bodies_and_durations() {
        for body in [
            r#"{"for": "soon"}"#,
            r#"{"for": "10ms"}"#,
            r#"{"for": 30}"#,
            r#"{"sha": "typo"}"#,
            "not json",
            "[]",
        ] {
            assert_eq!(
                status(post("/v1/approvals/1/approve", body)),
                StatusCode::BAD_REQUEST,
                "{body}"
            );
        }
    }

    #[test]
    fn deny_needs_a_reason() {
        match post("/v1/approvals/3/deny", r#"{"reason": "no"}"#) {
            Ok(Request::Deny { id: 3, reason }) => assert_eq!(reason, "no"),
            other => panic!("{other:?}"),
        }
        for body in ["", "{}", r#"{"reason": ""}"#, r#"{"reason": "  "}"#] {
            assert_eq!(
                status(post("/v1/approvals/3/deny", body)),
                StatusCode::BAD_REQUEST,
                "{body}"
            );
        }
    }

    #[test]
    fn ids_are_decimal_numbers() {
        for path in [
            "/v1/approvals/abc/approve",
            "/v1/approvals/-1/approve",
            "/v1/approvals/+1/approve",
            "/v1/approvals//approve",
            "/v1/approvals/99999999999999999999999/approve",
        ] {
            assert_eq!(status(post(path, "")), StatusCode::BAD_REQUEST, "{path}");
        }
    }

    #[test]
    fn grant_and_revoke() {
        let body = json!({"agent": "bot", "role": "dba", "for": "1h 30m"}).to_string();
        match post("/v1/grants", &body) {
            Ok(Request::Grant {
                agent,
                role,
                for_secs: 5400,
                reason: None,
            }) => assert_eq!((agent.as_str(), role.as_str()), ("bot", "dba")),
            other => panic!("{other:?}"),
        }
        for body in [
            "",
            r#"{"agent": "bot", "role": "dba"}"#,
            r#"{"agent": "bot", "role": "dba", "for": "0s"}"#,
        ] {
            assert_eq!(
                status(post("/v1/grants", body)),
                StatusCode::BAD_REQUEST,
                "{body}"
            );
        }
        assert!(matches!(
            route(&Method::DELETE, "/v1/grants/9", None, b""),
            Ok(Request::Revoke {
                id: 9,
                reason: None
            })
        ));
        match route(
            &Method::DELETE,
            "/v1/grants/9",
            None,
            br#"{"reason":"done"}"#,
        ) {
            Ok(Request::Revoke {
                id: 9,
                reason: Some(r),
            }) => assert_eq!(r, "done"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_routes_are_404_and_wrong_methods_405() {
        for path in [
            "/",
            "/v1",
            "/v1/",
            "/v2/status",
            "/v1/status/",
            "/v1/approvals/1",
            "/v1/approvals/1/maybe",
            "/v1/grants/1/extra",
            "/v1/watch",
        ] {
            assert_eq!(status(get(path, None)), StatusCode::NOT_FOUND, "{path}");
        }
        let r = route(&Method::POST, "/v1/status", None, b"").unwrap_err();
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.allow, Some("GET"));
        let r = route(&Method::DELETE, "/v1/grants", None, b"").unwrap_err();
        assert_eq!(r.allow, Some("GET, POST"));
        let r = route(&Method::GET, "/v1/approvals/1/approve", None, b"").unwrap_err();
        assert_eq!(r.allow, Some("POST"));
        let r = route(&Method::GET, "/v1/grants/1", None, b"").unwrap_err();
        assert_eq!(r.allow, Some("DELETE"));
    }

    #[test]
    fn status_codes_follow_the_error_kind() {
        assert_eq!(status_of(&Response::ok()), StatusCode::OK);
        for (kind, code) in [
            (ErrorKind::BadRequest, 400),
            (ErrorKind::Forbidden, 403),
            (ErrorKind::NotFound, 404),
            (ErrorKind::Conflict, 409),
            (ErrorKind::Internal, 500),
        ] {
            assert_eq!(status_of(&Response::refused(kind, "x")).as_u16(), code);
        }
    }

    #[test]
    fn bearer_header_parsing() {
        let headers = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            }
            h
        };
        assert_eq!(
            bearer(&headers(&["Bearer abc.def.ghi"])).unwrap(),
            "abc.def.ghi"
        );
        assert_eq!(bearer(&headers(&["bearer  abc"])).unwrap(), "abc");
        assert!(matches!(bearer(&headers(&[])), Err(JwtError::MissingToken)));
        assert!(matches!(
            bearer(&headers(&["Bearer "])),
            Err(JwtError::MissingToken)
        ));
        assert!(matches!(
            bearer(&headers(&["Basic YWxpY2U6cHc="])),
            Err(JwtError::Malformed(_))
        ));
        assert!(matches!(
            bearer(&headers(&["Bearer a", "Bearer b"])),
            Err(JwtError::Malformed(_))
        ));
    }

    // The HTTP layer over a real socket, with a stand-in for the daemon.

    const SECRET: &[u8] = b"test-only-http-secret-0123456789abcdef";

    #[derive(Default)]
    struct Recorder {
        seen: Mutex<Vec<(Caller, String)>>,
    }

    impl Dispatch for Recorder {
        async fn dispatch(&self, caller: Caller, req: Request) -> Response {
            let cmd = serde_json::to_value(&req).unwrap()["cmd"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            self.seen.lock().unwrap().push((caller, cmd.clone()));
            match req {
                Request::Revoke { id: 404, .. } => {
                    Response::refused(ErrorKind::NotFound, "no such grant")
                }
                _ => Response::data(json!({"cmd": cmd})),
            }
        }
    }

    struct Server {
        addr: SocketAddr,
        recorder: Arc<Recorder>,
        _dir: TempDir,
    }

    struct TempDir(std::path::PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[tokio::test]
    async fn a_response_the_client_never_reads_fails_after_the_stall_limit() {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut w = StallLimit::new(server, Duration::from_millis(200));
        let chunk = vec![0u8; 64 * 1024];
        let began = std::time::Instant::now();
        let err = loop {
            if let Err(e) = w.write_all(&chunk).await {
                break e;
            }
            assert!(
                began.elapsed() < Duration::from_secs(30),
                "writes to a client that reads nothing never failed"
            );
        };
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        drop(client);
    }

    async fn server() -> Server {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "agentgate-http-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, SECRET).unwrap();
        let verifier = Verifier::from_config(&JwtConfig {
            algorithm: JwtAlgorithm::HS256,
            secret_file: Some(secret),
            public_key_file: None,
            jwks_file: None,
            issuer: None,
            audience: None,
            leeway_secs: 0,
        })
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let recorder = Arc::new(Recorder::default());
        tokio::spawn(serve_with(listener, Arc::new(verifier), recorder.clone()));
        Server {
            addr,
            recorder,
            _dir: TempDir(dir),
        }
    }

    fn token(secret: &[u8], exp_offset: i64) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            .cast_signed();
        jsonwebtoken::encode(
            &Header::default(),
            &json!({"sub": "ops@example", "exp": now + exp_offset}),
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    /// Sends one raw HTTP/1.1 request (`Connection: close`) and returns status, head and body.
    async fn send(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, String, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "{head}\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let code = head.split(' ').nth(1).unwrap().parse().unwrap();
        (code, head.to_string(), body.to_string())
    }

    #[tokio::test]
    async fn requests_without_a_valid_token_are_401() {
        let srv = server().await;
        let (code, head, body) = send(srv.addr, "GET /v1/status HTTP/1.1", b"").await;
        assert_eq!(code, 401);
        assert!(
            head.contains("www-authenticate: Bearer realm=\"agentgate\""),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"], "missing bearer token");

        let wrong = token(b"some-other-secret-that-is-long-enough", 300);
        let expired = token(SECRET, -300);
        for (t, why) in [(wrong, "bad token signature"), (expired, "token expired")] {
            let head_line = format!("GET /v1/status HTTP/1.1\r\nAuthorization: Bearer {t}");
            let (code, head, body) = send(srv.addr, &head_line, b"").await;
            assert_eq!(code, 401);
            assert!(head.contains(r#"error="invalid_token""#), "{head}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["error"], why);
        }
        // Unknown routes are not revealed to unauthenticated callers.
        let (code, _, _) = send(srv.addr, "GET /nowhere HTTP/1.1", b"").await;
        assert_eq!(code, 401);
        assert!(srv.recorder.seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn authenticated_requests_reach_dispatch_as_the_subject() {
        let srv = server().await;
        let auth = format!("Authorization: Bearer {}", token(SECRET, 300));
        let (code, head, body) =
            send(srv.addr, &format!("GET /v1/status HTTP/1.1\r\n{auth}"), b"").await;
        assert_eq!(code, 200, "{body}");
        assert!(head.contains("content-type: application/json"), "{head}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["data"]["cmd"], "status");

        let grant = json!({"agent": "bot", "role": "dba", "for": "5m"}).to_string();
        let (code, _, _) = send(
            srv.addr,
            &format!("POST /v1/grants HTTP/1.1\r\n{auth}\r\nContent-Type: application/json"),
            grant.as_bytes(),
        )
        .await;
        assert_eq!(code, 200);
        let (code, _, body) = send(
            srv.addr,
            &format!("DELETE /v1/grants/404 HTTP/1.1\r\n{auth}"),
            b"",
        )
        .await;
        assert_eq!(code, 404, "{body}");
        let (code, head, _) =
            send(srv.addr, &format!("PUT /v1/status HTTP/1.1\r\n{auth}"), b"").await;
        assert_eq!(code, 405);
        assert!(head.contains("allow: GET"), "{head}");
        let (code, _, _) = send(
            srv.addr,
            &format!("GET /v1/nothing HTTP/1.1\r\n{auth}"),
            b"",
        )
        .await;
        assert_eq!(code, 404);

        let seen = srv.recorder.seen.lock().unwrap().clone();
        let subject = Caller::Http {
            subject: "ops@example".into(),
        };
        assert_eq!(
            seen,
            vec![
                (subject.clone(), "status".to_string()),
                (subject.clone(), "grant".to_string()),
                (subject, "revoke".to_string()),
            ]
        );
    }

    #[tokio::test]
    async fn oversized_bodies_are_413() {
        let srv = server().await;
        let auth = format!("Authorization: Bearer {}", token(SECRET, 300));
        let body = vec![b' '; MAX_BODY + 1];
        let (code, _, _) = send(
            srv.addr,
            &format!("POST /v1/grants HTTP/1.1\r\n{auth}"),
            &body,
        )
        .await;
        assert_eq!(code, 413);

        // Chunked, without a Content-Length: the limit applies while reading.
        let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
        let head = format!(
            "POST /v1/grants HTTP/1.1\r\nHost: localhost\r\n{auth}\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b' '; 16 * 1024];
        let mut reply = Vec::new();
        for _ in 0..5 {
            let framed = [
                format!("{:x}\r\n", chunk.len()).into_bytes(),
                chunk.clone(),
                b"\r\n".to_vec(),
            ]
            .concat();
            if s.write_all(&framed).await.is_err() {
                break;
            }
        }
        let _ = s.write_all(b"0\r\n\r\n").await;
        let _ = s.read_to_end(&mut reply).await;
        let text = String::from_utf8_lossy(&reply);
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
        assert!(srv.recorder.seen.lock().unwrap().is_empty());
    }
}
