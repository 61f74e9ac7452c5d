//! Masking configuration (the `masking:` section of the agentgate config).
//!
//! ```yaml
//! masking:
//!   key_env: AGENTGATE_MASK_KEY      # or key_file: /etc/agentgate/mask.key
//!   unmaskable_binary: null          # null | deny
//!   profiles:
//!     pii:
//!       columns:
//!         - { column: email, style: redact }
//!         - { column: public.customers.card_number, style: keep_last, keep: 4 }
//!         - { column: customers.ssn, style: hash }
//!       detectors: [email, credit_card, us_ssn, phone, iban, aws_access_key, jwt, private_key]
//!       detector_style: redact       # default redact
//!       # detector_keep: 4           # required when detector_style is keep_last
//! ```
//!
//! Everything is checked by [`MaskingConfig::validate`] (also run by
//! [`Masker::new`](super::Masker::new)); errors name the profile and the entry.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::{Deserialize, Deserializer};

use super::MaskError;

/// Minimum key length (bytes) accepted when any profile uses the `hash` style.
pub const MIN_KEY_LEN: usize = 16;

/// The `masking:` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskingConfig {
    /// Name of the environment variable that holds the hashing key.
    #[serde(default)]
    pub key_env: Option<String>,
    /// Path of a file that holds the hashing key.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// What to do with a value that a rule says to mask but that cannot be
    /// masked without corrupting what the client parses (binary-format value
    /// of a non-text type, invalid UTF-8, malformed JSON).
    #[serde(default, deserialize_with = "de_unmaskable")]
    pub unmaskable_binary: UnmaskablePolicy,
    /// Named profiles; policies refer to them by name.
    #[serde(default)]
    pub profiles: BTreeMap<String, ProfileConfig>,
    /// Result columns a statement computes (no table of origin) when it uses a column a rule
    /// masks (`upper(email)`, `substr(ssn, 1, 3)`, a UNION of masked columns), or when the gate
    /// cannot see what it uses (`FETCH` from a cursor, opaque statements): `redact` (default)
    /// redacts them whole; `keep` leaves them to the detectors.
    #[serde(default)]
    pub computed_columns: ComputedColumns,
}

/// `computed_columns`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComputedColumns {
    #[default]
    Redact,
    Keep,
}

/// `unmaskable_binary`: `null` (YAML null or the string "null") or `deny`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnmaskablePolicy {
    /// Replace the value by SQL NULL.
    #[default]
    Null,
    /// Fail with [`MaskError::UnmaskableBinary`] / [`MaskError::Unmaskable`];
    /// the caller denies the query.
    Deny,
}

fn de_unmaskable<'de, D: Deserializer<'de>>(d: D) -> Result<UnmaskablePolicy, D::Error> {
    Ok(Option::<UnmaskablePolicy>::deserialize(d)?.unwrap_or_default())
}

/// One masking profile.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// Column rules.
    #[serde(default)]
    pub columns: Vec<ColumnRule>,
    /// Detectors run over the text of every inspectable column that no rule matches.
    #[serde(default)]
    pub detectors: Vec<Detector>,
    /// Style applied to detector matches (default `redact`).
    #[serde(default)]
    pub detector_style: Style,
    /// `keep` for `detector_style: keep_last`.
    #[serde(default)]
    pub detector_keep: Option<u32>,
}

/// A column rule: `column` is `name`, `table.name` or `schema.table.name`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnRule {
    /// `column`, `table.column` or `schema.table.column`, compared exactly
    /// (write them lowercase, as Postgres folds unquoted identifiers).
    pub column: String,
    /// How to mask.
    pub style: Style,
    /// Characters kept at the end for `keep_last` (required there, refused elsewhere).
    #[serde(default)]
    pub keep: Option<u32>,
}

/// A masking style.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Style {
    /// Replace the whole value (or match) by a fixed marker.
    #[default]
    Redact,
    /// Replace all but the last `keep` characters by `*`.
    KeepLast,
    /// Deterministic keyed hash: `h:` + 16 hex chars of HMAC-SHA256(key, value).
    Hash,
}

/// Built-in detectors of sensitive substrings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Detector {
    /// E-mail addresses.
    Email,
    /// Payment card numbers (13-19 digits, spaces/dashes allowed, Luhn-checked).
    CreditCard,
    /// US social security numbers `123-45-6789` (invalid areas/groups/serials excluded).
    UsSsn,
    /// Phone numbers: E.164 (`+14155552671`) and US forms (`(415) 555-2671`, `415-555-2671`).
    Phone,
    /// IBANs (mod-97 validated), compact or in groups of four.
    Iban,
    /// AWS access key ids (`AKIA`/`ASIA` + 16 uppercase alphanumerics).
    AwsAccessKey,
    /// JSON web tokens (three base64url segments, the first starting `eyJ`).
    Jwt,
    /// PEM private key blocks (whole block; an unterminated block to the end of the text).
    PrivateKey,
}

