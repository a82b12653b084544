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

use crate::error::{code, Error, Result};
use crate::procfs::ProcessId;
use crate::sys;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::UnlinkatFlags;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{Map, Value};
use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// The state dir when XDG_RUNTIME_DIR is not set, as a runtime started by
/// systemd or as root has it: real root's `/run/rootless-cni-plugin`, else
/// the user's logind dir `/run/user/UID` (UID as the machine knows us) when
/// it is there and ours, as logind makes it.
fn default_without_runtime_dir() -> Result<PathBuf> {
    let me = nix::unistd::geteuid().as_raw();
    if me == 0 && crate::userns::in_initial_user_namespace() {
        return Ok(PathBuf::from(ROOT_STATE_DIR));
    }
    let run = PathBuf::from(format!("/run/user/{}", crate::userns::outside_uid(me)));
    let why = match fs::symlink_metadata(&run) {
        Err(e) => e.to_string(),
        Ok(m) if !m.is_dir() => "not a directory".to_string(),
        Ok(m) if m.uid() != me => format!("owned by uid {}, not by us ({me})", m.uid()),
        Ok(m) if m.mode() & 0o022 != 0 => {
            format!("its mode {:o} lets others write to it", m.mode() & 0o7777)
        }
        Ok(_) => return Ok(run.join(DEFAULT_DIR_NAME)),
    };
    Err(Error::config(format!(
        "no state dir: XDG_RUNTIME_DIR is not set and {} cannot be used ({why}); \
         set XDG_RUNTIME_DIR, or give \"stateDir\" in the config",
        run.display()
    )))
}

/// How every dir of ours is opened: a symlink in its place is refused.
fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW
}

fn io_error(e: Errno, what: impl std::fmt::Display) -> Error {
    Error::from(std::io::Error::from(e)).context(what.to_string())
}

/// The uid the kernel shows for an owner our user namespace does not map.
fn overflow_uid() -> u32 {
    fs::read_to_string("/proc/sys/kernel/overflowuid")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65534)
}

