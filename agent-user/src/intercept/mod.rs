//! The kernel side as the daemon sees it: load, attach, pin, re-adopt, and the maps.
//!
//! Programs are attached at the cgroup2 root with links that are pinned under `pin_dir/links`;
//! maps are pinned under `pin_dir/maps`. A pinned link outlives the daemon, so when the daemon
//! dies governed connects keep being redirected to a listener that is gone and are refused:
//! fail closed. A restarted daemon finds the pins, re-adopts the maps and loads nothing.
//!
//! This module owns map layouts on the user side (through `agent-common`) and keeps the maps in
//! step with the configuration; which agent may reach what is decided by `config`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use agent_common::{
    Addr, DEST_KEY_FIXED_BITS, DenyEvent, DestKey, DestValue, Endpoint, EventBudget, FlowKey,
    FlowRecord, GOVERNED_ALLOW_INBOUND, GOVERNED_ALLOW_PING, GOVERNED_UNKNOWN_RECORD, Governed,
    Settings, V4_MAPPED_PREFIX_BITS, addr_bytes, addr_from_bytes, names, v4_mapped,
};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, RingBuf};
use aya::programs::links::{CgroupAttachMode, FdLink, PinnedLink};
use aya::programs::{
    CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, ProgramError, SockOps,
};
use aya::{Ebpf, EbpfError};
use ipnet::IpNet;
use sha2::{Digest, Sha256};

use crate::config::{Config, Destination, UnknownDestinations};
use crate::identity::{self, CgroupFs};

/// The compiled programs, built by `cargo xtask build-ebpf` and committed with the hash of
/// the sources they came from.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!("../../ebpf/agentgate.bpf.o");

/// Agent id of orphaned cgroups: no destination is allowed for it, so every connect is refused.
pub const ORPHAN_AGENT_ID: u32 = u32::MAX;

const SOCK_ADDR_PROGRAMS: [&str; 8] = [
    names::BIND4,
    names::BIND6,
    names::CONNECT4,
    names::CONNECT6,
    names::SENDMSG4,
    names::SENDMSG6,
    names::GETPEERNAME4,
    names::GETPEERNAME6,
];

#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("bpffs: {0}")]
    Bpffs(String),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("pinning {path}: {message}")]
    Pin { path: PathBuf, message: String },
    #[error(
        "the programs pinned under {0} come from a different build of agentgate; run `agentgate uninstall` first (governed agents stay refused meanwhile)"
    )]
    StalePins(PathBuf),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> InterceptError {
    move |source| InterceptError::Map { name, source }
}

/// SHA-256 of the embedded object: tells a re-adopting daemon whether the pins are its own.
pub fn object_hash() -> String {
    hex(&Sha256::digest(OBJECT))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Mounts bpffs at /sys/fs/bpf when no bpf filesystem covers `pin_dir`.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), InterceptError> {
    let info = identity::read_mountinfo()?;
    if pin_dir
        .ancestors()
        .any(|p| identity::bpffs_mounted_at(&info, p))
    {
        return Ok(());
    }
    let default = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(default) {
        return Err(InterceptError::Bpffs(format!(
            "{} is not on a bpf filesystem; mount one there or use a pin_dir under /sys/fs/bpf",
            pin_dir.display()
        )));
    }
    nix::mount::mount(
        Some("bpf"),
        default,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| InterceptError::Bpffs(format!("mount -t bpf bpf /sys/fs/bpf: {e}")))?;
    tracing::info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

struct Paths {
    links: PathBuf,
    maps: PathBuf,
    hash_file: PathBuf,
}

impl Paths {
    fn new(pin_dir: &Path, state_dir: &Path) -> Paths {
        Paths {
            links: pin_dir.join("links"),
            maps: pin_dir.join("maps"),
            hash_file: state_dir.join("pinned-object.sha256"),
        }
    }

    fn link(&self, program: &str) -> PathBuf {
        self.links.join(program)
    }

    fn map(&self, name: &str) -> PathBuf {
        self.maps.join(name)
    }

    fn all_links(&self) -> impl Iterator<Item = PathBuf> + '_ {
        SOCK_ADDR_PROGRAMS
            .iter()
            .chain([
                &names::SOCK_OPS,
                &names::SOCK_CREATE,
                &names::INBOUND,
                &names::OUTBOUND,
            ])
            .map(|p| self.link(p))
    }
}

/// A program's link as pinned under `pin_dir`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PinnedProgram {
    pub name: String,
    /// The link is pinned (the program is enforcing even if no daemon runs).
    pub attached: bool,
    /// Runs and the time spent in them, counted by the kernel while `kernel.bpf_stats_enabled`
    /// is 1 (`None` when the program cannot be read).
    pub runs: Option<u64>,
    pub run_ns: Option<u64>,
}

