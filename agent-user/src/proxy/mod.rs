//! The enforcer's connection loop: accept, bind the connection to its kernel flow record and
//! identity, pick the target's protocol handler, and record the session.
//!
//! A connection without a flow record (a direct connect, a spoofed tuple, a record lost to a
//! full map) is closed before a single byte is read and recorded as an event. Protocol handlers
//! live in submodules (`tcp`); codecs and policy live elsewhere.

pub mod local;
pub mod pgtls;
pub mod postgres;
pub mod tcp;

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use agent_common::{FlowRecord, TARGET_UNKNOWN};
use nix::errno::Errno;
use tokio::net::{TcpListener, TcpStream};

use crate::config::{Config, Protocol, TargetConfig};
use crate::identity::ProcessInfo;
use crate::intercept::{Intercept, ip_of};
use crate::session::limit::{EventLimiter, Source};
use crate::session::{AgentShare, Event, SessionStart, SessionStore};

const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a connection handler needs, shared by all connections.
pub struct Gate {
    pub cfg: Arc<Config>,
    pub intercept: Arc<Intercept>,
    pub store: Arc<SessionStore>,
    /// Shared by PostgreSQL connections; `None` when no target speaks PostgreSQL.
    pub postgres: Option<postgres::Shared>,
    pub served: AtomicU64,
    pub refused: AtomicU64,
    /// Events caused by the other side (kernel refusals, connections without a flow record).
    pub events: EventLimiter,
    /// Connections being served, per agent id (index `id - 1`; see `AgentConfig::max_connections`).
    pub active: Vec<AtomicUsize>,
}

/// One served connection of an agent; counted until dropped.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Gate {
    /// A slot among the agent's `max_connections`, or `None` when they are all taken.
    fn slot(&self, agent_id: u32) -> Option<Slot<'_>> {
        let agent = self.cfg.agent_by_id(agent_id)?;
        let count = self
            .active
            .get(usize::try_from(agent_id).ok()?.checked_sub(1)?)?;
        if count.fetch_add(1, Ordering::Relaxed) >= agent.max_connections {
            count.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Slot(count))
    }
}

/// Who is on the other end of an accepted connection and where they wanted to go.
#[derive(Debug, Clone)]
pub struct Peer {
    pub agent: String,
    pub roles: Vec<String>,
    pub process: ProcessInfo,
    pub cgroup_id: u64,
    /// The share of the session store's queue its records count against.
    pub share: AgentShare,
    pub client: SocketAddr,
    pub original_destination: SocketAddr,
    /// `None` for an unknown destination relayed because the agent records them.
    pub target: Option<TargetConfig>,
    /// Where the enforcer connects (see `TargetConfig::upstream_for`).
    upstream: SocketAddr,
}

impl Peer {
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    pub fn session_start(&self, decision: &'static str, reason: Option<String>) -> SessionStart {
        SessionStart {
            agent: Some(self.agent.clone()),
            roles: self.roles.clone(),
            cgroup_id: Some(self.cgroup_id),
            cgroup: self.process.cgroup.clone(),
            pid: Some(self.process.pid),
            exe: self.process.exe.clone(),
            cmdline: self.process.cmdline.clone(),
            uid: Some(self.process.uid),
            client: Some(self.client),
            original_destination: Some(self.original_destination),
            target: self.target.as_ref().map(|t| t.name.clone()),
            protocol: Some(
                self.target
                    .as_ref()
                    .map(|t| t.protocol)
                    .unwrap_or(Protocol::Tcp)
                    .name(),
            ),
            upstream: Some(self.upstream()),
            decision,
            reason,
        }
    }
}

