//! Frontend (client -> server) messages of protocol 3.0: the untagged
//! startup-phase packets, the tagged messages of the normal phase, their
//! decoder and their encoder, and parsers for the auth-dependent contents of
//! the `'p'` message. It does not decide what a message means for policy and
//! does no I/O; backend messages live in `backend.rs`.
//!
//! Formats: <https://www.postgresql.org/docs/15/protocol-message-formats.html>;
//! phases: <https://www.postgresql.org/docs/15/protocol-flow.html>.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

use super::error::{DecodeError, EncodeError};
use super::wire::{
    LEN_SIZE, Reader, TAGGED_HEADER_SIZE, put_count16, put_cstr, put_cstr_bytes, put_nullable,
    split_tagged, split_untagged, write_frame,
};
use super::{DEFAULT_MAX_FRAME_LEN, Frame};

pub const BIND: u8 = b'B';
pub const CLOSE: u8 = b'C';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const COPY_FAIL: u8 = b'f';
pub const DESCRIBE: u8 = b'D';
pub const EXECUTE: u8 = b'E';
pub const FLUSH: u8 = b'H';
pub const FUNCTION_CALL: u8 = b'F';
pub const PARSE: u8 = b'P';
/// Shared by PasswordMessage, GSSResponse, SASLInitialResponse and SASLResponse.
pub const PASSWORD_MESSAGE: u8 = b'p';
pub const QUERY: u8 = b'Q';
pub const SYNC: u8 = b'S';
pub const TERMINATE: u8 = b'X';

/// Protocol version 3.0 as sent in a StartupMessage (major 3 in the high 16 bits).
pub const PROTOCOL_VERSION_3_0: i32 = 196_608;
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;

/// Major version reserved for the special request codes above (1234.5678 ...).
const REQUEST_CODE_MAJOR: u16 = 1234;
const PROTOCOL_MAJOR_3: u16 = 3;

/// The server's own cap on startup packets (`MAX_STARTUP_PACKET_LENGTH`); a
/// longer one is rejected whatever the configured frame cap.
pub const MAX_STARTUP_PACKET_LEN: usize = 10_000;
/// Length word plus request code.
const MIN_STARTUP_PACKET_LEN: usize = 8;

/// Protocol 3.0 cancel keys are 4 bytes; protocol 3.2 allows up to 256.
const MIN_SECRET_KEY_LEN: usize = 4;
pub const MAX_SECRET_KEY_LEN: usize = 256;

/// Single-byte answers to SSLRequest / GSSENCRequest (not framed).
pub const ENCRYPTION_ACCEPTED_SSL: u8 = b'S';
pub const ENCRYPTION_ACCEPTED_GSS: u8 = b'G';
pub const ENCRYPTION_REFUSED: u8 = b'N';

/// Describe/Close target byte values.
const TARGET_STATEMENT: u8 = b'S';
const TARGET_PORTAL: u8 = b'P';

const STARTUP_PACKET: &str = "startup packet";
const STARTUP_MESSAGE: &str = "StartupMessage";
const SSL_REQUEST: &str = "SSLRequest";
const GSSENC_REQUEST: &str = "GSSENCRequest";
const CANCEL_REQUEST: &str = "CancelRequest";
const SASL_INITIAL_RESPONSE: &str = "SASLInitialResponse";

/// Bytes that may hold a password or a value derived from one. Debug output
/// never shows them, so a message can be logged without leaking credentials.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SensitiveBytes(Bytes);

impl SensitiveBytes {
    pub fn new(bytes: Bytes) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

impl fmt::Debug for SensitiveBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<Bytes> for SensitiveBytes {
    fn from(bytes: Bytes) -> Self {
        Self(bytes)
    }
}

impl AsRef<[u8]> for SensitiveBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// What a Describe or Close refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    Statement,
    Portal,
}

impl Target {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            TARGET_STATEMENT => Some(Self::Statement),
            TARGET_PORTAL => Some(Self::Portal),
            _ => None,
        }
    }

    fn to_byte(self) -> u8 {
        match self {
            Self::Statement => TARGET_STATEMENT,
            Self::Portal => TARGET_PORTAL,
        }
    }
}

