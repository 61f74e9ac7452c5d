//! Backend (server -> client) messages of protocol 3.0: their decoder, their
//! encoder, the error/notice field list, and constructors for the messages a
//! proxy synthesizes itself (policy denials, its own authentication answers).
//! It does no I/O and takes no policy decisions; frontend messages live in
//! `frontend.rs`, the client side of authentication in `auth.rs`.
//!
//! Formats: <https://www.postgresql.org/docs/15/protocol-message-formats.html>;
//! error fields: <https://www.postgresql.org/docs/15/protocol-error-fields.html>.

use bytes::{BufMut, Bytes, BytesMut};

use super::error::{DecodeError, EncodeError};
use super::wire::{
    Reader, TAGGED_HEADER_SIZE, put_count16, put_cstr, put_nullable, split_tagged, write_frame,
};
use super::{DEFAULT_MAX_FRAME_LEN, Frame};

pub const AUTHENTICATION: u8 = b'R';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const BIND_COMPLETE: u8 = b'2';
pub const CLOSE_COMPLETE: u8 = b'3';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const COPY_BOTH_RESPONSE: u8 = b'W';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const COPY_IN_RESPONSE: u8 = b'G';
pub const COPY_OUT_RESPONSE: u8 = b'H';
pub const DATA_ROW: u8 = b'D';
pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
pub const ERROR_RESPONSE: u8 = b'E';
pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
pub const NO_DATA: u8 = b'n';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const NOTIFICATION_RESPONSE: u8 = b'A';
pub const PARAMETER_DESCRIPTION: u8 = b't';
pub const PARAMETER_STATUS: u8 = b'S';
pub const PARSE_COMPLETE: u8 = b'1';
pub const PORTAL_SUSPENDED: u8 = b's';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const ROW_DESCRIPTION: u8 = b'T';

/// Authentication request codes (the Int32 after the `'R'` header).
pub const AUTH_OK: i32 = 0;
pub const AUTH_KERBEROS_V5: i32 = 2;
pub const AUTH_CLEARTEXT_PASSWORD: i32 = 3;
pub const AUTH_MD5_PASSWORD: i32 = 5;
pub const AUTH_GSS: i32 = 7;
pub const AUTH_GSS_CONTINUE: i32 = 8;
pub const AUTH_SSPI: i32 = 9;
pub const AUTH_SASL: i32 = 10;
pub const AUTH_SASL_CONTINUE: i32 = 11;
pub const AUTH_SASL_FINAL: i32 = 12;

const STATUS_IDLE: u8 = b'I';
const STATUS_IN_TRANSACTION: u8 = b'T';
const STATUS_FAILED: u8 = b'E';

/// The server's one-byte answer to SSLRequest (not a framed message).
const SSL_ACCEPTED: u8 = b'S';
const SSL_REFUSED: u8 = b'N';

/// Protocol 3.0 cancel keys are 4 bytes; protocol 3.2 allows up to 256.
const MIN_SECRET_KEY_LEN: usize = 4;
const MAX_SECRET_KEY_LEN: usize = 256;

/// Minimum wire size of one RowDescription field: empty name plus 18 fixed bytes.
const MIN_FIELD_DESCRIPTION_LEN: usize = 1 + 4 + 2 + 4 + 2 + 4 + 2;

/// SQLSTATE `insufficient_privilege`.
pub const SQLSTATE_INSUFFICIENT_PRIVILEGE: &str = "42501";

