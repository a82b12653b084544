//! Published ports: `runtimeConfig.portMappings` through both port drivers
//! (`builtin`, `slirp4netns`), with real servers inside containers and the
//! test process as the client on the host (the lab's session shares the
//! machine's network namespace, so the host side of a forward is ours).
//!
//! Servers run inside container netns as the lab user: `busybox httpd` for
//! TCP, a small python3 echo server for UDP. Host ports are high, unusual
//! and bind-tested first, so parallel tests do not collide.

use lab::net::http_get;
use lab::{
    example_conflist, host_global_ipv4, outer, plugin_stdin, result_ipv4, Container, HostServer,
    Lab, Out, Server, NET, SLIRP_HOST,
};
use serde_json::{json, Value};
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// The error code of a host port that cannot be had.
const HOST_PORT_CODE: u64 = 107;
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A UDP echo server: answers every datagram with a prefix and the datagram.
const UDP_ECHO: &str = r#"import socket, sys
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
fn free_port() -> u16 {
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
fn port_is_free(port: u16) -> bool {
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
fn assert_port_free(port: u16, udp: bool, when: &str) {
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
fn ss(port: u16) -> String {
    let filter = format!("sport = :{port}");
    std::process::Command::new("ss")
        .args(["-Hanptu", &filter])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Mappings and calls

fn mapping(proto: &str, host_port: u16, container_port: u16, host_ip: Option<&str>) -> Value {
    let mut m = json!({"hostPort": host_port, "containerPort": container_port, "protocol": proto});
    if let Some(ip) = host_ip {
        m["hostIP"] = ip.into();
    }
    m
}

fn tcp(host_port: u16, container_port: u16) -> Value {
    mapping("tcp", host_port, container_port, Some("127.0.0.1"))
}

fn udp(host_port: u16, container_port: u16) -> Value {
    mapping("udp", host_port, container_port, Some("127.0.0.1"))
}

/// The example network with `portDriver`.
fn conf(driver: &str) -> Value {
    let mut conf = example_conflist();
    outer(&mut conf).insert("portDriver".into(), driver.into());
    conf
}

/// A lab with the example network using `driver`.
fn lab_for(name: &str, driver: &str) -> Option<Lab> {
    let lab = Lab::new(lab::binary!(), &format!("{name}_{driver}"))?;
    lab.write_netconf(NET, &conf(driver));
    Some(lab)
}

/// `cnitool add` publishing `mappings`; asserts success.
fn add(lab: &Lab, c: &Container, mappings: &[Value]) -> Value {
    add_raw(lab, c, mappings).add_result(&format!("ADD {} publishing {mappings:?}", c.netns()))
}

fn add_raw(lab: &Lab, c: &Container, mappings: &[Value]) -> Out {
    let cap_args = json!({ "portMappings": mappings }).to_string();
    lab.cnitool_env(&[("CAP_ARGS", &cap_args)], "add", NET, &c.netns())
}

fn del(lab: &Lab, c: &Container) {
    let out = lab.cnitool("del", NET, &c.netns());
    assert!(out.ok(), "DEL {}: {out}", c.netns());
}

/// Our binary called as a runtime would, ADD with `portMappings` in
/// `runtimeConfig` (the plugin declares the capability).
fn plugin_add(lab: &Lab, driver: &str, id: &str, c: &Container, mappings: &[Value]) -> Out {
    let mut stdin = plugin_stdin(&conf(driver));
    stdin["runtimeConfig"] = json!({ "portMappings": mappings });
    lab.plugin(&lab.plugin_env("ADD", id, &c.netns()), &stdin.to_string())
}

/// The CNI error of a failed call.
fn cni_error(out: &Out, what: &str) -> lab::CniError {
    assert!(!out.ok(), "{what} succeeded: {out}");
    let err = out
        .cni_error()
        .unwrap_or_else(|| panic!("{what}: no CNI error object on stdout: {out}"));
    eprintln!("{what}: code {}: {}", err.code, err.msg);
    err
}

/// Every published port listed by `status --json`.
fn status_ports(lab: &Lab) -> Vec<String> {
    let status = lab.status();
    status["attachments"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|a| a["ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p.as_str().map(str::to_string))
        .collect()
}

fn slirp_pid(lab: &Lab) -> Option<u32> {
    lab.status()["infra"]["slirp4netns"]["pid"]
        .as_u64()
        .map(|p| p as u32)
}

// ---------------------------------------------------------------------------
// Servers inside containers

/// Kills the servers and waits (up to 5 s) until they are reaped: orphans
/// of the lab uid, they would count as an infra's leftovers.
fn stop_all(lab: &Lab, servers: Vec<Server>) {
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
fn lab_process(lab: &Lab, pid: u32) -> bool {
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
fn start_server(lab: &Lab, c: &Container, proto: &str, port: u16, argv: &[&str]) -> Server {
    let mut sh = vec![
        "sh",
        "-c",
        r#""$@" </dev/null >/dev/null 2>&1 & echo $!"#,
        "sh",
    ];
    sh.extend_from_slice(argv);
    let out = lab.in_netns(c, &sh);
    assert!(out.ok(), "starting {argv:?} in {}: {out}", c.netns());
    let pid: u32 = out
        .stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no pid from starting {argv:?}: {out}"));
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
fn listening(pid: u32, proto: &str, port: u16) -> bool {
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
fn httpd(lab: &Lab, c: &Container, port: u16, body: &str) -> Server {
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
fn udp_echo_server(lab: &Lab, c: &Container, port: u16, prefix: &str) -> Server {
    let script = lab.dir.join("udp-echo.py");
    if !script.exists() {
        lab.write_file("udp-echo.py", UDP_ECHO);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644))
            .expect("chmod udp-echo.py");
    }
    let script = script.display().to_string();
    let port_arg = port.to_string();
    start_server(
        lab,
        c,
        "udp",
        port,
        &["python3", &script, &port_arg, prefix],
    )
}

/// Whether the lab can run the UDP echo server; with CI=true it must.
fn have_python3() -> bool {
    let found = Path::new("/usr/bin/python3").exists();
    if !found {
        assert!(
            !lab::in_ci(),
            "python3 (/usr/bin/python3) is needed for the UDP tests (CI=true)"
        );
        eprintln!("no /usr/bin/python3: UDP checks skipped");
    }
    found
}

// ---------------------------------------------------------------------------
// Clients on the host

/// Asserts that GET http://`addr`/ answers `body`.
fn assert_serves(addr: SocketAddr, body: &str, what: &str) {
    match http_get(addr) {
        Ok(got) => assert_eq!(got, body, "{what}: GET http://{addr}/"),
        Err(e) => panic!("{what}: {e}\n{}", ss(addr.port())),
    }
}

/// Sends `payload` to `addr` and returns the answer (three tries, 1 s each).
fn udp_roundtrip(addr: SocketAddr, payload: &str) -> Result<String, String> {
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

fn assert_echoes(addr: SocketAddr, prefix: &str, what: &str) {
    let payload = format!("ping {}", addr.port());
    match udp_roundtrip(addr, &payload) {
        Ok(got) => assert_eq!(got, format!("{prefix}{payload}"), "{what}: UDP {addr}"),
        Err(e) => panic!("{what}: {e}\n{}", ss(addr.port())),
    }
}

/// Polls `f` every 50 ms until it is Ok or `limit` has passed; the time it took.
fn eventually<T>(
    limit: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(_) => return Ok(start.elapsed()),
            Err(e) if start.elapsed() >= limit => {
                return Err(format!("still failing after {limit:?}: {e}"))
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn at(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

// ---------------------------------------------------------------------------
// 1 + 3: TCP and UDP through each driver, several mappings on one container,
// the same container port on two containers; ports free again after DEL.

fn publish_tcp_udp_and_free_on_del(driver: &str) {
    let Some(lab) = lab_for("p_basic", driver) else {
        return;
    };
    let t0 = Instant::now();
    let with_udp = have_python3();
    let (c1, c2) = (lab.container(), lab.container());
    let (p_web, p_alt, p_udp, p_web2) = (free_port(), free_port(), free_port(), free_port());

    // c1: two TCP mappings (to two servers) and one UDP mapping.
    let mut m1 = vec![tcp(p_web, 80), mapping("tcp", p_alt, 8080, None)];
    if with_udp {
        m1.push(udp(p_udp, 5353));
    }
    let r1 = add(&lab, &c1, &m1);
    assert!(result_ipv4(&r1).is_some(), "no IPv4 in ADD result: {r1}");
    // c2: the same container port 80 behind another host port.
    add(&lab, &c2, &[tcp(p_web2, 80)]);

    let mut servers = vec![
        httpd(&lab, &c1, 80, "container one, port 80\n"),
        httpd(&lab, &c1, 8080, "container one, port 8080\n"),
        httpd(&lab, &c2, 80, "container two, port 80\n"),
    ];
    servers.extend(with_udp.then(|| udp_echo_server(&lab, &c1, 5353, "one:")));

    let what = format!("{driver}, before DEL");
    assert_serves(at(LOCALHOST, p_web), "container one, port 80\n", &what);
    assert_serves(at(LOCALHOST, p_alt), "container one, port 8080\n", &what);
    assert_serves(at(LOCALHOST, p_web2), "container two, port 80\n", &what);
    if with_udp {
        assert_echoes(at(LOCALHOST, p_udp), "one:", &what);
    }
    // Several connections in a row, and a repeated datagram flow.
    for _ in 0..5 {
        assert_serves(at(LOCALHOST, p_web2), "container two, port 80\n", &what);
    }
    if with_udp {
        assert_echoes(at(LOCALHOST, p_udp), "one:", &what);
    }

    let ports = status_ports(&lab);
    for p in [p_web, p_alt, p_web2] {
        assert!(
            ports.iter().any(|s| s.contains(&format!(":{p}/tcp"))),
            "status does not list tcp port {p}: {ports:?}"
        );
    }

    // DEL of c1 with the infra still running (c2): its ports are closed.
    del(&lab, &c1);
    let what = format!("{driver}, after DEL of container one");
    assert_port_free(p_web, false, &what);
    assert_port_free(p_alt, false, &what);
    if with_udp {
        assert_port_free(p_udp, true, &what);
    }
    assert!(
        http_get(at(LOCALHOST, p_web)).is_err(),
        "{what}: port {p_web} still answers"
    );
    assert_serves(at(LOCALHOST, p_web2), "container two, port 80\n", &what);

    del(&lab, &c2);
    assert_port_free(p_web2, true, &format!("{driver}, after the last DEL"));
    stop_all(&lab, servers);
    lab.assert_no_infra(&format!("{driver}, after the last DEL"));
    eprintln!("[timing] ports basic ({driver}): {:?}", t0.elapsed());
}

#[test]
fn publish_tcp_udp_and_free_on_del_builtin() {
    publish_tcp_udp_and_free_on_del("builtin");
}

#[test]
fn publish_tcp_udp_and_free_on_del_slirp4netns() {
    publish_tcp_udp_and_free_on_del("slirp4netns");
}

// ---------------------------------------------------------------------------
// 2: hostIP

fn host_ip(driver: &str) {
    let Some(lab) = lab_for("p_hostip", driver) else {
        return;
    };
    let t0 = Instant::now();
    let c = lab.container();
    let (p_lo, p_any, p_empty, p_v6any) = (free_port(), free_port(), free_port(), free_port());
    add(
        &lab,
        &c,
        &[
            mapping("tcp", p_lo, 80, Some("127.0.0.1")),
            mapping("tcp", p_any, 80, Some("0.0.0.0")),
            mapping("tcp", p_empty, 80, Some("")),
            mapping("tcp", p_v6any, 80, Some("::")),
        ],
    );
    let body = format!("hostIP test, {driver}\n");
    let web = httpd(&lab, &c, 80, &body);

    assert_serves(at(LOCALHOST, p_lo), &body, "hostIP 127.0.0.1 on 127.0.0.1");
    assert_serves(at(LOCALHOST, p_any), &body, "hostIP 0.0.0.0 on 127.0.0.1");
    assert_serves(at(LOCALHOST, p_empty), &body, "hostIP \"\" on 127.0.0.1");
    match driver {
        // [::]: a dual-stack listener; [::1] reaches it.
        "builtin" => assert_serves(
            at(Ipv6Addr::LOCALHOST.into(), p_v6any),
            &body,
            "hostIP :: on [::1]",
        ),
        // slirp4netns takes IPv4 only: "::" means 0.0.0.0.
        _ => assert_serves(at(LOCALHOST, p_v6any), &body, "hostIP :: on 127.0.0.1"),
    }

    match host_global_ipv4() {
        Some(ip) => {
            let ip: IpAddr = ip.parse().expect("host_global_ipv4 gives an address");
            match http_get(at(ip, p_lo)) {
                Err(e) => eprintln!("hostIP 127.0.0.1 not reachable on {ip}, as it should: {e}"),
                Ok(got) => panic!("hostIP 127.0.0.1 answered on {ip}:{p_lo}: {got:?}"),
            }
            assert_serves(at(ip, p_any), &body, "hostIP 0.0.0.0 on a global address");
            assert_serves(at(ip, p_empty), &body, "hostIP \"\" on a global address");
        }
        None => eprintln!("no global IPv4 on this host: the not-on-other-addresses check skipped"),
    }

    if driver == "slirp4netns" {
        // An IPv6 host address other than "::" is refused, naming it, and
        // leaves nothing: the ports of the failed ADD are free again.
        let c2 = lab.container();
        let p_ok = free_port();
        let out = plugin_add(
            &lab,
            driver,
            "v6-host-ip",
            &c2,
            &[
                mapping("tcp", p_ok, 80, None),
                mapping("tcp", free_port(), 80, Some("::1")),
            ],
        );
        let err = cni_error(&out, "ADD with hostIP ::1 on slirp4netns");
        assert_eq!(err.code, 7, "hostIP ::1 on slirp4netns: {out}");
        assert!(err.mentions("::1"), "the error does not name ::1: {out}");
        assert_port_free(p_ok, false, "after the refused ADD");
        assert_eq!(
            lab.attachment_files().len(),
            1,
            "records after the refused ADD"
        );
        assert_eq!(
            lab.lease_files(NET).len(),
            1,
            "leases after the refused ADD"
        );
    }

    del(&lab, &c);
    for p in [p_lo, p_any, p_empty, p_v6any] {
        assert_port_free(p, false, &format!("{driver}: after DEL"));
    }
    stop_all(&lab, vec![web]);
    lab.assert_no_infra(&format!("{driver}: after DEL"));
    eprintln!("[timing] ports hostIP ({driver}): {:?}", t0.elapsed());
}

#[test]
fn host_ip_builtin() {
    host_ip("builtin");
}

#[test]
fn host_ip_slirp4netns() {
    host_ip("slirp4netns");
}

// ---------------------------------------------------------------------------
// 4: a host port in use

fn port_in_use(driver: &str) {
    let Some(lab) = lab_for("p_conflict", driver) else {
        return;
    };
    let t0 = Instant::now();
    let (c1, c2) = (lab.container(), lab.container());
    let taken = free_port();
    let holder = TcpListener::bind((Ipv4Addr::UNSPECIFIED, taken)).expect("holding a port");

    // No infra yet: the ADD that would start it fails and leaves nothing.
    let out = plugin_add(&lab, driver, "conflict-fresh", &c1, &[tcp(taken, 80)]);
    let err = cni_error(&out, &format!("ADD publishing the held port {taken}"));
    assert_eq!(err.code, HOST_PORT_CODE, "{out}");
    assert!(
        err.mentions(&taken.to_string()),
        "the error does not name port {taken}: {out}"
    );
    lab.assert_no_infra("after the conflicting ADD that started the infra");
    assert!(
        lab.lease_files(NET).is_empty(),
        "leases left: {:?}",
        lab.lease_files(NET)
    );
    assert_eq!(lab.links(&c1), vec!["lo"], "links of the container");
    // Through cnitool, the runtime's user reads the port in the message.
    let out = add_raw(&lab, &c1, &[tcp(taken, 80)]);
    assert!(!out.ok(), "cnitool ADD publishing the held port: {out}");
    assert!(
        out.stderr.contains(&taken.to_string()) || out.stdout.contains(&taken.to_string()),
        "cnitool's message does not name port {taken}: {out}"
    );
    lab.assert_no_infra("after the conflicting cnitool ADD");

    // A live infra with another container publishing a port.
    let p2 = free_port();
    add(&lab, &c2, &[tcp(p2, 80)]);
    let web2 = httpd(&lab, &c2, 80, "the bystander\n");
    assert_serves(
        at(LOCALHOST, p2),
        "the bystander\n",
        "c2 before the conflict",
    );
    let sandbox = lab.sandbox_pid();
    let leases = lab.lease_files(NET);
    assert_eq!(leases.len(), 1, "leases with c2 attached: {leases:?}");

    // The free port before the held one is opened, then closed again.
    let p_first = free_port();
    let out = plugin_add(
        &lab,
        driver,
        "conflict-live",
        &c1,
        &[tcp(p_first, 80), tcp(taken, 80)],
    );
    let err = cni_error(&out, &format!("ADD publishing the held port {taken}"));
    assert_eq!(err.code, HOST_PORT_CODE, "{out}");
    assert!(
        err.mentions(&taken.to_string()),
        "the error does not name port {taken}: {out}"
    );
    assert_port_free(p_first, false, "the other port of the failed ADD");
    // A held UDP port, too.
    let udp_taken = free_port();
    let udp_holder =
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, udp_taken)).expect("holding a UDP port");
    let out = plugin_add(&lab, driver, "conflict-udp", &c1, &[udp(udp_taken, 53)]);
    let err = cni_error(
        &out,
        &format!("ADD publishing the held UDP port {udp_taken}"),
    );
    assert_eq!(err.code, HOST_PORT_CODE, "{out}");
    assert!(
        err.mentions(&udp_taken.to_string()),
        "the error does not name port {udp_taken}: {out}"
    );

    // Nothing of the failed ADDs is left; the bystander is unaffected.
    assert_eq!(lab.sandbox_pid(), sandbox, "the infra was replaced");
    assert_eq!(
        lab.attachment_files().len(),
        1,
        "records: {:?}",
        lab.attachment_files()
    );
    assert_eq!(lab.lease_files(NET), leases, "leases after the failed ADDs");
    assert_eq!(lab.links(&c1), vec!["lo"], "links of the container");
    assert_serves(
        at(LOCALHOST, p2),
        "the bystander\n",
        "c2 after the conflicts",
    );
    lab.assert_ping(&c2, lab::GATEWAY, "c2 -> gateway after the conflicts");

    // Once the port is let go, the same container gets it.
    drop(holder);
    drop(udp_holder);
    add(&lab, &c1, &[tcp(taken, 80)]);
    let web1 = httpd(&lab, &c1, 80, "now it works\n");
    assert_serves(
        at(LOCALHOST, taken),
        "now it works\n",
        "c1 once the port is free",
    );

    del(&lab, &c1);
    del(&lab, &c2);
    stop_all(&lab, vec![web1, web2]);
    lab.assert_no_infra("after the DELs");
    assert_port_free(taken, false, "after the DELs");
    eprintln!("[timing] ports conflict ({driver}): {:?}", t0.elapsed());
}

#[test]
fn port_in_use_builtin() {
    port_in_use("builtin");
}

#[test]
fn port_in_use_slirp4netns() {
    port_in_use("slirp4netns");
}

// ---------------------------------------------------------------------------
// 5: slirp4netns killed: the supervisor restarts it and re-applies forwards

fn slirp_restart(driver: &str) {
    let Some(lab) = lab_for("p_restart", driver) else {
        return;
    };
    let t0 = Instant::now();
    let with_udp = have_python3();
    let host = HostServer::start("127.0.0.1");
    assert_eq!(conf(driver)["plugins"][0]["allowHostLoopback"], true);
    let c = lab.container();
    let (p_web, p_udp) = (free_port(), free_port());
    let mut mappings = vec![tcp(p_web, 80)];
    if with_udp {
        mappings.push(udp(p_udp, 5353));
    }
    add(&lab, &c, &mappings);
    let mut servers = vec![httpd(&lab, &c, 80, "still here\n")];
    servers.extend(with_udp.then(|| udp_echo_server(&lab, &c, 5353, "echo:")));
    let host_url = format!("http://{SLIRP_HOST}:{}/", host.port);
    let got = lab.curl(&c, &host_url);
    assert!(
        got.ok(),
        "container -> host loopback before the kill: {got}"
    );
    assert_serves(at(LOCALHOST, p_web), "still here\n", "before the kill");
    if with_udp {
        assert_echoes(at(LOCALHOST, p_udp), "echo:", "before the kill");
    }

    let old = slirp_pid(&lab).unwrap_or_else(|| panic!("no slirp4netns pid: {}", lab.status()));
    assert!(lab_process(&lab, old), "slirp4netns {old} is not running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap_or_else(|e| panic!("killing slirp4netns {old}: {e}"));
    let killed = Instant::now();
    let limit = Duration::from_secs(5);

    // No CNI call from here on: the supervisor alone repairs it.
    let new_pid = eventually(limit, || match slirp_pid(&lab) {
        Some(p) if p != old && lab_process(&lab, p) => Ok(p),
        other => Err(format!("slirp4netns pid in status: {other:?}")),
    });
    let t_pid = killed.elapsed();
    new_pid.unwrap_or_else(|e| panic!("no new slirp4netns: {e}\n{}", lab.status()));
    let outbound = eventually(limit, || {
        let got = lab.curl(&c, &host_url);
        if got.ok() {
            Ok(())
        } else {
            Err(got.to_string())
        }
    });
    let t_out = killed.elapsed();
    outbound.unwrap_or_else(|e| panic!("{driver}: container -> host loopback after the kill: {e}"));
    let published = eventually(limit, || http_get(at(LOCALHOST, p_web)));
    let t_pub = killed.elapsed();
    published.unwrap_or_else(|e| panic!("{driver}: published TCP port after the kill: {e}"));
    assert_serves(at(LOCALHOST, p_web), "still here\n", "after the kill");
    if with_udp {
        let udp = eventually(limit, || udp_roundtrip(at(LOCALHOST, p_udp), "again"));
        udp.unwrap_or_else(|e| panic!("{driver}: published UDP port after the kill: {e}"));
        assert_echoes(at(LOCALHOST, p_udp), "echo:", "after the kill");
    }
    let new = slirp_pid(&lab).expect("a slirp4netns pid");
    assert_ne!(new, old, "status still shows the killed slirp4netns");
    eprintln!(
        "[timing] slirp4netns restart ({driver}): new pid in status after {t_pid:?}, \
         outbound after {t_out:?}, published port after {t_pub:?}"
    );

    del(&lab, &c);
    assert_port_free(p_web, with_udp, &format!("{driver}: after DEL"));
    if with_udp {
        assert_port_free(p_udp, true, &format!("{driver}: after DEL"));
    }
    stop_all(&lab, servers);
    lab.assert_no_infra(&format!("{driver}: after DEL"));
    eprintln!(
        "[timing] ports slirp restart ({driver}): {:?}",
        t0.elapsed()
    );
}

#[test]
fn slirp4netns_restart_builtin() {
    slirp_restart("builtin");
}

#[test]
fn slirp4netns_restart_slirp4netns() {
    slirp_restart("slirp4netns");
}

// ---------------------------------------------------------------------------
// 6: bad portMappings

#[test]
fn bad_port_mappings_are_refused() {
    let Some(lab) = lab_for("p_bad", "builtin") else {
        return;
    };
    let t0 = Instant::now();
    let (c1, c2) = (lab.container(), lab.container());
    let good = || tcp(free_port(), 80);
    let bad: Vec<(Value, &str)> = vec![
        (mapping("tcp", 0, 80, None), "hostPort"),
        (mapping("sctp", free_port(), 80, None), "sctp"),
        (mapping("tcp", free_port(), 80, Some("nope")), "nope"),
    ];
    let try_all = |when: &str| {
        for (m, culprit) in &bad {
            let out = plugin_add(&lab, "builtin", "bad-mapping", &c1, &[good(), m.clone()]);
            let err = cni_error(&out, &format!("{when}: ADD with {m}"));
            assert_eq!(err.code, 7, "{when}: {m}: {out}");
            assert!(
                err.mentions(culprit) && err.mentions("portMappings[1]"),
                "{when}: the error does not name {culprit} in portMappings[1]: {out}"
            );
        }
    };

    try_all("no infra");
    lab.assert_no_infra("after the refused ADDs");
    assert!(
        lab.lease_files(NET).is_empty(),
        "leases after the refused ADDs"
    );

    let p2 = free_port();
    add(&lab, &c2, &[tcp(p2, 80)]);
    let web2 = httpd(&lab, &c2, 80, "unaffected\n");
    let sandbox = lab.sandbox_pid();
    try_all("live infra");
    assert_eq!(lab.sandbox_pid(), sandbox, "the infra was replaced");
    assert_eq!(
        lab.attachment_files().len(),
        1,
        "records: {:?}",
        lab.attachment_files()
    );
    assert_eq!(
        lab.lease_files(NET).len(),
        1,
        "leases: {:?}",
        lab.lease_files(NET)
    );
    assert_eq!(lab.links(&c1), vec!["lo"], "links of the refused container");
    assert_serves(
        at(LOCALHOST, p2),
        "unaffected\n",
        "c2 after the refused ADDs",
    );

    del(&lab, &c2);
    stop_all(&lab, vec![web2]);
    lab.assert_no_infra("after the DEL");
    eprintln!("[timing] ports bad mappings: {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------
// Go-cased keys, as containerd's go-cni writes them (structs without JSON
// tags). Go plugins read them case-insensitively; so do we.

fn go_cased_mappings(driver: &str) {
    let Some(lab) = lab_for("p_gocase", driver) else {
        return;
    };
    let t0 = Instant::now();
    let c = lab.container();
    let (p_lo, p_empty, p_bare) = (free_port(), free_port(), free_port());
    let go = |port: u16, host_ip: &str| json!({"HostPort": port, "ContainerPort": 80, "Protocol": "tcp", "HostIP": host_ip});
    // No protocol at all: tcp, for us and for the inner portmap alike.
    let bare = json!({"HOSTPORT": p_bare, "containerport": 80});
    add(&lab, &c, &[go(p_lo, "127.0.0.1"), go(p_empty, ""), bare]);
    let body = format!("go-cased mappings, {driver}\n");
    let web = httpd(&lab, &c, 80, &body);

    // A HostIP left for the inner portmap would make its DNAT miss our
    // forward, which lands on the infra's own address.
    assert_serves(at(LOCALHOST, p_lo), &body, "HostIP 127.0.0.1");
    assert_serves(at(LOCALHOST, p_empty), &body, "HostIP \"\"");
    assert_serves(at(LOCALHOST, p_bare), &body, "no protocol");
    let ports = status_ports(&lab);
    for p in [p_lo, p_empty, p_bare] {
        assert!(
            ports.iter().any(|s| s.contains(&format!(":{p}/tcp"))),
            "status does not list port {p}: {ports:?}"
        );
    }

    del(&lab, &c);
    for p in [p_lo, p_empty, p_bare] {
        assert_port_free(p, false, &format!("{driver}: after DEL"));
    }
    stop_all(&lab, vec![web]);
    lab.assert_no_infra(&format!("{driver}: after DEL"));
    eprintln!("[timing] ports go-cased ({driver}): {:?}", t0.elapsed());
}

#[test]
fn go_cased_mappings_builtin() {
    go_cased_mappings("builtin");
}

#[test]
fn go_cased_mappings_slirp4netns() {
    go_cased_mappings("slirp4netns");
}

// ---------------------------------------------------------------------------
// One (protocol, host port) serves one container. Inside the infra every
// forward lands on tap0's address and portmap tells forwards apart by
// protocol and port alone, so the same port from a second host address
// would reach the first container: such an ADD is refused with code 107.

fn one_port_one_container(driver: &str) {
    let Some(lab) = lab_for("p_oneport", driver) else {
        return;
    };
    let (c1, c2) = (lab.container(), lab.container());
    let p = free_port();
    add(&lab, &c1, &[mapping("tcp", p, 80, Some("127.0.0.1"))]);
    let body = format!("container 1, {driver}\n");
    let web = httpd(&lab, &c1, 80, &body);

    let mut refused = vec![
        (
            "another loopback address",
            mapping("tcp", p, 80, Some("127.0.0.2")),
        ),
        ("every address", mapping("tcp", p, 80, Some("0.0.0.0"))),
    ];
    if driver == "builtin" {
        refused.push(("IPv6 loopback", mapping("tcp", p, 80, Some("::1"))));
    }
    for (what, m) in refused {
        let out = plugin_add(&lab, driver, "container-2", &c2, &[m]);
        let err = cni_error(&out, &format!("ADD of container 2 on port {p}, {what}"));
        assert_eq!(err.code, HOST_PORT_CODE, "{what}: {out}");
        assert!(
            err.mentions(&p.to_string()),
            "{what}: the port is not named: {out}"
        );
        assert_eq!(
            lab.attachment_files().len(),
            1,
            "{what}: records after the refusal"
        );
    }
    assert_serves(at(LOCALHOST, p), &body, "container 1 after the refusals");

    // The other protocol on the same port is another forward: allowed, and
    // each container gets its own traffic.
    let mut servers = vec![web];
    if have_python3() {
        add(&lab, &c2, &[mapping("udp", p, 53, Some("127.0.0.1"))]);
        servers.push(udp_echo_server(&lab, &c2, 53, "container 2: "));
        assert_echoes(at(LOCALHOST, p), "container 2: ", "UDP to container 2");
        assert_serves(at(LOCALHOST, p), &body, "TCP still to container 1");
        del(&lab, &c2);
    }

    // One ADD's own mappings: the same port to two container ports is as
    // ambiguous, and refused before anything is touched.
    let q = free_port();
    let out = plugin_add(
        &lab,
        driver,
        "container-2",
        &c2,
        &[
            mapping("tcp", q, 80, Some("127.0.0.1")),
            mapping("tcp", q, 81, Some("127.0.0.2")),
        ],
    );
    let err = cni_error(&out, "one ADD publishing a port twice");
    assert_eq!(err.code, HOST_PORT_CODE, "{out}");
    assert_port_free(q, false, "after the refused ADD");

    del(&lab, &c1);
    stop_all(&lab, servers);
    lab.assert_no_infra(&format!("{driver}: after DEL"));
}

#[test]
fn one_port_one_container_builtin() {
    one_port_one_container("builtin");
}

#[test]
fn one_port_one_container_slirp4netns() {
    one_port_one_container("slirp4netns");
}
