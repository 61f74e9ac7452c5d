//! An extended-protocol PostgreSQL client for the end-to-end tests, run inside a governed cgroup
//! (`agentgate exec --agent bot -- pg_client SCENARIO PORT [ARG]`). It connects to the REAL
//! server address 127.0.0.1:PORT with a wrong password (the gate brokers the credentials) and
//! prints one JSON line per step: `{"step": ..., "ok": bool, "code": SQLSTATE, "message": ...,
//! "rows": [[...]]}`.
//!
//! Scenarios `masked`, `pipeline`, `denied_parse`, `transaction`, `cancel` use tokio-postgres
//! (binary result format, Parse/Describe/Bind/Execute/Sync). Scenarios `raw_*` speak the wire
//! protocol by hand, for message sequences no driver produces.
// Test client: a panic with a message is the report.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_postgres::{Client, NoTls, Row, SimpleQueryMessage};

fn emit(v: Value) {
    println!("{v}");
}

fn err_json(step: &str, e: &tokio_postgres::Error) -> Value {
    let db = e.as_db_error();
    json!({
        "step": step,
        "ok": false,
        "code": db.map(|d| d.code().code().to_string()),
        "message": db.map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string()),
    })
}

/// Every column of every row as text (text-like columns as strings, ints as decimal).
fn rows_json(rows: &[Row]) -> Value {
    Value::Array(
        rows.iter()
            .map(|r| {
                Value::Array(
                    (0..r.len())
                        .map(|i| {
                            let ty = r.columns()[i].type_().clone();
                            match ty {
                                tokio_postgres::types::Type::INT4 => r
                                    .get::<_, Option<i32>>(i)
                                    .map_or(Value::Null, |v| json!(v.to_string())),
                                tokio_postgres::types::Type::INT8 => r
                                    .get::<_, Option<i64>>(i)
                                    .map_or(Value::Null, |v| json!(v.to_string())),
                                tokio_postgres::types::Type::BOOL => r
                                    .get::<_, Option<bool>>(i)
                                    .map_or(Value::Null, |v| json!(v.to_string())),
                                _ => r
                                    .try_get::<_, Option<String>>(i)
                                    .map(|v| v.map_or(Value::Null, Value::String))
                                    .unwrap_or_else(|e| json!(format!("<undecodable: {e}>"))),
                            }
                        })
                        .collect(),
                )
            })
            .collect(),
    )
}

fn result(step: &str, r: Result<Vec<Row>, tokio_postgres::Error>) -> Value {
    match r {
        Ok(rows) => json!({"step": step, "ok": true, "rows": rows_json(&rows)}),
        Err(e) => err_json(step, &e),
    }
}

fn simple_rows(msgs: &[SimpleQueryMessage]) -> Value {
    Value::Array(
        msgs.iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(Value::Array(
                    (0..r.len())
                        .map(|i| r.get(i).map_or(Value::Null, |s| json!(s)))
                        .collect(),
                )),
                _ => None,
            })
            .collect(),
    )
}

async fn connect(port: u16) -> Client {
    let (client, conn) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={port} user=postgres password=wrong-password dbname=postgres connect_timeout=10"
        ),
        NoTls,
    )
    .await
    .expect("connect through the gate");
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("connection error: {e}");
        }
    });
    client
}

async fn masked(port: u16) {
    let client = connect(port).await;
    // Parameters in binary, results in binary (tokio-postgres asks for binary everywhere).
    let r = client
        .query(
            "SELECT id, name, email, card_number, ssn, note FROM customers WHERE id = $1",
            &[&1i32],
        )
        .await;
    emit(result("binary", r));
    // An alias must not dodge the column rule.
    let r = client
        .query(
            "SELECT card_number AS cn, ssn AS x FROM customers WHERE id = $1",
            &[&1i32],
        )
        .await;
    emit(result("alias", r));
    // The same row through the simple protocol (text format).
    match client
        .simple_query("SELECT id, name, email, card_number, ssn, note FROM customers WHERE id = 1")
        .await
    {
        Ok(m) => emit(json!({"step": "text", "ok": true, "rows": simple_rows(&m)})),
        Err(e) => emit(err_json("text", &e)),
    }
    // Detectors over every row's free text: Luhn-valid masked, Luhn-invalid kept.
    let r = client
        .query("SELECT id, note FROM customers ORDER BY id", &[])
        .await;
    emit(result("notes", r));
    // Values computed from masked columns, in binary.
    let r = client
        .query(
            "SELECT substr(ssn, 1, 3) AS p, length(ssn) AS n FROM customers WHERE id = $1",
            &[&1i32],
        )
        .await;
    emit(result("computed", r));
}

/// Whole rows through functional notation (`c.f` is `f(c)` when `f` is no column of `c`),
/// prepared and run through the extended protocol; and a real qualified column.
async fn functional_notation(port: u16) {
    let client = connect(port).await;
    let r = client
        .query(
            "SELECT c.to_jsonb ->> 'ssn' AS s, c.full_name AS f FROM customers c WHERE c.id = $1",
            &[&2i32],
        )
        .await;
    emit(result("whole_row", r));
    let r = client
        .query(
            "SELECT upper(c.name) AS n FROM customers c WHERE c.id = $1",
            &[&2i32],
        )
        .await;
    emit(result("column", r));
}

