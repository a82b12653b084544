//! The state dir: its lock, the infra record and one record per attachment.
//! Every file is written to a temporary name, synced, then renamed, so a
//! crash never leaves half a record.

use crate::error::{code, Context, Error, Result};
use crate::procfs::ProcessId;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
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

/// How long a call waits for the lock before answering "try again later",
/// unless the config's `lockTimeout` says otherwise.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct StateDir {
    pub path: PathBuf,
    pub lock_timeout: Duration,
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

    /// The dir at `path`, unchecked: for the infra's own processes, which
    /// the plugin started on a dir it checked.
    pub fn at(path: PathBuf) -> Self {
        StateDir {
            path,
            lock_timeout: LOCK_TIMEOUT,
        }
    }

    /// Creates the dir if needed (0700) and refuses one that another user
    /// could tamper with.
    pub fn create(path: PathBuf) -> Result<Self> {
        match fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(Error::from(e).context(format!("creating state dir {}", path.display())))
            }
        }
        let dir = StateDir::at(path);
        dir.check_safe()?;
        ensure_dir(&dir.path.join(ATTACHMENTS_DIR))?;
        Ok(dir)
    }

    /// Opens an existing state dir; None when there is none (nothing was
    /// ever attached, so there is nothing to do).
    pub fn open_existing(path: PathBuf) -> Result<Option<Self>> {
        match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::from(e).context(format!("state dir {}", path.display()))),
            Ok(_) => {
                let dir = StateDir::at(path);
                dir.check_safe()?;
                Ok(Some(dir))
            }
        }
    }

    fn check_safe(&self) -> Result<()> {
        let meta = fs::symlink_metadata(&self.path)
            .with_context(|| format!("state dir {}", self.path.display()))?;
        let unsafe_dir = |why: String| {
            Err(Error::new(
                code::UNSAFE_STATE_DIR,
                format!(
                    "state dir {} is not safe to use: {why}",
                    self.path.display()
                ),
            ))
        };
        if meta.file_type().is_symlink() {
            return unsafe_dir("it is a symlink".into());
        }
        if !meta.is_dir() {
            return unsafe_dir("it is not a directory".into());
        }
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            return unsafe_dir(format!(
                "it is owned by uid {}, not by us ({me})",
                meta.uid()
            ));
        }
        if meta.mode() & 0o022 != 0 {
            return unsafe_dir(format!(
                "its mode {:o} lets others write to it",
                meta.mode() & 0o7777
            ));
        }
        Ok(())
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Takes the lifecycle lock, waiting at most `lock_timeout`.
    pub fn lock(&self) -> Result<StateLock> {
        self.wait_for_lock(LOCK_FILE)
    }

    /// The lock for cleaning up after a failure, which must not be given up
    /// as quickly as a call's: at least the default `lockTimeout`.
    pub fn lock_patiently(&self) -> Result<StateLock> {
        StateDir {
            path: self.path.clone(),
            lock_timeout: self.lock_timeout.max(LOCK_TIMEOUT),
        }
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

    /// The marker that a network's inner chain ran once in this infra with
    /// these capabilities in use. An empty one does not count: portmap
    /// makes its chains only for mappings, and containerd sends
    /// `portMappings: []` for every pod without ports.
    pub fn warm_marker(&self, network: &str, capabilities: &Map<String, Value>) -> PathBuf {
        let mut name = escape(network);
        let in_use = capabilities.iter().filter(|(_, v)| !is_empty_arg(v));
        for (cap, _) in in_use {
            name.push('+');
            name.push_str(&escape(cap));
        }
        self.path.join(WARM_DIR).join(name)
    }

    fn wait_for_lock(&self, name: &str) -> Result<StateLock> {
        let path = self.file(name);
        let mut file = open_lock(&path)?;
        let deadline = crate::sys::deadline(self.lock_timeout);
        let mut pause = Duration::from_micros(200);
        loop {
            match file.try_lock() {
                Ok(true) => return Ok(StateLock { _file: file }),
                Ok(false) if Instant::now() < deadline => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                Ok(false) => {
                    return Err(Error::new(
                        code::TRY_AGAIN_LATER,
                        format!(
                            "lock {} still held after {}s by another call; try again later (lockTimeout)",
                            path.display(),
                            self.lock_timeout.as_secs_f32()
                        ),
                    ))
                }
                Err(e) => return Err(Error::internal(format!("locking {}: {e}", path.display()))),
            }
        }
    }

    /// The lock if it is free right now; None if another call holds it.
    pub fn try_lock(&self) -> Result<Option<StateLock>> {
        let path = self.file(LOCK_FILE);
        let mut file = open_lock(&path)?;
        match file.try_lock() {
            Ok(true) => Ok(Some(StateLock { _file: file })),
            Ok(false) => Ok(None),
            Err(e) => Err(Error::internal(format!("locking {}: {e}", path.display()))),
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
        read_json(&self.attachment_path(key))
    }

    pub fn write_attachment(&self, rec: &Attachment, _lock: &StateLock) -> Result<()> {
        write_json_atomic(&self.attachment_path(&rec.key()), rec, Durability::Synced)
    }

    /// A pending record's progress: atomic, but not worth an fsync (after
    /// a power loss the infra it describes is gone anyway).
    pub fn write_progress(&self, rec: &Attachment) -> Result<()> {
        write_json_atomic(&self.attachment_path(&rec.key()), rec, Durability::Unsynced)
    }

    pub fn remove_attachment(&self, key: &AttachmentKey, _lock: &StateLock) -> Result<()> {
        let path = self.attachment_path(key);
        remove_if_exists(&temp_path(&path))?;
        remove_if_exists(&path)
    }

    /// Every record, unreadable ones skipped with a warning.
    pub fn list_attachments(&self) -> Result<Vec<Attachment>> {
        let dir = self.path.join(ATTACHMENTS_DIR);
        let mut out = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::from(e).context(format!("reading {}", dir.display()))),
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match read_json::<Attachment>(&path) {
                Ok(Some(a)) => out.push(a),
                Ok(None) => {}
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
        let Ok(entries) = fs::read_dir(self.path.join(ATTACHMENTS_DIR)) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".tmp") {
                log::info!("removing {name}, left by a call that was killed");
                let _ = fs::remove_file(entry.path());
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
        let networks = self.path.join(VAR_LIB_CNI_DIR).join("networks");
        let Ok(dirs) = fs::read_dir(&networks) else {
            return 0;
        };
        let holds = |path: &Path| -> bool {
            // O_NOFOLLOW|O_NONBLOCK: a symlink or a fifo planted there is
            // not a lease and must not make us read elsewhere or block.
            let file = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(path);
            let Ok(file) = file.and_then(|f| f.metadata().map(|m| (f, m))) else {
                return false;
            };
            let (file, meta) = file;
            if !meta.is_file() {
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
        for dir in dirs
            .flatten()
            .filter(|d| d.file_type().is_ok_and(|t| t.is_dir()))
        {
            let Ok(leases) = fs::read_dir(dir.path()) else {
                continue;
            };
            for lease in leases.flatten() {
                let name = lease.file_name();
                let name = name.to_string_lossy();
                if name == "lock" || name.starts_with("last_reserved_ip") || !holds(&lease.path()) {
                    continue;
                }
                match fs::remove_file(lease.path()) {
                    Ok(()) => released += 1,
                    Err(e) => log::warn!("releasing lease {}: {e}", lease.path().display()),
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
        let dir = self.path.join(ATTACHMENTS_DIR);
        match fs::read_dir(&dir) {
            Ok(mut entries) => Ok(entries.any(|e| {
                e.ok()
                    .and_then(|e| {
                        e.file_name()
                            .to_str()
                            .map(|n| n.ends_with(".json") && !n.starts_with('.'))
                    })
                    .unwrap_or(false)
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::from(e).context(format!("reading {}", dir.display()))),
        }
    }
}

fn open_lock(path: &Path) -> Result<fslock::LockFile> {
    fslock::LockFile::open(path)
        .map_err(|e| Error::internal(format!("opening lock {}: {e}", path.display())))
}

/// Held while lifecycle and records change; released on drop.
pub struct StateLock {
    _file: fslock::LockFile,
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

/// The longest escaped key used as it is in a file name.
const MAX_KEY_NAME: usize = 200;
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

pub fn ensure_dir(path: &Path) -> Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::from(e).context(format!("creating {}", path.display()))),
    }
}

/// Empties a dir by replacing it: what an old infra left is meaningless to
/// a new one.
pub fn reset_dir(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::from(e).context(format!("removing {}", path.display()))),
    }
    ensure_dir(path)
}

pub fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::from(e).context(format!("removing {}", path.display()))),
    }
}

/// None when the file does not exist; an empty or truncated file is an
/// error the caller can treat as stale.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::internal(format!("{} is corrupt: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::from(e).context(format!("reading {}", path.display()))),
    }
}

/// Whether a write is fsynced before the rename: a rename alone already
/// survives our being killed; the sync is for the machine going down.
#[derive(PartialEq)]
pub enum Durability {
    Synced,
    Unsynced,
}

/// Where `write_json_atomic` writes before the rename: `.NAME.tmp`.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("record");
    path.with_file_name(format!(".{name}.tmp"))
}

/// Write to a fresh temporary file (O_EXCL|O_NOFOLLOW), fsync when durable, rename.
/// A file has one writer at a time (the lock holder, or the owner of a
/// pending record, whom every other call leaves alone), so the temporary
/// name is fixed: a write killed half-way leaves it, and the next write or
/// removal of the same file takes it away, at no cost per call.
pub fn write_json_atomic<T: Serialize>(
    path: &Path,
    value: &T,
    durability: Durability,
) -> Result<()> {
    let bytes = serde_json::to_vec(value).map_err(|e| Error::internal(e.to_string()))?;
    let tmp = temp_path(path);
    let _ = fs::remove_file(&tmp);
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        if durability == Durability::Synced {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
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
