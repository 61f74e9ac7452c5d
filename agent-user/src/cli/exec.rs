//! `agentgate exec`: runs a command inside an agent's cgroup, as another user if asked, in a
//! session of its own.
//!
//! The command never gets the caller's terminal as its controlling terminal. With it, a governed
//! agent could push input into the terminal (`TIOCSTI`), which the operator's shell runs once
//! the agent exits, as the operator and outside every cgroup; or make itself the terminal's
//! foreground process group (`tcsetpgrp`) and read what the operator types next. So `exec`
//! forks: the child (this binary run again, as `exec --supervisor PID`) starts a new session
//! (`setsid`, which leaves it without a controlling terminal), joins the cgroup, enters a user
//! namespace of its own when a user is given (see [`enter_user_namespace`]), drops to the user
//! and executes the command. It keeps the descriptors of the terminal: a process without a
//! controlling terminal still reads and writes them, so interactive programs work. The parent
//! stays outside the cgroup, waits, passes on the exit status and relays the signals the
//! terminal or an operator sends it (the command's own session gets none from the terminal).
//!
//! The command also gets a session keyring of its own (see [`join_new_session_keyring`]), and
//! with a user only the caller's terminal and locale variables ([`KEPT_ENV`]) and those `--env`
//! names, from a working directory the user reaches by its path ([`check_working_directory`]).
//!
//! Just before it becomes the command, the child puts a system call filter on itself: sockets
//! of the families no kernel hook sees (Unix unless the agent allows them, vsock, packet, ...)
//! and io_uring are refused (see [`seccomp`]).
//!
//! Whether the agent is governed, and who it runs as, is decided by the child from the
//! configuration, just before it joins; the parent checks the same first, to fail early.

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal, kill};
use nix::unistd::{Gid, Pid, Uid, User};

use super::terminal::Terminals;
use super::{CliError, msg, seccomp};
use crate::config::{Config, normalize_cgroup};
use crate::identity::{CgroupFs, cgroup_id};
use crate::intercept;

/// Relayed to the command as they are. SIGTSTP is relayed as SIGSTOP (see [`supervise`]).
const RELAYED: [Signal; 8] = [
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
    Signal::SIGCONT,
];

/// What `exec` was asked to run, as given on the command line.
pub struct ExecRequest<'a> {
    /// `--config`, passed on to the child so that it reads the same file.
    pub config: Option<&'a Path>,
    pub agent: &'a str,
    pub user: Option<&'a str>,
    pub keep_fds: bool,
    /// `--env`: variables of the caller's environment the command gets with a user.
    pub pass_env: &'a [String],
    pub command: &'a [String],
}

/// What the command starts with when a user is given, besides its `--env` variables and the
/// user's own USER, LOGNAME, HOME and SHELL: how to find programs and how to talk to the
/// terminal and the operator. The rest of the caller's (root's) environment is left behind:
/// tokens, passwords (`PGPASSWORD`), agent sockets.
const KEPT_ENV: [&str; 4] = ["PATH", "TERM", "LANG", "TZ"];

/// Whether the command run as a user gets the caller's `name`.
fn keeps_env(name: &std::ffi::OsStr, pass_env: &[String]) -> bool {
    let name = name.to_string_lossy();
    KEPT_ENV.contains(&name.as_ref())
        || name.starts_with("LC_")
        || pass_env.iter().any(|p| *p == name)
}

/// Descriptors above stderr, by number: the ones inherited from the caller when read first.
pub fn inherited_fds() -> Result<Vec<i32>, CliError> {
    Ok(std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect())
}

