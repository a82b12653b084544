//! The builtin port driver's forwarder with a small fd limit (256):
//! stalled readers holding every pipe leave the other connections echoing
//! (the rest copy through a buffer), and a connection flood leaves the
//! control socket (ADD, DEL) working and the supervisor quiet and within
//! its limit.

use lab::port_forwarder::{
    add, del, echo, echo_server, echoing, lab_with, open_fds, open_many, raise_own_fd_limit,
    supervisor_pid,
};
use lab::Lab;
use serde_json::json;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
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
    if !lab::have_python3("the echo server") {
        return;
    }
    let Some(lab) = lab_with(lab::binary!(), "fwd_stalled", json!({})) else {
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
    if !lab::have_python3("the echo server") {
        return;
    }
    let Some(lab) = lab_with(lab::binary!(), "fwd_flood", json!({})) else {
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
