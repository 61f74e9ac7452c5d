//! Detectors: find sensitive substrings inside a text value.
//!
//! Every detector is a regex (compiled once, lazily) plus a validator
//! (Luhn, SSN ranges, NANP ranges, mod-97, boundaries). [`find_matches`]
//! returns non-overlapping byte ranges; matches that overlap (from one or
//! several detectors) are merged into one range covering their union, so no
//! part of any match is left unmasked (`+1 4111 1111 1111 1111` is both a
//! phone number and a card number).

use std::sync::LazyLock;

use regex::Regex;

use super::config::Detector;

/// One detector match: byte range `start..end` in the inspected text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    /// Start byte offset.
    pub start: usize,
    /// End byte offset (exclusive).
    pub end: usize,
    /// Which detector matched; for merged matches, the detector of the
    /// longest one (the earliest on a tie), whose name labels the range.
    pub detector: Detector,
    /// Other detectors whose matches overlapped and were merged into this
    /// range (empty for a single match). The renderer applies the strongest
    /// action among `detector` and these.
    pub merged: Vec<Detector>,
}

fn re(pattern: &str) -> Regex {
    // The patterns are constants covered by tests; a failure here is a bug
    // caught by `cargo test`, never a runtime input problem.
    match Regex::new(pattern) {
        Ok(r) => r,
        Err(e) => panic!("invalid built-in detector regex {pattern:?}: {e}"),
    }
}

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"\b[\p{L}\p{N}._%+\-]+@[\p{L}\p{N}](?:[\p{L}\p{N}\-]{0,61}[\p{L}\p{N}])?(?:\.[\p{L}\p{N}](?:[\p{L}\p{N}\-]{0,61}[\p{L}\p{N}])?)*\.\p{L}{2,24}\b",
    )
});
static CARD: LazyLock<Regex> = LazyLock::new(|| re(r"\b[0-9](?:[ \-]?[0-9]){12,18}\b"));
static SSN: LazyLock<Regex> = LazyLock::new(|| re(r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b"));
static PHONE_E164: LazyLock<Regex> = LazyLock::new(|| re(r"\+[1-9][0-9]{7,14}\b"));
static PHONE_INTL: LazyLock<Regex> =
    LazyLock::new(|| re(r"\+[1-9][0-9]{0,3}(?:[ \-][0-9]{1,4}){2,6}\b"));
static PHONE_US: LazyLock<Regex> = LazyLock::new(|| {
    re(r"(?:\+?1[ .\-]?)?(?:\([2-9][0-9]{2}\) ?|[2-9][0-9]{2}[ .\-])[2-9][0-9]{2}[ .\-][0-9]{4}\b")
});
static IBAN_COMPACT: LazyLock<Regex> = LazyLock::new(|| re(r"\b[A-Z]{2}[0-9]{2}[A-Z0-9]{11,30}\b"));
static IBAN_GROUPED: LazyLock<Regex> =
    LazyLock::new(|| re(r"\b[A-Z]{2}[0-9]{2}(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,3})?\b"));
static AWS_KEY: LazyLock<Regex> = LazyLock::new(|| re(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"));
static JWT: LazyLock<Regex> =
    LazyLock::new(|| re(r"\beyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{2,}\.[A-Za-z0-9_\-]*"));
static PRIVATE_KEY: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----(?s:.*?)(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\z)",
    )
});

/// Find all matches of `detectors` in `text`, sorted by start, overlapping
/// matches merged (see [`Match`]).
pub fn find_matches(text: &str, detectors: &[Detector]) -> Vec<Match> {
    let mut all = Vec::new();
    for &d in detectors {
        find_one(text, d, &mut all);
    }
    if all.len() > 1 {
        // Earliest start first, then the longest.
        all.sort_by(|a, b| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));
        let mut kept: Vec<Match> = Vec::with_capacity(all.len());
        // Length of the match that labels `kept.last()`.
        let mut label_len = 0;
        for m in all {
            match kept.last_mut() {
                Some(last) if m.start < last.end => {
                    last.end = last.end.max(m.end);
                    let mut other = m.detector;
                    // Strictly longer takes the label: on a tie the earlier
                    // start (already the label) keeps it.
                    if m.end - m.start > label_len {
                        label_len = m.end - m.start;
                        std::mem::swap(&mut last.detector, &mut other);
                    }
                    if other != last.detector && !last.merged.contains(&other) {
                        last.merged.push(other);
                    }
                }
                _ => {
                    label_len = m.end - m.start;
                    kept.push(m);
                }
            }
        }
        // A detector that labels the range is not also listed as merged.
        for m in &mut kept {
            let label = m.detector;
            m.merged.retain(|d| *d != label);
        }
        return kept;
    }
    all
}