impl Gate {
    /// `read_proc`: read the process's /proc facts now (the TCP handler reads them itself,
    /// while its first bytes are in flight).
    fn identify(&self, flow: &FlowRecord, client: SocketAddr, read_proc: bool) -> Option<Peer> {
        let agent = self.cfg.agent_by_id(flow.agent_id)?;
        let target = if flow.target_id == TARGET_UNKNOWN {
            None
        } else {
            Some(self.cfg.target_by_id(flow.target_id)?.clone())
        };
        let original_destination = SocketAddr::new(ip_of(&flow.orig_addr), flow.orig_port);
        let upstream = match &target {
            Some(t) => t.upstream_for(original_destination)?,
            None => original_destination,
        };
        Some(Peer {
            agent: agent.name.clone(),
            roles: agent.roles.clone(),
            process: if read_proc {
                ProcessInfo::read(flow.tgid, flow.uid)
            } else {
                ProcessInfo {
                    pid: flow.tgid,
                    uid: flow.uid,
                    ..Default::default()
                }
            },
            cgroup_id: flow.cgroup_id,
            share: self.store.share(&agent.name),
            client,
            original_destination,
            target,
            upstream,
        })
    }

    /// Connects to an upstream with the enforcer's mark set, so that even if this process
    /// were placed in a governed cgroup its own sockets would not be redirected.
    pub async fn connect_upstream(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        finish_connect(self.dial_upstream(addr)?, addr).await
    }

    /// Starts an upstream connect (mark set, Nagle off) without waiting for it: the returned
    /// socket is non-blocking and may still be connecting. On loopback the whole handshake runs
    /// inside `connect`, so it is usually done already; a first write says (it fails with
    /// `WouldBlock` while the handshake is on its way).
    pub fn dial_upstream(&self, addr: SocketAddr) -> io::Result<std::net::TcpStream> {
        dial(addr, self.cfg.mark)
    }
}

/// A non-blocking socket with the mark and Nagle off, connecting to `addr`.
fn dial(addr: SocketAddr, mark: u32) -> io::Result<std::net::TcpStream> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, connect, setsockopt, socket, sockopt,
    };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::Mark, &mark)?;
    setsockopt(&fd, sockopt::TcpNoDelay, &true)?;
    match connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)) {
        Ok(()) | Err(Errno::EINPROGRESS | Errno::EINTR) => Ok(std::net::TcpStream::from(fd)),
        Err(e) => Err(e.into()),
    }
}

/// Waits (at most [`UPSTREAM_CONNECT_TIMEOUT`]) for a dialed connect to finish.
pub async fn finish_connect(
    stream: std::net::TcpStream,
    addr: SocketAddr,
) -> io::Result<TcpStream> {
    let stream = TcpStream::from_std(stream)?;
    match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, stream.writable()).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {addr} timed out"),
            ));
        }
    }
    match stream.take_error()? {
        Some(e) => Err(e),
        None => Ok(stream),
    }
}

