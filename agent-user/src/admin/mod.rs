//! The admin API on a unix socket (`state_dir/admin.sock`, mode 0600: root only) and its client.
//!
//! One JSON request per line, one JSON response per line. The daemon answers `status` and
//! performs `attach`/`detach`; the CLI's `status` and `attach` commands are thin clients.
//! Governed agents cannot reach it: unix sockets are not redirected, so it is protected by file
//! permissions (agents run as an unprivileged user via `agentgate exec --user`).

pub mod http;
pub mod jwt;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::daemon::Daemon;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Attach {
        agent: String,
        cgroup: String,
    },
    Detach {
        cgroup: String,
    },
    /// Pending tickets (`all`: decided ones too, newest first).
    ApprovalsList {
        #[serde(default)]
        all: bool,
    },
    /// Approve a pending ticket. `sha256`, when given, must be the ticket's statement hash (the
    /// approver confirms exactly what they saw); `for_secs` also grants the ticket's rule to
    /// the agent for that long.
    Approve {
        id: u64,
        #[serde(default)]
        sha256: Option<String>,
        #[serde(default)]
        for_secs: Option<u64>,
        #[serde(default)]
        reason: Option<String>,
    },
    Deny {
        id: u64,
        reason: String,
    },
    /// Keeps the connection open and streams one `event` response per ticket or grant change,
    /// starting with the tickets pending now.
    Watch,
    /// Active grants (`all`: expired and revoked ones too).
    GrantsList {
        #[serde(default)]
        all: bool,
    },
    /// Adds a time-boxed role to an agent.
    Grant {
        agent: String,
        role: String,
        for_secs: u64,
        #[serde(default)]
        reason: Option<String>,
    },
    Revoke {
        id: u64,
        #[serde(default)]
        reason: Option<String>,
    },
}

/// Why a request was refused; the HTTP listener maps it to a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    BadRequest,
    Forbidden,
    NotFound,
    Conflict,
    Internal,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<ErrorKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// What the request returns besides status: a ticket, a list of tickets or grants, an event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl Response {
    pub fn ok() -> Response {
        Response {
            ok: true,
            ..Default::default()
        }
    }

    pub fn data(value: serde_json::Value) -> Response {
        Response {
            ok: true,
            data: Some(value),
            ..Default::default()
        }
    }

    pub fn refused(kind: ErrorKind, message: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(message.into()),
            error_kind: Some(kind),
            ..Default::default()
        }
    }
}

/// Who is calling the admin API. The approver identity recorded with a decision comes from
/// here, never from the request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A local process on the root-only unix socket (peer credentials from the kernel).
    /// `cgroup` is the connecting process's, read when the connection is accepted (`None`: it
    /// could not be read, for instance because that process is gone and another one holds the
    /// connection).
    Unix {
        uid: u32,
        pid: Option<i32>,
        cgroup: Option<String>,
    },
    /// An HTTP caller whose JWT verified; `subject` is its `sub` claim.
    Http { subject: String },
}

impl Caller {
    /// The identity recorded as approver or granter.
    pub fn identity(&self) -> String {
        match self {
            Caller::Unix { uid, .. } => match nix::unistd::User::from_uid((*uid).into()) {
                Ok(Some(u)) => format!("unix:{}", u.name),
                _ => format!("unix:uid{uid}"),
            },
            Caller::Http { subject } => format!("jwt:{subject}"),
        }
    }
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
    #[serde(default)]
    pub pending_tickets: usize,
    #[serde(default)]
    pub active_grants: usize,
    /// Records waiting for the session writer; while `session_backpressure`, statements of
    /// agents holding `session_queue_agent_share` of them wait.
    #[serde(default)]
    pub session_queue: usize,
    #[serde(default)]
    pub session_queue_limit: usize,
    #[serde(default)]
    pub session_queue_agent_share: usize,
    #[serde(default)]
    pub session_backpressure: bool,
    /// The agent holding the most records in the queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_queue_busiest: Option<QueuedAgent>,
}

/// An agent's records waiting for the session writer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueuedAgent {
    pub agent: String,
    pub queued: usize,
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
    let caller = match stream.peer_cred() {
        Ok(c) => Caller::Unix {
            uid: c.uid(),
            pid: c.pid(),
            cgroup: c
                .pid()
                .and_then(|p| u32::try_from(p).ok())
                .and_then(crate::identity::CgroupFs::of_pid),
        },
        Err(e) => {
            tracing::warn!(error = %e, "admin socket: no peer credentials; refusing");
            return Ok(());
        }
    };
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Watch) => {
                if let Err(refusal) = daemon.admin_allowed(&caller) {
                    write_line(&mut w, &Response::refused(ErrorKind::Forbidden, refusal)).await?;
                    continue;
                }
                return watch(daemon, &mut w, lines).await;
            }
            Ok(req) => dispatch(daemon, &caller, req).await,
            Err(e) => Response::refused(ErrorKind::BadRequest, format!("bad request: {e}")),
        };
        write_line(&mut w, &response).await?;
    }
    Ok(())
}

async fn write_line(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(response).unwrap_or_default();
    out.push(b'\n');
    w.write_all(&out).await
}

