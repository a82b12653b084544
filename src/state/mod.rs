//! The state dir: its lock, the infra record and one record per attachment.
//! Every file is written to a temporary name, synced, then renamed, so a
//! crash never leaves half a record.
//!
//! # Format versions and what "compatible" means
//!
//! Users replace the binary under running containers: the next call meets
//! an infra, records and a control socket (see `infra::control`) made by
//! another release. Every JSON file of the state dir (infra.json, each
//! attachment record) carries `formatVersion`, the state dir format its
//! writer knew; a file without it is format 1 (releases up to 151877a).
//!
//! - A binary reads every format up to its own, `FORMAT_VERSION`. A file of
//!   a newer format is refused with code `NEWER_STATE`, naming both
//!   versions: never read as corrupt, dead or absent, so it is never
//!   forgotten, overwritten, or taken for a dead infra (which would start a
//!   second one).
//! - The version is raised only by a change an older reader would misread.
//!   Adding a field is not one: readers ignore fields they do not know (no
//!   `deny_unknown_fields`, here or in 151877a), and give a missing one its
//!   default. A field is never renamed nor given another meaning.
//! - Format 1 (151877a) cannot check versions, so what this format adds is
//!   kept readable by it: new fields only, and a record of a failed ADD is
//!   written as `"state": "ready"` with `"failed": true` (151877a refuses a
//!   second ADD over it and its DEL runs the inner DEL, finishing the job,
//!   instead of dropping a record it cannot parse). Record file names are
//!   151877a's for every key it could store (`MAX_KEY_NAME`). The infra's
//!   lifetime lock (`infra.lck`) and PID namespace are unknown to 151877a:
//!   it decides liveness from infra.json's PIDs alone, as it always did.
//! - Dirs and files keep their names and places; the state dir stays 0700
//!   (151877a made it so, and checks less).
//!
//! Format 2 (this one): infra.json has `pidns` and `outbound`; records have
//! `createdNanos` and may be failed; `infra.lck` is held by the supervisor.
//!
//! One concern a file: opening the dir safely (`open`), the locks and
//! warm markers (`lock`), the attachment records (`attachment`: what a
//! record holds; `records`: reading and writing them), the leases of a dead
//! infra (`leases`), and the `*at()` file primitives they share (`files`).

mod attachment;
mod files;
mod leases;
mod lock;
mod open;
mod records;

pub use attachment::{Attachment, AttachmentKey, AttachmentState};
pub use files::{dir_in, Durability};
pub use lock::StateLock;

use crate::error::{Error, Kind, Result};
use crate::sys;
use files::{ensure_dir_at, read_json_at, remove_at, remove_tree_at, write_json_at};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use serde::{de::DeserializeOwned, Serialize};
use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const LOCK_FILE: &str = "rootless-cni-infra.lck";
pub const FIRST_CHAIN_LOCK_FILE: &str = "first-chain.lck";
/// Markers of the networks whose inner chain ran once in this infra.
pub const WARM_DIR: &str = "warm";
pub const INFRA_FILE: &str = "infra.json";
pub const ATTACHMENTS_DIR: &str = "attachments";
pub const RUN_DIR: &str = "run";
pub const VAR_LIB_CNI_DIR: &str = "var-lib-cni";
pub const OVERLAY_DIR: &str = "var-lib-overlay";
pub const SLIRP_SOCKET: &str = "slirp.sock";
pub const LOG_FILE: &str = "infra.log";

/// The state dir format this binary writes and the newest it reads (see
/// the module doc).
pub const FORMAT_VERSION: u64 = 2;

/// Where each JSON file of the state dir says its format.
const FORMAT_KEY: &str = "formatVersion";

