//! `agentgate run`: wires configuration, cgroups, the kernel side, the session store, the
//! listeners and the admin socket together, then serves until SIGTERM/SIGINT.
//!
//! Start-up order matters for failing closed: listeners are bound and every map is filled
//! before the kernel side is marked ready; until then governed connects are refused. On exit
//! the pinned links stay: governed agents remain refused until a daemon serves again or an
//! operator runs `agentgate uninstall`.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpListener;

use crate::admin::{self, GovernedCgroup};
use crate::approval::{Approvals, Grant};
use crate::config::{Config, normalize_cgroup};
use crate::identity::{CgroupFs, IdentityError, ProcessInfo, cgroup_id};
use crate::intercept::{self, Intercept, InterceptError};
use crate::proxy::{self, Gate};
use crate::session::limit::{self, EventLimiter, Source};
use crate::session::{Event, SessionError, SessionReader, SessionStore};

/// PENDING/FLOWS records older than this were never used and are swept.
const STALE_RECORD_NS: u64 = 60 * 1_000_000_000;
const SWEEP_EVERY: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Intercept(#[from] InterceptError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("postgres targets: {0}")]
    Postgres(#[from] proxy::postgres::SetupError),
}

pub struct Daemon {
    pub gate: Arc<Gate>,
    pub approvals: Arc<Approvals>,
    pub cgroups: CgroupFs,
    pub listeners: Vec<SocketAddr>,
    /// Endpoints governed agents may never connect to (the admin HTTP listener).
    protected: Vec<SocketAddr>,
    governed: Mutex<Vec<GovernedCgroup>>,
}

impl Daemon {
    /// The agent whose governed cgroup is `cgroup` or one of its ancestors.
    fn agent_of_cgroup(&self, cgroup: &str) -> Option<String> {
        let cgroup = cgroup.trim_start_matches('/');
        self.governed_list()
            .into_iter()
            .find(|g| {
                let root = g.cgroup.trim_start_matches('/');
                cgroup == root || cgroup.starts_with(&format!("{root}/"))
            })
            .map(|g| g.agent)
    }

    /// The governed agent a caller is, if any: a unix peer inside a governed cgroup, or a JWT
    /// subject that names an agent.
    pub fn caller_agent(&self, caller: &admin::Caller) -> Option<String> {
        match caller {
            admin::Caller::Unix { cgroup, .. } => {
                cgroup.as_deref().and_then(|c| self.agent_of_cgroup(c))
            }
            admin::Caller::Http { subject } => self.gate.cfg.agent(subject).map(|a| a.name.clone()),
        }
    }

    /// Governed processes never use the admin API, whatever their uid.
    pub fn admin_allowed(&self, caller: &admin::Caller) -> Result<(), String> {
        match caller {
            admin::Caller::Unix { pid: None, .. } => Err("the caller's process is unknown".into()),
            // The connecting process is gone (its connection may be in a governed process's
            // hands) or its cgroup is unreadable: it cannot be shown not to be an agent.
            admin::Caller::Unix { cgroup: None, .. } => {
                Err("the caller's process is gone or its cgroup cannot be read".into())
            }
            admin::Caller::Unix {
                pid: Some(pid),
                cgroup: Some(cgroup),
                ..
            } => match self.agent_of_cgroup(cgroup) {
                Some(agent) => {
                    tracing::warn!(
                        agent,
                        pid,
                        "a governed process called the admin API; refused"
                    );
                    Err(format!(
                        "governed agent `{agent}` may not use the admin API"
                    ))
                }
                None => Ok(()),
            },
            admin::Caller::Http { .. } => Ok(()),
        }
    }

    pub fn governed_list(&self) -> Vec<GovernedCgroup> {
        self.governed.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// `orphan`: see [`Intercept::sync`] (true at start-up only).
    fn resync(&self, governed: &[GovernedCgroup], orphan: bool) -> Result<(), InterceptError> {
        let cfg = &self.gate.cfg;
        let pairs: Vec<(u64, u32)> = governed
            .iter()
            .filter_map(|g| Some((g.cgroup_id, cfg.agent_id(&g.agent)?)))
            .collect();
        self.gate
            .intercept
            .sync(cfg, &pairs, &self.protected, orphan)
    }

    /// Governs an existing cgroup (a systemd service, a container) as `agent`.
    pub fn attach(&self, agent: &str, cgroup: &str) -> Result<(), String> {
        let cfg = &self.gate.cfg;
        let a = cfg
            .agent(agent)
            .ok_or_else(|| format!("unknown agent `{agent}`"))?;
        let relative = relative_cgroup(&self.cgroups, cgroup)?;
        let dir = self.cgroups.dir(&relative);
        let id = cgroup_id(&dir).map_err(|e| e.to_string())?;
        let mut governed = self
            .governed
            .lock()
            .map_err(|_| "internal lock poisoned".to_string())?;
        if let Some(existing) = governed.iter().find(|g| g.cgroup_id == id) {
            if existing.agent != agent {
                return Err(format!(
                    "cgroup {relative} is already governed as `{}`",
                    existing.agent
                ));
            }
            return Ok(());
        }
        governed.push(describe(cfg, a, &relative, id));
        self.resync(&governed, false).map_err(|e| e.to_string())?;
        self.gate
            .store
            .attach(&relative, agent)
            .map_err(|e| e.to_string())?;
        tracing::info!(agent, cgroup = %relative, cgroup_id = id, "cgroup attached");
        Ok(())
    }

    /// Follows governed cgroups that were removed and created again under the same path (systemd
    /// does that on every restart of a service): the new cgroup has a new id, which the kernel
    /// side must know or the restarted service would run ungoverned.
    /// `seen_by`: what noticed it (`inotify`, or `poll`, the backstop), for the log.
    fn follow_recreated_cgroups(&self, seen_by: &'static str) {
        let Ok(mut governed) = self.governed.lock() else {
            return;
        };
        let mut changed = false;
        for g in governed.iter_mut() {
            if let Ok(id) = cgroup_id(&self.cgroups.dir(&g.cgroup))
                && id != g.cgroup_id
            {
                tracing::warn!(agent = %g.agent, cgroup = %g.cgroup, old = g.cgroup_id, new = id, seen_by, "a governed cgroup was created again; governing the new one");
                g.cgroup_id = id;
                changed = true;
            }
        }
        if changed && let Err(e) = self.resync(&governed, false) {
            tracing::error!(error = %e, "cannot govern a re-created cgroup");
        }
    }

    /// Stops governing a cgroup added with `attach` (configured agent cgroups stay governed).
    pub fn detach(&self, cgroup: &str) -> Result<(), String> {
        let relative = relative_cgroup(&self.cgroups, cgroup)?;
        if self
            .gate
            .cfg
            .agents
            .iter()
            .any(|a| normalize_cgroup(&a.cgroup).ok().as_deref() == Some(relative.as_str()))
        {
            return Err(format!(
                "cgroup {relative} is an agent's configured cgroup; change the configuration instead"
            ));
        }
        let mut governed = self
            .governed
            .lock()
            .map_err(|_| "internal lock poisoned".to_string())?;
        let before = governed.len();
        governed.retain(|g| g.cgroup != relative);
        if governed.len() == before {
            return Err(format!("cgroup {relative} is not attached"));
        }
        self.resync(&governed, false).map_err(|e| e.to_string())?;
        self.gate
            .store
            .detach(&relative)
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}

fn describe(cfg: &Config, a: &crate::config::AgentConfig, cgroup: &str, id: u64) -> GovernedCgroup {
    GovernedCgroup {
        agent: a.name.clone(),
        cgroup: cgroup.to_string(),
        cgroup_id: id,
        roles: a.roles.clone(),
        targets: cfg.targets_of(a).map(|(_, t)| t.name.clone()).collect(),
    }
}

/// Accepts a cgroup as an absolute path under the cgroup2 mount or relative to it.
fn relative_cgroup(cgroups: &CgroupFs, path: &str) -> Result<String, String> {
    let p = std::path::Path::new(path);
    let rel = match p.strip_prefix(&cgroups.mount) {
        Ok(r) => r.to_string_lossy().into_owned(),
        Err(_) => path.to_string(),
    };
    normalize_cgroup(&rel)
}

/// `state_dir` holds every agent's records (the session store), the admin socket and the pid
/// file: only the daemon's user may enter it. Made 0700 when missing, narrowed to 0700 when an
/// earlier version left it open to other users, refused when another user owns it (that user
/// could swap the files inside).
fn private_state_dir(dir: &Path) -> Result<(), DaemonError> {
    let io = |source| DaemonError::Io {
        what: format!("state_dir {}", dir.display()),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    let meta = std::fs::metadata(dir).map_err(io)?;
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(io(std::io::Error::other(format!(
            "owned by uid {}, not by the daemon's user; it holds every agent's records",
            meta.uid()
        ))));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{mode:o}"),
            "state_dir was open to other users; narrowed to 0700"
        );
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}

/// One daemon per `state_dir`: a second one would take the open sessions of the first for ones a
/// killed daemon left (and end them as interrupted), and serve beside it on the same port. An
/// exclusive lock on `state_dir/agentgate.lock`, which the kernel releases however the holder
/// ends.
fn lock_state_dir(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, DaemonError> {
    let path = dir.join("agentgate.lock");
    let io = |source| DaemonError::Io {
        what: format!("lock file {}", path.display()),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        let running = std::fs::read_to_string(dir.join("agentgate.pid")).unwrap_or_default();
        io(std::io::Error::other(format!(
            "another agentgate daemon (pid {}) runs with this state_dir: {e}",
            running.trim()
        )))
    })
}

pub async fn run(cfg: Config) -> Result<(), DaemonError> {
    let cfg = Arc::new(cfg);
    raise_fd_limit();
    let cgroups = CgroupFs::discover()?;
    private_state_dir(&cfg.state_dir)?;
    // Held until this function returns (the process ends): before the store is opened, which
    // ends the sessions an earlier daemon left open.
    let _only_daemon = lock_state_dir(&cfg.state_dir)?;
    let agents: Vec<&str> = cfg.agents.iter().map(|a| a.name.as_str()).collect();
    let store = Arc::new(SessionStore::open_with(
        &cfg.sessions_db(),
        cfg.sessions,
        &agents,
    )?);

    let mut governed = Vec::new();
    for a in &cfg.agents {
        let relative = normalize_cgroup(&a.cgroup).unwrap_or_else(|_| a.cgroup.clone());
        let id = cgroups.ensure(&relative)?;
        governed.push(describe(&cfg, a, &relative, id));
    }
    for (cgroup, agent) in SessionReader::open(&cfg.sessions_db())?.attachments()? {
        let Some(a) = cfg.agent(&agent) else {
            tracing::warn!(
                cgroup,
                agent,
                "attachment names an agent no longer configured; skipped"
            );
            continue;
        };
        match cgroup_id(&cgroups.dir(&cgroup)) {
            Ok(id) => governed.push(describe(&cfg, a, &cgroup, id)),
            Err(e) => tracing::warn!(cgroup, error = %e, "attached cgroup is gone; skipped"),
        }
    }

    // Before the listeners exist: re-adopted programs are marked not ready until the maps match
    // this configuration, so nothing is accepted under the previous one's ids.
    let intercept = Arc::new(Intercept::load_or_adopt(&cfg, &cgroups)?);

    let mut listeners = Vec::new();
    let mut bound = Vec::new();
    let mut addrs = vec![SocketAddr::new(
        IpAddr::V4(cfg.listen.ipv4),
        cfg.listen.port,
    )];
    if let Some(v6) = cfg.listen.ipv6 {
        addrs.push(SocketAddr::new(IpAddr::V6(v6), cfg.listen.port));
    }
    // One accept loop per core, each on its own single-threaded runtime with its own
    // SO_REUSEPORT listener: a connection's accept, upstream connect and relay never hop between
    // threads (those wake-ups were most of the per-connect cost on a multi-threaded runtime).
    let cpus = accept_cpus(cfg.listen.pin_cpus);
    for addr in addrs {
        for cpu in &cpus {
            let listener =
                reuseport_listener(addr).map_err(|source| DaemonError::Listen { addr, source })?;
            if let Some(cpu) = cpu {
                steer_to_cpu(&listener, *cpu);
            }
            bound.push((listener, *cpu));
        }
        listeners.push(addr);
    }

    let webhooks = if cfg.webhooks.is_empty() {
        None
    } else {
        Some(
            crate::webhook::Webhooks::start(&cfg.webhooks).map_err(|e| DaemonError::Io {
                what: "webhooks".into(),
                source: std::io::Error::other(e.to_string()),
            })?,
        )
    };
    let reader = SessionReader::open(&cfg.sessions_db())?;
    let grants: Vec<Grant> = reader
        .grants()?
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect();
    let approvals = Arc::new(
        Approvals::new(store.clone(), webhooks, grants, reader.last_ticket_id()?)
            .with_limits(cfg.approvals),
    );
    drop(reader);
    let admin_http = match &cfg.admin.http {
        Some(h) => {
            let verifier = admin::jwt::Verifier::from_config(&h.jwt)
                .map_err(|e| DaemonError::Io {
                    what: "admin.http.jwt".into(),
                    source: std::io::Error::other(e.to_string()),
                })?
                // Validated at load.
                .with_max_lifetime(h.max_token_lifetime().unwrap_or(None));
            let listener =
                TcpListener::bind(h.listen)
                    .await
                    .map_err(|source| DaemonError::Listen {
                        addr: h.listen,
                        source,
                    })?;
            Some((listener, Arc::new(verifier)))
        }
        None => None,
    };
    let protected: Vec<SocketAddr> = cfg.admin.http.iter().map(|h| h.listen).collect();
    let postgres = proxy::postgres::Shared::build(&cfg, approvals.clone())?;
    let gate = Arc::new(Gate {
        cfg: cfg.clone(),
        intercept: intercept.clone(),
        store: store.clone(),
        postgres,
        served: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        events: EventLimiter::new(cfg.events),
        active: cfg.agents.iter().map(|_| AtomicUsize::new(0)).collect(),
    });
    let daemon = Arc::new(Daemon {
        gate: gate.clone(),
        approvals: approvals.clone(),
        cgroups,
        listeners,
        protected,
        governed: Mutex::new(Vec::new()),
    });
    daemon.resync(&governed, true)?;
    intercept::warn_of_autobind_ports(&cfg);
    let budget = cfg.kernel_event_budget();
    if budget.clamped {
        tracing::warn!(
            agents = cfg.agents.len(),
            kernel_burst = budget.burst,
            events_burst = cfg.events.burst,
            "the kernel's ring buffer of refusals gives each agent fewer entries at once than events.burst"
        );
    }
    if let Ok(mut g) = daemon.governed.lock() {
        *g = governed;
    }

    if let Some(ring) = intercept.take_events() {
        tokio::spawn(read_events(ring, gate.clone()));
    }
    tokio::spawn(sweep(intercept.clone()));
    tokio::spawn(record_left_out_events(gate.clone()));
    tokio::spawn(follow_cgroups(daemon.clone()));
    let admin_path = cfg.admin_socket();
    let admin_listener = admin::bind(&admin_path).map_err(|source| DaemonError::Io {
        what: format!("admin socket {}", admin_path.display()),
        source,
    })?;
    tokio::spawn(admin::serve(admin_listener, daemon.clone()));
    tokio::spawn(approvals.clone().tick());
    if let Some((listener, verifier)) = admin_http {
        tracing::info!(listen = ?listener.local_addr().ok(), "admin HTTP API listening (JWT)");
        tokio::spawn(admin::http::serve(listener, verifier, daemon.clone()));
    }
    for (i, (l, cpu)) in bound.into_iter().enumerate() {
        let gate = gate.clone();
        std::thread::Builder::new()
            .name(format!("accept-{i}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    pin_this_thread(cpu);
                }
                serve_on_own_runtime(l, gate)
            })
            .map_err(|source| DaemonError::Io {
                what: "accept thread".into(),
                source,
            })?;
    }
    let pid_file = cfg.state_dir.join("agentgate.pid");
    std::fs::write(&pid_file, std::process::id().to_string()).map_err(|source| {
        DaemonError::Io {
            what: format!("pid file {}", pid_file.display()),
            source,
        }
    })?;

    tracing::info!(
        listeners = ?daemon.listeners,
        adopted = intercept.adopted,
        agents = cfg.agents.len(),
        "agentgate is enforcing"
    );
    wait_for_shutdown().await;
    tracing::info!(
        "shutting down; pinned programs stay attached (governed agents are refused until a daemon serves again)"
    );
    // Governed connects are refused in the kernel while no daemon serves, rather than sent to
    // a port another process could bind meanwhile (a daemon killed outright skips this: its
    // port then refuses them, see `listen.port`).
    if let Err(e) = intercept.set_ready(false) {
        tracing::error!(error = %e, "cannot mark the kernel side not ready");
    }
    // The relays still running end with the process, before they could write their ends.
    if let Err(e) = store.end_open_sessions() {
        tracing::error!(error = %e, "session store: the open sessions could not be ended");
    }
    // Bounded: the writer waits out a lock another process holds on the file, however long,
    // and retries a commit that failed.
    match tokio::time::timeout(std::time::Duration::from_secs(30), store.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(error = %e, "session store: the last records may not be committed")
        }
        Err(_) => tracing::error!(
            queued = store.queue().queued,
            "session store: the last records were not committed within 30 s (is the file locked?)"
        ),
    }
    let _ = std::fs::remove_file(&pid_file);
    let _ = std::fs::remove_file(&admin_path);
    Ok(())
}

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.set_reuseport(true)?;
    // Accepted sockets inherit it: agents' request/response exchanges never wait on Nagle, and
    // no connection pays a `setsockopt` of its own for it.
    sock.set_nodelay(true)?;
    // Accepted sockets inherit it too. Left to autotuning, the receive buffer of a connection
    // whose upstream stops reading grew to 6-18 MiB of the host's TCP memory (a direct
    // connection to the same server holds about 4), and an agent could open a thousand.
    sock.set_recv_buffer_size(RELAY_RECEIVE_BUFFER)?;
    sock.bind(addr)?;
    sock.listen(1024)?.into_std()
}

