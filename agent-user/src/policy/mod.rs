//! Policy engine: SQL facts in, decision out. Pure: no I/O, no clock.
//!
//! * [`facts`] turns SQL text into [`StatementFacts`] (sqlparser, PostgreSQL
//!   dialect).
//! * [`rules`] holds the YAML configuration types and [`compile`]s them into a
//!   validated [`PolicySet`].
//! * [`eval`] decides: [`PolicySet::decide`] for one statement,
//!   [`PolicySet::decide_query`] for a whole query string.
//! * [`cache`] keeps the facts of recently judged query shapes, so that a
//!   query differing from an earlier one only in its numbers is not parsed
//!   again.
//! * [`explain`](mod@explain) renders why a decision was taken (`agentgate explain`).

pub mod cache;
pub mod eval;
pub mod explain;
pub mod facts;
pub mod rules;

pub use cache::CacheStats;
pub use eval::{Decision, QueryDecision, StatementDecision, Subject, Verdict};
pub use explain::{Explanation, explain};
pub use facts::{
    Access, CopyDirection, CopyFacts, ExtractOptions, ParseError, QualifiedColumn, StatementFacts,
    StatementKind, TableRef, extract, extract_with,
};
pub use rules::{PolicyConfig, PolicyError, PolicySet, compile};

#[cfg(test)]
mod tests;
