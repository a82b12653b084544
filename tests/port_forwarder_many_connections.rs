//! The builtin port driver's forwarder under many connections: 2,000
//! concurrent echoing TCP connections through one published port on a few
//! threads, each idle one holding its two sockets only (a pipe is taken
//! while bytes are in flight, and given back), and its bound: connections
//! over `maxConnectionsPerPort` are reset, those already forwarded keep
//! working.

use lab::port_forwarder::{
    add, del, echo, echo_server, echoing, lab_with, open_fds, open_many, raise_own_fd_limit,
    refused, supervisor_pid,
};
use serde_json::json;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::thread;
use std::time::{Duration, Instant};

/// A field of /proc/PID/status, as a number (kB for VmRSS).
fn proc_status(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
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
    if !lab::have_python3("the echo server") {
        return;
    }
    let Some(lab) = lab_with(
        lab::binary!(),
        "fwd_many",
        json!({"maxConnectionsPerPort": N}),
    ) else {
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
