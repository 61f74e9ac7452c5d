//! PostgreSQL targets: the agent gets the database it would get directly, except that every
//! statement is judged by policy, results are masked, the gate holds the credentials and every
//! statement is recorded.
//!
//! Start-up: the agent's SSLRequest/GSSENCRequest are answered `N` (the agent-to-gate leg is
//! local), its authentication is answered by the gate itself (any password, or none, is
//! accepted: the agent's identity is its cgroup), the upstream is opened with brokered
//! credentials ([`upstream`]), and the agent receives the server's parameters with a cancel key
//! minted by the gate ([`cancel`]). Then [`flow`] runs the two directions.

pub mod cancel;
pub mod catalog;
pub(crate) mod flow;
pub mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::pgtls::UpstreamTls;
use super::{Gate, Peer};
use crate::approval::Approvals;
use crate::config::{Config, CredentialsConfig, Protocol};
use crate::mask::Masker;
use crate::policy::{PolicySet, Subject};
use crate::protocol::postgres::{
    Authentication, BackendMessage, DecodeError, EncodeError, ErrorFields, FrontendDecoder,
    FrontendMessage,
};
use crate::session::Event;

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("protocol: {0}")]
    Decode(#[from] DecodeError),
    #[error("encoding: {0}")]
    Encode(#[from] EncodeError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("upstream connect: {0}")]
    Upstream(std::io::Error),
    #[error("upstream TLS: {0}")]
    Tls(String),
    #[error("upstream authentication: {0}")]
    Auth(String),
    #[error("upstream refused the connection: {0}")]
    UpstreamRefused(String),
    #[error("upstream closed the connection")]
    UpstreamClosed,
    #[error("credentials: {0}")]
    Credentials(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("masking: {0}")]
    Mask(#[from] crate::mask::MaskError),
    #[error("{0}")]
    Store(#[from] crate::session::WriterStopped),
    /// A bound of this connection (`max_kept_bytes`, messages in flight) would be passed.
    #[error("{0}")]
    Limit(String),
}

impl PgError {
    /// The SQLSTATE of the FATAL error the agent is sent when the gate itself ends its
    /// connection: invalid or out-of-step input, a bound passed, a store that cannot record.
    /// These messages are the gate's own, naming no data. I/O and upstream failures end it
    /// without one (the socket is gone, or the server sent its own).
    pub fn sqlstate_for_agent(&self) -> Option<&'static str> {
        match self {
            PgError::Limit(_) => Some("54000"),
            PgError::Store(_) => Some("58000"),
            PgError::Decode(_) | PgError::Protocol(_) => Some("08P01"),
            _ => None,
        }
    }
}

/// How long a connection's last words (a FATAL error) may take to write.
const FATAL_WRITE_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Everything PostgreSQL connections share, built once at daemon start.
pub struct Shared {
    pub policies: PolicySet,
    pub approvals: Arc<Approvals>,
    pub masker: Option<Masker>,
    pub tls: HashMap<String, UpstreamTls>,
    pub cancel: cancel::CancelRegistry,
    pub catalog: catalog::Catalog,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{0}")]
    Policy(#[from] crate::policy::PolicyError),
    #[error("masking key: {0}")]
    MaskKey(String),
    #[error("masking: {0}")]
    Mask(#[from] crate::mask::MaskError),
    #[error("target {target}: TLS: {reason}")]
    Tls { target: String, reason: String },
}

impl Shared {
    /// `None` when no target speaks PostgreSQL.
    pub fn build(cfg: &Config, approvals: Arc<Approvals>) -> Result<Option<Shared>, SetupError> {
        if !cfg.targets.iter().any(|t| t.protocol == Protocol::Postgres) {
            return Ok(None);
        }
        let policies = crate::policy::compile(cfg.policies.clone())?;
        let masker = match &cfg.masking {
            Some(m) => {
                let key = match m.key_source() {
                    Some(crate::mask::KeySource::Env(var)) => {
                        std::env::var(&var).map(String::into_bytes).map_err(|_| {
                            SetupError::MaskKey(format!("environment variable {var} is not set"))
                        })?
                    }
                    Some(crate::mask::KeySource::File(path)) => std::fs::read(&path)
                        .map_err(|e| SetupError::MaskKey(format!("{}: {e}", path.display())))?,
                    None => Vec::new(),
                };
                Some(Masker::new(m, key)?)
            }
            None => None,
        };
        let mut tls = HashMap::new();
        for t in cfg
            .targets
            .iter()
            .filter(|t| t.protocol == Protocol::Postgres)
        {
            let default_name = t.upstream.map(|a| a.ip().to_string()).unwrap_or_else(|| {
                t.destinations
                    .first()
                    .map(|d| d.net.addr().to_string())
                    .unwrap_or_default()
            });
            let name = t.server_name.clone().unwrap_or(default_name);
            let u = UpstreamTls::new(t.tls, t.ca_file.as_deref(), &name).map_err(|e| {
                SetupError::Tls {
                    target: t.name.clone(),
                    reason: e.to_string(),
                }
            })?;
            tls.insert(t.name.clone(), u);
        }
        Ok(Some(Shared {
            policies,
            approvals,
            masker,
            tls,
            cancel: cancel::CancelRegistry::default(),
            catalog: catalog::Catalog::default(),
        }))
    }
}

/// One connection's view of its target.
pub struct PgTarget {
    pub name: String,
    pub upstream: SocketAddr,
    pub credentials: CredentialsConfig,
    pub tls: UpstreamTls,
    pub max_frame: usize,
    pub record_rows: usize,
    pub max_kept_bytes: usize,
    pub max_statements: usize,
    pub max_query_bytes: usize,
}

enum Startup {
    Params(Vec<(String, String)>),
    Cancel { process_id: i32, secret_key: Bytes },
    Closed,
}

async fn read_startup(
    client: &mut TcpStream,
    buf: &mut BytesMut,
    max_frame: usize,
) -> Result<Startup, PgError> {
    let mut dec = FrontendDecoder::new(max_frame);
    loop {
        let Some(frame) = upstream::read_frontend(client, buf, &mut dec).await? else {
            return Ok(Startup::Closed);
        };
        match frame.msg {
            FrontendMessage::SSLRequest | FrontendMessage::GSSENCRequest => {
                client.write_all(b"N").await?
            }
            FrontendMessage::CancelRequest {
                process_id,
                secret_key,
            } => {
                return Ok(Startup::Cancel {
                    process_id,
                    secret_key,
                });
            }
            FrontendMessage::StartupMessage { params, .. } => return Ok(Startup::Params(params)),
            other => {
                return Err(PgError::Protocol(format!(
                    "unexpected {} before start-up",
                    other.name()
                )));
            }
        }
    }
}

/// Sends the agent a FATAL ErrorResponse and closes the sending side. An agent that does not
/// read gets [`FATAL_WRITE_LIMIT`] to take it, no more.
pub(super) async fn fatal<W: tokio::io::AsyncWrite + Unpin>(
    client: &mut W,
    sqlstate: &str,
    message: &str,
) {
    let mut out = BytesMut::new();
    if BackendMessage::ErrorResponse(ErrorFields::fatal(sqlstate, message))
        .encode(&mut out)
        .is_ok()
    {
        let _ = tokio::time::timeout(FATAL_WRITE_LIMIT, client.write_all(&out)).await;
    }
    let _ = tokio::time::timeout(FATAL_WRITE_LIMIT, client.shutdown()).await;
}

pub async fn handle(gate: &Gate, mut client: TcpStream, peer: Peer) {
    let (Some(shared), Some(target_cfg)) = (gate.postgres.as_ref(), peer.target.as_ref()) else {
        return;
    };
    let Some(credentials) = target_cfg.credentials.clone() else {
        return;
    };
    let Some(tls) = shared.tls.get(&target_cfg.name).cloned() else {
        return;
    };
    let target = PgTarget {
        name: target_cfg.name.clone(),
        upstream: peer.upstream(),
        credentials,
        tls,
        max_frame: target_cfg.max_frame_bytes,
        record_rows: target_cfg.record_rows,
        max_kept_bytes: target_cfg.max_kept_bytes,
        max_statements: target_cfg.max_statements_per_query,
        max_query_bytes: target_cfg.max_query_bytes,
    };
    let mut cbuf = BytesMut::with_capacity(8192);
    let params = match read_startup(&mut client, &mut cbuf, target.max_frame).await {
        Ok(Startup::Params(p)) => p,
        Ok(Startup::Cancel {
            process_id,
            secret_key,
        }) => {
            let result = cancel::forward(gate, &peer.agent, process_id, secret_key).await;
            let _ = gate.store.event(Event {
                kind: "cancel_request".into(),
                agent: Some(peer.agent.clone()),
                pid: Some(peer.process.pid),
                destination: Some(peer.original_destination.to_string()),
                detail: serde_json::json!({ "forwarded": result.is_ok(), "error": result.err() }),
                ..Default::default()
            });
            return;
        }
        Ok(Startup::Closed) => return,
        Err(e) => {
            tracing::warn!(agent = %peer.agent, error = %e, "postgres start-up failed");
            fatal(&mut client, "08P01", &format!("agentgate: {e}")).await;
            return;
        }
    };
    if let Some(message) = upstream::refused_startup(&params) {
        let sid = gate
            .store
            .start(peer.session_start("deny", Some(message.clone())));
        fatal(&mut client, "42501", &message).await;
        if let Ok(id) = sid {
            let _ = gate.store.end(peer.share, id, 0, 0, None);
        }
        return;
    }
    let subject = Subject {
        agent: &peer.agent,
        roles: &peer.roles,
    };
    if shared
        .policies
        .applicable_policy(&subject, &target.name)
        .is_none()
    {
        let msg = format!(
            "agentgate: no policy grants agent `{}` access to target `{}`",
            peer.agent, target.name
        );
        let sid = gate
            .store
            .start(peer.session_start("deny", Some(msg.clone())));
        fatal(&mut client, "42501", &msg).await;
        if let Ok(id) = sid {
            let _ = gate.store.end(peer.share, id, 0, 0, None);
        }
        return;
    }

    let session_id = match gate.store.start(peer.session_start("allow", None)) {
        Ok(id) => id,
        Err(e) => {
            tracing::error!(error = %e, "cannot record session; closing");
            fatal(&mut client, "58000", "agentgate: session store unavailable").await;
            return;
        }
    };
    let up = match upstream::open(gate, &target, &params).await {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(session = session_id, agent = %peer.agent, error = %e, "upstream start-up failed");
            let code = if matches!(e, PgError::UpstreamRefused(_) | PgError::Auth(_)) {
                "28000"
            } else {
                "08001"
            };
            fatal(&mut client, code, &format!("agentgate: {e}")).await;
            let _ = gate
                .store
                .end(peer.share, session_id, 0, 0, Some(e.to_string()));
            return;
        }
    };

    // The agent's own authentication is answered here: its identity is its cgroup.
    let minted = up.key.clone().and_then(|(pid, secret)| {
        shared
            .cancel
            .mint(cancel::CancelTarget {
                agent: peer.agent.clone(),
                session_id,
                upstream: target.upstream,
                tls: target.tls.clone(),
                process_id: pid,
                secret_key: secret,
            })
            .ok()
    });
    let mut hello = BytesMut::new();
    let mut greet = || -> Result<(), EncodeError> {
        BackendMessage::Authentication(Authentication::Ok).encode(&mut hello)?;
        for f in &up.startup_frames {
            hello.extend_from_slice(&f.raw);
        }
        if let Some((pid, secret)) = &minted {
            BackendMessage::BackendKeyData {
                process_id: *pid,
                secret_key: secret.clone(),
            }
            .encode(&mut hello)?;
        }
        hello.extend_from_slice(&up.ready.raw);
        Ok(())
    };
    if let Err(e) = greet() {
        let _ = gate
            .store
            .end(peer.share, session_id, 0, 0, Some(e.to_string()));
        return;
    }
    if let Err(e) = client.write_all(&hello).await {
        let _ = gate
            .store
            .end(peer.share, session_id, 0, 0, Some(e.to_string()));
        return;
    }
    let database = upstream::database_of(&target.credentials, &params);
    let standard_strings = up
        .startup_frames
        .iter()
        .find_map(|f| match &f.msg {
            BackendMessage::ParameterStatus { name, value }
                if name == "standard_conforming_strings" =>
            {
                Some(value == "on")
            }
            _ => None,
        })
        .unwrap_or(true);

    let ctx = flow::Context {
        gate,
        shared,
        peer: &peer,
        target: &target,
        session_id,
        database,
        standard_strings,
    };
    let (up_bytes, down_bytes, error) = flow::run(&ctx, client, cbuf, up).await;
    if let Some(e) = &error {
        // Invalid input from either side ends the session; say why.
        tracing::warn!(session = session_id, agent = %peer.agent, error = %e, "postgres session closed");
    }
    if let Some(key) = &minted {
        shared.cancel.remove(key);
    }
    let _ = gate
        .store
        .end(peer.share, session_id, up_bytes, down_bytes, error);
}
