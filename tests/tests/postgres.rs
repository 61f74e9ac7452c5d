//! PostgreSQL targets end to end: a real PostgreSQL 15 (SCRAM), a real daemon with real eBPF
//! hooks, and unmodified clients (psql, pgbench, psycopg 3, tokio-postgres, a raw wire client)
//! placed in governed cgroups. The clients connect to the server's own address with a wrong
//! password or none; the gate brokers the credentials, judges every statement with
//! `policies/postgres.yaml`, masks results and records everything.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)]

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use agentgate_tests::{
    EchoServer, Gate, HostAddress, Postgres, ensure_psycopg, psql_conn_args, psql_direct,
    psycopg_script, run, show, text, workspace_root,
};
use serde_json::Value;

/// The masking key handed to the daemon (the example policy names `AGENTGATE_MASK_KEY`).
const MASK_KEY: &str = "agentgate-e2e-masking-key-0123456789";
/// What a client sends as its password: never the real one.
const WRONG_PASSWORD: &str = "wrong-password";

const SCHEMA: &str = "
CREATE TABLE customers (id int PRIMARY KEY, name text, email text, card_number text, ssn text, note text);
INSERT INTO customers VALUES
  (1, 'Alice', 'alice@example.com', '4111111111111111', '123-45-6789', 'paid with 4111 1111 1111 1111'),
  (2, 'Bob', 'bob@example.org', '5500000000000004', '987-65-4321', 'order 4111 1111 1111 1112'),
  (3, 'Carol', 'carol@example.net', '378282246310005', '111-22-3333', 'no payment yet');
CREATE TABLE products (id int PRIMARY KEY, name text, price numeric(10,2), tags text[], created date,
                       data jsonb, blob bytea, active bool);
INSERT INTO products VALUES
  (1, 'widget', 9.99, '{small,blue}', '2024-01-02', '{\"color\": \"blue\", \"n\": 1}', '\\xdeadbeef', true),
  (2, 'gadget', 120.00, '{large}', '2023-12-31', '{\"color\": \"red\"}', NULL, false),
  (3, 'ünïcödé ✓', 0.50, '{}', NULL, NULL, '\\x', true),
  (4, 'tab\there', 1000000.01, NULL, '1999-09-09', '[1, 2, 3]', '\\x00ff', true);
CREATE TABLE secrets (id int PRIMARY KEY, value text);
INSERT INTO secrets VALUES (1, 'one'), (2, 'two'), (3, 'three');
CREATE TABLE t (id int PRIMARY KEY, v text);
INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c');
";

fn policy_text() -> String {
    std::fs::read_to_string(workspace_root().join("policies/postgres.yaml"))
        .expect("read policies/postgres.yaml")
}

/// Gate configuration: agents `bot` (analyst, enforced), `auditor` (shadow) and `recorder`
/// (analyst, relays unknown destinations as recorded TCP), one postgres target for the server
/// with brokered credentials, `extra` appended to the target.
fn config(pg: &Postgres, extra_target: &str) -> String {
    config_with_policy(pg, extra_target, &policy_text())
}

/// [`config`] with another policy file's text.
fn config_with_policy(pg: &Postgres, extra_target: &str, policy: &str) -> String {
    format!(
        "agents:
  - name: bot
    cgroup: {{base}}/bot
    roles: [analyst]
    targets: [db]
  - name: auditor
    cgroup: {{base}}/auditor
    roles: [auditor]
    targets: [db]
  - name: recorder
    cgroup: {{base}}/recorder
    roles: [analyst]
    targets: [db]
    unknown_destinations: record
targets:
  - name: db
    match: [\"127.0.0.1:{port}\"]
    protocol: postgres
    credentials: {{ user: postgres, password_file: {pw} }}
    record_rows: 10
{extra_target}
{policy}",
        port = pg.port,
        pw = pg.dir.join("pw").display(),
    )
}

/// A PostgreSQL with the test schema and a gate in front of it. Declared `(pg, gate)` so the
/// gate is dropped first.
fn start_with(extra_target: &str) -> (Postgres, Gate) {
    let pg = Postgres::start("scram-sha-256");
    pg.admin_sql(SCHEMA);
    let gate = Gate::start_with_env(
        &config(&pg, extra_target),
        &[("AGENTGATE_MASK_KEY", MASK_KEY)],
    );
    (pg, gate)
}

fn start() -> (Postgres, Gate) {
    start_with("")
}

/// psql through the gate as `agent` (wrong password), verbose errors (SQLSTATE shown).
fn gated_psql(gate: &Gate, pg: &Postgres, agent: &str, extra: &[&str], script: &str) -> Output {
    let mut args = vec!["-v", "VERBOSITY=verbose"];
    args.extend_from_slice(extra);
    gate.psql(agent, pg.port, Some(WRONG_PASSWORD), &args, script)
}

fn json_lines(o: &Output) -> Vec<Value> {
    text(&o.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}\n{}", show(o)))
        })
        .collect()
}

/// The line of a client's JSON output for `step`.
fn step<'a>(lines: &'a [Value], name: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["step"] == name)
        .unwrap_or_else(|| panic!("no step {name:?} in {lines:#?}"))
}

/// `pg_client SCENARIO PORT [ARG]` inside `agent`'s cgroup.
fn pg_client(gate: &Gate, pg: &Postgres, agent: &str, scenario: &str, arg: &str) -> Vec<Value> {
    let port = pg.port.to_string();
    let mut argv = vec![env!("CARGO_BIN_EXE_pg_client"), scenario, port.as_str()];
    if !arg.is_empty() {
        argv.push(arg);
    }
    let o = run(&mut gate.exec(agent, &argv));
    assert!(o.status.success(), "pg_client {scenario}: {}", show(&o));
    json_lines(&o)
}

/// `pg_psycopg.py PORT SCENARIO...` inside `agent`'s cgroup.
fn psycopg(gate: &Gate, pg: &Postgres, agent: &str, scenarios: &[&str]) -> Vec<Value> {
    ensure_psycopg();
    let script = psycopg_script();
    let port = pg.port.to_string();
    let mut argv = vec!["python3", script.to_str().unwrap(), port.as_str()];
    argv.extend_from_slice(scenarios);
    let o = run(&mut gate.exec(agent, &argv));
    assert!(
        o.status.success(),
        "pg_psycopg.py {scenarios:?}: {}",
        show(&o)
    );
    json_lines(&o)
}

/// Statements of every session that has ended (at least `n` sessions), oldest session first.
fn all_statements(gate: &Gate, n: usize) -> Vec<Value> {
    let mut sessions = gate.sessions_ended(n);
    sessions.reverse();
    sessions
        .iter()
        .filter(|s| !s["ended"].is_null())
        .flat_map(|s| {
            let id = s["id"].as_i64().unwrap().to_string();
            let v = gate.cli_json(&["sessions", "show", &id, "--json"]);
            v["statements"].as_array().cloned().unwrap_or_default()
        })
        .collect()
}

