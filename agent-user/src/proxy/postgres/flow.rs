//! The two directions of an established PostgreSQL session.
//!
//! Agent -> server: every Query and Parse is judged before anything is sent. What the server
//! receives is only what policy allowed, so a later Bind/Execute of a name can only run an
//! allowed statement. A denial becomes a 42501 ErrorResponse queued at exactly the place in the
//! response stream where the server's own error would have been, and the server is then sent a
//! tiny statement that raises an error (`DO ... RAISE`, extended protocol, then Sync): its
//! ErrorResponse is swallowed, its ReadyForQuery is passed on. That way the server's transaction
//! state is what a real error would leave (an explicit transaction is aborted, an implicit one
//! rolled back) and the ReadyForQuery the agent sees is the server's own. In the extended
//! protocol the messages after a denied Parse are dropped until Sync, as the server would.
//!
//! Server -> agent: responses are matched against a queue of what each forwarded message expects
//! (pipelining keeps them in order), DataRows are masked per the deciding rule's profiles, and
//! each statement's outcome (tag, rows, error, the first rows as the agent saw them, duration)
//! is recorded. Internal messages (the injected error, a Describe the gate adds to learn result
//! columns for masking) are answered to the gate and never reach the agent.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::super::{Gate, Peer};
use super::catalog;
use super::upstream::{Upstream, read_backend, read_frontend};
use super::{PgError, PgTarget, Shared};
use crate::approval::GrantedRoles;
use crate::approval::{Hold, NewTicket, Outcome, Requester, RuleUse};
use crate::mask::{
    COMPUTED_FROM_MASKED, ColumnMeta, Format, Masker, RETURNED_FROM_MASKED, RowPlan,
};
use crate::policy::{
    CopyDirection, Decision, ExtractOptions, QualifiedColumn, QueryDecision, StatementDecision,
    StatementFacts, StatementKind, Subject, TableRef, Verdict,
};
use crate::protocol::postgres::{
    BackendDecoder, BackendMessage, ErrorFields, FieldDescription, FrontendDecoder,
    FrontendMessage, Target, TransactionStatus, format_code,
};

const SQLSTATE_INSUFFICIENT_PRIVILEGE: &str = "42501";
const SQLSTATE_QUERY_CANCELED: &str = "57014";
const SQLSTATE_PROGRAM_LIMIT_EXCEEDED: &str = "54000";
use crate::session::{OpenStatement, StatementEnd, StatementStart};

/// Raises the error that puts the server's transaction where a real failure would.
const DENY_SQL: &str = "DO $agentgate$BEGIN RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = 'agentgate: statement denied'; END$agentgate$";

pub struct Context<'a> {
    pub gate: &'a Gate,
    pub shared: &'a Shared,
    pub peer: &'a Peer,
    pub target: &'a PgTarget,
    pub session_id: i64,
    pub database: String,
    pub standard_strings: bool,
}

/// A statement being recorded.
struct Rec {
    open: Option<OpenStatement>,
    started: Instant,
    masks: Arc<[String]>,
    rows: u64,
    kept: Vec<Vec<Option<String>>>,
    columns: Vec<String>,
    masked: bool,
    error: Option<String>,
}

impl Rec {
    fn new(open: Option<OpenStatement>, masks: Arc<[String]>) -> Rec {
        Rec {
            open,
            started: Instant::now(),
            masks,
            rows: 0,
            kept: Vec::new(),
            columns: Vec::new(),
            masked: false,
            error: None,
        }
    }
}

struct QueryRun {
    recs: Vec<Rec>,
    idx: usize,
    plan: Option<Arc<RowPlan>>,
}

struct ExecRun {
    rec: Rec,
    /// The portal as bound when the Execute was sent (a pipelined re-Bind must not change it).
    portal: Option<Arc<Portal>>,
    plan: Option<Option<Arc<RowPlan>>>,
}

/// Whose columns a Describe answers.
enum Described {
    Statement,
    Portal(Option<Arc<Portal>>),
}

enum Expect {
    Query(QueryRun),
    /// The gate's view of `name` was updated when the Parse was sent; `previous` restores it if
    /// the server refuses or skips the Parse.
    Parse {
        injected: bool,
        name: String,
        previous: Option<Arc<Prepared>>,
    },
    Bind {
        injected: bool,
        name: String,
        previous: Option<Arc<Portal>>,
    },
    Describe {
        what: Described,
        internal: bool,
    },
    Execute(Box<ExecRun>),
    InjectedExecute,
    Close,
    /// `ignored_in_copy`: sent between a COPY and its end (libpq sends Execute, Sync, then the
    /// data). A server in COPY ignores Sync, so this one gets no ReadyForQuery if the COPY does
    /// start: it is dropped when CopyInResponse arrives.
    Sync {
        ignored_in_copy: bool,
    },
    /// A response the gate produces itself, released when it reaches the head of the queue.
    Synthetic(Bytes),
}

struct Prepared {
    text: Arc<str>,
    decision: Decision,
    /// Role grants the decision relied on: once one ends, each Execute is judged again.
    role_grants: Vec<u64>,
    /// Masking plans built for this statement's result, by mask profiles and result formats
    /// (its columns are fixed: a repeated Execute need not resolve and plan them again).
    plans: Mutex<Vec<CachedPlan>>,
    kind: Option<&'static str>,
    tables: Arc<[TableRef]>,
    functions: Arc<[String]>,
    /// It prepares, deallocates or discards statements at the SQL level, or declares or closes
    /// cursors: the gate forgets its names when an Execute of it is sent (when the server
    /// acts), not at Parse.
    changes_prepared: bool,
    changes_portals: bool,
    /// What it does to SQL-level cursors (see [`State::cursor_grants`]).
    cursors: CursorUse,
    /// Its bytes in the connection's [`Budget`], given back when the last reference goes.
    charge: Charge,
    /// The qualified references the catalog confirmed as columns at Parse, for judging it
    /// again.
    verified: Arc<Verified>,
}

/// A masking plan for (mask profiles, result formats) of one prepared statement.
/// Each plan keeps when it was built: the names it resolved are trusted as long as the
/// catalog's (see [`catalog::TTL`]), so a rename outside the gate reaches the plans too.
type CachedPlan = (
    Arc<[String]>,
    Vec<i16>,
    Vec<FieldDescription>,
    Option<Arc<RowPlan>>,
    Instant,
);

/// A masking plan kept for a simple query's result: by mask profiles and RowDescription bytes.
type QueryPlan = (Arc<[String]>, Bytes, Option<Arc<RowPlan>>, Instant);

/// A cached plan is used while its resolved names are.
fn fresh(built: Instant) -> bool {
    built.elapsed() < catalog::TTL
}

/// Plans kept per prepared statement (a statement sees few format combinations).
const PLANS_PER_STATEMENT: usize = 4;
/// Masking plans a connection keeps for the result columns of simple queries.
const QUERY_PLANS: usize = 16;

/// Adds `item` to a small cache of at most `cap` entries, dropping the oldest.
fn remember<T>(list: &mut Vec<T>, cap: usize, item: T) {
    if list.len() >= cap {
        list.remove(0);
    }
    list.push(item);
}

struct Portal {
    prepared: Option<Arc<Prepared>>,
    formats: Vec<i16>,
    /// Bound parameters, kept only for statements under review (an approver sees them).
    params: Vec<Option<Bytes>>,
    param_formats: Vec<i16>,
    /// Its result columns, from a Describe of the portal: the agent's own, or the one the gate
    /// sends before the first Execute of a masked statement (see [`send_execute`]).
    columns: Mutex<Option<Vec<FieldDescription>>>,
    /// A Describe of it was sent after its Bind.
    described: AtomicBool,
    charge: Charge,
}

/// The bytes one connection makes the gate keep for its prepared statements and portals. Every
/// name could otherwise hold a frame's worth (`max_frame_bytes`) for as long as the agent
/// likes, [`MAX_NAMES`] of each: gigabytes of the daemon's memory, shared by every agent.
#[derive(Default)]
struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    fn new(limit: usize) -> Budget {
        Budget {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    /// `bytes` more fit once the entry they replace (of `replaced` bytes) is gone. Until its
    /// last reference goes that one stays counted, so the connection may hold one entry past
    /// the limit; config keeps the limit at 4 frames or more, so one entry is at most half of it.
    fn fits(&self, bytes: usize, replaced: usize) -> bool {
        self.used
            .load(Ordering::Relaxed)
            .saturating_sub(replaced)
            .saturating_add(bytes)
            <= self.limit
    }
}

/// What one statement or portal holds of its connection's [`Budget`]. Given back on drop, when
/// the memory is: a statement closed while a portal or a queued expectation still holds it
/// is still counted.
struct Charge {
    budget: Arc<Budget>,
    bytes: AtomicUsize,
}

impl Charge {
    fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    fn new(budget: &Arc<Budget>, bytes: usize) -> Charge {
        budget.used.fetch_add(bytes, Ordering::Relaxed);
        Charge {
            budget: budget.clone(),
            bytes: AtomicUsize::new(bytes),
        }
    }

    /// Result columns learnt later replace those known before.
    fn replace(&self, old: usize, new: usize) {
        self.bytes.fetch_add(new, Ordering::Relaxed);
        self.bytes.fetch_sub(old, Ordering::Relaxed);
        self.budget.used.fetch_add(new, Ordering::Relaxed);
        self.budget.used.fetch_sub(old, Ordering::Relaxed);
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget
            .used
            .fetch_sub(*self.bytes.get_mut(), Ordering::Relaxed);
    }
}

/// The bytes a Bind of `portal` lets go of: the portal it replaces, and a statement nothing
/// else keeps, which goes with that portal or is kept only to be restored should the server
/// refuse the Parse just sent that replaced it (libpq sends Parse, Bind, Execute, Sync at once).
fn replaced_by_bind(st: &State, portal: &str) -> usize {
    let old = st.portals.get(portal);
    let held = old.and_then(|p| p.prepared.as_ref());
    let in_old = |s: &Arc<Prepared>| held.is_some_and(|h| Arc::ptr_eq(h, s));
    // The Parse is last in the queue, or before the Describe the gate adds to learn columns.
    let parsed = st.queue.iter().rev().take(2).find_map(|e| match e {
        Expect::Parse { previous, .. } => Some(previous.as_ref()),
        _ => None,
    });
    let orphan = match (held, parsed.flatten()) {
        (Some(s), _) if Arc::strong_count(s) == 1 => s.charge.bytes(),
        (_, Some(p)) if Arc::strong_count(p) == 1 + usize::from(in_old(p)) => p.charge.bytes(),
        _ => 0,
    };
    old.map_or(0, |p| p.charge.bytes()).saturating_add(orphan)
}

/// What an entry costs besides its variable parts (its structs, map slot, decision, plans'
/// bookkeeping).
const ENTRY_BYTES: usize = 512;

/// A prepared statement's cost: its name, its text, and the facts drawn from the text (table
/// and function names: at most as long again).
fn parse_cost(name: &str, query: &str) -> usize {
    ENTRY_BYTES
        .saturating_add(name.len())
        .saturating_add(query.len().saturating_mul(2))
}

/// A portal's cost: its name, result formats, and the parameters when they are kept.
fn bind_cost(
    portal: &str,
    result_formats: &[i16],
    params: &[Option<Bytes>],
    param_formats: &[i16],
    keeps_params: bool,
) -> usize {
    let kept = if keeps_params {
        params
            .iter()
            .map(|p| p.as_ref().map_or(0, Bytes::len) + std::mem::size_of::<Option<Bytes>>())
            .sum::<usize>()
            .saturating_add(param_formats.len().saturating_mul(2))
    } else {
        0
    };
    ENTRY_BYTES
        .saturating_add(portal.len())
        .saturating_add(result_formats.len().saturating_mul(2))
        .saturating_add(kept)
}

/// Result columns kept for masking.
fn columns_cost(fields: &[FieldDescription]) -> usize {
    fields
        .iter()
        .map(|f| f.name.len() + std::mem::size_of::<FieldDescription>())
        .sum()
}

/// Parameters are kept only where a human may have to see them: statements under review, and
/// those a role grant let through (judged again at each Execute once the grant ends, they may
/// then be held).
fn keeps_params(prepared: Option<&Arc<Prepared>>) -> bool {
    prepared.is_some_and(|p| {
        matches!(p.decision.verdict, Verdict::Review { .. }) || !p.role_grants.is_empty()
    })
}

fn columns_of(m: &Mutex<Option<Vec<FieldDescription>>>) -> Option<Vec<FieldDescription>> {
    m.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// Keeps the result columns of a statement or portal, unless they would take the connection past
/// its budget: then nothing is kept, and the caller ends the connection (a Describe answered
/// can no longer be refused, and masking its later Executes needs the columns).
fn set_columns(
    m: &Mutex<Option<Vec<FieldDescription>>>,
    charge: &Charge,
    fields: Vec<FieldDescription>,
) -> Result<(), PgError> {
    let new = columns_cost(&fields);
    let mut kept = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let old = kept.as_deref().map_or(0, columns_cost);
    if !charge.budget.fits(new, old) {
        return Err(PgError::Limit(format!(
            "the result columns of this connection's prepared statements and portals would exceed max_kept_bytes ({} bytes kept, {new} more asked, limit {}); closing the connection",
            charge.budget.used.load(Ordering::Relaxed),
            charge.budget.limit
        )));
    }
    *kept = Some(fields);
    charge.replace(old, new);
    Ok(())
}

/// The gate's view of the server's prepared statements and portals. Updated when a message is
/// sent (later pipelined messages refer to it) and rolled back when the server refuses or skips
/// the message; a denied Parse never touches it, since the server never sees it.
#[derive(Default)]
struct State {
    queue: VecDeque<Expect>,
    statements: Names<Arc<Prepared>>,
    portals: Names<Arc<Portal>>,
    /// The server reported an error in the extended protocol and is discarding every message
    /// up to the agent's next Sync: what the agent sends meanwhile must not change the gate's
    /// view (the server never runs it), so it is dropped.
    server_skipping: bool,
    /// The server is in COPY FROM STDIN (CopyInResponse seen, no CopyDone/CopyFail yet): it
    /// ignores Sync and would swallow any other message as a protocol error.
    copy_in: bool,
    /// The agent sent a COPY and not yet its CopyDone/CopyFail. Some clients (pgx) stream the
    /// data without waiting for CopyInResponse: COPY messages are forwarded, and Syncs sent
    /// meanwhile are marked as ignored should the COPY start.
    copy_pending: bool,
    budget: Arc<Budget>,
    /// A masked statement has answered since the last idle ReadyForQuery: what checks the
    /// transaction's deferred constraints may quote what it wrote.
    masked_in_transaction: bool,
    /// Grants in force when a cursor was declared on this connection, each with the number of
    /// the last such DECLARE. A cursor's query runs at each FETCH (and a `WITH HOLD` one lasts
    /// as long as the connection), while FETCH and MOVE name no table: once one of these
    /// grants ends, FETCH and MOVE are refused until a CLOSE ALL or DISCARD ALL sent after
    /// those DECLAREs completes. (Conservative: every grant in force counts, and every cursor.)
    cursor_grants: BTreeMap<u64, u64>,
    /// DECLAREs counted so far.
    declares: u64,
    /// For each CLOSE ALL or DISCARD ALL sent and not yet completed, oldest first: the first
    /// DECLARE number it does not close. A failed one leaves its entry behind, which only makes
    /// a later completion close less than it did.
    cursor_resets: VecDeque<u64>,
}

/// What a statement does to SQL-level cursors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CursorUse {
    None,
    Declare,
    /// FETCH or MOVE.
    Move,
    /// CLOSE ALL or DISCARD ALL.
    CloseAll,
}

fn cursor_use(facts: &StatementFacts) -> CursorUse {
    let mut words = facts
        .text
        .split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| !w.is_empty());
    let first = words.next().unwrap_or_default();
    let is = |w: &str, k: &str| w.eq_ignore_ascii_case(k);
    if is(first, "declare") {
        CursorUse::Declare
    } else if is(first, "fetch") || is(first, "move") {
        CursorUse::Move
    } else if (is(first, "close") || is(first, "discard"))
        && words.next().is_some_and(|w| is(w, "all"))
    {
        CursorUse::CloseAll
    } else {
        CursorUse::None
    }
}

