//! agentgate's kernel side: cgroup socket programs attached at the cgroup2 root.
//!
//! They act only on processes whose cgroup, or one of its ancestors, is in `GOVERNED`; for every
//! other process each program returns "allow" after one short ancestor walk.
//!
//! - `connect4/6`: a governed TCP connect to an allowed destination (or any destination when the
//!   agent's cgroup records unknown ones) is rewritten to the enforcer's loopback listener and
//!   its original destination saved by socket cookie; anything else is refused (`EPERM`). A
//!   loopback or unspecified destination no entry names is looked up again as 127.0.0.1. UDP
//!   connects are allowed only to configured resolvers.
//! - `sock_ops` (`ACTIVE_ESTABLISHED_CB`): once the agent's own socket has completed its
//!   handshake with the enforcer, moves the saved record to `FLOWS` under the full 4-tuple, the
//!   only key the enforcer can know on accept. Not earlier: a record under a 4-tuple whose
//!   handshake never completed (a SYN the listener dropped) could be claimed by any local
//!   process that binds the same source port and connects to the enforcer itself.
//! - `getpeername4/6`: the agent sees the address it asked for.
//! - `sendmsg4/6`: unconnected UDP from governed cgroups goes only to configured resolvers.
//! - `bind4/6`: a governed bind to a port in `RESERVED_PORTS` (a target's, the enforcer's, the
//!   admin API's: ports the gate's own sockets dial or listen on) is refused, so an agent cannot
//!   stand in for a server that is down.
//! - `inbound` (`cgroup_skb/ingress`): a packet for a governed listening TCP socket from a
//!   non-loopback address (a connection from another host) is dropped, unless the agent may
//!   accept them. For every other packet on the host it returns "allow" after reading the
//!   receiving socket's state.
//! - `outbound` (`cgroup_skb/egress`): a governed socket's packet must go where the hooks above
//!   let it: no IPv4 options and no IPv6 extension headers (source routing would carry it past
//!   the address they checked), and to loopback, the enforcer, a resolver (UDP), or anywhere
//!   for ICMP echo (`allow_ping`) and replies to accepted connections (`allow_inbound`). Plain
//!   packets to loopback, most of a host's local traffic, are let through before the ancestor
//!   walk.
//!
//! Every refusal is reported through the `EVENTS` ring buffer, within the refusing agent's
//! budget of entries (`EVENT_BUDGETS`); refusals over it are only counted. Policy beyond "which
//! destination" lives in userspace; these programs stay thin.
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has 64-bit atomic loads and stores only, so `AtomicU64` offers
// no `fetch_add`; the intrinsic compiles to the BPF atomic add instruction.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use agent_common::{
    AF_INET, Addr, V4_MAPPED_WORD, AF_INET6, DEST_KEY_FIXED_BITS, DenyEvent, DestKey, DestValue, EVENTS_BYTES, Endpoint,
    EventBudget, FlowKey, FlowRecord, GOVERNED_ALLOW_INBOUND, GOVERNED_ALLOW_PING,
    GOVERNED_UNKNOWN_RECORD, Governed,
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, MAX_AGENTS, MAX_CGROUP_DEPTH,
    MAX_DESTS, MAX_FLOWS, MAX_GOVERNED, MAX_ORIG_DST, MAX_PENDING, MAX_PROTECTED, MAX_RESERVED_PORTS,
    MAX_RESOLVERS,
    ORPHAN_BUDGET_SLOT, SOCK_DGRAM, SOCK_STREAM, Settings, TARGET_UNKNOWN, reason, v4_mapped,
};
use core::intrinsics::{AtomicOrdering, atomic_xadd};
use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_sock_addr, bpf_sock_ops},
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
        bpf_get_socket_uid, bpf_ktime_get_ns, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_uid_gid},
    macros::{cgroup_sock, cgroup_sock_addr, cgroup_skb, map, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockOpsContext},
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;

