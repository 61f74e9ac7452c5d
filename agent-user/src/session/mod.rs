//! The session record: an embedded SQLite store under `state_dir`.
//!
//! One dedicated writer thread owns the write connection. Callers hand it records through a
//! channel and never wait on the disk for connection-level records; the writer commits what
//! queued up over its linger ([`LINGER`]) in one transaction, so the window between "sent" and
//! "committed" is the linger plus one commit.
//! WAL mode with `synchronous=NORMAL`: a committed record survives the daemon being killed
//! (it is in the OS page cache and the WAL); only a power loss can drop the last commits.
//! [`SessionStore::flush`] waits for everything sent so far to be committed, for callers that must
//! not release a result before its record is durable.
//!
//! A batch whose commit fails (a full disk, an I/O error) is kept and retried until it commits:
//! no record handed to the store is dropped. Meanwhile new connections are refused and
//! statements wait (see `backlog` and `health`), and an event says how long writes failed once
//! they succeed again. New connections are also refused while the state directory's filesystem
//! has less free space than a reserve. Sessions a daemon left open when it stopped or was killed
//! are marked ended, as interrupted, when the next one opens the store.
//!
//! The queue is bounded without dropping records (see `backlog`): while the writer is behind,
//! producers of statement records of an agent holding its share of the queue wait, and the writer
//! waits for a lock another process holds on the file instead of giving up on the batch after a
//! timeout. Records travel with the share they count against, so the writer counts them down.
//!
//! Readers (`agentgate sessions ...`) open the same file read-only; WAL lets them read while
//! the daemon writes. This module stores and reads; it does not decide anything.

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;

use crate::policy::TableRef;

mod backlog;
mod health;
pub mod limit;
mod shapes;
use backlog::Backlog;
pub use backlog::{AgentShare, NotRecording, StoreLimits, WriterStopped};
use health::{Outage, Reserve, Space};
use shapes::Shapes;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY,
    agent TEXT,
    roles TEXT NOT NULL DEFAULT '[]',
    cgroup_id INTEGER,
    cgroup TEXT,
    pid INTEGER,
    exe TEXT,
    cmdline TEXT,
    uid INTEGER,
    client TEXT NOT NULL,
    original_destination TEXT,
    target TEXT,
    protocol TEXT,
    upstream TEXT,
    decision TEXT NOT NULL,
    reason TEXT,
    started_ms INTEGER NOT NULL,
    ended_ms INTEGER,
    bytes_up INTEGER NOT NULL DEFAULT 0,
    bytes_down INTEGER NOT NULL DEFAULT 0,
    error TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    session_id INTEGER,
    kind TEXT NOT NULL,
    agent TEXT,
    pid INTEGER,
    uid INTEGER,
    cgroup_id INTEGER,
    exe TEXT,
    destination TEXT,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_session ON events(session_id);
