//! Handles on the infra's namespaces, and how the infra sees the files the
//! caller found: a path means the same file inside only when the infra's
//! mount namespace shows that very file (device and inode) there.

use super::lookup::PluginBinary;
use crate::error::{Error, Result};
use crate::infra::InfraInfo;
use crate::sys;
use nix::sched::{setns, CloneFlags};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// Handles on the infra's namespaces, checked against infra.json.
pub struct InfraNs {
    // Shared with the `pre_exec` of every command `enter` prepares, so that
    // they are open when it forks, however long the command is kept.
    net: Arc<OwnedFd>,
    mnt: Arc<OwnedFd>,
    /// `/proc/<our pid>/root` when that names our root from inside the
    /// infra too: the prefix of CNI_PATH entries the infra sees otherwise.
    caller_root: Option<String>,
    /// `/proc/<sandbox pid>/root`: the infra's view of the file system.
    infra_root: String,
}

impl InfraNs {
    pub fn open(info: &InfraInfo) -> Result<Self> {
        let open = |kind: &str, want: u64| -> Result<OwnedFd> {
            let path = format!("/proc/{}/ns/{kind}", info.sandbox.pid);
            let file = std::fs::File::open(&path).map_err(|e| {
                Error::internal(format!("opening the infra's {kind} namespace {path}: {e}"))
            })?;
            if file.metadata()?.ino() != want {
                return Err(Error::internal(format!(
                    "the infra's {kind} namespace changed under us (sandbox {} is gone)",
                    info.sandbox.pid
                )));
            }
            Ok(OwnedFd::from(file))
        };
        Ok(InfraNs {
            net: Arc::new(open("net", info.netns)?),
            mnt: Arc::new(open("mnt", info.mntns)?),
            caller_root: caller_root_seen_from(info.sandbox.pid),
            infra_root: format!("/proc/{}/root", info.sandbox.pid),
        })
    }

    /// Whether the infra finds at `absolute` the very file the caller
    /// found there, `ours` (its device and inode; None: the caller found
    /// nothing, and neither does the infra then).
    fn sees_same_file(&self, absolute: &Path, ours: Option<(u64, u64)>) -> bool {
        let inside = absolute.strip_prefix("/").unwrap_or(absolute);
        let theirs = std::fs::metadata(Path::new(&self.infra_root).join(inside))
            .ok()
            .map(dev_ino);
        ours.is_some() && ours == theirs
    }

    /// What to exec for `binary` once inside the infra: its absolute path
    /// when the infra sees the very file the caller found there (a script
    /// plugin then sees its own path as $0), else the caller's fd of it:
    /// /proc/self is the child when it execs, whatever the infra's mount
    /// namespace holds at that path.
    pub(super) fn program(&self, binary: &PluginBinary) -> PathBuf {
        let by_fd = PathBuf::from(format!("/proc/self/fd/{}", binary.fd.as_raw_fd()));
        let Ok(cwd) = std::env::current_dir() else {
            return by_fd;
        };
        let absolute = cwd.join(&binary.path);
        let ours = binary
            .fd
            .try_clone()
            .ok()
            .and_then(|fd| std::fs::File::from(fd).metadata().ok())
            .map(dev_ino);
        match self.sees_same_file(&absolute, ours) {
            true => absolute,
            false => by_fd,
        }
    }

    /// CNI_PATH as the inner plugins must see it to find the binaries the
    /// caller would (bridge runs its IPAM plugin from CNI_PATH): relative
    /// entries made absolute against our working directory; an entry the
    /// infra sees as another dir (under /run or /var/lib/cni, which it has
    /// its own of, or not there at all) goes under `/proc/<our pid>/root`.
    /// Only those: that path dies with us, and an inner plugin of ours that
    /// outlives a killed call (a DEL's bridge, about to run host-local)
    /// must still find its IPAM plugin in the usual dirs.
    pub(super) fn cni_path(&self, paths: &[PathBuf]) -> String {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        paths
            .iter()
            .map(|p| {
                let absolute = cwd.join(p);
                let ours = std::fs::metadata(&absolute).ok().map(dev_ino);
                match &self.caller_root {
                    Some(root) if !self.sees_same_file(&absolute, ours) => {
                        let inside = absolute.strip_prefix("/").unwrap_or(&absolute);
                        Path::new(root).join(inside).display().to_string()
                    }
                    _ => absolute.display().to_string(),
                }
            })
            .collect::<Vec<_>>()
            .join(":")
    }

    /// Makes `cmd` start inside the infra: `setns` into its mount and
    /// network namespaces between fork and exec. `keep` are the fds to pass
    /// on; every other fd the caller had without CLOEXEC (the runtime's)
    /// is closed on exec: an inner plugin may start a daemon (dnsname's
    /// dnsmasq) that would hold it as long as the infra lives.
    pub fn enter(&self, cmd: &mut Command, keep: [Option<std::os::fd::RawFd>; 2]) {
        let (net, mnt) = (Arc::clone(&self.net), Arc::clone(&self.mnt));
        // SAFETY: runs between fork and exec in the single-threaded child;
        // join_namespaces, close_range and fcntl are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                join_namespaces(mnt.as_fd(), net.as_fd())?;
                sys::cloexec_inherited_fds()?;
                for fd in keep.into_iter().flatten() {
                    sys::keep_on_exec(fd)?;
                }
                Ok(())
            });
        }
    }
}

fn dev_ino(m: std::fs::Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

/// `/proc/<our pid>/root`, if the infra's /proc shows that pid in our mount
/// namespace (a caller in another PID namespace would be someone else
/// there, or no one; in our mount namespace it resolves the same paths).
fn caller_root_seen_from(sandbox: i32) -> Option<String> {
    let me = std::process::id();
    let inside = format!("/proc/{sandbox}/root/proc/{me}/ns/mnt");
    let ino = |p: &str| std::fs::metadata(p).map(|m| m.ino()).ok();
    match (ino(&inside), ino("/proc/self/ns/mnt")) {
        (Some(a), Some(b)) if a == b => Some(format!("/proc/{me}/root")),
        _ => {
            log::warn!(
                "our pid {me} is not us inside the infra: the inner plugins get CNI_PATH as it is"
            );
            None
        }
    }
}

/// Joins the mount namespace `mnt`, then the network namespace `net` (both
/// fds), and moves to `/` of the new mount namespace: what makes a process
/// run inside the infra. Meant for `pre_exec`: setns into a mount namespace
/// needs a single-threaded caller, and nothing here allocates.
pub fn join_namespaces(mnt: BorrowedFd, net: BorrowedFd) -> std::io::Result<()> {
    setns(mnt, CloneFlags::CLONE_NEWNS)?;
    setns(net, CloneFlags::CLONE_NEWNET)?;
    nix::unistd::chdir("/").map_err(std::io::Error::from)
}
