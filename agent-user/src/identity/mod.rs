//! Who is speaking: cgroup placement and process facts.
//!
//! Owns finding the cgroup2 mount (from `/proc/self/mountinfo`, never a hard-coded path),
//! creating and joining agent cgroups, resolving a cgroup id (the directory's inode number, which
//! is what `bpf_get_current_cgroup_id()` returns) and reading a process's exe, cmdline and uid
//! from `/proc` at accept time. It decides nothing.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;

use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2Mount,
    #[error("cannot read /proc/self/mountinfo: {0}")]
    MountInfo(io::Error),
    #[error("cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: io::Error },
}

/// Finds the cgroup2 mount point in a mountinfo text.
pub fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mountpoint options... - fstype source superopts
        let (pre, post) = line.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = pre.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(b) => out.push(char::from(b)),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&code);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Is a bpf filesystem mounted exactly at `path`?
pub fn bpffs_mounted_at(mountinfo: &str, path: &Path) -> bool {
    mountinfo.lines().any(|line| {
        let Some((pre, post)) = line.split_once(" - ") else {
            return false;
        };
        let fstype = post.split_whitespace().next();
        let mp = pre.split_whitespace().nth(4).map(unescape_mountinfo);
        fstype == Some("bpf") && mp.as_deref().map(Path::new) == Some(path)
    })
}

pub fn read_mountinfo() -> Result<String, IdentityError> {
    fs::read_to_string("/proc/self/mountinfo").map_err(IdentityError::MountInfo)
}

/// The cgroup2 hierarchy of this host.
#[derive(Debug, Clone)]
pub struct CgroupFs {
    pub mount: PathBuf,
}

impl CgroupFs {
    pub fn discover() -> Result<CgroupFs, IdentityError> {
        let info = read_mountinfo()?;
        let mount = cgroup2_mount_in(&info).ok_or(IdentityError::NoCgroup2Mount)?;
        Ok(CgroupFs { mount })
    }

    /// Absolute directory of a cgroup given relative to the mount (a leading `/` is allowed).
    pub fn dir(&self, relative: &str) -> PathBuf {
        self.mount.join(relative.trim_start_matches('/'))
    }

    /// Creates the cgroup (and parents) if missing; returns its id.
    pub fn ensure(&self, relative: &str) -> Result<u64, IdentityError> {
        let dir = self.dir(relative);
        fs::create_dir_all(&dir).map_err(|source| IdentityError::Cgroup {
            path: dir.clone(),
            source,
        })?;
        cgroup_id(&dir)
    }

    /// The cgroup path (relative to the mount) of a process, from `/proc/PID/cgroup`.
    pub fn of_pid(pid: u32) -> Option<String> {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(str::to_string)
    }

    /// Moves a process into a cgroup.
    pub fn join(&self, relative: &str, pid: u32) -> Result<(), IdentityError> {
        let procs = self.dir(relative).join("cgroup.procs");
        fs::write(&procs, pid.to_string()).map_err(|source| IdentityError::Cgroup {
            path: procs,
            source,
        })
    }
}

/// A cgroup's id: the inode number of its directory.
pub fn cgroup_id(dir: &Path) -> Result<u64, IdentityError> {
    fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|source| IdentityError::Cgroup {
            path: dir.to_path_buf(),
            source,
        })
}

/// What `/proc` says about a process at accept time. Fields are `None` when the process has
/// already gone (the record still has the kernel's tgid and uid).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub uid: u32,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    pub cgroup: Option<String>,
}

impl ProcessInfo {
    pub fn read(pid: u32, uid: u32) -> ProcessInfo {
        ProcessInfo {
            pid,
            uid,
            exe: read_exe(pid),
            cmdline: read_cmdline(pid),
            cgroup: CgroupFs::of_pid(pid),
        }
    }

