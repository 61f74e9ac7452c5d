//! Per-result-set masking plans: [`Masker::plan`] on RowDescription,
//! [`RowPlan::apply`] on each DataRow. See the module docs of
//! [`mask`](super) for the type-safety table.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

use super::MaskError;
use super::config::{
    Action, ComputedColumns, Detector, MIN_KEY_LEN, MaskingConfig, UnmaskablePolicy, split_column,
};
use super::detect::{contains_match, contains_match_in_bytes};
use super::json::{Malformed, json_string, mask_json, top_level_string};
use super::style::{Hasher, mask_text, render_value};

/// Wire format of a result column (RowDescription format code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Format code 0.
    Text,
    /// Format code 1.
    Binary,
}

impl Format {
    /// From a protocol format code (0 text, 1 binary).
    pub fn from_code(code: i16) -> Option<Format> {
        match code {
            0 => Some(Format::Text),
            1 => Some(Format::Binary),
            _ => None,
        }
    }
}

/// One result column, as the proxy resolved it from RowDescription.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ColumnMeta {
    /// Result column name (as in RowDescription).
    pub name: String,
    /// Schema of the source table, if the column comes from a table.
    pub schema: Option<String>,
    /// Source table name, if the column comes from a table.
    pub table: Option<String>,
    /// Type OID (RowDescription reports a domain's base type).
    pub type_oid: u32,
    /// Wire format.
    pub format: Format,
}

/// What `apply` did to a row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowOutcome {
    /// At least one value was rewritten (or set to NULL).
    pub changed: bool,
}

// Built-in type OIDs (pg_type.dat).
const TEXT_LIKE: &[u32] = &[
    25,   // text
    1043, // varchar
    1042, // bpchar
    19,   // name
    705,  // unknown
    2275, // cstring
];
const JSON: u32 = 114;
const JSONB: u32 = 3802;
const BYTEA: u32 = 17;
/// Built-in types whose values are numbers, times, addresses, geometry or
/// bit strings, and arrays, ranges and multiranges of them: the text output
/// follows a fixed grammar and the binary form is fixed-layout numbers, so no
/// free text can be stored in them. Detectors never inspect these columns.
///
/// Of the detectors, only the digit-run ones (credit_card, us_ssn, phone) can
/// match such a value, and only when the number itself is the value (a card
/// number stored in an `int8`); inspecting them would null every ordinary
/// 16-digit key that happens to pass the Luhn check (one in ten). That case
/// is the documented limit: a numeric column holding a secret needs a column
/// rule. The other detectors need a `@`, upper-case letters or fixed
/// prefixes that these outputs cannot contain (uuid and macaddr print lower
/// case hex). Every other type is inspected when detectors are active.
const NOT_TEXT: &[u32] = &[
    16,   // bool
    18,   // "char" (one byte)
    20,   // int8
    21,   // int2
    23,   // int4
    26,   // oid
    27,   // tid
    28,   // xid
    29,   // cid
    5069, // xid8
    700,  // float4
    701,  // float8
    790,  // money
    1700, // numeric
    1082, // date
    1083, // time
    1114, // timestamp
    1184, // timestamptz
    1186, // interval
    1266, // timetz
    2950, // uuid
    869,  // inet
    650,  // cidr
    829,  // macaddr
    774,  // macaddr8
    600,  // point
    601,  // lseg
    602,  // path
    603,  // box
    604,  // polygon
    628,  // line
    718,  // circle
    3220, // pg_lsn
    1560, // bit
    1562, // varbit
    // Arrays of the above.
    1000, 1002, 1016, 1005, 1007, 1028, 1010, 1011, 1012, 271, 1021, 1022, 791, 1231, 1182, 1183,
    1115, 1185, 1187, 1270, 2951, 1041, 651, 1040, 775, 1017, 1018, 1019, 1020, 1027, 629, 719,
    3221, 1561, 1563,
    // int4range, int8range, numrange, tsrange, tstzrange, daterange and their arrays.
    3904, 3926, 3906, 3908, 3910, 3912, 3905, 3927, 3907, 3909, 3911, 3913,
    // The matching multiranges and their arrays.
    4451, 4536, 4532, 4533, 4534, 4535, 6150, 6157, 6151, 6152, 6153, 6155,
];
/// First OID assigned to user-defined objects (extensions, citext, enums...).
const FIRST_NORMAL_OID: u32 = 16384;

/// Whether a type takes arbitrary text in both text and binary format
/// (text, varchar, bpchar, name, unknown, cstring).
pub fn is_text_like(type_oid: u32) -> bool {
    TEXT_LIKE.contains(&type_oid)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Raw UTF-8 text (text-like in either format, user-defined in text format).
    Text,
    /// JSON text (json in either format, jsonb in text format).
    Json,
    /// jsonb binary: version byte 1 + JSON text.
    JsonbBinary,
    /// Inspectable but not rewritable text: every other built-in type in text
    /// format (arrays of text and json types, xml, record, tsvector...).
    Structured,
    /// bytea in text format: `\x` + hex, or the escape format.
    ByteaText,
    /// A [`NOT_TEXT`] type in text format.
    OpaqueText,
    /// A [`NOT_TEXT`] type in binary format.
    OpaqueBinary,
    /// Any other type in binary format (bytea, arrays, records, xml, citext
    /// and other user-defined types): its bytes may embed text.
    RawBinary,
}

fn classify(type_oid: u32, format: Format) -> Kind {
    if is_text_like(type_oid) {
        return Kind::Text;
    }
    match (type_oid, format) {
        (JSON, _) | (JSONB, Format::Text) => Kind::Json,
        (JSONB, Format::Binary) => Kind::JsonbBinary,
        (BYTEA, Format::Text) => Kind::ByteaText,
        (oid, Format::Text) if NOT_TEXT.contains(&oid) => Kind::OpaqueText,
        (oid, Format::Binary) if NOT_TEXT.contains(&oid) => Kind::OpaqueBinary,
        (_, Format::Binary) => Kind::RawBinary,
        (oid, Format::Text) if oid == 0 || oid >= FIRST_NORMAL_OID => Kind::Text,
        (_, Format::Text) => Kind::Structured,
    }
}

#[derive(Debug, Clone)]
enum Scope {
    Column(String),
    Table(String, String),
    Schema(String, String, String),
}

#[derive(Debug, Clone)]
struct Rule {
    scope: Scope,
    action: Action,
}

/// Identifiers compared by rules, case-folded with [`fold`].
///
/// PostgreSQL folds unquoted identifiers to lower case, but a quoted one
/// (`"SSN"`) keeps its case, and rules may be written in any case. Rules
/// therefore match case-insensitively: `Customers.SSN` matches the column
/// `ssn` of table `customers` and also a quoted `"SSN"`. Two columns that
/// differ only in case are both matched, which masks more, never less.
struct FoldedNames {
    name: String,
    table: Option<String>,
    schema: Option<String>,
}

impl FoldedNames {
    fn of(c: &ColumnMeta) -> FoldedNames {
        FoldedNames {
            name: fold(&c.name),
            table: c.table.as_deref().map(fold),
            schema: c.schema.as_deref().map(fold),
        }
    }
}

/// Case folding for identifier comparison (Unicode lower case, so non-ASCII
/// quoted identifiers are folded too).
fn fold(ident: &str) -> String {
    ident.to_lowercase()
}

impl Scope {
    /// The column part (folded).
    fn column(&self) -> &String {
        match self {
            Scope::Column(c) | Scope::Table(_, c) | Scope::Schema(_, _, c) => c,
        }
    }
}

