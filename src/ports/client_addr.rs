//! The client's own address, seen by the container behind a published port
//! (builtin driver).
//!
//! The forwarder's socket in the infra is bound to the client's address
//! (`IP_TRANSPARENT`, a non-local address) before it connects to the
//! infra's port, where the inner portmap DNATs it to the container: the
//! container sees that address as its peer. A loopback client becomes the
//! host as the infra knows it (tap0's gateway, 10.0.2.2 / fd00::2, with
//! slirp4netns or pasta alike). A client inside one of the infra's
//! container subnets cannot be shown (the container would look for it on
//! its own link): it comes from the infra's address, as every client did
//! before.
//!
//! The container's replies go to that address, which the infra would route
//! out of tap0. So the infra marks the connections these sockets make and
//! routes their replies to itself:
//!
//! - the socket carries `SO_MARK` `MARK_SOCKET`; a mangle OUTPUT rule copies
//!   it into the connection's conntrack mark;
//! - a mangle PREROUTING rule gives the packets of such a connection
//!   `MARK_REPLY` (another bit: our own outgoing packets must not match the
//!   rule below, or they would be delivered locally instead of sent);
//! - `ip rule fwmark MARK_REPLY lookup TABLE`, where TABLE says every
//!   address is local: the reply reaches the socket;
//! - the infra's own answers to such a connection (a reset, or an ICMP
//!   error, when nothing listens: no DNAT for the port or the family) get
//!   `MARK_REPLY` in mangle OUTPUT, which routes them again: they reach the
//!   socket at once too (the forwarder then tries its other dial), instead
//!   of leaving through tap0.
//!
//! Routing happens before the reply's source is translated back (that is
//! done on input), so nothing simpler than the conntrack mark tells a reply
//! to the client from the container's own traffic to the same address
//! (10.0.2.2 is also the host's loopback for the container). The rules need
//! the kernel's CONNMARK and connmark (xt_connmark), mark (xt_mark, which
//! portmap uses too), policy routing, and `IP_TRANSPARENT` (CAP_NET_ADMIN in
//! the user namespace, which the infra's user has). They are made once, when
//! the infra starts; they name no interface, so a restarted slirp4netns or
//! pasta (a new tap0) changes nothing. When they cannot be made, the forwarder
//! connects from the infra's own address as before, and `status` says so.

use crate::exec::join_namespaces;
use crate::sys;
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The host's loopback as the infra (and so the container) knows it: the
/// gateway slirp4netns or pasta gives tap0 (`outbound::GATEWAY`,
/// `GATEWAY6`).
pub const HOST_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
pub const HOST_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

/// Packets of the forwarder's transparent sockets. Bits no reference plugin
/// sets (portmap's masquerade mark is 0x2000 by default).
pub const MARK_SOCKET: u32 = 0x1000_0000;
/// Replies of their connections, to be delivered locally.
pub const MARK_REPLY: u32 = 0x2000_0000;
/// The routing table of those replies, and the rule's priority: the infra
/// has only the main and local tables otherwise.
pub const TABLE: u32 = 100;
pub const RULE_PRIORITY: u32 = 100;

/// How long the setup's commands, run at once, may take in all (iptables
/// waits for its lock). Well within the plugin's wait for the whole infra
/// (`START_TIMEOUT`, 10 s, sandbox and way out included): a command that
/// hangs costs the clients' addresses, not the infra's start.
const SETUP_TIMEOUT: Duration = Duration::from_secs(4);

/// Whether containers see their clients' addresses, per address family of
/// the connection inside the infra; kept in infra.json.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    pub ipv4: bool,
    pub ipv6: bool,
}

/// What the infra's start made of it (builtin driver only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientAddresses {
    #[serde(flatten)]
    pub kept: Kept,
    /// Why not, when a family the infra has is not kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ClientAddresses {
    /// A line for people: what a container sees, and why when it is not
    /// the client.
    pub fn describe(&self, infra_ipv6: bool) -> String {
        let complete = self.kept.ipv4 && (self.kept.ipv6 || !infra_ipv6);
        match (&self.error, complete) {
            (None, true) => "kept: containers see each client's own address (loopback clients as 10.0.2.2 / fd00::2)".into(),
            (why, _) => format!(
                "NOT kept{}: containers see the infra's address 10.0.2.100 instead{}",
                match (self.kept.ipv4, self.kept.ipv6) {
                    (true, false) => " for IPv6 clients",
                    _ => "",
                },
                why.as_deref().map(|w| format!(" ({w})")).unwrap_or_default()
            ),
        }
    }

    /// Whether everything the infra has is kept.
    pub fn complete(&self, infra_ipv6: bool) -> bool {
        self.kept.ipv4 && (self.kept.ipv6 || !infra_ipv6) && self.error.is_none()
    }
}

