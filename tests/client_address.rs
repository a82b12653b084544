//! Which address a container behind a published port sees for its client.
//!
//! The builtin driver connects inside the infra from the client's own
//! address: a loopback client (127.0.0.0/8, ::1) is the host as the infra
//! knows it (10.0.2.2, fd00::2), any other client is itself, over TCP and
//! UDP, IPv4 and IPv6; two loopback clients at once do not collide. The
//! slirp4netns driver's behaviour is measured too (IPv4 only).
//!
//! The lab's "host" here is a network namespace of the session's own (as
//! rootless podman's rootless-netns is): the runtime (cnitool) runs in it,
//! so the infra's host ports and slirp4netns's host side are there, and it
//! has two more addresses on `lo`, 198.51.100.7 and 2001:db8::7, for
//! clients that are not loopback. The clients are threads of the test that
//! join that namespace. Inside the container, a small python3 server
//! answers every TCP connection and UDP datagram with the peer address and
//! port it sees.

use lab::{example_conflist, outer, Container, Lab, Out, Server};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

/// Answers each TCP connection and UDP datagram with "ADDRESS PORT\n" of
/// the peer as seen here; a TCP connection stays open until the client
/// closes it (so several can be open at once). IPv6 sockets are IPv6 only.
const PEER_ECHO: &str = r#"import socket, sys, threading
port = int(sys.argv[1])
def serve(c, peer):
    c.sendall(("%s %d\n" % (peer[0], peer[1])).encode())
    c.recv(1)
    c.close()
def tcp(s):
    s.listen(64)
    while True:
        c, peer = s.accept()
        threading.Thread(target=serve, args=(c, peer), daemon=True).start()
def udp(s):
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(("%s %d\n" % (peer[0], peer[1])).encode(), peer)
threads = []
for fam, any in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    for kind, run in ((socket.SOCK_STREAM, tcp), (socket.SOCK_DGRAM, udp)):
        s = socket.socket(fam, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((any, port))
        threads.append(threading.Thread(target=run, args=(s,), daemon=True))
for t in threads:
    t.start()
for t in threads:
    t.join()
"#;

/// The port the server listens on in the container.
const SERVER_PORT: u16 = 7000;
/// Host ports: the lab's host namespace is the test's own, nothing else
/// binds there.
const PORT_V4: u16 = 8004;
const PORT_DUAL: u16 = 8006;
/// Published to a container port where nothing listens.
const PORT_CLOSED: u16 = 8009;
/// The host namespace's addresses that are not loopback.
const HOST_V4: &str = "198.51.100.7";
const HOST_V6: &str = "2001:db8::7";
/// And two inside the containers' subnets (of the example networks), as a
/// host whose network overlaps them has: a container would look for them
/// on its own link, so they are seen as the infra's address.
const OVERLAP_V4: &str = "10.89.0.200";
const OVERLAP_V6: &str = "fd00:89::200";
/// The infra's own address: what a container saw of every client before.
const INFRA: &str = "10.0.2.100";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an IP address")
}

// ---------------------------------------------------------------------------
// The lab

/// The session's network namespace standing in for the host: `lo` up, with
/// HOST_V4, HOST_V6, OVERLAP_V4 and OVERLAP_V6 on it, and an "external"
/// link (a veth pair, both ends here) with the default routes, which pasta
/// needs to start.
fn host_netns(lab: &Lab) -> Container {
    let host = lab.container();
    let setup = format!(
        "set -e
         ip link set lo up
         ip addr add {HOST_V4}/32 dev lo
         ip -6 addr add {HOST_V6}/128 dev lo
         ip addr add {OVERLAP_V4}/32 dev lo
         ip -6 addr add {OVERLAP_V6}/128 dev lo
         ip link add ext0 type veth peer name ext1
         ip link set ext1 up
         ip link set ext0 up
         ip addr add 192.0.2.1/24 dev ext0
         ip -6 addr add 2001:db8:1::1/64 dev ext0 nodad
         ip route add default via 192.0.2.254
         ip -6 route add default via 2001:db8:1::fe"
    );
    let out = lab.in_netns(&host, &["sh", "-c", &setup]);
    assert!(out.ok(), "setting up the host namespace: {out}");
    host
}