/// `SO_RCVBUF` of every accepted connection (the kernel doubles it for its own bookkeeping).
const RELAY_RECEIVE_BUFFER: u32 = 1024 * 1024;

/// The accept loops, per listener address: one per CPU this daemon may run on (at most 8), each
/// with the CPU to pin it to when pinning is on (and the CPU set can be read).
///
/// Pinned loops with `SO_INCOMING_CPU` listeners keep the wake-ups between an agent and the
/// gate on one core. On the 2-core VM, back to back against floating loops (`bench tcp`, gate
/// / nginx): 4 parallel connects p50 0.93-0.95 against 1.14-1.21, CPU per connect 1.15-1.19
/// against 1.27-1.29, sequential connects p50 1.11-1.17 against 0.92-0.95 (a lone connect no
/// longer overlaps the agent's own work with the gate's); `bench postgres`: CPU per transaction
/// 2.21x / 1.71x PgBouncer's against 2.43x / 1.98x.
fn accept_cpus(pin: bool) -> Vec<Option<usize>> {
    const MAX_LOOPS: usize = 8;
    if pin {
        match allowed_cpus() {
            Ok(cpus) if !cpus.is_empty() => {
                return cpus.into_iter().take(MAX_LOOPS).map(Some).collect();
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot read this daemon's CPU set; accept loops are not pinned")
            }
        }
    }
    let loops = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
        .clamp(1, MAX_LOOPS);
    vec![None; loops]
}

