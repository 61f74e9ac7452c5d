//! Facts cache: the facts of recently seen query *shapes*, so that a query differing from an
//! earlier one only in its integer literals is not parsed again.
//!
//! Clients send the same statements over and over with new numbers in them (pgbench's
//! `... WHERE aid = 12345`, ORMs that inline ids, `LIMIT 10`), and parsing is most of what
//! judging a statement costs. Facts never depend on an integer's value except where
//! [`facts`] says so (`reads_numbers`: `EXPLAIN (ANALYZE 0)`, `SET ... = 1`), so
//! the cache key is the query text with every integer literal replaced by a marker, plus the
//! [`ExtractOptions`]. Only numbers are normalized: string literals decide facts (function
//! names in `DO` bodies, `set_config` settings, `COPY` file names). Policies are not part of
//! the key: the cache holds facts, and the caller evaluates the policy on them every time.
//!
//! The key comes from `shape`, a hand-written lexer for the subset of PostgreSQL's lexical
//! structure (<https://www.postgresql.org/docs/current/sql-syntax-lexical.html>) that ordinary
//! statements use: ASCII identifiers and operators, whitespace, `'...'` strings, `"..."`
//! identifiers, decimal numbers and `$n` parameters. It makes one pass over the bytes and
//! allocates only the key, where sqlparser's tokenizer builds a token (a `String` for each
//! word) per word, space and operator before the parser even starts. It must split the text
//! exactly where sqlparser's tokenizer does, or two queries sqlparser reads differently could
//! share a key, so it gives up (the query is then not cached, only parsed) on everything else
//! and wherever sqlparser's reading depends on more than one character: comments, dollar
//! quotes, `E''`/`U&''`/`B''`/`X''`/`N''` literals, backslashes, braces, non-ASCII outside
//! quotes, a number touching a letter, `.`, `:`, `@`, `?` or `$` (`1e5`, `0x1F`, `1_000`,
//! `t.1`, `:1`, `@1`, `?1`). Integers longer than 18 digits are kept as written (they may not
//! fit the types sqlparser converts some integers to). Whatever the lexer accepts,
//! sqlparser tokenizes into the same tokens with only the integers' digits differing, and
//! neither sqlparser's grammar nor the facts look at those digits (except as `reads_numbers`
//! reports), so a hit gives the facts a fresh parse would give. The statements' texts are
//! the only facts taken from the query itself: both paths take them from the original text
//! (see [`StatementFacts::text`]), and an entry is kept only if the lexer's statement
//! boundaries gave the same texts as the parser's.
//!
//! The cache is bounded (entries and bytes) and sharded: each shard is a mutex around two
//! generations of a hash map; a full current generation becomes the previous one, dropping
//! the older, and a hit in the previous generation moves the entry back (an approximate LRU
//! without per-entry bookkeeping). Locks are held only for a map operation.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::mem;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::Serialize;

use super::facts::{self, ExtractOptions, ParseError, StatementFacts};

/// Most entries held, over all shards.
const MAX_ENTRIES: usize = 4096;
/// Most bytes of keys held, over all shards (facts are of the same order as their text).
const MAX_KEY_BYTES: usize = 8 << 20;
/// Longest query cached.
const MAX_SQL_BYTES: usize = 16 << 10;
/// Shards: enough that accept threads (one per core) rarely meet on a lock.
const SHARDS: usize = 16;
/// Longest integer literal normalized: any 18-digit integer fits the `u64`/`i64` that
/// sqlparser converts some integers to (`VARCHAR(n)`, `TIMESTAMP(p)`...), so none of them
/// makes the parse fail where another succeeds (a failed parse takes the keyword fallback).
const MAX_NORMALIZED_DIGITS: usize = 18;
/// Stands for a normalized integer in a key (the lexer refuses NUL anywhere else).
const NUMBER_MARK: u8 = 0;

/// Counters of the facts cache ([`PolicySet::cache_stats`](super::PolicySet::cache_stats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    /// Entries held.
    pub entries: usize,
    /// Queries answered from the cache.
    pub hits: u64,
    /// Queries of a cacheable shape that were parsed.
    pub misses: u64,
    /// Queries the lexer gave up on (always parsed).
    pub uncacheable: u64,
}

/// Facts of recently seen query shapes (see the module documentation).
pub(super) struct FactsCache {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    uncacheable: AtomicU64,
}

/// The facts of a query's statements as cached: `text` is empty, filled from each query.
type Entry = Arc<[StatementFacts]>;

/// A shape's key with its hash, computed once (it also picks the shard).
#[derive(PartialEq, Eq)]
struct Key {
    hash: u64,
    bytes: Vec<u8>,
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// Hands a [`Key`]'s precomputed hash to the map.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (by `Key`); fold anything else in all the same.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Map = HashMap<Key, Entry, BuildHasherDefault<Prehashed>>;

#[derive(Default)]
struct Shard {
    current: Map,
    previous: Map,
    current_bytes: usize,
    hits: u64,
    misses: u64,
}

impl Shard {
    fn get(&mut self, key: &Key) -> Option<Entry> {
        if let Some(entry) = self.current.get(key) {
            return Some(entry.clone());
        }
        let (key, entry) = self.previous.remove_entry(key)?;
        self.insert(key, entry.clone());
        Some(entry)
    }

