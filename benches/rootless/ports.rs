//! Phase 7 of `scripts/bench`, published ports at scale
//! (`scripts/bench --only ports` runs it alone):
//!
//! (a) N (10,000) concurrent connections held through one port published
//!     by the builtin driver, each echoing: the time to establish them all
//!     against the same client on a server on the host's loopback directly;
//!     the supervisor's threads, memory, fds and pipe sizes at the peak, and
//!     one iperf3 stream beside them;
//! (b) iperf3, 1 and 8 parallel streams, host → a server behind a published
//!     port: our builtin driver, our slirp4netns driver, rootlesskit's own
//!     builtin port driver and pasta's port forwarding, rounds alternating;
//! (c) short connections per second (connect, one 16-byte echo, close):
//!     builtin, slirp4netns, a server on the host's loopback directly;
//! (d) the slirp4netns driver with 500 connections opened at once.
//!
//! The echo server (the worker task `echo_server`, in a container or on the
//! host) and the client (in the driver, as root on the host) are ours, on
//! mio: one thread each for any number of connections. Every message is a
//! 16-byte frame whose first byte says what the server does with it: `e`
//! echo, `o` echo then close, `q` close. The server always closes first, so
//! TIME_WAIT stays with its accepted sockets and never takes the ephemeral
//! ports of the client or of the forwarder's side in the infra.

use crate::cleanup;
use crate::driver::{infra_pid, state_dir_path, status, Attached, Cx};
use crate::footprint::proc_kib;
use crate::iperf::{client_args, container_server, in_container, iperf_client, IPERF_PORT};
use crate::netconf::{conflist, stdin_conf, Chain, NetOpts};
use crate::procs::Background;
use crate::stats::{gbits, gbits_runs, median, mib, ms, ratio, ratio_runs};
use crate::Res;
use crate::WORKER_ARG;
use lab::host_tools::write_user_files;
use lab::{free_tcp_port, Container, Lab, LAB_PATH};
use lab::{retry, run_command};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The port the echo server listens on in containers.
const ECHO_PORT: u16 = 7;
/// What the echo server prints once it listens.
const SERVER_READY: &str = "bench echo server listening";
/// Fds the forwarder leaves to the rest of the supervisor (64), keeps free
/// for pipes (64) and holds per listening port (1), and fds per idle TCP
/// connection (src/ports/forwarder.rs): what the supervisor's fd limit
/// allows.
const FD_RESERVE: u64 = 64 + 64 + 1;
const CONN_FDS: u64 = 2;

/// How much of everything.
#[derive(Clone, Copy)]
pub struct Plan {
    /// (a) connections held at once.
    conns: usize,
    /// (a) rounds, each the direct server and the builtin driver.
    conn_rounds: usize,
    /// Connections the client has connecting (and echoing) at once.
    window: usize,
    /// (b) seconds per iperf3 run, and rounds.
    iperf_secs: u32,
    iperf_rounds: usize,
    /// (c) seconds per run, and rounds.
    cps_secs: f64,
    cps_rounds: usize,
    /// (d) connections opened at once through slirp4netns, and how long
    /// they get.
    slirp_conns: usize,
    slirp_bound: Duration,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                conns: 200,
                conn_rounds: 1,
                window: 256,
                iperf_secs: 1,
                iperf_rounds: 1,
                cps_secs: 0.5,
                cps_rounds: 1,
                slirp_conns: 20,
                slirp_bound: Duration::from_secs(3),
            }
        } else {
            Plan {
                conns: 10_000,
                conn_rounds: 2,
                window: 256,
                iperf_secs: 3,
                iperf_rounds: 4,
                cps_secs: 1.5,
                cps_rounds: 3,
                slirp_conns: 500,
                slirp_bound: Duration::from_secs(60),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Frames, and raising our own fd limit

const FRAME: usize = 16;

/// `kind`, then `i` in 14 digits, then a newline.
fn frame(kind: u8, i: usize) -> [u8; FRAME] {
    let mut f = [b'0'; FRAME];
    f[0] = kind;
    let digits = format!("{:014}", i % 100_000_000_000_000);
    f[1..15].copy_from_slice(digits.as_bytes());
    f[15] = b'\n';
    f
}

/// The hard RLIMIT_NOFILE that systemd (240 and later) gives services and
/// user sessions: what a user's runtime, and so its infra, usually has.
const SYSTEMD_NOFILE: u64 = 524_288;

/// The soft RLIMIT_NOFILE raised to the hard one; the hard one. As root
/// (CAP_SYS_RESOURCE) the hard one is first raised to systemd's default,
/// so the lab started after this (the infra among it) gets what a user's
/// session has, not what a CI shell happens to have.
pub(crate) fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    let nr_open = read_sysctl("fs.nr_open").parse().unwrap_or(hard);
    let wanted = hard.max(SYSTEMD_NOFILE.min(nr_open));
    if wanted > hard && setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted).is_ok() {
        return wanted;
    }
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    hard
}

// ---------------------------------------------------------------------------
// The echo server (worker task, in a container or on the host)

struct Peer {
    s: mio::net::TcpStream,
    inb: Vec<u8>,
    out: Vec<u8>,
    close_after: bool,
}

/// Serves `task.port` on every address until killed: frames as described
/// in the module doc.
pub fn echo_server(task: &Value) -> Res<Value> {
    use mio::{Events, Interest, Poll, Token};
    raise_nofile();
    let port = task["port"].as_u64().ok_or("task without port")? as u16;
    let addr = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port);
    let mut listener = listen(addr).map_err(|e| format!("listening on {addr}: {e}"))?;
    let mut poll = Poll::new().map_err(|e| format!("epoll: {e}"))?;
    const LISTENER: Token = Token(usize::MAX);
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .map_err(|e| format!("epoll: {e}"))?;
    println!("{SERVER_READY} on {addr}");
    let _ = std::io::stdout().flush();
    let mut peers: Vec<Option<Peer>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("epoll_wait: {e}"));
        }
        let mut ready: Vec<usize> = Vec::new();
        for ev in events.iter() {
            if ev.token() != LISTENER {
                ready.push(ev.token().0);
                continue;
            }
            loop {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let i = free.pop().unwrap_or_else(|| {
                            peers.push(None);
                            peers.len() - 1
                        });
                        if poll
                            .registry()
                            .register(&mut s, Token(i), Interest::READABLE | Interest::WRITABLE)
                            .is_err()
                        {
                            free.push(i);
                            continue;
                        }
                        peers[i] = Some(Peer {
                            s,
                            inb: Vec::new(),
                            out: Vec::new(),
                            close_after: false,
                        });
                        ready.push(i);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // Out of fds: the bench sizes the limits so that
                        // this does not happen; say so and let the
                        // clients time out rather than spin.
                        eprintln!("bench echo server: accept: {e}");
                        thread::sleep(Duration::from_millis(10));
                        break;
                    }
                }
            }
        }
        for i in ready {
            let keep = match peers.get_mut(i).and_then(Option::as_mut) {
                Some(p) => serve(p, &mut buf),
                None => continue,
            };
            if !keep {
                peers[i] = None;
                free.push(i);
            }
        }
    }
}

