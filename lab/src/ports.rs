//! Published ports as the ports tests drive them: host ports free for TCP
//! and UDP, `portMappings` entries, ADD and DEL through cnitool or our
//! binary with a port driver, servers inside containers (`busybox httpd`
//! for TCP, a small python3 echo server for UDP) and the test process as
//! their client on the host (the lab's session shares the machine's network
//! namespace, so the host side of a forward is ours).

use crate::net::http_get;
use crate::{example_conflist, outer, plugin_stdin, Container, Lab, Out, Server, NET};
use serde_json::{json, Value};
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A UDP echo server: answers every datagram with a prefix and the datagram.
pub const UDP_ECHO: &str = r#"import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
prefix = sys.argv[2].encode()
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(prefix + data, peer)
"#;

// ---------------------------------------------------------------------------
// Host ports

/// A host port from a range below the ephemeral one, free for TCP and UDP
/// on every address (bind-tested), never handed out twice by this process.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const BASE: u32 = 21_000;
    const SPAN: u32 = 11_000;
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (BASE + (start + n * 37) % SPAN) as u16;
        if port_is_free(port) {
            return port;
        }
    }
    panic!("no free host port in {BASE}..{}", BASE + SPAN);
}

/// Whether TCP and UDP can be bound on `port` on 0.0.0.0 and [::] (each
/// tried alone; a machine without IPv6 only checks IPv4).
pub fn port_is_free(port: u16) -> bool {
    let any4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port);
    let any6 = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port);
    // Only "in use" counts: no IPv6 on the machine is no reason to skip.
    let usable = |r: std::io::Result<()>| !matches!(r, Err(e) if e.kind() == ErrorKind::AddrInUse);
    usable(TcpListener::bind(any4).map(drop))
        && usable(UdpSocket::bind(any4).map(drop))
        && usable(TcpListener::bind(any6).map(drop))
        && usable(UdpSocket::bind(any6).map(drop))
}

/// Asserts that TCP (and UDP when `udp`) can be bound on 0.0.0.0:`port`.
pub fn assert_port_free(port: u16, udp: bool, when: &str) {
    let addr = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port);
    if let Err(e) = TcpListener::bind(addr) {
        panic!("{when}: TCP port {port} is not free: {e}\n{}", ss(port));
    }
    if udp {
        if let Err(e) = UdpSocket::bind(addr) {
            panic!("{when}: UDP port {port} is not free: {e}\n{}", ss(port));
        }
    }
}