/// The CPUs this thread may run on (the daemon's affinity set, as started), in order.
fn allowed_cpus() -> nix::Result<Vec<usize>> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
    Ok((0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

/// The kernel prefers, within the SO_REUSEPORT group, the listener whose incoming CPU is the one
/// processing the connection's SYN. Best effort: without it, connections are spread by hash.
fn steer_to_cpu(listener: &std::net::TcpListener, cpu: usize) {
    if let Err(e) = socket2::SockRef::from(listener).set_cpu_affinity(cpu) {
        tracing::warn!(cpu, error = %e, "cannot set SO_INCOMING_CPU on a listener");
    }
}

fn pin_this_thread(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    let pinned = set
        .set(cpu)
        .and_then(|()| nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set));
    if let Err(e) = pinned {
        tracing::warn!(cpu, error = %e, "cannot pin an accept loop to its CPU; it floats");
    }
}

fn serve_on_own_runtime(listener: std::net::TcpListener, gate: Arc<Gate>) {
    // Sockets and timers only: with `enable_all` every park of the loop also polled the
    // process driver for orphaned children, and nothing here spawns a process or waits on a
    // signal (the daemon's main runtime does).
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start an accept runtime");
            return;
        }
    };
    rt.block_on(async move {
        match TcpListener::from_std(listener) {
            Ok(l) => proxy::serve(l, gate).await,
            Err(e) => tracing::error!(error = %e, "cannot register a listener"),
        }
    });
}