/// The programs' links pinned under `pin_dir`, with the kernel's run statistics.
pub fn pinned_links(pin_dir: &Path, state_dir: &Path) -> Vec<PinnedProgram> {
    let paths = Paths::new(pin_dir, state_dir);
    // Runs and nanoseconds by program id, read once (each program is a syscall or two).
    let stats: std::collections::HashMap<u32, (u64, u64)> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| {
            let ns = u64::try_from(p.run_time().as_nanos()).unwrap_or(u64::MAX);
            (p.id(), (p.run_count(), ns))
        })
        .collect();
    paths
        .all_links()
        .map(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let link = PinnedLink::from_pin(&p).ok();
            let attached = link.is_some();
            // Dropping the link closes only this descriptor: the pin keeps it attached.
            let program = link
                .and_then(|l| FdLink::from(l).info().ok())
                .and_then(|info| stats.get(&info.program_id()));
            PinnedProgram {
                name,
                attached,
                runs: program.map(|(runs, _)| *runs),
                run_ns: program.map(|(_, ns)| *ns),
            }
        })
        .collect()
}

/// The maps, open through their pins.
pub struct Intercept {
    governed: Mutex<HashMap<MapData, u64, Governed>>,
    dests: Mutex<LpmTrie<MapData, DestKey, DestValue>>,
    pending: Mutex<HashMap<MapData, u64, FlowRecord>>,
    flows: Mutex<HashMap<MapData, FlowKey, FlowRecord>>,
    resolvers: Mutex<HashMap<MapData, Endpoint, u8>>,
    protected: Mutex<HashMap<MapData, Endpoint, u8>>,
    reserved_ports: Mutex<HashMap<MapData, Endpoint, u8>>,
    settings: Mutex<Array<MapData, Settings>>,
    events: Mutex<Option<RingBuf<MapData>>>,
    events_lost: Mutex<PerCpuArray<MapData, u64>>,
    event_budgets: Mutex<Array<MapData, EventBudget>>,
    /// True when this daemon found the programs already pinned and loaded nothing.
    pub adopted: bool,
}

fn open_pinned(paths: &Paths, name: &'static str) -> Result<Map, InterceptError> {
    let data = MapData::from_pin(paths.map(name)).map_err(map_err(name))?;
    Map::from_map_data(data).map_err(map_err(name))
}

impl Intercept {
    /// Re-adopts pinned state when present, else loads, attaches at the cgroup2 root and pins.
    pub fn load_or_adopt(cfg: &Config, cgroups: &CgroupFs) -> Result<Intercept, InterceptError> {
        ensure_bpffs(&cfg.pin_dir)?;
        let paths = Paths::new(&cfg.pin_dir, &cfg.state_dir);
        let pinned: Vec<bool> = paths.all_links().map(|p| p.exists()).collect();
        if pinned.iter().all(|p| *p) {
            let recorded = fs::read_to_string(&paths.hash_file).unwrap_or_default();
            if recorded.trim() != object_hash() {
                return Err(InterceptError::StalePins(cfg.pin_dir.clone()));
            }
            for p in paths.all_links() {
                PinnedLink::from_pin(&p).map_err(|e| InterceptError::Pin {
                    path: p.clone(),
                    message: e.to_string(),
                })?;
            }
            tracing::info!(pin_dir = %cfg.pin_dir.display(), "re-adopting pinned programs and maps");
            let adopted = Intercept::open(&paths, true)?;
            // Until this daemon has synced the maps with its own configuration, governed
            // connects are refused: a connect accepted now would carry agent and target ids of
            // the previous configuration. Flow records left from before the restart belong to
            // connects that failed: another process could take one over by reusing its ports.
            adopted.set_ready(false)?;
            adopted.forget_flows();
            return Ok(adopted);
        }
        if pinned.iter().any(|p| *p) {
            // Some of this build's links are pinned, not all. Pins of another build (one with
            // fewer programs, before an upgrade) are not replaced here: removing them would
            // leave governed processes unhooked until this daemon has installed and synced, and
            // forget orphaned cgroups. The operator uninstalls first, as for any other build.
            let recorded = fs::read_to_string(&paths.hash_file).ok();
            if recorded.is_some_and(|h| h.trim() != object_hash()) {
                return Err(InterceptError::StalePins(cfg.pin_dir.clone()));
            }
            // Otherwise an install by this build stopped half way (the hash is written last):
            // start over cleanly.
            tracing::warn!(pin_dir = %cfg.pin_dir.display(), "incomplete pinned state found; replacing it");
            remove_pins(&paths)?;
        }
        Intercept::install(cfg, cgroups, &paths)
    }

