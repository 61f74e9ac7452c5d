//! Evaluation: a pure function from (subject, target, facts) to a [`Decision`].
//!
//! Policies that apply to the subject's roles and the target are considered in
//! file order and **the first applicable policy decides** (later applicable
//! policies are ignored, which keeps decisions deterministic and lets a
//! specific policy placed first override a general one). Within that policy
//! the first matching rule wins, otherwise the policy's `default`. When no
//! policy applies the statement is denied.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Serialize, Serializer};

use super::cache::CacheStats;
use super::facts::{self, ExtractOptions, ParseError, StatementFacts};
use super::rules::{Action, DefaultAction, Matcher, Mode, Policy, PolicySet};

/// Rule name recorded when a query cannot be parsed.
pub const UNPARSEABLE_RULE: &str = "unparseable";

/// Who is asking.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// Agent name (for messages and records).
    pub agent: &'a str,
    /// The agent's roles.
    pub roles: &'a [String],
}

/// What should happen to a statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Verdict {
    /// Let it run.
    Allow,
    /// Refuse it.
    Deny {
        /// Reason given to the agent.
        message: String,
    },
    /// Hold it for human approval (the PostgreSQL handler holds the
    /// statement while a ticket waits; see `approval`).
    Review {
        /// How long to wait for approval.
        #[serde(serialize_with = "serialize_duration")]
        timeout: Duration,
    },
}

fn serialize_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

impl Verdict {
    /// `allow`, `deny` or `review`.
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny { .. } => "deny",
            Verdict::Review { .. } => "review",
        }
    }

    /// Whether this is [`Verdict::Allow`].
    pub fn is_allow(&self) -> bool {
        matches!(self, Verdict::Allow)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Allow => f.write_str("allow"),
            Verdict::Deny { message } => write!(f, "deny: {message}"),
            Verdict::Review { timeout } => {
                write!(
                    f,
                    "review (timeout {})",
                    humantime::format_duration(*timeout)
                )
            }
        }
    }
}

/// The decision for one statement (or, in [`QueryDecision`], a whole query).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// What the policy says.
    pub verdict: Verdict,
    /// The deciding policy (`None` when no policy applies, or for an empty
    /// query).
    pub policy: Option<Arc<str>>,
    /// The rule that fired (`None` = the policy's default).
    pub rule: Option<Arc<str>>,
    /// Mask profiles to apply to results (allowed and reviewed statements).
    pub mask: Arc<[String]>,
    /// The deciding policy is in shadow mode: record, do not block.
    pub shadow: bool,
}

impl Decision {
    /// The verdict to enforce: [`Verdict::Allow`] in shadow mode, otherwise
    /// [`Decision::verdict`].
    pub fn enforced_verdict(&self) -> Verdict {
        if self.shadow {
            Verdict::Allow
        } else {
            self.verdict.clone()
        }
    }

    fn no_policy(subject: &Subject<'_>, target: &str) -> Decision {
        Decision {
            verdict: Verdict::Deny {
                message: format!(
                    "no policy grants agent {:?} access to target {target:?}",
                    subject.agent
                ),
            },
            policy: None,
            rule: None,
            mask: Arc::default(),
            shadow: false,
        }
    }

    fn empty_query() -> Decision {
        Decision {
            verdict: Verdict::Allow,
            policy: None,
            rule: None,
            mask: Arc::default(),
            shadow: false,
        }
    }
}

/// One statement of a query with its decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatementDecision {
    /// What the statement does.
    pub facts: StatementFacts,
    /// What the policy says about it.
    pub decision: Decision,
}

/// The decision for a whole query string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueryDecision {
    /// The combined decision: the first denied statement's decision (its
    /// message prefixed with the statement number when there are several),
    /// else the first statement held for review, else allow with the union
    /// of masks (`rule` is kept only when every statement matched the same
    /// rule).
    pub decision: Decision,
    /// Per-statement facts and decisions, for recording.
    pub statements: Vec<StatementDecision>,
    /// The parser's message when the query could not be parsed.
    pub parse_error: Option<String>,
}

impl QueryDecision {
    /// The verdict to enforce for the whole query.
    pub fn enforced_verdict(&self) -> Verdict {
        self.decision.enforced_verdict()
    }
}

/// Whether one rule matched (for explanations).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleCheck {
    /// Rule name.
    pub rule: String,
    /// Whether its conditions held.
    pub matched: bool,
}

