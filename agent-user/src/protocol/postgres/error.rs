//! Errors of the PostgreSQL wire codec: what can be wrong with bytes read off
//! the wire ([`DecodeError`]) and with a message the proxy wants to write
//! ([`EncodeError`]). Authentication failures live in `auth.rs`, not here.
//!
//! Every variant names the condition and, where it helps, the PostgreSQL
//! message name it was found in (the names used in
//! <https://www.postgresql.org/docs/15/protocol-message-formats.html>).
//! No variant ever carries payload bytes, so an error can be logged without
//! leaking passwords or row data.

/// Why a byte stream could not be decoded into protocol messages.
///
/// After a header-level error (`FrameTooLarge`, `InvalidLength`,
/// `UnknownTag`, ...) the stream has lost framing and the connection must be
/// closed. After a body-level error the offending frame has been consumed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The length word announces a frame larger than the configured cap.
    #[error("frame length {len} exceeds the limit of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    /// The length word is negative or smaller than the fixed header.
    #[error("invalid frame length {len} (minimum {min})")]
    InvalidLength { len: i32, min: usize },
    /// A tagged frame starts with a byte that names no message of this direction.
    #[error("unknown message tag {0:#04x}")]
    UnknownTag(u8),
    /// A startup-phase packet carries a request code PostgreSQL does not define.
    #[error("unknown startup request code {0}")]
    UnknownRequestCode(i32),
    /// A StartupMessage asks for a protocol major version other than 3.
    #[error("unsupported protocol version {major}.{minor}")]
    UnsupportedProtocolVersion { major: u16, minor: u16 },
    /// A field runs past the end of its frame.
    #[error("{message}: field extends past the end of the frame")]
    Truncated { message: &'static str },
    /// A string field has no terminating NUL inside the frame.
    #[error("{message}: string is not NUL-terminated")]
    MissingNul { message: &'static str },
    /// A string field is not valid UTF-8.
    #[error("{message}: string is not valid UTF-8")]
    InvalidUtf8 { message: &'static str },
    /// The frame is longer than the fields its message type defines.
    #[error("{message}: {count} trailing bytes after the last field")]
    TrailingBytes { message: &'static str, count: usize },
    /// A field holds a value its message type does not allow.
    #[error("{message}: {reason}")]
    Malformed {
        message: &'static str,
        reason: &'static str,
    },
}

/// Why a message could not be encoded. Encoding never writes a partial frame:
/// on error the destination buffer is left as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A string contains a NUL byte, which would end it early on the wire and
    /// let the rest be read as other fields.
    #[error("{message}: string contains a NUL byte")]
    InteriorNul { message: &'static str },
    /// A list has more entries than its count field can express.
    #[error("{message}: {count} entries exceed the maximum of {max}")]
    TooManyItems {
        message: &'static str,
        count: usize,
        max: usize,
    },
    /// A value or the whole frame is longer than an Int32 length can express.
    #[error("{message}: length {len} does not fit the protocol's Int32 length")]
    TooLarge { message: &'static str, len: usize },
    /// A field value would produce a frame the receiver parses differently.
    #[error("{message}: {reason}")]
    Invalid {
        message: &'static str,
        reason: &'static str,
    },
}