/// Prepared statements or portals by name. The unnamed one (`""`) is kept apart: drivers use it
/// for most statements (libpq binds, describes and executes the unnamed portal for every
/// prepared execution), and then it costs no hashing or key comparison.
///
/// Named ones are keyed as the server keys them: its hash tables (`prepared_queries`,
/// `PortalHashTable`) have `NAMEDATALEN`-byte keys and compare only the first
/// [`MAX_NAME_BYTES`] bytes, so two names that share those bytes are one object there and must
/// be one here.
struct Names<T> {
    unnamed: Option<T>,
    named: HashMap<Box<[u8]>, T>,
}

/// The longest statement or portal name the server keeps whole (`NAMEDATALEN - 1`).
const MAX_NAME_BYTES: usize = 63;

/// The part of a statement or portal name the server compares: its first [`MAX_NAME_BYTES`]
/// bytes (not characters: a multibyte character may be cut, as the server cuts it).
fn name_key(name: &str) -> &[u8] {
    let b = name.as_bytes();
    b.get(..MAX_NAME_BYTES).unwrap_or(b)
}

impl<T> Default for Names<T> {
    fn default() -> Self {
        Names {
            unnamed: None,
            named: HashMap::new(),
        }
    }
}

impl<T> Names<T> {
    fn get(&self, name: &str) -> Option<&T> {
        if name.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.named.get(name_key(name))
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    fn insert(&mut self, name: &str, value: T) -> Option<T> {
        if name.is_empty() {
            self.unnamed.replace(value)
        } else {
            self.named.insert(name_key(name).into(), value)
        }
    }

    /// Forgets every named entry: the server's names changed in a way the gate did not follow.
    fn forget_named(&mut self) {
        self.named.clear();
    }

    /// Forgets every entry, named or not, except those named in `keep`.
    fn forget_all_but(&mut self, keep: &[String]) {
        if !keep.iter().any(String::is_empty) {
            self.unnamed = None;
        }
        self.named
            .retain(|key, _| keep.iter().any(|k| name_key(k) == &key[..]));
    }

    fn remove(&mut self, name: &str) -> Option<T> {
        if name.is_empty() {
            self.unnamed.take()
        } else {
            self.named.remove(name_key(name))
        }
    }
}

impl State {
    /// Forgets every portal (SQL-level cursor statements changed the server's).
    fn forget_portals(&mut self) {
        self.disown_queued_binds();
        self.portals.forget_all_but(&[]);
    }

    /// The transaction ended: the server dropped every portal bound in it. Portals bound by
    /// Binds still queued (pipelined after this Sync) are the next transaction's and stay.
    fn forget_ended_portals(&mut self) {
        let pending = self.disown_queued_binds();
        self.portals.forget_all_but(&pending);
    }

    /// A queued Bind that gets skipped must not bring back a portal the gate has forgotten:
    /// what each would restore is dropped. Returns the names they bind.
    fn disown_queued_binds(&mut self) -> Vec<String> {
        let mut names = Vec::new();
        for e in &mut self.queue {
            if let Expect::Bind {
                injected: false,
                name,
                previous,
            } = e
            {
                names.push(name.clone());
                *previous = None;
            }
        }
        names
    }

    /// What sending an allowed (or approved) query does to the gate's view: a COPY is followed,
    /// SQL-level statement and cursor changes make the gate forget its names.
    fn query_sent(&mut self, qd: &QueryDecision, grants: &[u64]) {
        for s in &qd.statements {
            self.cursor_sent(cursor_use(&s.facts), grants);
        }
        self.copy_pending |= is_copy(qd);
        if changes_prepared(qd) {
            self.forget_statements();
        }
        if changes_portals(qd) {
            self.forget_portals();
        }
    }

    /// Follows a statement sent to the server, in order, for [`State::cursor_grants`].
    fn cursor_sent(&mut self, what: CursorUse, grants: &[u64]) {
        match what {
            CursorUse::Declare if !grants.is_empty() => {
                self.declares += 1;
                for g in grants {
                    self.cursor_grants.insert(*g, self.declares);
                }
            }
            // Beyond the bound an entry is left out: a later completion then takes an older
            // entry and closes less.
            CursorUse::CloseAll if self.cursor_resets.len() < MAX_IN_FLIGHT => {
                self.cursor_resets.push_back(self.declares + 1);
            }
            _ => {}
        }
    }

    /// A CLOSE ALL or DISCARD ALL completed.
    fn cursors_closed(&mut self) {
        if let Some(upto) = self.cursor_resets.pop_front() {
            self.cursor_grants.retain(|_, declared| *declared >= upto);
        }
    }

    /// A grant a cursor of this connection was declared under that is no longer in force.
    fn ended_cursor_grant(&self, ctx: &Context<'_>) -> Option<u64> {
        self.cursor_grants
            .keys()
            .copied()
            .find(|g| !ctx.shared.approvals.all_active(&[*g]))
    }

    /// Forgets the named statements (SQL `PREPARE`/`DEALLOCATE`/`DISCARD`), likewise.
    fn forget_statements(&mut self) {
        for e in &mut self.queue {
            if let Expect::Parse {
                injected: false,
                name,
                previous,
            } = e
                && !name.is_empty()
            {
                *previous = None;
            }
        }
        self.statements.forget_named();
    }