/// Why a dir above the state dir would let another user replace what is
/// below it, if it would: owned by a user other than us or root, or
/// writable by group or others without the sticky bit (as /tmp has it).
/// Inside a user namespace, real root shows as the overflow uid, as does
/// every other user the namespace does not map: they cannot be told apart
/// from there, so that uid passes.
fn unsafe_ancestor(st: &FileStat, me: u32) -> Option<String> {
    let owner = st.st_uid;
    let owner_ok = owner == 0
        || owner == me
        || (owner == overflow_uid() && !crate::userns::in_initial_user_namespace());
    if !owner_ok {
        return Some(format!(
            "it is owned by uid {owner}, who could replace what is below it"
        ));
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o022 != 0 && mode & libc::S_ISVTX == 0 {
        return Some(format!(
            "its mode {mode:o} lets others replace what is below it (writable by group or others, without the sticky bit)"
        ));
    }
    None
}

/// Opens the state dir at `path` (absolute), creating it 0700 when asked:
/// the dirs above it are resolved once, then walked down from `/` one
/// name at a time without following a symlink, each checked; the dir
/// itself must be a real dir, ours, with no access for group or others.
/// None when it (or a dir above it) does not exist and `create` is not set.
fn open_checked(path: &Path, create: bool) -> Result<Option<(PathBuf, OwnedFd)>> {
    let unsafe_dir = |why: String| {
        Error::new(
            code::UNSAFE_STATE_DIR,
            format!("state dir {} is not safe to use: {why}", path.display()),
        )
    };
    if !path.is_absolute() {
        return Err(Error::config(format!(
            "state dir {:?} is not an absolute path",
            path.display().to_string()
        )));
    }
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(unsafe_dir("it names no directory below /".into()));
    };
    let parent = match fs::canonicalize(parent) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => return Ok(None),
        Err(e) => return Err(Error::from(e).context(format!("state dir {}", path.display()))),
    };
    let me = nix::unistd::geteuid().as_raw();
    let walk = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let root = nix::fcntl::open("/", walk, Mode::empty()).map_err(|e| io_error(e, "opening /"))?;
    // SAFETY: open just returned this fd; nothing else owns it.
    let mut dir = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(root) };
    let mut walked = PathBuf::from("/");
    let mut components = parent.components().skip(1).peekable();
    loop {
        let st = nix::sys::stat::fstat(dir.as_raw_fd())
            .map_err(|e| io_error(e, format!("state dir {}", path.display())))?;
        if let Some(why) = unsafe_ancestor(&st, me) {
            return Err(unsafe_dir(format!("{} above it: {why}", walked.display())));
        }
        let Some(next) = components.next() else { break };
        walked.push(next);
        dir = sys::openat(dir.as_fd(), next.as_os_str(), walk, 0).map_err(|e| {
            unsafe_dir(format!(
                "{} above it changed while it was checked: {e}",
                walked.display()
            ))
        })?;
    }
    if create {
        // 0700 whatever the umask, which can only take bits away.
        match nix::sys::stat::mkdirat(Some(dir.as_raw_fd()), name, Mode::S_IRWXU) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => {
                return Err(io_error(
                    e,
                    format!("creating state dir {}", path.display()),
                ))
            }
        }
    }
    // O_PATH first: another user's dir is checked (and refused) before a
    // read open could fail on its permissions.
    let fd = match sys::openat(dir.as_fd(), name, walk, 0) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) if !create => return Ok(None),
        Err(e @ (Errno::ELOOP | Errno::ENOTDIR)) => {
            let st = nix::sys::stat::fstatat(
                Some(dir.as_raw_fd()),
                name,
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            );
            let kind = st.map(|s| SFlag::from_bits_truncate(s.st_mode) & SFlag::S_IFMT);
            return Err(unsafe_dir(match kind {
                Ok(SFlag::S_IFLNK) => "it is a symlink".into(),
                Ok(_) => "it is not a directory".into(),
                Err(_) => format!("{e}"),
            }));
        }
        Err(e) => return Err(io_error(e, format!("state dir {}", path.display()))),
    };
    let st = nix::sys::stat::fstat(fd.as_raw_fd())
        .map_err(|e| io_error(e, format!("state dir {}", path.display())))?;
    if st.st_uid != me {
        return Err(unsafe_dir(format!(
            "it is owned by uid {}, not by us ({me})",
            st.st_uid
        )));
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o077 != 0 {
        return Err(unsafe_dir(format!(
            "its mode {mode:o} gives other users access to its sockets and records; \
             run `chmod 700 {}`",
            path.display()
        )));
    }
    let fd = sys::openat(fd.as_fd(), ".".as_ref(), dir_flags(), 0)
        .map_err(|e| io_error(e, format!("state dir {}", path.display())))?;
    Ok(Some((parent.join(name), fd)))
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
            None => default_without_runtime_dir(),
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
        let opened = open_checked(&path, true)?
            .ok_or_else(|| Error::internal(format!("state dir {} vanished", path.display())))?;
        let dir = StateDir::from_checked(opened);
        dir.ensure_dir(ATTACHMENTS_DIR)?;
        Ok(dir)
    }

    /// Opens an existing state dir; None when there is none (nothing was
    /// ever attached, so there is nothing to do).
    pub fn open_existing(path: PathBuf) -> Result<Option<Self>> {
        Ok(open_checked(&path, false)?.map(StateDir::from_checked))
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
                code::UNSAFE_STATE_DIR,
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

    /// The attachments dir; None when there is none yet.
    fn attachments(&self) -> Result<Option<OwnedFd>> {
        match sys::openat(self.dir_fd(), ATTACHMENTS_DIR.as_ref(), dir_flags(), 0) {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(self.open_error(ATTACHMENTS_DIR, e)),
        }
    }

    /// The attachments dir, created if a call removed it meanwhile.
    fn attachments_for_writing(&self) -> Result<OwnedFd> {
        self.ensure_dir(ATTACHMENTS_DIR)?;
        self.open_dir(ATTACHMENTS_DIR)
    }

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
                        code::TRY_AGAIN_LATER,
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

    pub fn attachment_path(&self, key: &AttachmentKey) -> PathBuf {
        self.path.join(ATTACHMENTS_DIR).join(key.file_name())
    }

    pub fn read_attachment(
        &self,
        key: &AttachmentKey,
        _lock: &StateLock,
    ) -> Result<Option<Attachment>> {
        let Some(dir) = self.attachments()? else {
            return Ok(None);
        };
        read_record_at(
            dir.as_fd(),
            key.file_name().as_ref(),
            &self.attachment_path(key),
        )
    }

    pub fn write_attachment(&self, rec: &Attachment, _lock: &StateLock) -> Result<()> {
        self.write_record(rec, Durability::Synced)
    }

    /// A pending record's progress: atomic, but not worth an fsync (after
    /// a power loss the infra it describes is gone anyway).
    pub fn write_progress(&self, rec: &Attachment) -> Result<()> {
        self.write_record(rec, Durability::Unsynced)
    }

    fn write_record(&self, rec: &Attachment, durability: Durability) -> Result<()> {
        let key = rec.key();
        let dir = self.attachments_for_writing()?;
        write_json_at(
            dir.as_fd(),
            key.file_name().as_ref(),
            &self.attachment_path(&key),
            &encode_record(rec)?,
            durability,
        )
    }

    pub fn remove_attachment(&self, key: &AttachmentKey, _lock: &StateLock) -> Result<()> {
        let Some(dir) = self.attachments()? else {
            return Ok(());
        };
        let path = self.attachment_path(key);
        let name = key.file_name();
        remove_at(dir.as_fd(), temp_name(&name).as_ref(), &temp_path(&path))?;
        remove_at(dir.as_fd(), name.as_ref(), &path)
    }

    /// The names in the attachments dir (none when there is none).
    fn attachment_names(&self) -> Result<(Option<OwnedFd>, Vec<String>)> {
        let Some(dir) = self.attachments()? else {
            return Ok((None, Vec::new()));
        };
        let names = sys::dir_names(dir.as_fd()).map_err(|e| {
            io_error(
                e,
                format!("reading {}", self.file(ATTACHMENTS_DIR).display()),
            )
        })?;
        let names = names
            .into_iter()
            .filter_map(|n| n.into_string().ok())
            .collect();
        Ok((Some(dir), names))
    }

    /// Every record, unreadable ones skipped with a warning.
    pub fn list_attachments(&self) -> Result<Vec<Attachment>> {
        let (dir, names) = self.attachment_names()?;
        let mut out = Vec::new();
        let Some(dir) = dir else {
            return Ok(out);
        };
        for name in names {
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            let path = self.path.join(ATTACHMENTS_DIR).join(&name);
            match read_record_at(dir.as_fd(), name.as_ref(), &path) {
                Ok(Some(a)) => out.push(a),
                Ok(None) => {}
                // Not ours to skip: a caller would take it for absent.
                Err(e) if e.code == code::NEWER_STATE => return Err(e),
                Err(e) => log::warn!("skipping unreadable record {}: {e}", path.display()),
            }
        }
        out.sort_by_key(|a| a.created);
        Ok(out)
    }

    /// Temporary files of record writes a killed call never renamed, of
    /// records that are gone. Called when no record is left, so no write is
    /// in progress (every writer has a record).
    pub fn remove_temp_files(&self, _lock: &StateLock) {
        let Ok((Some(dir), names)) = self.attachment_names() else {
            return;
        };
        for name in names {
            if name.starts_with('.') && name.ends_with(".tmp") {
                log::info!("removing {name}, left by a call that was killed");
                let _ = nix::unistd::unlinkat(
                    Some(dir.as_raw_fd()),
                    name.as_str(),
                    UnlinkatFlags::NoRemoveDir,
                );
            }
        }
    }

    /// Releases the host-local leases of `container_id`/`ifname` in the
    /// infra's /var/lib/cni, for an attachment whose infra is gone: its IPAM
    /// plugin cannot run without that infra, and the leases outlive it on
    /// disk, so the addresses would stay taken for good. host-local writes a
    /// lease as a file named by the address, holding the container id and
    /// the ifname on two lines. Best effort: returns how many went.
    pub fn release_dead_leases(
        &self,
        container_id: &str,
        ifname: &str,
        _lock: &StateLock,
    ) -> usize {
        let networks = self
            .open_dir(VAR_LIB_CNI_DIR)
            .ok()
            .and_then(|d| sys::openat(d.as_fd(), "networks".as_ref(), dir_flags(), 0).ok());
        let Some(networks) = networks else {
            return 0;
        };
        let holds = |dir: BorrowedFd, name: &OsStr| -> bool {
            // O_NOFOLLOW|O_NONBLOCK: a symlink or a fifo planted there is
            // not a lease and must not make us read elsewhere or block.
            let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK;
            let Ok(file) = sys::openat(dir, name, flags, 0).map(fs::File::from) else {
                return false;
            };
            if !file.metadata().is_ok_and(|m| m.is_file()) {
                return false;
            }
            let mut text = String::new();
            // A lease is two short lines; more is not one of host-local's.
            if file.take(4096).read_to_string(&mut text).is_err() {
                return false;
            }
            let mut lines = text.lines().map(str::trim);
            lines.next() == Some(container_id) && lines.next() == Some(ifname)
        };
        let mut released = 0;
        for net in sys::dir_names(networks.as_fd()).unwrap_or_default() {
            // A file or a symlink there is no network's dir: not opened.
            let Ok(dir) = sys::openat(networks.as_fd(), &net, dir_flags(), 0) else {
                continue;
            };
            for lease in sys::dir_names(dir.as_fd()).unwrap_or_default() {
                let name = lease.to_string_lossy();
                if name == "lock"
                    || name.starts_with("last_reserved_ip")
                    || !holds(dir.as_fd(), &lease)
                {
                    continue;
                }
                let unlinked = nix::unistd::unlinkat(
                    Some(dir.as_raw_fd()),
                    lease.as_os_str(),
                    UnlinkatFlags::NoRemoveDir,
                );
                match unlinked {
                    Ok(()) => released += 1,
                    Err(e) => log::warn!(
                        "releasing lease {}: {e}",
                        Path::new(&net).join(&lease).display()
                    ),
                }
            }
        }
        if released > 0 {
            log::info!("released {released} lease(s) of {container_id} left by a dead infra");
        }
        released
    }

    /// True while any record is left (false: the infra may stop). Reads the
    /// dir only, never the records.
    pub fn has_attachments(&self, _lock: &StateLock) -> Result<bool> {
        let (_, names) = self.attachment_names()?;
        Ok(names
            .iter()
            .any(|n| n.ends_with(".json") && !n.starts_with('.')))
    }
}