// ---------------------------------------------------------------------------
// Setting the infra up

/// The setup's commands, started; `finish` waits for them.
pub struct Setup {
    steps: Vec<Step>,
    /// When the commands that still run are given up.
    deadline: Instant,
}

struct Step {
    ipv6: bool,
    what: String,
    /// The command, and the error of writing its input if that failed.
    child: io::Result<(Child, Option<io::Error>)>,
}

/// Starts the commands that make the rules inside the infra of
/// `sandbox_pid` (IPv6 too when `ipv6`), all at once: they run while
/// the way out (slirp4netns or pasta) starts.
pub fn start_setup(sandbox_pid: i32, ipv6: bool) -> Setup {
    let ns = |kind: &str| -> io::Result<OwnedFd> {
        Ok(OwnedFd::from(std::fs::File::open(format!(
            "/proc/{sandbox_pid}/ns/{kind}"
        ))?))
    };
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let ns = ns("mnt").and_then(|mnt| Ok((mnt, ns("net")?)));
    let mut steps = Vec::new();
    for v6 in [false, true] {
        if v6 && !ipv6 {
            continue;
        }
        for argv in commands(v6) {
            let what = argv.join(" ");
            let child = match &ns {
                Ok((mnt, net)) => spawn_inside(mnt, net, &argv),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            steps.push(Step {
                ipv6: v6,
                what,
                child,
            });
        }
    }
    Setup { steps, deadline }
}

/// The commands for one family. They run at once, in any order: the
/// forwarder uses none of it before all have succeeded.
fn commands(ipv6: bool) -> Vec<Vec<String>> {
    let (family, any, restore) = if ipv6 {
        ("-6", "::/0", "ip6tables-restore")
    } else {
        ("-4", "0.0.0.0/0", "iptables-restore")
    };
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let reply = format!("{MARK_REPLY:#x}/{MARK_REPLY:#x}");
    let (table, pref) = (TABLE.to_string(), RULE_PRIORITY.to_string());
    vec![
        s(&[
            "ip", family, "route", "add", "local", any, "dev", "lo", "table", &table,
        ]),
        s(&[
            "ip", family, "rule", "add", "pref", &pref, "fwmark", &reply, "lookup", &table,
        ]),
        // --noflush: the table is added to, nothing else in it is touched.
        s(&[restore, "-w", "5", "--noflush"]),
    ]
}

/// What iptables-restore reads: the two mark rules.
fn mangle_rules() -> String {
    let socket = format!("{MARK_SOCKET:#x}/{MARK_SOCKET:#x}");
    let reply = format!("{MARK_REPLY:#x}/{MARK_REPLY:#x}");
    let comment = "-m comment --comment \"rootless-cni: replies to the published ports' clients\"";
    format!(
        "*mangle\n\
         -A OUTPUT -m mark --mark {socket} {comment} -j CONNMARK --set-xmark {socket}\n\
         -A PREROUTING -m connmark --mark {socket} {comment} -j MARK --set-xmark {reply}\n\
         -A OUTPUT -m connmark --mark {socket} -m mark ! --mark {socket} {comment} -j MARK --set-xmark {reply}\n\
         COMMIT\n"
    )
}

fn spawn_inside(
    mnt: &OwnedFd,
    net: &OwnedFd,
    argv: &[String],
) -> io::Result<(Child, Option<io::Error>)> {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env("PATH", crate::exec::path_with_sbin())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let restore = argv[0].ends_with("-restore");
    cmd.stdin(if restore {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let (mnt, net) = (mnt.as_raw_fd(), net.as_raw_fd());
    // SAFETY: runs between fork and exec in the single-threaded child;
    // join_namespaces and close_range are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            // SAFETY: both fds are borrowed for this whole function, so they
            // are open when `cmd.spawn()` below forks.
            let (mnt, net) = (BorrowedFd::borrow_raw(mnt), BorrowedFd::borrow_raw(net));
            join_namespaces(mnt, net)?;
            sys::cloexec_inherited_fds()
        });
    }
    let mut child = cmd.spawn()?;
    let mut input_error = None;
    if restore {
        if let Some(mut stdin) = child.stdin.take() {
            // A few hundred bytes: the pipe takes them without blocking. A
            // command that exits first (EPIPE) is waited for all the same:
            // its own error says more.
            input_error = stdin.write_all(mangle_rules().as_bytes()).err();
        }
    }
    Ok((child, input_error))
}