/// How long a call waits for the lock before answering "try again later",
/// unless the config's `lockTimeout` says otherwise.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// The state dir, held by one fd opened without following a symlink once
/// its path and every dir above it were checked: records, locks, temporary
/// files and removals are `*at()` calls on it, never a path resolved again.
#[derive(Debug, Clone)]
pub struct StateDir {
    /// Where it is (the dirs above it resolved once), for messages and for
    /// the infra's processes, which open and check it again.
    pub path: PathBuf,
    pub lock_timeout: Duration,
    fd: Arc<OwnedFd>,
}

/// The state dir's name under XDG_RUNTIME_DIR. Not `rootless-cni`: podman
/// 3.x (Ubuntu 22.04, Debian 11 backports) keeps its own rootless CNI
/// namespace files in `$XDG_RUNTIME_DIR/rootless-cni` and removes that dir
/// when its last container goes, records and all.
pub const DEFAULT_DIR_NAME: &str = "rootless-cni-plugin";

/// Real root's state dir when there is no XDG_RUNTIME_DIR (a runtime
/// started by systemd, kubelet's containerd).
pub const ROOT_STATE_DIR: &str = "/run/rootless-cni-plugin";

/// How every dir of ours is opened: a symlink in its place is refused.
fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW
}

fn io_error(e: Errno, what: impl std::fmt::Display) -> Error {
    Error::from(std::io::Error::from(e)).context(what.to_string())
}

