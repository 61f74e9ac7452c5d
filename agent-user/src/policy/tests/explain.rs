//! Explanations.

use super::super::eval::{Subject, Verdict};
use super::super::explain::explain;
use super::policies;

const SET: &str = r#"
policies:
  - name: interns
    roles: [intern]
    targets: [db]
    default: deny
  - name: analysts
    roles: [analyst]
    targets: [db]
    mask: [pii]
    rules:
      - { name: no-ddl, match: { kinds: [ddl] }, action: deny, message: "no schema changes" }
      - { name: reads, match: { kinds: [select] }, action: allow }
  - name: staging
    roles: [analyst]
    targets: [staging]
    mode: shadow
"#;

#[test]
fn explains_policies_rules_and_verdict() {
    let set = policies(SET);
    let roles = vec!["analyst".to_string()];
    let subject = Subject {
        agent: "bob",
        roles: &roles,
    };
    let e = explain(
        &set,
        &subject,
        "db",
        "SELECT * FROM customers; DROP TABLE t",
    );

    let applies: Vec<(&str, bool, bool)> = e
        .policies
        .iter()
        .map(|p| (p.name.as_str(), p.applies, p.decides))
        .collect();
    assert_eq!(
        applies,
        [
            ("interns", false, false),
            ("analysts", true, true),
            ("staging", false, false)
        ]
    );
    assert_eq!(e.statements.len(), 2);
    let first: Vec<(&str, bool)> = e.statements[0]
        .rules
        .iter()
        .map(|r| (r.rule.as_str(), r.matched))
        .collect();
    assert_eq!(first, [("no-ddl", false), ("reads", true)]);
    assert_eq!(e.statements[1].rules.len(), 1);
    assert_eq!(e.statements[1].decision.rule.as_deref(), Some("no-ddl"));
    assert_eq!(
        e.decision.verdict,
        Verdict::Deny {
            message: "statement 2 of 2: no schema changes".into()
        }
    );
    assert_eq!(e.enforced, e.decision.verdict);

    let text = e.to_string();
    for expected in [
        "agent bob (roles: analyst) -> target db",
        "  - interns [enforce]: skipped: agent has none of the roles [intern]",
        "  * analysts [enforce]: applies (role analyst, target db)",
        "  - staging [shadow]: skipped: target db not in [staging]",
        "statement 1: SELECT * FROM customers",
        "  kind: select (kinds: select)",
        "  tables: customers (read)",
        "    no-ddl: no match",
        "    reads: MATCH",
        "  decision: allow [policy analysts, rule reads] mask: pii",
        "statement 2: DROP TABLE t",
        "  tables: t (write)",
        "  decision: deny: no schema changes [policy analysts, rule no-ddl]",
        "result: deny: statement 2 of 2: no schema changes [policy analysts, rule no-ddl]",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }

    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["policies"][1]["decides"], true);
    assert_eq!(json["statements"][0]["rules"][1]["matched"], true);
    assert_eq!(json["decision"]["verdict"]["kind"], "deny");
}

#[test]
fn explains_shadow_default_and_parse_errors() {
    let set = policies(SET);
    let roles = vec!["analyst".to_string()];
    let subject = Subject {
        agent: "bob",
        roles: &roles,
    };
    let e = explain(&set, &subject, "staging", "DELETE FROM t");
    assert_eq!(e.enforced, Verdict::Allow);
    let text = e.to_string();
    assert!(text.contains("  flags: without-where"), "{text}");
    assert!(
        text.contains("result: deny: not allowed by policy \"staging\": no rule allows it [policy staging, default] (shadow)"),
        "{text}"
    );
    assert!(text.contains("enforced: allow (shadow mode)"), "{text}");

    let e = explain(&set, &subject, "db", "SELEC 1");
    assert!(e.parse_error.is_some());
    assert!(e.statements.is_empty());
    let text = e.to_string();
    assert!(text.contains("parse error: sql parser error"), "{text}");
    assert!(
        text.contains("[policy analysts, rule unparseable]"),
        "{text}"
    );

    // sqlparser would read one string constant, PostgreSQL a parameter and a function call.
    let e = explain(
        &set,
        &subject,
        "db",
        "SELECT $1a$, pg_read_file($$/etc/hostname$$) AS x, $1a$",
    );
    assert!(matches!(e.enforced, Verdict::Deny { .. }), "{e}");
    let text = e.to_string();
    assert!(text.contains("dollar-quote tag"), "{text}");
    assert!(
        text.contains("[policy analysts, rule unparseable]"),
        "{text}"
    );

    let nobody = Subject {
        agent: "eve",
        roles: &[],
    };
    let e = explain(&set, &nobody, "db", "SELECT 1");
    assert!(e.policies.iter().all(|p| !p.applies));
    assert!(
        e.to_string()
            .contains("result: deny: no policy grants agent \"eve\" access to target \"db\""),
        "{e}"
    );
}