impl Setup {
    /// Waits for the commands; what the infra can do.
    pub fn finish(self) -> ClientAddresses {
        let mut kept = Kept {
            ipv4: true,
            ipv6: self.steps.iter().any(|s| s.ipv6),
        };
        let mut errors = Vec::new();
        for step in self.steps {
            if let Err(e) = wait_step(step.child, self.deadline) {
                errors.push(format!("{}: {e}", step.what));
                if step.ipv6 {
                    kept.ipv6 = false;
                } else {
                    kept.ipv4 = false;
                }
            }
        }
        // Without IPv4's rules, IPv6's alone would keep the address of
        // some clients only: none is simpler to explain, and to test.
        if !kept.ipv4 {
            kept.ipv6 = false;
        }
        ClientAddresses {
            kept,
            error: (!errors.is_empty()).then(|| errors.join("; ")),
        }
    }
}

fn wait_step(
    child: io::Result<(Child, Option<io::Error>)>,
    deadline: Instant,
) -> std::result::Result<(), String> {
    let (mut child, input_error) = child.map_err(|e| format!("cannot run it: {e}"))?;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("still running after {}s", SETUP_TIMEOUT.as_secs()));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    if status.success() {
        return match input_error {
            None => Ok(()),
            Some(e) => Err(format!("writing its input: {e}")),
        };
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    Err(format!("{status}: {}", stderr.trim()))
}

// ---------------------------------------------------------------------------
// Dialling the infra for a client

/// Where the forwarder connects inside the infra for one client, and from
/// which address (None: the infra's own, chosen by the kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dial {
    pub target: SocketAddr,
    pub source: Option<IpAddr>,
}

/// The subnets of the infra's container networks (the addresses of its
/// interfaces but lo and tap0). A container reaches an address there on
/// its own link, not through the infra: a client with such an address (a
/// host whose network overlaps a container network) cannot be shown as
/// itself, its replies would never reach the forwarder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subnets(Vec<(IpAddr, u8)>);

impl Subnets {
    /// Those of the network namespace the calling thread is in.
    pub fn of_this_netns() -> Subnets {
        let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
            return Subnets::default();
        };
        let ip = |s: &nix::sys::socket::SockaddrStorage| -> Option<IpAddr> {
            s.as_sockaddr_in()
                .map(|a| IpAddr::V4(a.ip()))
                .or_else(|| s.as_sockaddr_in6().map(|a| IpAddr::V6(a.ip())))
        };
        let prefix_len = |mask: IpAddr| -> u8 {
            let ones = match mask {
                IpAddr::V4(m) => u32::from(m).count_ones(),
                IpAddr::V6(m) => u128::from(m).count_ones(),
            };
            u8::try_from(ones).unwrap_or(0)
        };
        Subnets(
            addrs
                .filter(|a| {
                    a.interface_name != "lo" && a.interface_name != crate::infra::outbound::TAP
                })
                .filter_map(|a| {
                    let addr = ip(a.address.as_ref()?)?;
                    let mask = ip(a.netmask.as_ref()?)?;
                    Some((addr, prefix_len(mask)))
                })
                .collect(),
        )
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|(net, len)| match (net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
                u32::from(*n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
                u128::from(*n) & mask == u128::from(a) & mask
            }
            _ => false,
        })
    }
}

/// A socket that becomes readable when an address is added to or removed
/// from an interface of this network namespace (a bridge made by a first
/// ADD): when to look at `Subnets` again.
pub fn address_events() -> io::Result<OwnedFd> {
    use nix::sys::socket::{
        bind, socket, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType,
    };
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    let groups = (libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups))?;
    Ok(fd)
}

/// Reads what `address_events` has queued; what it says does not matter,
/// only that something changed (or that events were lost).
pub fn drain(events: &OwnedFd) {
    let mut buf = [0u8; 8192];
    for _ in 0..64 {
        match nix::unistd::read(events.as_raw_fd(), &mut buf) {
            Ok(0) | Err(nix::errno::Errno::EAGAIN) => return,
            // ENOBUFS: events were lost; the caller looks again anyway.
            Ok(_) | Err(_) => {}
        }
    }
}