fn count(pg: &Postgres, sql: &str) -> i64 {
    pg.admin_sql(sql)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

fn table_exists(pg: &Postgres, name: &str) -> bool {
    pg.admin_sql(&format!("SELECT to_regclass('public.{name}') IS NOT NULL"))
        .trim()
        == "t"
}

fn occurrences(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

fn is_hash(s: &str) -> bool {
    s.len() == 18 && s.starts_with("h:") && s[2..].chars().all(|c| c.is_ascii_hexdigit())
}

// 1 ------------------------------------------------------------------------------------------

#[test]
fn psql_results_are_identical_to_a_direct_connection() {
    let (pg, gate) = start();
    let script = "\
SELECT * FROM products ORDER BY id;
SELECT name, price * 2 AS double, tags[1] AS first_tag FROM products WHERE active ORDER BY price DESC;
SELECT count(*), sum(price), avg(price)::numeric(12,3) FROM products;
SELECT p.name, t.v FROM products p JOIN t ON t.id = p.id ORDER BY 1;
SELECT g, g * g AS square, 'row ' || g AS label FROM generate_series(1, 3000) g;
SELECT data->>'color' AS color, data, blob, created FROM products ORDER BY id;
SELECT NULL::text AS n, ''::text AS e, E'two\\nlines' AS nl, 'ünïcödé ✓' AS u, 1.5::float8 AS f;
\\x on
SELECT * FROM products WHERE id = 1;
\\x off
\\pset format unaligned
SELECT id, name, price FROM products ORDER BY id;
\\pset format csv
SELECT * FROM t ORDER BY id;
";
    let args = ["-v", "ON_ERROR_STOP=1"];
    let direct = psql_direct(pg.port, Some(&pg.superuser_password), &args, script);
    assert!(direct.status.success(), "direct psql: {}", show(&direct));
    let gated = gate.psql("bot", pg.port, Some(WRONG_PASSWORD), &args, script);
    assert!(
        gated.status.success(),
        "psql through the gate: {}",
        show(&gated)
    );
    assert_eq!(
        text(&gated.stdout),
        text(&direct.stdout),
        "results through the gate differ from a direct connection"
    );
    assert_eq!(text(&gated.stderr), text(&direct.stderr));
    assert!(text(&gated.stdout).contains("(3000 rows)"));

    // Every statement was recorded as allowed, with its row count.
    let st = all_statements(&gate, 1);
    assert_eq!(st.len(), 10, "{st:#?}");
    assert!(
        st.iter()
            .all(|s| s["decision"] == "allow" && s["error"].is_null()),
        "{st:#?}"
    );
    assert_eq!(st[4]["rows"], 3000, "{:#?}", st[4]);
}

#[test]
fn psql_describe_meta_commands_work_through_the_gate() {
    // What an agent exploring a database does first: psql's catalog queries must be allowed
    // (they are plain SELECTs over pg_catalog) and answer exactly as directly.
    let (pg, gate) = start();
    let script = "\\dt\n\\d products\n\\dn\n\\df pg_sleep\n";
    let direct = psql_direct(pg.port, Some(&pg.superuser_password), &[], script);
    assert!(direct.status.success(), "direct psql: {}", show(&direct));
    let gated = gate.psql("bot", pg.port, Some(WRONG_PASSWORD), &[], script);
    assert_eq!(
        show(&gated),
        show(&direct),
        "psql meta-commands through the gate differ from a direct connection"
    );
}

// 2 ------------------------------------------------------------------------------------------

#[test]
fn ddl_is_denied_in_band_and_the_connection_stays_usable() {
    let (pg, gate) = start();
    let o = gated_psql(
        &gate,
        &pg,
        "bot",
        &["-A", "-t"],
        "DROP TABLE t;
SELECT 'still-usable';
CREATE TABLE evil (id int);
GRANT ALL ON t TO PUBLIC;
ALTER TABLE t ADD COLUMN x int;
SELECT count(*) FROM t;
",
    );
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(
        o.status.success(),
        "psql exits 0 without ON_ERROR_STOP: {}",
        show(&o)
    );
    assert_eq!(
        occurrences(
            &err,
            "ERROR:  42501: agentgate: denied by rule \"no-schema-changes\""
        ),
        4,
        "{}",
        show(&o)
    );
    assert!(
        err.contains("schema and privilege changes are not allowed"),
        "{err}"
    );
    assert_eq!(out, "still-usable\n3\n", "{}", show(&o));

    assert!(table_exists(&pg, "t"));
    assert!(!table_exists(&pg, "evil"));
    assert_eq!(
        count(
            &pg,
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 't'"
        ),
        2
    );
    assert_eq!(
        pg.admin_sql("SELECT relacl IS NULL FROM pg_class WHERE relname = 't'")
            .trim(),
        "t",
        "GRANT must not have run"
    );
}

// 3 ------------------------------------------------------------------------------------------

#[test]
fn denial_inside_an_explicit_transaction_aborts_it_like_a_server_error() {
    let (pg, gate) = start();
    let o = gated_psql(
        &gate,
        &pg,
        "bot",
        &["-A", "-t"],
        "BEGIN;
INSERT INTO t VALUES (100, 'in-tx');
DROP TABLE t;
SELECT 1;
ROLLBACK;
SELECT count(*) FROM t;
INSERT INTO t VALUES (101, 'autocommit');
SELECT v FROM t WHERE id = 101;
",
    );
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(
        err.contains("ERROR:  42501: agentgate: denied by rule \"no-schema-changes\""),
        "{}",
        show(&o)
    );
    assert!(
        err.contains("ERROR:  25P02: current transaction is aborted"),
        "the statement after the denial must fail as in an aborted transaction: {}",
        show(&o)
    );
    assert_eq!(occurrences(&err, "ERROR:"), 2, "{}", show(&o));
    assert_eq!(
        out,
        "BEGIN\nINSERT 0 1\nROLLBACK\n3\nINSERT 0 1\nautocommit\n",
        "{}",
        show(&o)
    );
    assert_eq!(
        count(&pg, "SELECT count(*) FROM t WHERE id = 100"),
        0,
        "the insert was rolled back"
    );
    assert_eq!(count(&pg, "SELECT count(*) FROM t WHERE id = 101"), 1);
}

// 4 ------------------------------------------------------------------------------------------

#[test]
fn a_multi_statement_query_with_one_denied_statement_is_denied_as_a_whole() {
    let (pg, gate) = start();
    // psql -c sends the whole string as one simple-protocol Query.
    let o = gated_psql(
        &gate,
        &pg,
        "bot",
        &["-c", "SELECT 'smuggled-marker'; DROP TABLE t"],
        "",
    );
    assert!(!o.status.success(), "{}", show(&o));
    assert!(
        !text(&o.stdout).contains("smuggled-marker"),
        "no result for the first statement: {}",
        show(&o)
    );
    assert!(text(&o.stderr).contains("42501"), "{}", show(&o));
    assert!(
        text(&o.stderr).contains("no-schema-changes"),
        "{}",
        show(&o)
    );
    assert!(table_exists(&pg, "t"));

    // An allowed write before the denied statement does not run either.
    let o = gated_psql(
        &gate,
        &pg,
        "bot",
        &[
            "-c",
            "INSERT INTO t VALUES (200, 'smuggled'); COMMIT; DROP TABLE t",
        ],
        "",
    );
    assert!(text(&o.stderr).contains("42501"), "{}", show(&o));
    assert_eq!(
        count(&pg, "SELECT count(*) FROM t WHERE id = 200"),
        0,
        "{}",
        show(&o)
    );
    assert!(table_exists(&pg, "t"));

    // psycopg sends a query without parameters as a simple Query too.
    let lines = psycopg(&gate, &pg, "bot", &["smuggle"]);
    let s = step(&lines, "smuggle");
    assert_eq!(s["ok"], false, "{lines:#?}");
    assert_eq!(s["code"], "42501", "{lines:#?}");
    assert_eq!(s["error"], "InsufficientPrivilege", "{lines:#?}");
    assert_eq!(
        step(&lines, "after")["rows"],
        serde_json::json!([[3]]),
        "{lines:#?}"
    );
    assert!(table_exists(&pg, "t"));

    // Each statement of a denied query is recorded, none ran.
    let st = all_statements(&gate, 3);
    let drops: Vec<&Value> = st
        .iter()
        .filter(|s| s["text"].as_str().unwrap_or("").contains("DROP TABLE t"))
        .collect();
    assert_eq!(drops.len(), 3, "{st:#?}");
    for d in drops {
        assert_eq!(d["decision"], "deny", "{d:#?}");
        assert_eq!(d["rule"], "no-schema-changes", "{d:#?}");
        assert!(d["command_tag"].is_null(), "{d:#?}");
    }
    let firsts: Vec<&Value> = st
        .iter()
        .filter(|s| s["text"].as_str().unwrap_or("").contains("smuggled"))
        .collect();
    assert!(!firsts.is_empty(), "{st:#?}");
    for f in firsts {
        assert!(
            f["command_tag"].is_null() && !f["error"].is_null(),
            "did not run: {f:#?}"
        );
    }
}

// 5 ------------------------------------------------------------------------------------------

#[test]
fn unbounded_writes_need_review_even_inside_a_cte() {
    let (pg, gate) = start();
    // Each unbounded write, in a CTE or not, with no WHERE or one naming no column, is held
    // for a human; here every ticket is denied.
    let script = "WITH d AS (DELETE FROM secrets RETURNING *) SELECT * FROM d;
DELETE FROM secrets;
UPDATE secrets SET value = 'pwned';
DELETE FROM secrets WHERE true;
UPDATE secrets SET value = 'pwned' WHERE 1 = 1;
WITH u AS (UPDATE secrets SET value = 'x' RETURNING id) SELECT count(*) FROM u;
SELECT count(*) FROM secrets;
WITH d AS (DELETE FROM secrets WHERE id = 1 RETURNING value) SELECT * FROM d;
";
    let mut argv = vec!["psql".to_string()];
    argv.extend(psql_conn_args(pg.port));
    argv.extend(["-A", "-t", "-v", "VERBOSITY=verbose"].map(String::from));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut psql = gate
        .exec("bot", &argv)
        .env("PGPASSWORD", WRONG_PASSWORD)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    psql.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let held = [
        "WITH d AS (DELETE FROM secrets RETURNING *)",
        "DELETE FROM secrets;",
        "UPDATE secrets SET value = 'pwned'",
        "DELETE FROM secrets WHERE true",
        "UPDATE secrets SET value = 'pwned' WHERE 1 = 1",
        "WITH u AS (UPDATE secrets SET value = 'x'",
    ];
    for statement in held {
        let ticket = agentgate_tests::wait_for(
            &format!("a ticket for {statement:?}"),
            Duration::from_secs(15),
            || {
                let v = gate.cli_json(&["approvals", "list", "--json"]);
                v.as_array()?.first().cloned()
            },
        );
        assert!(
            ticket["statement"].as_str().unwrap().starts_with(statement),
            "{ticket}"
        );
        assert_eq!(ticket["rule"], "unbounded-writes");
        let id = ticket["id"].as_u64().unwrap().to_string();
        let o = gate.cli(&["approvals", "deny", &id, "--reason", "needs a WHERE"]);
        assert!(o.status.success(), "{}", show(&o));
    }
    let o = psql.wait_with_output().unwrap();
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(
        occurrences(
            &err,
            "ERROR:  42501: agentgate: statement denied by approver unix:root: needs a WHERE"
        ),
        held.len(),
        "{}",
        show(&o)
    );
    assert_eq!(out, "3\none\n", "{}", show(&o));
    assert_eq!(count(&pg, "SELECT count(*) FROM secrets"), 2);
    assert_eq!(
        count(
            &pg,
            "SELECT count(*) FROM secrets WHERE value IN ('pwned', 'x')"
        ),
        0
    );

    let st = all_statements(&gate, 1);
    let reviewed: Vec<&Value> = st
        .iter()
        .filter(|s| s["rule"] == "unbounded-writes")
        .collect();
    assert_eq!(reviewed.len(), held.len(), "{st:#?}");
    assert!(
        reviewed
            .iter()
            .all(|s| s["decision"] == "deny"
                && s["message"].as_str().unwrap().contains("needs a WHERE")),
        "{reviewed:#?}"
    );
}

// 6 ------------------------------------------------------------------------------------------

#[test]
fn extended_protocol_with_tokio_postgres() {
    let (pg, gate) = start();

    // A denied Parse: error 42501, the connection is still usable, prepared statements run.
    let l = pg_client(&gate, &pg, "bot", "denied_parse", "");
    assert_eq!(step(&l, "prepare_drop")["code"], "42501", "{l:#?}");
    assert!(
        step(&l, "prepare_drop")["message"]
            .as_str()
            .unwrap()
            .contains("no-schema-changes"),
        "{l:#?}"
    );
    assert_eq!(
        step(&l, "after_1")["rows"],
        serde_json::json!([["3"]]),
        "{l:#?}"
    );
    assert_eq!(
        step(&l, "after_2")["rows"],
        serde_json::json!([["2"]]),
        "{l:#?}"
    );
    assert_eq!(step(&l, "truncate")["code"], "42501", "{l:#?}");
    assert_eq!(
        step(&l, "final")["rows"],
        serde_json::json!([["3"]]),
        "{l:#?}"
    );
    assert!(table_exists(&pg, "customers"));

    // A denied named statement never reaches the server: executing its name fails there.
    let l = pg_client(&gate, &pg, "bot", "raw_denied_name", "");
    let parse = step(&l, "parse_evil");
    assert_eq!(parse["errors"][0]["code"], "42501", "{l:#?}");
    assert_eq!(parse["status"], "I", "{l:#?}");
    let exec = step(&l, "execute_evil");
    assert_eq!(
        exec["errors"][0]["code"], "26000",
        "prepared statement does not exist: {l:#?}"
    );
    assert_eq!(exec["rows"], serde_json::json!([]), "{l:#?}");
    // Pipeline: SELECT 1 ran, the denied TRUNCATE skipped the rest up to Sync, the next batch ran.
    let first = step(&l, "pipeline_first");
    assert_eq!(first["rows"], serde_json::json!([["1"]]), "{l:#?}");
    assert_eq!(first["errors"].as_array().unwrap().len(), 1, "{l:#?}");
    assert_eq!(first["errors"][0]["code"], "42501", "{l:#?}");
    assert_eq!(first["tags"], "12DCEZ", "{l:#?}");
    let second = step(&l, "pipeline_second");
    assert_eq!(second["rows"], serde_json::json!([["3"]]), "{l:#?}");
    assert_eq!(second["tags"], "12DCZ", "{l:#?}");
    assert_eq!(count(&pg, "SELECT count(*) FROM customers"), 3);

    // A denied statement inside a transaction aborts it; ROLLBACK works; nothing was kept.
    let l = pg_client(&gate, &pg, "bot", "transaction", "");
    assert_eq!(step(&l, "begin")["ok"], true, "{l:#?}");
    assert_eq!(step(&l, "insert")["ok"], true, "{l:#?}");
    assert_eq!(step(&l, "drop")["code"], "42501", "{l:#?}");
    assert_eq!(step(&l, "after")["code"], "25P02", "{l:#?}");
    assert_eq!(step(&l, "rollback")["ok"], true, "{l:#?}");
    assert_eq!(
        step(&l, "outside")["rows"],
        serde_json::json!([["0"]]),
        "{l:#?}"
    );
    assert_eq!(count(&pg, "SELECT count(*) FROM t WHERE id = 500"), 0);
    assert!(table_exists(&pg, "t"));
}

// 7 ------------------------------------------------------------------------------------------

#[test]
fn copy_from_stdin_works_copy_to_stdout_is_refused_under_masking_and_copy_program_is_denied() {
    let (pg, gate) = start();
    let o = gated_psql(
        &gate,
        &pg,
        "bot",
        &[],
        "\\copy t FROM STDIN
10\tten
11\televen
\\.
COPY t FROM STDIN;
12\ttwelve
\\.
SELECT count(*) AS after_copy FROM t;
",
    );
    assert!(o.status.success(), "{}", show(&o));
    assert!(text(&o.stdout).contains("COPY 2"), "{}", show(&o));
    assert!(text(&o.stdout).contains("      6"), "{}", show(&o));
    assert!(text(&o.stderr).is_empty(), "{}", show(&o));
    assert_eq!(
        count(&pg, "SELECT count(*) FROM t WHERE id BETWEEN 10 AND 12"),
        3
    );

    // The analyst policy masks with `pii`: COPY ... TO STDOUT streams rows the gate cannot mask,
    // so the gate refuses it (flow.rs `unmaskable_copy`) and points at SELECT.
    let o = gated_psql(
        &gate,
        &pg,
        "bot",
        &[],
        "COPY t TO STDOUT;
\\copy customers TO STDOUT
COPY (SELECT email FROM customers) TO STDOUT;
SELECT 'after-copy' AS marker;
",
    );
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(
        occurrences(
            &err,
            "ERROR:  42501: agentgate: COPY ... TO STDOUT cannot be masked; use SELECT to read masked data"
        ),
        3,
        "{}",
        show(&o)
    );
    assert!(
        !out.contains("alice@example.com") && !out.contains("ten"),
        "{}",
        show(&o)
    );
    assert!(out.contains("after-copy"), "{}", show(&o));

    // Server-side programs and files.
    let o = gated_psql(
        &gate,
        &pg,
        "bot",
        &[],
        "COPY t TO PROGRAM 'id > /tmp/agentgate-e2e-copy-program';
COPY t FROM PROGRAM 'id';
COPY t FROM '/etc/passwd';
COPY t TO '/tmp/agentgate-e2e-copy-file';
",
    );
    let err = text(&o.stderr);
    assert_eq!(
        occurrences(
            &err,
            "ERROR:  42501: agentgate: denied by rule \"copy-program-or-file\""
        ),
        2,
        "{}",
        show(&o)
    );
    assert_eq!(
        occurrences(
            &err,
            "ERROR:  42501: agentgate: denied by rule \"copy-server-file\""
        ),
        2,
        "{}",
        show(&o)
    );
    assert!(!std::path::Path::new("/tmp/agentgate-e2e-copy-program").exists());
    assert!(!std::path::Path::new("/tmp/agentgate-e2e-copy-file").exists());
    assert_eq!(count(&pg, "SELECT count(*) FROM t"), 6);
}

// 8 ------------------------------------------------------------------------------------------

#[test]
fn cancel_requests_go_through_the_gate() {
    let (pg, gate) = start();

    // tokio-postgres: a cancel token sent from the governed process after ~1 s.
    let l = pg_client(&gate, &pg, "bot", "cancel", "");
    let sleep = step(&l, "sleep");
    assert_eq!(sleep["code"], "57014", "{l:#?}");
    let ms = sleep["ms"].as_u64().unwrap();
    assert!(
        (900..15_000).contains(&ms),
        "cancelled after {ms} ms: {l:#?}"
    );
    assert_eq!(step(&l, "cancel_sent")["ok"], true, "{l:#?}");
    assert_eq!(
        step(&l, "after")["rows"],
        serde_json::json!([["7"]]),
        "{l:#?}"
    );

    // psql: SIGINT makes it send a CancelRequest on a new connection.
    let mut argv: Vec<String> = ["timeout", "-s", "INT", "2", "psql"]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
    argv.extend(psql_conn_args(pg.port));
    argv.extend(
        ["-v", "VERBOSITY=verbose", "-c", "SELECT pg_sleep(30)"]
            .iter()
            .map(|s| (*s).to_string()),
    );
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let started = Instant::now();
    let o = run(gate.exec("bot", &argv).env("PGPASSWORD", WRONG_PASSWORD));
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "psql took {took:?}: {}",
        show(&o)
    );
    assert!(text(&o.stderr).contains("57014"), "{}", show(&o));
    assert!(
        text(&o.stderr).contains("canceling statement due to user request"),
        "{}",
        show(&o)
    );

    let ev = gate.wait_event("a forwarded cancel request", |e| {
        e["kind"] == "cancel_request" && e["detail"]["forwarded"] == true
    });
    assert_eq!(ev["agent"], "bot", "{ev}");
    assert_eq!(
        pg.admin_sql("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'")
            .trim(),
        "0"
    );
}

// 9 ------------------------------------------------------------------------------------------

#[test]
fn results_are_masked_in_text_and_binary_formats() {
    let (pg, gate) = start();
    let o = gated_psql(
        &gate,
        &pg,
        "bot",
        &["-A", "-t", "-F", "|"],
        "SELECT id, name, email, card_number, ssn, note FROM customers ORDER BY id;
SELECT card_number AS cn, ssn AS s FROM customers WHERE id = 1;
SELECT 'contact ' || email AS c FROM customers WHERE id = 2;
",
    );
    assert!(o.status.success(), "{}", show(&o));
    let out = text(&o.stdout);
    let lines: Vec<Vec<&str>> = out.lines().map(|l| l.split('|').collect()).collect();
    assert_eq!(lines.len(), 5, "{}", show(&o));
    let alice = &lines[0];
    assert_eq!(
        &alice[..4],
        &["1", "Alice", "[REDACTED:email]", "************1111"],
        "{out}"
    );
    assert!(is_hash(alice[4]), "ssn is hashed: {out}");
    assert_eq!(
        alice[5], "paid with [REDACTED:credit_card]",
        "Luhn-valid number in text: {out}"
    );
    let bob = &lines[1];
    assert_eq!(bob[3], "************0004", "{out}");
    assert_eq!(
        bob[5], "order 4111 1111 1111 1112",
        "Luhn-invalid number is kept: {out}"
    );
    assert_ne!(alice[4], bob[4], "different SSNs hash differently");
    assert_eq!(lines[2][3], "***********0005", "{out}");
    assert_eq!(
        lines[3],
        vec!["************1111", alice[4]],
        "an alias does not dodge a column rule: {out}"
    );
    assert_eq!(lines[4], vec!["contact [REDACTED:email]"], "{out}");
    for clear in [
        "alice@example.com",
        "bob@example.org",
        "4111111111111111",
        "123-45-6789",
        "4111 1111 1111 1111",
    ] {
        assert!(!out.contains(clear), "{clear} leaked: {out}");
    }

    // Binary results (tokio-postgres): the same masks, the same keyed hash.
    let l = pg_client(&gate, &pg, "bot", "masked", "");
    let bin = &step(&l, "binary")["rows"][0];
    assert_eq!(bin[0], "1", "{l:#?}");
    assert_eq!(bin[2], "[REDACTED:email]", "{l:#?}");
    assert_eq!(bin[3], "************1111", "{l:#?}");
    assert_eq!(
        bin[4], alice[4],
        "binary and text give the same hash: {l:#?}"
    );
    assert_eq!(bin[5], "paid with [REDACTED:credit_card]", "{l:#?}");
    let alias = &step(&l, "alias")["rows"][0];
    assert_eq!(alias[0], "************1111", "{l:#?}");
    assert_eq!(alias[1], alice[4], "{l:#?}");
    let txt = &step(&l, "text")["rows"][0];
    assert_eq!(txt[2], "[REDACTED:email]", "{l:#?}");
    assert_eq!(txt[3], "************1111", "{l:#?}");
    let notes = &step(&l, "notes")["rows"];
    assert_eq!(notes[1][1], "order 4111 1111 1111 1112", "{l:#?}");
    let all = serde_json::to_string(&l).unwrap();
    for clear in [
        "alice@example.com",
        "4111111111111111",
        "123-45-6789",
        "4111 1111 1111 1111",
    ] {
        assert!(
            !all.contains(clear),
            "{clear} leaked through the extended protocol: {l:#?}"
        );
    }
}

#[test]
fn a_denied_reparse_of_a_statement_name_does_not_unmask_the_old_statement() {
    // The server still holds the first `s` after the gate refused the second Parse of that name;
    // executing `s` runs the first (allowed, masked) SELECT, which must stay masked.
    let (pg, gate) = start();
    let l = pg_client(&gate, &pg, "bot", "raw_reparse", "");
    assert_eq!(step(&l, "parse_allowed")["ok"], true, "{l:#?}");
    assert_eq!(
        step(&l, "parse_denied_same_name")["errors"][0]["code"],
        "42501",
        "{l:#?}"
    );
    let exec = step(&l, "execute_s");
    assert!(table_exists(&pg, "customers"));
    // The execution is recorded like any other (text of `s`, its tag, masked rows).
    let st = all_statements(&gate, 1);
    let recorded: Vec<&Value> = st
        .iter()
        .filter(|s| s["command_tag"] == "SELECT 1")
        .collect();
    assert_eq!(
        (exec["rows"].clone(), recorded.len()),
        (
            serde_json::json!([["[REDACTED:email]", "************1111"]]),
            1
        ),
        "executing the surviving statement `s` must still be masked and recorded: {l:#?}\nrecorded: {st:#?}"
    );
}

#[test]
fn a_refused_reparse_of_a_statement_name_keeps_the_old_statement_recorded_and_masked() {
    // The gate must follow the server: a Parse of an existing name fails there (42P05) and `s`
    // stays the first SELECT. What runs is that SELECT: masked, and recorded with its own text.
    let (pg, gate) = start();
    let l = pg_client(&gate, &pg, "bot", "raw_reparse_allowed", "");
    assert_eq!(step(&l, "parse_first")["ok"], true, "{l:#?}");
    assert_eq!(
        step(&l, "parse_second")["errors"][0]["code"],
        "42P05",
        "{l:#?}"
    );
    let exec = step(&l, "execute_s");
    let st = all_statements(&gate, 1);
    let texts: Vec<&str> = st
        .iter()
        .filter(|s| s["command_tag"] == "SELECT 1")
        .filter_map(|s| s["text"].as_str())
        .collect();
    assert_eq!(
        (exec["closed"].clone(), exec["rows"].clone(), texts),
        (
            serde_json::json!(false),
            serde_json::json!([["[REDACTED:email]", "************1111"]]),
            vec!["SELECT email, card_number FROM customers WHERE id = 1"]
        ),
        "(connection closed, rows the agent got, recorded text): {l:#?}\nrecorded: {st:#?}"
    );
}

#[test]
fn an_execute_the_gate_cannot_tie_to_a_judged_statement_is_refused() {
    let (pg, gate) = start();
    let l = pg_client(&gate, &pg, "bot", "raw_out_of_step", "");
    assert_eq!(step(&l, "prepare")["ok"], true, "{l:#?}");
    let refused = step(&l, "unknown_portal_then_close");
    assert_eq!(refused["errors"][0]["code"], "42501", "{l:#?}");
    assert!(
        refused["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("portal \"nope\" is not bound to a statement the gate judged"),
        "{l:#?}"
    );
    // The Close after the refusal was skipped (as the server skips after an error): `s` is
    // still the judged SELECT, and its rows are masked.
    assert_eq!(
        step(&l, "execute_s")["rows"],
        serde_json::json!([["[REDACTED:email]", "************1111"]]),
        "{l:#?}"
    );
    // SQL PREPARE is not among what analysts may run; had it been, Execute of a portal bound
    // to `q` would be refused like `nope` (the gate never judged `q` at Parse).
    assert_eq!(
        step(&l, "sql_prepare")["errors"][0]["code"],
        "42501",
        "{l:#?}"
    );
    let q = step(&l, "execute_q");
    assert!(!q["errors"].as_array().unwrap().is_empty(), "{l:#?}");
    assert_eq!(q["rows"], serde_json::json!([]), "{l:#?}");
    assert_eq!(
        step(&l, "after")["rows"],
        serde_json::json!([["1"]]),
        "{l:#?}"
    );
    let refusals: Vec<Value> = all_statements(&gate, 1)
        .into_iter()
        .filter(|s| s["text"] == "<execute of an unknown portal>")
        .collect();
    // `nope`, then the unnamed portal bound to `q` (the server failed that Bind as well).
    assert_eq!(
        refusals.len(),
        2,
        "the refusals are recorded: {refusals:#?}"
    );
    assert!(
        refusals.iter().all(|s| s["decision"] == "deny"),
        "{refusals:#?}"
    );
}

#[test]
fn a_write_the_agent_hung_up_on_is_recorded_with_what_the_server_did() {
    // The agent sends an UPDATE and hangs up at once (with Terminate, or without): the server
    // runs and commits it. The record must say so, not that it failed.
    let (pg, gate) = start();
    for how in ["terminate", "close"] {
        pg.admin_sql("UPDATE t SET v = 'a' WHERE id = 1");
        let l = pg_client(&gate, &pg, "bot", "raw_hangup", how);
        assert_eq!(step(&l, "sent")["step"], "sent", "{l:#?}");
        agentgate_tests::wait_for("the write to commit", Duration::from_secs(10), || {
            (count(&pg, "SELECT count(*) FROM t WHERE v = 'changed-by-agent'") == 1).then_some(())
        });
    }
    let updates: Vec<Value> = all_statements(&gate, 2)
        .into_iter()
        .filter(|s| s["text"] == "UPDATE t SET v = 'changed-by-agent' WHERE id = 1")
        .collect();
    assert_eq!(updates.len(), 2, "{updates:#?}");
    for u in &updates {
        assert_eq!(u["command_tag"], "UPDATE 1", "{u:#}");
        assert!(u["error"].is_null(), "{u:#}");
    }
}

#[test]
fn a_fetch_is_masked_by_the_cursor_it_reads_when_bound_not_when_prepared() {
    // The server fixes a FETCH portal's columns at Bind, from whatever cursor has the name
    // then; masking by the columns seen at Parse (one int of `t`) passed every masked column in
    // clear, with or without a Describe of the portal once a plan had been cached.
    let (pg, gate) = start();
    let l = pg_client(&gate, &pg, "bot", "raw_redeclared_cursor", "");
    for s in [
        "declare_harmless",
        "prepare_fetch",
        "declare_masked",
        "declare_again",
        "rollback",
    ] {
        assert_eq!(step(&l, s)["ok"], true, "{s}: {l:#?}");
    }
    assert_eq!(
        step(&l, "fetch_harmless")["rows"],
        serde_json::json!([["1"], ["2"], ["3"]]),
        "{l:#?}"
    );
    for s in ["fetch_without_describe", "fetch_with_describe"] {
        let fetched = step(&l, s);
        assert_eq!(fetched["ok"], true, "{s}: {l:#?}");
        let row = fetched["rows"][0].as_array().cloned().unwrap_or_default();
        assert_eq!(row.len(), 5, "{s}: {l:#?}");
        let text = fetched["rows"].to_string();
        for secret in [
            "123-45-6789",
            "123456789",
            "4111111111111111",
            "alice@example.com",
        ] {
            assert!(!text.contains(secret), "{s} leaked {secret}: {l:#?}");
        }
        assert_eq!(row[0], "1", "{s}: {l:#?}");
    }
}

#[test]
fn results_after_an_extended_protocol_copy_are_still_masked() {
    let (pg, gate) = start();
    let l = pg_client(&gate, &pg, "bot", "raw_copy_sync", "");
    assert_eq!(step(&l, "copy_start")["closed"], false, "{l:#?}");
    assert_eq!(step(&l, "copy_done")["ok"], true, "{l:#?}");
    for s in ["email_1", "email_2"] {
        assert_eq!(
            step(&l, s)["rows"],
            serde_json::json!([["[REDACTED:email]"]]),
            "{s}: {l:#?}"
        );
    }
    assert_eq!(count(&pg, "SELECT count(*) FROM t WHERE id = 20"), 1);
}

#[test]
fn start_up_settings_that_change_how_statements_are_read_are_refused() {
    let (pg, gate) = start();
    let l = pg_client(&gate, &pg, "bot", "raw_startup", "");
    for (s, name) in [
        ("options", "options"),
        ("search_path", "search_path"),
        ("scs", "standard_conforming_strings"),
    ] {
        let r = step(&l, s);
        assert_eq!(r["errors"][0]["code"], "42501", "{s}: {l:#?}");
        assert!(
            r["errors"][0]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(&format!("start-up parameter `{name}` is not accepted")),
            "{s}: {l:#?}"
        );
    }
    // Asked for SJIS at start-up: the server speaks UTF8, as the gate reads statements.
    assert_eq!(
        step(&l, "encoding")["rows"],
        serde_json::json!([["UTF8"]]),
        "{l:#?}"
    );
    assert_eq!(
        step(&l, "set_encoding")["errors"][0]["code"],
        "42501",
        "{l:#?}"
    );
    assert_eq!(
        step(&l, "encoding_after")["rows"],
        serde_json::json!([["UTF8"]]),
        "{l:#?}"
    );
}

#[test]
fn tokio_postgres_pipelining_on_one_client() {
    // Several queries in flight on one connection (tokio-postgres pipelines them): the denied
    // one fails, the others answer in order, every result masked as when run alone.
    let (pg, gate) = start();
    let l = pg_client(&gate, &pg, "bot", "pipeline", "");
    assert_eq!(
        step(&l, "add")["rows"],
        serde_json::json!([["42"]]),
        "{l:#?}"
    );
    assert_eq!(step(&l, "drop")["code"], "42501", "{l:#?}");
    assert_eq!(
        step(&l, "count")["rows"],
        serde_json::json!([["3"]]),
        "{l:#?}"
    );
    assert!(table_exists(&pg, "customers"));
    assert_eq!(
        step(&l, "email")["rows"],
        serde_json::json!([["[REDACTED:email]"]]),
        "a pipelined SELECT of an email must be masked: {l:#?}"
    );
}

#[test]
fn pipelined_executes_on_the_unnamed_portal_are_masked_by_their_own_statement() {
    // Drivers pipeline Bind ""/Execute "" for several statements before reading any result.
    // The rows of the first Execute belong to the statement bound first, whatever was bound
    // to the unnamed portal afterwards.
    let (pg, gate) = start();
    let l = pg_client(&gate, &pg, "bot", "raw_portal_pipeline", "");
    assert_eq!(step(&l, "prepare")["ok"], true, "{l:#?}");
    let masked_row = serde_json::json!(["[REDACTED:email]", "************1111"]);
    let got = serde_json::json!([
        step(&l, "pipelined")["rows"],
        step(&l, "pipelined_syncs_1")["rows"],
        step(&l, "pipelined_syncs_2")["rows"],
    ]);
    assert_eq!(
        got,
        serde_json::json!([[masked_row, ["3"]], [masked_row], [["3"]]]),
        "rows of [one Sync for both, first of one Sync each, second of one Sync each]: {l:#?}"
    );
}

// 10 -----------------------------------------------------------------------------------------

#[test]
fn the_brokered_password_never_reaches_the_agent() {
    let (pg, gate) = start();
    let secret = pg.superuser_password.clone();
    let script = "\\conninfo
SELECT current_user, session_user;
SHOW password_encryption;
SELECT name, setting FROM pg_settings WHERE name LIKE '%password%' ORDER BY 1;
SELECT rolname, rolpassword FROM pg_authid WHERE rolname = 'postgres';
";
    // A wrong password and no password at all both work: the agent's identity is its cgroup.
    let wrong = gate.psql("bot", pg.port, Some(WRONG_PASSWORD), &["-A", "-t"], script);
    assert!(wrong.status.success(), "{}", show(&wrong));
    let none = gate.psql("bot", pg.port, None, &["-A", "-t"], script);
    assert!(none.status.success(), "{}", show(&none));
    assert!(
        text(&wrong.stdout).contains("postgres|postgres"),
        "{}",
        show(&wrong)
    );
    for o in [&wrong, &none] {
        assert!(
            !show(o).contains(&secret),
            "the password reached the client: {}",
            show(o)
        );
        // The SCRAM verifier is a secret too; it is only readable because the brokered role is a
        // superuser. Whatever the gate does with it, the password itself is not in it.
    }
    // Directly, the same wrong password is refused.
    let direct = psql_direct(pg.port, Some(WRONG_PASSWORD), &["-c", "SELECT 1"], "");
    assert!(!direct.status.success(), "{}", show(&direct));
    assert!(
        text(&direct.stderr).contains("password authentication failed"),
        "{}",
        show(&direct)
    );

    // Every byte the agent received during start-up and queries.
    let o = run(gate
        .exec(
            "bot",
            &[
                env!("CARGO_BIN_EXE_pg_client"),
                "raw_greeting",
                &pg.port.to_string(),
            ],
        )
        .env("PG_CLIENT_NEEDLE", &secret));
    assert!(o.status.success(), "{}", show(&o));
    let l = json_lines(&o);
    let needle = step(&l, "needle");
    assert_eq!(needle["found"], false, "{l:#?}");
    assert!(needle["received_bytes"].as_u64().unwrap() > 1000, "{l:#?}");

    let sessions = gate.sessions_ended(3);
    for s in &sessions {
        let id = s["id"].as_i64().unwrap().to_string();
        let shown = gate.cli(&["sessions", "show", &id, "--json"]);
        assert!(shown.status.success());
        assert!(
            !text(&shown.stdout).contains(&secret),
            "password in the session store"
        );
        let replay = gate.cli(&["sessions", "replay", &id]);
        assert!(
            !text(&replay.stdout).contains(&secret),
            "password in the replay"
        );
    }
    let events = gate.cli(&["events", "--json"]);
    assert!(
        !text(&events.stdout).contains(&secret),
        "password in the events"
    );
    let log = gate.log();
    assert!(!log.is_empty());
    assert!(!log.contains(&secret), "password in the daemon log:\n{log}");
    // The store's raw bytes too.
    for entry in walk(&gate.dir.join("state")) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "password in {}",
            entry.display()
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else if p.is_file() {
                out.push(p);
            }
        }
    }
    out
}

