//! Harness for agentgate's end-to-end tests and benchmarks: a real daemon (the `agentgate`
//! binary, real eBPF), real servers (PostgreSQL started here, small echo servers), real clients.
//!
//! Every prerequisite is checked loudly: a test that needs root, eBPF or PostgreSQL panics with
//! what is missing and how to get it, it never skips. Each [`Gate`] gets its own listener port,
//! pin directory, state directory and cgroups, so tests run side by side.
// Test code: a panic with a message is exactly how a failed step should be reported.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Panics unless running as root: these tests load eBPF programs and create cgroups.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "this test needs root (CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN) to load eBPF and create cgroups; run `sudo cargo xtask test`"
        );
    }
}

/// The `agentgate` binary to test: `$AGENTGATE_BIN`, else the workspace's debug build.
pub fn agentgate_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("AGENTGATE_BIN") {
        return PathBuf::from(p);
    }
    let p = workspace_root().join("target/debug/agentgate");
    if !p.exists() {
        panic!(
            "{} is missing: run `cargo xtask test` (it builds the binary) or `cargo build -p agentgate`",
            p.display()
        );
    }
    p
}

/// Retries `f` until it returns Some or the deadline passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A port that was free a moment ago on both 127.0.0.1 and ::1, taken from below the kernel's
/// ephemeral range. A port from inside it could be handed, between a test's daemon stopping and
/// starting again, to some parallel test's outgoing connection as its local port, and the
/// restarted daemon would then fail to listen (EADDRINUSE). Ports outside the range are only
/// ever taken by an explicit bind.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    let (first, span) = if low > 11_000 {
        (10_000, low - 10_000)
    } else {
        (high + 1, 65_535 - high)
    };
    // Test binaries run side by side: each starts at its own place in the span.
    let start = std::process::id().wrapping_mul(7_919);
    for _ in 0..span {
        let offset = start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let Ok(port) = u16::try_from(first + offset) else {
            continue;
        };
        if let Ok(_v4) = TcpListener::bind(("127.0.0.1", port))
            && TcpListener::bind(("::1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port in {first}..{}", first + span);
}

/// A running `agentgate run` with its own configuration.
pub struct Gate {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub port: u16,
    /// Cgroup path prefix (relative to the cgroup2 mount) for this gate's agents.
    pub cgroup_base: String,
    pub pin_dir: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Gate {
    /// Starts a daemon. `body` is YAML for `agents:`, `targets:` and `dns_resolvers:`;
    /// `{base}` in it is replaced with this gate's cgroup prefix.
    pub fn start(body: &str) -> Gate {
        Gate::start_with_env(body, &[])
    }

    /// Like [`Gate::start`], with extra environment variables for the daemon (for example the
    /// masking key named by `masking.key_env`); restarts with [`Gate::spawn`] repeat them.
    pub fn start_with_env(body: &str, env: &[(&str, &str)]) -> Gate {
        require_root();
        let name = unique("agtest");
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).expect("create test dir");
        let port = free_port();
        let cgroup_base = format!("agentgate-test/{name}");
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{name}"));
        let config = dir.join("agentgate.yaml");
        let yaml = format!(
            "listen: {{ipv4: 127.0.0.1, ipv6: \"::1\", port: {port}}}\nstate_dir: {}\npin_dir: {}\n{}",
            dir.join("state").display(),
            pin_dir.display(),
            body.replace("{base}", &cgroup_base)
        );
        std::fs::write(&config, yaml).expect("write config");
        let mut gate = Gate {
            name,
            dir,
            config,
            port,
            cgroup_base,
            pin_dir,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
            child: None,
        };
        gate.spawn();
        gate
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts (or restarts) the daemon process and waits until `status` says it is up.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open daemon log");
        let child = Command::new(agentgate_bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn agentgate run");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "agentgate run exited early ({status}); log:\n{}",
                    self.log()
                );
            }
            if self.cli(&["status"]).status.success() {
                return;
            }
            if Instant::now() > deadline {
                panic!("agentgate did not become ready; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `kill -9` the daemon: nothing runs its shutdown path.
    /// Stops the daemon as an operator would (SIGTERM) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(c.id()).unwrap_or(0)),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs an `agentgate` CLI verb against this gate's configuration.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(agentgate_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run agentgate")
    }

    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "agentgate {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON output")
    }

    /// `agentgate exec --agent AGENT -- argv...` as a Command to adjust and run.
    pub fn exec(&self, agent: &str, argv: &[&str]) -> Command {
        let mut cmd = Command::new(agentgate_bin());
        cmd.args(["exec", "--config"])
            .arg(&self.config)
            .args(["--agent", agent, "--"])
            .args(argv);
        cmd
    }

    /// [`Gate::exec`] as `user` (`--user`).
    pub fn exec_as(&self, agent: &str, user: &str, argv: &[&str]) -> Command {
        let mut cmd = Command::new(agentgate_bin());
        cmd.args(["exec", "--config"])
            .arg(&self.config)
            .args(["--agent", agent, "--user", user, "--"])
            .args(argv);
        cmd
    }

    /// Sessions, most recent first, once at least `n` have ended (the store commits in batches).
    pub fn sessions_ended(&self, n: usize) -> Vec<serde_json::Value> {
        wait_for(
            &format!("{n} ended sessions"),
            Duration::from_secs(10),
            || {
                let v = self.cli_json(&["sessions", "list", "--json"]);
                let rows = v.as_array()?.clone();
                let ended = rows.iter().filter(|r| !r["ended"].is_null()).count();
                (ended >= n).then_some(rows)
            },
        )
    }

    /// Events, most recent first, once one satisfies `pred`.
    pub fn wait_event(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_for(what, Duration::from_secs(10), || {
            let v = self.cli_json(&["events", "--json"]);
            v.as_array()?.iter().find(|e| pred(e)).cloned()
        })
    }

    pub fn cgroup_dir(&self, relative: &str) -> PathBuf {
        cgroup2_mount().join(relative)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.stop();
        let _ = self.cli(&["uninstall"]);
        remove_cgroup_tree(&cgroup2_mount().join(&self.cgroup_base));
        if std::env::var_os("AGENTGATE_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount = pre.split_whitespace().nth(4)?;
            (post.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount))
        })
        .expect("a cgroup2 mount")
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// A TCP echo server on a background thread.
pub struct EchoServer {
    pub addr: SocketAddr,
}

