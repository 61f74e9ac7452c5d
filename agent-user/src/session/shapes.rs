//! Statement shapes: what a statement's record shares with every other execution of the same
//! statement under the same judgement, stored once in `statement_shapes` and referred to by id
//! from each `statement_log` row.
//!
//! A busy agent runs a handful of statements over and over. Their kind, tables, functions,
//! decision, policy, rule, message and result columns (and, for a prepared statement, the text
//! itself) are the same each time; only the timing, the row count, the command tag, the error and
//! the rows seen differ. Writing the shared part once per shape cuts the values bound per
//! statement from 20 to 11, serializes only the rows seen, and takes the store from about 207
//! to 118 bytes per statement.
//!
//! The writer keeps the ids of the shapes it has written in memory. The map is bounded (it is
//! emptied when full, after which a shape seen again is simply written again: two rows for one
//! shape are harmless), and forgotten whenever a batch fails to commit, since the shapes that
//! batch inserted were rolled back with it.

use std::collections::HashMap;
use std::sync::Arc;

use rusqlite::params;

use super::{Displayed, JsonLists, StatementStart, json_into};
use crate::policy::TableRef;

/// Most shapes remembered before the map starts over.
const MAX_SHAPES: usize = 4096;

/// The part of a statement record its executions share; compared and hashed by content.
#[derive(PartialEq, Eq, Hash)]
pub(super) struct Shape {
    protocol: &'static str,
    /// The text when every execution has it (prepared statements, function calls); a simple
    /// query's text carries its literals and stays in its row.
    text: Option<Arc<str>>,
    kind: Option<&'static str>,
    tables: Arc<[TableRef]>,
    functions: Arc<[String]>,
    decision: &'static str,
    enforced: bool,
    policy: Option<Arc<str>>,
    rule: Option<Arc<str>>,
    message: Option<String>,
    columns: Vec<String>,
}

/// A statement record split into its shape and the text its row keeps (if any). Copied out of
/// the record (mostly `Arc`s), which the writer keeps until its batch is committed.
pub(super) fn split(s: &StatementStart, columns: &[String]) -> (Shape, Option<Arc<str>>) {
    let (text, row_text) = if s.protocol == "simple" {
        (None, Some(s.text.clone()))
    } else {
        (Some(s.text.clone()), None)
    };
    let shape = Shape {
        protocol: s.protocol,
        text,
        kind: s.kind,
        tables: s.tables.clone(),
        functions: s.functions.clone(),
        decision: s.decision,
        enforced: s.enforced,
        policy: s.policy.clone(),
        rule: s.rule.clone(),
        message: s.message.clone(),
        columns: columns.to_vec(),
    };
    (shape, row_text)
}

/// The writer's map from shapes to the ids of their stored rows. Hashed with foldhash rather than
/// std's SipHash: SipHash over a whole shape per statement was about 8% of the writer's CPU in a
/// profile of `session_bench`. (Flooding it is pointless: the map is small and starts over.)
#[derive(Default)]
pub(super) struct Shapes {
    ids: HashMap<Shape, i64, foldhash::fast::RandomState>,
}

impl Shapes {
    /// The id of `shape`'s row, inserted in `tx` if this writer has not stored it yet.
    pub(super) fn id(
        &mut self,
        tx: &rusqlite::Transaction<'_>,
        shape: Shape,
        lists: &mut JsonLists,
    ) -> rusqlite::Result<i64> {
        if let Some(id) = self.ids.get(&shape) {
            return Ok(*id);
        }
        let tables = json_into(&mut lists.tables, &Displayed(&shape.tables));
        let functions = json_into(&mut lists.functions, &*shape.functions);
        let columns = json_into(&mut lists.columns, &shape.columns);
        tx.prepare_cached(
            "INSERT INTO statement_shapes (protocol, text, kind, tables, functions, decision,
             enforced, policy, rule, message, columns)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?
        .execute(params![
            shape.protocol,
            shape.text.as_deref(),
            shape.kind,
            tables,
            functions,
            shape.decision,
            shape.enforced,
            shape.policy.as_deref(),
            shape.rule.as_deref(),
            shape.message,
            columns,
        ])?;
        let id = tx.last_insert_rowid();
        if self.ids.len() >= MAX_SHAPES {
            self.ids.clear();
        }
        self.ids.insert(shape, id);
        Ok(id)
    }

    /// Forgets every id: the batch that may have inserted them was rolled back.
    pub(super) fn forget(&mut self) {
        self.ids.clear();
    }
}