async fn wait_for_shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers, serve until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn read_events(ring: RingBuf<MapData>, gate: Arc<Gate>) {
    // `AsyncFd::new` is deprecated in favour of the unsafe `register`, whose contract is that the
    // fd stays open while registered. The ring buffer owns its fd and is moved into the AsyncFd,
    // so that holds by construction, and this crate forbids unsafe code.
    #[allow(deprecated)]
    let registered = AsyncFd::new(ring);
    let mut afd = match registered {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "cannot poll the kernel event ring buffer; refusals will not be recorded");
            return;
        }
    };
    let mut batch = Vec::new();
    loop {
        let mut guard = match afd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "kernel event ring buffer failed");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if let Some(ev) = intercept::decode_event(&item) {
                batch.push(ev);
            }
        }
        guard.clear_ready();
        let now = Instant::now();
        for ev in batch.drain(..) {
            let agent = gate.cfg.agent_by_id(ev.agent_id).map(|a| a.name.clone());
            let reason = intercept::reason_name(ev.reason);
            // A governed agent looping on a refused connect makes one of these per call: each
            // agent's are recorded within the limits, the rest counted (`session::limit`).
            let source = Source {
                kind: "kernel_deny",
                agent: Some(
                    agent
                        .clone()
                        .unwrap_or_else(|| format!("agent id {}", ev.agent_id)),
                ),
                reason: Some(reason),
            };
            if !gate.events.admit(&source, now) {
                continue;
            }
            let process = ProcessInfo::read(ev.tgid, ev.uid);
            // A socket refused at creation has no destination yet.
            let dst = (ev.reason != agent_common::reason::SOCKET_NOT_ALLOWED)
                .then(|| SocketAddr::new(intercept::ip_of(&ev.dst_addr), ev.dst_port));
            let socket = intercept::socket_name(ev.sock_type, ev.protocol);
            tracing::warn!(
                agent = agent.as_deref().unwrap_or("?"),
                pid = ev.tgid,
                uid = ev.uid,
                destination = dst.map(|d| d.to_string()).unwrap_or_default(),
                socket,
                reason,
                "kernel refused a governed socket"
            );
            let _ = gate.store.event(Event {
                session_id: None,
                kind: "kernel_deny".into(),
                agent,
                // 0 for a packet dropped on arrival: no process ran.
                pid: (ev.tgid != 0).then_some(ev.tgid),
                uid: Some(ev.uid),
                cgroup_id: Some(ev.cgroup_id),
                exe: process.exe,
                destination: dst.map(|d| d.to_string()),
                detail: serde_json::json!({
                    "reason": reason,
                    "socket": socket,
                    "protocol": ev.protocol,
                    "family": if ev.family == agent_common::AF_INET6 { "ipv6" } else { "ipv4" },
                    "governed_cgroup_id": ev.governed_cgroup_id,
                    "orphaned_cgroup": ev.agent_id == intercept::ORPHAN_AGENT_ID,
                    "cmdline": process.cmdline,
                }),
            });
        }
    }
}

