//! `cargo xtask bench tcp`: what the gate costs a TCP client, next to no proxy at all and to
//! nginx's stream proxy, measured in one run on the same machine against the same servers.
//!
//! Three paths to one upstream (servers on threads of this process: an echo server for latency,
//! a bulk sink/source for throughput):
//! - `direct`: the client connects straight to the server;
//! - `gate`: the client runs inside the governed cgroup (`agentgate exec --agent bench`) and
//!   connects to the server's real address; the eBPF hook redirects it to the daemon, which
//!   relays it and records a session;
//! - `nginx`: the client connects to an nginx `stream` proxy in front of the server.
//!
//! The client is always a separate process (`xtask bench-client`, release build), for every path,
//! so only the route differs. Paths are interleaved in rounds (with a rotating order) so the noise
//! of a small shared machine hits all of them alike. At the end the bench checks with the daemon
//! that it served exactly the connections the gate clients made and recorded them as sessions of
//! agent `bench`: a misconfigured run cannot pass direct numbers off as gate numbers.
//!
//! `run` builds `agentgate` and `xtask` in release mode (unless `--no-build`) and re-runs itself
//! from `target/release/xtask` with `AGENTGATE_BIN` pointing at the release daemon, so servers,
//! clients and the daemon are all optimised builds whichever way the command was started.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentgate_tests::{Gate, free_port, workspace_root};
use anyhow::{Context, Result, bail, ensure};

use super::{Latency, cpu_ns, median, round2};
use crate::bench_client::{CHUNK, HEADER_LEN, MODE_DOWNLOAD, MODE_UPLOAD};

/// Set on the re-run from the release binary.
const AGENT: &str = "bench";
const NGINX: &str = "/usr/sbin/nginx";
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
/// The aim: the gate adds less than this per connect (p50, sequential).
const AIM_ADDED_US: f64 = 100.0;
/// Echo server threads: each serves one connection at a time, no spawn per connection.
const ECHO_THREADS: usize = 16;

/// Options of `cargo xtask bench tcp`.
#[derive(clap::Args, Debug, Clone)]
pub struct TcpBenchOpts {
    /// MiB each bulk connection transfers, per direction and round.
    #[arg(long, default_value_t = 256)]
    pub mib: u64,
    /// Parallel bulk connections.
    #[arg(long, default_value_t = 4)]
    pub conns: usize,
    /// Timed connects per path and latency mode, split over the rounds.
    #[arg(long, default_value_t = 3000)]
    pub iterations: usize,
    /// Untimed warm-up connects before every latency run (per loop).
    #[arg(long, default_value_t = 100)]
    pub warmup: usize,
    /// Concurrent loops of the parallel latency mode (0: sequential only).
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Rounds; each runs every path once per measurement, in a rotating order.
    #[arg(long, default_value_t = 6)]
    pub rounds: usize,
    /// Request (and echo) size of the latency loops, in bytes.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Leave out the nginx stream proxy.
    #[arg(long)]
    pub no_nginx: bool,
    /// nginx `worker_processes`. `auto` (one per core) is the gate's budget: its tokio runtime
    /// runs one worker thread per core. On the 2-core VM `1` and `auto` measured the same within
    /// the noise, for bulk and for connects.
    #[arg(long, default_value = "auto")]
    pub nginx_workers: String,
    /// nginx `proxy_buffer_size`. The gate relays with 64k buffers; nginx's default 16k made
    /// its bulk throughput about 25% lower on the 2-core VM, so 64k is the fair (and stronger)
    /// setting.
    #[arg(long, default_value = "64k")]
    pub nginx_buffer: String,
    /// Do not run `cargo build --release -p agentgate -p xtask` first.
    #[arg(long)]
    pub no_build: bool,
}

/// Entry point of `cargo xtask bench tcp`.
pub fn run(opts: &TcpBenchOpts) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "`cargo xtask bench tcp` needs root: it starts the daemon, which loads eBPF and creates cgroups"
        );
    }
    ensure!(opts.rounds >= 1, "--rounds must be at least 1");
    ensure!(opts.conns >= 1, "--conns must be at least 1");
    ensure!(opts.mib >= 1, "--mib must be at least 1");
    ensure!(
        opts.iterations >= opts.rounds,
        "--iterations must be at least --rounds"
    );
    ensure!(opts.payload >= 1, "--payload must be at least 1");
    let xtask = super::target_dir().join("release/xtask");
    if super::run_inner_release("tcp", opts.no_build)? {
        return Ok(());
    }
    Bench::new(opts, xtask)?.run()
}

