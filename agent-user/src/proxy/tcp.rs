//! Opaque TCP targets (and unknown destinations of agents that record them): connect upstream,
//! relay both directions, count bytes, record the session.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use agent_common::FlowRecord;

use super::{Gate, Peer};
use crate::identity::ProcessInfo;

const RELAY_BUFFER: usize = 64 * 1024;

pub async fn handle(gate: &Gate, mut client: TcpStream, peer: Peer, flow: &FlowRecord) {
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
    // /proc is read on the blocking pool, off the connection's critical path; the session row
    // is written first (before any byte is relayed) and completed with the process facts.
    let (tgid, uid) = (flow.tgid, flow.uid);
    let process = tokio::task::spawn_blocking(move || ProcessInfo::read(tgid, uid));
    let id = match gate.store.start(peer.session_start(decision, reason)) {
        Ok(id) => id,
        Err(e) => {
            // No record, no relay.
            tracing::error!(error = %e, "cannot record session; closing");
            return;
        }
    };
    let identify = async {
        if let Ok(p) = process.await {
            let _ = gate.store.identify(id, p.exe, p.cmdline, p.cgroup);
        }
    };
    let connected = gate.connect_upstream(upstream_addr).await;
    let mut upstream = match connected {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(session = id, upstream = %upstream_addr, error = %e, "upstream connect failed");
            identify.await;
            let _ = gate.store.end(
                id,
                0,
                0,
                Some(format!("upstream connect to {upstream_addr} failed: {e}")),
            );
            return;
        }
    };
    tracing::debug!(session = id, agent = %peer.agent, upstream = %upstream_addr, "relaying");
    let ((), (up, down, err)) = tokio::join!(identify, relay(&mut client, &mut upstream));
    let _ = gate.store.end(id, up, down, err.map(|e| e.to_string()));
}

/// Copies both directions until both have finished; a half-close is passed on as a shutdown.
/// An error in either direction ends both. Returns bytes client->upstream, upstream->client.
pub async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
) -> (u64, u64, Option<io::Error>) {
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let mut up_bytes = 0u64;
    let mut down_bytes = 0u64;
    let mut error = None;
    {
        let up = copy_counting(&mut cr, &mut uw, &mut up_bytes);
        let down = copy_counting(&mut ur, &mut cw, &mut down_bytes);
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
    (up_bytes, down_bytes, error)
}

async fn copy_counting<R, W>(r: &mut R, w: &mut W, count: &mut u64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Read into spare capacity: no zeroing of the buffer on every connection.
    let mut buf = bytes::BytesMut::with_capacity(RELAY_BUFFER);
    loop {
        let n = r.read_buf(&mut buf).await?;
        if n == 0 {
            return w.shutdown().await;
        }
        w.write_all(&buf).await?;
        buf.clear();
        *count += n as u64;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

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
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let gate = tokio::spawn(async move {
            let (mut c, _) = front.accept().await.unwrap();
            let mut u = TcpStream::connect(server_addr).await.unwrap();
            relay(&mut c, &mut u).await
        });
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
