//! Opaque TCP targets (and unknown destinations of agents that record them): connect upstream,
//! relay both directions, count bytes, record the session.
//!
//! The path to a connection's first bytes is kept short: the session row is handed to the
//! writer, the upstream connect is issued without waiting (on loopback the handshake is over
//! when `connect` returns), and bytes the client has already sent leave for upstream before the
//! upstream socket ever waits on the runtime. What the connection owes but need not wait for
//! (removing its kernel flow record, reading the process's `/proc` facts) is paid the first time
//! it waits on the network: see [`Settle`].
//!
//! A direction that fills a whole relay buffer in one read is a bulk stream: from then on its
//! bytes move socket -> pipe -> socket with `splice(2)` and never enter the daemon's memory (the
//! kernel passes the pages on instead of copying them out and back in). Short exchanges never
//! pay for the pipe.
//!
//! A session's byte counts are what each side's socket took: every write is counted as it
//! completes, so a write that fails partway, or a direction cut short by the other one's error,
//! counts the bytes that went and none of those read but never written. The error names the
//! side and whether reading or writing failed.

use std::future::{Future, poll_fn};
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Buf, BytesMut};
use nix::fcntl::{OFlag, SpliceFFlags, splice};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use agent_common::{FlowKey, FlowRecord};

use super::{Gate, Peer};
use crate::identity::ProcessInfo;
use crate::session::AgentShare;

const RELAY_BUFFER: usize = 64 * 1024;
/// Relay buffers kept per accept thread between connections (64 KiB each), so a connection
/// does not pay a large allocation and its free for each direction.
const POOLED_BUFFERS: usize = 32;

/// Work a connection owes that need not delay its first bytes: removing its kernel flow record
/// and completing its session with the process's `/proc` facts. It runs the first time the
/// relay (or an upstream handshake that did not finish at once) waits on the network, so it
/// overlaps the first round trip instead of adding to it, and before any byte from upstream
/// reaches the client: a client waiting for its answer is still there to be read. Done once.
struct Settle<'a> {
    gate: &'a Gate,
    key: FlowKey,
    flow: &'a FlowRecord,
    share: AgentShare,
    session: i64,
    done: bool,
}

impl Settle<'_> {
    fn run(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        self.gate.intercept.forget_flow(&self.key);
        let p = ProcessInfo::of_connection(self.flow.tgid, self.flow.uid, self.flow.cgroup_id);
        let _ = self
            .gate
            .store
            .identify(self.share, self.session, p.exe, p.cmdline, p.cgroup);
    }
}

/// Drives `fut`, calling `on_wait` each time `fut` has to wait (`Settle::run` acts once).
async fn on_wait<F: Future>(fut: F, mut on_wait: impl FnMut()) -> F::Output {
    let mut fut = pin!(fut);
    poll_fn(|cx| {
        let r = fut.as_mut().poll(cx);
        if r.is_pending() {
            on_wait();
        }
        r
    })
    .await
}