    // Attachments are bpf_links: the kernel rejects attach flags on cgroup link creation
    // (`Single` maps to none), and links always coexist with other programs on the cgroup.
    fn install(
        cfg: &Config,
        cgroups: &CgroupFs,
        paths: &Paths,
    ) -> Result<Intercept, InterceptError> {
        for dir in [&paths.links, &paths.maps] {
            fs::create_dir_all(dir).map_err(|source| InterceptError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        let mut ebpf = Ebpf::load(OBJECT)?;
        for name in names::MAPS {
            let map = ebpf.map(name).ok_or(InterceptError::MissingMap(name))?;
            let path = paths.map(name);
            map.pin(&path).map_err(|e| InterceptError::Pin {
                path,
                message: e.to_string(),
            })?;
        }
        let root = File::open(&cgroups.mount).map_err(|source| InterceptError::Io {
            path: cgroups.mount.clone(),
            source,
        })?;
        // Loads program `name` as `$kind`, attaches it at the cgroup2 root (with `$how` before
        // the mode, for the types that take an attach type) and pins the link. (A macro: the
        // program types share these methods but no trait.)
        macro_rules! attach_and_pin {
            ($kind:ty, $name:expr $(, $how:expr)?) => {{
                let name = $name;
                let prog: &mut $kind = ebpf
                    .program_mut(name)
                    .ok_or(InterceptError::MissingProgram(name))?
                    .try_into()
                    .map_err(|source| InterceptError::Program { name, source })?;
                prog.load()
                    .map_err(|source| InterceptError::Program { name, source })?;
                let id = prog
                    .attach(&root, $($how,)? CgroupAttachMode::Single)
                    .map_err(|source| InterceptError::Program { name, source })?;
                let link = prog
                    .take_link(id)
                    .map_err(|source| InterceptError::Program { name, source })?;
                pin_link(FdLink::try_from(link), &paths.link(name))?;
            }};
        }
        // Socket creation first: from then on a governed process holds only sockets the other
        // hooks see.
        attach_and_pin!(CgroupSock, names::SOCK_CREATE);
        for name in SOCK_ADDR_PROGRAMS {
            attach_and_pin!(CgroupSockAddr, name);
        }
        attach_and_pin!(SockOps, names::SOCK_OPS);
        attach_and_pin!(CgroupSkb, names::INBOUND, CgroupSkbAttachType::Ingress);
        attach_and_pin!(CgroupSkb, names::OUTBOUND, CgroupSkbAttachType::Egress);

        if let Some(dir) = paths.hash_file.parent() {
            fs::create_dir_all(dir).map_err(|source| InterceptError::Io {
                path: dir.into(),
                source,
            })?;
        }
        fs::write(&paths.hash_file, object_hash()).map_err(|source| InterceptError::Io {
            path: paths.hash_file.clone(),
            source,
        })?;
        tracing::info!(pin_dir = %cfg.pin_dir.display(), cgroup2 = %cgroups.mount.display(), "programs loaded, attached at the cgroup2 root and pinned");
        Intercept::open(paths, false)
    }

    fn open(paths: &Paths, adopted: bool) -> Result<Intercept, InterceptError> {
        let hash = |n: &'static str| -> Result<Map, InterceptError> { open_pinned(paths, n) };
        Ok(Intercept {
            governed: Mutex::new(
                HashMap::try_from(hash(names::GOVERNED)?).map_err(map_err(names::GOVERNED))?,
            ),
            dests: Mutex::new(
                LpmTrie::try_from(hash(names::DESTS)?).map_err(map_err(names::DESTS))?,
            ),
            pending: Mutex::new(
                HashMap::try_from(hash(names::PENDING)?).map_err(map_err(names::PENDING))?,
            ),
            flows: Mutex::new(
                HashMap::try_from(hash(names::FLOWS)?).map_err(map_err(names::FLOWS))?,
            ),
            resolvers: Mutex::new(
                HashMap::try_from(hash(names::RESOLVERS)?).map_err(map_err(names::RESOLVERS))?,
            ),
            protected: Mutex::new(
                HashMap::try_from(hash(names::PROTECTED)?).map_err(map_err(names::PROTECTED))?,
            ),
            reserved_ports: Mutex::new(
                HashMap::try_from(hash(names::RESERVED_PORTS)?)
                    .map_err(map_err(names::RESERVED_PORTS))?,
            ),
            settings: Mutex::new(
                Array::try_from(hash(names::SETTINGS)?).map_err(map_err(names::SETTINGS))?,
            ),
            events: Mutex::new(Some(
                RingBuf::try_from(hash(names::EVENTS)?).map_err(map_err(names::EVENTS))?,
            )),
            events_lost: Mutex::new(
                PerCpuArray::try_from(hash(names::EVENTS_LOST)?)
                    .map_err(map_err(names::EVENTS_LOST))?,
            ),
            event_budgets: Mutex::new(
                Array::try_from(hash(names::EVENT_BUDGETS)?)
                    .map_err(map_err(names::EVENT_BUDGETS))?,
            ),
            adopted,
        })
    }

    /// Brings every map in line with the configuration plus runtime attachments
    /// (`(cgroup id, agent id)` pairs), then marks the kernel side ready.
    ///
    /// `orphan`: what happens to cgroups governed before but in neither list now. At start-up
    /// (a configuration that dropped or renamed an agent, or moved its cgroup) they stay
    /// governed as orphans, refused everywhere: processes still running there must not be
    /// set free by an edit. Otherwise (an explicit detach) they are removed. Orphans go with
    /// `agentgate uninstall`.
    pub fn sync(
        &self,
        cfg: &Config,
        agent_cgroups: &[(u64, u32)],
        protected: &[SocketAddr],
        orphan: bool,
    ) -> Result<(), InterceptError> {
        // Governed cgroups.
        let mut want_gov: BTreeMap<u64, Governed> = BTreeMap::new();
        for (cgroup, agent_id) in agent_cgroups {
            let Some(agent) = cfg.agent_by_id(*agent_id) else {
                continue;
            };
            let mut flags = match agent.unknown_destinations {
                UnknownDestinations::Deny => 0,
                UnknownDestinations::Record => GOVERNED_UNKNOWN_RECORD,
            };
            if agent.allow_ping {
                flags |= GOVERNED_ALLOW_PING;
            }
            if agent.allow_inbound {
                flags |= GOVERNED_ALLOW_INBOUND;
            }
            want_gov.insert(
                *cgroup,
                Governed {
                    agent_id: *agent_id,
                    flags,
                },
            );
        }
        {
            let mut gov = lock(&self.governed);
            for (k, v) in &want_gov {
                gov.insert(k, v, 0).map_err(map_err(names::GOVERNED))?;
            }
            let stale: Vec<(u64, Governed)> = gov
                .iter()
                .filter_map(Result::ok)
                .filter(|(k, _)| !want_gov.contains_key(k))
                .collect();
            for (k, g) in stale {
                if orphan {
                    let refused = Governed {
                        agent_id: ORPHAN_AGENT_ID,
                        flags: 0,
                    };
                    if g != refused {
                        tracing::warn!(
                            cgroup_id = k,
                            "a cgroup governed before is in no agent now: its processes stay refused everywhere until `agentgate uninstall`"
                        );
                        gov.insert(k, refused, 0)
                            .map_err(map_err(names::GOVERNED))?;
                    }
                } else if g.agent_id != ORPHAN_AGENT_ID {
                    gov.remove(&k).map_err(map_err(names::GOVERNED))?;
                }
            }
        }

        // Destination allow list.
        let mut want_dests: BTreeMap<(u32, [u8; 24]), (Key<DestKey>, DestValue)> = BTreeMap::new();
        for (i, agent) in cfg.agents.iter().enumerate() {
            let agent_id = u32::try_from(i + 1).unwrap_or(u32::MAX);
            let mut destinations = Vec::new();
            for (target_id, target) in cfg.targets_of(agent) {
                for d in &target.destinations {
                    let key = dest_key(agent_id, &d.net, d.port);
                    want_dests.insert(dest_identity(&key), (key, DestValue { target_id, _pad: 0 }));
                    destinations.push((target_id, *d));
                }
            }
            for (port, target_id) in local_folds(&destinations) {
                let key = dest_key(agent_id, &LOCALHOST_NET, port);
                want_dests.insert(dest_identity(&key), (key, DestValue { target_id, _pad: 0 }));
            }
        }
        {
            let mut dests = lock(&self.dests);
            for (key, value) in want_dests.values() {
                dests.insert(key, value, 0).map_err(map_err(names::DESTS))?;
            }
            let stale: Vec<Key<DestKey>> = dests
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !want_dests.contains_key(&dest_identity(k)))
                .collect();
            for k in stale {
                dests.remove(&k).map_err(map_err(names::DESTS))?;
            }
        }

        sync_endpoints(&self.resolvers, &cfg.dns_resolvers, names::RESOLVERS, false)?;
        sync_endpoints(&self.protected, protected, names::PROTECTED, true)?;
        sync_endpoints(
            &self.reserved_ports,
            &reserved_ports(cfg),
            names::RESERVED_PORTS,
            false,
        )?;

        let enforcer_v6 = match cfg.listen.ipv6 {
            Some(v6) => addr_from_bytes(v6.octets()),
            // Without an IPv6 listener, dual-stack sockets are sent to the IPv4 one through its
            // mapped address; IPv6-only sockets then fail to connect (still refused, not bypassed).
            None => v4_mapped(cfg.listen.ipv4.octets()),
        };
        let budget = cfg.kernel_event_budget();
        let settings = Settings {
            enforcer_v4: cfg.listen.ipv4.octets(),
            enforcer_port: cfg.listen.port,
            ready: 1,
            enforcer_v6,
            daemon_tgid: std::process::id(),
            mark: cfg.mark,
            event_burst: budget.burst,
            _pad: 0,
            event_refill_ns: budget.refill_ns(),
        };
        lock(&self.settings)
            .set(0, settings, 0)
            .map_err(map_err(names::SETTINGS))?;
        Ok(())
    }

    /// Marks the kernel side ready or not: until it is, governed connects are refused in the
    /// kernel (`enforcer_not_ready`), so a stopped daemon's port cannot be taken over to receive
    /// them.
    pub fn set_ready(&self, ready: bool) -> Result<(), InterceptError> {
        let mut settings = lock(&self.settings);
        let mut s = settings.get(&0, 0).map_err(map_err(names::SETTINGS))?;
        s.ready = u16::from(ready);
        settings.set(0, s, 0).map_err(map_err(names::SETTINGS))
    }

    /// Drops every flow record, pending or complete.
    fn forget_flows(&self) {
        clear(&mut lock(&self.pending));
        clear(&mut lock(&self.flows));
    }

    /// Looks up the flow record of an accepted connection and leaves it in the map: the caller
    /// owes a [`Intercept::forget_flow`] (the TCP handler pays it once its first bytes are on
    /// their way, off the connection's critical path). Until then nothing else can match the
    /// key: it is the 4-tuple of a connection that is still open.
    pub fn lookup_flow(
        &self,
        client: SocketAddr,
        server: SocketAddr,
    ) -> Option<(FlowKey, FlowRecord)> {
        let key = flow_key(client, server);
        let rec = lock(&self.flows).get(&key, 0).ok()?;
        Some((key, rec))
    }

    /// Removes a used flow record (aya 0.14 has no lookup-and-delete for hash maps, so taking a
    /// record is two syscalls).
    pub fn forget_flow(&self, key: &FlowKey) {
        if let Err(e) = lock(&self.flows).remove(key) {
            tracing::warn!(error = %e, "could not remove a used flow record");
        }
    }

    /// Kernel refusals that found the ring buffer full, since the programs were loaded; `None`
    /// when the count cannot be read.
    pub fn events_lost(&self) -> Option<u64> {
        let map = self.events_lost.lock().ok()?;
        map.get(&0, 0)
            .ok()
            .map(|per_cpu| per_cpu.iter().copied().fold(0u64, u64::wrapping_add))
    }

    /// Per budget slot (agent id, [`agent_common::ORPHAN_BUDGET_SLOT`] for orphaned cgroups) up
    /// to `agents`: kernel refusals over the agent's share of the ring buffer, counted and not
    /// reported, since the programs were loaded. Unreadable slots are left out.
    pub fn events_suppressed(&self, agents: u32) -> Vec<(u32, u64)> {
        let map = lock(&self.event_budgets);
        (0..=agents.min(agent_common::MAX_AGENTS))
            .filter_map(|slot| Some((slot, map.get(&slot, 0).ok()?.suppressed)))
            .collect()
    }

    /// The ring buffer of kernel refusals; taken once by the event reader.
    pub fn take_events(&self) -> Option<RingBuf<MapData>> {
        lock(&self.events).take()
    }

    /// Removes `PENDING` records of connects whose handshake never completed and `FLOWS`
    /// records that were never accepted, older than `max_age_ns`. Returns how many.
    pub fn sweep(&self, now_ns: u64, max_age_ns: u64) -> usize {
        let old = |r: &FlowRecord| now_ns.saturating_sub(r.created_ns) > max_age_ns;
        let mut removed = 0;
        {
            let mut pending = lock(&self.pending);
            let stale: Vec<u64> = pending
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, r)| old(r))
                .map(|(k, _)| k)
                .collect();
            for k in stale {
                removed += usize::from(pending.remove(&k).is_ok());
            }
        }
        let mut flows = lock(&self.flows);
        let stale: Vec<FlowKey> = flows
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, r)| old(r))
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            removed += usize::from(flows.remove(&k).is_ok());
        }
        removed
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn pin_link(
    link: Result<FdLink, aya::programs::links::LinkError>,
    path: &Path,
) -> Result<(), InterceptError> {
    let link = link.map_err(|e| InterceptError::Pin {
        path: path.into(),
        message: e.to_string(),
    })?;
    link.pin(path).map_err(|e| InterceptError::Pin {
        path: path.into(),
        message: e.to_string(),
    })?;
    Ok(())
}

