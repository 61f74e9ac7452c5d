//! Policy configuration (YAML via serde) and its compiled, validated form.
//!
//! ```yaml
//! policies:
//!   - name: analytics-readonly        # unique
//!     roles: [analyst]                # "*" = any agent
//!     targets: [app-db]               # "*" = any target
//!     mode: enforce                   # or shadow
//!     default: deny                   # allow | deny (default deny)
//!     default_message: "not allowed by policy"
//!     mask: [pii]                     # mask profiles for allowed statements
//!     rules:
//!       - name: no-ddl
//!         match: { kinds: [ddl, dcl] }
//!         action: deny
//!         message: "schema changes are not allowed"
//!       - name: unbounded-writes
//!         match: { kinds: [update, delete], without_where: true }
//!         action: review
//!         timeout: 5m
//!       - name: reads
//!         match: { kinds: [select], tables_only: ["public.*"], access: read }
//!         action: allow
//! ```
//!
//! # Conditions
//!
//! A rule's `match` is a conjunction of the conditions present; `match: {}`
//! and `match: any` match every statement. Conditions describe what the
//! statement does:
//!
//! * `kinds: [..]` — statement kinds. A statement can carry several kinds (a
//!   data-modifying CTE, `PREPARE p AS DELETE ...`): for `deny` and `review`
//!   rules the condition holds if **any** of the statement's kinds is listed;
//!   for `allow` rules **every** kind of the statement must be listed, so
//!   `allow kinds: [select]` never admits `WITH d AS (DELETE ...) SELECT ...`.
//! * `tables: [..]` — some referenced table matches some pattern.
//! * `tables_only: [..]` — every referenced table matches some pattern (an
//!   allow-list; never holds for opaque statements, holds for statements that
//!   reference no table).
//! * `access: read|write` — with `tables`/`tables_only`, qualifies the
//!   references considered (a matching table with that access / every table
//!   matches and has that access). Alone: for `deny`/`review` rules some table
//!   is accessed that way; for `allow` rules every table is (never for opaque
//!   statements).
//! * `functions: [..]` — some called function matches (bare names, `*` globs,
//!   matched whatever schema the call used).
//! * `without_where`, `copy_program`, `copy_file`, `explain`, `opaque`,
//!   `sets_search_path` — booleans compared with the statement's facts
//!   (`opaque: true` catches `DO`, `EXECUTE`, keyword-classified statements,
//!   DDL on non-relations and calls of functions that run SQL given as text).
//!
//! Put `deny`/`review` rules before broad `allow` rules: first match wins, and
//! an `allow` rule with `tables` (any) admits a statement that also touches
//! other tables; prefer `tables_only` for allow-lists.
//!
//! Table patterns: `schema.table`, `schema.*`, or a bare `table` (any
//! schema). Identifiers fold like PostgreSQL (`Public.Users` is
//! `public.users`, `"Public"."Users"` keeps its case); `*` in an unquoted part
//! is a glob. A reference without a schema is taken to be in `public` — or,
//! for names starting with `pg_`, possibly in `pg_catalog`, which PostgreSQL
//! searches first: `tables` holds if either reading matches, `tables_only`
//! only if both do. This assumes the default `search_path`: where allow-lists
//! rely on it, deny `sets_search_path: true` (an agent that may change
//! `search_path` can make `data` mean `secret.data`).

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::cache::FactsCache;
use super::facts::{Access, StatementKind, TableRef};

/// Review timeout when a `review` rule gives none.
pub const DEFAULT_REVIEW_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// The longest review timeout: a held statement holds its connection (and a server transaction)
/// meanwhile, and the deadline must stay far from any clock's range.
pub const MAX_REVIEW_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// A policy file: `policies: [...]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// The policies, in evaluation order.
    pub policies: Vec<PolicyConfig>,
}

/// One policy as written in YAML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Unique name.
    pub name: String,
    /// Agent roles the policy applies to (`"*"` = any agent).
    pub roles: Vec<String>,
    /// Target names the policy applies to (`"*"` = any target).
    pub targets: Vec<String>,
    /// `enforce` (default) or `shadow`.
    #[serde(default)]
    pub mode: Mode,
    /// Verdict when no rule matches (default `deny`).
    #[serde(default)]
    pub default: DefaultAction,
    /// Message of the default denial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_message: Option<String>,
    /// Mask profiles applied to allowed statements unless a rule says otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mask: Vec<String>,
    /// Rules, first match wins.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

