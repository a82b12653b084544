//! The network as the tests probe it: ping and curl from a container,
//! servers on the host's loopback and in containers, free ports, and a
//! plain HTTP client for the host side of a forward.

use crate::{Container, Lab, Out};
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// A server process inside a container; killed (by pid) on drop.
pub struct Server {
    pub pid: u32,
}

impl Drop for Server {
    fn drop(&mut self) {
        crate::sigkill(self.pid);
    }
}

// ---------------------------------------------------------------------------
// A TCP server on the host's loopback

/// Answers every HTTP request with `BODY`, counting connections.
pub struct HostServer {
    pub port: u16,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl HostServer {
    pub const BODY: &'static str = "hello from the host loopback\n";

    /// Listens on `ip`, port chosen by the kernel.
    pub fn start(ip: &str) -> HostServer {
        let listener = TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("binding {ip}:0: {e}"));
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let port = listener.local_addr().expect("local addr").port();
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (connections.clone(), stop.clone());
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        c.fetch_add(1, Ordering::Relaxed);
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut req = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                            match conn.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => req.extend_from_slice(&buf[..n]),
                            }
                        }
                        let _ = write!(
                            conn,
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                            Self::BODY.len(),
                            Self::BODY
                        );
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        HostServer {
            port,
            connections,
            stop,
            thread: Some(thread),
        }
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for HostServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A global IPv4 address of the host (not loopback), if it has one.
pub fn host_global_ipv4() -> Option<String> {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = text.split_whitespace().collect();
    let i = fields.iter().position(|f| *f == "inet")?;
    Some(fields.get(i + 1)?.split('/').next()?.to_string())
}

/// A TCP port nobody listens on right now, on 127.0.0.1 or 0.0.0.0, for a
/// test to publish a moment later. Not one the kernel hands out (port 0 is
/// from the ephemeral range, where any outgoing connection made meanwhile
/// can take it): one below that range, never handed out twice by this
/// process, starting from a place that differs between processes.
pub fn free_tcp_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_from: u32 = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (base, span) = (10_000, ephemeral_from.saturating_sub(10_000).max(1000));
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (base + (start + n * 37) % span) as u16;
        let free = TcpListener::bind(("0.0.0.0", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port)).is_ok();
        if free {
            return port;
        }
    }
    panic!("no free TCP port in {base}..{}", base + span);
}

/// How often a ping or a fetch is tried before it counts as failed: a lost
/// packet or a stalled machine is not a broken network, and a test that
/// expects no answer gets none from any attempt.
const NET_ATTEMPTS: usize = 3;

fn retried(mut attempt: impl FnMut() -> Out) -> Out {
    let mut out = attempt();
    for _ in 1..NET_ATTEMPTS {
        if out.ok() {
            break;
        }
        thread::sleep(Duration::from_millis(300));
        out = attempt();
    }
    out
}

impl Lab {
    /// Asserts that one ping from `c` to `ip` is answered (`what` names it).
    pub fn assert_ping(&self, c: &Container, ip: &str, what: &str) {
        let ping = self.ping(c, ip);
        assert!(ping.ok(), "{what}: {ping}");
    }

    /// A ping from a container: one echo, tried up to NET_ATTEMPTS times
    /// until one is answered.
    pub fn ping(&self, c: &Container, ip: &str) -> Out {
        retried(|| self.in_netns(c, &["busybox", "ping", "-c1", "-W2", ip]))
    }

    /// curl from a container, tried up to NET_ATTEMPTS times until one
    /// succeeds (what it fetched is for the caller to judge).
    pub fn curl(&self, c: &Container, url: &str) -> Out {
        retried(|| self.in_netns(c, &["curl", "-sS", "--max-time", "3", url]))
    }
}

/// GET / over HTTP/1.0: the body of a 200 answer.
pub fn http_get(addr: SocketAddr) -> Result<String, String> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    conn.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)
        .map_err(|e| format!("read from {addr}: {e} (got {answer:?})"))?;
    match answer.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
            Ok(body.to_string())
        }
        _ => Err(format!("{addr}: not a 200 answer: {answer:?}")),
    }
}

/// One iperf3 stream of `secs` seconds from the host to 127.0.0.1:`port`:
/// what the server received, in Gbit/s (0 when iperf3 reports nothing).
pub fn iperf3_gbits(port: u16, secs: u32) -> f64 {
    let out = Command::new("iperf3")
        .args(["-c", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", &secs.to_string(), "-J"])
        .output()
        .expect("iperf3 -c");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}
