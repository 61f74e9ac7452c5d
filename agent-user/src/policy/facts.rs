//! SQL text -> [`StatementFacts`], using sqlparser's PostgreSQL dialect.
//!
//! The extractor is deliberately conservative: whatever it cannot see through
//! (a `DO` block, `EXECUTE` of a prepared statement, a statement sqlparser
//! cannot parse but whose class is certain from its leading keywords, DDL on
//! schemas/functions/roles whose effect is not a list of tables) is marked
//! `opaque`, and anything it cannot classify at all is a [`ParseError`] (the
//! caller denies it). Statements sqlparser 0.64 cannot parse but which are
//! classified by keyword: `DO`, top-level `TABLE t`, `CLUSTER`, `REINDEX`,
//! `CHECKPOINT`, `VACUUM (options) ...`, `ALTER SYSTEM`, `SECURITY LABEL`,
//! `IMPORT FOREIGN SCHEMA`, other `CREATE`/`ALTER`/`DROP` forms (ddl, or dcl
//! for roles/users/groups/policies/default privileges), `GRANT`/`REVOKE`
//! forms, `PREPARE TRANSACTION`, `COMMIT PREPARED`, `ROLLBACK PREPARED`. Two more it cannot
//! parse are checked token by token against their whole (small) grammar and so are not opaque:
//! `SET CONSTRAINTS` (`set`) and `MOVE` (`select`, like `FETCH`).
//!
//! Unqualified names are reported without a schema; the rules decide how to
//! resolve them (see `rules`). Identifiers are folded like PostgreSQL
//! (unquoted ASCII letters lowercased, quoted kept, 63-byte truncation).
//! `functions` lists unqualified names (`pg_catalog.pg_read_file(...)` is
//! reported as `pg_read_file`), including table functions in `FROM` and the
//! SQL-syntax forms `extract`, `substring`, `position`, `trim`, `overlay`,
//! `ceil`, `floor`.
//!
//! Classification choices worth knowing (see [`StatementKind`]):
//! * `SHOW x` and `DESCRIBE`-like statements are `select` (they only read
//!   settings, like `SELECT current_setting('x')`).
//! * `VACUUM`, `ANALYZE`, `CLUSTER`, `REINDEX`, `CHECKPOINT`,
//!   `REFRESH MATERIALIZED VIEW`, `LOAD` are `ddl` (maintenance that takes heavy
//!   locks or changes the server; owner/superuser-only in PostgreSQL). Their
//!   tables are reported with `write` access.
//! * `SET ROLE`, `SET SESSION AUTHORIZATION`, `SET role = ...`,
//!   `SET session_authorization = ...`, `set_config('role', ...)`, `RESET ROLE`,
//!   row-level-security policies, user mappings and default privileges are `dcl`.
//! * `LOCK`, `LISTEN`, `NOTIFY`, `UNLISTEN`, `PREPARE`, `EXECUTE`,
//!   `DEALLOCATE` are `other` (`LOCK` reports its tables as `write`).
//!   `PREPARE p AS <stmt>` additionally reports the kinds, tables and functions
//!   of `<stmt>`, so it is judged at preparation time; `EXECUTE` is flagged
//!   `opaque_execute`.
//! * `DECLARE c CURSOR FOR <query>` is `select` (plus whatever the query does);
//!   `FETCH` and `CLOSE` are `select` (they read from a declared cursor).
//! * `SELECT ... INTO t` is `ddl` (it creates `t`, reported as `write`).
//! * A write (`INSERT`, `UPDATE`, `DELETE`, `MERGE`, an upsert, `COPY FROM`, in a CTE too) to a
//!   system catalog is also `ddl`: the catalogs hold the schema and the privileges, so
//!   `UPDATE pg_attribute SET attname = ...` renames a column and
//!   `UPDATE pg_authid SET rolsuper = true` makes a superuser. A catalog is a relation in
//!   `pg_catalog` or `information_schema`, or an unqualified one whose name starts with `pg_`
//!   (`pg_catalog` is searched first unless `search_path` names it later). The tables keep their
//!   `write` access.
//! * An `UPDATE`/`DELETE` whose `WHERE` names no column (`WHERE true`, `WHERE 1 = 1`,
//!   `WHERE $1`: literals, parameters, and operators, casts and calls over them) counts as
//!   having none, and so does a `MERGE` whose `ON` names none for its `WHEN MATCHED` updates
//!   and deletes without an `AND` condition naming one. A condition naming a column bounds the
//!   write even when every row matches it (`WHERE id = id`).
//! * `EXPLAIN <stmt>` has the kind of `<stmt>` with `explain: true`
//!   (`explain_analyze: true` when it really executes it).
//! * A statement containing several statements (data-modifying CTEs,
//!   `PREPARE`, `CREATE RULE ... DO ...`) lists them all in `kinds`; `kind` is
//!   the most dangerous of them (see [`StatementKind::rank`]). So do
//!   `INSERT ... ON CONFLICT ... DO UPDATE` (`insert` and `update`) and `MERGE`
//!   (`merge` and the `insert`/`update`/`delete` of its `WHEN` clauses).
//! * `CREATE TABLE`/`ALTER TABLE` report the other tables they name: parents
//!   (`INHERITS`, `PARTITION OF`, `[NO] INHERIT`), partitions attached or
//!   detached and tables referenced by foreign keys as `write` (they change),
//!   `LIKE` sources as `read`, `RENAME TO` targets as `write`.
//! * Calls of functions that run SQL given to them as text (`query_to_xml`,
//!   `ts_stat`, `dblink`...; the list is `SQL_STRING_FUNCTIONS`) make the
//!   statement `opaque`.
//!
//! Parser differentials with PostgreSQL that would let SQL smuggle past the
//! policy are refused as parse errors: Unicode-escaped identifiers
//! (`U&"..."`, which sqlparser misreads as an `&` operator); dollar-quote
//! tags and parameters PostgreSQL lexes differently (`$1a$`, `$a€$`); lines after
//! `COPY ... FROM STDIN;` in the same query string (sqlparser reads them as
//! COPY data, PostgreSQL runs them); turning `standard_conforming_strings` off
//! (`SET`, `RESET`, `set_config`) or setting `client_encoding` to anything but
//! UTF8 (`SET`, `SET NAMES`, `set_config`), also through an `UPDATE` of
//! `pg_settings`; and `set_config` whose setting name is not a string literal
//! (it could name either). When the server reports
//! `standard_conforming_strings = off` (the proxy sees it in
//! `ParameterStatus`), call [`extract_with`] with
//! [`ExtractOptions::standard_conforming_strings`] `false`: every plain string
//! literal containing a backslash is then refused, because PostgreSQL would
//! read it differently from sqlparser.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::Hash;
use std::ops::ControlFlow;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sqlparser::ast::{
    AlterTableOperation, ColumnOption, CommentObject, CopySource, CopyTarget, CreateTableLikeKind,
    DataType, Expr, FromTable, FunctionArg, FunctionArgExpr, FunctionArguments, GrantObjects,
    Ident, InTarget, Join, JoinConstraint, JoinOperator, MergeAction, MergeClauseKind, ObjectName,
    ObjectNamePart, ObjectType, OnConflict, OnConflictAction, OnInsert, Query, RenameTableNameKind,
    Reset, Select, SelectItem, Set, SetExpr, Statement, TableAlias, TableConstraint, TableFactor,
    TableObject, Value, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::{Location, Token, TokenWithSpan, Tokenizer};

/// PostgreSQL truncates identifiers to `NAMEDATALEN - 1` bytes.
const MAX_IDENTIFIER_BYTES: usize = 63;

/// How deep string literals inside `DO` bodies are re-scanned for function calls.
const MAX_BODY_SCAN_DEPTH: usize = 3;

/// Upper bound on operator chains along any parenthesis path (see
/// [`check_complexity`]). sqlparser builds `a + b + c ...` and
/// `SELECT ... UNION SELECT ...` chains iteratively into left-deep trees that
/// are dropped recursively; tens of thousands of levels overflow a 2 MiB
/// thread stack.
const MAX_OPERATOR_DEPTH: usize = 10_000;

/// The class of a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatementKind {
    /// `SELECT`, `VALUES`, `TABLE t`, `SHOW`, cursor reads.
    Select,
    /// `INSERT`.
    Insert,
    /// `UPDATE`.
    Update,
    /// `DELETE`.
    Delete,
    /// `MERGE`.
    Merge,
    /// `COPY` (direction and danger in [`CopyFacts`]).
    Copy,
    /// Schema changes and maintenance: `CREATE`/`ALTER`/`DROP`/`TRUNCATE`/
    /// `COMMENT`/`VACUUM`/`ANALYZE`/`REINDEX`/`CLUSTER`/`SELECT INTO`..., and writes to the
    /// system catalogs (`UPDATE pg_catalog.pg_attribute ...`).
    Ddl,
    /// Access control: `GRANT`/`REVOKE`, roles and users, `SET ROLE`,
    /// `SET SESSION AUTHORIZATION` (and the `role`/`session_authorization`
    /// settings however set), row-level-security policies.
    Dcl,
    /// `BEGIN`/`START TRANSACTION`/`COMMIT`/`END`/`ROLLBACK`/`SAVEPOINT`/
    /// `RELEASE`/`PREPARE TRANSACTION`/`COMMIT PREPARED`...
    Transaction,
    /// `SET`/`RESET`/`DISCARD` of session settings.
    Set,
    /// `CALL`.
    Call,
    /// `DO` blocks (anonymous code; always opaque).
    Do,
    /// Everything else: `LISTEN`/`NOTIFY`/`PREPARE`/`EXECUTE`/`DEALLOCATE`/`LOCK`...
    Other,
}

impl StatementKind {
    /// Every kind, in declaration order.
    pub const ALL: [StatementKind; 13] = [
        StatementKind::Select,
        StatementKind::Insert,
        StatementKind::Update,
        StatementKind::Delete,
        StatementKind::Merge,
        StatementKind::Copy,
        StatementKind::Ddl,
        StatementKind::Dcl,
        StatementKind::Transaction,
        StatementKind::Set,
        StatementKind::Call,
        StatementKind::Do,
        StatementKind::Other,
    ];

    /// The lowercase name used in configuration and serialization.
    pub fn as_str(self) -> &'static str {
        match self {
            StatementKind::Select => "select",
            StatementKind::Insert => "insert",
            StatementKind::Update => "update",
            StatementKind::Delete => "delete",
            StatementKind::Merge => "merge",
            StatementKind::Copy => "copy",
            StatementKind::Ddl => "ddl",
            StatementKind::Dcl => "dcl",
            StatementKind::Transaction => "transaction",
            StatementKind::Set => "set",
            StatementKind::Call => "call",
            StatementKind::Do => "do",
            StatementKind::Other => "other",
        }
    }

    /// How dangerous a kind is; a statement's headline `kind` is the highest
    /// ranked of its `kinds`: select < transaction < set < other < copy <
    /// insert < update < merge < delete < call < do < ddl < dcl.
    pub fn rank(self) -> u8 {
        match self {
            StatementKind::Select => 0,
            StatementKind::Transaction => 1,
            StatementKind::Set => 2,
            StatementKind::Other => 3,
            StatementKind::Copy => 4,
            StatementKind::Insert => 5,
            StatementKind::Update => 6,
            StatementKind::Merge => 7,
            StatementKind::Delete => 8,
            StatementKind::Call => 9,
            StatementKind::Do => 10,
            StatementKind::Ddl => 11,
            StatementKind::Dcl => 12,
        }
    }
}

impl fmt::Display for StatementKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StatementKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StatementKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = StatementKind::ALL.iter().map(|k| k.as_str()).collect();
                format!(
                    "unknown statement kind {s:?} (expected one of: {})",
                    names.join(", ")
                )
            })
    }
}

/// Whether a table is read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Read (SELECT, subqueries, USING, COPY TO, ...).
    Read,
    /// Written or altered (DML targets, COPY FROM, DDL targets, LOCK, ...).
    Write,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Read => "read",
            Access::Write => "write",
        })
    }
}