/// The ports governed processes may not bind (see `reason::RESERVED_PORT`), each as
/// `0.0.0.0:port` (the key `RESERVED_PORTS` uses): the ports of targets' destinations and
/// upstreams that are on this host (a loopback or unspecified address, one of the host's
/// addresses, a network covering one), the enforcer's listener's and the admin HTTP API's.
/// Remote targets' ports stay free: no listener here stands in for them.
fn reserved_ports(cfg: &Config) -> Vec<SocketAddr> {
    // Unreadable: every target's ports, as if all were local.
    let host = crate::proxy::local::this_host_addresses();
    let here = |addr: SocketAddr| {
        addr.ip().is_loopback()
            || addr.ip().is_unspecified()
            || host.as_ref().is_none_or(|h| h.contains(&addr.ip()))
    };
    let targets = cfg.targets.iter().flat_map(|t| {
        let local_destinations = t.destinations.iter().filter(|d| {
            d.local_address().is_some()
                || host
                    .as_ref()
                    .is_none_or(|h| h.iter().any(|ip| d.matches(&SocketAddr::new(*ip, d.port))))
        });
        local_destinations
            .map(|d| d.port)
            .chain(t.upstream.filter(|u| here(*u)).map(|u| u.port()))
            .collect::<Vec<u16>>()
    });
    let daemon =
        std::iter::once(cfg.listen.port).chain(cfg.admin.http.iter().map(|h| h.listen.port()));
    let ports: BTreeSet<u16> = targets.chain(daemon).filter(|p| *p != 0).collect();
    ports
        .into_iter()
        .map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), p))
        .collect()
}

