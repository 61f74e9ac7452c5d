//! How many events one source may have recorded.
//!
//! Some events are caused by whoever is on the other side: a governed agent that loops on a
//! refused `connect` makes a kernel refusal per call, any local user can open connections to the
//! gate's listener without a flow record. Recorded one by one, such a loop would fill the state
//! directory's disk and the log, and keep the daemon busy reading `/proc`. Each source (an event
//! kind, and the agent when there is one) therefore gets a token bucket: `burst` events at once,
//! then `per_second`. Events beyond it are counted, never dropped silently: every
//! [`FLUSH_EVERY`] the daemon records one `events_suppressed` event per source with how many of
//! its events were left out and over which interval.
//!
//! The kernel's ring buffer of refusals is shared by every agent, so the kernel keeps a coarser
//! budget per agent before this one ([`KernelEventBudget`]): refusals over it never reach the
//! daemon and are counted per agent (`kernel_events_suppressed`).
//!
//! Pure: the caller passes the time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use agent_common::EVENTS_CAPACITY;
use serde::{Deserialize, Serialize};

/// How often counts of left-out events are recorded.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// `events:` in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventLimits {
    /// Events of one source recorded at once before the rate applies.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// Events of one source recorded per second once its burst is spent.
    #[serde(default = "default_per_second")]
    pub per_second: u32,
}

fn default_burst() -> u32 {
    100
}

/// The most `events.per_second` may be. The kernel's refill is whole nanoseconds per entry,
/// at twice this rate: far below a nanosecond's worth, and no refusal is lost to rounding.
pub const MAX_PER_SECOND: u32 = 1_000_000;

fn default_per_second() -> u32 {
    20
}

impl Default for EventLimits {
    fn default() -> Self {
        EventLimits {
            burst: default_burst(),
            per_second: default_per_second(),
        }
    }
}

/// Kernel budgets never go below these, so a small `events:` setting does not leave the kernel
/// passing on fewer refusals than this limiter wants to see.
const KERNEL_MIN_BURST: u32 = 64;
const KERNEL_MIN_PER_SECOND: u32 = 32;

/// Each agent's budget of entries in the kernel's ring buffer of refusals (see
/// `agent_common::EventBudget`), derived from `events:`.
///
/// Twice this limiter's burst and rate (at least [`KERNEL_MIN_BURST`] and
/// [`KERNEL_MIN_PER_SECOND`]): an agent's refusals reach the daemon faster than they are
/// recorded, so this limiter, which tells refusals apart by reason, stays the one that decides
/// in ordinary use, and the kernel's only keeps one agent from taking the ring.
///
/// The arithmetic: the ring holds [`EVENTS_CAPACITY`] entries (13107). Half of it is shared out
/// as bursts among the agents and the orphaned cgroups' slot, so every agent's burst fits at
/// once even when nobody reads: with the default `events:` (burst 100, so 200 in the kernel)
/// that is 31 agents; with more, each burst is cut to its share (12 at the most agents a
/// configuration may have, 512), and `clamped` says when that is below `events.burst`. The other half takes the refill while
/// the daemon is slow to read: 32 slots at the default 40 per second fill it in 5 seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelEventBudget {
    pub burst: u32,
    pub per_second: u32,
    /// The ring's share per agent is smaller than `events.burst`: the kernel's budget, not
    /// this limiter, decides how many of an agent's refusals are recorded at once.
    pub clamped: bool,
}

impl KernelEventBudget {
    pub fn of(limits: EventLimits, agents: usize) -> KernelEventBudget {
        let wanted = limits.burst.saturating_mul(2).max(KERNEL_MIN_BURST);
        let slots = u32::try_from(agents).unwrap_or(u32::MAX).saturating_add(1);
        let share = (EVENTS_CAPACITY / 2) / slots;
        let burst = wanted.min(share).max(1);
        KernelEventBudget {
            burst,
            per_second: limits
                .per_second
                .saturating_mul(2)
                .max(KERNEL_MIN_PER_SECOND),
            clamped: burst < limits.burst,
        }
    }