/// A table (or view, sequence...) referenced by a statement, with identifiers
/// normalized the way PostgreSQL folds them (unquoted -> lowercase, quoted ->
/// exact, truncated to 63 bytes).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TableRef {
    /// Schema, when the reference was qualified (`db.schema.table` keeps
    /// `schema`).
    pub schema: Option<String>,
    /// Table name.
    pub name: String,
    /// How the statement uses it.
    pub access: Access,
}

impl fmt::Display for TableRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{} ({})", self.name, self.access),
            None => write!(f, "{} ({})", self.name, self.access),
        }
    }
}

/// Direction of a `COPY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyDirection {
    /// `COPY ... TO` (export).
    To,
    /// `COPY ... FROM` (import).
    From,
}

/// What a `COPY` statement does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CopyFacts {
    /// `TO` or `FROM`.
    pub direction: CopyDirection,
    /// `TO PROGRAM` / `FROM PROGRAM`: runs a shell command on the server.
    pub program: bool,
    /// A server-side file path (not `STDIN`/`STDOUT`).
    pub file: bool,
}

/// Everything the policy engine knows about one SQL statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementFacts {
    /// The statement as the client wrote it: its slice of the query string,
    /// from its first to its last token (comments before and after it and the
    /// `;` ending it left out; comments inside kept). Should sqlparser read a
    /// statement holding a `;` outside parentheses (so that the query string
    /// cannot be cut into statements at those), the statements of that query
    /// string are as sqlparser prints them instead.
    pub text: Arc<str>,
    /// The most dangerous kind in `kinds`.
    pub kind: StatementKind,
    /// Every kind found in the statement, `kind` first, no duplicates.
    pub kinds: Arc<[StatementKind]>,
    /// Every table referenced anywhere, deduplicated, in order of appearance.
    pub tables: Arc<[TableRef]>,
    /// Every function called anywhere: unqualified name, normalized.
    pub functions: Arc<[String]>,
    /// An `UPDATE` or `DELETE` (possibly nested) without a `WHERE` clause; also
    /// `ON CONFLICT ... DO UPDATE` without one, and a `MERGE` with a
    /// `WHEN NOT MATCHED BY SOURCE` update or delete without an `AND` condition
    /// (its other clauses act on the rows its `ON` condition matches). A condition that names
    /// no column (`WHERE true`, `WHERE 1 = 1`, `MERGE ... ON true`) counts as none: it bounds
    /// nothing. One that names a column counts even if it holds for every row (`WHERE id = id`).
    pub update_or_delete_without_where: bool,
    /// Present for `COPY`.
    pub copy: Option<CopyFacts>,
    /// The statement is an `EXPLAIN` of the statement described by the facts.
    pub explain: bool,
    /// `EXPLAIN ANALYZE`: the inner statement really runs.
    pub explain_analyze: bool,
    /// `EXECUTE name`: what runs is a prepared statement the facts cannot see.
    pub opaque_execute: bool,
    /// Sets `search_path` (`SET search_path`, `set_config('search_path', ..)`),
    /// which changes how later unqualified names resolve. (`set_config` of a
    /// setting whose name is not a literal is refused.)
    pub sets_search_path: bool,
    /// Column names (folded, last part of a qualified name) the statement uses other than as a
    /// result column taken as it is at the top level (`SELECT ssn` or `SELECT c.ssn AS x` of a
    /// plain SELECT): in expressions, conditions, subqueries, set operations. A result column
    /// computed from such a column has no table of origin in RowDescription, so column masking
    /// rules cannot see it (see `mask::COMPUTED_FROM_MASKED`).
    pub computed_from: Arc<[String]>,
    /// Some result column may hold a table's columns under no name the statement uses: a whole
    /// row (`SELECT c FROM customers c`, `row_to_json(c.*)`), a `*` other than in the top-level
    /// plain SELECT's list (in a subquery, a CTE, a UNION), a join's merged columns (`NATURAL`;
    /// `USING` names count as used), columns renamed by an alias list (`customers AS c(i, n, x)`).
    /// Such columns have no table of origin in RowDescription either.
    pub unseen_columns: bool,
    /// Qualified references `q.x`, `s.q.x` whose qualifier names a table or view of the statement
    /// (in FROM or JOIN, an UPDATE, DELETE, INSERT or MERGE target, by name or alias; an upsert's
    /// `excluded`), once each. PostgreSQL reads `q.x` as the call `x(q)` over the whole row when
    /// `x` is no column of `q` (`c.to_jsonb`, `customers.record_out`, a user-defined
    /// `full_name(customers)` as `c.full_name`): whoever acts on [`Self::unseen_columns`] must
    /// take each one the catalog does not confirm as a column as a whole row. Qualifiers naming
    /// a CTE, a subquery or a function need no check: whatever flows through them is counted in
    /// their own query or arguments. A qualifier naming nothing the statement holds (PostgreSQL
    /// 18's `old` and `new` in RETURNING, a parenthesized join's alias) sets `unseen_columns`.
    pub qualified_columns: Arc<[QualifiedColumn]>,
    /// The facts may not cover everything the statement touches: `DO`
    /// blocks, `EXECUTE`, statements only classified by their leading
    /// keywords (tables unknown, functions found heuristically), DDL/DCL
    /// on objects other than relations (schemas, functions, roles, triggers,
    /// `GRANT ... ON ALL TABLES IN SCHEMA`...), and calls of functions that
    /// run SQL given as text (`query_to_xml`, `ts_stat`, `dblink`...).
    pub opaque: bool,
}

/// A qualified reference `q.x` whose qualifier `q` is a table or view (see
/// [`StatementFacts::qualified_columns`]), folded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QualifiedColumn {
    /// The relation's schema, when the statement names it (`public.customers c`, or
    /// `public.customers.to_jsonb`); otherwise the relation is whichever of that name the
    /// session's `search_path` finds, which the agent can change.
    pub schema: Option<String>,
    /// The relation's name (not its alias).
    pub relation: String,
    /// The name after the qualifier: a column of the relation, or else a function of its row.
    pub column: String,
}

impl fmt::Display for QualifiedColumn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}.{}", self.relation, self.column),
            None => write!(f, "{}.{}", self.relation, self.column),
        }
    }
}

/// Options for [`extract_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExtractOptions {
    /// The session's `standard_conforming_strings` as reported by the server
    /// (`true` is the PostgreSQL default). When `false`, plain string literals
    /// containing backslashes are refused.
    pub standard_conforming_strings: bool,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        Self {
            standard_conforming_strings: true,
        }
    }
}

/// SQL that cannot be analysed (the caller denies it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParseError {
    /// Human-readable reason, usually sqlparser's message with a location.
    pub message: String,
}

impl ParseError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

impl From<ParserError> for ParseError {
    fn from(e: ParserError) -> Self {
        ParseError::new(e.to_string())
    }
}

/// Extracts facts for every statement of `sql`, assuming the PostgreSQL
/// defaults (`standard_conforming_strings = on`).
///
/// An empty query (only whitespace, comments or semicolons) yields an empty
/// `Vec`.
pub fn extract(sql: &str) -> Result<Vec<StatementFacts>, ParseError> {
    extract_with(sql, &ExtractOptions::default())
}

/// [`extract`] with explicit session options.
pub fn extract_with(sql: &str, opts: &ExtractOptions) -> Result<Vec<StatementFacts>, ParseError> {
    extract_detailed(sql, opts).map(|e| e.statements)
}

/// What [`extract_with`] finds, plus what the decision cache must know.
pub(super) struct Extracted {
    /// Facts of every statement, in order.
    pub(super) statements: Vec<StatementFacts>,
    /// Some fact depends on the value of a numeric literal (`EXPLAIN (ANALYZE 0)`,
    /// `SET standard_conforming_strings = 1`): queries differing only in their numbers may
    /// have different facts.
    pub(super) reads_numbers: bool,
}

/// [`extract_with`], reporting whether numeric literals' values mattered.
pub(super) fn extract_detailed(sql: &str, opts: &ExtractOptions) -> Result<Extracted, ParseError> {
    let dialect = PostgreSqlDialect {};
    let tokens = tokenize(&dialect, sql)?;
    check_tokens(&tokens, opts)?;
    let mut reads_numbers = false;
    // Where each statement's text is, taken before the parser consumes the tokens (cloning
    // them for the rare fallback below would cost an allocation per word on every query).
    let spans = statement_spans(&tokens);
    match parse_tokens(&dialect, tokens) {
        Ok(statements) => {
            let mut texts = if spans.len() == statements.len() {
                let mut source = Source::new(sql);
                spans
                    .iter()
                    .map(|(start, end)| source.span_text(*start, *end))
                    .collect()
            } else {
                Vec::new()
            };
            let mut out = Vec::with_capacity(statements.len());
            for (i, statement) in statements.iter().enumerate() {
                let text = match texts.get_mut(i) {
                    Some(Some(text)) => std::mem::take(text),
                    _ => statement.to_string(),
                };
                out.push(facts_of_statement(statement, text, &mut reads_numbers)?);
            }
            Ok(Extracted {
                statements: out,
                reads_numbers,
            })
        }
        Err(_) => {
            // Parse statement by statement so that statements sqlparser does
            // not know (DO, CLUSTER, ...) can be classified by keyword.
            let tokens = tokenize(&dialect, sql)?;
            let mut out = Vec::new();
            let mut source = Source::new(sql);
            for chunk in split_statements(&tokens) {
                if chunk.iter().all(|t| is_trivia(&t.token)) {
                    continue;
                }
                match parse_tokens(&dialect, chunk.to_vec()) {
                    Ok(statements) => {
                        let text = match statements.as_slice() {
                            [_] => source.text(chunk),
                            _ => None,
                        };
                        for statement in &statements {
                            let text = text.clone().unwrap_or_else(|| statement.to_string());
                            out.push(facts_of_statement(statement, text, &mut reads_numbers)?);
                        }
                    }
                    Err(e) => match fallback(&dialect, &mut source, chunk, &mut reads_numbers)? {
                        Some(facts) => out.push(facts),
                        None => return Err(e.into()),
                    },
                }
            }
            Ok(Extracted {
                statements: out,
                reads_numbers,
            })
        }
    }
}

fn tokenize(dialect: &PostgreSqlDialect, sql: &str) -> Result<Vec<TokenWithSpan>, ParseError> {
    Tokenizer::new(dialect, sql)
        .tokenize_with_location()
        .map_err(|e| ParseError::new(e.to_string()))
}

/// Whether `sql` holds more than `limit` statements (non-empty, split at `;` outside
/// parentheses as [`split_statements`] does; a `CREATE FUNCTION ... BEGIN ATOMIC` body counts
/// its statements too). Checked before a query is parsed: the gate builds and keeps an AST,
/// facts, a decision and a record for each statement before sending any, so a single frame of
/// `SELECT 1;` repeated would make it hold ~1500 times the frame's size. Every statement but
/// the last ends at a `;` byte, so a string with fewer `;` bytes than `limit` is not tokenized
/// here; one that cannot be tokenized is not counted (judging refuses it).
pub fn more_statements_than(sql: &str, limit: usize) -> bool {
    if sql.bytes().filter(|b| *b == b';').count() < limit {
        return false;
    }
    let Ok(tokens) = tokenize(&PostgreSqlDialect {}, sql) else {
        return false;
    };
    // Statements ended so far, and whether the current one has a token yet.
    let mut statements = 0usize;
    let mut started = false;
    let mut depth = 0usize;
    for t in &tokens {
        match t.token {
            Token::SemiColon if depth == 0 => {
                statements += usize::from(started);
                started = false;
                continue;
            }
            Token::LParen => depth += 1,
            Token::RParen => depth = depth.saturating_sub(1),
            _ => {}
        }
        started |= !is_trivia(&t.token);
    }
    statements + usize::from(started) > limit
}

/// Start and end of every non-empty statement (see [`split_statements`]): first and last
/// significant token.
fn statement_spans(tokens: &[TokenWithSpan]) -> Vec<(Location, Location)> {
    split_statements(tokens)
        .into_iter()
        .filter_map(|chunk| {
            let mut significant = chunk.iter().filter(|t| !is_trivia(&t.token));
            let first = significant.next()?;
            let last = significant.next_back().unwrap_or(first);
            Some((first.span.start, last.span.end))
        })
        .collect()
}