/// Held while lifecycle and records change; released on drop.
pub struct StateLock {
    _file: Flock<fs::File>,
}

/// An attachment's identity, as the spec defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentKey {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
}

impl AttachmentKey {
    /// Each part escaped, so no input can become a path or collide.
    /// A name too long for the file system (a legal 128-character id of
    /// dots escapes to 382) is cut, and made unique again by a hash of the
    /// whole: the record itself holds the key.
    pub fn file_name(&self) -> String {
        let name = format!(
            "{}+{}+{}",
            escape(&self.network),
            escape(&self.container_id),
            escape(&self.ifname)
        );
        // NAME_MAX is 255; the temporary file adds ".", ".json" and ".tmp".
        if name.len() <= MAX_KEY_NAME {
            return format!("{name}.json");
        }
        let prefix = &name[..KEPT_PREFIX];
        format!("{prefix}~{:032x}.json", fnv1a_128(name.as_bytes()))
    }
}

/// The longest escaped key used as it is in a file name: NAME_MAX (255)
/// less ".", ".json" and ".tmp" of the temporary file. Any key up to this
/// has the name 151877a gave it (it failed on longer ones), so a record
/// is found by either.
const MAX_KEY_NAME: usize = 245;
/// What a longer one keeps, before its hash (escaped names are ASCII).
const KEPT_PREFIX: usize = 100;