/// A listener with the largest backlog (somaxconn: 4096 by default):
/// std's and mio's 128 would drop SYNs of the client's bursts, and the
/// server is not what is measured.
fn listen(addr: SocketAddr) -> nix::Result<mio::net::TcpListener> {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn,
    };
    let SocketAddr::V4(v4) = addr else {
        return Err(nix::errno::Errno::EAFNOSUPPORT);
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(v4))?;
    nix::sys::socket::listen(&fd, Backlog::MAXALLOWABLE)?;
    Ok(mio::net::TcpListener::from_std(
        std::net::TcpListener::from(fd),
    ))
}

/// Reads what `p` has, answers its frames, writes what it can. False: the
/// connection is to be closed.
fn serve(p: &mut Peer, buf: &mut [u8]) -> bool {
    use std::io::ErrorKind::{Interrupted, WouldBlock};
    loop {
        match p.s.read(buf) {
            Ok(0) => return false,
            Ok(n) => p.inb.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == WouldBlock => break,
            Err(e) if e.kind() == Interrupted => continue,
            Err(_) => return false,
        }
    }
    let mut at = 0;
    while !p.close_after && p.inb.len() - at >= FRAME {
        let f = &p.inb[at..at + FRAME];
        match f[0] {
            b'e' => p.out.extend_from_slice(f),
            b'o' => {
                p.out.extend_from_slice(f);
                p.close_after = true;
            }
            b'q' => p.close_after = true,
            _ => return false,
        }
        at += FRAME;
    }
    p.inb.drain(..at);
    while !p.out.is_empty() {
        match p.s.write(&p.out) {
            Ok(n) => {
                p.out.drain(..n);
            }
            Err(e) if e.kind() == WouldBlock => break,
            Err(e) if e.kind() == Interrupted => continue,
            Err(_) => return false,
        }
    }
    !(p.close_after && p.out.is_empty())
}

// ---------------------------------------------------------------------------
// The client (in the driver)

mod client {
    use super::{frame, FRAME};
    use mio::net::TcpStream;
    use mio::{Events, Interest, Poll, Token};
    use std::io::{self, ErrorKind, Read, Write};
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    /// Why a connection failed.
    #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
    pub enum Fail {
        /// Refused at connect.
        Refused,
        /// Reset, or closed without the expected answer.
        Reset,
        /// No answer in time.
        Timeout,
        /// A wrong echo, or another error.
        Other,
    }

