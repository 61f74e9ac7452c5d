//! Times the session writer on the records `cargo xtask bench postgres` produces: one row per
//! pgbench statement (text, facts, decision, one result row as the agent saw it), arriving at a
//! steady rate so that batches are as large as the gate's linger makes them.
//!
//! ```sh
//! cargo run --release -p agentgate --example session_bench [-- STATEMENTS [PER_MS]]
//! ```
//!
//! Prints the writer thread's CPU time per statement (from `/proc/self/task/*/schedstat`, so
//! the sending thread is not counted) and the size of the store afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentgate::policy::{Access, TableRef};
use agentgate::session::{AgentShare, SessionStart, SessionStore, StatementEnd, StatementStart};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// CPU nanoseconds of this process's thread named `name`.
fn thread_cpu_ns(name: &str) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let dir = task.expect("task entry").path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
        total += stat
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("STATEMENTS is a number"))
        .unwrap_or(200_000);
    // The gate's rate in `bench postgres` is 20-30k statements a second: about 25 per ms.
    let per_ms: usize = std::env::args()
        .nth(2)
        .map(|a| a.parse().expect("PER_MS is a number"))
        .unwrap_or(25);
    let dir = std::env::temp_dir().join(format!("agentgate-session-bench-{}", std::process::id()));
    let path = dir.join("sessions.db");
    let store = SessionStore::open(&path).expect("open store");
    let sessions: Vec<i64> = (0..8)
        .map(|_| {
            store
                .start(SessionStart {
                    agent: Some("bench".into()),
                    roles: vec!["analyst".into()],
                    decision: "allow",
                    protocol: Some("postgres"),
                    ..Default::default()
                })
                .expect("session start")
        })
        .collect();
    store.flush().await.expect("flush");

    let tables: Arc<[TableRef]> = vec![TableRef {
        schema: Some("public".into()),
        name: "pgbench_accounts".into(),
        access: Access::Read,
    }]
    .into();
    let functions: Arc<[String]> = Vec::new().into();
    let policy: Option<Arc<str>> = Some("analysts".into());
    let rule: Option<Arc<str>> = Some("reads".into());
    let cpu_start = thread_cpu_ns("session-writer");
    let start = Instant::now();
    let mut sent = 0usize;
    while sent < n {
        for _ in 0..per_ms.min(n - sent) {
            let aid = (sent * 7919) % 1_000_000 + 1;
            let session_id = sessions.get(sent % sessions.len()).copied().unwrap_or(1);
            let open = store.statement(
                AgentShare::NONE,
                StatementStart {
                    session_id,
                    protocol: "simple",
                    text: format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};")
                        .into(),
                    kind: Some("select"),
                    tables: tables.clone(),
                    functions: functions.clone(),
                    decision: "allow",
                    enforced: true,
                    policy: policy.clone(),
                    rule: rule.clone(),
                    message: None,
                },
            );
            store
                .statement_end(
                    open,
                    StatementEnd {
                        duration_us: 40,
                        rows: Some(1),
                        command_tag: Some("SELECT 1".into()),
                        error: None,
                        columns: vec!["abalance".into()],
                        result_rows: vec![vec![Some("0".into())]],
                        masked: false,
                    },
                )
                .expect("statement");
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    store.flush().await.expect("flush");
    let wall = start.elapsed();
    let cpu = thread_cpu_ns("session-writer").saturating_sub(cpu_start);
    let size: u64 = std::fs::read_dir(&dir)
        .expect("store dir")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!(
        "{n} statements at {per_ms}/ms in {:.1} s: writer {:.2} us CPU per statement, store {:.1} MB ({:.0} bytes per statement)",
        wall.as_secs_f64(),
        cpu as f64 / 1000.0 / n as f64,
        size as f64 / 1e6,
        size as f64 / n as f64
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
