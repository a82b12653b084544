//! The client-address lab: the session's own network namespace standing
//! in for the host (as rootless podman's rootless-netns is), with addresses
//! on `lo` for clients that are not loopback; cnitool run there, a python3
//! server in the container answering every TCP connection and UDP datagram
//! with the peer address and port it sees, and clients as threads of the
//! test that join the host namespace.

use crate::{Container, Lab, Out, Server};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

/// Answers each TCP connection and UDP datagram with "ADDRESS PORT\n" of
/// the peer as seen here; a TCP connection stays open until the client
/// closes it (so several can be open at once). IPv6 sockets are IPv6 only.
pub const PEER_ECHO: &str = r#"import socket, sys, threading
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
pub const SERVER_PORT: u16 = 7000;
/// Host ports: the lab's host namespace is the test's own, nothing else
/// binds there.
pub const PORT_V4: u16 = 8004;
pub const PORT_DUAL: u16 = 8006;
/// Published to a container port where nothing listens.
pub const PORT_CLOSED: u16 = 8009;
/// The host namespace's addresses that are not loopback.
pub const HOST_V4: &str = "198.51.100.7";
pub const HOST_V6: &str = "2001:db8::7";
/// And two inside the containers' subnets (of the example networks), as a
/// host whose network overlaps them has: a container would look for them
/// on its own link, so they are seen as the infra's address.
pub const OVERLAP_V4: &str = "10.89.0.200";
pub const OVERLAP_V6: &str = "fd00:89::200";
/// The infra's own address: what a container saw of every client before.
pub const INFRA: &str = "10.0.2.100";

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("an IP address")
}

// ---------------------------------------------------------------------------
// The lab

/// The session's network namespace standing in for the host: `lo` up, with
/// HOST_V4, HOST_V6, OVERLAP_V4 and OVERLAP_V6 on it, and an "external"
/// link (a veth pair, both ends here) with the default routes, which pasta
/// needs to start.
pub fn host_netns(lab: &Lab) -> Container {
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
pub fn cnitool(
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
pub fn mappings() -> Value {
    let m = |proto: &str, port: u16, host_ip: &str| json!({"hostPort": port, "containerPort": SERVER_PORT, "protocol": proto, "hostIP": host_ip});
    json!([
        m("tcp", PORT_V4, ""),
        m("udp", PORT_V4, ""),
        m("tcp", PORT_DUAL, "::"),
        m("udp", PORT_DUAL, "::"),
        {"hostPort": PORT_CLOSED, "containerPort": SERVER_PORT + 1, "protocol": "tcp", "hostIP": "::"},
    ])
}

/// Starts the peer-echo server in `c` and waits until it listens (TCP and
/// UDP) on SERVER_PORT.
pub fn peer_echo(lab: &Lab, c: &Container) -> Server {
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
pub fn bound(pid: u32, proto: &str, state: &str) -> bool {
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
pub fn stop(lab: &Lab, server: Server) {
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
pub fn in_host<T: Send + 'static>(host: &Container, f: impl FnOnce() -> T + Send + 'static) -> T {
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
pub fn seen(line: &str) -> Result<(String, u16), String> {
    let mut it = line.split_whitespace();
    match (it.next(), it.next().and_then(|p| p.parse().ok())) {
        (Some(a), Some(p)) => Ok((a.to_string(), p)),
        _ => Err(format!("not an address and a port: {line:?}")),
    }
}

/// A TCP connection to `to` (from the address the kernel picks: `to`'s own
/// for a local address), open, and the peer the server saw.
pub fn tcp_open(to: SocketAddr) -> Result<(TcpStream, String, u16), String> {
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

pub fn tcp_seen(to: SocketAddr) -> Result<String, String> {
    tcp_open(to).map(|(_, addr, _)| addr)
}

/// A datagram to `to` from a socket bound to `to`'s address, and the peer
/// in the answer (three tries: the first datagram of a flow may be lost).
pub fn udp_seen(to: SocketAddr) -> Result<(String, u16), String> {
    let sock = UdpSocket::bind(SocketAddr::new(to.ip(), 0)).map_err(|e| format!("bind: {e}"))?;
    udp_ask(&sock, to)
}

pub fn udp_ask(sock: &UdpSocket, to: SocketAddr) -> Result<(String, u16), String> {
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
pub fn assert_seen(host: &Container, what: &str, cases: &[(&str, &str, u16, &str)]) {
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
pub fn kept_cases(v6_inside: bool) -> Vec<(&'static str, &'static str, u16, &'static str)> {
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
pub fn assert_first_datagram_answered(host: &Container, to: &str, port: u16, want: &str) {
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
pub fn assert_closed_port_ends_at_once(host: &Container) {
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
pub fn assert_loopback_clients_at_once(host: &Container, n: usize) {
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
pub fn restart_slirp4netns(lab: &Lab) {
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
pub fn client_addresses(lab: &Lab) -> Value {
    lab.status()["infra"]["clientAddresses"].clone()
}
