//! TCP through the forwarder: accepting on a published port (bounded,
//! refused at once over a bound or for want of fds), dialling the infra
//! side (from the client's address when it can be kept), and moving a
//! connection's bytes both ways until both sides are done.

use super::pipes::pump;
use super::{client_addr, is_out_of_fds, Conn, Loop, PortKind, ACCEPT_BATCH, CONN_FDS};
use mio::net::TcpStream;
use mio::{Interest, Token};
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::time::Instant;

impl Loop {
    /// Accepts what is queued on a TCP port, in batches: a flood cannot
    /// hold the loop, and commands (DEL) and other ports are served between
    /// batches.
    pub(super) fn accept_all(&mut self, id: usize) {
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

    pub(super) fn open_conn(
        &mut self,
        port: usize,
        client: TcpStream,
        peer: SocketAddr,
        target: u16,
    ) {
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

    pub(super) fn close_conn(&mut self, id: usize) {
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

    pub(super) fn conn_ready(&mut self, id: usize) {
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
    pub(super) fn redial_or_close(&mut self, id: usize) {
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
