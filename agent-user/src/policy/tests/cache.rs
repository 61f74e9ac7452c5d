//! The facts cache: a cached decision is the uncached one, whatever came before it.

use std::sync::Arc;

use super::super::cache::{Shape, shape};
use super::super::eval::{QueryDecision, Subject};
use super::super::facts::{ExtractOptions, extract};
use super::super::rules::{PolicySet, compile};
use super::{parse_policies, policies};

const POSTGRES_YAML: &str = include_str!("../../../../policies/postgres.yaml");

/// The policies `cargo xtask bench postgres` runs, with an empty cache.
fn bench_policies() -> PolicySet {
    // The file also holds masking profiles, which are not policies.
    let (policies_part, _) = POSTGRES_YAML.split_once("\nmasking:").unwrap();
    compile(parse_policies(policies_part)).unwrap()
}

/// The same policies as `set`, with a cache of their own.
fn fresh(set: &PolicySet) -> PolicySet {
    PolicySet {
        policies: set.policies.clone(),
        cache: Arc::default(),
    }
}

const ON: ExtractOptions = ExtractOptions {
    standard_conforming_strings: true,
};
const OFF: ExtractOptions = ExtractOptions {
    standard_conforming_strings: false,
};

/// Decides `sql` through the cache and without it; they must be equal, texts included.
fn check(set: &PolicySet, roles: &[String], sql: &str, opts: &ExtractOptions) -> QueryDecision {
    let subject = Subject {
        agent: "bot",
        roles,
    };
    let cached = set.decide_query_with(&subject, "db", sql, opts);
    let uncached = set.decide_query_uncached(&subject, "db", sql, opts);
    assert_eq!(cached, uncached, "{sql:?} ({opts:?}, roles {roles:?})");
    cached
}

fn roles(r: &[&str]) -> Vec<String> {
    r.iter().map(|s| s.to_string()).collect()
}