/// The bench's upstream servers.
struct Servers {
    echo: SocketAddr,
    bulk: SocketAddr,
}

impl Servers {
    /// Threads that live as long as the process (the bench exits right after).
    fn start() -> Result<Servers> {
        let echo = TcpListener::bind("127.0.0.1:0").context("bind echo server")?;
        let echo_addr = echo.local_addr()?;
        for _ in 0..ECHO_THREADS {
            let l = echo.try_clone()?;
            std::thread::spawn(move || {
                loop {
                    if let Ok((s, _)) = l.accept() {
                        serve_echo(s);
                    }
                }
            });
        }
        let bulk = TcpListener::bind("127.0.0.1:0").context("bind bulk server")?;
        let bulk_addr = bulk.local_addr()?;
        std::thread::spawn(move || {
            for s in bulk.incoming().flatten() {
                std::thread::spawn(move || {
                    if let Err(e) = serve_bulk(s) {
                        eprintln!("bench bulk server: {e:#}");
                    }
                });
            }
        });
        Ok(Servers {
            echo: echo_addr,
            bulk: bulk_addr,
        })
    }
}

fn serve_echo(mut s: TcpStream) {
    use std::io::{Read, Write};
    let _ = s.set_nodelay(true);
    let mut buf = [0u8; 4096];
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

fn serve_bulk(mut s: TcpStream) -> Result<()> {
    use std::io::{Read, Write};
    s.set_nodelay(true)?;
    let mut header = [0u8; HEADER_LEN];
    match s.read_exact(&mut header) {
        Ok(()) => {}
        // A readiness probe (nginx start) connects and closes without a header.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    let (mode, len) = header.split_at(1);
    let len = u64::from_le_bytes(len.try_into()?);
    let mut buf = vec![0xa5u8; CHUNK];
    let mut left = len;
    match mode.first().copied() {
        Some(MODE_UPLOAD) => {
            let mut got = 0u64;
            while left > 0 {
                let want = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
                let n = s.read(buf.get_mut(..want).unwrap_or_default())?;
                if n == 0 {
                    break;
                }
                got += n as u64;
                left -= n as u64;
            }
            s.write_all(&got.to_le_bytes())?;
            // Let the client close first, as in the latency loops.
            while s.read(&mut buf)? > 0 {}
        }
        Some(MODE_DOWNLOAD) => {
            while left > 0 {
                let n = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
                s.write_all(buf.get(..n).unwrap_or_default())?;
                left -= n as u64;
            }
        }
        other => bail!("unknown mode {other:?}"),
    }
    Ok(())
}

/// nginx with the stream module in front of the servers; stopped on drop.
struct Nginx {
    child: Child,
    dir: PathBuf,
    echo: SocketAddr,
    bulk: SocketAddr,
    version: String,
}

impl Nginx {
    fn start(servers: &Servers, workers: &str, buffer: &str) -> Result<Nginx> {
        for p in [NGINX, NGINX_STREAM_MODULE] {
            ensure!(
                std::path::Path::new(p).exists(),
                "{p} is missing: install nginx with the stream module (`apt-get install nginx libnginx-mod-stream`) or pass --no-nginx"
            );
        }
        let version = Command::new(NGINX)
            .arg("-v")
            .output()
            .map(|o| {
                let v = String::from_utf8_lossy(&o.stderr);
                let v = v.trim();
                v.strip_prefix("nginx version: ").unwrap_or(v).to_string()
            })
            .unwrap_or_default();
        let dir = std::env::temp_dir().join(agentgate_tests::unique("agentgate-bench-nginx"));
        std::fs::create_dir_all(dir.join("logs"))?;
        let echo = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let bulk = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let conf = dir.join("nginx.conf");
        // Plain proxying, as close to the gate's job as nginx gets: no logging, nodelay (the
        // default), the gate's 64k relay buffer unless told otherwise.
        std::fs::write(
            &conf,
            format!(
                "load_module {NGINX_STREAM_MODULE};
worker_processes {workers};
pid {pid};
error_log {log} warn;
events {{ worker_connections 4096; }}
stream {{
    access_log off;
    proxy_buffer_size {buffer};
    server {{ listen {echo}; proxy_pass {echo_up}; }}
    server {{ listen {bulk}; proxy_pass {bulk_up}; }}
}}
",
                pid = dir.join("nginx.pid").display(),
                log = dir.join("logs/error.log").display(),
                echo_up = servers.echo,
                bulk_up = servers.bulk,
            ),
        )?;
        let child = Command::new(NGINX)
            .arg("-e")
            .arg(dir.join("logs/error.log"))
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("start nginx")?;
        let mut nginx = Nginx {
            child,
            dir,
            echo,
            bulk,
            version,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = nginx.child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                bail!("nginx exited at start ({status}): {err}");
            }
            if TcpStream::connect(echo).is_ok() && TcpStream::connect(bulk).is_ok() {
                return Ok(nginx);
            }
            if Instant::now() > deadline {
                bail!("nginx did not listen on {echo} and {bulk} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Nginx {
    /// The master and its workers (children).
    fn pids(&self) -> Vec<u32> {
        let master = self.child.id();
        let mut pids = vec![master];
        let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
            .unwrap_or_default();
        pids.extend(
            children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
        pids
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers (SIGKILL would orphan them).
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One route to the servers and what was measured on it.
struct Path {
    name: &'static str,
    echo: SocketAddr,
    bulk: SocketAddr,
    governed: bool,
    seq: Vec<u64>,
    par: Vec<u64>,
    par_rate: Vec<f64>,
    up: Vec<f64>,
    down: Vec<f64>,
    connections: u64,
    up_bytes: u64,
    down_bytes: u64,
    /// CPU time the proxy's processes spent during this path's latency loops, and the
    /// connections those loops made (warm-ups included): the proxy's work per connect, a figure
    /// the machine's noise moves far less than latency.
    latency_cpu_ns: u64,
    latency_connections: u64,
}

impl Path {
    fn new(name: &'static str, echo: SocketAddr, bulk: SocketAddr, governed: bool) -> Path {
        Path {
            name,
            echo,
            bulk,
            governed,
            seq: Vec::new(),
            par: Vec::new(),
            par_rate: Vec::new(),
            up: Vec::new(),
            down: Vec::new(),
            connections: 0,
            up_bytes: 0,
            down_bytes: 0,
            latency_cpu_ns: 0,
            latency_connections: 0,
        }
    }
}

#[derive(Clone, Copy)]
enum Measure {
    Sequential,
    Parallel,
    Upload,
    Download,
}

struct Bench<'a> {
    opts: &'a TcpBenchOpts,
    xtask: PathBuf,
    servers: Servers,
    gate: Gate,
    nginx: Option<Nginx>,
    paths: Vec<Path>,
}

impl<'a> Bench<'a> {
    fn new(opts: &'a TcpBenchOpts, xtask: PathBuf) -> Result<Bench<'a>> {
        ensure!(
            xtask.exists(),
            "{} is missing: run `cargo build --release -p agentgate -p xtask`",
            xtask.display()
        );
        let servers = Servers::start()?;
        println!(
            "==> servers: echo {}, bulk {}; daemon {}",
            servers.echo,
            servers.bulk,
            agentgate_tests::agentgate_bin().display()
        );
        let gate = Gate::start(&format!(
            "agents:
  - name: {AGENT}
    cgroup: {{base}}/{AGENT}
    targets: [sink]
targets:
  - name: sink
    match: [\"{}\", \"{}\"]
    protocol: tcp
",
            servers.echo, servers.bulk
        ));
        println!("==> gate listening on 127.0.0.1:{}", gate.port);
        let nginx = if opts.no_nginx {
            None
        } else {
            let n = Nginx::start(&servers, &opts.nginx_workers, &opts.nginx_buffer)?;
            println!(
                "==> {} stream proxy: echo {}, bulk {} (worker_processes {}, proxy_buffer_size {})",
                n.version, n.echo, n.bulk, opts.nginx_workers, opts.nginx_buffer
            );
            Some(n)
        };
        let mut paths = vec![
            Path::new("direct", servers.echo, servers.bulk, false),
            Path::new("gate", servers.echo, servers.bulk, true),
        ];
        if let Some(n) = &nginx {
            paths.push(Path::new("nginx", n.echo, n.bulk, false));
        }
        Ok(Bench {
            opts,
            xtask,
            servers,
            gate,
            nginx,
            paths,
        })
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

    /// The processes relaying `path`: the daemon, or nginx's master and workers.
    fn proxy_pids(&self, path: &Path) -> Vec<u32> {
        match path.name {
            "gate" => self.gate.pid().into_iter().collect(),
            "nginx" => self.nginx.as_ref().map(Nginx::pids).unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// Runs one client process on `path` and returns its JSON report.
    fn client(&self, path: &Path, args: &[String]) -> Result<serde_json::Value> {
        let xtask = self.xtask.to_string_lossy().into_owned();
        let mut cmd = if path.governed {
            let mut argv: Vec<&str> = vec![&xtask, "bench-client"];
            argv.extend(args.iter().map(String::as_str));
            self.gate.exec(AGENT, &argv)
        } else {
            let mut c = Command::new(&self.xtask);
            c.arg("bench-client").args(args);
            c
        };
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run the {} client", path.name))?;
        if !out.status.success() {
            bail!(
                "{} client `bench-client {}` failed ({}): {}{}",
                path.name,
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .with_context(|| format!("{} client printed nothing", path.name))?;
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} client output `{line}`", path.name))?;
        let cgroup = v["cgroup"].as_str().unwrap_or_default();
        let in_gate = cgroup.contains(&self.gate.cgroup_base);
        ensure!(
            in_gate == path.governed,
            "the {} client ran in cgroup `{cgroup}`, {} the gate's cgroups ({}): the path is not what it claims",
            path.name,
            if path.governed { "outside" } else { "inside" },
            self.gate.cgroup_base
        );
        Ok(v)
    }

    fn measure(&mut self, index: usize, m: Measure, iterations: usize) -> Result<()> {
        let o = self.opts;
        let bytes = o.mib * 1024 * 1024;
        let path = self.paths.get(index).context("path index")?;
        let args: Vec<String> = match m {
            Measure::Sequential | Measure::Parallel => {
                let parallel = if matches!(m, Measure::Sequential) {
                    1
                } else {
                    o.parallel
                };
                vec![
                    "latency".into(),
                    format!("--addr={}", path.echo),
                    format!("--iterations={iterations}"),
                    format!("--warmup={}", o.warmup),
                    format!("--parallel={parallel}"),
                    format!("--payload={}", o.payload),
                ]
            }
            Measure::Upload | Measure::Download => vec![
                if matches!(m, Measure::Upload) {
                    "upload"
                } else {
                    "download"
                }
                .into(),
                format!("--addr={}", path.bulk),
                format!("--conns={}", o.conns),
                format!("--bytes={bytes}"),
            ],
        };
        let proxy = self.proxy_pids(path);
        let cpu_before = cpu_ns(&proxy);
        let v = self.client(path, &args)?;
        let cpu = cpu_ns(&proxy).saturating_sub(cpu_before);
        let path = self.paths.get_mut(index).context("path index")?;
        let connections = v["connections"]
            .as_u64()
            .context("client report: connections")?;
        path.connections += connections;
        if matches!(m, Measure::Sequential | Measure::Parallel) && !proxy.is_empty() {
            path.latency_cpu_ns += cpu;
            path.latency_connections += connections;
        }
        match m {
            Measure::Sequential | Measure::Parallel => {
                let samples = v["samples_ns"]
                    .as_array()
                    .context("client report: samples_ns")?
                    .iter()
                    .filter_map(serde_json::Value::as_u64);
                if matches!(m, Measure::Sequential) {
                    path.seq.extend(samples);
                } else {
                    path.par.extend(samples);
                    let n = v["connections"].as_f64().unwrap_or(0.0);
                    let wall = v["wall_s"].as_f64().unwrap_or(0.0).max(1e-9);
                    path.par_rate.push(n / wall);
                }
            }
            Measure::Upload | Measure::Download => {
                let rate = v["mib_per_s"]
                    .as_f64()
                    .context("client report: mib_per_s")?;
                let total = v["bytes"].as_u64().context("client report: bytes")?;
                if matches!(m, Measure::Upload) {
                    path.up.push(rate);
                    path.up_bytes += total;
                } else {
                    path.down.push(rate);
                    path.down_bytes += total;
                }
            }
        }
        Ok(())
    }

    fn run(mut self) -> Result<()> {
        let o = self.opts;
        let per_round = o.iterations.div_ceil(o.rounds);
        let mut measures = vec![Measure::Sequential];
        if o.parallel > 0 {
            measures.push(Measure::Parallel);
        }
        measures.extend([Measure::Upload, Measure::Download]);
        let (served_before, refused_before) = self.served()?;
        let started = Instant::now();
        let n = self.paths.len();
        for round in 0..o.rounds {
            let order: Vec<usize> = (0..n).map(|i| (i + round) % n).collect();
            for &m in &measures {
                for &i in &order {
                    self.measure(i, m, per_round)?;
                }
            }
            let line: Vec<String> = self
                .paths
                .iter()
                .map(|p| {
                    format!(
                        "{} p50 {:.0} us, up {:.0} MiB/s, down {:.0} MiB/s",
                        p.name,
                        Latency::of(&p.seq).map(|l| l.p50_us).unwrap_or(0.0),
                        p.up.last().copied().unwrap_or(0.0),
                        p.down.last().copied().unwrap_or(0.0)
                    )
                })
                .collect();
            println!(
                "    round {}/{} ({:.0} s): {}",
                round + 1,
                o.rounds,
                started.elapsed().as_secs_f64(),
                line.join(" | ")
            );
        }
        let verified = self.verify(served_before, refused_before)?;
        let report = self.report(verified);
        let out = workspace_root().join("target/bench/tcp.json");
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&out, format!("{report:#}\n"))?;
        println!("wrote {}", out.display());
        drop(self.nginx.take());
        Ok(())
    }

    /// The daemon served exactly the gate clients' connections and recorded them as sessions
    /// of agent `bench` carrying the bulk bytes and the client process's identity (exe,
    /// cmdline, cgroup): a gate that skipped its per-connection work would not pass.
    fn verify(&self, served_before: u64, refused_before: u64) -> Result<serde_json::Value> {
        let gate = self
            .paths
            .iter()
            .find(|p| p.governed)
            .context("no gate path")?;
        let (served, refused) = self.served()?;
        let served_delta = served - served_before;
        ensure!(
            served_delta == gate.connections,
            "the gate served {served_delta} connections during the bench but the gate clients made {}: the gate numbers are not (only) gate numbers",
            gate.connections
        );
        ensure!(
            refused == refused_before,
            "the gate refused {} connections during the bench",
            refused - refused_before
        );
        let limit = (gate.connections + 1000).to_string();
        let expected = usize::try_from(gate.connections)?;
        let servers = [self.servers.echo.to_string(), self.servers.bulk.to_string()];
        // What /proc says about every gate client: `agentgate exec` runs `xtask bench-client`
        // in the agent's cgroup.
        let exe = std::fs::canonicalize(&self.xtask)
            .with_context(|| format!("canonicalize {}", self.xtask.display()))?;
        let exe = exe.to_string_lossy().into_owned();
        let cgroup = format!("{}/{AGENT}", self.gate.cgroup_base);
        let identified = |r: &serde_json::Value| {
            r["exe"] == exe.as_str()
                && r["cmdline"]
                    .as_str()
                    .is_some_and(|c| c.contains(" bench-client "))
                && r["cgroup"]
                    .as_str()
                    .is_some_and(|c| c.ends_with(cgroup.as_str()))
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self
                .gate
                .cli_json(&["sessions", "list", "--limit", &limit, "--json"]);
            let rows: Vec<&serde_json::Value> = v
                .as_array()
                .context("sessions list --json: not an array")?
                .iter()
                .filter(|r| {
                    r["agent"] == AGENT
                        && r["target"] == "sink"
                        && !r["ended"].is_null()
                        && r["error"].is_null()
                        && servers.iter().any(|s| r["upstream"] == s.as_str())
                })
                .collect();
            let up: u64 = rows.iter().filter_map(|r| r["bytes_up"].as_u64()).sum();
            let down: u64 = rows.iter().filter_map(|r| r["bytes_down"].as_u64()).sum();
            let with_identity = rows.iter().filter(|r| identified(r)).count();
            if rows.len() >= expected
                && with_identity >= expected
                && up >= gate.up_bytes
                && down >= gate.down_bytes
            {
                println!(
                    "verified: the gate served {served_delta} connections ({} made by the gate clients), {} sessions of agent `{AGENT}` ended cleanly ({with_identity} with the client's exe, cmdline and cgroup), relaying {:.2} GiB up and {:.2} GiB down",
                    gate.connections,
                    rows.len(),
                    up as f64 / GIB,
                    down as f64 / GIB
                );
                return Ok(serde_json::json!({
                    "gate_connections_made": gate.connections,
                    "gate_connections_served": served_delta,
                    "gate_sessions_recorded": rows.len(),
                    "gate_sessions_with_identity": with_identity,
                    "gate_bytes_up_recorded": up,
                    "gate_bytes_down_recorded": down,
                }));
            }
            if Instant::now() > deadline {
                bail!(
                    "the gate's session store shows {} clean sessions of agent `{AGENT}` ({expected} expected), {with_identity} of them with exe {exe}, a bench-client cmdline and cgroup {cgroup}, {up} bytes up ({} expected), {down} down ({} expected)",
                    rows.len(),
                    gate.up_bytes,
                    gate.down_bytes
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn report(&self, verified: serde_json::Value) -> serde_json::Value {
        let o = self.opts;
        let find = |name: &str| self.paths.iter().find(|p| p.name == name);
        let seq = |name: &str| find(name).and_then(|p| Latency::of(&p.seq));
        let par = |name: &str| find(name).and_then(|p| Latency::of(&p.par));
        let up = |name: &str| find(name).and_then(|p| median(&p.up));
        let down = |name: &str| find(name).and_then(|p| median(&p.down));
        let rate = |name: &str| find(name).and_then(|p| median(&p.par_rate));
        let names = ["direct", "gate", "nginx"];

        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let nginx_version = self.nginx.as_ref().map(|n| n.version.clone());
        println!();
        println!(
            "agentgate bench tcp: {cores} cores, Linux {}, {}",
            kernel.trim(),
            nginx_version
                .as_deref()
                .map_or("no nginx".to_string(), |v| format!(
                    "{v} (worker_processes {}, proxy_buffer_size {})",
                    o.nginx_workers, o.nginx_buffer
                ))
        );
        println!(
            "bulk: {} conns x {} MiB per direction per round; latency: {} connects per path and mode ({}-byte echo, {} warm-up per loop); {} interleaved rounds",
            o.conns,
            o.mib,
            o.iterations.div_ceil(o.rounds) * o.rounds,
            o.payload,
            o.warmup,
            o.rounds
        );
        println!();
        println!(
            "{:<34}{:>10}{:>10}{:>10}{:>13}{:>12}",
            "", "direct", "gate", "nginx", "gate/direct", "gate/nginx"
        );
        let row = |label: &str, f: &dyn Fn(&str) -> Option<f64>| {
            let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
                _ => "-".into(),
            };
            let (d, g, n) = (f("direct"), f("gate"), f("nginx"));
            println!(
                "{label:<34}{:>10}{:>10}{:>10}{:>13}{:>12}",
                cell(d),
                cell(g),
                cell(n),
                ratio(g, d),
                ratio(g, n)
            );
        };
        row("upload MiB/s (median of rounds)", &|p| up(p));
        row("download MiB/s (median of rounds)", &|p| down(p));
        row("connect+echo sequential p50 us", &|p| {
            seq(p).map(|l| l.p50_us)
        });
        row("                        p90 us", &|p| {
            seq(p).map(|l| l.p90_us)
        });
        row("                        p99 us", &|p| {
            seq(p).map(|l| l.p99_us)
        });
        if o.parallel > 0 {
            let label = format!("connect+echo {} parallel p50 us", o.parallel);
            row(&label, &|p| par(p).map(|l| l.p50_us));
            row("                        p90 us", &|p| {
                par(p).map(|l| l.p90_us)
            });
            row("                        p99 us", &|p| {
                par(p).map(|l| l.p99_us)
            });
            row("                   connects/s", &rate);
        }
        let cpu_per_connect = |name: &str| {
            let p = find(name)?;
            (p.latency_connections > 0)
                .then(|| p.latency_cpu_ns as f64 / p.latency_connections as f64 / 1000.0)
        };
        row("proxy CPU per connect us", &cpu_per_connect);
        println!();

        let added = |f: &dyn Fn(&str) -> Option<Latency>, who: &str| -> Option<f64> {
            Some(f(who)?.p50_us - f("direct")?.p50_us)
        };
        let fmt_added = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:+.1} us"));
        let gate_added = added(&seq, "gate");
        let nginx_added = added(&seq, "nginx");
        println!(
            "added per connect (p50 - direct p50), sequential: gate {}, nginx {}",
            fmt_added(gate_added),
            fmt_added(nginx_added)
        );
        if o.parallel > 0 {
            println!(
                "added per connect (p50 - direct p50), {} parallel: gate {}, nginx {}",
                o.parallel,
                fmt_added(added(&par, "gate")),
                fmt_added(added(&par, "nginx"))
            );
        }
        let verdict = |ok: Option<bool>| match ok {
            Some(true) => "MET",
            Some(false) => "MISSED",
            None => "n/a",
        };
        let aim_latency = gate_added.map(|a| a < AIM_ADDED_US);
        let beats = |f: &dyn Fn(&str) -> Option<f64>, higher_better: bool| -> Option<bool> {
            let (g, n) = (f("gate")?, f("nginx")?);
            Some(if higher_better { g > n } else { g < n })
        };
        let ahead_up = beats(&up, true);
        let ahead_down = beats(&down, true);
        let ahead_seq = beats(&|p| seq(p).map(|l| l.p50_us), false);
        let ahead_par = if o.parallel > 0 {
            beats(&|p| par(p).map(|l| l.p50_us), false)
        } else {
            None
        };
        println!(
            "aim: gate adds < {AIM_ADDED_US:.0} us per connect (sequential p50) ..... {}",
            verdict(aim_latency)
        );
        println!(
            "aim: gate ahead of nginx on throughput (up, down) ........... {}, {}",
            verdict(ahead_up),
            verdict(ahead_down)
        );
        println!(
            "aim: gate ahead of nginx on connect latency (seq, par p50) .. {}, {}",
            verdict(ahead_seq),
            verdict(ahead_par)
        );

        let paths: serde_json::Map<String, serde_json::Value> = names
            .iter()
            .filter_map(|&n| {
                let p = find(n)?;
                Some((
                    n.to_string(),
                    serde_json::json!({
                        "upload_mib_s": up(n).map(round2),
                        "upload_mib_s_rounds": p.up.iter().copied().map(round2).collect::<Vec<_>>(),
                        "download_mib_s": down(n).map(round2),
                        "download_mib_s_rounds": p.down.iter().copied().map(round2).collect::<Vec<_>>(),
                        "latency_sequential": seq(n).map(Latency::to_json),
                        "latency_parallel": par(n).map(Latency::to_json),
                        "parallel_connects_per_s": rate(n).map(round2),
                        "proxy_cpu_us_per_connect": cpu_per_connect(n).map(round2),
                        "connections": p.connections,
                    }),
                ))
            })
            .collect();
        let ratio = |f: &dyn Fn(&str) -> Option<f64>, a: &str, b: &str| -> Option<f64> {
            Some(round2(f(a)? / f(b)?))
        };
        serde_json::json!({
            "machine": { "cores": cores, "kernel": kernel.trim() },
            "options": {
                "mib_per_conn": o.mib,
                "conns": o.conns,
                "iterations": o.iterations.div_ceil(o.rounds) * o.rounds,
                "warmup": o.warmup,
                "parallel": o.parallel,
                "rounds": o.rounds,
                "payload": o.payload,
                "nginx": nginx_version.map(|v| serde_json::json!({
                    "version": v,
                    "worker_processes": o.nginx_workers,
                    "proxy_buffer_size": o.nginx_buffer,
                })),
            },
            "paths": paths,
            "ratios": {
                "upload_gate_over_direct": ratio(&up, "gate", "direct"),
                "upload_gate_over_nginx": ratio(&up, "gate", "nginx"),
                "download_gate_over_direct": ratio(&down, "gate", "direct"),
                "download_gate_over_nginx": ratio(&down, "gate", "nginx"),
            },
            "added_per_connect_us": {
                "gate_sequential_p50": gate_added.map(round2),
                "nginx_sequential_p50": nginx_added.map(round2),
                "gate_parallel_p50": added(&par, "gate").map(round2),
                "nginx_parallel_p50": added(&par, "nginx").map(round2),
            },
            "aims": {
                "added_per_connect_under_us": AIM_ADDED_US,
                "added_per_connect_met": aim_latency,
                "throughput_ahead_of_nginx": { "upload": ahead_up, "download": ahead_down },
                "latency_ahead_of_nginx": { "sequential_p50": ahead_seq, "parallel_p50": ahead_par },
            },
            "verified": verified,
        })
    }
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
