//! Human approval of held statements and just-in-time grants.
//!
//! A statement that a `review` rule matches is held by its connection while a ticket waits
//! here. Every state change of a ticket (approve, deny, expire, cancel) happens under one lock
//! and is delivered to the waiting connection through a one-shot channel, so exactly one
//! outcome wins a race (an approval arriving as the timeout fires, an agent hanging up as an
//! approver clicks). The connection runs the statement only on `Approved`, and only the bytes
//! it held: the ticket carries their SHA-256, an approver may require it to match what they
//! saw, and one approval runs one statement.
//!
//! Grants add a role to an agent, or let an agent run statements of one `review` rule without
//! a ticket, until they expire or are revoked. They are consulted at every statement, so the
//! first statement after expiry is judged without them. Grants are stored (a daemon restart
//! keeps them, and their expiry); tickets live as long as the connection holding them.
//!
//! Everything that happens is recorded in the session store as events (tickets under their
//! session, grants under their agent), sent to `watch` subscribers and to webhooks.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, oneshot};

use crate::admin::ErrorKind;
use crate::protocol::postgres::format_code;
use crate::session::limit::{EventLimiter, EventLimits, Source};
use crate::session::{Event, SessionStore, format_ms, now_ms};
use crate::webhook::Webhooks;

/// Decided tickets kept in memory for `approvals list --all` (the full history is in the store).
const KEEP_DECIDED: usize = 1000;
/// And at most this much of their statement text and parameters: an agent that asks and hangs
/// up again and again would otherwise fill the daemon's memory with cancelled tickets.
const KEEP_DECIDED_BYTES: usize = 16 * 1024 * 1024;
/// How often grant expiry is checked for recording (enforcement checks the time at each use).
const GRANT_TICK: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TicketState {
    Pending,
    Approved,
    Denied,
    Expired,
    Cancelled,
}

/// Who holds a statement for approval, and where it was going: the same in a new ticket and in
/// the ticket approvers see (flattened, so a ticket's JSON names these fields at its top level).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Requester {
    pub agent: String,
    pub roles: Vec<String>,
    pub pid: u32,
    pub uid: u32,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    pub target: String,
    pub database: String,
    pub session_id: i64,
}

/// What an approver sees and decides on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ticket {
    pub id: u64,
    pub state: TicketState,
    #[serde(flatten)]
    pub requester: Requester,
    /// `simple` (a Query) or `extended` (an Execute of a prepared statement).
    pub protocol: String,
    /// The exact statement text the agent sent (one copy, shared by the ticket's clones in
    /// lists and events).
    pub statement: Arc<str>,
    /// Bound parameters of an extended-protocol Execute (binary ones as `\x` hex).
    #[serde(default)]
    pub params: Vec<Option<String>>,
    /// SHA-256 over the protocol, the text and the parameters: what an approval is bound to.
    pub sha256: String,
    /// Statement kinds, tables and functions.
    pub facts: serde_json::Value,
    pub policy: Option<String>,
    pub rule: Option<String>,
    pub created_ms: i64,
    pub created: String,
    pub expires_ms: i64,
    #[serde(default)]
    pub decided_by: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub decided_ms: Option<i64>,
    /// The grant made when the ticket was approved with a duration.
    #[serde(default)]
    pub grant_id: Option<u64>,
}

/// A held statement, as the connection describes it.
pub struct NewTicket {
    pub requester: Requester,
    pub protocol: &'static str,
    pub statement: Arc<str>,
    pub params: Vec<Option<bytes::Bytes>>,
    pub param_formats: Vec<i16>,
    pub facts: serde_json::Value,
    pub policy: Option<String>,
    pub rule: Option<String>,
    pub timeout: Duration,
}

/// How a held statement ended; delivered once to the connection holding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Approved {
        by: String,
        reason: Option<String>,
    },
    Denied {
        by: String,
        reason: String,
    },
    Expired {
        after: Duration,
    },
    Cancelled {
        why: String,
    },
    /// No ticket was opened: the agent already had as many pending as it may
    /// (`approvals.max_pending_per_agent`).
    Refused {
        why: String,
    },
    /// No ticket was opened: the statement is larger than one may be to be held
    /// (`approvals.max_statement_bytes`).
    TooLarge {
        why: String,
    },
}

