//! Developer tasks. `cargo xtask demo` and `cargo xtask test` are the README's two commands;
//! each does its own set-up (Debian packages, eBPF object check) or says what is missing.
// Task runner: a panic or an anyhow error with context is the report.
#![allow(clippy::expect_used, clippy::indexing_slicing)]

mod bench;
mod bench_client;
mod demo;
mod ebpf;
mod setup;

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "agentgate developer tasks")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what builds and tests need (Debian packages, Python drivers); idempotent.
    Setup,
    /// Build the eBPF object with nightly + bpf-linker and record its source hash.
    BuildEbpf,
    /// Fail if the committed eBPF object is stale; rebuild it when the eBPF toolchain is present.
    CheckEbpf,
    /// Install the eBPF toolchain (nightly rust-src and bpf-linker against nightly's LLVM).
    EbpfToolchain,
    /// Set up, then run every test (unit, end-to-end with real eBPF and PostgreSQL), fmt and clippy.
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        rest: Vec<String>,
    },
    /// Run the main job end to end: a governed, unmodified client talks to a real PostgreSQL.
    Demo,
    /// Benchmarks (commands, not tests).
    Bench {
        #[command(subcommand)]
        which: BenchCmd,
    },
    /// Load generator used by `bench` from inside a governed cgroup.
    #[command(hide = true)]
    BenchClient {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Bulk throughput and connect+first-byte latency: direct vs gate vs nginx stream proxy.
    Tcp(bench::tcp::TcpBenchOpts),
    /// pgbench select-only, simple and prepared, 8 clients: direct vs gate (policy, masking, recording) vs pgbouncer session mode
    Postgres(bench::postgres::PgBenchOpts),
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.cmd {
        Cmd::Setup => setup::run(),
        Cmd::BuildEbpf => ebpf::build(),
        Cmd::CheckEbpf => ebpf::check(),
        Cmd::EbpfToolchain => ebpf::install_toolchain(),
        Cmd::Test { no_lint, rest } => test(no_lint, &rest),
        Cmd::Demo => demo::run(),
        Cmd::Bench { which } => match which {
            BenchCmd::Tcp(opts) => bench::tcp::run(&opts),
            BenchCmd::Postgres(opts) => bench::postgres::run(&opts),
        },
        Cmd::BenchClient { args } => bench_client::main(&args),
    }
}

/// Runs a command in the workspace root, failing with its name when it fails.
pub fn sh(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    if cmd.get_current_dir().is_none() {
        cmd.current_dir(agentgate_tests::workspace_root());
    }
    let status = cmd.status().with_context(|| format!("spawn {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn test(no_lint: bool, rest: &[String]) -> Result<()> {
    setup::run()?;
    ebpf::check()?;
    if !no_lint {
        println!("==> cargo fmt --check");
        sh(cargo().args(["fmt", "--all", "--", "--check"]))?;
        println!("==> cargo clippy");
        sh(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    println!("==> cargo build (the binary the end-to-end tests run)");
    sh(cargo().args(["build", "-p", "agentgate"]))?;
    println!("==> cargo test --workspace");
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--"]).args(rest);
    run_counting(&mut cmd)
}

/// Runs `cargo test`, passing its output through, and ends with one line that totals every
/// test binary's `test result:` line (the last binary cargo runs is often a doc-test run with
/// no tests, which would otherwise be the closing line).
fn run_counting(cmd: &mut Command) -> Result<()> {
    use std::io::BufRead;
    let mut child = cmd
        .current_dir(agentgate_tests::workspace_root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("spawn cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                for part in rest.split(';') {
                    let mut words = part.split_whitespace().rev();
                    let (Some(what), Some(n)) = (words.next(), words.next()) else {
                        continue;
                    };
                    let n: u64 = n.parse().unwrap_or(0);
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    if passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}