/// FNV-1a, 128 bits: stable across releases and builds (unlike std's
/// hasher), which a file name must be.
fn fnv1a_128(bytes: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    bytes.iter().fold(OFFSET, |hash, b| {
        (hash ^ u128::from(*b)).wrapping_mul(PRIME)
    })
}

/// Percent-encodes everything but letters, digits, '-' and '_'.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachmentState {
    /// An ADD is running the inner plugins; `owner` is that call.
    Pending,
    /// Attached. `owner`, when set, is a DEL that is running or was killed.
    Ready,
    /// An ADD failed and its rollback could not undo everything: `result`
    /// is what it knew; the DEL the runtime sends next finishes the job.
    Failed,
}

/// What the successor of podman's `attached/` and `attached-args/` keeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    pub state: AttachmentState,
    pub network: String,
    pub container_id: String,
    pub ifname: String,
    pub netns: Option<String>,
    /// Inode of the container netns at ADD: a path reused for another
    /// netns is not ours.
    #[serde(default)]
    pub netns_inode: Option<u64>,
    /// The sandbox of the infra the attachment lives in.
    pub infra: ProcessId,
    pub owner: Option<ProcessId>,
    pub config: Value,
    pub cni_args: String,
    pub capability_args: Map<String, Value>,
    pub result: Option<Value>,
    /// Seconds since the epoch.
    pub created: u64,
    /// The sub-second part of the creation time: with `created`, the
    /// netns inode and the infra, what tells this attachment from a later
    /// one under the same key (the runtime deleted and re-added it).
    #[serde(default)]
    pub created_nanos: u32,
}