    fn insert(&mut self, key: Key, entry: Entry) {
        let per_shard_entries = MAX_ENTRIES / SHARDS / 2;
        let per_shard_bytes = MAX_KEY_BYTES / SHARDS / 2;
        if self.current.len() >= per_shard_entries
            || self.current_bytes + key.bytes.len() > per_shard_bytes
        {
            self.previous = mem::take(&mut self.current);
            self.current_bytes = 0;
        }
        self.current_bytes += key.bytes.len();
        self.current.insert(key, entry);
    }
}

impl std::fmt::Debug for FactsCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FactsCache")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Default for FactsCache {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            uncacheable: AtomicU64::new(0),
        }
    }
}

impl FactsCache {
    /// The facts of `sql`, as [`facts::extract_with`] gives them, from the cache when a query
    /// of the same shape was seen.
    pub(super) fn extract(
        &self,
        sql: &str,
        opts: &ExtractOptions,
    ) -> Result<Vec<StatementFacts>, ParseError> {
        let Some(shape) = shape(sql, opts) else {
            self.uncacheable.fetch_add(1, Ordering::Relaxed);
            return facts::extract_with(sql, opts);
        };
        let key = Key {
            hash: self.hasher.hash_one(&shape.key),
            bytes: shape.key,
        };
        let Some(mut shard) = self.shard(&key) else {
            return facts::extract_with(sql, opts);
        };
        let cached = shard.get(&key);
        match &cached {
            Some(_) => shard.hits += 1,
            None => shard.misses += 1,
        }
        drop(shard);
        if let Some(entry) = cached
            && let Some(statements) = with_texts(&entry, sql, &shape.statements)
        {
            return Ok(statements);
        }

        let extracted = facts::extract_detailed(sql, opts)?;
        if !extracted.reads_numbers && texts_agree(&extracted.statements, sql, &shape.statements) {
            let entry: Entry = extracted
                .statements
                .iter()
                .map(|s| StatementFacts {
                    text: Arc::default(),
                    ..s.clone()
                })
                .collect();
            if let Some(mut shard) = self.shard(&key) {
                shard.insert(key, entry);
            }
        }
        Ok(extracted.statements)
    }

    /// Counters summed over the shards.
    pub(super) fn stats(&self) -> CacheStats {
        let mut stats = CacheStats {
            uncacheable: self.uncacheable.load(Ordering::Relaxed),
            ..CacheStats::default()
        };
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            stats.entries += shard.current.len() + shard.previous.len();
            stats.hits += shard.hits;
            stats.misses += shard.misses;
        }
        stats
    }

    fn shard(&self, key: &Key) -> Option<MutexGuard<'_, Shard>> {
        // The top bits: the maps use the low ones. `% SHARDS` of a `u64` fits `usize`.
        let i = ((key.hash >> 32) % SHARDS as u64) as usize;
        // A panic while a lock is held cannot leave a map half-updated: use it anyway.
        Some(
            self.shards
                .get(i)?
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }
}

/// The cached facts with each statement's text taken from `sql`.
fn with_texts(
    entry: &[StatementFacts],
    sql: &str,
    statements: &[Range<usize>],
) -> Option<Vec<StatementFacts>> {
    if entry.len() != statements.len() {
        return None;
    }
    entry
        .iter()
        .zip(statements)
        .map(|(facts, range)| {
            Some(StatementFacts {
                text: sql.get(range.clone())?.into(),
                ..facts.clone()
            })
        })
        .collect()
}

/// Whether the lexer's statements are the parser's: same number, same texts.
fn texts_agree(facts: &[StatementFacts], sql: &str, statements: &[Range<usize>]) -> bool {
    facts.len() == statements.len()
        && facts
            .iter()
            .zip(statements)
            .all(|(f, range)| sql.get(range.clone()) == Some(&*f.text))
}

/// What the cache needs from a query's text.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Shape {
    /// A byte for the options, then the query with each normalized integer replaced by
    /// [`NUMBER_MARK`].
    pub(super) key: Vec<u8>,
    /// Each non-empty statement's text (between `;` outside parentheses, trimmed).
    pub(super) statements: Vec<Range<usize>>,
}

/// Bytes that may come right before a number: sqlparser then starts a new token at the
/// digit. (After `.`, `:`, `@`, `?` or `$` the digits may belong to a field, placeholder or
/// decimal; after letters to a word.)
fn may_precede_number(b: u8) -> bool {
    matches!(
        b,
        b' ' | b'\t'
            | b'\n'
            | b'\r'
            | b'('
            | b','
            | b'='
            | b'<'
            | b'>'
            | b'+'
            | b'-'
            | b'*'
            | b'/'
            | b'%'
            | b'['
            | b'|'
    )
}