async fn pipeline(port: u16) {
    let client = connect(port).await;
    let started = Instant::now();
    // One client, several queries in flight at once: tokio-postgres pipelines their messages.
    let (a, b, c, d) = tokio::join!(
        client.query("SELECT $1::int + 1", &[&41i32]),
        client.query("SELECT email FROM customers WHERE id = $1", &[&2i32]),
        client.query("DROP TABLE customers", &[]),
        client.query("SELECT count(*) FROM customers", &[]),
    );
    emit(result("add", a));
    emit(result("email", b));
    emit(result("drop", c));
    emit(result("count", d));
    emit(json!({"step": "elapsed", "ok": true, "ms": started.elapsed().as_millis() as u64}));
}

async fn denied_parse(port: u16) {
    let client = connect(port).await;
    match client.prepare("DROP TABLE customers").await {
        Ok(_) => emit(json!({"step": "prepare_drop", "ok": true})),
        Err(e) => emit(err_json("prepare_drop", &e)),
    }
    // A statement the gate did let through, prepared once and run twice with a parameter.
    match client
        .prepare("SELECT count(*) FROM customers WHERE id >= $1")
        .await
    {
        Ok(st) => {
            emit(result("after_1", client.query(&st, &[&0i32]).await));
            emit(result("after_2", client.query(&st, &[&2i32]).await));
        }
        Err(e) => emit(err_json("after_prepare", &e)),
    }
    // `execute` prepares and runs: a denied statement never runs.
    let r = client.execute("TRUNCATE customers", &[]).await;
    match r {
        Ok(n) => emit(json!({"step": "truncate", "ok": true, "rows": n})),
        Err(e) => emit(err_json("truncate", &e)),
    }
    emit(result(
        "final",
        client.query("SELECT count(*) FROM customers", &[]).await,
    ));
}

async fn transaction(port: u16) {
    let client = connect(port).await;
    let steps: [(&str, &str); 6] = [
        ("begin", "BEGIN"),
        ("insert", "INSERT INTO t VALUES (500, 'in-tx')"),
        ("drop", "DROP TABLE t"),
        ("after", "SELECT 1"),
        ("rollback", "ROLLBACK"),
        ("outside", "SELECT count(*) FROM t WHERE id = 500"),
    ];
    for (step, sql) in steps {
        emit(result(step, client.query(sql, &[]).await));
    }
}

async fn cancel(port: u16) {
    let client = connect(port).await;
    let token = client.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        token.cancel_query(NoTls).await
    });
    let started = Instant::now();
    let r = client.query("SELECT pg_sleep(30)", &[]).await;
    let elapsed = started.elapsed().as_millis() as u64;
    let mut v = result("sleep", r);
    v["ms"] = json!(elapsed);
    emit(v);
    match canceller.await.expect("join canceller") {
        Ok(()) => emit(json!({"step": "cancel_sent", "ok": true})),
        Err(e) => emit(err_json("cancel_sent", &e)),
    }
    emit(result("after", client.query("SELECT 7", &[]).await));
}

/// A statement held for approval inside an explicit transaction (extended protocol, with a
/// parameter): the test approves or denies it while this waits.
async fn held_tx(port: u16) {
    let mut client = connect(port).await;
    let tx = client.transaction().await.expect("BEGIN");
    let started = Instant::now();
    let r = tx.execute("UPDATE t SET v = $1", &[&"held"]).await;
    let mut v = match r {
        Ok(n) => json!({"step": "update", "ok": true, "rows": n}),
        Err(e) => err_json("update", &e),
    };
    v["ms"] = json!(started.elapsed().as_millis() as u64);
    let ok = v["ok"] == true;
    emit(v);
    if ok {
        emit(result(
            "inside",
            tx.query("SELECT count(*)::int AS n FROM t WHERE v = 'held'", &[])
                .await,
        ));
        match tx.commit().await {
            Ok(()) => emit(json!({"step": "commit", "ok": true})),
            Err(e) => emit(err_json("commit", &e)),
        }
    } else {
        // The transaction is aborted, as after any error.
        emit(result("aborted", tx.query("SELECT 1", &[]).await));
        let _ = tx.rollback().await;
    }
    emit(result("after", client.query("SELECT 7 AS n", &[]).await));
}

/// The agent's own cancel (a driver timeout) while its statement waits for approval.
async fn held_cancel(port: u16) {
    let client = connect(port).await;
    let token = client.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        token.cancel_query(NoTls).await
    });
    let started = Instant::now();
    let r = client.execute("DELETE FROM t", &[]).await;
    let mut v = match r {
        Ok(n) => json!({"step": "delete", "ok": true, "rows": n}),
        Err(e) => err_json("delete", &e),
    };
    v["ms"] = json!(started.elapsed().as_millis() as u64);
    emit(v);
    match canceller.await.expect("join canceller") {
        Ok(()) => emit(json!({"step": "cancel_sent", "ok": true})),
        Err(e) => emit(err_json("cancel_sent", &e)),
    }
    emit(result("after", client.query("SELECT 7 AS n", &[]).await));
}

// ---- Raw wire protocol -------------------------------------------------------------------

struct Raw {
    s: TcpStream,
    received: Vec<u8>,
}

#[derive(Debug)]
struct Msg {
    tag: u8,
    body: Vec<u8>,
}

impl Msg {
    /// An ErrorResponse's SQLSTATE.
    fn code(&self) -> Option<String> {
        self.field(b'C')
    }

