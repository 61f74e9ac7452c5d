//! `cargo xtask bench postgres`: what the gate costs a PostgreSQL client doing many small
//! queries, next to no proxy at all and to PgBouncer in session mode, measured in one run on the
//! same machine against the same server and data.
//!
//! One PostgreSQL 15 (SCRAM), initialised once with `pgbench -i -s SCALE`. Then `pgbench -n -S`
//! (select-only: one primary-key lookup per transaction) with `-M simple` and `-M prepared`, on
//! three paths:
//! - `direct`: pgbench connects straight to the server over TCP;
//! - `gate`: pgbench runs inside the governed cgroup (`agentgate exec --agent bench`) and connects
//!   to the server's real address with a wrong password; the eBPF hook redirects it to the
//!   daemon, which authenticates upstream with brokered credentials, parses and judges every
//!   statement with `policies/postgres.yaml` (role `analyst`), plans masking (profile `pii`)
//!   and records every statement;
//! - `pgbouncer`: pgbench connects to PgBouncer in session mode in front of the server.
//!
//! Paths are interleaved in rounds (rotating order) so the noise of a small shared machine hits
//! them alike; the reported TPS and average latency are medians over the rounds. At the end the
//! bench checks with the daemon that it served exactly the gate runs' connections and recorded
//! them as sessions of agent `bench` with allowed `pgbench_accounts` statements: a misconfigured
//! run cannot pass direct numbers off as gate numbers.
//!
//! `run` builds `agentgate` and `xtask` in release mode (unless `--no-build`) and re-runs itself
//! from `target/release/xtask` with `AGENTGATE_BIN` pointing at the release daemon.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentgate_tests::{Gate, Postgres, free_port, workspace_root};
use anyhow::{Context, Result, bail, ensure};

use super::{cpu_ns, machine_jiffies, median, round2};

/// Set on the re-run from the release binary.
const AGENT: &str = "bench";
const TARGET: &str = "db";
const PGBOUNCER: &str = "/usr/sbin/pgbouncer";
/// The masking key handed to the daemon (the example policy names `AGENTGATE_MASK_KEY`).
const MASK_KEY: &str = "agentgate-bench-masking-key-0123456789";
/// What the governed pgbench sends as its password: never the real one.
const WRONG_PASSWORD: &str = "not-the-password";
const MODES: [&str; 2] = ["simple", "prepared"];
/// Untimed direct run before the rounds, to warm the server's caches.
const WARMUP_SECONDS: u64 = 3;

/// Options of `cargo xtask bench postgres`.
#[derive(clap::Args, Debug, Clone)]
pub struct PgBenchOpts {
    /// Duration of every pgbench run (`-T`), in seconds.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Rounds; each runs every path once per protocol mode, in a rotating order.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// pgbench clients (`-c`); pgbench threads (`-j`) are min(2, clients).
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// pgbench scale factor of the data set (`pgbench -i -s`).
    #[arg(long, default_value_t = 10)]
    pub scale: u32,
    /// Leave out PgBouncer.
    #[arg(long)]
    pub no_pgbouncer: bool,
    /// Do not run `cargo build --release -p agentgate -p xtask` first.
    #[arg(long)]
    pub no_build: bool,
}

impl PgBenchOpts {
    fn threads(&self) -> usize {
        self.clients.min(2)
    }
}

/// Entry point of `cargo xtask bench postgres`.
pub fn run(opts: &PgBenchOpts) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "`cargo xtask bench postgres` needs root: it starts the daemon (eBPF, cgroups) and PostgreSQL"
        );
    }
    ensure!(opts.rounds >= 1, "--rounds must be at least 1");
    ensure!(opts.seconds >= 1, "--seconds must be at least 1");
    ensure!(opts.clients >= 1, "--clients must be at least 1");
    ensure!(opts.scale >= 1, "--scale must be at least 1");
    if super::run_inner_release("postgres", opts.no_build)? {
        return Ok(());
    }
    for tool in ["pgbench", "psql"] {
        ensure!(
            Command::new(tool).arg("--version").output().is_ok(),
            "`{tool}` is not on PATH: run `cargo xtask setup` (installs postgresql-client-15)"
        );
    }
    Bench::new(opts)?.run()
}