/// Streams approval events until the caller hangs up.
async fn watch(
    daemon: &Daemon,
    w: &mut tokio::net::unix::OwnedWriteHalf,
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
) -> std::io::Result<()> {
    let approvals = &daemon.approvals;
    let mut rx = approvals.subscribe();
    for t in approvals.pending() {
        let event = crate::approval::ApprovalEvent::ticket("ticket_pending", &t);
        write_line(w, &Response::data(serde_json::json!(event))).await?;
    }
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Ok(event) => write_line(w, &Response::data(serde_json::json!(event))).await?,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let r = Response::refused(ErrorKind::Internal, format!("watch fell behind; {n} events skipped"));
                    write_line(w, &r).await?;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
            },
            line = lines.next_line() => match line {
                Ok(Some(_)) => {}
                _ => return Ok(()),
            },
        }
    }
}

/// Answers one request for either transport.
pub async fn dispatch(daemon: &Daemon, caller: &Caller, req: Request) -> Response {
    if let Err(refusal) = daemon.admin_allowed(caller) {
        return Response::refused(ErrorKind::Forbidden, refusal);
    }
    if changes_access(&req)
        && let Some(agent) = agent_named_by(daemon, caller)
    {
        tracing::warn!(agent, caller = %caller.identity(), "an agent's identity tried to decide or grant; refused");
        return Response::refused(
            ErrorKind::Forbidden,
            format!(
                "`{}` names agent `{agent}`: an agent's identity may not approve, deny, grant, revoke, attach or detach",
                caller.identity()
            ),
        );
    }
    let approvals = &daemon.approvals;
    let who = caller.identity();
    match req {
        Request::Status => Response {
            ok: true,
            status: Some(daemon.status()),
            ..Default::default()
        },
        Request::Attach { agent, cgroup } => result(daemon.attach(&agent, &cgroup)),
        Request::Detach { cgroup } => result(daemon.detach(&cgroup)),
        Request::ApprovalsList { all } => Response::data(serde_json::json!(approvals.list(all))),
        Request::Approve {
            id,
            sha256,
            for_secs,
            reason,
        } => {
            let decision = crate::approval::Approve {
                approver: who,
                caller_agent: daemon.caller_agent(caller),
                sha256,
                grant_for: for_secs.map(std::time::Duration::from_secs),
                reason,
            };
            outcome(approvals.approve(id, decision))
        }
        Request::Deny { id, reason } => {
            outcome(approvals.deny(id, &who, daemon.caller_agent(caller).as_deref(), &reason))
        }
        Request::Watch => Response::refused(
            ErrorKind::BadRequest,
            "watch is served on the unix socket only",
        ),
        Request::GrantsList { all } => Response::data(serde_json::json!(approvals.grants(all))),
        Request::Grant {
            agent,
            role,
            for_secs,
            reason,
        } => {
            if daemon.gate.cfg.agent(&agent).is_none() {
                return Response::refused(ErrorKind::NotFound, format!("unknown agent `{agent}`"));
            }
            outcome(approvals.grant_role(
                &agent,
                &role,
                std::time::Duration::from_secs(for_secs),
                &who,
                reason,
            ))
        }
        Request::Revoke { id, reason } => outcome(approvals.revoke(id, &who, reason)),
    }
}

/// Requests that decide tickets or change who may do what. An identity naming an agent (any
/// agent, not only the one concerned: agents approving for one another is the same collusion
/// one hop away) may make none of them; it may still read.
fn changes_access(req: &Request) -> bool {
    match req {
        Request::Approve { .. }
        | Request::Deny { .. }
        | Request::Grant { .. }
        | Request::Revoke { .. }
        | Request::Attach { .. }
        | Request::Detach { .. } => true,
        Request::Status
        | Request::ApprovalsList { .. }
        | Request::Watch
        | Request::GrantsList { .. } => false,
    }
}

/// The configured agent the caller's identity names: a governed process's agent, or a JWT
/// subject equal to an agent's name, bare or as the recorded `jwt:<agent>`.
fn agent_named_by(daemon: &Daemon, caller: &Caller) -> Option<String> {
    daemon.caller_agent(caller).or_else(|| match caller {
        Caller::Http { subject } => subject
            .strip_prefix("jwt:")
            .and_then(|s| daemon.gate.cfg.agent(s))
            .map(|a| a.name.clone()),
        Caller::Unix { .. } => None,
    })
}

fn outcome<T: Serialize>(r: Result<T, crate::approval::ApprovalError>) -> Response {
    match r {
        Ok(v) => Response::data(serde_json::json!(v)),
        Err(e) => Response::refused(e.kind(), e.to_string()),
    }
}

fn result(r: Result<(), String>) -> Response {
    match r {
        Ok(()) => Response::ok(),
        Err(e) => Response::refused(ErrorKind::BadRequest, e),
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
        let queue = gate.store.queue();
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
            pending_tickets: self.approvals.pending().len(),
            active_grants: self.approvals.grants(false).len(),
            session_queue: queue.queued,
            session_queue_limit: queue.max_queued,
            session_queue_agent_share: queue.agent_share,
            session_backpressure: queue.backpressure,
            session_queue_busiest: queue
                .busiest
                .map(|(agent, queued)| QueuedAgent { agent, queued }),
        }
    }
}