/// A message sent by the client (the agent) to the server.
///
/// Strings must be valid UTF-8: the policy engine parses SQL as text, so a
/// proxy should pin `client_encoding` to UTF8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendMessage {
    /// `protocol_version` is major << 16 | minor; 3.0 is [`PROTOCOL_VERSION_3_0`].
    StartupMessage {
        protocol_version: i32,
        params: Vec<(String, String)>,
    },
    SSLRequest,
    GSSENCRequest,
    /// `secret_key` is 4 bytes in protocol 3.0, up to 256 in 3.2.
    CancelRequest {
        process_id: i32,
        secret_key: Bytes,
    },
    Query {
        sql: String,
    },
    Parse {
        name: String,
        query: String,
        param_types: Vec<u32>,
    },
    Bind {
        portal: String,
        statement: String,
        param_formats: Vec<i16>,
        params: Vec<Option<Bytes>>,
        result_formats: Vec<i16>,
    },
    Describe {
        kind: Target,
        name: String,
    },
    Execute {
        portal: String,
        max_rows: i32,
    },
    Close {
        kind: Target,
        name: String,
    },
    Sync,
    Flush,
    CopyData(Bytes),
    CopyDone,
    CopyFail {
        message: String,
    },
    /// The body after the header, undecoded: the fast-path interface is
    /// something to allow or deny as a whole, not to inspect.
    FunctionCall(Bytes),
    Terminate,
    /// Tag `'p'`. Its body is a PasswordMessage, GSSResponse,
    /// SASLInitialResponse or SASLResponse depending on the authentication
    /// exchange in progress; see [`parse_password`],
    /// [`parse_sasl_initial_response`] and [`parse_sasl_response`].
    PasswordMessage(SensitiveBytes),
}