/// `pgbench --version` / `pgbouncer --version`: the first line, without the program name.
fn version_of(program: &str, strip: &str) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .map(|o| {
            let s = String::from_utf8_lossy(&o.stdout);
            let line = s.lines().next().unwrap_or_default().trim();
            line.strip_prefix(strip).unwrap_or(line).trim().to_string()
        })
        .unwrap_or_default()
}

/// PgBouncer in session mode in front of the server, run as the `postgres` OS user (it refuses
/// to run as root); stopped on drop.
struct PgBouncer {
    child: Child,
    dir: PathBuf,
    port: u16,
    version: String,
    pool_size: usize,
}

impl PgBouncer {
    fn start(pg: &Postgres, clients: usize) -> Result<PgBouncer> {
        ensure!(
            Path::new(PGBOUNCER).exists(),
            "{PGBOUNCER} is missing: `apt-get install pgbouncer`, or pass --no-pgbouncer"
        );
        let version = version_of(PGBOUNCER, "PgBouncer");
        let pg_user = nix::unistd::User::from_name("postgres")?
            .context("the `postgres` OS user is missing: run `cargo xtask setup`")?;
        let dir = std::env::temp_dir().join(agentgate_tests::unique("agentgate-bench-pgbouncer"));
        std::fs::create_dir_all(&dir)?;
        let port = free_port();
        // pgbench's first connection (it reads the scale) plus the clients, with room to spare.
        let pool_size = (clients + 1).max(20);
        let max_client_conn = (clients * 2).max(100);
        let userlist = dir.join("userlist.txt");
        // A plain-text password lets PgBouncer answer the client's SCRAM exchange and run its
        // own against the server.
        std::fs::write(
            &userlist,
            format!("\"postgres\" \"{}\"\n", pg.superuser_password),
        )?;
        let conf = dir.join("pgbouncer.ini");
        std::fs::write(
            &conf,
            format!(
                "[databases]
postgres = host=127.0.0.1 port={pg_port} dbname=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {userlist}
pool_mode = session
max_client_conn = {max_client_conn}
default_pool_size = {pool_size}
ignore_startup_parameters = extra_float_digits
pidfile = {pidfile}
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
",
                pg_port = pg.port,
                userlist = userlist.display(),
                pidfile = dir.join("pgbouncer.pid").display(),
            ),
        )?;
        for p in [&dir, &userlist, &conf] {
            nix::unistd::chown(p.as_path(), Some(pg_user.uid), Some(pg_user.gid))?;
        }
        // PgBouncer logs to stderr when it runs in the foreground: into a file, never a pipe
        // nobody reads.
        let log = std::fs::File::create(dir.join("pgbouncer.log"))?;
        let child = Command::new("runuser")
            .args(["-u", "postgres", "--", PGBOUNCER])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start pgbouncer (runuser -u postgres)")?;
        let mut b = PgBouncer {
            child,
            dir,
            port,
            version,
            pool_size,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = b.child.try_wait() {
                bail!(
                    "pgbouncer exited at start ({status}): {}",
                    std::fs::read_to_string(b.dir.join("pgbouncer.log")).unwrap_or_default()
                );
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(b);
            }
            if Instant::now() > deadline {
                bail!(
                    "pgbouncer did not listen on 127.0.0.1:{port} within 10 s: {}",
                    std::fs::read_to_string(b.dir.join("pgbouncer.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid_from_file(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("pgbouncer.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let pgbouncer = self.pid_from_file();
        // SIGTERM (immediate shutdown) to PgBouncer itself, and to runuser, which forwards it.
        if let Some(pid) = pgbouncer {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            if let Some(pid) = pgbouncer {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Route {
    Direct,
    Gate,
    PgBouncer,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Gate => "gate",
            Route::PgBouncer => "pgbouncer",
        }
    }
}

/// What one pgbench run printed.
#[derive(Debug, Clone)]
struct PgbenchResult {
    tps: f64,
    latency_ms: f64,
    transactions: u64,
    connect_ms: Option<f64>,
    scale: u32,
}

/// Parses pgbench's summary; fails unless it processed transactions and none failed.
fn parse_pgbench(out: &str) -> Result<PgbenchResult> {
    let field = |prefix: &str| -> Option<&str> {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(str::trim)
    };
    let first_number = |s: &str| -> Option<f64> { s.split_whitespace().next()?.parse().ok() };
    let transactions: u64 = field("number of transactions actually processed:")
        .and_then(|s| s.split('/').next())
        .and_then(|s| s.trim().parse().ok())
        .context("no `number of transactions actually processed`")?;
    let failed: u64 = field("number of failed transactions:")
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .context("no `number of failed transactions`")?;
    ensure!(failed == 0, "{failed} transactions failed");
    ensure!(transactions > 0, "no transaction was processed");
    let latency_ms = field("latency average =")
        .and_then(first_number)
        .context("no `latency average`")?;
    let tps = field("tps =")
        .and_then(first_number)
        .context("no `tps =`")?;
    let connect_ms = field("initial connection time =").and_then(first_number);
    let scale = field("scaling factor:")
        .and_then(|s| s.parse().ok())
        .context("no `scaling factor`")?;
    Ok(PgbenchResult {
        tps,
        latency_ms,
        transactions,
        connect_ms,
        scale,
    })
}

/// Runs of one route and protocol mode.
#[derive(Default)]
struct Series {
    tps: Vec<f64>,
    latency_ms: Vec<f64>,
    connect_ms: Vec<f64>,
    transactions: u64,
    runs: u64,
    /// CPU time of the proxy process (the daemon, PgBouncer) during these runs.
    proxy_cpu_ns: u64,
    /// The machine's idle and total CPU jiffies during these runs.
    idle_jiffies: u64,
    total_jiffies: u64,
}

impl Series {
    /// The proxy's CPU time per transaction, in microseconds.
    fn cpu_per_tx_us(&self) -> Option<f64> {
        (self.transactions > 0 && self.proxy_cpu_ns > 0)
            .then(|| self.proxy_cpu_ns as f64 / self.transactions as f64 / 1000.0)
    }

    /// Share of the machine's CPU time left idle during these runs, in percent.
    fn idle_percent(&self) -> Option<f64> {
        (self.total_jiffies > 0)
            .then(|| 100.0 * self.idle_jiffies as f64 / self.total_jiffies as f64)
    }
}

struct Bench<'a> {
    opts: &'a PgBenchOpts,
    // Dropped in this order: the gate, then PgBouncer, then the server they connect to (its
    // smart shutdown waits for their connections).
    gate: Gate,
    pgbouncer: Option<PgBouncer>,
    pg: Postgres,
    routes: Vec<Route>,
    /// (route, mode) -> series.
    series: Vec<((Route, &'static str), Series)>,
    init_s: f64,
}

impl<'a> Bench<'a> {
    fn new(opts: &'a PgBenchOpts) -> Result<Bench<'a>> {
        let pg = Postgres::start("scram-sha-256");
        println!(
            "==> PostgreSQL on 127.0.0.1:{} (scram-sha-256); daemon {}",
            pg.port,
            agentgate_tests::agentgate_bin().display()
        );
        println!("==> pgbench -i -s {} (directly, as admin)", opts.scale);
        let started = Instant::now();
        let init = Command::new("pgbench")
            .args(["-i", "-q", "-s", &opts.scale.to_string(), "-h"])
            .arg(&pg.dir)
            .args(["-p", &pg.port.to_string(), "-U", "postgres", "postgres"])
            .env_remove("PGSERVICE")
            .env("PGPASSFILE", "/nonexistent")
            .stdin(Stdio::null())
            .output()
            .context("run pgbench -i")?;
        ensure!(
            init.status.success(),
            "pgbench -i failed ({}): {}{}",
            init.status,
            String::from_utf8_lossy(&init.stdout),
            String::from_utf8_lossy(&init.stderr)
        );
        let init_s = started.elapsed().as_secs_f64();
        println!("    done in {init_s:.1} s");

        let policy = std::fs::read_to_string(workspace_root().join("policies/postgres.yaml"))
            .context("read policies/postgres.yaml")?;
        // The example policy as it is: role `analyst` (default deny, every statement parsed and
        // judged), masking profile `pii`, recording with the default `record_rows`.
        let config = format!(
            "agents:
  - name: {AGENT}
    cgroup: {{base}}/{AGENT}
    roles: [analyst]
    targets: [{TARGET}]
targets:
  - name: {TARGET}
    match: [\"127.0.0.1:{port}\"]
    protocol: postgres
    credentials: {{ user: postgres, password_file: {pw} }}
{policy}",
            port = pg.port,
            pw = pg.dir.join("pw").display(),
        );
        let gate = Gate::start_with_env(&config, &[("AGENTGATE_MASK_KEY", MASK_KEY)]);
        println!(
            "==> gate (pid {}) listening on 127.0.0.1:{}: policies/postgres.yaml, role analyst, masking pii, recording on",
            gate.pid().unwrap_or(0),
            gate.port
        );
        let pgbouncer = if opts.no_pgbouncer {
            None
        } else {
            let b = PgBouncer::start(&pg, opts.clients)?;
            println!(
                "==> PgBouncer {} on 127.0.0.1:{} (pid {}): pool_mode session, default_pool_size {}, auth scram-sha-256",
                b.version,
                b.port,
                b.pid_from_file().unwrap_or(0),
                b.pool_size
            );
            Some(b)
        };
        let mut routes = vec![Route::Direct, Route::Gate];
        if pgbouncer.is_some() {
            routes.push(Route::PgBouncer);
        }
        let mut series = Vec::new();
        for &r in &routes {
            for m in MODES {
                series.push(((r, m), Series::default()));
            }
        }
        Ok(Bench {
            opts,
            gate,
            pgbouncer,
            pg,
            routes,
            series,
            init_s,
        })
    }

    fn series(&self, route: Route, mode: &str) -> Option<&Series> {
        self.series
            .iter()
            .find(|((r, m), _)| *r == route && *m == mode)
            .map(|(_, s)| s)
    }

    fn port_of(&self, route: Route) -> Result<u16> {
        Ok(match route {
            Route::Direct | Route::Gate => self.pg.port,
            Route::PgBouncer => self.pgbouncer.as_ref().context("no pgbouncer")?.port,
        })
    }

    /// One `pgbench -S` run on `route`; fails when pgbench fails, hangs or reports failures.
    fn pgbench(&self, route: Route, mode: &str, seconds: u64) -> Result<PgbenchResult> {
        let o = self.opts;
        let port = self.port_of(route)?.to_string();
        let clients = o.clients.to_string();
        let threads = o.threads().to_string();
        let secs = seconds.to_string();
        let args: Vec<&str> = vec![
            "-n",
            "-S",
            "-c",
            &clients,
            "-j",
            &threads,
            "-T",
            &secs,
            "-M",
            mode,
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "postgres",
        ];
        let mut cmd = if route == Route::Gate {
            let mut argv = vec!["pgbench"];
            argv.extend(&args);
            self.gate.exec(AGENT, &argv)
        } else {
            let mut c = Command::new("pgbench");
            c.args(&args);
            c
        };
        let password = if route == Route::Gate {
            WRONG_PASSWORD
        } else {
            self.pg.superuser_password.as_str()
        };
        cmd.env_remove("PGSERVICE")
            .env_remove("PGOPTIONS")
            .env("PGPASSFILE", "/nonexistent")
            .env("PGPASSWORD", password)
            // The same on every path: no TLS negotiation (the server has none anyway).
            .env("PGSSLMODE", "disable")
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn pgbench on {}", route.name()))?;
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let limit = Duration::from_secs(seconds + 60);
        let out = match rx.recv_timeout(limit) {
            Ok(out) => out.context("wait for pgbench")?,
            Err(_) => {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                bail!(
                    "pgbench -M {mode} on {} did not finish within {limit:?}",
                    route.name()
                );
            }
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        let show = || {
            format!(
                "{}{}{}",
                stdout,
                String::from_utf8_lossy(&out.stderr),
                if route == Route::Gate {
                    format!("\n--- daemon log (tail)\n{}", tail(&self.gate.log(), 30))
                } else {
                    String::new()
                }
            )
        };
        if !out.status.success() {
            bail!(
                "pgbench -M {mode} on {} failed ({}):\n{}",
                route.name(),
                out.status,
                show()
            );
        }
        let r = parse_pgbench(&stdout)
            .with_context(|| format!("pgbench -M {mode} on {}:\n{}", route.name(), show()))?;
        ensure!(
            r.scale == o.scale,
            "pgbench -M {mode} on {} ran against scale {}, not {}",
            route.name(),
            r.scale,
            o.scale
        );
        Ok(r)
    }

    /// The process relaying `route`: the daemon or PgBouncer (none for direct).
    fn proxy_pids(&self, route: Route) -> Vec<u32> {
        let pid = match route {
            Route::Gate => self.gate.pid(),
            Route::PgBouncer => self
                .pgbouncer
                .as_ref()
                .and_then(PgBouncer::pid_from_file)
                .and_then(|p| u32::try_from(p).ok()),
            Route::Direct => None,
        };
        pid.into_iter().collect()
    }

    fn served(&self) -> Result<(u64, u64)> {
        let v = self.gate.cli_json(&["status", "--json"]);
        let d = &v["daemon"];
        Ok((
            d["connections_served"]
                .as_u64()
                .context("status --json: daemon.connections_served")?,
            d["connections_refused"]
                .as_u64()
                .context("status --json: daemon.connections_refused")?,
        ))
    }

    fn run(mut self) -> Result<()> {
        let o = self.opts;
        println!(
            "==> warm-up: {WARMUP_SECONDS} s direct, untimed; then {} rounds x {} modes x {} paths x {} s",
            o.rounds,
            MODES.len(),
            self.routes.len(),
            o.seconds
        );
        self.pgbench(Route::Direct, "simple", WARMUP_SECONDS)?;
        let (served_before, refused_before) = self.served()?;
        let started = Instant::now();
        let n = self.routes.len();
        let mut gate_runs = 0u64;
        for round in 0..o.rounds {
            let order: Vec<Route> = (0..n)
                .filter_map(|i| self.routes.get((i + round) % n).copied())
                .collect();
            for mode in MODES {
                let mut line = Vec::new();
                for &route in &order {
                    let proxy = self.proxy_pids(route);
                    let cpu_before = cpu_ns(&proxy);
                    let (idle_before, total_before) = machine_jiffies();
                    let r = self.pgbench(route, mode, o.seconds)?;
                    let cpu = cpu_ns(&proxy).saturating_sub(cpu_before);
                    let (idle_after, total_after) = machine_jiffies();
                    if route == Route::Gate {
                        gate_runs += 1;
                    }
                    line.push(format!(
                        "{} {:.0} tps {:.3} ms",
                        route.name(),
                        r.tps,
                        r.latency_ms
                    ));
                    let s = self
                        .series
                        .iter_mut()
                        .find(|((rt, m), _)| *rt == route && *m == mode)
                        .map(|(_, s)| s)
                        .context("series")?;
                    s.tps.push(r.tps);
                    s.latency_ms.push(r.latency_ms);
                    s.connect_ms.extend(r.connect_ms);
                    s.transactions += r.transactions;
                    s.runs += 1;
                    s.proxy_cpu_ns += cpu;
                    s.idle_jiffies += idle_after.saturating_sub(idle_before);
                    s.total_jiffies += total_after.saturating_sub(total_before);
                }
                println!(
                    "    round {}/{} {mode:<8} ({:>3.0} s): {}",
                    round + 1,
                    o.rounds,
                    started.elapsed().as_secs_f64(),
                    line.join(" | ")
                );
            }
        }
        let verified = self.verify(served_before, refused_before, gate_runs)?;
        let report = self.report(verified);
        let out = workspace_root().join("target/bench/postgres.json");
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&out, format!("{report:#}\n"))?;
        println!("wrote {}", out.display());
        drop(self.pgbouncer.take());
        Ok(())
    }

    /// The daemon served the gate runs' connections (pgbench opens one to read the scale, then
    /// one per client) and recorded them as sessions of agent `bench` with allowed
    /// `pgbench_accounts` statements.
    fn verify(
        &self,
        served_before: u64,
        refused_before: u64,
        gate_runs: u64,
    ) -> Result<serde_json::Value> {
        let clients = u64::try_from(self.opts.clients)?;
        let expected = gate_runs * (clients + 1);
        let (served, refused) = self.served()?;
        let served_delta = served - served_before;
        ensure!(
            served_delta == expected,
            "the gate served {served_delta} connections during the bench, but {gate_runs} gate runs of pgbench with {clients} clients make {expected}: the gate numbers are not (only) gate numbers"
        );
        ensure!(
            refused == refused_before,
            "the gate refused {} connections during the bench",
            refused - refused_before
        );
        let limit = (served + 1000).to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        let sessions: Vec<serde_json::Value> = loop {
            let v = self
                .gate
                .cli_json(&["sessions", "list", "--limit", &limit, "--json"]);
            let rows: Vec<serde_json::Value> = v
                .as_array()
                .context("sessions list --json: not an array")?
                .iter()
                .filter(|r| r["agent"] == AGENT && r["target"] == TARGET)
                .cloned()
                .collect();
            let ended = rows.iter().filter(|r| !r["ended"].is_null()).count() as u64;
            if ended >= served {
                break rows;
            }
            if Instant::now() > deadline {
                bail!(
                    "the gate's session store shows {ended} ended sessions of agent `{AGENT}`, {served} expected"
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        let bad: Vec<&serde_json::Value> = sessions
            .iter()
            .filter(|r| r["decision"] != "allow" || !r["error"].is_null())
            .collect();
        ensure!(
            bad.is_empty(),
            "{} sessions of agent `{AGENT}` were not allowed or ended in an error, e.g. {:#}",
            bad.len(),
            bad.first().copied().unwrap_or(&serde_json::Value::Null)
        );
        // A client session (not pgbench's scale probe): its statements are the benchmark's.
        let mut checked = None;
        for row in sessions.iter().take(3 * (self.opts.clients + 1)) {
            let id = row["id"].as_i64().context("session id")?.to_string();
            let v = self.gate.cli_json(&["sessions", "show", &id, "--json"]);
            let st = v["statements"]
                .as_array()
                .context("sessions show --json: no statements")?;
            let accounts: Vec<&serde_json::Value> = st
                .iter()
                .filter(|s| {
                    s["text"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("pgbench_accounts")
                })
                .collect();
            if accounts.is_empty() {
                continue;
            }
            let allowed = accounts
                .iter()
                .filter(|s| s["decision"] == "allow" && s["error"].is_null())
                .count();
            ensure!(
                allowed == accounts.len(),
                "session {id}: {} of {} pgbench_accounts statements were not allowed or failed, e.g. {:#}",
                accounts.len() - allowed,
                accounts.len(),
                accounts
                    .iter()
                    .find(|s| s["decision"] != "allow" || !s["error"].is_null())
                    .copied()
                    .unwrap_or(&serde_json::Value::Null)
            );
            let sample = accounts.last().copied().cloned().unwrap_or_default();
            checked = Some((id, st.len(), accounts.len(), sample));
            break;
        }
        let (id, statements, accounts, sample) = checked.with_context(|| {
            format!(
                "no recent session of agent `{AGENT}` recorded a pgbench_accounts statement: the gate did not judge and record the benchmark"
            )
        })?;
        println!(
            "verified: the gate served {served_delta} connections ({gate_runs} pgbench runs x ({clients} clients + 1)), {} sessions of agent `{AGENT}` allowed and ended cleanly; session {id} recorded {statements} statements, {accounts} on pgbench_accounts, all allowed (e.g. `{}`, policy {}, rule {})",
            sessions.len(),
            sample["text"].as_str().unwrap_or_default().trim(),
            sample["policy"],
            sample["rule"]
        );
        Ok(serde_json::json!({
            "gate_runs": gate_runs,
            "gate_connections_expected": expected,
            "gate_connections_served": served_delta,
            "gate_sessions_recorded": sessions.len(),
            "checked_session": {
                "id": id,
                "statements": statements,
                "pgbench_accounts_statements_allowed": accounts,
                "sample": {
                    "text": sample["text"],
                    "kind": sample["kind"],
                    "decision": sample["decision"],
                    "policy": sample["policy"],
                    "rule": sample["rule"],
                    "masked": sample["masked"],
                },
            },
        }))
    }

    fn report(&self, verified: serde_json::Value) -> serde_json::Value {
        let o = self.opts;
        let tps = |r: Route, m: &str| self.series(r, m).and_then(|s| median(&s.tps));
        let lat = |r: Route, m: &str| self.series(r, m).and_then(|s| median(&s.latency_ms));
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let pg_version = self
            .pg
            .admin_sql("SHOW server_version")
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        let pgbench_version = version_of("pgbench", "pgbench (PostgreSQL)");
        let bouncer = self.pgbouncer.as_ref().map(|b| b.version.clone());
        println!();
        println!(
            "agentgate bench postgres: {cores} cores, Linux {}, PostgreSQL {pg_version}, pgbench {pgbench_version}, {}",
            kernel.trim(),
            bouncer
                .as_deref()
                .map_or("no pgbouncer".to_string(), |v| format!(
                    "PgBouncer {v} (pool_mode session)"
                ))
        );
        println!(
            "pgbench -n -S (select-only), scale {}, {} clients, {} threads, {} s per run; {} interleaved rounds; medians of rounds",
            o.scale,
            o.clients,
            o.threads(),
            o.seconds,
            o.rounds
        );
        println!(
            "gate: policies/postgres.yaml (role analyst: every statement parsed and judged), masking profile pii, every statement recorded"
        );
        println!();
        println!(
            "{:<26}{:>10}{:>10}{:>11}{:>13}{:>12}{:>10}",
            "", "direct", "gate", "pgbouncer", "gate/direct", "pgb/direct", "gate/pgb"
        );
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "-".into(),
        };
        for m in MODES {
            // `ratios`: false for a share (of idle CPU), read as it is: a ratio of two says nothing.
            let row = |label: &str, f: &dyn Fn(Route) -> Option<f64>, prec: usize, ratios: bool| {
                let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.prec$}"));
                let (d, g, b) = (f(Route::Direct), f(Route::Gate), f(Route::PgBouncer));
                let r = |x, y| if ratios { ratio(x, y) } else { "-".to_string() };
                println!(
                    "{label:<26}{:>10}{:>10}{:>11}{:>13}{:>12}{:>10}",
                    cell(d),
                    cell(g),
                    cell(b),
                    r(g, d),
                    r(b, d),
                    r(g, b)
                );
            };
            row(&format!("{m} TPS"), &|r| tps(r, m), 0, true);
            row(&format!("{m} latency avg ms"), &|r| lat(r, m), 3, true);
            row(
                &format!("{m} proxy CPU us/tx"),
                &|r| self.series(r, m).and_then(Series::cpu_per_tx_us),
                1,
                true,
            );
            row(
                &format!("{m} machine idle %"),
                &|r| self.series(r, m).and_then(Series::idle_percent),
                1,
                false,
            );
        }
        println!();
        let verdict = |ok: Option<bool>| match ok {
            Some(true) => "MET",
            Some(false) => "MISSED",
            None => "n/a",
        };
        let ahead =
            |m: &str| -> Option<bool> { Some(tps(Route::Gate, m)? > tps(Route::PgBouncer, m)?) };
        // The paths of one round run back to back, so their ratio is less exposed to the host's
        // drift over the whole run than a ratio of medians: both are printed.
        let paired = |m: &str| -> Vec<f64> {
            match (
                self.series(Route::Gate, m),
                self.series(Route::PgBouncer, m),
            ) {
                (Some(g), Some(b)) => g
                    .tps
                    .iter()
                    .zip(&b.tps)
                    .filter(|(_, b)| **b > 0.0)
                    .map(|(g, b)| round2(g / b))
                    .collect(),
                _ => Vec::new(),
            }
        };
        for m in MODES {
            let rounds = paired(m);
            if !rounds.is_empty() {
                let list: Vec<String> = rounds.iter().map(|r| format!("{r:.2}")).collect();
                println!(
                    "gate/pgb TPS by round, {m:<8} {} (median {:.2})",
                    list.join(" "),
                    median(&rounds).unwrap_or(0.0)
                );
            }
        }
        println!(
            "aim: gate ahead of pgbouncer (session mode) on TPS, simple / prepared ..... {} / {}",
            verdict(ahead("simple")),
            verdict(ahead("prepared"))
        );

        let mut paths = serde_json::Map::new();
        for &r in &self.routes {
            let mut modes = serde_json::Map::new();
            for m in MODES {
                if let Some(s) = self.series(r, m) {
                    modes.insert(
                        m.to_string(),
                        serde_json::json!({
                            "tps": tps(r, m).map(round2),
                            "tps_rounds": s.tps.iter().copied().map(round2).collect::<Vec<_>>(),
                            "proxy_cpu_us_per_tx": s.cpu_per_tx_us().map(round2),
                            "machine_idle_percent": s.idle_percent().map(round2),
                            "latency_avg_ms": lat(r, m).map(|v| (v * 1000.0).round() / 1000.0),
                            "latency_avg_ms_rounds": s.latency_ms.clone(),
                            "initial_connection_ms_rounds": s.connect_ms.clone(),
                            "transactions": s.transactions,
                            "runs": s.runs,
                        }),
                    );
                }
            }
            paths.insert(r.name().to_string(), serde_json::Value::Object(modes));
        }
        let ratios: serde_json::Map<String, serde_json::Value> = MODES
            .iter()
            .map(|&m| {
                let q =
                    |a: Route, b: Route| -> Option<f64> { Some(round2(tps(a, m)? / tps(b, m)?)) };
                (
                    m.to_string(),
                    serde_json::json!({
                        "tps_gate_over_direct": q(Route::Gate, Route::Direct),
                        "tps_pgbouncer_over_direct": q(Route::PgBouncer, Route::Direct),
                        "tps_gate_over_pgbouncer": q(Route::Gate, Route::PgBouncer),
                        "tps_gate_over_pgbouncer_by_round": paired(m),
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "machine": { "cores": cores, "kernel": kernel.trim() },
            "versions": {
                "postgresql": pg_version,
                "pgbench": pgbench_version,
                "pgbouncer": bouncer,
            },
            "options": {
                "seconds": o.seconds,
                "rounds": o.rounds,
                "clients": o.clients,
                "threads": o.threads(),
                "scale": o.scale,
                "pgbouncer": self.pgbouncer.as_ref().map(|b| serde_json::json!({
                    "pool_mode": "session",
                    "default_pool_size": b.pool_size,
                    "auth_type": "scram-sha-256",
                })),
                "gate": {
                    "policy": "policies/postgres.yaml",
                    "roles": ["analyst"],
                    "masking_profile": "pii",
                    "record_rows": "default",
                },
            },
            "init_seconds": round2(self.init_s),
            "paths": paths,
            "ratios": ratios,
            "aims": {
                "gate_ahead_of_pgbouncer_simple": ahead("simple"),
                "gate_ahead_of_pgbouncer_prepared": ahead("prepared"),
            },
            "verified": verified,
        })
    }
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all.get(all.len().saturating_sub(lines)..)
        .unwrap_or_default()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pgbench_15_summary() {
        let out = "pgbench (15.20 (Debian 15.20-0+deb12u1))
transaction type: <builtin: select only>
scaling factor: 10
query mode: prepared
number of clients: 8
number of threads: 2
maximum number of tries: 1
duration: 10 s
number of transactions actually processed: 123456
number of failed transactions: 0 (0.000%)
latency average = 0.648 ms
initial connection time = 12.345 ms
tps = 12345.678901 (without initial connection time)
";
        let r = parse_pgbench(out).expect("parses");
        assert_eq!(r.transactions, 123_456);
        assert!((r.tps - 12_345.678_901).abs() < 1e-6);
        assert!((r.latency_ms - 0.648).abs() < 1e-9);
        assert_eq!(r.connect_ms, Some(12.345));
        assert_eq!(r.scale, 10);
        let failed = out.replace(
            "failed transactions: 0 (0.000%)",
            "failed transactions: 3 (0.001%)",
        );
        assert!(parse_pgbench(&failed).is_err());
    }

    #[test]
    fn tails() {
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