/// Error and notice field codes
/// (<https://www.postgresql.org/docs/15/protocol-error-fields.html>).
pub mod field {
    /// Localized severity.
    pub const SEVERITY: u8 = b'S';
    /// Severity that is never localized (servers 9.6+).
    pub const SEVERITY_NONLOCALIZED: u8 = b'V';
    /// SQLSTATE.
    pub const CODE: u8 = b'C';
    pub const MESSAGE: u8 = b'M';
    pub const DETAIL: u8 = b'D';
    pub const HINT: u8 = b'H';
    pub const POSITION: u8 = b'P';
    pub const INTERNAL_POSITION: u8 = b'p';
    pub const INTERNAL_QUERY: u8 = b'q';
    pub const WHERE: u8 = b'W';
    pub const SCHEMA_NAME: u8 = b's';
    pub const TABLE_NAME: u8 = b't';
    pub const COLUMN_NAME: u8 = b'c';
    pub const DATA_TYPE_NAME: u8 = b'd';
    pub const CONSTRAINT_NAME: u8 = b'n';
    pub const FILE: u8 = b'F';
    pub const LINE: u8 = b'L';
    pub const ROUTINE: u8 = b'R';
}

/// An authentication request (`'R'`), told apart by its Int32 code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    Ok,
    CleartextPassword,
    Md5Password {
        salt: [u8; 4],
    },
    /// AuthenticationSASL: the mechanisms the server offers, in its order.
    Sasl {
        mechanisms: Vec<String>,
    },
    SaslContinue(Bytes),
    SaslFinal(Bytes),
    /// Any other method (KerberosV5, GSS, GSSContinue, SSPI, ...), with the
    /// bytes after the code so that the message re-encodes unchanged.
    Other {
        code: i32,
        data: Bytes,
    },
}

impl Authentication {
    /// The message name as in the PostgreSQL documentation.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ok => "AuthenticationOk",
            Self::CleartextPassword => "AuthenticationCleartextPassword",
            Self::Md5Password { .. } => "AuthenticationMD5Password",
            Self::Sasl { .. } => "AuthenticationSASL",
            Self::SaslContinue(_) => "AuthenticationSASLContinue",
            Self::SaslFinal(_) => "AuthenticationSASLFinal",
            Self::Other { code, .. } => match *code {
                AUTH_KERBEROS_V5 => "AuthenticationKerberosV5",
                AUTH_GSS => "AuthenticationGSS",
                AUTH_GSS_CONTINUE => "AuthenticationGSSContinue",
                AUTH_SSPI => "AuthenticationSSPI",
                _ => "Authentication",
            },
        }
    }

    pub fn code(&self) -> i32 {
        match self {
            Self::Ok => AUTH_OK,
            Self::CleartextPassword => AUTH_CLEARTEXT_PASSWORD,
            Self::Md5Password { .. } => AUTH_MD5_PASSWORD,
            Self::Sasl { .. } => AUTH_SASL,
            Self::SaslContinue(_) => AUTH_SASL_CONTINUE,
            Self::SaslFinal(_) => AUTH_SASL_FINAL,
            Self::Other { code, .. } => *code,
        }
    }
}

/// Transaction status carried by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransactionStatus {
    Idle,
    InTransaction,
    /// In a failed transaction block: queries are rejected until its end.
    Failed,
}

impl TransactionStatus {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            STATUS_IDLE => Some(Self::Idle),
            STATUS_IN_TRANSACTION => Some(Self::InTransaction),
            STATUS_FAILED => Some(Self::Failed),
            _ => None,
        }
    }

    fn to_byte(self) -> u8 {
        match self {
            Self::Idle => STATUS_IDLE,
            Self::InTransaction => STATUS_IN_TRANSACTION,
            Self::Failed => STATUS_FAILED,
        }
    }
}

/// One column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDescription {
    pub name: String,
    /// OID of the source table, 0 if the column is not a plain table column.
    pub table_oid: u32,
    /// Attribute number in that table, 0 otherwise.
    pub column_attr: i16,
    pub type_oid: u32,
    /// `pg_type.typlen`; negative for variable-width types.
    pub type_size: i16,
    pub type_modifier: i32,
    /// 0 text, 1 binary (0 also means "unknown" after a statement Describe).
    pub format: i16,
}

/// The fields of an ErrorResponse or NoticeResponse, in wire order. A code may
/// in principle repeat; accessors return the first occurrence.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorFields(Vec<(u8, String)>);

impl ErrorFields {
    pub fn new(fields: Vec<(u8, String)>) -> Self {
        Self(fields)
    }