#[map]
static GOVERNED: HashMap<u64, Governed> = HashMap::with_max_entries(MAX_GOVERNED, 0);
#[map]
static DESTS: LpmTrie<DestKey, DestValue> = LpmTrie::with_max_entries(MAX_DESTS, 0);
/// LRU: an entry is left behind when a connect fails between this hook and the end of its
/// handshake (a process can make that happen at will: two sockets bound to one address, or a
/// TCP MD5 key set for the loopback address, no capability needed, which makes the enforcer's
/// listener drop the SYN), and a full map would refuse every agent's connects. Eviction only
/// drops the oldest records, those of connects long failed; a live one lasts microseconds.
#[map]
static PENDING: LruHashMap<u64, FlowRecord> = LruHashMap::with_max_entries(MAX_PENDING, 0);
/// LRU for the same reason as `PENDING`: a connection the agent resets before the enforcer
/// accepts it leaves its record until the daemon's sweep. Eviction drops the oldest records; a
/// live one is taken within microseconds of the handshake, so evicting one only closes that
/// connection (fail closed).
#[map]
static FLOWS: LruHashMap<FlowKey, FlowRecord> = LruHashMap::with_max_entries(MAX_FLOWS, 0);
/// Original destination by socket cookie for getpeername; LRU because sockets close without
/// telling us, and losing an entry only changes what getpeername shows.
#[map]
static ORIG_DST: LruHashMap<u64, FlowRecord> = LruHashMap::with_max_entries(MAX_ORIG_DST, 0);
#[map]
static RESOLVERS: HashMap<Endpoint, u8> = HashMap::with_max_entries(MAX_RESOLVERS, 0);
#[map]
static PROTECTED: HashMap<Endpoint, u8> = HashMap::with_max_entries(MAX_PROTECTED, 0);
#[map]
static RESERVED_PORTS: HashMap<Endpoint, u8> = HashMap::with_max_entries(MAX_RESERVED_PORTS, 0);
#[map]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
/// Refusals that found `EVENTS` full (the daemon reading too slowly, or not at all): counted so
/// that the record says how many are missing. Per CPU, so no atomics; the daemon sums them.
#[map]
static EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// Each agent's share of `EVENTS` and its refusals over it (see `EventBudget`): one agent's
/// loop cannot fill the ring and leave the others' refusals unrecorded.
#[map]
static EVENT_BUDGETS: Array<EventBudget> = Array::with_max_entries(MAX_AGENTS + 1, 0);

/// The governed cgroup that decides for the current task: the deepest governed one among the
/// task's cgroup and its ancestors.
#[inline(never)]
fn governed() -> Option<(u64, Governed)> {
    // SAFETY: helper call with a plain integer argument; returns 0 past the task's depth.
    governed_among(|level| unsafe { bpf_get_current_ancestor_cgroup_id(level) })
}

/// [`governed`] for the socket an arriving packet is for (no task runs then).
#[inline(never)]
fn governed_socket(skb: *mut aya_ebpf::bindings::__sk_buff) -> Option<(u64, Governed)> {
    // SAFETY: `skb` is the program's context; the helper returns 0 past the socket's depth.
    governed_among(|level| unsafe { bpf_skb_ancestor_cgroup_id(skb, level) })
}

/// The deepest governed cgroup among those `ancestor(level)` names, root (level 0) down.
#[inline(always)]
fn governed_among(ancestor: impl Fn(i32) -> u64) -> Option<(u64, Governed)> {
    let mut found: Option<(u64, Governed)> = None;
    let mut level: i32 = 0;
    while level < MAX_CGROUP_DEPTH as i32 {
        let id = ancestor(level);
        if id == 0 {
            break;
        }
        // SAFETY: values are plain `Copy` data read once; a concurrent update can at worst
        // show the previous value, which is an acceptable race for a policy lookup.
        if let Some(g) = unsafe { GOVERNED.get(&id) } {
            found = Some((id, *g));
        }
        level += 1;
    }
    found
}

#[inline(always)]
fn settings() -> Option<Settings> {
    SETTINGS.get(0).copied()
}

#[inline(always)]
fn is_loopback_or_any(a: &Addr) -> bool {
    if a[0] != 0 || a[1] != 0 {
        return false;
    }
    if a[2] == V4_MAPPED_WORD {
        // 127.0.0.0/8 or 0.0.0.0
        return a[3].to_ne_bytes()[0] == 127 || a[3] == 0;
    }
    // ::1 or ::
    a[2] == 0 && (a[3] == 0 || a[3] == u32::from_ne_bytes([0, 0, 0, 1]))
}

/// Loopback and unspecified destinations all reach the same local listeners; fold them so a
/// protected endpoint cannot be reached under another spelling of "this host".
#[inline(always)]
fn canonical_local(addr: &Addr) -> Addr {
    if is_loopback_or_any(addr) { LOCALHOST } else { *addr }
}

const LOCALHOST: Addr = v4_mapped([127, 0, 0, 1]);