// 11 -----------------------------------------------------------------------------------------

#[test]
fn pgbench_runs_through_the_gate_in_simple_and_prepared_modes() {
    let (pg, gate) = start();
    let init = Command::new("pgbench")
        .args(["-i", "-q", "-s", "1", "-h"])
        .arg(&pg.dir)
        .args(["-p", &pg.port.to_string(), "-U", "postgres", "postgres"])
        .output()
        .expect("pgbench -i");
    assert!(init.status.success(), "pgbench -i: {}", show(&init));

    for mode in ["simple", "prepared"] {
        let mut argv: Vec<String> = [
            "pgbench", "-n", "-S", "-c", "4", "-j", "2", "-t", "250", "-M", mode,
        ]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
        argv.extend(
            psql_conn_args(pg.port)
                .into_iter()
                .filter(|a| a != "-X" && a != "-w" && a != "-d"),
        );
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let o = run(gate.exec("bot", &argv).env("PGPASSWORD", WRONG_PASSWORD));
        let out = text(&o.stdout);
        assert!(o.status.success(), "pgbench -M {mode}: {}", show(&o));
        assert!(
            out.contains("number of failed transactions: 0 "),
            "pgbench -M {mode}: {}",
            show(&o)
        );
        let processed: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|n| n.split('/').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no transaction count: {}", show(&o)));
        // A fixed number of transactions (not a duration): the check does not depend on speed.
        assert_eq!(
            processed,
            1000,
            "pgbench -M {mode} processed {processed}: {}",
            show(&o)
        );
    }
    // 4 clients per run, each its own recorded session.
    let sessions = gate.sessions_ended(8);
    let ended: Vec<&Value> = sessions.iter().filter(|s| !s["ended"].is_null()).collect();
    assert!(ended.len() >= 8, "{sessions:#?}");
    assert!(
        ended
            .iter()
            .all(|s| s["agent"] == "bot" && s["target"] == "db" && s["decision"] == "allow")
    );
    let id = ended[0]["id"].as_i64().unwrap().to_string();
    let v = gate.cli_json(&["sessions", "show", &id, "--json"]);
    let st = v["statements"].as_array().unwrap();
    assert!(
        st.iter().any(|s| s["text"]
            .as_str()
            .unwrap_or("")
            .contains("pgbench_accounts")
            && s["decision"] == "allow"),
        "{v:#}"
    );
}

