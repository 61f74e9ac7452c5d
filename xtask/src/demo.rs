//! `cargo xtask demo`: agentgate's main job on its embedded default configuration.
//!
//! A real PostgreSQL 15 on 127.0.0.1:55432 (the embedded configuration's `demo-db` target), the
//! daemon with pinned eBPF hooks, and an unmodified `psql` placed under the gate as `demo-agent`
//! (running as `nobody`): masked reads, an in-band denial, an UPDATE held until the operator
//! approves it. The session shows up in `agentgate sessions list`; a connect to any
//! other destination is refused in the kernel, and one over the database's Unix socket by
//! `exec`'s socket filter. Everything is stopped and unpinned at the end;
//! the session store stays in /var/lib/agentgate for inspection.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentgate_tests::Postgres;
use anyhow::{Context, Result, bail};

use crate::{cargo, ebpf, setup, sh};

const DEMO_PORT: u16 = 55432;

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap_or(0));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

fn agentgate() -> PathBuf {
    agentgate_tests::workspace_root().join("target/debug/agentgate")
}

fn show(title: &str, cmd: &mut Command) -> Result<bool> {
    println!("\n==> {title}\n$ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("spawn {}", describe(cmd)))?;
    Ok(status.success())
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// An unmodified psql as `nobody` inside demo-agent's cgroup, with no password.
fn governed_psql(conninfo: &str) -> Command {
    let mut cmd = Command::new(agentgate());
    cmd.args([
        "exec",
        "--agent",
        "demo-agent",
        "--user",
        "nobody",
        "--",
        "psql",
        "-X",
        conninfo,
    ]);
    cmd
}

/// An UPDATE without WHERE matches the default policy's `review` rule: the agent's psql waits
/// while an operator looks at the ticket and approves it; then the result arrives.
fn approval(conninfo: &str) -> Result<()> {
    println!(
        "\n==> the agent updates every row (no WHERE): held for human approval while its psql waits"
    );
    let mut cmd = governed_psql(conninfo);
    cmd.args(["-c", "UPDATE customers SET note = 'reviewed'"]);
    println!("$ {} &", describe(&cmd));
    let held = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run psql under the gate")?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let id = loop {
        let out = Command::new(agentgate())
            .args(["approvals", "list", "--json"])
            .output()?;
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(id) = list
            .as_array()
            .and_then(|l| l.first())
            .and_then(|t| t["id"].as_u64())
        {
            break id;
        }
        if Instant::now() > deadline {
            bail!("no approval ticket appeared for the held UPDATE");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    show(
        "the operator's view of the pending ticket",
        Command::new(agentgate()).args(["approvals", "list"]),
    )?;
    show(
        "the operator approves it",
        Command::new(agentgate()).args([
            "approvals",
            "approve",
            &id.to_string(),
            "--reason",
            "demo: notes refresh",
        ]),
    )?;
    let out = held.wait_with_output()?;
    println!("--- the agent's psql, which was waiting, now prints:");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !String::from_utf8_lossy(&out.stdout).contains("UPDATE 2") {
        bail!("the approved UPDATE did not run");
    }
    Ok(())
}

pub fn run() -> Result<()> {
    setup::run()?;
    ebpf::check()?;
    println!("==> building agentgate");
    sh(cargo().args(["build", "-p", "agentgate"]))?;
    if std::path::Path::new("/etc/agentgate/agentgate.yaml").exists() {
        bail!(
            "/etc/agentgate/agentgate.yaml exists; the demo runs on the embedded defaults, move that file aside first"
        );
    }

    println!("==> starting PostgreSQL 15 on 127.0.0.1:{DEMO_PORT}");
    let pg = Postgres::start_on(DEMO_PORT, "scram-sha-256")
        .with_context(|| format!("is something else listening on {DEMO_PORT}?"))?;
    pg.admin_sql(
        "CREATE TABLE customers (id int PRIMARY KEY, name text, email text, card_number text, note text);
         INSERT INTO customers VALUES
           (1, 'Ada', 'ada@example.com', '4111 1111 1111 1111', 'prefers email'),
           (2, 'Grace', 'grace@example.com', '5500 0055 5555 5559', 'call 415-555-2671 first');",
    );

    println!("==> starting `agentgate run` on its embedded default configuration");
    let log = std::env::temp_dir().join("agentgate-demo.log");
    let daemon = Daemon(
        Command::new(agentgate())
            .arg("run")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            // The gate, not the agent, holds the database password (the embedded configuration
            // reads it from this variable at each connection).
            .env("AGENTGATE_DEMO_DB_PASSWORD", &pg.superuser_password)
            .spawn()
            .context("spawn agentgate run")?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !Command::new(agentgate())
        .arg("status")
        .stdout(Stdio::null())
        .status()?
        .success()
    {
        if Instant::now() > deadline {
            bail!(
                "agentgate did not come up; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    show("what is governed", Command::new(agentgate()).arg("status"))?;
    let conninfo = format!("host=127.0.0.1 port={DEMO_PORT} user=postgres dbname=postgres");
    let psql = |title: &str, sql: &[&str]| -> Result<String> {
        println!("\n==> {title}");
        let mut cmd = governed_psql(&conninfo);
        cmd.args(["-v", "VERBOSITY=verbose"]);
        for q in sql {
            cmd.args(["-c", q]);
        }
        println!("$ {}", describe(&cmd));
        let out = cmd.output().context("run psql under the gate")?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    };
    let rows = psql(
        "an unmodified psql, as `nobody` in demo-agent's cgroup and with NO password, reads the real database: personal data comes back masked",
        &["SELECT id, name, email, card_number, note FROM customers ORDER BY id"],
    )?;
    if !rows.contains("(2 rows)")
        || rows.contains("ada@example.com")
        || rows.contains("4111 1111 1111 1111")
    {
        bail!(
            "the governed query did not return masked rows; daemon log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let denied = psql(
        "the agent tries to drop the table: denied by policy (SQLSTATE 42501) and the connection goes on",
        &[
            "DROP TABLE customers",
            "SELECT count(*) AS customers_still_there FROM customers",
        ],
    )?;
    if !denied.contains("42501") || !denied.contains("customers_still_there") {
        bail!("DROP TABLE was not denied in-band");
    }
    approval(&conninfo)?;
    let refused = show(
        "the same agent tries a destination no target allows (port 5432): refused in the kernel",
        governed_psql("host=127.0.0.1 port=5432 user=postgres connect_timeout=3")
            .args(["-c", "select 1"]),
    )?;
    if refused {
        bail!("a connect to an unconfigured destination was not refused");
    }
    // The demo server trusts local connections (initdb's default): over its Unix socket the
    // agent would be the superuser, past every hook. `exec` refuses the socket itself.
    let local = show(
        "the agent tries the database's Unix socket (which trusts local users): refused by exec's socket filter",
        governed_psql(&format!(
            "host={} port={DEMO_PORT} user=postgres dbname=postgres",
            pg.dir.display()
        ))
        .args(["-c", "select 1"]),
    )?;
    if local {
        bail!("a connect over the database's Unix socket was not refused");
    }
    std::thread::sleep(Duration::from_millis(300));
    show(
        "recorded sessions",
        Command::new(agentgate()).args(["sessions", "list", "--limit", "5"]),
    )?;
    show(
        "recorded kernel refusals",
        Command::new(agentgate()).args(["events", "--limit", "3"]),
    )?;
    let sessions = Command::new(agentgate())
        .args(["sessions", "list", "--json", "--limit", "5"])
        .output()?;
    let list: serde_json::Value = serde_json::from_slice(&sessions.stdout).unwrap_or_default();
    let last_db = list
        .as_array()
        .and_then(|r| r.iter().find(|s| s["target"] == "demo-db"))
        .and_then(|s| s["id"].as_i64());
    if let Some(id) = last_db {
        show(
            "the last database session, replayed",
            Command::new(agentgate()).args(["sessions", "replay", &id.to_string()]),
        )?;
    }

    drop(daemon);
    show(
        "stopping: unpin the hooks",
        Command::new(agentgate()).arg("uninstall"),
    )?;
    drop(pg);
    println!(
        "\ndemo complete: session store kept in /var/lib/agentgate/sessions.db (agentgate sessions list)"
    );
    Ok(())
}