/// Every relayed connection holds two to four descriptors. The usual soft limit (1024) would
/// let a few hundred connections refuse everyone's (accept fails with `EMFILE`), so the soft
/// limit is raised to the hard one; per-agent `max_connections` keeps one agent from taking
/// them all.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open-files limit"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open-files limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-files limit"),
    }
}

/// Records, every [`limit::FLUSH_EVERY`], how many events each source had left out.
async fn record_left_out_events(gate: Arc<Gate>) {
    let mut tick = tokio::time::interval(limit::FLUSH_EVERY);
    // The kernel's counts live as long as the pinned maps: only what this daemon sees grow is
    // reported (a restart does not report the previous daemon's losses again).
    let mut lost_seen = gate.intercept.events_lost().unwrap_or(0);
    let agents = u32::try_from(gate.cfg.agents.len()).unwrap_or(u32::MAX);
    let mut suppressed_seen: BTreeMap<u32, u64> = gate
        .intercept
        .events_suppressed(agents)
        .into_iter()
        .collect();
    let budget = gate.cfg.kernel_event_budget();
    loop {
        tick.tick().await;
        // An unreadable count is skipped, not taken for zero (the next read would report the
        // whole total again).
        if let Some(lost) = gate.intercept.events_lost() {
            if lost > lost_seen {
                let count = lost - lost_seen;
                tracing::warn!(
                    count,
                    "kernel refusals found the event ring buffer full and were not reported"
                );
                let _ = gate.store.event(Event {
                    kind: "kernel_events_lost".into(),
                    detail: serde_json::json!({ "count": count, "total_since_load": lost }),
                    ..Default::default()
                });
            }
            lost_seen = lost;
        }
        for (slot, total) in gate.intercept.events_suppressed(agents) {
            let seen = suppressed_seen.insert(slot, total);
            // A slot unreadable at start counts from its first reading.
            let Some(seen) = seen.filter(|s| total > *s) else {
                continue;
            };
            let count = total - seen;
            let agent = gate.cfg.agent_by_id(slot).map(|a| a.name.clone());
            tracing::warn!(
                agent = agent.as_deref().unwrap_or("(orphaned cgroups)"),
                count,
                "kernel refusals over the agent's share of the event ring buffer were counted, not reported"
            );
            let _ = gate.store.event(Event {
                kind: "kernel_events_suppressed".into(),
                agent,
                detail: serde_json::json!({
                    "count": count,
                    "total_since_load": total,
                    "orphaned_cgroups": slot == agent_common::ORPHAN_BUDGET_SLOT,
                    "limits": { "burst": budget.burst, "per_second": budget.per_second },
                }),
                ..Default::default()
            });
        }
        for left in gate.events.flush(Instant::now()) {
            let agent = left.source.agent;
            tracing::warn!(
                kind = left.source.kind,
                agent = agent.as_deref().unwrap_or("-"),
                count = left.count,
                "events over the recording limit were counted, not recorded"
            );
            let _ = gate.store.event(Event {
                kind: "events_suppressed".into(),
                agent,
                detail: serde_json::json!({
                    "of_kind": left.source.kind,
                    "reason": left.source.reason,
                    "count": left.count,
                    "over_ms": u64::try_from(left.over.as_millis()).unwrap_or(u64::MAX),
                    "limits": { "burst": gate.cfg.events.burst, "per_second": gate.cfg.events.per_second },
                }),
                ..Default::default()
            });
        }
    }
}