/// The dials for a client at `peer` on infra port `port`: the first to try,
/// and the one to fall back to when it is refused. An IPv6 client goes over
/// IPv6 when the infra has it (its address has no IPv4 form); a container
/// without IPv6 (no DNAT for it: refused) or not listening on it is then
/// reached over IPv4, as before. A client inside `on_link` comes from the
/// infra's own address.
pub fn dials(
    peer: IpAddr,
    port: u16,
    kept: Kept,
    infra_ipv6: bool,
    on_link: &Subnets,
) -> (Dial, Option<Dial>) {
    let peer = peer.to_canonical();
    let shown = |a: Option<IpAddr>| a.filter(|a| !on_link.contains(*a));
    let v4 = Dial {
        target: SocketAddr::new(super::INFRA_ADDR.into(), port),
        source: shown(kept.ipv4.then(|| seen_over_v4(peer)).flatten()),
    };
    if !(infra_ipv6 && kept.ipv6) {
        return (v4, None);
    }
    match peer {
        IpAddr::V6(a) => match shown(seen_over_v6(a).map(IpAddr::V6)) {
            // portmap catches a local address; ::1 is one whatever tap0 got.
            Some(source) => (
                Dial {
                    target: SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port),
                    source: Some(source),
                },
                Some(v4),
            ),
            None => (v4, None),
        },
        IpAddr::V4(_) => (v4, None),
    }
}

/// The address a container reached over IPv4 sees for `peer`; None when it
/// has none there (an IPv6 client, but for loopback). A client that has
/// HOST_V4 itself (a host in a 10.0.2.0/24 network, as QEMU's and
/// VirtualBox's user networking make, where every forwarded client comes
/// from 10.0.2.2) is not shown as it: 10.0.2.2 means the host's loopback
/// to the container, which a remote client could otherwise claim (a UDP
/// datagram's source needs no answer to be spoofed; 127.0.0.1 cannot be).
fn seen_over_v4(peer: IpAddr) -> Option<IpAddr> {
    match peer {
        IpAddr::V4(a) if a.is_loopback() => Some(HOST_V4.into()),
        IpAddr::V4(a) if a == HOST_V4 => None,
        IpAddr::V4(a) if a.is_unspecified() || a.is_broadcast() || a.is_multicast() => None,
        IpAddr::V4(a) => Some(a.into()),
        IpAddr::V6(a) if a.is_loopback() => Some(HOST_V4.into()),
        IpAddr::V6(_) => None,
    }
}

/// The same over IPv6. A link-local address means nothing on the
/// container's link (its replies would look for it there); HOST_V6 is the
/// host's loopback only (see `seen_over_v4`).
fn seen_over_v6(peer: Ipv6Addr) -> Option<Ipv6Addr> {
    let link_local = peer.segments()[0] & 0xffc0 == 0xfe80;
    if peer.is_loopback() {
        Some(HOST_V6)
    } else if peer.is_unspecified() || peer.is_multicast() || link_local || peer == HOST_V6 {
        None
    } else {
        Some(peer)
    }
}

/// A non-blocking TCP socket connecting to `dial.target` from its source
/// (port chosen at connect time, so many connections of one client address
/// never collide on a port).
pub fn connect_tcp(dial: &Dial) -> io::Result<mio::net::TcpStream> {
    let Some(source) = dial.source else {
        return mio::net::TcpStream::connect(dial.target);
    };
    let fd = transparent_socket(source, nix::sys::socket::SockType::Stream)?;
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)?;
    bind_and_connect(&fd, source, dial.target)?;
    Ok(mio::net::TcpStream::from_std(std::net::TcpStream::from(fd)))
}