    /// Undoes the view updates of entries the server refused or skipped, newest first.
    fn revert(&mut self, entries: Vec<Expect>) {
        for e in entries.into_iter().rev() {
            match e {
                Expect::Parse {
                    injected: false,
                    name,
                    previous,
                } => match previous {
                    Some(p) => {
                        self.statements.insert(&name, p);
                    }
                    None => {
                        self.statements.remove(&name);
                    }
                },
                Expect::Bind {
                    injected: false,
                    name,
                    previous,
                } => match previous {
                    Some(p) => {
                        self.portals.insert(&name, p);
                    }
                    None => {
                        self.portals.remove(&name);
                    }
                },
                _ => {}
            }
        }
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Which side of a connection ended it.
enum Ended {
    Agent(Result<(), PgError>),
    Server(Result<(), PgError>),
}

/// How long the server's answers are still read after the agent hung up with statements in
/// flight (see [`run`]).
const DRAIN_AFTER_HANGUP: Duration = Duration::from_secs(10);

/// Whether statements were sent whose outcome the server has not reported yet.
fn has_statements_in_flight(st: &State) -> bool {
    st.queue
        .iter()
        .any(|e| matches!(e, Expect::Query(_) | Expect::Execute(_)))
}

pub async fn run(
    ctx: &Context<'_>,
    client: TcpStream,
    cbuf: BytesMut,
    up: Upstream,
) -> (u64, u64, Option<String>) {
    let (client_r, mut client_w) = client.into_split();
    // Set while bytes for the agent are being written: a FATAL error after a write cut short
    // would land inside a message.
    let mid_write = AtomicBool::new(false);
    let (up_r, up_w) = tokio::io::split(up.stream);
    let state = Mutex::new(State {
        budget: Arc::new(Budget::new(ctx.target.max_kept_bytes)),
        ..State::default()
    });
    let notify = Notify::new();
    let gone = AtomicBool::new(false);
    let mut drained = false;
    let mut up_bytes = 0u64;
    let mut down_bytes = 0u64;
    let result = {
        let from_agent = agent_to_server(ctx, client_r, cbuf, up_w, &state, &notify, &mut up_bytes);
        let from_server = server_to_agent(
            ctx,
            up_r,
            up.buf,
            up.decoder,
            ToAgent {
                half: &mut client_w,
                mid_write: &mid_write,
                gone: &gone,
            },
            &state,
            &notify,
            &mut down_bytes,
        );
        tokio::pin!(from_server);
        let ended = tokio::select! {
            // Either ending ends the connection: no need to draw which is polled first.
            biased;
            r = from_agent => Ended::Agent(r),
            r = &mut from_server => Ended::Server(r),
        };
        match ended {
            // The agent hung up (or sent Terminate): what it sent before still runs on the
            // server, which stops once it reads the end. Its answers are still read and
            // recorded for a while, so that a write that committed is not recorded as failed.
            Ended::Agent(Ok(())) if has_statements_in_flight(&lock(&state)) => {
                gone.store(true, Ordering::Relaxed);
                drained = true;
                let _ = tokio::time::timeout(DRAIN_AFTER_HANGUP, &mut from_server).await;
                Ok(())
            }
            Ended::Agent(r) | Ended::Server(r) => r,
        }
    };
    // The gate ended the connection itself: the agent is told why, as the server would tell it.
    if let Err(e) = &result
        && let Some(code) = e.sqlstate_for_agent()
        && !mid_write.load(Ordering::Relaxed)
    {
        super::fatal(&mut client_w, code, &format!("agentgate: {e}")).await;
    }
    // Statements still in flight when the connection ended.
    let unknown = if drained {
        format!(
            "outcome unknown: the agent hung up after sending it, and the server had not answered within {} s",
            DRAIN_AFTER_HANGUP.as_secs()
        )
    } else {
        "connection closed before the statement completed".to_string()
    };
    for e in lock(&state).queue.drain(..) {
        match e {
            Expect::Query(q) => {
                for r in q.recs.into_iter().skip(q.idx) {
                    finish(ctx, r, None, Some(unknown.clone()));
                }
            }
            Expect::Execute(x) => finish(ctx, x.rec, None, Some(unknown.clone())),
            _ => {}
        }
    }
    (up_bytes, down_bytes, result.err().map(|e| e.to_string()))
}

fn deny_message(d: &Decision, message: &str) -> String {
    let rule = d.rule.as_deref().unwrap_or("default");
    let policy = d.policy.as_deref().unwrap_or("-");
    format!("agentgate: denied by rule \"{rule}\" of policy \"{policy}\": {message}")
}

fn finish(ctx: &Context<'_>, rec: Rec, tag: Option<String>, error: Option<String>) {
    let Some(open) = rec.open else { return };
    let rows =
        tag.as_deref()
            .and_then(rows_of_tag)
            .or(if rec.rows > 0 { Some(rec.rows) } else { None });
    let _ = ctx.gate.store.statement_end(
        open,
        StatementEnd {
            duration_us: u64::try_from(rec.started.elapsed().as_micros()).unwrap_or(u64::MAX),
            rows,
            command_tag: tag,
            error: error.or(rec.error),
            columns: rec.columns,
            result_rows: rec.kept,
            masked: rec.masked,
        },
    );
}

/// Rows from a CommandComplete tag: the last number (`SELECT 5`, `INSERT 0 1`, `UPDATE 3`).
fn rows_of_tag(tag: &str) -> Option<u64> {
    tag.rsplit(' ').next().and_then(|n| n.parse().ok())
}

/// How a `review` statement was settled (a grant, or a human), for its record.
struct Reviewed {
    decision: &'static str,
    message: String,
}

impl Reviewed {
    fn apply(r: Option<&Reviewed>, d: &Decision) -> (&'static str, Option<String>) {
        match r {
            Some(r) if !d.shadow && matches!(d.verdict, Verdict::Review { .. }) => {
                (r.decision, Some(r.message.clone()))
            }
            _ => (d.verdict.name(), verdict_message(&d.verdict)),
        }
    }
}

/// Records the statements of a judged query string; returns their records.
fn record_query(
    ctx: &Context<'_>,
    protocol: &'static str,
    sql: &str,
    qd: &QueryDecision,
    reviewed: Option<&Reviewed>,
) -> Vec<Rec> {
    let store = &ctx.gate.store;
    if qd.statements.is_empty() {
        let d = &qd.decision;
        let open = store.statement(
            ctx.peer.share,
            StatementStart {
                session_id: ctx.session_id,
                protocol,
                text: sql.into(),
                kind: None,
                decision: d.verdict.name(),
                enforced: !d.shadow,
                policy: d.policy.clone(),
                rule: d.rule.clone(),
                message: qd
                    .parse_error
                    .clone()
                    .or_else(|| verdict_message(&d.verdict)),
                ..Default::default()
            },
        );
        return if qd.parse_error.is_some() {
            vec![Rec::new(Some(open), Arc::default())]
        } else {
            Vec::new()
        };
    }
    qd.statements
        .iter()
        .map(|s| {
            let d = &s.decision;
            let (decision, message) = Reviewed::apply(reviewed, d);
            let open = store.statement(
                ctx.peer.share,
                StatementStart {
                    session_id: ctx.session_id,
                    protocol,
                    text: s.facts.text.clone(),
                    kind: Some(s.facts.kind.as_str()),
                    tables: s.facts.tables.clone(),
                    functions: s.facts.functions.clone(),
                    decision,
                    enforced: !d.shadow,
                    policy: d.policy.clone(),
                    rule: d.rule.clone(),
                    message,
                },
            );
            Rec::new(Some(open), d.mask.clone())
        })
        .collect()
}

fn verdict_message(v: &Verdict) -> Option<String> {
    match v {
        Verdict::Deny { message } => Some(message.clone()),
        Verdict::Review { timeout } => Some(format!(
            "review required (timeout {})",
            humantime::format_duration(*timeout)
        )),
        Verdict::Allow => None,
    }
}

/// The statement decision that made the whole query fail, for the error message.
fn deciding(qd: &QueryDecision) -> &Decision {
    qd.statements
        .iter()
        .map(|s| &s.decision)
        .find(|d| !d.enforced_verdict().is_allow())
        .unwrap_or(&qd.decision)
}

/// COPY ... TO STDOUT cannot be masked row by row: refuse it when masking applies.
fn unmaskable_copy(qd: &QueryDecision) -> bool {
    qd.statements.iter().any(|s| {
        s.facts.kind == StatementKind::Copy
            && !s.decision.mask.is_empty()
            && s.facts
                .copy
                .as_ref()
                .is_some_and(|c| c.direction == CopyDirection::To)
    })
}

/// What to do with a judged Query or Parse.
enum Judged {
    /// Run it. `note` says which grant let a `review` statement through, for the record.
    Allow {
        note: Option<String>,
    },
    Deny(String),
    /// Hold it for a human (a Query now; a prepared statement at each Execute).
    Review {
        timeout: Duration,
    },
}

/// Lets `review` statements through when the agent holds a grant of their rule; returns the
/// note to record and the grants, or `None` if some reviewed statement has no grant.
fn rule_grants(ctx: &Context<'_>, decisions: &[&Decision]) -> Option<(String, Vec<u64>)> {
    let mut notes = Vec::new();
    let mut ids = Vec::new();
    for d in decisions {
        if d.shadow || !matches!(d.verdict, Verdict::Review { .. }) {
            continue;
        }
        let (Some(policy), Some(rule)) = (d.policy.as_deref(), d.rule.as_deref()) else {
            return None;
        };
        let g = ctx.shared.approvals.rule_grant(&RuleUse {
            agent: &ctx.peer.agent,
            target: &ctx.target.name,
            database: &ctx.database,
            policy,
            rule,
        })?;
        notes.push(grant_note(&g));
        ids.push(g.id);
    }
    Some((notes.join("; "), ids))
}

fn grant_note(g: &crate::approval::Grant) -> String {
    format!(
        "allowed without review by grant {} ({}, granted by {} until {})",
        g.id, g.scope, g.granted_by, g.expires
    )
}

/// What [`judge`] makes of a query string.
struct Judgement {
    qd: QueryDecision,
    judged: Judged,
    /// Role grants the decision relied on.
    role_grants: Vec<u64>,
    verified: Arc<Verified>,
}

/// Judges a query string, asking the catalog first whether its qualified references are
/// columns when that decides the redaction of its computed columns (see [`verify_columns`]).
async fn judge(ctx: &Context<'_>, sql: &str) -> Judgement {
    let (qd, granted) = decide(ctx, sql);
    let verified = Arc::new(verify_columns(ctx, &qd).await);
    let (qd, judged, role_grants) = conclude(ctx, qd, granted, &verified);
    Judgement {
        qd,
        judged,
        role_grants,
        verified,
    }
}

/// The judgement made before the state was locked, as it stands now: judged again (no await,
/// the catalog's answers kept) if a grant it relied on ended while the catalog was asked, so
/// that what is sent is judged with the grants in force when it is sent. `None`: not judged
/// above; nothing verified, computed columns redacted.
fn current(ctx: &Context<'_>, sql: &str, judgement: Option<Judgement>) -> Judgement {
    let verified = match judgement {
        Some(j) if j.role_grants.is_empty() || ctx.shared.approvals.all_active(&j.role_grants) => {
            return j;
        }
        Some(j) => j.verified,
        None => Arc::default(),
    };
    let (qd, judged, role_grants) = judge_with(ctx, sql, &verified);
    Judgement {
        qd,
        judged,
        role_grants,
        verified,
    }
}

/// [`judge`] with the qualified references already checked (`verified`: those found to be
/// columns; any other is taken as a whole row).
fn judge_with(
    ctx: &Context<'_>,
    sql: &str,
    verified: &Verified,
) -> (QueryDecision, Judged, Vec<u64>) {
    let (qd, granted) = decide(ctx, sql);
    conclude(ctx, qd, granted, verified)
}

/// The policy's decision, with the role grants in force now (their ids, and those of rule
/// grants that let it through, go with a prepared statement, which is judged again once one of
/// them ends, and with a cursor).
fn decide(ctx: &Context<'_>, sql: &str) -> (QueryDecision, Option<GrantedRoles>) {
    let granted = ctx
        .shared
        .approvals
        .roles_for(&ctx.peer.agent, &ctx.peer.roles);
    let subject = Subject {
        agent: &ctx.peer.agent,
        roles: granted.as_ref().map_or(&ctx.peer.roles, |g| &g.roles),
    };
    let opts = ExtractOptions {
        standard_conforming_strings: ctx.standard_strings,
    };
    let qd = ctx
        .shared
        .policies
        .decide_query_with(&subject, &ctx.target.name, sql, &opts);
    (qd, granted)
}

fn conclude(
    ctx: &Context<'_>,
    mut qd: QueryDecision,
    granted: Option<GrantedRoles>,
    verified: &Verified,
) -> (QueryDecision, Judged, Vec<u64>) {
    mark_computed_columns(ctx, &mut qd, verified);
    let mut rule_ids = Vec::new();
    let judged = match qd.enforced_verdict() {
        Verdict::Deny { message } => Judged::Deny(match &qd.parse_error {
            Some(e) => format!("agentgate: statement denied: it could not be parsed ({e})"),
            None => deny_message(deciding(&qd), &message),
        }),
        // Whatever lets it run (allowed, a grant, a human's approval), masked rows cannot be
        // streamed as COPY data.
        _ if unmaskable_copy(&qd) => Judged::Deny(
            "agentgate: COPY ... TO STDOUT cannot be masked; use SELECT to read masked data"
                .to_string(),
        ),
        Verdict::Allow => Judged::Allow { note: None },
        Verdict::Review { timeout } => {
            let decisions: Vec<&Decision> = qd.statements.iter().map(|s| &s.decision).collect();
            match rule_grants(ctx, &decisions) {
                Some((note, ids)) => {
                    rule_ids = ids;
                    Judged::Allow { note: Some(note) }
                }
                None => Judged::Review { timeout },
            }
        }
    };
    let mut grants = granted.map(|g| g.grants).unwrap_or_default();
    grants.extend(rule_ids);
    (qd, judged, grants)
}

/// The refusal of a FETCH or MOVE once a grant a cursor was declared under has ended.
fn cursor_grant_ended(grant: u64) -> String {
    format!(
        "agentgate: FETCH and MOVE are refused on this connection: grant {grant}, in force when a cursor was declared here, has ended; CLOSE ALL (or DISCARD ALL) and declare it again"
    )
}

/// Records the refusal of a message that carries no statement the policy could judge.
/// Why a query text may not be parsed at all, if it may not: longer than `max_query_bytes`
/// (parsing costs the daemon up to about a thousand times the text's size in syntax tree while
/// it runs, see `TargetConfig::max_query_bytes`), or more statements than
/// `max_statements_per_query` (each is parsed, judged and recorded before any is sent).
fn over_limits(ctx: &Context<'_>, text: &str) -> Option<String> {
    if text.len() > ctx.target.max_query_bytes {
        return Some(format!(
            "agentgate: a query text of {} bytes is longer than max_query_bytes ({}); send large data with COPY or as parameters",
            text.len(),
            ctx.target.max_query_bytes
        ));
    }
    crate::policy::facts::more_statements_than(text, ctx.target.max_statements).then(|| {
        format!(
            "agentgate: more than max_statements_per_query ({}) statements in one query; send them in several queries (a prepared statement holds one)",
            ctx.target.max_statements
        )
    })
}

fn refuse_unjudged(ctx: &Context<'_>, protocol: &'static str, text: &str, message: &str) {
    let open = ctx.gate.store.statement(
        ctx.peer.share,
        StatementStart {
            session_id: ctx.session_id,
            protocol,
            text: text.into(),
            decision: "deny",
            enforced: true,
            message: Some(message.into()),
            ..Default::default()
        },
    );
    finish(
        ctx,
        Rec::new(Some(open), Arc::default()),
        None,
        Some(message.into()),
    );
}

/// Some statement of the query prepares, deallocates or discards prepared statements at the
/// SQL level: the server's statement names then no longer match what the gate judged at Parse,
/// so the gate forgets its named statements and refuses an Execute of them until the agent
/// prepares them again.
fn changes_prepared(qd: &QueryDecision) -> bool {
    first_keyword_in(qd, &["prepare", "deallocate", "discard"])
}

/// What happens to an agent message before it is judged.
enum Pre {
    Judge,
    /// Not sent: the server would not run it (after its error, up to Sync; a Sync during COPY;
    /// COPY messages outside COPY).
    Drop,
    /// Refused with an error queued: the rest up to Sync is skipped.
    Refused,
}

/// The checks that come before judging: COPY FROM STDIN in progress, the server skipping after
/// an error, names the server would shorten.
fn before_judging(
    ctx: &Context<'_>,
    st: &mut State,
    msg: &FrontendMessage,
) -> Result<Pre, PgError> {
    if st.queue.len() >= MAX_IN_FLIGHT {
        // Each expectation holds records and buffers: an agent that pipelines without reading
        // its answers would grow the shared daemon's memory without bound.
        return Err(PgError::Limit(format!(
            "more than {MAX_IN_FLIGHT} messages awaiting their answers; the agent is not reading them"
        )));
    }
    if matches!(
        msg,
        FrontendMessage::CopyDone | FrontendMessage::CopyFail { .. }
    ) {
        st.copy_pending = false;
    }
    if st.copy_in {
        match msg {
            FrontendMessage::CopyDone | FrontendMessage::CopyFail { .. } => st.copy_in = false,
            // Ignored by the server during COPY; not sent, so that no answer can come should
            // the server have left COPY meanwhile.
            FrontendMessage::Sync => return Ok(Pre::Drop),
            FrontendMessage::CopyData(_) | FrontendMessage::Flush | FrontendMessage::Terminate => {}
            other => {
                // The server would take it as a protocol error and drop it, while the gate
                // would expect its answer: the two views would part.
                return Err(PgError::Protocol(format!(
                    "{} sent during COPY FROM STDIN",
                    other.name()
                )));
            }
        }
    } else if matches!(msg, FrontendMessage::CopyData(_)) && !st.copy_pending {
        // No COPY sent (or its end already sent): the server ignores it outside COPY, and the
        // gate does not send it.
        return Ok(Pre::Drop);
    }
    if st.server_skipping {
        match msg {
            FrontendMessage::Sync => st.server_skipping = false,
            FrontendMessage::Terminate => {}
            // The server discards it after its error: so does the gate, unsent.
            _ => return Ok(Pre::Drop),
        }
    }
    // What the message would add to the gate's view: a new name (its index), the bytes it
    // keeps, and the bytes of the unnamed statement or portal it replaces (a named one that
    // exists is refused by the server, and restored).
    let (new_name, cost, replaced) = match msg {
        FrontendMessage::Parse { name, query, .. } => (
            (!name.is_empty() && !st.statements.contains(name))
                .then_some(st.statements.named.len()),
            parse_cost(name, query),
            st.statements.get(name).map_or(0, |p| p.charge.bytes()),
        ),
        FrontendMessage::Bind {
            portal,
            statement,
            param_formats,
            params,
            result_formats,
        } => (
            (!portal.is_empty() && !st.portals.contains(portal)).then_some(st.portals.named.len()),
            bind_cost(
                portal,
                result_formats,
                params,
                param_formats,
                keeps_params(st.statements.get(statement)),
            ),
            replaced_by_bind(st, portal),
        ),
        _ => (None, 0, 0),
    };
    let (code, refusal) = if new_name.is_some_and(|n| n >= MAX_NAMES) {
        (
            SQLSTATE_INSUFFICIENT_PRIVILEGE,
            format!(
                "agentgate: at most {MAX_NAMES} named statements and {MAX_NAMES} named portals per connection; close some first"
            ),
        )
    } else if cost > 0 && !st.budget.fits(cost, replaced) {
        (
            SQLSTATE_PROGRAM_LIMIT_EXCEEDED,
            format!(
                "agentgate: the prepared statements and portals of this connection would exceed max_kept_bytes ({} bytes kept, {cost} more asked, limit {}); close some first",
                st.budget.used.load(Ordering::Relaxed),
                st.budget.limit
            ),
        )
    } else {
        return Ok(Pre::Judge);
    };
    refuse_unjudged(ctx, "extended", msg.name(), &refusal);
    st.queue
        .push_back(Expect::Synthetic(error_frame_with(code, &refusal)));
    Ok(Pre::Refused)
}

/// Messages one connection may have sent and not yet had answered.
const MAX_IN_FLIGHT: usize = 65_536;

/// Named statements, and named portals, one connection may hold in the gate's view: each is
/// kept for as long as the agent likes, and the daemon's memory is shared by every agent.
const MAX_NAMES: usize = 10_000;

/// Some statement of the query declares or closes cursors, or discards session state: SQL-level
/// portals the gate does not follow, so it forgets its own (an Execute of one is then refused
/// until the agent binds it again).
fn changes_portals(qd: &QueryDecision) -> bool {
    // ROLLBACK (TO SAVEPOINT) drops portals bound since; COMMIT/ROLLBACK AND CHAIN end the
    // transaction without an idle ReadyForQuery.
    first_keyword_in(
        qd,
        &[
            "declare", "close", "discard", "rollback", "commit", "end", "abort",
        ],
    )
}

fn first_keyword_in(qd: &QueryDecision, keywords: &[&str]) -> bool {
    qd.statements.iter().any(|s| {
        keywords
            .iter()
            .any(|k| first_word(&s.facts).eq_ignore_ascii_case(k))
    })
}

fn first_word(facts: &StatementFacts) -> &str {
    facts
        .text
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or_default()
}

/// Qualified references (`c.x`) the catalog confirmed as columns of their relation.
type Verified = HashSet<QualifiedColumn>;

/// Whether a statement uses columns under no name it gives, as far as its facts tell: a whole
/// row, or rows from something the gate cannot see into (a cursor's `FETCH`, an opaque
/// statement).
fn unseen(facts: &StatementFacts) -> bool {
    facts.opaque || facts.unseen_columns || first_word(facts).eq_ignore_ascii_case("fetch")
}

/// The qualified references of a statement that decide whether its computed columns are
/// redacted: none when they would be redacted, or kept, whatever the references are.
fn references_to_verify<'a>(masker: &Masker, s: &'a StatementDecision) -> &'a [QualifiedColumn] {
    let mask = &s.decision.mask;
    if s.facts.qualified_columns.is_empty()
        || !masker.computes_from_masked(mask, &[], true)
        || masker.computes_from_masked(mask, &s.facts.computed_from, unseen(&s.facts))
    {
        return &[];
    }
    &s.facts.qualified_columns
}

/// Which qualified references `c.x` of the statements are columns of their relation.
/// PostgreSQL reads one that is not as the function `x(c)` over the whole row (`c.to_jsonb`,
/// `customers.record_out`, a user-defined function of the row type), and only the server's
/// catalog can tell which: it is asked on the gate's own connection, and only for statements
/// whose computed columns would otherwise go unredacted (none without masks or without such
/// references). A catalog that cannot answer confirms nothing, so those computed columns are
/// redacted.
async fn verify_columns(ctx: &Context<'_>, qd: &QueryDecision) -> Verified {
    let Some(masker) = ctx.shared.masker.as_ref() else {
        return Verified::new();
    };
    let wanted: Vec<&QualifiedColumn> = qd
        .statements
        .iter()
        .flat_map(|s| references_to_verify(masker, s))
        .collect();
    if wanted.is_empty() {
        return Verified::new();
    }
    // A set: a statement may name thousands of relations, each many times.
    let relations: Vec<catalog::RelationName> = wanted
        .iter()
        .map(|q| (q.schema.clone(), q.relation.clone()))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let columns = match ctx
        .shared
        .catalog
        .relation_columns(ctx.gate, ctx.target, &ctx.database, &relations)
        .await
    {
        Ok(columns) => columns,
        Err(e) => {
            tracing::warn!(
                target = %ctx.target.name,
                error = %e,
                "the catalog could not say which qualified names are columns; the statement's computed columns are redacted"
            );
            return Verified::new();
        }
    };
    wanted
        .into_iter()
        .filter(|q| {
            columns
                .get(&(q.schema.clone(), q.relation.clone()))
                .is_some_and(|c| c.contains(&q.column))
        })
        .cloned()
        .collect()
}

/// Adds [`COMPUTED_FROM_MASKED`] to the masks of every statement whose computed result columns
/// must be redacted: it uses a column its masks' rules name, or a whole row (which holds them,
/// also as a qualified reference not in `verified`), or its rows come from something the gate
/// cannot see into (a cursor's `FETCH`, an opaque statement).
fn mark_computed_columns(ctx: &Context<'_>, qd: &mut QueryDecision, verified: &Verified) {
    let Some(masker) = ctx.shared.masker.as_ref() else {
        return;
    };
    let mut marked = false;
    for s in &mut qd.statements {
        let unseen = unseen(&s.facts)
            || s.facts
                .qualified_columns
                .iter()
                .any(|q| !verified.contains(q));
        if masker.computes_from_masked(&s.decision.mask, &s.facts.computed_from, unseen) {
            // A write can store a masked value in a column no rule names and return it.
            let writes = matches!(
                s.facts.kind,
                StatementKind::Insert
                    | StatementKind::Update
                    | StatementKind::Delete
                    | StatementKind::Merge
            );
            let marker = if writes {
                RETURNED_FROM_MASKED
            } else {
                COMPUTED_FROM_MASKED
            };
            s.decision.mask = with_marker(&s.decision.mask, marker);
            marked = true;
        }
    }
    if marked && !qd.decision.mask.is_empty() {
        qd.decision.mask = with_marker(&qd.decision.mask, COMPUTED_FROM_MASKED);
    }
}

fn with_marker(masks: &[String], marker: &str) -> Arc<[String]> {
    masks
        .iter()
        .cloned()
        .chain(std::iter::once(marker.to_string()))
        .collect()
}

/// Some statement of the query is a COPY.
fn is_copy(qd: &QueryDecision) -> bool {
    qd.statements
        .iter()
        .any(|s| s.facts.kind == StatementKind::Copy)
}

fn error_frame(message: &str) -> Bytes {
    error_frame_with(SQLSTATE_INSUFFICIENT_PRIVILEGE, message)
}

fn error_frame_with(sqlstate: &str, message: &str) -> Bytes {
    let mut b = BytesMut::new();
    match BackendMessage::ErrorResponse(ErrorFields::error(sqlstate, message)).encode(&mut b) {
        Ok(()) => b.freeze(),
        Err(_) => Bytes::new(),
    }
}

/// Sends an Execute of `portal` (named `name`; `raw` is the agent's message) and queues its
/// run. A masked statement's rows are masked by the portal's own result columns, which the
/// server fixes at Bind: a statement's columns seen at Parse can be another result's by then (a
/// `FETCH` reads whatever cursor has the name when it is bound; a name the search path finds
/// can be another schema's table). So unless the agent described the portal itself, the gate
/// does, just before the Execute.
fn send_execute(
    st: &mut State,
    out: &mut BytesMut,
    rec: Rec,
    portal: Option<Arc<Portal>>,
    name: &str,
    raw: &[u8],
) -> Result<(), PgError> {
    if let Some(p) = &portal
        && !rec.masks.is_empty()
        && !p.described.swap(true, Ordering::Relaxed)
    {
        FrontendMessage::Describe {
            kind: Target::Portal,
            name: name.to_owned(),
        }
        .encode(out)?;
        st.queue.push_back(Expect::Describe {
            what: Described::Portal(Some(p.clone())),
            internal: true,
        });
    }
    st.queue.push_back(Expect::Execute(Box::new(ExecRun {
        rec,
        portal,
        plan: None,
    })));
    out.extend_from_slice(raw);
    Ok(())
}

/// Writes the injected error statement (see the module docs) and queues what it answers.
fn inject(st: &mut State, out: &mut BytesMut) -> Result<(), PgError> {
    FrontendMessage::Parse {
        name: String::new(),
        query: DENY_SQL.into(),
        param_types: Vec::new(),
    }
    .encode(out)?;
    FrontendMessage::Bind {
        portal: String::new(),
        statement: String::new(),
        param_formats: Vec::new(),
        params: Vec::new(),
        result_formats: Vec::new(),
    }
    .encode(out)?;
    FrontendMessage::Execute {
        portal: String::new(),
        max_rows: 0,
    }
    .encode(out)?;
    FrontendMessage::Sync.encode(out)?;
    // The injected statement replaces the unnamed statement and portal on the server.
    st.statements.remove("");
    st.portals.remove("");
    st.queue.push_back(Expect::Parse {
        injected: true,
        name: String::new(),
        previous: None,
    });
    st.queue.push_back(Expect::Bind {
        injected: true,
        name: String::new(),
        previous: None,
    });
    st.queue.push_back(Expect::InjectedExecute);
    st.queue.push_back(Expect::Sync {
        ignored_in_copy: false,
    });
    Ok(())
}

/// A statement waiting for a human, taken out of the message loop so that the loop can await.
enum Held {
    Query {
        raw: Bytes,
        sql: String,
        qd: QueryDecision,
        timeout: Duration,
    },
    Execute {
        raw: Bytes,
        /// The portal's name, for the Describe [`send_execute`] may add.
        name: String,
        portal: Option<Arc<Portal>>,
        prepared: Arc<Prepared>,
        /// The decision this Execute was held by: the statement's own, or the one it got when
        /// judged again after a role grant it relied on ended (its masks then apply).
        decision: Decision,
        timeout: Duration,
    },
}

/// The facts an approver sees.
fn facts_json(qd: &QueryDecision) -> serde_json::Value {
    serde_json::json!(
        qd.statements
            .iter()
            .map(|s| statement_facts_json(
                Some(s.facts.kind.as_str()),
                &s.facts.tables,
                &s.facts.functions,
                &s.decision
            ))
            .collect::<Vec<_>>()
    )
}

/// One statement's facts as a ticket shows them to the approver (simple and extended alike).
fn statement_facts_json(
    kind: Option<&str>,
    tables: &[TableRef],
    functions: &[String],
    decision: &Decision,
) -> serde_json::Value {
    serde_json::json!({
        "kind": kind,
        "tables": tables.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "functions": functions,
        "verdict": decision.verdict.name(),
        "rule": decision.rule,
    })
}

fn new_ticket(ctx: &Context<'_>, held: &Held) -> NewTicket {
    let roles = ctx
        .shared
        .approvals
        .roles_for(&ctx.peer.agent, &ctx.peer.roles)
        .map_or_else(|| ctx.peer.roles.clone(), |g| g.roles);
    let base = NewTicket {
        requester: Requester {
            agent: ctx.peer.agent.clone(),
            roles,
            pid: ctx.peer.process.pid,
            uid: ctx.peer.process.uid,
            exe: ctx.peer.process.exe.clone(),
            cmdline: ctx.peer.process.cmdline.clone(),
            target: ctx.target.name.clone(),
            database: ctx.database.clone(),
            session_id: ctx.session_id,
        },
        protocol: "simple",
        statement: Arc::default(),
        params: Vec::new(),
        param_formats: Vec::new(),
        facts: serde_json::Value::Null,
        policy: None,
        rule: None,
        timeout: Duration::ZERO,
    };
    match held {
        Held::Query {
            sql, qd, timeout, ..
        } => {
            let d = deciding_review(qd);
            NewTicket {
                statement: sql.as_str().into(),
                facts: facts_json(qd),
                policy: d.policy.as_deref().map(String::from),
                rule: d.rule.as_deref().map(String::from),
                timeout: *timeout,
                ..base
            }
        }
        Held::Execute {
            portal,
            prepared,
            decision,
            timeout,
            ..
        } => NewTicket {
            protocol: "extended",
            statement: prepared.text.clone(),
            params: portal
                .as_ref()
                .map(|p| p.params.clone())
                .unwrap_or_default(),
            param_formats: portal
                .as_ref()
                .map(|p| p.param_formats.clone())
                .unwrap_or_default(),
            facts: serde_json::json!([statement_facts_json(
                prepared.kind,
                &prepared.tables,
                &prepared.functions,
                decision
            )]),
            policy: decision.policy.as_deref().map(String::from),
            rule: decision.rule.as_deref().map(String::from),
            timeout: *timeout,
            ..base
        },
    }
}

/// The statement decision that sent a query to review.
fn deciding_review(qd: &QueryDecision) -> &Decision {
    qd.statements
        .iter()
        .map(|s| &s.decision)
        .find(|d| !d.shadow && matches!(d.verdict, Verdict::Review { .. }))
        .unwrap_or(&qd.decision)
}

/// Holds the connection while a human decides. Whatever the agent sends meanwhile stays
/// buffered, unread by the loop; `None` means the agent hung up (the ticket is cancelled and
/// the statement never runs).
async fn await_approval(
    ctx: &Context<'_>,
    client: &mut tokio::net::tcp::OwnedReadHalf,
    buf: &mut BytesMut,
    ticket: NewTicket,
    statement_timeout: Option<Duration>,
) -> Result<Option<(u64, Outcome)>, PgError> {
    let approvals = &ctx.shared.approvals;
    let review_timeout = ticket.timeout;
    let Hold {
        ticket,
        mut outcome,
    } = match approvals.hold(ticket) {
        Ok(hold) => hold,
        // No ticket was opened (id 0 names none).
        Err(refused) => return Ok(Some((0, refused))),
    };
    let start = tokio::time::Instant::now();
    let agent_deadline = statement_timeout
        .filter(|t| *t < review_timeout)
        .map(|t| start + t);
    let mut expired = false;
    let mut reading = true;
    loop {
        tokio::select! {
            o = &mut outcome => {
                let o = o.unwrap_or(Outcome::Cancelled { why: "the ticket was dropped".into() });
                return Ok(Some((ticket.id, o)));
            }
            () = tokio::time::sleep_until(start + review_timeout), if !expired => {
                expired = true;
                approvals.expire(ticket.id);
            }
            () = async {
                match agent_deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            }, if !expired => {
                expired = true;
                approvals.cancel(ticket.id, STATEMENT_TIMEOUT);
            }
            r = client.read_buf(buf), if reading => match r {
                Ok(0) | Err(_) => {
                    approvals.cancel(ticket.id, "the agent disconnected while its statement awaited approval");
                    return Ok(None);
                }
                // Keep what arrives; stop reading once a frame's worth is queued.
                Ok(_) => reading = buf.len() <= ctx.target.max_frame,
            },
        }
    }
}

const STATEMENT_TIMEOUT: &str = "canceling statement due to statement timeout";
pub const USER_CANCEL: &str = "canceling statement due to user request";

fn approved_message(ticket: u64, by: &str, reason: Option<&str>) -> String {
    match reason {
        Some(r) => format!("approved by {by} (ticket {ticket}): {r}"),
        None => format!("approved by {by} (ticket {ticket})"),
    }
}

/// The error the agent gets when a held statement does not run.
fn refusal(ticket: u64, rule: Option<&str>, outcome: &Outcome) -> (&'static str, String) {
    let rule = rule.unwrap_or("default");
    match outcome {
        Outcome::Approved { .. } => (SQLSTATE_INSUFFICIENT_PRIVILEGE, String::new()),
        Outcome::Denied { by, reason } => (
            SQLSTATE_INSUFFICIENT_PRIVILEGE,
            format!(
                "agentgate: statement denied by approver {by}: {reason} (ticket {ticket}, rule \"{rule}\")"
            ),
        ),
        Outcome::Expired { after } => (
            SQLSTATE_INSUFFICIENT_PRIVILEGE,
            format!(
                "agentgate: approval request expired: no decision within {} (ticket {ticket}, rule \"{rule}\")",
                humantime::format_duration(*after)
            ),
        ),
        Outcome::Refused { why } => (
            SQLSTATE_INSUFFICIENT_PRIVILEGE,
            format!("agentgate: statement needs approval but was refused: {why} (rule \"{rule}\")"),
        ),
        Outcome::TooLarge { why } => (
            SQLSTATE_PROGRAM_LIMIT_EXCEEDED,
            format!("agentgate: statement needs approval but was refused: {why} (rule \"{rule}\")"),
        ),
        Outcome::Cancelled { why } => (
            SQLSTATE_QUERY_CANCELED,
            if why.starts_with("canceling statement") {
                format!("{why} (agentgate ticket {ticket} cancelled)")
            } else {
                format!("agentgate: ticket {ticket} cancelled: {why}")
            },
        ),
    }
}

/// A prepared statement judged with role grants that have since ended is judged again.
fn rejudged(ctx: &Context<'_>, p: &Prepared) -> Option<(Decision, Option<String>)> {
    if p.role_grants.is_empty() || ctx.shared.approvals.all_active(&p.role_grants) {
        return None;
    }
    let (qd, judged, _) = judge_with(ctx, &p.text, &p.verified);
    let decision = qd
        .statements
        .first()
        .map(|s| s.decision.clone())
        .unwrap_or(qd.decision.clone());
    Some(match judged {
        Judged::Deny(message) => (decision, Some(message)),
        _ => (decision, None),
    })
}

fn record_execute(
    ctx: &Context<'_>,
    p: &Prepared,
    decision: &Decision,
    reviewed: Option<&Reviewed>,
) -> Rec {
    let (verdict, message) = Reviewed::apply(reviewed, decision);
    let open = ctx.gate.store.statement(
        ctx.peer.share,
        StatementStart {
            session_id: ctx.session_id,
            protocol: "extended",
            text: p.text.clone(),
            kind: p.kind,
            tables: p.tables.clone(),
            functions: p.functions.clone(),
            decision: verdict,
            enforced: !decision.shadow,
            policy: decision.policy.clone(),
            rule: decision.rule.clone(),
            message,
        },
    );
    Rec::new(Some(open), decision.mask.clone())
}

/// `SET statement_timeout` seen on this connection: a held statement is cancelled when it runs
/// out, as the server would cancel a slow one.
fn statement_timeout_of(qd: &QueryDecision, current: Option<Duration>) -> Option<Duration> {
    let mut t = current;
    for s in &qd.statements {
        if s.facts.kind != StatementKind::Set {
            continue;
        }
        if let Some(v) = parse_statement_timeout(&s.facts.text) {
            t = v;
        }
    }
    t
}

/// `Some(None)`: reset (0 or DEFAULT); `Some(Some(d))`: a timeout; `None`: not about it.
fn parse_statement_timeout(text: &str) -> Option<Option<Duration>> {
    let lower = text.trim().trim_end_matches(';').to_ascii_lowercase();
    if lower.starts_with("reset") {
        return lower
            .contains("statement_timeout")
            .then_some(None)
            .or(lower.contains(" all").then_some(None));
    }
    let rest = lower
        .strip_prefix("set")?
        .trim_start()
        .trim_start_matches("session ")
        .trim_start();
    if rest.starts_with("local ") {
        // Ends with the transaction; not tracked, so no cancellation is invented either.
        return None;
    }
    let value = rest.strip_prefix("statement_timeout")?.trim_start();
    let value = value
        .strip_prefix('=')
        .or_else(|| value.strip_prefix("to "))?
        .trim()
        .trim_matches('\'')
        .trim();
    if value == "default" {
        return Some(None);
    }
    let split = value
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(value.len());
    let (num, unit) = value.split_at(split);
    let n: f64 = num.parse().ok()?;
    let ms = match unit.trim() {
        "" | "ms" => n,
        "s" => n * 1e3,
        "min" => n * 60e3,
        "h" => n * 3600e3,
        "d" => n * 86400e3,
        "us" => n / 1e3,
        _ => return None,
    };
    if ms <= 0.0 {
        return Some(None);
    }
    Some(Some(Duration::from_micros((ms * 1e3) as u64)))
}

async fn agent_to_server<W: AsyncWrite + Unpin>(
    ctx: &Context<'_>,
    mut client: tokio::net::tcp::OwnedReadHalf,
    mut buf: BytesMut,
    mut upstream: W,
    state: &Mutex<State>,
    notify: &Notify,
    bytes: &mut u64,
) -> Result<(), PgError> {
    let mut dec = FrontendDecoder::tagged(ctx.target.max_frame);
    let mut out = BytesMut::with_capacity(8192);
    let mut skipping = false;
    let mut statement_timeout: Option<Duration> = None;
    loop {
        // While the session writer is behind, the agent's next message waits (backpressure);
        // once it has stopped, the connection ends: nothing the agent sends could be recorded.
        ctx.gate.store.room(ctx.peer.share).await?;
        let Some(frame) = read_frontend(&mut client, &mut buf, &mut dec).await? else {
            let _ = upstream.shutdown().await;
            return Ok(());
        };
        *bytes += frame.raw.len() as u64;
        // After an error the server discards every message up to Sync; after a denial the gate
        // does the same with what it has not sent (a Query too: it must not run).
        if skipping
            && !matches!(
                frame.msg,
                FrontendMessage::Sync | FrontendMessage::Terminate
            )
        {
            // A Flush still goes: the server would answer what came before the refused message
            // and then report the refusal, and the agent may wait for both before its Sync.
            if matches!(frame.msg, FrontendMessage::Flush) {
                out.extend_from_slice(&frame.raw);
            }
            flush_judged(&mut upstream, &mut out, &buf).await?;
            continue;
        }
        let mut wake = false;
        let mut held = None;
        // (The guard is a temporary of this statement: released before any await below.)
        let pre = before_judging(ctx, &mut lock(state), &frame.msg)?;
        match pre {
            Pre::Judge => {}
            Pre::Drop => {
                flush_judged(&mut upstream, &mut out, &buf).await?;
                continue;
            }
            Pre::Refused => {
                skipping = true;
                notify.notify_one();
                flush_judged(&mut upstream, &mut out, &buf).await?;
                continue;
            }
        }
        // A text over the query limits is refused before anything parses it.
        let over = match &frame.msg {
            FrontendMessage::Query { sql: text } | FrontendMessage::Parse { query: text, .. } => {
                over_limits(ctx, text)
            }
            _ => None,
        };
        // Judged before the state is locked: the catalog may be asked.
        let mut judgement = match &frame.msg {
            FrontendMessage::Query { sql: text } | FrontendMessage::Parse { query: text, .. }
                if over.is_none() =>
            {
                Some(judge(ctx, text).await)
            }
            _ => None,
        };
        {
            let mut st = lock(state);
            match &frame.msg {
                FrontendMessage::Query { sql } if let Some(message) = &over => {
                    refuse_unjudged(ctx, "simple", sql, message);
                    st.queue.push_back(Expect::Synthetic(error_frame_with(
                        SQLSTATE_PROGRAM_LIMIT_EXCEEDED,
                        message,
                    )));
                    inject(&mut st, &mut out)?;
                    wake = true;
                }
                FrontendMessage::Query { sql } => {
                    let Judgement {
                        qd,
                        mut judged,
                        role_grants: grants,
                        ..
                    } = current(ctx, sql, judgement.take());
                    if qd
                        .statements
                        .iter()
                        .any(|s| cursor_use(&s.facts) == CursorUse::Move)
                        && let Some(g) = st.ended_cursor_grant(ctx)
                    {
                        judged = Judged::Deny(cursor_grant_ended(g));
                    }
                    match judged {
                        Judged::Allow { note } => {
                            let reviewed = note.map(|message| Reviewed {
                                decision: "allow",
                                message,
                            });
                            statement_timeout = statement_timeout_of(&qd, statement_timeout);
                            let recs = record_query(ctx, "simple", sql, &qd, reviewed.as_ref());
                            st.queue.push_back(Expect::Query(QueryRun {
                                recs,
                                idx: 0,
                                plan: None,
                            }));
                            st.query_sent(&qd, &grants);
                            out.extend_from_slice(&frame.raw);
                        }
                        Judged::Deny(message) => {
                            for r in record_query(ctx, "simple", sql, &qd, None) {
                                finish(ctx, r, None, Some(message.clone()));
                            }
                            st.queue.push_back(Expect::Synthetic(error_frame(&message)));
                            inject(&mut st, &mut out)?;
                            wake = true;
                        }
                        Judged::Review { timeout } => {
                            held = Some(Held::Query {
                                raw: frame.raw.clone(),
                                sql: sql.clone(),
                                qd,
                                timeout,
                            });
                        }
                    }
                }
                FrontendMessage::Parse { query, .. } if let Some(message) = &over => {
                    refuse_unjudged(ctx, "extended", query, message);
                    st.queue.push_back(Expect::Synthetic(error_frame_with(
                        SQLSTATE_PROGRAM_LIMIT_EXCEEDED,
                        message,
                    )));
                    skipping = true;
                    wake = true;
                }
                FrontendMessage::Parse { name, query, .. } => {
                    let Judgement {
                        qd,
                        judged,
                        role_grants,
                        verified,
                    } = current(ctx, query, judgement.take());
                    // The server refuses several statements in one Parse: so does the gate,
                    // which would otherwise prepare the first one's decision for all of them.
                    let judged = if qd.statements.len() > 1 {
                        Judged::Deny(format!(
                            "agentgate: a prepared statement holds one statement, this one holds {}",
                            qd.statements.len()
                        ))
                    } else {
                        judged
                    };
                    match judged {
                        // A statement under review is prepared; each Execute of it is held.
                        Judged::Allow { .. } | Judged::Review { .. } => {
                            let first = qd.statements.first();
                            let decision = first
                                .map(|s| s.decision.clone())
                                .unwrap_or(qd.decision.clone());
                            let prepared = Arc::new(Prepared {
                                text: query.as_str().into(),
                                kind: first.map(|s| s.facts.kind.as_str()),
                                tables: first.map(|s| s.facts.tables.clone()).unwrap_or_default(),
                                functions: first
                                    .map(|s| s.facts.functions.clone())
                                    .unwrap_or_default(),
                                decision,
                                role_grants,
                                plans: Mutex::new(Vec::new()),
                                changes_prepared: changes_prepared(&qd),
                                changes_portals: changes_portals(&qd),
                                cursors: first.map_or(CursorUse::None, |s| cursor_use(&s.facts)),
                                charge: Charge::new(&st.budget, parse_cost(name, query)),
                                verified,
                            });
                            let previous = st.statements.insert(name, prepared.clone());
                            st.queue.push_back(Expect::Parse {
                                injected: false,
                                name: name.clone(),
                                previous,
                            });
                            out.extend_from_slice(&frame.raw);
                            // Shadow-mode would-be denials are recorded at Parse.
                            if qd
                                .statements
                                .iter()
                                .any(|s| s.decision.shadow && !s.decision.verdict.is_allow())
                            {
                                for r in record_query(ctx, "extended", query, &qd, None) {
                                    finish(ctx, r, None, None);
                                }
                            }
                        }
                        Judged::Deny(message) => {
                            // The server never sees this Parse: whatever it had under the name stays.
                            for r in record_query(ctx, "extended", query, &qd, None) {
                                finish(ctx, r, None, Some(message.clone()));
                            }
                            st.queue.push_back(Expect::Synthetic(error_frame(&message)));
                            skipping = true;
                            wake = true;
                        }
                    }
                }
                FrontendMessage::Bind {
                    portal,
                    statement,
                    param_formats,
                    params,
                    result_formats,
                } => {
                    let prepared = st.statements.get(statement).cloned();
                    let reviewed = keeps_params(prepared.as_ref());
                    let charge = Charge::new(
                        &st.budget,
                        bind_cost(portal, result_formats, params, param_formats, reviewed),
                    );
                    let bound = Arc::new(Portal {
                        prepared,
                        formats: result_formats.clone(),
                        // Copied: a slice would keep the whole read buffer it came from alive
                        // for as long as the portal is bound.
                        params: if reviewed {
                            params
                                .iter()
                                .map(|p| p.as_deref().map(Bytes::copy_from_slice))
                                .collect()
                        } else {
                            Vec::new()
                        },
                        param_formats: if reviewed {
                            param_formats.clone()
                        } else {
                            Vec::new()
                        },
                        columns: Mutex::new(None),
                        described: AtomicBool::new(false),
                        charge,
                    });
                    let previous = st.portals.insert(portal, bound);
                    st.queue.push_back(Expect::Bind {
                        injected: false,
                        name: portal.clone(),
                        previous,
                    });
                    out.extend_from_slice(&frame.raw);
                }
                FrontendMessage::Execute { portal, .. } => {
                    let bound = st.portals.get(portal).cloned();
                    let prepared = bound.as_ref().and_then(|p| p.prepared.clone());
                    if let Some(p) = &prepared {
                        if p.changes_prepared {
                            st.forget_statements();
                        }
                        if p.changes_portals {
                            st.forget_portals();
                        }
                    }
                    match prepared {
                        Some(p) => {
                            let (decision, mut denied) = match rejudged(ctx, &p) {
                                Some((d, denial)) => (std::borrow::Cow::Owned(d), denial),
                                None => (std::borrow::Cow::Borrowed(&p.decision), None),
                            };
                            if p.cursors == CursorUse::Move
                                && let Some(g) = st.ended_cursor_grant(ctx)
                            {
                                denied.get_or_insert_with(|| cursor_grant_ended(g));
                            }
                            let (grant, rule_ids) = match decision.enforced_verdict() {
                                Verdict::Review { .. } => rule_grants(ctx, &[&decision])
                                    .map_or((None, Vec::new()), |(n, ids)| (Some(n), ids)),
                                _ => (None, Vec::new()),
                            };
                            match (denied, decision.enforced_verdict(), grant) {
                                (Some(message), _, _) => {
                                    let rec = record_execute(ctx, &p, &decision, None);
                                    finish(ctx, rec, None, Some(message.clone()));
                                    st.queue.push_back(Expect::Synthetic(error_frame(&message)));
                                    skipping = true;
                                    wake = true;
                                }
                                (None, Verdict::Review { timeout }, None) => {
                                    let decision = decision.into_owned();
                                    held = Some(Held::Execute {
                                        raw: frame.raw.clone(),
                                        name: portal.clone(),
                                        portal: bound,
                                        prepared: p,
                                        decision,
                                        timeout,
                                    });
                                }
                                (None, _, note) => {
                                    let reviewed = note.map(|message| Reviewed {
                                        decision: "allow",
                                        message,
                                    });
                                    let rec = record_execute(ctx, &p, &decision, reviewed.as_ref());
                                    send_execute(
                                        &mut st, &mut out, rec, bound, portal, &frame.raw,
                                    )?;
                                    let mut grants = p.role_grants.clone();
                                    grants.extend(rule_ids);
                                    st.cursor_sent(p.cursors, &grants);
                                    st.copy_pending |= p.kind == Some(StatementKind::Copy.as_str());
                                }
                            }
                        }
                        // A portal the gate cannot tie to a statement it judged (never bound, bound
                        // to a statement the gate did not see prepared, or closed as far as the
                        // gate knows): the server might still run something under that name,
                        // unjudged and unmasked. Refused, as after a denied Parse.
                        None => {
                            let message = format!(
                                "agentgate: portal \"{portal}\" is not bound to a statement the gate judged"
                            );
                            refuse_unjudged(
                                ctx,
                                "extended",
                                "<execute of an unknown portal>",
                                &message,
                            );
                            st.queue.push_back(Expect::Synthetic(error_frame(&message)));
                            skipping = true;
                            wake = true;
                        }
                    }
                }
                FrontendMessage::Describe { kind, name } => {
                    let what = match kind {
                        Target::Statement => Described::Statement,
                        Target::Portal => Described::Portal(st.portals.get(name).cloned()),
                    };
                    if let Described::Portal(Some(p)) = &what {
                        p.described.store(true, Ordering::Relaxed);
                    }
                    st.queue.push_back(Expect::Describe {
                        what,
                        internal: false,
                    });
                    out.extend_from_slice(&frame.raw);
                }
                FrontendMessage::Close { kind, name } => {
                    match kind {
                        Target::Statement => st.statements.remove(name).map(|_| ()),
                        Target::Portal => st.portals.remove(name).map(|_| ()),
                    };
                    st.queue.push_back(Expect::Close);
                    out.extend_from_slice(&frame.raw);
                }
                FrontendMessage::Sync => {
                    if skipping {
                        skipping = false;
                        inject(&mut st, &mut out)?;
                    } else {
                        // Sent after a COPY and before its CopyInResponse: ignored if the COPY
                        // starts (every such Sync, not only the first).
                        let ignored_in_copy = st.copy_pending;
                        st.queue.push_back(Expect::Sync { ignored_in_copy });
                        out.extend_from_slice(&frame.raw);
                    }
                }
                FrontendMessage::FunctionCall(_) => {
                    // The fast-path interface calls functions by OID, beyond statement policy.
                    let message = "agentgate: the fast-path function call interface is not allowed";
                    refuse_unjudged(ctx, "function-call", "<fast-path function call>", message);
                    st.queue.push_back(Expect::Synthetic(error_frame(message)));
                    inject(&mut st, &mut out)?;
                    wake = true;
                }
                FrontendMessage::Terminate => {
                    out.extend_from_slice(&frame.raw);
                    drop(st);
                    upstream.write_all(&out).await?;
                    let _ = upstream.shutdown().await;
                    return Ok(());
                }
                // Flush, COPY data and anything else pass through unchanged.
                _ => {
                    if !skipping {
                        out.extend_from_slice(&frame.raw);
                    }
                }
            }
        }
        if let Some(h) = held {
            // What was pipelined before the held statement goes first; then the connection waits.
            if !out.is_empty() {
                upstream.write_all(&out).await?;
                out.clear();
            }
            let ticket = new_ticket(ctx, &h);
            let rule = ticket.rule.clone();
            let Some((id, outcome)) =
                await_approval(ctx, &mut client, &mut buf, ticket, statement_timeout).await?
            else {
                let _ = upstream.shutdown().await;
                return Ok(());
            };
            wake |= settle_held(
                ctx,
                &mut lock(state),
                &mut out,
                &mut skipping,
                h,
                id,
                rule.as_deref(),
                &outcome,
                &mut statement_timeout,
            )?;
        }
        if wake {
            notify.notify_one();
        }
        // Pipelined messages already buffered are judged before the batch is written.
        if !out.is_empty() && !has_frame(&buf) {
            upstream.write_all(&out).await?;
            out.clear();
        }
    }
}

/// Runs or refuses a held statement once its ticket is settled; true if a synthetic response
/// was queued (the server-to-agent side must be woken).
#[allow(clippy::too_many_arguments)]
fn settle_held(
    ctx: &Context<'_>,
    st: &mut State,
    out: &mut BytesMut,
    skipping: &mut bool,
    held: Held,
    ticket: u64,
    rule: Option<&str>,
    outcome: &Outcome,
    statement_timeout: &mut Option<Duration>,
) -> Result<bool, PgError> {
    let approved = match outcome {
        Outcome::Approved { by, reason } => Some(Reviewed {
            decision: "allow",
            message: approved_message(ticket, by, reason.as_deref()),
        }),
        _ => None,
    };
    let (code, message) = refusal(ticket, rule, outcome);
    match (held, approved) {
        // Approved while the server skips everything up to Sync after an earlier error: it
        // would not run, and its expectation would be left behind. Not sent.
        (Held::Query { sql, qd, .. }, Some(reviewed)) if st.server_skipping => {
            let why = "not executed: an earlier message in the pipeline failed";
            for r in record_query(ctx, "simple", &sql, &qd, Some(&reviewed)) {
                finish(ctx, r, None, Some(why.into()));
            }
            Ok(false)
        }
        (
            Held::Execute {
                prepared, decision, ..
            },
            Some(reviewed),
        ) if st.server_skipping => {
            let why = "not executed: an earlier message in the pipeline failed";
            let rec = record_execute(ctx, &prepared, &decision, Some(&reviewed));
            finish(ctx, rec, None, Some(why.into()));
            Ok(false)
        }
        (Held::Query { raw, sql, qd, .. }, Some(reviewed)) => {
            *statement_timeout = statement_timeout_of(&qd, *statement_timeout);
            st.query_sent(&qd, &[]);
            let recs = record_query(ctx, "simple", &sql, &qd, Some(&reviewed));
            st.queue.push_back(Expect::Query(QueryRun {
                recs,
                idx: 0,
                plan: None,
            }));
            out.extend_from_slice(&raw);
            Ok(false)
        }
        (Held::Query { sql, qd, .. }, None) => {
            let reviewed = Reviewed {
                decision: "deny",
                message: message.clone(),
            };
            for r in record_query(ctx, "simple", &sql, &qd, Some(&reviewed)) {
                finish(ctx, r, None, Some(message.clone()));
            }
            st.queue
                .push_back(Expect::Synthetic(error_frame_with(code, &message)));
            inject(st, out)?;
            Ok(true)
        }
        (
            Held::Execute {
                raw,
                name,
                portal,
                prepared,
                decision,
                ..
            },
            Some(reviewed),
        ) => {
            // (Its statement's names were forgotten when the Execute was read, if it changes
            // them; a COPY still has to be followed.)
            st.copy_pending |= prepared.kind == Some(StatementKind::Copy.as_str());
            st.cursor_sent(prepared.cursors, &[]);
            let rec = record_execute(ctx, &prepared, &decision, Some(&reviewed));
            send_execute(st, out, rec, portal, &name, &raw)?;
            Ok(false)
        }
        (
            Held::Execute {
                prepared, decision, ..
            },
            None,
        ) => {
            let reviewed = Reviewed {
                decision: "deny",
                message: message.clone(),
            };
            let rec = record_execute(ctx, &prepared, &decision, Some(&reviewed));
            finish(ctx, rec, None, Some(message.clone()));
            st.queue
                .push_back(Expect::Synthetic(error_frame_with(code, &message)));
            // As after a denied Parse: the rest up to Sync is dropped, then the error statement.
            *skipping = true;
            Ok(true)
        }
    }
}

/// Writes what was judged so far unless another whole frame is already buffered (pipelined
/// messages are judged before the batch is written).
async fn flush_judged<W: AsyncWrite + Unpin>(
    upstream: &mut W,
    out: &mut BytesMut,
    buf: &BytesMut,
) -> Result<(), PgError> {
    if !out.is_empty() && !has_frame(buf) {
        upstream.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

/// Is a whole frame already buffered (tag + length + body)?
fn has_frame(buf: &BytesMut) -> bool {
    match buf.get(1..5).and_then(|b| <[u8; 4]>::try_from(b).ok()) {
        Some(len) => buf.len() > u32::from_be_bytes(len) as usize,
        None => false,
    }
}

/// Releases synthetic responses now at the head of the queue.
fn release_synthetic(st: &mut State, out: &mut BytesMut) {
    while let Some(Expect::Synthetic(_)) = st.queue.front() {
        if let Some(Expect::Synthetic(b)) = st.queue.pop_front() {
            out.extend_from_slice(&b);
        }
    }
}

/// A kept row as the agent saw it; binary results (by the result format codes of the portal)
/// are recorded as hex, not as mangled text.
fn render(values: &[Option<Bytes>], formats: &[i16]) -> Vec<Option<String>> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_ref().map(|b| match format_of(formats, i) {
                Format::Binary => format!(
                    "\\x{}",
                    b.iter().map(|x| format!("{x:02x}")).collect::<String>()
                ),
                _ => String::from_utf8_lossy(b).into_owned(),
            })
        })
        .collect()
}