    /// An error with severity `ERROR` (both the `S` and `V` fields, as servers
    /// 9.6+ send them), the given SQLSTATE and primary message.
    pub fn error(sqlstate: &str, message: impl Into<String>) -> Self {
        Self::with_severity("ERROR", sqlstate, message)
    }

    /// Like [`ErrorFields::error`] with severity `FATAL` (the server closes the
    /// session after sending it).
    pub fn fatal(sqlstate: &str, message: impl Into<String>) -> Self {
        Self::with_severity("FATAL", sqlstate, message)
    }

    pub fn with_severity(severity: &str, sqlstate: &str, message: impl Into<String>) -> Self {
        Self(vec![
            (field::SEVERITY, severity.to_owned()),
            (field::SEVERITY_NONLOCALIZED, severity.to_owned()),
            (field::CODE, sqlstate.to_owned()),
            (field::MESSAGE, message.into()),
        ])
    }

    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.0.push((field::DETAIL, detail.into()));
        self
    }

    #[must_use]
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.0.push((field::HINT, hint.into()));
        self
    }

    pub fn push(&mut self, code: u8, value: impl Into<String>) {
        self.0.push((code, value.into()));
    }

    pub fn fields(&self) -> &[(u8, String)] {
        &self.0
    }

    pub fn into_fields(self) -> Vec<(u8, String)> {
        self.0
    }

    /// The first value of field `code`.
    pub fn get(&self, code: u8) -> Option<&str> {
        self.0
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, value)| value.as_str())
    }

    /// Severity, preferring the non-localized `V` field so that decisions do
    /// not depend on the server's `lc_messages`.
    pub fn severity(&self) -> Option<&str> {
        self.get(field::SEVERITY_NONLOCALIZED)
            .or_else(|| self.get(field::SEVERITY))
    }

    /// The SQLSTATE code.
    pub fn code(&self) -> Option<&str> {
        self.get(field::CODE)
    }

    pub fn message(&self) -> Option<&str> {
        self.get(field::MESSAGE)
    }

    pub fn detail(&self) -> Option<&str> {
        self.get(field::DETAIL)
    }

    pub fn hint(&self) -> Option<&str> {
        self.get(field::HINT)
    }
}

/// A message sent by the server to the client.
///
/// Strings must be valid UTF-8; a proxy should pin `client_encoding` to UTF8
/// so that error texts and command tags always are. Row values are bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage {
    Authentication(Authentication),
    /// `secret_key` is 4 bytes in protocol 3.0, up to 256 in 3.2.
    BackendKeyData {
        process_id: i32,
        secret_key: Bytes,
    },
    ParameterStatus {
        name: String,
        value: String,
    },
    ReadyForQuery {
        status: TransactionStatus,
    },
    RowDescription(Vec<FieldDescription>),
    /// Column values in order; `None` is SQL NULL.
    DataRow(Vec<Option<Bytes>>),
    CommandComplete {
        tag: String,
    },
    EmptyQueryResponse,
    ErrorResponse(ErrorFields),
    NoticeResponse(ErrorFields),
    ParseComplete,
    BindComplete,
    CloseComplete,
    NoData,
    PortalSuspended,
    ParameterDescription(Vec<u32>),
    /// `format`: 0 text, 1 binary; one format code per column.
    CopyInResponse {
        format: i8,
        column_formats: Vec<i16>,
    },
    CopyOutResponse {
        format: i8,
        column_formats: Vec<i16>,
    },
    CopyBothResponse {
        format: i8,
        column_formats: Vec<i16>,
    },
    CopyData(Bytes),
    CopyDone,
    NotificationResponse {
        process_id: i32,
        channel: String,
        payload: String,
    },
    /// `minor`: newest minor version the server supports for the requested
    /// major version; `unrecognized`: protocol options it did not recognize.
    NegotiateProtocolVersion {
        minor: i32,
        unrecognized: Vec<String>,
    },
    FunctionCallResponse(Option<Bytes>),
}