/// `cnitool CMD NET` for `c`, run in the host namespace, publishing
/// `mappings` (on ADD).
fn cnitool(
    lab: &Lab,
    host: &Container,
    cmd: &str,
    net: &str,
    c: &Container,
    mappings: &Value,
) -> Out {
    let netconf = lab.netconf_dir().display().to_string();
    let cni_path = lab.cni_path();
    let cap_args = json!({ "portMappings": mappings }).to_string();
    let cnitool = lab.dir.join("tools/cnitool").display().to_string();
    let net_arg = format!("--net={}", host.netns());
    lab.exec(
        &[
            ("NETCONFPATH", &netconf),
            ("CNI_PATH", &cni_path),
            ("CAP_ARGS", &cap_args),
        ],
        None,
        &["nsenter", &net_arg, "--", &cnitool, cmd, net, &c.netns()],
    )
}

/// TCP and UDP on PORT_V4 (every IPv4 address) and on PORT_DUAL (`::`:
/// every address, IPv4 ones as mapped IPv6), all to SERVER_PORT.
fn mappings() -> Value {
    let m = |proto: &str, port: u16, host_ip: &str| json!({"hostPort": port, "containerPort": SERVER_PORT, "protocol": proto, "hostIP": host_ip});
    json!([
        m("tcp", PORT_V4, ""),
        m("udp", PORT_V4, ""),
        m("tcp", PORT_DUAL, "::"),
        m("udp", PORT_DUAL, "::"),
        {"hostPort": PORT_CLOSED, "containerPort": SERVER_PORT + 1, "protocol": "tcp", "hostIP": "::"},
    ])
}

/// Whether python3 is there for the server; with CI=true it must be.
fn have_python3() -> bool {
    let found = Path::new("/usr/bin/python3").exists();
    assert!(
        found || !lab::in_ci(),
        "python3 (/usr/bin/python3) is needed for the peer-echo server (CI=true)"
    );
    if !found {
        eprintln!("no /usr/bin/python3: skipped");
    }
    found
}

/// Starts the peer-echo server in `c` and waits until it listens (TCP and
/// UDP) on SERVER_PORT.
fn peer_echo(lab: &Lab, c: &Container) -> Server {
    let script = lab.dir.join("peer-echo.py");
    if !script.exists() {
        lab.write_file("peer-echo.py", PEER_ECHO);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644))
            .expect("chmod peer-echo.py");
    }
    let script = script.display().to_string();
    let port = SERVER_PORT.to_string();
    let out = lab.in_netns(
        c,
        &[
            "sh",
            "-c",
            r#""$@" </dev/null >/dev/null 2>&1 & echo $!"#,
            "sh",
            "python3",
            &script,
            &port,
        ],
    );
    assert!(out.ok(), "starting the peer-echo server: {out}");
    let pid: u32 = out.stdout.trim().parse().expect("the server's pid");
    let server = Server { pid };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(bound(pid, "tcp", "0A") && bound(pid, "udp", "07")) {
        assert!(
            Instant::now() < deadline,
            "the peer-echo server (pid {pid}) does not listen on {SERVER_PORT}"
        );
        thread::sleep(Duration::from_millis(20));
    }
    server
}

/// Whether `pid`'s netns has a `proto` socket in `state` on SERVER_PORT.
fn bound(pid: u32, proto: &str, state: &str) -> bool {
    let port_hex = format!(":{SERVER_PORT:04X}");
    std::fs::read_to_string(format!("/proc/{pid}/net/{proto}"))
        .unwrap_or_default()
        .lines()
        .skip(1)
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&port_hex) && f[3] == state
        })
}

/// Kills the server and waits until it is gone (an orphan of the lab uid
/// would count as a leftover).
fn stop(lab: &Lab, server: Server) {
    let pid = server.pid;
    drop(server);
    let deadline = Instant::now() + Duration::from_secs(5);
    while lab.is_running(pid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Clients, in the host namespace

/// Runs `f` on a thread that joined the host namespace.
fn in_host<T: Send + 'static>(host: &Container, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = host.netns();
    thread::spawn(move || {
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("joining {path}: {e}"));
        f()
    })
    .join()
    .expect("a client thread panicked")
}

/// What the server says it sees: "ADDRESS PORT".
fn seen(line: &str) -> Result<(String, u16), String> {
    let mut it = line.split_whitespace();
    match (it.next(), it.next().and_then(|p| p.parse().ok())) {
        (Some(a), Some(p)) => Ok((a.to_string(), p)),
        _ => Err(format!("not an address and a port: {line:?}")),
    }
}