fn format_of(formats: &[i16], i: usize) -> Format {
    Format::from_code(format_code(formats, i)).unwrap_or(Format::Text)
}

/// The plan a statement's earlier Execute built for the same masks, formats and result columns.
fn cached_plan(s: &Prepared, masks: &Arc<[String]>, portal: &Portal) -> Option<Arc<RowPlan>> {
    let columns = portal
        .columns
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let columns = columns.as_deref()?;
    s.plans
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        // The lists are usually the statement decision's own (same pointer): no string compares.
        .find(|(m, f, c, _, built)| {
            (Arc::ptr_eq(m, masks) || m == masks)
                && *f == portal.formats
                && c.as_slice() == columns
                && fresh(*built)
        })
        .and_then(|(_, _, _, p, _)| p.clone())
}

/// Keeps a plan built for one of `s`'s Executes for the next ones, within the connection's
/// budget for what it keeps (the columns it was built for are kept with it, as the key).
fn remember_plan(s: &Prepared, entry: CachedPlan) {
    let mut plans = s
        .plans
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let cost = |plans: &[CachedPlan]| plans.iter().map(|(.., c, _, _)| columns_cost(c)).sum();
    let old: usize = cost(&plans);
    let mut kept: Vec<CachedPlan> = std::mem::take(&mut *plans)
        .into_iter()
        .filter(|(.., built)| fresh(*built))
        .collect();
    remember(&mut kept, PLANS_PER_STATEMENT, entry);
    let new: usize = cost(&kept);
    if s.charge.budget.fits(new, old) {
        *plans = kept;
        s.charge.replace(old, new);
    } else {
        // Not kept: the next Execute plans again.
        kept.pop();
        let new = cost(&kept);
        *plans = kept;
        s.charge.replace(old, new);
    }
}