/// Whether any of `detectors` matches in `text`.
pub fn contains_match(text: &str, detectors: &[Detector]) -> bool {
    let mut v = Vec::new();
    detectors.iter().any(|&d| {
        find_one(text, d, &mut v);
        !v.is_empty()
    })
}

/// Whether any of `detectors` matches in a value of unknown binary layout.
///
/// The value is cut into runs of valid UTF-8 without control characters
/// (invalid bytes and control characters end a run; no detector pattern
/// spans one, and a private key block is matched from its BEGIN line alone),
/// and each run is scanned as text. Container send formats (`array_send`,
/// `record_send`, extension types such as hstore) put a big-endian `int32`
/// length before each element; its low bytes can be printable (an element of
/// 52 bytes has length byte `'4'`) and glue onto the element's first
/// character, which defeats the detectors' word-boundary checks. So each run
/// is also scanned without its first 1 to 4 characters: one of these starts
/// exactly at the element. Reading the bytes through lossy UTF-8 instead
/// would fill random data with U+FFFD, which sends the Unicode-aware regexes
/// to their slow path (over a second per MiB).
pub fn contains_match_in_bytes(bytes: &[u8], detectors: &[Detector]) -> bool {
    // Nothing precedes the run at offset 0 (a citext value is one such run).
    let mut first = true;
    bytes.utf8_chunks().any(|chunk| {
        chunk.valid().split(char::is_control).any(|run| {
            let drops = if std::mem::take(&mut first) { 0 } else { 4 };
            run_matches(run, drops, detectors)
        })
    })
}

/// Whether `run`, or `run` without its first 1 to `drops` characters, matches.
fn run_matches(run: &str, drops: usize, detectors: &[Detector]) -> bool {
    let mut rest = run;
    for _ in 0..=drops {
        if rest.is_empty() {
            return false;
        }
        if contains_match(rest, detectors) {
            return true;
        }
        let mut chars = rest.chars();
        chars.next();
        rest = chars.as_str();
    }
    false
}

/// Accepted length of a candidate (a prefix of it), or `None`.
type Accept<'a> = &'a dyn Fn(&str, usize, &str) -> Option<usize>;

fn find_one(text: &str, d: Detector, out: &mut Vec<Match>) {
    let mut push = |start: usize, end: usize| {
        out.push(Match {
            start,
            end,
            detector: d,
            merged: Vec::new(),
        })
    };
    let whole: Accept = &|_, _, c| Some(c.len());
    match d {
        Detector::Email => {
            if text.contains('@') {
                scan(&EMAIL, text, whole, &mut push);
            }
        }
        Detector::CreditCard => {
            if count_digits(text) >= 13 {
                // A following digit group may have been swallowed: retry on
                // shorter prefixes cut at a separator.
                let accept: Accept = &|_, _, c| longest_valid_prefix(c, b" -", 13, card_ok);
                scan(&CARD, text, accept, &mut push);
            }
        }
        Detector::UsSsn => {
            if text.contains('-') {
                let accept: Accept = &|_, _, c| ssn_ok(c).then_some(c.len());
                scan(&SSN, text, accept, &mut push);
            }
        }
        Detector::Phone => {
            if count_digits(text) >= 8 {
                let us: Accept = &|t, s, c| phone_boundary_ok(t, s, s + c.len()).then_some(c.len());
                scan(&PHONE_US, text, us, &mut push);
                scan(&PHONE_E164, text, us, &mut push);
                let intl: Accept = &|t, s, c| {
                    let n =
                        longest_valid_prefix(c, b" -", 8, |p| (8..=15).contains(&count_digits(p)))?;
                    phone_boundary_ok(t, s, s + n).then_some(n)
                };
                scan(&PHONE_INTL, text, intl, &mut push);
            }
        }
        Detector::Iban => {
            if count_digits(text) >= 2 {
                let compact: Accept = &|_, _, c| iban_ok(c).then_some(c.len());
                scan(&IBAN_COMPACT, text, compact, &mut push);
                // A following 4-character word may have been swallowed as a group.
                let grouped: Accept = &|_, _, c| longest_valid_prefix(c, b" ", 15, iban_ok);
                scan(&IBAN_GROUPED, text, grouped, &mut push);
            }
        }
        Detector::AwsAccessKey => {
            if text.contains("AKIA") || text.contains("ASIA") {
                scan(&AWS_KEY, text, whole, &mut push);
            }
        }
        Detector::Jwt => {
            if text.contains("eyJ") {
                // Not a fourth segment glued to the third (JWE, random dotted ids).
                let accept: Accept = &|t, s, c| {
                    let b = t.as_bytes();
                    let e = s + c.len();
                    let fourth =
                        b.get(e) == Some(&b'.') && b.get(e + 1).is_some_and(|&x| is_b64url(x));
                    (!fourth).then_some(c.len())
                };
                scan(&JWT, text, accept, &mut push);
            }
        }
        Detector::PrivateKey => {
            if text.contains("-----BEGIN ") {
                scan(&PRIVATE_KEY, text, whole, &mut push);
            }
        }
    }
}