/// How often governed cgroups are checked for having been created again, as a backstop of the
/// inotify watch on their parents (which misses a parent that was itself created again).
const FOLLOW_CGROUPS_EVERY: Duration = Duration::from_millis(250);

/// Follows governed cgroups created again (`Daemon::follow_recreated_cgroups`): at once when
/// inotify reports a directory created in the parent of one, so a restarted service is governed
/// again within the daemon's reaction time instead of up to a poll interval later; and every
/// [`FOLLOW_CGROUPS_EVERY`].
async fn follow_cgroups(daemon: Arc<Daemon>) {
    let mut tick = tokio::time::interval(FOLLOW_CGROUPS_EVERY);
    let mut watch = match ParentWatch::new() {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch governed cgroups' parents; cgroups created again are found by polling only");
            None
        }
    };
    loop {
        if let Some(w) = &mut watch {
            w.watch_parents_of(&daemon);
        }
        let created = async {
            match &watch {
                Some(w) => w.created().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => daemon.follow_recreated_cgroups("poll"),
            r = created => match r {
                Ok(ended) => {
                    if let Some(w) = &mut watch {
                        for wd in ended {
                            w.watched.remove(&wd);
                        }
                    }
                    daemon.follow_recreated_cgroups("inotify");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "inotify watch of governed cgroups' parents failed; polling only");
                    watch = None;
                }
            },
        }
    }
}