/// An ErrorResponse denying an action for lack of privilege: SQLSTATE `42501`,
/// severity `ERROR`, with an optional detail line. The client sees it like any
/// server-side permission error and its transaction state follows the usual
/// rules (the proxy still has to send ReadyForQuery where one is due).
pub fn insufficient_privilege(message: impl Into<String>, detail: Option<&str>) -> BackendMessage {
    let fields = ErrorFields::error(SQLSTATE_INSUFFICIENT_PRIVILEGE, message);
    BackendMessage::ErrorResponse(match detail {
        Some(detail) => fields.with_detail(detail),
        None => fields,
    })
}

impl BackendMessage {
    /// The message name as in the PostgreSQL documentation.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Authentication(auth) => auth.name(),
            Self::BackendKeyData { .. } => "BackendKeyData",
            Self::ParameterStatus { .. } => "ParameterStatus",
            Self::ReadyForQuery { .. } => "ReadyForQuery",
            Self::RowDescription(_) => "RowDescription",
            Self::DataRow(_) => "DataRow",
            Self::CommandComplete { .. } => "CommandComplete",
            Self::EmptyQueryResponse => "EmptyQueryResponse",
            Self::ErrorResponse(_) => "ErrorResponse",
            Self::NoticeResponse(_) => "NoticeResponse",
            Self::ParseComplete => "ParseComplete",
            Self::BindComplete => "BindComplete",
            Self::CloseComplete => "CloseComplete",
            Self::NoData => "NoData",
            Self::PortalSuspended => "PortalSuspended",
            Self::ParameterDescription(_) => "ParameterDescription",
            Self::CopyInResponse { .. } => "CopyInResponse",
            Self::CopyOutResponse { .. } => "CopyOutResponse",
            Self::CopyBothResponse { .. } => "CopyBothResponse",
            Self::CopyData(_) => "CopyData",
            Self::CopyDone => "CopyDone",
            Self::NotificationResponse { .. } => "NotificationResponse",
            Self::NegotiateProtocolVersion { .. } => "NegotiateProtocolVersion",
            Self::FunctionCallResponse(_) => "FunctionCallResponse",
        }
    }

    pub fn tag(&self) -> u8 {
        match self {
            Self::Authentication(_) => AUTHENTICATION,
            Self::BackendKeyData { .. } => BACKEND_KEY_DATA,
            Self::ParameterStatus { .. } => PARAMETER_STATUS,
            Self::ReadyForQuery { .. } => READY_FOR_QUERY,
            Self::RowDescription(_) => ROW_DESCRIPTION,
            Self::DataRow(_) => DATA_ROW,
            Self::CommandComplete { .. } => COMMAND_COMPLETE,
            Self::EmptyQueryResponse => EMPTY_QUERY_RESPONSE,
            Self::ErrorResponse(_) => ERROR_RESPONSE,
            Self::NoticeResponse(_) => NOTICE_RESPONSE,
            Self::ParseComplete => PARSE_COMPLETE,
            Self::BindComplete => BIND_COMPLETE,
            Self::CloseComplete => CLOSE_COMPLETE,
            Self::NoData => NO_DATA,
            Self::PortalSuspended => PORTAL_SUSPENDED,
            Self::ParameterDescription(_) => PARAMETER_DESCRIPTION,
            Self::CopyInResponse { .. } => COPY_IN_RESPONSE,
            Self::CopyOutResponse { .. } => COPY_OUT_RESPONSE,
            Self::CopyBothResponse { .. } => COPY_BOTH_RESPONSE,
            Self::CopyData(_) => COPY_DATA,
            Self::CopyDone => COPY_DONE,
            Self::NotificationResponse { .. } => NOTIFICATION_RESPONSE,
            Self::NegotiateProtocolVersion { .. } => NEGOTIATE_PROTOCOL_VERSION,
            Self::FunctionCallResponse(_) => FUNCTION_CALL_RESPONSE,
        }
    }

    /// Appends the wire form of the message to `dst`. On error `dst` is unchanged.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), EncodeError> {
        let name = self.name();
        let tag = Some(self.tag());
        match self {
            Self::Authentication(auth) => {
                write_frame(dst, tag, name, |b| encode_authentication(auth, name, b))
            }
            Self::BackendKeyData {
                process_id,
                secret_key,
            } => write_frame(dst, tag, name, |b| {
                if !(MIN_SECRET_KEY_LEN..=MAX_SECRET_KEY_LEN).contains(&secret_key.len()) {
                    return Err(EncodeError::Invalid {
                        message: name,
                        reason: "secret key must be 4 to 256 bytes",
                    });
                }
                b.put_i32(*process_id);
                b.put_slice(secret_key);
                Ok(())
            }),
            Self::ParameterStatus { name: param, value } => write_frame(dst, tag, name, |b| {
                put_cstr(b, param, name)?;
                put_cstr(b, value, name)
            }),
            Self::ReadyForQuery { status } => write_frame(dst, tag, name, |b| {
                b.put_u8(status.to_byte());
                Ok(())
            }),
            Self::RowDescription(fields) => write_frame(dst, tag, name, |b| {
                put_count16(b, fields.len(), name)?;
                for f in fields {
                    put_cstr(b, &f.name, name)?;
                    b.put_u32(f.table_oid);
                    b.put_i16(f.column_attr);
                    b.put_u32(f.type_oid);
                    b.put_i16(f.type_size);
                    b.put_i32(f.type_modifier);
                    b.put_i16(f.format);
                }
                Ok(())
            }),
            Self::DataRow(values) => write_frame(dst, tag, name, |b| {
                put_count16(b, values.len(), name)?;
                for value in values {
                    put_nullable(b, value.as_deref(), name)?;
                }
                Ok(())
            }),
            Self::CommandComplete { tag: command } => {
                write_frame(dst, tag, name, |b| put_cstr(b, command, name))
            }
            Self::ErrorResponse(fields) | Self::NoticeResponse(fields) => {
                write_frame(dst, tag, name, |b| {
                    for (code, value) in fields.fields() {
                        if *code == 0 {
                            return Err(EncodeError::Invalid {
                                message: name,
                                reason: "field code 0 would end the field list",
                            });
                        }
                        b.put_u8(*code);
                        put_cstr(b, value, name)?;
                    }
                    b.put_u8(0);
                    Ok(())
                })
            }
            Self::ParameterDescription(oids) => write_frame(dst, tag, name, |b| {
                put_count16(b, oids.len(), name)?;
                for oid in oids {
                    b.put_u32(*oid);
                }
                Ok(())
            }),
            Self::CopyInResponse {
                format,
                column_formats,
            }
            | Self::CopyOutResponse {
                format,
                column_formats,
            }
            | Self::CopyBothResponse {
                format,
                column_formats,
            } => write_frame(dst, tag, name, |b| {
                b.put_i8(*format);
                put_count16(b, column_formats.len(), name)?;
                for f in column_formats {
                    b.put_i16(*f);
                }
                Ok(())
            }),
            Self::CopyData(data) => write_frame(dst, tag, name, |b| {
                b.put_slice(data);
                Ok(())
            }),
            Self::NotificationResponse {
                process_id,
                channel,
                payload,
            } => write_frame(dst, tag, name, |b| {
                b.put_i32(*process_id);
                put_cstr(b, channel, name)?;
                put_cstr(b, payload, name)
            }),
            Self::NegotiateProtocolVersion {
                minor,
                unrecognized,
            } => write_frame(dst, tag, name, |b| {
                b.put_i32(*minor);
                let count =
                    i32::try_from(unrecognized.len()).map_err(|_| EncodeError::TooManyItems {
                        message: name,
                        count: unrecognized.len(),
                        max: usize::try_from(i32::MAX).unwrap_or(usize::MAX),
                    })?;
                b.put_i32(count);
                for option in unrecognized {
                    put_cstr(b, option, name)?;
                }
                Ok(())
            }),
            Self::FunctionCallResponse(value) => {
                write_frame(dst, tag, name, |b| put_nullable(b, value.as_deref(), name))
            }
            Self::EmptyQueryResponse
            | Self::ParseComplete
            | Self::BindComplete
            | Self::CloseComplete
            | Self::NoData
            | Self::PortalSuspended
            | Self::CopyDone => write_frame(dst, tag, name, |_| Ok(())),
        }
    }

    /// Encodes into a fresh buffer.
    pub fn to_bytes(&self) -> Result<Bytes, EncodeError> {
        let mut buf = BytesMut::new();
        self.encode(&mut buf)?;
        Ok(buf.freeze())
    }
}