fn is_b64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

fn count_digits(text: &str) -> usize {
    text.bytes().filter(u8::is_ascii_digit).count()
}

/// Run `re` over `text`. `accept(text, start, candidate)` says how much of
/// the candidate is a real match; a rejected candidate is retried one
/// character later so an overlapping valid candidate is not missed.
fn scan(re: &Regex, text: &str, accept: Accept, push: &mut impl FnMut(usize, usize)) {
    let mut at = 0;
    while at <= text.len() {
        let Some(m) = re.find_at(text, at) else { break };
        match accept(text, m.start(), m.as_str()) {
            Some(len) if len > 0 => {
                push(m.start(), m.start() + len);
                at = m.start() + len;
            }
            _ => at = next_char_boundary(text, m.start()),
        }
    }
}

fn next_char_boundary(text: &str, i: usize) -> usize {
    let mut j = i + 1;
    while j < text.len() && !text.is_char_boundary(j) {
        j += 1;
    }
    j
}

/// The longest prefix of `cand` (the whole, or cut just before one of `seps`)
/// at least `min_len` bytes long that satisfies `ok`.
fn longest_valid_prefix(
    cand: &str,
    seps: &[u8],
    min_len: usize,
    ok: impl Fn(&str) -> bool,
) -> Option<usize> {
    let mut end = cand.len();
    loop {
        let sub = cand.get(..end)?;
        if sub.len() < min_len {
            return None;
        }
        if ok(sub) {
            return Some(end);
        }
        end = sub.bytes().rposition(|b| seps.contains(&b))?;
    }
}

/// Luhn check over the digits of a candidate with 13-19 digits.
pub(crate) fn card_ok(candidate: &str) -> bool {
    let digits: Vec<u32> = candidate.chars().filter_map(|c| c.to_digit(10)).collect();
    (13..=19).contains(&digits.len()) && luhn(&digits)
}

