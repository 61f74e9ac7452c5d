//! Low-level framing shared by both directions: splitting complete frames off
//! a receive buffer, a bounds-checked field [`Reader`], and helpers that write
//! length-prefixed frames. It knows nothing about individual message types;
//! `frontend.rs` and `backend.rs` own those.
//!
//! Layout reference: <https://www.postgresql.org/docs/15/protocol-message-types.html>
//! (data types) and <https://www.postgresql.org/docs/15/protocol-overview.html>
//! (framing: a tag byte, then an Int32 length that counts itself).

use bytes::{BufMut, Bytes, BytesMut};

use super::error::{DecodeError, EncodeError};

/// Size of the Int32 length word that starts every frame body.
pub(super) const LEN_SIZE: usize = 4;
/// Size of a tag byte plus the length word.
pub(super) const TAGGED_HEADER_SIZE: usize = 1 + LEN_SIZE;

/// Validates a length word against the fixed header size and the cap, before
/// anything is allocated for the frame.
fn check_len(len: i32, min: usize, max: usize) -> Result<usize, DecodeError> {
    let too_small = DecodeError::InvalidLength { len, min };
    let len = usize::try_from(len).map_err(|_| too_small.clone())?;
    if len < min {
        return Err(too_small);
    }
    if len > max {
        return Err(DecodeError::FrameTooLarge { len, max });
    }
    Ok(len)
}

/// Splits one complete tagged frame (tag, length word and body) off `src`.
///
/// The tag is checked as soon as it arrives and the length as soon as the
/// header is complete, so garbage is rejected without waiting for a body the
/// peer may never send. Returns `Ok(None)` without consuming anything while
/// the frame is incomplete.
pub(super) fn split_tagged(
    src: &mut BytesMut,
    max_len: usize,
    known_tag: fn(u8) -> bool,
) -> Result<Option<(u8, Bytes)>, DecodeError> {
    let Some(&tag) = src.first() else {
        return Ok(None);
    };
    if !known_tag(tag) {
        return Err(DecodeError::UnknownTag(tag));
    }
    let Some(len) = src.get(1..).and_then(|rest| rest.first_chunk::<LEN_SIZE>()) else {
        return Ok(None);
    };
    let len = check_len(i32::from_be_bytes(*len), LEN_SIZE, max_len)?;
    let Some(total) = len.checked_add(1) else {
        return Err(DecodeError::FrameTooLarge { len, max: max_len });
    };
    if src.len() < total {
        return Ok(None);
    }
    Ok(Some((tag, src.split_to(total).freeze())))
}

/// Splits one complete untagged startup-phase packet (length word and body)
/// off `src`; same contract as [`split_tagged`].
pub(super) fn split_untagged(
    src: &mut BytesMut,
    min_len: usize,
    max_len: usize,
) -> Result<Option<Bytes>, DecodeError> {
    let Some(len) = src.first_chunk::<LEN_SIZE>() else {
        return Ok(None);
    };
    let len = check_len(i32::from_be_bytes(*len), min_len, max_len)?;
    if src.len() < len {
        return Ok(None);
    }
    Ok(Some(src.split_to(len).freeze()))
}

/// Bounds-checked cursor over one frame. Every read either returns a value
/// that lies entirely inside the frame or an error naming the message, so no
/// input can make the codec panic or read out of bounds.
pub(super) struct Reader {
    buf: Bytes,
    pos: usize,
    message: &'static str,
}

impl Reader {
    /// Starts reading `frame` at `start` (just past the header), attributing
    /// errors to `message`.
    pub(super) fn new(frame: Bytes, start: usize, message: &'static str) -> Self {
        // Clamped so that a caller mistake cannot put the cursor past the end.
        let pos = start.min(frame.len());
        Self {
            buf: frame,
            pos,
            message,
        }
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn truncated(&self) -> DecodeError {
        DecodeError::Truncated {
            message: self.message,
        }
    }

    pub(super) fn malformed(&self, reason: &'static str) -> DecodeError {
        DecodeError::Malformed {
            message: self.message,
            reason,
        }
    }

    pub(super) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let value = self
            .buf
            .get(self.pos..)
            .and_then(|rest| rest.first_chunk::<N>())
            .copied()
            .ok_or_else(|| self.truncated())?;
        self.pos = self.pos.saturating_add(N);
        Ok(value)
    }

    pub(super) fn u8(&mut self) -> Result<u8, DecodeError> {
        self.array::<1>().map(u8::from_be_bytes)
    }

    pub(super) fn i8(&mut self) -> Result<i8, DecodeError> {
        self.array::<1>().map(i8::from_be_bytes)
    }

    pub(super) fn i16(&mut self) -> Result<i16, DecodeError> {
        self.array::<2>().map(i16::from_be_bytes)
    }

    pub(super) fn i32(&mut self) -> Result<i32, DecodeError> {
        self.array::<4>().map(i32::from_be_bytes)
    }

