//! Table OIDs to names, for masking rules written as `table.column` or `schema.table.column`
//! and so that a rule follows the source column whatever alias a query gives it.
//!
//! RowDescription carries only the table OID and attribute number. The gate resolves them with
//! its own brokered connection per (target, database), never the agent's, and caches the result
//! (OIDs are not reused while the table exists; a dropped and recreated table gets a new one).
//! A cached table is looked up again when it is older than [`TTL`] or lacks an attribute
//! number a result set names (a column added after it was cached).
//!
//! It also answers which names are columns of a relation named in a statement
//! ([`Catalog::relation_columns`]): PostgreSQL reads `c.f` as the call `f(c)` over the whole row
//! when `f` is no column of `c`, and the statement's facts cannot tell which it is.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::super::Gate;
use super::upstream::{self, Upstream, read_backend};
use super::{PgError, PgTarget};
use crate::protocol::postgres::{BackendMessage, FrontendMessage};

/// How long a resolved table is trusted. `ALTER TABLE ... RENAME`, `ALTER SCHEMA ... RENAME`
/// and `RENAME COLUMN` keep the OID and attribute number, and a DBA can run them outside the gate
/// at any time; masking rules match names, so a stale name could let a renamed column dodge the
/// rule written for its new name. Five seconds bounds that window while a busy session still
/// queries the catalog at most once per table per window.
pub const TTL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct TableInfo {
    pub schema: String,
    pub table: String,
    pub columns: HashMap<i16, String>,
}

type Key = (String, String);

/// A relation as a statement names it: `(schema, name)`, the schema only when given.
pub type RelationName = (Option<String>, String);

#[derive(Debug, Clone)]
struct Entry {
    info: Arc<TableInfo>,
    /// When the catalog query that produced `info` was sent.
    fetched: Instant,
}

/// Whether a cached table can answer for the attribute numbers `attnums`: younger than [`TTL`]
/// and knowing every user column asked for. Attribute numbers below 1 (system columns, and 0
/// for "not a table column") are never in the cache, so they do not make a miss.
fn usable(
    info: &TableInfo,
    fetched: Instant,
    now: Instant,
    attnums: impl IntoIterator<Item = i16>,
) -> bool {
    now.saturating_duration_since(fetched) < TTL
        && attnums
            .into_iter()
            .all(|a| a < 1 || info.columns.contains_key(&a))
}

/// The columns of a relation name, as [`Catalog::relation_columns`] answers for it.
#[derive(Debug, Clone)]
struct NamedEntry {
    columns: Arc<HashSet<String>>,
    fetched: Instant,
}

#[derive(Default)]
pub struct Catalog {
    cache: Mutex<HashMap<(Key, u32), Entry>>,
    names: Mutex<HashMap<(Key, RelationName), NamedEntry>>,
    /// One connection per target and database, each behind its own lock: a catalog that is
    /// slow for one database does not hold up the others.
    conns: Mutex<HashMap<Key, Slot>>,
}

/// A catalog connection, opened when first needed.
type Slot = Arc<tokio::sync::Mutex<Option<Upstream>>>;

/// How long opening a catalog connection and running one query may take. Past it the query
/// fails (the statement's columns then count as unknown, or its connection ends, as for any
/// catalog error) and the connection is dropped: a stalled server cannot hold up every masked
/// statement waiting on it.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