/// The destination the program sees, as (v4-mapped or v6 address, host-order port).
#[inline(always)]
fn user_destination(sa: *mut bpf_sock_addr, v6: bool) -> (Addr, u16) {
    // SAFETY: `sa` is the program's context pointer; every field is read with a 4-byte load,
    // the width the verifier accepts for bpf_sock_addr.
    unsafe {
        let port = u16::from_be((*sa).user_port as u16);
        if v6 {
            let w = [
                core::ptr::read_volatile(&(*sa).user_ip6[0]),
                core::ptr::read_volatile(&(*sa).user_ip6[1]),
                core::ptr::read_volatile(&(*sa).user_ip6[2]),
                core::ptr::read_volatile(&(*sa).user_ip6[3]),
            ];
            (w, port)
        } else {
            (v4_mapped((*sa).user_ip4.to_ne_bytes()), port)
        }
    }
}

#[inline(always)]
fn set_user_destination(sa: *mut bpf_sock_addr, v6: bool, w: &Addr, port: u16) {
    // SAFETY: context stores, each 4 bytes wide as the verifier requires for these fields.
    unsafe {
        if v6 {
            core::ptr::write_volatile(&mut (*sa).user_ip6[0], w[0]);
            core::ptr::write_volatile(&mut (*sa).user_ip6[1], w[1]);
            core::ptr::write_volatile(&mut (*sa).user_ip6[2], w[2]);
            core::ptr::write_volatile(&mut (*sa).user_ip6[3], w[3]);
        } else {
            (*sa).user_ip4 = w[3];
        }
        (*sa).user_port = u32::from(port.to_be());
    }
}

struct Caller {
    cgroup_id: u64,
    governed_cgroup_id: u64,
    agent_id: u32,
    tgid: u32,
    uid: u32,
}

impl Caller {
    #[inline(always)]
    fn current(governed_cgroup_id: u64, gov: &Governed) -> Self {
        Caller {
            // SAFETY: helper without arguments.
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            governed_cgroup_id,
            agent_id: gov.agent_id,
            tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
            uid: bpf_get_current_uid_gid() as u32,
        }
    }
}

/// Takes one `EVENTS` entry from the agent's budget. False when it is spent: the refusal is then
/// counted in the agent's slot instead.
#[inline(always)]
fn within_budget(agent_id: u32) -> bool {
    let Some(cfg) = SETTINGS.get(0) else {
        return true;
    };
    let burst = u64::from(cfg.event_burst);
    if burst == 0 {
        // The daemon has not shared the ring out yet.
        return true;
    }
    let slot = if agent_id <= MAX_AGENTS { agent_id } else { ORPHAN_BUDGET_SLOT };
    let Some(b) = EVENT_BUDGETS.get_ptr_mut(slot) else {
        return true;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: `b` points at this slot's value in an array map, valid for the program's run.
    // Other CPUs update it concurrently: `taken` and `suppressed` grow only by atomic adds, and
    // a plain load can at worst see a value another CPU is about to change.
    unsafe {
        let taken = &raw mut (*b).taken;
        let base = &raw mut (*b).base_ns;
        let mut earned = now
            .saturating_sub(core::ptr::read_volatile(base))
            .checked_div(cfg.event_refill_ns)
            .unwrap_or(0);
        let mut spent = core::ptr::read_volatile(taken);
        if earned >= spent {
            // Full again (idle for a burst's worth of refill): restart the clock. A CPU adding
            // to `taken` between these stores loses its add: one entry more for it, no more.
            // `taken` is cleared before `base` moves: readers load `base` first, so one that
            // sees the new base sees the cleared count. The other order lets a CPU pair the new
            // base (earned 0) with the old count (at the burst) and suppress a refusal while
            // the bucket is full.
            core::ptr::write_volatile(taken, 0);
            core::ptr::write_volatile(base, now);
            earned = 0;
            spent = 0;
        }
        if spent < burst.saturating_add(earned) {
            // CPUs that loaded `taken` before this add may take an entry each on the same
            // count: the overshoot is bounded by the programs running at once and does not
            // accumulate, since no add is lost. (A fetching add would close that window, but
            // bpf-linker's default cpu, `generic`, has none: LLVM stops with "Invalid usage of
            // the XADD return value".)
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(taken, 1);
            return true;
        }
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*b).suppressed, 1);
    }
    false
}