/// Parses a token stream into statements, insisting that every statement is
/// followed by `;` or the end of input (sqlparser's own loop silently stops at
/// a stray `END`).
fn parse_tokens(
    dialect: &PostgreSqlDialect,
    tokens: Vec<TokenWithSpan>,
) -> Result<Vec<Statement>, ParserError> {
    let mut parser = Parser::new(dialect).with_tokens_with_locations(tokens);
    let mut statements = Vec::new();
    loop {
        while parser.consume_token(&Token::SemiColon) {}
        if parser.peek_token_ref().token == Token::EOF {
            break;
        }
        statements.push(parser.parse_statement()?);
        let next = parser.peek_token_ref();
        if next.token != Token::SemiColon && next.token != Token::EOF {
            return Err(ParserError::ParserError(format!(
                "Expected: end of statement, found: {}{}",
                next.token, next.span.start
            )));
        }
    }
    Ok(statements)
}

fn is_trivia(token: &Token) -> bool {
    matches!(token, Token::Whitespace(_))
}

/// Splits tokens into statements at `;` outside parentheses.
fn split_statements(tokens: &[TokenWithSpan]) -> Vec<&[TokenWithSpan]> {
    let mut chunks = Vec::new();
    let mut depth: usize = 0;
    let mut start = 0;
    for (i, t) in tokens.iter().enumerate() {
        match t.token {
            Token::LParen => depth += 1,
            Token::RParen => depth = depth.saturating_sub(1),
            Token::SemiColon if depth == 0 => {
                chunks.push(tokens.get(start..i).unwrap_or_default());
                start = i + 1;
            }
            _ => {}
        }
    }
    chunks.push(tokens.get(start..).unwrap_or_default());
    chunks
}

/// Whether a token ends an operand (so a following `+`/`-` is binary).
fn ends_operand(token: &Token) -> bool {
    matches!(
        token,
        Token::Word(_)
            | Token::Number(..)
            | Token::SingleQuotedString(_)
            | Token::DoubleQuotedString(_)
            | Token::DollarQuotedString(_)
            | Token::NationalStringLiteral(_)
            | Token::EscapedStringLiteral(_)
            | Token::UnicodeStringLiteral(_)
            | Token::HexStringLiteral(_)
            | Token::Placeholder(_)
            | Token::RParen
            | Token::RBracket
    )
}

/// Refuses queries whose expression trees could be too deep to handle
/// safely. Counts binary operators, casts, subscripts and set operations per
/// parenthesis level (operators reset at commas, set operations do not) and
/// bounds their sum along the open parentheses, which bounds the depth of
/// the left-deep chains sqlparser builds without recursion. Flat lists
/// (`IN (...)`, `VALUES (...), (...)`, select lists) are not limited.
fn check_complexity(tokens: &[TokenWithSpan]) -> Result<(), ParseError> {
    use sqlparser::keywords::Keyword;
    // Per open parenthesis: (operators since the last comma, set operations).
    let mut levels: Vec<(usize, usize)> = vec![(0, 0)];
    let mut path = 0usize; // sum over `levels`
    let mut prev_operand = false;
    for t in tokens.iter().filter(|t| !is_trivia(&t.token)) {
        let (expr_op, set_op) = match &t.token {
            Token::LParen => {
                levels.push((0, 0));
                (false, false)
            }
            Token::RParen => {
                if levels.len() > 1
                    && let Some((ops, sets)) = levels.pop()
                {
                    path = path.saturating_sub(ops + sets);
                }
                (false, false)
            }
            Token::Comma | Token::SemiColon => {
                if let Some(level) = levels.last_mut() {
                    path = path.saturating_sub(level.0);
                    level.0 = 0;
                    if t.token == Token::SemiColon {
                        path = path.saturating_sub(level.1);
                        level.1 = 0;
                    }
                }
                (false, false)
            }
            Token::Period => (false, false),
            Token::Plus | Token::Minus => (prev_operand, false),
            Token::Word(w) if w.quote_style.is_none() => match w.keyword {
                Keyword::UNION | Keyword::INTERSECT | Keyword::EXCEPT => (false, true),
                Keyword::AND
                | Keyword::OR
                | Keyword::IS
                | Keyword::LIKE
                | Keyword::ILIKE
                | Keyword::SIMILAR
                | Keyword::IN
                | Keyword::BETWEEN
                | Keyword::COLLATE
                | Keyword::AT
                | Keyword::OPERATOR
                | Keyword::OVERLAPS => (true, false),
                _ => (false, false),
            },
            token if ends_operand(token) => (false, false),
            _ => (true, false),
        };
        prev_operand = ends_operand(&t.token);
        if (expr_op || set_op)
            && let Some(level) = levels.last_mut()
        {
            if expr_op {
                level.0 += 1;
            } else {
                level.1 += 1;
            }
            path += 1;
            if path > MAX_OPERATOR_DEPTH {
                return Err(ParseError::new(format!(
                    "query too complex: more than {MAX_OPERATOR_DEPTH} nested operators{}",
                    t.span.start
                )));
            }
        }
    }
    Ok(())
}

/// Refuses token streams that PostgreSQL would read differently, or that
/// are too complex to analyse safely.
fn check_tokens(tokens: &[TokenWithSpan], opts: &ExtractOptions) -> Result<(), ParseError> {
    // sqlparser's PostgreSQL tokenizer reads every line after `COPY ... FROM STDIN;` as the
    // COPY's inline data (one `Token::CopyData`, as in a psql script), but over the wire
    // protocol PostgreSQL parses those lines as further statements and runs them.
    if let Some(t) = tokens
        .iter()
        .find(|t| matches!(t.token, Token::CopyData { .. }))
    {
        return Err(ParseError::new(format!(
            "lines after `COPY ... FROM STDIN;` in the same query are not allowed: PostgreSQL \
             runs them as statements, the gate's parser would read them as COPY data; send the \
             COPY as a query of its own{}",
            t.span.start
        )));
    }
    check_complexity(tokens)?;
    for window in tokens.windows(3) {
        if let [a, b, c] = window
            && let Token::Word(u) = &a.token
            && u.quote_style.is_none()
            && u.value.eq_ignore_ascii_case("u")
            && b.token == Token::Ampersand
            && matches!(&c.token, Token::Word(w) if w.quote_style == Some('"'))
        {
            return Err(ParseError::new(format!(
                "Unicode-escaped identifiers (U&\"...\") are not supported{}",
                a.span.start
            )));
        }
    }
    if let Some(t) = tokens
        .iter()
        .find(|t| not_a_postgres_dollar_token(&t.token))
    {
        return Err(ParseError::new(format!(
            "a dollar-quote tag or parameter that PostgreSQL reads differently{}",
            t.span.start
        )));
    }
    if !opts.standard_conforming_strings {
        for t in tokens {
            let suspicious = match &t.token {
                Token::SingleQuotedString(s) | Token::NationalStringLiteral(s) => s.contains('\\'),
                _ => false,
            };
            if suspicious {
                return Err(ParseError::new(format!(
                    "string literal with a backslash while standard_conforming_strings is off{}",
                    t.span.start
                )));
            }
        }
    }
    Ok(())
}

/// A `$` token that sqlparser and PostgreSQL read differently. sqlparser takes any run of
/// alphanumerics as a dollar-quote tag (`$1a$`: a string for it, the parameter `$1` and more
/// SQL for the server) and stops a tag at a non-ASCII character that is not alphanumeric (`$a€$`:
/// a parameter `$a` for it, the start of a string for the server). PostgreSQL's tags are
/// `[A-Za-z\200-\377_][A-Za-z\200-\377_0-9]*` and its parameters `$` and digits
/// (<https://www.postgresql.org/docs/current/sql-syntax-lexical.html#SQL-SYNTAX-DOLLAR-QUOTING>).
fn not_a_postgres_dollar_token(token: &Token) -> bool {
    match token {
        Token::DollarQuotedString(sqlparser::ast::DollarQuotedString {
            tag: Some(tag), ..
        }) => {
            !tag.starts_with(|c: char| c == '_' || c.is_ascii_alphabetic() || !c.is_ascii())
                || !tag
                    .chars()
                    .all(|c| c == '_' || c.is_ascii_alphanumeric() || !c.is_ascii())
        }
        Token::Placeholder(p) => p
            .strip_prefix('$')
            .is_some_and(|n| n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit())),
        _ => false,
    }
}

// ---------------------------------------------------------------------------
// Fallback for statements sqlparser cannot parse.

fn upper_words(chunk: &[TokenWithSpan]) -> Vec<String> {
    chunk
        .iter()
        .filter_map(|t| match &t.token {
            Token::Word(w) if w.quote_style.is_none() => Some(w.value.to_ascii_uppercase()),
            Token::Whitespace(_) => None,
            _ => Some(String::new()),
        })
        .take(4)
        .collect()
}

/// Classifies a statement sqlparser could not parse by its leading keywords.
/// Returns `None` when the statement is not one of the known shapes.
fn fallback(
    dialect: &PostgreSqlDialect,
    source: &mut Source<'_>,
    chunk: &[TokenWithSpan],
    reads_numbers: &mut bool,
) -> Result<Option<StatementFacts>, ParseError> {
    if let Some(kind) = plain_shape(chunk) {
        let text = source.text(chunk).unwrap_or_default();
        return Ok(Some(unparsed_facts(text, kind, Arc::default(), false)));
    }
    let words = upper_words(chunk);
    let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    let kind = match w(0) {
        "DO" => StatementKind::Do,
        "TABLE" => {
            // `TABLE t` is only accepted inside parentheses by sqlparser.
            let mut wrapped = Vec::with_capacity(chunk.len() + 2);
            wrapped.push(TokenWithSpan::wrap(Token::LParen));
            wrapped.extend(chunk.iter().cloned());
            wrapped.push(TokenWithSpan::wrap(Token::RParen));
            return match parse_tokens(dialect, wrapped) {
                Ok(statements) => match statements.as_slice() {
                    [statement] => {
                        let text = source.text(chunk).unwrap_or_default();
                        facts_of_statement(statement, text, reads_numbers).map(Some)
                    }
                    _ => Ok(None),
                },
                Err(_) => Ok(None),
            };
        }
        "GRANT" | "REVOKE" | "REASSIGN" => StatementKind::Dcl,
        "SECURITY" if w(1) == "LABEL" => StatementKind::Dcl,
        "CREATE" | "ALTER" | "DROP" => {
            let object = if matches!(w(1), "OR" | "TEMP" | "TEMPORARY" | "UNLOGGED") {
                // CREATE OR REPLACE x / CREATE TEMP x
                if w(2) == "REPLACE" { w(3) } else { w(2) }
            } else {
                w(1)
            };
            if matches!(object, "ROLE" | "USER" | "GROUP" | "POLICY")
                || (w(1) == "DEFAULT" && w(2) == "PRIVILEGES")
            {
                StatementKind::Dcl
            } else {
                StatementKind::Ddl
            }
        }
        "TRUNCATE" | "COMMENT" | "IMPORT" | "CHECKPOINT" | "CLUSTER" | "REINDEX" | "VACUUM"
        | "ANALYZE" | "ANALYSE" | "REFRESH" => StatementKind::Ddl,
        "PREPARE" if w(1) == "TRANSACTION" => StatementKind::Transaction,
        "COMMIT" | "ROLLBACK" if w(1) == "PREPARED" => StatementKind::Transaction,
        _ => return Ok(None),
    };
    let mut functions = OrderedSet::default();
    scan_functions(chunk, kind == StatementKind::Do, 0, &mut functions);
    let text = source.text(chunk).unwrap_or_default();
    Ok(Some(unparsed_facts(
        text,
        kind,
        functions.items.into(),
        true,
    )))
}

/// The facts of a statement sqlparser could not parse: its kind and, when found, the functions
/// it may call; no tables.
fn unparsed_facts(
    text: String,
    kind: StatementKind,
    functions: Arc<[String]>,
    opaque: bool,
) -> StatementFacts {
    StatementFacts {
        text: text.into(),
        kind,
        kinds: [kind].into(),
        tables: Arc::default(),
        functions,
        update_or_delete_without_where: false,
        copy: None,
        explain: false,
        explain_analyze: false,
        opaque_execute: false,
        sets_search_path: false,
        computed_from: Arc::default(),
        unseen_columns: false,
        qualified_columns: Arc::default(),
        opaque,
    }
}

