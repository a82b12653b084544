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

mod setup;

pub use setup::{start_setup, Setup};

use crate::sys;
use serde::{Deserialize, Serialize};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

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