impl Detector {
    /// All detectors.
    pub const ALL: [Detector; 8] = [
        Detector::Email,
        Detector::CreditCard,
        Detector::UsSsn,
        Detector::Phone,
        Detector::Iban,
        Detector::AwsAccessKey,
        Detector::Jwt,
        Detector::PrivateKey,
    ];

    /// The config name (`email`, `credit_card`, ...), also used in redaction markers.
    pub fn name(self) -> &'static str {
        match self {
            Detector::Email => "email",
            Detector::CreditCard => "credit_card",
            Detector::UsSsn => "us_ssn",
            Detector::Phone => "phone",
            Detector::Iban => "iban",
            Detector::AwsAccessKey => "aws_access_key",
            Detector::Jwt => "jwt",
            Detector::PrivateKey => "private_key",
        }
    }
}

/// Where the key comes from (the caller reads it; this module stays pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// Environment variable name.
    Env(String),
    /// File path.
    File(PathBuf),
}

/// A resolved style: what to do with a value or a match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Full redaction.
    Redact,
    /// Mask all but the last N characters.
    KeepLast(u32),
    /// Keyed deterministic hash.
    Hash,
}

impl Action {
    /// Ordering used to combine profiles: the strongest action wins.
    /// `Redact` > `Hash` > `KeepLast(n)` (fewer kept characters is stronger).
    pub(crate) fn strength(self) -> (u8, std::cmp::Reverse<u32>) {
        match self {
            Action::Redact => (3, std::cmp::Reverse(0)),
            Action::Hash => (2, std::cmp::Reverse(0)),
            Action::KeepLast(n) => (1, std::cmp::Reverse(n)),
        }
    }

    /// The stronger of two actions.
    pub(crate) fn stronger(self, other: Action) -> Action {
        if other.strength() > self.strength() {
            other
        } else {
            self
        }
    }
}

fn resolve(style: Style, keep: Option<u32>, keep_field: &str) -> Result<Action, String> {
    match (style, keep) {
        (Style::Redact, None) => Ok(Action::Redact),
        (Style::Hash, None) => Ok(Action::Hash),
        (Style::KeepLast, Some(n)) => Ok(Action::KeepLast(n)),
        (Style::KeepLast, None) => Err(format!("style keep_last requires `{keep_field}`")),
        (Style::Redact | Style::Hash, Some(_)) => {
            Err(format!("`{keep_field}` is only valid with style keep_last"))
        }
    }
}

/// Split a rule's `column` into its 1-3 dotted parts, or say why not.
pub(crate) fn split_column(column: &str) -> Result<Vec<&str>, String> {
    if column.is_empty() {
        return Err("empty column".to_owned());
    }
    let parts: Vec<&str> = column.split('.').collect();
    if parts.len() > 3 {
        return Err("expected `column`, `table.column` or `schema.table.column`".to_owned());
    }
    if parts.iter().any(|p| p.is_empty()) {
        return Err("empty identifier in dotted name".to_owned());
    }
    if column.chars().any(|c| c.is_whitespace() || c == '"') {
        return Err("identifiers must not contain whitespace or quotes".to_owned());
    }
    Ok(parts)
}

impl ColumnRule {
    /// The resolved action, or why the rule is invalid.
    pub fn action(&self) -> Result<Action, String> {
        resolve(self.style, self.keep, "keep")
    }
}

impl ProfileConfig {
    /// The resolved detector action, or why it is invalid.
    pub fn detector_action(&self) -> Result<Action, String> {
        resolve(self.detector_style, self.detector_keep, "detector_keep")
    }

    /// Whether anything in this profile uses the `hash` style.
    pub fn uses_hash(&self) -> bool {
        let detectors_hash = !self.detectors.is_empty() && self.detector_style == Style::Hash;
        detectors_hash || self.columns.iter().any(|c| c.style == Style::Hash)
    }

