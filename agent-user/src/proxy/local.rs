//! Unknown destinations that are this host under an interface address.
//!
//! The kernel folds loopback and unspecified spellings of a destination (`127.0.0.2`, `::1`,
//! `0.0.0.0`) into 127.0.0.1 before it looks them up, but it does not know the host's interface
//! addresses. A server listening on `0.0.0.0:5432` is reached at `192.0.2.2:5432` too, and a
//! record-mode agent asking for that address was relayed to it as opaque TCP: the statements
//! of a governed target unjudged, with no credentials brokered. Deny-mode agents are refused in
//! the kernel, so only flows for unknown destinations (record mode) come here.
//!
//! Such a flow is looked at again here: a destination that is one of this host's addresses, on
//! the port of one of the agent's local targets, is judged as that target (and dialed at the
//! target's own address, as the kernel's fold is). Other destinations pass untouched. (The
//! daemon's own listeners need nothing here: the admin HTTP API must be on loopback, and the
//! enforcer's listener, if bound to every address, closes a relayed connection to itself, which
//! has no flow record.)

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{AgentConfig, Config, Destination};

/// The id of the target an unknown destination of `agent` is judged as (see the module docs),
/// `None` to relay it as it is. The host's addresses are read (one netlink dump) only on the
/// port of one of the agent's local targets.
pub fn refold(cfg: &Config, agent: &AgentConfig, destination: SocketAddr) -> Option<u32> {
    refold_with(cfg, agent, destination, is_this_host)
}

/// [`refold`] with the question "is this one of the host's addresses?" given.
fn refold_with(
    cfg: &Config,
    agent: &AgentConfig,
    destination: SocketAddr,
    this_host: impl FnOnce(IpAddr) -> bool,
) -> Option<u32> {
    let ip = destination.ip();
    if ip.is_loopback() || ip.is_unspecified() {
        // Folded by the kernel already: what it did not find is not this host's target.
        return None;
    }
    let target = local_target(cfg, agent, destination.port())?;
    this_host(ip).then_some(target)
}

/// The target the kernel takes a local spelling of this port for, for `agent`: 127.0.0.1 is
/// looked up by longest prefix among its destinations (of equal ones, the entry made last, the
/// later target, stands); where none covers it, the fold entry names the first target with a
/// destination naming another local address on the port (`intercept::local_folds`).
fn local_target(cfg: &Config, agent: &AgentConfig, port: u16) -> Option<u32> {
    let localhost = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    let on_port: Vec<(u32, &Destination)> = cfg
        .targets_of(agent)
        .flat_map(|(id, t)| {
            t.destinations
                .iter()
                .filter(move |d| d.port == port)
                .map(move |d| (id, d))
        })
        .collect();
    let covering = on_port
        .iter()
        .filter(|(_, d)| d.local_address() == Some(localhost))
        .max_by_key(|(_, d)| mapped_prefix_len(d));
    if let Some((id, _)) = covering {
        return Some(*id);
    }
    on_port
        .iter()
        .find(|(_, d)| d.local_address().is_some())
        .map(|(id, _)| *id)
}

/// A destination's prefix length in the kernel's IPv6 (IPv4-mapped) key space.
fn mapped_prefix_len(d: &Destination) -> u8 {
    match d.net {
        ipnet::IpNet::V4(n) => n.prefix_len() + 96,
        ipnet::IpNet::V6(n) => n.prefix_len(),
    }
}

/// How long a reading of this host's addresses is used: addresses added since are not seen
/// for that long (their connects are relayed as the unknown destinations they look like).
const ADDRESSES_FOR: Duration = Duration::from_secs(1);

/// The host's addresses as last read, and when.
static ADDRESSES: Mutex<Option<(Instant, Arc<[IpAddr]>)>> = Mutex::new(None);

/// Is `ip` an address of one of this host's interfaces (IPv4-mapped addresses as their IPv4
/// form)? The list is read (one netlink dump) at most once per [`ADDRESSES_FOR`]. An
/// unreadable list counts as "yes": the flow is then judged as the target, never relayed past
/// it.
fn is_this_host(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match host_addresses() {
        None => true,
        Some(addrs) if addrs.contains(&ip) => true,
        // Not there: an address added since the last reading (DHCP, a temporary IPv6 address)
        // must not pass for another host's, so a reading older than [`REREAD_AFTER`] is
        // taken again.
        Some(_) => {
            let stale = ADDRESSES
                .lock()
                .ok()
                .and_then(|c| c.as_ref().map(|(read, _)| read.elapsed() >= REREAD_AFTER))
                .unwrap_or(true);
            if !stale {
                return false;
            }
            let Some(fresh) = this_host_addresses() else {
                return true;
            };
            let found = fresh.contains(&ip);
            if let Ok(mut c) = ADDRESSES.lock() {
                *c = Some((Instant::now(), fresh));
            }
            found
        }
    }
}

