//! The system call filter `agentgate exec` puts on a governed command, for the sockets the
//! kernel hooks never see.
//!
//! The cgroup hooks govern IPv4 and IPv6 sockets only. A Unix socket reaches whatever listens on
//! its path: a database's local socket (often trusted without a password), a container engine's
//! (root on the host), another proxy. A vsock reaches the hypervisor's host, and the other
//! families (packet, TIPC, RDS, Bluetooth, ...) each have their own way out. None of them passes
//! a connect hook, so none can be redirected, judged or recorded. And io_uring creates and
//! connects sockets from the kernel's side of its queue, where no system call filter looks.
//!
//! So the command may create IPv4 and IPv6 sockets (which the hooks govern), netlink sockets
//! (the C library asks the kernel for its interface addresses through one; they reach the
//! kernel, not another host), Unix sockets only when its agent has `allow_unix_sockets: true`,
//! and Unix stream and seqpacket pairs (connected to each other for good: a process shares
//! them with its own children, and `connect` on one fails). A datagram pair is refused too: a
//! `connect` to `AF_UNSPEC` dissolves it into a plain Unix datagram socket, which can bind a
//! name, send to any Unix datagram socket and pass descriptors (another agent's connection, or
//! an ungoverned process's). `socket`/`socketpair` of another family or kind and
//! `io_uring_setup` fail with `EPERM`. So does `SOCK_PACKET` (type 10) in any family: the
//! kernel turns `socket(AF_INET, SOCK_PACKET)` into a packet socket without passing the IPv4
//! code where the hooks are. A system call made through the 32-bit entry points, or with the
//! x32 bit (`0x40000000`) in its number, kills the process: there `socket` is reached through
//! `socketcall`, whose arguments a filter cannot read, or under a number the rules below do
//! not name.
//!
//! The filter is installed by the command's own process just before it becomes the command,
//! stays on it and on everything it starts, and cannot be removed. Installing it sets
//! `no_new_privs` (the kernel asks for that or `CAP_SYS_ADMIN`, and seccompiler always sets it):
//! a set-user-id program the agent runs does not gain its owner's rights.
//!
//! Processes placed in a cgroup with `attach` (a systemd service) have no such filter: for them
//! see the README's known limits (systemd's `RestrictAddressFamilies=` does the same).

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::{CliError, msg};

/// The `errno` every refused call gets: what the kernel hooks return for what they refuse.
const REFUSED: u32 = libc::EPERM as u32;

/// `SOCK_PACKET`: the obsolete packet socket type, which the C library no longer names.
const SOCK_PACKET: libc::c_int = 10;

/// The kind in a `socket`/`socketpair` type argument; the bits above carry `SOCK_NONBLOCK` and
/// `SOCK_CLOEXEC` (the kernel's `SOCK_TYPE_MASK`).
const SOCK_TYPE_MASK: u64 = 0xf;

/// The filter for a command: refuses what the module comment lists, allows the rest.
pub fn filter(allow_unix_sockets: bool) -> Result<BpfProgram, CliError> {
    let mut families = vec![libc::AF_INET, libc::AF_INET6, libc::AF_NETLINK];
    if allow_unix_sockets {
        families.push(libc::AF_UNIX);
    }
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| msg(format!("no system call filter for this architecture: {e}")))?;
    // Each rule refuses the call when all its conditions hold; a call any rule matches is
    // refused.
    let socket = vec![family_not_in(&families)?, kind_is(SOCK_PACKET)?];
    let mut socketpair = vec![family_not_in(&[libc::AF_UNIX])?];
    if !allow_unix_sockets {
        // With Unix sockets allowed, a datagram pair gives nothing a plain socket does not.
        socketpair.extend(kinds_except(&[libc::SOCK_STREAM, libc::SOCK_SEQPACKET])?);
    }
    let rules = [
        (libc::SYS_socket, socket),
        (libc::SYS_socketpair, socketpair),
        // No condition: always refused.
        (libc::SYS_io_uring_setup, vec![]),
    ]
    .into_iter()
    .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(REFUSED),
        arch,
    )
    .map_err(|e| msg(format!("cannot build the system call filter: {e}")))?;
    let mut program = BpfProgram::try_from(filter)
        .map_err(|e| msg(format!("cannot compile the system call filter: {e}")))?;
    refuse_x32(&mut program)?;
    Ok(program)
}

/// A rule matching a call whose first argument (the address family) is none of `families`.
/// Compared as 32 bits: the kernel reads the family as an `int`.
fn family_not_in(families: &[libc::c_int]) -> Result<SeccompRule, CliError> {
    let conditions = families
        .iter()
        .map(|&f| {
            SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Ne,
                u64::from(f.unsigned_abs()),
            )
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| msg(format!("cannot build the system call filter: {e}")))?;
    SeccompRule::new(conditions)
        .map_err(|e| msg(format!("cannot build the system call filter: {e}")))
}