    fn field(&self, which: u8) -> Option<String> {
        let mut i = 0;
        while i < self.body.len() && self.body[i] != 0 {
            let t = self.body[i];
            let end = self.body[i + 1..].iter().position(|b| *b == 0)? + i + 1;
            if t == which {
                return Some(String::from_utf8_lossy(&self.body[i + 1..end]).into_owned());
            }
            i = end + 1;
        }
        None
    }

    /// A DataRow's values as text.
    fn values(&self) -> Vec<Option<String>> {
        let n = i16::from_be_bytes([self.body[0], self.body[1]]);
        let mut at = 2;
        let mut out = Vec::new();
        for _ in 0..n {
            let len = i32::from_be_bytes(self.body[at..at + 4].try_into().unwrap());
            at += 4;
            if len < 0 {
                out.push(None);
            } else {
                let len = len as usize;
                out.push(Some(
                    String::from_utf8_lossy(&self.body[at..at + len]).into_owned(),
                ));
                at += len;
            }
        }
        out
    }
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn parse_msg(name: &str, sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.extend_from_slice(&0i16.to_be_bytes());
    frame(b'P', &b)
}

fn bind_msg(portal: &str, statement: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    cstr(&mut b, statement);
    b.extend_from_slice(&0i16.to_be_bytes()); // parameter formats
    b.extend_from_slice(&0i16.to_be_bytes()); // parameters
    b.extend_from_slice(&0i16.to_be_bytes()); // result formats: all text
    frame(b'B', &b)
}

fn describe_msg(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    cstr(&mut b, name);
    frame(b'D', &b)
}

fn execute_msg(portal: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    b.extend_from_slice(&0i32.to_be_bytes());
    frame(b'E', &b)
}

fn sync_msg() -> Vec<u8> {
    frame(b'S', &[])
}

fn query_msg(sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, sql);
    frame(b'Q', &b)
}

fn close_msg(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    cstr(&mut b, name);
    frame(b'C', &b)
}

impl Raw {
    /// Connects and completes start-up (no password is ever sent: the gate answers AuthenticationOk).
    fn connect(port: u16) -> Raw {
        Raw::connect_with(port, &[]).expect("start-up")
    }

    /// Like [`Raw::connect`] with `extra` start-up parameters; `Err` with what the gate answered
    /// if it refused them.
    fn connect_with(port: u16, extra: &[(&str, &str)]) -> Result<Raw, Vec<Msg>> {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(15))).ok();
        let mut raw = Raw {
            s,
            received: Vec::new(),
        };
        let mut b = Vec::new();
        b.extend_from_slice(&196_608i32.to_be_bytes());
        cstr(&mut b, "user");
        cstr(&mut b, "postgres");
        cstr(&mut b, "database");
        cstr(&mut b, "postgres");
        cstr(&mut b, "application_name");
        cstr(&mut b, "pg_client_raw");
        for (k, v) in extra {
            cstr(&mut b, k);
            cstr(&mut b, v);
        }
        b.push(0);
        let mut pkt = (b.len() as i32 + 4).to_be_bytes().to_vec();
        pkt.extend_from_slice(&b);
        raw.send(&pkt);
        let msgs = raw.until_ready()?;
        if let Some(m) = msgs.iter().find(|m| m.tag == b'R') {
            let code = i32::from_be_bytes(m.body[0..4].try_into().unwrap());
            assert_eq!(code, 0, "the gate asked for authentication {code}");
        }
        Ok(raw)
    }

    /// Messages up to and including the first one tagged `tag`.
    fn until_tag(&mut self, tag: u8) -> Result<Vec<Msg>, Vec<Msg>> {
        let mut out = Vec::new();
        loop {
            match self.read() {
                Some(m) => {
                    let done = m.tag == tag;
                    out.push(m);
                    if done {
                        return Ok(out);
                    }
                }
                None => return Err(out),
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send");
    }

    /// One message; `None` on EOF or a connection error.
    fn read(&mut self) -> Option<Msg> {
        let mut head = [0u8; 5];
        self.s.read_exact(&mut head).ok()?;
        let len = i32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        self.s.read_exact(&mut body).ok()?;
        self.received.extend_from_slice(&head);
        self.received.extend_from_slice(&body);
        Some(Msg { tag: head[0], body })
    }

    /// Messages up to and including ReadyForQuery; `Err(messages so far)` if the connection ends.
    fn until_ready(&mut self) -> Result<Vec<Msg>, Vec<Msg>> {
        self.until_tag(b'Z')
    }
}

/// What a batch of messages got back: tags in order, error codes and messages, data rows, the
/// transaction status of ReadyForQuery.
fn summary(step: &str, r: Result<Vec<Msg>, Vec<Msg>>) -> Value {
    let (closed, msgs) = match r {
        Ok(m) => (false, m),
        Err(m) => (true, m),
    };
    let tags: String = msgs.iter().map(|m| m.tag as char).collect();
    let errors: Vec<Value> = msgs
        .iter()
        .filter(|m| m.tag == b'E')
        .map(|m| json!({"code": m.code(), "message": m.field(b'M'), "detail": m.field(b'D')}))
        .collect();
    let rows: Vec<Value> = msgs
        .iter()
        .filter(|m| m.tag == b'D')
        .map(|m| json!(m.values()))
        .collect();
    let status = msgs
        .iter()
        .rfind(|m| m.tag == b'Z')
        .map(|m| (m.body[0] as char).to_string());
    json!({"step": step, "ok": errors.is_empty() && !closed, "closed": closed, "tags": tags,
           "errors": errors, "rows": rows, "status": status})
}

/// A denied named Parse leaves no statement behind: Bind/Execute of that name cannot run it.
fn raw_denied_name(port: u16) {
    let mut c = Raw::connect(port);
    let mut batch = parse_msg("evil", "DROP TABLE customers");
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("parse_evil", c.until_ready()));
    let mut batch = bind_msg("", "evil");
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("execute_evil", c.until_ready()));
    // Denied Parse in the middle of a pipeline: everything up to Sync is skipped, as the server
    // would after an error; the next Sync-delimited batch works.
    let mut batch = parse_msg("", "SELECT 1");
    batch.extend(bind_msg("", ""));
    batch.extend(execute_msg(""));
    batch.extend(parse_msg("", "TRUNCATE customers"));
    batch.extend(bind_msg("", ""));
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    batch.extend(parse_msg("", "SELECT count(*) FROM customers"));
    batch.extend(bind_msg("", ""));
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("pipeline_first", c.until_ready()));
    emit(summary("pipeline_second", c.until_ready()));
}

