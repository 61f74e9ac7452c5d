//! JSON-aware masking: detectors run on the *decoded* content of every JSON
//! string (keys included) and on number tokens; a changed string is
//! re-encoded, a changed number becomes a JSON string. Everything else is
//! copied byte for byte, so the output is valid JSON whenever the input is.

use std::borrow::Cow;

/// The JSON text is not well-formed (unterminated string, bad escape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// Apply `f` to every string content (decoded) and number token of `text`.
/// `f` returns `Some(replacement)` to change it. Returns `Ok(None)` when
/// nothing changed.
pub fn mask_json(
    text: &str,
    mut f: impl FnMut(&str) -> Option<String>,
) -> Result<Option<String>, Malformed> {
    let bytes = text.as_bytes();
    let mut out = String::new();
    let mut copied = 0;
    let mut changed = false;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'"' => {
                let end = string_end(bytes, i + 1)?;
                let raw = text.get(i + 1..end).ok_or(Malformed)?;
                let decoded = decode_string(raw)?;
                if let Some(masked) = f(&decoded) {
                    out.push_str(text.get(copied..i).ok_or(Malformed)?);
                    push_json_string(&mut out, &masked);
                    copied = end + 1;
                    changed = true;
                }
                i = end + 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while bytes
                    .get(i)
                    .is_some_and(|c| matches!(c, b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-'))
                {
                    i += 1;
                }
                let token = text.get(start..i).ok_or(Malformed)?;
                if let Some(masked) = f(token) {
                    out.push_str(text.get(copied..start).ok_or(Malformed)?);
                    push_json_string(&mut out, &masked);
                    copied = i;
                    changed = true;
                }
            }
            _ => i += 1,
        }
    }
    if !changed {
        return Ok(None);
    }
    out.push_str(text.get(copied..).ok_or(Malformed)?);
    Ok(Some(out))
}

/// If `text` (surrounding whitespace aside) is a single JSON string, its
/// decoded content.
pub fn top_level_string(text: &str) -> Option<String> {
    let t = text.trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r'));
    let inner = t.strip_prefix('"')?;
    let end = string_end(inner.as_bytes(), 0).ok()?;
    if end + 1 != inner.len() {
        return None;
    }
    decode_string(inner.get(..end)?).ok().map(Cow::into_owned)
}

/// Index of the closing quote of a string whose content starts at `from`.
fn string_end(bytes: &[u8], from: usize) -> Result<usize, Malformed> {
    let mut j = from;
    loop {
        match bytes.get(j) {
            None => return Err(Malformed),
            Some(b'\\') => j += 2,
            Some(b'"') => return Ok(j),
            Some(_) => j += 1,
        }
    }
}

/// Decode the content of a JSON string (between the quotes). Lone
/// surrogates become U+FFFD.
pub fn decode_string(raw: &str) -> Result<Cow<'_, str>, Malformed> {
    if !raw.contains('\\') {
        return Ok(Cow::Borrowed(raw));
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next().ok_or(Malformed)? {
            '"' => out.push('"'),
            '\\' => out.push('\\'),
            '/' => out.push('/'),
            'b' => out.push('\u{8}'),
            'f' => out.push('\u{c}'),
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            'u' => {
                let hi = hex4(&mut chars)?;
                if (0xD800..0xDC00).contains(&hi) {
                    // Expect a low surrogate escape next.
                    let mut look = chars.clone();
                    if look.next() == Some('\\') && look.next() == Some('u') {
                        let lo = hex4(&mut look)?;
                        if (0xDC00..0xE000).contains(&lo) {
                            let cp = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
                            out.push(char::from_u32(cp).unwrap_or('\u{FFFD}'));
                            chars = look;
                            continue;
                        }
                    }
                    out.push('\u{FFFD}');
                } else {
                    out.push(char::from_u32(hi).unwrap_or('\u{FFFD}'));
                }
            }
            _ => return Err(Malformed),
        }
    }
    Ok(Cow::Owned(out))
}

fn hex4(chars: &mut std::str::Chars<'_>) -> Result<u32, Malformed> {
    let mut v = 0;
    for _ in 0..4 {
        let d = chars.next().and_then(|c| c.to_digit(16)).ok_or(Malformed)?;
        v = v * 16 + d;
    }
    Ok(v)
}

/// Append `s` as a JSON string literal (quotes included).
pub fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `s` as a JSON string literal.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    push_json_string(&mut out, s);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;

    fn upper_x(s: &str) -> Option<String> {
        s.contains('x').then(|| s.replace('x', "X"))
    }

    #[test]
    fn strings_keys_and_numbers() {
        let out = mask_json(r#"{"x": "axb", "n": 12, "y": [1, "x"]}"#, upper_x)
            .unwrap()
            .unwrap();
        assert_eq!(out, r#"{"X": "aXb", "n": 12, "y": [1, "X"]}"#);
        assert_eq!(
            mask_json(r#"{"a": "b", "c": -1.5e3}"#, upper_x).unwrap(),
            None
        );
        let out = mask_json(r#"{"n": 4111, "m": 7}"#, |s| {
            (s == "4111").then(|| "****".to_owned())
        })
        .unwrap()
        .unwrap();
        assert_eq!(out, r#"{"n": "****", "m": 7}"#);
    }

    #[test]
    fn escapes_are_decoded_and_reencoded() {
        // "\nfoo" must be seen as newline + "foo", never as "nfoo".
        let mut seen = Vec::new();
        let _ = mask_json(r#"["\nfoo", "a\"b", "\u00e9\ud83d\ude00"]"#, |s| {
            seen.push(s.to_owned());
            None
        })
        .unwrap();
        assert_eq!(seen, ["\nfoo", "a\"b", "é😀"]);
        let out = mask_json(r#"["x\n\"q\""]"#, |s| Some(s.replace('x', "\\")))
            .unwrap()
            .unwrap();
        assert_eq!(out, r#"["\\\n\"q\""]"#);
        assert_eq!(decode_string(r"\ud800x").unwrap(), "\u{FFFD}x");
    }

    #[test]
    fn malformed_is_reported() {
        assert_eq!(
            mask_json(r#"{"a": "unterminated}"#, upper_x),
            Err(Malformed)
        );
        assert_eq!(mask_json(r#"["bad \q escape x"]"#, upper_x), Err(Malformed));
    }

    #[test]
    fn top_level() {
        assert_eq!(top_level_string(r#" "a\tb" "#).unwrap(), "a\tb");
        assert!(top_level_string(r#""a" "b""#).is_none());
        assert!(top_level_string(r#"{"a": "b"}"#).is_none());
        assert_eq!(json_string("q\"\\\u{1}"), r#""q\"\\\u0001""#);
    }
}