/// Who holds `port` (ss), for messages.
pub fn ss(port: u16) -> String {
    let filter = format!("sport = :{port}");
    std::process::Command::new("ss")
        .args(["-Hanptu", &filter])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Mappings and calls

pub fn mapping(proto: &str, host_port: u16, container_port: u16, host_ip: Option<&str>) -> Value {
    let mut m = json!({"hostPort": host_port, "containerPort": container_port, "protocol": proto});
    if let Some(ip) = host_ip {
        m["hostIP"] = ip.into();
    }
    m
}

pub fn tcp(host_port: u16, container_port: u16) -> Value {
    mapping("tcp", host_port, container_port, Some("127.0.0.1"))
}

pub fn udp(host_port: u16, container_port: u16) -> Value {
    mapping("udp", host_port, container_port, Some("127.0.0.1"))
}

/// The example network with `portDriver`.
pub fn conf(driver: &str) -> Value {
    let mut conf = example_conflist();
    outer(&mut conf).insert("portDriver".into(), driver.into());
    conf
}

/// A lab with the example network using `driver`; `binary` is the plugin
/// under test (`lab::binary!()`).
pub fn lab_for(binary: &Path, name: &str, driver: &str) -> Option<Lab> {
    let lab = Lab::new(binary, &format!("{name}_{driver}"))?;
    lab.write_netconf(NET, &conf(driver));
    Some(lab)
}

/// `cnitool add` publishing `mappings`; asserts success.
pub fn add(lab: &Lab, c: &Container, mappings: &[Value]) -> Value {
    add_raw(lab, c, mappings).add_result(&format!("ADD {} publishing {mappings:?}", c.netns()))
}

pub fn add_raw(lab: &Lab, c: &Container, mappings: &[Value]) -> Out {
    let cap_args = json!({ "portMappings": mappings }).to_string();
    lab.cnitool_env(&[("CAP_ARGS", &cap_args)], "add", NET, &c.netns())
}

pub fn del(lab: &Lab, c: &Container) {
    let out = lab.cnitool("del", NET, &c.netns());
    assert!(out.ok(), "DEL {}: {out}", c.netns());
}

/// Our binary called as a runtime would, ADD with `portMappings` in
/// `runtimeConfig` (the plugin declares the capability).
pub fn plugin_add(lab: &Lab, driver: &str, id: &str, c: &Container, mappings: &[Value]) -> Out {
    let mut stdin = plugin_stdin(&conf(driver));
    stdin["runtimeConfig"] = json!({ "portMappings": mappings });
    lab.plugin(&lab.plugin_env("ADD", id, &c.netns()), &stdin.to_string())
}

/// The CNI error of a failed call.
pub fn cni_error(out: &Out, what: &str) -> crate::CniError {
    assert!(!out.ok(), "{what} succeeded: {out}");
    let err = out
        .cni_error()
        .unwrap_or_else(|| panic!("{what}: no CNI error object on stdout: {out}"));
    eprintln!("{what}: code {}: {}", err.code, err.msg);
    err
}

/// Every published port listed by `status --json`.
pub fn status_ports(lab: &Lab) -> Vec<String> {
    let status = lab.status();
    status["attachments"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|a| a["ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p.as_str().map(str::to_string))
        .collect()
}

// ---------------------------------------------------------------------------
// Servers inside containers

/// Kills the servers and waits (up to 5 s) until they are reaped: orphans
/// of the lab uid, they would count as an infra's leftovers.
pub fn stop_all(lab: &Lab, servers: Vec<Server>) {
    let pids: Vec<u32> = servers.iter().map(|s| s.pid).collect();
    drop(servers);
    let deadline = Instant::now() + Duration::from_secs(5);
    let present = |p: &u32| {
        std::fs::metadata(format!("/proc/{p}"))
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == lab.uid)
            .unwrap_or(false)
    };
    while pids.iter().any(present) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` is a live (not zombie) process of the lab uid.
pub fn lab_process(lab: &Lab, pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
    };
    field("Uid:") == Some(lab.uid.to_string()) && field("State:").is_some_and(|s| s != "Z")
}

/// Starts `argv` in the background inside `c`'s netns, as the lab user, and
/// waits until it listens on `proto` port `port` there.
pub fn start_server(lab: &Lab, c: &Container, proto: &str, port: u16, argv: &[&str]) -> Server {
    let pid = lab.start_in_netns(c, argv, &format!("{argv:?} in {}", c.netns()));
    let server = Server { pid };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listening(pid, proto, port) {
        assert!(
            lab_process(lab, pid),
            "{argv:?} in {} exited or never started (pid {pid})",
            c.netns()
        );
        assert!(
            Instant::now() < deadline,
            "{argv:?} in {} does not listen on {proto} port {port}",
            c.netns()
        );
        thread::sleep(Duration::from_millis(20));
    }
    server
}

/// Whether `pid`'s netns has a socket listening (TCP) or bound (UDP) on
/// `port`, from /proc/PID/net/{tcp,tcp6,udp,udp6}.
pub fn listening(pid: u32, proto: &str, port: u16) -> bool {
    let want_state = if proto == "tcp" { "0A" } else { "07" };
    let port_hex = format!(":{port:04X}");
    [proto.to_string(), format!("{proto}6")].iter().any(|f| {
        std::fs::read_to_string(format!("/proc/{pid}/net/{f}"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                fields.len() > 3 && fields[1].ends_with(&port_hex) && fields[3] == want_state
            })
    })
}

/// busybox httpd on `port` in `c`, serving `body` as its index page.
pub fn httpd(lab: &Lab, c: &Container, port: u16, body: &str) -> Server {
    let rel = format!("www-{}-{port}", c.pid);
    lab.write_file(&format!("{rel}/index.html"), body);
    let dir = lab.dir.join(&rel).display().to_string();
    let port_arg = port.to_string();
    start_server(
        lab,
        c,
        "tcp",
        port,
        &["busybox", "httpd", "-f", "-p", &port_arg, "-h", &dir],
    )
}

/// The python3 UDP echo server on `port` in `c`, answering `prefix` + data.
pub fn udp_echo_server(lab: &Lab, c: &Container, port: u16, prefix: &str) -> Server {
    let script = lab.script("udp-echo.py", UDP_ECHO);
    let port_arg = port.to_string();
    start_server(
        lab,
        c,
        "udp",
        port,
        &["python3", &script, &port_arg, prefix],
    )
}

// ---------------------------------------------------------------------------
// Clients on the host

/// Asserts that GET http://`addr`/ answers `body`.
pub fn assert_serves(addr: SocketAddr, body: &str, what: &str) {
    match http_get(addr) {
        Ok(got) => assert_eq!(got, body, "{what}: GET http://{addr}/"),
        Err(e) => panic!("{what}: {e}\n{}", ss(addr.port())),
    }
}

/// Sends `payload` to `addr` and returns the answer (three tries, 1 s each).
pub fn udp_roundtrip(addr: SocketAddr, payload: &str) -> Result<String, String> {
    let local = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0);
    let sock = UdpSocket::bind(local).map_err(|e| format!("bind: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 2048];
    let mut last = String::new();
    for _ in 0..3 {
        sock.send_to(payload.as_bytes(), addr)
            .map_err(|e| format!("send to {addr}: {e}"))?;
        match sock.recv_from(&mut buf) {
            Ok((n, from)) if from == addr => {
                return Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
            }
            Ok((_, from)) => last = format!("answer from {from}, not {addr}"),
            Err(e) => last = format!("no answer from {addr}: {e}"),
        }
    }
    Err(last)
}

pub fn assert_echoes(addr: SocketAddr, prefix: &str, what: &str) {
    let payload = format!("ping {}", addr.port());
    match udp_roundtrip(addr, &payload) {
        Ok(got) => assert_eq!(got, format!("{prefix}{payload}"), "{what}: UDP {addr}"),
        Err(e) => panic!("{what}: {e}\n{}", ss(addr.port())),
    }
}

pub fn at(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}