impl Attachment {
    /// Whether the attachment is in place in the infra whose sandbox is
    /// `infra`, or being made there by a live call: what holds its ports
    /// open there. Not a failed ADD (it closed its own ports; only its
    /// leftovers are there, for its DEL), nor a killed one (the next ADD of
    /// its key takes it over).
    pub fn is_live_in(&self, infra: &ProcessId) -> bool {
        self.infra == *infra
            && match self.state {
                AttachmentState::Ready => true,
                AttachmentState::Pending => self.owner.is_some_and(|o| o.is_alive()),
                AttachmentState::Failed => false,
            }
    }

    /// Whether `other` is this very attachment, read again: not one the
    /// runtime made under the same key since.
    pub fn is_same_as(&self, other: &Attachment) -> bool {
        self.key() == other.key()
            && self.created == other.created
            && self.created_nanos == other.created_nanos
            && self.infra == other.infra
            && self.netns_inode == other.netns_inode
    }

    pub fn key(&self) -> AttachmentKey {
        AttachmentKey {
            network: self.network.clone(),
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }

    /// Published ports, for `status`.
    pub fn ports(&self) -> Vec<String> {
        crate::ports::from_runtime_config(&self.capability_args)
            .unwrap_or_default()
            .iter()
            .map(|m| m.describe())
            .collect()
    }

    /// IP addresses from the result, for `status`.
    pub fn addresses(&self) -> Vec<String> {
        self.result
            .as_ref()
            .and_then(|r| r.get("ips"))
            .and_then(Value::as_array)
            .map(|ips| {
                ips.iter()
                    .filter_map(|ip| ip.get("address").and_then(Value::as_str).map(String::from))
                    .collect()
            })
            .unwrap_or_default()
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

/// Creates the dir `name` in `dir` (0700) unless it exists.
fn ensure_dir_at(dir: BorrowedFd, name: &OsStr, path: &Path) -> Result<()> {
    match nix::sys::stat::mkdirat(Some(dir.as_raw_fd()), name, Mode::S_IRWXU) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(io_error(e, format!("creating {}", path.display()))),
    }
}

/// The dir `name` in `dir`, created (0700) unless it exists, opened
/// without following a symlink.
pub fn dir_in(dir: BorrowedFd, name: &str) -> Result<OwnedFd> {
    let what = || format!("dir {name} of the state dir");
    ensure_dir_at(dir, name.as_ref(), Path::new(name))?;
    sys::openat(dir, name.as_ref(), dir_flags(), 0).map_err(|e| io_error(e, what()))
}

/// Removes `name` in `dir` and, when it is a dir, all below it, each entry
/// through its own dir's fd: a symlink is removed, never followed.
fn remove_tree_at(dir: BorrowedFd, name: &OsStr) -> nix::Result<()> {
    match nix::unistd::unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::EISDIR) => {}
        Err(e) => return Err(e),
    }
    let sub = sys::openat(dir, name, dir_flags(), 0)?;
    for entry in sys::dir_names(sub.as_fd())? {
        remove_tree_at(sub.as_fd(), &entry)?;
    }
    match nix::unistd::unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes the file `name` in `dir`, if it is there.
fn remove_at(dir: BorrowedFd, name: &OsStr, path: &Path) -> Result<()> {
    match nix::unistd::unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(io_error(e, format!("removing {}", path.display()))),
    }
}