impl FrontendMessage {
    /// The message's name as in the PostgreSQL documentation.
    pub fn name(&self) -> &'static str {
        match self {
            Self::StartupMessage { .. } => STARTUP_MESSAGE,
            Self::SSLRequest => SSL_REQUEST,
            Self::GSSENCRequest => GSSENC_REQUEST,
            Self::CancelRequest { .. } => CANCEL_REQUEST,
            Self::Query { .. } => "Query",
            Self::Parse { .. } => "Parse",
            Self::Bind { .. } => "Bind",
            Self::Describe { .. } => "Describe",
            Self::Execute { .. } => "Execute",
            Self::Close { .. } => "Close",
            Self::Sync => "Sync",
            Self::Flush => "Flush",
            Self::CopyData(_) => "CopyData",
            Self::CopyDone => "CopyDone",
            Self::CopyFail { .. } => "CopyFail",
            Self::FunctionCall(_) => "FunctionCall",
            Self::Terminate => "Terminate",
            Self::PasswordMessage(_) => "PasswordMessage",
        }
    }

    /// The tag byte, or `None` for the untagged startup-phase packets.
    pub fn tag(&self) -> Option<u8> {
        match self {
            Self::StartupMessage { .. }
            | Self::SSLRequest
            | Self::GSSENCRequest
            | Self::CancelRequest { .. } => None,
            Self::Query { .. } => Some(QUERY),
            Self::Parse { .. } => Some(PARSE),
            Self::Bind { .. } => Some(BIND),
            Self::Describe { .. } => Some(DESCRIBE),
            Self::Execute { .. } => Some(EXECUTE),
            Self::Close { .. } => Some(CLOSE),
            Self::Sync => Some(SYNC),
            Self::Flush => Some(FLUSH),
            Self::CopyData(_) => Some(COPY_DATA),
            Self::CopyDone => Some(COPY_DONE),
            Self::CopyFail { .. } => Some(COPY_FAIL),
            Self::FunctionCall(_) => Some(FUNCTION_CALL),
            Self::Terminate => Some(TERMINATE),
            Self::PasswordMessage(_) => Some(PASSWORD_MESSAGE),
        }
    }

    /// A protocol 3.0 StartupMessage with the given parameters (`user` is required
    /// by the server; `database`, `application_name`, ... are optional).
    pub fn startup(params: Vec<(String, String)>) -> Self {
        Self::StartupMessage {
            protocol_version: PROTOCOL_VERSION_3_0,
            params,
        }
    }

    /// A PasswordMessage carrying a cleartext password or an md5 hash string.
    pub fn password(password: &[u8]) -> Result<Self, EncodeError> {
        let mut body = BytesMut::with_capacity(password.len().saturating_add(1));
        put_cstr_bytes(&mut body, password, "PasswordMessage")?;
        Ok(Self::PasswordMessage(SensitiveBytes(body.freeze())))
    }

    /// A SASLInitialResponse; `data` is `None` when the mechanism has no
    /// initial client response (sent as length -1).
    pub fn sasl_initial_response(
        mechanism: &str,
        data: Option<&[u8]>,
    ) -> Result<Self, EncodeError> {
        let mut body = BytesMut::new();
        put_cstr(&mut body, mechanism, SASL_INITIAL_RESPONSE)?;
        put_nullable(&mut body, data, SASL_INITIAL_RESPONSE)?;
        Ok(Self::PasswordMessage(SensitiveBytes(body.freeze())))
    }

    /// A SASLResponse: the mechanism-specific data is the whole body.
    pub fn sasl_response(data: &[u8]) -> Self {
        Self::PasswordMessage(SensitiveBytes(Bytes::copy_from_slice(data)))
    }

    /// Appends the wire form of the message to `dst`. On error `dst` is unchanged.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), EncodeError> {
        let name = self.name();
        let tag = self.tag();
        match self {
            Self::StartupMessage {
                protocol_version,
                params,
            } => write_frame(dst, tag, name, |b| {
                let [major_hi, major_lo, _, _] = protocol_version.to_be_bytes();
                if u16::from_be_bytes([major_hi, major_lo]) != PROTOCOL_MAJOR_3 {
                    return Err(EncodeError::Invalid {
                        message: name,
                        reason: "protocol major version must be 3",
                    });
                }
                b.put_i32(*protocol_version);
                for (key, value) in params {
                    if key.is_empty() {
                        return Err(EncodeError::Invalid {
                            message: name,
                            reason: "an empty parameter name would end the list",
                        });
                    }
                    put_cstr(b, key, name)?;
                    put_cstr(b, value, name)?;
                }
                b.put_u8(0);
                Ok(())
            }),
            Self::SSLRequest => write_frame(dst, tag, name, |b| {
                b.put_i32(SSL_REQUEST_CODE);
                Ok(())
            }),
            Self::GSSENCRequest => write_frame(dst, tag, name, |b| {
                b.put_i32(GSSENC_REQUEST_CODE);
                Ok(())
            }),
            Self::CancelRequest {
                process_id,
                secret_key,
            } => write_frame(dst, tag, name, |b| {
                if !(MIN_SECRET_KEY_LEN..=MAX_SECRET_KEY_LEN).contains(&secret_key.len()) {
                    return Err(EncodeError::Invalid {
                        message: name,
                        reason: "secret key must be 4 to 256 bytes",
                    });
                }
                b.put_i32(CANCEL_REQUEST_CODE);
                b.put_i32(*process_id);
                b.put_slice(secret_key);
                Ok(())
            }),
            Self::Query { sql } => write_frame(dst, tag, name, |b| put_cstr(b, sql, name)),
            Self::Parse {
                name: statement,
                query,
                param_types,
            } => write_frame(dst, tag, name, |b| {
                put_cstr(b, statement, name)?;
                put_cstr(b, query, name)?;
                put_count16(b, param_types.len(), name)?;
                for oid in param_types {
                    b.put_u32(*oid);
                }
                Ok(())
            }),
            Self::Bind {
                portal,
                statement,
                param_formats,
                params,
                result_formats,
            } => write_frame(dst, tag, name, |b| {
                put_cstr(b, portal, name)?;
                put_cstr(b, statement, name)?;
                put_i16_list(b, param_formats, name)?;
                put_count16(b, params.len(), name)?;
                for param in params {
                    put_nullable(b, param.as_deref(), name)?;
                }
                put_i16_list(b, result_formats, name)
            }),
            Self::Describe { kind, name: target } | Self::Close { kind, name: target } => {
                write_frame(dst, tag, name, |b| {
                    b.put_u8(kind.to_byte());
                    put_cstr(b, target, name)
                })
            }
            Self::Execute { portal, max_rows } => write_frame(dst, tag, name, |b| {
                put_cstr(b, portal, name)?;
                b.put_i32(*max_rows);
                Ok(())
            }),
            Self::CopyFail { message } => {
                write_frame(dst, tag, name, |b| put_cstr(b, message, name))
            }
            Self::CopyData(body) | Self::FunctionCall(body) => write_frame(dst, tag, name, |b| {
                b.put_slice(body);
                Ok(())
            }),
            Self::PasswordMessage(body) => write_frame(dst, tag, name, |b| {
                b.put_slice(body.as_bytes());
                Ok(())
            }),
            Self::Sync | Self::Flush | Self::CopyDone | Self::Terminate => {
                write_frame(dst, tag, name, |_| Ok(()))
            }
        }
    }

    /// Encodes into a fresh buffer.
    pub fn to_bytes(&self) -> Result<Bytes, EncodeError> {
        let mut buf = BytesMut::new();
        self.encode(&mut buf)?;
        Ok(buf.freeze())
    }
}

