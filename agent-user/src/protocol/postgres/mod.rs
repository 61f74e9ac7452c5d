//! PostgreSQL frontend/backend protocol 3.0 wire codec: incremental decoders
//! for both directions that keep each message's original bytes, encoders for
//! every message, and the client side of upstream authentication (trust,
//! cleartext, md5, SCRAM-SHA-256) as a pure state machine. It owns the byte
//! layout only: no sockets, no async, no policy, no SQL parsing. Callers read
//! into a `BytesMut`, call `decode` until `Ok(None)`, and forward
//! [`Frame::raw`] unchanged unless they rewrote the message.
//!
//! Reference: <https://www.postgresql.org/docs/15/protocol.html>, in particular
//! <https://www.postgresql.org/docs/15/protocol-message-formats.html>.

use std::fmt;

use bytes::Bytes;

pub mod auth;
pub mod backend;
pub mod error;
pub mod frontend;
mod wire;

#[cfg(test)]
mod tests;

pub use auth::{AuthError, AuthStep, UpstreamAuth};
pub use backend::{
    Authentication, BackendDecoder, BackendMessage, ErrorFields, FieldDescription, SslResponse,
    TransactionStatus, decode_ssl_response, insufficient_privilege,
};
pub use error::{DecodeError, EncodeError};
pub use frontend::{
    FrontendDecoder, FrontendMessage, Phase, SensitiveBytes, Target, format_code, parse_password,
    parse_sasl_initial_response, parse_sasl_response,
};

/// Default cap on a frame's length word: large enough for wide rows and COPY
/// chunks, small enough that one connection cannot make the proxy buffer
/// gigabytes (the server's own hard limit is 1 GiB).
pub const DEFAULT_MAX_FRAME_LEN: usize = 64 * 1024 * 1024;

/// A decoded message together with the exact bytes it was decoded from
/// (tag, length word and body), so that a proxy can forward messages it did not
/// change without re-encoding them. If `msg` is modified, `raw` is stale:
/// encode the message again (or build a new frame with `from_message`).
#[derive(Clone, PartialEq, Eq)]
pub struct Frame<M> {
    pub msg: M,
    pub raw: Bytes,
}

impl<M> Frame<M> {
    pub fn into_message(self) -> M {
        self.msg
    }
}

// `raw` is left out: it repeats `msg` and, for a PasswordMessage, would
// print the very bytes that `SensitiveBytes` keeps out of logs.
impl<M: fmt::Debug> fmt::Debug for Frame<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("msg", &self.msg)
            .finish_non_exhaustive()
    }
}
