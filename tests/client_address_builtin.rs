//! Which address a container behind a port the builtin driver publishes
//! sees for its client: the driver connects inside the infra from the
//! client's own address, so a loopback client (127.0.0.0/8, ::1) is the
//! host as the infra knows it (10.0.2.2, fd00::2) and any other client is
//! itself, over TCP and UDP, IPv4 and IPv6, with slirp4netns or pasta as
//! the way out; several loopback clients at once do not collide; an IPv6
//! client falls back to IPv4 where the container has no IPv6.

use lab::client_address::{
    assert_seen, client_addresses, cnitool, host_netns, in_host, ip, mappings, peer_echo, seen,
    stop, tcp_open, udp_ask, HOST_V4, HOST_V6, INFRA, OVERLAP_V4, OVERLAP_V6, PORT_CLOSED,
    PORT_DUAL, PORT_V4,
};
use lab::{example_conflist, outer, Container, Lab};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::Read;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

/// Every client kind on both ports, with what the container must see when
/// the infra keeps client addresses (`v6_inside`: the container is reached
/// over IPv6 too).
fn kept_cases(v6_inside: bool) -> Vec<(&'static str, &'static str, u16, &'static str)> {
    let (lo6, global6) = if v6_inside {
        ("fd00::2", HOST_V6)
    } else {
        ("10.0.2.2", INFRA)
    };
    let mut cases = Vec::new();
    for proto in ["tcp", "udp"] {
        cases.extend([
            (proto, "127.0.0.1", PORT_V4, "10.0.2.2"),
            (proto, "127.0.0.53", PORT_V4, "10.0.2.2"),
            (proto, HOST_V4, PORT_V4, HOST_V4),
            // A dual-stack listener's IPv4 clients are IPv4 ones.
            (proto, "127.0.0.1", PORT_DUAL, "10.0.2.2"),
            (proto, HOST_V4, PORT_DUAL, HOST_V4),
            (proto, "::1", PORT_DUAL, lo6),
            (proto, HOST_V6, PORT_DUAL, global6),
            (proto, OVERLAP_V4, PORT_V4, INFRA),
            (proto, OVERLAP_V6, PORT_DUAL, INFRA),
        ]);
    }
    cases
}

/// A UDP client's first datagram is answered (one try, 3 s): nothing is
/// lost on the way, even when the forwarder changes its dial.
fn assert_first_datagram_answered(host: &Container, to: &str, port: u16, want: &str) {
    let to = SocketAddr::new(ip(to), port);
    let got = in_host(host, move || -> Result<String, String> {
        let sock = UdpSocket::bind(SocketAddr::new(to.ip(), 0)).map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        sock.send_to(b"first", to).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 512];
        let (n, _) = sock
            .recv_from(&mut buf)
            .map_err(|e| format!("no answer: {e}"))?;
        seen(&String::from_utf8_lossy(&buf[..n])).map(|(a, _)| a)
    });
    assert_eq!(got, Ok(want.to_string()), "the first datagram to {to}");
}

/// A connection to a port whose container has no server ends at once (the
/// container's reset reaches the forwarder, which passes the end on), for
/// an IPv4 and an IPv6 loopback client.
fn assert_closed_port_ends_at_once(host: &Container) {
    for to in ["127.0.0.1", "::1"] {
        let to = SocketAddr::new(ip(to), PORT_CLOSED);
        let took = in_host(host, move || -> Result<Duration, String> {
            let t = Instant::now();
            let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(3))
                .map_err(|e| format!("connect: {e}"))?;
            conn.set_read_timeout(Some(Duration::from_secs(4)))
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 16];
            match conn.read(&mut buf) {
                Ok(0) => Ok(t.elapsed()),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(t.elapsed()),
                Ok(n) => Err(format!("{n} bytes from nowhere")),
                Err(e) => Err(format!("read: {e}")),
            }
        });
        let took = took.unwrap_or_else(|e| panic!("closed port via {to}: {e}"));
        eprintln!("[timing] closed container port via {to}: ended after {took:?}");
        assert!(
            took < Duration::from_secs(2),
            "closed port via {to}: {took:?}"
        );
    }
}

