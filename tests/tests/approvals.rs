//! Human approval and just-in-time grants end to end: a real PostgreSQL 15, a real daemon with
//! real eBPF hooks, unmodified clients (psql, tokio-postgres) in governed cgroups, and the
//! operator's CLI deciding on tickets while the clients wait.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use agentgate_tests::{Gate, Postgres, psql_conn_args, show, text, wait_for};
use serde_json::Value;

const SCHEMA: &str = "
CREATE TABLE t (id int PRIMARY KEY, v text);
INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c');
CREATE TABLE t2 (id int PRIMARY KEY, v text);
INSERT INTO t2 VALUES (1, 'a'), (2, 'b');
CREATE TABLE expiring (id int);
INSERT INTO expiring VALUES (1), (2);
CREATE TABLE people (id int, email text);
INSERT INTO people VALUES (1, 'ada@example.com'), (2, 'grace@example.org');
CREATE TABLE secret (id int, s text);
INSERT INTO secret VALUES (1, 'top-secret-1'), (2, 'top-secret-2');
";

/// `bot` and `bot2` are operators: writes without WHERE need a human, statements on `expiring`
/// need one within 2 seconds, DDL and `secret` need the `dba` role (granted just in time).
const POLICY: &str = "
policies:
  - name: dba
    roles: [dba]
    targets: [\"*\"]
    default: allow
  - name: operators
    roles: [operator]
    targets: [\"*\"]
    default: deny
    mask: [pii]
    rules:
      - name: no-ddl
        match: { kinds: [ddl, dcl] }
        action: deny
        message: \"schema changes need the dba role\"
      - name: secret-needs-dba
        match: { tables: [secret] }
        action: deny
      - name: hurry
        match: { tables: [expiring], kinds: [delete, update] }
        action: review
        timeout: 2s
      - name: personal-data
        match: { tables: [people] }
        action: review
        timeout: 60s
      - name: bulk-writes
        match: { kinds: [update, delete], without_where: true }
        action: review
        timeout: 60s
      - name: reads-and-writes
        match: { kinds: [select, insert, update, delete, transaction, set] }
        action: allow
masking:
  profiles:
    pii:
      detectors: [email]
";

fn config(pg: &Postgres, extra: &str) -> String {
    format!(
        "agents:
  - name: bot
    cgroup: {{base}}/bot
    roles: [operator]
    targets: [db]
    # `exec` would refuse its Unix sockets: the admin API's own refusal of governed callers
    # (which also guards services placed with `attach`) is what the tests here check.
    allow_unix_sockets: true
  - name: bot2
    cgroup: {{base}}/bot2
    roles: [operator]
    targets: [db]
targets:
  - name: db
    match: [\"127.0.0.1:{port}\"]
    protocol: postgres
    credentials: {{ user: postgres, password_file: {pw} }}
{extra}
{POLICY}",
        port = pg.port,
        pw = pg.dir.join("pw").display(),
    )
}

fn start_with(extra: &str) -> (Postgres, Gate) {
    let pg = Postgres::start("scram-sha-256");
    pg.admin_sql(SCHEMA);
    let gate = Gate::start(&config(&pg, extra));
    (pg, gate)
}

fn start() -> (Postgres, Gate) {
    start_with("")
}

/// psql inside `agent`'s cgroup running `script`, started in the background.
fn spawn_psql(gate: &Gate, pg: &Postgres, agent: &str, script: &str) -> Child {
    let mut argv = vec!["psql".to_string()];
    argv.extend(psql_conn_args(pg.port));
    argv.extend(["-v", "VERBOSITY=verbose", "-c"].map(String::from));
    argv.push(script.to_string());
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    gate.exec(agent, &argv)
        .env("PGPASSWORD", "not-the-password")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn psql")
}

/// `pg_client SCENARIO PORT` inside `agent`'s cgroup, started in the background.
fn spawn_client(gate: &Gate, pg: &Postgres, agent: &str, scenario: &str) -> Child {
    let port = pg.port.to_string();
    gate.exec(
        agent,
        &[env!("CARGO_BIN_EXE_pg_client"), scenario, port.as_str()],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn pg_client")
}

fn finish(child: Child, what: &str) -> Output {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut child = child;
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        assert!(Instant::now() < deadline, "{what} did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lines(o: &Output) -> Vec<Value> {
    text(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

fn step<'a>(lines: &'a [Value], name: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["step"] == name)
        .unwrap_or_else(|| panic!("no step {name:?} in {lines:#?}"))
}

fn tickets(gate: &Gate, all: bool) -> Vec<Value> {
    let mut args = vec!["approvals", "list", "--json"];
    if all {
        args.push("--all");
    }
    gate.cli_json(&args).as_array().cloned().unwrap_or_default()
}

/// Waits for a pending ticket of `agent` whose statement contains `needle`.
fn pending_ticket(gate: &Gate, agent: &str, needle: &str) -> Value {
    wait_for(
        &format!("a pending ticket of {agent} for {needle:?}"),
        Duration::from_secs(15),
        || {
            tickets(gate, false).into_iter().find(|t| {
                t["agent"] == agent && t["statement"].as_str().unwrap_or("").contains(needle)
            })
        },
    )
}

fn ticket_state(gate: &Gate, id: u64) -> String {
    tickets(gate, true)
        .into_iter()
        .find(|t| t["id"].as_u64() == Some(id))
        .map(|t| t["state"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// `agentgate approvals VERB ID EXTRA...` for a ticket, which must succeed.
fn decide(gate: &Gate, verb: &str, ticket: &Value, extra: &[&str]) -> String {
    let id = ticket["id"].as_u64().expect("ticket id").to_string();
    let mut args = vec!["approvals", verb, id.as_str()];
    args.extend_from_slice(extra);
    cli_ok(gate, &args)
}

fn cli_ok(gate: &Gate, args: &[&str]) -> String {
    let o = gate.cli(args);
    assert!(o.status.success(), "agentgate {args:?}: {}", show(&o));
    text(&o.stdout)
}

fn cli_err(gate: &Gate, args: &[&str]) -> String {
    let o = gate.cli(args);
    assert!(
        !o.status.success(),
        "agentgate {args:?} should fail: {}",
        show(&o)
    );
    text(&o.stderr)
}

fn count(pg: &Postgres, sql: &str) -> i64 {
    pg.admin_sql(sql).trim().parse().unwrap()
}

fn still_running(child: &mut Child) -> bool {
    child.try_wait().expect("try_wait").is_none()
}

/// The statements of the (single) session of `agent` once it has ended, and its whole `show`.
fn session_of(gate: &Gate, agent: &str) -> (Value, String, String) {
    let sessions = gate.sessions_ended(1);
    let s = sessions
        .iter()
        .find(|s| s["agent"] == agent && !s["ended"].is_null())
        .unwrap_or_else(|| panic!("no ended session of {agent}: {sessions:#?}"));
    let id = s["id"].as_i64().unwrap().to_string();
    let json = gate.cli_json(&["sessions", "show", &id, "--json"]);
    let shown = cli_ok(gate, &["sessions", "show", &id]);
    let replay = cli_ok(gate, &["sessions", "replay", &id]);
    (json, shown, replay)
}

// ---------------------------------------------------------------------------------------------

#[test]
fn approved_statement_runs_and_its_result_arrives() {
    let (pg, gate) = start();
    let mut psql = spawn_psql(
        &gate,
        &pg,
        "bot",
        "DELETE FROM t; SELECT count(*) AS left FROM t;",
    );
    let ticket = pending_ticket(&gate, "bot", "DELETE FROM t");
    assert_eq!(ticket["rule"], "bulk-writes");
    assert_eq!(ticket["policy"], "operators");
    assert_eq!(ticket["protocol"], "simple");
    assert_eq!(
        ticket["statement"],
        "DELETE FROM t; SELECT count(*) AS left FROM t;"
    );
    assert!(ticket["pid"].as_u64().unwrap() > 0);
    assert!(
        ticket["exe"].as_str().unwrap().ends_with("psql"),
        "{ticket}"
    );
    assert_eq!(ticket["sha256"].as_str().unwrap().len(), 64);
    // Held: the server has not seen the statement.
    std::thread::sleep(Duration::from_millis(500));
    assert!(still_running(&mut psql));
    assert_eq!(count(&pg, "SELECT count(*) FROM t"), 3);

    let id = ticket["id"].as_u64().unwrap().to_string();
    let sha = ticket["sha256"].as_str().unwrap().to_string();
    cli_ok(
        &gate,
        &[
            "approvals",
            "approve",
            &id,
            "--sha256",
            &sha,
            "--reason",
            "cleanup",
        ],
    );
    let o = finish(psql, "psql");
    assert!(o.status.success(), "{}", show(&o));
    let out = text(&o.stdout);
    assert!(
        out.contains("DELETE 3") || out.contains(" 0\n"),
        "{}",
        show(&o)
    );
    assert_eq!(count(&pg, "SELECT count(*) FROM t"), 0);
    assert_eq!(
        ticket_state(&gate, ticket["id"].as_u64().unwrap()),
        "approved"
    );

    // The record has the ticket, its approval and the statement, in that order.
    let (json, shown, replay) = session_of(&gate, "bot");
    let st = &json["statements"][0];
    assert_eq!(st["decision"], "allow");
    assert_eq!(st["rule"], "bulk-writes");
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("approved by unix:root"),
        "{st}"
    );
    let created = shown
        .find(&format!("ticket {id} held for approval"))
        .expect(&shown);
    let approved = shown
        .find(&format!("ticket {id} approved by unix:root: cleanup"))
        .expect(&shown);
    let statement = shown
        .find(" simple allow (delete, rule bulk-writes)")
        .expect(&shown);
    assert!(created < approved && approved < statement, "{shown}");
    let r_created = replay.find(&format!("ticket {id} held")).expect(&replay);
    let r_approved = replay
        .find(&format!("ticket {id} approved"))
        .expect(&replay);
    let r_run = replay.find("=> DELETE FROM t").expect(&replay);
    assert!(r_created < r_approved && r_approved < r_run, "{replay}");
}

#[test]
fn approval_is_bound_to_the_exact_statement() {
    let (pg, gate) = start();
    let psql = spawn_psql(&gate, &pg, "bot", "UPDATE t SET v = 'x'");
    let ticket = pending_ticket(&gate, "bot", "UPDATE t SET v = 'x'");
    let id = ticket["id"].as_u64().unwrap().to_string();
    // The approver reviewed another text: its hash does not match, nothing is approved.
    let other = "0".repeat(64);
    let err = cli_err(&gate, &["approvals", "approve", &id, "--sha256", &other]);
    assert!(err.contains("does not match"), "{err}");
    assert_eq!(ticket_state(&gate, id.parse().unwrap()), "pending");
    assert_eq!(count(&pg, "SELECT count(*) FROM t WHERE v = 'x'"), 0);
    // One approval runs one statement: the same text from another connection waits again.
    cli_ok(&gate, &["approvals", "approve", &id]);
    let o = finish(psql, "psql");
    assert!(text(&o.stdout).contains("UPDATE 3"), "{}", show(&o));
    let again = spawn_psql(&gate, &pg, "bot", "UPDATE t SET v = 'x'");
    let second = pending_ticket(&gate, "bot", "UPDATE t SET v = 'x'");
    assert_ne!(second["id"], ticket["id"]);
    assert_eq!(second["sha256"], ticket["sha256"]);
    let id2 = second["id"].as_u64().unwrap().to_string();
    // Approving twice is refused; denying the new one ends it.
    let err = cli_err(&gate, &["approvals", "approve", &id]);
    assert!(err.contains("already"), "{err}");
    cli_ok(
        &gate,
        &["approvals", "deny", &id2, "--reason", "once is enough"],
    );
    let o = finish(again, "psql");
    assert!(text(&o.stderr).contains("once is enough"), "{}", show(&o));
}

#[test]
fn denied_statement_gets_42501_with_the_reason_and_the_connection_goes_on() {
    let (pg, gate) = start();
    let psql = spawn_psql(
        &gate,
        &pg,
        "bot",
        "UPDATE t SET v = 'gone'; SELECT 'still here' AS s;",
    );
    // psql -c sends both as one query string: the whole string is held and denied together.
    let ticket = pending_ticket(&gate, "bot", "UPDATE t SET v = 'gone'");
    let id = ticket["id"].as_u64().unwrap().to_string();
    cli_ok(
        &gate,
        &[
            "approvals",
            "deny",
            &id,
            "--reason",
            "not during business hours",
        ],
    );
    let o = finish(psql, "psql");
    let err = text(&o.stderr);
    assert!(err.contains("42501"), "{}", show(&o));
    assert!(err.contains("not during business hours"), "{}", show(&o));
    assert!(err.contains("unix:root"), "{}", show(&o));
    assert_eq!(count(&pg, "SELECT count(*) FROM t WHERE v = 'gone'"), 0);
    assert_eq!(ticket_state(&gate, id.parse().unwrap()), "denied");

    // The connection stays usable after a denial (same session, next statement).
    let psql = spawn_psql(&gate, &pg, "bot", "SELECT 1");
    let o = finish(psql, "psql");
    assert!(o.status.success(), "{}", show(&o));
    let held = spawn_psql_script(
        &gate,
        &pg,
        "bot",
        "DELETE FROM t;\nSELECT 'after' AS s, count(*) AS n FROM t;\n",
    );
    let ticket = pending_ticket(&gate, "bot", "DELETE FROM t");
    let id = ticket["id"].as_u64().unwrap().to_string();
    cli_ok(&gate, &["approvals", "deny", &id, "--reason", "no"]);
    let o = finish(held, "psql");
    let out = text(&o.stdout);
    assert!(out.contains("after") && out.contains(" 3"), "{}", show(&o));
}

#[test]
fn copy_to_stdout_of_a_statement_under_review_is_refused_not_held() {
    // `people` needs review and is masked with `pii`: an approval must not let COPY stream its
    // rows unmasked, so the COPY is refused at once and no ticket is opened.
    let (pg, gate) = start();
    let o = finish(
        spawn_psql(
            &gate,
            &pg,
            "bot",
            "COPY (SELECT email FROM people) TO STDOUT",
        ),
        "psql",
    );
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(
        err.contains("42501") && err.contains("COPY ... TO STDOUT cannot be masked"),
        "{}",
        show(&o)
    );
    assert!(!out.contains("ada@example.com"), "{}", show(&o));
    assert!(
        tickets(&gate, true).is_empty(),
        "no ticket: {:?}",
        tickets(&gate, true)
    );
}

/// psql reading `script` from stdin (one statement per line, each its own query).
fn spawn_psql_script(gate: &Gate, pg: &Postgres, agent: &str, script: &str) -> Child {
    gate.spawn_psql(
        agent,
        pg.port,
        Some("not-the-password"),
        &["-v", "VERBOSITY=verbose"],
        script,
    )
}

#[test]
fn undecided_ticket_expires_and_the_statement_never_runs() {
    let (pg, gate) = start();
    let started = Instant::now();
    let psql = spawn_psql(&gate, &pg, "bot", "DELETE FROM expiring");
    let ticket = pending_ticket(&gate, "bot", "DELETE FROM expiring");
    let o = finish(psql, "psql");
    let waited = started.elapsed();
    let err = text(&o.stderr);
    assert!(
        err.contains("42501") && err.contains("expired"),
        "{}",
        show(&o)
    );
    assert!(waited >= Duration::from_secs(2), "{waited:?}");
    assert_eq!(count(&pg, "SELECT count(*) FROM expiring"), 2);
    let id = ticket["id"].as_u64().unwrap();
    assert_eq!(ticket_state(&gate, id), "expired");
    // Too late to approve.
    let err = cli_err(&gate, &["approvals", "approve", &id.to_string()]);
    assert!(err.contains("Expired"), "{err}");
}

#[test]
fn agent_hanging_up_cancels_its_ticket() {
    let (pg, gate) = start();
    let mut psql = spawn_psql(&gate, &pg, "bot", "DELETE FROM t");
    let ticket = pending_ticket(&gate, "bot", "DELETE FROM t");
    let id = ticket["id"].as_u64().unwrap();
    psql.kill().unwrap();
    let _ = psql.wait();
    wait_for(
        "the ticket to be cancelled",
        Duration::from_secs(10),
        || (ticket_state(&gate, id) == "cancelled").then_some(()),
    );
    let err = cli_err(&gate, &["approvals", "approve", &id.to_string()]);
    assert!(err.contains("Cancelled"), "{err}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count(&pg, "SELECT count(*) FROM t"), 3);
}

#[test]
fn two_agents_wait_at_once_and_are_approved_in_reverse_order() {
    let (pg, gate) = start();
    let mut first = spawn_psql(&gate, &pg, "bot", "DELETE FROM t");
    let t1 = pending_ticket(&gate, "bot", "DELETE FROM t");
    let second = spawn_psql(&gate, &pg, "bot2", "UPDATE t2 SET v = 'z'");
    let t2 = pending_ticket(&gate, "bot2", "UPDATE t2 SET v = 'z'");
    assert_eq!(tickets(&gate, false).len(), 2);
    decide(&gate, "approve", &t2, &[]);
    let o = finish(second, "bot2's psql");
    assert!(text(&o.stdout).contains("UPDATE 2"), "{}", show(&o));
    // The first agent is still waiting, untouched.
    assert!(still_running(&mut first));
    assert_eq!(count(&pg, "SELECT count(*) FROM t"), 3);
    decide(&gate, "approve", &t1, &[]);
    let o = finish(first, "bot's psql");
    assert!(text(&o.stdout).contains("DELETE 3"), "{}", show(&o));
    assert_eq!(count(&pg, "SELECT count(*) FROM t"), 0);
}

#[test]
fn an_agent_cannot_bury_the_approvers_in_tickets() {
    // Each held statement holds a connection; an agent opening connection after connection to
    // queue reviews gets a refusal, without a ticket, beyond `max_pending_per_agent`.
    let (pg, gate) = start_with("approvals: { max_pending_per_agent: 2 }");
    let mut first = spawn_psql(&gate, &pg, "bot", "DELETE FROM t");
    pending_ticket(&gate, "bot", "DELETE FROM t");
    let mut second = spawn_psql(&gate, &pg, "bot", "UPDATE t2 SET v = 'y'");
    let t2 = pending_ticket(&gate, "bot", "UPDATE t2 SET v = 'y'");
    let third = finish(
        spawn_psql(&gate, &pg, "bot", "UPDATE t2 SET v = 'x'"),
        "the third psql",
    );
    let err = text(&third.stderr);
    assert!(!third.status.success(), "{}", show(&third));
    assert!(err.contains("42501"), "{err}");
    assert!(
        err.contains("already has 2 statements awaiting approval")
            && err.contains("no ticket was opened"),
        "{err}"
    );
    assert_eq!(tickets(&gate, true).len(), 2, "no third ticket");
    // Another agent's reviews are unaffected.
    let other = spawn_psql(&gate, &pg, "bot2", "UPDATE t2 SET v = 'z'");
    let t3 = pending_ticket(&gate, "bot2", "UPDATE t2 SET v = 'z'");
    decide(&gate, "deny", &t3, &["--reason", "not now"]);
    finish(other, "bot2's psql");
    // Once one is decided, the agent may ask again.
    decide(&gate, "deny", &t2, &["--reason", "not now"]);
    finish(
        std::mem::replace(
            &mut second,
            spawn_psql(&gate, &pg, "bot", "UPDATE t2 SET v = 'w'"),
        ),
        "the second psql",
    );
    pending_ticket(&gate, "bot", "UPDATE t2 SET v = 'w'");
    assert!(still_running(&mut first) && still_running(&mut second));
    let _ = first.kill();
    let _ = second.kill();
    let _ = first.wait();
    let _ = second.wait();
    // The refused statement is in the record, denied, and nothing changed.
    assert_eq!(
        count(&pg, "SELECT count(*) FROM t2 WHERE v IN ('x', 'w', 'z')"),
        0
    );
    let refused = wait_for(
        "the refused statement recorded",
        Duration::from_secs(10),
        || {
            gate.sessions_ended(1).iter().find_map(|s| {
                let id = s["id"].as_i64()?.to_string();
                let shown = gate.cli_json(&["sessions", "show", &id, "--json"]);
                shown["statements"]
                    .as_array()?
                    .iter()
                    .find(|st| st["text"] == "UPDATE t2 SET v = 'x'")
                    .cloned()
            })
        },
    );
    assert_eq!(refused["decision"], "deny", "{refused}");
}

#[test]
fn a_statement_too_large_to_hold_is_refused_with_54000_and_no_ticket() {
    // A ticket keeps its statement for as long as it is listed, and its events carry it: a
    // statement larger than `approvals.max_statement_bytes` that would be held is refused.
    let (pg, gate) = start_with("approvals: { max_statement_bytes: 200 }");
    let big = format!("UPDATE t SET v = '{}'", "x".repeat(300));
    let o = finish(spawn_psql(&gate, &pg, "bot", &big), "psql");
    let err = text(&o.stderr);
    assert!(!o.status.success(), "{}", show(&o));
    assert!(err.contains("54000"), "{err}");
    assert!(
        err.contains("approvals.max_statement_bytes (200)") && err.contains("no ticket was opened"),
        "{err}"
    );
    assert!(tickets(&gate, true).is_empty(), "no ticket");
    assert_eq!(count(&pg, "SELECT count(*) FROM t WHERE v LIKE 'xxx%'"), 0);
    let refused = wait_for(
        "the refused statement recorded",
        Duration::from_secs(10),
        || {
            gate.sessions_ended(1).iter().find_map(|s| {
                let id = s["id"].as_i64()?.to_string();
                let shown = gate.cli_json(&["sessions", "show", &id, "--json"]);
                shown["statements"]
                    .as_array()?
                    .iter()
                    .find(|st| st["text"] == big.as_str())
                    .cloned()
            })
        },
    );
    assert_eq!(refused["decision"], "deny", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap_or_default()
            .contains("approvals.max_statement_bytes"),
        "{refused}"
    );
    // A statement within the limit is held as before.
    let small = spawn_psql(&gate, &pg, "bot", "UPDATE t SET v = 'small'");
    let t = pending_ticket(&gate, "bot", "UPDATE t SET v = 'small'");
    decide(&gate, "approve", &t, &[]);
    let o = finish(small, "psql");
    assert!(text(&o.stdout).contains("UPDATE 3"), "{}", show(&o));
}

#[test]
fn extended_protocol_hold_inside_a_transaction() {
    let (pg, gate) = start();
    // Approved: the UPDATE runs inside the agent's transaction and commits.
    let client = spawn_client(&gate, &pg, "bot", "held_tx");
    let ticket = pending_ticket(&gate, "bot", "UPDATE t SET v = $1");
    assert_eq!(ticket["protocol"], "extended");
    // tokio-postgres sends text in binary format: shown as hex and, being printable, as text.
    let param = ticket["params"][0].as_str().unwrap();
    assert!(
        param.contains("\\x68656c64") && param.contains("\"held\""),
        "{ticket}"
    );
    decide(&gate, "approve", &ticket, &[]);
    let o = finish(client, "pg_client held_tx");
    assert!(o.status.success(), "{}", show(&o));
    let l = lines(&o);
    assert_eq!(step(&l, "update")["rows"], 3, "{l:#?}");
    assert_eq!(step(&l, "inside")["rows"][0][0], "3", "{l:#?}");
    assert_eq!(step(&l, "commit")["ok"], true);
    assert_eq!(step(&l, "after")["ok"], true);
    assert_eq!(count(&pg, "SELECT count(*) FROM t WHERE v = 'held'"), 3);

    // Denied: the transaction is aborted as a server error would leave it; nothing changed.
    pg.admin_sql("UPDATE t SET v = 'a'");
    let client = spawn_client(&gate, &pg, "bot", "held_tx");
    let ticket = pending_ticket(&gate, "bot", "UPDATE t SET v = $1");
    decide(&gate, "deny", &ticket, &["--reason", "nope"]);
    let o = finish(client, "pg_client held_tx");
    let l = lines(&o);
    assert_eq!(step(&l, "update")["code"], "42501", "{l:#?}");
    assert!(
        step(&l, "update")["message"]
            .as_str()
            .unwrap()
            .contains("nope")
    );
    assert_eq!(step(&l, "aborted")["code"], "25P02", "{l:#?}");
    assert_eq!(step(&l, "after")["ok"], true, "{l:#?}");
    assert_eq!(count(&pg, "SELECT count(*) FROM t WHERE v = 'held'"), 0);
}

#[test]
fn agent_cancel_and_statement_timeout_cancel_the_ticket() {
    let (pg, gate) = start();
    let client = spawn_client(&gate, &pg, "bot", "held_cancel");
    let ticket = pending_ticket(&gate, "bot", "DELETE FROM t");
    let o = finish(client, "pg_client held_cancel");
    let l = lines(&o);
    assert_eq!(step(&l, "delete")["code"], "57014", "{l:#?}");
    assert_eq!(step(&l, "after")["ok"], true, "{l:#?}");
    assert_eq!(
        ticket_state(&gate, ticket["id"].as_u64().unwrap()),
        "cancelled"
    );
    assert_eq!(count(&pg, "SELECT count(*) FROM t"), 3);

    // The agent's own statement_timeout applies while its statement waits.
    let psql = spawn_psql_script(
        &gate,
        &pg,
        "bot",
        "SET statement_timeout = '1s';\nDELETE FROM t;\nSELECT 'alive' AS s;\n",
    );
    let ticket = pending_ticket(&gate, "bot", "DELETE FROM t");
    let o = finish(psql, "psql");
    let err = text(&o.stderr);
    assert!(
        err.contains("57014") && err.contains("statement timeout"),
        "{}",
        show(&o)
    );
    assert!(text(&o.stdout).contains("alive"), "{}", show(&o));
    assert_eq!(
        ticket_state(&gate, ticket["id"].as_u64().unwrap()),
        "cancelled"
    );
    assert_eq!(count(&pg, "SELECT count(*) FROM t"), 3);
}

#[test]
fn role_grant_lets_statements_through_until_it_expires() {
    let (pg, gate) = start();
    let o = spawn_psql(&gate, &pg, "bot", "CREATE TABLE g0 (id int)");
    let o = finish(o, "psql");
    assert!(
        text(&o.stderr).contains("schema changes need the dba role"),
        "{}",
        show(&o)
    );

    let out = cli_ok(
        &gate,
        &[
            "grant",
            "--agent",
            "bot",
            "--role",
            "dba",
            "--for",
            "3s",
            "--reason",
            "migration",
            "--json",
        ],
    );
    let grant: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(grant["granted_by"], "unix:root");
    let listed = gate.cli_json(&["grants", "list", "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let o = finish(
        spawn_psql(&gate, &pg, "bot", "CREATE TABLE g1 (id int)"),
        "psql",
    );
    assert!(o.status.success(), "{}", show(&o));
    // The other agent has no grant.
    let o = finish(
        spawn_psql(&gate, &pg, "bot2", "CREATE TABLE g2 (id int)"),
        "psql",
    );
    assert!(!o.status.success(), "{}", show(&o));
    // After expiry the next statement is judged without it.
    let gid = grant["id"].as_u64().unwrap();
    wait_for("the grant to expire", Duration::from_secs(10), || {
        gate.cli_json(&["grants", "list", "--json"])
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    });
    let o = finish(
        spawn_psql(&gate, &pg, "bot", "CREATE TABLE g3 (id int)"),
        "psql",
    );
    assert!(
        text(&o.stderr).contains("schema changes need the dba role"),
        "{}",
        show(&o)
    );
    gate.wait_event("grant_expired", |e| {
        e["kind"] == "grant_expired" && e["detail"]["id"].as_u64() == Some(gid)
    });

    // A revoked grant stops at once.
    let out = cli_ok(
        &gate,
        &[
            "grant", "--agent", "bot", "--role", "dba", "--for", "10m", "--json",
        ],
    );
    let grant: Value = serde_json::from_str(&out).unwrap();
    cli_ok(
        &gate,
        &[
            "grants",
            "revoke",
            &grant["id"].as_u64().unwrap().to_string(),
            "--reason",
            "done",
        ],
    );
    let o = finish(
        spawn_psql(&gate, &pg, "bot", "CREATE TABLE g4 (id int)"),
        "psql",
    );
    assert!(!o.status.success(), "{}", show(&o));
    let all = gate.cli_json(&["grants", "list", "--all", "--json"]);
    assert_eq!(all.as_array().unwrap().len(), 2);
    let tables = pg.admin_sql("SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables WHERE tablename LIKE 'g_'");
    assert_eq!(tables.trim(), "g1");
}

#[test]
fn cursors_declared_under_a_role_grant_stop_when_it_is_revoked() {
    let (pg, gate) = start();
    let out = cli_ok(
        &gate,
        &[
            "grant", "--agent", "bot", "--role", "dba", "--for", "10m", "--json",
        ],
    );
    let grant: Value = serde_json::from_str(&out).unwrap();
    let gid = grant["id"].as_u64().unwrap().to_string();
    // A holdable cursor (it outlives its transaction) and a plain one (its query runs at each
    // FETCH), both declared under the grant; the grant is revoked during the sleep.
    let psql = spawn_psql_script(
        &gate,
        &pg,
        "bot",
        "DECLARE held CURSOR WITH HOLD FOR SELECT s FROM secret;
BEGIN;
DECLARE plain CURSOR FOR SELECT s FROM secret;
SELECT pg_sleep(4);
FETCH ALL FROM plain;
COMMIT;
FETCH ALL FROM held;
MOVE ABSOLUTE 0 IN held;
SELECT s FROM secret;
CLOSE ALL;
DECLARE fresh CURSOR WITH HOLD FOR SELECT v FROM t WHERE id = 1;
FETCH ALL FROM fresh;
",
    );
    wait_for(
        "the agent's session to sleep",
        Duration::from_secs(15),
        || {
            (count(
                &pg,
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(4);'",
            ) == 1)
                .then_some(())
        },
    );
    cli_ok(
        &gate,
        &["grants", "revoke", &gid, "--reason", "access ends now"],
    );
    let o = finish(psql, "psql");
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(!out.contains("top-secret"), "{}", show(&o));
    assert_eq!(
        err.matches("42501").count(),
        4,
        "FETCH, FETCH, MOVE and SELECT refused: {}",
        show(&o)
    );
    assert_eq!(
        err.matches(&format!(
            "grant {gid}, in force when a cursor was declared here, has ended"
        ))
        .count(),
        3,
        "{}",
        show(&o)
    );
    assert!(
        err.contains("denied by rule \"secret-needs-dba\""),
        "{}",
        show(&o)
    );
    // Once every cursor is closed, new ones (declared without the grant) work (the FETCH's
    // computed column is masked, as any FETCH's is under a mask profile).
    let after = out
        .split_once("CLOSE CURSOR ALL")
        .map(|(_, a)| a)
        .unwrap_or("");
    assert!(after.contains("(1 row)"), "{}", show(&o));
}

#[test]
fn approval_with_a_duration_grants_the_rule_until_it_expires() {
    let (pg, gate) = start();
    let psql = spawn_psql(&gate, &pg, "bot", "UPDATE t SET v = 'one'");
    let ticket = pending_ticket(&gate, "bot", "UPDATE t SET v = 'one'");
    let id = ticket["id"].as_u64().unwrap().to_string();
    let out = cli_ok(
        &gate,
        &["approvals", "approve", &id, "--for", "4s", "--json"],
    );
    let approved: Value = serde_json::from_str(&out).unwrap();
    assert!(approved["grant_id"].as_u64().is_some(), "{approved}");
    assert!(finish(psql, "psql").status.success());
    // The next statement of that rule runs without a ticket while the grant lasts.
    let o = finish(
        spawn_psql(&gate, &pg, "bot", "UPDATE t SET v = 'two'"),
        "psql",
    );
    assert!(text(&o.stdout).contains("UPDATE 3"), "{}", show(&o));
    assert_eq!(tickets(&gate, true).len(), 1);
    // Other rules and other agents are not covered.
    let other = spawn_psql(&gate, &pg, "bot2", "UPDATE t SET v = 'three'");
    let t = pending_ticket(&gate, "bot2", "UPDATE t SET v = 'three'");
    decide(&gate, "deny", &t, &["--reason", "no"]);
    finish(other, "psql");
    // Expired: held again.
    std::thread::sleep(Duration::from_secs(4));
    let again = spawn_psql(&gate, &pg, "bot", "UPDATE t SET v = 'four'");
    let t = pending_ticket(&gate, "bot", "UPDATE t SET v = 'four'");
    decide(&gate, "deny", &t, &["--reason", "expired grant"]);
    finish(again, "psql");
    assert_eq!(count(&pg, "SELECT count(*) FROM t WHERE v = 'two'"), 3);

    // The grant is in the record of the sessions that used it.
    let sessions = gate.sessions_ended(4);
    let used = sessions.iter().find(|s| {
        s["agent"] == "bot" && {
            let id = s["id"].as_i64().unwrap().to_string();
            let v = gate.cli_json(&["sessions", "show", &id, "--json"]);
            v["statements"].as_array().unwrap().iter().any(|st| {
                st["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("allowed without review by grant")
            })
        }
    });
    assert!(used.is_some(), "{sessions:#?}");
}

/// psql inside `agent`'s cgroup connecting to `port` and `database`, started in the background.
fn spawn_psql_to(gate: &Gate, agent: &str, port: u16, database: &str, script: &str) -> Child {
    let port = port.to_string();
    gate.exec(
        agent,
        &[
            "psql",
            "-X",
            "-w",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            database,
            "-c",
            script,
        ],
    )
    .env("PGPASSWORD", "not-the-password")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn psql")
}

#[test]
fn a_rule_grant_covers_only_the_target_and_database_of_its_ticket() {
    // Two targets on the harness's server (db2 is another address standing in for another
    // server) and a second database: what the approver saw was db/postgres, nothing else.
    let pg = Postgres::start("scram-sha-256");
    pg.admin_sql(SCHEMA);
    pg.admin_sql("CREATE DATABASE other");
    let o = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(&pg.dir)
        .args([
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "other",
            "-c",
            SCHEMA,
        ])
        .output()
        .expect("run psql");
    assert!(o.status.success(), "{}", show(&o));
    let port2 = agentgate_tests::free_port();
    let db2 = format!(
        "  - name: db2
    match: [\"127.0.0.1:{port2}\"]
    upstream: 127.0.0.1:{port}
    protocol: postgres
    credentials: {{ user: postgres, password_file: {pw} }}
",
        port = pg.port,
        pw = pg.dir.join("pw").display(),
    );
    let gate = Gate::start(&config(&pg, &db2).replacen("targets: [db]", "targets: [db, db2]", 1));

    let psql = spawn_psql(&gate, &pg, "bot", "UPDATE t SET v = 'one'");
    let ticket = pending_ticket(&gate, "bot", "UPDATE t SET v = 'one'");
    let id = ticket["id"].as_u64().unwrap().to_string();
    let out = cli_ok(&gate, &["approvals", "approve", &id, "--for", "10m"]);
    assert!(out.contains("on target db, database postgres"), "{out}");
    assert!(finish(psql, "psql").status.success());
    let listed = cli_ok(&gate, &["grants", "list"]);
    assert!(
        listed.contains("rule bulk-writes of policy operators on target db, database postgres"),
        "{listed}"
    );
    let grants = gate.cli_json(&["grants", "list", "--json"]);
    assert_eq!(grants[0]["scope"]["target"], "db", "{grants}");
    assert_eq!(grants[0]["scope"]["database"], "postgres", "{grants}");

    // Another target: held, not let through.
    let other_target = spawn_psql_to(&gate, "bot", port2, "postgres", "DELETE FROM t");
    let t = pending_ticket(&gate, "bot", "DELETE FROM t");
    assert_eq!(t["target"], "db2", "{t}");
    decide(&gate, "deny", &t, &["--reason", "not on db2"]);
    let o = finish(other_target, "psql on db2");
    assert!(!o.status.success(), "{}", show(&o));
    // Another database of the same target: held too.
    let other_db = spawn_psql_to(&gate, "bot", pg.port, "other", "UPDATE t SET v = 'other'");
    let t = pending_ticket(&gate, "bot", "UPDATE t SET v = 'other'");
    assert_eq!(t["database"], "other", "{t}");
    decide(&gate, "deny", &t, &["--reason", "not on other"]);
    let o = finish(other_db, "psql on other");
    assert!(!o.status.success(), "{}", show(&o));
    assert_eq!(count(&pg, "SELECT count(*) FROM t"), 3);

    // Where the approver saw it, the grant applies.
    let o = finish(
        spawn_psql(&gate, &pg, "bot", "UPDATE t SET v = 'two'"),
        "psql",
    );
    assert!(text(&o.stdout).contains("UPDATE 3"), "{}", show(&o));
    assert_eq!(tickets(&gate, true).len(), 3);
}

#[test]
fn a_governed_agent_cannot_use_the_admin_api_or_approve_its_own_ticket() {
    let (pg, gate) = start();
    let psql = spawn_psql(&gate, &pg, "bot", "DELETE FROM t");
    let ticket = pending_ticket(&gate, "bot", "DELETE FROM t");
    let id = ticket["id"].as_u64().unwrap().to_string();
    // The agent (even as root) runs the CLI inside its own cgroup.
    let bin = agentgate_tests::agentgate_bin();
    let config = gate.config.display().to_string();
    let approve_as = |agent: &str| {
        gate.exec(
            agent,
            &[
                bin.to_str().unwrap(),
                "approvals",
                "approve",
                &id,
                "--config",
                &config,
            ],
        )
        .output()
        .unwrap()
    };
    let o = approve_as("bot");
    assert!(!o.status.success(), "{}", show(&o));
    assert!(
        text(&o.stderr).contains("may not use the admin API"),
        "{}",
        show(&o)
    );
    assert_eq!(ticket_state(&gate, id.parse().unwrap()), "pending");
    // An agent without `allow_unix_sockets` does not get as far as the socket.
    let o = approve_as("bot2");
    assert!(!o.status.success(), "{}", show(&o));
    assert!(
        text(&o.stderr).contains("Operation not permitted"),
        "{}",
        show(&o)
    );
    assert_eq!(ticket_state(&gate, id.parse().unwrap()), "pending");
    cli_ok(&gate, &["approvals", "deny", &id, "--reason", "cleanup"]);
    finish(psql, "psql");
    assert_eq!(count(&pg, "SELECT count(*) FROM t"), 3);
}

#[test]
fn a_connection_made_by_a_process_that_is_gone_cannot_use_the_admin_api() {
    // A governed process forks; the child connects to the admin socket and exits, so the
    // kernel's peer credentials name a pid that no longer exists; the parent keeps the
    // connection and sends the request. The caller cannot be shown not to be an agent: refused.
    let (_pg, gate) = start();
    let socket = gate.dir.join("state/admin.sock");
    let script = r#"
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
pid = os.fork()
if pid == 0:
    s.connect(sys.argv[1])
    os._exit(0)
os.waitpid(pid, 0)
s.sendall(b'{"cmd": "approvals_list"}\n')
print(s.makefile().readline().strip())
"#;
    let o = gate
        .exec("bot", &["python3", "-c", script, socket.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let reply: Value = serde_json::from_str(text(&o.stdout).trim()).unwrap_or_default();
    assert_eq!(reply["ok"], false, "{}", show(&o));
    let error = reply.to_string();
    assert!(
        error.contains("gone or its cgroup cannot be read")
            || error.contains("may not use the admin API"),
        "{}",
        show(&o)
    );
}

#[test]
fn approvals_watch_prints_tickets_as_they_arrive() {
    let (pg, gate) = start();
    let mut watch = Command::new(agentgate_tests::agentgate_bin())
        .args(["approvals", "watch", "--json", "--config"])
        .arg(&gate.config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let out = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let psql = spawn_psql(&gate, &pg, "bot", "DELETE FROM t");
    let created: Value =
        serde_json::from_str(&rx.recv_timeout(Duration::from_secs(10)).unwrap()).unwrap();
    assert_eq!(created["event"], "ticket_created");
    assert_eq!(created["ticket"]["statement"], "DELETE FROM t");
    let id = created["ticket"]["id"].as_u64().unwrap().to_string();
    cli_ok(&gate, &["approvals", "deny", &id, "--reason", "watched"]);
    let denied: Value =
        serde_json::from_str(&rx.recv_timeout(Duration::from_secs(10)).unwrap()).unwrap();
    assert_eq!(denied["event"], "ticket_denied");
    assert_eq!(denied["ticket"]["reason"], "watched");
    finish(psql, "psql");
    let _ = watch.kill();
    let _ = watch.wait();
}

/// A webhook receiver: records each request's headers and body, answers 500 to the first
/// request (the gate retries) and 200 afterwards.
/// One delivery as received: lower-cased headers and the body.
type Delivery = (Vec<(String, String)>, String);

fn webhook_receiver() -> (u16, mpsc::Receiver<Delivery>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut n = 0;
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut headers = Vec::new();
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                continue;
            }
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                if let Some((k, v)) = l.split_once(':') {
                    headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                }
            }
            let len: usize = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .map(|(_, v)| v.parse().unwrap())
                .unwrap_or(0);
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            n += 1;
            let status = if n == 1 {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let _ = stream.write_all(
                format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            );
            if n > 1 {
                let _ = tx.send((headers, String::from_utf8(body).unwrap()));
            }
        }
    });
    (port, rx)
}

fn hmac_hex(secret: &str, message: &str) -> String {
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", secret])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(message.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    text(&o.stdout)
        .trim()
        .rsplit(' ')
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn webhook_receives_signed_ticket_events() {
    let (port, rx) = webhook_receiver();
    let secret = "webhook-secret-for-the-e2e-test";
    let dir = std::env::temp_dir().join(agentgate_tests::unique("hook"));
    std::fs::create_dir_all(&dir).unwrap();
    let secret_file = dir.join("secret");
    std::fs::write(&secret_file, secret).unwrap();
    let extra = format!(
        "webhooks:\n  - url: http://127.0.0.1:{port}/hooks/agentgate\n    secret_file: {}\n    events: [ticket_created, ticket_denied]\n",
        secret_file.display()
    );
    let (pg, gate) = start_with(&extra);
    let psql = spawn_psql(&gate, &pg, "bot", "DELETE FROM t");
    let ticket = pending_ticket(&gate, "bot", "DELETE FROM t");
    let id = ticket["id"].as_u64().unwrap();
    cli_ok(
        &gate,
        &["approvals", "deny", &id.to_string(), "--reason", "hooked"],
    );
    finish(psql, "psql");
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let (headers, body) = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("webhook delivery");
        let h = |k: &str| {
            headers
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("no {k} header in {headers:?}"))
        };
        let ts = h("x-agentgate-timestamp");
        let sig = h("x-agentgate-signature");
        assert_eq!(
            sig,
            format!("sha256={}", hmac_hex(secret, &format!("{ts}.{body}")))
        );
        assert_ne!(
            sig,
            format!("sha256={}", hmac_hex("wrong", &format!("{ts}.{body}")))
        );
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["event"], h("x-agentgate-event"));
        assert_eq!(v["data"]["id"].as_u64(), Some(id));
        seen.push(v["event"].as_str().unwrap().to_string());
    }
    assert_eq!(seen, ["ticket_created", "ticket_denied"]);
}

#[test]
fn an_approved_read_is_masked_per_policy() {
    let (pg, gate) = start();
    let psql = spawn_psql(
        &gate,
        &pg,
        "bot",
        "SELECT id, email FROM people ORDER BY id",
    );
    let ticket = pending_ticket(&gate, "bot", "FROM people");
    assert_eq!(ticket["rule"], "personal-data");
    decide(&gate, "approve", &ticket, &[]);
    let o = finish(psql, "psql");
    let out = text(&o.stdout);
    assert!(out.contains("(2 rows)"), "{}", show(&o));
    assert!(
        !out.contains("ada@example.com") && !out.contains("grace@example.org"),
        "{out}"
    );
    assert!(out.contains("REDACTED"), "{out}");
}

/// One HTTP/1.1 request to the admin listener: (status, JSON body).
fn http(port: u16, method: &str, path: &str, token: &str, body: &Value) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect admin listener");
    let body = body.to_string();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn jwt(secret: &str, sub: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({ "sub": sub, "exp": exp }),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[test]
fn approvers_over_http_are_named_by_their_jwt_and_an_agent_identity_cannot_approve() {
    let secret = "an-hs256-secret-of-at-least-32-bytes!!";
    let dir = std::env::temp_dir().join(agentgate_tests::unique("jwt"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("secret"), secret).unwrap();
    let port = agentgate_tests::free_port();
    let extra = format!(
        "admin:\n  http:\n    listen: 127.0.0.1:{port}\n    jwt: {{ algorithm: HS256, secret_file: {} }}\n",
        dir.join("secret").display()
    );
    let (pg, gate) = start_with(&extra);
    let psql = spawn_psql(&gate, &pg, "bot", "DELETE FROM t");
    let ticket = pending_ticket(&gate, "bot", "DELETE FROM t");
    let id = ticket["id"].as_u64().unwrap();
    let approve = format!("/v1/approvals/{id}/approve");
    // A token whose subject is the agent itself cannot decide the agent's ticket.
    let (status, body) = http(
        port,
        "POST",
        &approve,
        &jwt(secret, "bot"),
        &serde_json::json!({}),
    );
    assert_eq!(status, 403, "{body}");
    // A hash other than the ticket's approves nothing.
    let wrong = serde_json::json!({ "sha256": "ab".repeat(32) });
    let (status, body) = http(port, "POST", &approve, &jwt(secret, "alice"), &wrong);
    assert_eq!(status, 409, "{body}");
    let (status, body) = http(
        port,
        "GET",
        "/v1/approvals",
        &jwt(secret, "alice"),
        &Value::Null,
    );
    assert_eq!(status, 200);
    assert_eq!(body["data"][0]["id"].as_u64(), Some(id), "{body}");
    let right = serde_json::json!({ "sha256": ticket["sha256"], "reason": "reviewed in chat" });
    let (status, body) = http(port, "POST", &approve, &jwt(secret, "alice"), &right);
    assert_eq!(status, 200, "{body}");
    let o = finish(psql, "psql");
    assert!(text(&o.stdout).contains("DELETE 3"), "{}", show(&o));
    let t = tickets(&gate, true)
        .into_iter()
        .find(|t| t["id"].as_u64() == Some(id))
        .unwrap();
    assert_eq!(t["decided_by"], "jwt:alice");
    let (_, shown, _) = session_of(&gate, "bot");
    assert!(
        shown.contains(&format!(
            "ticket {id} approved by jwt:alice: reviewed in chat"
        )),
        "{shown}"
    );
}
