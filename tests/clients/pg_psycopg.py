#!/usr/bin/env python3
"""psycopg 3 scenarios for agentgate's PostgreSQL end-to-end tests.

Usage: pg_psycopg.py PORT SCENARIO...   (run inside a governed cgroup by `agentgate exec`)

Connects to the real server address 127.0.0.1:PORT with a wrong password (the gate brokers the
credentials) and prints one JSON line per step: step, ok, and either rows or the error's class
name, SQLSTATE and message. Scenarios:

  params    queries with parameters (psycopg sends them with the extended protocol), text and
            binary result formats
  denied    a denied statement raises InsufficientPrivilege; the connection works after rollback
  smuggle   `SELECT ...; DROP TABLE t` without parameters (psycopg sends it as one simple Query)
  statements  queries of 6 and 5 statements (simple Query), the first with an INSERT, and
            prepared ones (Parse) of 2 and 6 statements, then a 1.1 KB value in the
            text and as a parameter; for a target with `max_statements_per_query: 5`
            and `max_query_bytes: 1024`
"""
import json
import sys

import psycopg
from psycopg import errors


def emit(**kw):
    print(json.dumps(kw, default=str), flush=True)


def step(conn, name, sql, params=None, binary=None):
    try:
        with conn.cursor(binary=binary) as cur:
            cur.execute(sql, params)
            rows = cur.fetchall() if cur.description is not None else None
            emit(step=name, ok=True, rows=rows, statusmessage=cur.statusmessage)
    except psycopg.Error as e:
        emit(
            step=name,
            ok=False,
            error=type(e).__name__,
            code=e.sqlstate,
            message=e.diag.message_primary,
            status=str(conn.info.transaction_status.name),
        )


def connect(port):
    return psycopg.connect(
        host="127.0.0.1",
        port=port,
        user="postgres",
        password="definitely-not-the-password",
        dbname="postgres",
        connect_timeout=10,
    )


def params(port):
    with connect(port) as conn:
        step(conn, "int_param", "SELECT %s::int * 2", (21,))
        step(conn, "text", "SELECT id, name, email, card_number FROM customers WHERE id = %s", (1,))
        step(
            conn,
            "binary",
            "SELECT id, name, email, card_number FROM customers WHERE id = %s",
            (2,),
            binary=True,
        )
        step(conn, "named", "SELECT %(a)s::text || %(b)s::text", {"a": "x", "b": "y"})


def denied(port):
    conn = connect(port)
    step(conn, "before", "SELECT count(*) FROM t")
    step(conn, "drop", "DROP TABLE t")
    step(conn, "in_failed_tx", "SELECT 1")
    conn.rollback()
    step(conn, "after_rollback", "SELECT count(*) FROM t")
    step(conn, "insert", "INSERT INTO t VALUES (%s, %s)", (300, "from-psycopg"))
    conn.commit()
    step(conn, "committed", "SELECT v FROM t WHERE id = %s", (300,))
    conn.commit()
    conn.autocommit = True
    step(conn, "truncate_autocommit", "TRUNCATE t")
    step(conn, "after_autocommit", "SELECT count(*) FROM t")
    conn.close()


def smuggle(port):
    with connect(port) as conn:
        conn.autocommit = True
        step(conn, "smuggle", "SELECT 'smuggled-marker'; DROP TABLE t")
        step(conn, "after", "SELECT count(*) FROM t")


def statements(port):
    with connect(port) as conn:
        conn.autocommit = True
        step(conn, "over", "INSERT INTO t VALUES (400, 'over');" + "SELECT 1;" * 5)
        step(conn, "after", "SELECT count(*) FROM t")
        step(conn, "at", "INSERT INTO t VALUES (401, 'at');" + "SELECT 1;" * 4)
        step(conn, "prepared_two", "SELECT %s::int; SELECT 2", (1,))
        step(conn, "prepared_over", "SELECT %s::int;" + "SELECT 1;" * 5, (1,))
        step(conn, "prepared_one", "SELECT %s::int", (1,))
        long = "x" * 1100
        step(conn, "long", "INSERT INTO t VALUES (402, '" + long + "')")
        step(conn, "long_param", "INSERT INTO t VALUES (403, %s)", (long,))


SCENARIOS = {"params": params, "denied": denied, "smuggle": smuggle, "statements": statements}


def main():
    port = int(sys.argv[1])
    for name in sys.argv[2:]:
        SCENARIOS[name](port)


if __name__ == "__main__":
    main()