/// A ticket being waited on: the connection awaits `outcome`.
pub struct Hold {
    pub ticket: Ticket,
    pub outcome: oneshot::Receiver<Outcome>,
}

/// An approval request.
pub struct Approve {
    pub approver: String,
    /// The governed agent the caller is, if any (it may not approve its own tickets).
    pub caller_agent: Option<String>,
    pub sha256: Option<String>,
    pub grant_for: Option<Duration>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GrantScope {
    /// The agent holds this role as well as its configured ones.
    Role { role: String },
    /// Statements that a `review` rule matches run without a ticket, on the target and
    /// database of the ticket whose approval made the grant (what the approver saw), nowhere
    /// else. (Grants stored before these were recorded have none, and match nothing.)
    Rule {
        policy: String,
        rule: String,
        #[serde(default)]
        target: String,
        #[serde(default)]
        database: String,
    },
}

impl std::fmt::Display for GrantScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GrantScope::Role { role } => write!(f, "role {role}"),
            GrantScope::Rule {
                policy,
                rule,
                target,
                database,
            } => write!(
                f,
                "rule {rule} of policy {policy} on target {target}, database {database}"
            ),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Grant {
    pub id: u64,
    pub agent: String,
    pub scope: GrantScope,
    pub granted_by: String,
    pub reason: Option<String>,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub expires: String,
    /// The ticket whose approval made this grant.
    pub ticket: Option<u64>,
    pub revoked_by: Option<String>,
    pub revoked_ms: Option<i64>,
    /// Set once the expiry has been recorded.
    #[serde(default)]
    pub expired: bool,
}

/// A statement of a `review` rule about to run: what a rule grant must cover to let it through.
pub struct RuleUse<'a> {
    pub agent: &'a str,
    pub target: &'a str,
    pub database: &'a str,
    pub policy: &'a str,
    pub rule: &'a str,
}

/// An agent's roles widened by role grants, and the grants that widened them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantedRoles {
    pub roles: Vec<String>,
    pub grants: Vec<u64>,
}

impl Grant {
    pub fn active_at(&self, now: i64) -> bool {
        self.revoked_ms.is_none() && now < self.expires_ms
    }
}

/// One change, as `watch` subscribers and webhooks receive it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApprovalEvent {
    pub event: String,
    pub ts_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<Ticket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<Grant>,
}

impl ApprovalEvent {
    pub fn ticket(kind: &str, t: &Ticket) -> ApprovalEvent {
        ApprovalEvent {
            event: kind.to_string(),
            ts_ms: now_ms(),
            ticket: Some(t.clone()),
            grant: None,
        }
    }

    fn grant(kind: &str, g: &Grant) -> ApprovalEvent {
        ApprovalEvent {
            event: kind.to_string(),
            ts_ms: now_ms(),
            ticket: None,
            grant: Some(g.clone()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("no ticket {0}")]
    NoTicket(u64),
    #[error("ticket {id} is already {state:?}")]
    Decided { id: u64, state: TicketState },
    #[error(
        "ticket {id}: the statement hash does not match (the ticket's statement is {actual}); nothing was approved"
    )]
    HashMismatch { id: u64, actual: String },
    #[error("ticket {0} belongs to the calling agent: an agent cannot decide its own tickets")]
    OwnTicket(u64),
    #[error("no grant {0}")]
    NoGrant(u64),
    #[error("grant {0} is no longer active")]
    GrantInactive(u64),
    #[error("{0}")]
    Invalid(String),
}

impl ApprovalError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ApprovalError::NoTicket(_) | ApprovalError::NoGrant(_) => ErrorKind::NotFound,
            ApprovalError::Decided { .. } | ApprovalError::GrantInactive(_) => ErrorKind::Conflict,
            ApprovalError::HashMismatch { .. } => ErrorKind::Conflict,
            ApprovalError::OwnTicket(_) => ErrorKind::Forbidden,
            ApprovalError::Invalid(_) => ErrorKind::BadRequest,
        }
    }
}

