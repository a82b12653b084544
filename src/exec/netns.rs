//! The runtime's container netns: opened in the caller's namespaces and
//! handed to the inner plugins as an inherited fd, after the verb has made
//! sure (`join_owner_userns`) that our user namespace has the power over it
//! that they need.

use crate::error::{Error, Kind, Result};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The runtime's container netns, and the name inner plugins know it by.
pub struct ContainerNetns {
    /// What the runtime gave us as CNI_NETNS.
    pub runtime_path: Option<PathBuf>,
    fd: Option<OwnedFd>,
}

impl ContainerNetns {
    /// Opens the netns for ADD and CHECK, where it must exist.
    /// Changes nothing: a netns owned by a user namespace we could join
    /// is refused by the inner plugins until `join_owner_userns`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| {
            Error::env(format!("CNI_NETNS {}: cannot open it: {e}", path.display()))
        })?;
        Ok(ContainerNetns {
            runtime_path: Some(path.to_path_buf()),
            fd: Some(OwnedFd::from(file)),
        })
    }

    /// Makes sure our user namespace has the power over the netns the
    /// inner plugins need: it owns it, or this process joins the one that
    /// does when our uid owns that (a runtime outside its own user
    /// namespace). Otherwise a clear error instead of a failure deep inside
    /// a plugin. Joining changes the whole (single-threaded) process.
    pub fn join_owner_userns(&self) -> Result<()> {
        let (Some(fd), Some(path)) = (&self.fd, &self.runtime_path) else {
            return Ok(());
        };
        let file = std::fs::File::from(fd.try_clone()?);
        join_owner_of(&file, path)
    }

    /// For DEL and GC: the netns may be gone, or not given at all. With
    /// `attached`, the inode of the netns the attachment was made in, a
    /// path that now names another netns (`/proc/PID/ns/net` of a reused
    /// PID) counts as gone too: the inner DEL must never run in a
    /// stranger's netns.
    pub fn open_if_present(path: Option<&Path>, attached: Option<u64>) -> Self {
        // A path that is no longer a netns (the runtime unmounted it and
        // left the file) is as gone as a missing one.
        let fd = path
            .and_then(|p| std::fs::File::open(p).ok())
            .filter(is_netns)
            .filter(|f| match (attached, f.metadata()) {
                (None, _) => true,
                (Some(ino), Ok(m)) if m.ino() == ino => true,
                (Some(ino), found) => {
                    let found = found.map(|m| m.ino().to_string());
                    log::warn!(
                        "{}: netns inode {found:?}, attached in {ino}: not the container's; \
                         the inner DEL runs without a netns",
                        path.unwrap_or(Path::new("")).display()
                    );
                    false
                }
            })
            .map(OwnedFd::from);
        ContainerNetns {
            runtime_path: path.map(Path::to_path_buf),
            fd,
        }
    }

    /// CNI_NETNS as the inner plugins see it.
    pub fn inner_path(&self) -> String {
        match &self.fd {
            Some(fd) => format!("/proc/self/fd/{}", fd.as_raw_fd()),
            // Gone (or never given): DEL without a netns, which the spec
            // allows and the plugins take as "clean up what is outside it".
            // The runtime's path would not do: inside the infra's mount
            // namespace it may not exist, or be something else.
            None => String::new(),
        }
    }

    /// The fd the inner plugins inherit, when the netns is there.
    pub(super) fn raw_fd(&self) -> Option<RawFd> {
        self.fd.as_ref().map(|f| f.as_raw_fd())
    }

    pub fn inode(&self) -> Option<u64> {
        let fd = self.fd.as_ref()?.try_clone().ok()?;
        std::fs::File::from(fd).metadata().ok().map(|m| m.ino())
    }

    pub fn runtime_str(&self) -> String {
        self.runtime_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }
}

fn is_netns(file: &std::fs::File) -> bool {
    let nsfs = nix::sys::statfs::FsType(libc::NSFS_MAGIC as _);
    nix::sys::statfs::fstatfs(file).is_ok_and(|s| s.filesystem_type() == nsfs)
}

/// `ContainerNetns::join_owner_userns` for the netns file at `path`.
fn join_owner_of(netns: &std::fs::File, path: &Path) -> Result<()> {
    let what = format!("CNI_NETNS {}", path.display());
    match crate::userns::owner_of(netns) {
        Ok(crate::userns::Owner::Ours) => Ok(()),
        Ok(crate::userns::Owner::Foreign { userns, .. }) => {
            crate::userns::join_owned(&userns, &what)
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY) | Some(libc::EINVAL)) => {
            Err(Error::env(format!("{what} is not a network namespace")))
        }
        // The kernel will not even name the owner: it is outside ours.
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Err(Error::new(
            Kind::InvalidEnv,
            format!(
                "{what} belongs to a user namespace outside ours that we do not own: the inner plugins could not configure it; run the runtime in the user namespace that created the container"
            ),
        )),
        // A kernel without the ioctl: let the plugins find out.
        Err(_) => Ok(()),
    }
}
