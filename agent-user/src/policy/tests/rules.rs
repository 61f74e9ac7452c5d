//! Configuration parsing and validation.

use std::time::Duration;

use super::super::rules::{
    Action, ActionKind, DefaultAction, MatchConfig, Mode, PolicyConfig, PolicyError, PolicyFile,
    compile,
};
use super::parse_policies;

pub(super) const EXAMPLE: &str = r#"
policies:
  - name: analytics-readonly        # unique
    roles: [analyst]                # applies to an agent that has any of these roles ("*" = any)
    targets: [app-db]               # target names ("*" = any)
    mode: enforce                   # or shadow: decide and record, block nothing
    default: deny                   # allow | deny  (default deny)
    default_message: "not allowed by policy"   # optional
    mask: [pii]                     # optional mask profile names
    rules:
      - name: no-ddl
        match: { kinds: [ddl, dcl] }
        action: deny
        message: "schema changes are not allowed"
      - name: dangerous-functions
        match: { functions: [pg_read_file, pg_read_binary_file, pg_ls_dir, lo_import, lo_export, dblink, dblink_exec, pg_terminate_backend, pg_cancel_backend, pg_reload_conf] }
        action: deny
      - name: copy-program
        match: { copy_program: true }   # also copy_file: true
        action: deny
      - name: unbounded-writes
        match: { kinds: [update, delete], without_where: true }
        action: review
        timeout: 5m
      - name: customers
        match: { tables: ["public.customers", "crm.*"], access: read }
        action: allow
        mask: [pii]
"#;

#[test]
fn example_policy_parses_and_compiles() {
    let file: PolicyFile = serde_norway::from_str(EXAMPLE).unwrap();
    assert_eq!(file.policies.len(), 1);
    let cfg = &file.policies[0];
    assert_eq!(cfg.name, "analytics-readonly");
    assert_eq!(cfg.mode, Mode::Enforce);
    assert_eq!(cfg.default, DefaultAction::Deny);
    assert_eq!(cfg.rules.len(), 5);
    assert_eq!(cfg.rules[3].action, ActionKind::Review);
    let MatchConfig::Conditions(c) = &cfg.rules[4].matches else {
        panic!("expected conditions");
    };
    assert_eq!(
        c.tables.as_deref(),
        Some(&["public.customers".to_string(), "crm.*".to_string()][..])
    );

    let set = compile(file.policies).unwrap();
    let policy = &set.policies()[0];
    assert_eq!(policy.name(), "analytics-readonly");
    let rules: Vec<&str> = policy.rules().iter().map(|r| r.name()).collect();
    assert_eq!(
        rules,
        [
            "no-ddl",
            "dangerous-functions",
            "copy-program",
            "unbounded-writes",
            "customers"
        ]
    );
    assert_eq!(
        policy.rules()[0].action(),
        &Action::Deny {
            message: Some("schema changes are not allowed".into())
        }
    );
    assert_eq!(
        policy.rules()[3].action(),
        &Action::Review {
            timeout: Duration::from_secs(300)
        }
    );
}

#[test]
fn defaults() {
    let cfg = parse_policies(
        r#"
policies:
  - name: p
    roles: ["*"]
    targets: ["*"]
    rules:
      - name: r
        match: any
        action: review
"#,
    );
    assert_eq!(cfg[0].mode, Mode::Enforce);
    assert_eq!(cfg[0].default, DefaultAction::Deny);
    assert_eq!(cfg[0].rules[0].matches, MatchConfig::Any);
    let set = compile(cfg).unwrap();
    assert_eq!(
        set.policies()[0].rules()[0].action(),
        &Action::Review {
            timeout: Duration::from_secs(5 * 60)
        }
    );
}

#[test]
fn empty_match_is_a_mapping() {
    let cfg = parse_policies(
        r#"
policies:
  - name: p
    roles: [a]
    targets: [t]
    rules:
      - { name: r, match: {}, action: allow }
"#,
    );
    assert!(matches!(
        cfg[0].rules[0].matches,
        MatchConfig::Conditions(_)
    ));
    compile(cfg).unwrap();
}