/// Statements written to probe the lexer and the places where numbers matter.
const CORPUS: &[&str] = &[
    // pgbench, as it sends them in simple mode.
    "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
    "BEGIN;",
    "UPDATE pgbench_accounts SET abalance = abalance + -4321 WHERE aid = 77;",
    "UPDATE pgbench_tellers SET tbalance = tbalance + 12 WHERE tid = 3;",
    "UPDATE pgbench_branches SET bbalance = bbalance + 12 WHERE bid = 1;",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (3, 1, 5, 12, CURRENT_TIMESTAMP);",
    "END;",
    "BEGIN; UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 5; SELECT abalance FROM pgbench_accounts WHERE aid = 5; END;",
    // Writes with numbers; without WHERE; numbers in identifiers.
    "INSERT INTO t VALUES (1, 'a'), (2, 'b')",
    "INSERT INTO t1 (c1, c2) VALUES (10, 20) RETURNING c1",
    "UPDATE t SET a = a + -5 WHERE id = 3",
    "UPDATE t SET a = 5",
    "DELETE FROM t WHERE id IN (1, 2, 3)",
    "DELETE FROM t",
    "DELETE FROM t WHERE 1 = 1",
    "UPDATE t SET a = 5 WHERE 1 = 2 OR 3 > 4",
    "UPDATE pg_catalog.pg_attribute SET attnum = 2 WHERE attnum = 1",
    "SELECT t1.c2 FROM t1 JOIN t2 ON t1.id = t2.id LIMIT 10 OFFSET 20",
    "SELECT * FROM t OFFSET 5 LIMIT 5",
    "SELECT * FROM t ORDER BY 1 FETCH FIRST 3 ROWS ONLY",
    "SELECT x10, _1, a1b2 FROM s1.t2 WHERE y3 = 4",
    // Strings that look like numbers; quoted identifiers with digits.
    "SELECT '123', '1' || 2 FROM t WHERE c = '42'",
    "SELECT 'it''s 1', \"a\"\"1\" FROM \"t 1\" WHERE \"2\" = 2",
    "SELECT * FROM t WHERE name = 'pg_read_file(1)'",
    // Negative numbers, arithmetic, comparisons, casts, arrays, parameters.
    "SELECT -1, - 1, 2-1, 2 - -1, 3*4/5%6, 1<2, 1>=2, 1<>2, 1!=2, 2^3",
    "SELECT 1::int, 2::int8, '3'::int, CAST(4 AS bigint), 5::numeric(10,2)",
    "SELECT a[1], a[1:2], b[2][3] FROM t",
    "SELECT $1::int, $2 + 1 FROM t WHERE id = $3",
    "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
    "SELECT x->1, x->>'a', x#>'{a,1}', x @> '[1]', x ? 'a' FROM t",
    "SELECT 1||2, 1|2, 1&2, 1#2, ~1, |/25, @-5",
    // Decimals and forms the lexer gives up on.
    "SELECT 1.5, 0.25, 10.0 FROM t WHERE p > 9.99",
    "SELECT .5, 5., 1e5, 1.5e-3, 2E+4, 0x1F, 0o17, 0b101, 1_000, 1L",
    "SELECT 1e5",
    "SELECT t.1 FROM t",
    "SELECT :1, @1, ?1",
    "SELECT 123456789012345678, 1234567890123456789, 99999999999999999999999",
    "CREATE TABLE t (a VARCHAR(10), b NUMERIC(5, 2), c TIMESTAMP(3))",
    "CREATE TABLE t (a VARCHAR(99999999999999999999))",
    "SELECT CAST(x AS VARCHAR(12345678901234567890)) FROM t",
    // Comments, dollar quotes, prefixed literals, backslashes, non-ASCII.
    "SELECT 1 -- one",
    "SELECT /* 1 */ 2",
    "SELECT 1--2",
    "DO $$ BEGIN PERFORM pg_read_file('/etc/passwd'); END $$",
    "SELECT $tag$ 1 $tag$",
    "SELECT E'\\n1', B'101', X'1F', N'x1', U&'\\0041', U&\"a1\"",
    "SELECT 'a\\b', 1",
    "SELECT 'é', 1",
    "SELECT é1 FROM t",
    "SELECT {1}",
    "SELECT\t1\r\n,\n2",
    // Where numbers decide facts.
    "EXPLAIN (ANALYZE 0) DELETE FROM t WHERE id = 1",
    "EXPLAIN (ANALYZE 1) DELETE FROM t WHERE id = 1",
    "EXPLAIN (ANALYZE 2) DELETE FROM t WHERE id = 1",
    "EXPLAIN (ANALYZE) SELECT 1",
    "EXPLAIN ANALYZE SELECT * FROM t WHERE id = 1",
    "SET standard_conforming_strings = 1",
    "SET standard_conforming_strings = 0",
    "SET standard_conforming_strings = 2",
    "SELECT set_config('standard_conforming_strings', '1', false)",
    "SELECT set_config('standard_conforming_strings', 1, false)",
    "SELECT set_config('standard_conforming_strings', 0, false)",
    "SET work_mem = 1024",
    "SET search_path = 1",
    "SELECT pg_sleep(1), generate_series(1, 10), pg_read_file('x', 0, 100)",
    "SELECT * FROM generate_series(1, 10) AS g(n)",
    // Several statements, empty ones, parentheses holding `;`.
    "SELECT 1; SELECT 2;",
    "SELECT 1;; ;SELECT 2",
    ";",
    "",
    "   ",
    "(SELECT 1); SELECT 2",
    "CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO u VALUES (1); INSERT INTO v VALUES (2))",
    "SELECT 1; DO $$ BEGIN NULL; END $$; SELECT 2",
    "SELECT 1; CLUSTER t; SELECT 2",
    "TABLE t",
    "TABLE t; SELECT 1",
    "VACUUM (VERBOSE, ANALYZE) t",
    // Other statement kinds with numbers.
    "COPY t TO '/tmp/1'",
    "COPY (SELECT 1) TO STDOUT",
    "COPY t FROM PROGRAM 'echo 1'",
    "PREPARE p(int) AS SELECT * FROM t WHERE id = $1",
    "EXECUTE p(1)",
    "DEALLOCATE p",
    "FETCH 5 FROM c",
    "DECLARE c CURSOR FOR SELECT * FROM t WHERE id > 10",
    "LOCK TABLE t IN ACCESS EXCLUSIVE MODE",
    "GRANT SELECT ON t1 TO u2",
    "DROP TABLE t1",
    "ALTER SEQUENCE s RESTART 100",
    "WITH x AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM x LIMIT 1",
    "SELECT * FROM t WHERE id = 1 UNION SELECT * FROM u WHERE id = 2",
    "SELECT count(*) FILTER (WHERE x > 1) OVER (ROWS BETWEEN 1 PRECEDING AND 2 FOLLOWING) FROM t",
    "SELECT 1 END",
    "selec 1",
    "SELECT (1",
    "SELECT 1)",
    "SELECT 'unterminated",
];