/// The bind hooks run in `bind()` only: a socket that listens without binding gets a port the
/// kernel picks from `net.ipv4.ip_local_port_range`, skipping `ip_local_reserved_ports`. A
/// reserved port inside that range and not reserved there could be won by retrying `listen()`
/// while its server (or this daemon) is down, so the daemon says so when it starts.
pub fn warn_of_autobind_ports(cfg: &Config) {
    let read = |name: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"));
    let (Ok(range), Ok(kept)) = (read("ip_local_port_range"), read("ip_local_reserved_ports"))
    else {
        return;
    };
    let ports = reserved_ports(cfg).into_iter().map(|a| a.port());
    let exposed = ports_open_to_autobind(ports, &range, &kept);
    if !exposed.is_empty() {
        let list = exposed
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",");
        tracing::warn!(
            ports = %list,
            range = %range.trim(),
            "ports governed processes may not bind are inside the kernel's ephemeral port range: a governed `listen()` without `bind()` could be given one while its server is down; add them to net.ipv4.ip_local_reserved_ports (sysctl -w net.ipv4.ip_local_reserved_ports={list}) or move them out of the range"
        );
    }
}

/// Of `ports`, those inside `range` (`ip_local_port_range`: "low high") and not in `kept`
/// (`ip_local_reserved_ports`: "8080,9000-9010" or empty). An unreadable range exposes none
/// (nothing to say), an unreadable reserved list keeps none (everything in range is said).
fn ports_open_to_autobind(ports: impl Iterator<Item = u16>, range: &str, kept: &str) -> Vec<u16> {
    let mut bounds = range.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(low)), Some(Ok(high))) = (bounds.next(), bounds.next()) else {
        return Vec::new();
    };
    let kept: Vec<(u16, u16)> = kept
        .trim()
        .split(',')
        .filter_map(|part| {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .collect();
    let mut out: Vec<u16> = ports
        .filter(|p| (low..=high).contains(p))
        .filter(|p| !kept.iter().any(|(a, b)| (*a..=*b).contains(p)))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

fn sync_endpoints(
    map: &Mutex<HashMap<MapData, Endpoint, u8>>,
    want: &[SocketAddr],
    name: &'static str,
    fold_local: bool,
) -> Result<(), InterceptError> {
    let want: BTreeSet<([u8; 16], u16)> = want
        .iter()
        .map(|a| {
            let e = endpoint(*a, fold_local);
            (addr_bytes(&e.addr), e.port)
        })
        .collect();
    let mut m = lock(map);
    for (addr, port) in &want {
        m.insert(
            Endpoint {
                addr: addr_from_bytes(*addr),
                port: *port,
                _pad: 0,
            },
            1,
            0,
        )
        .map_err(map_err(name))?;
    }
    let stale: Vec<Endpoint> = m
        .keys()
        .filter_map(Result::ok)
        .filter(|e| !want.contains(&(addr_bytes(&e.addr), e.port)))
        .collect();
    for e in stale {
        m.remove(&e).map_err(map_err(name))?;
    }
    Ok(())
}

/// An address in the kernel's form: IPv4 (and IPv4-mapped IPv6) as `::ffff:a.b.c.d`.
pub fn kernel_addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => addr_from_bytes(v6.octets()),
    }
}

