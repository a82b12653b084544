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

mod pipes;
mod tcp;
mod udp;

use super::client_addr::{self, Dial, Kept, Subnets};
use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token, Waker};
use pipes::{Pipe, Pipes};
use std::collections::HashMap;
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
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

    fn pause(&mut self, id: usize) {
        if let Some(p) = self.ports.get_mut(&id) {
            p.paused_until = Some(Instant::now() + ACCEPT_PAUSE);
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