impl Matcher {
    /// Whether the conditions hold for `facts`. `allow` selects the
    /// semantics for allow rules (see the `rules` module documentation).
    pub(super) fn matches(&self, facts: &StatementFacts, allow: bool) -> bool {
        if let Some(kinds) = &self.kinds {
            let listed = |k: &_| kinds.contains(k);
            let ok = if allow {
                facts.kinds.iter().all(listed)
            } else {
                facts.kinds.iter().any(listed)
            };
            if !ok {
                return false;
            }
        }
        let access_ok = |t: &facts::TableRef| self.access.is_none_or(|a| t.access == a);
        if let Some(patterns) = &self.tables {
            let ok = facts
                .tables
                .iter()
                .any(|t| access_ok(t) && patterns.iter().any(|p| p.matches(t, false)));
            if !ok {
                return false;
            }
        }
        if let Some(patterns) = &self.tables_only {
            let ok = !facts.opaque
                && facts
                    .tables
                    .iter()
                    .all(|t| access_ok(t) && patterns.iter().any(|p| p.matches(t, true)));
            if !ok {
                return false;
            }
        }
        if let Some(access) = self.access
            && self.tables.is_none()
            && self.tables_only.is_none()
        {
            let ok = if allow {
                !facts.opaque && facts.tables.iter().all(|t| t.access == access)
            } else {
                facts.tables.iter().any(|t| t.access == access)
            };
            if !ok {
                return false;
            }
        }
        if let Some(functions) = &self.functions {
            let ok = facts
                .functions
                .iter()
                .any(|f| functions.iter().any(|g| g.matches(f)));
            if !ok {
                return false;
            }
        }
        let copy = facts.copy;
        let flags = [
            (self.without_where, facts.update_or_delete_without_where),
            (self.copy_program, copy.is_some_and(|c| c.program)),
            (self.copy_file, copy.is_some_and(|c| c.file)),
            (self.explain, facts.explain),
            (self.opaque, facts.opaque),
            (self.sets_search_path, facts.sets_search_path),
        ];
        flags
            .iter()
            .all(|(wanted, actual)| wanted.is_none_or(|w| w == *actual))
    }
}

impl Policy {
    /// Decides one statement with this policy, pushing every rule checked to `checks` when
    /// asked (explanations; judging a query does not pay for them).
    fn decide_checking(
        &self,
        facts: &StatementFacts,
        mut checks: Option<&mut Vec<RuleCheck>>,
    ) -> Decision {
        let shadow = self.mode == Mode::Shadow;
        for rule in &self.rules {
            let matched = rule
                .matcher
                .matches(facts, matches!(rule.action, Action::Allow));
            if let Some(checks) = checks.as_deref_mut() {
                checks.push(RuleCheck {
                    rule: rule.name.to_string(),
                    matched,
                });
            }
            if !matched {
                continue;
            }
            let mask = || rule.mask.clone().unwrap_or_else(|| self.mask.clone());
            let (verdict, mask) = match &rule.action {
                Action::Allow => (Verdict::Allow, mask()),
                Action::Deny { message } => (
                    Verdict::Deny {
                        message: message.clone().unwrap_or_else(|| {
                            format!("denied by rule {:?} of policy {:?}", rule.name, self.name)
                        }),
                    },
                    Arc::default(),
                ),
                Action::Review { timeout } => (Verdict::Review { timeout: *timeout }, mask()),
            };
            return Decision {
                verdict,
                policy: Some(self.name.clone()),
                rule: Some(rule.name.clone()),
                mask,
                shadow,
            };
        }
        let (verdict, mask) = match self.default {
            DefaultAction::Allow => (Verdict::Allow, self.mask.clone()),
            DefaultAction::Deny => (
                Verdict::Deny {
                    message: self.default_message.clone().unwrap_or_else(|| {
                        format!("not allowed by policy {:?}: no rule allows it", self.name)
                    }),
                },
                Arc::default(),
            ),
        };
        Decision {
            verdict,
            policy: Some(self.name.clone()),
            rule: None,
            mask,
            shadow,
        }
    }

    fn applies(&self, subject: &Subject<'_>, target: &str) -> bool {
        self.matching_role(subject.roles).is_some() && self.covers_target(target)
    }
}

/// Everything computed for a query, shared by [`PolicySet::decide_query`]
/// and `explain`.
pub(super) struct Evaluation<'s> {
    pub(super) policy: Option<&'s Policy>,
    pub(super) result: QueryDecision,
    pub(super) checks: Vec<Vec<RuleCheck>>,
}

impl PolicySet {
    /// The policy that decides for this subject and target: the first, in
    /// file order, covering one of the subject's roles and the target.
    pub fn applicable_policy(&self, subject: &Subject<'_>, target: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.applies(subject, target))
    }

    /// Decides one statement.
    pub fn decide(&self, subject: &Subject<'_>, target: &str, facts: &StatementFacts) -> Decision {
        match self.applicable_policy(subject, target) {
            Some(policy) => policy.decide_checking(facts, None),
            None => Decision::no_policy(subject, target),
        }
    }

    /// Decides every statement of a query string (PostgreSQL defaults for
    /// string literals). The query is denied if any statement is denied, held
    /// for review if any needs review and none is denied, allowed otherwise;
    /// unparseable SQL is denied (rule `unparseable`); an empty query is
    /// allowed.
    pub fn decide_query(&self, subject: &Subject<'_>, target: &str, sql: &str) -> QueryDecision {
        self.decide_query_with(subject, target, sql, &ExtractOptions::default())
    }

