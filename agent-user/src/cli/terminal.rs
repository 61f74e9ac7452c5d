//! The operator's terminal, taken back from what a governed command leaves behind.
//!
//! `exec` gives the command the terminal's descriptors (so an interactive program works) but
//! not the terminal as its controlling terminal. A process the command starts can detach
//! (`setsid`, or just outlive it) and keep those descriptors: once `exec` has returned and the
//! operator's shell reads the terminal again, that process, reading too, takes part of what the
//! operator types next (a password at a `sudo` prompt), and can write over what the operator
//! reads. No process outside a terminal's session is stopped for reading it.
//!
//! So when the command has ended, `exec` freezes the agent's cgroup, kills every process in it
//! that holds one of the terminals `exec` itself was given and that does not belong to another
//! `exec` still running (a process is that exec's when its line of parents within the cgroup
//! leads to a process whose parent is an `agentgate` outside the cgroup), and thaws the cgroup.
//! Processes that let go of the terminal (a daemon that points its output elsewhere) are left
//! alone. Frozen, nothing can fork past the scan.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long a freeze may take to settle before the scan goes ahead anyway.
const FREEZE_WAIT: Duration = Duration::from_secs(1);

/// The terminal devices among standard input, output and error (by device number).
#[derive(Debug, Default)]
pub struct Terminals(Vec<u64>);

impl Terminals {
    /// Read before `exec` points its own standard streams elsewhere.
    pub fn of_stdio() -> Terminals {
        let stdin = std::io::stdin();
        let stdout = std::io::stdout();
        let stderr = std::io::stderr();
        let fds: [BorrowedFd<'_>; 3] = [stdin.as_fd(), stdout.as_fd(), stderr.as_fd()];
        let mut devices: Vec<u64> = fds
            .into_iter()
            .filter(|fd| nix::unistd::isatty(fd).unwrap_or(false))
            .filter_map(|fd| nix::sys::stat::fstat(fd).ok())
            .map(|st| st.st_rdev)
            .collect();
        devices.sort_unstable();
        devices.dedup();
        Terminals(devices)
    }

    /// Kills the processes of the cgroup at `dir` (and below) that hold one of these terminals
    /// and belong to no running `exec`; returns how many.
    pub fn take_back(&self, dir: &Path) -> usize {
        if self.0.is_empty() {
            return 0;
        }
        let frozen = Freeze::new(dir);
        let pids = processes_under(dir);
        let mut killed = 0;
        for pid in left_behind(&pids) {
            if self.held_by(pid) && kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                killed += 1;
            }
        }
        drop(frozen);
        killed
    }

    /// Whether `pid` has one of the terminals open.
    fn held_by(&self, pid: i32) -> bool {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return false;
        };
        fds.filter_map(Result::ok).any(|fd| {
            // Follows the descriptor to what it is open on.
            std::fs::metadata(fd.path())
                .is_ok_and(|m| m.file_type().is_char_device() && self.0.contains(&m.rdev()))
        })
    }
}

/// The cgroup frozen for as long as this lives, then put back as it was.
struct Freeze {
    file: PathBuf,
    previous: Option<String>,
}

impl Freeze {
    fn new(dir: &Path) -> Freeze {
        let file = dir.join("cgroup.freeze");
        let previous = std::fs::read_to_string(&file).ok();
        let frozen = previous.is_some() && std::fs::write(&file, "1").is_ok();
        if frozen {
            let started = Instant::now();
            while started.elapsed() < FREEZE_WAIT
                && !std::fs::read_to_string(dir.join("cgroup.events"))
                    .is_ok_and(|e| e.lines().any(|l| l == "frozen 1"))
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        } else {
            tracing::warn!(cgroup = %dir.display(), "cannot freeze the agent's cgroup; taking the terminal back without it");
        }
        Freeze { file, previous }
    }
}

impl Drop for Freeze {
    fn drop(&mut self) {
        if let Some(previous) = &self.previous {
            let _ = std::fs::write(&self.file, previous.trim());
        }
    }
}

/// Every process in the cgroup at `dir` and its descendants.
fn processes_under(dir: &Path) -> HashSet<i32> {
    let mut pids = HashSet::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(&d) {
            dirs.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    pids
}

/// The parent of `pid`, from `/proc/PID/stat` (after the command name, which may hold spaces
/// and parentheses).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The processes of `pids` that no running `exec` started: those whose line of parents within
/// `pids` does not lead to a process whose parent (outside `pids`) runs this program.
fn left_behind(pids: &HashSet<i32>) -> Vec<i32> {
    let own = std::fs::read_link("/proc/self/exe").ok();
    let parents: HashMap<i32, i32> = pids
        .iter()
        .filter_map(|&p| Some((p, parent_of(p)?)))
        .collect();
    let started_by_exec = |parent: i32| {
        let exe = std::fs::read_link(format!("/proc/{parent}/exe")).ok();
        exe.is_some() && exe == own
    };
    pids.iter()
        .copied()
        .filter(|&pid| {
            let mut at = pid;
            // Bounded: a loop in the parents (a pid reused meanwhile) ends it.
            for _ in 0..pids.len() {
                match parents.get(&at) {
                    Some(&parent) if pids.contains(&parent) => at = parent,
                    Some(&parent) => return !started_by_exec(parent),
                    None => return true,
                }
            }
            true
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_parent_is_read_past_a_command_name_with_spaces_and_parentheses() {
        // This process's own stat, whatever its name.
        let me = i32::try_from(std::process::id()).unwrap();
        let expected = nix::unistd::getppid().as_raw();
        assert_eq!(parent_of(me), Some(expected));
    }

    #[test]
    fn processes_under_a_live_exec_are_kept_and_the_rest_left_behind() {
        // This test process is "outside"; its children stand for a cgroup's processes. A child
        // whose parent runs this program (the test binary) counts as started by exec.
        let mut a = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let me = i32::try_from(std::process::id()).unwrap();
        let a_pid = i32::try_from(a.id()).unwrap();
        // A set holding the child only: its parent (this process) runs this program.
        let kept = left_behind(&HashSet::from([a_pid]));
        assert!(kept.is_empty(), "{kept:?}");
        // With this process in the set too, its own parent does not run this program.
        let left = left_behind(&HashSet::from([a_pid, me]));
        assert_eq!(left.len(), 2, "{left:?}");
        let _ = a.kill();
        let _ = a.wait();
    }
}