    fn fail_of(e: &io::Error) -> Fail {
        match e.kind() {
            ErrorKind::ConnectionRefused => Fail::Refused,
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
                Fail::Reset
            }
            ErrorKind::TimedOut => Fail::Timeout,
            _ => Fail::Other,
        }
    }

    #[derive(Clone, Copy, PartialEq, Debug)]
    enum St {
        Connecting,
        /// Sending `out`; then the echo if `echo`, then EOF if `eof`.
        Talking,
        /// Connected, the last exchange done, idle.
        Ready,
        /// Closed by the server as asked.
        Closed,
        Failed(Fail),
    }

    struct Conn {
        s: TcpStream,
        st: St,
        out: [u8; FRAME],
        sent: usize,
        echo: bool,
        eof: bool,
        inb: [u8; FRAME],
        got: usize,
        since: Instant,
    }

    impl Conn {
        fn connect(addr: SocketAddr) -> io::Result<Conn> {
            Ok(Conn {
                s: TcpStream::connect(addr)?,
                st: St::Connecting,
                out: [0; FRAME],
                sent: 0,
                echo: false,
                eof: false,
                inb: [0; FRAME],
                got: 0,
                since: Instant::now(),
            })
        }

        /// Begins an exchange (once connected: `drive` does it).
        fn talk(&mut self, out: [u8; FRAME], echo: bool, eof: bool) {
            self.out = out;
            (self.sent, self.got, self.echo, self.eof) = (0, 0, echo, eof);
            self.since = Instant::now();
            if self.st != St::Connecting {
                self.st = St::Talking;
            }
        }

        fn busy(&self) -> bool {
            matches!(self.st, St::Connecting | St::Talking)
        }

        /// Moves the exchange on as far as it goes without blocking
        /// (edge-triggered: called on every event and after every change).
        fn drive(&mut self) {
            if self.st == St::Connecting {
                match self.s.take_error() {
                    Ok(Some(e)) | Err(e) => return self.st = St::Failed(fail_of(&e)),
                    Ok(None) => {}
                }
                match self.s.peer_addr() {
                    Ok(_) => self.st = St::Talking,
                    Err(e)
                        if e.kind() == ErrorKind::NotConnected
                            || e.raw_os_error() == Some(libc::EINPROGRESS) =>
                    {
                        return
                    }
                    Err(e) => return self.st = St::Failed(fail_of(&e)),
                }
            }
            if self.st != St::Talking {
                return;
            }
            while self.sent < FRAME {
                match self.s.write(&self.out[self.sent..]) {
                    Ok(n) => self.sent += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return self.st = St::Failed(fail_of(&e)),
                }
            }
            while self.echo {
                match self.s.read(&mut self.inb[self.got..]) {
                    Ok(0) => return self.st = St::Failed(Fail::Reset),
                    Ok(n) => {
                        self.got += n;
                        if self.got == FRAME {
                            if self.inb != self.out {
                                return self.st = St::Failed(Fail::Other);
                            }
                            self.echo = false;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return self.st = St::Failed(fail_of(&e)),
                }
            }
            if !self.eof {
                self.st = St::Ready;
                return;
            }
            let mut b = [0u8; FRAME];
            loop {
                match self.s.read(&mut b) {
                    // Our side closes too: the forwarder lets go of a
                    // connection once both sides have.
                    Ok(0) => {
                        let _ = self.s.shutdown(std::net::Shutdown::Both);
                        return self.st = St::Closed;
                    }
                    Ok(_) => return self.st = St::Failed(Fail::Other),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    // A reset after the server's close: closed all the same.
                    Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                        return self.st = St::Closed
                    }
                    Err(e) => return self.st = St::Failed(fail_of(&e)),
                }
            }
        }
    }

    /// What a batch of exchanges came to.
    #[derive(Default, Debug)]
    pub struct Outcome {
        pub ok: usize,
        pub failed: std::collections::BTreeMap<Fail, usize>,
        /// From the start to the last connection settled (ok or failed).
        pub wall: Duration,
        /// From the start to each success, in order.
        pub ok_at: Vec<Duration>,
        /// The first failure, described.
        pub first_failure: Option<String>,
    }

    impl Outcome {
        pub fn failures(&self) -> usize {
            self.failed.values().sum()
        }

        /// "Reset 3, Timeout 2".
        pub fn failed_text(&self) -> String {
            let v: Vec<String> = self
                .failed
                .iter()
                .map(|(f, n)| format!("{f:?} {n}"))
                .collect();
            if v.is_empty() {
                "none".into()
            } else {
                v.join(", ")
            }
        }
    }

    /// Connections held open, all registered with one epoll.
    pub struct Held {
        poll: Poll,
        conns: Vec<Conn>,
    }

    impl Held {
        /// Waits up to 20 ms for events and moves the connections they name.
        fn wait_and_drive(&mut self, events: &mut Events) -> io::Result<()> {
            match self.poll.poll(events, Some(Duration::from_millis(20))) {
                Err(e) if e.kind() != ErrorKind::Interrupted => return Err(e),
                _ => {}
            }
            for ev in events.iter() {
                if let Some(c) = self.conns.get_mut(ev.token().0) {
                    if c.busy() {
                        c.drive();
                    }
                }
            }
            Ok(())
        }

        /// Opens `n` connections to `addr`, at most `window` connecting or
        /// echoing at once, each echoing one frame. A connection not done
        /// within `each` fails (Timeout); the whole stops at `bound`.
        pub fn open(
            addr: SocketAddr,
            n: usize,
            window: usize,
            each: Duration,
            bound: Duration,
        ) -> io::Result<(Held, Outcome)> {
            let mut h = Held {
                poll: Poll::new()?,
                conns: Vec::with_capacity(n),
            };
            let mut out = Outcome::default();
            let start = Instant::now();
            let mut inflight: Vec<usize> = Vec::new();
            let mut events = Events::with_capacity(1024);
            let mut attempted = 0;
            loop {
                while inflight.len() < window && attempted < n && start.elapsed() < bound {
                    let i = h.conns.len();
                    attempted += 1;
                    match Conn::connect(addr) {
                        Ok(mut c) => {
                            h.poll.registry().register(
                                &mut c.s,
                                Token(i),
                                Interest::READABLE | Interest::WRITABLE,
                            )?;
                            c.talk(frame(b'e', i), true, false);
                            h.conns.push(c);
                            inflight.push(i);
                        }
                        Err(e) => {
                            *out.failed.entry(fail_of(&e)).or_default() += 1;
                            out.first_failure
                                .get_or_insert_with(|| format!("connect {attempted}: {e}"));
                        }
                    }
                }
                if inflight.is_empty() && (attempted == n || start.elapsed() >= bound) {
                    break;
                }
                h.wait_and_drive(&mut events)?;
                let over = start.elapsed() >= bound;
                let conns = &mut h.conns;
                inflight.retain(|&i| {
                    let c = &mut conns[i];
                    if c.busy() && (over || c.since.elapsed() >= each) {
                        c.st = St::Failed(Fail::Timeout);
                    }
                    match c.st {
                        St::Ready => {
                            out.ok += 1;
                            out.ok_at.push(start.elapsed());
                            false
                        }
                        St::Failed(f) => {
                            *out.failed.entry(f).or_default() += 1;
                            out.first_failure
                                .get_or_insert_with(|| format!("connection {i}: {f:?}"));
                            false
                        }
                        _ => true,
                    }
                });
            }
            // Connections never started (the bound passed) count as timed out.
            let never = n - attempted;
            if never > 0 {
                *out.failed.entry(Fail::Timeout).or_default() += never;
            }
            out.wall = start.elapsed();
            Ok((h, out))
        }

        pub fn ready(&self) -> usize {
            self.conns.iter().filter(|c| c.st == St::Ready).count()
        }

        /// The ready connections.
        fn ready_ones(&self) -> Vec<usize> {
            (0..self.conns.len())
                .filter(|&i| self.conns[i].st == St::Ready)
                .collect()
        }

        /// One exchange on each of `targets`, at most `window` at once.
        fn exchange(
            &mut self,
            targets: Vec<usize>,
            kind: u8,
            echo: bool,
            eof: bool,
            window: usize,
            each: Duration,
        ) -> io::Result<Outcome> {
            let mut out = Outcome::default();
            let start = Instant::now();
            let mut todo: Vec<usize> = targets.into_iter().rev().collect();
            let mut inflight: Vec<usize> = Vec::new();
            let mut events = Events::with_capacity(1024);
            while !todo.is_empty() || !inflight.is_empty() {
                while inflight.len() < window {
                    let Some(i) = todo.pop() else { break };
                    let c = &mut self.conns[i];
                    c.talk(frame(kind, i), echo, eof);
                    c.drive();
                    inflight.push(i);
                }
                self.wait_and_drive(&mut events)?;
                let conns = &mut self.conns;
                inflight.retain(|&i| {
                    let c = &mut conns[i];
                    if c.busy() && c.since.elapsed() >= each {
                        c.st = St::Failed(Fail::Timeout);
                    }
                    match c.st {
                        St::Ready | St::Closed => {
                            out.ok += 1;
                            out.ok_at.push(start.elapsed());
                            false
                        }
                        St::Failed(f) => {
                            *out.failed.entry(f).or_default() += 1;
                            out.first_failure
                                .get_or_insert_with(|| format!("connection {i}: {f:?}"));
                            false
                        }
                        _ => true,
                    }
                });
            }
            out.wall = start.elapsed();
            Ok(out)
        }

        /// Asks the server to close `k` of the ready connections.
        pub fn close_some(&mut self, k: usize, each: Duration) -> io::Result<Outcome> {
            let some: Vec<usize> = self.ready_ones().into_iter().take(k).collect();
            self.exchange(some, b'q', false, true, k.max(1), each)
        }

        /// Every ready connection echoes once more.
        pub fn echo_again(&mut self, window: usize, each: Duration) -> io::Result<Outcome> {
            let all = self.ready_ones();
            self.exchange(all, b'e', true, false, window, each)
        }

        /// Asks the server to close every ready connection and waits for
        /// it; the rest are dropped.
        pub fn close(mut self, window: usize, each: Duration) -> io::Result<Outcome> {
            let all = self.ready_ones();
            self.exchange(all, b'q', false, true, window, each)
        }
    }

    /// Short connections for `secs`, `concurrency` at a time: connect,
    /// one frame echoed, the server closes. How many completed and failed.
    pub fn short(addr: SocketAddr, concurrency: usize, secs: f64) -> io::Result<Outcome> {
        let mut poll = Poll::new()?;
        let mut slots: Vec<Option<Conn>> = (0..concurrency).map(|_| None).collect();
        let mut out = Outcome::default();
        let mut events = Events::with_capacity(1024);
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(secs);
        let mut n = 0usize;
        while Instant::now() < end {
            for (i, slot) in slots.iter_mut().enumerate() {
                if slot.is_some() {
                    continue;
                }
                match Conn::connect(addr) {
                    Ok(mut c) => {
                        poll.registry().register(
                            &mut c.s,
                            Token(i),
                            Interest::READABLE | Interest::WRITABLE,
                        )?;
                        c.talk(frame(b'o', n), true, true);
                        n += 1;
                        *slot = Some(c);
                    }
                    Err(e) => {
                        *out.failed.entry(fail_of(&e)).or_default() += 1;
                        out.first_failure
                            .get_or_insert_with(|| format!("connect: {e}"));
                    }
                }
            }
            let left = end.saturating_duration_since(Instant::now());
            poll.poll(&mut events, Some(left.min(Duration::from_millis(20))))
                .or_else(|e| {
                    if e.kind() == ErrorKind::Interrupted {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })?;
            for ev in events.iter() {
                if let Some(Some(c)) = slots.get_mut(ev.token().0) {
                    if c.busy() {
                        c.drive();
                    }
                }
            }
            for slot in slots.iter_mut() {
                let Some(c) = slot else { continue };
                match c.st {
                    St::Closed => {
                        out.ok += 1;
                        *slot = None;
                    }
                    St::Failed(f) => {
                        *out.failed.entry(f).or_default() += 1;
                        out.first_failure
                            .get_or_insert_with(|| format!("a short connection: {f:?}"));
                        *slot = None;
                    }
                    _ => {}
                }
            }
        }
        out.wall = start.elapsed();
        Ok(out)
    }
}

use client::{Held, Outcome};

// ---------------------------------------------------------------------------
// Servers and the supervisor, from the driver

/// A process and everything it started, killed on drop (by pid: its
/// descendants are listed before any is killed, so that none is re-parented
/// out of sight).
struct Tree(Background);

impl Drop for Tree {
    fn drop(&mut self) {
        for pid in lab::descendants(self.0.child.id()) {
            lab::sigkill(pid);
        }
    }
}

/// Starts `cmd` (stdout piped to us, stderr to `log`) and waits until a
/// line of its stdout contains `ready`; on failure the log's tail says why.
fn start_logged(mut cmd: Command, what: &str, ready: &str, log: &Path) -> Res<Tree> {
    let file = fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    cmd.stdout(Stdio::piped()).stderr(file);
    let mut bg = Background::spawn(cmd, what)?;
    if let Err(e) = bg.wait_for_line(ready, Duration::from_secs(15)) {
        let text = fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().filter(|l| !l.contains("to syslog")).collect();
        let tail = tail[tail.len().saturating_sub(5)..].join(" | ");
        return Err(format!("{e}: {tail}"));
    }
    Ok(Tree(bg))
}

/// Our echo server (the worker task) in container `c`, or on the host's
/// loopback (as root) when None.
fn echo_server_in(cx: &Cx, c: Option<&Container>, port: u16, what: &str) -> Res<Tree> {
    let argv = [cx.worker.clone(), WORKER_ARG.to_string()];
    let mut cmd = match c {
        Some(c) => in_container(cx, c, &argv),
        None => {
            let mut cmd = Command::new(&cx.worker);
            cmd.arg(WORKER_ARG);
            cmd
        }
    };
    // The task on stdin (as every worker task), then the ready line.
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().map_err(|e| format!("starting {what}: {e}"))?;
    cleanup::with(|l| l.pids.push(child.id()));
    let stdin = child.stdin.take();
    let mut bg = Background {
        child,
        what: what.to_string(),
    };
    let task = json!({ "task": "echo_server", "port": port }).to_string();
    stdin
        .ok_or("no stdin")?
        .write_all(task.as_bytes())
        .map_err(|e| format!("{what}: writing the task: {e}"))?;
    bg.wait_for_line(SERVER_READY, Duration::from_secs(10))?;
    Ok(Tree(bg))
}

/// A lab of its own for a peer of (b): its own uid, so that the peer has
/// the pipe quota of a user of its own, as our drivers have the main lab's
/// (pasta alone keeps 32 pipes of 1 MiB, half of `fs.pipe-user-pages-soft`;
/// sharing a uid, whoever runs later would get small pipes). Its processes
/// are killed with it, or by the bench's cleanup on a signal.
fn peer_lab(name: &str) -> Res<Lab> {
    let lab = Lab::new(lab::binary!(), name).ok_or_else(|| format!("no lab for {name}"))?;
    cleanup::with(|l| {
        l.more_uids.push(lab.uid);
        l.dirs.push(lab.dir.clone());
    });
    Ok(lab)
}

/// An iperf3 server in a namespace of rootlesskit's own
/// (`--net=slirp4netns --port-driver=builtin`), its port published on the
/// host's 127.0.0.1 by `rootlessctl add-ports`. rootlesskit runs as the
/// lab's uid, which newuidmap wants in /etc/passwd with a subordinate
/// range: copies are bound over the machine's files in root's private mount
/// namespace, as the tests do, with the lab's tun node.
fn rootlesskit_iperf(lab: &Lab, port: u16) -> Res<Tree> {
    write_user_files(lab, "rcnibench");
    let d = lab.dir.display().to_string();
    let u = lab.uid;
    let state = format!("{d}/rootlesskit-bench");
    let inner = format!(
        "set -e
         mount --bind {d}/tun /dev/net/tun
         for f in passwd group subuid subgid; do mount --bind {d}/etc-$f /etc/$f; done
         exec setpriv --reuid {u} --regid {u} --clear-groups -- env -i PATH={LAB_PATH} HOME={d} \
           rootlesskit --net=slirp4netns --disable-host-loopback --port-driver=builtin \
             --state-dir={state} iperf3 -s -p {port} --forceflush"
    );
    let mut cmd = lab.host_command("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &inner])
        .env_clear()
        .env("PATH", LAB_PATH)
        // mount(8) as real root keeps its utab under the machine's /run.
        .env("LIBMOUNT_UTAB", lab::utab());
    let tree = start_logged(
        cmd,
        "rootlesskit's iperf3 server",
        "Server listening",
        &lab.dir.join("rootlesskit-bench.log"),
    )?;
    let spec = format!("127.0.0.1:{port}:{port}/tcp");
    let socket = format!("{state}/api.sock");
    let out = retry(Duration::from_secs(10), || {
        let mut c = Command::new("rootlessctl");
        c.args(["--socket", &socket, "add-ports", &spec]);
        run_command(
            c,
            format!("rootlessctl add-ports {spec}"),
            None,
            Duration::from_secs(10),
        )
    });
    if !out.ok() {
        return Err(format!("rootlessctl add-ports: {out}"));
    }
    Ok(tree)
}

/// An iperf3 server in a namespace of pasta's own, its port forwarded from
/// the host's 127.0.0.1 by `pasta -t 127.0.0.1/PORT` (the form Debian's
/// pasta 0.0~git20230309 takes: address/port; no port forwarded the other
/// way). pasta runs as the lab's uid with the lab's tun node.
fn pasta_iperf(lab: &Lab, port: u16) -> Res<Tree> {
    let d = lab.dir.display().to_string();
    let u = lab.uid;
    let inner = format!(
        "set -e
         mount --bind {d}/tun /dev/net/tun
         exec setpriv --reuid {u} --regid {u} --clear-groups -- env -i PATH={LAB_PATH} HOME={d} \
           pasta --config-net --foreground --quiet -t 127.0.0.1/{port} -u none -T none -U none \
             -- iperf3 -s -p {port} --forceflush"
    );
    let mut cmd = lab.host_command("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &inner])
        .env_clear()
        .env("PATH", LAB_PATH)
        .env("LIBMOUNT_UTAB", lab::utab());
    start_logged(
        cmd,
        "pasta's iperf3 server",
        "Server listening",
        &lab.dir.join("pasta-bench.log"),
    )
}

/// The supervisor at the peak of (a).
struct Peak {
    threads: u64,
    rss_kib: u64,
    hwm_kib: u64,
    fds: usize,
    /// Pipe capacity in bytes → how many pipes.
    pipes: BTreeMap<usize, usize>,
}

fn peak(sup: u64) -> Peak {
    let status = |k: &str| proc_kib(sup, "status", k).unwrap_or(0);
    let mut fds = 0;
    let mut seen = std::collections::HashSet::new();
    let mut pipes = BTreeMap::new();
    let dir = format!("/proc/{sup}/fd");
    for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
        fds += 1;
        let Ok(link) = fs::read_link(e.path()) else {
            continue;
        };
        let link = link.display().to_string();
        if !link.starts_with("pipe:") || !seen.insert(link) {
            continue;
        }
        // Opened anew through /proc (as a FIFO, without blocking): the
        // capacity is the pipe's, whichever end this fd is.
        let opened = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(e.path());
        if let Ok(f) = opened {
            if let Ok(size) = nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_GETPIPE_SZ) {
                *pipes.entry(size as usize).or_default() += 1;
            }
        }
    }
    Peak {
        threads: status("Threads:"),
        rss_kib: status("VmRSS:"),
        hwm_kib: status("VmHWM:"),
        fds,
        pipes,
    }
}

/// "Max open files" of a process: (soft, hard).
fn nofile(pid: u64) -> Option<(u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut f = line["Max open files".len()..].split_whitespace();
    Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
}

/// Open fds of a process.
fn fd_count(pid: u64) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The listen backlog of the TCP socket listening on 127.0.0.1:`port`, as
/// ss shows it (Send-Q of a listener).
fn backlog(port: u16) -> String {
    let out = Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output();
    out.ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines()
                .next()?
                .split_whitespace()
                .nth(2)
                .map(String::from)
        })
        .unwrap_or_else(|| "?".into())
}