    /// Validate one profile; errors name `profile` and the entry.
    pub fn validate(&self, profile: &str) -> Result<(), MaskError> {
        let err = |entry: String, reason: String| MaskError::InvalidProfile {
            profile: profile.to_owned(),
            entry,
            reason,
        };
        let mut seen = BTreeSet::new();
        for (i, rule) in self.columns.iter().enumerate() {
            let entry = format!("columns[{i}] ({:?})", rule.column);
            split_column(&rule.column).map_err(|r| err(entry.clone(), r))?;
            rule.action().map_err(|r| err(entry.clone(), r))?;
            // Rules match identifiers case-insensitively (see `plan`), so
            // `ssn` and `SSN` are the same rule.
            if !seen.insert(rule.column.to_lowercase()) {
                return Err(err(entry, "duplicate column rule".to_owned()));
            }
        }
        let mut seen = BTreeSet::new();
        for (i, d) in self.detectors.iter().enumerate() {
            if !seen.insert(*d) {
                return Err(err(
                    format!("detectors[{i}] ({})", d.name()),
                    "duplicate detector".to_owned(),
                ));
            }
        }
        self.detector_action()
            .map_err(|r| err("detector_style".to_owned(), r))?;
        Ok(())
    }
}

impl MaskingConfig {
    /// Where the key comes from, if configured.
    pub fn key_source(&self) -> Option<KeySource> {
        match (&self.key_env, &self.key_file) {
            (Some(env), _) => Some(KeySource::Env(env.clone())),
            (None, Some(path)) => Some(KeySource::File(path.clone())),
            (None, None) => None,
        }
    }

    /// Whether any profile uses the `hash` style (and so needs a key).
    pub fn needs_key(&self) -> bool {
        self.profiles.values().any(ProfileConfig::uses_hash)
    }