/// Enforce decisions or only record them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Decisions are enforced.
    #[default]
    Enforce,
    /// Decisions are computed and recorded; nothing is blocked.
    Shadow,
}

/// A policy's verdict when no rule matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    /// Allow.
    Allow,
    /// Deny (the default).
    #[default]
    Deny,
}

/// A rule's action as written in YAML.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionKind {
    /// Allow the statement.
    Allow,
    /// Deny it (optional `message`).
    Deny,
    /// Hold it for human approval (optional `timeout`).
    Review,
}

/// One rule as written in YAML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Name, unique within the policy.
    pub name: String,
    /// Conditions.
    #[serde(rename = "match")]
    pub matches: MatchConfig,
    /// What to do when the conditions hold.
    pub action: ActionKind,
    /// Denial message (`deny` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Approval timeout such as `5m` (`review` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Mask profiles for this rule (overrides the policy's; `[]` = none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<Vec<String>>,
}

/// `match: any` or `match: { ...conditions }`.
#[derive(Debug, Clone, PartialEq)]
pub enum MatchConfig {
    /// Matches every statement.
    Any,
    /// A conjunction of conditions.
    Conditions(MatchConditions),
}

/// The conditions of a rule (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConditions {
    /// Statement kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinds: Option<Vec<String>>,
    /// Some referenced table matches one of these patterns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tables: Option<Vec<String>>,
    /// Every referenced table matches one of these patterns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tables_only: Option<Vec<String>>,
    /// Table access qualifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<Access>,
    /// Some called function matches one of these names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub functions: Option<Vec<String>>,
    /// `UPDATE`/`DELETE` without `WHERE`, or with one naming no column (`WHERE true`); see
    /// `StatementFacts::update_or_delete_without_where`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub without_where: Option<bool>,
    /// `COPY ... PROGRAM`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_program: Option<bool>,
    /// `COPY` to or from a server-side file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_file: Option<bool>,
    /// `EXPLAIN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explain: Option<bool>,
    /// Facts are incomplete (`DO`, `EXECUTE`, keyword-classified statements).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opaque: Option<bool>,
    /// Sets `search_path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sets_search_path: Option<bool>,
}

impl<'de> Deserialize<'de> for MatchConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MatchVisitor;

        impl<'de> Visitor<'de> for MatchVisitor {
            type Value = MatchConfig;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`any` or a mapping of conditions")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<MatchConfig, E> {
                if v == "any" {
                    Ok(MatchConfig::Any)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(v), &self))
                }
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<MatchConfig, A::Error> {
                MatchConditions::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(MatchConfig::Conditions)
            }
        }

        deserializer.deserialize_any(MatchVisitor)
    }
}

impl Serialize for MatchConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            MatchConfig::Any => serializer.serialize_str("any"),
            MatchConfig::Conditions(c) => c.serialize(serializer),
        }
    }
}

/// A configuration error, naming the policy and rule at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A policy-level problem.
    #[error("policy {policy}: {message}")]
    Policy {
        /// The policy's name (or `#n` when it has none).
        policy: String,
        /// What is wrong.
        message: String,
    },
    /// A rule-level problem.
    #[error("policy {policy}, rule {rule}: {message}")]
    Rule {
        /// The policy's name (or `#n`).
        policy: String,
        /// The rule's name (or `#n`).
        rule: String,
        /// What is wrong.
        message: String,
    },
}

impl PolicyError {
    /// The policy at fault.
    pub fn policy(&self) -> &str {
        match self {
            PolicyError::Policy { policy, .. } | PolicyError::Rule { policy, .. } => policy,
        }
    }

    /// The rule at fault, if the problem is in a rule.
    pub fn rule(&self) -> Option<&str> {
        match self {
            PolicyError::Policy { .. } => None,
            PolicyError::Rule { rule, .. } => Some(rule),
        }
    }
}

// ---------------------------------------------------------------------------
// Compiled form.

/// A validated, ready-to-evaluate set of policies.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    pub(super) policies: Vec<Policy>,
    /// Facts of recent query shapes (shared by clones: facts do not depend on policies).
    pub(super) cache: Arc<FactsCache>,
}

impl PolicySet {
    /// The policies, in evaluation order.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }
}

/// A compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Shared with every [`Decision`](super::Decision) it takes (no copy per statement).
    pub(super) name: Arc<str>,
    pub(super) roles: Vec<String>,
    pub(super) targets: Vec<String>,
    pub(super) mode: Mode,
    pub(super) default: DefaultAction,
    pub(super) default_message: Option<String>,
    pub(super) mask: Arc<[String]>,
    pub(super) rules: Vec<Rule>,
}

