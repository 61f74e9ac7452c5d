//! Rendering of masking styles: redaction markers, `keep_last`, keyed hash,
//! and in-place replacement of detector matches inside a text.
//!
//! Every string produced here is free of `"`, `\`, `,`, `{`, `}`, `(`, `)`
//! and whitespace (except the characters `keep_last` keeps from the original
//! text itself), so substituting it inside JSON strings, array or composite
//! literals never changes their structure.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::MaskError;
use super::config::{Action, Detector};
use super::detect::find_matches;

/// Marker that replaces a whole value under `redact`.
pub const REDACTED: &str = "[REDACTED]";

/// Character that replaces masked characters under `keep_last`.
pub const MASK_CHAR: char = '*';

/// Prefix of hashed values.
pub const HASH_PREFIX: &str = "h:";

/// Number of hex characters after [`HASH_PREFIX`] (64 bits of the HMAC).
pub const HASH_HEX_LEN: usize = 16;

/// Marker that replaces a detector match under `redact`: `[REDACTED:email]`.
pub fn detector_marker(d: Detector) -> String {
    format!("[REDACTED:{}]", d.name())
}

/// Keyed deterministic hasher: HMAC-SHA256 with the masking key.
#[derive(Clone)]
pub struct Hasher {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hasher(..)")
    }
}

impl Hasher {
    /// A hasher keyed with `key` (HMAC accepts any key length).
    pub fn new(key: &[u8]) -> Result<Hasher, MaskError> {
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
            .map_err(|e| MaskError::Config(format!("masking key: {e}")))?;
        Ok(Hasher { mac })
    }

    /// `h:` + the first 16 hex characters of HMAC-SHA256(key, data).
    pub fn hash(&self, data: &[u8]) -> String {
        let mut mac = self.mac.clone();
        mac.update(data);
        let digest = mac.finalize().into_bytes();
        let mut out = String::with_capacity(HASH_PREFIX.len() + HASH_HEX_LEN);
        out.push_str(HASH_PREFIX);
        for b in digest.iter().take(HASH_HEX_LEN / 2) {
            push_hex(&mut out, *b);
        }
        out
    }
}

fn push_hex(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for nibble in [b >> 4, b & 0x0f] {
        out.push(char::from(
            HEX.get(usize::from(nibble)).copied().unwrap_or(b'0'),
        ));
    }
}

/// Mask all but the last `keep` characters with `*`. A value of `keep`
/// characters or fewer is masked entirely (it would otherwise be revealed).
pub fn keep_last(s: &str, keep: u32) -> String {
    let total = s.chars().count();
    let keep = usize::try_from(keep).unwrap_or(usize::MAX);
    if total <= keep {
        return MASK_CHAR.to_string().repeat(total);
    }
    let masked = total - keep;
    let mut out = String::with_capacity(s.len());
    for (i, c) in s.chars().enumerate() {
        out.push(if i < masked { MASK_CHAR } else { c });
    }
    out
}

/// Render `action` over a whole value given as bytes. `None` when the
/// action needs characters (`keep_last`) and the bytes are not UTF-8.
pub fn render_value(action: Action, value: &[u8], hasher: &Hasher) -> Option<String> {
    match action {
        Action::Redact => Some(REDACTED.to_owned()),
        Action::Hash => Some(hasher.hash(value)),
        Action::KeepLast(n) => std::str::from_utf8(value).ok().map(|s| keep_last(s, n)),
    }
}

/// Render `action` over one detector match.
pub fn render_match(action: Action, d: Detector, matched: &str, hasher: &Hasher) -> String {
    match action {
        Action::Redact => detector_marker(d),
        Action::Hash => hasher.hash(matched.as_bytes()),
        Action::KeepLast(n) => keep_last(matched, n),
    }
}

