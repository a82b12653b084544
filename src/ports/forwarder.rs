//! The builtin driver's forwarder: one thread, one epoll loop (mio), for
//! every published port, TCP connection and UDP flow of the infra.
//!
//! The thread joins the infra's network namespace once, at start, so every
//! socket it makes (the infra side of a connection, a UDP flow's socket)
//! lives there; the host-side listeners are bound by the caller, in the
//! supervisor's own namespace, and handed over. TCP bytes move through a
//! pipe with non-blocking splice(2): they stay in the kernel. A direction
//! holds a pipe only while bytes are in flight: it takes one from a small
//! pool of idle pipes (or makes one) when it has bytes to move, and gives
//! it back once the pipe is empty again. Most held connections are idle:
//! they cost their two sockets only.
//!
//! Everything is bounded: connections and UDP flows per port and in total,
//! and the fds the loop may hold (from RLIMIT_NOFILE, leaving a reserve for
//! the rest of the supervisor, and room for the pipes of the directions
//! moving bytes at once). A direction that finds no idle pipe and no fd for
//! a new one copies through a buffer instead (bytes are taken off the
//! source only once the destination took them): slower, never stuck, never
//! a spin. A connection over a bound is accepted and
//! reset at once; those already forwarded are untouched. When accept fails
//! for want of fds, a spare fd is given up to take the waiting connection
//! off the queue and reset it, or the port is paused briefly: never a spin.

use super::client_addr::{self, Dial, Kept, Subnets};
use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token, Waker};
use nix::errno::Errno;
use nix::fcntl::{splice, OFlag, SpliceFFlags};
use std::collections::HashMap;
use std::io::{self, ErrorKind};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bounds of the forwarder; see `crate::infra::ForwardLimits` for the
/// configured values.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connections: usize,
    pub connections_per_port: usize,
    pub udp_flows: usize,
    pub udp_flows_per_port: usize,
    /// None: a TCP connection may stay idle for ever.
    pub tcp_idle: Option<Duration>,
    pub udp_idle: Duration,
}

/// A host-side socket, bound by the caller, and the port of the infra its
/// traffic goes to.
pub enum Listening {
    Tcp(std::net::TcpListener, u16),
    Udp(std::net::UdpSocket, u16),
}

enum Command {
    Add(String, Vec<Listening>, Sender<()>),
    /// Closes an attachment's ports with their connections and flows.
    Remove(String, Sender<()>),
    RemoveAll(Sender<()>),
    /// From now on, connections and flows come from their clients' own
    /// addresses (for the families set): the infra's routing is ready.
    KeepClientAddresses(Kept, Sender<()>),
    Stop,
}

const WAKE: Token = Token(0);
/// Addresses of the infra's interfaces changed (ids start at 2: no port,
/// connection or flow has this token).
const ADDRESSES: Token = Token(1);
/// A connection's infra side dials for at most this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often idle connections and flows are looked for.
const SWEEP: Duration = Duration::from_secs(1);
/// A port whose accept failed for want of fds waits this long.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// Fds left to the rest of the supervisor (control socket, state dir, log,
/// children's pipes) whatever the forwarder holds.
const FD_RESERVE: usize = 64;
/// Fds of one TCP connection: its two sockets. A direction with bytes in
/// flight holds a pipe too, while they are.
const CONN_FDS: usize = 2;
/// Fds of one pipe.
const PIPE_FDS: usize = 2;
/// Idle pipes kept for the next direction with bytes to move; more are
/// closed. Enough for the directions busy at once in practice, few enough
/// to stay within the user's pipe quota at full size (see `PIPE_SIZE`).
const POOL_MAX: usize = 32;
/// Fds no connection or flow may take: room for the pipes of this many
/// directions moving bytes at once, however many connections are held.
/// Beyond that, pipes are made while fds are free, and a direction that
/// finds none copies through a buffer.
const PIPE_ROOM: usize = 32 * PIPE_FDS;
/// Bytes asked of one splice(2); the pipe takes what fits.
const SPLICE_LEN: usize = 1 << 20;
/// Pipe capacity: larger moves more per wake-up. The kernel caps what an
/// unprivileged user's pipes may hold in total (`fs.pipe-user-pages-soft`,
/// 64 MiB by default), then gives small pipes, which still work. Pipes are
/// alive only while bytes are in flight (plus the idle pool), so nearly
/// all get the full size.
const PIPE_SIZE: i32 = 256 * 1024;
/// Connections taken off a port's queue before the loop looks elsewhere.
const ACCEPT_BATCH: usize = 256;
/// Datagrams read from one UDP socket (a port or a flow) before the loop
/// looks elsewhere: a sender faster than the forwarder would otherwise
/// never let the read see EAGAIN, and hold the loop (commands, DEL, every
/// other port) for as long as it sends.
const DATAGRAM_BATCH: usize = 256;
const LOG_EVERY: Duration = Duration::from_secs(5);