    /// Validate the whole section. Errors name the profile and the entry.
    pub fn validate(&self) -> Result<(), MaskError> {
        if self.key_env.is_some() && self.key_file.is_some() {
            return Err(MaskError::Config(
                "set only one of key_env and key_file".to_owned(),
            ));
        }
        if self.key_env.as_deref() == Some("") {
            return Err(MaskError::Config("key_env is empty".to_owned()));
        }
        if self
            .key_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(MaskError::Config("key_file is empty".to_owned()));
        }
        for (name, profile) in &self.profiles {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(MaskError::InvalidProfile {
                    profile: name.clone(),
                    entry: "name".to_owned(),
                    reason: "profile names use letters, digits, '_' and '-'".to_owned(),
                });
            }
            profile.validate(name)?;
        }
        if self.needs_key() && self.key_source().is_none() {
            let profile = self
                .profiles
                .iter()
                .find(|(_, p)| p.uses_hash())
                .map(|(n, _)| n.clone())
                .unwrap_or_default();
            return Err(MaskError::InvalidProfile {
                profile,
                entry: "style hash".to_owned(),
                reason: "the hash style needs key_env or key_file".to_owned(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Top {
        masking: MaskingConfig,
    }

    pub(crate) const EXAMPLE: &str = r#"
masking:
  key_env: AGENTGATE_MASK_KEY      # or key_file: /etc/agentgate/mask.key
  unmaskable_binary: null          # null | deny
  profiles:
    pii:
      columns:
        - { column: email, style: redact }
        - { column: public.customers.card_number, style: keep_last, keep: 4 }
        - { column: customers.ssn, style: hash }
      detectors: [email, credit_card, us_ssn, phone, iban, aws_access_key, jwt, private_key]
      detector_style: redact
"#;

    fn parse(yaml: &str) -> Result<MaskingConfig, serde_norway::Error> {
        serde_norway::from_str::<Top>(yaml).map(|t| t.masking)
    }

    #[test]
    fn example_yaml_parses_and_validates() {
        let cfg = parse(EXAMPLE).unwrap();
        cfg.validate().unwrap();
        assert_eq!(
            cfg.key_source(),
            Some(KeySource::Env("AGENTGATE_MASK_KEY".into()))
        );
        assert_eq!(cfg.unmaskable_binary, UnmaskablePolicy::Null);
        let pii = &cfg.profiles["pii"];
        assert_eq!(pii.columns.len(), 3);
        assert_eq!(pii.columns[1].action().unwrap(), Action::KeepLast(4));
        assert_eq!(pii.columns[2].action().unwrap(), Action::Hash);
        assert_eq!(pii.detectors.len(), 8);
        assert_eq!(pii.detectors.as_slice(), Detector::ALL.as_slice());
        assert_eq!(pii.detector_action().unwrap(), Action::Redact);
        assert!(cfg.needs_key());
    }

    #[test]
    fn unmaskable_binary_variants() {
        let deny = parse("masking: { unmaskable_binary: deny }").unwrap();
        assert_eq!(deny.unmaskable_binary, UnmaskablePolicy::Deny);
        let quoted = parse("masking: { unmaskable_binary: \"null\" }").unwrap();
        assert_eq!(quoted.unmaskable_binary, UnmaskablePolicy::Null);
        let absent = parse("masking: {}").unwrap();
        assert_eq!(absent.unmaskable_binary, UnmaskablePolicy::Null);
        assert!(parse("masking: { unmaskable_binary: allow }").is_err());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(parse("masking: { key_envv: X }").is_err());
        assert!(parse("masking: { profiles: { p: { colums: [] } } }").is_err());
        assert!(
            parse("masking: { profiles: { p: { columns: [ { column: a, style: redact, kep: 1 } ] } } }")
                .is_err()
        );
        assert!(parse("masking: { profiles: { p: { detectors: [ssn] } } }").is_err());
        assert!(
            parse("masking: { profiles: { p: { columns: [ { column: a, style: blur } ] } } }")
                .is_err()
        );
    }

    fn invalid(yaml: &str) -> String {
        let cfg = parse(yaml).unwrap();
        cfg.validate().unwrap_err().to_string()
    }

    #[test]
    fn validation_errors_name_profile_and_entry() {
        let e = invalid(
            "masking: { profiles: { cards: { columns: [ { column: a, style: redact }, { column: t.card, style: keep_last } ] } } }",
        );
        assert!(e.contains("\"cards\""), "{e}");
        assert!(e.contains("columns[1]"), "{e}");
        assert!(e.contains("t.card"), "{e}");
        assert!(e.contains("keep"), "{e}");

        let e = invalid(
            "masking: { profiles: { p1: { columns: [ { column: a, style: redact, keep: 2 } ] } } }",
        );
        assert!(e.contains("\"p1\"") && e.contains("columns[0]"), "{e}");

        let e = invalid(
            "masking: { profiles: { p2: { columns: [ { column: a.b.c.d, style: redact } ] } } }",
        );
        assert!(e.contains("\"p2\"") && e.contains("a.b.c.d"), "{e}");

        let e = invalid(
            "masking: { profiles: { p3: { columns: [ { column: a..b, style: redact } ] } } }",
        );
        assert!(e.contains("\"p3\""), "{e}");

        let e = invalid(
            "masking: { profiles: { p4: { columns: [ { column: a, style: redact }, { column: a, style: hash } ] } } }",
        );
        assert!(e.contains("\"p4\"") && e.contains("duplicate"), "{e}");
        // Rules match case-insensitively: differing only in case is a duplicate.
        let e = invalid(
            "masking: { profiles: { p4: { columns: [ { column: t.ssn, style: redact }, { column: T.SSN, style: hash } ] } } }",
        );
        assert!(e.contains("columns[1]") && e.contains("duplicate"), "{e}");

        let e = invalid("masking: { profiles: { p5: { detectors: [email, email] } } }");
        assert!(e.contains("\"p5\"") && e.contains("detectors[1]"), "{e}");

        let e = invalid(
            "masking: { profiles: { p6: { detectors: [email], detector_style: keep_last } } }",
        );
        assert!(e.contains("\"p6\"") && e.contains("detector_style"), "{e}");

        let e =
            invalid("masking: { profiles: { p7: { columns: [ { column: x, style: hash } ] } } }");
        assert!(e.contains("\"p7\"") && e.contains("key"), "{e}");

        let e = invalid("masking: { profiles: { \"bad name\": {} } }");
        assert!(e.contains("bad name"), "{e}");
    }

    #[test]
    fn key_sources() {
        let e = invalid("masking: { key_env: A, key_file: /k }");
        assert!(e.contains("key_env") && e.contains("key_file"), "{e}");
        let cfg = parse("masking: { key_file: /etc/agentgate/mask.key }").unwrap();
        cfg.validate().unwrap();
        assert_eq!(
            cfg.key_source(),
            Some(KeySource::File("/etc/agentgate/mask.key".into()))
        );
        assert!(!cfg.needs_key());
    }

    #[test]
    fn detector_keep_last_with_keep_is_valid() {
        let cfg = parse(
            "masking: { profiles: { p: { detectors: [credit_card], detector_style: keep_last, detector_keep: 4 } } }",
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(
            cfg.profiles["p"].detector_action().unwrap(),
            Action::KeepLast(4)
        );
    }

    #[test]
    fn strongest_action() {
        assert_eq!(Action::Hash.stronger(Action::Redact), Action::Redact);
        assert_eq!(Action::KeepLast(4).stronger(Action::Hash), Action::Hash);
        assert_eq!(
            Action::KeepLast(4).stronger(Action::KeepLast(2)),
            Action::KeepLast(2)
        );
        assert_eq!(Action::Redact.stronger(Action::KeepLast(0)), Action::Redact);
    }
}