/// Relays a connection whose flow record `key` the caller looked up and left in the map.
pub async fn handle(
    gate: &Gate,
    mut client: TcpStream,
    peer: Peer,
    flow: &FlowRecord,
    key: FlowKey,
) {
    let decision = if peer.target.is_some() {
        "allow"
    } else {
        "record"
    };
    let reason = peer
        .target
        .is_none()
        .then(|| "unknown destination relayed as recorded opaque TCP".to_string());
    let upstream_addr = peer.upstream();
    // The session row is handed to the writer before any byte is relayed; the process facts
    // follow from `Settle`.
    let session = match gate.store.start(peer.session_start(decision, reason)) {
        Ok(id) => id,
        Err(e) => {
            gate.intercept.forget_flow(&key);
            // No record, no relay.
            tracing::error!(error = %e, "cannot record session; closing");
            return;
        }
    };
    let mut settle = Settle {
        gate,
        key,
        flow,
        share: peer.share,
        session,
        done: false,
    };
    let mut up_buf = take_buffer();
    let mut first_up = 0u64;
    let connected = match gate.dial_upstream(upstream_addr) {
        Ok(std_upstream) => match forward_first(&client, &std_upstream, &mut up_buf) {
            // A write went through: the handshake is done.
            FirstBytes::Sent(n) => {
                first_up = n;
                TcpStream::from_std(std_upstream)
            }
            // Nothing to send yet, or the handshake is still on its way: the first wait.
            FirstBytes::NotYet => {
                settle.run();
                super::finish_connect(std_upstream, upstream_addr).await
            }
            FirstBytes::UpstreamFailed(e) => Err(e),
            FirstBytes::ClientFailed(e) => {
                // The end the relay would have come to.
                settle.run();
                give_back(up_buf);
                let _ = gate
                    .store
                    .end(peer.share, session, 0, 0, Some(e.to_string()));
                return;
            }
        },
        Err(e) => Err(e),
    };
    let mut upstream = match connected {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(session, upstream = %upstream_addr, error = %e, "upstream connect failed");
            settle.run();
            give_back(up_buf);
            let _ = gate.store.end(
                peer.share,
                session,
                first_up,
                0,
                Some(format!("upstream connect to {upstream_addr} failed: {e}")),
            );
            return;
        }
    };
    tracing::debug!(session, agent = %peer.agent, upstream = %upstream_addr, "relaying");
    let (up, down, err) = on_wait(
        relay_from(&mut client, &mut upstream, up_buf, first_up),
        || settle.run(),
    )
    .await;
    // A connection that never waited (over in one go) settles now.
    settle.run();
    let _ = gate
        .store
        .end(peer.share, session, up, down, err.map(|e| e.to_string()));
    // Closing the sockets (deregister, close) can wait a turn: connections that are starting
    // meanwhile on this thread go first.
    tokio::task::yield_now().await;
}

/// What became of the client's first bytes.
enum FirstBytes {
    /// This many went upstream (what the socket did not take stays in the buffer).
    Sent(u64),
    /// The client has sent nothing yet, or the upstream handshake is not done (what was read
    /// stays in the buffer).
    NotYet,
    ClientFailed(io::Error),
    /// The upstream connect failed.
    UpstreamFailed(io::Error),
}

/// Moves the bytes the client has already sent to a freshly dialed upstream before the upstream
/// socket is registered with the runtime (a new registration knows no readiness yet, so a write
/// through it would first wait for an event-loop turn).
fn forward_first(
    client: &TcpStream,
    upstream: &std::net::TcpStream,
    buf: &mut BytesMut,
) -> FirstBytes {
    let would_block = |e: &io::Error| {
        matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        )
    };
    let spare = buf.capacity() - buf.len();
    match client.try_read_buf(buf) {
        Ok(0) => return FirstBytes::NotYet,
        Ok(n) if n < spare => {
            // A short read emptied the socket: let the runtime know, so that the relay's first
            // read waits for the next edge instead of trying (tokio's own reads do the same).
            let _ = client.try_io(Interest::READABLE, || {
                Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
            });
        }
        Ok(_) => {}
        Err(e) if would_block(&e) => return FirstBytes::NotYet,
        Err(e) => return FirstBytes::ClientFailed(e),
    }
    // While the handshake is on its way a write fails with `WouldBlock`; once it has failed,
    // with the connect's error.
    match (&*upstream).write(buf) {
        Ok(n) if n == buf.len() => {
            buf.clear();
            FirstBytes::Sent(n as u64)
        }
        Ok(n) => {
            buf.advance(n);
            FirstBytes::Sent(n as u64)
        }
        Err(e) if would_block(&e) => FirstBytes::NotYet,
        Err(e) => FirstBytes::UpstreamFailed(e),
    }
}

/// Copies both directions until both have finished; a half-close is passed on as a shutdown.
/// An error in either direction ends both. Returns bytes client->upstream, upstream->client.
pub async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
) -> (u64, u64, Option<io::Error>) {
    relay_from(client, upstream, take_buffer(), 0).await
}

