//! The bound on records waiting for the session writer.
//!
//! Every record handed to the store is counted until the batch holding it has been written (or
//! has failed). Producers of per-statement records ask for [`Backlog::room`] before taking the
//! agent's next message: below the high-water mark that is one atomic load; above it they wait
//! until the writer has drained the queue below the low-water mark. A disk that stalls (or a
//! writer that falls behind) then slows the governed agents down instead of growing the
//! daemon's memory, and no record is dropped: a statement the store has no room for is not read,
//! so it does not run. Records that are not per statement (a session's start and end, events)
//! are not held back, so a queue can pass the high-water mark; past [`Backlog::overloaded`]
//! new connections are refused at accept.
//!
//! Recording is what makes a statement allowed to run: once the writer thread has stopped,
//! [`Backlog::room`] fails for good and [`Backlog::overloaded`] holds, so no statement runs
//! unrecorded and no connection is taken that could not be recorded.
//!
//! This module counts and waits; the writer and the producers live in `session` and `proxy`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// `sessions:` in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreLimits {
    /// Records that may wait for the writer before governed agents' statements wait for it
    /// (the high-water mark). They wait until the queue is below half of it; new connections
    /// are refused while it holds twice as many.
    #[serde(default = "default_max_queued")]
    pub max_queued: usize,
}

fn default_max_queued() -> usize {
    100_000
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            max_queued: default_max_queued(),
        }
    }
}

/// The session writer has stopped: statements cannot be recorded, so they must not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("session store writer stopped: statements cannot be recorded")]
pub struct WriterStopped;

/// Backpressure starts and ends are logged at most this often (the rest are counted).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The count of queued records and what waits on it. Shared by the store's handle and the
/// writer thread.
pub(super) struct Backlog {
    queued: AtomicUsize,
    high: usize,
    low: usize,
    /// Set when a producer finds the queue at `high`; cleared by the writer once it is below
    /// `low`. Producers wait while it is set (hysteresis: they do not wake for every batch).
    over: AtomicBool,
    /// Set when the writer thread has ended: nobody would clear `over`.
    stopped: AtomicBool,
    drained: tokio::sync::Notify,
    log: Mutex<Episodes>,
}

/// Backpressure episodes, for the rate-limited log.
struct Episodes {
    began: Option<Instant>,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl Backlog {
    pub(super) fn new(limits: StoreLimits) -> Backlog {
        let high = limits.max_queued.max(1);
        Backlog {
            queued: AtomicUsize::new(0),
            high,
            // At least 1: with a bound of 1, "below half" would never come.
            low: (high / 2).max(1),
            over: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            drained: tokio::sync::Notify::new(),
            log: Mutex::new(Episodes {
                began: None,
                last_log: None,
                unlogged: 0,
            }),
        }
    }

    /// Records queued and not yet written.
    pub(super) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    pub(super) fn limit(&self) -> usize {
        self.high
    }

    /// A record was handed to the writer.
    pub(super) fn added(&self) {
        self.queued.fetch_add(1, Ordering::Relaxed);
    }

    /// The writer is done with `n` records (committed or failed).
    pub(super) fn written(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::SeqCst);
        if self.over.load(Ordering::SeqCst) && self.queued.load(Ordering::SeqCst) < self.low {
            self.release();
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

    /// Past the hard limit (twice the high-water mark), or no writer: new connections are
    /// refused.
    pub(super) fn overloaded(&self) -> bool {
        self.stopped.load(Ordering::Relaxed) || self.queued() >= self.high.saturating_mul(2)
    }

    pub(super) fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    pub(super) fn backpressure(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    /// Resolves at once while the queue is below the high-water mark; above it, once the writer
    /// has drained it below the low-water mark (or caught up). Fails once the writer has
    /// stopped: a statement taken then would run unrecorded.
    pub(super) async fn room(&self) -> Result<(), WriterStopped> {
        if self.stopped.load(Ordering::Relaxed) {
            return Err(WriterStopped);
        }
        if !self.over.load(Ordering::Relaxed) && self.queued.load(Ordering::Relaxed) < self.high {
            return Ok(());
        }
        self.wait().await
    }

    async fn wait(&self) -> Result<(), WriterStopped> {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            // Registered before the checks: a release between them and the await wakes it.
            notified.as_mut().enable();
            if self.stopped.load(Ordering::SeqCst) {
                return Err(WriterStopped);
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
        tracing::warn!(
            queued = self.queued(),
            max_queued = self.high,
            earlier_episodes_not_logged = earlier,
            "session store is behind: governed agents' statements wait until its queue drains"
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

    fn backlog(max_queued: usize) -> Arc<Backlog> {
        Arc::new(Backlog::new(StoreLimits { max_queued }))
    }

    /// A producer waiting for room, on its own task.
    fn waiter(b: &Arc<Backlog>) -> tokio::task::JoinHandle<Result<(), WriterStopped>> {
        let b = b.clone();
        tokio::spawn(async move { b.room().await })
    }

    #[tokio::test]
    async fn producers_wait_from_the_high_mark_until_the_low_one() {
        let b = backlog(10);
        for _ in 0..9 {
            b.added();
            b.room().await.unwrap();
        }
        b.added();
        let waiting = waiter(&b);
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
        b.added();
        let waiting = waiter(&b);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        b.writer_stopped();
        assert_eq!(waiting.await.unwrap(), Err(WriterStopped));
    }

    #[tokio::test]
    async fn once_the_writer_has_stopped_there_is_no_room_and_connections_are_refused() {
        let b = backlog(10);
        b.added();
        b.room().await.unwrap();
        assert!(!b.overloaded());
        b.writer_stopped();
        // Not a stale count: an almost empty queue, and still nothing may run or connect.
        b.written(1);
        assert_eq!(b.room().await, Err(WriterStopped));
        assert_eq!(b.room().await, Err(WriterStopped));
        assert!(b.overloaded() && b.stopped());
    }

    #[tokio::test]
    async fn a_writer_that_caught_up_releases_whatever_the_count() {
        let b = backlog(10);
        for _ in 0..10 {
            b.added();
        }
        let waiting = waiter(&b);
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
        b.added();
        let waiting = waiter(&b);
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
        for _ in 0..5 {
            b.added();
        }
        assert!(!b.overloaded());
        b.added();
        assert!(b.overloaded());
    }
}
