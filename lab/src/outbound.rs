//! The infra's two ways out, slirp4netns and pasta: the tests that prove
//! what either must do run once per engine, through these helpers.

use crate::{find_in_path, in_ci, outer};
use serde_json::Value;

/// The config's `outbound` values.
pub const SLIRP4NETNS: &str = "slirp4netns";
pub const PASTA: &str = "pasta";

/// Sets the rootless-cni entry's `outbound` to `engine`; slirp4netns, the
/// default, is left out, as a user's config would.
pub fn with_engine(conf: &mut Value, engine: &str) {
    match engine {
        SLIRP4NETNS => drop(outer(conf).remove("outbound")),
        other => drop(outer(conf).insert("outbound".into(), other.into())),
    }
}

/// The program `engine` runs.
pub fn program(engine: &str) -> &'static str {
    match engine {
        PASTA => "pasta",
        _ => "slirp4netns",
    }
}

/// Whether `engine` is installed. Missing: a failure under CI (scripts/deps
/// installs both), else false after saying the test is skipped.
pub fn available(engine: &str, test: &str) -> bool {
    if find_in_path(program(engine)).is_some() {
        return true;
    }
    let why = format!(
        "{test} needs {} (apt-get install {})",
        program(engine),
        if engine == PASTA {
            "passt"
        } else {
            "slirp4netns"
        }
    );
    assert!(!in_ci(), "{why}");
    eprintln!("skipping: {why}");
    false
}

/// The PID of the running way out, as `status --json` shows it.
pub fn engine_pid(status: &Value, engine: &str) -> Option<i32> {
    status["infra"][engine]["pid"].as_u64().map(|p| p as i32)
}

/// A UDP echo server on the host (`ip`, port chosen by the kernel): sends
/// back every datagram, counting them. Stopped on drop.
pub struct HostUdpEcho {
    pub port: u16,
    datagrams: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HostUdpEcho {
    pub fn start(ip: &str) -> HostUdpEcho {
        use std::sync::atomic::Ordering;
        let sock = std::net::UdpSocket::bind((ip, 0))
            .unwrap_or_else(|e| panic!("binding udp {ip}:0: {e}"));
        sock.set_read_timeout(Some(std::time::Duration::from_millis(100)))
            .expect("udp read timeout");
        let port = sock.local_addr().expect("local addr").port();
        let datagrams = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (d, s) = (datagrams.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    d.fetch_add(1, Ordering::Relaxed);
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        HostUdpEcho {
            port,
            datagrams,
            stop,
            thread: Some(thread),
        }
    }

    pub fn datagrams(&self) -> usize {
        self.datagrams.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for HostUdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `payload` over UDP from container `c` to `ip`:`port` and prints
/// the answer (python3: busybox's nc has no UDP).
pub fn udp_exchange(
    lab: &crate::Lab,
    c: &crate::Container,
    ip: &str,
    port: u16,
    payload: &str,
) -> crate::Out {
    let script = "import socket,sys\n\
        s=socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)\n\
        s.settimeout(2)\n\
        s.sendto(sys.argv[3].encode(),(sys.argv[1],int(sys.argv[2])))\n\
        print(s.recvfrom(2048)[0].decode())\n";
    let port = port.to_string();
    lab.in_netns(c, &["python3", "-c", script, ip, &port, payload])
}