    /// [`PolicySet::decide_query`] with explicit session options (pass the
    /// server's `standard_conforming_strings`).
    ///
    /// Facts come from the set's cache when a query of the same shape (the
    /// same text but for its integer literals) was judged recently; the
    /// decision is the one [`PolicySet::decide_query_uncached`] takes, each
    /// statement's `text` being this query's own.
    pub fn decide_query_with(
        &self,
        subject: &Subject<'_>,
        target: &str,
        sql: &str,
        opts: &ExtractOptions,
    ) -> QueryDecision {
        let statements = self.cache.extract(sql, opts);
        self.judge(subject, target, statements, false).result
    }

    /// [`PolicySet::decide_query_with`] parsing `sql` whatever the cache holds
    /// (for comparisons and benchmarks).
    pub fn decide_query_uncached(
        &self,
        subject: &Subject<'_>,
        target: &str,
        sql: &str,
        opts: &ExtractOptions,
    ) -> QueryDecision {
        let statements = facts::extract_with(sql, opts);
        self.judge(subject, target, statements, false).result
    }

    /// Counters of the facts cache behind [`PolicySet::decide_query_with`].
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Everything about the decision for `sql`, with the rules checked (no cache).
    pub(super) fn evaluate(
        &self,
        subject: &Subject<'_>,
        target: &str,
        sql: &str,
        opts: &ExtractOptions,
    ) -> Evaluation<'_> {
        self.judge(subject, target, facts::extract_with(sql, opts), true)
    }

    /// Decides a query from its statements' facts (or why there are none);
    /// `trace` records the rules checked.
    fn judge(
        &self,
        subject: &Subject<'_>,
        target: &str,
        statements: Result<Vec<StatementFacts>, ParseError>,
        trace: bool,
    ) -> Evaluation<'_> {
        let policy = self.applicable_policy(subject, target);
        let statements = match statements {
            Ok(statements) => statements,
            Err(e) => {
                let decision = match policy {
                    None => Decision::no_policy(subject, target),
                    Some(p) => Decision {
                        verdict: Verdict::Deny {
                            message: format!("cannot parse SQL: {e}"),
                        },
                        policy: Some(p.name.clone()),
                        rule: Some(UNPARSEABLE_RULE.into()),
                        mask: Arc::default(),
                        shadow: p.mode == Mode::Shadow,
                    },
                };
                return Evaluation {
                    policy,
                    result: QueryDecision {
                        decision,
                        statements: Vec::new(),
                        parse_error: Some(e.message),
                    },
                    checks: Vec::new(),
                };
            }
        };
        if statements.is_empty() {
            return Evaluation {
                policy,
                result: QueryDecision {
                    decision: Decision::empty_query(),
                    statements: Vec::new(),
                    parse_error: None,
                },
                checks: Vec::new(),
            };
        }
        let mut decided = Vec::with_capacity(statements.len());
        let mut checks = Vec::new();
        for facts in statements {
            let mut rule_checks = Vec::new();
            let decision = match policy {
                Some(p) => p.decide_checking(&facts, trace.then_some(&mut rule_checks)),
                None => Decision::no_policy(subject, target),
            };
            decided.push(StatementDecision { facts, decision });
            if trace {
                checks.push(rule_checks);
            }
        }
        let decision = combine(&decided);
        Evaluation {
            policy,
            result: QueryDecision {
                decision,
                statements: decided,
                parse_error: None,
            },
            checks,
        }
    }
}

/// The mask profiles of every statement, each once, in order of appearance; shared with the
/// first statement's decision when no other statement adds one (the usual single statement).
fn mask_union(statements: &[StatementDecision]) -> Arc<[String]> {
    let Some((first, rest)) = statements.split_first() else {
        return Arc::default();
    };
    let first = &first.decision.mask;
    let adds = |m: &Arc<[String]>| m.iter().any(|p| !first.contains(p));
    if !rest.iter().any(|s| adds(&s.decision.mask)) {
        return first.clone();
    }
    let mut mask: Vec<String> = Vec::new();
    for s in statements {
        for m in s.decision.mask.iter() {
            if !mask.contains(m) {
                mask.push(m.clone());
            }
        }
    }
    mask.into()
}

/// Combines per-statement decisions (non-empty) into the query's decision.
fn combine(statements: &[StatementDecision]) -> Decision {
    let several = statements.len() > 1;
    for (i, s) in statements.iter().enumerate() {
        if let Verdict::Deny { message } = &s.decision.verdict {
            let message = if several {
                format!("statement {} of {}: {message}", i + 1, statements.len())
            } else {
                message.clone()
            };
            return Decision {
                verdict: Verdict::Deny { message },
                ..s.decision.clone()
            };
        }
    }
    if let Some(s) = statements
        .iter()
        .find(|s| matches!(s.decision.verdict, Verdict::Review { .. }))
    {
        return s.decision.clone();
    }
    let mask = mask_union(statements);
    let first = statements.first().map(|s| &s.decision);
    let rule = first.and_then(|d| d.rule.clone());
    let same_rule = statements.iter().all(|s| s.decision.rule == rule);
    Decision {
        verdict: Verdict::Allow,
        policy: first.and_then(|d| d.policy.clone()),
        rule: if same_rule { rule } else { None },
        mask,
        shadow: statements.iter().any(|s| s.decision.shadow),
    }
}
