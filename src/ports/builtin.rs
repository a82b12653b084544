//! The builtin port driver: the supervisor listens on the host port in the
//! caller's network namespace and, per TCP connection or UDP flow, connects
//! from a socket made inside the infra's network namespace. Every listener
//! has a thread that `setns`es into the infra first, so the sockets it and
//! its children create live there.

use super::{Driver, PortMapping, Protocol, INFRA_ADDR};
use crate::error::{code, Error, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{setns, CloneFlags};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

const COPY_BUF: usize = 256 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A UDP flow with no traffic for this long is forgotten.
const UDP_IDLE: Duration = Duration::from_secs(60);

pub struct Builtin {
    infra_netns: Arc<OwnedFd>,
    forwards: HashMap<String, Vec<Forward>>,
}

/// One listening port. Dropping it stops its thread and closes the port.
struct Forward {
    /// Closing our end wakes the listener thread (POLLHUP) to stop.
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Forward {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Builtin {
    pub fn new(infra_netns: OwnedFd) -> Self {
        Builtin {
            infra_netns: Arc::new(infra_netns),
            forwards: HashMap::new(),
        }
    }

    fn open(&self, m: &PortMapping) -> Result<Forward> {
        let addr = m.listen_addr();
        let target = SocketAddr::new(INFRA_ADDR.into(), m.host_port);
        let (stop_r, stop_w) = crate::sys::pipe()?;
        let netns = Arc::clone(&self.infra_netns);
        let thread = match m.protocol {
            Protocol::Tcp => {
                let listener = TcpListener::bind(addr).map_err(|e| bind_error(m, e))?;
                listener.set_nonblocking(true)?;
                std::thread::Builder::new()
                    .name(format!("tcp {addr}"))
                    .spawn(move || in_infra(&netns, || serve_tcp(listener, stop_r, target)))?
            }
            Protocol::Udp => {
                let socket = UdpSocket::bind(addr).map_err(|e| bind_error(m, e))?;
                socket.set_nonblocking(true)?;
                std::thread::Builder::new()
                    .name(format!("udp {addr}"))
                    .spawn(move || in_infra(&netns, || serve_udp(socket, stop_r, target)))?
            }
        };
        Ok(Forward {
            stop: Some(stop_w),
            thread: Some(thread),
        })
    }
}

impl Driver for Builtin {
    fn add(&mut self, key: &str, mappings: &[PortMapping]) -> Result<()> {
        // Collected first: on an error the ones opened are dropped, closed.
        let opened = mappings
            .iter()
            .map(|m| self.open(m))
            .collect::<Result<Vec<_>>>()?;
        for m in mappings {
            log::info!("forwarding {} (builtin)", m.describe());
        }
        self.forwards
            .entry(key.to_string())
            .or_default()
            .extend(opened);
        Ok(())
    }

    fn remove(&mut self, key: &str) {
        self.forwards.remove(key);
    }

    fn close_all(&mut self) {
        self.forwards.clear();
    }
}

pub fn bind_error(m: &PortMapping, e: std::io::Error) -> Error {
    let hint = match e.raw_os_error() {
        Some(libc::EACCES) => " (ports below net.ipv4.ip_unprivileged_port_start need privileges)",
        Some(libc::EADDRNOTAVAIL) => " (no such local address)",
        _ => "",
    };
    Error::new(
        code::HOST_PORT,
        format!("cannot publish host port {}: {e}{hint}", m.describe()),
    )
}

/// Runs `f` on this thread after moving it into the infra's netns.
fn in_infra(netns: &OwnedFd, f: impl FnOnce()) {
    match setns(netns.as_fd(), CloneFlags::CLONE_NEWNET) {
        Ok(()) => f(),
        Err(e) => log::error!("port forward: entering the infra's netns: {e}"),
    }
}

/// Waits until `sock` is readable: false when told to stop.
fn wait_readable(sock: &impl AsFd, stop: &OwnedFd, timeout: PollTimeout) -> Option<bool> {
    let mut fds = [
        PollFd::new(sock.as_fd(), PollFlags::POLLIN),
        PollFd::new(stop.as_fd(), PollFlags::POLLIN),
    ];
    match poll(&mut fds, timeout) {
        Ok(0) => None,
        Ok(_) if fds[1].any().unwrap_or(true) => Some(false),
        Ok(_) => Some(true),
        Err(nix::errno::Errno::EINTR) => None,
        Err(_) => Some(false),
    }
}

fn serve_tcp(listener: TcpListener, stop: OwnedFd, target: SocketAddr) {
    loop {
        match wait_readable(&listener, &stop, PollTimeout::NONE) {
            Some(false) => return,
            None => continue,
            Some(true) => {}
        }
        match listener.accept() {
            Ok((client, _)) => {
                // Threads started here share this thread's (the infra's) netns.
                let _ = std::thread::Builder::new()
                    .name("tcp conn".into())
                    .spawn(move || proxy_tcp(client, target));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                log::warn!("accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn proxy_tcp(client: TcpStream, target: SocketAddr) {
    let upstream = match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            log::info!("forward to {target} in the infra: {e}");
            return;
        }
    };
    let _ = client.set_nonblocking(false);
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (Ok(client2), Ok(upstream2)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let other = std::thread::spawn(move || pump(client2, upstream2));
    pump(upstream, client);
    let _ = other.join();
}

/// Copies until EOF or error, then passes the EOF on. splice(2) through a
/// pipe keeps the bytes in the kernel; a plain copy is the fallback.
fn pump(from: TcpStream, to: TcpStream) {
    if let Err(e) = splice_all(&from, &to) {
        if e != nix::errno::Errno::EINVAL {
            log::debug!("forward: {e}");
        } else {
            copy_all(&from, &to);
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

fn splice_all(from: &TcpStream, to: &TcpStream) -> nix::Result<()> {
    use nix::fcntl::{splice, SpliceFFlags};
    let (pipe_r, pipe_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // A larger pipe moves more per call; the default 64 KiB is the fallback.
    let _ = nix::fcntl::fcntl(
        pipe_w.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20),
    );
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_MORE;
    loop {
        let n = match splice(from, None, &pipe_w, None, COPY_BUF, flags) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e),
        };
        let mut left = n;
        while left > 0 {
            match splice(&pipe_r, None, to, None, left, flags) {
                Ok(0) => return Ok(()),
                Ok(m) => left -= m,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

fn copy_all(mut from: &TcpStream, mut to: &TcpStream) {
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

type Flows = Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>>;

fn serve_udp(host: UdpSocket, stop: OwnedFd, target: SocketAddr) {
    let host = Arc::new(host);
    let stop = Arc::new(stop);
    let flows: Flows = Arc::default();
    let mut replies: Vec<JoinHandle<()>> = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        match wait_readable(host.as_ref(), &stop, PollTimeout::NONE) {
            Some(false) => break,
            None => continue,
            Some(true) => {}
        }
        let (n, peer) = match host.recv_from(&mut buf) {
            Ok(r) => r,
            Err(_) => continue,
        };
        let existing = flows.lock().ok().and_then(|f| f.get(&peer).cloned());
        let flow = match existing {
            Some(f) => f,
            None => match open_flow(target) {
                Ok(sock) => {
                    let sock = Arc::new(sock);
                    if let Ok(mut f) = flows.lock() {
                        f.insert(peer, Arc::clone(&sock));
                    }
                    let (s, h, st, fl) = (
                        Arc::clone(&sock),
                        Arc::clone(&host),
                        Arc::clone(&stop),
                        Arc::clone(&flows),
                    );
                    replies.retain(|t| !t.is_finished());
                    if let Ok(t) = std::thread::Builder::new()
                        .name("udp flow".into())
                        .spawn(move || udp_replies(s, h, peer, st, fl))
                    {
                        replies.push(t);
                    }
                    sock
                }
                Err(e) => {
                    log::info!("udp flow to {target} in the infra: {e}");
                    continue;
                }
            },
        };
        let _ = flow.send(&buf[..n]);
    }
    // The port is closed only when every reply thread let go of it.
    for t in replies {
        let _ = t.join();
    }
}

fn open_flow(target: SocketAddr) -> std::io::Result<UdpSocket> {
    let sock = UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))?;
    sock.connect(target)?;
    sock.set_nonblocking(true)?;
    Ok(sock)
}

fn udp_replies(
    flow: Arc<UdpSocket>,
    host: Arc<UdpSocket>,
    peer: SocketAddr,
    stop: Arc<OwnedFd>,
    flows: Flows,
) {
    let idle = PollTimeout::try_from(UDP_IDLE).unwrap_or(PollTimeout::MAX);
    let mut buf = vec![0u8; 65536];
    loop {
        match wait_readable(flow.as_ref(), &stop, idle) {
            Some(false) => break,
            None => {
                // Idle: forget the flow. A later datagram starts a new one.
                if let Ok(mut f) = flows.lock() {
                    f.remove(&peer);
                }
                break;
            }
            Some(true) => {}
        }
        if let Ok(n) = flow.recv(&mut buf) {
            let _ = host.send_to(&buf[..n], peer);
        }
    }
}