/// Re-using a statement name: an allowed, masked SELECT is prepared as `s`, then a denied
/// Parse of the same name is sent. The server still holds the first `s`; executing it must
/// still be masked (and recorded).
fn raw_reparse(port: u16) {
    let mut c = Raw::connect(port);
    let mut batch = parse_msg("s", "SELECT email, card_number FROM customers WHERE id = 1");
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("parse_allowed", c.until_ready()));
    let mut batch = parse_msg("s", "DROP TABLE customers");
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("parse_denied_same_name", c.until_ready()));
    let mut batch = bind_msg("", "s");
    batch.extend(describe_msg(b'P', ""));
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("execute_s", c.until_ready()));
}

/// Re-using a statement name with an allowed statement: the server refuses the second Parse
/// (42P05, the name exists) and keeps the first `s`, so executing `s` runs the first SELECT.
fn raw_reparse_allowed(port: u16) {
    let mut c = Raw::connect(port);
    let mut batch = parse_msg("s", "SELECT email, card_number FROM customers WHERE id = 1");
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("parse_first", c.until_ready()));
    let mut batch = parse_msg("s", "SELECT 'harmless'::text AS h, 'x'::text AS y");
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("parse_second", c.until_ready()));
    let mut batch = bind_msg("", "s");
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("execute_s", c.until_ready()));
}

/// Two statements executed through the unnamed portal in one pipelined batch (what drivers do:
/// Bind ""/Execute ""/Bind ""/Execute ""/Sync). Each Execute's rows must be masked by the
/// columns of the statement that portal was bound to at the time, not by the last Bind.
fn raw_portal_pipeline(port: u16) {
    let mut c = Raw::connect(port);
    let mut batch = parse_msg("a", "SELECT email, card_number FROM customers WHERE id = 1");
    batch.extend(parse_msg("b", "SELECT count(*) FROM customers"));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("prepare", c.until_ready()));
    let mut batch = bind_msg("", "a");
    batch.extend(execute_msg(""));
    batch.extend(bind_msg("", "b"));
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("pipelined", c.until_ready()));
    // The same, one Sync per statement.
    let mut batch = bind_msg("", "a");
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    batch.extend(bind_msg("", "b"));
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("pipelined_syncs_1", c.until_ready()));
    emit(summary("pipelined_syncs_2", c.until_ready()));
}

/// A Query larger than the target's `max_frame_bytes`.
fn raw_oversize(port: u16, size: usize) {
    let mut c = Raw::connect(port);
    c.send(&query_msg("SELECT 1"));
    emit(summary("before", c.until_ready()));
    let pad = "x".repeat(size);
    let sql = format!("INSERT INTO t VALUES (900, 'oversized') -- {pad}");
    // The peer may close while we are still writing: that is a valid outcome.
    let wrote = c.s.write_all(&query_msg(&sql)).is_ok();
    let r = c.until_ready();
    let mut v = summary("oversized", r);
    v["wrote_all"] = json!(wrote);
    emit(v);
}

/// Everything the agent receives during start-up and a few queries, checked for `needle`
/// (given in the environment, not on the command line: the session records the command line).
fn raw_greeting(port: u16, needle: &str) {
    let mut c = Raw::connect(port);
    for sql in [
        "SELECT current_user, session_user, current_database()",
        "SHOW ALL",
        "SELECT usename, passwd FROM pg_shadow",
        "SELECT rolname, rolpassword FROM pg_authid",
    ] {
        c.send(&query_msg(sql));
        emit(summary(sql, c.until_ready()));
    }
    let hay = &c.received;
    let found = hay
        .windows(needle.len().max(1))
        .any(|w| w == needle.as_bytes());
    emit(json!({"step": "needle", "ok": true, "received_bytes": hay.len(), "found": found}));
}