    /// Nanoseconds per entry regained. Never 0: the kernel divides by it, and a 0 there earns
    /// nothing ever again, so after the first burst every refusal would only be counted.
    pub fn refill_ns(&self) -> u64 {
        (1_000_000_000 / u64::from(self.per_second.max(1))).max(1)
    }
}

/// Where events come from: their kind, the agent that caused them when known, and why (a kernel
/// refusal's reason), so that a flood of harmless refusals cannot hide another kind (a raw
/// socket behind a thousand unknown destinations).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Source {
    pub kind: &'static str,
    pub agent: Option<String>,
    pub reason: Option<&'static str>,
}

impl Source {
    /// A source told apart by kind and agent only.
    pub fn new(kind: &'static str, agent: Option<String>) -> Source {
        Source {
            kind,
            agent,
            reason: None,
        }
    }
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
    left_out: u64,
    first_left_out: Option<Instant>,
    last_left_out: Option<Instant>,
}

/// Events of one source that were not recorded since the last flush.
#[derive(Debug, Clone, PartialEq)]
pub struct LeftOut {
    pub source: Source,
    pub count: u64,
    /// From the first to the last event left out.
    pub over: Duration,
}

/// The token buckets of all sources.
pub struct EventLimiter {
    limits: EventLimits,
    buckets: Mutex<HashMap<Source, Bucket>>,
}

/// Sources whose bucket is full again and has nothing to report are forgotten at a flush, so a
/// stream of new agent names cannot grow the map without bound; this caps it regardless.
const MAX_SOURCES: usize = 4096;