/// The running loop; dropping it stops the thread and closes everything.
pub struct Forwarder {
    tx: Sender<Command>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Starts the loop's thread in the network namespace `netns`, whose
    /// infra has IPv6 when `infra_ipv6`. Until `keep_client_addresses`,
    /// every connection comes from the infra's own address.
    pub fn start(netns: OwnedFd, limits: Limits, infra_ipv6: bool) -> io::Result<Forwarder> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
        let thread = std::thread::Builder::new()
            .name("forwarder".into())
            .spawn(move || {
                // Only this thread moves: the supervisor's other threads
                // stay where they are.
                if let Err(e) =
                    nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                {
                    let _ = ready_tx.send(Err(io::Error::from(e)));
                    return;
                }
                drop(netns);
                let _ = ready_tx.send(Ok(()));
                Loop::new(poll, rx, limits, infra_ipv6).run();
            })?;
        let started = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the forwarder thread died")));
        if let Err(e) = started {
            let _ = thread.join();
            return Err(e);
        }
        Ok(Forwarder {
            tx,
            waker,
            thread: Some(thread),
        })
    }

    /// Hands `sockets` to the loop under `key`; returns once they are
    /// served. False when the loop is gone: they are closed then.
    pub fn add(&self, key: &str, sockets: Vec<Listening>) -> bool {
        self.call(|done| Command::Add(key.to_string(), sockets, done))
    }

    /// Closes `key`'s ports; returns once they are closed.
    pub fn remove(&self, key: &str) {
        self.call(|done| Command::Remove(key.to_string(), done));
    }

    pub fn remove_all(&self) {
        self.call(Command::RemoveAll);
    }

    pub fn keep_client_addresses(&self, kept: Kept) {
        self.call(|done| Command::KeepClientAddresses(kept, done));
    }

    /// False when the loop is gone (it ended on an error, or panicked),
    /// and its sockets with it: what was asked was not done.
    fn call(&self, cmd: impl FnOnce(Sender<()>) -> Command) -> bool {
        let (done, wait) = mpsc::channel();
        self.tx.send(cmd(done)).is_ok() && self.waker.wake().is_ok() && wait.recv().is_ok()
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Stop);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One published host port.
struct Port {
    /// The same port on the infra's addresses, where portmap catches it.
    target: u16,
    kind: PortKind,
    /// Connections (TCP) or flows (UDP) now open.
    open: usize,
    /// Accepting waits until then (fds ran out).
    paused_until: Option<Instant>,
}

enum PortKind {
    Tcp(TcpListener),
    Udp(UdpSocket, HashMap<SocketAddr, usize>),
}

/// A pipe: (read end, write end).
struct Pipe(OwnedFd, OwnedFd);

/// One direction of a TCP connection.
#[derive(Default)]
struct Half {
    /// Held while bytes are in it (`in_pipe` > 0), or for one `pump`.
    pipe: Option<Pipe>,
    in_pipe: usize,
    /// The source said EOF.
    eof: bool,
    /// EOF was passed on to the destination.
    shut: bool,
}

struct Conn {
    port: usize,
    client: TcpStream,
    upstream: TcpStream,
    connected: bool,
    /// The dial to make if this one fails (see `client_addr::dials`).
    fallback: Option<Dial>,
    /// client → upstream, upstream → client.
    halves: [Half; 2],
    started: Instant,
    last: Instant,
}

struct Flow {
    port: usize,
    peer: SocketAddr,
    socket: UdpSocket,
    last: Instant,
    /// The dial to make if this one is refused before any answer, and the
    /// last datagram sent meanwhile, to send again through it.
    fallback: Option<Dial>,
    unanswered: Option<Vec<u8>>,
}

/// The pipes of the directions with bytes in flight, and the idle ones.
#[derive(Default)]
struct Pipes {
    idle: Vec<Pipe>,
    /// Pipes open: held by a direction, or idle.
    open: usize,
    /// Making pipes waits until then (making one failed).
    paused_until: Option<Instant>,
    failed: RateLimited,
}

impl Pipes {
    fn fds(&self) -> usize {
        self.open * PIPE_FDS
    }

