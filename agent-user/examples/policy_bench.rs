//! Times per-statement policy decisions on pgbench's statements: what the PostgreSQL gate pays
//! for every Query and Parse before the server sees it.
//!
//! ```sh
//! cargo run --release -p agentgate --example policy_bench [-- ROUNDS [cached|uncached]]
//! ```
//!
//! Loads `policies/postgres.yaml` (what `cargo xtask bench postgres` runs), decides as the
//! `analyst` role, and prints nanoseconds per decision for pgbench's built-in scripts (every
//! statement carries new random numbers, as pgbench sends them) and for a query repeated
//! verbatim, parsing every statement (`decide_query_uncached`) and through the facts cache
//! (`decide_query_with`, what the gate calls).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use agentgate::policy::{ExtractOptions, PolicyConfig, PolicySet, Subject, compile};
use nix::time::{ClockId, clock_gettime};
use serde::Deserialize;

#[derive(Deserialize)]
struct PolicyFile {
    policies: Vec<PolicyConfig>,
}

/// A tiny xorshift generator: deterministic across runs, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// pgbench `-S` (select-only): one statement per transaction.
fn select_only(rng: &mut Rng) -> Vec<String> {
    let aid = rng.next(1_000_000) + 1;
    vec![format!(
        "SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"
    )]
}

/// pgbench's default TPC-B-like script, one statement per simple Query.
fn tpcb(rng: &mut Rng) -> Vec<String> {
    let aid = rng.next(1_000_000) + 1;
    let bid = rng.next(10) + 1;
    let tid = rng.next(100) + 1;
    let delta = rng.next(10_001) as i64 - 5000;
    vec![
        "BEGIN;".to_string(),
        format!("UPDATE pgbench_accounts SET abalance = abalance + {delta} WHERE aid = {aid};"),
        format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"),
        format!("UPDATE pgbench_tellers SET tbalance = tbalance + {delta} WHERE tid = {tid};"),
        format!("UPDATE pgbench_branches SET bbalance = bbalance + {delta} WHERE bid = {bid};"),
        format!(
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) \
             VALUES ({tid}, {bid}, {aid}, {delta}, CURRENT_TIMESTAMP);"
        ),
        "END;".to_string(),
    ]
}

/// CPU time of this thread: on a shared machine wall time also counts other processes.
fn thread_cpu() -> Duration {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .expect("CLOCK_THREAD_CPUTIME_ID")
}

fn run(name: &str, set: &PolicySet, statements: &[String], cached: bool) {
    let roles = vec!["analyst".to_string()];
    let subject = Subject {
        agent: "bench",
        roles: &roles,
    };
    let opts = ExtractOptions::default();
    // Warm up (and fill the cache when there is one).
    let decide = |sql: &str| {
        if cached {
            set.decide_query_with(&subject, "db", sql, &opts)
        } else {
            set.decide_query_uncached(&subject, "db", sql, &opts)
        }
    };
    for sql in statements.iter().take(1000) {
        black_box(decide(sql));
    }
    let start = Instant::now();
    let cpu_start = thread_cpu();
    let mut allowed = 0usize;
    for sql in statements {
        let d = decide(black_box(sql));
        allowed += usize::from(d.decision.verdict.is_allow());
    }
    let cpu = thread_cpu().saturating_sub(cpu_start);
    let wall = start.elapsed();
    assert_eq!(
        allowed,
        statements.len(),
        "{name}: every statement is allowed"
    );
    let per = |d: Duration| d.as_nanos() as f64 / statements.len() as f64;
    let how = if cached { "cached" } else { "uncached" };
    println!(
        "{name:<26} {how:<8} {:>7} decisions {:>8.0} ns CPU/decision ({:.0} ns wall)",
        statements.len(),
        per(cpu),
        per(wall)
    );
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("ROUNDS is a number"))
        .unwrap_or(20_000);
    let yaml = include_str!("../../policies/postgres.yaml");
    let file: PolicyFile = serde_norway::from_str(yaml).expect("policies/postgres.yaml parses");
    let set = compile(file.policies).expect("policies/postgres.yaml compiles");

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let select: Vec<String> = (0..rounds).flat_map(|_| select_only(&mut rng)).collect();
    let tpcb: Vec<String> = (0..rounds / 7 + 1).flat_map(|_| tpcb(&mut rng)).collect();
    let first = select.first().expect("ROUNDS is at least 1").clone();
    let same = vec![first; rounds];

    let only = std::env::args().nth(2);
    for cached in [false, true] {
        let how = if cached { "cached" } else { "uncached" };
        if only.as_deref().is_some_and(|o| o != how) {
            continue;
        }
        run("pgbench -S (select-only)", &set, &select, cached);
        run("pgbench tpcb-like", &set, &tpcb, cached);
        run("one query repeated", &set, &same, cached);
    }
    println!("cache: {:?}", set.cache_stats());
}