// 12 -----------------------------------------------------------------------------------------

#[test]
fn psycopg3_through_the_gate() {
    let (pg, gate) = start();
    let l = psycopg(&gate, &pg, "bot", &["params", "denied"]);
    assert_eq!(
        step(&l, "int_param")["rows"],
        serde_json::json!([[42]]),
        "{l:#?}"
    );
    assert_eq!(
        step(&l, "text")["rows"],
        serde_json::json!([[1, "Alice", "[REDACTED:email]", "************1111"]]),
        "{l:#?}"
    );
    assert_eq!(
        step(&l, "binary")["rows"],
        serde_json::json!([[2, "Bob", "[REDACTED:email]", "************0004"]]),
        "{l:#?}"
    );
    assert_eq!(
        step(&l, "named")["rows"],
        serde_json::json!([["xy"]]),
        "{l:#?}"
    );

    assert_eq!(
        step(&l, "before")["rows"],
        serde_json::json!([[3]]),
        "{l:#?}"
    );
    let drop = step(&l, "drop");
    assert_eq!(drop["error"], "InsufficientPrivilege", "{l:#?}");
    assert_eq!(drop["code"], "42501", "{l:#?}");
    assert!(
        drop["message"]
            .as_str()
            .unwrap()
            .contains("no-schema-changes"),
        "{l:#?}"
    );
    assert_eq!(drop["status"], "INERROR", "{l:#?}");
    assert_eq!(step(&l, "in_failed_tx")["code"], "25P02", "{l:#?}");
    assert_eq!(
        step(&l, "after_rollback")["rows"],
        serde_json::json!([[3]]),
        "{l:#?}"
    );
    assert_eq!(
        step(&l, "committed")["rows"],
        serde_json::json!([["from-psycopg"]]),
        "{l:#?}"
    );
    assert_eq!(step(&l, "truncate_autocommit")["code"], "42501", "{l:#?}");
    assert_eq!(
        step(&l, "after_autocommit")["rows"],
        serde_json::json!([[4]]),
        "{l:#?}"
    );
    assert_eq!(count(&pg, "SELECT count(*) FROM t"), 4);
    assert!(table_exists(&pg, "t"));
}

// 13 -----------------------------------------------------------------------------------------

#[test]
fn shadow_mode_records_would_be_denials_without_enforcing_them() {
    let (pg, gate) = start();
    let o = gated_psql(
        &gate,
        &pg,
        "auditor",
        &["-A", "-t"],
        "DELETE FROM t WHERE id = 1;
SELECT count(*) FROM t;
",
    );
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(text(&o.stdout), "DELETE 1\n2\n", "{}", show(&o));
    assert!(text(&o.stderr).is_empty(), "{}", show(&o));
    assert_eq!(
        count(&pg, "SELECT count(*) FROM t WHERE id = 1"),
        0,
        "the delete ran"
    );

    let st = all_statements(&gate, 1);
    let del = st
        .iter()
        .find(|s| s["text"].as_str().unwrap_or("").starts_with("DELETE"))
        .unwrap_or_else(|| panic!("{st:#?}"));
    assert_eq!(del["decision"], "deny", "{del:#}");
    assert_eq!(del["enforced"], false, "{del:#}");
    assert_eq!(del["policy"], "auditors-shadow", "{del:#}");
    assert_eq!(del["command_tag"], "DELETE 1", "{del:#}");
    assert_eq!(del["rows"], 1, "{del:#}");
    let sel = st
        .iter()
        .find(|s| s["text"].as_str().unwrap_or("").starts_with("SELECT"))
        .unwrap();
    assert_eq!(sel["decision"], "allow", "{sel:#}");

    let id = gate.sessions_ended(1)[0]["id"]
        .as_i64()
        .unwrap()
        .to_string();
    let replay = text(&gate.cli(&["sessions", "replay", &id]).stdout);
    assert!(replay.contains("WOULD BE DENIED by rule"), "{replay}");
    assert!(replay.contains("(shadow mode)"), "{replay}");
}

// 14 -----------------------------------------------------------------------------------------

