//! The client of the ports phase (in the driver, as root on the host), on
//! mio: connections held open and echoing, and short connections.

use super::{frame, FRAME};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Why a connection failed.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(super) enum Fail {
    /// Refused at connect.
    Refused,
    /// Reset, or closed without the expected answer.
    Reset,
    /// No answer in time.
    Timeout,
    /// A wrong echo, or another error.
    Other,
}

pub(super) fn fail_of(e: &io::Error) -> Fail {
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
pub(super) enum St {
    Connecting,
    /// Sending `out`; then the echo if `echo`, then EOF if `eof`.
    Talking,
    /// Connected, the last exchange done, idle.
    Ready,
    /// Closed by the server as asked.
    Closed,
    Failed(Fail),
}

pub(super) struct Conn {
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
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return self.st = St::Closed,
                Err(e) => return self.st = St::Failed(fail_of(&e)),
            }
        }
    }
}

/// What a batch of exchanges came to.
#[derive(Default, Debug)]
pub(super) struct Outcome {
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
    /// Counts a failure; the first one is described by `what`.
    fn count_failure(&mut self, f: Fail, what: impl FnOnce() -> String) {
        *self.failed.entry(f).or_default() += 1;
        self.first_failure.get_or_insert_with(what);
    }

    /// Counts connection `i` if it has settled: a success (`succeeded`,
    /// `start` to now) or a failure. Whether it is still going.
    fn settle(&mut self, i: usize, st: &St, succeeded: bool, start: Instant) -> bool {
        if succeeded {
            self.ok += 1;
            self.ok_at.push(start.elapsed());
            return false;
        }
        if let St::Failed(f) = *st {
            self.count_failure(f, || format!("connection {i}: {f:?}"));
            return false;
        }
        true
    }

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
pub(super) struct Held {
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
                        out.count_failure(fail_of(&e), || format!("connect {attempted}: {e}"));
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
                out.settle(i, &c.st, matches!(c.st, St::Ready), start)
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
                out.settle(i, &c.st, matches!(c.st, St::Ready | St::Closed), start)
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
pub(super) fn short(addr: SocketAddr, concurrency: usize, secs: f64) -> io::Result<Outcome> {
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
                    out.count_failure(fail_of(&e), || format!("connect: {e}"));
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
                    out.count_failure(f, || format!("a short connection: {f:?}"));
                    *slot = None;
                }
                _ => {}
            }
        }
    }
    out.wall = start.elapsed();
    Ok(out)
}