/// "256 × 256 KiB, 6388 × 8 KiB".
fn pipe_sizes(p: &Peak) -> String {
    p.pipes
        .iter()
        .rev()
        .map(|(size, count)| format!("{count} × {}", kib(*size)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs `run(i)` for each of `k` contenders, `rounds` times, the order
/// rotating from round to round; each contender's results.
fn alternate_n(
    rounds: usize,
    k: usize,
    mut run: impl FnMut(usize) -> Res<f64>,
) -> Res<Vec<Vec<f64>>> {
    let mut out = vec![Vec::new(); k];
    for r in 0..rounds {
        for j in 0..k {
            let i = (r + j) % k;
            out[i].push(run(i)?);
        }
    }
    Ok(out)
}

/// TcpExt ListenOverflows of the host's network namespace (all of it:
/// other work on the machine counts too): SYNs dropped because a
/// listener's accept queue was full.
fn listen_overflows() -> u64 {
    let text = fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

fn read_sysctl(name: &str) -> String {
    fs::read_to_string(format!("/proc/sys/{}", name.replace('.', "/")))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

fn kib(bytes: usize) -> String {
    if bytes >= 1024 * 1024 {
        format!("{} MiB", bytes / 1024 / 1024)
    } else {
        format!("{} KiB", bytes / 1024)
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// The time by which `share` of `n` had succeeded, if they had.
fn time_to(out: &Outcome, n: usize, share: f64) -> Option<Duration> {
    let k = ((n as f64) * share).ceil() as usize;
    out.ok_at.get(k.max(1) - 1).copied()
}

// ---------------------------------------------------------------------------
// The phase

/// (measure, result, (target, met)).
type Line = (String, String, Option<(String, bool)>);

pub fn phase(cx: &mut Cx, section: &'static str) -> Res<()> {
    let p = cx.plan.ports;
    // The client holds every connection of (a) in this process.
    let own_hard = raise_nofile();
    let mut rows: Vec<Line> = Vec::new();
    let mut details: Vec<String> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    {
        let cx: &Cx = cx;
        let (b_echo, b_iperf) = (free_tcp_port(), free_tcp_port());
        let (s_echo, s_iperf) = (free_tcp_port(), free_tcp_port());
        let d_echo = free_tcp_port();
        let mapping = |echo: u16, iperf: u16| {
            json!({ "portMappings": [
                { "hostPort": echo, "containerPort": ECHO_PORT, "protocol": "tcp", "hostIP": "127.0.0.1" },
                { "hostPort": iperf, "containerPort": IPERF_PORT, "protocol": "tcp", "hostIP": "127.0.0.1" },
            ] })
        };
        let builtin_conf = NetOpts::default();
        let slirp_conf = NetOpts {
            state_dir: Some(state_dir_path(cx, "bench-ports-slirp")),
            port_driver: Some("slirp4netns"),
            ..NetOpts::default()
        };
        let conf = |o: &NetOpts, rc: Value| stdin_conf(&conflist(Chain::Full, o), Some(rc));
        let pb = Attached::add(
            cx,
            "bench-ports-builtin",
            conf(&builtin_conf, mapping(b_echo, b_iperf)),
        )?;
        let ps = Attached::add(
            cx,
            "bench-ports-slirp",
            conf(&slirp_conf, mapping(s_echo, s_iperf)),
        )?;
        let _echo_b = echo_server_in(cx, Some(&pb.c), ECHO_PORT, "echo server (builtin)")?;
        let _echo_s = echo_server_in(cx, Some(&ps.c), ECHO_PORT, "echo server (slirp4netns)")?;
        let _echo_d = echo_server_in(cx, None, d_echo, "echo server on the host's loopback")?;
        let _iperf_b = container_server(cx, &pb.c, "iperf3 server (builtin)")?;
        let _iperf_s = container_server(cx, &ps.c, "iperf3 server (slirp4netns)")?;
        let sup = infra_pid(&status(cx, None)?, "supervisor")?;
        let local = |port: u16| SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
        rows.push((
            "listen backlog of the host port (ss): builtin / slirp4netns / the echo server on the host's loopback".into(),
            format!("{} / {} / {}", backlog(b_echo), backlog(s_echo), backlog(d_echo)),
            None,
        ));

        progress!("published ports: (a) {} connections held", p.conns);
        match held_many(&p, sup, local(b_echo), local(d_echo), b_iperf, own_hard) {
            Ok((r, d)) => {
                rows.extend(r);
                details.push(d);
            }
            Err(e) => errors.push(format!("(a): {e}")),
        }
        progress!(
            "published ports: (d) slirp4netns driver, {} connections at once",
            p.slirp_conns
        );
        match slirp_many(&p, local(s_echo), local(b_echo)) {
            Ok(r) => rows.extend(r),
            Err(e) => errors.push(format!("(d): {e}")),
        }
        progress!("published ports: (c) short connections per second");
        match per_second(&p, local(b_echo), local(s_echo), local(d_echo)) {
            Ok(r) => rows.extend(r),
            Err(e) => errors.push(format!("(c): {e}")),
        }
        progress!("published ports: (b) iperf3 through each driver, rootlesskit and pasta");
        match throughput(&p, b_iperf, s_iperf) {
            Ok((r, d)) => {
                rows.extend(r);
                details.push(d);
            }
            Err(e) => errors.push(format!("(b): {e}")),
        }
        drop((pb, ps));
    }
    for (measure, result, target) in rows {
        match target {
            Some((t, met)) => cx.report.target(section, measure, result, &t, met),
            None => cx.report.fig(section, measure, result),
        }
    }
    details.push(METHOD.to_string());
    cx.report.details.extend(details);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// (a): rounds of N held connections, the direct server and the builtin
/// driver alternating (ABBA); the supervisor measured at the peak of each
/// builtin round, and one iperf3 stream through the driver beside the held
/// connections and after they closed.
fn held_many(
    p: &Plan,
    sup: u64,
    builtin: SocketAddr,
    direct: SocketAddr,
    iperf_port: u16,
    own_hard: u64,
) -> Res<(Vec<Line>, String)> {
    let n = p.conns;
    let each = Duration::from_secs(10);
    let bound = Duration::from_secs(120);
    let (soft, hard) = nofile(sup).ok_or("no fd limit of the supervisor")?;
    let base_fds = fd_count(sup) as u64;
    // What the forwarder can hold: its fd budget (the soft limit, raised to
    // the hard one at start, less the reserve) over the fds per connection.
    let capacity = (soft.saturating_sub(FD_RESERVE) / CONN_FDS) as usize;
    if own_hard < n as u64 + 64 {
        return Err(format!(
            "the bench's own fd hard limit ({own_hard}) cannot hold {n} client sockets: \
             raise it (ulimit -Hn) as root with CAP_SYS_RESOURCE"
        ));
    }
    let expect = n.min(capacity);
    let iperf = |what: &str| {
        let mut c = Command::new("iperf3");
        c.args(&client_args("127.0.0.1", iperf_port, p.iperf_secs)[1..]);
        iperf_client(c, what)
    };
    let (mut t_direct, mut t_builtin) = (Vec::new(), Vec::new());
    let (mut bw_held, mut bw_free) = (Vec::new(), Vec::new());
    let mut served_min = usize::MAX;
    let mut reset_max = 0;
    // (connections held, VmRSS before, the supervisor at the peak), per
    // builtin round
    let mut peaks: Vec<(usize, u64, Peak)> = Vec::new();
    let mut again_ms = Vec::new();
    let mut overflows = (0, 0);
    let mut close_ms = Vec::new();
    for r in 0..p.conn_rounds {
        let order = if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for through in order {
            let (addr, what) = if through {
                (builtin, "builtin driver")
            } else {
                (direct, "host loopback directly")
            };
            let before = listen_overflows();
            let rss_before = proc_kib(sup, "status", "VmRSS:").unwrap_or(0);
            let (mut held, opened) = Held::open(addr, n, p.window, each, bound)
                .map_err(|e| format!("{what}: client: {e}"))?;
            let dropped = listen_overflows().saturating_sub(before);
            if through {
                overflows.0 += dropped;
            } else {
                overflows.1 += dropped;
            }
            progress!(
                "published ports: (a) {what}: {} of {n} echoing in {} (failed: {})",
                opened.ok,
                secs(opened.wall),
                opened.failed_text()
            );
            if !through {
                if opened.ok < n {
                    return Err(format!(
                        "{what}: {} of {n} connections failed; first: {}",
                        opened.failures(),
                        opened.first_failure.unwrap_or_default()
                    ));
                }
                t_direct.push(opened.wall.as_secs_f64() * 1e3);
            } else {
                let hung = opened.failed.get(&client::Fail::Timeout).copied();
                if opened.ok + 10 < expect || hung.is_some() {
                    return Err(format!(
                        "{what}: {} of {n} connections echo, {expect} expected (fd budget \
                         {capacity}); failed: {}; first: {}",
                        opened.ok,
                        opened.failed_text(),
                        opened.first_failure.unwrap_or_default()
                    ));
                }
                served_min = served_min.min(opened.ok);
                reset_max = reset_max.max(opened.failures());
                t_builtin.push(opened.wall.as_secs_f64() * 1e3);
                peaks.push((opened.ok, rss_before, peak(sup)));
            }
            let again = held
                .echo_again(p.window, each)
                .map_err(|e| format!("{what}: client: {e}"))?;
            if again.failures() > 0 {
                return Err(format!(
                    "{what}: {} of {} held connections did not echo again: {}",
                    again.failures(),
                    held.ready(),
                    again.failed_text()
                ));
            }
            again_ms.push((through, again.wall.as_secs_f64() * 1e3));
            if through {
                // At the fd bound, room for iperf3's two connections.
                if opened.ok < n {
                    let fds = fd_count(sup);
                    held.close_some(4, each)
                        .map_err(|e| format!("{what}: client: {e}"))?;
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while fd_count(sup) + 2 * CONN_FDS as usize > fds && Instant::now() < deadline {
                        thread::sleep(Duration::from_millis(20));
                    }
                }
                bw_held.push(iperf("iperf3 beside the held connections")?);
            }
            let closed = held
                .close(p.window, each)
                .map_err(|e| format!("{what}: client: {e}"))?;
            close_ms.push((through, closed.wall.as_secs_f64() * 1e3));
            if through {
                // The forwarder lets go of its side once both are closed.
                let deadline = Instant::now() + Duration::from_secs(10);
                while fd_count(sup) as u64 > base_fds + 8 && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(50));
                }
                bw_free.push(iperf("iperf3 with no connection held")?);
            }
        }
    }
    let mut rows: Vec<Line> = Vec::new();
    let all = served_min >= n;
    rows.push((
        format!("(a) {n} concurrent echoing connections through one port, builtin driver: served (fewest of {} rounds)", p.conn_rounds),
        if all {
            format!("{served_min} of {n}")
        } else {
            format!(
                "{served_min} of {n}; {reset_max} reset at once: the supervisor's fd limit \
                 {soft} (hard {hard}) holds {capacity} at {CONN_FDS} fds each"
            )
        },
        Some((format!("all {n}"), all)),
    ));
    let (td, tb) = (median(&t_direct), median(&t_builtin));
    rows.push((
        format!("(a) time to establish them all (connect + first echo, {} at a time): builtin / host loopback directly", p.window),
        format!("{} / {}", ms(tb), ms(td)),
        None,
    ));
    rows.push((
        "(a) SYNs dropped for a full accept queue while establishing (host-wide ListenOverflows, all rounds): builtin / direct".into(),
        format!("{} / {}", overflows.0, overflows.1),
        None,
    ));
    rows.push((
        "(a) ratio of those times builtin / direct".into(),
        if all {
            ratio(tb / td)
        } else {
            format!(
                "{} (builtin served {served_min}, direct {n})",
                ratio(tb / td)
            )
        },
        None,
    ));
    let threads = peaks.iter().map(|p| p.2.threads).max().unwrap_or(0);
    rows.push((
        "(a) supervisor threads at the peak".into(),
        threads.to_string(),
        Some(("≤ 8".into(), threads <= 8)),
    ));
    let rss = peaks.iter().map(|p| p.2.rss_kib).max().unwrap_or(0);
    let hwm = peaks.iter().map(|p| p.2.hwm_kib).max().unwrap_or(0);
    // What a held connection adds (KiB), the most of any round.
    let per_conn = peaks
        .iter()
        .map(|(held, before, pk)| pk.rss_kib.saturating_sub(*before) as f64 / (*held).max(1) as f64)
        .fold(0.0, f64::max);
    let base = peaks.iter().map(|p| p.1).max().unwrap_or(0);
    // With fewer held than N, the target is judged on N at the same cost
    // per connection.
    let projected = base as f64 + per_conn * n as f64;
    let rss_ok = if all {
        rss <= 64 * 1024
    } else {
        projected <= 64.0 * 1024.0
    };
    rows.push((
        "(a) supervisor VmRSS at the peak (VmHWM)".into(),
        if all {
            format!(
                "{} ({}): {} before, {per_conn:.2} KiB more per connection",
                mib(rss),
                mib(hwm),
                mib(base)
            )
        } else {
            format!(
                "{} ({}) with {served_min} held: {} before, {per_conn:.2} KiB more per \
                 connection, ≈ {} for {n}",
                mib(rss),
                mib(hwm),
                mib(base),
                mib(projected as u64)
            )
        },
        Some(("≤ 64 MiB".into(), rss_ok)),
    ));
    let fds = peaks.iter().map(|p| p.2.fds).max().unwrap_or(0);
    rows.push((
        "(a) supervisor fds at the peak; its RLIMIT_NOFILE soft / hard".into(),
        format!("{fds}; {soft} / {hard}"),
        None,
    ));
    let again_b: Vec<f64> = again_ms.iter().filter(|a| a.0).map(|a| a.1).collect();
    let again_d: Vec<f64> = again_ms.iter().filter(|a| !a.0).map(|a| a.1).collect();
    let close_b: Vec<f64> = close_ms.iter().filter(|a| a.0).map(|a| a.1).collect();
    let close_d: Vec<f64> = close_ms.iter().filter(|a| !a.0).map(|a| a.1).collect();
    rows.push((
        "(a) every held connection echoes again: builtin / direct; closing them all".into(),
        format!(
            "{} / {}; {} / {}",
            ms(median(&again_b)),
            ms(median(&again_d)),
            ms(median(&close_b)),
            ms(median(&close_d))
        ),
        None,
    ));
    let pipe_text = peaks.last().map(|p| pipe_sizes(&p.2)).unwrap_or_default();
    rows.push((
        format!(
            "(a) the supervisor's pipes at the peak (fs.pipe-user-pages-soft = {} pages)",
            read_sysctl("fs.pipe-user-pages-soft")
        ),
        pipe_text.clone(),
        None,
    ));
    rows.push((
        "(a) one iperf3 stream through the builtin driver beside the held connections / none held"
            .into(),
        format!("{} / {}", gbits_runs(&bw_held), gbits_runs(&bw_free)),
        None,
    ));
    let md = format!(
        "### 7. Published ports: the supervisor at the peak of (a)\n\n\
         | round | held | threads | VmRSS | VmHWM | fds | pipes |\n|---|---|---|---|---|---|---|\n{}\n\n\
         An unprivileged user's pipes may hold `fs.pipe-user-pages-soft` pages in all ({}); \
         over it, a new pipe gets 2 pages (8 KiB) and cannot be grown. The forwarder asks \
         256 KiB (64 pages) per pipe, and only a direction moving bytes, or the idle pool \
         of 32, holds one: held connections cost no pipe (the pipes column; the iperf3 \
         row). Pipe buffers and socket buffers are kernel memory, not in \
         VmRSS. The bench's own fd hard limit: {own_hard}.\n",
        peaks
            .iter()
            .enumerate()
            .map(|(i, (held, _, pk))| format!(
                "| {} | {held} | {} | {} | {} | {} | {} |",
                i + 1,
                pk.threads,
                mib(pk.rss_kib),
                mib(pk.hwm_kib),
                pk.fds,
                pipe_sizes(pk)
            ))
            .collect::<Vec<_>>()
            .join("\n"),
        read_sysctl("fs.pipe-user-pages-soft"),
    );
    Ok((rows, md))
}

/// (d): the slirp4netns driver with `slirp_conns` connections opened at
/// once, for at most `slirp_bound`; the builtin driver the same way.
fn slirp_many(p: &Plan, slirp: SocketAddr, builtin: SocketAddr) -> Res<Vec<Line>> {
    let n = p.slirp_conns;
    let mut rows = Vec::new();
    for (addr, what) in [(slirp, "slirp4netns"), (builtin, "builtin")] {
        let (held, out) = Held::open(addr, n, n, p.slirp_bound, p.slirp_bound)
            .map_err(|e| format!("{what}: client: {e}"))?;
        progress!(
            "published ports: (d) {what}: {} of {n} in {} (failed: {})",
            out.ok,
            secs(out.wall),
            out.failed_text()
        );
        if what == "builtin" && out.ok < n {
            return Err(format!(
                "builtin: {} of {n} opened at once failed: {}",
                out.failures(),
                out.failed_text()
            ));
        }
        let half = time_to(&out, n, 0.5).map_or("not reached".into(), secs);
        let last = out.ok_at.last().copied().map_or("none".into(), secs);
        rows.push((
            format!(
                "(d) {n} connections opened at once, {what} driver: echoing within {} (half by; the last at)",
                secs(p.slirp_bound)
            ),
            format!("{} of {n} (half: {half}; last: {last})", out.ok),
            None,
        ));
        let _ = held.close(n, Duration::from_secs(5));
    }
    Ok(rows)
}

/// (c): short connections per second, 1 and 8 at a time, rounds rotating
/// the order of builtin, slirp4netns and direct.
fn per_second(
    p: &Plan,
    builtin: SocketAddr,
    slirp: SocketAddr,
    direct: SocketAddr,
) -> Res<Vec<Line>> {
    let who = [
        ("builtin", builtin),
        ("slirp4netns", slirp),
        ("host loopback directly", direct),
    ];
    let mut rows = Vec::new();
    for conc in [1usize, 8] {
        let runs = alternate_n(p.cps_rounds, who.len(), |i| {
            let (what, addr) = who[i];
            let out = client::short(addr, conc, p.cps_secs)
                .map_err(|e| format!("{what}: client: {e}"))?;
            // The slirp4netns driver drops connections (see (d)); ours and
            // the direct one must not.
            if what != "slirp4netns" && out.failures() > 0 {
                return Err(format!(
                    "{what}: {} short connections failed: {}; first: {}",
                    out.failures(),
                    out.failed_text(),
                    out.first_failure.unwrap_or_default()
                ));
            }
            Ok(out.ok as f64 / out.wall.as_secs_f64())
        })?;
        let text = |v: &[f64]| {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!("{:.0}/s (runs {lo:.0}–{hi:.0})", median(v))
        };
        rows.push((
            format!("(c) short connections, {conc} at a time: builtin / slirp4netns / host loopback directly"),
            format!(
                "{} / {} / {}",
                text(&runs[0]),
                text(&runs[1]),
                text(&runs[2])
            ),
            None,
        ));
        rows.push((
            format!("(c) ratio builtin / direct, builtin / slirp4netns ({conc} at a time)"),
            format!(
                "{} / {}",
                ratio_runs(&runs[0], &runs[2]).1,
                ratio_runs(&runs[0], &runs[1]).1
            ),
            None,
        ));
    }
    Ok(rows)
}

/// (b): iperf3 host → server behind a published port, 1 and 8 streams,
/// our two drivers, rootlesskit's builtin port driver and pasta, rounds
/// rotating the order.
fn throughput(p: &Plan, b_port: u16, s_port: u16) -> Res<(Vec<Line>, String)> {
    let (rk_port, pa_port) = (free_tcp_port(), free_tcp_port());
    let (rk_lab, pa_lab) = (peer_lab("bench-rootlesskit")?, peer_lab("bench-pasta")?);
    let rk = rootlesskit_iperf(&rk_lab, rk_port)?;
    let pa = pasta_iperf(&pa_lab, pa_port)?;
    let who = [
        ("rootless-cni builtin", b_port),
        ("rootless-cni slirp4netns", s_port),
        ("rootlesskit builtin", rk_port),
        ("pasta -t", pa_port),
    ];
    let mut rows: Vec<Line> = Vec::new();
    let mut md = String::from(
        "### 7. Published ports: iperf3 host → a server behind a published port (Gbit/s, median (runs))\n\n\
         | | 1 stream | 8 streams |\n|---|---|---|\n",
    );
    let mut by: Vec<[Vec<f64>; 2]> = Vec::new();
    for (k, streams) in [1u32, 8].into_iter().enumerate() {
        let runs = alternate_n(p.iperf_rounds, who.len(), |i| {
            let (what, port) = who[i];
            let mut args = client_args("127.0.0.1", port, p.iperf_secs);
            if streams > 1 {
                args.extend(["-P".to_string(), streams.to_string()]);
            }
            let mut c = Command::new("iperf3");
            c.args(&args[1..]);
            iperf_client(c, &format!("{what}, {streams} stream(s)"))
        })?;
        for (i, r) in runs.into_iter().enumerate() {
            if by.len() <= i {
                by.push([Vec::new(), Vec::new()]);
            }
            by[i][k] = r;
        }
    }
    for (i, (what, _)) in who.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {what} | {} | {} |",
            gbits_runs(&by[i][0]),
            gbits_runs(&by[i][1])
        );
    }
    for (k, streams) in ["1 stream", "8 streams"].iter().enumerate() {
        rows.push((
            format!("(b) iperf3 host → container, {streams}: builtin / slirp4netns / rootlesskit builtin / pasta -t"),
            by.iter()
                .map(|b| gbits(median(&b[k])))
                .collect::<Vec<_>>()
                .join(" / "),
            None,
        ));
        for (j, target) in [(1, 3.0), (2, 1.0), (3, 1.0)] {
            let (r, text) = ratio_runs(&by[0][k], &by[j][k]);
            rows.push((
                format!("(b) ratio builtin / {} ({streams})", who[j].0),
                text,
                Some((format!("≥ {target}×"), r >= target)),
            ));
        }
    }
    drop((rk, pa));
    for lab in [rk_lab, pa_lab] {
        let uid = lab.uid;
        drop(lab);
        cleanup::with(|l| l.more_uids.retain(|u| *u != uid));
    }
    Ok((rows, md))
}

const METHOD: &str = "### 7. Published ports: how it is measured\n\n\
The client is the bench itself (root, the host's loopback), on one epoll loop; the server is \
the bench's worker, an epoll echo server, in a container behind `127.0.0.1:hostPort` (an \
infra per port driver, by `stateDir`) or on the host's 127.0.0.1. Frames are 16 bytes; the \
server closes first. (a) N connections, 256 connecting at once, each echoing a frame: the \
time until all echoed (or failed), against the same client and server on the host's loopback \
directly, rounds alternating (ABBA); at the peak the supervisor's /proc status (threads, \
VmRSS, VmHWM), fds and pipe sizes (F_GETPIPE_SZ of each pipe, opened through /proc); every \
held connection then echoes again, one iperf3 stream runs through another port of the same \
driver beside them, and the server closes them. Connections over the forwarder's fd budget \
are reset by it at once (a refusal, not a failure). (b) iperf3 `-t` seconds, `-P 1` and \
`-P 8`, the four in rotating order each round: our builtin and slirp4netns drivers; \
rootlesskit 1.1 (`--net=slirp4netns --port-driver=builtin`, `rootlessctl add-ports \
127.0.0.1:P:P/tcp`) and pasta (`pasta --config-net -t 127.0.0.1/P -u none -T none -U none`), \
each running an iperf3 server in a namespace of its own, as the uid of a lab of its \
own (a user's pipe quota each: pasta keeps 32 pipes of 1 MiB). (c) connect, one \
frame echoed, the server closes; 1 or 8 such at a time for a fixed time, rotating order. \
(d) all connections started at once, given a fixed time.\n";