impl Frame<BackendMessage> {
    /// Builds a frame for a synthesized or rewritten message, encoding it once.
    pub fn from_message(msg: BackendMessage) -> Result<Self, EncodeError> {
        let raw = msg.to_bytes()?;
        Ok(Self { msg, raw })
    }
}

fn encode_authentication(
    auth: &Authentication,
    name: &'static str,
    b: &mut BytesMut,
) -> Result<(), EncodeError> {
    b.put_i32(auth.code());
    match auth {
        Authentication::Ok | Authentication::CleartextPassword => {}
        Authentication::Md5Password { salt } => b.put_slice(salt),
        Authentication::Sasl { mechanisms } => {
            for mechanism in mechanisms {
                if mechanism.is_empty() {
                    return Err(EncodeError::Invalid {
                        message: name,
                        reason: "an empty mechanism name would end the list",
                    });
                }
                put_cstr(b, mechanism, name)?;
            }
            b.put_u8(0);
        }
        Authentication::SaslContinue(data) | Authentication::SaslFinal(data) => b.put_slice(data),
        Authentication::Other { code, data } => {
            // Codes with their own variant would decode as that variant, so
            // the bytes written here would not mean what the caller built.
            if matches!(
                *code,
                AUTH_OK
                    | AUTH_CLEARTEXT_PASSWORD
                    | AUTH_MD5_PASSWORD
                    | AUTH_SASL
                    | AUTH_SASL_CONTINUE
                    | AUTH_SASL_FINAL
            ) {
                return Err(EncodeError::Invalid {
                    message: name,
                    reason: "authentication code has a dedicated variant",
                });
            }
            b.put_slice(data);
        }
    }
    Ok(())
}