impl Policy {
    /// Name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Roles it applies to.
    pub fn roles(&self) -> &[String] {
        &self.roles
    }
    /// Targets it applies to.
    pub fn targets(&self) -> &[String] {
        &self.targets
    }
    /// Enforce or shadow.
    pub fn mode(&self) -> Mode {
        self.mode
    }
    /// Verdict when no rule matches.
    pub fn default_action(&self) -> DefaultAction {
        self.default
    }
    /// Rules in order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The first of the subject's roles this policy covers (`"*"` if it
    /// covers any agent), or `None`.
    pub fn matching_role<'a>(&'a self, roles: &'a [String]) -> Option<&'a str> {
        if self.roles.iter().any(|r| r == "*") {
            return Some("*");
        }
        roles
            .iter()
            .find(|r| self.roles.contains(r))
            .map(String::as_str)
    }

    /// Whether this policy covers `target`.
    pub fn covers_target(&self, target: &str) -> bool {
        self.targets.iter().any(|t| t == "*" || t == target)
    }
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub(super) name: Arc<str>,
    pub(super) matcher: Matcher,
    pub(super) action: Action,
    pub(super) mask: Option<Arc<[String]>>,
}

impl Rule {
    /// Name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Action.
    pub fn action(&self) -> &Action {
        &self.action
    }
}

/// A compiled action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Allow.
    Allow,
    /// Deny, with an optional message.
    Deny {
        /// Message for the agent.
        message: Option<String>,
    },
    /// Hold for approval.
    Review {
        /// How long to wait for approval.
        timeout: Duration,
    },
}

/// Compiled conditions.
#[derive(Debug, Clone, Default)]
pub(super) struct Matcher {
    pub(super) kinds: Option<Vec<StatementKind>>,
    pub(super) tables: Option<Vec<TablePattern>>,
    pub(super) tables_only: Option<Vec<TablePattern>>,
    pub(super) access: Option<Access>,
    pub(super) functions: Option<Vec<Glob>>,
    pub(super) without_where: Option<bool>,
    pub(super) copy_program: Option<bool>,
    pub(super) copy_file: Option<bool>,
    pub(super) explain: Option<bool>,
    pub(super) opaque: Option<bool>,
    pub(super) sets_search_path: Option<bool>,
}

/// One element of a glob: literal text or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum GlobPart {
    Literal(String),
    Star,
}

/// A normalized identifier pattern; `*` (unquoted) matches any sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Glob(Vec<GlobPart>);

impl Glob {
    pub(super) fn matches(&self, s: &str) -> bool {
        glob_match(&self.0, s)
    }
}

/// Wildcard matching with backtracking to the last `*` only: O(len(s) *
/// len(pattern)) whatever the pattern.
fn glob_match(parts: &[GlobPart], s: &str) -> bool {
    #[derive(Clone, Copy, PartialEq)]
    enum P {
        Star,
        Char(char),
    }
    let pattern: Vec<P> = parts
        .iter()
        .flat_map(|part| match part {
            GlobPart::Star => vec![P::Star],
            GlobPart::Literal(lit) => lit.chars().map(P::Char).collect(),
        })
        .collect();
    let text: Vec<char> = s.chars().collect();
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match (pattern.get(p), text.get(t)) {
            (Some(P::Char(c)), Some(x)) if c == x => {
                p += 1;
                t += 1;
            }
            (Some(P::Star), _) => {
                star = Some((p, t));
                p += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern
        .get(p..)
        .is_some_and(|rest| rest.iter().all(|x| *x == P::Star))
}

/// A compiled table pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TablePattern {
    /// `None` for a bare table name (any schema).
    schema: Option<Glob>,
    table: Glob,
}

/// Schemas an unqualified reference may resolve to with the default
/// `search_path` (`pg_catalog` is searched first, implicitly).
fn implicit_schemas(name: &str) -> &'static [&'static str] {
    if name.starts_with("pg_") {
        &["pg_catalog", "public"]
    } else {
        &["public"]
    }
}

