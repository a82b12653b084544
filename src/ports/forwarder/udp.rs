//! UDP through the forwarder: a flow per client address and port, each
//! with its own socket into the infra, bounded and forgotten when idle.

use super::{client_addr, Flow, Loop, Port, PortKind, DATAGRAM_BATCH};
use mio::{Interest, Token};
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Instant;

impl Loop {
    pub(super) fn udp_port_ready(&mut self, id: usize) {
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

    pub(super) fn open_flow(
        &mut self,
        port: usize,
        peer: SocketAddr,
        target: u16,
    ) -> Option<usize> {
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

    pub(super) fn close_flow(&mut self, id: usize) {
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
    pub(super) fn flow_ready(&mut self, id: usize) {
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
    pub(super) fn redial_flow(&mut self, id: usize) {
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
}
