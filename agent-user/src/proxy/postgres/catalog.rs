//! Table OIDs to names, for masking rules written as `table.column` or `schema.table.column`
//! and so that a rule follows the source column whatever alias a query gives it.
//!
//! RowDescription carries only the table OID and attribute number. The gate resolves them with
//! its own brokered connection per (target, database), never the agent's, and caches the result
//! (OIDs are not reused while the table exists; a dropped and recreated table gets a new one).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::super::Gate;
use super::upstream::{self, Upstream, read_backend};
use super::{PgError, PgTarget};
use crate::protocol::postgres::{BackendMessage, FrontendMessage};

#[derive(Debug, Clone)]
pub struct TableInfo {
    pub schema: String,
    pub table: String,
    pub columns: HashMap<i16, String>,
}

type Key = (String, String);

#[derive(Default)]
pub struct Catalog {
    cache: Mutex<HashMap<(Key, u32), Arc<TableInfo>>>,
    conns: tokio::sync::Mutex<HashMap<Key, Upstream>>,
}

impl Catalog {
    fn cached(&self, key: &Key, oid: u32) -> Option<Arc<TableInfo>> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(key.clone(), oid))
            .cloned()
    }

    /// Resolves every OID (0 and unknown ones are absent from the result).
    pub async fn resolve(
        &self,
        gate: &Gate,
        target: &PgTarget,
        database: &str,
        oids: &[u32],
    ) -> Result<HashMap<u32, Arc<TableInfo>>, PgError> {
        let key = (target.name.clone(), database.to_string());
        let mut out = HashMap::new();
        let mut missing = Vec::new();
        for &oid in oids {
            if oid == 0 || out.contains_key(&oid) {
                continue;
            }
            match self.cached(&key, oid) {
                Some(t) => {
                    out.insert(oid, t);
                }
                None => missing.push(oid),
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let mut conns = self.conns.lock().await;
        if !conns.contains_key(&key) {
            let params = vec![
                ("database".to_string(), database.to_string()),
                (
                    "application_name".to_string(),
                    "agentgate-catalog".to_string(),
                ),
            ];
            let conn = upstream::open(gate, target, &params).await?;
            conns.insert(key.clone(), conn);
        }
        let Some(conn) = conns.get_mut(&key) else {
            return Ok(out);
        };
        let list: Vec<String> = missing.iter().map(u32::to_string).collect();
        let sql = format!(
            "SELECT c.oid::int8, n.nspname, c.relname, a.attnum::int4, a.attname \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid \
             WHERE c.oid IN ({}) AND a.attnum > 0 AND NOT a.attisdropped",
            list.join(",")
        );
        let rows = match simple_query(conn, &sql).await {
            Ok(rows) => rows,
            Err(e) => {
                conns.remove(&key);
                return Err(e);
            }
        };
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
        for (oid, info) in found {
            let info = Arc::new(info);
            cache.insert((key.clone(), oid), info.clone());
            out.insert(oid, info);
        }
        Ok(out)
    }
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