/// Bytes that may come right after a number: sqlparser's number ends there. (A letter, `_`,
/// `.` or `$` may continue it: exponents, `0x`, `1_000`, `1.5.`, `1L`.)
fn may_follow_number(b: Option<&u8>) -> bool {
    match b {
        None => true,
        Some(b) => matches!(
            b,
            b' ' | b'\t'
                | b'\n'
                | b'\r'
                | b')'
                | b','
                | b';'
                | b']'
                | b'='
                | b'<'
                | b'>'
                | b'+'
                | b'-'
                | b'*'
                | b'/'
                | b'%'
                | b':'
                | b'|'
        ),
    }
}

/// The index just past the quoted token starting at `start` (`'...'` or `"..."`, the quote
/// doubled inside), or `None` when unterminated or holding a backslash or NUL.
fn skip_quoted(b: &[u8], start: usize, quote: u8) -> Option<usize> {
    let mut i = start + 1;
    loop {
        match *b.get(i)? {
            0 | b'\\' => return None,
            c if c == quote => {
                if b.get(i + 1) == Some(&quote) {
                    i += 2;
                } else {
                    return Some(i + 1);
                }
            }
            _ => i += 1,
        }
    }
}

fn skip_digits(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    i
}

/// The trimmed, non-empty statement text in `start..end`, if any.
fn statement(b: &[u8], start: usize, end: usize) -> Option<Range<usize>> {
    let text = b.get(start..end)?;
    let first = text.iter().position(|c| !c.is_ascii_whitespace())?;
    let last = text.iter().rposition(|c| !c.is_ascii_whitespace())?;
    Some(start + first..start + last + 1)
}

/// The cache key and statement boundaries of `sql`, or `None` when the lexer cannot vouch
/// for it (see the module documentation).
pub(super) fn shape(sql: &str, opts: &ExtractOptions) -> Option<Shape> {
    let b = sql.as_bytes();
    if b.len() > MAX_SQL_BYTES {
        return None;
    }
    // Every option is part of the key: a new field must be added here.
    let ExtractOptions {
        standard_conforming_strings,
    } = *opts;
    let mut key = Vec::with_capacity(b.len() + 1);
    key.push(u8::from(standard_conforming_strings));
    let mut copied = 0; // `b[..copied]` is in `key`
    let mut statements = Vec::new();
    let mut statement_start = 0;
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'\'' | b'"' => i = skip_quoted(b, i, c)?,
            b'a'..=b'z' | b'A'..=b'Z' | b'_' => {
                let start = i;
                while b
                    .get(i)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
                {
                    i += 1;
                }
                match b.get(i) {
                    // `$` continues a word; a quote makes it a prefixed literal (`E'..'`,
                    // `B'..'`, `X'..'`, `N'..'`); non-ASCII letters continue it.
                    Some(b'$' | b'\'' | b'"') => return None,
                    Some(c) if !c.is_ascii() => return None,
                    // `U&'...'`, `U&"..."`.
                    Some(b'&') if i - start == 1 && matches!(c, b'u' | b'U') => return None,
                    _ => {}
                }
            }
            b'0'..=b'9' => {
                let start = i;
                if let Some(prev) = i.checked_sub(1).and_then(|p| b.get(p))
                    && !may_precede_number(*prev)
                {
                    return None;
                }
                i = skip_digits(b, i);
                let integer = b.get(i) != Some(&b'.');
                if !integer {
                    let fraction = i + 1;
                    i = skip_digits(b, fraction);
                    if i == fraction {
                        return None; // `1.`
                    }
                }
                if !may_follow_number(b.get(i)) {
                    return None;
                }
                if integer && i - start <= MAX_NORMALIZED_DIGITS {
                    key.extend_from_slice(b.get(copied..start)?);
                    key.push(NUMBER_MARK);
                    copied = i;
                }
            }
            b'.' => {
                if b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    return None; // `.5`, `t.1`
                }
                i += 1;
            }
            b'$' => {
                // `$1`: a parameter, kept as written.
                let digits = i + 1;
                i = skip_digits(b, digits);
                if i == digits || !may_follow_number(b.get(i)) {
                    return None;
                }
            }
            b'-' | b'/' => {
                let comment = if c == b'-' { b'-' } else { b'*' };
                if b.get(i + 1) == Some(&comment) {
                    return None;
                }
                i += 1;
            }
            b'(' => {
                depth += 1;
                i += 1;
            }
            b')' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b';' => {
                if depth == 0 {
                    statements.extend(statement(b, statement_start, i));
                    statement_start = i + 1;
                }
                i += 1;
            }
            b',' | b'=' | b'<' | b'>' | b'+' | b'*' | b'%' | b'[' | b']' | b':' | b'|' | b'!'
            | b'~' | b'^' | b'&' | b'@' | b'#' | b'?' => i += 1,
            _ => return None,
        }
    }
    statements.extend(statement(b, statement_start, b.len()));
    key.extend_from_slice(b.get(copied..)?);
    Some(Shape { key, statements })
}