pub(crate) fn luhn(digits: &[u32]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// `AAA-GG-SSSS`: area not 000, 666 or 9xx; group not 00; serial not 0000.
pub(crate) fn ssn_ok(candidate: &str) -> bool {
    let mut parts = candidate.split('-');
    let (Some(area), Some(group), Some(serial)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    !(area == "000" || area == "666" || area.starts_with('9') || group == "00" || serial == "0000")
}

/// A phone number must not be glued to letters, digits, `+`, or be part of
/// a longer dotted/dashed number.
fn phone_boundary_ok(text: &str, s: usize, e: usize) -> bool {
    let bytes = text.as_bytes();
    let before_ok = match s.checked_sub(1).and_then(|i| bytes.get(i)) {
        None => true,
        Some(&b) => !(b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-' | b'.')),
    };
    let after_ok = match bytes.get(e) {
        None => true,
        Some(&b) => {
            let glued = b.is_ascii_alphanumeric() || b == b'_';
            let longer_number =
                matches!(b, b'-' | b'.') && bytes.get(e + 1).is_some_and(u8::is_ascii_digit);
            !glued && !longer_number
        }
    };
    before_ok && after_ok
}

/// IBAN: 2 letters, 2 check digits, 11-30 alphanumerics (spaces ignored),
/// mod-97 of the rearranged number equals 1.
pub(crate) fn iban_ok(candidate: &str) -> bool {
    let compact: Vec<u8> = candidate.bytes().filter(|b| *b != b' ').collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let (head, rest) = compact.split_at(4);
    let mut rem: u32 = 0;
    for &b in rest.iter().chain(head.iter()) {
        rem = match b {
            b'0'..=b'9' => (rem * 10 + u32::from(b - b'0')) % 97,
            b'A'..=b'Z' => (rem * 100 + u32::from(b - b'A') + 10) % 97,
            _ => return false,
        };
    }
    rem == 1
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;

    fn found(text: &str, d: Detector) -> Vec<&str> {
        find_matches(text, &[d])
            .into_iter()
            .map(|m| &text[m.start..m.end])
            .collect()
    }

    #[test]
    fn all_regexes_compile() {
        for r in [
            &EMAIL,
            &CARD,
            &SSN,
            &PHONE_E164,
            &PHONE_INTL,
            &PHONE_US,
            &IBAN_COMPACT,
            &IBAN_GROUPED,
            &AWS_KEY,
            &JWT,
            &PRIVATE_KEY,
        ] {
            let _ = r.as_str();
        }
    }

    #[test]
    fn email() {
        assert_eq!(
            found(
                "Please contact alice.smith+tag@example.co.uk today.",
                Detector::Email
            ),
            ["alice.smith+tag@example.co.uk"]
        );
        assert_eq!(
            found("a@b.io,c@d.org", Detector::Email),
            ["a@b.io", "c@d.org"]
        );
        assert_eq!(
            found("BOB@EXAMPLE.COM", Detector::Email),
            ["BOB@EXAMPLE.COM"]
        );
        assert_eq!(
            found("écrire à zoë@exämple.fr.", Detector::Email),
            ["zoë@exämple.fr"]
        );
        assert!(found("no at sign here", Detector::Email).is_empty());
        assert!(found("user@localhost", Detector::Email).is_empty());
        assert!(found("@example.com", Detector::Email).is_empty());
        assert!(found("price 5 @ 3.50", Detector::Email).is_empty());
    }

    #[test]
    fn credit_card() {
        assert_eq!(
            found("card 4111111111111111 ok", Detector::CreditCard),
            ["4111111111111111"]
        );
        assert_eq!(
            found("card: 4111 1111 1111 1111.", Detector::CreditCard),
            ["4111 1111 1111 1111"]
        );
        assert_eq!(
            found("5500-0000-0000-0004", Detector::CreditCard),
            ["5500-0000-0000-0004"]
        );
        assert_eq!(
            found("amex 378282246310005", Detector::CreditCard),
            ["378282246310005"]
        );
        // Luhn failure: 4111111111111112.
        assert!(found("id 4111111111111112", Detector::CreditCard).is_empty());
        // Random 16-digit number failing Luhn.
        assert!(found("order 1234567890123456", Detector::CreditCard).is_empty());
        // Too short / too long (part of a longer digit run).
        assert!(found("123456789012", Detector::CreditCard).is_empty());
        assert!(found("41111111111111110000000", Detector::CreditCard).is_empty());
        assert!(found("x4111111111111111", Detector::CreditCard).is_empty());
        // A trailing digit group swallowed by the pattern is cut off again.
        assert_eq!(
            found("4111 1111 1111 1111 43 units", Detector::CreditCard),
            ["4111 1111 1111 1111"]
        );
    }

    #[test]
    fn luhn_and_ssn_helpers() {
        assert!(card_ok("4111111111111111"));
        assert!(card_ok("4012888888881881"));
        assert!(!card_ok("4111111111111121"));
        assert!(!card_ok("411111111111"));
        assert!(ssn_ok("123-45-6789"));
        assert!(!ssn_ok("000-45-6789"));
        assert!(!ssn_ok("666-45-6789"));
        assert!(!ssn_ok("912-45-6789"));
        assert!(!ssn_ok("123-00-6789"));
        assert!(!ssn_ok("123-45-0000"));
    }

    #[test]
    fn us_ssn() {
        assert_eq!(found("SSN: 123-45-6789.", Detector::UsSsn), ["123-45-6789"]);
        assert_eq!(found("078-05-1120", Detector::UsSsn), ["078-05-1120"]);
        assert!(found("SSN: 666-45-6789", Detector::UsSsn).is_empty());
        assert!(found("SSN: 900-45-6789", Detector::UsSsn).is_empty());
        assert!(found("SSN: 000-12-3456", Detector::UsSsn).is_empty());
        assert!(found("SSN: 123-00-4567", Detector::UsSsn).is_empty());
        assert!(found("SSN: 123-45-0000", Detector::UsSsn).is_empty());
        assert!(found("date 2024-01-15", Detector::UsSsn).is_empty());
        assert!(found("1234-45-6789", Detector::UsSsn).is_empty());
        assert!(found("123456789", Detector::UsSsn).is_empty());
    }

    #[test]
    fn phone() {
        assert_eq!(
            found("call +14155552671 now", Detector::Phone),
            ["+14155552671"]
        );
        assert_eq!(
            found("call (415) 555-2671 now", Detector::Phone),
            ["(415) 555-2671"]
        );
        assert_eq!(found("415-555-2671", Detector::Phone), ["415-555-2671"]);
        assert_eq!(found("tel 415.555.2671", Detector::Phone), ["415.555.2671"]);
        assert_eq!(
            found("+1 415-555-2671", Detector::Phone),
            ["+1 415-555-2671"]
        );
        assert_eq!(
            found("tel: +44 20 7946 0958.", Detector::Phone),
            ["+44 20 7946 0958"]
        );
        assert_eq!(
            found("+44 20 7946 0958 2024 99", Detector::Phone),
            ["+44 20 7946 0958"]
        );
        assert_eq!(
            found("+14155552671 2024-01-15", Detector::Phone),
            ["+14155552671"]
        );
        assert_eq!(found("+442079460958", Detector::Phone), ["+442079460958"]);
        // Plain integers and other numbers are not phones.
        assert!(found("4155552671", Detector::Phone).is_empty());
        assert!(found("id 12345 qty 42", Detector::Phone).is_empty());
        assert!(found("2024-01-15 10:30:00", Detector::Phone).is_empty());
        assert!(found("v415-555-2671", Detector::Phone).is_empty());
        assert!(found("415-555-2671-99", Detector::Phone).is_empty());
        assert!(found("10.415.555.2671", Detector::Phone).is_empty());
        // Area codes starting with 0/1 are not NANP.
        assert!(found("115-555-2671", Detector::Phone).is_empty());
        // E.164 too short.
        assert!(found("+1234567", Detector::Phone).is_empty());
    }

    #[test]
    fn iban() {
        assert_eq!(
            found("pay to GB82WEST12345698765432 please", Detector::Iban),
            ["GB82WEST12345698765432"]
        );
        assert_eq!(
            found("IBAN: DE89 3704 0044 0532 0130 00 thanks", Detector::Iban),
            ["DE89 3704 0044 0532 0130 00"]
        );
        assert_eq!(
            found("GB82 WEST 1234 5698 7654 32 SENT", Detector::Iban),
            ["GB82 WEST 1234 5698 7654 32"]
        );
        assert_eq!(
            found("FR1420041010050500013M02606", Detector::Iban),
            ["FR1420041010050500013M02606"]
        );
        // Bad checksum.
        assert!(found("GB83WEST12345698765432", Detector::Iban).is_empty());
        assert!(found("DE88 3704 0044 0532 0130 00", Detector::Iban).is_empty());
        assert!(found("ORDER12345678901234", Detector::Iban).is_empty());
        assert!(iban_ok("GB82WEST12345698765432"));
        assert!(!iban_ok("GB82WEST1234569876543"));
    }

    #[test]
    fn aws_access_key() {
        assert_eq!(
            found("key=AKIAIOSFODNN7EXAMPLE;", Detector::AwsAccessKey),
            ["AKIAIOSFODNN7EXAMPLE"]
        );
        assert_eq!(
            found("ASIAY34FZKBOKMUTVV7A", Detector::AwsAccessKey),
            ["ASIAY34FZKBOKMUTVV7A"]
        );
        assert!(found("AKIAIOSFODNN7EXAMPL", Detector::AwsAccessKey).is_empty());
        assert!(found("AKIAIOSFODNN7EXAMPLEX", Detector::AwsAccessKey).is_empty());
        assert!(found("akiaiosfodnn7example", Detector::AwsAccessKey).is_empty());
        assert!(found("ABIAIOSFODNN7EXAMPLE", Detector::AwsAccessKey).is_empty());
    }

    const TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";

    #[test]
    fn jwt() {
        let text = format!("Authorization: Bearer {TOKEN}\n");
        assert_eq!(found(&text, Detector::Jwt), [TOKEN]);
        // Unsecured token: empty signature.
        let unsigned = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.";
        assert_eq!(found(unsigned, Detector::Jwt), [unsigned]);
        // A sentence-ending period is not a fourth segment.
        assert_eq!(found(&format!("token: {TOKEN}."), Detector::Jwt), [TOKEN]);
        // Random dotted things.
        assert!(found("www.example.com", Detector::Jwt).is_empty());
        assert!(found("a.b.c", Detector::Jwt).is_empty());
        assert!(found("1.2.3", Detector::Jwt).is_empty());
        assert!(found("abcdefgh.ijklmnop.qrstuv", Detector::Jwt).is_empty());
        assert!(found("eyJhbGciOiJIUzI1NiJ9.only-two", Detector::Jwt).is_empty());
        // Five segments (JWE-like / not a JWT of three segments).
        assert!(found("eyJhbGciOi.abc.def.ghi.jkl", Detector::Jwt).is_empty());
    }

    #[test]
    fn private_key() {
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\nabcd==\n-----END RSA PRIVATE KEY-----";
        let text = format!("key:\n{pem}\ntrailer");
        assert_eq!(found(&text, Detector::PrivateKey), [pem]);
        let pkcs8 = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI\n-----END PRIVATE KEY-----";
        assert_eq!(found(pkcs8, Detector::PrivateKey), [pkcs8]);
        let enc = "-----BEGIN ENCRYPTED PRIVATE KEY-----x-----END ENCRYPTED PRIVATE KEY-----";
        assert_eq!(found(enc, Detector::PrivateKey), [enc]);
        // Unterminated: masked to the end.
        let cut = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA";
        assert_eq!(found(&format!("x {cut}"), Detector::PrivateKey), [cut]);
        // Public keys and certificates are not private keys.
        assert!(
            found(
                "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----",
                Detector::PrivateKey
            )
            .is_empty()
        );
        assert!(
            found(
                "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
                Detector::PrivateKey
            )
            .is_empty()
        );
        // Two blocks: two matches, text between kept.
        let two = format!("{pkcs8} and {pkcs8}");
        assert_eq!(found(&two, Detector::PrivateKey), [pkcs8, pkcs8]);
    }

    #[test]
    fn overlapping_detectors_resolve_to_first_longest() {
        let text = "mail 4111111111111111@example.com and 415-555-2671";
        let ms = find_matches(text, &Detector::ALL);
        let got: Vec<(&str, Detector)> = ms
            .iter()
            .map(|m| (&text[m.start..m.end], m.detector))
            .collect();
        assert_eq!(
            got,
            [
                ("4111111111111111@example.com", Detector::Email),
                ("415-555-2671", Detector::Phone)
            ]
        );
        assert!(contains_match(text, &[Detector::Phone]));
        assert!(!contains_match("nothing to see", &Detector::ALL));
    }

    #[test]
    fn overlapping_matches_are_merged_into_their_union() {
        // The phone number "+1 4111 1111 1111" and the card number
        // "4111 1111 1111 1111" overlap: one range covers both.
        let text = "call +1 4111 1111 1111 1111 now";
        let phone = find_matches(text, &[Detector::Phone]);
        let card = find_matches(text, &[Detector::CreditCard]);
        assert_eq!(phone.len(), 1);
        assert_eq!(card.len(), 1);
        assert!(phone[0].start < card[0].start && card[0].start < phone[0].end);

        let ms = find_matches(text, &[Detector::Phone, Detector::CreditCard]);
        assert_eq!(ms.len(), 1);
        assert_eq!(&text[ms[0].start..ms[0].end], "+1 4111 1111 1111 1111");
        // The card match is the longer one: it labels the range.
        assert_eq!(ms[0].detector, Detector::CreditCard);
        assert_eq!(ms[0].merged, [Detector::Phone]);

        // A chain of overlaps merges transitively; disjoint matches stay apart.
        let text = "+1 4111 1111 1111 1111 and a@b.io";
        let ms = find_matches(text, &Detector::ALL);
        let got: Vec<&str> = ms.iter().map(|m| &text[m.start..m.end]).collect();
        assert_eq!(got, ["+1 4111 1111 1111 1111", "a@b.io"]);
        assert!(ms[1].merged.is_empty());
    }

    /// A one-dimensional `text[]` in binary format (`array_send`).
    fn text_array_binary(elements: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for x in [1i32, 0, 25, i32::try_from(elements.len()).unwrap(), 1] {
            out.extend_from_slice(&x.to_be_bytes());
        }
        for e in elements {
            out.extend_from_slice(&i32::try_from(e.len()).unwrap().to_be_bytes());
            out.extend_from_slice(e);
        }
        out
    }

    #[test]
    fn binary_values_are_scanned_through_length_prefixes() {
        let card = Detector::CreditCard;
        let plain = text_array_binary(&[b"x", b"4111 1111 1111 1111"]);
        assert!(contains_match_in_bytes(&plain, &[card]));

        // 52 bytes: the length's low byte is '4', glued to the card number.
        let mut long = b"4111111111111111".to_vec();
        long.resize(52, b'.');
        let glued = text_array_binary(&[&long]);
        assert!(glued.windows(17).any(|w| w == b"44111111111111111"));
        assert!(!contains_match(&String::from_utf8_lossy(&glued), &[card]));
        assert!(contains_match_in_bytes(&glued, &[card]));

        // 0x0135 = 309 bytes: two length bytes after the last NUL ("" "5").
        let mut longer = b"4111111111111111 ".to_vec();
        longer.resize(309, b'x');
        assert!(contains_match_in_bytes(
            &text_array_binary(&[&longer]),
            &[card]
        ));
        // 0x4135 = 16693 bytes: two printable length bytes ("A" "5").
        longer.resize(0x4135, b'x');
        assert!(contains_match_in_bytes(
            &text_array_binary(&[&longer]),
            &[card]
        ));
        // 0x202034 bytes: three length bytes after the NUL (" " " " "4").
        longer.resize(0x0020_2034, b'x');
        assert!(contains_match_in_bytes(
            &text_array_binary(&[&longer]),
            &[card]
        ));
        // A length byte that is valid UTF-8 with the next one: 0xC3A9 = 50089
        // bytes reads as "é" glued to the element.
        longer.resize(0xC3A9, b'x');
        assert!(contains_match_in_bytes(
            &text_array_binary(&[&longer]),
            &[card]
        ));

        // Four printable length bytes (an element of 0x4142_5A34 bytes).
        let run = "AB5Z4111 1111 1111 1111";
        assert!(!contains_match(run, &[card]));
        assert!(run_matches(run, 4, &[card]));
        assert!(!run_matches(run, 3, &[card]));
        // Runs end at invalid UTF-8 and at control characters.
        assert!(contains_match_in_bytes(
            b"\xff\xfe4111111111111111\x00",
            &[card]
        ));
        assert!(contains_match_in_bytes(
            b"\x00-----BEGIN PRIVATE KEY-----\nMC4CAQ\n-----END PRIVATE KEY-----",
            &[Detector::PrivateKey]
        ));
        // Text with a control character right before the secret.
        assert!(contains_match_in_bytes(
            b"line\n4111 1111 1111 1111",
            &[card]
        ));
        assert!(contains_match_in_bytes(
            "zo\u{eb}@ex\u{e4}mple.fr".as_bytes(),
            &[Detector::Email]
        ));
        assert!(!contains_match_in_bytes(
            &text_array_binary(&[b"a", b"b"]),
            &Detector::ALL
        ));
        assert!(!contains_match_in_bytes(
            &[0xff, 0xfe, 0, 1, 2],
            &Detector::ALL
        ));
    }

    #[test]
    fn non_ascii_text_does_not_panic() {
        let text = "émail: zoë@exämple.com – tel (415) 555-2671 ✓ 4111 1111 1111 1111";
        let ms = find_matches(text, &Detector::ALL);
        for m in &ms {
            assert!(text.is_char_boundary(m.start) && text.is_char_boundary(m.end));
        }
        assert!(ms.iter().any(|m| m.detector == Detector::Phone));
        assert!(ms.iter().any(|m| m.detector == Detector::CreditCard));
    }
}