    /// An idle pipe, or a new one if the pipes may hold `limit` fds in
    /// all; None when neither (the caller copies without one). Making one
    /// that fails (EMFILE) is not tried again for a while: no syscall
    /// storm, no spin.
    fn take(&mut self, limit: usize) -> Option<Pipe> {
        if let Some(p) = self.idle.pop() {
            return Some(p);
        }
        if self.fds() + PIPE_FDS > limit || self.paused_until.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        match new_pipe() {
            Ok(p) => {
                self.open += 1;
                self.paused_until = None;
                Some(p)
            }
            Err(e) => {
                self.paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                self.failed.warn(|| {
                    format!("forwarder: making a pipe: {e}; copying without one meanwhile")
                });
                None
            }
        }
    }

    /// An empty pipe back: kept for the next direction, or closed when
    /// enough are idle.
    fn give(&mut self, p: Pipe) {
        if self.idle.len() < POOL_MAX {
            self.idle.push(p);
        } else {
            self.open -= 1;
        }
    }

    /// A held pipe closed with its connection.
    fn closed(&mut self, p: Pipe) {
        drop(p);
        self.open -= 1;
    }

    /// Closes an idle pipe, to free its fds; false when none is idle.
    fn close_idle(&mut self) -> bool {
        match self.idle.pop() {
            Some(p) => {
                self.closed(p);
                true
            }
            None => false,
        }
    }
}

/// At most one line per `LOG_EVERY` for a kind of trouble, with a count of
/// the ones left out.
#[derive(Default)]
struct RateLimited {
    last: Option<Instant>,
    quiet: u64,
}

impl RateLimited {
    fn warn(&mut self, msg: impl FnOnce() -> String) {
        let now = Instant::now();
        if self.last.is_some_and(|l| now.duration_since(l) < LOG_EVERY) {
            self.quiet += 1;
            return;
        }
        let quiet = std::mem::take(&mut self.quiet);
        let more = if quiet > 0 {
            format!(" ({quiet} more like it not logged)")
        } else {
            String::new()
        };
        log::warn!("{}{more}", msg());
        self.last = Some(now);
    }
}

struct Loop {
    poll: Poll,
    rx: Receiver<Command>,
    limits: Limits,
    infra_ipv6: bool,
    kept: Kept,
    /// The infra's container networks, looked at again whenever an
    /// interface's address changes (a first ADD makes its bridge after its
    /// ports are published), which `address_events` tells.
    on_link: Subnets,
    address_events: Option<OwnedFd>,
    next_id: usize,
    ports: HashMap<usize, Port>,
    keys: HashMap<String, Vec<usize>>,
    conns: HashMap<usize, Conn>,
    flows: HashMap<usize, Flow>,
    /// Fds the loop holds now but pipes' (ports, sockets), and the fds it
    /// may hold at most, pipes' included.
    fds: usize,
    fd_budget: usize,
    pipes: Pipes,
    /// Given up to accept (and reset) a connection when fds ran out.
    spare: Option<std::fs::File>,
    buf: Vec<u8>,
    refused: RateLimited,
    no_fds: RateLimited,
    failures: RateLimited,
    /// Ports and UDP flows with more still queued after a batch.
    backlog: Vec<usize>,
}

impl Loop {
    fn new(poll: Poll, rx: Receiver<Command>, limits: Limits, infra_ipv6: bool) -> Self {
        Loop {
            poll,
            rx,
            limits,
            infra_ipv6,
            kept: Kept::default(),
            on_link: Subnets::default(),
            address_events: None,
            next_id: 1,
            ports: HashMap::new(),
            keys: HashMap::new(),
            conns: HashMap::new(),
            flows: HashMap::new(),
            fds: 0,
            fd_budget: fd_budget(),
            pipes: Pipes::default(),
            spare: std::fs::File::open("/dev/null").ok(),
            buf: vec![0u8; 65536],
            refused: RateLimited::default(),
            no_fds: RateLimited::default(),
            failures: RateLimited::default(),
            backlog: Vec::new(),
        }
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        let mut next_sweep = Instant::now() + SWEEP;
        loop {
            let now = Instant::now();
            let pause_end = self.ports.values().filter_map(|p| p.paused_until).min();
            let wake_at = pause_end.map_or(next_sweep, |p| p.min(next_sweep));
            // Rounded up by a millisecond: never woken early, so no busy loop.
            let timeout = if self.backlog.is_empty() {
                wake_at.saturating_duration_since(now) + Duration::from_millis(1)
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != ErrorKind::Interrupted {
                    log::error!("forwarder: epoll: {e}; forwarding stops");
                    return;
                }
            }
            for event in events.iter() {
                match event.token() {
                    WAKE => {}
                    ADDRESSES => self.addresses_changed(),
                    Token(t) => self.event(t >> 1),
                }
            }
            if !self.commands() {
                return;
            }
            let now = Instant::now();
            self.resume_paused(now);
            for id in std::mem::take(&mut self.backlog) {
                self.event(id);
            }
            if now >= next_sweep {
                self.sweep(now);
                next_sweep = now + SWEEP;
            }
        }
    }