/// A rule matching a call whose second argument (the type) is of `kind`, whatever its flags.
fn kind_is(kind: libc::c_int) -> Result<SeccompRule, CliError> {
    let condition = SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(SOCK_TYPE_MASK),
        u64::from(kind.unsigned_abs()),
    )
    .map_err(|e| msg(format!("cannot build the system call filter: {e}")))?;
    SeccompRule::new(vec![condition])
        .map_err(|e| msg(format!("cannot build the system call filter: {e}")))
}

/// Rules matching a call whose type is of any kind but `allowed` (every value the mask leaves,
/// so a kind the kernel adds later is refused too).
fn kinds_except(allowed: &[libc::c_int]) -> Result<Vec<SeccompRule>, CliError> {
    (0..=0xf)
        .filter(|kind| !allowed.contains(kind))
        .map(kind_is)
        .collect()
}

/// Where the x32 bit is tested: after the architecture check (load, compare, kill).
const X32_CHECK_AT: usize = 3;

/// The x32 ABI's calls run with the x86-64 audit architecture and the number's bit 30 set
/// (`__X32_SYSCALL_BIT`): `0x40000000 | 41` is x32's `socket`, which the rules (`nr == 41`)
/// would not match. seccompiler checks the architecture only, so this inserts, right after its
/// check: load the number; below `0x40000000`, go on; from `0x80000000` (no system call; the
/// kernel answers `ENOSYS`, and a program may try -1), go on; between them, kill the process,
/// as the architecture check does. seccompiler's jumps are relative and forward, and nothing
/// jumps into the first three instructions, so the program after them is unchanged.
fn refuse_x32(program: &mut BpfProgram) -> Result<(), CliError> {
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    let architecture_checked = program.get(..X32_CHECK_AT).is_some_and(|check| {
        check.iter().map(|i| i.code).eq([LD_W_ABS, 0x15, RET_K])
            && check
                .get(2)
                .is_some_and(|i| i.k == libc::SECCOMP_RET_KILL_PROCESS)
    });
    if !architecture_checked {
        return Err(msg(
            "cannot compile the system call filter: it does not start with the architecture check",
        ));
    }
    let at = |code, jt, jf, k| seccompiler::sock_filter { code, jt, jf, k };
    let check = [
        // seccomp_data.nr is at offset 0.
        at(LD_W_ABS, 0, 0, 0),
        at(JGE_K, 0, 2, X32_SYSCALL_BIT),
        at(JGE_K, 1, 0, X32_SYSCALL_BIT << 1),
        at(RET_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
    ];
    program.splice(X32_CHECK_AT..X32_CHECK_AT, check);
    Ok(())
}

/// Puts the filter on the calling thread (and so on the program it executes next).
pub fn install(allow_unix_sockets: bool) -> Result<(), CliError> {
    let program = filter(allow_unix_sockets)?;
    seccompiler::apply_filter(&program).map_err(|e| {
        msg(format!(
            "cannot put the socket filter on the command: {e}; without it the command could use Unix and other sockets no hook sees"
        ))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket, socketpair};

    fn create(family: AddressFamily, kind: SockType) -> Result<OwnedFd, nix::errno::Errno> {
        socket(family, kind, SockFlag::SOCK_CLOEXEC, None)
    }

    /// Runs `probe` in a thread of its own with the filter on it (a filter is per thread until
    /// the thread starts others), so the test process keeps its sockets.
    fn filtered<T: Send + 'static>(
        allow_unix: bool,
        probe: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        std::thread::spawn(move || {
            install(allow_unix).expect("install");
            probe()
        })
        .join()
        .expect("probe thread")
    }

    fn pair(kind: SockType, flags: SockFlag) -> Option<nix::errno::Errno> {
        socketpair(AddressFamily::Unix, kind, None, flags).err()
    }

    /// `socket(AF_INET, SOCK_PACKET)`, which the kernel makes a packet socket.
    fn sock_packet() -> Option<i32> {
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::from(10), None)
            .err()
            .and_then(|e| e.raw_os_error())
    }

    #[test]
    fn only_ip_and_netlink_sockets_and_socket_pairs_are_created_under_the_filter() {
        let outcome = filtered(false, || {
            [
                create(AddressFamily::Inet, SockType::Stream).err(),
                create(AddressFamily::Inet6, SockType::Datagram).err(),
                create(AddressFamily::Netlink, SockType::Raw).err(),
                create(AddressFamily::Unix, SockType::Stream).err(),
                create(AddressFamily::Vsock, SockType::Stream).err(),
                create(AddressFamily::Alg, SockType::SeqPacket).err(),
                pair(SockType::Stream, SockFlag::SOCK_CLOEXEC),
            ]
        });
        let eperm = Some(nix::errno::Errno::EPERM);
        assert_eq!(
            outcome,
            [None, None, None, eperm, eperm, eperm, None],
            "inet, inet6, netlink, unix, vsock, alg, unix pair"
        );
        // Outside the filter (this thread) Unix sockets are still created.
        assert!(create(AddressFamily::Unix, SockType::Stream).is_ok());
    }

    #[test]
    fn only_stream_and_seqpacket_unix_pairs_are_created_under_the_filter() {
        // A datagram pair, once dissolved with connect(AF_UNSPEC), is a plain Unix datagram
        // socket: it binds a name, sends anywhere and passes descriptors.
        let both = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
        let outcome = filtered(false, move || {
            [
                pair(SockType::Stream, SockFlag::empty()),
                pair(SockType::Stream, both),
                pair(SockType::SeqPacket, both),
                pair(SockType::Datagram, SockFlag::empty()),
                pair(SockType::Datagram, SockFlag::SOCK_CLOEXEC),
                pair(SockType::Datagram, both),
            ]
        });
        let eperm = Some(nix::errno::Errno::EPERM);
        assert_eq!(
            outcome,
            [None, None, None, eperm, eperm, eperm],
            "stream, stream with flags, seqpacket, datagram, with cloexec, with both"
        );
        // With Unix sockets allowed, a datagram pair is nothing more than a plain socket.
        let allowed = filtered(true, || pair(SockType::Datagram, SockFlag::SOCK_CLOEXEC));
        assert_eq!(allowed, None);
        assert_eq!(
            pair(SockType::Datagram, SockFlag::empty()),
            None,
            "unfiltered"
        );
    }

    #[test]
    fn sock_packet_is_refused_in_every_family() {
        // The kernel turns socket(AF_INET, SOCK_PACKET) into a packet socket, past the IPv4 code
        // where the kernel hooks run. Whoever runs the test, the filter answers EPERM first.
        assert_eq!(filtered(false, sock_packet), Some(libc::EPERM));
        assert_eq!(filtered(true, sock_packet), Some(libc::EPERM));
        let unix_packet = || {
            socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::from(10), None)
                .err()
                .and_then(|e| e.raw_os_error())
        };
        assert_eq!(filtered(true, unix_packet), Some(libc::EPERM));
    }

    #[test]
    fn allow_unix_sockets_lets_unix_sockets_through_and_nothing_else() {
        let outcome = filtered(true, || {
            [
                create(AddressFamily::Unix, SockType::Stream).err(),
                create(AddressFamily::Vsock, SockType::Stream).err(),
            ]
        });
        assert_eq!(outcome, [None, Some(nix::errno::Errno::EPERM)]);
    }

    #[test]
    fn the_filter_checks_the_architecture_first() {
        // The first instructions load the audit architecture and kill the process on any other
        // (the 32-bit entry points' `socketcall` would pass a family the filter cannot read).
        let program = filter(false).unwrap();
        assert!(program.len() > 3, "{program:?}");
        let kill = seccompiler::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_KILL_PROCESS,
        };
        assert_eq!(program.get(2), Some(&kill), "{:?}", program.get(..3));
    }

    #[test]
    fn x32_calls_kill_the_process_before_any_rule() {
        // seccompiler checks the architecture only; an x32 call has x86-64's and bit 30 set in
        // its number, where no rule's number matches.
        let at = |code, jt, jf, k| seccompiler::sock_filter { code, jt, jf, k };
        let kill = libc::SECCOMP_RET_KILL_PROCESS;
        for allow_unix in [false, true] {
            let program = filter(allow_unix).unwrap();
            assert_eq!(
                program.get(X32_CHECK_AT..X32_CHECK_AT + 5),
                Some(
                    &[
                        at(0x20, 0, 0, 0),           // A = seccomp_data.nr
                        at(0x35, 0, 2, 0x4000_0000), // A < 0x40000000: on to the rules
                        at(0x35, 1, 0, 0x8000_0000), // A >= 0x80000000: on to the rules
                        at(0x06, 0, 0, kill),        // x32: kill
                        at(0x20, 0, 0, 0),           // seccompiler loads the number again
                    ][..]
                ),
                "{program:?}"
            );
            // The architecture check still jumps over its kill, now onto the x32 check.
            assert_eq!(program.get(1).map(|i| (i.jt, i.jf)), Some((1, 0)));
        }
        // A program that does not start with the architecture check is not patched blindly.
        let mut other = vec![at(0x06, 0, 0, 0)];
        assert!(refuse_x32(&mut other).is_err());
    }
}