#[test]
fn dangerous_functions_and_opaque_statements_are_denied() {
    let (pg, gate) = start();
    let denied_functions = [
        "SELECT pg_read_file('/etc/passwd');",
        "SELECT lo_export(1234, '/tmp/agentgate-e2e-lo');",
        "SELECT lo_import('/etc/passwd');",
        "SELECT pg_terminate_backend(1);",
        "SELECT pg_catalog.pg_read_file('/etc/passwd');",
        "SELECT PG_READ_FILE('/etc/passwd');",
        "SELECT * FROM (SELECT pg_read_file('/etc/passwd') AS x) s;",
        "SELECT id FROM t WHERE id = length(pg_read_file('/etc/passwd'));",
        "SELECT pg_ls_dir('.');",
        "SELECT set_config('log_statement', 'none', false);",
        "SELECT pg_reload_conf();",
    ];
    let opaque = [
        "DO $$ BEGIN END $$;",
        "DO $$ BEGIN EXECUTE 'DROP TABLE t'; END $$;",
        "PREPARE p AS SELECT 1;\nEXECUTE p;",
    ];
    // A plain SELECT storing a value computed from a masked column where no masking rule can
    // name it, to be read back by the next statement.
    let large_objects = [
        "SELECT lo_from_bytea(424242, convert_to(translate(ssn, '0123456789', 'abcdefghij'), 'UTF8')) FROM customers WHERE id = 1;",
        "SELECT convert_from(lo_get(424242), 'UTF8') AS x;",
        "SELECT lo_create(424243);",
        "SELECT lowrite(lo_open(424243, 131072), convert_to(ssn, 'UTF8')) FROM customers WHERE id = 1;",
        "SELECT lo_put(424243, 0, '\\x00');",
        "SELECT pg_catalog.lo_unlink(424243);",
    ];
    let values_outside_tables = [
        "SELECT setval('agentgate_e2e_seq', translate(ssn, '-', '')::bigint) FROM customers WHERE id = 1;",
        "SELECT pg_notify('agentgate_e2e', ssn) FROM customers;",
        "SELECT pg_advisory_lock(translate(ssn, '-', '')::bigint) FROM customers WHERE id = 1;",
    ];
    pg.admin_sql("CREATE SEQUENCE agentgate_e2e_seq;");
    let mut script = denied_functions.join("\n");
    script.push('\n');
    script.push_str(&opaque.join("\n"));
    script.push('\n');
    script.push_str(&large_objects.join("\n"));
    script.push('\n');
    script.push_str(&values_outside_tables.join("\n"));
    script.push_str("\nSELECT 'still-here';\n");
    let o = gated_psql(&gate, &pg, "bot", &["-A", "-t"], &script);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(
        occurrences(
            &err,
            "ERROR:  42501: agentgate: denied by rule \"dangerous-functions\""
        ),
        denied_functions.len(),
        "{}",
        show(&o)
    );
    assert_eq!(
        occurrences(
            &err,
            "ERROR:  42501: agentgate: denied by rule \"large-objects\" of policy \"analysts\": \
             large objects can hold copies of masked values"
        ),
        large_objects.len(),
        "{}",
        show(&o)
    );
    assert_eq!(
        occurrences(
            &err,
            "ERROR:  42501: agentgate: denied by rule \"values-outside-tables\""
        ),
        values_outside_tables.len(),
        "{}",
        show(&o)
    );
    assert!(!out.contains("bcd-ef-ghij"), "{}", show(&o));
    assert_eq!(
        count(&pg, "SELECT count(*) FROM pg_largeobject_metadata"),
        0
    );
    assert_eq!(
        pg.admin_sql("SELECT last_value, is_called FROM agentgate_e2e_seq")
            .trim(),
        "1|f"
    );
    assert!(
        occurrences(
            &err,
            "ERROR:  42501: agentgate: denied by rule \"opaque-statements\""
        ) >= 3,
        "{}",
        show(&o)
    );
    assert!(!out.contains("root:"), "{}", show(&o));
    assert!(out.ends_with("still-here\n"), "{}", show(&o));
    assert!(!std::path::Path::new("/tmp/agentgate-e2e-lo").exists());
    assert!(table_exists(&pg, "t"));
    // Nothing terminated: the server's backends are all there.
    assert_eq!(
        count(
            &pg,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'checkpointer'"
        ),
        1
    );
    // NOTIFY (kind `other`) is no kind the example policy allows.
    let o = gated_psql(
        &gate,
        &pg,
        "bot",
        &[],
        "NOTIFY agentgate_e2e, '123-45-6789';\n",
    );
    assert!(
        text(&o.stderr).contains(
            "ERROR:  42501: agentgate: denied by rule \"default\" of policy \"analysts\": \
             not allowed for analysts"
        ),
        "{}",
        show(&o)
    );
}

#[test]
fn writes_to_system_catalogs_are_denied_as_schema_changes() {
    let (pg, gate) = start();
    pg.admin_sql("CREATE ROLE agentgate_e2e_plain NOLOGIN;");
    // With a superuser login these rename the masked column (its rule then names nothing) and
    // make a role a superuser; the example policy's `reads-and-writes` would allow them as
    // plain writes with a WHERE.
    let catalog_writes = [
        "UPDATE pg_catalog.pg_attribute SET attname = 'x_ssn' WHERE attrelid = 'customers'::regclass AND attname = 'ssn';",
        "UPDATE pg_authid SET rolsuper = true WHERE rolname = 'agentgate_e2e_plain';",
        "WITH r AS (UPDATE pg_class SET relname = 'clients' WHERE relname = 'customers' RETURNING oid) SELECT count(*) FROM r;",
    ];
    let mut script = catalog_writes.join("\n");
    script.push_str("\nSELECT 'still-here';\n");
    let o = gated_psql(&gate, &pg, "bot", &["-A", "-t"], &script);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(
        occurrences(
            &err,
            "ERROR:  42501: agentgate: denied by rule \"no-schema-changes\" of policy \
             \"analysts\": schema and privilege changes are not allowed"
        ),
        catalog_writes.len(),
        "{}",
        show(&o)
    );
    assert_eq!(out, "still-here\n", "{}", show(&o));
    // The server never ran them.
    assert_eq!(
        pg.admin_sql(
            "SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute \
             WHERE attrelid = 'customers'::regclass AND attnum > 0"
        )
        .trim(),
        "id,name,email,card_number,ssn,note"
    );
    assert_eq!(
        pg.admin_sql("SELECT rolsuper FROM pg_authid WHERE rolname = 'agentgate_e2e_plain'")
            .trim(),
        "f"
    );
    assert!(table_exists(&pg, "customers"));
}

// 15 -----------------------------------------------------------------------------------------

