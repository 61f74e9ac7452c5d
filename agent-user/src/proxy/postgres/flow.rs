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

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::super::{Gate, Peer};
use super::upstream::{Upstream, read_backend, read_frontend};
use super::{PgError, PgTarget, Shared};
use crate::mask::{ColumnMeta, Format, RowPlan};
use crate::policy::{
    CopyDirection, Decision, ExtractOptions, QueryDecision, StatementKind, Subject, Verdict,
};
use crate::protocol::postgres::{
    BackendDecoder, BackendMessage, FieldDescription, FrontendDecoder, FrontendMessage, Target,
    insufficient_privilege,
};
use crate::session::{StatementEnd, StatementStart};

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
    id: Option<i64>,
    started: Instant,
    masks: Vec<String>,
    rows: u64,
    kept: Vec<Vec<Option<String>>>,
    columns: Vec<String>,
    masked: bool,
    error: Option<String>,
}

impl Rec {
    fn new(id: Option<i64>, masks: Vec<String>) -> Rec {
        Rec {
            id,
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
    plan: Option<RowPlan>,
}

struct ExecRun {
    rec: Rec,
    /// The portal as bound when the Execute was sent (a pipelined re-Bind must not change it).
    portal: Option<Arc<Portal>>,
    plan: Option<Option<RowPlan>>,
}

/// Whose columns a Describe answers.
enum Described {
    Statement(Option<Arc<Prepared>>),
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
    Sync,
    /// A response the gate produces itself, released when it reaches the head of the queue.
    Synthetic(Bytes),
}

struct Prepared {
    text: String,
    decision: Decision,
    kind: Option<String>,
    tables: Vec<String>,
    functions: Vec<String>,
    columns: Mutex<Option<Vec<FieldDescription>>>,
}

struct Portal {
    prepared: Option<Arc<Prepared>>,
    formats: Vec<i16>,
    columns: Mutex<Option<Vec<FieldDescription>>>,
}

fn columns_of(m: &Mutex<Option<Vec<FieldDescription>>>) -> Option<Vec<FieldDescription>> {
    m.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

fn set_columns(m: &Mutex<Option<Vec<FieldDescription>>>, fields: &[FieldDescription]) {
    *m.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(fields.to_vec());
}

/// The gate's view of the server's prepared statements and portals. Updated when a message is
/// sent (later pipelined messages refer to it) and rolled back when the server refuses or skips
/// the message; a denied Parse never touches it, since the server never sees it.
#[derive(Default)]
struct State {
    queue: VecDeque<Expect>,
    statements: HashMap<String, Arc<Prepared>>,
    portals: HashMap<String, Arc<Portal>>,
}

impl State {
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
                        self.statements.insert(name, p);
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
                        self.portals.insert(name, p);
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

pub async fn run(
    ctx: &Context<'_>,
    client: TcpStream,
    cbuf: BytesMut,
    up: Upstream,
) -> (u64, u64, Option<String>) {
    let (client_r, client_w) = client.into_split();
    let (up_r, up_w) = tokio::io::split(up.stream);
    let state = Mutex::new(State::default());
    let notify = Notify::new();
    let mut up_bytes = 0u64;
    let mut down_bytes = 0u64;
    let result = {
        let from_agent = agent_to_server(ctx, client_r, cbuf, up_w, &state, &notify, &mut up_bytes);
        let from_server = server_to_agent(
            ctx,
            up_r,
            up.buf,
            up.decoder,
            client_w,
            &state,
            &notify,
            &mut down_bytes,
        );
        tokio::select! {
            r = from_agent => r,
            r = from_server => r,
        }
    };
    // Statements still in flight when the connection ended.
    for e in lock(&state).queue.drain(..) {
        match e {
            Expect::Query(q) => {
                for r in q.recs.into_iter().skip(q.idx) {
                    finish(
                        ctx,
                        r,
                        None,
                        Some("connection closed before the statement completed".into()),
                    );
                }
            }
            Expect::Execute(x) => finish(
                ctx,
                x.rec,
                None,
                Some("connection closed before the statement completed".into()),
            ),
            _ => {}
        }
    }
    (up_bytes, down_bytes, result.err().map(|e| e.to_string()))
}

fn deny_message(d: &Decision, verdict: &Verdict) -> String {
    let rule = d.rule.as_deref().unwrap_or("default");
    let policy = d.policy.as_deref().unwrap_or("-");
    match verdict {
        Verdict::Deny { message } => {
            format!("agentgate: denied by rule \"{rule}\" of policy \"{policy}\": {message}")
        }
        Verdict::Review { .. } => format!(
            "agentgate: statement requires human approval (rule \"{rule}\" of policy \"{policy}\"); approvals are not available on this gate yet, so it is denied"
        ),
        Verdict::Allow => "agentgate: allowed".to_string(),
    }
}

fn finish(ctx: &Context<'_>, rec: Rec, tag: Option<String>, error: Option<String>) {
    let Some(id) = rec.id else { return };
    let rows =
        tag.as_deref()
            .and_then(rows_of_tag)
            .or(if rec.rows > 0 { Some(rec.rows) } else { None });
    let _ = ctx.gate.store.statement_end(
        id,
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

/// Records the statements of a judged query string; returns their records.
fn record_query(ctx: &Context<'_>, protocol: &str, sql: &str, qd: &QueryDecision) -> Vec<Rec> {
    let store = &ctx.gate.store;
    if qd.statements.is_empty() {
        let d = &qd.decision;
        let id = store
            .statement(StatementStart {
                session_id: ctx.session_id,
                protocol: protocol.into(),
                text: sql.to_string(),
                kind: None,
                decision: d.verdict.name().into(),
                enforced: !d.shadow,
                policy: d.policy.clone(),
                rule: d.rule.clone(),
                message: qd
                    .parse_error
                    .clone()
                    .or_else(|| verdict_message(&d.verdict)),
                ..Default::default()
            })
            .ok();
        return if qd.parse_error.is_some() {
            vec![Rec::new(id, Vec::new())]
        } else {
            Vec::new()
        };
    }
    qd.statements
        .iter()
        .map(|s| {
            let d = &s.decision;
            let id = store
                .statement(StatementStart {
                    session_id: ctx.session_id,
                    protocol: protocol.into(),
                    text: s.facts.text.clone(),
                    kind: Some(s.facts.kind.to_string()),
                    tables: s.facts.tables.iter().map(ToString::to_string).collect(),
                    functions: s.facts.functions.clone(),
                    decision: d.verdict.name().into(),
                    enforced: !d.shadow,
                    policy: d.policy.clone(),
                    rule: d.rule.clone(),
                    message: verdict_message(&d.verdict),
                })
                .ok();
            Rec::new(id, d.mask.clone())
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

fn judge(ctx: &Context<'_>, sql: &str) -> (QueryDecision, Option<String>) {
    let subject = Subject {
        agent: &ctx.peer.agent,
        roles: &ctx.peer.roles,
    };
    let opts = ExtractOptions {
        standard_conforming_strings: ctx.standard_strings,
    };
    let qd = ctx
        .shared
        .policies
        .decide_query_with(&subject, &ctx.target.name, sql, &opts);
    let denial = match qd.enforced_verdict() {
        Verdict::Allow if unmaskable_copy(&qd) => Some(
            "agentgate: COPY ... TO STDOUT cannot be masked; use SELECT to read masked data"
                .to_string(),
        ),
        Verdict::Allow => None,
        v => Some(match &qd.parse_error {
            Some(e) => format!("agentgate: statement denied: it could not be parsed ({e})"),
            None => deny_message(deciding(&qd), &v),
        }),
    };
    (qd, denial)
}

fn error_frame(message: &str) -> Bytes {
    let mut b = BytesMut::new();
    match insufficient_privilege(message, None).encode(&mut b) {
        Ok(()) => b.freeze(),
        Err(_) => Bytes::new(),
    }
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
    st.queue.push_back(Expect::Sync);
    Ok(())
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
    let masking = ctx.shared.masker.is_some();
    loop {
        let Some(frame) = read_frontend(&mut client, &mut buf, &mut dec).await? else {
            let _ = upstream.shutdown().await;
            return Ok(());
        };
        *bytes += frame.raw.len() as u64;
        let mut wake = false;
        {
            let mut st = lock(state);
            match &frame.msg {
                FrontendMessage::Query { sql } => {
                    let (qd, denial) = judge(ctx, sql);
                    let recs = record_query(ctx, "simple", sql, &qd);
                    match denial {
                        None => {
                            st.queue.push_back(Expect::Query(QueryRun {
                                recs,
                                idx: 0,
                                plan: None,
                            }));
                            out.extend_from_slice(&frame.raw);
                        }
                        Some(message) => {
                            for r in recs {
                                finish(ctx, r, None, Some(message.clone()));
                            }
                            st.queue.push_back(Expect::Synthetic(error_frame(&message)));
                            inject(&mut st, &mut out)?;
                            wake = true;
                        }
                    }
                }
                FrontendMessage::Parse { name, query, .. } => {
                    if skipping {
                        continue;
                    }
                    let (qd, denial) = judge(ctx, query);
                    match denial {
                        None => {
                            let first = qd.statements.first();
                            let decision = first
                                .map(|s| s.decision.clone())
                                .unwrap_or(qd.decision.clone());
                            let needs_columns = masking && !decision.mask.is_empty();
                            let prepared = Arc::new(Prepared {
                                text: query.clone(),
                                kind: first.map(|s| s.facts.kind.to_string()),
                                tables: first
                                    .map(|s| {
                                        s.facts.tables.iter().map(ToString::to_string).collect()
                                    })
                                    .unwrap_or_default(),
                                functions: first
                                    .map(|s| s.facts.functions.clone())
                                    .unwrap_or_default(),
                                decision,
                                columns: Mutex::new(None),
                            });
                            let previous = st.statements.insert(name.clone(), prepared.clone());
                            st.queue.push_back(Expect::Parse {
                                injected: false,
                                name: name.clone(),
                                previous,
                            });
                            out.extend_from_slice(&frame.raw);
                            if needs_columns {
                                // Learn the result columns for masking even if the agent never asks.
                                FrontendMessage::Describe {
                                    kind: Target::Statement,
                                    name: name.clone(),
                                }
                                .encode(&mut out)?;
                                st.queue.push_back(Expect::Describe {
                                    what: Described::Statement(Some(prepared)),
                                    internal: true,
                                });
                            }
                            // Shadow-mode would-be denials are recorded at Parse.
                            if qd
                                .statements
                                .iter()
                                .any(|s| s.decision.shadow && !s.decision.verdict.is_allow())
                            {
                                for r in record_query(ctx, "extended", query, &qd) {
                                    finish(ctx, r, None, None);
                                }
                            }
                        }
                        Some(message) => {
                            // The server never sees this Parse: whatever it had under the name stays.
                            for r in record_query(ctx, "extended", query, &qd) {
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
                    result_formats,
                    ..
                } => {
                    if skipping {
                        continue;
                    }
                    let bound = Arc::new(Portal {
                        prepared: st.statements.get(statement).cloned(),
                        formats: result_formats.clone(),
                        columns: Mutex::new(None),
                    });
                    let previous = st.portals.insert(portal.clone(), bound);
                    st.queue.push_back(Expect::Bind {
                        injected: false,
                        name: portal.clone(),
                        previous,
                    });
                    out.extend_from_slice(&frame.raw);
                }
                FrontendMessage::Execute { portal, .. } => {
                    if skipping {
                        continue;
                    }
                    let bound = st.portals.get(portal).cloned();
                    let prepared = bound.as_ref().and_then(|p| p.prepared.clone());
                    let rec = match prepared {
                        Some(p) => {
                            let id = ctx
                                .gate
                                .store
                                .statement(StatementStart {
                                    session_id: ctx.session_id,
                                    protocol: "extended".into(),
                                    text: p.text.clone(),
                                    kind: p.kind.clone(),
                                    tables: p.tables.clone(),
                                    functions: p.functions.clone(),
                                    decision: p.decision.verdict.name().into(),
                                    enforced: !p.decision.shadow,
                                    policy: p.decision.policy.clone(),
                                    rule: p.decision.rule.clone(),
                                    message: verdict_message(&p.decision.verdict),
                                })
                                .ok();
                            Rec::new(id, p.decision.mask.clone())
                        }
                        // The server will answer with its own error for an unknown portal.
                        None => Rec::new(None, Vec::new()),
                    };
                    st.queue.push_back(Expect::Execute(Box::new(ExecRun {
                        rec,
                        portal: bound,
                        plan: None,
                    })));
                    out.extend_from_slice(&frame.raw);
                }
                FrontendMessage::Describe { kind, name } => {
                    if skipping {
                        continue;
                    }
                    let what = match kind {
                        Target::Statement => Described::Statement(st.statements.get(name).cloned()),
                        Target::Portal => Described::Portal(st.portals.get(name).cloned()),
                    };
                    st.queue.push_back(Expect::Describe {
                        what,
                        internal: false,
                    });
                    out.extend_from_slice(&frame.raw);
                }
                FrontendMessage::Close { kind, name } => {
                    if skipping {
                        continue;
                    }
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
                        st.queue.push_back(Expect::Sync);
                        out.extend_from_slice(&frame.raw);
                    }
                }
                FrontendMessage::FunctionCall(_) => {
                    // The fast-path interface calls functions by OID, beyond statement policy.
                    let message = "agentgate: the fast-path function call interface is not allowed";
                    let id = ctx.gate.store.statement(StatementStart {
                        session_id: ctx.session_id,
                        protocol: "function-call".into(),
                        text: "<fast-path function call>".into(),
                        decision: "deny".into(),
                        enforced: true,
                        message: Some(message.into()),
                        ..Default::default()
                    });
                    finish(
                        ctx,
                        Rec::new(id.ok(), Vec::new()),
                        None,
                        Some(message.into()),
                    );
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

fn render(values: &[Option<Bytes>], formats: &[Format]) -> Vec<Option<String>> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_ref().map(|b| match formats.get(i) {
                Some(Format::Binary) => format!(
                    "\\x{}",
                    b.iter().map(|x| format!("{x:02x}")).collect::<String>()
                ),
                _ => String::from_utf8_lossy(b).into_owned(),
            })
        })
        .collect()
}

fn format_of(formats: &[i16], i: usize) -> Format {
    let code = match formats {
        [] => 0,
        [one] => *one,
        many => many.get(i).copied().unwrap_or(0),
    };
    Format::from_code(code).unwrap_or(Format::Text)
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
    let oids: Vec<u32> = fields
        .iter()
        .map(|f| f.table_oid)
        .filter(|o| *o != 0)
        .collect();
    let tables = if oids.is_empty() {
        HashMap::new()
    } else {
        ctx.shared
            .catalog
            .resolve(ctx.gate, ctx.target, &ctx.database, &oids)
            .await?
    };
    let columns: Vec<ColumnMeta> = fields
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let t = tables.get(&f.table_oid);
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
    let plan = masker.plan(masks, &columns)?;
    Ok(if plan.is_noop() { None } else { Some(plan) })
}

#[allow(clippy::too_many_arguments)]
async fn server_to_agent<R: AsyncRead + Unpin>(
    ctx: &Context<'_>,
    mut upstream: R,
    mut buf: BytesMut,
    mut dec: BackendDecoder,
    mut client: tokio::net::tcp::OwnedWriteHalf,
    state: &Mutex<State>,
    notify: &Notify,
    bytes: &mut u64,
) -> Result<(), PgError> {
    let mut out = BytesMut::with_capacity(16384);
    let keep = ctx.target.record_rows;
    loop {
        release_synthetic(&mut lock(state), &mut out);
        if !out.is_empty() && !has_frame(&buf) {
            client.write_all(&out).await?;
            *bytes += out.len() as u64;
            out.clear();
        }
        let frame = tokio::select! {
            biased;
            f = read_backend(&mut upstream, &mut buf, &mut dec) => f?,
            () = notify.notified() => continue,
        };
        let Some(frame) = frame else {
            client.write_all(&out).await?;
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
                let formats: Vec<Format> = fields
                    .iter()
                    .map(|f| Format::from_code(f.format).unwrap_or(Format::Text))
                    .collect();
                let plan = plan_for(ctx, &masks, fields, &formats).await?;
                if let Some(Expect::Query(q)) = lock(state).queue.front_mut() {
                    q.plan = plan;
                }
            }
        }
        if let BackendMessage::DataRow(_) = &frame.msg {
            // An Execute's plan is built on its first row, from the portal's columns and formats.
            let pending = {
                let mut st = lock(state);
                release_synthetic(&mut st, &mut out);
                match st.queue.front() {
                    Some(Expect::Execute(x)) if x.plan.is_none() => {
                        let portal = x.portal.as_ref();
                        let fields = portal.and_then(|p| columns_of(&p.columns)).or_else(|| {
                            portal
                                .and_then(|p| p.prepared.as_ref())
                                .and_then(|s| columns_of(&s.columns))
                        });
                        let formats = portal.map(|p| p.formats.clone()).unwrap_or_default();
                        Some((x.rec.masks.clone(), fields, formats))
                    }
                    _ => None,
                }
            };
            if let Some((masks, fields, formats)) = pending {
                let plan = match (&masks[..], fields) {
                    ([], _) => None,
                    (_, Some(fields)) => {
                        let fmts: Vec<Format> =
                            (0..fields.len()).map(|i| format_of(&formats, i)).collect();
                        plan_for(ctx, &masks, &fields, &fmts).await?
                    }
                    // Masking applies but the columns are unknown: refuse rather than leak.
                    (_, None) => {
                        return Err(PgError::Protocol(
                            "result columns unknown for a masked statement".into(),
                        ));
                    }
                };
                if let Some(Expect::Execute(x)) = lock(state).queue.front_mut() {
                    x.plan = Some(plan);
                }
            }
        }
        let mut st = lock(state);
        on_backend(ctx, &mut st, frame, &mut out, keep)?;
    }
}

/// After a server error in the extended protocol the server skips everything up to Sync: so do
/// the expectations (their view updates are rolled back, their statements recorded as not run).
fn pop_until_sync(ctx: &Context<'_>, st: &mut State) {
    let mut skipped = Vec::new();
    while let Some(front) = st.queue.front() {
        if matches!(front, Expect::Sync) {
            break;
        }
        match st.queue.pop_front() {
            Some(Expect::Execute(x)) => {
                let why = "not executed: an earlier message in the pipeline failed";
                finish(ctx, x.rec, None, Some(why.into()));
            }
            Some(e) => skipped.push(e),
            None => break,
        }
    }
    st.revert(skipped);
}

fn on_backend(
    ctx: &Context<'_>,
    st: &mut State,
    frame: crate::protocol::postgres::Frame<BackendMessage>,
    out: &mut BytesMut,
    keep: usize,
) -> Result<(), PgError> {
    use BackendMessage as B;
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
        B::RowDescription(ref fields) => match st.queue.front() {
            Some(Expect::Describe { .. }) => {
                if let Some(Expect::Describe { what, internal }) = st.queue.pop_front() {
                    match what {
                        Described::Statement(Some(s)) => set_columns(&s.columns, fields),
                        Described::Portal(Some(p)) => set_columns(&p.columns, fields),
                        Described::Statement(None) | Described::Portal(None) => {}
                    }
                    if internal {
                        return Ok(());
                    }
                }
            }
            Some(Expect::Query(_)) => {
                if let Some(Expect::Query(q)) = st.queue.front_mut()
                    && let Some(r) = q.recs.get_mut(q.idx)
                {
                    r.columns = fields.iter().map(|f| f.name.clone()).collect();
                }
            }
            _ => {}
        },
        B::NoData => {
            if let Some(Expect::Describe { .. }) = st.queue.front()
                && let Some(Expect::Describe { internal, .. }) = st.queue.pop_front()
                && internal
            {
                return Ok(());
            }
        }
        B::DataRow(mut values) => {
            let (plan, rec, formats) = match st.queue.front_mut() {
                Some(Expect::Query(q)) => {
                    let idx = q.idx;
                    (q.plan.as_ref(), q.recs.get_mut(idx), Vec::new())
                }
                Some(Expect::Execute(x)) => {
                    let ExecRun { rec, plan, portal } = &mut **x;
                    // Binary results are recorded as hex, not as mangled text.
                    let formats = portal
                        .as_ref()
                        .map(|p| {
                            (0..values.len())
                                .map(|i| format_of(&p.formats, i))
                                .collect()
                        })
                        .unwrap_or_default();
                    (plan.as_ref().and_then(Option::as_ref), Some(rec), formats)
                }
                _ => (None, None, Vec::new()),
            };
            let mut changed = false;
            if let Some(plan) = plan {
                changed = plan.apply(&mut values)?.changed;
            }
            if let Some(rec) = rec {
                rec.rows += 1;
                rec.masked |= changed;
                if rec.kept.len() < keep {
                    rec.kept.push(render(&values, &formats));
                }
            }
            if changed {
                B::DataRow(values).encode(out)?;
            } else {
                out.extend_from_slice(&frame.raw);
            }
            return Ok(());
        }
        B::CommandComplete { ref tag } => match st.queue.front_mut() {
            Some(Expect::Query(q)) => {
                let idx = q.idx;
                q.idx += 1;
                q.plan = None;
                if let Some(r) = q.recs.get_mut(idx) {
                    let r = std::mem::replace(r, Rec::new(None, Vec::new()));
                    finish(ctx, r, Some(tag.clone()), None);
                }
            }
            Some(Expect::Execute(_)) => {
                if let Some(Expect::Execute(x)) = st.queue.pop_front() {
                    finish(ctx, x.rec, Some(tag.clone()), None);
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
        B::ErrorResponse(ref e) => {
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
                        let r = std::mem::replace(r, Rec::new(None, Vec::new()));
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
                Some(Expect::Sync) | None => {}
            }
        }
        B::ReadyForQuery { .. } => {
            while let Some(e) = st.queue.pop_front() {
                match e {
                    Expect::Sync => break,
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
                    _ => {}
                }
            }
        }
        _ => {}
    }
    out.extend_from_slice(&frame.raw);
    Ok(())
}
