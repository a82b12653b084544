//! The client-address lab: the session's own network namespace standing
//! in for the host (as rootless podman's rootless-netns is), with addresses
//! on `lo` for clients that are not loopback; cnitool run there, a python3
//! server in the container answering every TCP connection and UDP datagram
//! with the peer address and port it sees, and clients as threads of the
//! test that join the host namespace.

use crate::{Container, Lab, Out, Server};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
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
    let script = lab.script("peer-echo.py", PEER_ECHO);
    let port = SERVER_PORT.to_string();
    let pid = lab.start_in_netns(c, &["python3", &script, &port], "the peer-echo server");
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

/// `status --json`'s clientAddresses of the running infra.
pub fn client_addresses(lab: &Lab) -> Value {
    lab.status()["infra"]["clientAddresses"].clone()
}