-- Start-up finds the last ticket id among `ticket_created` events without reading every event.
CREATE INDEX IF NOT EXISTS events_kind ON events(kind);
-- Statements are recorded in two parts (see `shapes.rs`): what every execution of a statement
-- under one judgement shares, once per shape, and what each execution adds, once per execution.
-- Stores written before the split also have a `statements` table holding one whole row per
-- statement; it is read, never written, and shares the id sequence and
-- `statement_spans` with `statement_log`.
CREATE TABLE IF NOT EXISTS statement_shapes (
    id INTEGER PRIMARY KEY,
    protocol TEXT NOT NULL,
    text TEXT,
    kind TEXT,
    tables TEXT NOT NULL DEFAULT '[]',
    functions TEXT NOT NULL DEFAULT '[]',
    decision TEXT NOT NULL,
    enforced INTEGER NOT NULL DEFAULT 1,
    policy TEXT,
    rule TEXT,
    message TEXT,
    columns TEXT
);
CREATE TABLE IF NOT EXISTS statement_log (
    id INTEGER PRIMARY KEY,
    session_id INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    shape_id INTEGER NOT NULL,
    -- NULL: the shape's text.
    text TEXT,
    duration_us INTEGER,
    rows INTEGER,
    command_tag TEXT,
    error TEXT,
    result_rows TEXT,
    masked INTEGER NOT NULL DEFAULT 0
);
-- Where a session's statements lie, instead of an index on statements(session_id): one row per
-- session per committed batch covering the ids it wrote (a new span wherever its ids jump by
-- more than SPAN_GAP). The index was one more B-tree insert per statement, at one of as many
-- hot spots as there are busy sessions: about a quarter of the writer's CPU per statement.
CREATE TABLE IF NOT EXISTS statement_spans (
    session_id INTEGER NOT NULL,
    first_id INTEGER NOT NULL,
    last_id INTEGER NOT NULL,
    PRIMARY KEY (session_id, first_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS grants (
    id INTEGER PRIMARY KEY,
    agent TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS attachments (
    cgroup TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    attached_ms INTEGER NOT NULL
);
";

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("session store {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("session store {path}: keeping it private to the daemon's user: {source}")]
    NotPrivate {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("session store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("session store writer has stopped")]
    WriterGone,
    #[error("session store: the records were not committed: {0}")]
    NotCommitted(String),
    #[error("no session {0}")]
    NotFound(i64),
}

/// How long the writer waits for more records before committing a batch: the bound on the
/// window in which a record handed to the store is not yet committed (plus one commit).
///
/// A commit costs about the same for one row as for a hundred (WAL frames for the touched
/// pages, and their checkpoint), so the linger sets what a busy gate pays per statement:
/// `cargo run --release -p agentgate --example session_bench` measured 9.7 us of writer CPU per
/// statement at 2 ms and 6.1 us at 10 ms (with the per-batch statement lookup), at 25 statements
/// a millisecond.
pub const LINGER: Duration = Duration::from_millis(10);

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub fn format_ms(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

/// A session as it starts.
#[derive(Debug, Clone, Serialize, Default)]
pub struct SessionStart {
    pub agent: Option<String>,
    pub roles: Vec<String>,
    pub cgroup_id: Option<u64>,
    pub cgroup: Option<String>,
    pub pid: Option<u32>,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    pub uid: Option<u32>,
    /// Addresses stay addresses until the writer stores them: formatting them is work the
    /// accept path does not wait for.
    pub client: Option<SocketAddr>,
    pub original_destination: Option<SocketAddr>,
    pub target: Option<String>,
    pub protocol: Option<&'static str>,
    pub upstream: Option<SocketAddr>,
    /// `allow`, `record` (unknown destination relayed), or `deny`.
    pub decision: &'static str,
    pub reason: Option<String>,
}

/// Something that happened outside a session's byte stream: a kernel refusal, a connection
/// closed for lack of a flow record, an attachment.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Event {
    pub session_id: Option<i64>,
    pub kind: String,
    pub agent: Option<String>,
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    pub cgroup_id: Option<u64>,
    pub exe: Option<String>,
    pub destination: Option<String>,
    pub detail: serde_json::Value,
}

/// A judged statement, recorded when it is decided (before it runs).
///
/// The text and facts are shared (`Arc`) with the prepared statement they come from: a
/// statement executed a thousand times is recorded a thousand times without being copied.
#[derive(Debug, Clone, Default)]
pub struct StatementStart {
    pub session_id: i64,
    /// `simple`, `extended` or `function-call`.
    pub protocol: &'static str,
    pub text: Arc<str>,
    pub kind: Option<&'static str>,
    pub tables: Arc<[TableRef]>,
    pub functions: Arc<[String]>,
    /// `allow`, `deny`, `review`, or how a review was settled (`approved`, `granted`).
    pub decision: &'static str,
    /// False in shadow mode: the decision was recorded, not enforced.
    pub enforced: bool,
    pub policy: Option<Arc<str>>,
    pub rule: Option<Arc<str>>,
    pub message: Option<String>,
}

/// How a statement ended, recorded when its result has been passed on.
#[derive(Debug, Clone, Serialize, Default)]
pub struct StatementEnd {
    pub duration_us: u64,
    pub rows: Option<u64>,
    pub command_tag: Option<String>,
    pub error: Option<String>,
    pub columns: Vec<String>,
    /// The first rows as the agent saw them (masked), text rendering.
    pub result_rows: Vec<Vec<Option<String>>>,
    pub masked: bool,
}

/// A statement as the writer inserts it.
struct StatementWrite {
    id: i64,
    ts: i64,
    s: StatementStart,
    e: StatementEnd,
}

enum Write {
    Identify {
        id: i64,
        exe: Option<String>,
        cmdline: Option<String>,
        cgroup: Option<String>,
    },
    /// A statement, written once: when it completed (before its result was passed on) or when
    /// it was refused.
    /// Boxed once: start and end travel together.
    Statement(Box<StatementWrite>),
    Start {
        id: i64,
        ts: i64,
        s: Box<SessionStart>,
        /// Set when the session's end arrived in the same batch (see [`fold`]).
        end: Option<Ending>,
    },
    End {
        id: i64,
        ts: i64,
        bytes_up: u64,
        bytes_down: u64,
        error: Option<String>,
    },
    Event {
        ts: i64,
        e: Box<Event>,
    },
    Attach {
        cgroup: String,
        agent: String,
        ts: i64,
    },
    Detach {
        cgroup: String,
    },
    Grant {
        id: u64,
        detail: serde_json::Value,
    },
    /// Every session still open ends now, with `error` (the daemon is stopping).
    EndOpen {
        ts: i64,
        error: &'static str,
    },
    /// Answered once the batch holding it is committed, or with why it was not.
    Flush(tokio::sync::oneshot::Sender<Result<(), String>>),
}

/// How a session ended, folded into its start row when both are written in one batch.
struct Ending {
    ts: i64,
    bytes_up: u64,
    bytes_down: u64,
    error: Option<String>,
}

/// Folds the process facts and the end of sessions that started in this batch into their start
/// rows: a short connection (most of them: a query, an API call) costs one row insert instead of
/// an insert and two updates. Everything else keeps its order.
fn fold(batch: Vec<Write>) -> Vec<Write> {
    let mut out = Vec::with_capacity(batch.len());
    // Session id -> index of its `Start` in `out`.
    let mut started: std::collections::HashMap<i64, usize> = std::collections::HashMap::new();
    for w in batch {
        let target = match &w {
            Write::Identify { id, .. } | Write::End { id, .. } => started.get(id).copied(),
            _ => None,
        };
        let Some(Write::Start { s, end, .. }) = target.and_then(|i| out.get_mut(i)) else {
            if let Write::Start { id, .. } = &w {
                started.insert(*id, out.len());
            }
            out.push(w);
            continue;
        };
        match w {
            Write::Identify {
                exe,
                cmdline,
                cgroup,
                ..
            } => {
                // As the UPDATE would: a fact read replaces the one at the start, if any.
                s.exe = exe.or(s.exe.take());
                s.cmdline = cmdline.or(s.cmdline.take());
                s.cgroup = cgroup.or(s.cgroup.take());
            }
            Write::End {
                ts,
                bytes_up,
                bytes_down,
                error,
                ..
            } => {
                *end = Some(Ending {
                    ts,
                    bytes_up,
                    bytes_down,
                    error,
                });
            }
            _ => {}
        }
    }
    out
}

/// A judged statement whose outcome is still to come. It travels with the connection's own
/// bookkeeping (no shared map, no lock) until [`SessionStore::statement_end`] writes it.
#[derive(Debug)]
pub struct OpenStatement {
    share: AgentShare,
    id: i64,
    ts: i64,
    s: StatementStart,
}

/// The session writer's queue, as `agentgate status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStatus {
    /// Records waiting for the writer.
    pub queued: usize,
    /// `sessions.max_queued`: the high-water mark.
    pub max_queued: usize,
    /// What an agent may hold once the queue is at the high-water mark before its statements
    /// wait: `sessions.max_queued_per_agent`, or the bound divided among the agents holding
    /// records.
    pub agent_share: usize,
    /// Whether the queue reached the high-water mark: agents holding their share wait.
    pub backpressure: bool,
    /// The agent holding the most records, and how many.
    pub busiest: Option<(String, usize)>,
}

/// The daemon's handle: cheap to share (`Arc`) and never blocks on disk.
pub struct SessionStore {
    tx: mpsc::Sender<(Write, AgentShare)>,
    backlog: Arc<Backlog>,
    writer_tid: Option<i32>,
    next_id: AtomicI64,
    next_statement: AtomicI64,
    path: PathBuf,
}

/// The files hold every agent's records, and a read lock on the `-shm` file (a read-only
/// descriptor is enough) stalls the writer: only the daemon's user may open them. Creates the
/// database file 0600 when it is missing: SQLite gives the `-wal`, `-shm` and `-journal` files
/// it creates the database file's mode. Narrows to 0600 the ones an earlier version left open
/// to other users.
fn make_private(path: &Path) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    let mut files = vec![path.to_path_buf()];
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        files.push(name.into());
    }
    for file in files {
        let mode = match std::fs::metadata(&file) {
            Ok(meta) => meta.permissions().mode() & 0o7777,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if mode & 0o077 != 0 {
            tracing::warn!(
                file = %file.display(),
                mode = format!("{mode:o}"),
                "session store file was open to other users; narrowed to 0600"
            );
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

fn open_rw(path: &Path) -> Result<Connection, SessionError> {
    let conn = Connection::open(path).map_err(|source| SessionError::Open {
        path: path.into(),
        source,
    })?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.execute_batch(SCHEMA)?;
    migrate_statement_index(&conn)?;
    Ok(conn)
}

/// Stores written before statement spans have an index on `statements(session_id)` and no
/// spans: give every session one span over all its statements (found through that index), then
/// drop the index, in one transaction.
fn migrate_statement_index(conn: &Connection) -> rusqlite::Result<()> {
    if !has_statement_index(conn)? {
        return Ok(());
    }
    tracing::info!("session store: replacing the statements index by statement spans (once)");
    conn.execute_batch(
        "BEGIN IMMEDIATE;
         INSERT OR IGNORE INTO statement_spans (session_id, first_id, last_id)
             SELECT session_id, MIN(id), MAX(id) FROM statements GROUP BY session_id;
         DROP INDEX statements_session;
         COMMIT;",
    )
}

fn has_table(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
        [name],
        |r| r.get(0),
    )
}

fn has_statement_index(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'statements_session')",
        [],
        |r| r.get(0),
    )
}

/// A session's statement ids further apart than this within one batch start a new span, so that
/// reading a span never walks far over other sessions' statements (a statement that ran for an
/// hour ends in the same batch as its session's next one, whose id is far higher).
const SPAN_GAP: i64 = 4096;

/// The statement spans of one batch: session id -> its spans, in id order.
#[derive(Default)]
struct Spans(std::collections::HashMap<i64, Vec<(i64, i64)>>);

impl Spans {
    fn note(&mut self, session_id: i64, id: i64) {
        let spans = self.0.entry(session_id).or_default();
        match spans.last_mut() {
            Some((first, last)) if id >= *first && id - *last <= SPAN_GAP => {
                *last = (*last).max(id)
            }
            _ => spans.push((id, id)),
        }
    }

    fn write(&self, tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        let mut insert = tx.prepare_cached(
            "INSERT INTO statement_spans (session_id, first_id, last_id) VALUES (?1, ?2, ?3)
             ON CONFLICT (session_id, first_id) DO UPDATE SET last_id = MAX(last_id, excluded.last_id)",
        )?;
        for (session_id, spans) in &self.0 {
            for (first, last) in spans {
                insert.execute(params![session_id, first, last])?;
            }
        }
        Ok(())
    }
}

/// Sorted, overlapping spans merged: each statement is read once.
fn merge_spans(mut spans: Vec<(i64, i64)>) -> Vec<(i64, i64)> {
    spans.sort_unstable();
    let mut out: Vec<(i64, i64)> = Vec::with_capacity(spans.len());
    for (first, last) in spans {
        match out.last_mut() {
            Some((_, end)) if first <= *end => *end = (*end).max(last),
            _ => out.push((first, last)),
        }
    }
    out
}

impl SessionStore {
    pub fn open(path: &Path) -> Result<SessionStore, SessionError> {
        SessionStore::open_with(path, StoreLimits::default(), &[])
    }

    /// `agents`: the names whose records are counted per agent (see [`SessionStore::share`]).
    pub fn open_with(
        path: &Path,
        limits: StoreLimits,
        agents: &[&str],
    ) -> Result<SessionStore, SessionError> {
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| SessionError::NotPrivate {
                    path: path.into(),
                    source,
                })?;
        }
        make_private(path).map_err(|source| SessionError::NotPrivate {
            path: path.into(),
            source,
        })?;
        let conn = open_rw(path)?;
        let max: i64 = conn.query_row("SELECT COALESCE(MAX(id), 0) FROM sessions", [], |r| {
            r.get(0)
        })?;
        let max_id = |table: &str| -> rusqlite::Result<i64> {
            if !has_table(&conn, table)? {
                return Ok(0);
            }
            conn.query_row(
                &format!("SELECT COALESCE(MAX(id), 0) FROM {table}"),
                [],
                |r| r.get(0),
            )
        };
        let max_statement = max_id("statement_log")?.max(max_id("statements")?);
        end_interrupted(&conn, now_ms());
        let (tx, rx) = mpsc::channel();
        let (tid_tx, tid_rx) = mpsc::sync_channel(1);
        let backlog = Arc::new(Backlog::new(limits, agents));
        let writer_backlog = backlog.clone();
        let mut reserve = Reserve::new(
            path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            limits.min_free_mib,
        );
        // Before the first connection is taken.
        backlog.set_low_space(matches!(reserve.check(), Space::Low));
        std::thread::Builder::new()
            .name("session-writer".into())
            .spawn(move || {
                let _ = tid_tx.send(nix::unistd::gettid().as_raw());
                // Also when the writer panics: producers waiting for room must not wait forever.
                struct Stopped(Arc<Backlog>);
                impl Drop for Stopped {
                    fn drop(&mut self) {
                        self.0.writer_stopped();
                    }
                }
                let stopped = Stopped(writer_backlog);
                writer(conn, rx, &stopped.0, reserve)
            })
            .map_err(|e| SessionError::Open {
                path: path.into(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        // Its thread id, for `chrt -p` and the like: its scheduling class changes (see
        // `WriterPriority`).
        let writer_tid = tid_rx.recv().ok();
        tracing::debug!(tid = ?writer_tid, "session writer started");
        Ok(SessionStore {
            tx,
            backlog,
            writer_tid,
            next_id: AtomicI64::new(max + 1),
            next_statement: AtomicI64::new(max_statement + 1),
            path: path.into(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The writer thread's id (`None` if it died before saying).
    pub fn writer_tid(&self) -> Option<i32> {
        self.writer_tid
    }

    /// The share of the queue `agent`'s records count against ([`AgentShare::NONE`] for a
    /// name the store was not opened with).
    pub fn share(&self, agent: &str) -> AgentShare {
        self.backlog.share(agent)
    }

    /// Resolves at once while the writer keeps up; while it is behind (its queue reached
    /// `sessions.max_queued`), at once for an agent holding less than its share of the queue,
    /// and for one holding its share once the writer has written enough of its records or
    /// caught up (see `backlog`). Producers of statement records wait here before taking the
    /// agent's next statement. Fails once the writer has stopped: the statement could not be
    /// recorded, so it must not be taken.
    pub async fn room(&self, share: AgentShare) -> Result<(), WriterStopped> {
        self.backlog.room(share).await
    }

    /// Whether a new connection of the agent is refused rather than queued: the writer has
    /// stopped, or the queue is past the hard limit (twice `sessions.max_queued`) and the
    /// agent holds its share of it.
    pub fn overloaded(&self, share: AgentShare) -> bool {
        self.backlog.overloaded(share)
    }

    /// Whether the writer thread has stopped: nothing more can be recorded.
    pub fn writer_stopped(&self) -> bool {
        self.backlog.stopped()
    }

    /// Why nothing new can be recorded, if so: the writer has stopped, its commits fail (it
    /// retries them), or the filesystem has less free space than the reserve. New connections
    /// are refused meanwhile ([`SessionStore::overloaded`] holds for every agent).
    pub fn not_recording(&self) -> Option<NotRecording> {
        self.backlog.not_recording()
    }

    /// The queue's figures, for `agentgate status`.
    pub fn queue(&self) -> QueueStatus {
        QueueStatus {
            queued: self.backlog.queued(),
            max_queued: self.backlog.limit(),
            agent_share: self.backlog.agent_limit(),
            backpressure: self.backlog.backpressure(),
            busiest: self
                .backlog
                .busiest()
                .map(|(agent, queued)| (agent.to_string(), queued)),
        }
    }

    /// Records of the agent waiting for the writer.
    pub fn queued_by(&self, share: AgentShare) -> usize {
        self.backlog.queued_by(share)
    }

    /// Records a new session and returns its id (allocated here, so no disk round trip). It
    /// counts against the share of the agent it names.
    pub fn start(&self, s: SessionStart) -> Result<i64, SessionError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let share = s
            .agent
            .as_deref()
            .map_or(AgentShare::NONE, |a| self.backlog.share(a));
        self.send(
            Write::Start {
                id,
                ts: now_ms(),
                s: Box::new(s),
                end: None,
            },
            share,
        )?;
        Ok(id)
    }

    /// Completes a session's process facts (read from /proc while the session ran).
    pub fn identify(
        &self,
        share: AgentShare,
        id: i64,
        exe: Option<String>,
        cmdline: Option<String>,
        cgroup: Option<String>,
    ) -> Result<(), SessionError> {
        self.send(
            Write::Identify {
                id,
                exe,
                cmdline,
                cgroup,
            },
            share,
        )
    }

    pub fn end(
        &self,
        share: AgentShare,
        id: i64,
        bytes_up: u64,
        bytes_down: u64,
        error: Option<String>,
    ) -> Result<(), SessionError> {
        self.send(
            Write::End {
                id,
                ts: now_ms(),
                bytes_up,
                bytes_down,
                error,
            },
            share,
        )
    }

    /// Opens the record of a judged statement; [`SessionStore::statement_end`] hands it to the
    /// writer with its outcome, in one row write (the proxy calls it before the statement's
    /// result is passed on, or at once for a refusal).
    pub fn statement(&self, share: AgentShare, s: StatementStart) -> OpenStatement {
        OpenStatement {
            share,
            id: self.next_statement.fetch_add(1, Ordering::Relaxed),
            ts: now_ms(),
            s,
        }
    }

    pub fn statement_end(&self, open: OpenStatement, e: StatementEnd) -> Result<(), SessionError> {
        self.send(
            Write::Statement(Box::new(StatementWrite {
                id: open.id,
                ts: open.ts,
                s: open.s,
                e,
            })),
            open.share,
        )
    }

    /// Records an event; one naming an agent counts against that agent's share (the daemon's
    /// own events count in the total only).
    pub fn event(&self, e: Event) -> Result<(), SessionError> {
        let share = e
            .agent
            .as_deref()
            .map_or(AgentShare::NONE, |a| self.backlog.share(a));
        self.send(
            Write::Event {
                ts: now_ms(),
                e: Box::new(e),
            },
            share,
        )
    }

    /// An operator's attachment: the daemon's record, not the agent's.
    pub fn attach(&self, cgroup: &str, agent: &str) -> Result<(), SessionError> {
        self.send(
            Write::Attach {
                cgroup: cgroup.into(),
                agent: agent.into(),
                ts: now_ms(),
            },
            AgentShare::NONE,
        )
    }

    pub fn detach(&self, cgroup: &str) -> Result<(), SessionError> {
        self.send(
            Write::Detach {
                cgroup: cgroup.into(),
            },
            AgentShare::NONE,
        )
    }

    /// Stores (or updates) a grant.
    pub fn grant(&self, detail: serde_json::Value, id: u64) -> Result<(), SessionError> {
        self.send(Write::Grant { id, detail }, AgentShare::NONE)
    }

    /// Ends every session still open, as interrupted by the daemon stopping: their relays end
    /// with the process, before they could write their ends.
    pub fn end_open_sessions(&self) -> Result<(), SessionError> {
        self.send(
            Write::EndOpen {
                ts: now_ms(),
                error: STOPPED,
            },
            AgentShare::NONE,
        )
    }

    /// Resolves once everything sent before this call is committed (while commits fail, once
    /// the writer's retry succeeds).
    pub async fn flush(&self) -> Result<(), SessionError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Write::Flush(tx), AgentShare::NONE)?;
        rx.await
            .map_err(|_| SessionError::WriterGone)?
            .map_err(SessionError::NotCommitted)
    }

    /// Every record passes here, so a lost writer is logged here, whatever the caller does
    /// with the error.
    fn send(&self, w: Write, share: AgentShare) -> Result<(), SessionError> {
        // Counted before it is sent: the writer never counts down a record not counted up.
        self.backlog.added(share);
        self.tx.send((w, share)).map_err(|_| {
            self.backlog.written_by(share, 1);
            self.backlog.written(1);
            tracing::error!("session store writer has stopped: a record was lost");
            SessionError::WriterGone
        })
    }
}

/// The error of a session a stopping daemon ended (see [`SessionStore::end_open_sessions`]).
pub const STOPPED: &str =
    "interrupted: the daemon stopped while the session was open; its byte counts are not known";

/// The error of a session found open when the store is opened: the daemon that relayed it was
/// killed (or crashed) before it could end it.
pub const INTERRUPTED: &str =
    "interrupted: the daemon stopped before the session ended; its byte counts are not known";

/// Marks the sessions an earlier daemon left without an end as ended at `ts` (this daemon's
/// start), with [`INTERRUPTED`]: their relays are gone, and they would otherwise show as open
/// forever. (Statements are written once, with their outcome: none is left open.) A store that
/// cannot be written now is logged; its commits will fail and be retried like any other.
fn end_interrupted(conn: &Connection, ts: i64) {
    match conn.execute(
        "UPDATE sessions SET ended_ms = ?1, error = COALESCE(error, ?2) WHERE ended_ms IS NULL",
        params![ts, INTERRUPTED],
    ) {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            sessions = n,
            "session store: sessions an earlier daemon left open are marked ended, as interrupted"
        ),
        Err(e) => {
            tracing::error!(error = %e, "session store: cannot mark the sessions an earlier daemon left open as interrupted")
        }
    }
}

/// Records one batch holds at most.
const BATCH_MAX: usize = 4096;

/// A batch committed this long after its first record was picked up means the writer is not
/// keeping up (or the disk stalled): it goes back to normal priority.
const BEHIND: Duration = Duration::from_millis(50);

/// The writer's scheduling class. It runs as `SCHED_IDLE` while it keeps up, so that a commit
/// (a burst of CPU every [`LINGER`]) never holds a core that a connection thread has just woken
/// on: at normal priority the scheduler let the writer run out its slice first, and that was
/// the gate's connect latency tail (`bench tcp` sequential p99 2.4-2.8x nginx's, against
/// 1.1-1.5x with an idle writer, back to back). An idle thread gets almost nothing on a busy
/// core, so a writer that falls behind (a full batch, or a batch committed more than [`BEHIND`]
/// after it began) returns to normal priority until it finds its queue empty again.
struct WriterPriority {
    idle: bool,
    /// How to go back to normal: `SCHED_OTHER` at nice 0. `None` when this process could not
    /// return from `SCHED_IDLE` (no `CAP_SYS_NICE` and an `RLIMIT_NICE` below nice 0), or a
    /// change failed: the writer then never goes idle (again).
    normal: Option<thread_priority::ThreadPriority>,
}

impl WriterPriority {
    fn new() -> WriterPriority {
        // The crate maps 0..=99 onto nice 19..=-20: 47 is nice 0.
        let nice_0 = thread_priority::ThreadPriorityValue::try_from(47u8)
            .ok()
            .map(thread_priority::ThreadPriority::Crossplatform);
        let normal = if can_leave_idle() { nice_0 } else { None };
        if normal.is_none() {
            tracing::debug!(
                "session writer stays at normal priority: without CAP_SYS_NICE or RLIMIT_NICE >= 20 it could not leave SCHED_IDLE when behind"
            );
        }
        WriterPriority {
            idle: false,
            normal,
        }
    }

    fn set_idle(&mut self, idle: bool) {
        use thread_priority::ThreadPriority;
        use thread_priority::unix::{
            NormalThreadSchedulePolicy, ThreadSchedulePolicy, set_thread_priority_and_policy,
            thread_native_id,
        };
        let Some(normal) = self.normal else {
            return;
        };
        if self.idle == idle {
            return;
        }
        let (policy, priority) = if idle {
            (NormalThreadSchedulePolicy::Idle, ThreadPriority::Min)
        } else {
            (NormalThreadSchedulePolicy::Other, normal)
        };
        match set_thread_priority_and_policy(
            thread_native_id(),
            priority,
            ThreadSchedulePolicy::Normal(policy),
        ) {
            Ok(()) => {
                self.idle = idle;
                if !idle {
                    tracing::debug!("session writer is behind: back to normal priority");
                }
            }
            Err(e) if self.idle => {
                self.normal = None;
                tracing::error!(error = ?e, "session writer is behind and cannot leave SCHED_IDLE: records may be committed late");
            }
            Err(e) => {
                self.normal = None;
                tracing::warn!(error = ?e, "session writer cannot go to SCHED_IDLE; it stays at normal priority");
            }
        }
    }
}

/// Whether a thread of this process may go from `SCHED_IDLE` back to `SCHED_OTHER` at nice 0.
fn can_leave_idle() -> bool {
    const CAP_SYS_NICE: u32 = 23;
    let cap_sys_nice = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_NICE) != 0);
    let rlimit_nice = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NICE)
        .map(|(soft, _)| soft >= 20)
        .unwrap_or(false);
    cap_sys_nice || rlimit_nice
}

/// The writer's busy handler: a lock another process holds on the file (an operator's
/// `sqlite3`, a backup) is waited out, however long, instead of failing the batch and losing its
/// records; producers meanwhile wait for room (see `backlog`). `waited` counts earlier calls.
fn wait_for_lock(waited: i32) -> bool {
    // 1, 2, 4 .. 64 ms, then 100 ms a try.
    let ms = if waited < 7 { 1u64 << waited } else { 100 };
    if waited == 50 || (waited > 50 && waited % 600 == 0) {
        tracing::warn!(
            tries = waited,
            "session store: the database file is locked by another connection; the writer waits"
        );
    }
    std::thread::sleep(Duration::from_millis(ms));
    true
}

/// Counts a batch's records per agent, in runs (a busy agent's records come in a row).
fn note(runs: &mut Vec<(AgentShare, usize)>, share: AgentShare) {
    if share == AgentShare::NONE {
        return;
    }
    match runs.last_mut() {
        Some((last, n)) if *last == share => *n += 1,
        _ => runs.push((share, 1)),
    }
}

fn writer(
    mut conn: Connection,
    rx: mpsc::Receiver<(Write, AgentShare)>,
    backlog: &Backlog,
    mut reserve: Reserve,
) {
    if let Err(e) = conn.busy_handler(Some(wait_for_lock)) {
        tracing::error!(error = %e, "session store: no busy handler; a locked file fails batches after the busy timeout");
    }
    let mut priority = WriterPriority::new();
    let mut w = Committer::default();
    // The current batch's records per agent, counted down with it.
    let mut runs = Vec::new();
    loop {
        let (first, share) = match rx.try_recv() {
            Ok(w) => w,
            Err(mpsc::TryRecvError::Disconnected) => break,
            Err(mpsc::TryRecvError::Empty) => {
                // Caught up: producers waiting for room go on, whatever the count says.
                backlog.caught_up();
                priority.set_idle(true);
                // Waking now and then to look at the free space: other processes fill disks too.
                loop {
                    match rx.recv_timeout(health::SPACE_EVERY) {
                        Ok(w) => break w,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            w.look_at_space(&mut conn, &mut reserve, backlog)
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
            }
        };
        let began = std::time::Instant::now();
        note(&mut runs, share);
        let mut batch = vec![first];
        // Sleep out the linger instead of waking per record: records sent meanwhile queue up
        // without waking this thread, and a connection's start and end (and bursts from many
        // sessions) fold into one commit. A flush request commits at once.
        if !matches!(batch.first(), Some(Write::Flush(_))) {
            std::thread::sleep(LINGER);
        }
        while batch.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok((w, share)) => {
                    note(&mut runs, share);
                    batch.push(w);
                }
                Err(_) => break,
            }
        }
        let full = batch.len() >= BATCH_MAX;
        let records = batch.len();
        // A flush is answered once the whole batch is committed, wherever it sits in it.
        let (flushes, batch): (Vec<Write>, Vec<Write>) = batch
            .into_iter()
            .partition(|w| matches!(w, Write::Flush(_)));
        // Returns once the batch is committed, however many tries that takes: a record handed
        // to the store is never dropped.
        w.commit(&mut conn, fold(batch), backlog);
        for (share, n) in runs.drain(..) {
            backlog.written_by(share, n);
        }
        backlog.written(records);
        for w in flushes {
            if let Write::Flush(ack) = w {
                // The caller may have stopped waiting.
                let _ = ack.send(Ok(()));
            }
        }
        if reserve.due() {
            w.look_at_space(&mut conn, &mut reserve, backlog);
        }
        if full || began.elapsed() > LINGER + BEHIND {
            priority.set_idle(false);
        }
    }
}

/// What the writer keeps from batch to batch.
#[derive(Default)]
struct Committer {
    lists: JsonLists,
    shapes: Shapes,
}

impl Committer {
    /// Commits `batch`, retrying it until it commits. While it fails, the store does not take
    /// new connections and statements wait (see `backlog`); once it has committed, an event
    /// records the outage (committed the same way).
    fn commit(&mut self, conn: &mut Connection, mut batch: Vec<Write>, backlog: &Backlog) {
        loop {
            let Err(e) = self.try_commit(conn, &batch) else {
                return;
            };
            let mut outage = Outage::new(&e, backlog.queued());
            backlog.set_failing(true);
            let mut wait = outage.first_wait();
            loop {
                std::thread::sleep(wait);
                match self.try_commit(conn, &batch) {
                    Ok(()) => break,
                    Err(e) => wait = outage.again(&e, backlog.queued()),
                }
            }
            backlog.set_failing(false);
            batch = vec![Write::Event {
                ts: now_ms(),
                e: Box::new(outage.ended()),
            }];
        }
    }

    fn try_commit(&mut self, conn: &mut Connection, batch: &[Write]) -> rusqlite::Result<()> {
        // Immediate: the write lock is taken (or waited for) before anything is read, so the
        // batch never fails with SQLITE_BUSY halfway (a deferred transaction that read first
        // may not wait for it).
        let result = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .and_then(|tx| {
                {
                    // Looked up once per batch: most of a batch is statements, and finding a
                    // cached statement hashes its whole SQL text.
                    let mut insert_statement = None;
                    let mut spans = Spans::default();
                    for w in batch {
                        if let Write::Statement(row) = w {
                            spans.note(row.s.session_id, row.id);
                        }
                        apply(
                            &tx,
                            w,
                            &mut insert_statement,
                            &mut self.shapes,
                            &mut self.lists,
                        )?;
                    }
                    spans.write(&tx)?;
                }
                tx.commit()
            });
        if result.is_err() {
            self.shapes.forget();
        }
        result
    }

    /// Refuses new connections while the free space is below the reserve; records how long it
    /// was once it is not.
    fn look_at_space(&mut self, conn: &mut Connection, reserve: &mut Reserve, backlog: &Backlog) {
        match reserve.check() {
            Space::Enough => backlog.set_low_space(false),
            Space::Low => backlog.set_low_space(true),
            Space::Recovered(e) => {
                backlog.set_low_space(false);
                self.commit(
                    conn,
                    vec![Write::Event {
                        ts: now_ms(),
                        e: Box::new(e),
                    }],
                    backlog,
                );
            }
        }
    }
}

const INSERT_STATEMENT: &str = "INSERT INTO statement_log (id, session_id, ts_ms, shape_id, text,
    duration_us, rows, command_tag, error, result_rows, masked)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";