/// A non-blocking UDP socket connected to `dial.target` from its source.
pub fn connect_udp(dial: &Dial) -> io::Result<mio::net::UdpSocket> {
    let Some(source) = dial.source else {
        let any: IpAddr = match dial.target {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let s = mio::net::UdpSocket::bind(SocketAddr::new(any, 0))?;
        s.connect(dial.target)?;
        return Ok(s);
    };
    let fd = transparent_socket(source, nix::sys::socket::SockType::Datagram)?;
    bind_and_connect(&fd, source, dial.target)?;
    Ok(mio::net::UdpSocket::from_std(std::net::UdpSocket::from(fd)))
}

fn transparent_socket(source: IpAddr, kind: nix::sys::socket::SockType) -> io::Result<OwnedFd> {
    use nix::sys::socket::{socket, sockopt, AddressFamily, SockFlag};
    let family = match source {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(
        family,
        kind,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    match source {
        IpAddr::V4(_) => nix::sys::socket::setsockopt(&fd, sockopt::IpTransparent, &true)?,
        IpAddr::V6(_) => sys::set_ipv6_transparent(fd.as_fd())?,
    }
    nix::sys::socket::setsockopt(&fd, sockopt::Mark, &MARK_SOCKET)?;
    Ok(fd)
}

fn bind_and_connect(fd: &OwnedFd, source: IpAddr, target: SocketAddr) -> io::Result<()> {
    use nix::sys::socket::{bind, connect, SockaddrStorage};
    let raw = fd.as_raw_fd();
    bind(raw, &SockaddrStorage::from(SocketAddr::new(source, 0)))?;
    match connect(raw, &SockaddrStorage::from(target)) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: Kept = Kept {
        ipv4: true,
        ipv6: true,
    };
    const NONE: Subnets = Subnets(Vec::new());

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loopback_clients_are_the_host_as_the_infra_knows_it() {
        let (d, fallback) = dials(ip("127.0.0.1"), 80, BOTH, true, &NONE);
        assert_eq!(d.source, Some(ip("10.0.2.2")));
        assert_eq!(d.target, "10.0.2.100:80".parse().unwrap());
        assert_eq!(fallback, None);
        assert_eq!(
            dials(ip("127.3.4.5"), 80, BOTH, false, &NONE).0.source,
            Some(ip("10.0.2.2"))
        );
        let (d, fallback) = dials(ip("::1"), 80, BOTH, true, &NONE);
        assert_eq!(d.source, Some(ip("fd00::2")));
        assert_eq!(d.target, "[::1]:80".parse().unwrap());
        assert_eq!(fallback.unwrap().source, Some(ip("10.0.2.2")));
        // Without IPv6 in the infra, ::1 is still the host.
        let (d, fallback) = dials(ip("::1"), 80, BOTH, false, &NONE);
        assert_eq!(d.source, Some(ip("10.0.2.2")));
        assert_eq!(fallback, None);
        // A dual-stack listener's IPv4 client.
        let (d, _) = dials(ip("::ffff:127.0.0.1"), 80, BOTH, true, &NONE);
        assert_eq!(d.source, Some(ip("10.0.2.2")));
        assert!(d.target.is_ipv4());
    }

    #[test]
    fn other_clients_are_themselves() {
        assert_eq!(
            dials(ip("192.0.2.7"), 80, BOTH, true, &NONE).0.source,
            Some(ip("192.0.2.7"))
        );
        assert_eq!(
            dials(ip("::ffff:192.0.2.7"), 80, BOTH, true, &NONE)
                .0
                .source,
            Some(ip("192.0.2.7"))
        );
        let (d, fallback) = dials(ip("2001:db8::7"), 80, BOTH, true, &NONE);
        assert_eq!(d.source, Some(ip("2001:db8::7")));
        // Over IPv4 an IPv6 client has no address of its own.
        assert_eq!(fallback.unwrap().source, None);
        assert_eq!(
            dials(ip("2001:db8::7"), 80, BOTH, false, &NONE).0.source,
            None
        );
        // Link-local: over IPv4, from the infra's address.
        let (d, fallback) = dials(ip("fe80::1"), 80, BOTH, true, &NONE);
        assert_eq!((d.source, d.target.is_ipv4(), fallback), (None, true, None));
    }

    #[test]
    fn only_loopback_clients_are_the_host() {
        // A client that has the host's infra address itself is the infra.
        for peer in ["10.0.2.2", "::ffff:10.0.2.2", "fd00::2"] {
            for infra_ipv6 in [true, false] {
                let (d, fallback) = dials(ip(peer), 80, BOTH, infra_ipv6, &NONE);
                assert_eq!(
                    (d.source, d.target.is_ipv4(), fallback),
                    (None, true, None),
                    "{peer}, infra_ipv6 {infra_ipv6}"
                );
            }
        }
        // Its neighbours are themselves.
        assert_eq!(
            dials(ip("10.0.2.15"), 80, BOTH, true, &NONE).0.source,
            Some(ip("10.0.2.15"))
        );
        assert_eq!(
            dials(ip("fd00::15"), 80, BOTH, true, &NONE).0.source,
            Some(ip("fd00::15"))
        );
    }

    #[test]
    fn clients_on_a_container_network_are_the_infra() {
        let nets = Subnets(vec![(ip("10.89.0.1"), 24), (ip("fd00:89::1"), 64)]);
        assert!(nets.contains(ip("10.89.0.77")) && !nets.contains(ip("10.89.1.77")));
        assert!(nets.contains(ip("fd00:89::77")) && !nets.contains(ip("fd00:8a::77")));
        assert!(!nets.contains(ip("10.0.2.2")));
        assert_eq!(
            dials(ip("10.89.0.77"), 80, BOTH, true, &nets).0.source,
            None
        );
        let (d, fallback) = dials(ip("fd00:89::77"), 80, BOTH, true, &nets);
        assert_eq!((d.source, d.target.is_ipv4(), fallback), (None, true, None));
        assert_eq!(
            dials(ip("192.0.2.7"), 80, BOTH, true, &nets).0.source,
            Some(ip("192.0.2.7"))
        );
        assert_eq!(
            dials(ip("127.0.0.1"), 80, BOTH, true, &nets).0.source,
            Some(ip("10.0.2.2"))
        );
        // /0 and /32 do not overflow.
        assert!(Subnets(vec![(ip("1.2.3.4"), 0)]).contains(ip("9.9.9.9")));
        assert!(Subnets(vec![(ip("1.2.3.4"), 32)]).contains(ip("1.2.3.4")));
    }

    #[test]
    fn nothing_kept_is_the_infra_address_as_before() {
        for peer in ["127.0.0.1", "192.0.2.7", "::1", "2001:db8::7"] {
            let (d, fallback) = dials(ip(peer), 80, Kept::default(), true, &NONE);
            assert_eq!(d.source, None, "{peer}");
            assert_eq!(d.target, "10.0.2.100:80".parse().unwrap(), "{peer}");
            assert_eq!(fallback, None, "{peer}");
        }
        // IPv4 kept, IPv6 not: IPv6 clients over IPv4.
        let v4_only = Kept {
            ipv4: true,
            ipv6: false,
        };
        let (d, fallback) = dials(ip("::1"), 80, v4_only, true, &NONE);
        assert_eq!((d.source, fallback), (Some(ip("10.0.2.2")), None));
    }

    #[test]
    fn the_host_is_the_outbound_gateway() {
        use crate::infra::outbound::{ADDRESS, GATEWAY, GATEWAY6};
        assert_eq!(HOST_V4.to_string(), GATEWAY);
        assert_eq!(HOST_V6.to_string(), GATEWAY6);
        assert_eq!(crate::ports::INFRA_ADDR.to_string(), ADDRESS);
    }

    #[test]
    fn the_rules_use_the_marks() {
        let rules = mangle_rules();
        assert!(rules.contains("--mark 0x10000000/0x10000000"), "{rules}");
        assert!(
            rules.contains("--set-xmark 0x20000000/0x20000000"),
            "{rules}"
        );
        assert_eq!(MARK_SOCKET & MARK_REPLY, 0);
        assert_eq!(MARK_SOCKET & 0x2000, 0, "portmap's masquerade mark");
        let v4 = commands(false);
        assert_eq!(
            v4[1].join(" "),
            "ip -4 rule add pref 100 fwmark 0x20000000/0x20000000 lookup 100"
        );
    }

    #[test]
    fn described_for_people() {
        let ok = ClientAddresses {
            kept: BOTH,
            error: None,
        };
        assert!(ok.complete(true) && ok.describe(true).starts_with("kept"));
        let v4 = ClientAddresses {
            kept: Kept {
                ipv4: true,
                ipv6: false,
            },
            error: Some("ip -6 rule: no".into()),
        };
        assert!(!v4.complete(true));
        assert!(
            v4.describe(true).contains("for IPv6 clients"),
            "{}",
            v4.describe(true)
        );
        let none = ClientAddresses {
            kept: Kept::default(),
            error: Some("CONNMARK: no such target".into()),
        };
        assert!(none.describe(false).contains("CONNMARK"));
    }
}