struct Entry {
    ticket: Ticket,
    waiter: Option<oneshot::Sender<Outcome>>,
}

#[derive(Default)]
struct Inner {
    tickets: BTreeMap<u64, Entry>,
    grants: BTreeMap<u64, Grant>,
}

pub struct Approvals {
    inner: Mutex<Inner>,
    events: broadcast::Sender<ApprovalEvent>,
    store: Arc<SessionStore>,
    webhooks: Option<Webhooks>,
    next_ticket: AtomicU64,
    next_grant: AtomicU64,
    /// Any grant not yet known to be over: lets statements skip the lock when there are none.
    any_grants: AtomicBool,
    /// Pending tickets one agent may have at once (see [`ApprovalLimits`]).
    max_pending_per_agent: usize,
    /// The largest statement (text and parameters) that may be held for review.
    max_statement_bytes: usize,
    /// Tickets opened, per agent (see [`ApprovalLimits::new_tickets_per_second`]).
    opened: EventLimiter,
}

/// `approvals:` in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalLimits {
    /// Statements of one agent that may await approval at once. Each holds a connection, and
    /// an agent that opens connection after connection to queue reviews would otherwise bury
    /// the approvers (and the webhooks) in tickets; beyond it a statement is refused at once
    /// without a ticket.
    #[serde(default = "default_max_pending_per_agent")]
    pub max_pending_per_agent: usize,
    /// Tickets one agent may open per second once a burst of `max_pending_per_agent` is spent:
    /// an agent that hangs up and asks again (its ticket cancelled, no longer pending) cannot
    /// open them in a loop.
    #[serde(default = "default_new_tickets_per_second")]
    pub new_tickets_per_second: u32,
    /// The largest statement, text and bound parameters together, that may be held for review.
    /// A ticket keeps its statement for as long as it is listed, and events, watchers and
    /// webhooks carry it: a larger statement that a `review` rule matches is refused at once
    /// (SQLSTATE 54000) without a ticket.
    #[serde(default = "default_max_statement_bytes")]
    pub max_statement_bytes: usize,
}

fn default_max_statement_bytes() -> usize {
    64 * 1024
}

fn default_new_tickets_per_second() -> u32 {
    1
}

fn default_max_pending_per_agent() -> usize {
    16
}

fn opened_limiter(limits: ApprovalLimits) -> EventLimiter {
    EventLimiter::new(EventLimits {
        // Twice the pending limit: an agent within it is refused for that, not for its rate.
        burst: u32::try_from(limits.max_pending_per_agent.saturating_mul(2))
            .unwrap_or(u32::MAX)
            .max(1),
        per_second: limits.new_tickets_per_second,
    })
}

impl Default for ApprovalLimits {
    fn default() -> Self {
        ApprovalLimits {
            max_pending_per_agent: default_max_pending_per_agent(),
            new_tickets_per_second: default_new_tickets_per_second(),
            max_statement_bytes: default_max_statement_bytes(),
        }
    }
}

/// The hash an approval is bound to.
pub fn statement_hash(
    protocol: &str,
    text: &str,
    params: &[Option<bytes::Bytes>],
    formats: &[i16],
) -> String {
    let mut h = Sha256::new();
    h.update(protocol.as_bytes());
    h.update([0]);
    h.update((text.len() as u64).to_be_bytes());
    h.update(text.as_bytes());
    h.update((params.len() as u64).to_be_bytes());
    for (i, p) in params.iter().enumerate() {
        h.update(format_code(formats, i).to_be_bytes());
        match p {
            None => h.update(u64::MAX.to_be_bytes()),
            Some(b) => {
                h.update((b.len() as u64).to_be_bytes());
                h.update(b);
            }
        }
    }
    hex::encode(h.finalize())
}