/// The gate's view of prepared statements must never fall behind the server's: an Execute the
/// gate cannot tie to a judged statement is refused, and a Close after a failure in the same
/// pipeline does not make the gate forget a statement the server still holds.
fn raw_out_of_step(port: u16) {
    let mut c = Raw::connect(port);
    let mut batch = parse_msg("s", "SELECT email, card_number FROM customers WHERE id = 1");
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("prepare", c.until_ready()));
    let mut batch = execute_msg("nope");
    batch.extend(close_msg(b'S', "s"));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("unknown_portal_then_close", c.until_ready()));
    let mut batch = bind_msg("", "s");
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("execute_s", c.until_ready()));
    // A name the agent prepared at the SQL level: the gate never judged what it holds.
    c.send(&query_msg(
        "PREPARE q AS SELECT email FROM customers WHERE id = 2",
    ));
    emit(summary("sql_prepare", c.until_ready()));
    let mut batch = bind_msg("", "q");
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("execute_q", c.until_ready()));
    c.send(&query_msg("SELECT 1 AS still_usable"));
    emit(summary("after", c.until_ready()));
}

/// A write sent with Terminate in one packet, the connection closed at once: the server runs
/// and commits it after the agent has gone. `arg` says how: `terminate` or `close` (no
/// Terminate, just the end of the stream).
fn raw_hangup(port: u16, how: &str) {
    let mut c = Raw::connect(port);
    let mut batch = query_msg("UPDATE t SET v = 'changed-by-agent' WHERE id = 1");
    if how == "terminate" {
        batch.extend(frame(b'X', &[]));
    }
    c.send(&batch);
    drop(c);
    emit(json!({"step": "sent"}));
}

/// A FETCH prepared while its cursor read one harmless column, executed after the cursor was
/// declared again over masked columns: the server fixes a FETCH portal's columns at Bind, from
/// the cursor as it is then. First with no Describe of the portal (the gate must describe it),
/// then again with one (a plan cached for the first shape must not be reused).
fn raw_redeclared_cursor(port: u16) {
    let mut c = Raw::connect(port);
    c.send(&query_msg("BEGIN; DECLARE c CURSOR FOR SELECT id FROM t"));
    emit(summary("declare_harmless", c.until_ready()));
    let mut batch = parse_msg("f", "FETCH ALL FROM c");
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("prepare_fetch", c.until_ready()));
    let mut batch = bind_msg("", "f");
    batch.extend(describe_msg(b'P', ""));
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("fetch_harmless", c.until_ready()));
    let masked =
        "SELECT id, ssn, card_number, email, translate(ssn, '-', '') FROM customers WHERE id = 1";
    c.send(&query_msg(&format!(
        "CLOSE c; DECLARE c CURSOR FOR {masked}"
    )));
    emit(summary("declare_masked", c.until_ready()));
    let mut batch = bind_msg("", "f");
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("fetch_without_describe", c.until_ready()));
    c.send(&query_msg(&format!(
        "CLOSE c; DECLARE c CURSOR FOR {masked}"
    )));
    emit(summary("declare_again", c.until_ready()));
    let mut batch = bind_msg("", "f");
    batch.extend(describe_msg(b'P', ""));
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("fetch_with_describe", c.until_ready()));
    c.send(&query_msg("ROLLBACK"));
    emit(summary("rollback", c.until_ready()));
}