impl Frame<FrontendMessage> {
    /// Builds a frame for a synthesized message, encoding it once.
    pub fn from_message(msg: FrontendMessage) -> Result<Self, EncodeError> {
        let raw = msg.to_bytes()?;
        Ok(Self { msg, raw })
    }
}

fn put_i16_list(
    dst: &mut BytesMut,
    list: &[i16],
    message: &'static str,
) -> Result<(), EncodeError> {
    put_count16(dst, list.len(), message)?;
    for value in list {
        dst.put_i16(*value);
    }
    Ok(())
}

/// Which kind of packet the client sends next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Untagged packets: StartupMessage, SSLRequest, GSSENCRequest, CancelRequest.
    Startup,
    /// Tagged messages, after the StartupMessage.
    Tagged,
}

/// Incremental decoder for the client side of a connection.
///
/// Starts in [`Phase::Startup`] and switches to [`Phase::Tagged`] after a
/// StartupMessage. SSLRequest and GSSENCRequest keep it in the startup phase
/// because the client follows the server's one-byte answer with another
/// startup packet. A proxy that answers `'S'` and switches to TLS must first
/// check that `src` is empty: bytes pipelined after SSLRequest were sent in
/// cleartext and must not be treated as part of the encrypted session
/// (CVE-2021-23214).
#[derive(Debug, Clone)]
pub struct FrontendDecoder {
    /// Largest accepted value of a tagged frame's length word. Startup
    /// packets are additionally capped at [`MAX_STARTUP_PACKET_LEN`].
    pub max_frame_len: usize,
    phase: Phase,
}

impl Default for FrontendDecoder {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME_LEN)
    }
}

impl FrontendDecoder {
    /// A decoder for a new connection, in the startup phase.
    pub fn new(max_frame_len: usize) -> Self {
        Self {
            max_frame_len,
            phase: Phase::Startup,
        }
    }

