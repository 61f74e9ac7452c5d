//! Cancel keys. The agent is given a key minted by the gate (never the server's): a
//! CancelRequest that arrives later, on a new connection through the hook, is mapped back to the
//! real upstream connection and forwarded, but only for the agent that owns the session.

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;

use super::super::Gate;
use super::super::pgtls::UpstreamTls;
use crate::protocol::postgres::FrontendMessage;

/// Where a gate-minted key leads.
#[derive(Clone)]
pub struct CancelTarget {
    pub agent: String,
    /// The session the key was minted for (a cancel while it holds a statement for approval
    /// cancels the ticket instead).
    pub session_id: i64,
    pub upstream: SocketAddr,
    pub tls: UpstreamTls,
    pub process_id: i32,
    pub secret_key: Bytes,
}

#[derive(Default)]
pub struct CancelRegistry {
    keys: Mutex<HashMap<(i32, Bytes), CancelTarget>>,
}

/// Random bytes from the kernel. A dependency for four bytes is not worth it; /dev/urandom
/// never blocks once the system is up.
fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut out = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut out)?;
    Ok(out)
}

impl CancelRegistry {
    /// Mints a key for a new session; the caller removes it with [`CancelRegistry::remove`].
    pub fn mint(&self, target: CancelTarget) -> std::io::Result<(i32, Bytes)> {
        let mut keys = self
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            let pid_bytes: [u8; 4] = random_bytes()?;
            let pid = i32::from_ne_bytes(pid_bytes) & i32::MAX;
            let secret = Bytes::copy_from_slice(&random_bytes::<4>()?);
            if pid != 0 && !keys.contains_key(&(pid, secret.clone())) {
                keys.insert((pid, secret.clone()), target);
                return Ok((pid, secret));
            }
        }
    }

    pub fn remove(&self, key: &(i32, Bytes)) {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }

    fn get(&self, key: &(i32, Bytes)) -> Option<CancelTarget> {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .cloned()
    }
}

/// Forwards an agent's CancelRequest. Unknown keys and other agents' keys are dropped (a
/// cancel has no reply either way, so nothing leaks).
pub async fn forward(
    gate: &Gate,
    agent: &str,
    process_id: i32,
    secret_key: Bytes,
) -> Result<(), String> {
    let Some(pg) = gate.postgres.as_ref() else {
        return Err("no postgres targets".into());
    };
    let Some(t) = pg.cancel.get(&(process_id, secret_key)) else {
        return Err("unknown cancel key".into());
    };
    if t.agent != agent {
        return Err(format!("cancel key belongs to agent `{}`", t.agent));
    }
    // Nothing runs on the server while a statement is held: the cancel is for the ticket.
    if pg
        .approvals
        .cancel_session(t.session_id, super::flow::USER_CANCEL)
    {
        return Ok(());
    }
    let tcp = gate
        .connect_upstream(t.upstream)
        .await
        .map_err(|e| e.to_string())?;
    let mut stream = t.tls.wrap(tcp).await.map_err(|e| e.to_string())?;
    let mut buf = BytesMut::new();
    FrontendMessage::CancelRequest {
        process_id: t.process_id,
        secret_key: t.secret_key.clone(),
    }
    .encode(&mut buf)
    .map_err(|e| e.to_string())?;
    stream.write_all(&buf).await.map_err(|e| e.to_string())?;
    let _ = stream.shutdown().await;
    Ok(())
}
