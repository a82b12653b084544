//! The builtin port driver's forwarder under load: many concurrent TCP
//! connections (2,000) through one published port on a few threads, each
//! idle one holding its two sockets only (a pipe is taken while bytes are in
//! flight, and given back), its bounds
//! (connections over the limit are reset, those already forwarded keep
//! working), and a connection flood with a small fd limit that leaves the
//! control socket (ADD, DEL) working and the supervisor quiet, and a UDP
//! flood that does not hold the forwarder from ADD and DEL.
//!
//! The server is a python3 TCP echo server (epoll) inside a container; the
//! client is this test process on the host's loopback.

use lab::{example_conflist, outer, Container, Lab, NET};
use serde_json::{json, Value};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

/// A TCP echo server for many connections at once.
const TCP_ECHO: &str = r#"import resource, select, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", int(sys.argv[1])))
ls.listen(4096)
ls.setblocking(False)
ep = select.epoll()
ep.register(ls.fileno(), select.EPOLLIN)
conns = {}
while True:
    for fd, ev in ep.poll():
        if fd == ls.fileno():
            while True:
                try:
                    c, _ = ls.accept()
                except BlockingIOError:
                    break
                c.setblocking(False)
                conns[c.fileno()] = c
                ep.register(c.fileno(), select.EPOLLIN)
            continue
        c = conns[fd]
        try:
            data = c.recv(65536)
        except OSError:
            data = b""
        if data:
            try:
                c.sendall(data)
            except OSError:
                pass
        else:
            ep.unregister(fd)
            del conns[fd]
            c.close()
"#;

const ECHO_PORT: u16 = 7;

fn lab_with(name: &str, extra: Value) -> Option<Lab> {
    let lab = Lab::new(lab::binary!(), name)?;
    let mut conf = example_conflist();
    outer(&mut conf).insert("portDriver".into(), "builtin".into());
    for (k, v) in extra.as_object().into_iter().flatten() {
        outer(&mut conf).insert(k.clone(), v.clone());
    }
    lab.write_netconf(NET, &conf);
    Some(lab)
}

fn add(lab: &Lab, c: &Container, host_port: u16) {
    let cap = json!({"portMappings": [
        {"hostPort": host_port, "containerPort": ECHO_PORT, "protocol": "tcp", "hostIP": "127.0.0.1"}
    ]})
    .to_string();
    let out = lab.cnitool_env(&[("CAP_ARGS", &cap)], "add", NET, &c.netns());
    assert!(out.ok(), "ADD publishing {host_port}: {out}");
}

fn del(lab: &Lab, c: &Container) {
    let out = lab.cnitool("del", NET, &c.netns());
    assert!(out.ok(), "DEL {}: {out}", c.netns());
}

/// The echo server in `c`, killed by pid on drop.
struct Server(u32);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0 as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{}", self.0)).exists() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn echo_server(lab: &Lab, c: &Container) -> Server {
    let script = lab.dir.join("tcp-echo.py");
    if !script.exists() {
        lab.write_file("tcp-echo.py", TCP_ECHO);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644))
            .expect("chmod tcp-echo.py");
    }
    let script = script.display().to_string();
    let port = ECHO_PORT.to_string();
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
    assert!(out.ok(), "starting the echo server: {out}");
    let pid: u32 = out.stdout.trim().parse().expect("the echo server's pid");
    let server = Server(pid);
    // Listening: /proc/PID/net/tcp has the port in state LISTEN (0A).
    let want = format!(":{:04X}", ECHO_PORT);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
        if tcp.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
        }) {
            return server;
        }
        assert!(Instant::now() < deadline, "the echo server does not listen");
        thread::sleep(Duration::from_millis(20));
    }
}

fn have_python3() -> bool {
    let found = Path::new("/usr/bin/python3").exists();
    assert!(
        found || !lab::in_ci(),
        "python3 (/usr/bin/python3) is needed (CI=true)"
    );
    found
}

fn supervisor_pid(lab: &Lab) -> u32 {
    lab.status()["infra"]["supervisor"]["pid"]
        .as_u64()
        .expect("status names the supervisor") as u32
}

