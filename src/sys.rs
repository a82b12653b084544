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
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
    if nix::unistd::getppid() != parent {
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}

/// Moves the calling process into a new mount namespace whose mounts do not
/// propagate back. Meant for `pre_exec`: it does not allocate.
pub fn private_mount_namespace() -> std::io::Result<()> {
    use nix::mount::MsFlags;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
    // nix copies a path this short to the stack: no allocation.
    let none: Option<&str> = None;
    nix::mount::mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)?;
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

/// IPV6_TRANSPARENT on an IPv6 socket: it may bind a non-local address
/// (nix has the option for IPv4 only).
pub fn set_ipv6_transparent(fd: std::os::fd::BorrowedFd) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `on` outlives the call and its size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_IPV6,
            libc::IPV6_TRANSPARENT,
            std::ptr::addr_of!(on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The last lines of a log, for an error message that points at the cause.
pub fn tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Marks every fd from 3 up close-on-exec, so that what the runtime passed
/// us without CLOEXEC (a pipe it watches for EOF, a socket) does not live
/// on in the infra or an inner plugin's daemons. The fds meant to pass are
/// handed on afterwards with `keep_on_exec`. Meant for `pre_exec`: it does
/// not allocate.
pub fn cloexec_inherited_fds() -> std::io::Result<()> {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range only changes flags in this process's fd table.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) };
    if rc == 0 {
        return Ok(());
    }
    // Kernels before 5.11: every fd up to the limit, one by one.
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    let top = soft.min(1 << 20) as RawFd;
    for fd in 3..top {
        // A closed fd fails with EBADF, and is left so.
        let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }
    Ok(())
}

/// Waits until the child `pid` (not yet reaped) has exited, at most
/// `timeout`; false when it still runs. It is not reaped here.
pub fn wait_exit_timeout(pid: i32, timeout: Duration) -> Result<bool> {
    let deadline = deadline(timeout);
    let Some(pidfd) = pidfd_open(pid) else {
        // A kernel without pidfds (before 5.3): asked every few ms.
        return poll_exit(pid, deadline);
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) if left.is_zero() => return Ok(false),
            Ok(0) => continue,
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// `wait_exit_timeout` without a pidfd: waitid(WNOWAIT) leaves the child
/// unreaped, so its PID stays its own for the caller's wait.
fn poll_exit(pid: i32, deadline: Instant) -> Result<bool> {
    use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    let pid = nix::unistd::Pid::from_raw(pid);
    loop {
        match waitid(Id::Pid(pid), flags) {
            Ok(WaitStatus::StillAlive) if Instant::now() >= deadline => return Ok(false),
            Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::EINTR) => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Ok(_) => return Ok(true),
            Err(e) => return Err(e.into()),
        }
    }
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

/// `open` of `path`, close-on-exec, as an owned fd.
pub fn open(path: &std::path::Path, flags: OFlag) -> nix::Result<OwnedFd> {
    let mode = nix::sys::stat::Mode::empty();
    let fd = nix::fcntl::open(path, flags | OFlag::O_CLOEXEC, mode)?;
    // SAFETY: open just returned this fd; nothing else owns it.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// The ioctls of ioctl_ns(2) that answer with a new fd: the user namespace
/// owning a namespace, the parent of a user namespace.
pub const NS_GET_USERNS: libc::c_ulong = 0xb701;
pub const NS_GET_PARENT: libc::c_ulong = 0xb702;

/// One of the fd-returning ioctls of ioctl_ns(2) on `ns`.
pub fn ns_ioctl(ns: std::os::fd::BorrowedFd, request: libc::c_ulong) -> std::io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: these ioctls take no argument and return a new fd or -1.
    let rc = unsafe { libc::ioctl(ns.as_raw_fd(), request) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(rc) })
}

/// The uid owning the user namespace `userns` (NS_GET_OWNER_UID).
pub fn ns_owner_uid(userns: std::os::fd::BorrowedFd) -> std::io::Result<libc::uid_t> {
    const NS_GET_OWNER_UID: libc::c_ulong = 0xb704;
    let mut owner: libc::uid_t = 0;
    // SAFETY: NS_GET_OWNER_UID writes one uid_t through the pointer, which is
    // valid and writable for the duration of the call.
    let rc = unsafe { libc::ioctl(userns.as_raw_fd(), NS_GET_OWNER_UID, &mut owner) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(owner)
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

/// A copy of the mount at what `dir` is open on, attached nowhere
/// (`open_tree` with OPEN_TREE_CLONE, Linux ≥ 5.2): unlike a bind from
/// `dir`'s path, it can still be mounted after the mount `dir` lies on was
/// detached from our namespace (the kernel refuses to bind from a detached
/// mount). None when the kernel cannot.
pub fn clone_mount(dir: std::os::fd::BorrowedFd) -> Option<OwnedFd> {
    use std::os::fd::FromRawFd;
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    // SAFETY: open_tree takes a dir fd, a NUL-terminated path and flags,
    // and returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            dir.as_raw_fd(),
            b"\0".as_ptr().cast::<libc::c_char>(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_EMPTY_PATH as libc::c_uint,
        )
    };
    // SAFETY: the fd was just returned to us and is owned by no one else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Mounts a tree made by `clone_mount` on `dst`.
pub fn move_mount_to(tree: &OwnedFd, dst: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
    let dst = std::ffi::CString::new(dst.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: move_mount takes fds, NUL-terminated paths and flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            b"\0".as_ptr().cast::<libc::c_char>(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wait used where the kernel has no pidfds: an exit within the
    /// timeout is seen, a child still running is not, and neither is reaped.
    #[test]
    fn poll_exit_sees_an_exit_and_leaves_the_child_unreaped() {
        let mut quick = std::process::Command::new("true").spawn().expect("true");
        let pid = quick.id() as i32;
        assert!(poll_exit(pid, deadline(Duration::from_secs(5))).expect("poll_exit"));
        assert!(quick.wait().expect("still ours to reap").success());

        let mut slow = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("sleep");
        let started = Instant::now();
        let pid = slow.id() as i32;
        assert!(!poll_exit(pid, deadline(Duration::from_millis(50))).expect("poll_exit"));
        assert!(started.elapsed() < Duration::from_secs(2));
        let _ = slow.kill();
        let _ = slow.wait();
    }
}