/// Several loopback clients at once, TCP and UDP: each is 10.0.2.2 to the
/// container, on a port of its own.
fn assert_loopback_clients_at_once(host: &Container, n: usize) {
    let (tcp, udp) = in_host(host, move || {
        let to = SocketAddr::new(ip("127.0.0.1"), PORT_V4);
        let conns: Vec<(TcpStream, String, u16)> = (0..n)
            .map(|i| tcp_open(to).unwrap_or_else(|e| panic!("loopback TCP client {i}: {e}")))
            .collect();
        let tcp: Vec<(String, u16)> = conns.iter().map(|(_, a, p)| (a.clone(), *p)).collect();
        // All open together, and still answering: each end reads our EOF.
        for (mut conn, _, _) in conns {
            let _ = conn.shutdown(std::net::Shutdown::Write);
            let mut rest = Vec::new();
            conn.read_to_end(&mut rest)
                .expect("the server closes after our EOF");
        }
        let socks: Vec<UdpSocket> = (0..n)
            .map(|_| UdpSocket::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let udp: Vec<(String, u16)> = socks
            .iter()
            .enumerate()
            .map(|(i, s)| udp_ask(s, to).unwrap_or_else(|e| panic!("loopback UDP client {i}: {e}")))
            .collect();
        (tcp, udp)
    });
    for (proto, seen) in [("tcp", tcp), ("udp", udp)] {
        assert!(
            seen.iter().all(|(a, _)| a == "10.0.2.2"),
            "{proto}: loopback clients at once: {seen:?}"
        );
        let ports: BTreeSet<u16> = seen.iter().map(|(_, p)| *p).collect();
        assert_eq!(ports.len(), n, "{proto}: {n} clients, ports seen: {seen:?}");
    }
}

/// Kills slirp4netns and waits for the supervisor to restart it.
fn restart_slirp4netns(lab: &Lab) {
    let pid = |lab: &Lab| lab.status()["infra"]["slirp4netns"]["pid"].as_u64();
    let old = pid(lab).unwrap_or_else(|| panic!("no slirp4netns: {}", lab.status()));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap_or_else(|e| panic!("killing slirp4netns {old}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(new) = pid(lab).filter(|p| *p != old) {
            if lab.is_running(new as u32) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "slirp4netns was not restarted: {}",
            lab.status()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// One lab: the network `conf` (named `net`), one container publishing
/// `mappings()` with the peer-echo server; `check` runs with the host
/// namespace; then DEL, and nothing may be left.
fn with_published_server(name: &str, net: &str, conf: Value, check: impl FnOnce(&Lab, &Container)) {
    if !lab::have_python3("the peer-echo server") {
        return;
    }
    let Some(lab) = Lab::new(lab::binary!(), name) else {
        return;
    };
    let t0 = Instant::now();
    lab.write_netconf(net, &conf);
    let host = host_netns(&lab);
    let c = lab.container();
    let add = cnitool(&lab, &host, "add", net, &c, &mappings());
    add.add_result("ADD publishing the peer-echo ports");
    let server = peer_echo(&lab, &c);
    check(&lab, &host);
    let del = cnitool(&lab, &host, "del", net, &c, &json!([]));
    assert!(del.ok(), "DEL: {del}");
    stop(&lab, server);
    lab.assert_no_infra("after DEL");
    eprintln!("[timing] {name}: {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------
// Tests

/// The dual-stack example (IPv6 in the infra and the container): every
/// client as itself, loopback as 10.0.2.2 / fd00::2, TCP and UDP, on an
/// IPv4 and a dual-stack listener; eight loopback clients at once; the same
/// after slirp4netns was killed and restarted; `status` says it is kept.
#[test]
fn builtin_driver_shows_each_client_dual_stack() {
    let mut conf = lab::conf_example("dual-stack.conflist");
    outer(&mut conf).insert("portDriver".into(), "builtin".into());
    with_published_server("client_addr_dual", "dual-stack", conf, |lab, host| {
        let status = client_addresses(lab);
        assert_eq!(status["kept"], true, "status: {status}");
        assert_eq!(
            (status["ipv4"].clone(), status["ipv6"].clone()),
            (json!(true), json!(true)),
            "{status}"
        );
        assert_seen(host, "dual-stack", &kept_cases(true));
        assert_loopback_clients_at_once(host, 8);
        assert_closed_port_ends_at_once(host);
        restart_slirp4netns(lab);
        assert_seen(
            host,
            "after slirp4netns restarted",
            &[
                ("tcp", "127.0.0.1", PORT_V4, "10.0.2.2"),
                ("udp", HOST_V4, PORT_V4, HOST_V4),
                ("tcp", "::1", PORT_DUAL, "fd00::2"),
                ("udp", HOST_V6, PORT_DUAL, HOST_V6),
            ],
        );
        let text = lab.cli(&["status"]);
        assert!(
            text.stdout.contains("clients:     addresses kept"),
            "status: {text}"
        );
    });
}

/// The same with pasta as the way out, and without `allowHostLoopback`
/// (the infra then refuses traffic to the gateway with policy rules of its
/// own; the replies to 10.0.2.2 / fd00::2 must still reach the forwarder).
#[test]
fn builtin_driver_shows_each_client_with_pasta() {
    if !lab::outbound::available(lab::outbound::PASTA, "client_addr_pasta") {
        return;
    }
    let mut conf = lab::conf_example("dual-stack.conflist");
    lab::outbound::with_engine(&mut conf, lab::outbound::PASTA);
    outer(&mut conf).insert("allowHostLoopback".into(), false.into());
    with_published_server("client_addr_pasta", "dual-stack", conf, |lab, host| {
        assert_eq!(client_addresses(lab)["kept"], true, "{}", lab.status());
        assert_seen(host, "pasta", &kept_cases(true));
        assert_loopback_clients_at_once(host, 4);
    });
}

/// A client that has 10.0.2.2 or fd00::2 itself (a host in a
/// 10.0.2.0/24 network, as QEMU's and VirtualBox's user networking make)
/// is not shown as the host's loopback, which those addresses mean to the
/// container: it is the infra's address, as a client with no address of
/// its own there.
#[test]
fn builtin_driver_shows_only_loopback_clients_as_the_host() {
    let mut conf = lab::conf_example("dual-stack.conflist");
    outer(&mut conf).insert("portDriver".into(), "builtin".into());
    with_published_server("client_addr_gw", "dual-stack", conf, |lab, host| {
        let out = lab.in_netns(
            host,
            &[
                "sh",
                "-c",
                "ip addr add 10.0.2.2/32 dev lo && ip -6 addr add fd00::2/128 dev lo nodad",
            ],
        );
        assert!(
            out.ok(),
            "adding the gateway's addresses to the host: {out}"
        );
        let mut cases = Vec::new();
        for proto in ["tcp", "udp"] {
            cases.extend([
                (proto, "10.0.2.2", PORT_V4, INFRA),
                (proto, "10.0.2.2", PORT_DUAL, INFRA),
                (proto, "fd00::2", PORT_DUAL, INFRA),
                (proto, "127.0.0.1", PORT_V4, "10.0.2.2"),
                (proto, "::1", PORT_DUAL, "fd00::2"),
            ]);
        }
        assert_seen(host, "the gateway's address on the host", &cases);
    });
}

/// The example network (IPv4 only, no IPv6 in the infra): IPv4 clients as
/// themselves; an IPv6 client reaches the container over IPv4, ::1 as
/// 10.0.2.2, any other as the infra's address (it has no IPv4 form).
#[test]
fn builtin_driver_shows_each_client_ipv4_infra() {
    with_published_server(
        "client_addr_v4",
        lab::NET,
        example_conflist(),
        |lab, host| {
            assert_eq!(client_addresses(lab)["kept"], true, "{}", lab.status());
            assert_seen(host, "IPv4 infra", &kept_cases(false));
        },
    );
}

/// IPv6 in the infra but not in the container's network: an IPv6 client's
/// dial over IPv6 is refused (no DNAT for it) and the forwarder goes over
/// IPv4, TCP and UDP alike, so nothing that worked before stops working.
#[test]
fn builtin_driver_falls_back_to_ipv4_for_an_ipv4_only_container() {
    let mut conf = example_conflist();
    outer(&mut conf).insert("ipv6".into(), true.into());
    with_published_server("client_addr_v6_infra", lab::NET, conf, |lab, host| {
        assert_eq!(client_addresses(lab)["kept"], true, "{}", lab.status());
        assert_seen(host, "IPv6 infra, IPv4 container", &kept_cases(false));
        // A new flow: its first datagram, refused over IPv6, goes again
        // over IPv4.
        assert_first_datagram_answered(host, "::1", PORT_DUAL, "10.0.2.2");
        assert_closed_port_ends_at_once(host);
    });
}