/// Ways to make the gate's view of names and responses part from the server's (each must leave
/// masking and judging intact).
fn raw_desync(port: u16) {
    let masked = "SELECT email, card_number FROM customers WHERE id = 1";
    let flush = frame(b'H', &[]);
    let mut c = Raw::connect(port);

    // 1. Messages sent after a server error has reached the agent, before Sync: the server
    //    skips them, so the gate must not take the Parse as done.
    let mut batch = parse_msg("s", masked);
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("prepare_s", c.until_ready()));
    let mut batch = bind_msg("", "nonexistent");
    batch.extend(&flush);
    c.send(&batch);
    emit(summary("bind_error", c.until_tag(b'E')));
    let mut batch = parse_msg("s", "SELECT 1");
    batch.extend(query_msg("SELECT 2"));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("skipped_reparse", c.until_ready()));
    let mut batch = bind_msg("", "s");
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("execute_s", c.until_ready()));

    // 3. A portal bound in an ended transaction, then a SQL cursor of the same name.
    let mut batch = parse_msg("", "SELECT 1 AS n");
    batch.extend(bind_msg("c", ""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("bind_c", c.until_ready()));
    c.send(&query_msg(&format!("BEGIN; DECLARE c CURSOR FOR {masked}")));
    emit(summary("declare_c", c.until_ready()));
    let mut batch = execute_msg("c");
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("execute_c", c.until_ready()));
    c.send(&query_msg("ROLLBACK"));
    emit(summary("rollback", c.until_ready()));

    // 4. A Sync in the middle of COPY data (the server ignores it), then an empty query.
    c.send(&query_msg("COPY t FROM STDIN"));
    emit(summary("copy_start", c.until_tag(b'G')));
    let mut batch = frame(b'd', b"9\tz\n");
    batch.extend(sync_msg());
    batch.extend(frame(b'c', &[]));
    c.send(&batch);
    emit(summary("copy_done", c.until_ready()));
    c.send(&query_msg(""));
    emit(summary("empty", c.until_ready()));
    c.send(&query_msg(masked));
    emit(summary("masked_after_copy", c.until_ready()));

    // 6. A COPY the server ends with an error, then a Sync and a CopyDone the agent still sends:
    //    the Sync is answered normally, the CopyDone goes nowhere, `s` stays masked.
    c.send(&query_msg("COPY t FROM STDIN"));
    emit(summary("copy_again", c.until_tag(b'G')));
    c.send(&frame(b'd', b"notanint\tx\n"));
    emit(summary("copy_error", c.until_ready()));
    let mut batch = sync_msg();
    batch.extend(frame(b'c', &[]));
    batch.extend(bind_msg("", "s"));
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("stray_sync", c.until_ready()));
    emit(summary("masked_after_copy_error", c.until_ready()));

    // 7. DECLARE and CLOSE prepared with Parse act when executed: the gate forgets its portals
    //    then, so the cursor is not taken for the portal it replaced.
    let mut batch = parse_msg("d", &format!("DECLARE c2 CURSOR FOR {masked}"));
    batch.extend(parse_msg("k", "CLOSE c2"));
    batch.extend(parse_msg("h", "SELECT 1 AS a WHERE false"));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("prepare_cursor_statements", c.until_ready()));
    c.send(&query_msg("BEGIN"));
    emit(summary("begin", c.until_ready()));
    for (step, portal, statement) in [
        ("bind_c2", "c2", "h"),
        ("close_c2", "", "k"),
        ("declare_c2", "", "d"),
    ] {
        let mut batch = bind_msg(portal, statement);
        if portal.is_empty() {
            batch.extend(execute_msg(""));
        }
        batch.extend(sync_msg());
        c.send(&batch);
        emit(summary(step, c.until_ready()));
    }
    let mut batch = execute_msg("c2");
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("execute_c2", c.until_ready()));
    c.send(&query_msg("ROLLBACK"));
    emit(summary("rollback_c2", c.until_ready()));

    // 8. Two Syncs between a COPY and its CopyInResponse: the server ignores both.
    let mut batch = query_msg("COPY t FROM STDIN");
    batch.extend(sync_msg());
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("copy_two_syncs", c.until_tag(b'G')));
    let mut batch = frame(b'd', b"10\ty\n");
    batch.extend(frame(b'c', &[]));
    c.send(&batch);
    emit(summary("copy_two_syncs_done", c.until_ready()));
    c.send(&query_msg("SELECT 1/0"));
    emit(summary("no_rows", c.until_ready()));
    c.send(&query_msg(masked));
    emit(summary("masked_after_two_syncs", c.until_ready()));

    // 9. COPY data streamed without waiting for CopyInResponse (as pgx does) is delivered.
    let mut batch = query_msg("COPY t FROM STDIN");
    batch.extend(frame(b'd', b"11\tw\n"));
    batch.extend(frame(b'c', &[]));
    c.send(&batch);
    emit(summary("copy_streamed", c.until_ready()));
    c.send(&query_msg("SELECT v FROM t WHERE id = 11"));
    emit(summary("streamed_row", c.until_ready()));

    // 5. Errors that quote the data a masked statement read.
    c.send(&query_msg("SELECT ssn::int FROM customers WHERE id = 1"));
    emit(summary("cast_ssn", c.until_ready()));
    c.send(&query_msg("SELECT email::date FROM customers WHERE id = 1"));
    emit(summary("cast_email", c.until_ready()));
    c.send(&query_msg(
        "SELECT ssn::regclass FROM customers WHERE id = 1",
    ));
    emit(summary("ssn_as_name", c.until_ready()));
    c.send(&query_msg("SELECT 1 AS still_usable"));
    emit(summary("after", c.until_ready()));
}

/// COPY FROM STDIN in the extended protocol as libpq sends it (Execute, Sync, the data,
/// CopyDone, Sync): the server ignores the first Sync, and the queries after it must still be
/// matched with their own results (and masks).
fn raw_copy_sync(port: u16) {
    let mut c = Raw::connect(port);
    let mut batch = parse_msg("", "COPY t FROM STDIN");
    batch.extend(bind_msg("", ""));
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("copy_start", c.until_tag(b'G')));
    let mut batch = frame(b'd', b"20\ttwenty\n");
    batch.extend(frame(b'c', &[]));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("copy_done", c.until_ready()));
    for step in ["email_1", "email_2"] {
        c.send(&query_msg("SELECT email FROM customers WHERE id = 1"));
        emit(summary(step, c.until_ready()));
    }
}

/// Start-up parameters that would change how the server reads statements are refused, and the
/// client encoding is UTF8 whatever the agent asks.
fn raw_startup(port: u16) {
    for (step, extra) in [
        ("options", [("options", "-c search_path=secret")]),
        ("search_path", [("search_path", "secret")]),
        ("scs", [("standard_conforming_strings", "off")]),
    ] {
        let r = Raw::connect_with(port, &extra).map(|_| Vec::new());
        emit(summary(step, r));
    }
    let mut c = Raw::connect_with(port, &[("client_encoding", "SJIS")]).expect("start-up");
    c.send(&query_msg("SHOW client_encoding"));
    emit(summary("encoding", c.until_ready()));
    c.send(&query_msg("SET client_encoding TO 'SJIS'"));
    emit(summary("set_encoding", c.until_ready()));
    c.send(&query_msg("SHOW client_encoding"));
    emit(summary("encoding_after", c.until_ready()));
}