/// String literals of Rust source (the other policy tests: hundreds of statements).
fn string_literals(src: &str) -> Vec<String> {
    let chars: Vec<char> = src.chars().collect();
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = at(i);
        let ident_before = i > 0 && (at(i - 1).is_alphanumeric() || at(i - 1) == '_');
        if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && at(i) != '\n' {
                i += 1;
            }
        } else if c == '\'' {
            // A char literal or a lifetime.
            if at(i + 1) == '\\' {
                i += 2;
                while at(i) != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                i += 1;
            }
        } else if c == 'r' && !ident_before && (at(i + 1) == '"' || at(i + 1) == '#') {
            let mut hashes = 0;
            let mut j = i + 1;
            while at(j) == '#' {
                hashes += 1;
                j += 1;
            }
            if at(j) != '"' {
                i += 1;
                continue;
            }
            let start = j + 1;
            let mut k = start;
            loop {
                if at(k) == '"' && (1..=hashes).all(|h| at(k + h) == '#') {
                    break;
                }
                k += 1;
            }
            out.push(chars[start..k].iter().collect());
            i = k + 1 + hashes;
        } else if c == '"' {
            let mut s = String::new();
            let mut j = i + 1;
            loop {
                match at(j) {
                    '"' => break,
                    '\\' => {
                        j += 1;
                        match at(j) {
                            'n' => s.push('\n'),
                            't' => s.push('\t'),
                            'r' => s.push('\r'),
                            '0' => s.push('\0'),
                            '\n' => {
                                while at(j + 1).is_whitespace() {
                                    j += 1;
                                }
                            }
                            'u' => {
                                let close = (j..).find(|&k| at(k) == '}').unwrap();
                                let hex: String = chars[j + 2..close].iter().collect();
                                s.push(
                                    char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap(),
                                );
                                j = close;
                            }
                            other => s.push(other),
                        }
                    }
                    other => s.push(other),
                }
                j += 1;
            }
            out.push(s);
            i = j + 1;
        } else {
            i += 1;
        }
    }
    out
}

/// `sql` with its digit runs (anywhere: in numbers, strings, names) rewritten.
fn variants(sql: &str) -> Vec<String> {
    let rewrite = |f: &dyn Fn(usize) -> String| {
        let mut out = String::new();
        let mut run = 0;
        let mut in_digits = false;
        for c in sql.chars() {
            if c.is_ascii_digit() {
                if !in_digits {
                    out.push_str(&f(run));
                    run += 1;
                }
                in_digits = true;
            } else {
                in_digits = false;
                out.push(c);
            }
        }
        out
    };
    let mut all: Vec<String> = [
        "0",
        "1",
        "7",
        "42",
        "123456789012345678",
        "1234567890123456789",
        "9999999999999999999",
        "12345678901234567890",
    ]
    .iter()
    .map(|v| rewrite(&|_| v.to_string()))
    .collect();
    all.push(rewrite(&|i| (i + 2).to_string()));
    all.push(rewrite(&|i| if i == 0 { "9".into() } else { "0".into() }));
    all.retain(|v| v != sql);
    all.dedup();
    all
}

#[test]
fn cached_decisions_equal_uncached_ones_over_a_corpus() {
    let base = bench_policies();
    let mut corpus: Vec<String> = CORPUS.iter().map(|s| s.to_string()).collect();
    for src in [
        include_str!("facts.rs"),
        include_str!("eval.rs"),
        include_str!("explain.rs"),
    ] {
        corpus.extend(string_literals(src));
    }
    corpus.sort();
    corpus.dedup();
    assert!(corpus.len() > 400, "only {} statements", corpus.len());
    let who = [roles(&["analyst"]), roles(&["auditor"]), roles(&[])];
    let (mut hits, mut checks, mut parsed) = (0, 0, 0);
    for sql in &corpus {
        // A cache of its own: what is checked is this statement, then its variants.
        let set = fresh(&base);
        for opts in [ON, OFF] {
            for r in &who {
                check(&set, r, sql, &opts); // miss
                check(&set, r, sql, &opts); // hit, when cacheable
            }
            for v in variants(sql) {
                check(&set, &who[0], &v, &opts);
            }
        }
        if extract(sql).is_ok() {
            let stats = set.cache_stats();
            hits += stats.hits;
            checks += stats.hits + stats.misses + stats.uncacheable;
            parsed += 1;
        }
    }
    // Not vacuous: most decisions on SQL that parses come from the cache.
    assert!(parsed > 300, "only {parsed} statements parse");
    assert!(hits * 2 > checks, "{hits} hits in {checks} decisions");
}