/// Buffers for the JSON lists of a statement's shape and row, reused by every row the writer
/// inserts: SQLite copies what is bound, so a row costs no allocation for them.
#[derive(Default)]
struct JsonLists {
    tables: Vec<u8>,
    functions: Vec<u8>,
    columns: Vec<u8>,
    rows: Vec<u8>,
}

/// `items` as JSON text, written into `buf`. Lists of strings always serialize; should one ever
/// not, the row is still written (with `[]`, and an error logged) rather than failing the batch
/// and every record in it.
fn json_into<'b, T: Serialize + ?Sized>(buf: &'b mut Vec<u8>, items: &T) -> &'b str {
    buf.clear();
    if let Err(e) = serde_json::to_writer(&mut *buf, items) {
        tracing::error!(error = %e, "session store: a statement's list column could not be serialized; recorded as []");
        return "[]";
    }
    // serde_json writes UTF-8.
    std::str::from_utf8(buf).unwrap_or("[]")
}

/// A list serialized as the JSON array of its items' `Display` forms (`crm.customers (read)`).
struct Displayed<'a, T>(&'a [T]);

impl<T: std::fmt::Display> Serialize for Displayed<'_, T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Shown<'a, T>(&'a T);
        impl<T: std::fmt::Display> Serialize for Shown<'_, T> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self.0)
            }
        }
        serializer.collect_seq(self.0.iter().map(Shown))
    }
}