#[test]
fn statements_are_recorded_in_order_with_their_outcome_and_masked_rows() {
    let (pg, gate) = start();
    let o = gated_psql(
        &gate,
        &pg,
        "bot",
        &[],
        "SELECT id, email, card_number FROM customers ORDER BY id;
DROP TABLE customers;
INSERT INTO t VALUES (7, 'seven');
SELECT 1/0;
SELECT count(*) FROM t;
",
    );
    assert!(text(&o.stdout).contains("[REDACTED:email]"), "{}", show(&o));
    let sessions = gate.sessions_ended(1);
    assert_eq!(sessions.len(), 1);
    let id = sessions[0]["id"].as_i64().unwrap().to_string();
    let v = gate.cli_json(&["sessions", "show", &id, "--json"]);
    assert_eq!(v["session"]["agent"], "bot", "{v:#}");
    let st = v["statements"].as_array().unwrap();
    assert_eq!(st.len(), 5, "{v:#}");
    let texts: Vec<&str> = st
        .iter()
        .map(|s| s["text"].as_str().unwrap().trim_end_matches(';').trim())
        .collect();
    assert_eq!(
        texts,
        [
            "SELECT id, email, card_number FROM customers ORDER BY id",
            "DROP TABLE customers",
            "INSERT INTO t VALUES (7, 'seven')",
            // Recorded as the agent wrote each statement of the query string.
            "SELECT 1/0",
            "SELECT count(*) FROM t"
        ],
        "{v:#}"
    );
    let ids: Vec<i64> = st.iter().map(|s| s["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");

    let sel = &st[0];
    assert_eq!(sel["protocol"], "simple");
    assert_eq!(sel["kind"], "select", "{sel:#}");
    assert_eq!(
        sel["tables"],
        serde_json::json!(["customers (read)"]),
        "{sel:#}"
    );
    assert_eq!(sel["decision"], "allow");
    assert_eq!(sel["enforced"], true);
    assert_eq!(sel["policy"], "analysts");
    assert_eq!(sel["rule"], "reads-and-writes");
    assert_eq!(sel["rows"], 3);
    assert_eq!(sel["command_tag"], "SELECT 3");
    assert!(sel["duration_us"].as_i64().unwrap() > 0, "{sel:#}");
    assert!(sel["error"].is_null());
    assert_eq!(sel["masked"], true);
    assert_eq!(
        sel["columns"],
        serde_json::json!(["id", "email", "card_number"]),
        "{sel:#}"
    );
    assert_eq!(
        sel["result_rows"][0],
        serde_json::json!(["1", "[REDACTED:email]", "************1111"]),
        "rows are stored as the agent saw them: {sel:#}"
    );
    let stored = serde_json::to_string(&v).unwrap();
    assert!(
        !stored.contains("alice@example.com") && !stored.contains("4111111111111111"),
        "{v:#}"
    );

    let drop = &st[1];
    assert_eq!(drop["kind"], "ddl", "{drop:#}");
    assert_eq!(drop["decision"], "deny");
    assert_eq!(drop["rule"], "no-schema-changes");
    assert_eq!(
        drop["message"], "schema and privilege changes are not allowed",
        "{drop:#}"
    );
    assert!(
        drop["error"].as_str().unwrap().contains("denied by rule"),
        "{drop:#}"
    );
    assert!(drop["command_tag"].is_null());

    assert_eq!(st[2]["kind"], "insert", "{:#}", st[2]);
    assert_eq!(st[2]["command_tag"], "INSERT 0 1");
    assert_eq!(st[2]["rows"], 1);
    assert_eq!(st[3]["decision"], "allow");
    assert_eq!(st[3]["error"], "division by zero", "{:#}", st[3]);
    assert_eq!(
        st[4]["result_rows"],
        serde_json::json!([["4"]]),
        "{:#}",
        st[4]
    );

    let replay = gate.cli(&["sessions", "replay", &id]);
    assert!(replay.status.success());
    let r = text(&replay.stdout);
    assert!(
        r.contains("bot=> SELECT id, email, card_number FROM customers ORDER BY id;"),
        "{r}"
    );
    assert!(
        r.contains("bot=> DROP TABLE customers;\nDENIED by rule \"no-schema-changes\""),
        "{r}"
    );
    assert!(r.contains("[REDACTED:email]"), "{r}");
    assert!(r.contains("ERROR:  division by zero"), "{r}");
    assert!(r.contains("INSERT 0 1"), "{r}");
    assert!(!r.contains("alice@example.com"), "{r}");
    let pos = |needle: &str| {
        r.find(needle)
            .unwrap_or_else(|| panic!("{needle} not in {r}"))
    };
    assert!(
        pos("DROP TABLE customers") < pos("INSERT INTO t")
            && pos("INSERT INTO t") < pos("SELECT 1/0")
    );
}

// 16 -----------------------------------------------------------------------------------------

#[test]
fn a_frame_larger_than_max_frame_bytes_closes_the_connection_and_runs_nothing() {
    let (pg, gate) = start_with("    max_frame_bytes: 65536\n");
    let l = pg_client(&gate, &pg, "bot", "raw_oversize", "100000");
    assert_eq!(
        step(&l, "before")["rows"],
        serde_json::json!([["1"]]),
        "{l:#?}"
    );
    let big = step(&l, "oversized");
    assert_eq!(big["closed"], true, "the connection must be closed: {l:#?}");
    assert!(big["rows"].as_array().unwrap().is_empty(), "{l:#?}");
    // Refused with an error the agent can read, as the server refuses a malformed message.
    assert_eq!(big["errors"][0]["code"], "08P01", "{l:#?}");
    let message = big["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("exceeds the limit"), "{message}");
    assert_eq!(
        count(&pg, "SELECT count(*) FROM t WHERE id = 900"),
        0,
        "nothing executed"
    );
    // The session ends with the decoder's error.
    let sessions = gate.sessions_ended(1);
    let err = sessions[0]["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("exceeds the limit of 65536 bytes"),
        "{sessions:#?}"
    );

    // Below the limit, a large query works.
    let pad = "x".repeat(60_000);
    let o = gated_psql(
        &gate,
        &pg,
        "bot",
        &["-A", "-t", "-c", &format!("SELECT 'fits' -- {pad}")],
        "",
    );
    assert_eq!(text(&o.stdout), "fits\n", "{}", show(&o));
}

#[test]
fn the_gates_view_of_names_and_responses_cannot_be_parted_from_the_servers() {
    let (pg, gate) = start();
    let l = pg_client(&gate, &pg, "bot", "raw_desync", "");
    let masked_row = serde_json::json!([["[REDACTED:email]", "************1111"]]);
    // 1. The Parse and Query sent after the server's error were skipped by the server: `s` is
    //    still the masked SELECT.
    assert_eq!(
        step(&l, "bind_error")["errors"].as_array().unwrap().len(),
        1,
        "{l:#?}"
    );
    assert_eq!(step(&l, "skipped_reparse")["tags"], "Z", "{l:#?}");
    assert_eq!(step(&l, "execute_s")["rows"], masked_row, "{l:#?}");
    // 3. The portal `c` ended with its transaction; the SQL cursor `c` is not the gate's.
    assert_eq!(step(&l, "declare_c")["ok"], true, "{l:#?}");
    let c = step(&l, "execute_c");
    assert_eq!(c["rows"], serde_json::json!([]), "{l:#?}");
    assert_eq!(c["errors"][0]["code"], "42501", "{l:#?}");
    // 4. The Sync inside the COPY data is not waited for: the next results keep their masks.
    assert_eq!(step(&l, "copy_done")["ok"], true, "{l:#?}");
    assert_eq!(step(&l, "empty")["ok"], true, "{l:#?}");
    assert_eq!(step(&l, "masked_after_copy")["rows"], masked_row, "{l:#?}");
    // 6. The Sync after a failed COPY is answered on its own; `s` is still masked.
    assert_eq!(
        step(&l, "copy_error")["errors"].as_array().unwrap().len(),
        1,
        "{l:#?}"
    );
    assert_eq!(step(&l, "stray_sync")["tags"], "Z", "{l:#?}");
    assert_eq!(
        step(&l, "masked_after_copy_error")["rows"],
        masked_row,
        "{l:#?}"
    );
    // 7. The cursor declared through Parse is not the portal it replaced.
    for s in [
        "prepare_cursor_statements",
        "bind_c2",
        "close_c2",
        "declare_c2",
    ] {
        assert_eq!(step(&l, s)["ok"], true, "{s}: {l:#?}");
    }
    let c2 = step(&l, "execute_c2");
    assert_eq!(c2["rows"], serde_json::json!([]), "{l:#?}");
    assert_eq!(c2["errors"][0]["code"], "42501", "{l:#?}");
    // 8. Both Syncs sent before CopyInResponse were ignored by the server, and by the gate.
    assert_eq!(step(&l, "copy_two_syncs_done")["ok"], true, "{l:#?}");
    assert_eq!(
        step(&l, "no_rows")["errors"].as_array().unwrap().len(),
        1,
        "{l:#?}"
    );
    assert_eq!(
        step(&l, "masked_after_two_syncs")["rows"],
        masked_row,
        "{l:#?}"
    );
    // 9. Streamed COPY data arrives.
    assert_eq!(step(&l, "copy_streamed")["ok"], true, "{l:#?}");
    assert_eq!(
        step(&l, "streamed_row")["rows"],
        serde_json::json!([["w"]]),
        "{l:#?}"
    );
    // 5. The server's message would quote the value; it is withheld, the SQLSTATE kept.
    for (name, secret, code) in [
        ("cast_ssn", "123-45-6789", "22P02"),
        ("cast_email", "alice@example.com", "22007"),
        ("ssn_as_name", "123-45-6789", "42P01"),
    ] {
        let e = &step(&l, name)["errors"][0];
        assert_eq!(e["code"], code, "{l:#?}");
        let message = e["message"].as_str().unwrap();
        assert!(
            !message.contains(secret) && message.contains("withheld"),
            "{l:#?}"
        );
    }
    assert_eq!(
        step(&l, "after")["rows"],
        serde_json::json!([["1"]]),
        "{l:#?}"
    );
    // Nor does the record hold the value.
    let statements = all_statements(&gate, 1);
    let shown = serde_json::to_string(&statements).unwrap();
    assert!(
        !shown.contains("123-45-6789") && !shown.contains("alice@example.com"),
        "{shown}"
    );
}

#[test]
fn a_connection_cannot_make_the_gate_keep_more_than_max_kept_bytes() {
    // 300 KiB for what one connection keeps: statements of ~40 KB (each costs twice its text
    // and a little more) fit three at a time.
    let (pg, gate) = start_with("    max_frame_bytes: 65536\n    max_kept_bytes: 307200\n");
    let l = pg_client(&gate, &pg, "bot", "raw_budget", "40000");
    let kept = step(&l, "kept")["count"].as_i64().unwrap();
    assert_eq!(kept, 3, "{l:#?}");
    let refused = step(&l, "refused");
    assert_ne!(refused["never"], true, "no Parse was ever refused: {l:#?}");
    assert_eq!(refused["errors"].as_array().unwrap().len(), 1, "{l:#?}");
    assert_eq!(refused["errors"][0]["code"], "54000", "{l:#?}");
    assert!(
        refused["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("max_kept_bytes"),
        "{l:#?}"
    );
    // The refused Parse was not sent, its Bind and Execute skipped, and the transaction
    // aborted as a server error would have left it.
    assert_eq!(refused["tags"], "EZ", "{l:#?}");
    assert_eq!(refused["status"], "E", "{l:#?}");
    assert_eq!(step(&l, "rollback")["status"], "I", "{l:#?}");
    assert_eq!(step(&l, "refused_name")["ok"], false, "{l:#?}");
    // Closed names give their bytes back.
    assert_eq!(step(&l, "close")["ok"], true, "{l:#?}");
    assert_eq!(
        step(&l, "again")["rows"],
        serde_json::json!([["7"]]),
        "{l:#?}"
    );
    assert_eq!(
        step(&l, "big2")["rows"],
        serde_json::json!([["2"]]),
        "{l:#?}"
    );
}

#[test]
fn an_unnamed_statement_replacing_the_last_is_not_charged_twice_against_max_kept_bytes() {
    // Statements of ~60 KB cost ~120 KB: a named one and an unnamed one fit in 300 KiB, and
    // the next unnamed Parse replaces the unnamed one (counted once, not on top of it).
    let (pg, gate) = start_with("    max_frame_bytes: 65536\n    max_kept_bytes: 307200\n");
    let l = pg_client(&gate, &pg, "bot", "raw_replace_unnamed", "60000");
    assert_eq!(step(&l, "keep")["ok"], true, "{l:#?}");
    for i in 0..3 {
        let r = step(&l, &format!("unnamed{i}"));
        assert_eq!(r["rows"], serde_json::json!([[i.to_string()]]), "{l:#?}");
    }
}

#[test]
fn result_columns_past_max_kept_bytes_end_the_connection() {
    // 1600 columns cost ~80 KB a portal: a few fit in 256 KiB, the Describe of the next ends
    // the connection instead of keeping them beyond the budget.
    let (pg, gate) = start_with("    max_frame_bytes: 65536\n    max_kept_bytes: 262144\n");
    pg.admin_sql(
        "DO $$BEGIN EXECUTE (SELECT 'CREATE TABLE wide (' || string_agg('c' || i || ' int', ', ') || ')' FROM generate_series(1, 1600) i); END$$;",
    );
    let l = pg_client(&gate, &pg, "bot", "raw_wide", "");
    assert_eq!(step(&l, "wide0")["ok"], true, "{l:#?}");
    assert_eq!(step(&l, "wide1")["ok"], true, "{l:#?}");
    let last = l.last().unwrap();
    assert_eq!(
        last["closed"], true,
        "the budget never ended the connection: {l:#?}"
    );
    assert!(l.len() < 10, "{l:#?}");
    // The agent is told why, as the server tells of a limit.
    assert_eq!(last["errors"][0]["code"], "54000", "{l:#?}");
    let message = last["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("max_kept_bytes"), "{message}");
}

#[test]
fn a_query_of_more_than_max_statements_per_query_statements_is_refused_and_runs_nothing() {
    // The gate parses, judges and records every statement of a query before sending it: a
    // frame of tiny statements would make it hold far more than the frame, and a long text
    // a syntax tree far larger than the text.
    let (pg, gate) = start_with("    max_statements_per_query: 5\n    max_query_bytes: 1024\n");
    let l = psycopg(&gate, &pg, "bot", &["statements"]);
    let over = step(&l, "over");
    assert_eq!(over["ok"], false, "{l:#?}");
    assert_eq!(over["code"], "54000", "{l:#?}");
    assert!(
        over["message"]
            .as_str()
            .unwrap()
            .contains("max_statements_per_query (5)"),
        "{l:#?}"
    );
    assert_eq!(
        count(&pg, "SELECT count(*) FROM t WHERE id = 400"),
        0,
        "nothing of the refused query ran"
    );
    // The connection goes on, and a query at the limit runs.
    assert_eq!(
        step(&l, "after")["rows"],
        serde_json::json!([[3]]),
        "{l:#?}"
    );
    // (psycopg reports the first statement's result.)
    assert_eq!(step(&l, "at")["statusmessage"], "INSERT 0 1", "{l:#?}");
    assert_eq!(count(&pg, "SELECT count(*) FROM t WHERE id = 401"), 1);
    // A prepared statement holds one statement: the gate refuses more (the server would too),
    // and more than the limit before parsing them.
    let two = step(&l, "prepared_two");
    assert_eq!(two["ok"], false, "{l:#?}");
    assert_eq!(two["code"], "42501", "{l:#?}");
    assert!(
        two["message"].as_str().unwrap().contains("holds 2"),
        "{l:#?}"
    );
    assert_eq!(step(&l, "prepared_over")["code"], "54000", "{l:#?}");
    assert_eq!(
        step(&l, "prepared_one")["rows"],
        serde_json::json!([[1]]),
        "{l:#?}"
    );
    // A text longer than max_query_bytes is not parsed at all; the same value as a
    // parameter (never parsed) goes through.
    let long = step(&l, "long");
    assert_eq!(long["code"], "54000", "{l:#?}");
    assert!(
        long["message"]
            .as_str()
            .unwrap()
            .contains("longer than max_query_bytes (1024)"),
        "{l:#?}"
    );
    assert_eq!(count(&pg, "SELECT count(*) FROM t WHERE id = 402"), 0);
    assert_eq!(step(&l, "long_param")["ok"], true, "{l:#?}");
    assert_eq!(count(&pg, "SELECT count(*) FROM t WHERE id = 403"), 1);
    // The refusal is recorded like any other, with the query's text.
    let st = all_statements(&gate, 1);
    let refused: Vec<&Value> = st
        .iter()
        .filter(|s| {
            s["error"]
                .as_str()
                .is_some_and(|e| e.contains("max_statements_per_query"))
        })
        .collect();
    assert_eq!(refused.len(), 2, "{st:#?}");
    assert_eq!(refused[0]["decision"], "deny", "{st:#?}");
    assert!(
        refused[0]["text"]
            .as_str()
            .unwrap()
            .starts_with("INSERT INTO t VALUES (400"),
        "{st:#?}"
    );
}

#[test]
fn names_equal_in_their_first_63_bytes_are_one_name_for_the_gate_as_for_the_server() {
    let (pg, gate) = start();
    let l = pg_client(&gate, &pg, "bot", "raw_long_names", "");
    let masked_row = serde_json::json!([["[REDACTED:email]", "************1111"]]);
    assert_eq!(step(&l, "parse_x")["ok"], true, "{l:#?}");
    // The server ran `...X` when asked for `...Y` (it compares 63 bytes), through portal
    // names that differ after 63 bytes too; the gate masked it as `...X`.
    assert_eq!(step(&l, "execute_y")["rows"], masked_row, "{l:#?}");
    assert_eq!(step(&l, "execute_y")["ok"], true, "{l:#?}");
    assert_eq!(step(&l, "close_z")["ok"], true, "{l:#?}");
    let closed = step(&l, "execute_closed");
    assert_eq!(closed["rows"], serde_json::json!([]), "{l:#?}");
    assert_eq!(closed["errors"].as_array().unwrap().len(), 1, "{l:#?}");
    // Cut inside a character, as the server cuts.
    assert_eq!(step(&l, "execute_cut")["rows"], masked_row, "{l:#?}");
    let reparse = step(&l, "reparse_cut");
    assert_eq!(reparse["errors"][0]["code"], "42P05", "{l:#?}");
    assert_eq!(step(&l, "execute_cut_again")["rows"], masked_row, "{l:#?}");
}

#[test]
fn errors_of_deferred_constraints_of_a_transaction_with_masked_statements_are_withheld() {
    // Masks attached by rule, not by policy: COMMIT, SET and CALL are allowed by a rule without
    // masks, so their own errors were passed on. (With the example policy's policy-level
    // `mask:` COMMIT is masked itself; the Sync that commits an extended-protocol transaction
    // still carried the server's message.)
    let policy = policy_text()
        .replacen(
            "    mask: [pii]\n    rules:\n",
            "    rules:\n      - name: transaction-control\n        match: { kinds: [transaction, set, call] }\n        action: allow\n",
            1,
        )
        .replacen(
            "        match: { kinds: [select, insert, update, delete, copy, transaction, set] }\n        action: allow\n",
            "        match: { kinds: [select, insert, update, delete, copy, transaction, set] }\n        action: allow\n        mask: [pii]\n",
            1,
        );
    assert_eq!(occurrences(&policy, "transaction-control"), 1);
    assert_eq!(occurrences(&policy, "        mask: [pii]\n"), 1);
    let pg = Postgres::start("scram-sha-256");
    pg.admin_sql(SCHEMA);
    // The value the masked INSERT copies from customers.ssn is already there: the deferred
    // unique check fails when the transaction commits, and the server's DETAIL reads
    // `Key (ssn)=(123-45-6789) already exists.`
    pg.admin_sql(
        "CREATE TABLE dk (id int, ssn text UNIQUE DEFERRABLE INITIALLY DEFERRED);
         INSERT INTO dk VALUES (1, '123-45-6789');
         CREATE PROCEDURE commit_now() LANGUAGE plpgsql AS $$BEGIN COMMIT; END$$;",
    );
    let gate = Gate::start_with_env(
        &config_with_policy(&pg, "", &policy),
        &[("AGENTGATE_MASK_KEY", MASK_KEY)],
    );
    let l = pg_client(&gate, &pg, "bot", "raw_deferred", "");
    assert_eq!(step(&l, "insert")["ok"], true, "{l:#?}");
    // `SET CONSTRAINTS ALL IMMEDIATE` (known by its shape, allowed as `set`) checks them at
    // once: its error is withheld as well.
    for name in [
        "immediate",
        "commit",
        "implicit",
        "implicit_two",
        "sync_commit",
        "call_commit",
    ] {
        let e = &step(&l, name)["errors"];
        assert_eq!(e.as_array().unwrap().len(), 1, "{name}: {l:#?}");
        assert_eq!(e[0]["code"], "23505", "{name}: {l:#?}");
        let shown = e.to_string();
        assert!(
            !shown.contains("123-45-6789") && shown.contains("withheld"),
            "{name}: the key value read by the masked INSERT must not reach the agent: {l:#?}"
        );
    }
    assert_eq!(step(&l, "commit")["status"], "I", "{l:#?}");
    assert_eq!(count(&pg, "SELECT count(*) FROM dk"), 1);
    // Nor does the record hold it.
    let statements = all_statements(&gate, 1);
    let shown = serde_json::to_string(&statements).unwrap();
    assert!(!shown.contains("123-45-6789"), "{shown}");
}

#[test]
fn answers_the_gate_makes_for_refused_messages_come_once_and_in_order() {
    let (pg, gate) = start();
    let l = pg_client(&gate, &pg, "bot", "raw_refused_in_pipeline", "");
    let denied = step(&l, "denied");
    assert_eq!(denied["tags"], "EZ", "{l:#?}");
    assert_eq!(denied["errors"][0]["code"], "42501", "{l:#?}");
    // The server's error is the only one: the denied Parse after it was skipped.
    let first = step(&l, "server_error_first");
    assert_eq!(first["tags"], "EZ", "{l:#?}");
    assert_eq!(first["errors"][0]["code"], "26000", "{l:#?}");
    // A Flush after a denied message still reaches the server: the allowed statement's
    // answers, then the denial, without waiting for Sync.
    let flushed = step(&l, "flush_after_denial");
    assert_eq!(flushed["closed"], false, "{l:#?}");
    assert_eq!(flushed["tags"], "12DCE", "{l:#?}");
    assert_eq!(flushed["errors"][0]["code"], "42501", "{l:#?}");
    assert_eq!(step(&l, "sync_after_flush")["tags"], "Z", "{l:#?}");
    assert_eq!(
        step(&l, "after")["rows"],
        serde_json::json!([["2"]]),
        "{l:#?}"
    );
}

#[test]
fn statements_wait_for_a_stalled_session_store_and_are_all_recorded_once_it_resumes() {
    // A queue of 5 records: once the writer cannot write, the sixth statement or so waits.
    let pg = Postgres::start("scram-sha-256");
    pg.admin_sql(SCHEMA);
    let body = format!("{}\nsessions:\n  max_queued: 5\n", config(&pg, ""));
    let gate = Gate::start_with_env(&body, &[("AGENTGATE_MASK_KEY", MASK_KEY)]);
    const N: i64 = 40;
    // Another connection holds the write lock, for longer than the store's busy timeout (5 s).
    let db = gate.dir.join("state/sessions.db");
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let locked = Instant::now();
    // Each line is a Query message of its own.
    let script: String = (0..N)
        .map(|i| format!("INSERT INTO t VALUES ({}, 'stall');\n", 100 + i))
        .collect();
    let mut argv = vec!["psql".to_string()];
    argv.extend(psql_conn_args(pg.port));
    argv.extend(["-v", "ON_ERROR_STOP=1"].map(String::from));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut child = gate
        .exec("bot", &argv)
        .env("PGPASSFILE", "/nonexistent")
        .env("PGPASSWORD", WRONG_PASSWORD)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(script.as_bytes()).unwrap();
    }
    let inserted = || count(&pg, "SELECT count(*) FROM t WHERE v = 'stall'");
    // The statements stop: the store's queue is full and the gate stops reading the agent.
    let status = agentgate_tests::wait_for("backpressure", Duration::from_secs(20), || {
        let s = gate.cli_json(&["status", "--json"]);
        (s["daemon"]["session_backpressure"] == true).then_some(s)
    });
    assert!(
        status["daemon"]["session_queue"].as_u64().unwrap() <= 10,
        "{status:#}"
    );
    // A statement read just before the queue filled may still be running: let it finish.
    std::thread::sleep(Duration::from_secs(1));
    let stalled_at = inserted();
    let sampled = Instant::now();
    while locked.elapsed() < Duration::from_secs(7) || sampled.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(inserted(), stalled_at, "statements ran while unrecorded");
    assert!(stalled_at < N, "every statement ran: nothing waited");
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(inserted(), N);
    // Every statement is recorded, none lost to the stall.
    let sessions = gate.sessions_ended(1);
    let id = sessions[0]["id"].as_i64().unwrap().to_string();
    let v = gate.cli_json(&["sessions", "show", &id, "--json"]);
    let st = v["statements"].as_array().unwrap();
    let texts: Vec<&str> = st
        .iter()
        .filter_map(|s| s["text"].as_str())
        .map(|t| t.trim_end_matches(';').trim())
        .collect();
    let want: Vec<String> = (0..N)
        .map(|i| format!("INSERT INTO t VALUES ({}, 'stall')", 100 + i))
        .collect();
    assert_eq!(texts, want, "{v:#}");
    assert!(
        !gate.cli_json(&["status", "--json"])["daemon"]["session_backpressure"]
            .as_bool()
            .unwrap(),
        "backpressure ended"
    );
}

/// psql through the gate as `agent` with `script` on its stdin, left running.
fn spawn_psql(gate: &Gate, pg: &Postgres, agent: &str, script: &str) -> std::process::Child {
    gate.spawn_psql(
        agent,
        pg.port,
        Some(WRONG_PASSWORD),
        &["-v", "ON_ERROR_STOP=1"],
        script,
    )
}

/// The texts of the statements `agent`'s ended session recorded.
fn statements_of_agent(gate: &Gate, sessions: &[Value], agent: &str) -> Vec<String> {
    let s = sessions
        .iter()
        .find(|s| s["agent"] == agent)
        .unwrap_or_else(|| panic!("no session of {agent}: {sessions:#?}"));
    let id = s["id"].as_i64().unwrap().to_string();
    let v = gate.cli_json(&["sessions", "show", &id, "--json"]);
    v["statements"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["text"].as_str())
        .map(|t| t.trim_end_matches(';').trim().to_string())
        .collect()
}

#[test]
fn an_agent_flooding_a_stalled_session_store_waits_while_another_agents_statements_run() {
    // A queue of 20 records shared by two agents. `bot` sends statements as fast as the gate
    // reads them while the writer cannot write: it is held once it holds the whole bound.
    // `recorder` then comes with a few statements: it holds less than its share (half the
    // bound, two agents holding records), so they run while `bot` still waits. The bound used
    // to be one for all: `recorder` waited behind `bot`'s records.
    let pg = Postgres::start("scram-sha-256");
    pg.admin_sql(SCHEMA);
    let body = format!("{}\nsessions:\n  max_queued: 20\n", config(&pg, ""));
    let gate = Gate::start_with_env(&body, &[("AGENTGATE_MASK_KEY", MASK_KEY)]);
    const N: i64 = 60;
    let lock = rusqlite::Connection::open(gate.dir.join("state/sessions.db")).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let flood: Vec<String> = (0..N)
        .map(|i| format!("INSERT INTO t VALUES ({}, 'flood')", 100 + i))
        .collect();
    let script: String = flood.iter().map(|q| format!("{q};\n")).collect();
    let flooder = spawn_psql(&gate, &pg, "bot", &script);
    let flooded = || count(&pg, "SELECT count(*) FROM t WHERE v = 'flood'");
    let status = agentgate_tests::wait_for("bot held", Duration::from_secs(20), || {
        let s = gate.cli_json(&["status", "--json"]);
        (s["daemon"]["session_backpressure"] == true
            && s["daemon"]["session_queue_busiest"]["agent"] == "bot")
            .then_some(s)
    });
    assert_eq!(
        status["daemon"]["session_queue_agent_share"], 20,
        "{status:#}"
    );
    // A statement read just before the queue filled may still be running: wait until the
    // count stays put.
    let mut held_at = flooded();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = flooded();
        if now == held_at {
            break;
        }
        assert!(Instant::now() < deadline, "bot's count never settled");
        held_at = now;
    }
    assert!(held_at < N, "every statement ran: nothing waited");

    let quiet = [
        "INSERT INTO t VALUES (900, 'quiet')",
        "INSERT INTO t VALUES (901, 'quiet')",
        "SELECT count(*) FROM t WHERE v = 'quiet'",
    ];
    let script: String = quiet.iter().map(|q| format!("{q};\n")).collect();
    let mut other = spawn_psql(&gate, &pg, "recorder", &script);
    let deadline = Instant::now() + Duration::from_secs(20);
    while other.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "recorder's statements waited behind bot's records"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = other.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(count(&pg, "SELECT count(*) FROM t WHERE v = 'quiet'"), 2);
    // `bot` is still held: no statement of its ran unrecorded meanwhile.
    assert_eq!(flooded(), held_at, "bot's statements ran while unrecorded");
    let status = gate.cli_json(&["status", "--json"]);
    assert_eq!(
        status["daemon"]["session_queue_agent_share"], 10,
        "two agents hold records: {status:#}"
    );

    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    let o = flooder.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(flooded(), N);
    // Every statement of both agents is recorded, none lost to the stall.
    let sessions = gate.sessions_ended(2);
    assert_eq!(statements_of_agent(&gate, &sessions, "bot"), flood);
    assert_eq!(statements_of_agent(&gate, &sessions, "recorder"), quiet);
    let status = gate.cli_json(&["status", "--json"]);
    assert_eq!(
        status["daemon"]["session_backpressure"], false,
        "{status:#}"
    );
}

// 17 -----------------------------------------------------------------------------------------

#[test]
fn other_spellings_of_the_targets_loopback_address_are_judged_as_the_target() {
    // The target is 127.0.0.1:PORT. 0.0.0.0, 127.0.0.2, ::1 and ::ffff:127.0.0.2 are other
    // spellings of this host: an agent that records unknown destinations used to be relayed
    // to them as opaque TCP (to the server itself under 0.0.0.0), and one that does not was
    // refused. Both are judged as the target now, and the gate dials the target's own
    // address, never the spelling: something else listens at 127.0.0.2:PORT.
    let (pg, gate) = start();
    let _elsewhere = EchoServer::start(&format!("127.0.0.2:{}", pg.port));
    let upstream = pg.addr().to_string();
    let spellings = [
        ("recorder", "127.0.0.2", format!("127.0.0.2:{}", pg.port)),
        ("recorder", "0.0.0.0", format!("0.0.0.0:{}", pg.port)),
        ("recorder", "::1", format!("[::1]:{}", pg.port)),
        // A mapped address on an IPv6 socket: recorded in its IPv4 form.
        (
            "recorder",
            "::ffff:127.0.0.2",
            format!("127.0.0.2:{}", pg.port),
        ),
        ("bot", "127.0.0.2", format!("127.0.0.2:{}", pg.port)),
    ];
    for (agent, host, _) in &spellings {
        let o = gated_psql(
            &gate,
            &pg,
            agent,
            &["-A", "-t", "-h", host],
            "SELECT count(*) FROM t;
CREATE TABLE evil (id int);
",
        );
        assert_eq!(text(&o.stdout), "3\n", "{agent} via {host}: {}", show(&o));
        assert!(
            text(&o.stderr)
                .contains("ERROR:  42501: agentgate: denied by rule \"no-schema-changes\""),
            "{agent} via {host}: {}",
            show(&o)
        );
    }
    assert!(!table_exists(&pg, "evil"));

    let sessions = gate.sessions_ended(spellings.len());
    assert_eq!(sessions.len(), spellings.len(), "{sessions:#?}");
    for (agent, host, original) in &spellings {
        let s = sessions
            .iter()
            .find(|s| s["agent"] == *agent && s["original_destination"] == *original)
            .unwrap_or_else(|| panic!("no session of {agent} via {host}: {sessions:#?}"));
        assert_eq!(s["target"], "db", "{s:#}");
        assert_eq!(s["protocol"], "postgres", "{s:#}");
        assert_eq!(s["upstream"], upstream, "{s:#}");
    }
}

#[test]
fn a_server_the_agent_runs_inside_a_network_target_never_gets_the_password() {
    // A target matching 127.0.0.0/8 with no upstream would dial the address the agent asked
    // for: an agent listening on 127.0.0.2 itself could ask the gate for the brokered login
    // (in cleartext, or relay it to the real server). Such a target is refused at load; with
    // the `upstream` it must then name, the agent's server is never dialed.
    let pg = Postgres::start("scram-sha-256");
    pg.admin_sql(SCHEMA);
    let single = format!("match: [\"127.0.0.1:{}\"]", pg.port);
    let network = format!("match: [\"127.0.0.0/8:{}\"]", pg.port);
    let refused = config(&pg, "").replace(&single, &network);
    assert_ne!(refused, config(&pg, ""));
    let dir = std::env::temp_dir().join(agentgate_tests::unique("netcfg"));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("agentgate.yaml");
    std::fs::write(&file, refused.replace("{base}", "agentgate-test/netcfg")).expect("write");
    let o = run(Command::new(agentgate_tests::agentgate_bin())
        .arg("check-config")
        .arg(&file));
    assert!(!o.status.success(), "{}", show(&o));
    assert!(
        text(&o.stderr).contains("targets[0].upstream"),
        "{}",
        show(&o)
    );

    // The agent's own "server" on 127.0.0.2: it asks for a cleartext password and keeps
    // whatever it is sent.
    let listener = std::net::TcpListener::bind(("127.0.0.2", pg.port)).expect("bind 127.0.0.2");
    let contacted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = contacted.clone();
    std::thread::spawn(move || {
        use std::io::Write;
        for mut s in listener.incoming().flatten() {
            seen.store(true, std::sync::atomic::Ordering::SeqCst);
            // AuthenticationCleartextPassword.
            let _ = s.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]);
        }
    });
    let with_upstream =
        config(&pg, &format!("    upstream: 127.0.0.1:{}", pg.port)).replace(&single, &network);
    let gate = Gate::start_with_env(&with_upstream, &[("AGENTGATE_MASK_KEY", MASK_KEY)]);
    for host in ["127.0.0.2", "127.0.0.1"] {
        let o = gated_psql(
            &gate,
            &pg,
            "bot",
            &["-A", "-t", "-h", host],
            "SELECT count(*) FROM t;",
        );
        assert_eq!(text(&o.stdout), "3\n", "via {host}: {}", show(&o));
    }
    let sessions = gate.sessions_ended(2);
    assert!(
        sessions
            .iter()
            .all(|s| s["upstream"] == pg.addr().to_string()),
        "{sessions:#?}"
    );
    assert!(
        !contacted.load(std::sync::atomic::Ordering::SeqCst),
        "the agent's server was dialed"
    );
}