#[test]
fn a_hit_with_other_numbers_records_the_queries_own_text() {
    let set = bench_policies();
    let analyst = roles(&["analyst"]);
    let first = check(
        &set,
        &analyst,
        "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
        &ON,
    );
    let second = check(
        &set,
        &analyst,
        "SELECT abalance FROM pgbench_accounts WHERE aid = 7;",
        &ON,
    );
    let stats = set.cache_stats();
    assert_eq!((stats.hits, stats.misses), (1, 1), "{stats:?}");
    assert_eq!(
        &*first.statements[0].facts.text,
        "SELECT abalance FROM pgbench_accounts WHERE aid = 12345"
    );
    assert_eq!(
        &*second.statements[0].facts.text,
        "SELECT abalance FROM pgbench_accounts WHERE aid = 7"
    );
    assert_eq!(
        second.statements[0].facts.tables,
        first.statements[0].facts.tables
    );
    assert!(second.decision.verdict.is_allow());

    // Several statements: each gets its own slice.
    let q = "BEGIN;\n UPDATE pgbench_accounts SET abalance = abalance + -1 WHERE aid = 5 ;\nEND;";
    check(&set, &analyst, q, &ON);
    let q = "BEGIN;\n UPDATE pgbench_accounts SET abalance = abalance + -99 WHERE aid = 6 ;\nEND;";
    let d = check(&set, &analyst, q, &ON);
    let texts: Vec<&str> = d.statements.iter().map(|s| s.facts.text.as_ref()).collect();
    assert_eq!(
        texts,
        [
            "BEGIN",
            "UPDATE pgbench_accounts SET abalance = abalance + -99 WHERE aid = 6",
            "END"
        ]
    );
    assert_eq!(set.cache_stats().hits, 2);
}

#[test]
fn facts_that_read_numbers_are_not_shared() {
    let set = bench_policies();
    let analyst = roles(&["analyst"]);
    // Allowed (reads and writes), then must not be served to its ANALYZE-on twin.
    let off = check(
        &set,
        &analyst,
        "EXPLAIN (ANALYZE 0) DELETE FROM t WHERE id = 1",
        &ON,
    );
    assert!(!off.statements[0].facts.explain_analyze);
    let on = check(
        &set,
        &analyst,
        "EXPLAIN (ANALYZE 1) DELETE FROM t WHERE id = 1",
        &ON,
    );
    assert!(on.statements[0].facts.explain_analyze);
    // `= 1` is allowed; `= 0` turns standard_conforming_strings off and must stay refused.
    check(&set, &analyst, "SET standard_conforming_strings = 1", &ON);
    let d = check(&set, &analyst, "SET standard_conforming_strings = 0", &ON);
    assert!(d.parse_error.is_some(), "{d:?}");
    assert_eq!(set.cache_stats().hits, 0);
}

#[test]
fn policies_are_evaluated_for_each_subject() {
    // The cache holds facts only: the same shape gets each subject's decision.
    let set = policies(
        r#"
policies:
  - name: readers
    roles: [reader]
    targets: [db]
    default: deny
    rules:
      - { name: reads, match: { kinds: [select] }, action: allow }
  - name: writers
    roles: [writer]
    targets: [db]
    default: allow
    mask: [pii]
"#,
    );
    let reader = check(
        &set,
        &roles(&["reader"]),
        "UPDATE t SET a = 1 WHERE id = 2",
        &ON,
    );
    let writer = check(
        &set,
        &roles(&["writer"]),
        "UPDATE t SET a = 3 WHERE id = 4",
        &ON,
    );
    let nobody = check(&set, &roles(&[]), "UPDATE t SET a = 5 WHERE id = 6", &ON);
    assert_eq!(reader.decision.verdict.name(), "deny");
    assert_eq!(writer.decision.verdict.name(), "allow");
    assert_eq!(*writer.decision.mask, ["pii"]);
    assert_eq!(nobody.decision.policy, None);
    assert_eq!(set.cache_stats().hits, 2);
}