impl Rule {
    /// Specificity of the match (3 = schema.table.column), or `None`. The
    /// scope's names are already folded (see [`FoldedNames`]).
    fn matches(&self, c: &FoldedNames) -> Option<u8> {
        match &self.scope {
            Scope::Column(col) => (c.name == *col).then_some(1),
            Scope::Table(t, col) => {
                (c.name == *col && c.table.as_deref() == Some(t.as_str())).then_some(2)
            }
            Scope::Schema(s, t, col) => (c.name == *col
                && c.table.as_deref() == Some(t.as_str())
                && c.schema.as_deref() == Some(s.as_str()))
            .then_some(3),
        }
    }
}

#[derive(Debug, Clone)]
struct Profile {
    rules: Vec<Rule>,
    detectors: Vec<Detector>,
    detector_action: Action,
}

impl Profile {
    /// The action of the most specific rule matching `c`.
    fn rule_for(&self, c: &FoldedNames) -> Option<Action> {
        self.rules
            .iter()
            .filter_map(|r| r.matches(c).map(|s| (s, r.action)))
            .max_by_key(|(s, _)| *s)
            .map(|(_, a)| a)
    }
}

#[derive(Debug)]
struct Inner {
    profiles: BTreeMap<String, Profile>,
    hasher: Hasher,
    policy: UnmaskablePolicy,
    computed: ComputedColumns,
}

/// Put among a statement's mask profiles (it cannot be a profile's name) when its computed
/// result columns are to be redacted: it used a column the other profiles' rules mask, or
/// what it uses cannot be seen ([`Masker::computes_from_masked`]). A column rule follows a
/// column's table of origin, which a computed column (`upper(email)`, `substr(ssn, 1, 3)`, a
/// column of a UNION) does not have.
pub const COMPUTED_FROM_MASKED: &str = "(computed-from-masked)";

/// Put instead of [`COMPUTED_FROM_MASKED`] for a write that uses a masked column: what it
/// returns (`UPDATE customers SET note = ssn RETURNING note`) may be a masked value stored in
/// a column no rule names, so every returned column is redacted.
pub const RETURNED_FROM_MASKED: &str = "(returned-from-masked)";

/// Validated, compiled masking configuration. Cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct Masker {
    inner: Arc<Inner>,
}