fn apply<'tx>(
    tx: &'tx rusqlite::Transaction<'_>,
    w: &Write,
    insert_statement: &mut Option<rusqlite::CachedStatement<'tx>>,
    shapes: &mut Shapes,
    lists: &mut JsonLists,
) -> rusqlite::Result<()> {
    match w {
        Write::Identify {
            id,
            exe,
            cmdline,
            cgroup,
        } => {
            tx.prepare_cached(
                "UPDATE sessions SET exe = COALESCE(?2, exe), cmdline = COALESCE(?3, cmdline),
                 cgroup = COALESCE(?4, cgroup) WHERE id = ?1",
            )?
            .execute(params![id, exe, cmdline, cgroup])?;
        }
        Write::Statement(row) => {
            let StatementWrite { id, ts, s, e } = &**row;
            let session_id = s.session_id;
            // Copied, not moved: a batch whose commit fails is tried again.
            let (shape, text) = shapes::split(s, &e.columns);
            let shape_id = shapes.id(tx, shape, lists)?;
            let insert = match insert_statement {
                Some(insert) => insert,
                None => insert_statement.insert(tx.prepare_cached(INSERT_STATEMENT)?),
            };
            let result_rows = json_into(&mut lists.rows, &e.result_rows);
            insert.execute(params![
                id,
                session_id,
                ts,
                shape_id,
                text.as_deref(),
                i64::try_from(e.duration_us).unwrap_or(i64::MAX),
                e.rows.map(|r| i64::try_from(r).unwrap_or(i64::MAX)),
                e.command_tag,
                e.error,
                result_rows,
                e.masked
            ])?;
        }
        Write::Start { id, ts, s, end } => {
            let roles = serde_json::to_string(&s.roles).unwrap_or_else(|_| "[]".into());
            let (ended, up, down, error) = match end {
                Some(e) => (Some(e.ts), e.bytes_up, e.bytes_down, e.error.as_deref()),
                None => (None, 0, 0, None),
            };
            tx.prepare_cached(
                "INSERT INTO sessions (id, agent, roles, cgroup_id, cgroup, pid, exe, cmdline, uid, client,
                 original_destination, target, protocol, upstream, decision, reason, started_ms,
                 ended_ms, bytes_up, bytes_down, error)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                 ?18, ?19, ?20, ?21)",
            )?
            .execute(params![
                    id,
                    s.agent,
                    roles,
                    s.cgroup_id.map(|v| v as i64),
                    s.cgroup,
                    s.pid,
                    s.exe,
                    s.cmdline,
                    s.uid,
                    s.client.map(|a| a.to_string()).unwrap_or_default(),
                    s.original_destination.map(|a| a.to_string()),
                    s.target,
                    s.protocol,
                    s.upstream.map(|a| a.to_string()),
                    s.decision,
                    s.reason,
                    ts,
                    ended,
                    up as i64,
                    down as i64,
                    error
                ])?;
        }
        Write::End {
            id,
            ts,
            bytes_up,
            bytes_down,
            error,
        } => {
            tx.prepare_cached(
                "UPDATE sessions SET ended_ms = ?2, bytes_up = ?3, bytes_down = ?4, error = COALESCE(?5, error) WHERE id = ?1",
            )?
            .execute(params![id, ts, *bytes_up as i64, *bytes_down as i64, error])?;
        }
        Write::Event { ts, e } => {
            tx.prepare_cached(
                "INSERT INTO events (ts_ms, session_id, kind, agent, pid, uid, cgroup_id, exe, destination, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?
            .execute(params![
                    ts,
                    e.session_id,
                    e.kind,
                    e.agent,
                    e.pid,
                    e.uid,
                    e.cgroup_id.map(|v| v as i64),
                    e.exe,
                    e.destination,
                    e.detail.to_string()
                ])?;
        }
        Write::Attach { cgroup, agent, ts } => {
            tx.prepare_cached(
                "INSERT INTO attachments (cgroup, agent, attached_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(cgroup) DO UPDATE SET agent = excluded.agent, attached_ms = excluded.attached_ms",
            )?
            .execute(params![cgroup, agent, ts])?;
        }
        Write::Detach { cgroup } => {
            tx.execute("DELETE FROM attachments WHERE cgroup = ?1", params![cgroup])?;
        }
        Write::Grant { id, detail } => {
            tx.prepare_cached(
                "INSERT INTO grants (id, agent, expires_ms, detail) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET detail = excluded.detail, expires_ms = excluded.expires_ms",
            )?
            .execute(params![
                i64::try_from(*id).unwrap_or(i64::MAX),
                detail
                    .get("agent")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or_default(),
                detail
                    .get("expires_ms")
                    .and_then(serde_json::Value::as_i64)
                    .unwrap_or_default(),
                detail.to_string()
            ])?;
        }
        Write::EndOpen { ts, error } => {
            tx.execute(
                "UPDATE sessions SET ended_ms = ?1, error = COALESCE(error, ?2) WHERE ended_ms IS NULL",
                params![ts, error],
            )?;
        }
        // Taken out of the batch and answered by the writer once the batch is committed.
        Write::Flush(_) => {}
    }
    Ok(())
}