#[test]
fn shapes_normalize_integers_only() {
    let key = |sql: &str| shape(sql, &ON).map(|s| s.key);
    let same = [
        (
            "SELECT * FROM t WHERE id = 1",
            "SELECT * FROM t WHERE id = 987654",
        ),
        ("SELECT 1::int", "SELECT 22::int"),
        ("SELECT -1", "SELECT -5"),
        ("SELECT a[1]", "SELECT a[2]"),
        ("LIMIT 10", "LIMIT 20"),
        ("SELECT 123456789012345678", "SELECT 1"),
    ];
    for (a, b) in same {
        assert!(key(a).is_some(), "{a}");
        assert_eq!(key(a), key(b), "{a} / {b}");
    }
    let different = [
        ("SELECT '1'", "SELECT '2'"),
        ("SELECT t1", "SELECT t2"),
        ("SELECT \"1\"", "SELECT \"2\""),
        ("SELECT $1", "SELECT $2"),
        ("SELECT 1.5", "SELECT 2.5"),
        ("SELECT 1234567890123456789", "SELECT 1234567890123456780"),
        ("SELECT 1 ", "SELECT 1"),
        ("SELECT 1,2", "SELECT 1, 2"),
    ];
    for (a, b) in different {
        assert!(key(a).is_some(), "{a}");
        assert_ne!(key(a), key(b), "{a} / {b}");
    }
    assert_ne!(
        shape("SELECT 1", &ON).map(|s| s.key),
        shape("SELECT 1", &OFF).map(|s| s.key)
    );
    let refused = [
        "SELECT 1e5",
        "SELECT 1.",
        "SELECT .5",
        "SELECT 0x1F",
        "SELECT 1_000",
        "SELECT 1L",
        "SELECT t.1",
        "SELECT :1",
        "SELECT @1",
        "SELECT ?1",
        "SELECT 1 -- c",
        "SELECT /* c */ 1",
        "SELECT $$1$$",
        "SELECT $a",
        "SELECT E'x'",
        "SELECT e'x'",
        "SELECT B'1'",
        "SELECT X'1'",
        "SELECT N'x'",
        "SELECT U&'x'",
        "SELECT u&\"x\"",
        "SELECT 'a\\b'",
        "SELECT \"a\\b\"",
        "SELECT 'é' || é",
        "SELECT {1}",
        "SELECT `a`",
        "SELECT a$b",
        "SELECT 'unterminated",
        "SELECT \"unterminated",
        "SELECT '\0'",
        "SELECT\x0c1",
    ];
    for sql in refused {
        assert_eq!(key(sql), None, "{sql}");
    }
    // Non-ASCII inside quotes is fine.
    assert!(key("SELECT 'é', \"ü\" FROM t WHERE id = 3").is_some());
}

#[test]
fn shapes_split_statements_like_the_parser() {
    let texts = |sql: &str| -> Vec<String> {
        let Shape { statements, .. } = shape(sql, &ON).unwrap();
        statements.into_iter().map(|r| sql[r].to_string()).collect()
    };
    assert_eq!(
        texts("  SELECT 1 ;\n\t SELECT  2;; ; "),
        ["SELECT 1", "SELECT  2"]
    );
    assert_eq!(
        texts("SELECT (1; 2); SELECT ')' ; x"),
        ["SELECT (1; 2)", "SELECT ')'", "x"]
    );
    assert!(texts(" ;; ").is_empty());
    assert!(texts("").is_empty());
}

#[test]
fn the_cache_is_bounded() {
    let set = bench_policies();
    let analyst = roles(&["analyst"]);
    let subject = Subject {
        agent: "bot",
        roles: &analyst,
    };
    for i in 0..10_000 {
        let sql = format!("SELECT c{i}");
        set.decide_query_with(&subject, "db", &sql, &ON);
    }
    let stats = set.cache_stats();
    assert!(stats.entries <= 4096, "{stats:?}");
    assert!(stats.entries >= 1024, "{stats:?}");
    assert_eq!(stats.misses, 10_000);
    // Recent shapes are still there.
    set.decide_query_with(&subject, "db", "SELECT c9999", &ON);
    assert_eq!(set.cache_stats().hits, 1);
}

#[test]
fn threads_share_the_cache() {
    let set = Arc::new(bench_policies());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let set = set.clone();
            std::thread::spawn(move || {
                let analyst = roles(&["analyst"]);
                for i in 0..200 {
                    let sql = match i % 3 {
                        0 => format!("SELECT abalance FROM pgbench_accounts WHERE aid = {i};"),
                        1 => format!(
                            "UPDATE pgbench_accounts SET abalance = abalance + {t} WHERE aid = {i};"
                        ),
                        _ => format!("SELECT * FROM t{} WHERE id = {i}", i % 7),
                    };
                    check(&set, &analyst, &sql, &ON);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = set.cache_stats();
    assert_eq!(stats.hits + stats.misses, 800, "{stats:?}");
    assert!(stats.misses <= 4 * 9, "{stats:?}");
}