/// Back from the kernel's form; mapped addresses become IPv4 again.
pub fn ip_of(addr: &Addr) -> IpAddr {
    let v6 = Ipv6Addr::from(addr_bytes(addr));
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

fn endpoint(a: SocketAddr, fold_local: bool) -> Endpoint {
    let ip = a.ip();
    let ip = if fold_local && (ip.is_loopback() || ip.is_unspecified()) {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        ip
    };
    Endpoint {
        addr: kernel_addr(ip),
        port: a.port(),
        _pad: 0,
    }
}

pub fn flow_key(client: SocketAddr, server: SocketAddr) -> FlowKey {
    FlowKey {
        client_addr: kernel_addr(client.ip()),
        server_addr: kernel_addr(server.ip()),
        client_port: client.port(),
        server_port: server.port(),
    }
}

/// `127.0.0.1/32`: the key under which connect4/6 look a loopback or unspecified destination up
/// again when no entry takes it as spelled (`127.0.0.2`, `0.0.0.0`, `::1`, `::ffff:127.0.0.3`
/// all reach the same local listeners).
const LOCALHOST_NET: IpNet = IpNet::V4(ipnet::Ipv4Net::new_assert(Ipv4Addr::LOCALHOST, 32));

/// Entries to add under [`LOCALHOST_NET`], as (port, target id), for one agent's destinations
/// (in configuration order): on each port where a destination names a local address but none
/// covers 127.0.0.1 itself, the first such destination's target. Where one covers 127.0.0.1,
/// its own entry answers the second lookup and nothing is added, so 127.0.0.1 keeps the target
/// it has.
fn local_folds(destinations: &[(u32, Destination)]) -> BTreeMap<u16, u32> {
    let covered: BTreeSet<u16> = destinations
        .iter()
        .filter(|(_, d)| d.local_address() == Some(IpAddr::V4(Ipv4Addr::LOCALHOST)))
        .map(|(_, d)| d.port)
        .collect();
    let mut folds = BTreeMap::new();
    for (target_id, d) in destinations {
        if !covered.contains(&d.port) && d.local_address().is_some() {
            folds.entry(d.port).or_insert(*target_id);
        }
    }
    folds
}

fn dest_key(agent_id: u32, net: &IpNet, port: u16) -> Key<DestKey> {
    let (addr, bits) = match net {
        IpNet::V4(n) => (
            v4_mapped(n.network().octets()),
            V4_MAPPED_PREFIX_BITS + u32::from(n.prefix_len()),
        ),
        IpNet::V6(n) => (
            addr_from_bytes(n.network().octets()),
            u32::from(n.prefix_len()),
        ),
    };
    Key::new(
        DEST_KEY_FIXED_BITS + bits,
        DestKey::new(agent_id, port, addr),
    )
}

/// A comparable identity for an LPM key (prefix length + data), for set differences.
fn dest_identity(k: &Key<DestKey>) -> (u32, [u8; 24]) {
    let data = k.data();
    let mut out = [0u8; 24];
    let parts = [data.agent_id.to_ne_bytes(), data.port.to_ne_bytes()];
    for (i, b) in parts
        .iter()
        .flatten()
        .chain(addr_bytes(&data.addr).iter())
        .enumerate()
    {
        if let Some(slot) = out.get_mut(i) {
            *slot = *b;
        }
    }
    (k.prefix_len(), out)
}

/// Removes every entry of a hash map (keys listed first: removing while iterating skips some).
fn clear<K: aya::Pod, V: aya::Pod>(map: &mut HashMap<MapData, K, V>) {
    let keys: Vec<K> = map.keys().filter_map(Result::ok).collect();
    for k in keys {
        let _ = map.remove(&k);
    }
}

/// Decodes a `DenyEvent` from ring buffer bytes (bounds-checked; no unsafe casts).
pub fn decode_event(b: &[u8]) -> Option<DenyEvent> {
    // A short entry is not an event of this object's layout (padding included).
    if b.len() < size_of::<DenyEvent>() {
        return None;
    }
    let u64_at = |o: usize| {
        b.get(o..o + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_ne_bytes)
    };
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .and_then(|s| s.try_into().ok())
            .map(u32::from_ne_bytes)
    };
    let u16_at = |o: usize| {
        b.get(o..o + 2)
            .and_then(|s| s.try_into().ok())
            .map(u16::from_ne_bytes)
    };
    Some(DenyEvent {
        cgroup_id: u64_at(0)?,
        governed_cgroup_id: u64_at(8)?,
        ts_ns: u64_at(16)?,
        agent_id: u32_at(24)?,
        tgid: u32_at(28)?,
        uid: u32_at(32)?,
        reason: u32_at(36)?,
        dst_addr: [u32_at(40)?, u32_at(44)?, u32_at(48)?, u32_at(52)?],
        dst_port: u16_at(56)?,
        family: u16_at(58)?,
        sock_type: u32_at(60)?,
        protocol: u32_at(64)?,
        _pad: 0,
    })
}