/// Reports a refusal through `EVENTS`, within the agent's budget, and returns the verdict, which
/// the budget never changes. Fields are written in place in the ring buffer entry to keep the
/// program's stack small.
#[inline(never)]
fn deny(caller: &Caller, refusal: &Refusal) -> i32 {
    if !within_budget(caller.agent_id) {
        return DENY;
    }
    if let Some(mut entry) = EVENTS.reserve::<DenyEvent>(0) {
        let ev = entry.as_mut_ptr();
        // SAFETY: `ev` points at a reserved, exclusively owned entry of the right size; every
        // field is written before submit.
        unsafe {
            (*ev).cgroup_id = caller.cgroup_id;
            (*ev).governed_cgroup_id = caller.governed_cgroup_id;
            (*ev).ts_ns = bpf_ktime_get_ns();
            (*ev).agent_id = caller.agent_id;
            (*ev).tgid = caller.tgid;
            (*ev).uid = caller.uid;
            (*ev).reason = refusal.reason;
            (*ev).dst_addr = refusal.dst;
            (*ev).dst_port = refusal.port;
            (*ev).family = refusal.family;
            (*ev).sock_type = refusal.sock_type;
            (*ev).protocol = refusal.protocol;
            (*ev)._pad = 0;
        }
        entry.submit(0);
    } else if let Some(lost) = EVENTS_LOST.get_ptr_mut(0) {
        // SAFETY: this CPU's own slot; a program runs to completion on one CPU.
        unsafe { *lost += 1 };
    }
    DENY
}

struct Refusal {
    reason: u32,
    dst: Addr,
    port: u16,
    family: u16,
    sock_type: u32,
    protocol: u32,
}

#[inline(always)]
fn is_resolver(dst: &Addr, port: u16) -> bool {
    let key = Endpoint { addr: *dst, port, _pad: 0 };
    // SAFETY: read of a `u8` presence marker.
    unsafe { RESOLVERS.get(&key).is_some() }
}

/// The target `DESTS` gives the agent for this destination, by longest prefix.
#[inline(always)]
fn dest_target(agent_id: u32, port: u16, addr: &Addr) -> Option<u32> {
    let key = Key::new(DEST_KEY_FIXED_BITS + 128, DestKey::new(agent_id, port, *addr));
    DESTS.get(&key).map(|v| v.target_id)
}