/// None when the file does not exist; an empty or truncated file is an
/// error the caller can treat as stale. A symlink or anything but a
/// regular file in its place is an error too, never followed or waited on.
fn read_value_at(dir: BorrowedFd, name: &OsStr, path: &Path) -> Result<Option<Value>> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK;
    let mut file = match sys::openat(dir, name, flags, 0) {
        Ok(fd) => fs::File::from(fd),
        Err(Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(io_error(e, format!("reading {}", path.display()))),
    };
    let is_file = file
        .metadata()
        .map_err(|e| Error::from(e).context(format!("reading {}", path.display())))?
        .is_file();
    if !is_file {
        return Err(Error::internal(format!(
            "{} is corrupt: not a regular file",
            path.display()
        )));
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| Error::from(e).context(format!("reading {}", path.display())))?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::internal(format!("{} is corrupt: {e}", path.display())))?;
    check_format(&value, path)?;
    Ok(Some(value))
}

/// A file of a newer format than ours is not ours to read (see the
/// module doc).
fn check_format(value: &Value, path: &Path) -> Result<()> {
    let version = value.get(FORMAT_KEY).and_then(Value::as_u64).unwrap_or(1);
    if version <= FORMAT_VERSION {
        return Ok(());
    }
    Err(Error::new(
        code::NEWER_STATE,
        format!(
            "{} was written by a newer rootless-cni (state format {version}; this binary reads up to {FORMAT_VERSION}): \
             left as it is; run the newer binary (check which one the runtime's CNI_PATH finds), \
             or stop what uses this state dir and remove it",
            path.display()
        ),
    ))
}

/// `read_value_at`, as a `T`.
fn read_json_at<T: DeserializeOwned>(
    dir: BorrowedFd,
    name: &OsStr,
    path: &Path,
) -> Result<Option<T>> {
    let Some(value) = read_value_at(dir, name, path)? else {
        return Ok(None);
    };
    serde_json::from_value(value)
        .map(Some)
        .map_err(|e| Error::internal(format!("{} is corrupt: {e}", path.display())))
}

/// An attachment record, read back from how `encode_record` wrote it.
fn read_record_at(dir: BorrowedFd, name: &OsStr, path: &Path) -> Result<Option<Attachment>> {
    let Some(mut value) = read_value_at(dir, name, path)? else {
        return Ok(None);
    };
    if let Some(rec) = value.as_object_mut() {
        if rec.remove("failed") == Some(Value::Bool(true)) {
            rec.insert("state".into(), "failed".into());
        }
    }
    serde_json::from_value(value)
        .map(Some)
        .map_err(|e| Error::internal(format!("{} is corrupt: {e}", path.display())))
}

/// A record as 151877a can read it: a failed ADD's is "ready" to it,
/// with `failed` set (see the module doc).
fn encode_record(rec: &Attachment) -> Result<Value> {
    let mut value = serde_json::to_value(rec).map_err(|e| Error::internal(e.to_string()))?;
    if rec.state == AttachmentState::Failed {
        if let Some(obj) = value.as_object_mut() {
            obj.insert("state".into(), "ready".into());
            obj.insert("failed".into(), Value::Bool(true));
        }
    }
    Ok(value)
}

/// Whether a write is fsynced before the rename: a rename alone already
/// survives our being killed; the sync is for the machine going down.
#[derive(PartialEq)]
pub enum Durability {
    Synced,
    Unsynced,
}

/// Where `write_json_at` writes before the rename: `.NAME.tmp`.
fn temp_name(name: &str) -> String {
    format!(".{name}.tmp")
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("record");
    path.with_file_name(temp_name(name))
}