impl Catalog {
    fn cached(&self, key: &Key, oid: u32) -> Option<Entry> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(key.clone(), oid))
            .cloned()
    }

    /// Resolves the tables of `(table OID, attribute number)` pairs as RowDescription gives them
    /// (OID 0 and unknown OIDs are absent from the result). A cached table is queried again when
    /// it is [`TTL`] old or lacks one of the attribute numbers asked for.
    pub async fn resolve_columns(
        &self,
        gate: &Gate,
        target: &PgTarget,
        database: &str,
        wanted: &[(u32, i16)],
    ) -> Result<HashMap<u32, Arc<TableInfo>>, PgError> {
        let key = (target.name.clone(), database.to_string());
        let mut attnums: HashMap<u32, Vec<i16>> = HashMap::new();
        for &(oid, attnum) in wanted {
            if oid != 0 {
                attnums.entry(oid).or_default().push(attnum);
            }
        }
        let now = Instant::now();
        let mut out = HashMap::new();
        let mut missing = Vec::new();
        for (&oid, attnums) in &attnums {
            match self.cached(&key, oid) {
                Some(e) if usable(&e.info, e.fetched, now, attnums.iter().copied()) => {
                    out.insert(oid, e.info);
                }
                _ => missing.push(oid),
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        missing.sort_unstable();
        let list: Vec<String> = missing.iter().map(u32::to_string).collect();
        let sql = format!(
            "SELECT c.oid::int8, n.nspname, c.relname, a.attnum::int4, a.attname \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid \
             WHERE c.oid IN ({}) AND a.attnum > 0 AND NOT a.attisdropped",
            list.join(",")
        );
        // Taken before the query: a rename after this instant may be missing from the answer.
        let fetched = Instant::now();
        let rows = self.query(gate, target, &key, &sql).await?;
        let mut found: HashMap<u32, TableInfo> = HashMap::new();
        for row in rows {
            let [
                Some(oid),
                Some(schema),
                Some(table),
                Some(attnum),
                Some(attname),
            ] = <[Option<String>; 5]>::try_from(row).unwrap_or_default()
            else {
                continue;
            };
            let (Ok(oid), Ok(attnum)) = (oid.parse::<u32>(), attnum.parse::<i16>()) else {
                continue;
            };
            found
                .entry(oid)
                .or_insert_with(|| TableInfo {
                    schema,
                    table,
                    columns: HashMap::new(),
                })
                .columns
                .insert(attnum, attname);
        }
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Tables queried but gone (dropped) leave the cache, and so does every expired entry:
        // the cache holds at most the tables seen in the last TTL.
        for oid in &missing {
            cache.remove(&(key.clone(), *oid));
        }
        cache.retain(|_, e| fetched.saturating_duration_since(e.fetched) < TTL);
        for (oid, info) in found {
            let info = Arc::new(info);
            cache.insert(
                (key.clone(), oid),
                Entry {
                    info: info.clone(),
                    fetched,
                },
            );
            out.insert(oid, info);
        }
        Ok(out)
    }

    /// The columns (system columns included) of relations as statements name them, for
    /// qualified references `q.x`: PostgreSQL reads `x` as a column of `q` when it is one, and
    /// otherwise as a function of `q`'s whole row. A schema-qualified name gets the
    /// columns of that relation; an unqualified one only the columns every relation of that
    /// name has, in any schema, because the agent can set `search_path` to find any of them. A
    /// name no relation has gets none. Answers are cached for [`TTL`], like resolved OIDs: a
    /// column dropped later (and a function of its name then reached instead) is seen within
    /// that window.
    pub async fn relation_columns(
        &self,
        gate: &Gate,
        target: &PgTarget,
        database: &str,
        wanted: &[RelationName],
    ) -> Result<HashMap<RelationName, Arc<HashSet<String>>>, PgError> {
        let key = (target.name.clone(), database.to_string());
        let now = Instant::now();
        let mut out = HashMap::new();
        let mut missing: HashSet<&RelationName> = HashSet::new();
        {
            let names = self
                .names
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for name in wanted {
                match names.get(&(key.clone(), name.clone())) {
                    Some(e) if now.saturating_duration_since(e.fetched) < TTL => {
                        out.insert(name.clone(), e.columns.clone());
                    }
                    _ => {
                        missing.insert(name);
                    }
                }
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let mut relnames: Vec<&str> = missing.iter().map(|(_, n)| n.as_str()).collect();
        relnames.sort_unstable();
        relnames.dedup();
        let list: Vec<String> = relnames.iter().map(|n| text_literal(n)).collect();
        // Indexes and composite types have attributes but are never FROM items.
        let sql = format!(
            "SELECT c.oid::int8, n.nspname, c.relname, a.attname \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum <> 0 \
             AND NOT a.attisdropped \
             WHERE c.relkind NOT IN ('i', 'I', 'c') AND c.relname IN ({})",
            list.join(",")
        );
        let fetched = Instant::now();
        let rows = self.query(gate, target, &key, &sql).await?;
        // OID -> (schema, name, columns).
        let mut relations: HashMap<String, (String, String, HashSet<String>)> = HashMap::new();
        for row in rows {
            let [Some(oid), Some(schema), Some(name), attname] =
                <[Option<String>; 4]>::try_from(row).unwrap_or_default()
            else {
                continue;
            };
            let entry = relations
                .entry(oid)
                .or_insert_with(|| (schema, name, HashSet::new()));
            // A relation without columns has one row, with no attribute.
            if let Some(attname) = attname {
                entry.2.insert(attname);
            }
        }
        let mut names = self
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        names.retain(|_, e| fetched.saturating_duration_since(e.fetched) < TTL);
        for name in missing {
            let columns = Arc::new(columns_of(name, relations.values()));
            names.insert(
                (key.clone(), name.clone()),
                NamedEntry {
                    columns: columns.clone(),
                    fetched,
                },
            );
            out.insert(name.clone(), columns);
        }
        Ok(out)
    }

    /// Runs `sql` on the catalog connection of `key`, opening it first if need be. A failed
    /// connection is dropped (the next query opens another).
    async fn query(
        &self,
        gate: &Gate,
        target: &PgTarget,
        key: &Key,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, PgError> {
        let slot = self
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .clone();
        let mut conn = slot.lock().await;
        let run = async {
            if conn.is_none() {
                let params = vec![
                    ("database".to_string(), key.1.clone()),
                    (
                        "application_name".to_string(),
                        "agentgate-catalog".to_string(),
                    ),
                ];
                *conn = Some(upstream::open(gate, target, &params).await?);
            }
            match conn.as_mut() {
                Some(c) => simple_query(c, sql).await,
                None => Err(PgError::UpstreamClosed),
            }
        };
        let rows = match tokio::time::timeout(QUERY_TIMEOUT, run).await {
            Ok(rows) => rows,
            Err(_) => Err(PgError::Protocol(format!(
                "the catalog of database \"{}\" did not answer within {} s",
                key.1,
                QUERY_TIMEOUT.as_secs()
            ))),
        };
        if rows.is_err() {
            // Half a conversation may be left on it.
            *conn = None;
        }
        rows
    }
}

/// The columns `name` is sure to have among `relations` (`(schema, name, columns)` of every
/// relation whose name is `name`'s, in any schema): those of the one in its schema, or, without
/// one, those every relation of that name has. None when no relation matches.
fn columns_of<'a>(
    (schema, name): &RelationName,
    relations: impl Iterator<Item = &'a (String, String, HashSet<String>)>,
) -> HashSet<String> {
    let mut matching =
        relations.filter(|(s, n, _)| n == name && schema.as_ref().is_none_or(|schema| schema == s));
    let Some((_, _, first)) = matching.next() else {
        return HashSet::new();
    };
    let mut columns = first.clone();
    for (_, _, other) in matching {
        columns.retain(|c| other.contains(c));
    }
    columns
}

/// `text` as an SQL expression of type text that reads the same whatever the server's
/// `standard_conforming_strings`: hex digits inside the quotes, nothing to escape. Names come
/// from the agent's SQL.
fn text_literal(text: &str) -> String {
    format!(
        "pg_catalog.convert_from(pg_catalog.decode('{}', 'hex'), 'UTF8')",
        hex::encode(text)
    )
}

/// One simple query on an idle connection; text-format rows.
async fn simple_query(conn: &mut Upstream, sql: &str) -> Result<Vec<Vec<Option<String>>>, PgError> {
    let mut out = BytesMut::new();
    FrontendMessage::Query {
        sql: sql.to_string(),
    }
    .encode(&mut out)?;
    conn.stream.write_all(&out).await?;
    let mut rows = Vec::new();
    let mut error = None;
    loop {
        let Some(frame) = read_backend(&mut conn.stream, &mut conn.buf, &mut conn.decoder).await?
        else {
            return Err(PgError::UpstreamClosed);
        };
        match frame.msg {
            BackendMessage::DataRow(values) => rows.push(
                values
                    .into_iter()
                    .map(|v| v.map(|b| String::from_utf8_lossy(&b).into_owned()))
                    .collect(),
            ),
            BackendMessage::ErrorResponse(e) => {
                error = Some(e.message().unwrap_or("error").to_string())
            }
            BackendMessage::ReadyForQuery { .. } => break,
            _ => {}
        }
    }
    match error {
        Some(e) => Err(PgError::Protocol(format!("catalog query failed: {e}"))),
        None => Ok(rows),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;

    fn table(attnums: &[i16]) -> TableInfo {
        TableInfo {
            schema: "public".to_string(),
            table: "customers".to_string(),
            columns: attnums.iter().map(|&a| (a, format!("c{a}"))).collect(),
        }
    }

    #[test]
    fn fresh_entry_with_every_column_is_used() {
        let t = table(&[1, 2, 3]);
        let at = Instant::now();
        assert!(usable(&t, at, at, [1, 3]));
        assert!(usable(&t, at, at + TTL - Duration::from_millis(1), [2]));
        // No column of the table asked for (expressions over it have attribute number 0).
        assert!(usable(&t, at, at, []));
    }

    #[test]
    fn entry_expires_after_ttl() {
        let t = table(&[1, 2]);
        let at = Instant::now();
        assert!(!usable(&t, at, at + TTL, [1]));
        assert!(!usable(&t, at, at + TTL * 2, []));
        // A clock reading before the fetch (another task's `now`) is not an expiry.
        assert!(usable(&t, at + Duration::from_secs(1), at, [1]));
    }

    #[test]
    fn column_added_after_caching_is_a_miss() {
        let t = table(&[1, 2]);
        let at = Instant::now();
        assert!(!usable(&t, at, at, [1, 4]));
        assert!(!usable(&t, at, at, [3]));
    }

    fn relation(schema: &str, name: &str, columns: &[&str]) -> (String, String, HashSet<String>) {
        (
            schema.to_string(),
            name.to_string(),
            columns.iter().map(|c| c.to_string()).collect(),
        )
    }

    #[test]
    fn an_unqualified_name_has_only_the_columns_every_relation_of_that_name_has() {
        let relations = [
            relation("public", "customers", &["id", "name", "ssn"]),
            relation("scratch", "customers", &["id", "ssn", "to_jsonb"]),
            relation("public", "orders", &["id"]),
        ];
        let sorted = |c: HashSet<String>| {
            let mut c: Vec<String> = c.into_iter().collect();
            c.sort();
            c
        };
        assert_eq!(
            sorted(columns_of(&(None, "customers".into()), relations.iter())),
            ["id", "ssn"]
        );
        assert_eq!(
            sorted(columns_of(
                &(Some("scratch".into()), "customers".into()),
                relations.iter()
            )),
            ["id", "ssn", "to_jsonb"]
        );
        assert!(
            columns_of(
                &(Some("other".into()), "customers".into()),
                relations.iter()
            )
            .is_empty()
        );
        assert!(columns_of(&(None, "missing".into()), relations.iter()).is_empty());
    }

    #[test]
    fn names_reach_the_catalog_query_as_hex() {
        assert_eq!(
            text_literal("a'b\\"),
            "pg_catalog.convert_from(pg_catalog.decode('6127625c', 'hex'), 'UTF8')"
        );
    }

    #[test]
    fn system_and_non_table_columns_are_not_a_miss() {
        // attnum 0: an expression over the table; negative: ctid, xmin and the like, which the
        // catalog query never loads.
        let t = table(&[1]);
        let at = Instant::now();
        assert!(usable(&t, at, at, [0, -1, -7, 1]));
    }
}
