//! The admin API on a unix socket (`state_dir/admin.sock`, mode 0600: root only) and its client.
//!
//! One JSON request per line, one JSON response per line. The daemon answers `status` and
//! performs `attach`/`detach`; the CLI's `status` and `attach` commands are thin clients.
//! Governed agents cannot reach it: unix sockets are not redirected, so it is protected by file
//! permissions (agents run as an unprivileged user via `agentgate exec --user`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::daemon::Daemon;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Attach { agent: String, cgroup: String },
    Detach { cgroup: String },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GovernedCgroup {
    pub agent: String,
    pub cgroup: String,
    pub cgroup_id: u64,
    pub roles: Vec<String>,
    pub targets: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub version: String,
    pub adopted_pinned_state: bool,
    pub listeners: Vec<String>,
    pub pin_dir: String,
    pub cgroup2: String,
    pub governed: Vec<GovernedCgroup>,
    pub sessions_db: String,
    pub connections_served: u64,
    pub connections_refused: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("admin socket: bad response: {0}")]
    BadResponse(String),
    #[error("{0}")]
    Refused(String),
}

/// Binds the socket (replacing a stale one) with root-only permissions.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, daemon: Arc<Daemon>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let daemon = daemon.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &daemon).await {
                        tracing::debug!(error = %e, "admin connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn answer(stream: UnixStream, daemon: &Daemon) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Status) => Response {
                ok: true,
                error: None,
                status: Some(daemon.status()),
            },
            Ok(Request::Attach { agent, cgroup }) => result(daemon.attach(&agent, &cgroup)),
            Ok(Request::Detach { cgroup }) => result(daemon.detach(&cgroup)),
            Err(e) => Response {
                ok: false,
                error: Some(format!("bad request: {e}")),
                status: None,
            },
        };
        let mut out = serde_json::to_vec(&response).unwrap_or_default();
        out.push(b'\n');
        w.write_all(&out).await?;
    }
    Ok(())
}

fn result(r: Result<(), String>) -> Response {
    match r {
        Ok(()) => Response {
            ok: true,
            error: None,
            status: None,
        },
        Err(e) => Response {
            ok: false,
            error: Some(e),
            status: None,
        },
    }
}

/// Sends one request and reads one response.
pub async fn call(path: &Path, req: &Request) -> Result<Response, AdminError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| AdminError::Connect {
            path: path.into(),
            source,
        })?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| AdminError::BadResponse(e.to_string()))?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut lines = BufReader::new(r).lines();
    let Some(answer) = lines.next_line().await? else {
        return Err(AdminError::BadResponse("connection closed".into()));
    };
    let resp: Response =
        serde_json::from_str(&answer).map_err(|e| AdminError::BadResponse(e.to_string()))?;
    if !resp.ok {
        return Err(AdminError::Refused(
            resp.error.unwrap_or_else(|| "refused".into()),
        ));
    }
    Ok(resp)
}

impl Daemon {
    pub fn status(&self) -> Status {
        let gate = &self.gate;
        Status {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            adopted_pinned_state: gate.intercept.adopted,
            listeners: self.listeners.iter().map(ToString::to_string).collect(),
            pin_dir: gate.cfg.pin_dir.display().to_string(),
            cgroup2: self.cgroups.mount.display().to_string(),
            governed: self.governed_list(),
            sessions_db: gate.store.path().display().to_string(),
            connections_served: gate.served.load(Ordering::Relaxed),
            connections_refused: gate.refused.load(Ordering::Relaxed),
        }
    }
}