/// [`relay`], after `up_bytes` bytes already went upstream and with `up_buf` holding client
/// bytes still to be written there.
async fn relay_from(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    mut up_buf: BytesMut,
    mut up_bytes: u64,
) -> (u64, u64, Option<io::Error>) {
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let mut down_buf = take_buffer();
    let mut down_bytes = 0u64;
    let mut error = None;
    // Set by the first direction to end; the second one then skips its shutdown, because both
    // sockets are closed right after (a close sends the FIN; with both directions read to the
    // end there is nothing unread that would turn it into a reset).
    let one_ended = AtomicBool::new(false);
    {
        let up = copy_counting(&mut cr, &mut uw, &mut up_buf, &mut up_bytes, &one_ended, UP);
        let down = copy_counting(
            &mut ur,
            &mut cw,
            &mut down_buf,
            &mut down_bytes,
            &one_ended,
            DOWN,
        );
        tokio::pin!(up, down);
        let mut up_done = false;
        let mut down_done = false;
        while !(up_done && down_done) {
            tokio::select! {
                r = &mut up, if !up_done => {
                    up_done = true;
                    if let Err(e) = r { error = Some(e); break; }
                }
                r = &mut down, if !down_done => {
                    down_done = true;
                    if let Err(e) = r { error = Some(e); break; }
                }
            }
        }
    }
    give_back(up_buf);
    give_back(down_buf);
    (up_bytes, down_bytes, error)
}

/// Which way a direction goes, for its errors.
#[derive(Clone, Copy)]
struct Direction {
    from: &'static str,
    to: &'static str,
}

const UP: Direction = Direction {
    from: "client",
    to: "upstream",
};
const DOWN: Direction = Direction {
    from: "upstream",
    to: "client",
};

impl Direction {
    fn read_failed(self, e: io::Error) -> io::Error {
        io::Error::new(e.kind(), format!("reading from the {}: {e}", self.from))
    }

    fn write_failed(self, e: io::Error) -> io::Error {
        io::Error::new(e.kind(), format!("writing to the {}: {e}", self.to))
    }
}

/// Writes what `buf` holds, then copies until `r` ends and passes the end on as a shutdown,
/// unless the other direction has ended already (`one_ended`): then the close that follows
/// passes it on. Once a read fills the whole buffer, the rest is spliced (see the module doc).
async fn copy_counting(
    r: &mut ReadHalf<'_>,
    w: &mut WriteHalf<'_>,
    buf: &mut BytesMut,
    count: &mut u64,
    one_ended: &AtomicBool,
    dir: Direction,
) -> io::Result<()> {
    loop {
        write_counting(w, buf, count)
            .await
            .map_err(|e| dir.write_failed(e))?;
        // Read into spare capacity: no zeroing of the buffer (which is empty here).
        let spare = buf.capacity() - buf.len();
        let n = r.read_buf(buf).await.map_err(|e| dir.read_failed(e))?;
        if n == 0 {
            return pass_on_end(w, one_ended)
                .await
                .map_err(|e| dir.write_failed(e));
        }
        if n == spare {
            // A bulk stream: what was read goes first, then the socket is spliced. Without a
            // pipe (out of file descriptors) the copy goes on as before.
            write_counting(w, buf, count)
                .await
                .map_err(|e| dir.write_failed(e))?;
            match Pipe::new() {
                Ok(pipe) => {
                    return splice_counting(r.as_ref(), w, &pipe, count, one_ended, dir).await;
                }
                Err(e) => tracing::debug!(error = %e, "no pipe for splicing: copying instead"),
            }
        }
    }
}

/// Writes all of `buf`, adding each write to `count` as it completes (`write_all` would count
/// nothing of a write that fails partway, nor of one cut short when the relay ends). On an
/// error `buf` holds what was not written.
async fn write_counting<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    buf: &mut BytesMut,
    count: &mut u64,
) -> io::Result<()> {
    // An offset rather than `advance`: a cleared buffer keeps its whole capacity for the next
    // read (the bulk test compares a read with the spare capacity).
    let mut written = 0;
    while let Some(rest) = buf.get(written..).filter(|r| !r.is_empty()) {
        let n = match w.write(rest).await {
            Ok(0) => Err(io::ErrorKind::WriteZero.into()),
            r => r,
        };
        match n {
            Ok(n) => {
                *count += n as u64;
                written += n;
            }
            Err(e) => {
                buf.advance(written);
                return Err(e);
            }
        }
    }
    buf.clear();
    Ok(())
}