/// Closes every descriptor above stderr, before `exec` opens anything of its own: they were
/// inherited from the caller, and would otherwise pass to the governed command. A socket among
/// them was connected outside the cgroup and is not governed; a file may be one the command's
/// user could not open. Nothing in this process owns them, so closing them by number is sound.
/// Standard input, output and error are checked apart (see [`check_standard_fds`]).
pub fn close_inherited_fds() -> Result<(), CliError> {
    // Listed first and the listing closed before anything is closed (its own descriptor is in
    // the list; closing it is then a harmless EBADF).
    close_fds(&inherited_fds()?).map_err(|(fd, e)| {
        msg(format!(
            "cannot close inherited descriptor {fd}: {e} (use --keep-fds to pass them on)"
        ))
    })
}

/// Standard input, output and error stay (they are the command's), unless one is a socket the
/// command could not have made itself. A wrapper (inetd style, `socat ... EXEC:`) would hand the
/// agent an IP connection made outside the cgroup, which no hook governs; or a Unix one, to a
/// database's local socket or a root-only service, past the socket filter. A Unix socket passes
/// when the agent may use Unix sockets anyway (`allow_unix_sockets`); `--keep-fds` passes any.
/// (A systemd service's output is a Unix socket to the journal: such a service runs `exec` with
/// one of those, or gives the agent a pipe.)
fn check_standard_fds(allow_unix_sockets: bool) -> Result<(), CliError> {
    use nix::sys::socket::{AddressFamily, SockaddrLike, SockaddrStorage, getsockname};
    for (fd, name) in [(0, "input"), (1, "output"), (2, "error")] {
        // Not a socket (a terminal, a pipe, a file) or not open: nothing to check.
        let Ok(addr) = getsockname::<SockaddrStorage>(fd) else {
            continue;
        };
        let what = match addr.family() {
            Some(AddressFamily::Inet | AddressFamily::Inet6) => {
                "a network socket connected outside the agent's cgroup; it would not be governed"
            }
            Some(AddressFamily::Unix) if allow_unix_sockets => continue,
            Some(AddressFamily::Unix) => {
                "a Unix socket, and the agent may not use Unix sockets: through it the agent would reach whatever is at its other end, past every hook (give the command a pipe or a file, or set allow_unix_sockets: true for the agent)"
            }
            _ => "a socket of a family no kernel hook sees",
        };
        return Err(msg(format!(
            "descriptor {fd} (standard {name}) is {what} (use --keep-fds to pass it on anyway)"
        )));
    }
    Ok(())
}

fn close_fds(fds: &[i32]) -> Result<(), (i32, nix::errno::Errno)> {
    for &fd in fds {
        match nix::unistd::close(fd) {
            Ok(()) | Err(nix::errno::Errno::EBADF) => {}
            Err(e) => return Err((fd, e)),
        }
    }
    Ok(())
}

/// The checked request: where the command goes and how it starts.
struct Prepared {
    cgroups: CgroupFs,
    relative: String,
    user: Option<User>,
    command: Command,
    /// The agent's `allow_unix_sockets` (see [`seccomp`]).
    allow_unix_sockets: bool,
}

