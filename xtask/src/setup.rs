//! `cargo xtask setup`: installs what the tests, the demo and the benchmarks use, only when
//! missing, so a second run costs a few `dpkg-query` calls.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

use crate::sh;

/// Debian packages: real servers and clients the tests and benchmarks run.
const PACKAGES: &[&str] = &[
    "postgresql-15",
    "postgresql-client-15",
    "pgbouncer",
    "nginx",
    "libnginx-mod-stream",
    "iproute2",
];

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

pub fn run() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "agentgate's tests load eBPF programs and create cgroups: run as root (sudo -E cargo xtask ...)"
        );
    }
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if !missing.is_empty() {
        println!("==> installing Debian packages: {}", missing.join(" "));
        sh(Command::new("apt-get").arg("update").arg("-q"))?;
        sh(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    for tool in ["python3", "psql", "runuser"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            bail!("`{tool}` is not on PATH");
        }
    }
    if !Path::new(agentgate_tests::PG_BIN).join("postgres").exists() {
        bail!(
            "PostgreSQL 15 server binaries are missing under {}",
            agentgate_tests::PG_BIN
        );
    }
    // psycopg 3: the PostgreSQL end-to-end tests drive a real Python driver through the gate.
    let have_psycopg = || {
        Command::new("python3")
            .args(["-c", "import psycopg"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if !have_psycopg() {
        println!("==> installing psycopg 3 (python3 -m pip install 'psycopg[binary]>=3.1')");
        agentgate_tests::install_psycopg()?;
        if !have_psycopg() {
            bail!("psycopg was installed but `python3 -c 'import psycopg'` still fails");
        }
    }
    Ok(())
}
