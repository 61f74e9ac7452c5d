//! Who is speaking: cgroup placement and process facts.
//!
//! Owns finding the cgroup2 mount (from `/proc/self/mountinfo`, never a hard-coded path),
//! creating and joining agent cgroups, resolving a cgroup id (the directory's inode number, which
//! is what `bpf_get_current_cgroup_id()` returns) and reading a process's exe, cmdline and uid
//! from `/proc` at accept time. It decides nothing.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

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
        let exe = fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|p| p.display().to_string());
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok().map(|raw| {
            raw.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        });
        ProcessInfo {
            pid,
            uid,
            exe,
            cmdline,
            cgroup: CgroupFs::of_pid(pid),
        }
    }
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
}