fn yaml_error(yaml: &str) -> String {
    serde_norway::from_str::<PolicyFile>(yaml)
        .unwrap_err()
        .to_string()
}

#[test]
fn unknown_fields_and_values_are_rejected_by_serde() {
    let err = yaml_error(
        r#"
policies:
  - name: p
    roles: [a]
    targets: [t]
    rules:
      - { name: r, match: { kind: [ddl] }, action: deny }
"#,
    );
    assert!(err.contains("unknown field `kind`"), "{err}");

    let err = yaml_error(
        r#"
policies:
  - name: p
    roles: [a]
    targets: [t]
    rule: []
"#,
    );
    assert!(err.contains("unknown field `rule`"), "{err}");

    let err = yaml_error(
        r#"
policies:
  - { name: p, roles: [a], targets: [t], rules: [ { name: r, match: everything, action: deny } ] }
"#,
    );
    assert!(err.contains("`any` or a mapping"), "{err}");

    let err = yaml_error(
        r#"
policies:
  - { name: p, roles: [a], targets: [t], rules: [ { name: r, match: any, action: block } ] }
"#,
    );
    assert!(err.contains("unknown variant `block`"), "{err}");

    let err = yaml_error(
        r#"
policies:
  - { name: p, roles: [a], targets: [t], mode: audit }
"#,
    );
    assert!(err.contains("unknown variant `audit`"), "{err}");
}

fn compile_error(yaml: &str) -> PolicyError {
    compile(parse_policies(yaml)).unwrap_err()
}

#[test]
fn validation_errors_name_policy_and_rule() {
    let err = compile_error(
        r#"
policies:
  - name: p
    roles: [a]
    targets: [t]
    rules:
      - { name: r, match: { kinds: [select, dml] }, action: deny }
"#,
    );
    assert_eq!(err.policy(), "\"p\"");
    assert_eq!(err.rule(), Some("\"r\""));
    let msg = err.to_string();
    assert!(
        msg.starts_with(
            r#"policy "p", rule "r": unknown statement kind "dml" (expected one of: select, insert"#
        ),
        "{msg}"
    );

    let cases: &[(&str, &str)] = &[
        (
            r#"
policies:
  - { name: p, roles: [a], targets: [t] }
  - { name: p, roles: [b], targets: [t] }
"#,
            r#"policy "p": duplicate policy name"#,
        ),
        (
            r#"
policies:
  - { name: " ", roles: [a], targets: [t] }
"#,
            "policy #1: name must not be empty",
        ),
        (
            r#"
policies:
  - { name: p, roles: [], targets: [t] }
"#,
            r#"policy "p": `roles` must not be empty (use "*" for any)"#,
        ),
        (
            r#"
policies:
  - name: p
    roles: [a]
    targets: [t]
    rules:
      - { name: r, match: any, action: allow }
      - { name: r, match: any, action: deny }
"#,
            r#"policy "p", rule "r": duplicate rule name in this policy"#,
        ),
        (
            r#"
policies:
  - name: p
    roles: [a]
    targets: [t]
    rules:
      - { name: "", match: any, action: allow }
"#,
            "policy \"p\", rule #1: name must not be empty",
        ),
        (
            r#"
policies:
  - name: p
    roles: [a]
    targets: [t]
    rules:
      - { name: slow, match: any, action: review, timeout: 5 parsecs }
"#,
            r#"policy "p", rule "slow": bad timeout "5 parsecs""#,
        ),
        (
            r#"
policies:
  - name: p
    roles: [a]
    targets: [t]
    rules:
      - { name: slow, match: any, action: review, timeout: 8days }
"#,
            r#"policy "p", rule "slow": bad timeout "8days": at most 7 days"#,
        ),
        (
            r#"
policies:
  - name: p
    roles: [a]
    targets: [t]
    rules:
      - { name: slow, match: any, action: review, timeout: 300000000000years }
"#,
            r#"policy "p", rule "slow": bad timeout "300000000000years""#,
        ),
        (
            r#"
policies:
  - name: p
    roles: [a]
    targets: [t]
    rules:
      - { name: r, match: { tables: [] }, action: deny }
"#,
            r#"policy "p", rule "r": `match.tables` must not be empty"#,
        ),
        (
            r#"
policies:
  - name: p
    roles: [a]
    targets: [t]
    rules:
      - { name: r, match: { functions: [""] }, action: deny }
"#,
            r#"policy "p", rule "r": `match.functions` contains an empty name"#,
        ),
        (
            r#"
policies:
  - name: p
    roles: [a]
    targets: [t]
    rules:
      - { name: r, match: any, action: deny, timeout: 5m }
"#,
            r#"policy "p", rule "r": `timeout` only applies to `action: review`"#,
        ),
        (
            r#"
policies:
  - name: p
    roles: [a]
    targets: [t]
    rules:
      - { name: r, match: any, action: allow, message: hi }
"#,
            r#"policy "p", rule "r": `message` only applies to `action: deny`"#,
        ),
        (
            r#"
policies:
  - name: p
    roles: [a]
    targets: [t]
    rules:
      - { name: r, match: { tables: ["db.s.t"] }, action: deny }
"#,
            r#"policy "p", rule "r": table pattern "db.s.t" has too many parts"#,
        ),
        (
            r#"
policies:
  - name: p
    roles: [a]
    targets: [t]
    rules:
      - { name: r, match: { tables_only: ['"Public.x'] }, action: allow }
"#,
            r#"policy "p", rule "r": unterminated quote in pattern"#,
        ),
        (
            r#"
policies:
  - name: p
    roles: [a]
    targets: [t]
    rules:
      - { name: r, match: { functions: [pg_catalog.pg_read_file] }, action: deny }
"#,
            r#"policy "p", rule "r": function "pg_catalog.pg_read_file" must be a bare name"#,
        ),
    ];
    for (yaml, expected) in cases {
        let msg = compile_error(yaml).to_string();
        assert!(
            msg.starts_with(expected),
            "expected {expected:?}, got {msg:?}"
        );
    }
}