fn try_connect(ctx: &SockAddrContext, v6: bool) -> i32 {
    let Some((gov_cgroup, gov)) = governed() else {
        return ALLOW;
    };
    let caller = Caller::current(gov_cgroup, &gov);
    let sa = ctx.sock_addr;
    let family = if v6 { AF_INET6 } else { AF_INET };
    let (dst, port) = user_destination(sa, v6);
    // SAFETY: 4-byte context loads.
    let (sock_type, protocol) = unsafe { ((*sa).type_, (*sa).protocol) };
    match decide_connect(ctx, v6, &caller, &gov, &dst, port, sock_type, protocol) {
        Ok(()) => ALLOW,
        Err(reason) => deny(&caller, &Refusal { reason, dst, port, family, sock_type, protocol }),
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn decide_connect(
    ctx: &SockAddrContext,
    v6: bool,
    caller: &Caller,
    gov: &Governed,
    dst: &Addr,
    port: u16,
    sock_type: u32,
    protocol: u32,
) -> Result<(), u32> {
    let sa = ctx.sock_addr;
    let cfg = settings().ok_or(reason::NOT_READY)?;
    // SAFETY: `sk` of a sock_addr context is a non-null PTR_TO_SOCKET; `mark` is a 4-byte field
    // the verifier lets sock_addr programs read.
    let mark = unsafe { (*(*sa).__bindgen_anon_1.sk).mark };
    if cfg.mark != 0 && mark == cfg.mark && caller.tgid == cfg.daemon_tgid {
        // The enforcer's own upstream socket (backstop: it normally runs ungoverned).
        return Ok(());
    }
    if cfg.ready == 0 {
        return Err(reason::NOT_READY);
    }
    if sock_type == SOCK_DGRAM {
        return if is_resolver(dst, port) { Ok(()) } else { Err(reason::UDP_NOT_RESOLVER) };
    }
    if sock_type != SOCK_STREAM || protocol != IPPROTO_TCP {
        return Err(reason::UNSUPPORTED_SOCKET);
    }

    let local = canonical_local(dst);
    if port == cfg.enforcer_port && local == LOCALHOST {
        return Err(reason::ENFORCER_DIRECT);
    }
    let protected = Endpoint { addr: local, port, _pad: 0 };
    // SAFETY: read of a `u8` presence marker.
    if unsafe { PROTECTED.get(&protected).is_some() } {
        return Err(reason::PROTECTED_ENDPOINT);
    }

    let mut found = dest_target(gov.agent_id, port, dst);
    if found.is_none() && local != *dst {
        // Another spelling of this host (127.0.0.2, 0.0.0.0, ::1...) reaches the listeners
        // 127.0.0.1 does, so it is taken for 127.0.0.1's target; the daemon adds a 127.0.0.1
        // entry for targets named only under other spellings. The record keeps `dst`.
        found = dest_target(gov.agent_id, port, &local);
    }
    let target_id = match found {
        Some(id) => id,
        None if gov.flags & GOVERNED_UNKNOWN_RECORD != 0 => TARGET_UNKNOWN,
        None => return Err(reason::UNKNOWN_DESTINATION),
    };

    let record = FlowRecord {
        orig_addr: *dst,
        orig_port: port,
        family: if v6 { AF_INET6 } else { AF_INET },
        target_id,
        agent_id: gov.agent_id,
        tgid: caller.tgid,
        uid: caller.uid,
        _pad: 0,
        cgroup_id: caller.cgroup_id,
        governed_cgroup_id: caller.governed_cgroup_id,
        // SAFETY: helper without arguments.
        created_ns: unsafe { bpf_ktime_get_ns() },
    };
    // SAFETY: the helper takes the program's own context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if PENDING.insert(&cookie, &record, 0).is_err() {
        return Err(reason::MAP_FULL);
    }
    // Losing this entry only affects what getpeername shows, so a failure is not fatal.
    let _ = ORIG_DST.insert(&cookie, &record, 0);

    if v6 {
        set_user_destination(sa, true, &cfg.enforcer_v6, cfg.enforcer_port);
    } else {
        set_user_destination(sa, false, &v4_mapped(cfg.enforcer_v4), cfg.enforcer_port);
    }
    Ok(())
}

fn try_sendmsg(ctx: &SockAddrContext, v6: bool) -> i32 {
    let Some((gov_cgroup, gov)) = governed() else {
        return ALLOW;
    };
    let sa = ctx.sock_addr;
    let (dst, port) = user_destination(sa, v6);
    if is_resolver(&dst, port) {
        return ALLOW;
    }
    let caller = Caller::current(gov_cgroup, &gov);
    let family = if v6 { AF_INET6 } else { AF_INET };
    let refusal = Refusal {
        reason: reason::UDP_NOT_RESOLVER,
        dst,
        port,
        family,
        sock_type: SOCK_DGRAM,
        protocol: IPPROTO_UDP,
    };
    deny(&caller, &refusal)
}

fn try_getpeername(ctx: &SockAddrContext, v6: bool) -> i32 {
    // SAFETY: the helper takes the program's own context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain `Copy` data; a concurrent LRU eviction can only make the lookup miss.
    let Some(rec) = (unsafe { ORIG_DST.get(&cookie) }).copied() else {
        return ALLOW;
    };
    let want = if v6 { AF_INET6 } else { AF_INET };
    if rec.family == want {
        set_user_destination(ctx.sock_addr, v6, &rec.orig_addr, rec.orig_port);
    }
    ALLOW
}

#[inline(always)]
fn sock_ops_addr(ops: *mut bpf_sock_ops, local: bool) -> Addr {
    // SAFETY: context loads, 4 bytes each.
    unsafe {
        if (*ops).family == u32::from(AF_INET6) {
            let w = if local {
                [
                    core::ptr::read_volatile(&(*ops).local_ip6[0]),
                    core::ptr::read_volatile(&(*ops).local_ip6[1]),
                    core::ptr::read_volatile(&(*ops).local_ip6[2]),
                    core::ptr::read_volatile(&(*ops).local_ip6[3]),
                ]
            } else {
                [
                    core::ptr::read_volatile(&(*ops).remote_ip6[0]),
                    core::ptr::read_volatile(&(*ops).remote_ip6[1]),
                    core::ptr::read_volatile(&(*ops).remote_ip6[2]),
                    core::ptr::read_volatile(&(*ops).remote_ip6[3]),
                ]
            };
            w
        } else if local {
            v4_mapped((*ops).local_ip4.to_ne_bytes())
        } else {
            v4_mapped((*ops).remote_ip4.to_ne_bytes())
        }
    }
}

fn try_sock_ops(ctx: &SockOpsContext) -> u32 {
    // The client's side of the handshake completes (the SYN-ACK arrived) before the enforcer's
    // side queues the connection for accept: the record is in place when the enforcer looks.
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    // SAFETY: the helper takes the program's own context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain `Copy` data owned by this socket's connect; nobody else writes this key.
    let Some(rec) = (unsafe { PENDING.get(&cookie) }).copied() else {
        return 1;
    };
    // remote_port holds the port in network order; older kernels place it in the upper half.
    let raw_remote = ctx.remote_port();
    let remote_be = if raw_remote > 0xffff { (raw_remote >> 16) as u16 } else { raw_remote as u16 };
    let key = FlowKey {
        client_addr: sock_ops_addr(ctx.ops, true),
        server_addr: sock_ops_addr(ctx.ops, false),
        client_port: ctx.local_port() as u16,
        server_port: u16::from_be(remote_be),
    };
    // On failure the enforcer finds no record and closes the connection: fail closed.
    let _ = FLOWS.insert(&key, &rec, 0);
    let _ = PENDING.remove(&cookie);
    1
}

/// Governed processes may create TCP and UDP sockets only: the connect and sendmsg hooks see
/// what those send. Raw sockets (with `CAP_NET_RAW`), ICMP echo sockets (`ping_group_range`),
/// SCTP, MPTCP and the rest would send past them, so their creation fails with `EPERM`. ICMP
/// echo sockets are allowed for agents that opt in (`GOVERNED_ALLOW_PING`).
fn try_sock_create(ctx: &SockContext) -> i32 {
    let Some((gov_cgroup, gov)) = governed() else {
        return ALLOW;
    };
    let sk = ctx.sock;
    // SAFETY: 4-byte loads of fields that sock_create programs may read.
    let (family, sock_type, protocol) = unsafe { ((*sk).family, (*sk).type_, (*sk).protocol) };
    let allowed = match (sock_type, protocol) {
        (SOCK_STREAM, IPPROTO_TCP) | (SOCK_DGRAM, IPPROTO_UDP) => true,
        (SOCK_DGRAM, IPPROTO_ICMP | IPPROTO_ICMPV6) => gov.flags & GOVERNED_ALLOW_PING != 0,
        _ => false,
    };
    if allowed {
        return ALLOW;
    }
    let caller = Caller::current(gov_cgroup, &gov);
    let refusal = Refusal {
        reason: reason::SOCKET_NOT_ALLOWED,
        dst: [0; 4],
        port: 0,
        family: family as u16,
        sock_type,
        protocol,
    };
    deny(&caller, &refusal)
}

fn try_bind(ctx: &SockAddrContext, v6: bool) -> i32 {
    let Some((gov_cgroup, gov)) = governed() else {
        return ALLOW;
    };
    let sa = ctx.sock_addr;
    let (addr, port) = user_destination(sa, v6);
    let key = Endpoint { addr: ANY_ADDRESS, port, _pad: 0 };
    // SAFETY: read of a `u8` presence marker.
    if port == 0 || unsafe { RESERVED_PORTS.get(&key) }.is_none() {
        return ALLOW;
    }
    let caller = Caller::current(gov_cgroup, &gov);
    // SAFETY: 4-byte context loads.
    let (sock_type, protocol) = unsafe { ((*sa).type_, (*sa).protocol) };
    let family = if v6 { AF_INET6 } else { AF_INET };
    deny(
        &caller,
        &Refusal { reason: reason::RESERVED_PORT, dst: addr, port, family, sock_type, protocol },
    )
}

/// The address `RESERVED_PORTS` keys every port under.
const ANY_ADDRESS: Addr = v4_mapped([0, 0, 0, 0]);

#[cgroup_sock_addr(bind4)]
pub fn ag_bind4(ctx: SockAddrContext) -> i32 {
    try_bind(&ctx, false)
}

#[cgroup_sock_addr(bind6)]
pub fn ag_bind6(ctx: SockAddrContext) -> i32 {
    try_bind(&ctx, true)
}

/// `TCP_LISTEN` in `bpf_sock::state`.
const TCP_LISTEN: u32 = 10;

fn try_inbound(ctx: &SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: context loads; `sk` may be null (checked), and `state` is readable on any socket.
    let listening = unsafe {
        let sk = (*skb).__bindgen_anon_2.sk;
        !sk.is_null() && (*sk).state == TCP_LISTEN
    };
    if !listening {
        return ALLOW;
    }
    // The packet starts at its IP header. A connection from this host comes from a loopback
    // address (the gate's own relays, local helpers); one from another host does not. A header
    // that cannot be read is taken for another host's (dropped if the socket is governed).
    let (family, dst) = match ctx.load::<u8>(0).map(|first| first >> 4) {
        Ok(4) => match (ctx.load::<[u8; 4]>(12), ctx.load::<[u8; 4]>(16)) {
            (Ok(src), _) if src[0] == 127 => return ALLOW,
            (_, dst) => (AF_INET, v4_mapped(dst.unwrap_or_default())),
        },
        Ok(6) => match (ctx.load::<Addr>(8), ctx.load::<Addr>(24)) {
            // `::1` only: a mapped 127.x source in an IPv6 header is no loopback connection.
            (Ok(src), _) if src == IPV6_LOOPBACK => return ALLOW,
            (_, dst) => (AF_INET6, dst.unwrap_or_default()),
        },
        _ => (AF_INET, [0; 4]),
    };
    // SAFETY: `skb` is the program's context.
    let Some((gov_cgroup, gov)) = governed_socket(skb) else {
        return ALLOW;
    };
    if gov.flags & GOVERNED_ALLOW_INBOUND != 0 {
        return ALLOW;
    }
    let caller = packet_caller(skb, gov_cgroup, &gov);
    // SAFETY: 4-byte context load.
    let port = unsafe { (*skb).local_port } as u16;
    deny(
        &caller,
        &Refusal {
            reason: reason::INBOUND_CONNECTION,
            dst,
            port,
            family,
            sock_type: SOCK_STREAM,
            protocol: IPPROTO_TCP,
        },
    )
}

/// Who a packet of a governed socket belongs to: no process runs when a packet arrives, and the
/// egress path may run on behalf of another (a timer, a softirq), so no pid; the socket's owner.
#[inline(always)]
fn packet_caller(skb: *mut aya_ebpf::bindings::__sk_buff, gov_cgroup: u64, gov: &Governed) -> Caller {
    Caller {
        // SAFETY: helpers taking the program's context.
        cgroup_id: unsafe { bpf_skb_cgroup_id(skb) },
        governed_cgroup_id: gov_cgroup,
        agent_id: gov.agent_id,
        tgid: 0,
        uid: unsafe { bpf_get_socket_uid(skb) },
    }
}

/// `::1`, as four words of network-order bytes.
const IPV6_LOOPBACK: Addr = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

#[cgroup_skb(ingress)]
pub fn ag_inbound(ctx: SkBuffContext) -> i32 {
    try_inbound(&ctx)
}

/// IPv6 next-header values a governed socket's packet may carry right after the fixed header:
/// its transport, never an extension header.
#[inline(always)]
fn plain_transport(next: u8) -> bool {
    next == IPPROTO_TCP as u8 || next == IPPROTO_UDP as u8 || next == IPPROTO_ICMPV6 as u8
}

/// The fixed IPv4 header, as far as the egress program reads it.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Header {
    version_ihl: u8,
    _tos: u8,
    _total_length: u16,
    _id: u16,
    _fragment: u16,
    _ttl: u8,
    protocol: u8,
    _checksum: u16,
    _src: [u8; 4],
    dst: [u8; 4],
}