/// Incremental decoder for the server side of a connection. Every backend
/// message is tagged, so unlike [`super::FrontendDecoder`] it has no phases;
/// the one-byte answer to SSLRequest is read with [`decode_ssl_response`].
#[derive(Debug, Clone)]
pub struct BackendDecoder {
    /// Largest accepted value of a frame's length word.
    pub max_frame_len: usize,
}

impl Default for BackendDecoder {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME_LEN)
    }
}

impl BackendDecoder {
    pub fn new(max_frame_len: usize) -> Self {
        Self { max_frame_len }
    }

    /// Decodes the next complete message from `src`.
    ///
    /// `Ok(None)`: more bytes are needed and nothing was consumed. `Ok(Some)`:
    /// exactly one frame was consumed; its bytes are in [`Frame::raw`].
    pub fn decode(
        &mut self,
        src: &mut BytesMut,
    ) -> Result<Option<Frame<BackendMessage>>, DecodeError> {
        let Some((tag, raw)) = split_tagged(src, self.max_frame_len, is_known_tag)? else {
            return Ok(None);
        };
        let msg = decode_message(tag, raw.clone())?;
        Ok(Some(Frame { msg, raw }))
    }
}

/// The server's answer to SSLRequest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslResponse {
    /// `'S'`: start the TLS handshake now.
    Accepted,
    /// `'N'`: continue in cleartext (or give up).
    Refused,
}

/// Reads the single unframed byte a server sends after SSLRequest. Any other
/// byte (an ancient server's ErrorResponse included) is an error.
pub fn decode_ssl_response(src: &mut BytesMut) -> Result<Option<SslResponse>, DecodeError> {
    let Some(&byte) = src.first() else {
        return Ok(None);
    };
    let response = match byte {
        SSL_ACCEPTED => SslResponse::Accepted,
        SSL_REFUSED => SslResponse::Refused,
        other => return Err(DecodeError::UnknownTag(other)),
    };
    let _ = src.split_to(1);
    Ok(Some(response))
}

