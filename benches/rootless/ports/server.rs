//! The echo server of the ports phase: the worker task `echo_server`, in a
//! container or on the host, one mio thread for any number of connections.

use super::{raise_nofile, FRAME, SERVER_READY};
use crate::Res;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::Duration;

pub(super) struct Peer {
    s: mio::net::TcpStream,
    inb: Vec<u8>,
    out: Vec<u8>,
    close_after: bool,
}

/// Serves `task.port` on every address until killed: frames as described
/// in the module doc.
pub(crate) fn echo_server(task: &Value) -> Res<Value> {
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
pub(super) fn listen(addr: SocketAddr) -> nix::Result<mio::net::TcpListener> {
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
pub(super) fn serve(p: &mut Peer, buf: &mut [u8]) -> bool {
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