    /// The facts of the process behind a connection whose kernel record names `cgroup_id`.
    ///
    /// exe and cmdline are read for every connection: a process keeps its pid and its start
    /// time across `execve`, so no cheaper key tells whether they are still what an earlier
    /// read saw (the cmdline file of a process that connects again is kept open, so that read
    /// is a single `pread`). The cgroup path is the one of `cgroup_id` (the cgroup the process connected
    /// from) when that is known: `/proc/PID/cgroup` lists every v1 hierarchy on a hybrid host
    /// and is the costliest of the three reads, so paths are remembered per cgroup id and
    /// checked against the directory's inode number at most once a second (a renamed or
    /// removed cgroup fails the check and is read again).
    pub fn of_connection(pid: u32, uid: u32, cgroup_id: u64) -> ProcessInfo {
        ProcessInfo {
            pid,
            uid,
            exe: read_exe(pid),
            cmdline: read_cmdline_of_connection(pid),
            cgroup: cgroup_path(pid, cgroup_id),
        }
    }
}

fn read_exe(pid: u32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

fn read_cmdline(pid: u32) -> Option<String> {
    let f = fs::File::open(format!("/proc/{pid}/cmdline")).ok()?;
    read_cmdline_from(&f).ok()
}

/// The most of a command line that is read and recorded. The agent chooses its arguments (up to
/// about 2 MiB on Linux): read whole, they were kept in memory until the session writer caught
/// up and written into every session row, so a few thousand connections took gigabytes of the
/// daemon's memory and of the state directory's disk.
pub const CMDLINE_MAX: usize = 4096;

/// Marks a command line cut at [`CMDLINE_MAX`].
const CUT: &str = " [...]";

/// Reads at most [`CMDLINE_MAX`] bytes of a `cmdline` file (one more tells whether it goes on).
fn read_cmdline_from(f: &fs::File) -> io::Result<String> {
    use std::os::unix::fs::FileExt;
    let mut raw = [0u8; CMDLINE_MAX + 1];
    let n = loop {
        match f.read_at(&mut raw, 0) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    };
    let read = raw.get(..n.min(CMDLINE_MAX)).unwrap_or_default();
    let mut line = join_cmdline(read);
    if n > CMDLINE_MAX {
        line.push_str(CUT);
    }
    Ok(line)
}

fn join_cmdline(raw: &[u8]) -> String {
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(String::from_utf8_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Open `/proc/PID/cmdline` files of recent connecting processes, per accept thread; bounded.
const CMDLINE_FILES_MAX: usize = 64;

thread_local! {
    static CMDLINE_FILES: std::cell::RefCell<std::collections::HashMap<u32, fs::File>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// A process's current command line, read through an open file kept for its pid: a process
/// that connects again costs one `pread`, not open, read and close. The read is still made for
/// every connection (it is what tells an `execve` apart). The file stays bound to the process it
/// was opened for: once that process is gone it reads `ESRCH`, so a reused pid is opened anew
/// and never reads as the old process.
fn read_cmdline_of_connection(pid: u32) -> Option<String> {
    match CMDLINE_FILES.with_borrow(|files| files.get(&pid).map(read_cmdline_from)) {
        Some(Ok(line)) => return Some(line),
        Some(Err(_)) => {
            CMDLINE_FILES.with_borrow_mut(|files| files.remove(&pid));
        }
        None => {}
    }
    let f = fs::File::open(format!("/proc/{pid}/cmdline")).ok()?;
    let line = read_cmdline_from(&f).ok()?;
    CMDLINE_FILES.with_borrow_mut(|files| {
        if files.len() >= CMDLINE_FILES_MAX {
            files.clear();
        }
        files.insert(pid, f);
    });
    Some(line)
}

/// Remembered cgroup paths per cgroup id, per accept thread (so no lock); bounded.
const CGROUP_PATHS_MAX: usize = 1024;
/// How long a remembered path is used before it is checked again. A cgroup id is not reused
/// while the host runs (the kernel's 64-bit ids carry a generation), so the check only catches
/// a cgroup renamed or removed; until then a path is at most this old.
const CGROUP_PATH_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

thread_local! {
    static CGROUP_PATHS: std::cell::RefCell<
        std::collections::HashMap<u64, (String, std::time::Instant)>,
    > = std::cell::RefCell::new(std::collections::HashMap::new());
}

/// The cgroup2 mount of this host, opened once (`O_PATH`): paths are checked relative to it,
/// without walking the mount point's own components each time.
fn cgroup2_mount() -> Option<&'static OwnedFd> {
    static MOUNT: std::sync::OnceLock<Option<OwnedFd>> = std::sync::OnceLock::new();
    MOUNT
        .get_or_init(|| {
            let mount = CgroupFs::discover().ok()?.mount;
            nix::fcntl::open(
                &mount,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .ok()
        })
        .as_ref()
}

/// Does `relative` (as `/proc/PID/cgroup` spells it) name the cgroup with id `id`?
fn names_cgroup(mount: &OwnedFd, relative: &str, id: u64) -> bool {
    let rel = match relative.trim_start_matches('/') {
        "" => ".",
        r => r,
    };
    nix::sys::stat::fstatat(mount, rel, AtFlags::empty()).is_ok_and(|st| st.st_ino == id)
}

fn cgroup_path(pid: u32, cgroup_id: u64) -> Option<String> {
    let Some(mount) = cgroup2_mount() else {
        return CgroupFs::of_pid(pid);
    };
    let cached = CGROUP_PATHS.with(|c| c.borrow().get(&cgroup_id).cloned());
    if let Some((path, checked)) = cached {
        if checked.elapsed() < CGROUP_PATH_RECHECK {
            return Some(path);
        }
        if names_cgroup(mount, &path, cgroup_id) {
            CGROUP_PATHS.with(|c| {
                c.borrow_mut()
                    .insert(cgroup_id, (path.clone(), std::time::Instant::now()))
            });
            return Some(path);
        }
        CGROUP_PATHS.with(|c| c.borrow_mut().remove(&cgroup_id));
    }
    // First connection from this cgroup (or it moved): ask /proc. If the process has moved
    // since it connected, its current cgroup is recorded, as before, and not remembered.
    let path = CgroupFs::of_pid(pid)?;
    if names_cgroup(mount, &path, cgroup_id) {
        CGROUP_PATHS.with(|c| {
            let mut c = c.borrow_mut();
            if c.len() >= CGROUP_PATHS_MAX {
                c.clear();
            }
            c.insert(cgroup_id, (path.clone(), std::time::Instant::now()));
        });
    }
    Some(path)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
29 24 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
30 29 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
31 29 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
40 24 0:35 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:15 - bpf bpf rw,mode=700
";

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        assert_eq!(
            cgroup2_mount_in(HYBRID).unwrap(),
            PathBuf::from("/sys/fs/cgroup/unified")
        );
        let unified = "30 29 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_in(unified).unwrap(),
            PathBuf::from("/sys/fs/cgroup")
        );
        assert!(cgroup2_mount_in("24 30 0:22 / /sys rw - sysfs sysfs rw\n").is_none());
    }

    #[test]
    fn escaped_mount_points() {
        let line = "30 29 0:27 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_in(line).unwrap(),
            PathBuf::from("/mnt/with space")
        );
    }

    #[test]
    fn bpffs_detection() {
        assert!(bpffs_mounted_at(HYBRID, Path::new("/sys/fs/bpf")));
        assert!(!bpffs_mounted_at(HYBRID, Path::new("/sys/fs/cgroup")));
    }

    #[test]
    fn reads_own_process() {
        let me = ProcessInfo::read(std::process::id(), 0);
        assert!(me.exe.is_some());
        assert!(me.cmdline.is_some());
    }

    #[test]
    fn a_command_line_is_read_up_to_its_cap_and_marked_cut() {
        // An agent chooses its arguments: 64 arguments of 16 KiB (1 MiB) are read as 4 KiB.
        let long = "x".repeat(16 * 1024);
        let mut child = std::process::Command::new("/usr/bin/python3")
            .args(["-c", "import time; time.sleep(30)"])
            .args(std::iter::repeat_n(&long, 64))
            .spawn()
            .unwrap();
        let pid = child.id();
        // Its arguments are in place a moment after `spawn` returns (the descriptor `spawn`
        // waits on closes before the new program's arguments are set up).
        let started = std::time::Instant::now();
        while read_cmdline(pid).unwrap_or_default().is_empty()
            && started.elapsed() < std::time::Duration::from_secs(5)
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        for line in [
            read_cmdline(pid).unwrap(),
            read_cmdline_of_connection(pid).unwrap(),
        ] {
            assert!(
                line.starts_with("/usr/bin/python3 -c import time; time.sleep(30) xxx"),
                "{}",
                &line[..40]
            );
            assert!(line.ends_with(CUT), "{}", &line[line.len() - 20..]);
            assert!(line.len() <= CMDLINE_MAX + CUT.len(), "{}", line.len());
        }
        let _ = child.kill();
        let _ = child.wait();
        // A short one is read whole, unmarked.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while read_cmdline(child.id()).as_deref() != Some("sleep 30")
            && started.elapsed() < std::time::Duration::from_secs(5)
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(read_cmdline(child.id()).as_deref(), Some("sleep 30"));
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn connection_facts_match_a_full_read() {
        let pid = std::process::id();
        let full = ProcessInfo::read(pid, 0);
        assert!(cgroup2_mount().is_some(), "no cgroup2 mount on this host");
        let cgroup = full.cgroup.clone().unwrap();
        let id = cgroup_id(&CgroupFs::discover().unwrap().dir(&cgroup)).unwrap();
        // Twice: the second answer comes from the remembered path.
        for _ in 0..2 {
            let conn = ProcessInfo::of_connection(pid, 0, id);
            assert_eq!(conn.exe, full.exe);
            assert_eq!(conn.cmdline, full.cmdline);
            assert_eq!(conn.cgroup, full.cgroup);
        }
        assert!(CGROUP_PATHS.with(|c| c.borrow().contains_key(&id)));
        // An id that names no cgroup is not remembered; /proc's answer stands.
        let other = ProcessInfo::of_connection(pid, 0, u64::MAX);
        assert_eq!(other.cgroup, full.cgroup);
        assert!(!CGROUP_PATHS.with(|c| c.borrow().contains_key(&u64::MAX)));
    }

    #[test]
    fn connection_facts_follow_execve_and_never_outlive_the_process() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let mut child = Command::new("sh")
            .args(["-c", "read _ && exec sleep 30"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        // Retried: `spawn` may return while the new image is still setting up its arguments,
        // and exe and cmdline are two reads, so an exec may fall between them.
        let until = |cmdline: &str, exe: &str| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let p = ProcessInfo::of_connection(pid, 0, 0);
                let done = p.cmdline.as_deref() == Some(cmdline)
                    && p.exe.as_deref().is_some_and(|e| e.ends_with(exe));
                if done || std::time::Instant::now() > deadline {
                    return p;
                }
                std::thread::yield_now();
            }
        };
        let before = until("sh -c read _ && exec sleep 30", "sh");
        assert_eq!(
            before.cmdline.as_deref(),
            Some("sh -c read _ && exec sleep 30")
        );
        assert!(CMDLINE_FILES.with_borrow(|f| f.contains_key(&pid)));
        // Same pid, same start time, another program: the kept file reads the new one.
        child.stdin.take().unwrap().write_all(b"\n").unwrap();
        let after = until("sleep 30", "/sleep");
        assert_eq!(after.cmdline.as_deref(), Some("sleep 30"));
        assert!(after.exe.unwrap_or_default().ends_with("/sleep"));
        assert!(CMDLINE_FILES.with_borrow(|f| f.contains_key(&pid)));
        // Gone (and reaped): nothing is read through the kept file, and it is let go.
        child.kill().unwrap();
        child.wait().unwrap();
        let gone = ProcessInfo::of_connection(pid, 0, 0);
        assert_eq!((gone.exe, gone.cmdline), (None, None));
        assert!(!CMDLINE_FILES.with_borrow(|f| f.contains_key(&pid)));
    }
}