/// A refused socket's kind, from its type and protocol.
pub fn socket_name(sock_type: u32, protocol: u32) -> String {
    use agent_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, SOCK_RAW};
    const IPPROTO_SCTP: u32 = 132;
    const IPPROTO_UDPLITE: u32 = 136;
    const IPPROTO_MPTCP: u32 = 262;
    match (sock_type, protocol) {
        (SOCK_RAW, p) => format!("raw (protocol {p})"),
        (_, IPPROTO_TCP) => "tcp".into(),
        (_, IPPROTO_UDP) => "udp".into(),
        (_, IPPROTO_ICMP | IPPROTO_ICMPV6) => "icmp".into(),
        (_, IPPROTO_SCTP) => "sctp".into(),
        (_, IPPROTO_UDPLITE) => "udplite".into(),
        (_, IPPROTO_MPTCP) => "mptcp".into(),
        (t, p) => format!("type {t} protocol {p}"),
    }
}

pub fn reason_name(reason: u32) -> &'static str {
    use agent_common::reason::*;
    match reason {
        UNKNOWN_DESTINATION => "unknown_destination",
        ENFORCER_DIRECT => "direct_connect_to_enforcer",
        UDP_NOT_RESOLVER => "udp_not_to_resolver",
        MAP_FULL => "flow_map_full",
        UNSUPPORTED_SOCKET => "unsupported_socket",
        NOT_READY => "enforcer_not_ready",
        PROTECTED_ENDPOINT => "protected_endpoint",
        SOCKET_NOT_ALLOWED => "socket_not_allowed",
        INBOUND_CONNECTION => "inbound_connection",
        OUTBOUND_PACKET => "outbound_packet",
        RESERVED_PORT => "bind_to_reserved_port",
        _ => "unknown",
    }
}

fn remove_pins(paths: &Paths) -> Result<(), InterceptError> {
    for p in paths.all_links() {
        match PinnedLink::from_pin(&p) {
            // Unpinning and dropping the link detaches the program.
            Ok(link) => drop(link.unpin().map_err(|source| InterceptError::Io {
                path: p.clone(),
                source,
            })?),
            Err(_) if p.exists() => fs::remove_file(&p).map_err(|source| InterceptError::Io {
                path: p.clone(),
                source,
            })?,
            Err(_) => {}
        }
    }
    for name in names::MAPS {
        let p = paths.map(name);
        if p.exists() {
            fs::remove_file(&p).map_err(|source| InterceptError::Io {
                path: p.clone(),
                source,
            })?;
        }
    }
    let _ = fs::remove_file(&paths.hash_file);
    Ok(())
}