    /// Serves waiting commands; false on Stop (or when the handle is gone).
    fn commands(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(Command::Add(key, sockets, done)) => {
                    for s in sockets {
                        self.add_port(&key, s);
                    }
                    let _ = done.send(());
                }
                Ok(Command::Remove(key, done)) => {
                    self.remove_key(&key);
                    let _ = done.send(());
                }
                Ok(Command::RemoveAll(done)) => {
                    let keys: Vec<String> = self.keys.keys().cloned().collect();
                    for k in keys {
                        self.remove_key(&k);
                    }
                    let _ = done.send(());
                }
                Ok(Command::KeepClientAddresses(kept, done)) => {
                    self.kept = kept;
                    self.watch_addresses();
                    let _ = done.send(());
                }
                Ok(Command::Stop) | Err(mpsc::TryRecvError::Disconnected) => return false,
                Err(mpsc::TryRecvError::Empty) => return true,
            }
        }
    }

    /// Starts watching the infra's addresses, and looks at them.
    fn watch_addresses(&mut self) {
        if self.kept == Kept::default() || self.address_events.is_some() {
            return;
        }
        match client_addr::address_events() {
            Ok(fd) => {
                let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
                let mut source = mio::unix::SourceFd(&raw);
                match self
                    .poll
                    .registry()
                    .register(&mut source, ADDRESSES, Interest::READABLE)
                {
                    Ok(()) => self.address_events = Some(fd),
                    Err(e) => log::warn!("forwarder: watching the infra's addresses: {e}"),
                }
            }
            Err(e) => log::warn!("forwarder: watching the infra's addresses: {e}"),
        }
        self.on_link = Subnets::of_this_netns();
    }

    fn addresses_changed(&mut self) {
        if let Some(events) = &self.address_events {
            client_addr::drain(events);
        }
        self.on_link = Subnets::of_this_netns();
    }

    fn new_id(&mut self) -> usize {
        self.next_id += 1;
        self.next_id
    }

    fn add_port(&mut self, key: &str, socket: Listening) {
        let id = self.new_id();
        let token = Token(id << 1);
        let (kind, target) = match socket {
            Listening::Tcp(l, target) => {
                let mut l = TcpListener::from_std(l);
                if let Err(e) = self
                    .poll
                    .registry()
                    .register(&mut l, token, Interest::READABLE)
                {
                    log::error!("forwarder: watching {:?}: {e}", l.local_addr());
                }
                (PortKind::Tcp(l), target)
            }
            Listening::Udp(s, target) => {
                let mut s = UdpSocket::from_std(s);
                if let Err(e) = self
                    .poll
                    .registry()
                    .register(&mut s, token, Interest::READABLE)
                {
                    log::error!("forwarder: watching {:?}: {e}", s.local_addr());
                }
                (PortKind::Udp(s, HashMap::new()), target)
            }
        };
        self.fds += 1;
        self.ports.insert(
            id,
            Port {
                target,
                kind,
                open: 0,
                paused_until: None,
            },
        );
        self.keys.entry(key.to_string()).or_default().push(id);
        // Whatever queued up between bind and now.
        self.event(id);
    }

    fn remove_key(&mut self, key: &str) {
        for id in self.keys.remove(key).unwrap_or_default() {
            if self.ports.remove(&id).is_some() {
                self.fds -= 1;
            }
            // Their container is gone: so is what was forwarded to it.
            let conns: Vec<usize> = self
                .conns
                .iter()
                .filter(|(_, c)| c.port == id)
                .map(|(k, _)| *k)
                .collect();
            for c in conns {
                self.close_conn(c);
            }
            let flows: Vec<usize> = self
                .flows
                .iter()
                .filter(|(_, f)| f.port == id)
                .map(|(k, _)| *k)
                .collect();
            for f in flows {
                self.close_flow(f);
            }
        }
    }

    fn event(&mut self, id: usize) {
        if self.conns.contains_key(&id) {
            self.conn_ready(id);
        } else if self.flows.contains_key(&id) {
            self.flow_ready(id);
        } else if let Some(port) = self.ports.get(&id) {
            if port.paused_until.is_some() {
                return;
            }
            match port.kind {
                PortKind::Tcp(_) => self.accept_all(id),
                PortKind::Udp(..) => self.udp_port_ready(id),
            }
        }
    }

    fn resume_paused(&mut self, now: Instant) {
        let due: Vec<usize> = self
            .ports
            .iter()
            .filter(|(_, p)| p.paused_until.is_some_and(|t| t <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if let Some(p) = self.ports.get_mut(&id) {
                p.paused_until = None;
            }
            // Edge-triggered: what queued while paused is taken now.
            self.event(id);
        }
    }

    /// Whether `n` more fds may be taken for sockets: the budget keeps
    /// `PIPE_ROOM` beyond them for pipes, and has them free now (idle pipes
    /// are closed to make it).
    fn room_for(&mut self, n: usize) -> bool {
        if self.fds + n + PIPE_ROOM > self.fd_budget {
            return false;
        }
        while self.fds + self.pipes.fds() + n > self.fd_budget {
            if !self.pipes.close_idle() {
                return false;
            }
        }
        true
    }

    /// Accepts what is queued on a TCP port, in batches: a flood cannot
    /// hold the loop, and commands (DEL) and other ports are served between
    /// batches.
    fn accept_all(&mut self, id: usize) {
        for _ in 0..ACCEPT_BATCH {
            let Some(port) = self.ports.get(&id) else {
                return;
            };
            let PortKind::Tcp(listener) = &port.kind else {
                return;
            };
            match listener.accept() {
                Ok((client, peer)) => {
                    let (on_port, target) = (port.open, port.target);
                    let admits = self.conns.len() < self.limits.connections
                        && on_port < self.limits.connections_per_port
                        && self.room_for(CONN_FDS);
                    if !admits {
                        let total = self.conns.len();
                        let addr = match self.ports.get(&id).map(|p| &p.kind) {
                            Some(PortKind::Tcp(l)) => l.local_addr().ok(),
                            _ => None,
                        };
                        refuse(client);
                        self.refused.warn(|| {
                            format!(
                                "forwarder: refused a connection from {peer} to {addr:?}: {on_port} on the port, {total} in all (limits maxConnectionsPerPort, maxConnections, or the fd limit)"
                            )
                        });
                        continue;
                    }
                    self.open_conn(id, client, peer, target);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if is_out_of_fds(&e) => {
                    // Take the waiting connection off the queue with the
                    // spare fd, so the queue drains and nothing spins; with
                    // no spare, wait a little.
                    self.no_fds
                        .warn(|| format!("forwarder: accept: {e}; refusing connections"));
                    let shed = match self.spare.take() {
                        Some(spare) => {
                            drop(spare);
                            // The connection is closed before the spare is
                            // taken again: it holds the one fd freed.
                            let shed = listener.accept().map(|(c, _)| refuse(c)).is_ok();
                            self.spare = std::fs::File::open("/dev/null").ok();
                            shed && self.spare.is_some()
                        }
                        None => {
                            self.spare = std::fs::File::open("/dev/null").ok();
                            false
                        }
                    };
                    if !shed {
                        self.pause(id);
                        return;
                    }
                }
                Err(e) => {
                    // ECONNABORTED and the like: that connection only.
                    self.failures.warn(|| format!("forwarder: accept: {e}"));
                    if !matches!(
                        e.raw_os_error(),
                        Some(libc::ECONNABORTED | libc::EPROTO | libc::EPERM)
                    ) {
                        self.pause(id);
                        return;
                    }
                }
            }
        }
        // The batch is done and more may wait: again after this round.
        self.backlog.push(id);
    }

    fn pause(&mut self, id: usize) {
        if let Some(p) = self.ports.get_mut(&id) {
            p.paused_until = Some(Instant::now() + ACCEPT_PAUSE);
        }
    }

    fn open_conn(&mut self, port: usize, client: TcpStream, peer: SocketAddr, target: u16) {
        let (first, fallback) =
            client_addr::dials(peer.ip(), target, self.kept, self.infra_ipv6, &self.on_link);
        let opened = (|| -> io::Result<Conn> {
            // This thread lives in the infra: the socket is made there.
            let (upstream, fallback) = match (client_addr::connect_tcp(&first), fallback) {
                (Ok(s), fallback) => (s, fallback),
                (Err(_), Some(other)) => (client_addr::connect_tcp(&other)?, None),
                (Err(e), None) => return Err(e),
            };
            let now = Instant::now();
            Ok(Conn {
                port,
                client,
                upstream,
                connected: false,
                fallback,
                halves: Default::default(),
                started: now,
                last: now,
            })
        })();
        let mut conn = match opened {
            Ok(c) => c,
            Err(e) => {
                self.failures.warn(|| {
                    format!(
                        "forwarder: connecting to {} in the infra for {peer}: {e}",
                        first.target
                    )
                });
                return;
            }
        };
        let id = self.new_id();
        let both = Interest::READABLE | Interest::WRITABLE;
        let registry = self.poll.registry();
        let registered = registry
            .register(&mut conn.client, Token(id << 1), both)
            .and_then(|_| registry.register(&mut conn.upstream, Token((id << 1) | 1), both));
        if let Err(e) = registered {
            self.failures
                .warn(|| format!("forwarder: watching a connection: {e}"));
            return;
        }
        self.fds += CONN_FDS;
        if let Some(p) = self.ports.get_mut(&port) {
            p.open += 1;
        }
        self.conns.insert(id, conn);
    }

    fn close_conn(&mut self, id: usize) {
        if let Some(c) = self.conns.remove(&id) {
            self.fds -= CONN_FDS;
            for h in c.halves {
                match h.pipe {
                    Some(p) if h.in_pipe == 0 => self.pipes.give(p),
                    // Bytes the destination never took: gone with it.
                    Some(p) => self.pipes.closed(p),
                    None => {}
                }
            }
            if let Some(p) = self.ports.get_mut(&c.port) {
                p.open -= 1;
            }
        }
    }

    fn conn_ready(&mut self, id: usize) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if !c.connected {
            match c.upstream.take_error() {
                Ok(None) => {}
                Ok(Some(_)) | Err(_) => return self.redial_or_close(id),
            }
            match c.upstream.peer_addr() {
                Ok(_) => {}
                // Still dialling.
                Err(e) if e.kind() == ErrorKind::NotConnected => return,
                Err(_) => return self.redial_or_close(id),
            }
            c.fallback = None;
            c.connected = true;
            let _ = c.client.set_nodelay(true);
            let _ = c.upstream.set_nodelay(true);
        }
        c.last = Instant::now();
        let [there, back] = &mut c.halves;
        // The fds pipes may hold in all, beside the sockets.
        let limit = self.fd_budget.saturating_sub(self.fds);
        let (pipes, buf) = (&mut self.pipes, &mut self.buf);
        let ok = pump(&c.client, &c.upstream, there, pipes, limit, buf)
            && pump(&c.upstream, &c.client, back, pipes, limit, buf);
        if !ok || (there.shut && back.shut) {
            if !ok {
                // An error on one side resets the other, as a direct
                // connection would have been.
                let _ = set_linger_zero(&c.client);
                let _ = set_linger_zero(&c.upstream);
            }
            self.close_conn(id);
        }
    }

    /// A dial that failed: the fallback dial in its place, if there is
    /// one, else the connection is closed.
    fn redial_or_close(&mut self, id: usize) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let Some(dial) = c.fallback.take() else {
            return self.close_conn(id);
        };
        let mut upstream = match client_addr::connect_tcp(&dial) {
            Ok(s) => s,
            Err(e) => {
                self.failures
                    .warn(|| format!("forwarder: connecting to {} in the infra: {e}", dial.target));
                return self.close_conn(id);
            }
        };
        let registry = self.poll.registry();
        let _ = registry.deregister(&mut c.upstream);
        let both = Interest::READABLE | Interest::WRITABLE;
        if registry
            .register(&mut upstream, Token((id << 1) | 1), both)
            .is_err()
        {
            return self.close_conn(id);
        }
        c.upstream = upstream;
    }

    fn udp_port_ready(&mut self, id: usize) {
        for _ in 0..DATAGRAM_BATCH {
            let Some(port) = self.ports.get(&id) else {
                return;
            };
            let PortKind::Udp(socket, peers) = &port.kind else {
                return;
            };
            let (n, peer) = match socket.recv_from(&mut self.buf) {
                Ok(r) => r,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                // EINTR, or an ICMP error from an earlier reply: that
                // datagram only.
                Err(_) => continue,
            };
            let flow = match peers.get(&peer) {
                Some(f) => *f,
                None => {
                    let (on_port, target) = (port.open, port.target);
                    let admits = self.flows.len() < self.limits.udp_flows
                        && on_port < self.limits.udp_flows_per_port
                        && self.room_for(1);
                    if !admits {
                        let total = self.flows.len();
                        self.refused.warn(|| {
                            format!("forwarder: dropped a datagram from {peer}: {on_port} UDP flows on the port, {total} in all (limits maxUdpFlowsPerPort, maxUdpFlows, or the fd limit)")
                        });
                        continue;
                    }
                    match self.open_flow(id, peer, target) {
                        Some(f) => f,
                        None => continue,
                    }
                }
            };
            if let Some(f) = self.flows.get_mut(&flow) {
                f.last = Instant::now();
                // A full socket buffer drops the datagram, as UDP may.
                let _ = f.socket.send(&self.buf[..n]);
                if f.fallback.is_some() {
                    let kept = f.unanswered.get_or_insert_with(Vec::new);
                    kept.clear();
                    kept.extend_from_slice(&self.buf[..n]);
                }
            }
        }
        // More may wait (edge-triggered: no new event for them): again
        // after this round.
        self.backlog.push(id);
    }

    fn open_flow(&mut self, port: usize, peer: SocketAddr, target: u16) -> Option<usize> {
        let (first, fallback) =
            client_addr::dials(peer.ip(), target, self.kept, self.infra_ipv6, &self.on_link);
        let opened = match (client_addr::connect_udp(&first), fallback) {
            (Ok(s), fallback) => Ok((s, fallback)),
            (Err(_), Some(other)) => client_addr::connect_udp(&other).map(|s| (s, None)),
            (Err(e), None) => Err(e),
        };
        let (mut socket, fallback) = match opened {
            Ok(s) => s,
            Err(e) => {
                self.failures.warn(|| {
                    format!(
                        "forwarder: UDP flow to {} in the infra for {peer}: {e}",
                        first.target
                    )
                });
                return None;
            }
        };
        let id = self.new_id();
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut socket, Token(id << 1), Interest::READABLE)
        {
            self.failures
                .warn(|| format!("forwarder: watching a UDP flow: {e}"));
            return None;
        }
        self.fds += 1;
        let p = self.ports.get_mut(&port)?;
        p.open += 1;
        if let PortKind::Udp(_, peers) = &mut p.kind {
            peers.insert(peer, id);
        }
        self.flows.insert(
            id,
            Flow {
                port,
                peer,
                socket,
                last: Instant::now(),
                fallback,
                unanswered: None,
            },
        );
        Some(id)
    }

    fn close_flow(&mut self, id: usize) {
        let Some(f) = self.flows.remove(&id) else {
            return;
        };
        self.fds -= 1;
        if let Some(p) = self.ports.get_mut(&f.port) {
            p.open -= 1;
            if let PortKind::Udp(_, peers) = &mut p.kind {
                peers.remove(&f.peer);
            }
        }
    }

    /// Replies from the container, back to the client through the port.
    fn flow_ready(&mut self, id: usize) {
        let Some(f) = self.flows.get_mut(&id) else {
            return;
        };
        let Some(Port {
            kind: PortKind::Udp(host, _),
            ..
        }) = self.ports.get(&f.port)
        else {
            return;
        };
        for _ in 0..DATAGRAM_BATCH {
            match f.socket.recv(&mut self.buf) {
                Ok(n) => {
                    f.last = Instant::now();
                    f.fallback = None;
                    f.unanswered = None;
                    let _ = host.send_to(&self.buf[..n], f.peer);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                // Refused before any answer: the other dial, if any.
                Err(e) if e.kind() == ErrorKind::ConnectionRefused && f.fallback.is_some() => {
                    return self.redial_flow(id);
                }
                // ICMP port unreachable and the like: nothing to pass on.
                Err(_) => continue,
            }
        }
        // As for the port: the rest after this round.
        self.backlog.push(id);
    }

    /// A flow whose dial was refused: its fallback dial in its place, and
    /// the datagram that was refused sent again through it.
    fn redial_flow(&mut self, id: usize) {
        let Some(f) = self.flows.get_mut(&id) else {
            return;
        };
        let Some(dial) = f.fallback.take() else {
            return;
        };
        let mut socket = match client_addr::connect_udp(&dial) {
            Ok(s) => s,
            Err(e) => {
                self.failures
                    .warn(|| format!("forwarder: UDP flow to {} in the infra: {e}", dial.target));
                return;
            }
        };
        let registry = self.poll.registry();
        if registry
            .register(&mut socket, Token(id << 1), Interest::READABLE)
            .is_err()
        {
            return;
        }
        let _ = registry.deregister(&mut f.socket);
        f.socket = socket;
        if let Some(datagram) = f.unanswered.take() {
            let _ = f.socket.send(&datagram);
        }
    }

    /// Ends connections and flows idle for too long, and dials that did not
    /// connect in time.
    fn sweep(&mut self, now: Instant) {
        // The limit may change under us (prlimit): follow it.
        self.fd_budget = fd_budget();
        let tcp_idle = self.limits.tcp_idle;
        let stale: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                (!c.connected && now.duration_since(c.started) > CONNECT_TIMEOUT)
                    || tcp_idle.is_some_and(|t| now.duration_since(c.last) > t)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            self.close_conn(id);
        }
        let udp_idle = self.limits.udp_idle;
        let idle: Vec<usize> = self
            .flows
            .iter()
            .filter(|(_, f)| now.duration_since(f.last) > udp_idle)
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            self.close_flow(id);
        }
    }
}