impl StateDir {
    /// The config's `stateDir`, else `$XDG_RUNTIME_DIR/rootless-cni-plugin`,
    /// else the default of `default_without_runtime_dir`.
    pub fn resolve(configured: Option<&Path>) -> Result<PathBuf> {
        if let Some(p) = configured {
            if !p.is_absolute() {
                return Err(Error::config(format!(
                    "\"stateDir\" {:?} is not an absolute path",
                    p.display().to_string()
                )));
            }
            return Ok(p.to_path_buf());
        }
        match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
            Some(run) => Ok(PathBuf::from(run).join(DEFAULT_DIR_NAME)),
            None => open::default_without_runtime_dir(),
        }
    }

    /// The existing dir at `path`, opened and checked again: for the
    /// infra's own processes, which the plugin started on a dir it checked.
    pub fn at(path: PathBuf) -> Result<Self> {
        StateDir::open_existing(path.clone())?
            .ok_or_else(|| Error::internal(format!("state dir {} is gone", path.display())))
    }

    fn from_checked((path, fd): (PathBuf, OwnedFd)) -> Self {
        StateDir {
            path,
            lock_timeout: LOCK_TIMEOUT,
            fd: Arc::new(fd),
        }
    }

    /// Creates the dir if needed (0700) and refuses one that another user
    /// could reach or tamper with.
    pub fn create(path: PathBuf) -> Result<Self> {
        let opened = open::open_checked(&path, true)?
            .ok_or_else(|| Error::internal(format!("state dir {} vanished", path.display())))?;
        let dir = StateDir::from_checked(opened);
        dir.ensure_dir(ATTACHMENTS_DIR)?;
        Ok(dir)
    }

    /// Opens an existing state dir; None when there is none (nothing was
    /// ever attached, so there is nothing to do).
    pub fn open_existing(path: PathBuf) -> Result<Option<Self>> {
        Ok(open::open_checked(&path, false)?.map(StateDir::from_checked))
    }

    /// The same dir with the config's `lockTimeout`.
    pub fn with_lock_timeout(self, lock_timeout: Duration) -> Self {
        StateDir {
            lock_timeout,
            ..self
        }
    }

    /// Where `name` is, for messages and logs only: access goes through
    /// the dir's fd.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn dir_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A path to `name` in the dir through our fd, for what takes only a
    /// path (binding or connecting a socket); valid while `self` lives.
    pub fn fd_path(&self, name: &str) -> PathBuf {
        sys::fd_path(self.dir_fd()).join(name)
    }

    /// Opens the dir `name` of the state dir, never through a symlink.
    pub fn open_dir(&self, name: &str) -> Result<OwnedFd> {
        sys::openat(self.dir_fd(), name.as_ref(), dir_flags(), 0)
            .map_err(|e| self.open_error(name, e))
    }

    /// What a failed open of `name` in the state dir says: something other
    /// than what we made in its place (a symlink) is a tampered state dir.
    fn open_error(&self, name: &str, e: Errno) -> Error {
        match e {
            Errno::ELOOP | Errno::ENOTDIR => Error::new(
                Kind::UnsafeStateDir,
                format!(
                    "state dir {} is not safe to use: {name} in it is a symlink or not what we made; \
                     it was not followed (remove it if you put it there)",
                    self.path.display()
                ),
            ),
            e => io_error(e, format!("opening {}", self.file(name).display())),
        }
    }

    /// Device and inode of the dir `name`, None when it cannot be opened.
    pub fn dir_dev_ino(&self, name: &str) -> Option<(u64, u64)> {
        let dir = self.open_dir(name).ok()?;
        let st = nix::sys::stat::fstat(dir.as_raw_fd()).ok()?;
        Some((st.st_dev, st.st_ino))
    }

    /// The log file `name` for appending (0600, never through a symlink),
    /// emptied first when it has grown past `max_len`.
    pub fn open_log(&self, name: &str, max_len: u64) -> Result<fs::File> {
        let what = || format!("opening {}", self.file(name).display());
        // O_NONBLOCK: a fifo in its place fails instead of blocking us.
        let flags = OFlag::O_WRONLY
            | OFlag::O_CREAT
            | OFlag::O_APPEND
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK;
        let file = sys::openat(self.dir_fd(), name.as_ref(), flags, 0o600)
            .map(fs::File::from)
            .map_err(|e| self.open_error(name, e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::from(e).context(what()))?;
        if !meta.is_file() {
            return Err(Error::internal(format!("{}: not a regular file", what())));
        }
        if meta.len() > max_len {
            file.set_len(0)
                .map_err(|e| Error::from(e).context(what()))?;
        }
        Ok(file)
    }

    /// Creates the dir `name` (0700) unless it exists.
    pub fn ensure_dir(&self, name: &str) -> Result<()> {
        ensure_dir_at(self.dir_fd(), name.as_ref(), &self.file(name))
    }

    /// Empties the dir `name` by replacing it: what an old infra left is
    /// meaningless to a new one. Never follows a symlink found inside.
    pub fn reset_dir(&self, name: &str) -> Result<()> {
        remove_tree_at(self.dir_fd(), name.as_ref())
            .map_err(|e| io_error(e, format!("removing {}", self.file(name).display())))?;
        self.ensure_dir(name)
    }

    /// Removes the file `name`, if it is there.
    pub fn remove(&self, name: &str) -> Result<()> {
        remove_at(self.dir_fd(), name.as_ref(), &self.file(name))
    }

    /// The JSON file `name`; None when it does not exist.
    pub fn read_json<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        read_json_at(self.dir_fd(), name.as_ref(), &self.file(name))
    }

    /// Writes the JSON file `name` atomically (see `write_json_at`).
    pub fn write_json<T: Serialize>(
        &self,
        name: &str,
        value: &T,
        durability: Durability,
    ) -> Result<()> {
        write_json_at(
            self.dir_fd(),
            name.as_ref(),
            &self.file(name),
            value,
            durability,
        )
    }

    /// Opens the file `name` read-write (made 0600 when `create`), never
    /// through a symlink.
    pub fn open_file(&self, name: &str, create: bool) -> Result<fs::File> {
        let mut flags = OFlag::O_RDWR | OFlag::O_NOFOLLOW;
        if create {
            flags |= OFlag::O_CREAT;
        }
        sys::openat(self.dir_fd(), name.as_ref(), flags, 0o600)
            .map(fs::File::from)
            .map_err(|e| self.open_error(name, e))
    }
}

pub fn now_secs() -> u64 {
    since_epoch().as_secs()
}

pub fn since_epoch() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}
