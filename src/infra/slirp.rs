//! slirp4netns: the infra's way out, attached to the sandbox's netns.

use crate::error::{code, Error, Result};
use crate::procfs::ProcessId;
use crate::sys;
use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// The addresses slirp4netns gives the infra (its defaults, set by
/// `--configure`): tap0 10.0.2.100/24, gateway 10.0.2.2, DNS 10.0.2.3.
pub const TAP: &str = "tap0";

pub struct Slirp {
    pub child: Child,
    pub id: ProcessId,
    /// slirp4netns exits when this, our end of its exit pipe, closes.
    _exit_w: OwnedFd,
}

pub struct SlirpOptions<'a> {
    pub sandbox_pid: i32,
    pub settings: &'a super::Settings,
    pub api_socket: &'a Path,
}

/// Starts slirp4netns and waits until tap0 is configured.
pub fn start(opts: &SlirpOptions) -> Result<Slirp> {
    let (ready_r, ready_w) = sys::pipe()?;
    let (exit_r, exit_w) = sys::pipe()?;
    let (ready_fd, exit_fd) = (ready_w.as_raw_fd(), exit_r.as_raw_fd());
    let mut cmd = Command::new("slirp4netns");
    cmd.arg("--configure")
        .arg(format!("--mtu={}", opts.settings.mtu))
        .arg(format!("--ready-fd={ready_fd}"))
        .arg(format!("--exit-fd={exit_fd}"))
        .arg("--api-socket")
        .arg(opts.api_socket)
        .arg("--enable-sandbox")
        .arg("--enable-seccomp");
    if !opts.settings.allow_host_loopback {
        cmd.arg("--disable-host-loopback");
    }
    if opts.settings.ipv6 {
        cmd.arg("--enable-ipv6");
    }
    cmd.arg(opts.sandbox_pid.to_string())
        .arg(TAP)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let parent = nix::unistd::getpid();
    // SAFETY: runs between fork and exec; prctl, unshare, mount and fcntl
    // are async-signal-safe, and nothing here allocates.
    unsafe {
        cmd.pre_exec(move || {
            sys::die_with_parent(parent)?;
            // --enable-sandbox unmounts what it does not need; in the
            // caller's mount namespace that would reach the host's mounts
            // (real root's /run/netns), so it gets a private one.
            sys::private_mount_namespace()?;
            sys::cloexec_inherited_fds()?;
            sys::keep_on_exec(ready_fd)?;
            sys::keep_on_exec(exit_fd)
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        Error::new(
            code::INFRA_START,
            format!("starting slirp4netns: {e} (is it installed?)"),
        )
    })?;
    drop(ready_w);
    drop(exit_r);
    // slirp4netns writes "1" once tap0 is up, and closes the fd only on exit.
    let ready = read_byte_timeout(ready_r, READY_TIMEOUT);
    if !ready {
        let _ = child.kill();
        let status = child.wait().ok();
        return Err(Error::new(
            code::INFRA_START,
            format!(
                "slirp4netns did not become ready ({})",
                status.map_or("still running".into(), |s| s.to_string())
            ),
        ));
    }
    let id = ProcessId::of(child.id() as i32)
        .ok_or_else(|| Error::new(code::INFRA_START, "slirp4netns exited right after start"))?;
    Ok(Slirp {
        child,
        id,
        _exit_w: exit_w,
    })
}

fn read_byte_timeout(fd: OwnedFd, timeout: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::io::Read;
    let deadline = crate::sys::deadline(timeout);
    let mut file = std::fs::File::from(fd);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(
            std::os::fd::AsFd::as_fd(&file),
            PollFlags::POLLIN,
        )];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
            Ok(_) => {}
        }
        let mut b = [0u8; 1];
        return matches!(file.read(&mut b), Ok(1));
    }
}

/// The infra's way out as the supervisor last saw it; kept in infra.json.
/// An infra.json without it (an older supervisor) says nothing: then the
/// recorded slirp4netns process alone tells.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Outbound {
    /// Restarts of slirp4netns that succeeded since the infra started.
    pub restarts: u32,
    /// Set while slirp4netns is down and the supervisor retries it.
    pub down: Option<Down>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Down {
    /// Seconds since the epoch.
    pub since: u64,
    /// Restart attempts that failed since it went down.
    pub failed_restarts: u32,
    /// Why it is down: how it exited, then why the last restart failed.
    pub error: String,
}

/// Why the infra has no way out now, or None when slirp4netns runs.
pub fn outbound_down(info: &super::InfraInfo) -> Option<String> {
    if let Some(down) = &info.outbound.down {
        let for_secs = crate::state::now_secs().saturating_sub(down.since);
        return Some(format!(
            "the infra has no way out: slirp4netns is down for {for_secs}s, {} restart(s) failed ({}); the supervisor keeps retrying (see infra.log)",
            down.failed_restarts, down.error
        ));
    }
    match info.slirp4netns {
        Some(p) if p.is_alive() => None,
        Some(p) => Some(format!(
            "the infra has no way out: slirp4netns (pid {}) is not running",
            p.pid
        )),
        None => Some("the infra has no way out: slirp4netns is not running".into()),
    }
}