impl TablePattern {
    /// Whether the reference matches. For an unqualified reference the
    /// schema may be ambiguous: `strict` requires every reading to match,
    /// otherwise one suffices.
    pub(super) fn matches(&self, table: &TableRef, strict: bool) -> bool {
        if !self.table.matches(&table.name) {
            return false;
        }
        match (&self.schema, &table.schema) {
            (None, _) => true,
            (Some(pattern), Some(schema)) => pattern.matches(schema),
            (Some(pattern), None) => {
                let mut schemas = implicit_schemas(&table.name).iter();
                if strict {
                    schemas.all(|s| pattern.matches(s))
                } else {
                    schemas.any(|s| pattern.matches(s))
                }
            }
        }
    }
}

/// Splits a dotted, possibly quoted pattern into folded glob parts.
fn parse_pattern(pattern: &str) -> Result<Vec<Glob>, String> {
    fn finish(
        parts: &mut Vec<Glob>,
        current: &mut Vec<GlobPart>,
        literal: &mut String,
        pattern: &str,
    ) -> Result<(), String> {
        if !literal.is_empty() {
            current.push(GlobPart::Literal(std::mem::take(literal)));
        }
        if current.is_empty() {
            return Err(format!("empty name part in pattern {pattern:?}"));
        }
        parts.push(Glob(std::mem::take(current)));
        Ok(())
    }

    let mut parts = Vec::new();
    let mut current = Vec::new();
    let mut literal = String::new();
    let mut chars = pattern.chars().peekable();
    let mut in_quote = false;
    while let Some(c) = chars.next() {
        if in_quote {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    literal.push('"');
                } else {
                    in_quote = false;
                }
            } else {
                literal.push(c);
            }
            continue;
        }
        match c {
            '"' => in_quote = true,
            '.' => finish(&mut parts, &mut current, &mut literal, pattern)?,
            '*' => {
                if !literal.is_empty() {
                    current.push(GlobPart::Literal(std::mem::take(&mut literal)));
                }
                current.push(GlobPart::Star);
            }
            c if c.is_whitespace() => {
                return Err(format!(
                    "unexpected whitespace in pattern {pattern:?} (quote the name)"
                ));
            }
            c => literal.push(c.to_ascii_lowercase()),
        }
    }
    if in_quote {
        return Err(format!("unterminated quote in pattern {pattern:?}"));
    }
    finish(&mut parts, &mut current, &mut literal, pattern)?;
    Ok(parts)
}

fn parse_table_pattern(pattern: &str) -> Result<TablePattern, String> {
    let mut parts = parse_pattern(pattern)?;
    match parts.len() {
        1 => Ok(TablePattern {
            schema: None,
            table: parts.remove(0),
        }),
        2 => {
            let table = parts.remove(1);
            Ok(TablePattern {
                schema: Some(parts.remove(0)),
                table,
            })
        }
        _ => Err(format!(
            "table pattern {pattern:?} has too many parts (use schema.table, schema.* or table)"
        )),
    }
}

fn parse_function_pattern(pattern: &str) -> Result<Glob, String> {
    let mut parts = parse_pattern(pattern)?;
    if parts.len() != 1 {
        return Err(format!(
            "function {pattern:?} must be a bare name (calls match in any schema)"
        ));
    }
    Ok(parts.remove(0))
}

/// Validates the configuration and compiles it.
pub fn compile(cfg: Vec<PolicyConfig>) -> Result<PolicySet, PolicyError> {
    let mut names = HashSet::new();
    let mut policies = Vec::with_capacity(cfg.len());
    for (index, policy) in cfg.into_iter().enumerate() {
        let label = if policy.name.trim().is_empty() {
            format!("#{}", index + 1)
        } else {
            format!("{:?}", policy.name)
        };
        let policy_err = |message: String| PolicyError::Policy {
            policy: label.clone(),
            message,
        };
        if policy.name.trim().is_empty() {
            return Err(policy_err("name must not be empty".into()));
        }
        if !names.insert(policy.name.clone()) {
            return Err(policy_err("duplicate policy name".into()));
        }
        check_list("roles", &policy.roles).map_err(policy_err)?;
        check_list("targets", &policy.targets).map_err(policy_err)?;
        check_names("mask", &policy.mask).map_err(policy_err)?;
        if policy.default_message.is_some() && policy.default == DefaultAction::Allow {
            return Err(policy_err(
                "default_message only applies to `default: deny`".into(),
            ));
        }

        let mut rule_names = HashSet::new();
        let mut rules = Vec::with_capacity(policy.rules.len());
        for (rule_index, rule) in policy.rules.into_iter().enumerate() {
            let rule_label = if rule.name.trim().is_empty() {
                format!("#{}", rule_index + 1)
            } else {
                format!("{:?}", rule.name)
            };
            let rule_err = |message: String| PolicyError::Rule {
                policy: label.clone(),
                rule: rule_label.clone(),
                message,
            };
            if rule.name.trim().is_empty() {
                return Err(rule_err("name must not be empty".into()));
            }
            if !rule_names.insert(rule.name.clone()) {
                return Err(rule_err("duplicate rule name in this policy".into()));
            }
            rules.push(compile_rule(rule).map_err(rule_err)?);
        }

        policies.push(Policy {
            name: policy.name.into(),
            roles: policy.roles,
            targets: policy.targets,
            mode: policy.mode,
            default: policy.default,
            default_message: policy.default_message,
            mask: policy.mask.into(),
            rules,
        });
    }
    Ok(PolicySet {
        policies,
        cache: Arc::default(),
    })
}