fn is_known_tag(tag: u8) -> bool {
    tag_name(tag).is_some()
}

fn tag_name(tag: u8) -> Option<&'static str> {
    Some(match tag {
        AUTHENTICATION => "Authentication",
        BACKEND_KEY_DATA => "BackendKeyData",
        BIND_COMPLETE => "BindComplete",
        CLOSE_COMPLETE => "CloseComplete",
        COMMAND_COMPLETE => "CommandComplete",
        COPY_BOTH_RESPONSE => "CopyBothResponse",
        COPY_DATA => "CopyData",
        COPY_DONE => "CopyDone",
        COPY_IN_RESPONSE => "CopyInResponse",
        COPY_OUT_RESPONSE => "CopyOutResponse",
        DATA_ROW => "DataRow",
        EMPTY_QUERY_RESPONSE => "EmptyQueryResponse",
        ERROR_RESPONSE => "ErrorResponse",
        FUNCTION_CALL_RESPONSE => "FunctionCallResponse",
        NEGOTIATE_PROTOCOL_VERSION => "NegotiateProtocolVersion",
        NO_DATA => "NoData",
        NOTICE_RESPONSE => "NoticeResponse",
        NOTIFICATION_RESPONSE => "NotificationResponse",
        PARAMETER_DESCRIPTION => "ParameterDescription",
        PARAMETER_STATUS => "ParameterStatus",
        PARSE_COMPLETE => "ParseComplete",
        PORTAL_SUSPENDED => "PortalSuspended",
        READY_FOR_QUERY => "ReadyForQuery",
        ROW_DESCRIPTION => "RowDescription",
        _ => return None,
    })
}