/// nix's inotify handle, which tokio's `AsyncFd` can poll (it needs `AsRawFd`).
struct InotifyFd(nix::sys::inotify::Inotify);

impl std::os::fd::AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

/// An inotify watch on the directories holding governed cgroups: systemd restarting a service
/// removes its cgroup and makes it again there.
struct ParentWatch {
    fd: tokio::io::unix::AsyncFd<InotifyFd>,
    /// Watched directories by their watch: one removed (and perhaps made again) ends its
    /// watch (`IN_IGNORED`), and is watched again by the next `watch_parents_of`.
    watched: HashMap<nix::sys::inotify::WatchDescriptor, std::path::PathBuf>,
}

impl ParentWatch {
    fn new() -> nix::Result<ParentWatch> {
        use nix::sys::inotify::{InitFlags, Inotify};
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        // Deprecated in favour of the unsafe `register`; the fd is owned by the value moved in
        // (see `read_events`).
        #[allow(deprecated)]
        let fd = tokio::io::unix::AsyncFd::new(InotifyFd(inotify))
            .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(nix::libc::EIO)))?;
        Ok(ParentWatch {
            fd,
            watched: Default::default(),
        })
    }

    /// Adds a watch for the parent of every governed cgroup not watched yet (attach adds some).
    fn watch_parents_of(&mut self, daemon: &Daemon) {
        use nix::sys::inotify::AddWatchFlags;
        let parents: Vec<std::path::PathBuf> = match daemon.governed.lock() {
            Ok(g) => g
                .iter()
                .filter_map(|c| {
                    daemon
                        .cgroups
                        .dir(&c.cgroup)
                        .parent()
                        .map(std::path::Path::to_path_buf)
                })
                .collect(),
            Err(_) => return,
        };
        for parent in parents {
            if self.watched.values().any(|p| *p == parent) {
                continue;
            }
            match self.fd.get_ref().0.add_watch(
                &parent,
                AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO,
            ) {
                Ok(wd) => {
                    self.watched.insert(wd, parent);
                }
                Err(e) => {
                    tracing::debug!(parent = %parent.display(), error = %e, "cannot watch a governed cgroup's parent");
                }
            }
        }
    }

    /// Waits for events (draining them): the watches that ended with them.
    async fn created(&self) -> std::io::Result<Vec<nix::sys::inotify::WatchDescriptor>> {
        use nix::sys::inotify::AddWatchFlags;
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.get_inner().0.read_events() {
                Ok(events) if !events.is_empty() => {
                    return Ok(events
                        .iter()
                        .filter(|e| e.mask.contains(AddWatchFlags::IN_IGNORED))
                        .map(|e| e.wd)
                        .collect());
                }
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

async fn sweep(intercept: Arc<Intercept>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tick.tick().await;
        let Ok(now) = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) else {
            continue;
        };
        let now_ns = u64::try_from(now.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(now.tv_nsec()).unwrap_or(0);
        let removed = intercept.sweep(now_ns, STALE_RECORD_NS);
        if removed > 0 {
            tracing::debug!(removed, "swept stale flow records");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_have_nagle_off_and_a_bounded_receive_buffer() {
        let listener = reuseport_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap(), "inherited from the listener");
        // So is the receive buffer, set (which turns autotuning off) and not grown: the kernel
        // reports twice what was asked.
        let size = socket2::SockRef::from(&accepted)
            .recv_buffer_size()
            .unwrap();
        assert_eq!(size, 2 * RELAY_RECEIVE_BUFFER as usize);
    }

    #[test]
    fn pinned_accept_loops_take_the_cpus_this_daemon_may_run_on() {
        let allowed = allowed_cpus().unwrap();
        let pinned: Vec<usize> = accept_cpus(true).into_iter().map(Option::unwrap).collect();
        assert_eq!(pinned, allowed.iter().copied().take(8).collect::<Vec<_>>());
        let floating = accept_cpus(false);
        assert!(!floating.is_empty() && floating.iter().all(Option::is_none));
        assert_eq!(floating.len(), pinned.len().min(8));
    }

    #[tokio::test]
    async fn a_pinned_loop_runs_on_its_cpu_and_its_listener_is_steered_there() {
        let cpu = *allowed_cpus().unwrap().last().unwrap();
        let listener = reuseport_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        steer_to_cpu(&listener, cpu);
        assert_eq!(
            socket2::SockRef::from(&listener).cpu_affinity().unwrap(),
            cpu
        );
        std::thread::spawn(move || {
            pin_this_thread(cpu);
            assert_eq!(allowed_cpus().unwrap(), vec![cpu]);
            assert_eq!(nix::sched::sched_getcpu().unwrap(), cpu);
        })
        .join()
        .unwrap();
    }
}