/// Named statements of `ARG` bytes each until the gate refuses one for its memory budget,
/// inside a transaction the refusal must abort as a server error would; then two are closed
/// and the next Parse fits again.
fn raw_budget(port: u16, size: usize) {
    let mut c = Raw::connect(port);
    let text = |i: usize| format!("SELECT {i} AS n -- {}", "x".repeat(size));
    c.send(&query_msg("BEGIN"));
    emit(summary("begin", c.until_ready()));
    let mut kept = 0;
    let mut refused = None;
    for i in 0..200 {
        let mut batch = parse_msg(&format!("big{i}"), &text(i));
        // A Bind and an Execute after the refused Parse: skipped up to Sync, as the server would.
        batch.extend(bind_msg("", &format!("big{i}")));
        batch.extend(execute_msg(""));
        batch.extend(sync_msg());
        c.send(&batch);
        let r = summary("parse", c.until_ready());
        if r["ok"] == true {
            kept += 1;
        } else {
            refused = Some(r);
            break;
        }
    }
    emit(json!({"step": "kept", "count": kept}));
    let Some(mut refused) = refused else {
        emit(json!({"step": "refused", "ok": true, "never": true}));
        return;
    };
    refused["step"] = json!("refused");
    emit(refused);
    c.send(&query_msg("ROLLBACK"));
    emit(summary("rollback", c.until_ready()));
    // The refused name does not exist on the server, nor for the gate.
    let mut batch = bind_msg("", &format!("big{kept}"));
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("refused_name", c.until_ready()));
    // Closing two statements gives their bytes back.
    let mut batch = close_msg(b'S', "big0");
    batch.extend(close_msg(b'S', "big1"));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("close", c.until_ready()));
    let mut batch = parse_msg("again", &text(7));
    batch.extend(bind_msg("", "again"));
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("again", c.until_ready()));
    // A kept one still runs.
    let mut batch = bind_msg("", "big2");
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("big2", c.until_ready()));
}

/// A named statement of `ARG` bytes kept, then unnamed ones of `ARG` bytes each replacing the
/// last: the one replaced is not counted twice.
fn raw_replace_unnamed(port: u16, size: usize) {
    let mut c = Raw::connect(port);
    let text = |i: usize| format!("SELECT {i} AS n -- {}", "x".repeat(size));
    let mut batch = parse_msg("keep", &text(100));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("keep", c.until_ready()));
    for i in 0..3 {
        let mut batch = parse_msg("", &text(i));
        batch.extend(bind_msg("", ""));
        batch.extend(execute_msg(""));
        batch.extend(sync_msg());
        c.send(&batch);
        emit(summary(&format!("unnamed{i}"), c.until_ready()));
    }
}

/// Portals of a wide table's every column, each described, in one transaction, until the gate
/// ends the connection for its memory budget.
fn raw_wide(port: u16) {
    let mut c = Raw::connect(port);
    // Portals last until the transaction ends.
    c.send(&query_msg("BEGIN"));
    emit(summary("begin", c.until_ready()));
    for i in 0..10 {
        let mut batch = parse_msg(&format!("w{i}"), "SELECT * FROM wide");
        batch.extend(bind_msg(&format!("p{i}"), &format!("w{i}")));
        batch.extend(describe_msg(b'P', &format!("p{i}")));
        batch.extend(sync_msg());
        c.send(&batch);
        let r = summary(&format!("wide{i}"), c.until_ready());
        let closed = r["closed"] == true;
        emit(r);
        if closed {
            return;
        }
    }
}

/// Statement and portal names longer than 63 bytes: the server compares their first 63 bytes.
fn raw_long_names(port: u16) {
    let masked = "SELECT email, card_number FROM customers WHERE id = 1";
    let mut c = Raw::connect(port);
    let long = "a".repeat(63);
    let mut batch = parse_msg(&format!("{long}X"), masked);
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("parse_x", c.until_ready()));
    // Another name with the same first 63 bytes: the server runs the statement named `...X`.
    let mut batch = bind_msg(&format!("{long}P1"), &format!("{long}Y"));
    batch.extend(execute_msg(&format!("{long}P2")));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("execute_y", c.until_ready()));
    // Closing `...Z` closes `...X`, for the server and for the gate.
    let mut batch = close_msg(b'S', &format!("{long}Z"));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("close_z", c.until_ready()));
    let mut batch = bind_msg("", &format!("{long}X"));
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("execute_closed", c.until_ready()));
    // 64 bytes cut inside a character (31 times "é" then the first byte of "é" or "ü").
    let e = "é".repeat(32);
    let u = format!("{}ü", "é".repeat(31));
    let mut batch = parse_msg(&e, masked);
    batch.extend(bind_msg("", &u));
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("execute_cut", c.until_ready()));
    // A named statement the gate judged stays the one the server has: a Parse of a name equal
    // in 63 bytes is refused by the server (it exists), and the old one is still masked.
    let mut batch = parse_msg(&u, "SELECT 1");
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("reparse_cut", c.until_ready()));
    let mut batch = bind_msg("", &e);
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("execute_cut_again", c.until_ready()));
}