/// A stored session, as `sessions list/show` print it.
#[derive(Debug, Clone, Serialize)]
pub struct SessionRow {
    pub id: i64,
    pub agent: Option<String>,
    pub roles: Vec<String>,
    pub cgroup_id: Option<i64>,
    pub cgroup: Option<String>,
    pub pid: Option<i64>,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    pub uid: Option<i64>,
    pub client: String,
    pub original_destination: Option<String>,
    pub target: Option<String>,
    pub protocol: Option<String>,
    pub upstream: Option<String>,
    pub decision: String,
    pub reason: Option<String>,
    pub started: String,
    pub ended: Option<String>,
    #[serde(skip)]
    pub started_ms: i64,
    #[serde(skip)]
    pub ended_ms: Option<i64>,
    pub bytes_up: i64,
    pub bytes_down: i64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EventRow {
    pub id: i64,
    pub ts: String,
    #[serde(skip)]
    pub ts_ms: i64,
    pub session_id: Option<i64>,
    pub kind: String,
    pub agent: Option<String>,
    pub pid: Option<i64>,
    pub uid: Option<i64>,
    pub cgroup_id: Option<i64>,
    pub exe: Option<String>,
    pub destination: Option<String>,
    pub detail: serde_json::Value,
}

/// A recorded statement, as `sessions show` and `replay` print it.
#[derive(Debug, Clone, Serialize)]
pub struct StatementRow {
    pub id: i64,
    pub ts: String,
    #[serde(skip)]
    pub ts_ms: i64,
    pub protocol: String,
    pub text: String,
    pub kind: Option<String>,
    pub tables: serde_json::Value,
    pub functions: serde_json::Value,
    pub decision: String,
    pub enforced: bool,
    pub policy: Option<String>,
    pub rule: Option<String>,
    pub message: Option<String>,
    pub duration_us: Option<i64>,
    pub rows: Option<i64>,
    pub command_tag: Option<String>,
    pub error: Option<String>,
    pub columns: serde_json::Value,
    pub result_rows: serde_json::Value,
    pub masked: bool,
}

/// Read-only access for the CLI and tests.
pub struct SessionReader {
    conn: Connection,
}

const SESSION_COLUMNS: &str = "id, agent, roles, cgroup_id, cgroup, pid, exe, cmdline, uid, client,
    original_destination, target, protocol, upstream, decision, reason, started_ms, ended_ms,
    bytes_up, bytes_down, error";

fn session_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRow> {
    let roles: String = r.get(2)?;
    Ok(SessionRow {
        id: r.get(0)?,
        agent: r.get(1)?,
        roles: serde_json::from_str(&roles).unwrap_or_default(),
        cgroup_id: r.get(3)?,
        cgroup: r.get(4)?,
        pid: r.get(5)?,
        exe: r.get(6)?,
        cmdline: r.get(7)?,
        uid: r.get(8)?,
        client: r.get(9)?,
        original_destination: r.get(10)?,
        target: r.get(11)?,
        protocol: r.get(12)?,
        upstream: r.get(13)?,
        decision: r.get(14)?,
        reason: r.get(15)?,
        started: format_ms(r.get(16)?),
        ended: r.get::<_, Option<i64>>(17)?.map(format_ms),
        started_ms: r.get(16)?,
        ended_ms: r.get(17)?,
        bytes_up: r.get(18)?,
        bytes_down: r.get(19)?,
        error: r.get(20)?,
    })
}

fn event_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<EventRow> {
    let detail: String = r.get(10)?;
    Ok(EventRow {
        id: r.get(0)?,
        ts: format_ms(r.get(1)?),
        ts_ms: r.get(1)?,
        session_id: r.get(2)?,
        kind: r.get(3)?,
        agent: r.get(4)?,
        pid: r.get(5)?,
        uid: r.get(6)?,
        cgroup_id: r.get(7)?,
        exe: r.get(8)?,
        destination: r.get(9)?,
        detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
    })
}

fn statement_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StatementRow> {
    let json = |i: usize| -> rusqlite::Result<serde_json::Value> {
        let text: Option<String> = r.get(i)?;
        Ok(text
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null))
    };
    Ok(StatementRow {
        id: r.get(0)?,
        ts: format_ms(r.get(1)?),
        ts_ms: r.get(1)?,
        protocol: r.get(2)?,
        text: r.get(3)?,
        kind: r.get(4)?,
        tables: json(5)?,
        functions: json(6)?,
        decision: r.get(7)?,
        enforced: r.get(8)?,
        policy: r.get(9)?,
        rule: r.get(10)?,
        message: r.get(11)?,
        duration_us: r.get(12)?,
        rows: r.get(13)?,
        command_tag: r.get(14)?,
        error: r.get(15)?,
        columns: json(16)?,
        result_rows: json(17)?,
        masked: r.get(18)?,
    })
}

impl SessionReader {
    pub fn open(path: &Path) -> Result<SessionReader, SessionError> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(
            |source| SessionError::Open {
                path: path.into(),
                source,
            },
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(SessionReader { conn })
    }