/// Write to a fresh temporary file in `dir` (O_EXCL|O_NOFOLLOW, 0600),
/// fsync when durable, rename over `name`. A file has one writer at a time
/// (the lock holder, or the owner of a pending record, whom every other
/// call leaves alone), so the temporary name is fixed: a write killed
/// half-way leaves it, and the next write or removal of the same file
/// takes it away, at no cost per call.
fn write_json_at<T: Serialize>(
    dir: BorrowedFd,
    name: &OsStr,
    path: &Path,
    value: &T,
    durability: Durability,
) -> Result<()> {
    let mut value = serde_json::to_value(value).map_err(|e| Error::internal(e.to_string()))?;
    if let Some(obj) = value.as_object_mut() {
        obj.insert(FORMAT_KEY.into(), FORMAT_VERSION.into());
    }
    let bytes = serde_json::to_vec(&value).map_err(|e| Error::internal(e.to_string()))?;
    let tmp = temp_name(&name.to_string_lossy());
    let tmp = OsStr::new(&tmp);
    let unlink = || nix::unistd::unlinkat(Some(dir.as_raw_fd()), tmp, UnlinkatFlags::NoRemoveDir);
    let _ = unlink();
    let write = || -> std::io::Result<()> {
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW;
        let mut f = fs::File::from(sys::openat(dir, tmp, flags, 0o600)?);
        f.write_all(&bytes)?;
        if durability == Durability::Synced {
            f.sync_all()?;
        }
        nix::fcntl::renameat(Some(dir.as_raw_fd()), tmp, Some(dir.as_raw_fd()), name)?;
        Ok(())
    };
    write().map_err(|e| {
        let _ = unlink();
        Error::from(e).context(format!("writing {}", path.display()))
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_keys_fit_in_a_file_name() {
        let dots = format!("a{}", ".".repeat(127));
        let key = |id: &str, ifname: &str| AttachmentKey {
            network: "n".repeat(64),
            container_id: id.to_string(),
            ifname: ifname.to_string(),
        };
        let a = key(&dots, "eth0").file_name();
        assert!(format!(".{a}.tmp").len() <= 255, "{a}");
        assert_ne!(a, key(&dots, "eth1").file_name());
        assert_eq!(a, key(&dots, "eth0").file_name());
        assert_eq!(fnv1a_128(b""), 0x6c62272e07bb014262b821756295c58d);
    }

    #[test]
    fn a_failed_record_reads_as_ready_to_the_previous_release() {
        let rec = Attachment {
            state: AttachmentState::Failed,
            network: "n".into(),
            container_id: "c".into(),
            ifname: "eth0".into(),
            netns: None,
            netns_inode: None,
            infra: ProcessId {
                pid: 1,
                start_time: 2,
            },
            owner: None,
            config: Value::Null,
            cni_args: String::new(),
            capability_args: Map::new(),
            result: None,
            created: 3,
            created_nanos: 4,
        };
        let wire = encode_record(&rec).unwrap();
        assert_eq!(wire["state"], "ready");
        assert_eq!(wire["failed"], true);
        let dir = std::env::temp_dir().join(format!("rootless-cni-format.{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let fd = fs::File::open(&dir).unwrap();
        let name = OsStr::new("r.json");
        write_json_at(fd.as_fd(), name, &dir, &wire, Durability::Unsynced).unwrap();
        let back = read_record_at(fd.as_fd(), name, &dir).unwrap().unwrap();
        assert_eq!(back.state, AttachmentState::Failed);
        let raw: Value = serde_json::from_slice(&fs::read(dir.join("r.json")).unwrap()).unwrap();
        assert_eq!(raw[FORMAT_KEY], FORMAT_VERSION);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_newer_format_is_refused_an_unversioned_one_is_format_1() {
        let path = Path::new("x.json");
        assert!(check_format(&serde_json::json!({"a": 1}), path).is_ok());
        assert!(check_format(&serde_json::json!({FORMAT_KEY: FORMAT_VERSION}), path).is_ok());
        let newer = serde_json::json!({FORMAT_KEY: FORMAT_VERSION + 1});
        assert_eq!(
            check_format(&newer, path).unwrap_err().code,
            code::NEWER_STATE
        );
    }

    #[test]
    fn key_file_names_cannot_escape() {
        let k = AttachmentKey {
            network: "net.a".into(),
            container_id: "../../etc".into(),
            ifname: "eth0".into(),
        };
        let name = k.file_name();
        assert!(!name.contains('/'));
        assert_eq!(name, "net%2Ea+%2E%2E%2F%2E%2E%2Fetc+eth0.json");
    }
}