/// A field of /proc/PID/status, as a number (kB for VmRSS).
fn proc_status(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// How many fds `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Lets this process hold many client sockets.
fn raise_own_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Sends a line on `s` and reads the echo; Err says what went wrong.
fn echo(s: &mut TcpStream, line: &str) -> Result<(), String> {
    s.write_all(line.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; line.len()];
    s.read_exact(&mut got).map_err(|e| format!("read: {e}"))?;
    if got != line.as_bytes() {
        return Err(format!(
            "echo {:?} for {line:?}",
            String::from_utf8_lossy(&got)
        ));
    }
    Ok(())
}

/// A connection to `addr` that echoes, or why not.
fn echoing(addr: SocketAddr, i: usize) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    echo(&mut s, &format!("hello {i}\n"))?;
    Ok(s)
}

/// Whether a new connection to `addr` is refused (reset or closed without
/// an echo) within 3 s.
fn refused(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(3)) else {
        return true;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = s.write_all(b"over the limit\n");
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

/// Opens `n` echoing connections from 8 client threads.
fn open_many(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, Vec<String>) {
    let per = n.div_ceil(8);
    let handles: Vec<_> = (0..8)
        .map(|t| {
            thread::spawn(move || {
                let mut ok = Vec::new();
                let mut failed = Vec::new();
                for i in t * per..((t + 1) * per).min(n) {
                    match echoing(addr, i) {
                        Ok(s) => ok.push(s),
                        Err(e) => failed.push(format!("connection {i}: {e}")),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for h in handles {
        let (o, f) = h.join().expect("client thread");
        ok.extend(o);
        failed.extend(f);
    }
    (ok, failed)
}

/// The backlog of the TCP listener on 127.0.0.1:`port` here (`ss` shows
/// it as a listener's Send-Q).
fn listen_backlog(port: u16) -> Option<u64> {
    let out = std::process::Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(2)?.parse().ok()
}

#[test]
fn many_connections_few_threads_and_the_limit_refuses_new_ones() {
    const N: usize = 2000;
    if !have_python3() {
        return;
    }
    let Some(lab) = lab_with("fwd_many", json!({"maxConnectionsPerPort": N})) else {
        return;
    };
    raise_own_fd_limit();
    let t0 = Instant::now();
    let c = lab.container();
    let port = lab::free_tcp_port();
    add(&lab, &c, port);
    // A burst of clients finds room in the accept queue: the kernel's
    // somaxconn, not the 128 std listens with (a burst of 256 lost most
    // SYNs, each client then waiting a second for its retry).
    let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    // (listen(2)'s largest, SOMAXCONN 4096, where somaxconn is larger.)
    let backlog = listen_backlog(port);
    assert!(
        backlog.is_some() && backlog >= somaxconn.map(|m| m.min(4096)),
        "the host port's backlog is {backlog:?}, somaxconn {somaxconn:?}"
    );
    let server = echo_server(&lab, &c);
    let sup = supervisor_pid(&lab);
    let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
    let fds_before = open_fds(sup);

    let t_open = Instant::now();
    let (mut conns, failed) = open_many(addr, N);
    let opened_in = t_open.elapsed();
    assert!(
        failed.is_empty(),
        "{} of {N} connections failed, first: {:?}",
        failed.len(),
        failed.first()
    );
    let threads = proc_status(sup, "Threads:");
    let rss = proc_status(sup, "VmRSS:");
    eprintln!(
        "[forwarder] {N} connections echoing, opened in {opened_in:?}; supervisor: {threads} threads, VmRSS {rss} kB"
    );
    assert!(threads <= 8, "the supervisor runs {threads} threads");
    // Idle now: each connection holds its two sockets, and the pipes that
    // carried the echoes wait in a pool of at most 32 (64 fds).
    let fds_held = open_fds(sup).saturating_sub(fds_before);
    eprintln!(
        "[forwarder] {N} idle connections: supervisor holds {fds_held} more fds ({:.2} per connection)",
        fds_held as f64 / N as f64
    );
    assert!(
        (2 * N..=2 * N + 64 + 16).contains(&fds_held),
        "{N} idle connections hold {fds_held} fds, not about 2 each"
    );

    // At the limit: new connections are reset at once...
    for _ in 0..20 {
        assert!(
            refused(addr),
            "a connection over maxConnectionsPerPort was served"
        );
    }
    // ...and every one already forwarded still echoes: idle until now,
    // each direction takes a pipe again for these bytes.
    for (i, s) in conns.iter_mut().enumerate() {
        if let Err(e) = echo(s, &format!("again {i}\n")) {
            panic!("connection {i} broke after the refusals: {e}");
        }
    }
    // Once some close, new ones are served again.
    conns.truncate(N - 10);
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(e) = echoing(addr, N) {
        assert!(Instant::now() < deadline, "no room after closing 10: {e}");
        thread::sleep(Duration::from_millis(100));
    }
    drop(conns);
    del(&lab, &c);
    assert!(
        TcpListener::bind(addr).is_ok(),
        "port {port} still held after DEL"
    );
    drop(server);
    lab.assert_no_infra("after the last DEL");
    eprintln!("[timing] forwarder many connections: {:?}", t0.elapsed());
}

/// Sets the supervisor's RLIMIT_NOFILE to `n`, and waits for the
/// forwarder to follow.
fn lower_fd_limit(lab: &Lab, sup: u32, n: usize) {
    // The supervisor's own uid lowers its limit (root here lacks
    // CAP_SYS_RESOURCE over the lab's user namespace).
    let out = lab.exec(
        &[],
        None,
        &[
            "prlimit",
            "--pid",
            &sup.to_string(),
            &format!("--nofile={n}:{n}"),
        ],
    );
    assert!(out.ok(), "prlimit on the supervisor: {out}");
    // The forwarder reads the limit again within a second.
    thread::sleep(Duration::from_millis(1500));
}

/// Clients that send and never read the echo: each stalls its connection's
/// way back, whose pipe then holds the bytes. With more of them than there
/// are fds for pipes (a 256 fd limit), the directions left without a pipe
/// copy through a buffer: every other connection still echoes, nothing
/// spins, and the supervisor stays within its limit.
#[test]
fn stalled_readers_holding_every_pipe_leave_the_others_echoing() {
    const HELD: usize = 60;
    const STALLED: usize = 40;
    if !have_python3() {
        return;
    }
    let Some(lab) = lab_with("fwd_stalled", json!({})) else {
        return;
    };
    let t0 = Instant::now();
    let c = lab.container();
    let port = lab::free_tcp_port();
    add(&lab, &c, port);
    let server = echo_server(&lab, &c);
    let sup = supervisor_pid(&lab);
    lower_fd_limit(&lab, sup, 256);
    let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
    let base = open_fds(sup);
    let (mut conns, failed) = open_many(addr, HELD);
    assert!(failed.is_empty(), "{:?}", failed.first());

    // Each stalled client sends 4 MiB and reads nothing back; a small
    // receive buffer makes its way back fill soon.
    let chunk = vec![b'x'; 65536];
    let deadline = Instant::now() + Duration::from_secs(30);
    for s in &mut conns[..STALLED] {
        nix::sys::socket::setsockopt(&*s, nix::sys::socket::sockopt::RcvBuf, &4096)
            .expect("SO_RCVBUF");
        s.set_write_timeout(Some(Duration::from_secs(5)))
            .expect("write timeout");
        let mut sent = 0;
        while sent < 4 << 20 && Instant::now() < deadline {
            match s.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) => panic!("a stalled client's write: {e}"),
            }
        }
    }
    // Let the echoes reach the stalled ways back.
    thread::sleep(Duration::from_secs(1));
    let fds = open_fds(sup);
    let cpu0 = cpu_ticks(sup);
    let w0 = Instant::now();
    thread::sleep(Duration::from_secs(2));
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let cpu = (cpu_ticks(sup) - cpu0) as f64 / hz;
    eprintln!(
        "[forwarder] {STALLED} stalled of {HELD} held with 256 fds: supervisor holds {fds} fds, CPU {cpu:.2}s over {:?}",
        w0.elapsed()
    );
    assert!(fds < 256, "the supervisor holds {fds} fds of 256");
    // The stalled ways back hold pipes: every fd left for pipes is taken.
    assert!(
        fds >= base + 2 * HELD + 2 * 32,
        "{fds} fds ({base} before the connections): the stalled did not take the pipes"
    );
    assert!(cpu < 1.0, "the supervisor spins: {cpu:.2}s of CPU in 2 s");
    // More stalled directions than pipes (fds for 35 at most here): the
    // others still echo, through a pipe or without one.
    for (i, s) in conns[STALLED..].iter_mut().enumerate() {
        for round in 0..3 {
            if let Err(e) = echo(
                s,
                &format!(
                    "beside the stalled {i} {round}
"
                ),
            ) {
                panic!("connection {i} beside the stalled ones: {e}");
            }
        }
    }
    conns.truncate(STALLED);
    drop(conns);
    // Their pipes closed with them: a new connection takes one again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(e) = echoing(addr, HELD) {
        assert!(
            Instant::now() < deadline,
            "no echo after the stalled closed: {e}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    del(&lab, &c);
    drop(server);
    lab.assert_no_infra("after the last DEL");
    eprintln!("[timing] forwarder stalled readers: {:?}", t0.elapsed());
}

#[test]
fn flood_with_a_small_fd_limit_leaves_control_working() {
    if !have_python3() {
        return;
    }
    let Some(lab) = lab_with("fwd_flood", json!({})) else {
        return;
    };
    raise_own_fd_limit();
    let t0 = Instant::now();
    let (c1, c2) = (lab.container(), lab.container());
    let (p1, p2) = (lab::free_tcp_port(), lab::free_tcp_port());
    add(&lab, &c1, p1);
    let s1 = echo_server(&lab, &c1);
    let sup = supervisor_pid(&lab);
    lower_fd_limit(&lab, sup, 256);
    let a1 = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), p1);

    // 400 held connections: more than 256 fds can carry.
    let (held, failed) = open_many(a1, 400);
    eprintln!(
        "[forwarder] with 256 fds: {} of 400 connections served, {} refused",
        held.len(),
        failed.len()
    );
    assert!(
        !held.is_empty(),
        "no connection served at all: {:?}",
        failed.first()
    );
    assert!(!failed.is_empty(), "400 connections fit in 256 fds?");

    // A flood goes on while the control socket is used.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(s) = TcpStream::connect_timeout(&a1, Duration::from_secs(1)) {
                    drop(s);
                }
                n += 1;
            }
            n
        })
    };
    let cpu0 = cpu_ticks(sup);
    let w0 = Instant::now();
    thread::sleep(Duration::from_secs(2));
    let t_add = Instant::now();
    add(&lab, &c2, p2);
    let add_took = t_add.elapsed();
    let s2 = echo_server(&lab, &c2);
    let a2 = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), p2);
    // The new port works (room is made by closing a few held ones).
    let mut held = held;
    held.truncate(held.len().saturating_sub(5));
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(e) = echoing(a2, 0) {
        assert!(
            Instant::now() < deadline,
            "the second port does not echo: {e}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let t_del = Instant::now();
    del(&lab, &c1);
    let del_took = t_del.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let attempts = flood.join().expect("flood thread");
    let ticks = cpu_ticks(sup) - cpu0;
    let wall = w0.elapsed();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let cpu = ticks as f64 / hz;
    eprintln!(
        "[forwarder] flood of {attempts} connects: ADD {add_took:?}, DEL {del_took:?}, supervisor CPU {cpu:.2}s over {wall:?}"
    );
    assert!(add_took < Duration::from_secs(5), "ADD took {add_took:?}");
    assert!(del_took < Duration::from_secs(5), "DEL took {del_took:?}");
    // Busy with the flood's connects, but never a core at 100 %.
    assert!(
        cpu < wall.as_secs_f64() * 0.8,
        "the supervisor used {cpu:.2}s of CPU in {wall:?}"
    );
    // DEL closed the flooded port and its connections.
    assert!(
        TcpListener::bind(a1).is_ok(),
        "port {p1} still held after DEL"
    );
    for mut s in held {
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut b = [0u8; 8];
        assert!(
            match s.read(&mut b) {
                Ok(n) => n == 0,
                Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            },
            "a connection to the deleted port is still open"
        );
    }
    del(&lab, &c2);
    drop((s1, s2));
    lab.assert_no_infra("after the last DEL");
    eprintln!("[timing] forwarder flood: {:?}", t0.elapsed());
}

/// One iperf3 stream through a published port, for a figure (not a
/// check): `cargo test --test port_forwarder -- --ignored --nocapture
/// one_stream_throughput`.
#[test]
#[ignore]
fn one_stream_throughput() {
    let Some(lab) = lab_with("fwd_iperf", json!({})) else {
        return;
    };
    let c = lab.container();
    let port = lab::free_tcp_port();
    let cap = json!({"portMappings": [
        {"hostPort": port, "containerPort": 5201, "protocol": "tcp", "hostIP": "127.0.0.1"}
    ]})
    .to_string();
    let out = lab.cnitool_env(&[("CAP_ARGS", &cap)], "add", NET, &c.netns());
    assert!(out.ok(), "ADD: {out}");
    let out = lab.in_netns(
        &c,
        &[
            "sh",
            "-c",
            "iperf3 -s -p 5201 </dev/null >/dev/null 2>&1 & echo $!",
        ],
    );
    let server = Server(out.stdout.trim().parse().expect("iperf3's pid"));
    thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        let out = std::process::Command::new("iperf3")
            .args(["-c", "127.0.0.1", "-p", &port.to_string(), "-t", "5", "-J"])
            .output()
            .expect("iperf3 -c");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let bps = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0);
        eprintln!("[throughput] one stream: {:.2} Gbit/s", bps / 1e9);
    }
    del(&lab, &c);
    drop(server);
    lab.assert_no_infra("after DEL");
}