/// Accepts forever on one listener.
pub async fn serve(listener: TcpListener, gate: Arc<Gate>) {
    // A listener bound to one address accepts connections to that address only: their local
    // address is known without asking each socket.
    let local = listener
        .local_addr()
        .ok()
        .filter(|a| !a.ip().is_unspecified());
    loop {
        match listener.accept().await {
            Ok((sock, peer)) => start(handle(gate.clone(), sock, peer, local)).await,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Runs a new connection up to its first wait on this (the accept) task, then spawns the rest.
///
/// A spawned task would queue behind the tasks woken by the same event-loop turn: on a busy
/// loop those are mostly earlier connections ending (a shutdown, two deregistrations and two
/// closes each), and they would all run between the accept and the new connection's flow
/// lookup, upstream connect and first bytes. Polled here first, the new connection's request
/// is on its way upstream before any of them runs. The wakers it registered meanwhile name the
/// accept task; the spawned task's first poll, right after, registers its own. A panic is
/// caught as a spawned task's would be: it ends the connection, not the accept loop.
async fn start(conn: impl Future<Output = ()> + Send + 'static) {
    let mut conn = Box::pin(conn);
    let polled = std::future::poll_fn(|cx| {
        Poll::Ready(std::panic::catch_unwind(AssertUnwindSafe(|| {
            conn.as_mut().poll(cx).is_pending()
        })))
    })
    .await;
    match polled {
        Ok(true) => {
            tokio::spawn(conn);
        }
        Ok(false) => {}
        Err(_) => tracing::error!("a connection handler panicked; its connection is closed"),
    }
}

/// The event recording a connection refused once its agent is known.
fn refusal_event(kind: &str, peer: &Peer, flow: &FlowRecord, detail: serde_json::Value) -> Event {
    Event {
        kind: kind.into(),
        agent: Some(peer.agent.clone()),
        pid: Some(flow.tgid),
        uid: Some(flow.uid),
        cgroup_id: Some(flow.cgroup_id),
        destination: Some(peer.original_destination.to_string()),
        detail,
        ..Default::default()
    }
}

/// An unknown destination that is this host under an interface address is judged as the
/// agent's local target on its port (`local`).
fn refold_unknown(gate: &Gate, mut flow: FlowRecord) -> FlowRecord {
    if flow.target_id != TARGET_UNKNOWN {
        return flow;
    }
    let Some(agent) = gate.cfg.agent_by_id(flow.agent_id) else {
        return flow;
    };
    let destination = SocketAddr::new(ip_of(&flow.orig_addr), flow.orig_port);
    if let Some(id) = local::refold(&gate.cfg, agent, destination) {
        flow.target_id = id;
    }
    flow
}

async fn handle(
    gate: Arc<Gate>,
    sock: TcpStream,
    client: SocketAddr,
    listener_addr: Option<SocketAddr>,
) {
    let local = match listener_addr.map_or_else(|| sock.local_addr(), Ok) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "accepted socket has no local address");
            return;
        }
    };
    let Some((key, flow)) = gate.intercept.lookup_flow(client, local) else {
        gate.refused.fetch_add(1, Ordering::Relaxed);
        // Any local user can open these: recorded within the limits (`session::limit`).
        if !gate
            .events
            .admit(&Source::new("no_flow_record", None), Instant::now())
        {
            return;
        }
        tracing::warn!(%client, %local, "connection without a flow record closed");
        let _ = gate.store.event(Event {
            kind: "no_flow_record".into(),
            destination: Some(local.to_string()),
            detail: serde_json::json!({ "client": client.to_string(), "reason": "no flow record: not redirected by the kernel hook" }),
            ..Default::default()
        });
        return;
    };
    let flow = refold_unknown(&gate, flow);
    let protocol = match gate.cfg.target_by_id(flow.target_id) {
        Some(t) if flow.target_id != TARGET_UNKNOWN => t.protocol,
        _ => Protocol::Tcp,
    };
    let Some(peer) = gate.identify(&flow, client, protocol != Protocol::Tcp) else {
        gate.intercept.forget_flow(&key);
        gate.refused.fetch_add(1, Ordering::Relaxed);
        if !gate
            .events
            .admit(&Source::new("unknown_identity", None), Instant::now())
        {
            return;
        }
        tracing::warn!(
            agent_id = flow.agent_id,
            target_id = flow.target_id,
            "flow names an agent, target or destination the configuration no longer has; closed"
        );
        let _ = gate.store.event(Event {
            kind: "unknown_identity".into(),
            pid: Some(flow.tgid),
            uid: Some(flow.uid),
            cgroup_id: Some(flow.cgroup_id),
            detail: serde_json::json!({ "agent_id": flow.agent_id, "target_id": flow.target_id }),
            ..Default::default()
        });
        return;
    };
    let Some(_slot) = gate.slot(flow.agent_id) else {
        gate.intercept.forget_flow(&key);
        gate.refused.fetch_add(1, Ordering::Relaxed);
        let source = Source::new("connection_limit", Some(peer.agent.clone()));
        if gate.events.admit(&source, Instant::now()) {
            tracing::warn!(agent = %peer.agent, pid = flow.tgid, "agent has as many connections open as it may; closed");
            let _ = gate.store.event(refusal_event(
                "connection_limit",
                &peer,
                &flow,
                serde_json::json!({
                    "max_connections": gate.cfg.agent_by_id(flow.agent_id).map(|a| a.max_connections),
                }),
            ));
        }
        return;
    };
    // A session that could not be recorded must not run: while the store cannot record (its
    // writer stopped, its commits fail, its disk is below the reserve) every new connection is
    // refused; while its queue is past its hard limit a new connection of an agent holding its
    // share of it is refused, not queued (with a rate-limited event; the refused count shows
    // them all). Other agents' connections are still taken: one agent's flood does not shut
    // the others out.
    if gate.store.overloaded(peer.share) {
        gate.intercept.forget_flow(&key);
        gate.refused.fetch_add(1, Ordering::Relaxed);
        let source = Source::new("session_store_overloaded", Some(peer.agent.clone()));
        if let Some(why) = gate.store.not_recording() {
            // No event: it could not be recorded either (the store records how long it could
            // not once it can again).
            if gate.events.admit(&source, Instant::now()) {
                tracing::error!(agent = %peer.agent, pid = flow.tgid, reason = %why, "session store cannot record: connection closed");
            }
        } else if gate.events.admit(&source, Instant::now()) {
            let q = gate.store.queue();
            let agent_queued = gate.store.queued_by(peer.share);
            tracing::warn!(agent = %peer.agent, pid = flow.tgid, queued = q.queued, agent_queued, "session store is far behind and the agent holds its share of its queue; connection closed");
            let _ = gate.store.event(refusal_event(
                "session_store_overloaded",
                &peer,
                &flow,
                serde_json::json!({
                    "queued": q.queued,
                    "max_queued": q.max_queued,
                    "agent_queued": agent_queued,
                    "agent_share": q.agent_share,
                }),
            ));
        }
        return;
    }
    gate.served.fetch_add(1, Ordering::Relaxed);
    match protocol {
        // The TCP handler removes the record once the connection's first bytes are moving.
        // (Nagle is off on every accepted socket: they inherit it from the listener.)
        Protocol::Tcp => tcp::handle(&gate, sock, peer, &flow, key).await,
        Protocol::Postgres => {
            gate.intercept.forget_flow(&key);
            // Boxed: its state is several times the size of the rest of this future, which
            // every spawned connection would otherwise carry (and copy on spawn).
            Box::pin(postgres::handle(&gate, sock, peer)).await
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// SO_MARK needs CAP_NET_ADMIN (or CAP_NET_RAW).
    fn require_mark() {
        crate::test_support::require_root("SO_MARK needs CAP_NET_ADMIN");
    }

    #[tokio::test]
    async fn loopback_dials_are_connected_when_connect_returns() {
        require_mark();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let s = dial(addr, 0).unwrap();
        // Writable at once, no wait: the handshake ran inside `connect`.
        assert_eq!(std::io::Write::write(&mut &s, b"x").unwrap(), 1);
        assert_eq!(s.peer_addr().unwrap(), addr);
        let (_, from) = listener.accept().await.unwrap();
        assert_eq!(from, s.local_addr().unwrap());
    }

    #[tokio::test]
    async fn a_connection_runs_until_its_first_wait_before_start_returns() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let began = Arc::new(AtomicUsize::new(0));
        let b = began.clone();
        start(async move {
            b.fetch_add(1, Ordering::Relaxed);
            let _ = rx.await;
            let _ = done_tx.send(());
        })
        .await;
        // Ran inline, up to its wait; the rest runs on its own task.
        assert_eq!(began.load(Ordering::Relaxed), 1);
        tx.send(()).unwrap();
        done_rx.await.unwrap();
    }

    #[tokio::test]
    async fn a_panicking_connection_does_not_end_the_accept_loop() {
        start(async { panic!("handler bug") }).await;
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        start(async move {
            r.fetch_add(1, Ordering::Relaxed);
        })
        .await;
        assert_eq!(ran.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn refused_dials_fail_when_finished() {
        require_mark();
        // A port nobody listens on: bind, note the port, close.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let err = match dial(addr, 0) {
            Ok(s) => finish_connect(s, addr).await.unwrap_err(),
            Err(e) => e,
        };
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    }
}
