//! The builtin port driver's forwarder as the port_forwarder tests load
//! it: a lab with the example network on the builtin driver, one TCP port
//! published to a python3 echo server (epoll) inside a container, and the
//! test process as its many clients on the host's loopback; what the
//! supervisor holds and spends, read from /proc.

use crate::{example_conflist, outer, Container, Lab, NET};
use serde_json::{json, Value};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

/// A TCP echo server for many connections at once.
pub const TCP_ECHO: &str = r#"import resource, select, socket, sys
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

/// The echo server's port in the container.
pub const ECHO_PORT: u16 = 7;

/// A lab with the example network on the builtin driver, `extra` added to
/// its config; `binary` is the plugin under test (`lab::binary!()`).
pub fn lab_with(binary: &Path, name: &str, extra: Value) -> Option<Lab> {
    let lab = Lab::new(binary, name)?;
    let mut conf = example_conflist();
    outer(&mut conf).insert("portDriver".into(), "builtin".into());
    for (k, v) in extra.as_object().into_iter().flatten() {
        outer(&mut conf).insert(k.clone(), v.clone());
    }
    lab.write_netconf(NET, &conf);
    Some(lab)
}

/// `cnitool add` publishing TCP `host_port` on 127.0.0.1 to the echo port.
pub fn add(lab: &Lab, c: &Container, host_port: u16) {
    let cap = json!({"portMappings": [
        {"hostPort": host_port, "containerPort": ECHO_PORT, "protocol": "tcp", "hostIP": "127.0.0.1"}
    ]})
    .to_string();
    let out = lab.cnitool_env(&[("CAP_ARGS", &cap)], "add", NET, &c.netns());
    assert!(out.ok(), "ADD publishing {host_port}: {out}");
}

/// `cnitool del`; asserts success.
pub fn del(lab: &Lab, c: &Container) {
    let out = lab.cnitool("del", NET, &c.netns());
    assert!(out.ok(), "DEL {}: {out}", c.netns());
}

/// A server in a container, killed by pid on drop and waited for (5 s at
/// most).
pub struct Server(pub u32);

impl Drop for Server {
    fn drop(&mut self) {
        crate::sigkill(self.0);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{}", self.0)).exists() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The echo server in `c`, listening on ECHO_PORT.
pub fn echo_server(lab: &Lab, c: &Container) -> Server {
    let script = lab.script("tcp-echo.py", TCP_ECHO);
    let port = ECHO_PORT.to_string();
    let pid = lab.start_in_netns(c, &["python3", &script, &port], "the echo server");
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

/// The running infra's supervisor, as `status` names it.
pub fn supervisor_pid(lab: &Lab) -> u32 {
    lab.status()["infra"]["supervisor"]["pid"]
        .as_u64()
        .expect("status names the supervisor") as u32
}

/// How many fds `pid` has open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Lets this process hold many client sockets.
pub fn raise_own_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Sends a line on `s` and reads the echo; Err says what went wrong.
pub fn echo(s: &mut TcpStream, line: &str) -> Result<(), String> {
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
pub fn echoing(addr: SocketAddr, i: usize) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    echo(&mut s, &format!("hello {i}\n"))?;
    Ok(s)
}

/// Whether a new connection to `addr` is refused (reset or closed without
/// an echo) within 3 s.
pub fn refused(addr: SocketAddr) -> bool {
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
pub fn open_many(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, Vec<String>) {
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
