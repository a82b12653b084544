//! How a TCP direction's bytes move: splice(2) through a pipe held only
//! while bytes are in flight (from a small pool of idle ones), or, when no
//! fd is free for a pipe, a copy through the loop's buffer.

use super::{Half, RateLimited, ACCEPT_PAUSE, PIPE_FDS, PIPE_SIZE, POOL_MAX, SPLICE_LEN};
use mio::net::TcpStream;
use nix::errno::Errno;
use nix::fcntl::{splice, OFlag, SpliceFFlags};
use std::io;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::time::Instant;

/// A pipe: (read end, write end).
pub(super) struct Pipe(pub(super) OwnedFd, pub(super) OwnedFd);

/// The pipes of the directions with bytes in flight, and the idle ones.
#[derive(Default)]
pub(super) struct Pipes {
    idle: Vec<Pipe>,
    /// Pipes open: held by a direction, or idle.
    open: usize,
    /// Making pipes waits until then (making one failed).
    paused_until: Option<Instant>,
    failed: RateLimited,
}

impl Pipes {
    pub(super) fn fds(&self) -> usize {
        self.open * PIPE_FDS
    }

    /// An idle pipe, or a new one if the pipes may hold `limit` fds in
    /// all; None when neither (the caller copies without one). Making one
    /// that fails (EMFILE) is not tried again for a while: no syscall
    /// storm, no spin.
    pub(super) fn take(&mut self, limit: usize) -> Option<Pipe> {
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
    pub(super) fn give(&mut self, p: Pipe) {
        if self.idle.len() < POOL_MAX {
            self.idle.push(p);
        } else {
            self.open -= 1;
        }
    }

    /// A held pipe closed with its connection.
    pub(super) fn closed(&mut self, p: Pipe) {
        drop(p);
        self.open -= 1;
    }

    /// Closes an idle pipe, to free its fds; false when none is idle.
    pub(super) fn close_idle(&mut self) -> bool {
        match self.idle.pop() {
            Some(p) => {
                self.closed(p);
                true
            }
            None => false,
        }
    }
}

pub(super) fn new_pipe() -> io::Result<Pipe> {
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
pub(super) fn pump(
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
pub(super) fn copy(from: &TcpStream, to: &TcpStream, buf: &mut [u8]) -> nix::Result<Option<usize>> {
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