fn decode_message(tag: u8, raw: Bytes) -> Result<BackendMessage, DecodeError> {
    let name = tag_name(tag).ok_or(DecodeError::UnknownTag(tag))?;
    let mut r = Reader::new(raw, TAGGED_HEADER_SIZE, name);
    let msg = match tag {
        AUTHENTICATION => BackendMessage::Authentication(decode_authentication(&mut r)?),
        BACKEND_KEY_DATA => {
            let process_id = r.i32()?;
            if !(MIN_SECRET_KEY_LEN..=MAX_SECRET_KEY_LEN).contains(&r.remaining()) {
                return Err(r.malformed("secret key must be 4 to 256 bytes"));
            }
            BackendMessage::BackendKeyData {
                process_id,
                secret_key: r.rest(),
            }
        }
        PARAMETER_STATUS => BackendMessage::ParameterStatus {
            name: r.cstr()?,
            value: r.cstr()?,
        },
        READY_FOR_QUERY => {
            let byte = r.u8()?;
            let status = TransactionStatus::from_byte(byte)
                .ok_or_else(|| r.malformed("transaction status must be 'I', 'T' or 'E'"))?;
            BackendMessage::ReadyForQuery { status }
        }
        ROW_DESCRIPTION => {
            let count = r.count16(MIN_FIELD_DESCRIPTION_LEN)?;
            let mut fields = Vec::with_capacity(count);
            for _ in 0..count {
                fields.push(FieldDescription {
                    name: r.cstr()?,
                    table_oid: r.u32()?,
                    column_attr: r.i16()?,
                    type_oid: r.u32()?,
                    type_size: r.i16()?,
                    type_modifier: r.i32()?,
                    format: r.i16()?,
                });
            }
            BackendMessage::RowDescription(fields)
        }
        DATA_ROW => {
            let count = r.count16(4)?;
            let mut values = Vec::with_capacity(count);
            for _ in 0..count {
                values.push(r.nullable_bytes()?);
            }
            BackendMessage::DataRow(values)
        }
        COMMAND_COMPLETE => BackendMessage::CommandComplete { tag: r.cstr()? },
        EMPTY_QUERY_RESPONSE => BackendMessage::EmptyQueryResponse,
        ERROR_RESPONSE => BackendMessage::ErrorResponse(decode_error_fields(&mut r)?),
        NOTICE_RESPONSE => BackendMessage::NoticeResponse(decode_error_fields(&mut r)?),
        PARSE_COMPLETE => BackendMessage::ParseComplete,
        BIND_COMPLETE => BackendMessage::BindComplete,
        CLOSE_COMPLETE => BackendMessage::CloseComplete,
        NO_DATA => BackendMessage::NoData,
        PORTAL_SUSPENDED => BackendMessage::PortalSuspended,
        PARAMETER_DESCRIPTION => {
            let count = r.count16(4)?;
            let mut oids = Vec::with_capacity(count);
            for _ in 0..count {
                oids.push(r.u32()?);
            }
            BackendMessage::ParameterDescription(oids)
        }
        COPY_IN_RESPONSE => {
            let (format, column_formats) = decode_copy_response(&mut r)?;
            BackendMessage::CopyInResponse {
                format,
                column_formats,
            }
        }
        COPY_OUT_RESPONSE => {
            let (format, column_formats) = decode_copy_response(&mut r)?;
            BackendMessage::CopyOutResponse {
                format,
                column_formats,
            }
        }
        COPY_BOTH_RESPONSE => {
            let (format, column_formats) = decode_copy_response(&mut r)?;
            BackendMessage::CopyBothResponse {
                format,
                column_formats,
            }
        }
        COPY_DATA => BackendMessage::CopyData(r.rest()),
        COPY_DONE => BackendMessage::CopyDone,
        NOTIFICATION_RESPONSE => BackendMessage::NotificationResponse {
            process_id: r.i32()?,
            channel: r.cstr()?,
            payload: r.cstr()?,
        },
        NEGOTIATE_PROTOCOL_VERSION => {
            let minor = r.i32()?;
            let count = r.count32(1)?;
            let mut unrecognized = Vec::with_capacity(count);
            for _ in 0..count {
                unrecognized.push(r.cstr()?);
            }
            BackendMessage::NegotiateProtocolVersion {
                minor,
                unrecognized,
            }
        }
        FUNCTION_CALL_RESPONSE => BackendMessage::FunctionCallResponse(r.nullable_bytes()?),
        _ => return Err(DecodeError::UnknownTag(tag)),
    };
    r.finish()?;
    Ok(msg)
}

fn decode_authentication(r: &mut Reader) -> Result<Authentication, DecodeError> {
    let auth = match r.i32()? {
        AUTH_OK => Authentication::Ok,
        AUTH_CLEARTEXT_PASSWORD => Authentication::CleartextPassword,
        AUTH_MD5_PASSWORD => Authentication::Md5Password {
            salt: r.array::<4>()?,
        },
        AUTH_SASL => {
            let mut mechanisms = Vec::new();
            loop {
                let mechanism = r.cstr()?;
                if mechanism.is_empty() {
                    break;
                }
                mechanisms.push(mechanism);
            }
            Authentication::Sasl { mechanisms }
        }
        AUTH_SASL_CONTINUE => Authentication::SaslContinue(r.rest()),
        AUTH_SASL_FINAL => Authentication::SaslFinal(r.rest()),
        code => Authentication::Other {
            code,
            data: r.rest(),
        },
    };
    Ok(auth)
}

fn decode_error_fields(r: &mut Reader) -> Result<ErrorFields, DecodeError> {
    let mut fields = Vec::new();
    loop {
        let code = r.u8()?;
        if code == 0 {
            break;
        }
        fields.push((code, r.cstr()?));
    }
    Ok(ErrorFields(fields))
}

fn decode_copy_response(r: &mut Reader) -> Result<(i8, Vec<i16>), DecodeError> {
    let format = r.i8()?;
    let count = r.count16(2)?;
    let mut column_formats = Vec::with_capacity(count);
    for _ in 0..count {
        column_formats.push(r.i16()?);
    }
    Ok((format, column_formats))
}
