//! The builtin port driver: the supervisor listens on the host port in the
//! caller's network namespace and, per TCP connection or UDP flow, connects
//! from a socket made inside the infra's network namespace. One thread does
//! all of it (see `forwarder`), whatever the number of ports and
//! connections.

use super::client_addr::Kept;
use super::forwarder::{Forwarder, Limits, Listening};
use super::{Driver, PortMapping, Protocol};
use crate::error::{Error, Kind, Result};
use std::net::{TcpListener, UdpSocket};
use std::os::fd::OwnedFd;

pub struct Builtin {
    forwarder: Forwarder,
}

impl Builtin {
    /// Starts the forwarder's thread inside the infra's netns (whose infra
    /// has IPv6 when `infra_ipv6`).
    pub fn new(infra_netns: OwnedFd, limits: Limits, infra_ipv6: bool) -> Result<Self> {
        let forwarder = Forwarder::start(infra_netns, limits, infra_ipv6).map_err(|e| {
            Error::new(
                Kind::InfraStart,
                format!("starting the port forwarder in the infra's netns: {e}"),
            )
        })?;
        Ok(Builtin { forwarder })
    }
}

/// Binds the host side of `m` here, in the caller's namespace.
fn open(m: &PortMapping) -> Result<Listening> {
    let addr = m.listen_addr();
    let target = m.host_port;
    Ok(match m.protocol {
        Protocol::Tcp => {
            let listener = TcpListener::bind(addr).map_err(|e| bind_error(m, e))?;
            // std listens with a backlog of 128: a burst of clients would
            // lose SYNs and each wait a second for its retry. Listening
            // again raises it to the kernel's limit (somaxconn).
            nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::MAXALLOWABLE)
                .map_err(|e| bind_error(m, e.into()))?;
            listener.set_nonblocking(true)?;
            Listening::Tcp(listener, target)
        }
        Protocol::Udp => {
            let socket = UdpSocket::bind(addr).map_err(|e| bind_error(m, e))?;
            socket.set_nonblocking(true)?;
            Listening::Udp(socket, target)
        }
    })
}

impl Driver for Builtin {
    fn add(&mut self, key: &str, mappings: &[PortMapping]) -> Result<()> {
        // All bound first: on an error the ones bound are dropped, closed.
        let opened = mappings.iter().map(open).collect::<Result<Vec<_>>>()?;
        if !self.forwarder.add(key, opened) {
            // Never a success for ports nobody serves.
            return Err(Error::new(
                Kind::Internal,
                "the infra's port forwarder has stopped (see infra.log); \
                 the ports cannot be published until the infra is restarted",
            ));
        }
        for m in mappings {
            log::info!("forwarding {} (builtin)", m.describe());
        }
        Ok(())
    }

    fn remove(&mut self, key: &str) {
        self.forwarder.remove(key);
    }

    fn close_all(&mut self) {
        self.forwarder.remove_all();
    }

    fn keep_client_addresses(&mut self, kept: Kept) {
        self.forwarder.keep_client_addresses(kept);
    }
}

pub fn bind_error(m: &PortMapping, e: std::io::Error) -> Error {
    let hint = match e.raw_os_error() {
        Some(libc::EACCES) => " (ports below net.ipv4.ip_unprivileged_port_start need privileges)",
        Some(libc::EADDRNOTAVAIL) => " (no such local address)",
        _ => "",
    };
    let msg = format!("cannot publish host port {}: {e}{hint}", m.describe());
    Error::new(Kind::HostPort, msg).with_source(e)
}