/// Detaches and unpins everything under `pin_dir`. Afterwards governed cgroups are no longer
/// intercepted at all: that is what the operator asked for.
pub fn uninstall(pin_dir: &Path, state_dir: &Path) -> Result<(), InterceptError> {
    let paths = Paths::new(pin_dir, state_dir);
    remove_pins(&paths)?;
    for dir in [&paths.links, &paths.maps, &pin_dir.to_path_buf()] {
        if dir.exists() {
            fs::remove_dir(dir).map_err(|source| InterceptError::Io {
                path: dir.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

/// Looks a cgroup id up in the pinned `GOVERNED` map without loading anything (for `exec`).
pub fn pinned_governed_agent(
    pin_dir: &Path,
    cgroup_id: u64,
) -> Result<Option<u32>, InterceptError> {
    let data = MapData::from_pin(pin_dir.join("maps").join(names::GOVERNED))
        .map_err(map_err(names::GOVERNED))?;
    let map: HashMap<MapData, u64, Governed> =
        HashMap::try_from(Map::from_map_data(data).map_err(map_err(names::GOVERNED))?)
            .map_err(map_err(names::GOVERNED))?;
    Ok(map.get(&cgroup_id, 0).ok().map(|g| g.agent_id))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ports_inside_the_ephemeral_range_and_not_kept_are_named() {
        let ports = || [5432, 15001, 40000, 45000, 50001, 60999, 61000].into_iter();
        // Nothing kept: those in the range, in order, once each.
        assert_eq!(
            ports_open_to_autobind(ports().chain([40000]), "32768\t60999\n", "\n"),
            vec![40000, 45000, 50001, 60999]
        );
        // Single ports and ranges kept are the kernel's own protection.
        assert_eq!(
            ports_open_to_autobind(ports(), "32768 60999", "40000,44000-45000\n"),
            vec![50001, 60999]
        );
        // An unreadable range says nothing; an unreadable list keeps nothing.
        assert!(ports_open_to_autobind(ports(), "garbage", "").is_empty());
        assert_eq!(
            ports_open_to_autobind(ports(), "50000 51000", "x-y"),
            vec![50001]
        );
    }

    #[test]
    fn flow_keys_fold_v4_into_mapped_form() {
        let k = flow_key(
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:15001".parse().unwrap(),
        );
        assert_eq!(k.client_addr, v4_mapped([127, 0, 0, 1]));
        assert_eq!((k.client_port, k.server_port), (40000, 15001));
        let k6 = flow_key(
            "[::ffff:127.0.0.1]:40000".parse().unwrap(),
            "127.0.0.1:15001".parse().unwrap(),
        );
        // A dual-stack socket's mapped peer and a plain IPv4 peer are the same connection
        // end as far as the kernel's flow key is concerned.
        assert_eq!(k6, k);
        assert_eq!(
            ip_of(&kernel_addr("10.1.2.3".parse().unwrap())),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn dest_keys_use_prefix_bits_after_the_fixed_part() {
        let k = dest_key(3, &"10.0.0.0/8".parse().unwrap(), 5432);
        assert_eq!(k.prefix_len(), 64 + 96 + 8);
        let d = k.data();
        assert_eq!(d.agent_id.to_ne_bytes(), [0, 0, 0, 3]);
        assert_eq!(d.port.to_ne_bytes(), [0x15, 0x38, 0, 0]);
        let k6 = dest_key(1, &"fd00::/64".parse().unwrap(), 443);
        assert_eq!(k6.prefix_len(), 64 + 64);
    }

    #[test]
    fn local_spellings_fold_to_the_first_local_target_unless_127_0_0_1_has_one() {
        let d = |t: u32, s: &str| (t, s.parse::<Destination>().unwrap());
        let folds = local_folds(&[
            d(1, "10.0.0.0/8:5432"),
            d(2, "[::1]:5432"),
            d(3, "127.0.0.2:5432"),
            d(4, "0.0.0.0:6432"),
            d(5, "127.0.0.0/8:7000"),
            d(6, "[::1]:7000"),
            d(7, "[::/0]:8000"),
            d(8, "127.0.0.2:8000"),
            d(9, "10.1.1.1:9000"),
        ]);
        // 7000: 127.0.0.0/8 already answers for 127.0.0.1; 8000: so does ::/0 (mapped space).
        assert_eq!(
            folds.into_iter().collect::<Vec<_>>(),
            vec![(5432, 2), (6432, 4)]
        );
        let k = dest_key(1, &LOCALHOST_NET, 5432);
        assert_eq!(k.prefix_len(), 64 + 128);
        assert_eq!(k.data().addr, v4_mapped([127, 0, 0, 1]));
    }

    #[test]
    fn event_decoding_is_bounds_checked() {
        assert!(decode_event(&[0u8; 10]).is_none());
        let mut b = vec![0u8; 28];
        b.extend_from_slice(&1234u32.to_ne_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&agent_common::reason::UNKNOWN_DESTINATION.to_ne_bytes());
        b.extend_from_slice(&[0; 16]);
        b.extend_from_slice(&5432u16.to_ne_bytes());
        b.extend_from_slice(&[0; 6]);
        b.extend_from_slice(&agent_common::IPPROTO_TCP.to_ne_bytes());
        // One byte short of the whole event: refused.
        b.extend_from_slice(&[0; 3]);
        assert!(decode_event(&b).is_none());
        b.push(0);
        assert_eq!(b.len(), size_of::<DenyEvent>());
        let e = decode_event(&b).unwrap();
        assert_eq!((e.tgid, e.dst_port, e.protocol), (1234, 5432, 6));
        assert_eq!(reason_name(e.reason), "unknown_destination");
    }
}