    /// Reads an Int32 that PostgreSQL treats as unsigned (object IDs).
    pub(super) fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array::<4>().map(u32::from_be_bytes)
    }

    /// Reads an Int16 element count and checks that `min_item_len` bytes per
    /// element can still follow, so a forged count cannot trigger a large
    /// allocation. The count is read unsigned because that is how the server
    /// reads it (`pq_getmsgint(msg, 2)`), and libpq sends up to 65535
    /// parameters.
    pub(super) fn count16(&mut self, min_item_len: usize) -> Result<usize, DecodeError> {
        let count = usize::from(self.array::<2>().map(u16::from_be_bytes)?);
        self.check_count(count, min_item_len)?;
        Ok(count)
    }

    /// Like [`Reader::count16`] for the one Int32 count (NegotiateProtocolVersion).
    pub(super) fn count32(&mut self, min_item_len: usize) -> Result<usize, DecodeError> {
        let count = usize::try_from(self.i32()?).map_err(|_| self.malformed("negative count"))?;
        self.check_count(count, min_item_len)?;
        Ok(count)
    }

    fn check_count(&self, count: usize, min_item_len: usize) -> Result<(), DecodeError> {
        if count.saturating_mul(min_item_len) > self.remaining() {
            return Err(self.truncated());
        }
        Ok(())
    }

    /// Reads a NUL-terminated string without the terminator.
    pub(super) fn cstr_bytes(&mut self) -> Result<&[u8], DecodeError> {
        let message = self.message;
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::MissingNul { message })?;
        let value = rest.get(..nul).unwrap_or_default();
        self.pos = self.pos.saturating_add(nul).saturating_add(1);
        Ok(value)
    }

    /// Reads a NUL-terminated string that must be valid UTF-8.
    pub(super) fn cstr(&mut self) -> Result<String, DecodeError> {
        let message = self.message;
        let raw = self.cstr_bytes()?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidUtf8 { message })
    }

    /// Returns the next `n` bytes as a zero-copy slice of the frame.
    pub(super) fn bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if n > self.remaining() {
            return Err(self.truncated());
        }
        let end = self.pos.saturating_add(n);
        let value = self.buf.slice(self.pos..end);
        self.pos = end;
        Ok(value)
    }

    /// Reads an Int32 length followed by that many bytes; length -1 is NULL.
    pub(super) fn nullable_bytes(&mut self) -> Result<Option<Bytes>, DecodeError> {
        match self.i32()? {
            -1 => Ok(None),
            len => {
                let len =
                    usize::try_from(len).map_err(|_| self.malformed("negative value length"))?;
                self.bytes(len).map(Some)
            }
        }
    }

    /// Returns everything left in the frame.
    pub(super) fn rest(&mut self) -> Bytes {
        self.bytes(self.remaining()).unwrap_or_default()
    }

    /// Ends the read, rejecting bytes the message type does not define: a
    /// peer must not be able to smuggle data past the parser.
    pub(super) fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes {
                message: self.message,
                count,
            }),
        }
    }
}

/// Writes one frame: optional tag, Int32 length, then whatever `body` puts.
/// The length word is patched in afterwards; on any error `dst` is truncated
/// back so no partial frame is ever left behind.
pub(super) fn write_frame<F>(
    dst: &mut BytesMut,
    tag: Option<u8>,
    message: &'static str,
    body: F,
) -> Result<(), EncodeError>
where
    F: FnOnce(&mut BytesMut) -> Result<(), EncodeError>,
{
    let start = dst.len();
    if let Some(tag) = tag {
        dst.put_u8(tag);
    }
    let len_at = dst.len();
    dst.put_i32(0);
    let result = body(dst).and_then(|()| {
        let len = dst.len().saturating_sub(len_at);
        let word = i32::try_from(len).map_err(|_| EncodeError::TooLarge { message, len })?;
        match dst.get_mut(len_at..len_at.saturating_add(LEN_SIZE)) {
            Some(slot) => {
                slot.copy_from_slice(&word.to_be_bytes());
                Ok(())
            }
            None => Err(EncodeError::Invalid {
                message,
                reason: "length word vanished while encoding",
            }),
        }
    });
    if result.is_err() {
        dst.truncate(start);
    }
    result
}

/// Writes a NUL-terminated string, refusing interior NULs.
pub(super) fn put_cstr(
    dst: &mut BytesMut,
    s: &str,
    message: &'static str,
) -> Result<(), EncodeError> {
    put_cstr_bytes(dst, s.as_bytes(), message)
}

pub(super) fn put_cstr_bytes(
    dst: &mut BytesMut,
    s: &[u8],
    message: &'static str,
) -> Result<(), EncodeError> {
    if s.contains(&0) {
        return Err(EncodeError::InteriorNul { message });
    }
    dst.put_slice(s);
    dst.put_u8(0);
    Ok(())
}

/// Writes an Int16 element count (read back unsigned, see [`Reader::count16`]).
pub(super) fn put_count16(
    dst: &mut BytesMut,
    count: usize,
    message: &'static str,
) -> Result<(), EncodeError> {
    let word = u16::try_from(count).map_err(|_| EncodeError::TooManyItems {
        message,
        count,
        max: usize::from(u16::MAX),
    })?;
    dst.put_u16(word);
    Ok(())
}

/// Writes an Int32 length and the bytes, or length -1 for NULL.
pub(super) fn put_nullable(
    dst: &mut BytesMut,
    value: Option<&[u8]>,
    message: &'static str,
) -> Result<(), EncodeError> {
    match value {
        None => dst.put_i32(-1),
        Some(value) => {
            let len = value.len();
            let word = i32::try_from(len).map_err(|_| EncodeError::TooLarge { message, len })?;
            dst.put_i32(word);
            dst.put_slice(value);
        }
    }
    Ok(())
}
