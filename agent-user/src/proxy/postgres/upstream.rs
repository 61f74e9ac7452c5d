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

/// Startup parameters never passed upstream as the agent sent them: the user is brokered,
/// and a replication connection would bypass statement-level judgement.
const WITHHELD: [&str; 3] = ["user", "database", "replication"];

pub async fn open(
    gate: &Gate,
    target: &PgTarget,
    agent_params: &[(String, String)],
) -> Result<Upstream, PgError> {
    let creds = &target.credentials;
    let password = creds.password().map_err(PgError::Credentials)?;
    let database = creds
        .database
        .clone()
        .or_else(|| {
            agent_params
                .iter()
                .find(|(k, _)| k == "database")
                .map(|(_, v)| v.clone())
        })
        .unwrap_or_else(|| creds.user.clone());
    let mut params = vec![
        ("user".to_string(), creds.user.clone()),
        ("database".to_string(), database),
    ];
    params.extend(
        agent_params
            .iter()
            .filter(|(k, _)| !WITHHELD.contains(&k.as_str()))
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