impl fmt::Debug for Masker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Masker")
            .field("profiles", &self.inner.profiles.keys().collect::<Vec<_>>())
            .field("unmaskable_binary", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

impl Masker {
    /// Validate `cfg` and compile it. `key` is the hashing key the caller
    /// resolved from `key_env`/`key_file`; it must be at least
    /// [`MIN_KEY_LEN`] bytes when any profile uses `hash` (it may be empty
    /// otherwise).
    pub fn new(cfg: &MaskingConfig, key: Vec<u8>) -> Result<Masker, MaskError> {
        cfg.validate()?;
        if cfg.needs_key() && key.len() < MIN_KEY_LEN {
            return Err(MaskError::Config(format!(
                "the hash style needs a key of at least {MIN_KEY_LEN} bytes (got {})",
                key.len()
            )));
        }
        let mut profiles = BTreeMap::new();
        for (name, p) in &cfg.profiles {
            let mut rules = Vec::with_capacity(p.columns.len());
            for (i, r) in p.columns.iter().enumerate() {
                let invalid = |reason: String| MaskError::InvalidProfile {
                    profile: name.clone(),
                    entry: format!("columns[{i}] ({:?})", r.column),
                    reason,
                };
                let parts = split_column(&r.column).map_err(invalid)?;
                let scope = match parts.as_slice() {
                    [c] => Scope::Column(fold(c)),
                    [t, c] => Scope::Table(fold(t), fold(c)),
                    [s, t, c] => Scope::Schema(fold(s), fold(t), fold(c)),
                    _ => return Err(invalid("bad dotted name".to_owned())),
                };
                let action = r.action().map_err(invalid)?;
                rules.push(Rule { scope, action });
            }
            let detector_action =
                p.detector_action()
                    .map_err(|reason| MaskError::InvalidProfile {
                        profile: name.clone(),
                        entry: "detector_style".to_owned(),
                        reason,
                    })?;
            profiles.insert(
                name.clone(),
                Profile {
                    rules,
                    detectors: p.detectors.clone(),
                    detector_action,
                },
            );
        }
        let hasher = Hasher::new(&key)?;
        Ok(Masker {
            inner: Arc::new(Inner {
                profiles,
                hasher,
                policy: cfg.unmaskable_binary,
                computed: cfg.computed_columns,
            }),
        })
    }

    /// Should the computed result columns of a statement masked with `profiles` be redacted?
    /// Yes (with `computed_columns: redact`) when it uses (`uses`: folded column names, see
    /// `StatementFacts::computed_from`) a column one of their rules names, or when what it
    /// uses is unknown (`unseen`: a cursor's rows, an opaque statement).
    pub fn computes_from_masked(&self, profiles: &[String], uses: &[String], unseen: bool) -> bool {
        if self.inner.computed == ComputedColumns::Keep || profiles.is_empty() {
            return false;
        }
        if unseen {
            return true;
        }
        profiles
            .iter()
            .filter_map(|p| self.inner.profiles.get(p.as_str()))
            .flat_map(|p| &p.rules)
            .any(|r| {
                // Compared as `fold` would, without a string per comparison (this runs for
                // every statement under a masking policy).
                let column = r.scope.column();
                uses.iter()
                    .any(|u| u.chars().flat_map(char::to_lowercase).eq(column.chars()))
            })
    }

    /// Names of the configured profiles.
    pub fn profile_names(&self) -> impl Iterator<Item = &str> {
        self.inner.profiles.keys().map(String::as_str)
    }

    /// Check up front (e.g. when loading policies) that every name is a
    /// configured profile. [`Masker::plan`] checks again.
    pub fn check_profiles(&self, profiles: &[String]) -> Result<(), MaskError> {
        match profiles.iter().find(|p| {
            *p != COMPUTED_FROM_MASKED
                && *p != RETURNED_FROM_MASKED
                && !self.inner.profiles.contains_key(p.as_str())
        }) {
            Some(unknown) => Err(MaskError::UnknownProfile(unknown.clone())),
            None => Ok(()),
        }
    }

    /// Build the plan for one result set. Unknown profile names are an error
    /// (fail closed: never silently unmasked). No profiles gives a no-op plan.
    pub fn plan(&self, profiles: &[String], columns: &[ColumnMeta]) -> Result<RowPlan, MaskError> {
        self.check_profiles(profiles)?;
        let names: BTreeSet<&str> = profiles.iter().map(String::as_str).collect();
        let active: Vec<&Profile> = names
            .iter()
            .filter_map(|n| self.inner.profiles.get(*n))
            .collect();

        let mut detectors: BTreeMap<Detector, Action> = BTreeMap::new();
        for p in &active {
            for d in &p.detectors {
                let a = detectors
                    .get(d)
                    .map_or(p.detector_action, |prev| prev.stronger(p.detector_action));
                detectors.insert(*d, a);
            }
        }
        let detectors: Vec<(Detector, Action)> = detectors.into_iter().collect();

        let computed = names.contains(COMPUTED_FROM_MASKED);
        let returned = names.contains(RETURNED_FROM_MASKED);
        let mut planned = Vec::new();
        for (index, c) in columns.iter().enumerate() {
            let kind = classify(c.type_oid, c.format);
            let names = FoldedNames::of(c);
            // No table of origin: computed, perhaps from a masked column; its name is only an
            // alias (`substr(ssn, 1, 3) AS card_number`), so redaction overrides any rule.
            let rule = if (computed && c.table.is_none()) || returned {
                Some(Action::Redact)
            } else {
                active
                    .iter()
                    .filter_map(|p| p.rule_for(&names))
                    .reduce(Action::stronger)
            };
            let op = match rule {
                Some(a) => Op::Rule(a),
                // Fail closed: everything but the NOT_TEXT types is inspected.
                None if !detectors.is_empty()
                    && !matches!(kind, Kind::OpaqueText | Kind::OpaqueBinary) =>
                {
                    Op::Detect
                }
                None => continue,
            };
            planned.push(ColPlan {
                index,
                name: c.name.clone(),
                format: c.format,
                kind,
                op,
            });
        }
        Ok(RowPlan {
            width: columns.len(),
            columns: planned,
            detector_kinds: detectors.iter().map(|(d, _)| *d).collect(),
            detectors,
            inner: Arc::clone(&self.inner),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Rule(Action),
    Detect,
}

#[derive(Debug, Clone)]
struct ColPlan {
    index: usize,
    name: String,
    format: Format,
    kind: Kind,
    op: Op,
}

enum Outcome {
    Keep,
    Null,
    Replace(Bytes),
}

/// The masking plan of one result set. Cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct RowPlan {
    width: usize,
    columns: Vec<ColPlan>,
    detectors: Vec<(Detector, Action)>,
    /// The detectors alone, for the values that are only checked for a match (taken once per
    /// plan, not per value).
    detector_kinds: Vec<Detector>,
    inner: Arc<Inner>,
}

impl fmt::Debug for RowPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RowPlan")
            .field("width", &self.width)
            .field("columns", &self.columns)
            .field("detectors", &self.detectors)
            .finish_non_exhaustive()
    }
}

impl RowPlan {
    /// Nothing to mask in this result set: rows can be forwarded untouched.
    pub fn is_noop(&self) -> bool {
        self.columns.is_empty()
    }

    /// Names of the columns a rule masks (for audit logs).
    pub fn rule_columns(&self) -> impl Iterator<Item = &str> {
        self.columns
            .iter()
            .filter(|c| matches!(c.op, Op::Rule(_)))
            .map(|c| c.name.as_str())
    }

    /// Number of columns the detectors inspect.
    pub fn detector_columns(&self) -> usize {
        self.columns.iter().filter(|c| c.op == Op::Detect).count()
    }

    /// Mask one DataRow in place (`None` is SQL NULL and stays NULL).
    /// On error the row may be partly rewritten; the caller denies the query.
    pub fn apply(&self, values: &mut [Option<Bytes>]) -> Result<RowOutcome, MaskError> {
        if values.len() != self.width {
            return Err(MaskError::ColumnCount {
                expected: self.width,
                got: values.len(),
            });
        }
        let mut changed = false;
        for col in &self.columns {
            let Some(slot) = values.get_mut(col.index) else {
                continue;
            };
            let Some(value) = slot.as_ref() else {
                continue;
            };
            match self.mask_value(col, value)? {
                Outcome::Keep => {}
                Outcome::Null => {
                    *slot = None;
                    changed = true;
                }
                Outcome::Replace(b) => {
                    *slot = Some(b);
                    changed = true;
                }
            }
        }
        Ok(RowOutcome { changed })
    }

    /// A value that cannot be masked safely: NULL or an error per policy.
    fn unmaskable(&self, col: &ColPlan, reason: &'static str) -> Result<Outcome, MaskError> {
        match (self.inner.policy, col.format) {
            (UnmaskablePolicy::Null, _) => Ok(Outcome::Null),
            (UnmaskablePolicy::Deny, Format::Binary) => Err(MaskError::UnmaskableBinary {
                column: col.name.clone(),
            }),
            (UnmaskablePolicy::Deny, Format::Text) => Err(MaskError::Unmaskable {
                column: col.name.clone(),
                reason,
            }),
        }
    }

    fn mask_value(&self, col: &ColPlan, value: &[u8]) -> Result<Outcome, MaskError> {
        let hasher = &self.inner.hasher;
        match (col.op, col.kind) {
            (Op::Rule(action), Kind::Text) => match render_value(action, value, hasher) {
                Some(s) => Ok(replace_if_changed(value, s.into_bytes())),
                None => self.unmaskable(col, "invalid UTF-8"),
            },
            (Op::Rule(action), Kind::Json) => match rule_json(action, value, hasher) {
                Some(s) => Ok(replace_if_changed(value, s.into_bytes())),
                None => self.unmaskable(col, "invalid UTF-8"),
            },
            (Op::Rule(action), Kind::JsonbBinary) => {
                let Some(body) = jsonb_body(value) else {
                    return self.unmaskable(col, "unknown jsonb version");
                };
                match rule_json(action, body, hasher) {
                    Some(s) => Ok(replace_if_changed(value, jsonb_binary(&s))),
                    None => self.unmaskable(col, "invalid UTF-8"),
                }
            }
            (Op::Rule(_), Kind::Structured | Kind::ByteaText | Kind::OpaqueText) => {
                Ok(Outcome::Null)
            }
            (Op::Rule(_), Kind::OpaqueBinary | Kind::RawBinary) => {
                self.unmaskable(col, "binary value")
            }
            (Op::Detect, Kind::Text) => {
                let Ok(text) = std::str::from_utf8(value) else {
                    return self.unmaskable(col, "invalid UTF-8");
                };
                Ok(match mask_text(text, &self.detectors, hasher) {
                    Some(s) => Outcome::Replace(Bytes::from(s)),
                    None => Outcome::Keep,
                })
            }
            (Op::Detect, Kind::Json) => {
                let Ok(text) = std::str::from_utf8(value) else {
                    return self.unmaskable(col, "invalid UTF-8");
                };
                match self.detect_json(text) {
                    Ok(Some(s)) => Ok(Outcome::Replace(Bytes::from(s))),
                    Ok(None) => Ok(Outcome::Keep),
                    Err(Malformed) => self.unmaskable(col, "malformed JSON"),
                }
            }
            (Op::Detect, Kind::JsonbBinary) => {
                let Some(body) = jsonb_body(value) else {
                    return self.unmaskable(col, "unknown jsonb version");
                };
                let Ok(text) = std::str::from_utf8(body) else {
                    return self.unmaskable(col, "invalid UTF-8");
                };
                match self.detect_json(text) {
                    Ok(Some(s)) => Ok(Outcome::Replace(Bytes::from(jsonb_binary(&s)))),
                    Ok(None) => Ok(Outcome::Keep),
                    Err(Malformed) => self.unmaskable(col, "malformed JSON"),
                }
            }
            (Op::Detect, Kind::Structured) => {
                let Ok(text) = std::str::from_utf8(value) else {
                    return self.unmaskable(col, "invalid UTF-8");
                };
                Ok(if contains_match(text, &self.detector_kinds) {
                    Outcome::Null
                } else {
                    Outcome::Keep
                })
            }
            (Op::Detect, Kind::ByteaText) => {
                let Some(bytes) = decode_bytea_text(value) else {
                    return self.unmaskable(col, "malformed bytea");
                };
                if contains_match_in_bytes(&bytes, &self.detector_kinds) {
                    self.unmaskable(col, "detector match in bytea")
                } else {
                    Ok(Outcome::Keep)
                }
            }
            (Op::Detect, Kind::RawBinary) => {
                // The layout is unknown, so a match cannot be rewritten in place.
                if contains_match_in_bytes(value, &self.detector_kinds) {
                    self.unmaskable(col, "detector match in a binary value")
                } else {
                    Ok(Outcome::Keep)
                }
            }
            // Not planned (see NOT_TEXT).
            (Op::Detect, Kind::OpaqueText | Kind::OpaqueBinary) => Ok(Outcome::Keep),
        }
    }

    fn detect_json(&self, text: &str) -> Result<Option<String>, Malformed> {
        let hasher = &self.inner.hasher;
        mask_json(text, |s| mask_text(s, &self.detectors, hasher))
    }
}

fn replace_if_changed(old: &[u8], new: Vec<u8>) -> Outcome {
    if old == new.as_slice() {
        Outcome::Keep
    } else {
        Outcome::Replace(Bytes::from(new))
    }
}

/// The bytes of a text-format bytea value: `\x` + hex digits (the default
/// `bytea_output`), or the escape format (`\\` for a backslash, `\nnn`
/// octal for other bytes, the rest literal). `None` if malformed.
fn decode_bytea_text(value: &[u8]) -> Option<Vec<u8>> {
    if let Some(hex) = value.strip_prefix(b"\\x") {
        return hex::decode(hex).ok();
    }
    let mut out = Vec::with_capacity(value.len());
    let mut rest = value;
    while let Some((&b, tail)) = rest.split_first() {
        if b != b'\\' {
            out.push(b);
            rest = tail;
            continue;
        }
        match tail {
            [b'\\', more @ ..] => {
                out.push(b'\\');
                rest = more;
            }
            [
                hi @ b'0'..=b'3',
                mid @ b'0'..=b'7',
                lo @ b'0'..=b'7',
                more @ ..,
            ] => {
                out.push(((hi - b'0') << 6) | ((mid - b'0') << 3) | (lo - b'0'));
                rest = more;
            }
            _ => return None,
        }
    }
    Some(out)
}

/// Text of a binary jsonb value (version byte 1), or `None`.
fn jsonb_body(value: &[u8]) -> Option<&[u8]> {
    match value.split_first() {
        Some((1, body)) => Some(body),
        _ => None,
    }
}

fn jsonb_binary(json: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len() + 1);
    out.push(1);
    out.extend_from_slice(json.as_bytes());
    out
}