/// Replace every detector match in `text` in place (the rest is kept).
/// `None` when nothing matched.
pub fn mask_text(text: &str, detectors: &[(Detector, Action)], hasher: &Hasher) -> Option<String> {
    if detectors.is_empty() || text.is_empty() {
        return None;
    }
    let kinds: Vec<Detector> = detectors.iter().map(|(d, _)| *d).collect();
    let matches = find_matches(text, &kinds);
    if matches.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(text.len() + 16 * matches.len());
    let mut last = 0;
    let action_of = |d: Detector| {
        detectors
            .iter()
            .find(|(x, _)| *x == d)
            .map_or(Action::Redact, |(_, a)| *a)
    };
    for m in matches {
        // A merged range gets the strongest action of the detectors in it.
        let action = m
            .merged
            .iter()
            .fold(action_of(m.detector), |a, d| a.stronger(action_of(*d)));
        out.push_str(text.get(last..m.start).unwrap_or(""));
        out.push_str(&render_match(
            action,
            m.detector,
            text.get(m.start..m.end).unwrap_or(""),
            hasher,
        ));
        last = m.end;
    }
    out.push_str(text.get(last..).unwrap_or(""));
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;

    fn hasher(key: &[u8]) -> Hasher {
        Hasher::new(key).unwrap()
    }

    #[test]
    fn redact_style() {
        let h = hasher(b"k");
        assert_eq!(
            render_value(Action::Redact, b"alice@example.com", &h).unwrap(),
            "[REDACTED]"
        );
        // Redaction does not need UTF-8.
        assert_eq!(
            render_value(Action::Redact, &[0xff, 0xfe], &h).unwrap(),
            "[REDACTED]"
        );
    }

    #[test]
    fn keep_last_style() {
        assert_eq!(keep_last("4111111111111111", 4), "************1111");
        assert_eq!(keep_last("abc", 0), "***");
        assert_eq!(keep_last("1234", 4), "****");
        assert_eq!(keep_last("12", 4), "**");
        assert_eq!(keep_last("", 4), "");
        assert_eq!(keep_last("zoë-123", 3), "****123");
        assert_eq!(keep_last("123ë", 1), "***ë");
        let h = hasher(b"k");
        assert_eq!(
            render_value(Action::KeepLast(4), b"4111111111111111", &h).unwrap(),
            "************1111"
        );
        assert!(render_value(Action::KeepLast(4), &[b'a', 0xff, b'b'], &h).is_none());
    }

    #[test]
    fn hash_style_is_deterministic_and_keyed() {
        let h1 = hasher(b"0123456789abcdef-key-one");
        let h2 = hasher(b"0123456789abcdef-key-two");
        let a = h1.hash(b"alice@example.com");
        assert_eq!(a, h1.hash(b"alice@example.com"));
        assert_eq!(
            a,
            hasher(b"0123456789abcdef-key-one").hash(b"alice@example.com")
        );
        assert_ne!(a, h1.hash(b"bob@example.com"));
        assert_ne!(a, h2.hash(b"alice@example.com"));
        assert!(a.starts_with("h:"));
        assert_eq!(a.len(), 2 + 16);
        assert!(
            a[2..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(
            render_value(Action::Hash, b"alice@example.com", &h1).unwrap(),
            a
        );
    }

    #[test]
    fn hash_matches_reference_hmac() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let h = hasher(b"Jefe");
        assert_eq!(
            h.hash(b"what do ya want for nothing?"),
            "h:5bdcc146bf60754e"
        );
    }

    #[test]
    fn mask_text_replaces_in_place() {
        let h = hasher(b"k");
        let dets = [
            (Detector::Email, Action::Redact),
            (Detector::CreditCard, Action::KeepLast(4)),
            (Detector::UsSsn, Action::Hash),
        ];
        let text = "Mail alice@example.com, card 4111 1111 1111 1111, ssn 123-45-6789.";
        let out = mask_text(text, &dets, &h).unwrap();
        let ssn = h.hash(b"123-45-6789");
        assert_eq!(
            out,
            format!("Mail [REDACTED:email], card ***************1111, ssn {ssn}.")
        );
        assert!(mask_text("nothing sensitive 12345", &dets, &h).is_none());
        assert!(mask_text("alice@example.com", &[], &h).is_none());
    }

    #[test]
    fn overlapping_matches_leave_no_digit_of_either() {
        let h = hasher(b"k");
        let text = "+1 4111 1111 1111 1111";
        let dets = [
            (Detector::Phone, Action::Redact),
            (Detector::CreditCard, Action::Redact),
        ];
        let out = mask_text(text, &dets, &h).unwrap();
        assert_eq!(out, "[REDACTED:credit_card]");
        assert!(!out.chars().any(|c| c.is_ascii_digit()), "{out}");

        // The merged range gets the strongest action of its detectors.
        let dets = [
            (Detector::Phone, Action::Redact),
            (Detector::CreditCard, Action::KeepLast(4)),
        ];
        let out = mask_text(&format!("tel {text}."), &dets, &h).unwrap();
        assert_eq!(out, "tel [REDACTED:credit_card].");
        let dets = [
            (Detector::Phone, Action::KeepLast(2)),
            (Detector::CreditCard, Action::KeepLast(4)),
        ];
        let out = mask_text(text, &dets, &h).unwrap();
        assert_eq!(out, "********************11");
    }

    #[test]
    fn markers_are_structure_safe() {
        let h = hasher(b"k");
        let mut outs: Vec<String> = Detector::ALL.iter().map(|d| detector_marker(*d)).collect();
        outs.push(REDACTED.to_owned());
        outs.push(h.hash(b"x"));
        for s in outs {
            assert!(
                !s.chars()
                    .any(|c| matches!(c, '"' | '\\' | ',' | '{' | '}' | '(' | ')')
                        || c.is_whitespace()),
                "{s}"
            );
        }
    }
}