/// Everything `exec` refuses for, checked without changing anything.
fn prepare(cfg: &Config, request: &ExecRequest<'_>) -> Result<Prepared, CliError> {
    let agent = request.agent;
    let a = cfg
        .agent(agent)
        .ok_or_else(|| msg(format!("unknown agent `{agent}`")))?;
    let agent_id = cfg
        .agent_id(agent)
        .ok_or_else(|| msg(format!("unknown agent `{agent}`")))?;
    let (program, args) = request
        .command
        .split_first()
        .ok_or_else(|| msg("no command given after `--`"))?;
    let cgroups = CgroupFs::discover()?;
    let relative = normalize_cgroup(&a.cgroup).map_err(msg)?;
    let dir = cgroups.dir(&relative);
    let not_governed = || {
        msg(format!(
            "agent `{agent}` is not governed right now (cgroup {} is not registered with the kernel hooks); start `agentgate run` first",
            dir.display()
        ))
    };
    if !request.keep_fds {
        check_standard_fds(a.allow_unix_sockets)?;
    }
    let id = cgroup_id(&dir).map_err(|_| not_governed())?;
    // Refuse to start an agent the hooks would not see: that would be an ungoverned agent.
    match intercept::pinned_governed_agent(&cfg.pin_dir, id) {
        Ok(Some(found)) if found == agent_id => {}
        _ => return Err(not_governed()),
    }

    if let Some(bad) = request
        .pass_env
        .iter()
        .find(|n| n.is_empty() || n.contains(['=', '\0']))
    {
        return Err(msg(format!(
            "--env {bad:?}: name a variable of this environment (its value is passed), not NAME=VALUE"
        )));
    }

    let mut command = Command::new(program);
    command.args(args);
    let user = match request.user {
        Some(name) => {
            let u = User::from_name(name)
                .map_err(|e| msg(format!("looking up user `{name}`: {e}")))?
                .ok_or_else(|| msg(format!("no such user `{name}`")))?;
            // Without a user the command is root, which could read the caller's environment
            // anyway (`/proc/PID/environ`): it keeps it all.
            command
                .env_clear()
                .envs(std::env::vars_os().filter(|(name, _)| keeps_env(name, request.pass_env)));
            command
                .env("USER", &u.name)
                .env("LOGNAME", &u.name)
                .env("HOME", &u.dir)
                .env("SHELL", &u.shell);
            Some(u)
        }
        None => None,
    };
    Ok(Prepared {
        cgroups,
        relative,
        user,
        command,
        allow_unix_sockets: a.allow_unix_sockets,
    })
}

/// Runs the command of `request` inside the agent's cgroup, as its user if given, in a session
/// of its own, and returns its exit status (128 + the signal's number if a signal ended it, as
/// a shell reports it). `kept`: the descriptors `--keep-fds` passes on; the child has them,
/// and this process closes its copies.
pub fn exec(cfg: &Config, request: &ExecRequest<'_>, kept: &[i32]) -> Result<ExitCode, CliError> {
    let prepared = prepare(cfg, request)?;
    let agent_cgroup = prepared.cgroups.dir(&prepared.relative);
    // Before this process points its own streams elsewhere (see `terminal`).
    let terminals = Terminals::of_stdio();
    let mut waited = SigSet::empty();
    for s in RELAYED {
        waited.add(s);
    }
    waited.add(Signal::SIGTSTP);
    waited.add(Signal::SIGCHLD);
    // Blocked before the child exists, so that none is lost; they are taken with sigwait. The
    // child inherits the mask and clears it first.
    waited
        .thread_block()
        .map_err(|e| msg(format!("cannot block signals: {e}")))?;

    // This binary again, whichever path it was started by (even if replaced since).
    let mut child = Command::new("/proc/self/exe");
    child
        .arg0(
            std::env::args_os()
                .next()
                .unwrap_or_else(|| "agentgate".into()),
        )
        .args(child_args(request, std::process::id()));
    let mut child = child
        .spawn()
        .map_err(|e| msg(format!("cannot start the command's process: {e}")))?;
    if request.user.is_some()
        && let Err(e) = map_user_namespace(&mut child)
    {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }

    // The child has its own copies. Holding a pipe open here would keep its other end from
    // seeing the command close it.
    let _ = close_fds(kept);
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    nix::unistd::dup2_stdin(&null).map_err(std::io::Error::from)?;
    nix::unistd::dup2_stdout(&null).map_err(std::io::Error::from)?;
    drop(null);

    let status = supervise(&mut child, &waited);
    let killed = terminals.take_back(&agent_cgroup);
    if killed > 0 {
        eprintln!(
            "agentgate exec: killed {killed} process(es) the command left behind holding this terminal"
        );
    }
    status
}

/// Every user and group id, mapped to itself: inside the command's user namespace ids, files
/// and permissions are what they are outside.
const IDENTITY_MAP: &str = "0 0 4294967295";

/// How long the two sides of [`exec`] wait for each other around the user namespace.
const NAMESPACE_WAIT: Duration = Duration::from_secs(60);