/// A rule over a JSON value: the style is applied to the decoded string if
/// the value is a single JSON string, else to the JSON text; the result is a
/// JSON string. `None` when the bytes are needed as UTF-8 and are not.
fn rule_json(action: Action, value: &[u8], hasher: &Hasher) -> Option<String> {
    if action == Action::Redact {
        return render_value(action, value, hasher).map(|s| json_string(&s));
    }
    let text = std::str::from_utf8(value).ok()?;
    let subject = top_level_string(text).unwrap_or_else(|| text.to_owned());
    render_value(action, subject.as_bytes(), hasher).map(|s| json_string(&s))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::super::config::{ColumnRule, ProfileConfig, Style};
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
    const INT8: u32 = 20;
    const INT4: u32 = 23;
    const TEXT: u32 = 25;
    const VARCHAR: u32 = 1043;
    const UUID: u32 = 2950;
    const NUMERIC: u32 = 1700;
    const CITEXT: u32 = 16_500;

    fn rule(column: &str, style: Style, keep: Option<u32>) -> ColumnRule {
        ColumnRule {
            column: column.to_owned(),
            style,
            keep,
        }
    }

    fn config(policy: UnmaskablePolicy) -> MaskingConfig {
        let mut profiles = BTreeMap::new();
        profiles.insert(
            "pii".to_owned(),
            ProfileConfig {
                columns: vec![
                    rule("email", Style::Redact, None),
                    rule("public.customers.card_number", Style::KeepLast, Some(4)),
                    rule("customers.ssn", Style::Hash, None),
                    rule("balance", Style::Redact, None),
                    rule("id", Style::Hash, None),
                    rule("doc", Style::KeepLast, Some(3)),
                    rule("raw", Style::Redact, None),
                ],
                detectors: Detector::ALL.to_vec(),
                ..ProfileConfig::default()
            },
        );
        profiles.insert(
            "cols".to_owned(),
            ProfileConfig {
                columns: vec![rule("email", Style::Hash, None)],
                ..ProfileConfig::default()
            },
        );
        MaskingConfig {
            key_env: Some("AGENTGATE_MASK_KEY".to_owned()),
            key_file: None,
            unmaskable_binary: policy,
            profiles,
            computed_columns: ComputedColumns::Redact,
        }
    }

    #[test]
    fn computed_columns_of_a_statement_using_a_masked_column_are_redacted() {
        let m = masker(UnmaskablePolicy::Null);
        let pii = pii();
        let uses = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        // `public.customers.card_number` and `customers.ssn` are ruled in `pii`.
        assert!(m.computes_from_masked(&pii, &uses(&["card_number"]), false));
        assert!(m.computes_from_masked(&pii, &uses(&["name", "SSN"]), false));
        assert!(!m.computes_from_masked(&pii, &uses(&["name", "note"]), false));
        assert!(m.computes_from_masked(&pii, &[], true), "unseen: redact");
        assert!(
            !m.computes_from_masked(&[], &uses(&["ssn"]), true),
            "not masked at all"
        );

        let mut profiles = pii.clone();
        profiles.push(COMPUTED_FROM_MASKED.to_owned());
        let mut from_table = col("ssn", TEXT, Format::Text);
        from_table.table = Some("other".to_owned());
        let cols = [
            col("upper", TEXT, Format::Text),
            col("length", INT4, Format::Text),
            col("n", INT4, Format::Binary),
            from_table,
        ];
        let plan = m.plan(&profiles, &cols).unwrap();
        let mut row = vec![
            Some(Bytes::from_static(b"123-45")),
            Some(Bytes::from_static(b"11")),
            Some(Bytes::from_static(&[0, 0, 0, 11])),
            Some(Bytes::from_static(b"plain")),
        ];
        plan.apply(&mut row).unwrap();
        let redacted = row[0].as_deref().unwrap();
        assert!(
            !redacted.windows(2).any(|w| w == b"12"),
            "a computed text value is redacted: {redacted:?}"
        );
        assert_eq!(
            row[1], None,
            "a computed number cannot be redacted in place: NULL"
        );
        assert_eq!(row[2], None, "nor in binary");
        assert_eq!(
            row[3].as_deref(),
            Some(&b"plain"[..]),
            "a table's column is left to its rules"
        );
        // Without the marker, the computed columns are only inspected by the detectors.
        let plan = m.plan(&pii, &cols).unwrap();
        let mut row = vec![
            Some(Bytes::from_static(b"123-45")),
            Some(Bytes::from_static(b"11")),
            Some(Bytes::from_static(&[0, 0, 0, 11])),
            Some(Bytes::from_static(b"plain")),
        ];
        plan.apply(&mut row).unwrap();
        assert_eq!(row[0].as_deref(), Some(&b"123-45"[..]));
        // `computed_columns: keep` opts out.
        let mut cfg = config(UnmaskablePolicy::Null);
        cfg.computed_columns = ComputedColumns::Keep;
        let keep = Masker::new(&cfg, KEY.to_vec()).unwrap();
        assert!(!keep.computes_from_masked(&pii, &uses(&["ssn"]), true));
    }

    fn masker(policy: UnmaskablePolicy) -> Masker {
        Masker::new(&config(policy), KEY.to_vec()).unwrap()
    }

    fn col(name: &str, oid: u32, format: Format) -> ColumnMeta {
        ColumnMeta {
            name: name.to_owned(),
            schema: None,
            table: None,
            type_oid: oid,
            format,
        }
    }

    fn tcol(schema: &str, table: &str, name: &str, oid: u32) -> ColumnMeta {
        ColumnMeta {
            name: name.to_owned(),
            schema: Some(schema.to_owned()),
            table: Some(table.to_owned()),
            type_oid: oid,
            format: Format::Text,
        }
    }

    fn pii() -> Vec<String> {
        vec!["pii".to_owned()]
    }

    fn v(s: &str) -> Option<Bytes> {
        Some(Bytes::from(s.to_owned()))
    }

    fn run(plan: &RowPlan, mut row: Vec<Option<Bytes>>) -> (Vec<Option<Bytes>>, bool) {
        let out = plan.apply(&mut row).unwrap();
        (row, out.changed)
    }

    fn hash(data: &str) -> String {
        Hasher::new(KEY).unwrap().hash(data.as_bytes())
    }

    #[test]
    fn classify_types() {
        assert_eq!(classify(TEXT, Format::Binary), Kind::Text);
        assert_eq!(classify(1042, Format::Text), Kind::Text);
        assert_eq!(classify(19, Format::Binary), Kind::Text);
        assert_eq!(classify(705, Format::Text), Kind::Text);
        assert_eq!(classify(JSON, Format::Binary), Kind::Json);
        assert_eq!(classify(JSONB, Format::Text), Kind::Json);
        assert_eq!(classify(JSONB, Format::Binary), Kind::JsonbBinary);
        assert_eq!(classify(CITEXT, Format::Text), Kind::Text);
        assert_eq!(classify(CITEXT, Format::Binary), Kind::RawBinary);
        assert_eq!(classify(INT8, Format::Text), Kind::OpaqueText);
        assert_eq!(classify(INT8, Format::Binary), Kind::OpaqueBinary);
        assert_eq!(classify(1016, Format::Binary), Kind::OpaqueBinary);
        assert_eq!(classify(1009, Format::Text), Kind::Structured);
        assert_eq!(classify(1009, Format::Binary), Kind::RawBinary);
        assert_eq!(classify(BYTEA, Format::Text), Kind::ByteaText);
        assert_eq!(classify(BYTEA, Format::Binary), Kind::RawBinary);
        // Built-in types outside NOT_TEXT are inspected: refcursor, jsonpath.
        assert_eq!(classify(1790, Format::Text), Kind::Structured);
        assert_eq!(classify(4072, Format::Binary), Kind::RawBinary);
        assert_eq!(classify(0, Format::Binary), Kind::RawBinary);
        assert!(is_text_like(VARCHAR) && !is_text_like(UUID));
        assert_eq!(Format::from_code(1), Some(Format::Binary));
        assert_eq!(Format::from_code(2), None);
    }

    #[test]
    fn column_matching_by_name_table_and_schema() {
        let m = masker(UnmaskablePolicy::Null);
        let cols = vec![
            col("email", TEXT, Format::Text),
            tcol("public", "customers", "card_number", TEXT),
            tcol("sales", "customers", "ssn", TEXT),
            // Same names in other tables/schemas: not matched by qualified rules.
            tcol("other", "customers", "card_number", TEXT),
            tcol("public", "orders", "ssn", TEXT),
            col("card_number", TEXT, Format::Text),
            col("note", TEXT, Format::Text),
        ];
        let plan = m.plan(&pii(), &cols).unwrap();
        assert_eq!(
            plan.rule_columns().collect::<Vec<_>>(),
            ["email", "card_number", "ssn"]
        );
        let (row, changed) = run(
            &plan,
            vec![
                v("alice@example.com"),
                v("4111111111111111"),
                v("078-05-1120"),
                v("5500000000000004"),
                v("no-ssn-here"),
                v("plain text"),
                v("hello"),
            ],
        );
        assert!(changed);
        assert_eq!(row[0], v("[REDACTED]"));
        assert_eq!(row[1], v("************1111"));
        assert_eq!(row[2], v(&hash("078-05-1120")));
        // Unmatched by rules, but the card detector still masks it.
        assert_eq!(row[3], v("[REDACTED:credit_card]"));
        assert_eq!(row[4], v("no-ssn-here"));
        assert_eq!(row[5], v("plain text"));
        assert_eq!(row[6], v("hello"));
    }

    #[test]
    fn rule_names_match_case_insensitively() {
        let mut cfg = config(UnmaskablePolicy::Null);
        cfg.profiles.insert(
            "upper".to_owned(),
            ProfileConfig {
                columns: vec![
                    rule("Customers.SSN", Style::Redact, None),
                    rule("Public.Orders.Card", Style::KeepLast, Some(4)),
                    rule("EMAIL", Style::Redact, None),
                ],
                ..ProfileConfig::default()
            },
        );
        let m = Masker::new(&cfg, KEY.to_vec()).unwrap();
        let cols = vec![
            // Unquoted identifiers, folded to lower case by PostgreSQL.
            tcol("public", "customers", "ssn", TEXT),
            tcol("public", "orders", "card", TEXT),
            // Quoted identifiers that kept their case.
            tcol("public", "Customers", "SSN", TEXT),
            tcol("PUBLIC", "ORDERS", "Card", TEXT),
            col("Email", TEXT, Format::Text),
            // Other tables are still not matched by qualified rules.
            tcol("public", "orders", "ssn", TEXT),
        ];
        let plan = m.plan(&["upper".to_owned()], &cols).unwrap();
        assert_eq!(
            plan.rule_columns().collect::<Vec<_>>(),
            ["ssn", "card", "SSN", "Card", "Email"]
        );
        let (row, _) = run(
            &plan,
            vec![
                v("078-05-1120"),
                v("4111111111111111"),
                v("078-05-1120"),
                v("4111111111111111"),
                v("a@b.io"),
                v("kept"),
            ],
        );
        assert_eq!(
            row,
            vec![
                v("[REDACTED]"),
                v("************1111"),
                v("[REDACTED]"),
                v("************1111"),
                v("[REDACTED]"),
                v("kept"),
            ]
        );
    }

    #[test]
    fn most_specific_rule_wins_within_profile_strongest_across() {
        let mut cfg = config(UnmaskablePolicy::Null);
        cfg.profiles.insert(
            "refine".to_owned(),
            ProfileConfig {
                columns: vec![
                    rule("email", Style::Redact, None),
                    rule("users.email", Style::Hash, None),
                ],
                ..ProfileConfig::default()
            },
        );
        let m = Masker::new(&cfg, KEY.to_vec()).unwrap();
        let cols = vec![
            tcol("public", "users", "email", TEXT),
            tcol("public", "admins", "email", TEXT),
        ];
        let plan = m.plan(&["refine".to_owned()], &cols).unwrap();
        let (row, _) = run(&plan, vec![v("a@b.io"), v("a@b.io")]);
        assert_eq!(row[0], v(&hash("a@b.io")));
        assert_eq!(row[1], v("[REDACTED]"));

        // "cols" hashes email, "pii" redacts it: redact is stronger.
        let plan = m
            .plan(&["cols".to_owned(), "pii".to_owned()], &cols[..1])
            .unwrap();
        let (row, _) = run(&plan, vec![v("a@b.io")]);
        assert_eq!(row[0], v("[REDACTED]"));
        let plan = m.plan(&["cols".to_owned()], &cols[..1]).unwrap();
        let (row, _) = run(&plan, vec![v("a@b.io")]);
        assert_eq!(row[0], v(&hash("a@b.io")));
    }

    #[test]
    fn detectors_mask_in_place_in_text_columns() {
        let m = masker(UnmaskablePolicy::Null);
        let cols = vec![
            col("note", TEXT, Format::Text),
            col("note_bin", VARCHAR, Format::Binary),
            col("ci", CITEXT, Format::Text),
        ];
        let plan = m.plan(&pii(), &cols).unwrap();
        assert_eq!(plan.detector_columns(), 3);
        let text = "Reach bob@corp.example or (415) 555-2671; key AKIAIOSFODNN7EXAMPLE.";
        let (row, changed) = run(&plan, vec![v(text), v(text), v("x@y.org")]);
        assert!(changed);
        let want = "Reach [REDACTED:email] or [REDACTED:phone]; key [REDACTED:aws_access_key].";
        assert_eq!(row[0], v(want));
        assert_eq!(row[1], v(want));
        assert_eq!(row[2], v("[REDACTED:email]"));
    }

    #[test]
    fn binary_text_column_masked_by_rule() {
        let m = masker(UnmaskablePolicy::Deny);
        let cols = vec![
            col("email", VARCHAR, Format::Binary),
            ColumnMeta {
                format: Format::Binary,
                ..tcol("public", "customers", "card_number", TEXT)
            },
        ];
        let plan = m.plan(&pii(), &cols).unwrap();
        let (row, changed) = run(
            &plan,
            vec![v("alice@example.com"), v("4111-1111-1111-1111")],
        );
        assert!(changed);
        assert_eq!(row[0], v("[REDACTED]"));
        assert_eq!(row[1], v("***************1111"));
    }

    #[test]
    fn binary_non_text_column_null_or_deny() {
        let cols = vec![
            col("id", INT8, Format::Binary),
            col("note", TEXT, Format::Text),
        ];
        let value = Some(Bytes::copy_from_slice(&42i64.to_be_bytes()));

        let plan = masker(UnmaskablePolicy::Null).plan(&pii(), &cols).unwrap();
        let (row, changed) = run(&plan, vec![value.clone(), v("ok")]);
        assert!(changed);
        assert_eq!(row, vec![None, v("ok")]);

        let plan = masker(UnmaskablePolicy::Deny).plan(&pii(), &cols).unwrap();
        let mut row = vec![value, v("ok")];
        let err = plan.apply(&mut row).unwrap_err();
        assert_eq!(
            err,
            MaskError::UnmaskableBinary {
                column: "id".to_owned()
            }
        );
        assert!(err.is_unmaskable());
        // NULL needs no masking, even with deny.
        let mut row = vec![None, v("ok")];
        assert!(!plan.apply(&mut row).unwrap().changed);
    }

    #[test]
    fn text_format_non_text_column_becomes_null() {
        // redact, hash and keep_last on int8 / numeric / uuid in text format.
        let m = masker(UnmaskablePolicy::Deny);
        let cols = vec![
            col("id", INT8, Format::Text),
            col("balance", NUMERIC, Format::Text),
            col("doc", UUID, Format::Text),
            col("raw", 1009, Format::Text),
        ];
        let plan = m.plan(&pii(), &cols).unwrap();
        let (row, changed) = run(
            &plan,
            vec![
                v("42"),
                v("1234.50"),
                v("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
                v("{a,b}"),
            ],
        );
        assert!(changed);
        assert_eq!(row, vec![None, None, None, None]);
    }

    #[test]
    fn hash_rule_on_text_is_deterministic_and_keyed() {
        let cols = vec![
            col("id", TEXT, Format::Text),
            col("id", TEXT, Format::Binary),
        ];
        let plan = masker(UnmaskablePolicy::Null).plan(&pii(), &cols).unwrap();
        let (a, _) = run(&plan, vec![v("user-1"), v("user-1")]);
        let (b, _) = run(&plan, vec![v("user-1"), v("user-2")]);
        assert_eq!(a[0], a[1]);
        assert_eq!(a[0], b[0]);
        assert_ne!(b[0], b[1]);

        let other = Masker::new(
            &config(UnmaskablePolicy::Null),
            b"another key, 16+ bytes".to_vec(),
        )
        .unwrap()
        .plan(&pii(), &cols)
        .unwrap();
        let (c, _) = run(&other, vec![v("user-1"), v("user-1")]);
        assert_ne!(a[0], c[0]);
    }

    #[test]
    fn jsonb_binary_keeps_version_byte() {
        let m = masker(UnmaskablePolicy::Deny);
        let cols = vec![
            col("payload", JSONB, Format::Binary),
            col("email", JSONB, Format::Binary),
        ];
        let plan = m.plan(&pii(), &cols).unwrap();
        let mut payload = vec![1u8];
        payload.extend_from_slice(br#"{"contact": "mail alice@example.com", "n": 1}"#);
        let mut email = vec![1u8];
        email.extend_from_slice(br#""alice@example.com""#);
        let (row, changed) = run(
            &plan,
            vec![Some(Bytes::from(payload)), Some(Bytes::from(email))],
        );
        assert!(changed);
        let p = row[0].as_ref().unwrap();
        assert_eq!(p[0], 1);
        assert_eq!(&p[1..], br#"{"contact": "mail [REDACTED:email]", "n": 1}"#);
        let e = row[1].as_ref().unwrap();
        assert_eq!(&e[..], b"\x01\"[REDACTED]\"");

        // Unknown version byte: unmaskable.
        let mut row = vec![Some(Bytes::from_static(b"\x02{}")), None];
        assert_eq!(
            plan.apply(&mut row).unwrap_err(),
            MaskError::UnmaskableBinary {
                column: "payload".to_owned()
            }
        );
    }

    #[test]
    fn json_detectors_keep_json_valid() {
        let m = masker(UnmaskablePolicy::Null);
        let cols = vec![
            col("doc_json", JSON, Format::Text),
            col("doc_jsonb", JSONB, Format::Text),
        ];
        let plan = m.plan(&pii(), &cols).unwrap();
        let json = r#"{"e":"\nbob@corp.example","pem":"-----BEGIN PRIVATE KEY-----\nMC4CAQ\n-----END PRIVATE KEY-----","card":4111111111111111,"ok":"fine"}"#;
        let (row, changed) = run(&plan, vec![v(json), v(json)]);
        assert!(changed);
        let want = r#"{"e":"\n[REDACTED:email]","pem":"[REDACTED:private_key]","card":"[REDACTED:credit_card]","ok":"fine"}"#;
        assert_eq!(row[0], v(want));
        assert_eq!(row[1], v(want));
    }

    #[test]
    fn json_rule_outputs_json_strings() {
        let mut cfg = config(UnmaskablePolicy::Null);
        cfg.profiles.insert(
            "j".to_owned(),
            ProfileConfig {
                columns: vec![
                    rule("a", Style::Redact, None),
                    rule("b", Style::KeepLast, Some(4)),
                    rule("c", Style::Hash, None),
                ],
                ..ProfileConfig::default()
            },
        );
        let m = Masker::new(&cfg, KEY.to_vec()).unwrap();
        let cols = vec![
            col("a", JSONB, Format::Text),
            col("b", JSON, Format::Text),
            col("c", JSON, Format::Binary),
        ];
        let plan = m.plan(&["j".to_owned()], &cols).unwrap();
        let (row, _) = run(
            &plan,
            vec![v(r#"{"x": 1}"#), v(r#""4111111111111111""#), v(r#""abc""#)],
        );
        assert_eq!(row[0], v(r#""[REDACTED]""#));
        assert_eq!(row[1], v(r#""************1111""#));
        assert_eq!(row[2], v(&format!("\"{}\"", hash("abc"))));
    }

    #[test]
    fn structured_columns_null_on_detector_match() {
        let m = masker(UnmaskablePolicy::Null);
        let cols = vec![
            col("tags", 1009, Format::Text),
            col("tags2", 1009, Format::Text),
        ];
        let plan = m.plan(&pii(), &cols).unwrap();
        let (row, _) = run(&plan, vec![v("{a@b.io,x}"), v("{a,b}")]);
        assert_eq!(row, vec![None, v("{a,b}")]);
    }

    #[test]
    fn non_text_columns_not_inspected_by_detectors() {
        let m = masker(UnmaskablePolicy::Deny);
        let cols = vec![
            col("n", INT8, Format::Text),
            col("n2", INT4, Format::Binary),
            col("n3", 1016, Format::Binary), // int8[]
            col("d", UUID, Format::Binary),
        ];
        let plan = m.plan(&pii(), &cols).unwrap();
        assert!(plan.is_noop());
        let int4 = b(&1_234_567i32.to_be_bytes());
        let ints = array_binary(20, &[&4_111_111_111_111_111i64.to_be_bytes()]);
        let id = b(b"a@b.io a@b.io ..");
        let (row, changed) = run(
            &plan,
            vec![
                v("4111111111111111"),
                int4.clone(),
                ints.clone(),
                id.clone(),
            ],
        );
        assert!(!changed);
        assert_eq!(row, vec![v("4111111111111111"), int4, ints, id]);
    }

    /// A one-dimensional array in binary format (`array_send`), no NULLs.
    fn array_binary(elem_oid: i32, elements: &[&[u8]]) -> Option<Bytes> {
        let mut out = Vec::new();
        let n = i32::try_from(elements.len()).unwrap();
        for x in [1, 0, elem_oid, n, 1] {
            out.extend_from_slice(&i32::to_be_bytes(x));
        }
        for e in elements {
            out.extend_from_slice(&i32::try_from(e.len()).unwrap().to_be_bytes());
            out.extend_from_slice(e);
        }
        Some(Bytes::from(out))
    }

    fn b(bytes: &[u8]) -> Option<Bytes> {
        Some(Bytes::copy_from_slice(bytes))
    }

    #[test]
    fn citext_binary_inspected_null_or_deny() {
        let cols = vec![
            col("contact", CITEXT, Format::Binary),
            col("n", INT4, Format::Binary),
        ];
        let plan = masker(UnmaskablePolicy::Null).plan(&pii(), &cols).unwrap();
        assert_eq!(plan.detector_columns(), 1);
        // The int4 next to it is neither inspected nor touched.
        let int4 = b(&0x4040_4040i32.to_be_bytes());
        let (row, changed) = run(&plan, vec![v("Mail Alice@Example.com"), int4.clone()]);
        assert!(changed);
        assert_eq!(row, vec![None, int4.clone()]);
        let (row, changed) = run(&plan, vec![v("no contact"), int4.clone()]);
        assert!(!changed);
        assert_eq!(row, vec![v("no contact"), int4]);

        let plan = masker(UnmaskablePolicy::Deny).plan(&pii(), &cols).unwrap();
        let mut row = vec![v("alice@example.com"), None];
        assert_eq!(
            plan.apply(&mut row).unwrap_err(),
            MaskError::UnmaskableBinary {
                column: "contact".to_owned()
            }
        );
    }

    #[test]
    fn bytea_inspected_in_both_formats() {
        let cols = vec![
            col("hex", BYTEA, Format::Text),
            col("esc", BYTEA, Format::Text),
            col("bin", BYTEA, Format::Binary),
        ];
        let plan = masker(UnmaskablePolicy::Null).plan(&pii(), &cols).unwrap();
        assert_eq!(plan.detector_columns(), 3);
        let secret: &[u8] = b"\x00\x01 to bob@corp.example\xff";
        let hex_text = format!("\\x{}", hex::encode(secret));
        // Escape format: non-ASCII bytes as octal (here the "ë" of an address).
        let esc_text = "\\\\ zo\\303\\253@example.org \\000";
        let (row, changed) = run(&plan, vec![v(&hex_text), v(esc_text), b(secret)]);
        assert!(changed);
        assert_eq!(row, vec![None, None, None]);

        let clean: &[u8] = b"\x00\x01\x7f\xff no address";
        let hex_clean = format!("\\x{}", hex::encode(clean));
        let (row, changed) = run(&plan, vec![v(&hex_clean), v("plain \\\\ text"), b(clean)]);
        assert!(!changed);
        assert_eq!(row[0], v(&hex_clean));

        // Malformed text-format bytea cannot be inspected: unmaskable.
        let plan = masker(UnmaskablePolicy::Deny).plan(&pii(), &cols).unwrap();
        let mut row = vec![v("\\xzz"), None, None];
        assert!(matches!(
            plan.apply(&mut row).unwrap_err(),
            MaskError::Unmaskable { ref column, .. } if column == "hex"
        ));
        let mut row = vec![None, None, b(secret)];
        assert_eq!(
            plan.apply(&mut row).unwrap_err(),
            MaskError::UnmaskableBinary {
                column: "bin".to_owned()
            }
        );
    }

    #[test]
    fn bytea_text_decoding() {
        assert_eq!(decode_bytea_text(b"\\x41ff").unwrap(), b"A\xff");
        assert_eq!(decode_bytea_text(b"\\x").unwrap(), b"");
        assert_eq!(decode_bytea_text(b"a\\\\b\\001").unwrap(), b"a\\b\x01");
        assert!(decode_bytea_text(b"\\x4").is_none());
        assert!(decode_bytea_text(b"\\9").is_none());
        assert!(decode_bytea_text(b"tail\\").is_none());
    }

    #[test]
    fn arrays_and_records_in_binary_are_inspected() {
        let cols = vec![
            col("tags", 1009, Format::Binary),  // text[]
            col("names", 1015, Format::Binary), // varchar[]
            col("docs", 3807, Format::Binary),  // jsonb[]
            col("row", 2249, Format::Binary),   // record
            col("clean", 1009, Format::Binary), // text[]
        ];
        let plan = masker(UnmaskablePolicy::Null).plan(&pii(), &cols).unwrap();
        assert_eq!(plan.detector_columns(), 5);
        let mut record = Vec::new();
        for x in [2i32, 23, 4, 7, 25, 11] {
            record.extend_from_slice(&x.to_be_bytes());
        }
        record.extend_from_slice(b"078-05-1120");
        let clean = array_binary(25, &[b"alpha", b"order 12345"]);
        // 52 bytes: the length prefix ends in '4', glued to the number.
        let glued: &[u8] = b"4111111111111111 is the card on file, keep it safe!!";
        assert_eq!(glued.len(), usize::from(b'4'));
        let (row, changed) = run(
            &plan,
            vec![
                array_binary(25, &[b"x", b"card 4111 1111 1111 1111"]),
                array_binary(1043, &[glued]),
                array_binary(3802, &[b"\x01{\"k\": \"AKIAIOSFODNN7EXAMPLE\"}"]),
                Some(Bytes::from(record)),
                clean.clone(),
            ],
        );
        assert!(changed);
        assert_eq!(row, vec![None, None, None, None, clean]);
    }

    #[test]
    fn null_stays_null() {
        let m = masker(UnmaskablePolicy::Deny);
        let cols = vec![
            col("email", TEXT, Format::Text),
            col("note", TEXT, Format::Text),
            col("id", INT8, Format::Binary),
            col("j", JSONB, Format::Binary),
        ];
        let plan = m.plan(&pii(), &cols).unwrap();
        let mut row = vec![None, None, None, None];
        let out = plan.apply(&mut row).unwrap();
        assert!(!out.changed);
        assert_eq!(row, vec![None, None, None, None]);
    }

    #[test]
    fn non_matching_plan_is_noop_and_untouched() {
        let m = masker(UnmaskablePolicy::Null);
        let cols = vec![
            col("email", TEXT, Format::Text),
            col("id", INT8, Format::Binary),
        ];
        // "cols" has no detectors; "id" has no rule there.
        let plan = m.plan(&["cols".to_owned()], &cols[1..]).unwrap();
        assert!(plan.is_noop());
        let original = Bytes::from_static(b"\x00\x00\x00\x00\x00\x00\x00\x2a");
        let mut row = vec![Some(original.clone())];
        assert!(!plan.apply(&mut row).unwrap().changed);
        assert_eq!(row[0].as_ref().unwrap().as_ptr(), original.as_ptr());

        // No profiles at all.
        let plan = m.plan(&[], &cols).unwrap();
        assert!(plan.is_noop());

        // A detector plan on clean text leaves the same buffer in place.
        let plan = m.plan(&pii(), &[col("note", TEXT, Format::Text)]).unwrap();
        assert!(!plan.is_noop());
        let clean = Bytes::from_static(b"nothing sensitive, order 12345");
        let mut row = vec![Some(clean.clone())];
        assert!(!plan.apply(&mut row).unwrap().changed);
        assert_eq!(row[0].as_ref().unwrap().as_ptr(), clean.as_ptr());
    }

    #[test]
    fn invalid_utf8_is_unmaskable() {
        let bad = Some(Bytes::from_static(b"ab\xffcd@x.io"));
        let cols = vec![
            col("note", TEXT, Format::Text),
            col("card_number", TEXT, Format::Text),
        ];
        let mut cfg = config(UnmaskablePolicy::Null);
        cfg.profiles.get_mut("pii").unwrap().columns.push(rule(
            "card_number",
            Style::KeepLast,
            Some(4),
        ));
        let plan = Masker::new(&cfg, KEY.to_vec())
            .unwrap()
            .plan(&pii(), &cols)
            .unwrap();
        let (row, changed) = run(&plan, vec![bad.clone(), bad.clone()]);
        assert!(changed);
        assert_eq!(row, vec![None, None]);

        cfg.unmaskable_binary = UnmaskablePolicy::Deny;
        let plan = Masker::new(&cfg, KEY.to_vec())
            .unwrap()
            .plan(&pii(), &cols)
            .unwrap();
        let mut row = vec![bad.clone(), None];
        let err = plan.apply(&mut row).unwrap_err();
        assert!(matches!(err, MaskError::Unmaskable { ref column, .. } if column == "note"));
        // Redact does not need to read the value.
        let plan = Masker::new(&cfg, KEY.to_vec())
            .unwrap()
            .plan(&pii(), &[col("email", TEXT, Format::Text)])
            .unwrap();
        let (row, _) = run(&plan, vec![bad]);
        assert_eq!(row[0], v("[REDACTED]"));
    }

    #[test]
    fn unknown_profile_is_an_error() {
        let m = masker(UnmaskablePolicy::Null);
        let cols = vec![col("email", TEXT, Format::Text)];
        assert_eq!(
            m.plan(&["nope".to_owned()], &cols).unwrap_err(),
            MaskError::UnknownProfile("nope".to_owned())
        );
        assert!(m.check_profiles(&pii()).is_ok());
        assert!(
            m.check_profiles(&["pii".to_owned(), "x".to_owned()])
                .is_err()
        );
        assert_eq!(m.profile_names().collect::<Vec<_>>(), ["cols", "pii"]);
    }

    #[test]
    fn wrong_row_width_is_an_error() {
        let m = masker(UnmaskablePolicy::Null);
        let plan = m.plan(&pii(), &[col("email", TEXT, Format::Text)]).unwrap();
        let mut row = vec![v("a"), v("b")];
        assert_eq!(
            plan.apply(&mut row).unwrap_err(),
            MaskError::ColumnCount {
                expected: 1,
                got: 2
            }
        );
    }

    #[test]
    fn key_requirements() {
        let cfg = config(UnmaskablePolicy::Null);
        assert!(matches!(
            Masker::new(&cfg, b"short".to_vec()),
            Err(MaskError::Config(_))
        ));
        // No hash style anywhere: no key needed.
        let mut cfg = MaskingConfig::default();
        cfg.profiles.insert(
            "r".to_owned(),
            ProfileConfig {
                columns: vec![rule("x", Style::Redact, None)],
                ..ProfileConfig::default()
            },
        );
        assert!(Masker::new(&cfg, Vec::new()).is_ok());
        // Debug never shows the key.
        let dbg = format!("{:?}", masker(UnmaskablePolicy::Null));
        assert!(!dbg.contains("0123456789abcdef"));
    }

    #[test]
    fn detector_style_hash_and_keep_last_and_merge() {
        let mut cfg = config(UnmaskablePolicy::Null);
        cfg.profiles.insert(
            "h".to_owned(),
            ProfileConfig {
                detectors: vec![Detector::Email],
                detector_style: Style::Hash,
                ..ProfileConfig::default()
            },
        );
        cfg.profiles.insert(
            "k".to_owned(),
            ProfileConfig {
                detectors: vec![Detector::CreditCard, Detector::Email],
                detector_style: Style::KeepLast,
                detector_keep: Some(4),
                ..ProfileConfig::default()
            },
        );
        let m = Masker::new(&cfg, KEY.to_vec()).unwrap();
        let cols = [col("note", TEXT, Format::Text)];
        let text = "a@b.io paid with 4111111111111111";
        let plan = m.plan(&["h".to_owned()], &cols).unwrap();
        let (row, _) = run(&plan, vec![v(text)]);
        assert_eq!(
            row[0],
            v(&format!("{} paid with 4111111111111111", hash("a@b.io")))
        );
        let plan = m.plan(&["k".to_owned()], &cols).unwrap();
        let (row, _) = run(&plan, vec![v(text)]);
        assert_eq!(row[0], v("**b.io paid with ************1111"));
        // Both: email hash (stronger than keep_last), card keep_last.
        let plan = m.plan(&["k".to_owned(), "h".to_owned()], &cols).unwrap();
        let (row, _) = run(&plan, vec![v(text)]);
        assert_eq!(
            row[0],
            v(&format!("{} paid with ************1111", hash("a@b.io")))
        );
    }

    #[test]
    fn example_yaml_builds_a_working_masker() {
        #[derive(serde::Deserialize)]
        struct Top {
            masking: MaskingConfig,
        }
        let yaml = r#"
masking:
  key_env: AGENTGATE_MASK_KEY
  unmaskable_binary: deny
  profiles:
    pii:
      columns:
        - { column: email, style: redact }
        - { column: public.customers.card_number, style: keep_last, keep: 4 }
        - { column: customers.ssn, style: hash }
      detectors: [email, credit_card, us_ssn, phone, iban, aws_access_key, jwt, private_key]
      detector_style: redact
"#;
        let top: Top = serde_norway::from_str(yaml).unwrap();
        let m = Masker::new(&top.masking, KEY.to_vec()).unwrap();
        let cols = vec![
            tcol("public", "customers", "card_number", VARCHAR),
            tcol("crm", "customers", "ssn", TEXT),
            tcol("public", "customers", "iban", TEXT),
        ];
        let plan = m.plan(&pii(), &cols).unwrap();
        let (row, _) = run(
            &plan,
            vec![
                v("5500000000000004"),
                v("123-45-6789"),
                v("GB82 WEST 1234 5698 7654 32"),
            ],
        );
        assert_eq!(row[0], v("************0004"));
        assert_eq!(row[1], v(&hash("123-45-6789")));
        assert_eq!(row[2], v("[REDACTED:iban]"));
    }

    #[test]
    fn plan_is_send_sync_clone() {
        fn assert_traits<T: Send + Sync + Clone + fmt::Debug>() {}
        assert_traits::<Masker>();
        assert_traits::<RowPlan>();
    }
}