/// Statements sqlparser 0.64 cannot parse whose grammar is small enough to check here token by
/// token, so that they are known whole (not opaque): they name no table and call nothing.
/// Hand-written because the parser has no rule for them; anything off the exact shape is
/// `None` (and the statement is refused).
/// * `SET CONSTRAINTS { ALL | name [, ...] } { DEFERRED | IMMEDIATE }` (`set`): when deferred
///   constraints are checked, as drivers and ORMs issue around bulk loads.
/// * `MOVE [ direction ] [ FROM | IN ] cursor` (`select`, like `FETCH`): repositions a cursor
///   without returning rows.
fn plain_shape(chunk: &[TokenWithSpan]) -> Option<StatementKind> {
    let tokens: Vec<&Token> = chunk
        .iter()
        .map(|t| &t.token)
        .filter(|t| !is_trivia(t) && !matches!(t, Token::SemiColon))
        .collect();
    let keyword = |t: &Token, k: &str| matches!(t, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(k));
    match tokens.as_slice() {
        [set, constraints, names @ .., mode]
            if keyword(set, "SET")
                && keyword(constraints, "CONSTRAINTS")
                && (keyword(mode, "DEFERRED") || keyword(mode, "IMMEDIATE")) =>
        {
            let all = matches!(names, [one] if keyword(one, "ALL"));
            // name [, name ...], each name possibly schema-qualified.
            let list = !names.is_empty()
                && names.iter().enumerate().all(|(i, t)| match i % 2 {
                    0 => matches!(t, Token::Word(_)) && !keyword(t, "ALL"),
                    _ => matches!(t, Token::Comma | Token::Period),
                })
                && names.len() % 2 == 1;
            (all || list).then_some(StatementKind::Set)
        }
        [first, rest @ .., cursor @ Token::Word(_)]
            if keyword(first, "MOVE") && !keyword(cursor, "FROM") && !keyword(cursor, "IN") =>
        {
            const DIRECTIONS: [&str; 11] = [
                "NEXT", "PRIOR", "FIRST", "LAST", "ABSOLUTE", "RELATIVE", "ALL", "FORWARD",
                "BACKWARD", "FROM", "IN",
            ];
            rest.iter()
                .all(|t| {
                    DIRECTIONS.iter().any(|d| keyword(t, d))
                        || matches!(t, Token::Number(..) | Token::Minus | Token::Plus)
                })
                .then_some(StatementKind::Select)
        }
        _ => None,
    }
}

/// Heuristic: every word directly followed by `(` may be a function call.
/// With `into_strings`, string literals (a `DO` body, dynamic SQL inside it)
/// are tokenized and scanned too.
fn scan_functions(
    tokens: &[TokenWithSpan],
    into_strings: bool,
    depth: usize,
    out: &mut OrderedSet<String>,
) {
    let significant: Vec<&Token> = tokens
        .iter()
        .map(|t| &t.token)
        .filter(|t| !is_trivia(t))
        .collect();
    for (i, token) in significant.iter().enumerate() {
        match token {
            Token::Word(w) if significant.get(i + 1) == Some(&&Token::LParen) => {
                out.insert(normalize_ident_parts(&w.value, w.quote_style));
            }
            Token::SingleQuotedString(s)
            | Token::EscapedStringLiteral(s)
            | Token::DollarQuotedString(sqlparser::ast::DollarQuotedString { value: s, .. })
                if into_strings && depth < MAX_BODY_SCAN_DEPTH =>
            {
                if let Ok(inner) = Tokenizer::new(&PostgreSqlDialect {}, s).tokenize_with_location()
                {
                    scan_functions(&inner, into_strings, depth + 1, out);
                }
            }
            _ => {}
        }
    }
}

/// The query text with a forward-moving cursor that maps tokenizer locations
/// (1-based line, 1-based column counted in chars) to byte offsets; chunks
/// are looked up in order, so the whole query is scanned once.
struct Source<'a> {
    sql: &'a str,
    line: u64,
    col: u64,
    byte: usize,
}

impl<'a> Source<'a> {
    fn new(sql: &'a str) -> Self {
        Self {
            sql,
            line: 1,
            col: 1,
            byte: 0,
        }
    }

    fn offset(&mut self, loc: Location) -> Option<usize> {
        if (loc.line, loc.column) < (self.line, self.col) {
            *self = Source::new(self.sql);
        }
        let rest = self.sql.get(self.byte..)?;
        for (i, ch) in rest.char_indices() {
            if (self.line, self.col) == (loc.line, loc.column) {
                self.byte += i;
                return Some(self.byte);
            }
            if ch == '\n' {
                self.line += 1;
                self.col = 1;
            } else {
                self.col += 1;
            }
        }
        self.byte = self.sql.len();
        ((self.line, self.col) == (loc.line, loc.column)).then_some(self.byte)
    }

    /// The original text of a chunk (first to last significant token).
    fn text(&mut self, chunk: &[TokenWithSpan]) -> Option<String> {
        let mut significant = chunk.iter().filter(|t| !is_trivia(&t.token));
        let first = significant.next()?;
        let last = significant.next_back().unwrap_or(first);
        self.span_text(first.span.start, last.span.end)
    }

    /// The original text from `start` to `end`, trimmed.
    fn span_text(&mut self, start: Location, end: Location) -> Option<String> {
        let start = self.offset(start)?;
        let end = self.offset(end)?;
        let text = self.sql.get(start..end)?.trim();
        (!text.is_empty()).then(|| text.to_string())
    }
}

// ---------------------------------------------------------------------------
// Identifier normalization.

fn truncate_identifier(mut s: String) -> String {
    if s.len() > MAX_IDENTIFIER_BYTES {
        let mut cut = MAX_IDENTIFIER_BYTES;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

fn normalize_ident_parts(value: &str, quote_style: Option<char>) -> String {
    let folded = match quote_style {
        None => value.to_ascii_lowercase(),
        Some(_) => value.to_string(),
    };
    truncate_identifier(folded)
}

/// A data-modifying statement's RETURNING list (`Some(&[])` without one); `None` for any other
/// statement.
fn returning(statement: &Statement) -> Option<&[SelectItem]> {
    let list = match statement {
        Statement::Insert(i) => &i.returning,
        Statement::Update(u) => &u.returning,
        Statement::Delete(d) => &d.returning,
        _ => return None,
    };
    Some(list.as_deref().unwrap_or_default())
}

/// The alias of a relation in FROM, if it has one.
fn table_factor_alias(factor: &TableFactor) -> Option<&TableAlias> {
    match factor {
        TableFactor::Table { alias, .. }
        | TableFactor::Derived { alias, .. }
        | TableFactor::Function { alias, .. }
        | TableFactor::TableFunction { alias, .. }
        | TableFactor::UNNEST { alias, .. }
        | TableFactor::NestedJoin { alias, .. } => alias.as_ref(),
        _ => None,
    }
}

/// A join's constraint (`ON`, `USING`, `NATURAL`), whatever its kind.
fn join_constraint(op: &JoinOperator) -> Option<&JoinConstraint> {
    match op {
        JoinOperator::Join(c)
        | JoinOperator::Inner(c)
        | JoinOperator::Left(c)
        | JoinOperator::LeftOuter(c)
        | JoinOperator::Right(c)
        | JoinOperator::RightOuter(c)
        | JoinOperator::FullOuter(c)
        | JoinOperator::CrossJoin(c)
        | JoinOperator::Semi(c)
        | JoinOperator::LeftSemi(c)
        | JoinOperator::RightSemi(c)
        | JoinOperator::Anti(c)
        | JoinOperator::LeftAnti(c)
        | JoinOperator::RightAnti(c)
        | JoinOperator::StraightJoin(c) => Some(c),
        JoinOperator::AsOf { constraint, .. } => Some(constraint),
        _ => None,
    }
}

/// The column a bare column reference names (`ssn`, `c.ssn`, `s.c.ssn`), folded.
fn column_name(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Identifier(ident) => Some(normalize_ident(ident)),
        Expr::CompoundIdentifier(parts) => parts.last().map(normalize_ident),
        _ => None,
    }
}

/// Normalizes one identifier as PostgreSQL does.
pub(super) fn normalize_ident(ident: &Ident) -> String {
    normalize_ident_parts(&ident.value, ident.quote_style)
}

fn normalize_part(part: &ObjectNamePart) -> String {
    match part {
        ObjectNamePart::Identifier(ident) => normalize_ident(ident),
        other => other.to_string(),
    }
}

/// `(schema, name)` of an object name: the last two parts.
fn split_name(name: &ObjectName) -> Option<(Option<String>, String)> {
    let parts: Vec<String> = name.0.iter().map(normalize_part).collect();
    let (last, rest) = parts.split_last()?;
    Some((rest.last().cloned(), last.clone()))
}

fn push_unique<T: PartialEq>(v: &mut Vec<T>, item: T) {
    if !v.contains(&item) {
        v.push(item);
    }
}

// ---------------------------------------------------------------------------
// Classification.

/// Settings that change who the session acts as, or which of the server's own checks run
/// (`session_replication_role = replica` turns off triggers, audit triggers too, and foreign
/// keys): setting them is `dcl`.
const ROLE_SETTINGS: [&str; 3] = ["role", "session_authorization", "session_replication_role"];

fn is_role_parameter(name: &ObjectName) -> bool {
    ROLE_SETTINGS.iter().any(|r| is_setting(name, r))
}

/// The kind of one statement node, `None` for wrappers that only carry
/// another statement (`EXPLAIN`, `WITH ... INSERT`).
fn classify(statement: &Statement) -> Option<StatementKind> {
    use StatementKind as K;
    let kind = match statement {
        Statement::Query(q) => {
            if matches!(
                *q.body,
                SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_)
            ) {
                return None;
            }
            K::Select
        }
        Statement::Explain { .. } => return None,
        Statement::Insert(_) => K::Insert,
        Statement::Update(_) => K::Update,
        Statement::Delete(_) => K::Delete,
        Statement::Merge(_) => K::Merge,
        Statement::Copy { .. } | Statement::CopyIntoSnowflake { .. } => K::Copy,
        Statement::Call(_) => K::Call,

        Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. } => K::Transaction,

        Statement::Set(set) => match set {
            Set::SetRole { .. } | Set::SetSessionAuthorization(_) => K::Dcl,
            // `SET role = 'x'`, `SET LOCAL session_authorization = 'x'`.
            _ if set_variables(statement)
                .iter()
                .any(|(name, _)| is_role_parameter(name)) =>
            {
                K::Dcl
            }
            _ => K::Set,
        },
        Statement::Reset(reset) => match &reset.reset {
            Reset::SessionAuthorization => K::Dcl,
            Reset::ConfigurationParameter(name) if is_role_parameter(name) => K::Dcl,
            _ => K::Set,
        },
        Statement::Discard { .. } | Statement::AlterSession { .. } | Statement::Use(_) => K::Set,

        Statement::ShowFunctions { .. }
        | Statement::ShowVariable { .. }
        | Statement::ShowStatus { .. }
        | Statement::ShowVariables { .. }
        | Statement::ShowCreate { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowCatalogs { .. }
        | Statement::ShowDatabases { .. }
        | Statement::ShowProcessList { .. }
        | Statement::ShowSchemas { .. }
        | Statement::ShowCharset(_)
        | Statement::ShowObjects(_)
        | Statement::ShowTables { .. }
        | Statement::ShowViews { .. }
        | Statement::ShowCollation { .. }
        | Statement::ExplainTable { .. }
        | Statement::Fetch { .. }
        | Statement::Close { .. } => K::Select,
        Statement::Declare { stmts, .. } => {
            if stmts.iter().all(|d| d.for_query.is_some()) {
                K::Select
            } else {
                K::Other
            }
        }

        Statement::CreateRole(_)
        | Statement::CreateUser(_)
        | Statement::AlterRole { .. }
        | Statement::AlterUser(_)
        | Statement::Grant(_)
        | Statement::GrantRole(_)
        | Statement::Deny(_)
        | Statement::Revoke(_)
        | Statement::RevokeRole(_)
        | Statement::AlterDefaultPrivileges(_)
        | Statement::CreatePolicy(_)
        | Statement::AlterPolicy(_)
        | Statement::DropPolicy(_)
        | Statement::CreateUserMapping(_)
        | Statement::CreateSecret { .. }
        | Statement::DropSecret { .. } => K::Dcl,
        Statement::Drop {
            object_type: ObjectType::Role | ObjectType::User | ObjectType::Group,
            ..
        } => K::Dcl,

        Statement::Prepare { .. }
        | Statement::Execute { .. }
        | Statement::Deallocate { .. }
        | Statement::LISTEN { .. }
        | Statement::UNLISTEN { .. }
        | Statement::NOTIFY { .. }
        | Statement::Lock(_)
        | Statement::LockTables { .. }
        | Statement::UnlockTables
        | Statement::Kill { .. }
        | Statement::Flush { .. }
        | Statement::Assert { .. }
        | Statement::Case(_)
        | Statement::If(_)
        | Statement::While(_)
        | Statement::Raise(_)
        | Statement::Open(_)
        | Statement::RaisError { .. }
        | Statement::Throw(_)
        | Statement::Print(_)
        | Statement::WaitFor(_)
        | Statement::Return(_)
        | Statement::List(_) => K::Other,

        // Everything else creates, alters, drops or maintains objects, or
        // touches the server (LOAD, INSTALL, ATTACH, UNLOAD...).
        _ => K::Ddl,
    };
    Some(kind)
}

