//! User namespaces: whose is a netns, and joining one we own. The inner
//! plugins need CAP_NET_ADMIN over the container netns, which they have only
//! in the user namespace that owns it (or an ancestor of that one).

use crate::error::{Error, Kind, Result};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

// ioctl_ns(2): _IO(0xb7, 1), _IO(0xb7, 2), _IO(0xb7, 4).
use crate::sys::{ns_ioctl, NS_GET_PARENT, NS_GET_USERNS};

pub enum Owner {
    /// Our user namespace owns it, or one inside ours does.
    Ours,
    /// Another user namespace: the one that owns the netns directly.
    Foreign { userns: OwnedFd },
}

/// Which user namespace owns the namespace file `ns`.
pub fn owner_of(ns: &File) -> std::io::Result<Owner> {
    let ours = crate::procfs::self_ns_inode("user").unwrap_or(0);
    let direct = ns_ioctl(ns.as_fd(), NS_GET_USERNS)?;
    // Power over a descendant user namespace comes from capabilities in
    // ours; an ordinary user in the initial namespace has none.
    if !has_admin_caps() {
        return Ok(if inode_of(&direct)? == ours {
            Owner::Ours
        } else {
            Owner::Foreign { userns: direct }
        });
    }
    let mut current = direct.try_clone()?;
    loop {
        if inode_of(&current)? == ours {
            return Ok(Owner::Ours);
        }
        // EPERM once we walk out of what we can see: not inside ours.
        match ns_ioctl(current.as_fd(), NS_GET_PARENT) {
            Ok(parent) => current = parent,
            Err(_) => return Ok(Owner::Foreign { userns: direct }),
        }
    }
}

/// Joins `userns` when our uid owns it, as a rootless runtime's own user
/// namespace is owned by the user. The kernel lets only a single-threaded
/// process change its user namespace: a second thread is refused here,
/// naming the cause, instead of setns's bare EINVAL.
pub fn join_owned(userns: &OwnedFd, what: &str) -> Result<()> {
    let threads = crate::procfs::own_thread_count();
    if threads > 1 {
        return Err(Error::internal(format!(
            "joining the user namespace that owns {what}: this process runs {threads} threads, and only a single-threaded one may change its user namespace"
        )));
    }
    let owner = crate::sys::ns_owner_uid(userns.as_fd());
    let me = nix::unistd::geteuid().as_raw();
    if owner.as_ref().ok() != Some(&me) {
        // An owner the kernel would not name is reported as uid 0.
        let owner = owner.unwrap_or(0);
        return Err(Error::new(
            Kind::InvalidEnv,
            format!(
                "{what} belongs to user namespace {} owned by uid {owner}, not by us (uid {me}): the inner plugins could not configure it; run the runtime in that user namespace",
                inode_of(userns).unwrap_or(0)
            ),
        ));
    }
    nix::sched::setns(userns, nix::sched::CloneFlags::CLONE_NEWUSER).map_err(|e| {
        Error::new(
            Kind::InvalidEnv,
            format!("joining the user namespace that owns {what}: {e}"),
        )
        .with_source(e)
    })?;
    log::info!(
        "joined user namespace {} (it owns {what})",
        inode_of(userns).unwrap_or(0)
    );
    Ok(())
}

/// CAP_NET_ADMIN and CAP_SYS_ADMIN in our effective set.
fn has_admin_caps() -> bool {
    // capability(7) numbers: CAP_NET_ADMIN 12, CAP_SYS_ADMIN 21.
    const NEEDED: u64 = (1 << 12) | (1 << 21);
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|eff| eff & NEEDED == NEEDED)
}

fn inode_of(fd: &OwnedFd) -> std::io::Result<u64> {
    Ok(File::from(fd.try_clone()?).metadata()?.ino())
}

/// The uid map of our user namespace, as triples (inside, outside, count).
fn uid_map() -> Vec<[u32; 3]> {
    std::fs::read_to_string("/proc/self/uid_map")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<u32> = l
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            <[u32; 3]>::try_from(f).ok()
        })
        .collect()
}

/// Whether we run in the machine's initial user namespace: its map is the
/// whole identity range, which only the initial one has by construction.
pub fn in_initial_user_namespace() -> bool {
    uid_map() == [[0, 0, u32::MAX]]
}

/// `uid` of our user namespace as its parent sees it (the machine, for a
/// rootless runtime's namespace); `uid` itself when it is not mapped.
pub fn outside_uid(uid: u32) -> u32 {
    uid_map()
        .into_iter()
        .find_map(|[inside, outside, count]| {
            (uid >= inside && uid - inside < count).then(|| outside + (uid - inside))
        })
        .unwrap_or(uid)
}
