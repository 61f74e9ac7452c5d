//! Why a query gets the decision it gets (`agentgate explain`).

use std::fmt;

use serde::Serialize;

use super::eval::{Decision, RuleCheck, Subject, Verdict};
use super::facts::{ExtractOptions, StatementFacts};
use super::rules::{Mode, PolicySet};

/// Whether one policy applies to the subject and target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyCheck {
    /// Policy name.
    pub name: String,
    /// Enforce or shadow.
    pub mode: Mode,
    /// Covers one of the subject's roles and the target.
    pub applies: bool,
    /// This is the policy that decides (the first that applies).
    pub decides: bool,
    /// Human-readable reason.
    pub reason: String,
}

/// One statement: its facts, the rules checked, and its decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatementExplanation {
    /// 1-based position in the query.
    pub index: usize,
    /// What the statement does.
    pub facts: StatementFacts,
    /// Rules of the deciding policy, in order, up to the first match.
    pub rules: Vec<RuleCheck>,
    /// The statement's decision.
    pub decision: Decision,
}

/// A full account of a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// Agent name.
    pub agent: String,
    /// Agent roles.
    pub roles: Vec<String>,
    /// Target name.
    pub target: String,
    /// The SQL explained.
    pub sql: String,
    /// Every policy, in order, with whether it applies.
    pub policies: Vec<PolicyCheck>,
    /// The parser's message when the SQL could not be parsed.
    pub parse_error: Option<String>,
    /// Per-statement details.
    pub statements: Vec<StatementExplanation>,
    /// The decision for the whole query.
    pub decision: Decision,
    /// What is enforced (allow in shadow mode).
    pub enforced: Verdict,
}

/// Explains the decision for `sql` (PostgreSQL defaults for string literals).
pub fn explain(set: &PolicySet, subject: &Subject<'_>, target: &str, sql: &str) -> Explanation {
    let evaluation = set.evaluate(subject, target, sql, &ExtractOptions::default());
    let deciding = evaluation.policy.map(|p| p.name());
    let policies = set
        .policies()
        .iter()
        .map(|p| {
            let role = p.matching_role(subject.roles);
            let covers = p.covers_target(target);
            let decides = deciding == Some(p.name());
            let applies = role.is_some() && covers;
            let reason = match (role, covers) {
                (Some(role), true) => {
                    let base = format!("applies (role {role}, target {target})");
                    if decides {
                        base
                    } else {
                        format!("{base}, but an earlier policy decides")
                    }
                }
                (None, _) => format!(
                    "skipped: agent has none of the roles [{}]",
                    p.roles().join(", ")
                ),
                (Some(_), false) => format!(
                    "skipped: target {target} not in [{}]",
                    p.targets().join(", ")
                ),
            };
            PolicyCheck {
                name: p.name().to_string(),
                mode: p.mode(),
                applies,
                decides,
                reason,
            }
        })
        .collect();
    let result = evaluation.result;
    let statements = result
        .statements
        .into_iter()
        .zip(evaluation.checks)
        .enumerate()
        .map(|(i, (s, rules))| StatementExplanation {
            index: i + 1,
            facts: s.facts,
            rules,
            decision: s.decision,
        })
        .collect();
    Explanation {
        agent: subject.agent.to_string(),
        roles: subject.roles.to_vec(),
        target: target.to_string(),
        sql: sql.to_string(),
        policies,
        parse_error: result.parse_error,
        statements,
        enforced: result.decision.enforced_verdict(),
        decision: result.decision,
    }
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        "-".to_string()
    } else {
        items
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn write_decision(f: &mut fmt::Formatter<'_>, d: &Decision) -> fmt::Result {
    write!(f, "{}", d.verdict)?;
    match (&d.policy, &d.rule) {
        (Some(p), Some(r)) => write!(f, " [policy {p}, rule {r}]")?,
        (Some(p), None) => write!(f, " [policy {p}, default]")?,
        (None, _) => {}
    }
    if !d.mask.is_empty() {
        write!(f, " mask: {}", d.mask.join(", "))?;
    }
    if d.shadow {
        f.write_str(" (shadow)")?;
    }
    Ok(())
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "agent {} (roles: {}) -> target {}",
            self.agent,
            list(&self.roles),
            self.target
        )?;
        writeln!(f, "policies:")?;
        if self.policies.is_empty() {
            writeln!(f, "  (none)")?;
        }
        for p in &self.policies {
            let mode = match p.mode {
                Mode::Enforce => "enforce",
                Mode::Shadow => "shadow",
            };
            let marker = if p.decides { "*" } else { "-" };
            writeln!(f, "  {marker} {} [{mode}]: {}", p.name, p.reason)?;
        }
        if let Some(e) = &self.parse_error {
            writeln!(f, "parse error: {e}")?;
        }
        if self.statements.is_empty() && self.parse_error.is_none() {
            writeln!(f, "no statements")?;
        }
        for s in &self.statements {
            let facts = &s.facts;
            writeln!(f, "statement {}: {}", s.index, facts.text)?;
            writeln!(f, "  kind: {} (kinds: {})", facts.kind, list(&facts.kinds))?;
            writeln!(f, "  tables: {}", list(&facts.tables))?;
            writeln!(f, "  functions: {}", list(&facts.functions))?;
            let mut flags = Vec::new();
            if facts.update_or_delete_without_where {
                flags.push("without-where".to_string());
            }
            if let Some(c) = facts.copy {
                let direction = match c.direction {
                    super::facts::CopyDirection::To => "to",
                    super::facts::CopyDirection::From => "from",
                };
                let target = if c.program {
                    " program"
                } else if c.file {
                    " file"
                } else {
                    ""
                };
                flags.push(format!("copy {direction}{target}"));
            }
            if facts.explain_analyze {
                flags.push("explain analyze".to_string());
            } else if facts.explain {
                flags.push("explain".to_string());
            }
            if facts.sets_search_path {
                flags.push("sets search_path".to_string());
            }
            if facts.opaque_execute {
                flags.push("opaque execute".to_string());
            } else if facts.opaque {
                flags.push("opaque".to_string());
            }
            if !flags.is_empty() {
                writeln!(f, "  flags: {}", flags.join(", "))?;
            }
            if !s.rules.is_empty() {
                writeln!(f, "  rules:")?;
                for r in &s.rules {
                    let state = if r.matched { "MATCH" } else { "no match" };
                    writeln!(f, "    {}: {state}", r.rule)?;
                }
            }
            f.write_str("  decision: ")?;
            write_decision(f, &s.decision)?;
            writeln!(f)?;
        }
        f.write_str("result: ")?;
        write_decision(f, &self.decision)?;
        writeln!(f)?;
        if self.decision.shadow {
            writeln!(f, "enforced: {} (shadow mode)", self.enforced)?;
        }
        Ok(())
    }
}