impl EchoServer {
    pub fn start(bind: &str) -> EchoServer {
        let l =
            TcpListener::bind(bind).unwrap_or_else(|e| panic!("bind echo server on {bind}: {e}"));
        let addr = l.local_addr().expect("local addr");
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || echo(s));
            }
        });
        EchoServer { addr }
    }
}

fn echo(mut s: TcpStream) {
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(buf.get(..n).unwrap_or_default()).is_err() {
                    return;
                }
            }
        }
    }
}

/// A UDP echo server (stands in for a DNS resolver).
pub fn udp_echo(bind: &str) -> SocketAddr {
    let s = UdpSocket::bind(bind).unwrap_or_else(|e| panic!("bind udp on {bind}: {e}"));
    let addr = s.local_addr().expect("local addr");
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(buf.get(..n).unwrap_or_default(), from);
        }
    });
    addr
}

/// Runs a Python snippet (inside a governed cgroup when `cmd` is a `Gate::exec`).
pub fn python_argv(script: &str) -> Vec<String> {
    vec!["python3".into(), "-c".into(), script.into()]
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("spawn command")
}

/// Bytes as text, lossily (for assertions on client output).
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A finished command's status, stdout and stderr, for assertion messages.
pub fn show(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    )
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A PostgreSQL 15 server started by the test, as the `postgres` OS user, in a temp dir.
pub struct Postgres {
    pub port: u16,
    pub dir: PathBuf,
    pub superuser_password: String,
    child: Option<Child>,
}

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

impl Postgres {
    /// Starts a server. TCP clients authenticate with `auth` (`trust`, `md5` or
    /// `scram-sha-256`); the `postgres` superuser's password is `superuser_password`.
    pub fn start(auth: &str) -> Postgres {
        Self::try_start(auth, None, &[]).unwrap_or_else(|e| panic!("starting PostgreSQL: {e:#}"))
    }

    /// Like [`Postgres::start`] on a fixed port (the demo's embedded configuration names one).
    pub fn start_on(port: u16, auth: &str) -> Result<Postgres> {
        Self::try_start(auth, Some(port), &[])
    }

    /// Like [`Postgres::start`] with extra server settings (`name=value`, passed as `-c`).
    pub fn start_with(auth: &str, settings: &[&str]) -> Postgres {
        Self::try_start(auth, None, settings)
            .unwrap_or_else(|e| panic!("starting PostgreSQL: {e:#}"))
    }