/// The fixed IPv6 header.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Header {
    _version_class_flow: [u8; 4],
    _payload_length: u16,
    next_header: u8,
    _hop_limit: u8,
    _src: Addr,
    dst: Addr,
}

/// The packet's first `size_of::<T>()` bytes: read in place when they are in the linear part
/// the program may read directly (no helper call), copied out by `bpf_skb_load_bytes` otherwise.
#[inline(always)]
fn packet_start<T: Copy>(ctx: &SkBuffContext) -> Result<T, i64> {
    let skb = ctx.skb.skb;
    // SAFETY: context loads of the packet bounds.
    let (start, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    if start + core::mem::size_of::<T>() <= end {
        // SAFETY: the bytes are inside the packet (checked above, as the verifier requires).
        return Ok(unsafe { core::ptr::read_unaligned(start as *const T) });
    }
    ctx.load::<T>(0)
}

/// `ETH_P_IP` and `ETH_P_IPV6`, as `__sk_buff::protocol` holds them (network order).
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

fn try_outbound(ctx: &SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: 4-byte context load.
    let ethertype = u16::from_be(unsafe { (*skb).protocol } as u16);
    // The packet starts at its IP header, read in place (this runs for every packet the host
    // sends). `plain`: no options or extension headers, so the transport header follows the
    // fixed one; `dst` is where the packet goes on the wire.
    let (family, plain, protocol, dst, transport) = match ethertype {
        ETH_P_IP => match packet_start::<Ipv4Header>(ctx) {
            Ok(h) => (AF_INET, h.version_ihl == 0x45, h.protocol, v4_mapped(h.dst), 20),
            Err(_) => return outbound_refused(ctx, AF_INET, [0; 4], 0, 0),
        },
        ETH_P_IPV6 => match packet_start::<Ipv6Header>(ctx) {
            Ok(h) => (AF_INET6, plain_transport(h.next_header), h.next_header, h.dst, 40),
            Err(_) => return outbound_refused(ctx, AF_INET6, [0; 4], 0, 0),
        },
        // Not IP: no socket hook of a governed process makes those.
        _ => return ALLOW,
    };
    if plain && is_loopback_or_any(&dst) {
        return ALLOW;
    }
    // SAFETY: `skb` is the program's context.
    let Some((gov_cgroup, gov)) = governed_socket(skb) else {
        return ALLOW;
    };
    // Destination port, for the event and for resolvers (TCP and UDP keep it in the same place).
    let port = if plain && (protocol == IPPROTO_TCP as u8 || protocol == IPPROTO_UDP as u8) {
        ctx.load::<[u8; 2]>(transport + 2)
            .map(u16::from_be_bytes)
            .unwrap_or(0)
    } else {
        0
    };
    if plain {
        let enforcer = settings().is_some_and(|s| {
            dst == v4_mapped(s.enforcer_v4) || (dst == s.enforcer_v6 && dst != [0; 4])
        });
        let allowed = if protocol == IPPROTO_TCP as u8 {
            enforcer || gov.flags & GOVERNED_ALLOW_INBOUND != 0
        } else if protocol == IPPROTO_UDP as u8 {
            is_resolver(&dst, port)
        } else {
            // ICMP echo sockets exist only for agents allowed to ping (`sock_create`).
            (protocol == IPPROTO_ICMP as u8 || protocol == IPPROTO_ICMPV6 as u8)
                && gov.flags & GOVERNED_ALLOW_PING != 0
        };
        if allowed {
            return ALLOW;
        }
    }
    let caller = packet_caller(skb, gov_cgroup, &gov);
    deny(
        &caller,
        &Refusal {
            reason: reason::OUTBOUND_PACKET,
            dst,
            port,
            family,
            sock_type: if protocol == IPPROTO_TCP as u8 { SOCK_STREAM } else { SOCK_DGRAM },
            protocol: u32::from(protocol),
        },
    )
}

/// A governed socket's packet whose header cannot be read is dropped; an ungoverned one's is
/// not this program's business.
#[inline(always)]
fn outbound_refused(ctx: &SkBuffContext, family: u16, dst: Addr, port: u16, protocol: u32) -> i32 {
    let skb = ctx.skb.skb;
    let Some((gov_cgroup, gov)) = governed_socket(skb) else {
        return ALLOW;
    };
    let caller = packet_caller(skb, gov_cgroup, &gov);
    deny(
        &caller,
        &Refusal { reason: reason::OUTBOUND_PACKET, dst, port, family, sock_type: 0, protocol },
    )
}

#[cgroup_skb(egress)]
pub fn ag_outbound(ctx: SkBuffContext) -> i32 {
    try_outbound(&ctx)
}

#[cgroup_sock(sock_create)]
pub fn ag_sock_create(ctx: SockContext) -> i32 {
    try_sock_create(&ctx)
}

#[cgroup_sock_addr(connect4)]
pub fn ag_connect4(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn ag_connect6(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn ag_sendmsg4(ctx: SockAddrContext) -> i32 {
    try_sendmsg(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn ag_sendmsg6(ctx: SockAddrContext) -> i32 {
    try_sendmsg(&ctx, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn ag_getpeername4(ctx: SockAddrContext) -> i32 {
    try_getpeername(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn ag_getpeername6(ctx: SockAddrContext) -> i32 {
    try_getpeername(&ctx, true)
}

#[sock_ops]
pub fn ag_sock_ops(ctx: SockOpsContext) -> u32 {
    try_sock_ops(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