#[test]
fn config_round_trips_through_serde() {
    let file: PolicyFile = serde_norway::from_str(EXAMPLE).unwrap();
    let yaml = serde_norway::to_string(&file).unwrap();
    let again: PolicyFile = serde_norway::from_str(&yaml).unwrap();
    assert_eq!(file, again);
    let any = PolicyConfig {
        rules: vec![],
        ..file.policies[0].clone()
    };
    assert!(compile(vec![any]).is_ok());
}

#[test]
fn glob_patterns() {
    use super::super::facts::{Access, TableRef};
    let set = compile(parse_policies(
        r#"
policies:
  - name: p
    roles: [a]
    targets: [t]
    rules:
      - { name: r, match: { tables: ["s*.*_log", "*a*a*a*a*a*a*a*a*b", '"x*y"'] }, action: deny }
"#,
    ))
    .unwrap();
    let rule = &set.policies()[0].rules()[0];
    let patterns = rule.matcher.tables.as_ref().unwrap();
    let t = |schema: Option<&str>, name: &str| TableRef {
        schema: schema.map(str::to_string),
        name: name.to_string(),
        access: Access::Read,
    };
    assert!(patterns[0].matches(&t(Some("sales"), "audit_log"), false));
    assert!(patterns[0].matches(&t(Some("s"), "_log"), false));
    assert!(!patterns[0].matches(&t(Some("sales"), "audit_logs"), false));
    assert!(!patterns[0].matches(&t(Some("public"), "audit_log"), false));
    // No exponential backtracking.
    assert!(!patterns[1].matches(&t(None, &"a".repeat(63)), false));
    assert!(patterns[1].matches(&t(None, &format!("{}b", "a".repeat(62))), false));
    // Quoted `*` is literal.
    assert!(patterns[2].matches(&t(None, "x*y"), false));
    assert!(!patterns[2].matches(&t(None, "xzy"), false));
}