/// The parent's half of the child's user namespace: once the child has entered a namespace of
/// its own, maps every id to itself (only a process holding `CAP_SETUID` in the namespace's
/// parent may write such a map, so the parent writes it). Returns early if the child exits.
fn map_user_namespace(child: &mut Child) -> Result<(), CliError> {
    let own = std::fs::read_link("/proc/self/ns/user")?;
    let proc_dir = PathBuf::from(format!("/proc/{}", child.id()));
    let started = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        match std::fs::read_link(proc_dir.join("ns/user")) {
            Ok(ns) if ns != own => break,
            _ if started.elapsed() > NAMESPACE_WAIT => {
                return Err(msg(
                    "the command's process did not enter its user namespace",
                ));
            }
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    for map in ["gid_map", "uid_map"] {
        std::fs::write(proc_dir.join(map), IDENTITY_MAP)
            .map_err(|e| msg(format!("cannot write the command's {map}: {e}")))?;
    }
    Ok(())
}

/// The child's half: a user namespace of its own, whose ids the parent maps to themselves.
/// Inside it the command runs as the same user with the same files, but the kernel lets no
/// process of a namespace trace, or read or write the memory of, a process outside it (that
/// needs `CAP_SYS_PTRACE` over the other's namespace): an agent cannot act through another
/// agent's process, nor through an ungoverned one of its own user. Entered by the root
/// process, so it does not depend on unprivileged user namespaces being allowed.
fn enter_user_namespace() -> Result<(), CliError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER).map_err(|e| {
        msg(format!(
            "cannot give the command a user namespace of its own: {e} (is user.max_user_namespaces 0?); without one it could trace processes of its user outside the gate"
        ))
    })?;
    let started = Instant::now();
    loop {
        let map = std::fs::read_to_string("/proc/self/uid_map")?;
        if !map.trim().is_empty() {
            // Nothing but the identity map is acceptable: anything else would change who the
            // command is to the files it opens.
            let fields: Vec<&str> = map.split_whitespace().collect();
            if fields != IDENTITY_MAP.split_whitespace().collect::<Vec<_>>() {
                return Err(msg(format!("unexpected uid map for the command: {map}")));
            }
            return Ok(());
        }
        if started.elapsed() > NAMESPACE_WAIT {
            return Err(msg(
                "`agentgate exec` did not map the command's user namespace",
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The child's command line: `exec` with the same request, and the parent's pid.
fn child_args(request: &ExecRequest<'_>, supervisor: u32) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["exec".into()];
    if let Some(config) = request.config {
        args.push("--config".into());
        args.push(PathBuf::from(config).into_os_string());
    }
    args.push("--agent".into());
    args.push(request.agent.into());
    if let Some(user) = request.user {
        args.push("--user".into());
        args.push(user.into());
    }
    if request.keep_fds {
        args.push("--keep-fds".into());
    }
    for name in request.pass_env {
        args.push(format!("--env={name}").into());
    }
    args.push("--supervisor".into());
    args.push(supervisor.to_string().into());
    args.push("--".into());
    args.extend(request.command.iter().map(OsString::from));
    args
}

/// Waits for the child, relaying signals to it, until it exits.
fn supervise(child: &mut Child, waited: &SigSet) -> Result<ExitCode, CliError> {
    let pid = Pid::from_raw(
        i32::try_from(child.id()).map_err(|_| msg("the command's process id is out of range"))?,
    );
    loop {
        let signal = match waited.wait() {
            Ok(s) => s,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(msg(format!("waiting for signals: {e}"))),
        };
        // The child is reaped only here, so until then its pid cannot name another process.
        match signal {
            Signal::SIGCHLD => {
                if let Some(status) = child.try_wait()? {
                    return Ok(exit_code(status));
                }
            }
            Signal::SIGTSTP => {
                // The child's process group is orphaned (its parent is in another session),
                // and the kernel discards SIGTSTP sent to one: stop it with SIGSTOP, then stop
                // this process, which the shell sees as its job stopping. The shell's SIGCONT
                // resumes this process and is relayed.
                let _ = kill(pid, Signal::SIGSTOP);
                let _ = kill(Pid::this(), Signal::SIGSTOP);
            }
            other => {
                let _ = kill(pid, other);
            }
        }
    }
}

fn exit_code(status: ExitStatus) -> ExitCode {
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX))
}

/// The child's side of [`exec`]: started by it with `--supervisor` (its pid). Starts a new
/// session, joins the agent's cgroup, drops to the user and becomes the command. Returns only
/// on failure.
pub fn exec_supervised(
    cfg: &Config,
    request: &ExecRequest<'_>,
    supervisor: u32,
) -> Result<(), CliError> {
    // Blocked by the parent when it forked; the command must get them (one relayed meanwhile is
    // delivered now).
    SigSet::empty()
        .thread_set_mask()
        .map_err(|e| msg(format!("cannot unblock signals: {e}")))?;
    // A new session has no controlling terminal, and the terminal descriptors it inherited
    // cannot give it one: the terminal is already another session's. Fails in a process-group
    // leader, which a process a shell started directly is.
    nix::unistd::setsid().map_err(|e| {
        msg(format!(
            "cannot start a session for the command: {e} (`--supervisor` is set by `agentgate exec` for its own child)"
        ))
    })?;
    let Prepared {
        cgroups,
        relative,
        user,
        mut command,
        allow_unix_sockets,
    } = prepare(cfg, request)?;
    // Join before exec so that every socket the command creates is created inside the cgroup,
    // and before dropping privileges, which writing `cgroup.procs` needs.
    cgroups.join(&relative, std::process::id())?;
    if let Some(u) = &user {
        enter_user_namespace()?;
        drop_privileges(u.uid, u.gid)?;
        check_working_directory(&u.name)?;
    }
    join_new_session_keyring()?;
    // Set after the user change, which clears it: the command dies with `exec`, as it did when
    // `exec` became the command (a `kill -9` of the pid a caller knows still ends the agent).
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
        .map_err(|e| msg(format!("cannot set the parent-death signal: {e}")))?;
    if nix::unistd::getppid().as_raw() != i32::try_from(supervisor).unwrap_or(-1) {
        return Err(msg("`agentgate exec` ended before the command started"));
    }
    // Last: it sets `no_new_privs`, and nothing before the command needs a socket.
    seccomp::install(allow_unix_sockets)?;
    let err = command.exec();
    Err(msg(format!(
        "cannot run `{}`: {err}",
        command.get_program().to_string_lossy()
    )))
}

/// Run as the user: refuses a working directory the user cannot reach by its path. The command
/// inherits it, and a directory inherited opens files by relative path below a parent the user
/// may not search (a `0755` directory under root's `0700` home). So the directory must be found
/// by its path, as the user, and be the same one (a relative command path like `./bot.py`
/// keeps working from anywhere the user can reach).
fn check_working_directory(user: &str) -> Result<(), CliError> {
    use std::os::unix::fs::MetadataExt;
    let refuse = |what: String| {
        msg(format!(
            "the working directory {what}: user `{user}` would open files there by relative path that it cannot reach by their own; cd to a directory the user can reach (its home, /tmp) and run exec again"
        ))
    };
    let cwd = std::env::current_dir().map_err(|e| refuse(format!("has no path ({e})")))?;
    let by_path = std::fs::metadata(&cwd).map_err(|e| {
        refuse(format!(
            "{} cannot be reached by its path ({e})",
            cwd.display()
        ))
    })?;
    // Without search permission on the directory itself nothing is opened through it.
    if let Ok(here) = std::fs::metadata(".")
        && (here.dev(), here.ino()) != (by_path.dev(), by_path.ino())
    {
        return Err(refuse(format!(
            "is not what its path {} names now",
            cwd.display()
        )));
    }
    Ok(())
}

/// Gives the command an empty session keyring of its own. `setsid` and the user change keep the
/// caller's: the keys the operator's session holds (Kerberos tickets, filesystem and `keyctl`
/// secrets) would be the agent's to read, change and link, even as another user, since a
/// process possesses its session keyring's keys. Joined after the user change, so that the new
/// keyring is the user's own (the agent can keep keys in it, charged to its quota).
fn join_new_session_keyring() -> Result<(), CliError> {
    keyutils_raw::keyctl_join_session_keyring(None)
        .map(drop)
        .map_err(|e| {
            msg(format!(
                "cannot give the command a session keyring of its own: {e}; with the caller's it could read the caller's keys"
            ))
        })
}

/// Without supplementary groups (the root process has root's), then the group, then the user.
fn drop_privileges(uid: Uid, gid: Gid) -> Result<(), CliError> {
    let fail = |what: &str, e: nix::errno::Errno| msg(format!("cannot set the {what}: {e}"));
    nix::unistd::setgroups(&[]).map_err(|e| fail("supplementary groups", e))?;
    nix::unistd::setgid(gid).map_err(|e| fail("group", e))?;
    nix::unistd::setuid(uid).map_err(|e| fail("user", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_is_passed_on_as_a_shell_reports_it() {
        let code = |raw: i32| format!("{:?}", exit_code(ExitStatus::from_raw(raw)));
        // wait(2) statuses: exit code in the second byte, a terminating signal in the first.
        assert_eq!(code(0), format!("{:?}", ExitCode::from(0)));
        assert_eq!(code(7 << 8), format!("{:?}", ExitCode::from(7)));
        assert_eq!(code(255 << 8), format!("{:?}", ExitCode::from(255)));
        assert_eq!(code(15), format!("{:?}", ExitCode::from(143)));
        assert_eq!(code(2), format!("{:?}", ExitCode::from(130)));
        // SIGQUIT with a core dump.
        assert_eq!(code(3 | 0x80), format!("{:?}", ExitCode::from(131)));
    }

    #[test]
    fn a_user_keeps_only_the_terminal_and_locale_variables_and_those_named() {
        let named = ["PGHOST".to_string()];
        let kept = |name: &str| keeps_env(name.as_ref(), &named);
        for name in ["PATH", "TERM", "LANG", "TZ", "LC_ALL", "LC_CTYPE", "PGHOST"] {
            assert!(kept(name), "{name}");
        }
        for name in [
            "PGPASSWORD",
            "AWS_SECRET_ACCESS_KEY",
            "SSH_AUTH_SOCK",
            "PGHOSTADDR",
            "LANGUAGE",
            "path",
        ] {
            assert!(!kept(name), "{name}");
        }
    }

    #[test]
    fn the_child_gets_the_same_request_and_the_parents_pid() {
        let command = vec!["psql".to_string(), "-X".to_string(), "--".to_string()];
        let request = ExecRequest {
            config: Some(Path::new("/etc/agentgate/a b.yaml")),
            agent: "etl-bot",
            user: Some("etl"),
            keep_fds: true,
            pass_env: &["PGHOST".to_string(), "AWS_PROFILE".to_string()],
            command: &command,
        };
        let args: Vec<String> = child_args(&request, 42)
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "exec",
                "--config",
                "/etc/agentgate/a b.yaml",
                "--agent",
                "etl-bot",
                "--user",
                "etl",
                "--keep-fds",
                "--env=PGHOST",
                "--env=AWS_PROFILE",
                "--supervisor",
                "42",
                "--",
                "psql",
                "-X",
                "--"
            ]
        );
        let psql = vec!["psql".to_string()];
        let bare = ExecRequest {
            config: None,
            agent: "a",
            user: None,
            keep_fds: false,
            pass_env: &[],
            command: &psql,
        };
        let args: Vec<String> = child_args(&bare, 1)
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            ["exec", "--agent", "a", "--supervisor", "1", "--", "psql"]
        );
    }
}
