//! The state dir's locks: the lifecycle lock every call takes to change
//! the infra or the records, the first-chain lock, and the markers of the
//! networks whose inner chain ran once (which need it no more).

use super::attachment::escape;
use super::{io_error, StateDir, FIRST_CHAIN_LOCK_FILE, LOCK_FILE, LOCK_TIMEOUT, WARM_DIR};
use crate::error::{Error, Kind, Result};
use crate::sys;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};
use serde_json::{Map, Value};
use std::fs;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

/// Held while lifecycle and records change; released on drop.
pub struct StateLock {
    _file: Flock<fs::File>,
}

impl StateDir {
    /// Takes the lifecycle lock, waiting at most `lock_timeout`.
    pub fn lock(&self) -> Result<StateLock> {
        self.wait_for_lock(LOCK_FILE)
    }

    /// The lock for cleaning up after a failure, which must not be given up
    /// as quickly as a call's: at least the default `lockTimeout`.
    pub fn lock_patiently(&self) -> Result<StateLock> {
        self.clone()
            .with_lock_timeout(self.lock_timeout.max(LOCK_TIMEOUT))
            .lock()
    }

    /// Taken by ADDs of a network whose inner chain has not yet succeeded
    /// once in this infra: the reference plugins create their iptables
    /// chains check-then-create, and two first ADDs at once race there
    /// (`CHAIN_USER_ADD failed (File exists)`). Once the chains exist, ADDs
    /// run in parallel without it.
    pub fn first_chain_lock(&self) -> Result<StateLock> {
        self.wait_for_lock(FIRST_CHAIN_LOCK_FILE)
    }

    /// The name of the marker that a network's inner chain ran once in this
    /// infra with these capabilities in use. An empty one does not count:
    /// portmap makes its chains only for mappings, and containerd sends
    /// `portMappings: []` for every pod without ports.
    pub fn warm_marker(&self, network: &str, capabilities: &Map<String, Value>) -> String {
        let mut name = escape(network);
        let in_use = capabilities.iter().filter(|(_, v)| !is_empty_arg(v));
        for (cap, _) in in_use {
            name.push('+');
            name.push_str(&escape(cap));
        }
        name
    }

    /// Whether the marker `name` (of `warm_marker`) is there.
    pub fn is_warm(&self, name: &str) -> bool {
        let Ok(warm) = self.open_dir(WARM_DIR) else {
            return false;
        };
        nix::sys::stat::fstatat(
            Some(warm.as_raw_fd()),
            name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .is_ok()
    }

    /// Leaves the marker `name` (of `warm_marker`).
    pub fn mark_warm(&self, name: &str) -> Result<()> {
        let warm = self.open_dir(WARM_DIR)?;
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW;
        sys::openat(warm.as_fd(), name.as_ref(), flags, 0o600)
            .map(drop)
            .map_err(|e| {
                io_error(
                    e,
                    format!("marking {}", self.file(WARM_DIR).join(name).display()),
                )
            })
    }

    fn open_lock(&self, name: &str) -> Result<fs::File> {
        self.open_file(name, true)
    }

    fn wait_for_lock(&self, name: &str) -> Result<StateLock> {
        let mut file = self.open_lock(name)?;
        let deadline = crate::sys::deadline(self.lock_timeout);
        let mut pause = Duration::from_micros(200);
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(locked) => return Ok(StateLock { _file: locked }),
                Err((f, Errno::EWOULDBLOCK | Errno::EINTR)) if Instant::now() < deadline => {
                    file = f;
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                Err((_, Errno::EWOULDBLOCK | Errno::EINTR)) => {
                    return Err(Error::new(
                        Kind::TryAgainLater,
                        format!(
                            "lock {} still held after {}s by another call; try again later (lockTimeout)",
                            self.file(name).display(),
                            self.lock_timeout.as_secs_f32()
                        ),
                    ))
                }
                Err((_, e)) => {
                    return Err(Error::internal(format!(
                        "locking {}: {e}",
                        self.file(name).display()
                    )))
                }
            }
        }
    }

    /// The lock if it is free right now; None if another call holds it.
    pub fn try_lock(&self) -> Result<Option<StateLock>> {
        let file = self.open_lock(LOCK_FILE)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => Ok(Some(StateLock { _file: locked })),
            Err((_, Errno::EWOULDBLOCK | Errno::EINTR)) => Ok(None),
            Err((_, e)) => Err(Error::internal(format!(
                "locking {}: {e}",
                self.file(LOCK_FILE).display()
            ))),
        }
    }
}

/// A capability arg that asks nothing of the plugins: `null`, `[]`, `{}`, `""`.
fn is_empty_arg(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty(),
        Value::Bool(_) | Value::Number(_) => false,
    }
}