/// A TCP connection to `to` (from the address the kernel picks: `to`'s own
/// for a local address), open, and the peer the server saw.
fn tcp_open(to: SocketAddr) -> Result<(TcpStream, String, u16), String> {
    let conn = TcpStream::connect_timeout(&to, Duration::from_secs(3))
        .map_err(|e| format!("connect {to}: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(&conn)
        .read_line(&mut line)
        .map_err(|e| format!("read from {to}: {e}"))?;
    let (addr, port) = seen(&line).map_err(|e| format!("{to}: {e}"))?;
    Ok((conn, addr, port))
}

fn tcp_seen(to: SocketAddr) -> Result<String, String> {
    tcp_open(to).map(|(_, addr, _)| addr)
}

/// A datagram to `to` from a socket bound to `to`'s address, and the peer
/// in the answer (three tries: the first datagram of a flow may be lost).
fn udp_seen(to: SocketAddr) -> Result<(String, u16), String> {
    let sock = UdpSocket::bind(SocketAddr::new(to.ip(), 0)).map_err(|e| format!("bind: {e}"))?;
    udp_ask(&sock, to)
}

fn udp_ask(sock: &UdpSocket, to: SocketAddr) -> Result<(String, u16), String> {
    sock.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 512];
    let mut last = String::new();
    for _ in 0..3 {
        sock.send_to(b"who am i", to)
            .map_err(|e| format!("send to {to}: {e}"))?;
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => return seen(&String::from_utf8_lossy(&buf[..n])),
            Err(e) => last = format!("no answer from {to}: {e}"),
        }
    }
    Err(last)
}

/// The peer the container sees for each (protocol, client → host address)
/// in `cases`, asserted; one line each on stderr.
fn assert_seen(host: &Container, what: &str, cases: &[(&str, &str, u16, &str)]) {
    for &(proto, to, port, want) in cases {
        let to = SocketAddr::new(ip(to), port);
        let tcp = proto == "tcp";
        let got = in_host(host, move || match tcp {
            true => tcp_seen(to),
            false => udp_seen(to).map(|(a, _)| a),
        });
        eprintln!("[seen] {what}: {proto} to {to}: {got:?}");
        match got {
            Ok(addr) => assert_eq!(addr, want, "{what}: {proto} client to {to}"),
            Err(e) => panic!("{what}: {proto} client to {to}: {e}"),
        }
    }
}

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

/// `status --json`'s clientAddresses of the running infra.
fn client_addresses(lab: &Lab) -> Value {
    lab.status()["infra"]["clientAddresses"].clone()
}

