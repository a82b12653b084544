//! The few system calls std does not wrap, each kept small.

use crate::error::{Error, Result};
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// A pipe whose ends are closed on exec unless handed on explicitly.
pub fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC)?)
}

/// Lets `fd` survive exec. Meant for `pre_exec`, after fork, where it only
/// touches the child's fd table.
pub fn keep_on_exec(fd: RawFd) -> std::io::Result<()> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))
        .map(|_| ())
        .map_err(std::io::Error::from)
}

/// Closes `fd` on exec again: a fd we were handed must not leak on to the
/// processes we start.
pub fn close_on_exec(fd: RawFd) -> Result<()> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}

/// Dies with the parent: the infra's helpers must never outlive the
/// supervisor, nor an inner plugin the call that started it. `parent` is
/// the pid that forked us, read before the fork: when it has already died
/// (we were reparented before the prctl), the exec is refused. Meant for
/// `pre_exec`: it does not allocate.
pub fn die_with_parent(parent: nix::unistd::Pid) -> std::io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a plain integer and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if nix::unistd::getppid() != parent {
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}

/// Moves the calling process into a new mount namespace whose mounts do not
/// propagate back. Meant for `pre_exec`: it does not allocate.
pub fn private_mount_namespace() -> std::io::Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(std::io::Error::from)?;
    let root = b"/\0";
    // SAFETY: root is a NUL-terminated string; the null pointers are the
    // documented "none" for source, type and data.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr().cast(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Now plus `timeout`, saturating instead of overflowing.
pub fn deadline(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// Reads a report line from a child until EOF or the deadline; None on
/// timeout.
pub fn read_report(fd: OwnedFd, timeout: Duration) -> Result<Option<String>> {
    Ok(read_to_end_timeout(fd, timeout)?.map(|b| String::from_utf8_lossy(&b).into_owned()))
}

/// Reads until EOF or the deadline; None on timeout.
pub fn read_to_end_timeout(fd: OwnedFd, timeout: Duration) -> Result<Option<Vec<u8>>> {
    let deadline = crate::sys::deadline(timeout);
    let mut file = std::fs::File::from(fd);
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        match file.read(&mut buf) {
            Ok(0) => return Ok(Some(out)),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Brings `lo` up in the current network namespace.
pub fn loopback_up() -> Result<()> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: req is a valid, writable ifreq for the duration of the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(Error::internal(format!(
            "SIOCGIFFLAGS lo: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(Error::internal(format!(
            "SIOCSIFFLAGS lo: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// The last lines of a log, for an error message that points at the cause.
pub fn tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// openat(2) with O_CLOEXEC: `name` is looked up in `dir` alone (give
/// O_NOFOLLOW to refuse a symlink there).
pub fn openat(
    dir: std::os::fd::BorrowedFd,
    name: &std::ffi::OsStr,
    flags: OFlag,
    mode: u32,
) -> nix::Result<OwnedFd> {
    let mode = nix::sys::stat::Mode::from_bits_truncate(mode as libc::mode_t);
    let fd = nix::fcntl::openat(Some(dir.as_raw_fd()), name, flags | OFlag::O_CLOEXEC, mode)?;
    // SAFETY: openat just returned this fd; nothing else owns it.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// The names in the dir `dir` is open on (not `.` and `..`), read through
/// a fresh open of it, so that `dir`'s own offset is left alone.
pub fn dir_names(dir: std::os::fd::BorrowedFd) -> nix::Result<Vec<std::ffi::OsString>> {
    use std::os::unix::ffi::OsStrExt;
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let mut d = nix::dir::Dir::openat(
        Some(dir.as_raw_fd()),
        ".",
        flags,
        nix::sys::stat::Mode::empty(),
    )?;
    let mut names = Vec::new();
    for entry in d.iter() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(std::ffi::OsStr::from_bytes(&name).to_os_string());
        }
    }
    Ok(names)
}

/// A path naming what `fd` is open on, for the calls that take a path
/// only (mount sources, socket addresses): resolving it re-resolves no
/// name of the path `fd` was opened by.
pub fn fd_path(fd: std::os::fd::BorrowedFd) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// A pidfd for `pid` (Linux ≥ 5.3), or None when the kernel has none or
/// the process is gone. It names that very process from now on: a signal
/// sent through it never reaches a later process given the same PID.
pub fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a PID and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: the fd was just returned to us and is owned by no one else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sends `sig` through a pidfd; true when delivered (false once the
/// process has exited, even if its PID was reused since).
pub fn pidfd_send_signal(pidfd: &OwnedFd, sig: nix::sys::signal::Signal) -> bool {
    // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        ) == 0
    }
}

/// Takes an exclusive flock on `file` without waiting: Ok(false) when
/// another open file holds it. Released when the last fd of this open
/// file is closed, by the kernel when its holder dies.
pub fn try_flock(file: &std::fs::File) -> std::io::Result<bool> {
    // SAFETY: flock takes an fd we own for the call and plain flags.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    match std::io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        e => Err(e),
    }
}
