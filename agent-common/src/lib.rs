//! Types shared by the kernel programs (`agent-ebpf`) and the daemon (`agent-user`).
//!
//! Every type here is `#[repr(C)]` and has no implicit padding (explicit `_pad` fields instead).
//! Addresses are [`Addr`]: an IPv6 address as four 32-bit words whose memory holds the address in
//! network byte order, exactly as the kernel's `bpf_sock_addr::user_ip6` does. IPv4 addresses are
//! kept in their IPv4-mapped form (`::ffff:a.b.c.d`), so connect4 and connect6 (including
//! v4-mapped destinations) share one allow list and one flow-key shape. Words rather than bytes
//! because the eBPF compiler spills every live byte to its own stack slot, and 512 bytes of stack
//! do not survive that. Ports are stored in host byte order.
//!
//! This crate owns layouts and constants only; it knows nothing of maps' lifetimes or policy.
#![no_std]
#![deny(unsafe_code)]

/// Names of the maps and programs in the eBPF object; both sides use these strings.
pub mod names {
    pub const GOVERNED: &str = "GOVERNED";
    pub const DESTS: &str = "DESTS";
    pub const PENDING: &str = "PENDING";
    pub const FLOWS: &str = "FLOWS";
    pub const ORIG_DST: &str = "ORIG_DST";
    pub const RESOLVERS: &str = "RESOLVERS";
    pub const PROTECTED: &str = "PROTECTED";
    pub const SETTINGS: &str = "SETTINGS";
    pub const EVENTS: &str = "EVENTS";
    pub const EVENTS_LOST: &str = "EVENTS_LOST";
    pub const EVENT_BUDGETS: &str = "EVENT_BUDGETS";
    pub const RESERVED_PORTS: &str = "RESERVED_PORTS";

    pub const CONNECT4: &str = "ag_connect4";
    pub const CONNECT6: &str = "ag_connect6";
    pub const SENDMSG4: &str = "ag_sendmsg4";
    pub const SENDMSG6: &str = "ag_sendmsg6";
    pub const GETPEERNAME4: &str = "ag_getpeername4";
    pub const GETPEERNAME6: &str = "ag_getpeername6";
    pub const SOCK_OPS: &str = "ag_sock_ops";
    pub const SOCK_CREATE: &str = "ag_sock_create";
    pub const INBOUND: &str = "ag_inbound";
    pub const OUTBOUND: &str = "ag_outbound";
    pub const BIND4: &str = "ag_bind4";
    pub const BIND6: &str = "ag_bind6";

    /// Every map, in the order the daemon pins them.
    pub const MAPS: [&str; 12] = [
        GOVERNED,
        DESTS,
        PENDING,
        FLOWS,
        ORIG_DST,
        RESOLVERS,
        PROTECTED,
        SETTINGS,
        EVENTS,
        EVENTS_LOST,
        EVENT_BUDGETS,
        RESERVED_PORTS,
    ];
}

/// Capacities. A full `PENDING` or `FLOWS` map means the connect is refused (fail closed).
pub const MAX_GOVERNED: u32 = 1024;
pub const MAX_DESTS: u32 = 4096;
pub const MAX_PENDING: u32 = 16384;
pub const MAX_FLOWS: u32 = 16384;
pub const MAX_ORIG_DST: u32 = 65536;
pub const MAX_RESOLVERS: u32 = 64;
pub const MAX_PROTECTED: u32 = 64;
pub const MAX_RESERVED_PORTS: u32 = 4096;
/// Size of the `EVENTS` ring buffer. Every agent may hold its burst of entries in it at once
/// (see [`EventBudget`]): half the ring is shared out as bursts by the daemon, the other half
/// takes the agents' refill while the daemon is slow to read.
pub const EVENTS_BYTES: u32 = 1024 * 1024;
/// One `EVENTS` entry: the kernel's 8-byte record header and a [`DenyEvent`], rounded up to 8.
pub const EVENT_ENTRY_BYTES: u32 = (8 + size_of::<DenyEvent>() as u32).next_multiple_of(8);
/// How many refusals `EVENTS` holds when nobody reads it (13107).
pub const EVENTS_CAPACITY: u32 = EVENTS_BYTES / EVENT_ENTRY_BYTES;

/// Agents are numbered 1..=`MAX_AGENTS` (each needs at least one governed cgroup).
pub const MAX_AGENTS: u32 = MAX_GOVERNED / 2;
/// Slot of `EVENT_BUDGETS` shared by orphaned cgroups (and any agent id beyond `MAX_AGENTS`).
pub const ORPHAN_BUDGET_SLOT: u32 = 0;

/// How deep below the cgroup2 root the kernel side looks for a governed ancestor.
pub const MAX_CGROUP_DEPTH: u32 = 32;

