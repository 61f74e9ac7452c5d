//! The bound on records waiting for the session writer, and each agent's share of it.
//!
//! Every record handed to the store is counted until the batch holding it has been written (or
//! has failed): in the queue's total and, for a record of a configured agent, in that agent's
//! own count. Producers of per-statement records ask for [`Backlog::room`] before taking the
//! agent's next message: below the high-water mark that is one atomic load. At it, an agent
//! holding its share of the bound waits, until its own count is below half its share or the
//! writer has drained the queue below the low-water mark (or caught up); an agent holding less
//! goes on. The share is `max_queued_per_agent` when set, else the bound divided among the
//! agents that have records queued. So one agent flooding the store waits for its own records
//! instead of holding every agent back; a disk that stalls for good holds each agent once it
//! has its share queued. Either way the daemon's memory stays bounded, and no record is
//! dropped: a statement the store has no room for is not read, so it does not run. Records that
//! are not per statement (a session's start and end, events) are not held back, so a queue can
//! pass the high-water mark; past [`Backlog::overloaded`] (twice the bound) new connections of
//! the agents holding their share are refused at accept.
//!
//! Recording is what makes a statement allowed to run: once the writer thread has stopped,
//! [`Backlog::room`] fails for good and [`Backlog::overloaded`] holds for every agent, so no
//! statement runs unrecorded and no connection is taken that could not be recorded. While the
//! writer's commits fail (a full disk) it keeps the batch and retries it: meanwhile
//! [`Backlog::overloaded`] holds for every agent and [`Backlog::room`] waits until a commit
//! succeeds. While the state directory's filesystem has less free space than the reserve
//! (`sessions.min_free_mib`), new connections are refused as well; statements of connections
//! already taken go on (the reserve is there for their records).
//!
//! This module counts and waits; the writer and the producers live in `session` and `proxy`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// `sessions:` in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreLimits {
    /// Records that may wait for the writer before agents holding their share of them wait for
    /// it (the high-water mark). They wait until the queue is below half of it, or their own
    /// count is below half their share; new connections of agents holding their share are
    /// refused while it holds twice as many.
    #[serde(default = "default_max_queued")]
    pub max_queued: usize,
    /// An agent's share of `max_queued` once the queue is at it. `None`: `max_queued` divided
    /// by the number of agents that have records queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queued_per_agent: Option<usize>,
    /// New connections are refused while the state directory's filesystem has less than this
    /// many MiB free (for the daemon's user), so that the store fills no disk up to the point
    /// where its commits fail. `None`: 256 MiB or 1% of the filesystem, whichever is smaller;
    /// 0: no reserve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_free_mib: Option<u64>,
}

fn default_max_queued() -> usize {
    100_000
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            max_queued: default_max_queued(),
            max_queued_per_agent: None,
            min_free_mib: None,
        }
    }
}

/// The session writer has stopped: statements cannot be recorded, so they must not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("session store writer stopped: statements cannot be recorded")]
pub struct WriterStopped;

/// Why the store cannot record anything new: new connections are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotRecording {
    #[error("the session store writer has stopped")]
    WriterStopped,
    #[error("session store writes are failing (is the disk full?); the writer retries them")]
    WritesFailing,
    #[error("the session store's filesystem has less free space than sessions.min_free_mib")]
    LowSpace,
}

/// Whose records these are, for the per-agent counts: one of the agents the store was opened
/// with, or [`AgentShare::NONE`] (the daemon's own records, counted in the total only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentShare(Option<u32>);

impl AgentShare {
    pub const NONE: AgentShare = AgentShare(None);
}

/// Backpressure starts and ends are logged at most this often (the rest are counted).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The count of queued records and what waits on it. Shared by the store's handle and the
/// writer thread.
pub(super) struct Backlog {
    queued: AtomicUsize,
    high: usize,
    low: usize,
    /// `sessions.max_queued_per_agent`.
    per_agent: Option<usize>,
    /// Per agent, in the order the store was opened with (an [`AgentShare`] indexes it).
    agents: Box<[AgentCount]>,
    by_name: HashMap<Box<str>, u32>,
    /// Agents with records queued: the bound's divisor when no share is configured.
    holding: AtomicUsize,
    /// Set when a producer finds the queue at `high`; cleared by the writer once it is below
    /// `low`. Producers holding their share wait while it is set (hysteresis: they do not wake
    /// for every batch).
    over: AtomicBool,
    /// Set when the writer thread has ended: nobody would clear `over`.
    stopped: AtomicBool,
    /// Set while the writer's commits fail (it keeps the batch and retries it).
    failing: AtomicBool,
    /// Set while the state directory's filesystem has less free space than the reserve.
    low_space: AtomicBool,
    drained: tokio::sync::Notify,
    log: Mutex<Episodes>,
}