    /// A decoder for a stream whose startup phase was handled elsewhere.
    pub fn tagged(max_frame_len: usize) -> Self {
        Self {
            max_frame_len,
            phase: Phase::Tagged,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Decodes the next complete message from `src`.
    ///
    /// `Ok(None)`: more bytes are needed and nothing was consumed. `Ok(Some)`:
    /// exactly one frame was consumed; its bytes are in [`Frame::raw`].
    pub fn decode(
        &mut self,
        src: &mut BytesMut,
    ) -> Result<Option<Frame<FrontendMessage>>, DecodeError> {
        match self.phase {
            Phase::Startup => {
                let max = self.max_frame_len.min(MAX_STARTUP_PACKET_LEN);
                let Some(raw) = split_untagged(src, MIN_STARTUP_PACKET_LEN, max)? else {
                    return Ok(None);
                };
                let msg = decode_startup(raw.clone())?;
                if matches!(msg, FrontendMessage::StartupMessage { .. }) {
                    self.phase = Phase::Tagged;
                }
                Ok(Some(Frame { msg, raw }))
            }
            Phase::Tagged => {
                let Some((tag, raw)) = split_tagged(src, self.max_frame_len, is_known_tag)? else {
                    return Ok(None);
                };
                let msg = decode_tagged(tag, raw.clone())?;
                Ok(Some(Frame { msg, raw }))
            }
        }
    }
}

fn is_known_tag(tag: u8) -> bool {
    tag_name(tag).is_some()
}

fn tag_name(tag: u8) -> Option<&'static str> {
    Some(match tag {
        BIND => "Bind",
        CLOSE => "Close",
        COPY_DATA => "CopyData",
        COPY_DONE => "CopyDone",
        COPY_FAIL => "CopyFail",
        DESCRIBE => "Describe",
        EXECUTE => "Execute",
        FLUSH => "Flush",
        FUNCTION_CALL => "FunctionCall",
        PARSE => "Parse",
        PASSWORD_MESSAGE => "PasswordMessage",
        QUERY => "Query",
        SYNC => "Sync",
        TERMINATE => "Terminate",
        _ => return None,
    })
}

fn decode_startup(raw: Bytes) -> Result<FrontendMessage, DecodeError> {
    let code = Reader::new(raw.clone(), LEN_SIZE, STARTUP_PACKET).i32()?;
    let body_start = LEN_SIZE + 4;
    let msg = match code {
        SSL_REQUEST_CODE => {
            Reader::new(raw, body_start, SSL_REQUEST).finish()?;
            FrontendMessage::SSLRequest
        }
        GSSENC_REQUEST_CODE => {
            Reader::new(raw, body_start, GSSENC_REQUEST).finish()?;
            FrontendMessage::GSSENCRequest
        }
        CANCEL_REQUEST_CODE => {
            let mut r = Reader::new(raw, body_start, CANCEL_REQUEST);
            let process_id = r.i32()?;
            if !(MIN_SECRET_KEY_LEN..=MAX_SECRET_KEY_LEN).contains(&r.remaining()) {
                return Err(r.malformed("secret key must be 4 to 256 bytes"));
            }
            let secret_key = r.rest();
            r.finish()?;
            FrontendMessage::CancelRequest {
                process_id,
                secret_key,
            }
        }
        _ => {
            let [a, b, c, d] = code.to_be_bytes();
            let (major, minor) = (u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]));
            if major == REQUEST_CODE_MAJOR {
                return Err(DecodeError::UnknownRequestCode(code));
            }
            if major != PROTOCOL_MAJOR_3 {
                return Err(DecodeError::UnsupportedProtocolVersion { major, minor });
            }
            let mut r = Reader::new(raw, body_start, STARTUP_MESSAGE);
            let mut params = Vec::new();
            loop {
                let key = r.cstr()?;
                if key.is_empty() {
                    break;
                }
                let value = r.cstr()?;
                params.push((key, value));
            }
            r.finish()?;
            FrontendMessage::StartupMessage {
                protocol_version: code,
                params,
            }
        }
    };
    Ok(msg)
}

