//! User namespaces: whose is a netns, and joining one we own. The inner
//! plugins need CAP_NET_ADMIN over the container netns, which they have only
//! in the user namespace that owns it (or an ancestor of that one).

use crate::error::{Error, Kind, Result};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

// ioctl_ns(2): _IO(0xb7, 1), _IO(0xb7, 2), _IO(0xb7, 4).
const NS_GET_USERNS: libc::c_ulong = 0xb701;
const NS_GET_PARENT: libc::c_ulong = 0xb702;
const NS_GET_OWNER_UID: libc::c_ulong = 0xb704;

pub enum Owner {
    /// Our user namespace owns it, or one inside ours does.
    Ours,
    /// Another user namespace: the one that owns the netns directly.
    Foreign { userns: OwnedFd },
}

/// Which user namespace owns the namespace file `ns`.
pub fn owner_of(ns: &File) -> std::io::Result<Owner> {
    let ours = crate::procfs::self_ns_inode("user").unwrap_or(0);
    let direct = ns_ioctl(ns.as_raw_fd(), NS_GET_USERNS)?;
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
        match ns_ioctl(current.as_raw_fd(), NS_GET_PARENT) {
            Ok(parent) => current = parent,
            Err(_) => return Ok(Owner::Foreign { userns: direct }),
        }
    }
}

/// Joins `userns` when our uid owns it, as a rootless runtime's own user
/// namespace is owned by the user. Must run while we are single-threaded.
pub fn join_owned(userns: &OwnedFd, what: &str) -> Result<()> {
    let mut owner: libc::uid_t = 0;
    // SAFETY: NS_GET_OWNER_UID writes one uid_t through the pointer, which is
    // valid and writable for the duration of the call.
    let rc = unsafe {
        libc::ioctl(
            userns.as_raw_fd(),
            NS_GET_OWNER_UID,
            &mut owner as *mut libc::uid_t,
        )
    };
    let me = nix::unistd::geteuid().as_raw();
    if rc < 0 || owner != me {
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

fn ns_ioctl(fd: std::os::fd::RawFd, request: libc::c_ulong) -> std::io::Result<OwnedFd> {
    // SAFETY: these ioctls take no argument and return a new fd or -1.
    let rc = unsafe { libc::ioctl(fd, request) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(rc) })
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