/// Builds the masking plan for a result set (resolving table OIDs through the catalog).
async fn plan_for(
    ctx: &Context<'_>,
    masks: &[String],
    fields: &[FieldDescription],
    formats: &[Format],
) -> Result<Option<RowPlan>, PgError> {
    let Some(masker) = ctx.shared.masker.as_ref() else {
        return Ok(None);
    };
    if masks.is_empty() {
        return Ok(None);
    }
    // Each column's table and attribute: a table cached before a column was added is asked
    // again (the cache would otherwise leave that column to its alias).
    let wanted: Vec<(u32, i16)> = fields
        .iter()
        .filter(|f| f.table_oid != 0)
        .map(|f| (f.table_oid, f.column_attr))
        .collect();
    let tables = if wanted.is_empty() {
        HashMap::new()
    } else {
        ctx.shared
            .catalog
            .resolve_columns(ctx.gate, ctx.target, &ctx.database, &wanted)
            .await?
    };
    let columns: Vec<ColumnMeta> = fields
        .iter()
        .enumerate()
        .map(|(i, f)| {
            // Attribute 0 is a whole row (`SELECT c FROM customers c`): it holds every column,
            // so it is no column of the table a rule could name.
            let t = (f.column_attr > 0)
                .then(|| tables.get(&f.table_oid))
                .flatten();
            ColumnMeta {
                // The source column's name, so an alias cannot dodge a rule.
                name: t
                    .and_then(|t| t.columns.get(&f.column_attr).cloned())
                    .unwrap_or_else(|| f.name.clone()),
                schema: t.map(|t| t.schema.clone()),
                table: t.map(|t| t.table.clone()),
                type_oid: f.type_oid,
                format: formats.get(i).copied().unwrap_or(Format::Text),
            }
        })
        .collect();
    // A plan that changes nothing is kept all the same: it checks each row's width against the
    // columns it was built for, so rows of another shape than described end the connection
    // instead of passing unmasked.
    Ok(Some(masker.plan(masks, &columns)?))
}

