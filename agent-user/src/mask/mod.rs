//! Result masking: column metadata and values in, masked values out.
//!
//! Pure module: no I/O, no clock, no globals besides lazily compiled regexes.
//! The proxy builds one [`Masker`] from the `masking:` config section and the
//! key bytes it resolved (`key_env` / `key_file`, see
//! [`MaskingConfig::key_source`]), then per result set:
//!
//! ```text
//! let plan = masker.plan(&policy_profiles, &columns)?;   // on RowDescription
//! if !plan.is_noop() {
//!     plan.apply(&mut row_values)?;                        // on each DataRow
//! }
//! ```
//!
//! # What is masked, and how
//!
//! * **Column rules** match a result column by bare name (`email`), by
//!   `table.column` or by `schema.table.column`; identifiers are compared
//!   case-insensitively (Postgres folds unquoted identifiers to lower case,
//!   but a quoted one keeps its case: `Customers.SSN` matches `ssn` and
//!   `"SSN"`; the schema/table come from the RowDescription table OID).
//!   Within one profile
//!   the most specific rule wins (`schema.table.column` > `table.column` >
//!   `column`), so a profile can refine a broad rule; across the profiles of
//!   one plan the strongest action wins (`redact` > `hash` > `keep_last`,
//!   fewer kept characters being stronger).
//! * **Detectors** (see [`detect`]) run on every column that no rule matches,
//!   except built-in number, time, address, geometry and bit-string types
//!   (and arrays and ranges of them), whose values cannot hold free text.
//!   In text they can rewrite, each match is replaced in place by the
//!   profile's `detector_style` (`[REDACTED:<detector>]`, `keep_last`, or the
//!   keyed hash); overlapping matches are merged into one range, labelled by
//!   the longest and masked with the strongest style among them.
//!
//! # Type safety
//!
//! Masking never produces bytes the client cannot parse for the column type:
//!
//! | column type (format)                                  | rule                        | detectors                    |
//! |--------------------------------------------------------|-----------------------------|------------------------------|
//! | text-like: text, varchar, bpchar, name, unknown, cstring (text or binary = raw UTF-8) | replaced by the style output | matches replaced in place |
//! | user-defined OID >= 16384, e.g. citext (text format)   | treated as text             | treated as text              |
//! | json (text or binary), jsonb (text; binary keeps its version byte 1) | a JSON string: `"[REDACTED]"`, `"****1111"`, `"h:…"` | inside decoded JSON strings (and number tokens, which become strings); output stays valid JSON |
//! | other built-in types in text format: arrays of text/json types, xml, tsvector, tsquery, record, refcursor, jsonpath... | NULL | value becomes NULL if any detector matches |
//! | bytea (text format: `\x` hex or escape format, decoded first) | NULL | NULL, or [`MaskError::Unmaskable`] with `deny`, if any detector matches the bytes |
//! | number, time, address, geometry, bit-string types (int8, numeric, date, uuid, inet, bit...) and arrays/ranges of them, text format | NULL (`redact`, `keep_last` and `hash` alike: a string like `****` would break the client's parser) | not inspected |
//! | the same types in binary format | NULL, or [`MaskError::UnmaskableBinary`] with `unmaskable_binary: deny` | not inspected |
//! | any other non-text type in binary format (bytea, arrays, records, xml, citext and other user-defined OIDs) | NULL, or [`MaskError::UnmaskableBinary`] with `deny` | the bytes are read as lossy UTF-8; any match makes the value NULL, or [`MaskError::UnmaskableBinary`] with `deny` |
//!
//! A value that must be inspected but cannot be (invalid UTF-8, malformed
//! JSON, jsonb binary with an unknown version byte) is likewise NULL, or an
//! error ([`MaskError::UnmaskableBinary`] for binary format,
//! [`MaskError::Unmaskable`] for text format) with `deny`. The caller is
//! expected to run the session with `client_encoding` UTF8: text-like values
//! are decoded as UTF-8.
//!
//! SQL NULL always stays NULL. `hash` is `h:` + 16 lowercase hex characters
//! of HMAC-SHA256(key, value bytes), so equal values still join and group.
//!
//! # Limits (by design, documented for the policy layer)
//!
//! Column rules see result columns as the RowDescription names them: an alias
//! (`SELECT ssn AS x`) or an expression (`SELECT lower(email)`) is not matched
//! by a rule for `ssn` / `email`; only detectors catch such values. Numbers
//! stored in numeric columns (a card number in an `int8`) are not inspected
//! by detectors; use a column rule. Binary values are scanned without knowing
//! their layout: text the type stores encoded (JSON `\u0040` escapes inside a
//! `json[]`, compressed or encrypted bytes) is not seen, and large random
//! bytes (images, archives in a bytea) can contain something shaped like an
//! e-mail address by chance, which makes the value NULL (or denies the query).

pub mod config;
pub mod detect;
pub mod json;
pub mod plan;
pub mod style;

pub use config::{
    Action, ColumnRule, Detector, KeySource, MIN_KEY_LEN, MaskingConfig, ProfileConfig, Style,
    UnmaskablePolicy,
};
pub use plan::{
    COMPUTED_FROM_MASKED, ColumnMeta, Format, Masker, RETURNED_FROM_MASKED, RowOutcome, RowPlan,
    is_text_like,
};

/// Errors of the masking module.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaskError {
    /// Invalid top-level masking configuration (key source, key length).
    #[error("masking config: {0}")]
    Config(String),
    /// Invalid profile entry.
    #[error("masking profile {profile:?}, {entry}: {reason}")]
    InvalidProfile {
        /// Profile name.
        profile: String,
        /// The offending entry, e.g. `columns[1] ("customers.ssn")`.
        entry: String,
        /// What is wrong.
        reason: String,
    },
    /// A policy names a profile that the masking config does not define.
    #[error("unknown masking profile {0:?}")]
    UnknownProfile(String),
    /// A binary-format value that a rule says to mask cannot be masked
    /// safely and `unmaskable_binary: deny` is set: deny the query.
    #[error("column {column:?}: binary-format value cannot be masked safely")]
    UnmaskableBinary {
        /// Result column name.
        column: String,
    },
    /// A text-format value that must be inspected cannot be (invalid UTF-8,
    /// malformed JSON) and `unmaskable_binary: deny` is set: deny the query.
    #[error("column {column:?}: value cannot be masked safely ({reason})")]
    Unmaskable {
        /// Result column name.
        column: String,
        /// Why.
        reason: &'static str,
    },
    /// `apply` got a row whose width differs from the planned columns.
    #[error("row has {got} values but the result set has {expected} columns")]
    ColumnCount {
        /// Columns in the plan.
        expected: usize,
        /// Values in the row.
        got: usize,
    },
}

impl MaskError {
    /// Whether this error means "a value could not be masked" (deny the query).
    pub fn is_unmaskable(&self) -> bool {
        matches!(
            self,
            MaskError::UnmaskableBinary { .. } | MaskError::Unmaskable { .. }
        )
    }
}
