//! Tests of the policy engine.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod cache;
mod eval;
mod explain;
mod facts;
mod rules;

use super::facts::{Access, StatementFacts, extract};
use super::rules::{PolicyConfig, PolicyFile, PolicySet, compile};

/// Facts of a single-statement query.
pub(super) fn one(sql: &str) -> StatementFacts {
    let mut all = extract(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    assert_eq!(all.len(), 1, "{sql}: expected one statement, got {all:#?}");
    all.remove(0)
}

/// Tables as `schema.name:r` / `name:w` strings.
pub(super) fn tables(facts: &StatementFacts) -> Vec<String> {
    facts
        .tables
        .iter()
        .map(|t| {
            let access = match t.access {
                Access::Read => "r",
                Access::Write => "w",
            };
            match &t.schema {
                Some(s) => format!("{s}.{}:{access}", t.name),
                None => format!("{}:{access}", t.name),
            }
        })
        .collect()
}

pub(super) fn parse_policies(yaml: &str) -> Vec<PolicyConfig> {
    let file: PolicyFile = serde_norway::from_str(yaml).unwrap_or_else(|e| panic!("{e}"));
    file.policies
}

pub(super) fn policies(yaml: &str) -> PolicySet {
    compile(parse_policies(yaml)).unwrap_or_else(|e| panic!("{e}"))
}
