//! A UDP flood on a port the builtin driver publishes does not hold the
//! forwarder: ADD and DEL, of another container and of the flooded one,
//! answer at once.

use lab::port_forwarder::{add, del, lab_with, ECHO_PORT};
use lab::NET;
use serde_json::json;
use std::net::{Ipv4Addr, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

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
    let Some(lab) = lab_with(lab::binary!(), "fwd_udp_flood", json!({})) else {
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