    /// Most recent first.
    pub fn list(&self, limit: usize) -> Result<Vec<SessionRow>, SessionError> {
        let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions ORDER BY id DESC LIMIT ?1");
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map(params![limit as i64], session_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn get(&self, id: i64) -> Result<SessionRow, SessionError> {
        let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?1");
        self.conn
            .query_row(&sql, params![id], session_row)
            .optional()?
            .ok_or(SessionError::NotFound(id))
    }

    pub fn events_of(&self, session_id: i64) -> Result<Vec<EventRow>, SessionError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, ts_ms, session_id, kind, agent, pid, uid, cgroup_id, exe, destination, detail
             FROM events WHERE session_id = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![session_id], event_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Most recent first.
    pub fn events(&self, limit: usize) -> Result<Vec<EventRow>, SessionError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, ts_ms, session_id, kind, agent, pid, uid, cgroup_id, exe, destination, detail
             FROM events ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit as i64], event_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// In id order, read span by span (see `statement_spans`); a store no daemon has opened since
    /// spans came is read through its old index.
    pub fn statements_of(&self, session_id: i64) -> Result<Vec<StatementRow>, SessionError> {
        // The split records, and the whole rows of a store written before shapes came (the only
        // ones in such a store no daemon has opened since).
        const SPLIT: &str =
            "SELECT l.id, l.ts_ms, s.protocol, COALESCE(l.text, s.text, ''), s.kind,
             s.tables, s.functions, s.decision, s.enforced, s.policy, s.rule, s.message,
             l.duration_us, l.rows, l.command_tag, l.error, s.columns, l.result_rows, l.masked,
             l.session_id FROM statement_log l JOIN statement_shapes s ON s.id = l.shape_id";
        const LEGACY: &str = "SELECT id, ts_ms, protocol, text, kind, tables, functions, decision,
             enforced, policy, rule, message, duration_us, rows, command_tag, error, columns,
             result_rows, masked, session_id FROM statements";
        let from = match (
            has_table(&self.conn, "statement_log")?,
            has_table(&self.conn, "statements")?,
        ) {
            (true, true) => format!("{SPLIT} UNION ALL {LEGACY}"),
            (true, false) => SPLIT.to_string(),
            (false, true) => LEGACY.to_string(),
            (false, false) => return Ok(Vec::new()),
        };
        let spans = if has_statement_index(&self.conn)? {
            vec![(i64::MIN, i64::MAX)]
        } else {
            let mut stmt = self
                .conn
                .prepare("SELECT first_id, last_id FROM statement_spans WHERE session_id = ?1")?;
            let spans = stmt.query_map(params![session_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
            merge_spans(spans.collect::<Result<_, _>>()?)
        };
        let mut stmt = self.conn.prepare(&format!(
            "SELECT * FROM ({from}) WHERE session_id = ?1 AND id BETWEEN ?2 AND ?3 ORDER BY id"
        ))?;
        let mut out = Vec::new();
        for (first, last) in spans {
            let rows = stmt.query_map(params![session_id, first, last], statement_row)?;
            for row in rows {
                out.push(row?);
            }
        }
        Ok(out)
    }

    /// Grant events of an agent between two times (a session's grants, for `sessions show`).
    pub fn grant_events(
        &self,
        agent: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<EventRow>, SessionError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, ts_ms, session_id, kind, agent, pid, uid, cgroup_id, exe, destination, detail
             FROM events WHERE agent = ?1 AND kind LIKE 'grant\\_%' ESCAPE '\\'
             AND ts_ms >= ?2 AND ts_ms <= ?3 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![agent, from_ms, to_ms], event_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every stored grant, as stored (JSON).
    pub fn grants(&self) -> Result<Vec<serde_json::Value>, SessionError> {
        let mut stmt = self.conn.prepare("SELECT detail FROM grants ORDER BY id")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for r in rows {
            if let Ok(v) = serde_json::from_str(&r?) {
                out.push(v);
            }
        }
        Ok(out)
    }

    /// The highest ticket id recorded so far.
    pub fn last_ticket_id(&self) -> Result<u64, SessionError> {
        let id: i64 = self.conn.query_row(
            "SELECT COALESCE(MAX(CAST(json_extract(detail, '$.id') AS INTEGER)), 0) FROM events
             WHERE kind = 'ticket_created'",
            [],
            |r| r.get(0),
        )?;
        Ok(u64::try_from(id).unwrap_or(0))
    }

    pub fn attachments(&self) -> Result<Vec<(String, String)>, SessionError> {
        let mut stmt = self
            .conn
            .prepare("SELECT cgroup, agent FROM attachments ORDER BY cgroup")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn start(id: i64) -> Write {
        Write::Start {
            id,
            ts: 1,
            s: Box::new(SessionStart {
                exe: Some("/at/start".into()),
                decision: "allow",
                ..Default::default()
            }),
            end: None,
        }
    }

    fn end(id: i64) -> Write {
        Write::End {
            id,
            ts: 9,
            bytes_up: 3,
            bytes_down: 4,
            error: Some("reset".into()),
        }
    }

    fn identify(id: i64, exe: Option<&str>) -> Write {
        Write::Identify {
            id,
            exe: exe.map(Into::into),
            cmdline: Some(format!("cmd {id}")),
            cgroup: None,
        }
    }

    #[test]
    fn a_session_started_and_ended_in_one_batch_is_one_row() {
        let folded = fold(vec![
            identify(1, Some("/earlier")),
            start(2),
            end(1),
            identify(2, Some("/usr/bin/psql")),
            start(3),
            identify(3, None),
            end(2),
        ]);
        // Session 1 started in an earlier batch: its writes stay updates, in order.
        assert!(matches!(
            folded.first(),
            Some(Write::Identify { id: 1, .. })
        ));
        assert!(matches!(folded.get(2), Some(Write::End { id: 1, .. })));
        assert_eq!(folded.len(), 4, "two starts and session 1's two updates");
        let Some(Write::Start {
            id: 2,
            s,
            end: Some(e),
            ..
        }) = folded.get(1)
        else {
            panic!("session 2 is one start row carrying its end");
        };
        assert_eq!(s.exe.as_deref(), Some("/usr/bin/psql"));
        assert_eq!(s.cmdline.as_deref(), Some("cmd 2"));
        assert_eq!((e.ts, e.bytes_up, e.bytes_down), (9, 3, 4));
        assert_eq!(e.error.as_deref(), Some("reset"));
        let Some(Write::Start {
            id: 3,
            s,
            end: None,
            ..
        }) = folded.get(3)
        else {
            panic!("session 3 has not ended");
        };
        // A fact that could not be read keeps the one known at the start.
        assert_eq!(s.exe.as_deref(), Some("/at/start"));
        assert_eq!(s.cmdline.as_deref(), Some("cmd 3"));
    }

    fn statement_text(session: i64, n: usize) -> StatementStart {
        StatementStart {
            session_id: session,
            protocol: "simple",
            text: format!("SELECT {n} -- session {session}").into(),
            decision: "allow",
            ..Default::default()
        }
    }

    fn texts(rows: &[StatementRow]) -> Vec<String> {
        rows.iter().map(|r| r.text.clone()).collect()
    }

    /// An empty directory for a test's store (named after the test) and the store's path in it.
    fn fresh_dir(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("agentgate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("s.db");
        (dir, path)
    }

    /// A new store in [`fresh_dir`].
    fn fresh_store(name: &str) -> (std::path::PathBuf, std::path::PathBuf, SessionStore) {
        let (dir, path) = fresh_dir(name);
        let store = SessionStore::open(&path).unwrap();
        (dir, path, store)
    }

    #[tokio::test]
    async fn list_columns_are_written_whole_for_every_statement_of_a_batch() {
        let (dir, path, store) = fresh_store("lists");
        let table = |schema: Option<&str>, name: &str, access| TableRef {
            schema: schema.map(String::from),
            name: name.into(),
            access,
        };
        // A long statement, then a short one, in one batch: each row's lists are its own,
        // with nothing left over from the longer one before it (the writer reuses its buffers).
        let long = store.statement(
            AgentShare::NONE,
            StatementStart {
                tables: vec![
                    table(Some("crm"), "customers", crate::policy::Access::Read),
                    table(None, "audit \"log\"", crate::policy::Access::Write),
                ]
                .into(),
                functions: vec!["lower".to_string(), "now".to_string()].into(),
                ..statement_text(7, 0)
            },
        );
        store
            .statement_end(
                long,
                StatementEnd {
                    columns: vec!["email".into(), "id".into()],
                    result_rows: vec![
                        vec![Some("a@example.com".into()), Some("1".into())],
                        vec![None, Some("2".into())],
                    ],
                    ..StatementEnd::default()
                },
            )
            .unwrap();
        let short = store.statement(
            AgentShare::NONE,
            StatementStart {
                tables: vec![table(None, "t", crate::policy::Access::Read)].into(),
                ..statement_text(7, 1)
            },
        );
        store.statement_end(short, StatementEnd::default()).unwrap();
        store.flush().await.unwrap();

        let rows = SessionReader::open(&path)
            .unwrap()
            .statements_of(7)
            .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[0].tables,
            serde_json::json!(["crm.customers (read)", "audit \"log\" (write)"])
        );
        assert_eq!(rows[0].functions, serde_json::json!(["lower", "now"]));
        assert_eq!(rows[0].columns, serde_json::json!(["email", "id"]));
        assert_eq!(
            rows[0].result_rows,
            serde_json::json!([["a@example.com", "1"], [null, "2"]])
        );
        assert_eq!(rows[1].tables, serde_json::json!(["t (read)"]));
        assert_eq!(rows[1].functions, serde_json::json!([]));
        assert_eq!(rows[1].columns, serde_json::json!([]));
        assert_eq!(rows[1].result_rows, serde_json::json!([]));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn executions_of_one_statement_share_one_shape_and_read_back_whole() {
        let (dir, path, store) = fresh_store("shapes");
        let prepared = |decision: &'static str| StatementStart {
            session_id: 9,
            protocol: "extended",
            text: "SELECT email FROM crm.customers WHERE id = $1".into(),
            kind: Some("select"),
            decision,
            policy: Some("analysts".into()),
            rule: Some("reads".into()),
            ..Default::default()
        };
        let ended = |n: u64| StatementEnd {
            duration_us: n,
            rows: Some(1),
            command_tag: Some("SELECT 1".into()),
            columns: vec!["email".into()],
            result_rows: vec![vec![Some(format!("user{n}@example.com"))]],
            ..StatementEnd::default()
        };
        // Three executions under one judgement, one under another, and two simple queries whose
        // texts differ only in a literal: three shapes.
        for (decision, n) in [("allow", 1), ("allow", 2), ("deny", 3), ("allow", 4)] {
            let st = store.statement(AgentShare::NONE, prepared(decision));
            store.statement_end(st, ended(n)).unwrap();
        }
        for n in [5, 6] {
            let st = store.statement(AgentShare::NONE, statement_text(9, n));
            store.statement_end(st, ended(n as u64)).unwrap();
        }
        store.flush().await.unwrap();

        let reader = SessionReader::open(&path).unwrap();
        let count = |table: &str| -> i64 {
            reader
                .conn
                .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(count("statement_shapes"), 3);
        assert!(
            !has_table(&reader.conn, "statements").unwrap(),
            "a new store has no old table"
        );
        assert_eq!(count("statement_log"), 6);
        let rows = reader.statements_of(9).unwrap();
        assert_eq!(
            rows.iter().map(|r| r.decision.as_str()).collect::<Vec<_>>(),
            ["allow", "allow", "deny", "allow", "allow", "allow"]
        );
        assert_eq!(
            texts(&rows[..4]),
            vec!["SELECT email FROM crm.customers WHERE id = $1"; 4]
        );
        assert_eq!(
            texts(&rows[4..]),
            ["SELECT 5 -- session 9", "SELECT 6 -- session 9"]
        );
        for (row, n) in rows.iter().zip(1..) {
            assert_eq!(row.duration_us, Some(n));
            assert_eq!(row.columns, serde_json::json!(["email"]));
            assert_eq!(
                row.result_rows,
                serde_json::json!([[format!("user{n}@example.com")]])
            );
        }
        assert_eq!(rows[0].policy.as_deref(), Some("analysts"));
        assert_eq!(rows[4].policy, None);

        // A span is read through both tables' primary keys, not by scanning either.
        let plan: Vec<String> = reader
            .conn
            .prepare(
                "EXPLAIN QUERY PLAN SELECT l.id FROM statement_log l JOIN statement_shapes s
                 ON s.id = l.shape_id WHERE l.session_id = 9 AND l.id BETWEEN 1 AND 3",
            )
            .unwrap()
            .query_map([], |r| r.get::<_, String>(3))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(
            plan.iter().all(|step| step.contains("INTEGER PRIMARY KEY")),
            "{plan:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_store_and_the_files_sqlite_adds_are_private_to_the_daemons_user() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let files = |path: &Path| {
            ["", "-wal", "-shm"].map(|suffix| {
                let mut name = path.as_os_str().to_owned();
                name.push(suffix);
                std::path::PathBuf::from(name)
            })
        };
        // A new store.
        let (dir, path) = fresh_dir("private-new");
        let store = SessionStore::open(&path).unwrap();
        store.flush().await.unwrap();
        assert_eq!(mode(&dir), 0o700);
        for f in files(&path) {
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);

        // One an earlier version left readable by everyone, with the companions SQLite made
        // from its mode.
        let (dir, path) = fresh_dir("private-old");
        std::fs::create_dir_all(&dir).unwrap();
        let conn = open_rw(&path).unwrap();
        for f in files(&path) {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let store = SessionStore::open(&path).unwrap();
        store.flush().await.unwrap();
        for f in files(&path) {
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
        drop((conn, store));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_flush_is_answered_once_a_later_record_of_its_batch_that_failed_commits() {
        let (dir, path) = fresh_dir("flush-rollback");
        std::fs::create_dir_all(&dir).unwrap();
        let conn = open_rw(&path).unwrap();
        // Statement id 2 is taken: the record sent after the flush fails, and rolls back the
        // batch with the one sent before it; the batch is kept and tried again.
        let other = open_rw(&path).unwrap();
        other
            .execute(
                "INSERT INTO statement_log (id, session_id, ts_ms, shape_id) VALUES (2, 99, 0, 99)",
                [],
            )
            .unwrap();
        let record = |id: i64| {
            Write::Statement(Box::new(StatementWrite {
                id,
                ts: 0,
                s: statement_text(5, id as usize),
                e: StatementEnd::default(),
            }))
        };
        // Queued before the writer starts: one batch, the flush in the middle.
        let (tx, rx) = mpsc::channel();
        let (ack, mut answer) = tokio::sync::oneshot::channel();
        tx.send((record(1), AgentShare::NONE)).unwrap();
        tx.send((Write::Flush(ack), AgentShare::NONE)).unwrap();
        tx.send((record(2), AgentShare::NONE)).unwrap();
        drop(tx);
        let backlog = Arc::new(Backlog::new(StoreLimits::default(), &[]));
        (0..3).for_each(|_| backlog.added(AgentShare::NONE));
        let writer = std::thread::spawn({
            let backlog = backlog.clone();
            move || writer(conn, rx, &backlog, Reserve::new(".".into(), Some(0)))
        });
        until("the batch fails", || backlog.not_recording().is_some()).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut answer)
                .await
                .is_err(),
            "answered while its batch is not committed"
        );
        other
            .execute("DELETE FROM statement_log WHERE id = 2", [])
            .unwrap();
        answer.await.unwrap().unwrap();
        writer.join().unwrap();
        assert_eq!(backlog.queued(), 0);
        let reader = SessionReader::open(&path).unwrap();
        assert_eq!(reader.statements_of(5).unwrap().len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_writer_that_finds_its_channel_empty_releases_waiting_producers() {
        let (dir, path) = fresh_dir("caught-up");
        std::fs::create_dir_all(&dir).unwrap();
        let conn = open_rw(&path).unwrap();
        // Counted and not sent: to the writer, records other threads are sending right now. The
        // count stays above the low mark, and only an empty channel says the writer is idle.
        let backlog = Arc::new(Backlog::new(
            StoreLimits {
                max_queued: 10,
                ..StoreLimits::default()
            },
            &[],
        ));
        (0..10).for_each(|_| backlog.added(AgentShare::NONE));
        let waiting = tokio::spawn({
            let backlog = backlog.clone();
            async move { backlog.room(AgentShare::NONE).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished() && backlog.backpressure());
        // Four written: six remain, not below the low mark (5).
        backlog.written(4);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished() && backlog.backpressure());
        let (tx, rx) = mpsc::channel::<(Write, AgentShare)>();
        let writer = std::thread::spawn({
            let backlog = backlog.clone();
            move || writer(conn, rx, &backlog, Reserve::new(".".into(), Some(0)))
        });
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(!backlog.backpressure());
        drop(tx);
        writer.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_shape_rolled_back_with_a_failed_batch_is_written_again() {
        let (dir, path, store) = fresh_store("shapes-rollback");
        let prepared = || StatementStart {
            session_id: 4,
            protocol: "extended",
            text: "SELECT 1".into(),
            decision: "allow",
            ..Default::default()
        };
        // Another writer took the id the store hands out next: the batch holding the first
        // statement (and the shape it inserted) fails and is rolled back, and retried.
        let other = Connection::open(&path).unwrap();
        other
            .execute(
                "INSERT INTO statement_log (id, session_id, ts_ms, shape_id) VALUES (1, 99, 0, 99)",
                [],
            )
            .unwrap();
        let first = store.statement(AgentShare::NONE, prepared());
        assert_eq!(first.id, 1);
        store.statement_end(first, StatementEnd::default()).unwrap();
        until("the batch fails", || store.not_recording().is_some()).await;
        other
            .execute("DELETE FROM statement_log WHERE id = 1", [])
            .unwrap();
        store.flush().await.unwrap();
        // The same shape again: its row must name a shape that exists.
        let second = store.statement(AgentShare::NONE, prepared());
        store
            .statement_end(second, StatementEnd::default())
            .unwrap();
        store.flush().await.unwrap();
        let rows = SessionReader::open(&path)
            .unwrap()
            .statements_of(4)
            .unwrap();
        assert_eq!(
            rows.iter()
                .map(|r| (r.id, r.text.as_str(), r.decision.as_str()))
                .collect::<Vec<_>>(),
            [(1, "SELECT 1", "allow"), (2, "SELECT 1", "allow")]
        );
        drop((store, other));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn interleaved_sessions_read_back_whole_and_alone_through_spans() {
        let (dir, path, store) = fresh_store("spans");
        let (a, b, c) = (101, 102, 103);
        // Session a's first statement runs long: it is opened first and ends last, after more
        // than SPAN_GAP statements of session b were recorded in between.
        let long = store.statement(AgentShare::NONE, statement_text(a, 0));
        let mut expected_b = Vec::new();
        for n in 0..(SPAN_GAP as usize + 50) {
            let st = store.statement(AgentShare::NONE, statement_text(b, n));
            expected_b.push(st.s.text.to_string());
            store.statement_end(st, StatementEnd::default()).unwrap();
            if n % 1000 == 999 {
                // Several batches.
                store.flush().await.unwrap();
            }
        }
        let next = store.statement(AgentShare::NONE, statement_text(a, 1));
        store.statement_end(long, StatementEnd::default()).unwrap();
        store.statement_end(next, StatementEnd::default()).unwrap();
        let last_c = store.statement(AgentShare::NONE, statement_text(c, 0));
        store
            .statement_end(last_c, StatementEnd::default())
            .unwrap();
        store.flush().await.unwrap();

        let reader = SessionReader::open(&path).unwrap();
        let rows_a = reader.statements_of(a).unwrap();
        assert_eq!(
            texts(&rows_a),
            vec!["SELECT 0 -- session 101", "SELECT 1 -- session 101"]
        );
        assert!(rows_a.windows(2).all(|w| w[0].id < w[1].id), "id order");
        assert_eq!(texts(&reader.statements_of(b).unwrap()), expected_b);
        assert_eq!(
            texts(&reader.statements_of(c).unwrap()),
            vec!["SELECT 0 -- session 103"]
        );
        assert!(reader.statements_of(999).unwrap().is_empty());
        // Session a's two statements, written in one batch, are two spans: the jump between
        // their ids is more than SPAN_GAP, and no span makes a reader walk over it.
        let spans: Vec<(i64, i64)> = reader
            .conn
            .prepare("SELECT first_id, last_id FROM statement_spans WHERE session_id = ?1 ORDER BY first_id")
            .unwrap()
            .query_map(params![a], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(spans.len(), 2, "{spans:?}");
        assert!(spans.iter().all(|(f, l)| l - f <= SPAN_GAP), "{spans:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// (nice, policy) of a thread, from its `stat`.
    fn sched_of(stat: &str) -> (i64, u32) {
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .collect();
        // Fields after the command name start at field 3 (state); nice is 19, policy 41.
        (fields[16].parse().unwrap(), fields[38].parse().unwrap())
    }

    const SCHED_OTHER: u32 = 0;
    const SCHED_IDLE: u32 = 5;

    #[test]
    fn the_writer_priority_goes_idle_and_back_to_normal_at_nice_0() {
        let this = || sched_of(&std::fs::read_to_string("/proc/thread-self/stat").unwrap());
        std::thread::spawn(move || {
            let mut p = WriterPriority::new();
            if p.normal.is_none() {
                // Not permitted here to come back from SCHED_IDLE: never leaves normal.
                p.set_idle(true);
                assert_eq!(this(), (0, SCHED_OTHER));
                return;
            }
            p.set_idle(true);
            assert_eq!(this().1, SCHED_IDLE);
            p.set_idle(false);
            assert_eq!(this(), (0, SCHED_OTHER));
            p.set_idle(true);
            assert_eq!(this().1, SCHED_IDLE);
        })
        .join()
        .unwrap();
    }

    #[tokio::test]
    async fn an_idle_writer_still_commits_everything() {
        let (dir, path, store) = fresh_store("idle");
        let stat = format!("/proc/self/task/{}/stat", store.writer_tid().unwrap());
        let writer_sched = || sched_of(&std::fs::read_to_string(&stat).unwrap());
        let expect_idle = can_leave_idle();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while expect_idle && writer_sched().1 != SCHED_IDLE {
            assert!(std::time::Instant::now() < deadline, "{:?}", writer_sched());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // More than a batch at once: the writer falls behind, catches up, and loses nothing.
        let n = BATCH_MAX * 3;
        for i in 0..n {
            let st = store.statement(AgentShare::NONE, statement_text(7, i));
            store.statement_end(st, StatementEnd::default()).unwrap();
        }
        store.flush().await.unwrap();
        let reader = SessionReader::open(&path).unwrap();
        assert_eq!(reader.statements_of(7).unwrap().len(), n);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Another connection holds the file's write lock (`BEGIN IMMEDIATE`) for longer than the
    /// store's busy timeout (5 s): producers asking for room stop at `max_queued` instead of
    /// growing the queue, and once the lock is released every record is written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_writer_holds_producers_at_the_bound_and_loses_nothing() {
        use std::sync::atomic::AtomicUsize;
        use std::time::Instant;
        const MAX: usize = 50;
        const PRODUCERS: usize = 4;
        const EACH: usize = 100;
        let (dir, path) = fresh_dir("stall");
        let limits = StoreLimits {
            max_queued: MAX,
            ..StoreLimits::default()
        };
        let store = Arc::new(SessionStore::open_with(&path, limits, &[]).unwrap());
        let session = store
            .start(SessionStart {
                decision: "allow",
                ..Default::default()
            })
            .unwrap();
        store.flush().await.unwrap();
        let lock = Connection::open(&path).unwrap();
        lock.execute_batch("BEGIN IMMEDIATE").unwrap();
        let locked = Instant::now();
        let sent = Arc::new(AtomicUsize::new(0));
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                let (store, sent) = (store.clone(), sent.clone());
                tokio::spawn(async move {
                    for n in 0..EACH {
                        store.room(AgentShare::NONE).await.unwrap();
                        let open = store
                            .statement(AgentShare::NONE, statement_text(session, p * EACH + n));
                        store.statement_end(open, StatementEnd::default()).unwrap();
                        sent.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        // (a) The producers reach the bound and wait there for as long as the lock is held.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut held_at = None;
        while locked.elapsed() < Duration::from_secs(6) || held_at.is_none() {
            let QueueStatus {
                queued,
                backpressure: waiting,
                ..
            } = store.queue();
            assert!(
                queued <= MAX + PRODUCERS,
                "{queued} records queued past the bound of {MAX}"
            );
            let now = sent.load(Ordering::SeqCst);
            match held_at {
                None if waiting => held_at = Some(now),
                None => assert!(
                    Instant::now() < deadline,
                    "no backpressure: {queued} queued"
                ),
                Some(n) => assert_eq!(now, n, "a producer went on while the writer was stalled"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(sent.load(Ordering::SeqCst) < PRODUCERS * EACH);
        // (b) Once the lock is released, nothing was lost.
        lock.execute_batch("ROLLBACK").unwrap();
        for p in producers {
            tokio::time::timeout(Duration::from_secs(30), p)
                .await
                .unwrap()
                .unwrap();
        }
        store.flush().await.unwrap();
        assert!(!store.queue().backpressure, "backpressure ended");
        let reader = SessionReader::open(&path).unwrap();
        let mut got = texts(&reader.statements_of(session).unwrap());
        got.sort();
        let mut want: Vec<String> = (0..PRODUCERS * EACH)
            .map(|n| statement_text(session, n).text.to_string())
            .collect();
        want.sort();
        assert_eq!(got, want);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// With the writer stalled, an agent flooding the store is held at its share of the bound
    /// while another agent's statements still get room; once the lock is released every
    /// record of both is written and the per-agent counts are back to zero.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_writer_holds_the_flooding_agent_while_another_goes_on() {
        use std::sync::atomic::AtomicUsize;
        const MAX: usize = 20;
        const FLOOD: usize = 200;
        const QUIET: usize = 5;
        let (dir, path) = fresh_dir("stall-shares");
        let limits = StoreLimits {
            max_queued: MAX,
            ..StoreLimits::default()
        };
        let store = Arc::new(SessionStore::open_with(&path, limits, &["flood", "quiet"]).unwrap());
        let (flood, quiet) = (store.share("flood"), store.share("quiet"));
        let session_of = |agent: &str| {
            store
                .start(SessionStart {
                    agent: Some(agent.into()),
                    decision: "allow",
                    ..Default::default()
                })
                .unwrap()
        };
        let (flood_session, quiet_session) = (session_of("flood"), session_of("quiet"));
        store.flush().await.unwrap();
        let lock = Connection::open(&path).unwrap();
        lock.execute_batch("BEGIN IMMEDIATE").unwrap();
        let sent = Arc::new(AtomicUsize::new(0));
        let flooder = tokio::spawn({
            let (store, sent) = (store.clone(), sent.clone());
            async move {
                for n in 0..FLOOD {
                    store.room(flood).await.unwrap();
                    let open = store.statement(flood, statement_text(flood_session, n));
                    store.statement_end(open, StatementEnd::default()).unwrap();
                    sent.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        // The flooder reaches the bound, all of it its own share, and is held there.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !(store.queue().backpressure && sent.load(Ordering::SeqCst) == MAX) {
            assert!(std::time::Instant::now() < deadline, "{:?}", store.queue());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The other agent's statements still get room, and its connections are taken.
        for n in 0..QUIET {
            tokio::time::timeout(Duration::from_secs(5), store.room(quiet))
                .await
                .unwrap_or_else(|_| panic!("the quiet agent waited at its statement {n}"))
                .unwrap();
            let open = store.statement(quiet, statement_text(quiet_session, n));
            store.statement_end(open, StatementEnd::default()).unwrap();
        }
        assert!(!store.overloaded(quiet));
        assert_eq!(store.queued_by(quiet), QUIET);
        let q = store.queue();
        assert_eq!(q.busiest, Some(("flood".to_string(), MAX)), "{q:?}");
        assert_eq!(q.agent_share, MAX / 2, "{q:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(sent.load(Ordering::SeqCst), MAX, "the flooder went on");
        lock.execute_batch("ROLLBACK").unwrap();
        tokio::time::timeout(Duration::from_secs(30), flooder)
            .await
            .unwrap()
            .unwrap();
        store.flush().await.unwrap();
        assert_eq!(store.queued_by(flood), 0);
        assert_eq!(store.queued_by(quiet), 0);
        assert_eq!(store.queue().busiest, None);
        let reader = SessionReader::open(&path).unwrap();
        for (session, n) in [(flood_session, FLOOD), (quiet_session, QUIET)] {
            let want: Vec<String> = (0..n)
                .map(|i| statement_text(session, i).text.to_string())
                .collect();
            assert_eq!(texts(&reader.statements_of(session).unwrap()), want);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn overlapping_spans_merge_so_no_statement_is_read_twice() {
        assert_eq!(
            merge_spans(vec![(10, 20), (1, 3), (15, 30), (31, 31), (2, 2)]),
            vec![(1, 3), (10, 30), (31, 31)]
        );
        assert!(merge_spans(Vec::new()).is_empty());
    }

    #[tokio::test]
    async fn a_store_with_the_old_statements_index_is_read_then_migrated() {
        let (dir, path) = fresh_dir("spans-old");
        std::fs::create_dir_all(&dir).unwrap();
        {
            // The statements table and index as stores before statement spans had them.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE statements (id INTEGER PRIMARY KEY, session_id INTEGER NOT NULL,
                 ts_ms INTEGER NOT NULL, protocol TEXT NOT NULL, text TEXT NOT NULL, kind TEXT,
                 tables TEXT NOT NULL DEFAULT '[]', functions TEXT NOT NULL DEFAULT '[]',
                 decision TEXT NOT NULL, enforced INTEGER NOT NULL DEFAULT 1, policy TEXT,
                 rule TEXT, message TEXT, duration_us INTEGER, rows INTEGER, command_tag TEXT,
                 error TEXT, columns TEXT, result_rows TEXT, masked INTEGER NOT NULL DEFAULT 0);
                 CREATE INDEX statements_session ON statements(session_id);
                 INSERT INTO statements (id, session_id, ts_ms, protocol, text, decision) VALUES
                     (1, 7, 1, 'simple', 'SELECT 1', 'allow'),
                     (2, 8, 1, 'simple', 'SELECT 2', 'allow'),
                     (3, 7, 1, 'simple', 'SELECT 3', 'allow');",
            )
            .unwrap();
        }
        // Not yet opened by a daemon: read through the old index.
        let reader = SessionReader::open(&path).unwrap();
        assert_eq!(
            texts(&reader.statements_of(7).unwrap()),
            vec!["SELECT 1", "SELECT 3"]
        );
        drop(reader);

        let store = SessionStore::open(&path).unwrap();
        let st = store.statement(AgentShare::NONE, statement_text(7, 4));
        assert_eq!(st.id, 4, "statement ids go on from the old ones");
        store.statement_end(st, StatementEnd::default()).unwrap();
        store.flush().await.unwrap();
        let reader = SessionReader::open(&path).unwrap();
        assert!(!has_statement_index(&reader.conn).unwrap(), "index dropped");
        assert_eq!(
            texts(&reader.statements_of(7).unwrap()),
            vec!["SELECT 1", "SELECT 3", "SELECT 4 -- session 7"]
        );
        assert_eq!(texts(&reader.statements_of(8).unwrap()), vec!["SELECT 2"]);
        drop(store);
        // Opening again finds nothing left to migrate.
        let conn = open_rw(&path).unwrap();
        assert!(!has_statement_index(&conn).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_last_ticket_id_is_found_through_the_kind_index() {
        let (dir, path, store) = fresh_store("ticket-id");
        for (kind, id) in [
            ("ticket_created", 3),
            ("kernel_deny", 99),
            ("ticket_created", 7),
        ] {
            store
                .event(Event {
                    kind: kind.into(),
                    detail: serde_json::json!({ "id": id }),
                    ..Default::default()
                })
                .unwrap();
        }
        store.flush().await.unwrap();
        let reader = SessionReader::open(&path).unwrap();
        assert_eq!(reader.last_ticket_id().unwrap(), 7);
        let plan: String = reader
            .conn
            .query_row(
                "EXPLAIN QUERY PLAN SELECT COALESCE(MAX(CAST(json_extract(detail, '$.id') AS INTEGER)), 0)
                 FROM events WHERE kind = 'ticket_created'",
                [],
                |r| r.get(3),
            )
            .unwrap();
        assert!(plan.contains("events_kind"), "{plan}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn sessions_round_trip_and_survive_reopen() {
        let (dir, path, store) = fresh_store("session-test");
        let id = store
            .start(SessionStart {
                agent: Some("bot".into()),
                roles: vec!["analyst".into()],
                client: Some(([127, 0, 0, 1], 4000).into()),
                decision: "allow",
                ..Default::default()
            })
            .unwrap();
        store.end(AgentShare::NONE, id, 10, 20, None).unwrap();
        store
            .event(Event {
                session_id: Some(id),
                kind: "note".into(),
                detail: serde_json::json!({"k": 1}),
                ..Default::default()
            })
            .unwrap();
        store.flush().await.unwrap();

        let reader = SessionReader::open(&path).unwrap();
        let row = reader.get(id).unwrap();
        assert_eq!(row.agent.as_deref(), Some("bot"));
        assert_eq!(row.roles, vec!["analyst".to_string()]);
        assert_eq!((row.bytes_up, row.bytes_down), (10, 20));
        assert!(row.ended.is_some());
        assert_eq!(reader.events_of(id).unwrap()[0].detail["k"], 1);
        drop(store);

        // A second daemon continues the id sequence instead of reusing ids.
        let store = SessionStore::open(&path).unwrap();
        let id2 = store
            .start(SessionStart {
                decision: "allow",
                ..Default::default()
            })
            .unwrap();
        assert_eq!(id2, id + 1);
        store.flush().await.unwrap();
        assert_eq!(reader.list(10).unwrap().len(), 2);
        assert!(matches!(reader.get(999), Err(SessionError::NotFound(999))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Polls `f` until it holds, for up to 10 s.
    async fn until(what: &str, f: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_batch_that_fails_to_commit_is_kept_and_retried_while_connections_are_refused() {
        let (dir, path, store) = fresh_store("failing");
        store.flush().await.unwrap();
        // Another connection makes the writer's inserts fail, as a full disk would.
        let other = Connection::open(&path).unwrap();
        other
            .execute_batch(
                "CREATE TRIGGER full BEFORE INSERT ON sessions
                 BEGIN SELECT RAISE(ABORT, 'database or disk is full (test)'); END;",
            )
            .unwrap();
        let id = store
            .start(SessionStart {
                decision: "allow",
                ..Default::default()
            })
            .unwrap();
        until("the store counts as failing", || {
            store.not_recording() == Some(NotRecording::WritesFailing)
        })
        .await;
        assert!(store.overloaded(AgentShare::NONE));
        // Statements wait; nothing is answered while the batch fails.
        let mut room = Box::pin(store.room(AgentShare::NONE));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(room.as_mut().poll(&mut cx).is_pending());
        let mut flushed = Box::pin(store.flush());
        assert!(
            tokio::time::timeout(Duration::from_millis(300), flushed.as_mut())
                .await
                .is_err()
        );
        store.end(AgentShare::NONE, id, 5, 6, None).unwrap();
        // Space returns: the kept batch commits, with what queued meanwhile.
        other.execute_batch("DROP TRIGGER full").unwrap();
        flushed.await.unwrap();
        store.flush().await.unwrap();
        room.as_mut().await.unwrap();
        drop(room);
        assert_eq!(store.not_recording(), None);
        assert!(!store.overloaded(AgentShare::NONE));
        let reader = SessionReader::open(&path).unwrap();
        let row = reader.get(id).unwrap();
        assert_eq!((row.bytes_up, row.bytes_down), (5, 6));
        assert!(row.ended_ms.is_some());
        let events = reader.events(10).unwrap();
        let failed = events
            .iter()
            .find(|e| e.kind == "session_store_failed")
            .unwrap();
        assert!(failed.detail["failing_ms"].as_u64().unwrap() >= 300);
        assert!(
            failed.detail["error"]
                .as_str()
                .unwrap()
                .contains("disk is full")
        );
        drop((store, other));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn sessions_left_open_end_as_interrupted_at_the_next_open_or_a_clean_stop() {
        let (dir, path, store) = fresh_store("interrupted");
        let open = |store: &SessionStore| {
            store
                .start(SessionStart {
                    decision: "allow",
                    ..Default::default()
                })
                .unwrap()
        };
        let killed = open(&store);
        let ended = open(&store);
        store.end(AgentShare::NONE, ended, 1, 2, None).unwrap();
        store.flush().await.unwrap();
        // As a daemon killed outright: its writer had committed the start, not the end.
        drop(store);
        let before = now_ms();
        let store = SessionStore::open(&path).unwrap();
        let reader = SessionReader::open(&path).unwrap();
        let row = reader.get(killed).unwrap();
        assert!(row.ended_ms.unwrap() >= before);
        assert_eq!(row.error.as_deref(), Some(INTERRUPTED));
        let row = reader.get(ended).unwrap();
        assert!(row.ended_ms.unwrap() < before);
        assert_eq!(row.error, None);
        assert_eq!((row.bytes_up, row.bytes_down), (1, 2));
        // A clean stop ends what is still open.
        let stopped = open(&store);
        store.end_open_sessions().unwrap();
        store.flush().await.unwrap();
        let row = reader.get(stopped).unwrap();
        assert!(row.ended_ms.is_some());
        assert_eq!(row.error.as_deref(), Some(STOPPED));
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
