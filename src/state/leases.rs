//! The host-local leases of an attachment whose infra died: released from
//! the infra's /var/lib/cni on disk, where they outlive it.

use super::{dir_flags, StateDir, StateLock, VAR_LIB_CNI_DIR};
use crate::sys;
use nix::fcntl::OFlag;
use nix::unistd::UnlinkatFlags;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;

impl StateDir {
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
}