/// Datagrams sent to `addr` as fast as two threads can, until dropped.
struct UdpFlood {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<thread::JoinHandle<u64>>,
}

impl UdpFlood {
    fn start(addr: SocketAddr) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..2)
            .map(|_| {
                let stop = stop.clone();
                thread::spawn(move || {
                    let s = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
                    s.connect(addr).expect("connect");
                    let mut n = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        // Refused once the port is closed: sent on anyway.
                        let _ = s.send(b"flood");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        UdpFlood { stop, threads }
    }

    /// Stops the senders; how many datagrams they sent.
    fn stop(&mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.threads.drain(..).filter_map(|t| t.join().ok()).sum()
    }
}

impl Drop for UdpFlood {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A sender faster than the forwarder on a published UDP port: the loop
/// still serves commands and the other ports between its reads, so ADD
/// and DEL (of another container, and of the flooded one) answer at once.
#[test]
fn a_udp_flood_does_not_hold_the_forwarder() {
    let Some(lab) = lab_with("fwd_udp_flood", json!({})) else {
        return;
    };
    let t0 = Instant::now();
    let (c1, c2) = (lab.container(), lab.container());
    let (p1, p2) = (lab::free_tcp_port(), lab::free_tcp_port());
    let cap = json!({"portMappings": [
        {"hostPort": p1, "containerPort": ECHO_PORT, "protocol": "udp", "hostIP": "127.0.0.1"}
    ]})
    .to_string();
    let out = lab.cnitool_env(&[("CAP_ARGS", &cap)], "add", NET, &c1.netns());
    assert!(out.ok(), "ADD publishing UDP {p1}: {out}");

    let mut flood = UdpFlood::start(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), p1));
    thread::sleep(Duration::from_secs(1));
    let t_add = Instant::now();
    add(&lab, &c2, p2);
    let add_took = t_add.elapsed();
    let t_del = Instant::now();
    del(&lab, &c2);
    let del2_took = t_del.elapsed();
    let t_del = Instant::now();
    del(&lab, &c1);
    let del1_took = t_del.elapsed();
    let sent = flood.stop();
    eprintln!(
        "[forwarder] UDP flood of {sent} datagrams: ADD {add_took:?}, DEL {del2_took:?}, DEL of the flooded port {del1_took:?}"
    );
    for (what, took) in [
        ("ADD beside the flood", add_took),
        ("DEL beside the flood", del2_took),
        ("DEL of the flooded port", del1_took),
    ] {
        assert!(took < Duration::from_secs(5), "{what} took {took:?}");
    }
    lab.assert_no_infra("after the last DEL");
    eprintln!("[timing] forwarder UDP flood: {:?}", t0.elapsed());
}