#[test]
fn this_hosts_interface_address_reaches_a_local_target_judged() {
    // The target is 127.0.0.1:PORT. 198.51.100.77 is an address of this host that is not a
    // loopback one, as an interface's is: the kernel's fold does not know it, so a record-mode
    // agent's connect to it arrives as an unknown destination, and used to be relayed as
    // opaque TCP to whatever listens there on all addresses. It is judged as the target now,
    // and dialed at the target's own address (the server here listens on 127.0.0.1 only).
    let (pg, gate) = start();
    let own = HostAddress::add("198.51.100.77");
    let o = gated_psql(
        &gate,
        &pg,
        "recorder",
        &["-A", "-t", "-h", own.0],
        "SELECT count(*) FROM t;
CREATE TABLE evil (id int);
",
    );
    assert_eq!(text(&o.stdout), "3\n", "{}", show(&o));
    assert!(
        text(&o.stderr).contains("ERROR:  42501: agentgate: denied by rule \"no-schema-changes\""),
        "{}",
        show(&o)
    );
    assert!(!table_exists(&pg, "evil"));
    // An agent that does not record unknown destinations is refused in the kernel, as before.
    let o = gated_psql(&gate, &pg, "bot", &["-A", "-t", "-h", own.0], "SELECT 1;");
    assert!(!o.status.success(), "{}", show(&o));

    let sessions = gate.sessions_ended(1);
    let s = sessions
        .iter()
        .find(|s| s["agent"] == "recorder")
        .unwrap_or_else(|| panic!("no session of recorder: {sessions:#?}"));
    assert_eq!(
        s["original_destination"],
        format!("{}:{}", own.0, pg.port),
        "{s:#}"
    );
    assert_eq!(s["target"], "db", "{s:#}");
    assert_eq!(s["protocol"], "postgres", "{s:#}");
    assert_eq!(s["upstream"], pg.addr().to_string(), "{s:#}");
}