impl EventLimiter {
    pub fn new(limits: EventLimits) -> EventLimiter {
        EventLimiter {
            limits,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// True when an event of `source` at `now` is to be recorded; false when it is only counted.
    pub fn admit(&self, source: &Source, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !buckets.contains_key(source) && buckets.len() >= MAX_SOURCES {
            // Too many distinct sources at once: they share one bucket instead of each getting a
            // burst of their own.
            let overflow = Source::new(source.kind, Some("(other sources)".into()));
            return self.take(&mut buckets, overflow, now);
        }
        self.take(&mut buckets, source.clone(), now)
    }

    fn take(&self, buckets: &mut HashMap<Source, Bucket>, source: Source, now: Instant) -> bool {
        let burst = f64::from(self.limits.burst);
        let bucket = buckets.entry(source).or_insert(Bucket {
            tokens: burst,
            refilled: now,
            left_out: 0,
            first_left_out: None,
            last_left_out: None,
        });
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens =
            (bucket.tokens + elapsed * f64::from(self.limits.per_second)).min(burst.max(1.0));
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return true;
        }
        bucket.left_out += 1;
        bucket.first_left_out.get_or_insert(now);
        bucket.last_left_out = Some(now);
        false
    }

    /// What was left out since the last flush, per source; resets the counts and forgets
    /// sources that are idle (their bucket would be full again).
    pub fn flush(&self, now: Instant) -> Vec<LeftOut> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        let full_after = if self.limits.per_second == 0 {
            None
        } else {
            Some(Duration::from_secs_f64(
                f64::from(self.limits.burst) / f64::from(self.limits.per_second),
            ))
        };
        buckets.retain(|source, b| {
            if b.left_out > 0 {
                let first = b.first_left_out.unwrap_or(now);
                out.push(LeftOut {
                    source: source.clone(),
                    count: b.left_out,
                    over: b
                        .last_left_out
                        .unwrap_or(now)
                        .saturating_duration_since(first),
                });
                b.left_out = 0;
                b.first_left_out = None;
                b.last_left_out = None;
                return true;
            }
            // Idle long enough to be full again: nothing is lost by forgetting it.
            full_after.is_none_or(|d| now.saturating_duration_since(b.refilled) < d)
        });
        out.sort_by(|a, b| a.source.cmp(&b.source));
        out
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn source(agent: &str) -> Source {
        Source {
            kind: "kernel_deny",
            agent: Some(agent.into()),
            reason: Some("unknown_destination"),
        }
    }

    #[test]
    fn a_burst_then_the_rate_and_the_rest_is_counted() {
        let l = EventLimiter::new(EventLimits {
            burst: 10,
            per_second: 5,
        });
        let t0 = Instant::now();
        let admitted = (0..1000).filter(|_| l.admit(&source("bot"), t0)).count();
        assert_eq!(admitted, 10);
        // One second later five more tokens.
        let t1 = t0 + Duration::from_secs(1);
        let admitted = (0..100).filter(|_| l.admit(&source("bot"), t1)).count();
        assert_eq!(admitted, 5);
        let left = l.flush(t1);
        assert_eq!(
            left,
            vec![LeftOut {
                source: source("bot"),
                count: 990 + 95,
                over: Duration::from_secs(1),
            }]
        );
        // Counted once: the next flush has nothing.
        assert!(l.flush(t1).is_empty());
    }

    #[test]
    fn one_source_flooding_leaves_the_others_their_burst() {
        let l = EventLimiter::new(EventLimits {
            burst: 3,
            per_second: 1,
        });
        let t = Instant::now();
        for _ in 0..100 {
            l.admit(&source("noisy"), t);
        }
        assert!(l.admit(&source("quiet"), t));
        let other_kind = Source::new("no_flow_record", None);
        assert!(l.admit(&other_kind, t));
        let left = l.flush(t);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].source, source("noisy"));
        assert_eq!(left[0].count, 97);
    }

    #[test]
    fn the_kernel_refill_is_never_zero_nanoseconds() {
        let fastest = KernelEventBudget::of(
            EventLimits {
                burst: 1,
                per_second: u32::MAX,
            },
            1,
        );
        assert_eq!(fastest.refill_ns(), 1);
        let capped = KernelEventBudget::of(
            EventLimits {
                burst: 1,
                per_second: MAX_PER_SECOND,
            },
            1,
        );
        assert_eq!(capped.refill_ns(), 500);
    }

    #[test]
    fn the_kernel_budget_is_coarser_than_the_limiter_and_every_agents_burst_fits_in_the_ring() {
        let defaults = KernelEventBudget::of(EventLimits::default(), 2);
        assert_eq!((defaults.burst, defaults.per_second), (200, 40));
        assert_eq!(defaults.refill_ns(), 25_000_000);
        assert!(!defaults.clamped);
        let small = KernelEventBudget::of(
            EventLimits {
                burst: 1,
                per_second: 0,
            },
            2,
        );
        assert_eq!((small.burst, small.per_second), (64, 32));
        for agents in [0, 1, 31, 32, 100, agent_common::MAX_AGENTS as usize] {
            let b = KernelEventBudget::of(EventLimits::default(), agents);
            let slots = agents as u32 + 1;
            assert!(
                slots * b.burst <= EVENTS_CAPACITY / 2,
                "{agents} agents: {b:?}"
            );
            assert_eq!(b.burst == 200, agents <= 31, "{agents} agents: {b:?}");
            assert_eq!(b.clamped, b.burst < 100, "{agents} agents: {b:?}");
        }
        let most = KernelEventBudget::of(EventLimits::default(), agent_common::MAX_AGENTS as usize);
        assert_eq!(most.burst, 12);
    }

    #[test]
    fn idle_sources_are_forgotten_and_new_ones_cannot_grow_the_map_without_bound() {
        let l = EventLimiter::new(EventLimits {
            burst: 2,
            per_second: 1,
        });
        let t = Instant::now();
        for i in 0..(MAX_SOURCES + 500) {
            l.admit(&source(&format!("a{i}")), t);
        }
        let len = l.buckets.lock().map(|b| b.len()).unwrap_or(0);
        assert_eq!(len, MAX_SOURCES + 1, "the overflow shares one bucket");
        // 500 sources shared the overflow bucket's burst of 2.
        let left = l.flush(t);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].count, 498);
        // Two seconds later every bucket is full again: all forgotten.
        assert!(l.flush(t + Duration::from_secs(2)).is_empty());
        let len = l.buckets.lock().map(|b| b.len()).unwrap_or(usize::MAX);
        assert_eq!(len, 0);
    }
}