/// How old a reading of the host's addresses may be for an address missing from it to be
/// taken as another host's.
const REREAD_AFTER: Duration = Duration::from_millis(100);

fn host_addresses() -> Option<Arc<[IpAddr]>> {
    let mut cached = ADDRESSES.lock().ok()?;
    if let Some((read, addrs)) = cached.as_ref()
        && read.elapsed() < ADDRESSES_FOR
    {
        return Some(addrs.clone());
    }
    let addrs = this_host_addresses()?;
    *cached = Some((Instant::now(), addrs.clone()));
    Some(addrs)
}

/// This host's addresses, read now (`None` when they cannot be listed).
pub fn this_host_addresses() -> Option<Arc<[IpAddr]>> {
    let Ok(list) = nix::ifaddrs::getifaddrs() else {
        tracing::warn!(
            "cannot list this host's addresses; an unknown destination on a local target's port is taken for this host"
        );
        return None;
    };
    let addrs: Arc<[IpAddr]> = list
        .filter_map(|a| {
            let sa = a.address?;
            sa.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect();
    Some(addrs)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            "listen: { port: 15001 }
agents:
  - name: rec
    cgroup: x/rec
    targets: [\"*\"]
    unknown_destinations: record
  - name: only-web
    cgroup: x/web
    targets: [web]
    unknown_destinations: record
targets:
  - name: elsewhere
    match: [\"10.9.9.9:5432\"]
    protocol: tcp
  - name: db
    match: [\"127.0.0.1:5432\"]
    protocol: tcp
  - name: web
    match: [\"127.0.0.2:8080\"]
    protocol: tcp
",
            "f",
        )
        .unwrap()
    }

    const OWN: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    fn refold_here(cfg: &Config, agent: &AgentConfig, d: SocketAddr) -> Option<u32> {
        refold_with(cfg, agent, d, |ip| ip == OWN)
    }

    #[test]
    fn this_hosts_interface_address_is_judged_as_the_local_target_on_its_port() {
        let cfg = config();
        let (rec, web) = (&cfg.agents[0], &cfg.agents[1]);
        let at = |port| SocketAddr::new(OWN, port);
        assert_eq!(refold_here(&cfg, rec, at(5432)), Some(2));
        assert_eq!(refold_here(&cfg, rec, at(8080)), Some(3));
        // Only the agent's own targets count.
        assert_eq!(refold_here(&cfg, web, at(5432)), None);
        assert_eq!(refold_here(&cfg, rec, at(9999)), None);
    }

    #[test]
    fn the_target_is_the_one_the_kernel_takes_127_0_0_1_for() {
        let cfg = Config::parse(
            "agents:
  - name: rec
    cgroup: x/rec
    targets: [\"*\"]
    unknown_destinations: record
targets:
  - name: wide
    match: [\"127.0.0.0/8:5432\", \"127.0.0.2:7000\", \"127.0.0.3:7000\"]
    protocol: tcp
  - name: db
    match: [\"127.0.0.1:5432\"]
    protocol: tcp
  - name: other
    match: [\"127.0.0.4:7000\"]
    protocol: tcp
",
            "f",
        )
        .unwrap();
        let rec = &cfg.agents[0];
        // Longest prefix, not configuration order.
        assert_eq!(refold_here(&cfg, rec, SocketAddr::new(OWN, 5432)), Some(2));
        // No destination covers 127.0.0.1: the first naming a local address.
        assert_eq!(refold_here(&cfg, rec, SocketAddr::new(OWN, 7000)), Some(1));
    }

    #[test]
    fn other_hosts_and_folded_spellings_pass_untouched() {
        let cfg = config();
        let rec = &cfg.agents[0];
        for d in ["203.0.113.7:5432", "127.0.0.2:5432", "0.0.0.0:5432"] {
            assert_eq!(refold_here(&cfg, rec, d.parse().unwrap()), None, "{d}");
        }
    }

    #[test]
    fn the_hosts_own_addresses_are_found() {
        assert!(is_this_host("127.0.0.1".parse().unwrap()));
        assert!(is_this_host("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_this_host("203.0.113.7".parse().unwrap()));
    }
}
