//! pasta (from the passt project): the infra's way out, mapping its traffic
//! onto ordinary sockets of the caller's network namespace instead of
//! running a TCP/IP stack of its own. Written for Debian 12's pasta
//! (2023-03-09) and what it can do:
//!
//! - it joins the sandbox's netns through a fd we open and pass it
//!   (`--netns /proc/self/fd/N`): given `/proc/PID/ns/net`, that version
//!   opens it after dropping CAP_SYS_PTRACE, and the kernel refuses;
//! - tap0 gets the addresses slirp4netns gives (`--config-net` with
//!   `--address`, `--netmask`, `--gateway`), statically: IPv6 works at once;
//! - DNS: `--dns-forward 10.0.2.3` sends queries to the first nameserver of
//!   /etc/resolv.conf as read at start (a loopback one included);
//! - the gateway is the host's loopback unless `--no-map-gw`; then pasta
//!   would send what goes to 10.0.2.2 to that address on the host's own
//!   network, so the sandbox also refuses every packet to the gateway
//!   (`sandbox::refuse_gateway`);
//! - no port forwarding of its own (`-t none -u none -T none -U none`):
//!   its default, `auto`, would publish on the host every port bound in
//!   the infra, and reach every port bound on the host's loopback from the
//!   infra's. It cannot change forwards while it runs, so published ports
//!   go through the builtin driver;
//! - readiness: it writes its PID file (here, our pipe) only once tap0 is
//!   configured.

use super::{
    Options, Running, ADDRESS, ADDRESS6, DNS, DNS6, GATEWAY, GATEWAY6, PREFIX, READY_TIMEOUT, TAP,
};
use crate::error::{Error, Kind, Result};
use crate::procfs::ProcessId;
use crate::sys;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;

/// The arguments for `opts`, with `netns_fd` and `pid_fd` inherited.
fn args(opts: &Options, netns_fd: i32, pid_fd: i32) -> Vec<String> {
    let s = opts.settings;
    let mut a: Vec<String> = vec![
        "--config-net".into(),
        "--foreground".into(),
        "--quiet".into(),
        // Errors to our stderr (infra.log), not to a syslog that may be absent.
        "--stderr".into(),
        // As root it would drop to "nobody", losing what it needs to enter
        // the infra; in a user namespace this is who we are anyway.
        "--runas".into(),
        format!("{}:{}", nix::unistd::geteuid(), nix::unistd::getegid()),
        "--ns-ifname".into(),
        TAP.into(),
        "--mtu".into(),
        s.mtu.to_string(),
        "--address".into(),
        ADDRESS.into(),
        "--netmask".into(),
        PREFIX.to_string(),
        "--gateway".into(),
        GATEWAY.into(),
        "--dns-forward".into(),
        DNS.into(),
    ];
    if s.ipv6 {
        for (opt, value) in [
            ("--address", ADDRESS6),
            ("--gateway", GATEWAY6),
            ("--dns-forward", DNS6),
        ] {
            a.extend([opt.into(), value.into()]);
        }
    } else {
        a.push("--ipv4-only".into());
    }
    if !s.allow_host_loopback {
        a.push("--no-map-gw".into());
    }
    for opt in ["-t", "-u", "-T", "-U"] {
        a.extend([opt.into(), "none".into()]);
    }
    a.extend([
        "--no-dhcp".into(),
        "--no-dhcpv6".into(),
        "--pid".into(),
        format!("/proc/self/fd/{pid_fd}"),
        // The netns is a fd, not a file whose deletion could be watched.
        "--no-netns-quit".into(),
        "--netns".into(),
        format!("/proc/self/fd/{netns_fd}"),
    ]);
    a
}

/// Starts pasta and waits until tap0 is configured.
pub fn start(opts: &Options) -> Result<Running> {
    let fail = |why: String| Error::new(Kind::InfraStart, why);
    let netns = std::fs::File::open(format!("/proc/{}/ns/net", opts.sandbox_pid))
        .map_err(|e| fail(format!("opening the sandbox's netns for pasta: {e}")))?;
    let netns = OwnedFd::from(netns);
    let (ready_r, ready_w) = sys::pipe()?;
    let (netns_fd, ready_fd) = (netns.as_raw_fd(), ready_w.as_raw_fd());
    let mut cmd = Command::new("pasta");
    cmd.args(args(opts, netns_fd, ready_fd));
    let child = super::spawn(
        cmd,
        [netns_fd, ready_fd],
        "pasta",
        "is it installed? Debian: passt",
    )?;
    drop(ready_w);
    drop(netns);
    // "PID\n" once tap0 is up. pasta keeps the inherited fd open for its
    // life: the newline, not EOF, says the PID is complete.
    let got = super::read_until(ready_r, READY_TIMEOUT, |b| b.contains(&b'\n'));
    let reported = String::from_utf8_lossy(&got).trim().parse::<u32>().ok();
    if reported != Some(child.id()) {
        return Err(super::not_ready(child, "pasta", "; see infra.log"));
    }
    let id = ProcessId::of(child.id() as i32)
        .ok_or_else(|| fail("pasta exited right after start".into()))?;
    Ok(Running {
        child,
        id,
        _held: Vec::new(),
    })
}
