//! Whether the session store can record: the writer's failing commits and the free space left on
//! the state directory's filesystem.
//!
//! A record the store could not commit must not be dropped: the writer keeps a batch that failed
//! and retries it (backing off from 100 ms to 1 s), and an [`Outage`] tracks the episode for the
//! rate-limited log and the event written once a commit succeeds again. The [`Reserve`] refuses
//! new connections before the disk is full, so that the records of connections already taken
//! still fit. Both only set flags in `backlog`; the admission decisions are made there and in
//! `proxy`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{Event, now_ms};

/// Failures and reserve shortfalls are logged at most this often while they last.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The first retry of a failed batch comes after this long, each next one after twice as long,
/// up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// How often the free space is looked at, at most (and while the writer is idle, at least).
pub(super) const SPACE_EVERY: Duration = Duration::from_millis(250);

/// The reserve when `sessions.min_free_mib` is not set: this, or 1% of the filesystem, whichever
/// is smaller.
const DEFAULT_RESERVE: u64 = 256 << 20;

/// An episode of failing commits: from the first failure to the commit that succeeded.
pub(super) struct Outage {
    began: Instant,
    began_ms: i64,
    tries: u64,
    first_error: String,
    last_log: Instant,
    unlogged: u64,
}

impl Outage {
    pub(super) fn new(error: &rusqlite::Error, queued: usize) -> Outage {
        tracing::error!(
            error = %error,
            queued,
            "session store write failed: the batch is kept and retried; new connections are refused and statements wait until a write succeeds"
        );
        let now = Instant::now();
        Outage {
            began: now,
            began_ms: now_ms(),
            tries: 1,
            first_error: error.to_string(),
            last_log: now,
            unlogged: 0,
        }
    }

    /// Another failed try; returns how long to wait before the next.
    pub(super) fn again(&mut self, error: &rusqlite::Error, queued: usize) -> Duration {
        self.tries += 1;
        if self.last_log.elapsed() >= LOG_EVERY {
            self.last_log = Instant::now();
            tracing::error!(
                error = %error,
                queued,
                tries = self.tries,
                failing_ms = duration_ms(self.began.elapsed()),
                "session store writes still fail: new connections are refused and statements wait"
            );
        } else {
            self.unlogged += 1;
        }
        backoff(self.tries)
    }

    /// The first wait, after the failure that began the episode.
    pub(super) fn first_wait(&self) -> Duration {
        backoff(self.tries)
    }

    /// Logs the end of the episode and returns the event recording it.
    pub(super) fn ended(self) -> Event {
        let lasted = duration_ms(self.began.elapsed());
        tracing::warn!(
            failing_ms = lasted,
            tries = self.tries,
            "session store writes succeed again: connections are taken again"
        );
        Event {
            kind: "session_store_failed".into(),
            detail: serde_json::json!({
                "since_ms": self.began_ms,
                "failing_ms": lasted,
                "tries": self.tries,
                "error": self.first_error,
            }),
            ..Default::default()
        }
    }
}

fn backoff(tries: u64) -> Duration {
    let doublings = u32::try_from(tries.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(4);
    (RETRY_FIRST * (1 << doublings)).min(RETRY_MAX)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The free space new connections need on the state directory's filesystem.
pub(super) struct Reserve {
    dir: PathBuf,
    /// `sessions.min_free_mib` in bytes; `None`: the default.
    configured: Option<u64>,
    checked: Option<Instant>,
    /// Since when the space has been below the reserve.
    low: Option<(Instant, i64)>,
    last_log: Option<Instant>,
}

/// What the space check found.
pub(super) enum Space {
    Enough,
    Low,
    /// Enough again, after being low: the event recording how long it was not.
    Recovered(Event),
}

impl Reserve {
    pub(super) fn new(dir: PathBuf, min_free_mib: Option<u64>) -> Reserve {
        Reserve {
            dir,
            configured: min_free_mib.map(|mib| mib.saturating_mul(1 << 20)),
            checked: None,
            low: None,
            last_log: None,
        }
    }

    /// Whether it is time to look at the free space again.
    pub(super) fn due(&self) -> bool {
        self.checked.is_none_or(|t| t.elapsed() >= SPACE_EVERY)
    }

    /// Looks at the free space. A filesystem that cannot be asked counts as having enough: its
    /// commits would fail if it were full, and the writer then refuses connections all the
    /// same.
    pub(super) fn check(&mut self) -> Space {
        self.checked = Some(Instant::now());
        if self.configured == Some(0) {
            return self.found(true, 0, 0);
        }
        let Ok(st) = nix::sys::statvfs::statvfs(&self.dir) else {
            return self.found(true, 0, 0);
        };
        let frsize = st.fragment_size();
        let free = st.blocks_available().saturating_mul(frsize);
        let size = st.blocks().saturating_mul(frsize);
        let reserve = self
            .configured
            .unwrap_or_else(|| DEFAULT_RESERVE.min(size / 100));
        self.found(free >= reserve, free, reserve)
    }

    fn found(&mut self, enough: bool, free: u64, reserve: u64) -> Space {
        let now = Instant::now();
        if enough {
            return match self.low.take() {
                Some((began, began_ms)) => {
                    let lasted = duration_ms(began.elapsed());
                    tracing::warn!(
                        free,
                        reserve,
                        low_ms = lasted,
                        "session store: free space is above the reserve again; connections are taken again"
                    );
                    Space::Recovered(Event {
                        kind: "session_store_low_space".into(),
                        detail: serde_json::json!({
                            "since_ms": began_ms,
                            "low_ms": lasted,
                            "reserve_bytes": reserve,
                        }),
                        ..Default::default()
                    })
                }
                None => Space::Enough,
            };
        }
        if self.low.is_none() {
            self.low = Some((now, now_ms()));
        }
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
        {
            self.last_log = Some(now);
            tracing::error!(
                dir = %self.dir.display(),
                free,
                reserve,
                "session store: free space is below the reserve (sessions.min_free_mib); new connections are refused"
            );
        }
        Space::Low
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_from_100_ms_to_1_s() {
        let waits: Vec<u64> = (1..=7).map(|t| backoff(t).as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(backoff(u64::MAX), RETRY_MAX);
    }

    #[test]
    fn a_reserve_larger_than_the_free_space_is_low_until_it_is_lifted() {
        let dir = std::env::temp_dir();
        let mut r = Reserve::new(dir.clone(), Some(u64::MAX >> 20));
        assert!(matches!(r.check(), Space::Low));
        assert!(matches!(r.check(), Space::Low));
        r.configured = Some(0);
        let Space::Recovered(e) = r.check() else {
            panic!("no recovery event");
        };
        assert_eq!(e.kind, "session_store_low_space");
        assert!(matches!(r.check(), Space::Enough));
        // The default on a filesystem with room: enough.
        let mut r = Reserve::new(dir, None);
        assert!(matches!(r.check(), Space::Enough));
    }
}
