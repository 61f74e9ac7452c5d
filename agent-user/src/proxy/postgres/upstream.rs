//! Opening an authenticated upstream connection with brokered credentials: TCP (marked), the
//! target's TLS mode, StartupMessage, the server's authentication exchange (trust, cleartext,
//! md5, SCRAM-SHA-256) answered with the target's password, then everything up to the first
//! ReadyForQuery. The password lives only in this function's locals and the auth state machine
//! (whose Debug output redacts it); it never reaches the agent, the logs or the session store.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::super::Gate;
use super::super::pgtls::UpstreamStream;
use super::{PgError, PgTarget};
use crate::protocol::postgres::{
    AuthStep, BackendDecoder, BackendMessage, DecodeError, Frame, FrontendDecoder, FrontendMessage,
    UpstreamAuth,
};

/// An authenticated upstream connection, ready for queries.
pub struct Upstream {
    pub stream: UpstreamStream,
    pub buf: BytesMut,
    pub decoder: BackendDecoder,
    /// ParameterStatus (and any NoticeResponse) frames received during start-up, to replay to
    /// the agent.
    pub startup_frames: Vec<Frame<BackendMessage>>,
    /// The server's cancel key.
    pub key: Option<(i32, Bytes)>,
    /// The first ReadyForQuery.
    pub ready: Frame<BackendMessage>,
}

/// Reads until `decode` yields a frame; `Ok(None)` on a clean EOF between frames.
async fn read_frame<R: AsyncRead + Unpin, M>(
    r: &mut R,
    buf: &mut BytesMut,
    mut decode: impl FnMut(&mut BytesMut) -> Result<Option<Frame<M>>, DecodeError>,
) -> Result<Option<Frame<M>>, PgError> {
    loop {
        if let Some(f) = decode(buf)? {
            return Ok(Some(f));
        }
        if r.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(PgError::Decode(DecodeError::Truncated { message: "frame" }))
            };
        }
    }
}

pub async fn read_backend<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    dec: &mut BackendDecoder,
) -> Result<Option<Frame<BackendMessage>>, PgError> {
    read_frame(r, buf, |b| dec.decode(b)).await
}

pub async fn read_frontend<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    dec: &mut FrontendDecoder,
) -> Result<Option<Frame<FrontendMessage>>, PgError> {
    read_frame(r, buf, |b| dec.decode(b)).await
}

/// Startup parameters never passed upstream as the agent sent them: the user is brokered, a
/// replication connection would bypass statement-level judgement, and the client encoding is
/// always UTF8 (the gate reads statements as UTF-8; see [`STARTUP_SETTINGS`]).
const WITHHELD: [&str; 4] = ["user", "database", "replication", "client_encoding"];

/// Server settings an agent may give in its start-up packet. Any setting can be given there,
/// and some change how the server reads the statements the gate judged or what their names
/// mean: `client_encoding` (in SJIS or BIG5 a multibyte character can swallow a backslash or a
/// quote, so the server would see statements the gate never read), `search_path`,
/// `standard_conforming_strings`, `role`, and `options` carrying any of them as `-c`. Only these
/// pass; an agent changes other settings with SET, which policy judges.
pub const STARTUP_SETTINGS: [&str; 8] = [
    "application_name",
    "datestyle",
    "timezone",
    "intervalstyle",
    "extra_float_digits",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
];

/// Why the agent's start-up parameters are refused, if they are.
pub fn refused_startup(agent_params: &[(String, String)]) -> Option<String> {
    agent_params.iter().find_map(|(k, _)| {
        let key = k.to_ascii_lowercase();
        if key == "replication" {
            return Some("agentgate: replication connections are not allowed through the gate".into());
        }
        if matches!(key.as_str(), "user" | "database" | "client_encoding")
            || STARTUP_SETTINGS.contains(&key.as_str())
        {
            return None;
        }
        Some(format!(
            "agentgate: start-up parameter `{k}` is not accepted through the gate (it could change how statements are read or which tables their names mean); set it with SET, which policy judges"
        ))
    })
}

/// The database a session of `agent_params` opens upstream: the target's own, else the one the
/// agent asked for, else the brokered user's.
pub fn database_of(
    creds: &crate::config::CredentialsConfig,
    agent_params: &[(String, String)],
) -> String {
    creds
        .database
        .clone()
        .or_else(|| {
            agent_params
                .iter()
                .find(|(k, _)| k == "database")
                .map(|(_, v)| v.clone())
        })
        .unwrap_or_else(|| creds.user.clone())
}

pub async fn open(
    gate: &Gate,
    target: &PgTarget,
    agent_params: &[(String, String)],
) -> Result<Upstream, PgError> {
    let creds = &target.credentials;
    let password = creds.password().map_err(PgError::Credentials)?;
    let mut params = vec![
        ("user".to_string(), creds.user.clone()),
        ("database".to_string(), database_of(creds, agent_params)),
        ("client_encoding".to_string(), "UTF8".to_string()),
    ];
    params.extend(
        agent_params
            .iter()
            .filter(|(k, _)| !WITHHELD.iter().any(|w| k.eq_ignore_ascii_case(w)))
            .cloned(),
    );

    let tcp = gate
        .connect_upstream(target.upstream)
        .await
        .map_err(PgError::Upstream)?;
    let mut stream = target
        .tls
        .wrap(tcp)
        .await
        .map_err(|e| PgError::Tls(e.to_string()))?;
    let mut out = BytesMut::new();
    FrontendMessage::startup(params).encode(&mut out)?;
    stream.write_all(&out).await?;

    let mut auth = UpstreamAuth::new(&creds.user, password.as_deref());
    drop(password);
    let mut buf = BytesMut::with_capacity(8192);
    let mut decoder = BackendDecoder::new(target.max_frame);
    let mut startup_frames = Vec::new();
    let mut key = None;
    loop {
        let Some(frame) = read_backend(&mut stream, &mut buf, &mut decoder).await? else {
            return Err(PgError::UpstreamClosed);
        };
        match &frame.msg {
            BackendMessage::Authentication(a) => match auth
                .on_message(a)
                .map_err(|e| PgError::Auth(e.to_string()))?
            {
                AuthStep::Send(msg) => {
                    out.clear();
                    msg.encode(&mut out)?;
                    stream.write_all(&out).await?;
                }
                AuthStep::Wait | AuthStep::Done => {}
            },
            BackendMessage::ErrorResponse(e) => {
                return Err(PgError::UpstreamRefused(
                    e.message().unwrap_or("error").to_string(),
                ));
            }
            BackendMessage::BackendKeyData {
                process_id,
                secret_key,
            } => {
                key = Some((*process_id, secret_key.clone()));
            }
            BackendMessage::ParameterStatus { .. } | BackendMessage::NoticeResponse(_) => {
                startup_frames.push(frame);
            }
            BackendMessage::NegotiateProtocolVersion { .. } => {}
            BackendMessage::ReadyForQuery { .. } => {
                if !auth.is_done() {
                    return Err(PgError::Auth(
                        "server became ready before authentication finished".into(),
                    ));
                }
                return Ok(Upstream {
                    stream,
                    buf,
                    decoder,
                    startup_frames,
                    key,
                    ready: frame,
                });
            }
            other => {
                return Err(PgError::Protocol(format!(
                    "unexpected {} during upstream start-up",
                    other.name()
                )));
            }
        }
    }
}
