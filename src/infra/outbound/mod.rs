//! What connects the infra to the outside: slirp4netns or pasta (the
//! config's `outbound`). Either gives the infra the same addresses, so
//! nothing downstream (the inner chain's routes and DNS, the port drivers)
//! depends on which one runs: tap0 10.0.2.100/24, gateway 10.0.2.2 (the
//! host's loopback when `allowHostLoopback`), DNS forwarder 10.0.2.3, and
//! with `ipv6` fd00::100/64, gateway fd00::2, DNS fd00::3.
//!
//! The supervisor starts the engine, restarts it when it dies, and records
//! its process in infra.json (`slirp4netns` or `pasta`).

pub mod pasta;
pub mod slirp4netns;

use crate::error::{Error, Kind, Result};
use crate::procfs::ProcessId;
use crate::sys;
use serde::{Deserialize, Serialize};
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use crate::cni::config::Engine;

/// The infra's outside interface, whichever engine makes it.
pub const TAP: &str = "tap0";
pub const ADDRESS: &str = "10.0.2.100";
pub const PREFIX: u8 = 24;
pub const GATEWAY: &str = "10.0.2.2";
pub const DNS: &str = "10.0.2.3";
pub const ADDRESS6: &str = "fd00::100";
pub const GATEWAY6: &str = "fd00::2";
pub const DNS6: &str = "fd00::3";

/// How long an engine may take to configure tap0.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// A running engine, the supervisor's child.
pub struct Running {
    pub child: Child,
    pub id: ProcessId,
    /// Fds the engine's life depends on, held as long as it runs.
    _held: Vec<OwnedFd>,
}

pub struct Options<'a> {
    pub sandbox_pid: i32,
    pub settings: &'a super::Settings,
    /// slirp4netns's API socket (the slirp4netns port driver's way in).
    pub api_socket: &'a Path,
}

/// Starts the configured engine and waits until tap0 is configured.
pub fn start(opts: &Options) -> Result<Running> {
    match opts.settings.outbound {
        Engine::Slirp4netns => slirp4netns::start(opts),
        Engine::Pasta => pasta::start(opts),
    }
}

/// Spawns the engine `cmd` as the supervisor's child: it dies with the
/// supervisor, starts in a private mount namespace (what it mounts or
/// unmounts before its own sandbox stays out of the caller's: real root's
/// /run/netns, say) and inherits no fd of ours but `keep`. `missing` says
/// what to install when it is not there.
fn spawn(mut cmd: Command, keep: [RawFd; 2], what: &str, missing: &str) -> Result<Child> {
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    let parent = nix::unistd::getpid();
    // SAFETY: runs between fork and exec; prctl, unshare, mount and fcntl
    // are async-signal-safe, and nothing here allocates.
    unsafe {
        cmd.pre_exec(move || {
            sys::die_with_parent(parent)?;
            sys::private_mount_namespace()?;
            sys::cloexec_inherited_fds()?;
            keep.iter().try_for_each(|fd| sys::keep_on_exec(*fd))
        });
    }
    cmd.spawn().map_err(|e| {
        Error::new(
            Kind::InfraStart,
            format!("starting {what}: {e} ({missing})"),
        )
    })
}

/// The error for an engine that did not say it was ready: it is killed
/// and reaped first.
fn not_ready(mut child: Child, what: &str, hint: &str) -> Error {
    let _ = child.kill();
    let status = child.wait().ok();
    Error::new(
        Kind::InfraStart,
        format!(
            "{what} did not become ready ({}{hint})",
            status.map_or("still running".into(), |s| s.to_string())
        ),
    )
}

/// Reads `fd` until `done` holds for what came, EOF, or `timeout`; what
/// came.
fn read_until(fd: OwnedFd, timeout: Duration, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::io::Read;
    let deadline = crate::sys::deadline(timeout);
    let mut file = std::fs::File::from(fd);
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return got;
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(
            std::os::fd::AsFd::as_fd(&file),
            PollFlags::POLLIN,
        )];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return got,
            Ok(_) => {}
        }
        let mut buf = [0u8; 64];
        match file.read(&mut buf) {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        if done(&got) {
            return got;
        }
    }
}

/// The infra's way out as the supervisor last saw it; kept in infra.json.
/// An infra.json without it (an older supervisor) says nothing: then the
/// recorded engine process alone tells.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// Restarts of the engine that succeeded since the infra started.
    pub restarts: u32,
    /// Set while the engine is down and the supervisor retries it.
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

/// Why the infra has no way out now, or None when its engine runs.
pub fn outbound_down(info: &super::InfraInfo) -> Option<String> {
    let engine = info.settings.outbound.name();
    if let Some(down) = &info.outbound.down {
        let for_secs = crate::state::now_secs().saturating_sub(down.since);
        return Some(format!(
            "the infra has no way out: {engine} is down for {for_secs}s, {} restart(s) failed ({}); the supervisor keeps retrying (see infra.log)",
            down.failed_restarts, down.error
        ));
    }
    match info.outbound_process() {
        Some(p) if p.is_alive() => None,
        Some(p) => Some(format!(
            "the infra has no way out: {engine} (pid {}) is not running",
            p.pid
        )),
        None => Some(format!("the infra has no way out: {engine} is not running")),
    }
}