fn decode_tagged(tag: u8, raw: Bytes) -> Result<FrontendMessage, DecodeError> {
    let name = tag_name(tag).ok_or(DecodeError::UnknownTag(tag))?;
    let mut r = Reader::new(raw, TAGGED_HEADER_SIZE, name);
    let msg = match tag {
        QUERY => FrontendMessage::Query { sql: r.cstr()? },
        PARSE => {
            let name = r.cstr()?;
            let query = r.cstr()?;
            let count = r.count16(4)?;
            let mut param_types = Vec::with_capacity(count);
            for _ in 0..count {
                param_types.push(r.u32()?);
            }
            FrontendMessage::Parse {
                name,
                query,
                param_types,
            }
        }
        BIND => {
            let portal = r.cstr()?;
            let statement = r.cstr()?;
            let param_formats = read_i16_list(&mut r)?;
            let count = r.count16(4)?;
            let mut params = Vec::with_capacity(count);
            for _ in 0..count {
                params.push(r.nullable_bytes()?);
            }
            let result_formats = read_i16_list(&mut r)?;
            FrontendMessage::Bind {
                portal,
                statement,
                param_formats,
                params,
                result_formats,
            }
        }
        DESCRIBE => FrontendMessage::Describe {
            kind: read_target(&mut r)?,
            name: r.cstr()?,
        },
        CLOSE => FrontendMessage::Close {
            kind: read_target(&mut r)?,
            name: r.cstr()?,
        },
        EXECUTE => FrontendMessage::Execute {
            portal: r.cstr()?,
            max_rows: r.i32()?,
        },
        SYNC => FrontendMessage::Sync,
        FLUSH => FrontendMessage::Flush,
        COPY_DATA => FrontendMessage::CopyData(r.rest()),
        COPY_DONE => FrontendMessage::CopyDone,
        COPY_FAIL => FrontendMessage::CopyFail { message: r.cstr()? },
        FUNCTION_CALL => FrontendMessage::FunctionCall(r.rest()),
        TERMINATE => FrontendMessage::Terminate,
        PASSWORD_MESSAGE => FrontendMessage::PasswordMessage(SensitiveBytes(r.rest())),
        _ => return Err(DecodeError::UnknownTag(tag)),
    };
    r.finish()?;
    Ok(msg)
}

fn read_i16_list(r: &mut Reader) -> Result<Vec<i16>, DecodeError> {
    let count = r.count16(2)?;
    let mut list = Vec::with_capacity(count);
    for _ in 0..count {
        list.push(r.i16()?);
    }
    Ok(list)
}

fn read_target(r: &mut Reader) -> Result<Target, DecodeError> {
    let byte = r.u8()?;
    Target::from_byte(byte).ok_or_else(|| r.malformed("target must be 'S' or 'P'"))
}

/// Reads a PasswordMessage body: the password (or md5 hash string) without
/// its NUL terminator. Passwords are bytes, not necessarily UTF-8.
pub fn parse_password(payload: &[u8]) -> Result<&[u8], DecodeError> {
    const MESSAGE: &str = "PasswordMessage";
    let Some((&last, password)) = payload.split_last() else {
        return Err(DecodeError::MissingNul { message: MESSAGE });
    };
    if last != 0 {
        return Err(DecodeError::MissingNul { message: MESSAGE });
    }
    if let Some(nul) = password.iter().position(|&b| b == 0) {
        return Err(DecodeError::TrailingBytes {
            message: MESSAGE,
            count: payload.len().saturating_sub(nul).saturating_sub(1),
        });
    }
    Ok(password)
}

/// Reads a SASLInitialResponse body: the mechanism name and the initial
/// client response (`None` when sent as length -1).
pub fn parse_sasl_initial_response(payload: &[u8]) -> Result<(String, Option<Bytes>), DecodeError> {
    let mut r = Reader::new(Bytes::copy_from_slice(payload), 0, SASL_INITIAL_RESPONSE);
    let mechanism = r.cstr()?;
    let data = r.nullable_bytes()?;
    r.finish()?;
    Ok((mechanism, data))
}

/// Reads a SASLResponse body: all of it is mechanism-specific data.
pub fn parse_sasl_response(payload: &[u8]) -> Bytes {
    Bytes::copy_from_slice(payload)
}

/// The format code of value `i` under a Bind's format-code list: none means all text, one
/// applies to every value, otherwise one per value (a missing one reads as text).
pub fn format_code(formats: &[i16], i: usize) -> i16 {
    match formats {
        [] => 0,
        [one] => *one,
        many => many.get(i).copied().unwrap_or(0),
    }
}