/// The agent's side of the connection, as the server's messages reach it.
struct ToAgent<'a> {
    half: &'a mut tokio::net::tcp::OwnedWriteHalf,
    /// Set while a write is under way: one cut short leaves a message half sent.
    mid_write: &'a AtomicBool,
    /// Set once the agent has hung up: the server's answers are still read and recorded, and
    /// go nowhere.
    gone: &'a AtomicBool,
}

impl ToAgent<'_> {
    /// Writes whole messages.
    async fn send(&mut self, out: &[u8]) -> std::io::Result<()> {
        if self.gone.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.mid_write.store(true, Ordering::Relaxed);
        self.half.write_all(out).await?;
        self.mid_write.store(false, Ordering::Relaxed);
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
async fn server_to_agent<R: AsyncRead + Unpin>(
    ctx: &Context<'_>,
    mut upstream: R,
    mut buf: BytesMut,
    mut dec: BackendDecoder,
    mut client: ToAgent<'_>,
    state: &Mutex<State>,
    notify: &Notify,
    bytes: &mut u64,
) -> Result<(), PgError> {
    let mut out = BytesMut::with_capacity(16384);
    let keep = ctx.target.record_rows;
    let mut query_plans: Vec<QueryPlan> = Vec::new();
    loop {
        release_synthetic(&mut lock(state), &mut out);
        if !out.is_empty() && !has_frame(&buf) {
            client.send(&out).await?;
            *bytes += out.len() as u64;
            out.clear();
        }
        // Messages that arrived together (a whole result often does) are taken from the buffer
        // without arming the wait on the socket and on the other direction each time.
        let frame = match dec.decode(&mut buf)? {
            Some(f) => Some(f),
            None => tokio::select! {
                biased;
                f = read_backend(&mut upstream, &mut buf, &mut dec) => f?,
                () = notify.notified() => continue,
            },
        };
        let Some(frame) = frame else {
            client.send(&out).await?;
            return Ok(());
        };
        // Result columns arriving for a statement that is masked: plan before any row passes.
        if let BackendMessage::RowDescription(fields) = &frame.msg {
            let need = {
                let mut st = lock(state);
                release_synthetic(&mut st, &mut out);
                match st.queue.front() {
                    Some(Expect::Query(q)) => q
                        .recs
                        .get(q.idx)
                        .map(|r| r.masks.clone())
                        .filter(|m| !m.is_empty()),
                    _ => None,
                }
            };
            if let Some(masks) = need {
                // The same masks over the same columns (the RowDescription's bytes name each
                // column's table, attribute, type and format) plan the same: an agent repeating
                // a query does not resolve and plan its columns each time.
                let known = query_plans
                    .iter()
                    .find(|(m, raw, _, built)| *m == masks && *raw == frame.raw && fresh(*built))
                    .map(|(_, _, plan, _)| plan.clone());
                let plan = match known {
                    Some(plan) => plan,
                    None => {
                        let formats: Vec<Format> = fields
                            .iter()
                            .map(|f| Format::from_code(f.format).unwrap_or(Format::Text))
                            .collect();
                        let plan = plan_for(ctx, &masks, fields, &formats).await?.map(Arc::new);
                        query_plans.retain(|(_, _, _, built)| fresh(*built));
                        remember(
                            &mut query_plans,
                            QUERY_PLANS,
                            (masks, frame.raw.clone(), plan.clone(), Instant::now()),
                        );
                        plan
                    }
                };
                if let Some(Expect::Query(q)) = lock(state).queue.front_mut() {
                    q.plan = plan;
                }
            }
        }
        if let BackendMessage::DataRow(_) = &frame.msg {
            // An Execute's plan is built on its first row, from the portal's columns and formats,
            // or taken from its statement's cache.
            let pending = {
                let mut st = lock(state);
                release_synthetic(&mut st, &mut out);
                match st.queue.front_mut() {
                    // Nothing to mask: rows pass as they are.
                    Some(Expect::Execute(x)) if x.plan.is_none() && x.rec.masks.is_empty() => {
                        x.plan = Some(None);
                        None
                    }
                    Some(Expect::Execute(x)) if x.plan.is_none() => {
                        let cached = x
                            .portal
                            .as_ref()
                            .and_then(|p| cached_plan(p.prepared.as_ref()?, &x.rec.masks, p));
                        match cached {
                            Some(plan) => {
                                x.plan = Some(Some(plan));
                                None
                            }
                            None => Some((x.rec.masks.clone(), x.portal.clone())),
                        }
                    }
                    _ => None,
                }
            };
            if let Some((masks, portal)) = pending {
                let formats = portal
                    .as_ref()
                    .map(|p| p.formats.clone())
                    .unwrap_or_default();
                // The portal's own columns (described after its Bind, by the agent or the gate),
                // never its statement's as seen at Parse.
                let fields = portal.as_ref().and_then(|p| columns_of(&p.columns));
                let (plan, fields) = match (&masks[..], fields) {
                    ([], _) => (None, Vec::new()),
                    (_, Some(fields)) => {
                        let fmts: Vec<Format> =
                            (0..fields.len()).map(|i| format_of(&formats, i)).collect();
                        let plan = plan_for(ctx, &masks, &fields, &fmts).await?.map(Arc::new);
                        (plan, fields)
                    }
                    // Masking applies but the columns are unknown: refuse rather than leak.
                    (_, None) => {
                        return Err(PgError::Protocol(
                            "result columns unknown for a masked statement".into(),
                        ));
                    }
                };
                if let Some(s) = portal.as_ref().and_then(|p| p.prepared.as_ref())
                    && plan.is_some()
                {
                    remember_plan(s, (masks, formats, fields, plan.clone(), Instant::now()));
                }
                if let Some(Expect::Execute(x)) = lock(state).queue.front_mut() {
                    x.plan = Some(plan);
                }
            }
        }
        let mut st = lock(state);
        on_backend(ctx, &mut st, frame, &mut out, keep)?;
    }
}

/// The mask profiles of the statement whose response is arriving (a Query's current statement
/// or an Execute's).
fn current_masks(st: &State) -> Option<&Arc<[String]>> {
    match st.queue.front() {
        Some(Expect::Query(q)) => q.recs.get(q.idx).map(|r| &r.masks),
        Some(Expect::Execute(x)) => Some(&x.rec.masks),
        _ => None,
    }
}

/// The statement whose response is arriving is masked.
fn current_statement_masked(st: &State) -> bool {
    current_masks(st).is_some_and(|m| !m.is_empty())
}

/// What the server says now may quote a masked statement's data: that statement is the one
/// answering, or a masked statement has run in the current transaction. The checks of deferred
/// constraints quote what it wrote (`Key (ssn)=(...) already exists`), and they run not only at
/// a `COMMIT` or `SET CONSTRAINTS ... IMMEDIATE` but inside a procedure or `DO` block that
/// commits, at the end of a simple query string run as an implicit transaction (before its
/// last statement's CommandComplete, while that statement is still the one answering), and at
/// the Sync that commits an implicit extended-protocol transaction. Rather than follow each,
/// everything until the transaction ends (the idle ReadyForQuery) is treated as masked.
fn may_quote_masked(st: &State) -> bool {
    st.masked_in_transaction || current_statement_masked(st)
}

/// Whether an error of a masked statement may quote the data it read. Almost any class can:
/// data exceptions quote the value (`invalid input syntax for type integer: "123-45-6789"`),
/// integrity violations name the key, and a value cast to a name (`ssn::regclass`,
/// `current_setting(ssn)`) comes back inside "relation ... does not exist" or "unrecognized
/// configuration parameter". So every message is withheld except those of a few conditions
/// whose text is constant or names only the statement's own objects.
fn may_quote_data(e: &ErrorFields) -> bool {
    const PLAIN: [&str; 11] = [
        "22012", // division by zero
        "57014", // canceling statement due to ...
        "25P02", // current transaction is aborted
        "25001", "25006", // active / read-only transaction
        "40001", "40P01", // serialization failure, deadlock
        "42501", // permission denied for <object>
        "53100", "53200", "53300", // out of disk, memory, connections
    ];
    !e.code().is_some_and(|c| PLAIN.contains(&c))
}

/// An error or notice of a masked statement with only its severity and SQLSTATE kept.
fn withheld(e: &ErrorFields) -> ErrorFields {
    use crate::protocol::postgres::backend::field;
    let code = e.code().unwrap_or("XX000");
    let mut out = ErrorFields::new(
        e.fields()
            .iter()
            .filter(|(c, _)| {
                [field::SEVERITY, field::SEVERITY_NONLOCALIZED, field::CODE].contains(c)
            })
            .cloned()
            .collect(),
    );
    out.push(
        field::MESSAGE,
        format!(
            "agentgate: the server's message is withheld: it may quote data this masked statement read (SQLSTATE {code})"
        ),
    );
    out
}

fn out_of_step(what: &str) -> PgError {
    PgError::Protocol(format!(
        "the server sent {what} for no statement the gate expects; closing rather than passing rows unjudged"
    ))
}

/// After a server error in the extended protocol the server skips everything up to Sync: so do
/// the expectations (their view updates are rolled back, their statements recorded as not run).
fn pop_until_sync(ctx: &Context<'_>, st: &mut State) {
    let mut skipped = Vec::new();
    while let Some(front) = st.queue.front() {
        if matches!(front, Expect::Sync { .. }) {
            break;
        }
        match st.queue.pop_front() {
            Some(Expect::Execute(x)) => {
                let why = "not executed: an earlier message in the pipeline failed";
                finish(ctx, x.rec, None, Some(why.into()));
            }
            Some(Expect::Query(q)) => {
                for r in q.recs.into_iter().skip(q.idx) {
                    let why = "not executed: an earlier message in the pipeline failed";
                    finish(ctx, r, None, Some(why.into()));
                }
            }
            Some(e) => skipped.push(e),
            None => break,
        }
    }
    st.revert(skipped);
    // No Sync queued: the agent has not sent it yet, and the server discards what comes first.
    if st.queue.is_empty() {
        st.server_skipping = true;
    }
}

fn on_backend(
    ctx: &Context<'_>,
    st: &mut State,
    frame: crate::protocol::postgres::Frame<BackendMessage>,
    out: &mut BytesMut,
    keep: usize,
) -> Result<(), PgError> {
    use BackendMessage as B;
    st.masked_in_transaction |= current_statement_masked(st);
    if st.copy_in && matches!(frame.msg, B::CommandComplete { .. } | B::ErrorResponse(_)) {
        // The server left COPY (done, or failed): what follows is read normally again.
        st.copy_in = false;
    }
    if let B::CommandComplete { tag } = &frame.msg
        && (tag == "CLOSE CURSOR ALL" || tag == "DISCARD ALL")
    {
        st.cursors_closed();
    }
    match frame.msg {
        B::ParseComplete => {
            if let Some(Expect::Parse { injected, .. }) = st.queue.front() {
                let injected = *injected;
                st.queue.pop_front();
                if injected {
                    return Ok(());
                }
            }
        }
        B::BindComplete => {
            if let Some(Expect::Bind { injected, .. }) = st.queue.front() {
                let injected = *injected;
                st.queue.pop_front();
                if injected {
                    return Ok(());
                }
            }
        }
        B::CloseComplete => {
            if matches!(st.queue.front(), Some(Expect::Close)) {
                st.queue.pop_front();
            }
        }
        B::ParameterDescription(_) => {
            if let Some(Expect::Describe { internal: true, .. }) = st.queue.front() {
                return Ok(());
            }
        }
        B::RowDescription(fields) => match st.queue.front() {
            Some(Expect::Describe { .. }) => {
                if let Some(Expect::Describe { what, internal }) = st.queue.pop_front() {
                    match what {
                        // A statement's columns are not kept: its Executes are masked by their
                        // portals' (see `send_execute`).
                        Described::Portal(Some(p)) => set_columns(&p.columns, &p.charge, fields)?,
                        Described::Statement | Described::Portal(None) => {}
                    }
                    if internal {
                        return Ok(());
                    }
                }
            }
            Some(Expect::Query(_)) => {
                let Some(Expect::Query(q)) = st.queue.front_mut() else {
                    return Err(out_of_step("RowDescription"));
                };
                // Columns beyond the statements the gate judged in this query: out of step.
                let Some(r) = q.recs.get_mut(q.idx) else {
                    return Err(out_of_step("RowDescription"));
                };
                r.columns = fields.into_iter().map(|f| f.name).collect();
            }
            // Result columns for nothing the gate sent: its view of the session is out of step,
            // and rows that follow could not be tied to a statement's masks.
            _ => return Err(out_of_step("RowDescription")),
        },
        // Judging refuses statements that change these; should one change anyway, later
        // statements would be read by the server differently from how the gate judged them.
        B::ParameterStatus {
            ref name,
            ref value,
        } if (name == "client_encoding" && value != "UTF8")
            || (name == "standard_conforming_strings"
                && (value == "on") != ctx.standard_strings) =>
        {
            return Err(PgError::Protocol(format!(
                "the server's {name} changed to {value}; the gate no longer reads statements as the server does"
            )));
        }
        B::CopyInResponse { .. } => {
            // Unless the agent already sent the COPY's end (it streamed without waiting).
            st.copy_in = st.copy_pending;
            while matches!(
                st.queue.get(1),
                Some(Expect::Sync {
                    ignored_in_copy: true
                })
            ) {
                st.queue.remove(1);
            }
        }
        // Judging refuses COPY ... TO STDOUT under masking; this is the backstop.
        B::CopyOutResponse { .. } | B::CopyBothResponse { .. } if current_statement_masked(st) => {
            return Err(PgError::Protocol(
                "COPY data of a masked statement cannot be masked".into(),
            ));
        }
        B::NoData => {
            if let Some(Expect::Describe { .. }) = st.queue.front()
                && let Some(Expect::Describe { internal, .. }) = st.queue.pop_front()
                && internal
            {
                return Ok(());
            }
        }
        B::DataRow(mut values) => {
            // Result formats: a simple query's rows are text; an Execute's are its portal's.
            let (plan, rec, formats) = match st.queue.front_mut() {
                Some(Expect::Query(q)) => {
                    let idx = q.idx;
                    let Some(rec) = q.recs.get_mut(idx) else {
                        return Err(out_of_step("DataRow"));
                    };
                    (q.plan.as_deref(), Some(rec), None)
                }
                Some(Expect::Execute(x)) => {
                    let ExecRun { rec, plan, portal } = &mut **x;
                    (
                        plan.as_ref().and_then(Option::as_ref).map(AsRef::as_ref),
                        Some(rec),
                        portal.as_deref().map(|p| p.formats.as_slice()),
                    )
                }
                _ => return Err(out_of_step("DataRow")),
            };
            let mut changed = false;
            if let Some(plan) = plan {
                changed = plan.apply(&mut values)?.changed;
            }
            if let Some(rec) = rec {
                rec.rows += 1;
                rec.masked |= changed;
                if rec.kept.len() < keep {
                    rec.kept.push(render(&values, formats.unwrap_or_default()));
                }
            }
            if changed {
                B::DataRow(values).encode(out)?;
            } else {
                out.extend_from_slice(&frame.raw);
            }
            return Ok(());
        }
        B::CommandComplete { tag } => match st.queue.front_mut() {
            Some(Expect::Query(q)) => {
                let idx = q.idx;
                q.idx += 1;
                q.plan = None;
                if let Some(r) = q.recs.get_mut(idx) {
                    let r = std::mem::replace(r, Rec::new(None, Arc::default()));
                    finish(ctx, r, Some(tag), None);
                }
            }
            Some(Expect::Execute(_)) => {
                if let Some(Expect::Execute(x)) = st.queue.pop_front() {
                    finish(ctx, x.rec, Some(tag), None);
                }
            }
            _ => {}
        },
        B::EmptyQueryResponse | B::PortalSuspended => match st.queue.front_mut() {
            Some(Expect::Query(q)) => q.idx += 1,
            Some(Expect::Execute(_)) => {
                if let Some(Expect::Execute(x)) = st.queue.pop_front() {
                    finish(ctx, x.rec, None, None);
                }
            }
            _ => {}
        },
        B::NoticeResponse(ref n) if may_quote_masked(st) && may_quote_data(n) => {
            B::NoticeResponse(withheld(n)).encode(out)?;
            return Ok(());
        }
        B::ErrorResponse(ref e) => {
            // Under masking the error may quote what the statement read: the agent and the
            // record get the withheld version.
            let scrubbed = (may_quote_masked(st) && may_quote_data(e)).then(|| withheld(e));
            let e = scrubbed.as_ref().unwrap_or(e);
            let message = e.message().unwrap_or("error").to_string();
            match st.queue.front_mut() {
                Some(
                    Expect::InjectedExecute
                    | Expect::Parse { injected: true, .. }
                    | Expect::Bind { injected: true, .. },
                ) => {
                    pop_until_sync(ctx, st);
                    return Ok(());
                }
                Some(Expect::Query(q)) => {
                    let idx = q.idx;
                    q.idx += 1;
                    if let Some(r) = q.recs.get_mut(idx) {
                        let r = std::mem::replace(r, Rec::new(None, Arc::default()));
                        finish(ctx, r, None, Some(message));
                    }
                    // The rest of the query string is not run; their records end at ReadyForQuery.
                }
                Some(Expect::Execute(_)) => {
                    if let Some(Expect::Execute(x)) = st.queue.pop_front() {
                        finish(ctx, x.rec, None, Some(message));
                    }
                    pop_until_sync(ctx, st);
                }
                Some(
                    Expect::Parse { .. }
                    | Expect::Bind { .. }
                    | Expect::Describe { .. }
                    | Expect::Close
                    | Expect::Synthetic(_),
                ) => {
                    pop_until_sync(ctx, st);
                }
                Some(Expect::Sync { .. }) | None => {}
            }
            if let Some(fields) = scrubbed {
                B::ErrorResponse(fields).encode(out)?;
                return Ok(());
            }
        }
        B::ReadyForQuery { status } => {
            let mut skipped = Vec::new();
            while let Some(e) = st.queue.pop_front() {
                match e {
                    Expect::Sync { .. } => break,
                    Expect::Query(q) => {
                        for r in q.recs.into_iter().skip(q.idx) {
                            finish(
                                ctx,
                                r,
                                None,
                                Some(
                                    "not executed: an earlier statement in the query failed".into(),
                                ),
                            );
                        }
                        break;
                    }
                    Expect::Execute(x) => finish(ctx, x.rec, None, Some("not executed".into())),
                    Expect::Synthetic(b) => out.extend_from_slice(&b),
                    // Never answered before this ReadyForQuery: the server skipped them.
                    e @ (Expect::Parse { .. } | Expect::Bind { .. }) => skipped.push(e),
                    _ => {}
                }
            }
            st.revert(skipped);
            if status == TransactionStatus::Idle {
                st.forget_ended_portals();
                st.masked_in_transaction = false;
            }
        }
        _ => {}
    }
    out.extend_from_slice(&frame.raw);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{
        CursorUse, Names, State, changes_prepared, cursor_use, parse_statement_timeout, render,
    };
    use bytes::Bytes;
    use std::time::Duration;

    #[test]
    #[allow(clippy::unwrap_used)]
    fn sql_level_prepare_deallocate_and_discard_are_noticed() {
        #[derive(serde::Deserialize)]
        struct File {
            policies: Vec<crate::policy::PolicyConfig>,
        }
        let file: File = serde_norway::from_str(
            "policies:\n  - { name: p, roles: [r], targets: [db], default: allow, rules: [] }\n",
        )
        .unwrap();
        let set = crate::policy::compile(file.policies).unwrap();
        let roles = vec!["r".to_string()];
        let subject = crate::policy::Subject {
            agent: "a",
            roles: &roles,
        };
        let changes = |sql: &str| changes_prepared(&set.decide_query(&subject, "db", sql));
        for sql in [
            "PREPARE s AS SELECT 1",
            "deallocate s",
            "DEALLOCATE ALL",
            "DISCARD ALL",
            "SELECT 1; prepare q AS SELECT 2",
        ] {
            assert!(changes(sql), "{sql}");
        }
        for sql in ["SELECT 'prepare'", "EXECUTE s", "SELECT prepared FROM t"] {
            assert!(!changes(sql), "{sql}");
        }
    }

    #[test]
    fn ticket_facts_name_tables_as_approvers_read_them() {
        use crate::policy::{Access, Decision, TableRef, Verdict};
        let decision = Decision {
            verdict: Verdict::Review {
                timeout: Duration::from_secs(60),
            },
            policy: Some("analysts".into()),
            rule: Some("unbounded-writes".into()),
            mask: Default::default(),
            shadow: false,
        };
        let tables = [TableRef {
            schema: Some("crm".into()),
            name: "customers".into(),
            access: Access::Write,
        }];
        assert_eq!(
            super::statement_facts_json(Some("update"), &tables, &["now".into()], &decision),
            serde_json::json!({
                "kind": "update",
                "tables": ["crm.customers (write)"],
                "functions": ["now"],
                "verdict": "review",
                "rule": "unbounded-writes",
            })
        );
    }

    #[test]
    fn a_close_all_forgets_only_the_cursors_declared_before_it() {
        let mut st = State::default();
        st.cursor_sent(CursorUse::Declare, &[1]);
        st.cursor_sent(CursorUse::CloseAll, &[]);
        // Pipelined after the CLOSE ALL, answered after it: still open.
        st.cursor_sent(CursorUse::Declare, &[2]);
        st.cursor_sent(CursorUse::Declare, &[]);
        st.cursor_sent(CursorUse::CloseAll, &[]);
        st.cursors_closed();
        assert_eq!(st.cursor_grants.keys().copied().collect::<Vec<_>>(), [2]);
        // The second one failed (no completion); a third that completes closes no more than
        // the second would have.
        st.cursor_sent(CursorUse::Declare, &[3]);
        st.cursor_sent(CursorUse::CloseAll, &[]);
        st.cursors_closed();
        assert_eq!(st.cursor_grants.keys().copied().collect::<Vec<_>>(), [3]);
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn cursor_statements_are_told_apart() {
        let facts = |sql: &str| {
            crate::policy::facts::extract(sql)
                .unwrap()
                .into_iter()
                .next()
                .unwrap()
        };
        for (sql, want) in [
            ("DECLARE c CURSOR FOR SELECT 1", CursorUse::Declare),
            ("fetch all from c", CursorUse::Move),
            ("MOVE 1 IN c", CursorUse::Move),
            ("CLOSE ALL", CursorUse::CloseAll),
            ("DISCARD ALL", CursorUse::CloseAll),
            ("CLOSE c", CursorUse::None),
            ("DISCARD PLANS", CursorUse::None),
            ("SELECT 1", CursorUse::None),
        ] {
            assert_eq!(cursor_use(&facts(sql)), want, "{sql}");
        }
    }

    #[test]
    fn unnamed_and_named_entries_are_kept_apart() {
        let mut names = Names::default();
        assert_eq!(names.insert("", 1), None);
        assert_eq!(names.insert("s1", 2), None);
        assert_eq!(names.get(""), Some(&1));
        assert_eq!(names.get("s1"), Some(&2));
        assert_eq!(names.get("s2"), None);
        // Re-binding the unnamed one replaces it and hands back what it held.
        assert_eq!(names.insert("", 3), Some(1));
        assert_eq!(names.remove(""), Some(3));
        assert_eq!(names.get(""), None);
        assert_eq!(names.get("s1"), Some(&2));
        assert_eq!(names.remove("s1"), Some(2));
        assert_eq!(names.remove("s1"), None);
    }

    #[test]
    fn names_are_one_entry_when_their_first_63_bytes_are() {
        let mut names = Names::default();
        let base = "n".repeat(63);
        assert_eq!(names.insert(&format!("{base}X"), 1), None);
        // The server compares 63 bytes: `...Y` and the bare 63 bytes are the same object.
        assert_eq!(names.get(&format!("{base}Y")), Some(&1));
        assert_eq!(names.insert(&base, 2), Some(1));
        // Cut inside a character: 31 times "é" then the first byte of "é" or "ü".
        let e = "é".repeat(32);
        let u = format!("{}ü", "é".repeat(31));
        assert_eq!(names.insert(&e, 3), None);
        assert_eq!(names.remove(&u), Some(3));
        // A shorter name is its own.
        assert_eq!(names.get(&base[..62]), None);
        names.forget_all_but(&[format!("{base}Z")]);
        assert_eq!(names.get(&base), Some(&2));
        names.forget_all_but(&[]);
        assert_eq!(names.get(&base), None);
    }

    #[test]
    fn kept_rows_render_binary_values_as_hex() {
        let row = [
            Some(Bytes::from_static(b"\xde\xad")),
            None,
            Some(Bytes::from_static(b"42")),
        ];
        let s = |v: &str| Some(v.to_string());
        // No codes (a simple query, or Bind asking for text): every column is text.
        assert_eq!(
            render(&row, &[]),
            [s(&String::from_utf8_lossy(b"\xde\xad")), None, s("42")]
        );
        // One code applies to every column.
        assert_eq!(render(&row, &[1]), [s("\\xdead"), None, s("\\x3432")]);
        // One code per column.
        assert_eq!(render(&row, &[1, 0, 0]), [s("\\xdead"), None, s("42")]);
    }

    #[test]
    fn statement_timeout_settings() {
        let s = |t: &str| parse_statement_timeout(t);
        assert_eq!(
            s("SET statement_timeout = 1500"),
            Some(Some(Duration::from_millis(1500)))
        );
        assert_eq!(
            s("SET statement_timeout = '1s'"),
            Some(Some(Duration::from_secs(1)))
        );
        assert_eq!(
            s("SET SESSION statement_timeout TO '2min'"),
            Some(Some(Duration::from_secs(120)))
        );
        assert_eq!(
            s("set statement_timeout to '250ms';"),
            Some(Some(Duration::from_millis(250)))
        );
        assert_eq!(s("SET statement_timeout = 0"), Some(None));
        assert_eq!(s("SET statement_timeout = DEFAULT"), Some(None));
        assert_eq!(s("RESET statement_timeout"), Some(None));
        assert_eq!(s("RESET ALL"), Some(None));
        assert_eq!(s("SET LOCAL statement_timeout = 100"), None);
        assert_eq!(s("SET lock_timeout = 100"), None);
        assert_eq!(s("SET statement_timeout = 'soon'"), None);
        assert_eq!(s("RESET search_path"), None);
    }
}