/// `Governed::flags`: connects to destinations outside the allow list are redirected and
/// relayed as recorded opaque TCP instead of being refused.
pub const GOVERNED_UNKNOWN_RECORD: u32 = 1;
/// `Governed::flags`: ICMP echo ("ping") sockets may be created (they are refused otherwise:
/// no sendmsg hook sees their datagrams).
pub const GOVERNED_ALLOW_PING: u32 = 2;
/// `Governed::flags`: TCP connections from other hosts may be accepted (they are dropped
/// otherwise: an agent serving a remote peer would send it anything, past every outbound hook).
pub const GOVERNED_ALLOW_INBOUND: u32 = 4;

/// `FlowRecord::target_id` for a destination that matched no configured target.
pub const TARGET_UNKNOWN: u32 = u32::MAX;

/// Value of the `GOVERNED` map, keyed by cgroup id (the cgroup directory's inode number).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Governed {
    pub agent_id: u32,
    pub flags: u32,
}

/// Bits of `DestKey::data` that precede the address: agent id (32) + port (16) + pad (16).
pub const DEST_KEY_FIXED_BITS: u32 = 64;
/// Bits of the IPv4-mapped prefix `::ffff:` inside the 128-bit address.
pub const V4_MAPPED_PREFIX_BITS: u32 = 96;

/// Data part of the `DESTS` longest-prefix-match key. Every field's memory is big-endian so that
/// prefix matching walks agent, port, then address bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestKey {
    pub agent_id: u32,
    /// Port in the first two bytes (big-endian), then two zero bytes.
    pub port: u32,
    pub addr: Addr,
}

impl DestKey {
    pub const fn new(agent_id: u32, port: u16, addr: Addr) -> Self {
        let p = port.to_be_bytes();
        DestKey {
            agent_id: agent_id.to_be(),
            port: u32::from_ne_bytes([p[0], p[1], 0, 0]),
            addr,
        }
    }
}

/// Value of the `DESTS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestValue {
    pub target_id: u32,
    pub _pad: u32,
}

/// What connect4/6 learned about a redirected socket. Saved by socket cookie in `PENDING`
/// and `ORIG_DST`, then moved by sock_ops into `FLOWS` under the connection's 4-tuple once its
/// handshake with the enforcer completes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowRecord {
    pub orig_addr: Addr,
    pub orig_port: u16,
    /// Address family of the agent's socket (`AF_INET` or `AF_INET6`).
    pub family: u16,
    pub target_id: u32,
    pub agent_id: u32,
    pub tgid: u32,
    pub uid: u32,
    pub _pad: u32,
    /// The cgroup the process was in when it connected.
    pub cgroup_id: u64,
    /// The governed ancestor (or the cgroup itself) that decided.
    pub governed_cgroup_id: u64,
    /// `bpf_ktime_get_ns()` at connect time; lets the daemon sweep stale `PENDING` entries.
    pub created_ns: u64,
}

/// Key of the `FLOWS` map: the full 4-tuple as the enforcer sees it on accept
/// (client = the agent's socket, server = the enforcer's listener).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client_addr: Addr,
    pub server_addr: Addr,
    pub client_port: u16,
    pub server_port: u16,
}

/// Key of `RESOLVERS` and `PROTECTED`: an address and a port. `RESERVED_PORTS` keys a port
/// alone, under the address `0.0.0.0` (mapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: Addr,
    pub port: u16,
    pub _pad: u16,
}

/// Single entry of the `SETTINGS` array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Where IPv4 connects are redirected.
    pub enforcer_v4: [u8; 4],
    pub enforcer_port: u16,
    /// 1 once the daemon has filled every map; until then governed connects are refused.
    pub ready: u16,
    /// Where IPv6 connects (including v4-mapped) are redirected.
    pub enforcer_v6: Addr,
    /// The daemon's own process: together with `mark`, exempts its upstream sockets.
    pub daemon_tgid: u32,
    pub mark: u32,
    /// `EVENTS` entries one agent may take at once ([`EventBudget`]); 0 = no budget yet.
    pub event_burst: u32,
    pub _pad: u32,
    /// Nanoseconds per entry an agent's budget regains (0 = none).
    pub event_refill_ns: u64,
}

/// Value of `EVENT_BUDGETS`, indexed by agent id ([`ORPHAN_BUDGET_SLOT`] for orphans): one
/// agent's share of `EVENTS`, so that an agent looping on refused connects cannot fill the ring
/// and leave other agents' refusals unrecorded. A token bucket kept as a count against a
/// clock: the agent may have taken `Settings::event_burst` entries plus one per
/// `Settings::event_refill_ns` since `base_ns`. Refusals over it are refused all the same but
/// only counted, in `suppressed`, which the daemon reports per agent.
///
/// Several CPUs update one slot: `taken` and `suppressed` change by atomic adds only, so the
/// budget holds exactly while the agent is busy; `base_ns` and `taken` are reset (plain stores)
/// only when the bucket is full again, where a racing CPU can gain at most one extra entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    pub taken: u64,
    pub base_ns: u64,
    pub suppressed: u64,
}

