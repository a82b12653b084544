//! slirp4netns: the infra's way out, attached to the sandbox's netns. Its
//! defaults, set by `--configure`, are the addresses of `super`.

use super::{Options, Running, READY_TIMEOUT, TAP};
use crate::error::{Error, Kind, Result};
use crate::procfs::ProcessId;
use crate::sys;
use std::os::fd::AsRawFd;
use std::process::Command;

/// Starts slirp4netns and waits until tap0 is configured.
pub fn start(opts: &Options) -> Result<Running> {
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
    cmd.arg(opts.sandbox_pid.to_string()).arg(TAP);
    // --enable-sandbox unmounts what it does not need: in a private mount
    // namespace (super::spawn), never the caller's.
    let child = super::spawn(cmd, [ready_fd, exit_fd], "slirp4netns", "is it installed?")?;
    drop(ready_w);
    drop(exit_r);
    // slirp4netns writes "1" once tap0 is up, and closes the fd only on exit.
    let ready = !super::read_until(ready_r, READY_TIMEOUT, |got| !got.is_empty()).is_empty();
    if !ready {
        return Err(super::not_ready(child, "slirp4netns", ""));
    }
    let id = ProcessId::of(child.id() as i32)
        .ok_or_else(|| Error::new(Kind::InfraStart, "slirp4netns exited right after start"))?;
    Ok(Running {
        child,
        id,
        // slirp4netns exits when this, our end of its exit pipe, closes.
        _held: vec![exit_w],
    })
}