/// A parameter as an approver reads it. Binary values are shown as hex; when they are also
/// printable UTF-8 (text sent in binary format, as many drivers do) the text follows, quoted,
/// since the parameter's type is not known here.
fn render_param(p: &Option<bytes::Bytes>, format: i16) -> Option<String> {
    p.as_ref().map(|b| match (format, std::str::from_utf8(b)) {
        (0, Ok(s)) => s.to_string(),
        (_, Ok(s)) if !s.is_empty() && !s.chars().any(char::is_control) => {
            format!("\\x{} ({s:?})", hex::encode(b))
        }
        _ => format!("\\x{}", hex::encode(b)),
    })
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Approvals {
    /// `grants` are the stored grants (active ones are enforced again after a restart);
    /// ticket ids continue after `last_ticket` so the record never repeats one.
    pub fn new(
        store: Arc<SessionStore>,
        webhooks: Option<Webhooks>,
        grants: Vec<Grant>,
        last_ticket: u64,
    ) -> Self {
        let (events, _) = broadcast::channel(1024);
        let next_grant = grants.iter().map(|g| g.id).max().unwrap_or(0) + 1;
        let any = grants.iter().any(|g| !g.expired && g.revoked_ms.is_none());
        Approvals {
            inner: Mutex::new(Inner {
                tickets: BTreeMap::new(),
                grants: grants.into_iter().map(|g| (g.id, g)).collect(),
            }),
            events,
            store,
            webhooks,
            next_ticket: AtomicU64::new(last_ticket + 1),
            next_grant: AtomicU64::new(next_grant),
            any_grants: AtomicBool::new(any),
            max_pending_per_agent: default_max_pending_per_agent(),
            max_statement_bytes: default_max_statement_bytes(),
            opened: opened_limiter(ApprovalLimits::default()),
        }
    }

    pub fn with_limits(mut self, limits: ApprovalLimits) -> Self {
        self.max_pending_per_agent = limits.max_pending_per_agent;
        self.max_statement_bytes = limits.max_statement_bytes;
        self.opened = opened_limiter(limits);
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ApprovalEvent> {
        self.events.subscribe()
    }

    /// Records and announces a change.
    fn announce(&self, event: ApprovalEvent) {
        let (session_id, agent, pid) = match (&event.ticket, &event.grant) {
            (Some(t), _) => (
                Some(t.requester.session_id),
                Some(t.requester.agent.clone()),
                Some(t.requester.pid),
            ),
            (None, Some(g)) => (None, Some(g.agent.clone()), None),
            (None, None) => (None, None, None),
        };
        let detail = event
            .ticket
            .as_ref()
            .map(|t| serde_json::json!(t))
            .or_else(|| event.grant.as_ref().map(|g| serde_json::json!(g)))
            .unwrap_or_default();
        if let Err(e) = self.store.event(Event {
            session_id,
            kind: event.event.clone(),
            agent,
            pid,
            detail: detail.clone(),
            ..Default::default()
        }) {
            tracing::error!(error = %e, event = %event.event, "cannot record an approval event");
        }
        if let Some(w) = &self.webhooks {
            w.send(&event.event, detail);
        }
        let _ = self.events.send(event);
    }

    /// Opens a ticket for a held statement, unless its agent already has as many pending as it
    /// may: then the outcome, a refusal, is returned at once and no ticket exists.
    pub fn hold(&self, n: NewTicket) -> Result<Hold, Outcome> {
        // Before anything is hashed, copied or counted against the agent's rate.
        let size = n
            .params
            .iter()
            .flatten()
            .fold(n.statement.len(), |sum, p| sum.saturating_add(p.len()));
        if size > self.max_statement_bytes {
            tracing::warn!(agent = %n.requester.agent, bytes = size, "statement refused: too large to be held for approval");
            return Err(Outcome::TooLarge {
                why: format!(
                    "the statement and its parameters are {size} bytes, more than approvals.max_statement_bytes ({}) allows to be held for approval; no ticket was opened",
                    self.max_statement_bytes
                ),
            });
        }
        // Hashed and rendered before the lock: a large statement must not stall decisions.
        let sha256 = statement_hash(n.protocol, &n.statement, &n.params, &n.param_formats);
        let params = n
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| render_param(p, format_code(&n.param_formats, i)))
            .collect();
        let source = Source::new("ticket", Some(n.requester.agent.clone()));
        if !self.opened.admit(&source, std::time::Instant::now()) {
            tracing::warn!(agent = %n.requester.agent, "statement refused: its agent opens approval requests too fast");
            return Err(Outcome::Refused {
                why: format!(
                    "agent \"{}\" opens approval requests faster than it may (approvals.new_tickets_per_second); no ticket was opened",
                    n.requester.agent
                ),
            });
        }
        let mut inner = self.lock();
        let pending = inner
            .tickets
            .values()
            .filter(|e| {
                e.ticket.state == TicketState::Pending
                    && e.ticket.requester.agent == n.requester.agent
            })
            .count();
        if pending >= self.max_pending_per_agent {
            drop(inner);
            tracing::warn!(
                agent = %n.requester.agent,
                pending,
                "statement refused: its agent has as many statements awaiting approval as it may"
            );
            return Err(Outcome::Refused {
                why: format!(
                    "agent \"{}\" already has {pending} statements awaiting approval, the most it may have (approvals.max_pending_per_agent); no ticket was opened",
                    n.requester.agent
                ),
            });
        }
        let id = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let ticket = Ticket {
            id,
            state: TicketState::Pending,
            requester: n.requester,
            protocol: n.protocol.to_string(),
            statement: n.statement,
            params,
            sha256,
            facts: n.facts,
            policy: n.policy,
            rule: n.rule,
            created_ms: now,
            created: format_ms(now),
            expires_ms: now.saturating_add(ms(n.timeout)),
            decided_by: None,
            reason: None,
            decided_ms: None,
            grant_id: None,
        };
        let (tx, rx) = oneshot::channel();
        // Counted and inserted under one lock: concurrent holds cannot both pass the limit.
        inner.tickets.insert(
            id,
            Entry {
                ticket: ticket.clone(),
                waiter: Some(tx),
            },
        );
        drop(inner);
        tracing::warn!(
            ticket = id,
            agent = %ticket.requester.agent,
            target = %ticket.requester.target,
            rule = ticket.rule.as_deref().unwrap_or("-"),
            "statement held for approval"
        );
        self.announce(ApprovalEvent::ticket("ticket_created", &ticket));
        Ok(Hold {
            ticket,
            outcome: rx,
        })
    }

    /// Moves a pending ticket to its final state and wakes its connection.
    fn settle(
        &self,
        id: u64,
        state: TicketState,
        outcome: Outcome,
        check: impl FnOnce(&Ticket) -> Result<(), ApprovalError>,
        by: Option<String>,
        reason: Option<String>,
    ) -> Result<Ticket, ApprovalError> {
        let (ticket, waiter) = {
            let mut inner = self.lock();
            let entry = inner
                .tickets
                .get_mut(&id)
                .ok_or(ApprovalError::NoTicket(id))?;
            if entry.ticket.state != TicketState::Pending {
                return Err(ApprovalError::Decided {
                    id,
                    state: entry.ticket.state,
                });
            }
            check(&entry.ticket)?;
            entry.ticket.state = state;
            entry.ticket.decided_by = by;
            entry.ticket.reason = reason;
            entry.ticket.decided_ms = Some(now_ms());
            let waiter = entry.waiter.take();
            let t = entry.ticket.clone();
            prune(&mut inner.tickets);
            (t, waiter)
        };
        let kind = match state {
            TicketState::Approved => "ticket_approved",
            TicketState::Denied => "ticket_denied",
            TicketState::Expired => "ticket_expired",
            TicketState::Cancelled => "ticket_cancelled",
            TicketState::Pending => "ticket_pending",
        };
        // Recorded before the connection wakes: the decision comes before the statement it lets
        // run in the session's timeline (ties in time put events first).
        self.announce(ApprovalEvent::ticket(kind, &ticket));
        if let Some(w) = waiter {
            // The connection may be gone (it then cancels the ticket itself, and loses).
            let _ = w.send(outcome);
        }
        Ok(ticket)
    }

    pub fn approve(&self, id: u64, a: Approve) -> Result<Ticket, ApprovalError> {
        if let Some(d) = a.grant_for {
            check_grant_duration(d)?;
        }
        let wanted = a.sha256.as_ref().map(|s| s.trim().to_ascii_lowercase());
        let caller_agent = a.caller_agent.clone();
        let mut ticket = self.settle(
            id,
            TicketState::Approved,
            Outcome::Approved {
                by: a.approver.clone(),
                reason: a.reason.clone(),
            },
            |t| {
                if caller_agent.as_deref() == Some(t.requester.agent.as_str())
                    || a.approver == format!("jwt:{}", t.requester.agent)
                {
                    return Err(ApprovalError::OwnTicket(id));
                }
                match &wanted {
                    Some(w) if *w != t.sha256 => Err(ApprovalError::HashMismatch {
                        id,
                        actual: t.sha256.clone(),
                    }),
                    _ => Ok(()),
                }
            },
            Some(a.approver.clone()),
            a.reason.clone(),
        )?;
        if let (Some(d), Some(policy), Some(rule)) =
            (a.grant_for, ticket.policy.clone(), ticket.rule.clone())
        {
            let g = self.add_grant(
                &ticket.requester.agent,
                GrantScope::Rule {
                    policy,
                    rule,
                    target: ticket.requester.target.clone(),
                    database: ticket.requester.database.clone(),
                },
                d,
                &a.approver,
                a.reason.clone(),
                Some(id),
            );
            ticket.grant_id = Some(g.id);
            if let Some(e) = self.lock().tickets.get_mut(&id) {
                e.ticket.grant_id = Some(g.id);
            }
        }
        Ok(ticket)
    }

    pub fn deny(
        &self,
        id: u64,
        approver: &str,
        caller_agent: Option<&str>,
        reason: &str,
    ) -> Result<Ticket, ApprovalError> {
        if reason.trim().is_empty() {
            return Err(ApprovalError::Invalid("a denial needs a reason".into()));
        }
        self.settle(
            id,
            TicketState::Denied,
            Outcome::Denied {
                by: approver.to_string(),
                reason: reason.to_string(),
            },
            |t| {
                if caller_agent == Some(t.requester.agent.as_str())
                    || approver == format!("jwt:{}", t.requester.agent)
                {
                    return Err(ApprovalError::OwnTicket(id));
                }
                Ok(())
            },
            Some(approver.to_string()),
            Some(reason.to_string()),
        )
    }

    /// Called by the holding connection when the ticket's time is up. The outcome (expired,
    /// or a decision that won the race) still arrives through the hold's channel.
    pub fn expire(&self, id: u64) {
        let after = self
            .lock()
            .tickets
            .get(&id)
            .map(|e| {
                Duration::from_millis(
                    u64::try_from(e.ticket.expires_ms - e.ticket.created_ms).unwrap_or(0),
                )
            })
            .unwrap_or_default();
        let _ = self.settle(
            id,
            TicketState::Expired,
            Outcome::Expired { after },
            |_| Ok(()),
            None,
            Some(format!(
                "no decision within {}",
                humantime::format_duration(after)
            )),
        );
    }

    /// The agent hung up or cancelled: the statement never runs.
    pub fn cancel(&self, id: u64, why: &str) {
        let _ = self.settle(
            id,
            TicketState::Cancelled,
            Outcome::Cancelled {
                why: why.to_string(),
            },
            |_| Ok(()),
            None,
            Some(why.to_string()),
        );
    }

    /// Cancels whatever the session holds (an agent's CancelRequest). True if it held one.
    pub fn cancel_session(&self, session_id: i64, why: &str) -> bool {
        let held: Vec<u64> = self
            .lock()
            .tickets
            .values()
            .filter(|e| {
                e.ticket.requester.session_id == session_id
                    && e.ticket.state == TicketState::Pending
            })
            .map(|e| e.ticket.id)
            .collect();
        for id in &held {
            self.cancel(*id, why);
        }
        !held.is_empty()
    }

    pub fn pending(&self) -> Vec<Ticket> {
        self.list(false)
    }

    /// Pending tickets oldest first; with `all`, decided ones too, newest first.
    pub fn list(&self, all: bool) -> Vec<Ticket> {
        let inner = self.lock();
        if all {
            inner
                .tickets
                .values()
                .rev()
                .map(|e| e.ticket.clone())
                .collect()
        } else {
            inner
                .tickets
                .values()
                .filter(|e| e.ticket.state == TicketState::Pending)
                .map(|e| e.ticket.clone())
                .collect()
        }
    }

    pub fn grant_role(
        &self,
        agent: &str,
        role: &str,
        duration: Duration,
        by: &str,
        reason: Option<String>,
    ) -> Result<Grant, ApprovalError> {
        if role.trim().is_empty() {
            return Err(ApprovalError::Invalid("a grant needs a role".into()));
        }
        check_grant_duration(duration)?;
        Ok(self.add_grant(
            agent,
            GrantScope::Role {
                role: role.to_string(),
            },
            duration,
            by,
            reason,
            None,
        ))
    }

    fn add_grant(
        &self,
        agent: &str,
        scope: GrantScope,
        duration: Duration,
        by: &str,
        reason: Option<String>,
        ticket: Option<u64>,
    ) -> Grant {
        let now = now_ms();
        let expires_ms = now.saturating_add(ms(duration));
        let g = Grant {
            id: self.next_grant.fetch_add(1, Ordering::Relaxed),
            agent: agent.to_string(),
            scope,
            granted_by: by.to_string(),
            reason,
            created_ms: now,
            expires_ms,
            expires: format_ms(expires_ms),
            ticket,
            revoked_by: None,
            revoked_ms: None,
            expired: false,
        };
        self.lock().grants.insert(g.id, g.clone());
        self.any_grants.store(true, Ordering::Release);
        self.persist(&g);
        tracing::warn!(grant = g.id, agent, scope = %g.scope, by, expires = %g.expires, "grant added");
        self.announce(ApprovalEvent::grant("grant_created", &g));
        g
    }

    fn persist(&self, g: &Grant) {
        if let Err(e) = self.store.grant(serde_json::json!(g), g.id) {
            tracing::error!(error = %e, grant = g.id, "cannot store a grant");
        }
    }

    pub fn revoke(
        &self,
        id: u64,
        by: &str,
        reason: Option<String>,
    ) -> Result<Grant, ApprovalError> {
        let g = {
            let mut inner = self.lock();
            let g = inner
                .grants
                .get_mut(&id)
                .ok_or(ApprovalError::NoGrant(id))?;
            if !g.active_at(now_ms()) {
                return Err(ApprovalError::GrantInactive(id));
            }
            g.revoked_by = Some(by.to_string());
            g.revoked_ms = Some(now_ms());
            if let Some(r) = reason {
                g.reason = Some(match &g.reason {
                    Some(old) => format!("{old}; revoked: {r}"),
                    None => format!("revoked: {r}"),
                });
            }
            g.clone()
        };
        self.persist(&g);
        self.announce(ApprovalEvent::grant("grant_revoked", &g));
        Ok(g)
    }

    /// Active grants (with `all`, every grant), newest first.
    pub fn grants(&self, all: bool) -> Vec<Grant> {
        let now = now_ms();
        self.lock()
            .grants
            .values()
            .rev()
            .filter(|g| all || g.active_at(now))
            .cloned()
            .collect()
    }

    /// The agent's roles now, when active role grants add any to its configured ones: the
    /// roles, and the grants that added them. `None` (the common case) costs one atomic load.
    pub fn roles_for(&self, agent: &str, base: &[String]) -> Option<GrantedRoles> {
        if !self.any_grants.load(Ordering::Acquire) {
            return None;
        }
        let now = now_ms();
        let inner = self.lock();
        let mut granted = GrantedRoles {
            roles: base.to_vec(),
            grants: Vec::new(),
        };
        for g in inner.grants.values() {
            if let GrantScope::Role { role } = &g.scope
                && g.agent == agent
                && g.active_at(now)
                && !granted.roles.contains(role)
            {
                granted.roles.push(role.clone());
                granted.grants.push(g.id);
            }
        }
        (!granted.grants.is_empty()).then_some(granted)
    }

    /// Whether every one of these grants is still in force.
    pub fn all_active(&self, ids: &[u64]) -> bool {
        let now = now_ms();
        let inner = self.lock();
        ids.iter()
            .all(|id| inner.grants.get(id).is_some_and(|g| g.active_at(now)))
    }

    /// An active grant of `policy`/`rule` to the agent, on this target and database.
    pub fn rule_grant(&self, at: &RuleUse<'_>) -> Option<Grant> {
        if !self.any_grants.load(Ordering::Acquire) {
            return None;
        }
        let now = now_ms();
        self.lock()
            .grants
            .values()
            .find(|g| {
                g.agent == at.agent
                    && g.active_at(now)
                    && matches!(
                        &g.scope,
                        GrantScope::Rule { policy, rule, target, database }
                            if policy == at.policy
                                && rule == at.rule
                                && target == at.target
                                && database == at.database
                    )
            })
            .cloned()
    }

    /// Records grants whose time is up (their enforcement already stopped at expiry).
    pub fn record_expiries(&self) {
        let now = now_ms();
        let expired: Vec<Grant> = {
            let mut inner = self.lock();
            let mut out = Vec::new();
            for g in inner.grants.values_mut() {
                if !g.expired && g.revoked_ms.is_none() && now >= g.expires_ms {
                    g.expired = true;
                    out.push(g.clone());
                }
            }
            let live = inner
                .grants
                .values()
                .any(|g| !g.expired && g.revoked_ms.is_none());
            self.any_grants.store(live, Ordering::Release);
            out
        };
        for g in expired {
            self.persist(&g);
            tracing::info!(grant = g.id, agent = %g.agent, scope = %g.scope, "grant expired");
            self.announce(ApprovalEvent::grant("grant_expired", &g));
        }
    }

    /// Runs [`Approvals::record_expiries`] forever.
    pub async fn tick(self: Arc<Self>) {
        let mut t = tokio::time::interval(GRANT_TICK);
        loop {
            t.tick().await;
            self.record_expiries();
        }
    }
}

/// Drops the oldest decided tickets beyond [`KEEP_DECIDED`] tickets or [`KEEP_DECIDED_BYTES`].
fn prune(tickets: &mut BTreeMap<u64, Entry>) {
    let decided = || {
        tickets
            .values()
            .filter(|e| e.ticket.state != TicketState::Pending)
    };
    let (mut count, mut bytes) = decided().fold((0usize, 0usize), |(n, b), e| {
        (n + 1, b.saturating_add(ticket_bytes(&e.ticket)))
    });
    let mut drop = Vec::new();
    for e in decided() {
        if count <= KEEP_DECIDED && bytes <= KEEP_DECIDED_BYTES {
            break;
        }
        count -= 1;
        bytes = bytes.saturating_sub(ticket_bytes(&e.ticket));
        drop.push(e.ticket.id);
    }
    for id in drop {
        tickets.remove(&id);
    }
}

/// What a kept ticket holds of the agent's bytes: its statement and parameters.
fn ticket_bytes(t: &Ticket) -> usize {
    t.params
        .iter()
        .flatten()
        .fold(t.statement.len(), |sum, p| sum.saturating_add(p.len()))
}

/// The longest grant: access is meant to be just in time (a standing need is a role in the
/// configuration), and the expiry must stay far from what a date can hold.
pub const MAX_GRANT: Duration = Duration::from_secs(7 * 24 * 3600);

fn check_grant_duration(d: Duration) -> Result<(), ApprovalError> {
    if d.is_zero() {
        return Err(ApprovalError::Invalid("--for must be positive".into()));
    }
    if d > MAX_GRANT {
        return Err(ApprovalError::Invalid(
            "--for is at most 7 days: grants are just-in-time access".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