/// The end of one direction: a shutdown, or nothing when the other has ended (the close sends
/// the FIN).
async fn pass_on_end(w: &mut WriteHalf<'_>, one_ended: &AtomicBool) -> io::Result<()> {
    if one_ended.swap(true, Ordering::Relaxed) {
        return w.flush().await;
    }
    w.shutdown().await
}

/// A pipe between the two sockets of one direction: the kernel buffer that `splice` moves
/// pages through. Both ends are non-blocking; readiness comes from the sockets.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

/// The pipe's capacity, and what one `splice` from the socket may move.
const PIPE_CHUNK: usize = 256 * 1024;

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // A larger pipe halves the splices per byte; the default (64 KiB) still works.
        let _ = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_CHUNK as i32));
        #[cfg(test)]
        SPLICED.with(|n| n.set(n.get() + 1));
        Ok(Pipe { r, w })
    }
}

#[cfg(test)]
thread_local! {
    /// Directions that switched to splicing on this thread (tests check that bulk does).
    static SPLICED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// `splice` as tokio's `try_io` wants it: `WouldBlock` clears the socket's readiness.
fn spliced(
    from: impl std::os::fd::AsFd,
    to: impl std::os::fd::AsFd,
    len: usize,
) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    splice(from, None, to, None, len, flags).map_err(io::Error::from)
}

/// Moves `from` to `w` through `pipe` until `from` ends, counting bytes as they leave. The pipe
/// is emptied after every fill, so a fill that would block means the socket has nothing.
async fn splice_counting(
    from: &TcpStream,
    w: &mut WriteHalf<'_>,
    pipe: &Pipe,
    count: &mut u64,
    one_ended: &AtomicBool,
    dir: Direction,
) -> io::Result<()> {
    let to: &TcpStream = w.as_ref();
    loop {
        let filled = loop {
            from.readable().await.map_err(|e| dir.read_failed(e))?;
            match from.try_io(Interest::READABLE, || spliced(from, &pipe.w, PIPE_CHUNK)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => break r.map_err(|e| dir.read_failed(e))?,
            }
        };
        if filled == 0 {
            return pass_on_end(w, one_ended)
                .await
                .map_err(|e| dir.write_failed(e));
        }
        let mut left = filled;
        while left > 0 {
            to.writable().await.map_err(|e| dir.write_failed(e))?;
            match to.try_io(Interest::WRITABLE, || spliced(&pipe.r, to, left)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => {
                    let n = r.map_err(|e| dir.write_failed(e))?;
                    if n == 0 {
                        return Err(dir.write_failed(io::ErrorKind::WriteZero.into()));
                    }
                    left -= n;
                    *count += n as u64;
                }
            }
        }
    }
}