/// Deferred constraints checked when a transaction with masked statements commits: the
/// server's error names the key, which a masked statement read from `customers.ssn`.
fn raw_deferred(port: u16) {
    let insert = "INSERT INTO dk SELECT 2, ssn FROM customers WHERE id = 1";
    let mut c = Raw::connect(port);
    // Explicit transaction, then COMMIT.
    c.send(&query_msg("BEGIN"));
    emit(summary("begin", c.until_ready()));
    c.send(&query_msg(insert));
    emit(summary("insert", c.until_ready()));
    c.send(&query_msg("COMMIT"));
    emit(summary("commit", c.until_ready()));
    // SET CONSTRAINTS ALL IMMEDIATE checks them at once.
    c.send(&query_msg("BEGIN"));
    emit(summary("begin2", c.until_ready()));
    c.send(&query_msg(insert));
    emit(summary("insert2", c.until_ready()));
    c.send(&query_msg("SET CONSTRAINTS ALL IMMEDIATE"));
    emit(summary("immediate", c.until_ready()));
    c.send(&query_msg("ROLLBACK"));
    emit(summary("rollback", c.until_ready()));
    // A simple query run as an implicit transaction: checked after its last statement.
    c.send(&query_msg(insert));
    emit(summary("implicit", c.until_ready()));
    // Two statements in one string: the server commits before the last one's
    // CommandComplete, so the error comes while the unmasked `SET` is answering.
    c.send(&query_msg(&format!(
        "{insert}; SET application_name = 'dk'"
    )));
    emit(summary("implicit_two", c.until_ready()));
    // A procedure that commits runs the checks inside the CALL, itself unmasked.
    let mut batch = parse_msg("", insert);
    batch.extend(bind_msg("", ""));
    batch.extend(execute_msg(""));
    batch.extend(parse_msg("", "CALL commit_now()"));
    batch.extend(bind_msg("", ""));
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("call_commit", c.until_ready()));
    // Extended protocol: checked at the Sync that commits.
    let mut batch = parse_msg("", insert);
    batch.extend(bind_msg("", ""));
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("sync_commit", c.until_ready()));
}

/// What the agent gets for statements the gate refuses or answers itself, in pipelines: each
/// answer once, in order, as the server would send them.
fn raw_refused_in_pipeline(port: u16) {
    let flush = frame(b'H', &[]);
    let denied = "DROP TABLE customers";
    let mut c = Raw::connect(port);
    // A denied Parse in a pipeline: its error, nothing for the skipped Bind and Execute.
    let mut batch = parse_msg("", denied);
    batch.extend(bind_msg("", ""));
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("denied", c.until_ready()));
    // The server's own error first: the server skips the rest, the denial is not reported.
    let mut batch = bind_msg("", "nonexistent");
    batch.extend(parse_msg("", denied));
    batch.extend(bind_msg("", ""));
    batch.extend(execute_msg(""));
    batch.extend(sync_msg());
    c.send(&batch);
    emit(summary("server_error_first", c.until_ready()));
    // Allowed statements before the denied one, then Flush: the server answers what it ran and
    // the agent gets the denial's error without sending Sync.
    let mut batch = parse_msg("", "SELECT 1 AS n");
    batch.extend(bind_msg("", ""));
    batch.extend(execute_msg(""));
    batch.extend(parse_msg("", denied));
    batch.extend(bind_msg("", ""));
    batch.extend(execute_msg(""));
    batch.extend(&flush);
    c.send(&batch);
    emit(summary("flush_after_denial", c.until_tag(b'E')));
    c.send(&sync_msg());
    emit(summary("sync_after_flush", c.until_ready()));
    c.send(&query_msg("SELECT 2"));
    emit(summary("after", c.until_ready()));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let scenario = args.get(1).map(String::as_str).unwrap_or("");
    let port: u16 = args
        .get(2)
        .and_then(|p| p.parse().ok())
        .expect("usage: pg_client SCENARIO PORT [ARG]");
    let arg = args.get(3).cloned().unwrap_or_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match scenario {
        "masked" => rt.block_on(masked(port)),
        "functional_notation" => rt.block_on(functional_notation(port)),
        "pipeline" => rt.block_on(pipeline(port)),
        "denied_parse" => rt.block_on(denied_parse(port)),
        "transaction" => rt.block_on(transaction(port)),
        "cancel" => rt.block_on(cancel(port)),
        "held_tx" => rt.block_on(held_tx(port)),
        "held_cancel" => rt.block_on(held_cancel(port)),
        "raw_denied_name" => raw_denied_name(port),
        "raw_reparse" => raw_reparse(port),
        "raw_portal_pipeline" => raw_portal_pipeline(port),
        "raw_reparse_allowed" => raw_reparse_allowed(port),
        "raw_out_of_step" => raw_out_of_step(port),
        "raw_copy_sync" => raw_copy_sync(port),
        "raw_desync" => raw_desync(port),
        "raw_redeclared_cursor" => raw_redeclared_cursor(port),
        "raw_hangup" => raw_hangup(port, &arg),
        "raw_startup" => raw_startup(port),
        "raw_budget" => raw_budget(port, arg.parse().expect("size")),
        "raw_wide" => raw_wide(port),
        "raw_replace_unnamed" => raw_replace_unnamed(port, arg.parse().expect("size")),
        "raw_long_names" => raw_long_names(port),
        "raw_deferred" => raw_deferred(port),
        "raw_refused_in_pipeline" => raw_refused_in_pipeline(port),
        "raw_oversize" => raw_oversize(port, arg.parse().expect("size")),
        "raw_greeting" => raw_greeting(
            port,
            &std::env::var("PG_CLIENT_NEEDLE").expect("PG_CLIENT_NEEDLE"),
        ),
        other => panic!("unknown scenario {other:?}"),
    }
}