    fn try_start(auth: &str, port: Option<u16>, settings: &[&str]) -> Result<Postgres> {
        require_root();
        if !Path::new(PG_BIN).join("postgres").exists() {
            bail!(
                "PostgreSQL 15 server binaries are missing under {PG_BIN}: run `cargo xtask setup` (installs postgresql-15)"
            );
        }
        let pg_user = nix::unistd::User::from_name("postgres")?
            .context("the `postgres` OS user is missing: run `cargo xtask setup`")?;
        let dir = std::env::temp_dir().join(unique("agentgate-pg"));
        std::fs::create_dir_all(&dir)?;
        nix::unistd::chown(&dir, Some(pg_user.uid), Some(pg_user.gid))?;
        let password = "superuser-secret".to_string();
        let pwfile = dir.join("pw");
        std::fs::write(&pwfile, &password)?;
        nix::unistd::chown(&pwfile, Some(pg_user.uid), Some(pg_user.gid))?;
        let data = dir.join("data");
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(Path::new(PG_BIN).join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                &format!("--auth-host={auth}"),
                "--pwfile",
            ])
            .arg(&pwfile)
            .env("LC_ALL", "C.UTF-8")
            .output()?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let port = port.unwrap_or_else(free_port);
        let log = std::fs::File::create(dir.join("postgres.log"))?;
        let child = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(Path::new(PG_BIN).join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ])
            .args(settings.iter().flat_map(|s| ["-c", s]))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let pg = Postgres {
            port,
            dir,
            superuser_password: password,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new(Path::new(PG_BIN).join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                return Ok(pg);
            }
            if Instant::now() > deadline {
                bail!(
                    "PostgreSQL did not start; log:\n{}",
                    std::fs::read_to_string(pg.dir.join("postgres.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Runs SQL as the superuser over the unix socket (never through the gate).
    pub fn admin_sql(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                sql,
            ])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // runuser forwards SIGTERM to postgres: smart shutdown; then wait.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(c.id()).unwrap_or(0)),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(Path::new(PG_BIN).join("pg_ctl"))
            .args(["stop", "-m", "immediate", "-D"])
            .arg(self.dir.join("data"))
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `tests/clients/probe.py`: one JSON line per probe (see the script).
pub fn probe_script() -> PathBuf {
    workspace_root().join("tests/clients/probe.py")
}

fn parse_probes(o: &Output) -> Vec<serde_json::Value> {
    assert!(
        o.status.success(),
        "probe failed: {}{}",
        stdout(o),
        String::from_utf8_lossy(&o.stderr)
    );
    stdout(o)
        .lines()
        .map(|l| serde_json::from_str(l).expect("probe JSON line"))
        .collect()
}

/// Runs probes from a process outside every governed cgroup.
pub fn probe_ungoverned(specs: &[&str]) -> Vec<serde_json::Value> {
    parse_probes(&run(Command::new("python3")
        .arg(probe_script())
        .args(specs)))
}

impl Gate {
    /// Runs probes from a process placed in `agent`'s cgroup by `agentgate exec`.
    pub fn probe(&self, agent: &str, specs: &[&str]) -> Vec<serde_json::Value> {
        let script = probe_script();
        let mut argv = vec!["python3", script.to_str().unwrap_or_default()];
        argv.extend_from_slice(specs);
        parse_probes(&run(&mut self.exec(agent, &argv)))
    }
}

pub const EPERM: i64 = 1;
pub const ECONNREFUSED: i64 = 111;

// ---------------------------------------------------------------------------------------------
// PostgreSQL end-to-end helpers (tests/tests/postgres.rs).

impl Gate {
    /// Runs `psql` inside `agent`'s cgroup against 127.0.0.1:`port` (the real server address:
    /// the hook redirects it), as user `postgres` with `password` (`None`: no password at all),
    /// `extra` arguments and `stdin` as its script.
    pub fn psql(
        &self,
        agent: &str,
        port: u16,
        password: Option<&str>,
        extra: &[&str],
        stdin: &str,
    ) -> Output {
        self.spawn_psql(agent, port, password, extra, stdin)
            .wait_with_output()
            .expect("wait for psql")
    }

    /// [`Gate::psql`], left running.
    pub fn spawn_psql(
        &self,
        agent: &str,
        port: u16,
        password: Option<&str>,
        extra: &[&str],
        stdin: &str,
    ) -> Child {
        let mut argv = vec!["psql".to_string()];
        argv.extend(psql_conn_args(port));
        argv.extend(extra.iter().map(|s| (*s).to_string()));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        spawn_with_stdin(&mut self.exec(agent, &argv), password, stdin)
    }
}

/// Connection arguments for psql and pgbench: 127.0.0.1:`port`, user and database `postgres`,
/// no psqlrc, never prompt for a password.
pub fn psql_conn_args(port: u16) -> Vec<String> {
    [
        "-X",
        "-w",
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        "postgres",
        "-d",
        "postgres",
    ]
    .iter()
    .map(|s| (*s).to_string())
    .collect()
}

/// Runs `psql` directly (no gate, outside every governed cgroup) over TCP.
pub fn psql_direct(port: u16, password: Option<&str>, extra: &[&str], stdin: &str) -> Output {
    let mut cmd = Command::new("psql");
    cmd.args(psql_conn_args(port)).args(extra);
    run_with_stdin(&mut cmd, password, stdin)
}

fn run_with_stdin(cmd: &mut Command, password: Option<&str>, stdin: &str) -> Output {
    spawn_with_stdin(cmd, password, stdin)
        .wait_with_output()
        .expect("wait for psql")
}

/// Starts a libpq client with `stdin` written to it (and closed), the environment a test needs
/// (no password file or service, `password` if given) and its output piped.
fn spawn_with_stdin(cmd: &mut Command, password: Option<&str>, stdin: &str) -> Child {
    cmd.env_remove("PGPASSWORD")
        .env_remove("PGSERVICE")
        .env("PGPASSFILE", "/nonexistent")
        .env("PGCONNECT_TIMEOUT", "10")
        .env("PGSSLMODE", "prefer")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
    let mut child = cmd.spawn().expect("spawn psql");
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes()).expect("write psql stdin");
    }
    child
}

/// `tests/clients/pg_psycopg.py`: psycopg 3 scenarios, one JSON line per step.
pub fn psycopg_script() -> PathBuf {
    workspace_root().join("tests/clients/pg_psycopg.py")
}

static PSYCOPG: std::sync::OnceLock<()> = std::sync::OnceLock::new();

fn psycopg_importable() -> bool {
    Command::new("python3")
        .args(["-c", "import psycopg"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Makes `import psycopg` work for `python3` (psycopg 3 with its bundled libpq), installing it
/// with pip once if needed. Panics with pip's output when it cannot.
pub fn ensure_psycopg() {
    PSYCOPG.get_or_init(|| {
        if psycopg_importable() {
            return;
        }
        if let Err(e) = install_psycopg() {
            panic!("psycopg 3 is needed by the PostgreSQL end-to-end tests: {e:#}");
        }
        assert!(
            psycopg_importable(),
            "pip installed psycopg but `python3 -c 'import psycopg'` still fails"
        );
    });
}

/// `python3 -m pip install 'psycopg[binary]>=3.1'`; on a distribution python that refuses
/// (PEP 668, externally managed) it retries with `--break-system-packages`.
pub fn install_psycopg() -> Result<()> {
    let pip = |extra: &[&str]| -> Result<Output> {
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(extra)
            .arg("psycopg[binary]>=3.1")
            .output()
            .context("run `python3 -m pip`")
    };
    let mut out = pip(&[])?;
    if !out.status.success()
        && String::from_utf8_lossy(&out.stderr).contains("externally-managed-environment")
    {
        out = pip(&["--break-system-packages"])?;
    }
    if !out.status.success() {
        bail!(
            "`python3 -m pip install 'psycopg[binary]>=3.1'` failed ({}); install pip (apt-get install python3-pip) or psycopg (apt-get install python3-psycopg):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// An address added to `lo` for one test: this host's own, but not a loopback one (like an
/// interface's `192.0.2.2`). IPv4 or IPv6. Removed when dropped.
pub struct HostAddress(pub &'static str);

impl HostAddress {
    pub fn add(ip: &'static str) -> HostAddress {
        // Left over from an interrupted run: ignore the error of removing nothing.
        let _ = Command::new("ip")
            .args(["addr", "del", &format!("{ip}/{}", prefix(ip)), "dev", "lo"])
            .output();
        let mut add = Command::new("ip");
        add.args(["addr", "add", &format!("{ip}/{}", prefix(ip)), "dev", "lo"]);
        if ip.contains(':') {
            // Usable at once, without duplicate address detection.
            add.arg("nodad");
        }
        let o = run(&mut add);
        assert!(o.status.success(), "ip addr add {ip}: {}", show(&o));
        HostAddress(ip)
    }
}

impl Drop for HostAddress {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args([
                "addr",
                "del",
                &format!("{}/{}", self.0, prefix(self.0)),
                "dev",
                "lo",
            ])
            .output();
    }
}

/// The host prefix length of an address literal.
fn prefix(ip: &str) -> u8 {
    if ip.contains(':') { 128 } else { 32 }
}