thread_local! {
    static BUFFERS: std::cell::RefCell<Vec<BytesMut>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn take_buffer() -> BytesMut {
    BUFFERS
        .with_borrow_mut(Vec::pop)
        .unwrap_or_else(|| BytesMut::with_capacity(RELAY_BUFFER))
}

fn give_back(mut buf: BytesMut) {
    buf.clear();
    if buf.capacity() < RELAY_BUFFER {
        return;
    }
    BUFFERS.with_borrow_mut(|pool| {
        if pool.len() < POOLED_BUFFERS {
            pool.push(buf);
        }
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn on_wait_runs_while_waiting_only() {
        let waits = std::cell::Cell::new(0);
        let count = || waits.set(waits.get() + 1);
        assert_eq!(on_wait(async { 7 }, count).await, 7);
        assert_eq!(waits.get(), 0, "a future that never waits");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut waiting = pin!(on_wait(rx, count));
        assert!(poll_once(waiting.as_mut()).await.is_none());
        assert_eq!(waits.get(), 1, "called when the future had to wait");
        tx.send(3).unwrap();
        assert_eq!(waiting.await.unwrap(), 3);
        assert_eq!(waits.get(), 1);
    }

    /// Polls once; `None` when pending.
    async fn poll_once<F: Future + Unpin>(mut f: F) -> Option<F::Output> {
        poll_fn(|cx| match std::pin::Pin::new(&mut f).poll(cx) {
            std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        })
        .await
    }

    #[tokio::test]
    async fn first_bytes_leave_before_the_relay_and_are_counted_once() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(front.local_addr().unwrap())
            .await
            .unwrap();
        c.write_all(b"hello").await.unwrap();
        let (mut accepted, _) = front.accept().await.unwrap();
        let std_up = std::net::TcpStream::connect(server_addr).unwrap();
        std_up.set_nonblocking(true).unwrap();
        let (mut s, _) = server.accept().await.unwrap();
        // The request may still be on its way through loopback: retry until it is read.
        let mut buf = BytesMut::with_capacity(RELAY_BUFFER);
        let mut sent = 0;
        for _ in 0..1000 {
            match forward_first(&accepted, &std_up, &mut buf) {
                FirstBytes::Sent(n) => {
                    sent = n;
                    break;
                }
                FirstBytes::NotYet => {}
                FirstBytes::ClientFailed(e) | FirstBytes::UpstreamFailed(e) => panic!("{e}"),
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(sent, 5);
        assert!(buf.is_empty());
        let mut got = [0u8; 5];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        // The relay goes on from there, counting the first bytes once.
        let mut up = TcpStream::from_std(std_up).unwrap();
        let relay = tokio::spawn(async move {
            let r = relay_from(&mut accepted, &mut up, buf, sent).await;
            drop((accepted, up));
            r
        });
        c.write_all(b" world").await.unwrap();
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b" world");
        s.write_all(b"ok").await.unwrap();
        drop(s);
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"ok");
        let (up_bytes, down_bytes, err) = relay.await.unwrap();
        assert_eq!((up_bytes, down_bytes), (11, 2));
        assert!(err.is_none());
    }

    #[tokio::test]
    async fn first_bytes_wait_for_an_unfinished_handshake() {
        crate::test_support::require_root("dial sets SO_MARK, which needs CAP_NET_ADMIN");
        // A listener whose accept queue is full drops new SYNs: a dial to it stays connecting.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let full = sock.listen(0).unwrap();
        let full_addr = full.local_addr().unwrap();
        let _queued = std::net::TcpStream::connect(full_addr).unwrap();
        let upstream = super::super::dial(full_addr, 0).unwrap();

        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(front.local_addr().unwrap())
            .await
            .unwrap();
        c.write_all(b"hello").await.unwrap();
        let (accepted, _) = front.accept().await.unwrap();
        let mut buf = BytesMut::with_capacity(RELAY_BUFFER);
        for _ in 0..1000 {
            match forward_first(&accepted, &upstream, &mut buf) {
                FirstBytes::NotYet if buf.is_empty() => tokio::task::yield_now().await,
                FirstBytes::NotYet => break,
                FirstBytes::Sent(n) => panic!("{n} bytes written before the handshake"),
                FirstBytes::ClientFailed(e) | FirstBytes::UpstreamFailed(e) => panic!("{e}"),
            }
        }
        // Read from the client and kept for the relay.
        assert_eq!(&buf[..], b"hello");
    }

    /// Bytes that differ along the stream, so a lost, repeated or reordered chunk shows.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
            .collect()
    }

    /// A listener whose one connection is relayed to `server`; the task returns the relay's
    /// result.
    async fn relay_to(
        server: std::net::SocketAddr,
    ) -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<(u64, u64, Option<io::Error>)>,
    ) {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        let gate = tokio::spawn(async move {
            let (mut c, _) = front.accept().await.unwrap();
            let mut u = TcpStream::connect(server).await.unwrap();
            relay(&mut c, &mut u).await
        });
        (addr, gate)
    }

    /// Sends `data` and half-closes while reading everything the peer sends, at the same time.
    async fn exchange(s: &mut TcpStream, data: &[u8]) -> Vec<u8> {
        let (mut r, mut w) = s.split();
        let send = async {
            w.write_all(data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let ((), n) = tokio::join!(send, r.read_to_end(&mut got));
        n.unwrap();
        got
    }

    #[tokio::test]
    async fn bulk_streams_are_spliced_intact_both_ways() {
        const UP: usize = 8 * 1024 * 1024 + 123;
        const DOWN: usize = 6 * 1024 * 1024 + 7;
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let upstream = tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            // Answers while the upload is still arriving: both directions are busy at once.
            exchange(&mut s, &pattern(DOWN, 0x5a)).await
        });
        let (front_addr, gate) = relay_to(server_addr).await;
        let mut c = TcpStream::connect(front_addr).await.unwrap();
        let back = exchange(&mut c, &pattern(UP, 0xa5)).await;
        assert!(back == pattern(DOWN, 0x5a), "download arrived intact");
        assert!(
            upstream.await.unwrap() == pattern(UP, 0xa5),
            "upload arrived intact"
        );
        let (up, down, err) = gate.await.unwrap();
        assert_eq!((up, down), (UP as u64, DOWN as u64));
        assert!(err.is_none());
        assert_eq!(
            SPLICED.with(std::cell::Cell::get),
            2,
            "both directions spliced"
        );
    }

    #[tokio::test]
    async fn short_exchanges_are_not_spliced() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut line = [0u8; 64];
            for _ in 0..100 {
                s.read_exact(&mut line).await.unwrap();
                s.write_all(&line).await.unwrap();
            }
        });
        let (front_addr, gate) = relay_to(server_addr).await;
        let mut c = TcpStream::connect(front_addr).await.unwrap();
        for i in 0..100u8 {
            let line = [i; 64];
            c.write_all(&line).await.unwrap();
            let mut echo = [0u8; 64];
            c.read_exact(&mut echo).await.unwrap();
            assert_eq!(echo, line);
        }
        drop(c);
        let (up, down, _) = gate.await.unwrap();
        assert_eq!((up, down), (6400, 6400));
        assert_eq!(SPLICED.with(std::cell::Cell::get), 0);
    }

    /// A writer that takes `accept` bytes at most per write, `budget` in all, then fails.
    struct Failing {
        accept: usize,
        budget: usize,
        took: Vec<u8>,
    }

    impl tokio::io::AsyncWrite for Failing {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let n = buf.len().min(self.accept).min(self.budget);
            if n == 0 {
                return std::task::Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            self.budget -= n;
            self.took.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_write_that_fails_partway_counts_the_bytes_delivered_only() {
        let mut w = Failing {
            accept: 4,
            budget: 10,
            took: Vec::new(),
        };
        let mut buf = BytesMut::from(&pattern(25, 1)[..]);
        let mut count = 3;
        let err = write_counting(&mut w, &mut buf, &mut count)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        // 4 + 4 + 2 went, on top of the 3 counted before.
        assert_eq!(count, 13);
        assert_eq!(w.took, pattern(25, 1)[..10]);
        assert_eq!(&buf[..], &pattern(25, 1)[10..], "what did not go is kept");
        let e = UP.write_failed(err);
        assert_eq!(e.to_string(), "writing to the upstream: broken pipe");

        // A write that completes leaves the buffer whole for the next read.
        let mut w = Failing {
            accept: 7,
            budget: usize::MAX,
            took: Vec::new(),
        };
        let mut buf = BytesMut::with_capacity(64);
        buf.extend_from_slice(&pattern(20, 2));
        let mut count = 0;
        write_counting(&mut w, &mut buf, &mut count).await.unwrap();
        assert_eq!((count, buf.len(), buf.capacity()), (20, 0, 64));
        assert_eq!(w.took, pattern(20, 2));
    }

    #[tokio::test]
    async fn relays_both_ways_and_counts() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        // Upstream echoes then closes after the client half-closes.
        tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut data = Vec::new();
            s.read_to_end(&mut data).await.unwrap();
            s.write_all(&data).await.unwrap();
            s.write_all(b"!").await.unwrap();
        });
        let (front_addr, gate) = relay_to(server_addr).await;
        let mut c = TcpStream::connect(front_addr).await.unwrap();
        c.write_all(&[7u8; 100_000]).await.unwrap();
        c.shutdown().await.unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.unwrap();
        assert_eq!(back.len(), 100_001);
        let (up, down, err) = gate.await.unwrap();
        assert_eq!((up, down), (100_000, 100_001));
        assert!(err.is_none());
    }
}