/// Why the kernel refused a connect or a datagram.
pub mod reason {
    pub const UNKNOWN_DESTINATION: u32 = 1;
    pub const ENFORCER_DIRECT: u32 = 2;
    pub const UDP_NOT_RESOLVER: u32 = 3;
    pub const MAP_FULL: u32 = 4;
    pub const UNSUPPORTED_SOCKET: u32 = 5;
    pub const NOT_READY: u32 = 6;
    pub const PROTECTED_ENDPOINT: u32 = 7;
    /// A socket other than TCP or UDP (raw, ICMP, SCTP, MPTCP...) refused at creation: no hook
    /// sees what it sends.
    pub const SOCKET_NOT_ALLOWED: u32 = 8;
    /// A TCP connection from another host to a governed listening socket, dropped on ingress.
    /// The event's destination is the address and port the peer connected to; its pid is 0
    /// (no process runs when a packet arrives) and its uid the listening socket's owner.
    pub const INBOUND_CONNECTION: u32 = 9;
    /// A bind to a port the gate's own sockets meet: a target's (its destinations and
    /// upstream), the enforcer's listener or the admin HTTP API's. A governed process listening
    /// there (a database that is down, a daemon that is stopped) would be dialed by the gate
    /// with brokered credentials, or handed other agents' redirected connections.
    pub const RESERVED_PORT: u32 = 10;
    /// A packet of a governed socket whose IP header goes somewhere the socket hooks did not
    /// allow: IPv4 options (source routing), an IPv6 extension header (a routing header sends
    /// the packet to its segments, not to the address `sendmsg` or `connect` saw), or a
    /// destination other than loopback, the enforcer or (UDP) a resolver. Dropped on egress.
    /// The event's destination is the packet's own; its pid is 0 and its uid the socket's owner.
    pub const OUTBOUND_PACKET: u32 = 11;
}

/// Sent through the `EVENTS` ring buffer for every refusal.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenyEvent {
    pub cgroup_id: u64,
    pub governed_cgroup_id: u64,
    pub ts_ns: u64,
    pub agent_id: u32,
    pub tgid: u32,
    pub uid: u32,
    pub reason: u32,
    pub dst_addr: Addr,
    pub dst_port: u16,
    pub family: u16,
    /// Socket type (`SOCK_STREAM` = 1, `SOCK_DGRAM` = 2, `SOCK_RAW` = 3) of the refused socket.
    pub sock_type: u32,
    /// Its protocol (`IPPROTO_*`); the destination is zero for a socket refused at creation.
    pub protocol: u32,
    pub _pad: u32,
}

/// An IPv6 address as four words holding network-order bytes (see the module docs).
pub type Addr = [u32; 4];

/// Word 2 of an IPv4-mapped address: the bytes `00 00 ff ff`.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const SOCK_STREAM: u32 = 1;
pub const SOCK_DGRAM: u32 = 2;
pub const SOCK_RAW: u32 = 3;
pub const IPPROTO_ICMP: u32 = 1;
pub const IPPROTO_TCP: u32 = 6;
pub const IPPROTO_UDP: u32 = 17;
pub const IPPROTO_ICMPV6: u32 = 58;

/// `::ffff:a.b.c.d` for an IPv4 address given as its network-order bytes.
pub const fn v4_mapped(v4: [u8; 4]) -> Addr {
    [0, 0, V4_MAPPED_WORD, u32::from_ne_bytes(v4)]
}

/// The 16 network-order bytes of an [`Addr`].
pub const fn addr_bytes(addr: &Addr) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = addr[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

/// The [`Addr`] of 16 network-order bytes.
pub const fn addr_from_bytes(b: [u8; 16]) -> Addr {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and byte arrays, and has
    // explicit padding fields, so every bit pattern is a valid value.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::Governed {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::DestKey {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::DestValue {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::FlowRecord {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::FlowKey {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::Endpoint {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::Settings {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::DenyEvent {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::EventBudget {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<Governed>(), 8);
        assert_eq!(size_of::<DestKey>(), 24);
        assert_eq!(size_of::<DestValue>(), 8);
        assert_eq!(size_of::<FlowRecord>(), 16 + 2 + 2 + 4 * 5 + 8 * 3);
        assert_eq!(size_of::<FlowKey>(), 36);
        assert_eq!(size_of::<Endpoint>(), 20);
        assert_eq!(size_of::<Settings>(), 4 + 2 + 2 + 16 + 4 + 4 + 4 + 4 + 8);
        assert_eq!(size_of::<DenyEvent>(), 8 * 3 + 4 * 4 + 16 + 2 + 2 + 4 * 3);
        assert_eq!(size_of::<EventBudget>(), 8 * 3);
    }

    #[test]
    fn ring_entries_are_counted_as_the_kernel_stores_them() {
        assert_eq!(EVENT_ENTRY_BYTES, 80);
        assert_eq!(EVENTS_CAPACITY, 13107);
        assert!(EVENTS_BYTES.is_power_of_two());
    }

    #[test]
    fn v4_mapped_form() {
        let m = addr_bytes(&v4_mapped([127, 0, 0, 1]));
        assert_eq!(m, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]);
        assert_eq!(addr_from_bytes(m), v4_mapped([127, 0, 0, 1]));
    }
}