/// The fds the forwarder may hold: the soft RLIMIT_NOFILE less a reserve.
fn fd_budget() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    usize::try_from(soft)
        .unwrap_or(usize::MAX)
        .saturating_sub(FD_RESERVE)
}

fn is_out_of_fds(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Resets a connection at once: the client learns right away.
fn refuse(client: TcpStream) {
    let _ = set_linger_zero(&client);
    drop(client);
}

fn set_linger_zero(s: &TcpStream) -> nix::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::Linger, &linger)
}

fn new_pipe() -> io::Result<Pipe> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    let _ = nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&w),
        nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE),
    );
    Ok(Pipe(r, w))
}

/// Moves what `from` has to `to` until either would block: through a
/// pipe from `pipes` (which may hold `limit` fds in all), or, when none is
/// to be had, through `buf`. The pipe goes back to `pipes` once empty.
/// Edge-triggered: it stops only when no step makes progress, so every
/// stop waits on an event that will come (`from` readable, `to` writable).
/// False on an error: the connection is to be closed.
fn pump(
    from: &TcpStream,
    to: &TcpStream,
    half: &mut Half,
    pipes: &mut Pipes,
    limit: usize,
    buf: &mut [u8],
) -> bool {
    // No SPLICE_F_MORE: on the socket it corks small writes (an echo, a
    // request) for up to 200 ms.
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let ok = loop {
        let mut progress = false;
        if !half.eof && half.pipe.is_none() {
            half.pipe = pipes.take(limit);
        }
        match &half.pipe {
            Some(pipe) => {
                if !half.eof {
                    match splice(from, None, &pipe.1, None, SPLICE_LEN, flags) {
                        Ok(0) => {
                            half.eof = true;
                            progress = true;
                        }
                        Ok(n) => {
                            half.in_pipe += n;
                            progress = true;
                        }
                        Err(Errno::EAGAIN | Errno::EINTR) => {}
                        Err(_) => break false,
                    }
                }
                if half.in_pipe > 0 {
                    match splice(&pipe.0, None, to, None, half.in_pipe, flags) {
                        Ok(n) => {
                            half.in_pipe -= n;
                            progress = progress || n > 0;
                        }
                        Err(Errno::EAGAIN | Errno::EINTR) => {}
                        Err(_) => break false,
                    }
                }
            }
            None if !half.eof => match copy(from, to, buf) {
                Ok(None) => {
                    half.eof = true;
                    progress = true;
                }
                Ok(Some(n)) => progress = n > 0,
                Err(_) => break false,
            },
            None => {}
        }
        if half.eof && half.in_pipe == 0 && !half.shut {
            let _ = to.shutdown(Shutdown::Write);
            half.shut = true;
        }
        if !progress {
            break true;
        }
    };
    // Empty: back to the pool, for whichever direction moves next. (One
    // with bytes in it stays: `to` would block, and they wait for it.)
    if half.in_pipe == 0 {
        if let Some(p) = half.pipe.take() {
            pipes.give(p);
        }
    }
    ok
}