#[test]
fn values_computed_from_masked_columns_are_redacted() {
    // `customers.ssn` and `card_number` are masked by column rules, which follow a column's
    // table of origin. A value computed from them has none: `substr(ssn, 1, 3)` ("123") looks
    // like nothing a detector knows and used to reach the agent as it is, as did a masked
    // column passed through a UNION or read back through a cursor.
    let (pg, gate) = start();
    let cases = [
        (
            "SELECT substr(ssn, 1, 3) FROM customers ORDER BY id",
            "[REDACTED]\n[REDACTED]\n[REDACTED]\n",
        ),
        (
            "SELECT reverse(card_number) FROM customers ORDER BY id",
            "[REDACTED]\n[REDACTED]\n[REDACTED]\n",
        ),
        // Numbers cannot be redacted in place: NULL.
        ("SELECT length(ssn) FROM customers ORDER BY id", "\n\n\n"),
        (
            "SELECT ascii(substr(ssn, 1, 1)) FROM customers WHERE id = 1",
            "\n",
        ),
        (
            "SELECT substr(ssn, 1, 3) FROM customers WHERE id = 1 UNION ALL SELECT 'x'",
            "[REDACTED]\n[REDACTED]\n",
        ),
        (
            "SELECT (SELECT substr(ssn, 1, 3) FROM customers WHERE id = 1)",
            "[REDACTED]\n",
        ),
        // A whole row holds every column, masked ones too.
        ("SELECT c FROM customers c WHERE id = 1", "[REDACTED]\n"),
        (
            "SELECT row_to_json(c) FROM customers c WHERE id = 1",
            "\"[REDACTED]\"\n",
        ),
        // Columns under no name the statement uses, without a table of origin.
        (
            "SELECT * FROM customers WHERE id = 1 UNION ALL SELECT * FROM customers WHERE false",
            "|[REDACTED]|[REDACTED]|[REDACTED]|[REDACTED]|[REDACTED]\n",
        ),
        (
            "SELECT upper(x) FROM customers AS c(i, n, e, k, x) WHERE i = 1",
            "[REDACTED]\n",
        ),
        // `TABLE t` is `SELECT * FROM t`: through a UNION its columns have no origin.
        (
            "SELECT ssn, card_number FROM (TABLE customers UNION ALL TABLE customers) s WHERE id = 2 LIMIT 1",
            "[REDACTED]|[REDACTED]\n",
        ),
        // A computed column's name is an alias, not a column a rule can trust.
        (
            "SELECT substr(ssn, 1, 3) AS card_number FROM customers WHERE id = 1",
            "[REDACTED]\n",
        ),
        // An upsert returning its target's whole row.
        (
            "INSERT INTO customers (id) VALUES (2) ON CONFLICT (id) DO UPDATE SET note = customers.note WHERE customers.id = 2 RETURNING customers",
            "[REDACTED]\nINSERT 0 1\n",
        ),
        // A write copying a masked value returns nothing of it.
        (
            "UPDATE customers SET note = ssn WHERE id = 3 RETURNING id, note",
            "|[REDACTED]\nUPDATE 1\n",
        ),
        // Unmasked columns and computations on them are untouched.
        (
            "SELECT name, upper(name) FROM customers WHERE id = 1",
            "Alice|ALICE\n",
        ),
        ("SELECT count(*) FROM customers", "3\n"),
    ];
    let script: String = cases.iter().map(|(q, _)| format!("{q};\n")).collect();
    let o = gated_psql(
        &gate,
        &pg,
        "bot",
        &["-A", "-t", "-v", "ON_ERROR_STOP=1"],
        &script,
    );
    assert!(o.status.success(), "{}", show(&o));
    let want: String = cases.iter().map(|(_, w)| *w).collect();
    assert_eq!(text(&o.stdout), want, "{}", show(&o));
    // Planner statistics hold sample values of every column: denied by the example policy.
    let o = gated_psql(
        &gate,
        &pg,
        "bot",
        &["-A", "-t"],
        "SELECT most_common_vals::text FROM pg_stats WHERE tablename = 'customers';",
    );
    assert!(
        text(&o.stderr).contains("42501") && text(&o.stderr).contains("planner-statistics"),
        "{}",
        show(&o)
    );
    // A cursor's rows: the gate cannot see what the FETCH reads.
    let o = gated_psql(
        &gate,
        &pg,
        "bot",
        &["-A", "-t", "-v", "ON_ERROR_STOP=1"],
        "BEGIN;
DECLARE c CURSOR FOR SELECT id, substr(ssn, 1, 3) FROM customers ORDER BY id;
FETCH 2 FROM c;
COMMIT;
",
    );
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(
        text(&o.stdout),
        "BEGIN\nDECLARE CURSOR\n1|[REDACTED]\n2|[REDACTED]\nCOMMIT\n",
        "{}",
        show(&o)
    );
    // The same through the extended protocol, results in binary.
    let l = pg_client(&gate, &pg, "bot", "masked", "");
    let computed = &step(&l, "computed")["rows"][0];
    assert_eq!(computed[0], "[REDACTED]", "{l:#?}");
    assert!(computed[1].is_null(), "{l:#?}");
    // Directly, the value is there to leak.
    assert_eq!(
        pg.admin_sql("SELECT substr(ssn, 1, 3) FROM customers WHERE id = 1")
            .trim(),
        "123"
    );
}

#[test]
fn whole_rows_read_through_functional_notation_are_redacted() {
    // PostgreSQL reads `c.f`, when `f` is no column of `c`, as the call `f(c)` over the whole
    // row: every masked column, under what looks like a column's name. The gate asks the
    // catalog which qualified names are columns.
    let (pg, gate) = start();
    // A function of the row type, as a DBA might write one; and another `customers`, with one
    // more column, `to_jsonb`: an unqualified name is a column only if it is one of every table
    // of that name, since the agent's `search_path` picks which one a query reads.
    pg.admin_sql(
        "CREATE FUNCTION full_name(customers) RETURNS text LANGUAGE sql
           AS $$ SELECT $1.name || ' ' || $1.ssn $$;
         CREATE SCHEMA scratch;
         CREATE TABLE scratch.customers (LIKE public.customers, to_jsonb jsonb);
         INSERT INTO scratch.customers (id, name, to_jsonb) VALUES (1, 'x', '{\"n\": 1}');",
    );
    let cases = [
        (
            "SELECT c.to_jsonb ->> 'ssn', c.to_jsonb ->> 'card_number' FROM customers c ORDER BY c.id",
            "[REDACTED]|[REDACTED]\n[REDACTED]|[REDACTED]\n[REDACTED]|[REDACTED]\n",
        ),
        (
            "SELECT translate(c.concat, '0123456789', 'abcdefghij') FROM customers c ORDER BY c.id",
            "[REDACTED]\n[REDACTED]\n[REDACTED]\n",
        ),
        (
            "SELECT customers.record_out FROM customers WHERE id = 2",
            "[REDACTED]\n",
        ),
        (
            "SELECT public.customers.to_jsonb ->> 'ssn' FROM customers WHERE id = 2",
            "[REDACTED]\n",
        ),
        (
            "SELECT (c).to_jsonb ->> 'ssn' FROM customers c WHERE c.id = 2",
            "[REDACTED]\n",
        ),
        (
            "SELECT (c.*).to_jsonb ->> 'ssn' FROM customers c WHERE c.id = 2",
            "[REDACTED]\n",
        ),
        (
            "SELECT c.full_name FROM customers c WHERE c.id = 2",
            "[REDACTED]\n",
        ),
        (
            "UPDATE customers c SET note = c.note WHERE c.id = 2 RETURNING c.to_jsonb ->> 'ssn'",
            "[REDACTED]\nUPDATE 1\n",
        ),
        // Real columns, qualified: untouched.
        (
            "SELECT c.id, c.name FROM customers c ORDER BY c.id",
            "1|Alice\n2|Bob\n3|Carol\n",
        ),
        (
            "SELECT upper(c.name) FROM customers c ORDER BY c.id",
            "ALICE\nBOB\nCAROL\n",
        ),
        ("SELECT s.to_jsonb ->> 'n' FROM scratch.customers s", "1\n"),
    ];
    let script: String = cases.iter().map(|(q, _)| format!("{q};\n")).collect();
    let o = gated_psql(
        &gate,
        &pg,
        "bot",
        &["-A", "-t", "-v", "ON_ERROR_STOP=1"],
        &script,
    );
    assert!(o.status.success(), "{}", show(&o));
    let want: String = cases.iter().map(|(_, w)| *w).collect();
    assert_eq!(text(&o.stdout), want, "{}", show(&o));
    // The same through the extended protocol (a prepared statement).
    let l = pg_client(&gate, &pg, "bot", "functional_notation", "");
    let row = &step(&l, "whole_row")["rows"][0];
    assert_eq!(row[0], "[REDACTED]", "{l:#?}");
    assert_eq!(row[1], "[REDACTED]", "{l:#?}");
    assert_eq!(step(&l, "column")["rows"][0][0], "BOB", "{l:#?}");
    // No SSN or card number, plain or with its digits as letters, reached the agent.
    let seen = format!("{}{l:?}", text(&o.stdout));
    for secret in [
        "123-45-6789",
        "987-65-4321",
        "111-22-3333",
        "4111111111111111",
        "5500000000000004",
        "378282246310005",
        "bcd-ef-ghij",
        "jih-gf-edcb",
        "fffaaaaaaaaaaaae",
    ] {
        assert!(!seen.contains(secret), "{secret} in {seen}");
    }
    // Directly, the values are there to leak.
    assert_eq!(
        pg.admin_sql("SELECT c.to_jsonb ->> 'ssn', c.full_name FROM customers c WHERE c.id = 2")
            .trim(),
        "987-65-4321|Bob 987-65-4321"
    );
}

#[test]
fn a_governed_agent_cannot_reach_the_database_over_its_unix_socket() {
    // The test server trusts every local (Unix socket) connection, as initdb's default does:
    // an agent that opened its socket would be the superuser, with nothing judged, masked or
    // recorded. No kernel hook sees Unix sockets; `exec` refuses to create them.
    let (pg, gate) = start();
    let port = pg.port.to_string();
    let dir = pg.dir.to_str().unwrap();
    let psql = [
        "psql",
        "-X",
        "-A",
        "-t",
        "-h",
        dir,
        "-p",
        &port,
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-c",
        "SELECT current_user",
    ];
    let outside = agentgate_tests::run(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(psql),
    );
    assert!(outside.status.success(), "{}", show(&outside));
    assert_eq!(
        text(&outside.stdout).trim(),
        "postgres",
        "the route exists outside the gate"
    );
    for o in [
        agentgate_tests::run(&mut gate.exec_as("bot", "nobody", &psql)),
        agentgate_tests::run(&mut gate.exec("bot", &psql)),
    ] {
        assert!(!o.status.success(), "{}", show(&o));
        assert!(text(&o.stdout).trim().is_empty(), "{}", show(&o));
        assert!(
            text(&o.stderr).contains("could not create socket: Operation not permitted"),
            "{}",
            show(&o)
        );
    }
    // Through the gate (TCP) the same agent still works.
    let o = gated_psql(&gate, &pg, "bot", &["-A", "-t"], "SELECT 1");
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(text(&o.stdout).trim(), "1", "{}", show(&o));
}