fn check_list(field: &str, items: &[String]) -> Result<(), String> {
    if items.is_empty() {
        return Err(format!("`{field}` must not be empty (use \"*\" for any)"));
    }
    check_names(field, items)
}

fn check_names(field: &str, items: &[String]) -> Result<(), String> {
    if items.iter().any(|i| i.trim().is_empty()) {
        return Err(format!("`{field}` contains an empty name"));
    }
    Ok(())
}

fn non_empty<'a>(
    field: &str,
    items: &'a Option<Vec<String>>,
) -> Result<Option<&'a [String]>, String> {
    match items {
        None => Ok(None),
        Some(v) if v.is_empty() => Err(format!("`match.{field}` must not be empty")),
        Some(v) => {
            check_names(&format!("match.{field}"), v)?;
            Ok(Some(v))
        }
    }
}

fn compile_rule(rule: RuleConfig) -> Result<Rule, String> {
    let matcher = match &rule.matches {
        MatchConfig::Any => Matcher::default(),
        MatchConfig::Conditions(c) => compile_conditions(c)?,
    };
    if rule.message.is_some() && rule.action != ActionKind::Deny {
        return Err("`message` only applies to `action: deny`".into());
    }
    if rule.timeout.is_some() && rule.action != ActionKind::Review {
        return Err("`timeout` only applies to `action: review`".into());
    }
    if let Some(mask) = &rule.mask {
        if rule.action == ActionKind::Deny {
            return Err("`mask` has no effect on `action: deny`".into());
        }
        check_names("mask", mask)?;
    }
    let action = match rule.action {
        ActionKind::Allow => Action::Allow,
        ActionKind::Deny => Action::Deny {
            message: rule.message,
        },
        ActionKind::Review => {
            let timeout = match &rule.timeout {
                None => DEFAULT_REVIEW_TIMEOUT,
                Some(text) => {
                    let timeout = humantime::parse_duration(text.trim())
                        .map_err(|e| format!("bad timeout {text:?}: {e}"))?;
                    if timeout.is_zero() {
                        return Err(format!("bad timeout {text:?}: must be positive"));
                    }
                    if timeout > MAX_REVIEW_TIMEOUT {
                        return Err(format!("bad timeout {text:?}: at most 7 days"));
                    }
                    timeout
                }
            };
            Action::Review { timeout }
        }
    };
    Ok(Rule {
        name: rule.name.into(),
        matcher,
        action,
        mask: rule.mask.map(Into::into),
    })
}

fn compile_conditions(c: &MatchConditions) -> Result<Matcher, String> {
    let kinds = non_empty("kinds", &c.kinds)?
        .map(|kinds| {
            kinds
                .iter()
                .map(|k| k.trim().parse::<StatementKind>())
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let tables = non_empty("tables", &c.tables)?
        .map(|p| p.iter().map(|p| parse_table_pattern(p)).collect())
        .transpose()?;
    let tables_only = non_empty("tables_only", &c.tables_only)?
        .map(|p| p.iter().map(|p| parse_table_pattern(p)).collect())
        .transpose()?;
    let functions = non_empty("functions", &c.functions)?
        .map(|p| p.iter().map(|p| parse_function_pattern(p)).collect())
        .transpose()?;
    Ok(Matcher {
        kinds,
        tables,
        tables_only,
        access: c.access,
        functions,
        without_where: c.without_where,
        copy_program: c.copy_program,
        copy_file: c.copy_file,
        explain: c.explain,
        opaque: c.opaque,
        sets_search_path: c.sets_search_path,
    })
}