/// One step of a direction that got no pipe: what `to` takes of what
/// `from` has, through `buf`. Bytes are peeked and taken off `from` only
/// once `to` took them, so nothing waits here between calls. None at EOF,
/// else the bytes moved (0: one side would block).
fn copy(from: &TcpStream, to: &TcpStream, buf: &mut [u8]) -> nix::Result<Option<usize>> {
    use nix::sys::socket::{recv, send, MsgFlags};
    use std::os::fd::AsRawFd;
    let dontwait = MsgFlags::MSG_DONTWAIT;
    let n = match recv(from.as_raw_fd(), buf, MsgFlags::MSG_PEEK | dontwait) {
        Ok(0) => return Ok(None),
        Ok(n) => n,
        Err(Errno::EAGAIN | Errno::EINTR) => return Ok(Some(0)),
        Err(e) => return Err(e),
    };
    let sent = match send(to.as_raw_fd(), &buf[..n], MsgFlags::MSG_NOSIGNAL | dontwait) {
        Ok(w) => w,
        Err(Errno::EAGAIN | Errno::EINTR) => return Ok(Some(0)),
        Err(e) => return Err(e),
    };
    // Peeked, so there: this takes exactly what was sent. Anything else
    // (urgent data stops a read at its mark) would send bytes twice: the
    // connection is reset instead.
    let taken = recv(from.as_raw_fd(), &mut buf[..sent], dontwait)?;
    if taken != sent {
        return Err(Errno::EIO);
    }
    Ok(Some(taken))
}