/// Relation kinds (entries of `pg_class`) whose names are reported as tables.
fn is_relation_type(object_type: &ObjectType) -> bool {
    matches!(
        object_type,
        ObjectType::Table
            | ObjectType::View
            | ObjectType::MaterializedView
            | ObjectType::ForeignTable
            | ObjectType::Index
            | ObjectType::Sequence
    )
}

/// Tables a `CREATE TABLE` or `ALTER TABLE` names besides the table itself, which sqlparser
/// does not visit as relations, and whether it names one in a form not understood (the
/// statement is then opaque):
/// * `INHERITS (p)`, `PARTITION OF p` (visited), `ALTER TABLE ... [NO] INHERIT p`,
///   `ATTACH`/`DETACH PARTITION c`: the other table's rows appear in or leave a parent, so
///   it is written.
/// * `REFERENCES r` (column or table constraint, in `CREATE TABLE` or `ALTER TABLE ... ADD`):
///   PostgreSQL adds triggers to `r` and restricts deletes and updates of its rows, so it is
///   written.
/// * `LIKE s` (copies column definitions, not rows): read.
/// * `RENAME TO n`: `n` is written (in the schema of the renamed table).
fn related_tables(statement: &Statement) -> (Vec<TableRef>, bool) {
    fn references(option: &ColumnOption) -> Option<&ObjectName> {
        match option {
            ColumnOption::ForeignKey(fk) => Some(&fk.foreign_table),
            _ => None,
        }
    }

    let mut out = Vec::new();
    let mut unknown = false;
    let add = |out: &mut Vec<TableRef>, name: &ObjectName, access: Access| {
        if let Some((schema, name)) = split_name(name) {
            out.push(TableRef {
                schema,
                name,
                access,
            });
        }
    };
    match statement {
        Statement::CreateTable(create) => {
            for parent in create.inherits.iter().flatten() {
                add(&mut out, parent, Access::Write);
            }
            if let Some(
                CreateTableLikeKind::Parenthesized(like) | CreateTableLikeKind::Plain(like),
            ) = &create.like
            {
                add(&mut out, &like.name, Access::Read);
            }
            if let Some(name) = &create.clone {
                add(&mut out, name, Access::Read);
            }
            for column in &create.columns {
                // `CREATE TABLE t (a int, LIKE s)`: sqlparser reads `LIKE s` as a column
                // named LIKE of type `s` (LIKE is reserved: PostgreSQL has no such column).
                if column.name.quote_style.is_none()
                    && column.name.value.eq_ignore_ascii_case("like")
                {
                    match &column.data_type {
                        DataType::Custom(name, _) => add(&mut out, name, Access::Read),
                        _ => unknown = true,
                    }
                }
                for option in &column.options {
                    if let Some(name) = references(&option.option) {
                        add(&mut out, name, Access::Write);
                    }
                }
            }
            for constraint in &create.constraints {
                if let TableConstraint::ForeignKey(fk) = constraint {
                    add(&mut out, &fk.foreign_table, Access::Write);
                }
            }
        }
        Statement::AlterTable(alter) => {
            for operation in &alter.operations {
                match operation {
                    AlterTableOperation::AddConstraint {
                        constraint: TableConstraint::ForeignKey(fk),
                        ..
                    } => add(&mut out, &fk.foreign_table, Access::Write),
                    AlterTableOperation::AddColumn { column_def, .. } => {
                        for option in &column_def.options {
                            if let Some(name) = references(&option.option) {
                                add(&mut out, name, Access::Write);
                            }
                        }
                    }
                    AlterTableOperation::ChangeColumn { options, .. }
                    | AlterTableOperation::ModifyColumn { options, .. } => {
                        for name in options.iter().filter_map(references) {
                            add(&mut out, name, Access::Write);
                        }
                    }
                    AlterTableOperation::Inherit { parent }
                    | AlterTableOperation::NoInherit { parent } => {
                        add(&mut out, parent, Access::Write)
                    }
                    AlterTableOperation::AttachPartitionOf { partition, .. }
                    | AlterTableOperation::DetachPartitionOf { partition, .. } => {
                        add(&mut out, partition, Access::Write)
                    }
                    AlterTableOperation::SwapWith { table_name } => {
                        add(&mut out, table_name, Access::Write)
                    }
                    AlterTableOperation::RenameTable {
                        table_name: RenameTableNameKind::As(new) | RenameTableNameKind::To(new),
                    } => {
                        let schema = split_name(&alter.name).and_then(|(schema, _)| schema);
                        match split_name(new) {
                            Some((_, name)) => out.push(TableRef {
                                schema,
                                name,
                                access: Access::Write,
                            }),
                            None => unknown = true,
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
    (out, unknown)
}

/// Whether the tables reported for a DDL/DCL statement cover everything it
/// changes. Statements on schemas, databases, functions, types, roles... do
/// not act on a list of tables: their facts are marked `opaque`, so table
/// allow-lists (`tables_only`) never admit them.
fn ddl_tables_complete(statement: &Statement) -> bool {
    let is_relation_grant = |objects: &Option<GrantObjects>| {
        matches!(
            objects,
            Some(GrantObjects::Tables(_) | GrantObjects::Views(_) | GrantObjects::Sequences(_))
        )
    };
    match statement {
        Statement::CreateTable(_)
        | Statement::CreateView(_)
        | Statement::CreateIndex(_)
        | Statement::CreateForeignTable(_)
        | Statement::CreateSequence { .. }
        | Statement::AlterTable(_)
        | Statement::AlterView(_)
        | Statement::AlterIndex { .. }
        | Statement::Truncate(_)
        | Statement::Vacuum(_)
        | Statement::Analyze(_)
        | Statement::RefreshMaterializedView(_)
        | Statement::CreatePolicy(_)
        | Statement::AlterPolicy(_)
        | Statement::DropPolicy(_) => true,
        Statement::Drop { object_type, .. } => is_relation_type(object_type),
        Statement::Comment { object_type, .. } => matches!(
            object_type,
            CommentObject::Table
                | CommentObject::View
                | CommentObject::MaterializedView
                | CommentObject::ForeignTable
                | CommentObject::Index
                | CommentObject::Sequence
                | CommentObject::Column
        ),
        Statement::Grant(grant) => is_relation_grant(&grant.objects),
        Statement::Revoke(revoke) => is_relation_grant(&revoke.objects),
        _ => false,
    }
}

// ---------------------------------------------------------------------------
// The AST walk.

struct StmtCtx {
    /// Relation names that this statement writes (DML targets).
    writes: Vec<*const ObjectName>,
    /// Access of relations found outside any query of this statement.
    outside: Access,
    /// How many queries of this statement enclose the current node.
    query_depth: usize,
    /// Tables named by the statement outside of relation positions (see
    /// [`related_tables`]), added after the statement's own.
    related: Vec<TableRef>,
}

struct CteFrame {
    query: *const Query,
    /// CTE name -> position (the first one if a name repeats).
    names: HashMap<String, usize>,
    /// CTE body -> position.
    bodies: HashMap<*const Query, usize>,
    len: usize,
    recursive: bool,
    /// How many CTE names are in scope (non-recursive WITH: only the earlier
    /// ones inside a CTE body, all of them in the main query).
    visible: usize,
}

/// A vector without duplicates, in insertion order.
struct OrderedSet<T> {
    items: Vec<T>,
    seen: HashSet<T>,
}

impl<T> Default for OrderedSet<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            seen: HashSet::new(),
        }
    }
}

impl<T: Hash + Eq + Clone> OrderedSet<T> {
    fn insert(&mut self, item: T) {
        if self.seen.insert(item.clone()) {
            self.items.push(item);
        }
    }
}

#[derive(Default)]
struct Collector {
    tables: OrderedSet<TableRef>,
    functions: OrderedSet<String>,
    kinds: Vec<StatementKind>,
    without_where: bool,
    copy: Option<CopyFacts>,
    explain: bool,
    explain_analyze: bool,
    opaque_execute: bool,
    opaque: bool,
    sets_search_path: bool,
    /// A fact depended on a numeric literal's value (see `is_false_literal`).
    reads_numbers: bool,
    stmts: Vec<StmtCtx>,
    ctes: Vec<CteFrame>,
    /// Names visited as relations that are really table functions.
    not_tables: HashSet<*const ObjectName>,
    /// Every column reference (folded last part), once per occurrence.
    column_refs: Vec<String>,
    /// The references that are top-level result columns taken as they are.
    bare_outputs: Vec<String>,
    /// Names and aliases of the relations in FROM clauses (folded): a reference to one of them
    /// is a whole row.
    relation_names: HashSet<String>,
    /// See [`StatementFacts::unseen_columns`] (whole rows by name are found at the end).
    unseen_columns: bool,
    /// Every qualified column reference (`q.x`, `s.q.x`), folded parts, once each; resolved at
    /// the end, when every relation they can name has been seen.
    qualified_refs: OrderedSet<Vec<String>>,
    /// Tables and views by the name that qualifies their columns (the alias, else the name):
    /// `(schema, name)` of each relation given that name anywhere in the statement.
    base_relations: HashMap<String, Vec<(Option<String>, String)>>,
    /// The other FROM items' names (CTEs, subqueries, functions): what their columns hold is
    /// counted where it is computed.
    derived_relations: HashSet<String>,
    /// The top-level statement's query, whose plain SELECT list may hold `*`.
    top_query: Option<*const Query>,
}

impl Collector {
    /// [`StatementFacts::computed_from`]: the names referenced more often than as bare outputs.
    fn computed_from(&self) -> Vec<String> {
        // One pass over each list (a statement can hold tens of thousands of references).
        let mut counts: HashMap<&str, (usize, usize)> = HashMap::new();
        for name in &self.column_refs {
            counts.entry(name).or_default().0 += 1;
        }
        for name in &self.bare_outputs {
            counts.entry(name).or_default().1 += 1;
        }
        let mut names = Vec::new();
        for name in &self.column_refs {
            if let Some((refs, bare)) = counts.remove(name.as_str())
                && refs > bare
            {
                names.push(name.clone());
            }
        }
        names
    }

    /// [`StatementFacts::qualified_columns`], and whether some qualifier names nothing the
    /// statement holds (then [`StatementFacts::unseen_columns`]).
    fn qualified_columns(&self) -> (Vec<QualifiedColumn>, bool) {
        let mut out = OrderedSet::default();
        let mut unknown = false;
        for parts in &self.qualified_refs.items {
            match parts.as_slice() {
                [qualifier, column] => match self.base_relations.get(qualifier) {
                    Some(relations) => {
                        for (schema, relation) in relations {
                            out.insert(QualifiedColumn {
                                schema: schema.clone(),
                                relation: relation.clone(),
                                column: column.clone(),
                            });
                        }
                    }
                    None => unknown |= !self.derived_relations.contains(qualifier),
                },
                // `schema.table.column` and `database.schema.table.column` qualify only tables
                // and views named without an alias.
                [schema, relation, column] | [_, schema, relation, column] => {
                    out.insert(QualifiedColumn {
                        schema: Some(schema.clone()),
                        relation: relation.clone(),
                        column: column.clone(),
                    });
                }
                // More parts are an error in PostgreSQL.
                _ => unknown = true,
            }
        }
        (out.items, unknown)
    }

    /// Notes the name that qualifies the columns of a FROM item (or DML target): for a table or
    /// view, with its `(schema, name)`.
    fn note_qualifier(&mut self, qualifier: String, relation: Option<(Option<String>, String)>) {
        match relation {
            Some(relation) => {
                let relations = self.base_relations.entry(qualifier).or_default();
                if !relations.contains(&relation) {
                    relations.push(relation);
                }
            }
            None => {
                self.derived_relations.insert(qualifier);
            }
        }
    }

    /// A query's SELECT lists and joins, for [`StatementFacts::unseen_columns`] and the columns
    /// `USING` merges.
    fn note_query_columns(&mut self, query: &Query) {
        let top = self.top_query == Some(query as *const Query);
        let mut bodies: Vec<(&SetExpr, bool)> = vec![(query.body.as_ref(), top)];
        while let Some((body, top)) = bodies.pop() {
            match body {
                SetExpr::Select(select) => {
                    let star = select.projection.iter().any(|item| {
                        matches!(
                            item,
                            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
                        )
                    });
                    if star && !top {
                        self.unseen_columns = true;
                    }
                    for from in &select.from {
                        self.note_joins(&from.joins);
                    }
                }
                SetExpr::SetOperation { left, right, .. } => {
                    bodies.push((left.as_ref(), false));
                    bodies.push((right.as_ref(), false));
                }
                // Visited as queries of their own, or literals.
                SetExpr::Query(_) | SetExpr::Values(_) => {}
                // A data-modifying body (a CTE's) returns what its RETURNING lists: `*` is the
                // table's every column; named ones are references like any other.
                SetExpr::Insert(statement)
                | SetExpr::Update(statement)
                | SetExpr::Delete(statement) => {
                    let star = returning(statement).is_none_or(|items| {
                        items.iter().any(|item| {
                            matches!(
                                item,
                                SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
                            )
                        })
                    });
                    if star && !top {
                        self.unseen_columns = true;
                    }
                }
                // `TABLE t` is `SELECT * FROM t`. Anything else is taken as hiding columns too.
                _ => {
                    if !top {
                        self.unseen_columns = true;
                    }
                }
            }
        }
        if let Some(with) = &query.with
            && with
                .cte_tables
                .iter()
                .any(|cte| !cte.alias.columns.is_empty())
        {
            self.unseen_columns = true;
        }
    }

    fn note_joins(&mut self, joins: &[Join]) {
        for join in joins {
            match join_constraint(&join.join_operator) {
                Some(JoinConstraint::Natural) => self.unseen_columns = true,
                Some(JoinConstraint::Using(names) | JoinConstraint::UsingAlias(names, _)) => {
                    for n in names {
                        if let Some(last) = n.0.last() {
                            self.column_refs.push(normalize_part(last));
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Notes the result columns of a top-level plain SELECT that are bare column references:
    /// their RowDescription names their table, so column rules see them.
    fn note_bare_outputs(&mut self, statement: &Statement) {
        let Statement::Query(query) = statement else {
            return;
        };
        let SetExpr::Select(select) = query.body.as_ref() else {
            return;
        };
        for item in &select.projection {
            let expr = match item {
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
                _ => continue,
            };
            if let Some(name) = column_name(expr) {
                self.bare_outputs.push(name);
            }
        }
    }

    fn add_table(&mut self, schema: Option<String>, name: String, access: Access) {
        self.tables.insert(TableRef {
            schema,
            name,
            access,
        });
    }

    fn add_table_name(&mut self, name: &ObjectName, access: Access) {
        if let Some((schema, table)) = split_name(name) {
            self.add_table(schema, table, access);
        }
    }

    /// A relation whose rows the statement writes (a DML or `COPY FROM` target). Writing a
    /// system catalog is a schema or privilege change: `ddl`.
    fn add_target(&mut self, schema: Option<String>, table: String) {
        if is_catalog(schema.as_deref(), &table) {
            self.kinds.push(StatementKind::Ddl);
        }
        self.add_table(schema, table, Access::Write);
    }

    fn add_written(&mut self, name: &ObjectName) {
        if let Some((schema, table)) = split_name(name) {
            self.add_target(schema, table);
        }
    }

    /// A function call, wherever it is (an expression, `FROM f(...)`, `CALL`...): records the
    /// function and applies what depends on its arguments. `args` is `None` when they are
    /// not a list.
    fn add_call(&mut self, name: &ObjectName, args: Option<&[FunctionArg]>) -> ControlFlow<String> {
        let Some((_, function)) = split_name(name) else {
            return ControlFlow::Continue(());
        };
        match function.as_str() {
            "set_config" => self.check_set_config(args)?,
            // `ts_rewrite(query, select)` runs its second argument; the three-argument form
            // takes no SQL.
            "ts_rewrite" if args.is_none_or(|a| a.len() != 3) => self.opaque = true,
            f if SQL_STRING_FUNCTIONS.contains(&f) => self.opaque = true,
            _ => {}
        }
        self.functions.insert(function);
        ControlFlow::Continue(())
    }

    /// `set_config(setting_name, new_value, is_local)`, judged like the `SET` it performs.
    /// The setting must be a string literal: any other expression could name
    /// `client_encoding` or `standard_conforming_strings`, which cannot then be checked.
    fn check_set_config(&mut self, args: Option<&[FunctionArg]>) -> ControlFlow<String> {
        let Some([setting, value]) = args.and_then(set_config_args) else {
            return ControlFlow::Break(
                "set_config with arguments that are not plain expressions is not allowed: the \
                 setting it changes cannot be checked"
                    .to_string(),
            );
        };
        let Some(setting) = setting.and_then(string_literal) else {
            return ControlFlow::Break(format!(
                "set_config with a setting name that is not a string literal is not allowed: it \
                 could name {CLIENT_ENCODING} or {SCS}, which cannot then be checked"
            ));
        };
        // In an expression a bare word is a column, not a value.
        let value = value.filter(|v| !matches!(v, Expr::Identifier(_)));
        if setting.eq_ignore_ascii_case(SCS)
            && !value.is_some_and(|v| is_true_setting(v, &mut self.reads_numbers))
        {
            return ControlFlow::Break(scs_violation());
        }
        if setting.eq_ignore_ascii_case(CLIENT_ENCODING)
            && !value.and_then(string_literal).is_some_and(is_utf8_name)
        {
            return ControlFlow::Break(encoding_violation());
        }
        if setting.eq_ignore_ascii_case(SEARCH_PATH) {
            self.sets_search_path = true;
        }
        if ROLE_SETTINGS
            .iter()
            .any(|r| setting.eq_ignore_ascii_case(r))
        {
            self.kinds.push(StatementKind::Dcl);
        }
        ControlFlow::Continue(())
    }

    fn is_cte(&self, name: &str) -> bool {
        self.ctes
            .iter()
            .any(|frame| frame.names.get(name).is_some_and(|i| *i < frame.visible))
    }

    /// A table read through a plain reference (FROM, JOIN, `TABLE t`...).
    fn add_reference(&mut self, schema: Option<String>, table: String) {
        if schema.is_none() && self.is_cte(&table) {
            return;
        }
        let access = match self.stmts.last() {
            Some(ctx) if ctx.query_depth == 0 => ctx.outside,
            _ => Access::Read,
        };
        self.add_table(schema, table, access);
    }

    /// `TABLE t` inside a query body (not visited as a relation by sqlparser).
    fn add_table_commands(&mut self, body: &SetExpr) {
        // Iterative: UNION chains can be long.
        let mut pending = vec![body];
        while let Some(body) = pending.pop() {
            match body {
                SetExpr::Table(t) => {
                    if let Some(name) = &t.table_name {
                        let schema = t.schema_name.as_ref().map(normalize_ident);
                        self.add_reference(schema, normalize_ident(name));
                    }
                }
                SetExpr::SetOperation { left, right, .. } => {
                    pending.push(right);
                    pending.push(left);
                }
                _ => {}
            }
        }
    }

    fn statement_context(
        &mut self,
        statement: &Statement,
        kind: Option<StatementKind>,
    ) -> ControlFlow<String, StmtCtx> {
        let mut writes: Vec<*const ObjectName> = Vec::new();
        let mut outside = match kind {
            Some(StatementKind::Ddl | StatementKind::Dcl) => Access::Write,
            _ => Access::Read,
        };
        match statement {
            Statement::Insert(insert) => {
                match &insert.table {
                    TableObject::TableName(name) => writes.push(name),
                    TableObject::TableFunction(function) => {
                        self.add_call(&function.name, argument_list(&function.args))?
                    }
                    TableObject::TableQuery(_) => {}
                }
                // An upsert updates the conflicting rows. With VALUES those are at most the
                // rows written out in the statement; from a query they can be every row of the
                // table (`INSERT INTO t SELECT * FROM t ON CONFLICT DO UPDATE ...`), which is as
                // unbounded as an UPDATE without WHERE unless DO UPDATE has its own WHERE.
                let from_query = insert
                    .source
                    .as_ref()
                    .is_some_and(|q| !matches!(*q.body, SetExpr::Values(_)));
                match &insert.on {
                    Some(OnInsert::OnConflict(OnConflict {
                        action: OnConflictAction::DoUpdate(update),
                        ..
                    })) => {
                        self.kinds.push(StatementKind::Update);
                        if from_query && update.selection.as_ref().is_none_or(names_no_column) {
                            self.without_where = true;
                        }
                    }
                    Some(OnInsert::DuplicateKeyUpdate(_)) => {
                        self.kinds.push(StatementKind::Update);
                        if from_query {
                            self.without_where = true;
                        }
                    }
                    _ => {}
                }
            }
            Statement::Update(update) => {
                if let TableFactor::Table { name, .. } = &update.table.relation {
                    writes.push(name);
                }
                if update.selection.as_ref().is_none_or(names_no_column) {
                    self.without_where = true;
                }
            }
            Statement::Delete(delete) => {
                let from = match &delete.from {
                    FromTable::WithFromKeyword(v) | FromTable::WithoutKeyword(v) => v,
                };
                for twj in from {
                    if let TableFactor::Table { name, .. } = &twj.relation {
                        writes.push(name);
                    }
                }
                for name in &delete.tables {
                    self.add_written(name);
                }
                if delete.selection.as_ref().is_none_or(names_no_column) {
                    self.without_where = true;
                }
            }
            Statement::Merge(merge) => {
                if let TableFactor::Table { name, .. } = &merge.table {
                    writes.push(name);
                }
                // The ON condition bounds the rows that `WHEN MATCHED` and
                // `WHEN NOT MATCHED [BY TARGET]` act on, as a WHERE clause would, unless it
                // names no column (`ON true` matches every target row). `WHEN NOT MATCHED BY
                // SOURCE` acts on every target row that ON does not match. Either is unbounded
                // without an `AND` condition naming a column.
                let on_bounds = !names_no_column(&merge.on);
                for clause in &merge.clauses {
                    let kind = match clause.action {
                        MergeAction::Insert(_) => StatementKind::Insert,
                        MergeAction::Update(_) => StatementKind::Update,
                        MergeAction::Delete { .. } => StatementKind::Delete,
                        MergeAction::DoNothing { .. } => continue,
                    };
                    self.kinds.push(kind);
                    let bounded_by_on = match clause.clause_kind {
                        MergeClauseKind::Matched => on_bounds,
                        MergeClauseKind::NotMatchedBySource => false,
                        // Inserts: they touch no existing row.
                        MergeClauseKind::NotMatched | MergeClauseKind::NotMatchedByTarget => true,
                    };
                    if !bounded_by_on && clause.predicate.as_ref().is_none_or(names_no_column) {
                        self.without_where = true;
                    }
                }
            }
            Statement::Copy {
                source, to, target, ..
            } => {
                if let CopySource::Table { table_name, .. } = source {
                    if *to {
                        self.add_table_name(table_name, Access::Read);
                    } else {
                        self.add_written(table_name);
                    }
                }
                self.copy = Some(CopyFacts {
                    direction: if *to {
                        CopyDirection::To
                    } else {
                        CopyDirection::From
                    },
                    program: matches!(target, CopyTarget::Program { .. }),
                    file: matches!(target, CopyTarget::File { .. }),
                });
            }
            Statement::Call(function) => {
                self.add_call(&function.name, argument_list(&function.args))?
            }
            Statement::Execute { .. } => self.opaque_execute = true,
            Statement::Explain {
                analyze, options, ..
            } => {
                self.explain = true;
                let reads_numbers = &mut self.reads_numbers;
                let analyze_option = options.iter().flatten().any(|o| {
                    (o.name.value.eq_ignore_ascii_case("analyze")
                        || o.name.value.eq_ignore_ascii_case("analyse"))
                        && !o
                            .arg
                            .as_ref()
                            .is_some_and(|a| is_false_literal(a, reads_numbers))
                });
                self.explain_analyze |= *analyze || analyze_option;
            }
            Statement::Lock(_) | Statement::LockTables { .. } => outside = Access::Write,
            Statement::Drop {
                object_type,
                names,
                table,
                ..
            } => {
                if is_relation_type(object_type) {
                    for name in names {
                        self.add_table_name(name, Access::Write);
                    }
                }
                if let Some(name) = table {
                    self.add_table_name(name, Access::Write);
                }
            }
            Statement::Comment {
                object_type,
                object_name,
                ..
            } => match object_type {
                CommentObject::Table
                | CommentObject::View
                | CommentObject::MaterializedView
                | CommentObject::ForeignTable
                | CommentObject::Index
                | CommentObject::Sequence => self.add_table_name(object_name, Access::Write),
                CommentObject::Column => {
                    if let Some((_, table_parts)) = object_name.0.split_last() {
                        self.add_table_name(&ObjectName(table_parts.to_vec()), Access::Write);
                    }
                }
                _ => {}
            },
            Statement::AlterIndex { name, .. } | Statement::CreateSequence { name, .. } => {
                self.add_table_name(name, Access::Write)
            }
            Statement::Vacuum(vacuum) => {
                if let Some(name) = &vacuum.table_name {
                    self.add_table_name(name, Access::Write);
                }
            }
            Statement::Grant(grant) => self.add_grant_objects(grant.objects.as_ref()),
            Statement::Revoke(revoke) => self.add_grant_objects(revoke.objects.as_ref()),
            _ => {}
        }
        let (related, unknown) = related_tables(statement);
        if unknown {
            self.opaque = true;
        }
        ControlFlow::Continue(StmtCtx {
            writes,
            outside,
            query_depth: 0,
            related,
        })
    }

    fn add_grant_objects(&mut self, objects: Option<&GrantObjects>) {
        if let Some(
            GrantObjects::Tables(names)
            | GrantObjects::Views(names)
            | GrantObjects::Sequences(names),
        ) = objects
        {
            for name in names {
                self.add_table_name(name, Access::Write);
            }
        }
    }
}

/// The text of a string literal (`'...'`, `E'...'`, `N'...'`, `$$...$$`).
fn string_literal(expr: &Expr) -> Option<&str> {
    match expr {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s)
            | Value::EscapedStringLiteral(s)
            | Value::NationalStringLiteral(s) => Some(s),
            Value::DollarQuotedString(d) => Some(&d.value),
            _ => None,
        },
        _ => None,
    }
}

/// A string literal or a bare word: how `SET` statements spell values.
fn literal_string(expr: &Expr) -> Option<&str> {
    match expr {
        Expr::Identifier(ident) => Some(&ident.value),
        _ => string_literal(expr),
    }
}

// Every reader of a `Value::Number`'s digits sets `reads_numbers`: the decision cache shares
// facts between queries that differ only in their integer literals.

fn is_false_literal(expr: &Expr, reads_numbers: &mut bool) -> bool {
    match expr {
        Expr::Value(v) => match &v.value {
            Value::Boolean(b) => !b,
            Value::Number(n, _) => {
                *reads_numbers = true;
                n == "0"
            }
            _ => literal_string(expr).is_some_and(is_false_word),
        },
        _ => literal_string(expr).is_some_and(is_false_word),
    }
}

fn is_false_word(s: &str) -> bool {
    matches!(
        s.to_ascii_lowercase().as_str(),
        "false" | "off" | "no" | "0" | "f" | "n"
    )
}

fn is_true_setting(expr: &Expr, reads_numbers: &mut bool) -> bool {
    match expr {
        Expr::Value(v) => match &v.value {
            Value::Boolean(b) => *b,
            Value::Number(n, _) => {
                *reads_numbers = true;
                n == "1"
            }
            _ => literal_string(expr).is_some_and(is_true_word),
        },
        _ => literal_string(expr).is_some_and(is_true_word),
    }
}

fn is_true_word(s: &str) -> bool {
    matches!(
        s.to_ascii_lowercase().as_str(),
        "true" | "on" | "yes" | "1" | "t" | "y"
    )
}

const SCS: &str = "standard_conforming_strings";
const SEARCH_PATH: &str = "search_path";
const CLIENT_ENCODING: &str = "client_encoding";

/// Functions that run SQL given to them as a string, or read relations named by a value or
/// reached through a cursor: the tables they touch are not in the statement's text, so a
/// statement calling one of them is `opaque`. `ts_rewrite` is handled apart: only its
/// two-argument form takes a query.
const SQL_STRING_FUNCTIONS: &[&str] = &[
    // XML mappings of queries, cursors, tables, schemas and databases
    // (https://www.postgresql.org/docs/current/functions-xml.html#FUNCTIONS-XML-MAPPING).
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "table_to_xml",
    "table_to_xmlschema",
    "table_to_xml_and_xmlschema",
    "schema_to_xml",
    "schema_to_xmlschema",
    "schema_to_xml_and_xmlschema",
    "database_to_xml",
    "database_to_xmlschema",
    "database_to_xml_and_xmlschema",
    // Text search statistics over the rows of a query string.
    "ts_stat",
    // Extensions: dblink (SQL run over a connection of its own), tablefunc, xml2,
    // pg_background.
    "dblink",
    "dblink_exec",
    "dblink_open",
    "dblink_send_query",
    "crosstab",
    "crosstab2",
    "crosstab3",
    "crosstab4",
    "connectby",
    "xpath_table",
    "pg_background_launch",
];

fn scs_violation() -> String {
    format!("turning {SCS} off is not allowed: it changes how SQL text is tokenized")
}

fn encoding_violation() -> String {
    format!(
        "setting {CLIENT_ENCODING} to anything but UTF8 is not allowed: the gate reads SQL text \
         as UTF-8, and in another client encoding PostgreSQL could read the same bytes as other \
         statements"
    )
}

/// Whether `name` names `setting`. PostgreSQL compares setting names case-insensitively,
/// quoted or not; a qualified name is compared by its last part.
fn is_setting(name: &ObjectName, setting: &str) -> bool {
    split_name(name).is_some_and(|(_, n)| n.eq_ignore_ascii_case(setting))
}

/// A value the gate accepts for `client_encoding`: one of UTF8's names.
fn is_utf8_name(s: &str) -> bool {
    ["utf8", "utf-8", "unicode"]
        .iter()
        .any(|n| s.eq_ignore_ascii_case(n))
}

/// `SET x TO DEFAULT`, which PostgreSQL runs as `RESET x`.
fn is_default_keyword(expr: &Expr) -> bool {
    match expr {
        Expr::Identifier(i) => i.quote_style.is_none() && i.value.eq_ignore_ascii_case("default"),
        _ => false,
    }
}

/// The arguments of a call as a list; `None` when they are not one (`f(SELECT ...)`).
fn argument_list(args: &FunctionArguments) -> Option<&[FunctionArg]> {
    match args {
        FunctionArguments::List(list) => Some(&list.args),
        FunctionArguments::None => Some(&[]),
        FunctionArguments::Subquery(_) => None,
    }
}

/// The `setting_name` and `new_value` arguments of a `set_config` call, given by position or
/// by name; `None` when an argument is not a plain expression or has another name.
fn set_config_args(args: &[FunctionArg]) -> Option<[Option<&Expr>; 2]> {
    let slot = |name: &Ident| match normalize_ident(name).as_str() {
        "setting_name" => Some(0),
        "new_value" => Some(1),
        "is_local" => Some(2),
        _ => None,
    };
    let mut out = [None, None];
    for (i, arg) in args.iter().enumerate() {
        let (position, arg) = match arg {
            FunctionArg::Unnamed(arg) => (i, arg),
            FunctionArg::Named { name, arg, .. }
            | FunctionArg::ExprNamed {
                name: Expr::Identifier(name),
                arg,
                ..
            } => (slot(name)?, arg),
            FunctionArg::ExprNamed { .. } => return None,
        };
        let FunctionArgExpr::Expr(expr) = arg else {
            return None;
        };
        if let Some(out) = out.get_mut(position) {
            *out = Some(expr);
        }
    }
    Some(out)
}

/// The variables a `SET` statement assigns, with their values.
fn set_variables(statement: &Statement) -> Vec<(&ObjectName, Vec<&Expr>)> {
    match statement {
        Statement::Set(Set::SingleAssignment {
            variable, values, ..
        }) => vec![(variable, values.iter().collect())],
        Statement::Set(Set::ParenthesizedAssignments { variables, values }) => variables
            .iter()
            .zip(values.iter())
            .map(|(v, e)| (v, vec![e]))
            .collect(),
        Statement::Set(Set::MultipleAssignments { assignments }) => assignments
            .iter()
            .map(|a| (&a.name, vec![&a.value]))
            .collect(),
        _ => Vec::new(),
    }
}

/// Refuses `SET`/`RESET` of settings that change how PostgreSQL reads SQL text:
/// `standard_conforming_strings` off (`RESET` too: the default may be off), and
/// `client_encoding` (`SET NAMES` included) to anything but UTF8 (`RESET` and `DEFAULT` are
/// fine: the gate starts every session with UTF8).
fn check_set(statement: &Statement, reads_numbers: &mut bool) -> ControlFlow<String> {
    match statement {
        Statement::Reset(reset) => {
            if let Reset::ConfigurationParameter(name) = &reset.reset
                && is_setting(name, SCS)
            {
                return ControlFlow::Break(scs_violation());
            }
        }
        Statement::Set(Set::SetNames { charset_name, .. })
            if !is_utf8_name(&charset_name.value) =>
        {
            return ControlFlow::Break(encoding_violation());
        }
        _ => {}
    }
    for (name, values) in set_variables(statement) {
        if is_setting(name, SCS)
            && !(values.len() == 1 && values.iter().all(|v| is_true_setting(v, reads_numbers)))
        {
            return ControlFlow::Break(scs_violation());
        }
        if is_setting(name, CLIENT_ENCODING)
            && !matches!(values.as_slice(), [v] if is_default_keyword(v)
                || literal_string(v).is_some_and(is_utf8_name))
        {
            return ControlFlow::Break(encoding_violation());
        }
    }
    ControlFlow::Continue(())
}

/// `pg_settings` (unqualified or in `pg_catalog`): an `UPDATE` of it runs `set_config`
/// through the view's rule.
fn is_pg_settings(table: &TableRef) -> bool {
    table.name == "pg_settings" && table.schema.as_deref().is_none_or(|s| s == "pg_catalog")
}

/// A system catalog: a relation in `pg_catalog` or `information_schema`, or an unqualified one
/// whose name starts with `pg_` (PostgreSQL searches `pg_catalog` first unless `search_path`
/// names it later, so `pg_authid` is `pg_catalog.pg_authid`).
fn is_catalog(schema: Option<&str>, name: &str) -> bool {
    match schema {
        Some(schema) => schema == "pg_catalog" || schema == "information_schema",
        None => name.starts_with("pg_"),
    }
}

/// Whether a condition names no column, so that it holds for every row or for none: literals,
/// parameters (the agent chooses their values), and operators, casts and calls over them
/// (`true`, `1 = 1`, `NOT false`, `$1`, `now() IS NOT NULL`, `current_user = 'x'`), subqueries
/// naming no column (`EXISTS (SELECT 1 FROM u)`). A bare word is a column (or a whole row),
/// except the SQL value keywords PostgreSQL reserves that sqlparser leaves as identifiers.
fn names_no_column(condition: &Expr) -> bool {
    const VALUE_KEYWORDS: [&str; 2] = ["current_role", "current_schema"];
    sqlparser::ast::visit_expressions(condition, |expr| match expr {
        Expr::Identifier(ident)
            if ident.quote_style.is_none()
                && VALUE_KEYWORDS
                    .iter()
                    .any(|k| ident.value.eq_ignore_ascii_case(k)) =>
        {
            ControlFlow::Continue(())
        }
        Expr::Identifier(_)
        | Expr::CompoundIdentifier(_)
        | Expr::Wildcard(_)
        | Expr::QualifiedWildcard(..) => ControlFlow::Break(()),
        _ => ControlFlow::Continue(()),
    })
    .is_continue()
}

impl Visitor for Collector {
    type Break = String;

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<String> {
        check_set(statement, &mut self.reads_numbers)?;
        if self.stmts.is_empty() {
            self.note_bare_outputs(statement);
            if let Statement::Query(query) = statement {
                self.top_query = Some(query.as_ref() as *const Query);
            }
        }
        // An INSERT's target is no table factor: its name and alias name whole rows too
        // (`ON CONFLICT DO UPDATE ... RETURNING customers`).
        if let Statement::Insert(insert) = statement {
            if let TableObject::TableName(name) = &insert.table
                && let Some(last) = name.0.last()
            {
                self.relation_names.insert(normalize_part(last));
                let qualifier = match &insert.table_alias {
                    Some(alias) => normalize_ident(&alias.alias),
                    None => normalize_part(last),
                };
                self.note_qualifier(qualifier, split_name(name));
                // The row proposed for insertion, of the target's type.
                self.note_qualifier("excluded".to_string(), split_name(name));
            }
            if let Some(alias) = &insert.table_alias {
                self.relation_names.insert(normalize_ident(&alias.alias));
            }
        }
        if set_variables(statement)
            .iter()
            .any(|(name, _)| is_setting(name, SEARCH_PATH))
        {
            self.sets_search_path = true;
        }
        let kind = classify(statement);
        if let Some(kind) = kind {
            self.kinds.push(kind);
            if matches!(kind, StatementKind::Ddl | StatementKind::Dcl)
                && !ddl_tables_complete(statement)
            {
                self.opaque = true;
            }
        }
        let ctx = self.statement_context(statement, kind)?;
        self.stmts.push(ctx);
        ControlFlow::Continue(())
    }

    fn post_visit_statement(&mut self, _statement: &Statement) -> ControlFlow<String> {
        if let Some(ctx) = self.stmts.pop() {
            for table in ctx.related {
                self.tables.insert(table);
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<String> {
        self.note_query_columns(query);
        // Entering the body of a CTE of the enclosing WITH: only earlier CTEs
        // are in scope (all of them for WITH RECURSIVE).
        if let Some(frame) = self.ctes.last_mut()
            && let Some(&i) = frame.bodies.get(&(query as *const Query))
        {
            frame.visible = if frame.recursive { frame.len } else { i };
        }
        if let Some(with) = &query.with {
            let mut names = HashMap::new();
            let mut bodies = HashMap::new();
            for (i, cte) in with.cte_tables.iter().enumerate() {
                names.entry(normalize_ident(&cte.alias.name)).or_insert(i);
                bodies.insert(&*cte.query as *const Query, i);
            }
            self.ctes.push(CteFrame {
                query,
                names,
                bodies,
                len: with.cte_tables.len(),
                recursive: with.recursive,
                visible: 0,
            });
        }
        if let Some(ctx) = self.stmts.last_mut() {
            ctx.query_depth += 1;
        }
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, query: &Query) -> ControlFlow<String> {
        // `TABLE t` in this query's body, resolved with all of its CTEs in
        // scope.
        self.add_table_commands(&query.body);
        if self
            .ctes
            .last()
            .is_some_and(|frame| std::ptr::eq(frame.query, query))
        {
            self.ctes.pop();
        }
        // Leaving CTE body i: CTEs 0..=i are in scope from now on.
        if let Some(frame) = self.ctes.last_mut()
            && let Some(&i) = frame.bodies.get(&(query as *const Query))
        {
            frame.visible = if frame.recursive { frame.len } else { i + 1 };
        }
        if let Some(ctx) = self.stmts.last_mut() {
            ctx.query_depth = ctx.query_depth.saturating_sub(1);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<String> {
        if let Some(into) = &select.into {
            // SELECT ... INTO creates a table.
            self.kinds.push(StatementKind::Ddl);
            for target in &into.targets {
                match target {
                    Expr::Identifier(ident) => {
                        self.add_table(None, normalize_ident(ident), Access::Write)
                    }
                    Expr::CompoundIdentifier(idents) => {
                        self.add_table_name(&ObjectName::from(idents.clone()), Access::Write)
                    }
                    _ => {}
                }
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, table_factor: &TableFactor) -> ControlFlow<String> {
        // Tables and subqueries, whose rows are records of several columns; not functions
        // (`generate_series(1, 3) g`: there `g` is also the one column).
        let (name, alias) = match table_factor {
            TableFactor::Table {
                name,
                alias,
                args: None,
                ..
            } => (Some(name), alias.as_ref()),
            TableFactor::Derived { alias, .. } | TableFactor::NestedJoin { alias, .. } => {
                (None, alias.as_ref())
            }
            _ => (None, None),
        };
        if let Some(last) = name.and_then(|n| n.0.last()) {
            self.relation_names.insert(normalize_part(last));
        }
        if let Some(alias) = alias {
            self.relation_names.insert(normalize_ident(&alias.name));
        }
        let qualifier = table_factor_alias(table_factor)
            .map(|alias| normalize_ident(&alias.name))
            .or_else(|| match table_factor {
                TableFactor::Table { name, .. } => name.0.last().map(normalize_part),
                _ => None,
            });
        match (table_factor, qualifier) {
            // A parenthesized join's alias qualifies the columns of every table in it: taken as
            // naming nothing (see `qualified_columns`).
            (TableFactor::NestedJoin { .. }, _) | (_, None) => {}
            (
                TableFactor::Table {
                    name, args: None, ..
                },
                Some(qualifier),
            ) => {
                let relation = split_name(name)
                    .filter(|(schema, table)| schema.is_some() || !self.is_cte(table));
                // A CTE's columns are counted in its query, as a subquery's are.
                self.note_qualifier(qualifier, relation);
            }
            (_, Some(qualifier)) => self.note_qualifier(qualifier, None),
        }
        if let Some(alias) = table_factor_alias(table_factor)
            && !alias.columns.is_empty()
        {
            // `customers AS c(i, n, x)`: the table's columns under other names.
            self.unseen_columns = true;
        }
        if let TableFactor::NestedJoin {
            table_with_joins, ..
        } = table_factor
        {
            self.note_joins(&table_with_joins.joins);
        }
        match table_factor {
            TableFactor::Table {
                name,
                args: Some(args),
                ..
            } => {
                // `FROM f(...)`: a table function, not a table.
                self.not_tables.insert(name);
                self.add_call(name, Some(&args.args))?;
            }
            TableFactor::Function { name, args, .. } => self.add_call(name, Some(args))?,
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<String> {
        if self.not_tables.contains(&(relation as *const ObjectName)) {
            return ControlFlow::Continue(());
        }
        let Some((schema, table)) = split_name(relation) else {
            return ControlFlow::Continue(());
        };
        let written = self
            .stmts
            .last()
            .is_some_and(|ctx| ctx.writes.iter().any(|p| std::ptr::eq(*p, relation)));
        if written {
            // DML targets are always real tables, never CTEs.
            self.add_target(schema, table);
        } else {
            self.add_reference(schema, table);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<String> {
        if let Some(name) = column_name(expr) {
            self.column_refs.push(name);
        }
        if let Expr::CompoundIdentifier(parts) = expr
            && parts.len() > 1
        {
            self.qualified_refs
                .insert(parts.iter().map(normalize_ident).collect());
        }
        match expr {
            // `(c.*)::text`, `ROW(c.*)`: whole rows.
            Expr::Wildcard(_) | Expr::QualifiedWildcard(..) => self.unseen_columns = true,
            // `row_to_json(c.*)`, `array_agg(c.*)` (not `count(*)`).
            Expr::Function(f)
                if argument_list(&f.args).is_some_and(|args| {
                    args.iter().any(|a| {
                        matches!(
                            a,
                            FunctionArg::Unnamed(FunctionArgExpr::QualifiedWildcard(_))
                                | FunctionArg::Named {
                                    arg: FunctionArgExpr::QualifiedWildcard(_),
                                    ..
                                }
                        )
                    })
                }) =>
            {
                self.unseen_columns = true;
            }
            _ => {}
        }
        let builtin = match expr {
            Expr::Function(function) => {
                self.add_call(&function.name, argument_list(&function.args))?;
                None
            }
            Expr::In {
                target:
                    InTarget::Table {
                        name,
                        args: Some(args),
                    },
                ..
            } => {
                // `x IN f(...)` (dialects with IN-table expressions).
                self.not_tables.insert(name);
                self.add_call(name, Some(args))?;
                None
            }
            Expr::Extract { .. } => Some("extract"),
            Expr::Substring { .. } => Some("substring"),
            Expr::Position { .. } => Some("position"),
            Expr::Trim { .. } => Some("trim"),
            Expr::Overlay { .. } => Some("overlay"),
            Expr::Ceil { .. } => Some("ceil"),
            Expr::Floor { .. } => Some("floor"),
            _ => None,
        };
        if let Some(name) = builtin {
            self.functions.insert(name.to_string());
        }
        ControlFlow::Continue(())
    }
}

/// Facts of one parsed statement whose text is `text`; sets `reads_numbers` when they
/// depend on a numeric literal's value.
fn facts_of_statement(
    statement: &Statement,
    text: String,
    reads_numbers: &mut bool,
) -> Result<StatementFacts, ParseError> {
    let mut collector = Collector::default();
    let visited = statement.visit(&mut collector);
    *reads_numbers |= collector.reads_numbers;
    if let ControlFlow::Break(message) = visited {
        return Err(ParseError::new(message));
    }
    if collector
        .tables
        .items
        .iter()
        .any(|t| t.access == Access::Write && is_pg_settings(t))
    {
        return Err(ParseError::new(format!(
            "writing pg_settings is not allowed: an UPDATE of it runs set_config, which could \
             change {CLIENT_ENCODING} or {SCS}"
        )));
    }
    let kind = collector
        .kinds
        .iter()
        .copied()
        .max_by_key(|k| k.rank())
        .unwrap_or(StatementKind::Other);
    let mut kinds = vec![kind];
    for k in &collector.kinds {
        push_unique(&mut kinds, *k);
    }
    let computed_from = collector.computed_from();
    let (qualified_columns, unknown_qualifier) = collector.qualified_columns();
    let unseen_columns = collector.unseen_columns
        || unknown_qualifier
        || collector
            .column_refs
            .iter()
            .any(|r| collector.relation_names.contains(r));
    Ok(StatementFacts {
        text: text.into(),
        kind,
        kinds: kinds.into(),
        tables: collector.tables.items.into(),
        functions: collector.functions.items.into(),
        update_or_delete_without_where: collector.without_where,
        copy: collector.copy,
        explain: collector.explain,
        explain_analyze: collector.explain_analyze,
        opaque_execute: collector.opaque_execute,
        sets_search_path: collector.sets_search_path,
        computed_from: computed_from.into(),
        unseen_columns,
        qualified_columns: qualified_columns.into(),
        opaque: collector.opaque || collector.opaque_execute,
    })
}
