//! `cargo xtask bench ...`: benchmarks. They are commands that print tables and write JSON under
//! `target/bench/`, not tests: numbers on a shared machine are for reading, not for asserting.

pub mod postgres;
pub mod tcp;

/// Nanoseconds the processes' threads have run, from `/proc/PID/task/TID/schedstat` (its first
/// field), for the proxy CPU per connection or transaction the benches report: a proxy's work,
/// which the machine's noise moves far less than latency or throughput. Threads that ended are
/// not counted, so sample processes whose threads live long (the daemon, nginx, PgBouncer).
pub fn cpu_ns(pids: &[u32]) -> u64 {
    let mut total = 0;
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let stat = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            total += stat
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

/// Jiffies the machine's CPUs spent idle (idle and iowait) and in all, from the `cpu` line of
/// `/proc/stat`: the difference over a run says how much of the machine nobody used, which
/// tells a proxy that holds clients back (CPU left idle) from one that is short of CPU.
pub fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    // user nice system idle iowait irq softirq steal (guest time is inside user and nice)
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (idle, fields.iter().sum())
}

/// Latency summary of a set of samples, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub n: usize,
    pub min_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl Latency {
    /// `None` when there are no samples.
    pub fn of(samples_ns: &[u64]) -> Option<Latency> {
        let mut sorted = samples_ns.to_vec();
        sorted.sort_unstable();
        let us = |ns: u64| ns as f64 / 1000.0;
        let sum: u128 = sorted.iter().map(|&s| u128::from(s)).sum();
        Some(Latency {
            n: sorted.len(),
            min_us: us(*sorted.first()?),
            p50_us: us(percentile(&sorted, 50.0)?),
            p90_us: us(percentile(&sorted, 90.0)?),
            p99_us: us(percentile(&sorted, 99.0)?),
            max_us: us(*sorted.last()?),
            mean_us: sum as f64 / sorted.len() as f64 / 1000.0,
        })
    }

    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "n": self.n,
            "min_us": round2(self.min_us),
            "p50_us": round2(self.p50_us),
            "p90_us": round2(self.p90_us),
            "p99_us": round2(self.p99_us),
            "max_us": round2(self.max_us),
            "mean_us": round2(self.mean_us),
        })
    }
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Median of a few values (per-round rates); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v.get(mid).copied()
    } else {
        Some((v.get(mid.checked_sub(1)?)? + v.get(mid)?) / 2.0)
    }
}

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Set in the environment of the release-built bench process that does the measuring.
pub const INNER_ENV: &str = "AGENTGATE_BENCH_INNER";

pub fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| agentgate_tests::workspace_root().join("target"))
}

/// In the outer `cargo xtask bench NAME` process: builds the release binaries (unless
/// `no_build`) and runs the measurement in `target/release/xtask` with the daemon pointed at the
/// release `agentgate` (environment for a child, since setting our own needs `unsafe`).
/// Returns `Ok(true)` when that inner run is done and the caller should return.
///
/// The inner process gets this process's own arguments: it parses the same options, and
/// [`INNER_ENV`] tells it not to build or re-run itself (so `--no-build` is moot there).
pub fn run_inner_release(name: &str, no_build: bool) -> anyhow::Result<bool> {
    use anyhow::Context as _;
    if std::env::var_os(INNER_ENV).is_some() {
        return Ok(false);
    }
    let xtask = target_dir().join("release/xtask");
    if !no_build {
        println!("==> cargo build --release -p agentgate -p xtask");
        crate::sh(crate::cargo().args(["build", "--release", "-p", "agentgate", "-p", "xtask"]))?;
    }
    let mut cmd = std::process::Command::new(&xtask);
    cmd.args(std::env::args_os().skip(1)).env(INNER_ENV, "1");
    if std::env::var_os("AGENTGATE_BIN").is_none() {
        cmd.env("AGENTGATE_BIN", target_dir().join("release/agentgate"));
    }
    let status = cmd
        .status()
        .with_context(|| format!("run {} (build it, or drop --no-build)", xtask.display()))?;
    if !status.success() {
        anyhow::bail!("bench {name} failed ({status})");
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let s: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&s, 50.0), Some(50));
        assert_eq!(percentile(&s, 99.0), Some(99));
        assert_eq!(percentile(&s, 100.0), Some(100));
        assert_eq!(percentile(&[7], 1.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }
}