/// One lab: the network `conf` (named `net`), one container publishing
/// `mappings()` with the peer-echo server; `check` runs with the host
/// namespace; then DEL, and nothing may be left.
fn with_published_server(name: &str, net: &str, conf: Value, check: impl FnOnce(&Lab, &Container)) {
    if !have_python3() {
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

/// The slirp4netns driver (IPv4 host addresses only), for the README: what
/// its containers see of the same clients.
#[test]
fn slirp4netns_driver_client_addresses() {
    let mut conf = example_conflist();
    outer(&mut conf).insert("portDriver".into(), "slirp4netns".into());
    let mappings_v4 = json!([
        {"hostPort": PORT_V4, "containerPort": SERVER_PORT, "protocol": "tcp"},
        {"hostPort": PORT_V4, "containerPort": SERVER_PORT, "protocol": "udp"},
    ]);
    if !have_python3() {
        return;
    }
    let Some(lab) = Lab::new(lab::binary!(), "client_addr_slirp") else {
        return;
    };
    let t0 = Instant::now();
    lab.write_netconf(lab::NET, &conf);
    let host = host_netns(&lab);
    let c = lab.container();
    cnitool(&lab, &host, "add", lab::NET, &c, &mappings_v4).add_result("ADD (slirp4netns driver)");
    let server = peer_echo(&lab, &c);
    assert_eq!(client_addresses(&lab)["kept"], true, "{}", lab.status());
    assert_seen(
        &host,
        "slirp4netns driver",
        &[
            ("tcp", "127.0.0.1", PORT_V4, "10.0.2.2"),
            ("tcp", HOST_V4, PORT_V4, HOST_V4),
            ("udp", "127.0.0.1", PORT_V4, "10.0.2.2"),
            ("udp", HOST_V4, PORT_V4, HOST_V4),
        ],
    );
    let del = cnitool(&lab, &host, "del", lab::NET, &c, &json!([]));
    assert!(del.ok(), "DEL: {del}");
    stop(&lab, server);
    lab.assert_no_infra("after DEL");
    eprintln!("[timing] client_addr_slirp: {:?}", t0.elapsed());
}

/// ADD through cnitool from the lab's host netns with `script` first on
/// PATH as `iptables-restore` (what a kernel without the CONNMARK target,
/// or a command stuck on a lock, would do: neither is at hand), then the
/// peer-echo server in the container; the host netns, the container, the
/// server.
fn add_with_iptables_restore(
    lab: &Lab,
    script: &str,
    what: &str,
) -> (Container, Container, Server) {
    use std::os::unix::fs::PermissionsExt;
    lab.write_file("fakebin/iptables-restore", script);
    let bin = lab.dir.join("fakebin");
    for p in [bin.clone(), bin.join("iptables-restore")] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let path = format!("{}:{}", bin.display(), lab::LAB_PATH);
    let host = host_netns(lab);
    let c = lab.container();
    let netconf = lab.netconf_dir().display().to_string();
    let cni_path = lab.cni_path();
    let cap_args = json!({ "portMappings": mappings() }).to_string();
    let cnitool_bin = lab.dir.join("tools/cnitool").display().to_string();
    let net_arg = format!("--net={}", host.netns());
    let started = Instant::now();
    let add = lab.exec(
        &[
            ("PATH", &path),
            ("NETCONFPATH", &netconf),
            ("CNI_PATH", &cni_path),
            ("CAP_ARGS", &cap_args),
        ],
        None,
        &[
            "nsenter",
            &net_arg,
            "--",
            &cnitool_bin,
            "add",
            lab::NET,
            &c.netns(),
        ],
    );
    eprintln!("[timing] ADD with {what}: {:?}", started.elapsed());
    add.add_result(&format!("ADD with {what}"));
    let server = peer_echo(lab, &c);
    (host, c, server)
}

/// When the infra cannot route replies to clients' addresses (here an
/// `iptables-restore` that fails as one without the CONNMARK target would:
/// a kernel without it is not at hand), ports work as before, every client
/// seen as the infra's address, and it is said: a warning in infra.log,
/// `status` and `doctor`.
#[test]
fn builtin_driver_without_the_rules_says_so_and_still_forwards() {
    if !have_python3() {
        return;
    }
    let Some(lab) = Lab::new(lab::binary!(), "client_addr_none") else {
        return;
    };
    let t0 = Instant::now();
    lab.write_netconf(lab::NET, &example_conflist());
    let (host, c, server) = add_with_iptables_restore(
        &lab,
        "#!/bin/sh\necho \"iptables-restore: Couldn't load target \\`CONNMARK' (injected by the test)\" >&2\nexit 2\n",
        "a failing iptables-restore",
    );

    let status = client_addresses(&lab);
    assert_eq!(status["kept"], false, "{status}");
    assert!(
        status["error"]
            .as_str()
            .unwrap_or_default()
            .contains("injected by the test"),
        "status does not say why: {status}"
    );
    let text = lab.cli(&["status"]);
    assert!(text.stdout.contains("NOT kept"), "status: {text}");
    let log = std::fs::read_to_string(lab.state_dir().join("infra.log")).unwrap_or_default();
    assert!(
        log.contains("containers will not see every client's own address"),
        "infra.log: {log}"
    );
    let doctor = lab.cli(&["doctor", "--json"]);
    let report = doctor
        .json()
        .unwrap_or_else(|| panic!("doctor --json: {doctor}"));
    let check = report["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["check"] == "client addresses")
        .unwrap_or_else(|| panic!("no client addresses check: {doctor}"))
        .clone();
    assert_eq!(check["ok"], false, "{check}");
    assert!(
        !check["fix"].as_str().unwrap_or_default().is_empty(),
        "{check}"
    );

    assert_seen(
        &host,
        "without the rules",
        &[
            ("tcp", "127.0.0.1", PORT_V4, INFRA),
            ("tcp", HOST_V4, PORT_V4, INFRA),
            ("udp", "127.0.0.1", PORT_V4, INFRA),
            ("tcp", "::1", PORT_DUAL, INFRA),
        ],
    );
    let del = cnitool(&lab, &host, "del", lab::NET, &c, &json!([]));
    assert!(del.ok(), "DEL: {del}");
    stop(&lab, server);
    lab.assert_no_infra("after DEL");
    eprintln!("[timing] client_addr_none: {:?}", t0.elapsed());
}

/// A setup command that hangs (here an `iptables-restore` that never
/// returns, as one stuck on a lock or a module load would) is given up in
/// time: the infra starts within the plugin's wait, ports work as before
/// (every client the infra's address) and `status` says why.
#[test]
fn builtin_driver_with_a_hanging_rule_command_starts_without_it() {
    if !have_python3() {
        return;
    }
    let Some(lab) = Lab::new(lab::binary!(), "client_addr_hang") else {
        return;
    };
    let t0 = Instant::now();
    lab.write_netconf(lab::NET, &example_conflist());
    let (host, c, server) = add_with_iptables_restore(
        &lab,
        "#!/bin/sh\nexec sleep 60\n",
        "a hanging iptables-restore",
    );
    let status = client_addresses(&lab);
    assert_eq!(status["kept"], false, "{status}");
    assert!(
        status["error"]
            .as_str()
            .unwrap_or_default()
            .contains("still running"),
        "status does not say why: {status}"
    );
    assert_seen(
        &host,
        "with a hanging rule command",
        &[
            ("tcp", "127.0.0.1", PORT_V4, INFRA),
            ("udp", HOST_V4, PORT_V4, INFRA),
        ],
    );
    let del = cnitool(&lab, &host, "del", lab::NET, &c, &json!([]));
    assert!(del.ok(), "DEL: {del}");
    stop(&lab, server);
    lab.assert_no_infra("after DEL");
    eprintln!("[timing] client_addr_hang: {:?}", t0.elapsed());
}

/// One iperf3 stream through a published port from 127.0.0.1, with the
/// client's address kept and without (the rules refused, as in the test
/// above), alternately in two infras at once, so that both see the same
/// machine: what keeping the address costs. A figure, not a check:
/// `cargo test --test client_address -- --ignored --nocapture throughput`.
#[test]
#[ignore]
fn throughput_with_and_without_client_addresses() {
    let (Some(kept), Some(plain)) = (
        Lab::with_example_net(lab::binary!(), "client_addr_iperf_kept"),
        Lab::with_example_net(lab::binary!(), "client_addr_iperf_plain"),
    ) else {
        return;
    };
    let fake_restore = |lab: &Lab| -> String {
        lab.write_file("fakebin/iptables-restore", "#!/bin/sh\nexit 2\n");
        use std::os::unix::fs::PermissionsExt;
        let bin = lab.dir.join("fakebin");
        for p in [bin.clone(), bin.join("iptables-restore")] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        format!("{}:{}", bin.display(), lab::LAB_PATH)
    };
    let mut ports = Vec::new();
    let mut servers = Vec::new();
    let mut containers = Vec::new();
    for (lab, path) in [(&kept, None), (&plain, Some(fake_restore(&plain)))] {
        let c = lab.container();
        let port = lab::free_tcp_port();
        let cap = json!({"portMappings": [
            {"hostPort": port, "containerPort": 5201, "protocol": "tcp", "hostIP": "127.0.0.1"}
        ]})
        .to_string();
        let mut env = vec![("CAP_ARGS", cap.as_str())];
        if let Some(p) = &path {
            env.push(("PATH", p.as_str()));
        }
        lab.cnitool_env(&env, "add", lab::NET, &c.netns())
            .add_result("ADD for iperf3");
        let out = lab.in_netns(
            &c,
            &[
                "sh",
                "-c",
                "iperf3 -s -p 5201 </dev/null >/dev/null 2>&1 & echo $!",
            ],
        );
        servers.push(Server {
            pid: out.stdout.trim().parse().expect("iperf3's pid"),
        });
        ports.push(port);
        containers.push(c);
    }
    assert_eq!(client_addresses(&kept)["kept"], true);
    assert_eq!(client_addresses(&plain)["kept"], false);
    thread::sleep(Duration::from_millis(500));
    let mut figures: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..3 {
        for (i, port) in ports.iter().enumerate() {
            let out = std::process::Command::new("iperf3")
                .args(["-c", "127.0.0.1", "-p", &port.to_string(), "-t", "4", "-J"])
                .output()
                .expect("iperf3 -c");
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let bps = v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap_or(0.0);
            figures[i].push(bps / 1e9);
        }
    }
    eprintln!(
        "[throughput] one stream, Gbit/s: client address kept {:.2?}, not kept {:.2?}",
        figures[0], figures[1]
    );
    for (lab, c) in [(&kept, &containers[0]), (&plain, &containers[1])] {
        let del = lab.cnitool("del", lab::NET, &c.netns());
        assert!(del.ok(), "DEL: {del}");
    }
    drop(servers);
}