struct AgentCount {
    name: Box<str>,
    queued: AtomicUsize,
}

/// Backpressure episodes, for the rate-limited log.
struct Episodes {
    began: Option<Instant>,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl Backlog {
    /// `agents`: the names records may count against (see [`Backlog::share`]).
    pub(super) fn new(limits: StoreLimits, agents: &[&str]) -> Backlog {
        let high = limits.max_queued.max(1);
        let agents: Box<[AgentCount]> = agents
            .iter()
            .map(|name| AgentCount {
                name: (*name).into(),
                queued: AtomicUsize::new(0),
            })
            .collect();
        let by_name = agents
            .iter()
            .enumerate()
            .filter_map(|(i, a)| Some((a.name.clone(), u32::try_from(i).ok()?)))
            .collect();
        Backlog {
            queued: AtomicUsize::new(0),
            high,
            // At least 1: with a bound of 1, "below half" would never come.
            low: (high / 2).max(1),
            per_agent: limits.max_queued_per_agent.map(|n| n.max(1)),
            agents,
            by_name,
            holding: AtomicUsize::new(0),
            over: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            low_space: AtomicBool::new(false),
            drained: tokio::sync::Notify::new(),
            log: Mutex::new(Episodes {
                began: None,
                last_log: None,
                unlogged: 0,
            }),
        }
    }

    /// The share records of `agent` count against; [`AgentShare::NONE`] for a name the store
    /// was not opened with.
    pub(super) fn share(&self, agent: &str) -> AgentShare {
        AgentShare(self.by_name.get(agent).copied())
    }

    fn count(&self, a: AgentShare) -> Option<&AtomicUsize> {
        let i = usize::try_from(a.0?).ok()?;
        self.agents.get(i).map(|c| &c.queued)
    }

    /// Records queued and not yet written.
    pub(super) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Records of `a` queued and not yet written (0 for no agent).
    pub(super) fn queued_by(&self, a: AgentShare) -> usize {
        self.count(a).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub(super) fn limit(&self) -> usize {
        self.high
    }

    /// What an agent may hold once the queue is at the high-water mark: the configured share,
    /// or the bound divided among the agents holding records.
    pub(super) fn agent_limit(&self) -> usize {
        self.per_agent.unwrap_or_else(|| {
            // Counted up before it is counted down (records are counted before they are sent),
            // so never below 0; clamped all the same.
            let holding = self
                .holding
                .load(Ordering::Relaxed)
                .clamp(1, self.agents.len().max(1));
            (self.high / holding).max(1)
        })
    }

    /// The agent with the most records queued, and how many.
    pub(super) fn busiest(&self) -> Option<(&str, usize)> {
        self.agents
            .iter()
            .map(|a| (&*a.name, a.queued.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .max_by_key(|(_, n)| *n)
    }

    /// A record of `a` was handed to the writer.
    pub(super) fn added(&self, a: AgentShare) {
        if let Some(count) = self.count(a)
            && count.fetch_add(1, Ordering::Relaxed) == 0
        {
            self.holding.fetch_add(1, Ordering::Relaxed);
        }
        self.queued.fetch_add(1, Ordering::Relaxed);
    }

    /// The writer is done with `n` records of `a`. Called for a batch's agents before
    /// [`Backlog::written`] counts the batch down and wakes producers: they must find their
    /// own counts down.
    pub(super) fn written_by(&self, a: AgentShare, n: usize) {
        if let Some(count) = self.count(a)
            && n > 0
            && count.fetch_sub(n, Ordering::SeqCst) == n
        {
            self.holding.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// The writer is done with `n` records (committed or failed).
    pub(super) fn written(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::SeqCst);
        if self.over.load(Ordering::SeqCst) {
            if self.queued.load(Ordering::SeqCst) < self.low {
                self.release();
            } else {
                // Agents whose own count is now below their mark go on.
                self.drained.notify_waiters();
            }
        }
    }

    /// The writer found the channel empty: everything sent before has been written (the
    /// count can only hold records being sent right now). It has caught up, whatever the count
    /// says: a steady trickle of records that are not per statement could otherwise keep the
    /// count at the low-water mark at every batch's end and hold statements back for good.
    pub(super) fn caught_up(&self) {
        if self.over.load(Ordering::SeqCst) {
            self.release();
        }
    }

    /// The writer has ended: nothing will drain the queue or record a statement. Waiting
    /// producers are woken to fail, and later ones fail at once (see [`Backlog::room`]).
    pub(super) fn writer_stopped(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.release();
    }

    /// The writer's commits fail (`true`) or succeed again (`false`). Producers waiting for
    /// room while they failed are woken once they succeed.
    pub(super) fn set_failing(&self, failing: bool) {
        if !self.failing.swap(failing, Ordering::SeqCst) || failing {
            return;
        }
        self.drained.notify_waiters();
    }

    /// The state directory's filesystem has less free space than the reserve, or no longer.
    pub(super) fn set_low_space(&self, low: bool) {
        self.low_space.store(low, Ordering::SeqCst);
    }

    /// Why nothing new can be recorded, if so: new connections are refused for it.
    pub(super) fn not_recording(&self) -> Option<NotRecording> {
        if self.stopped.load(Ordering::Relaxed) {
            Some(NotRecording::WriterStopped)
        } else if self.failing.load(Ordering::Relaxed) {
            Some(NotRecording::WritesFailing)
        } else if self.low_space.load(Ordering::Relaxed) {
            Some(NotRecording::LowSpace)
        } else {
            None
        }
    }

    /// Whether a new connection of `a` is refused: nothing new can be recorded (see
    /// [`Backlog::not_recording`]), or the queue is past the hard limit (twice the high-water
    /// mark) and `a` holds its share of it (records of no agent: always). An agent holding
    /// less is still served: its records are not what fills the queue.
    pub(super) fn overloaded(&self, a: AgentShare) -> bool {
        if self.not_recording().is_some() {
            return true;
        }
        if self.queued() < self.high.saturating_mul(2) {
            return false;
        }
        self.count(a)
            .is_none_or(|count| count.load(Ordering::Relaxed) >= self.agent_limit())
    }

    pub(super) fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    pub(super) fn backpressure(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    /// Resolves at once while the queue is below the high-water mark, or for an agent holding
    /// less than its share of it. An agent holding its share (and records of no agent) waits
    /// until the writer has drained the queue below the low-water mark (or caught up), or the
    /// agent's own count below half its share. While the writer's commits fail every agent
    /// waits, until one succeeds. Fails once the writer has stopped: a statement taken then
    /// would run unrecorded.
    pub(super) async fn room(&self, a: AgentShare) -> Result<(), WriterStopped> {
        if self.stopped.load(Ordering::Relaxed) {
            return Err(WriterStopped);
        }
        if !self.over.load(Ordering::Relaxed)
            && !self.failing.load(Ordering::Relaxed)
            && self.queued.load(Ordering::Relaxed) < self.high
        {
            return Ok(());
        }
        self.wait(a).await
    }

    async fn wait(&self, a: AgentShare) -> Result<(), WriterStopped> {
        // Once it has waited, an agent goes on below half its share: it does not wake for
        // every batch the writer commits.
        let mut held = false;
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            // Registered before the checks: a release between them and the await wakes it.
            notified.as_mut().enable();
            if self.stopped.load(Ordering::SeqCst) {
                return Err(WriterStopped);
            }
            if self.failing.load(Ordering::SeqCst) {
                notified.await;
                continue;
            }
            if !self.over.load(Ordering::SeqCst) {
                if self.queued.load(Ordering::SeqCst) < self.high {
                    return Ok(());
                }
                if self
                    .over
                    .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    self.began();
                    // The writer may have drained the queue between the load above and the
                    // flag being set, and be idle now: nothing else would clear it.
                    if self.queued.load(Ordering::SeqCst) < self.low {
                        self.release();
                        return Ok(());
                    }
                }
            }
            // The queue is at the high-water mark: what waits is whoever holds its share.
            if let Some(count) = self.count(a) {
                let share = self.agent_limit();
                let mark = if held { (share / 2).max(1) } else { share };
                if count.load(Ordering::SeqCst) < mark {
                    return Ok(());
                }
            }
            held = true;
            notified.await;
        }
    }

    fn began(&self) {
        let now = Instant::now();
        let mut log = self
            .log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        log.began = Some(now);
        if log
            .last_log
            .is_some_and(|t| now.duration_since(t) < LOG_EVERY)
        {
            log.unlogged += 1;
            return;
        }
        log.last_log = Some(now);
        let earlier = std::mem::take(&mut log.unlogged);
        drop(log);
        let busiest = self.busiest();
        tracing::warn!(
            queued = self.queued(),
            max_queued = self.high,
            agent_share = self.agent_limit(),
            busiest_agent = busiest.map(|(name, _)| name),
            busiest_agent_queued = busiest.map(|(_, n)| n),
            earlier_episodes_not_logged = earlier,
            "session store is behind: agents holding their share of its queue wait until their records are written"
        );
    }

    fn release(&self) {
        if self.over.swap(false, Ordering::SeqCst) {
            let now = Instant::now();
            let mut log = self
                .log
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let lasted = log.began.take().map(|b| now.duration_since(b));
            if log.unlogged == 0
                || log
                    .last_log
                    .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
            {
                log.last_log = Some(now);
                drop(log);
                tracing::warn!(
                    queued = self.queued(),
                    lasted_ms = lasted.map(|d| d.as_millis() as u64),
                    "session store caught up: governed agents' statements go on"
                );
            }
        }
        self.drained.notify_waiters();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const NONE: AgentShare = AgentShare::NONE;

    fn backlog(max_queued: usize) -> Arc<Backlog> {
        with_agents(
            StoreLimits {
                max_queued,
                ..StoreLimits::default()
            },
            &[],
        )
    }

    fn with_agents(limits: StoreLimits, agents: &[&str]) -> Arc<Backlog> {
        Arc::new(Backlog::new(limits, agents))
    }

    /// Two agents, `a` and `b`, sharing a bound of `max_queued`.
    fn two_agents(max_queued: usize) -> (Arc<Backlog>, AgentShare, AgentShare) {
        let b = with_agents(
            StoreLimits {
                max_queued,
                ..StoreLimits::default()
            },
            &["a", "b"],
        );
        let (a, other) = (b.share("a"), b.share("b"));
        (b, a, other)
    }

    fn add(b: &Backlog, a: AgentShare, n: usize) {
        (0..n).for_each(|_| b.added(a));
    }

    /// The writer done with `n` records of `a`.
    fn write(b: &Backlog, a: AgentShare, n: usize) {
        b.written_by(a, n);
        b.written(n);
    }

    /// A producer waiting for room, on its own task.
    fn waiter(
        b: &Arc<Backlog>,
        a: AgentShare,
    ) -> tokio::task::JoinHandle<Result<(), WriterStopped>> {
        let b = b.clone();
        tokio::spawn(async move { b.room(a).await })
    }

    /// Whether `room` answers at once: polled once, it either has room or waits.
    fn room_now(b: &Backlog, a: AgentShare) -> bool {
        let mut room = std::pin::pin!(b.room(a));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        matches!(room.as_mut().poll(&mut cx), std::task::Poll::Ready(Ok(())))
    }

    #[tokio::test]
    async fn producers_wait_from_the_high_mark_until_the_low_one() {
        let b = backlog(10);
        for _ in 0..9 {
            b.added(NONE);
            b.room(NONE).await.unwrap();
        }
        b.added(NONE);
        let waiting = waiter(&b, NONE);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert!(b.backpressure());
        // 10 -> 5: not below the low mark yet.
        b.written(5);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished() && b.backpressure());
        b.written(1);
        waiting.await.unwrap().unwrap();
        assert!(!b.backpressure());
        assert_eq!(b.queued(), 4);
    }

    #[tokio::test]
    async fn a_stopped_writer_fails_the_waiting() {
        let b = backlog(1);
        b.added(NONE);
        let waiting = waiter(&b, NONE);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        b.writer_stopped();
        assert_eq!(waiting.await.unwrap(), Err(WriterStopped));
    }

    #[tokio::test]
    async fn once_the_writer_has_stopped_there_is_no_room_and_connections_are_refused() {
        let (b, a, other) = two_agents(10);
        b.added(a);
        b.room(a).await.unwrap();
        assert!(!b.overloaded(a) && !b.overloaded(other));
        b.writer_stopped();
        // Not a stale count: an almost empty queue, and still nothing may run or connect, an
        // agent without a record queued included.
        write(&b, a, 1);
        for who in [a, other, NONE] {
            assert_eq!(b.room(who).await, Err(WriterStopped));
            assert_eq!(b.room(who).await, Err(WriterStopped));
            assert!(b.overloaded(who));
        }
        assert!(b.stopped());
    }

    #[tokio::test]
    async fn a_writer_that_caught_up_releases_whatever_the_count() {
        let b = backlog(10);
        add(&b, NONE, 10);
        let waiting = waiter(&b, NONE);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished() && b.backpressure());
        // Every batch ends at the low mark (new records keep arriving between batches): the
        // count alone never releases.
        b.written(5);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished() && b.backpressure());
        // The writer then finds the channel empty.
        b.caught_up();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(!b.backpressure());
    }

    #[tokio::test]
    async fn a_bound_of_one_releases_once_the_queue_is_empty() {
        let b = backlog(1);
        b.added(NONE);
        let waiting = waiter(&b, NONE);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        b.written(1);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(!b.backpressure());
    }

    #[test]
    fn overloaded_at_twice_the_high_mark() {
        let b = backlog(3);
        add(&b, NONE, 5);
        assert!(!b.overloaded(NONE));
        b.added(NONE);
        assert!(b.overloaded(NONE));
    }

    #[tokio::test]
    async fn at_the_bound_an_agent_holding_its_share_waits_while_another_goes_on() {
        // The writer is stalled: nothing is written in this test.
        let (b, a, other) = two_agents(10);
        add(&b, a, 10);
        let flooder = waiter(&b, a);
        tokio::task::yield_now().await;
        assert!(!flooder.is_finished() && b.backpressure());
        // Two agents hold records now: a share is 5 each.
        for n in 1..=4 {
            b.added(other);
            assert!(room_now(&b, other), "the other agent waits at {n}");
        }
        assert_eq!(b.agent_limit(), 5);
        assert_eq!(b.busiest(), Some(("a", 10)));
        // At its own share the other agent waits too.
        b.added(other);
        assert!(!room_now(&b, other));
        assert!(!flooder.is_finished());
        // Records of no agent wait at the bound, as before.
        assert!(!room_now(&b, NONE));
    }

    #[tokio::test]
    async fn a_held_agent_goes_on_once_its_own_count_is_below_half_its_share() {
        let (b, a, other) = two_agents(10);
        add(&b, other, 4);
        add(&b, a, 8);
        // 12 queued, a share of 5: `a` waits, `other` goes on.
        let held = waiter(&b, a);
        tokio::task::yield_now().await;
        assert!(!held.is_finished() && b.backpressure());
        assert!(room_now(&b, other));
        // Below its share, not below half of it: still waiting.
        write(&b, a, 4);
        tokio::task::yield_now().await;
        assert!(!held.is_finished());
        // Below half its share while the queue is still at the low mark (5): it goes on, it
        // does not wait for the other agent's records.
        write(&b, a, 3);
        tokio::time::timeout(Duration::from_secs(5), held)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(b.queued(), 5);
        assert!(b.backpressure());
    }

    #[test]
    fn a_configured_share_holds_agents_at_it() {
        let limits = StoreLimits {
            max_queued: 10,
            max_queued_per_agent: Some(3),
            ..StoreLimits::default()
        };
        let b = with_agents(limits, &["a", "b"]);
        let (a, other) = (b.share("a"), b.share("b"));
        add(&b, a, 10);
        assert!(!room_now(&b, a));
        add(&b, other, 2);
        assert!(room_now(&b, other));
        b.added(other);
        assert!(!room_now(&b, other));
        assert_eq!(b.agent_limit(), 3);
    }

    #[test]
    fn past_twice_the_bound_only_agents_holding_their_share_are_refused() {
        let (b, a, other) = two_agents(10);
        add(&b, a, 19);
        assert!(!b.overloaded(a));
        b.added(a);
        assert!(b.overloaded(a) && b.overloaded(NONE));
        assert!(!b.overloaded(other));
        // Below its share (5, with two agents holding records) the other agent is served.
        add(&b, other, 4);
        assert!(!b.overloaded(other));
        b.added(other);
        assert!(b.overloaded(other));
        // An agent the store does not know counts as no agent.
        assert_eq!(b.share("nobody"), NONE);
    }

    #[test]
    fn agents_holding_records_divide_the_bound() {
        let (b, a, other) = two_agents(10);
        assert_eq!(b.agent_limit(), 10);
        b.added(a);
        assert_eq!(b.agent_limit(), 10);
        b.added(other);
        assert_eq!(b.agent_limit(), 5);
        write(&b, a, 1);
        assert_eq!(b.agent_limit(), 10);
        assert_eq!(b.busiest(), Some(("b", 1)));
        write(&b, other, 1);
        assert_eq!(b.busiest(), None);
        assert_eq!(b.queued(), 0);
    }
}
