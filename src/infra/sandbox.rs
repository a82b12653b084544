//! The sandbox: a process that only waits. It is started (by the supervisor)
//! in new network and mount namespaces, which are the infra. Here it makes
//! them fit for the reference plugins, then reports ready.

use crate::error::{Context, Result};
use crate::state::{self, StateDir};
use crate::sys;
use nix::mount::{mount, MsFlags};
use std::io::Write;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::Path;

pub const ENTRY: &str = "__sandbox";

/// Entry of the hidden `__sandbox` command.
pub fn main(state_dir: &Path, ready_fd: i32, settings: &super::Settings) -> i32 {
    let _ = sys::close_on_exec(ready_fd);
    // SAFETY: the supervisor handed us this fd for our exclusive use.
    let ready = unsafe { OwnedFd::from_raw_fd(ready_fd) };
    let mut ready = std::fs::File::from(ready);
    match setup(state_dir, settings) {
        Ok(()) => {
            let _ = ready.write_all(b"ok\n");
        }
        Err(e) => {
            let _ = writeln!(ready, "error: sandbox: {e}");
            return 1;
        }
    }
    drop(ready);
    loop {
        nix::unistd::pause();
    }
}

fn setup(state_dir: &Path, settings: &super::Settings) -> Result<()> {
    // Nothing we mount may leak back to the caller's mount namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making / private")?;
    // The state dir checked and opened again, its dirs opened from its fd
    // and mounted from theirs: no path is looked up after the check, and
    // the mounts below (the state dir may live under /var/lib or /run)
    // cannot hide it.
    let state = StateDir::at(state_dir.to_path_buf())?;
    let run = state.open_dir(state::RUN_DIR)?;
    let var_lib_cni = state.open_dir(state::VAR_LIB_CNI_DIR)?;
    // The caller's own mounts on /var/lib and /run (rootless podman binds
    // them from directories of the user's, and deletes those when its
    // last container goes) must not carry the infra's: a mount whose
    // mountpoint is deleted is detached by the kernel in every namespace,
    // and the infra, which outlives the caller, would lose /var/lib/cni
    // and /run. What the caller's user namespace did not mount (the
    // machine's own mounts) is locked and stays.
    // The state dir itself may lie on such a mount (podman binds
    // $XDG_RUNTIME_DIR, /run/user/UID, under its /run; RootlessKit's
    // --copy-up=/run does the same): its dirs are cloned as mounts of
    // their own first, since the kernel binds nothing from a detached
    // mount. A kernel without open_tree keeps the caller's mounts.
    let run_tree = sys::clone_mount(run.as_fd());
    let var_lib_cni_tree = sys::clone_mount(var_lib_cni.as_fd());
    if run_tree.is_some() && var_lib_cni_tree.is_some() {
        for path in ["/var/lib/cni", "/var/lib", "/run"] {
            detach_all(path);
        }
    }
    mount_var_lib_cni(&state, &var_lib_cni, var_lib_cni_tree.as_ref())?;
    place(&run, run_tree.as_ref(), Path::new("/run"))?;
    sys::loopback_up()?;
    sysctl("net/ipv4/ip_forward", "1")?;
    if settings.ipv6 {
        // Forwarding turns off router advertisements unless accept_ra is 2,
        // and slirp4netns's tap0 gets its IPv6 address from one.
        sysctl("net/ipv6/conf/default/accept_ra", "2")?;
        // tap0 is alone on slirp4netns's link: duplicate address detection
        // would only keep its address unusable for the first seconds.
        sysctl("net/ipv6/conf/default/accept_dad", "0")?;
        sysctl("net/ipv6/conf/all/forwarding", "1")?;
    }
    Ok(())
}

fn sysctl(key: &str, value: &str) -> Result<()> {
    std::fs::write(format!("/proc/sys/{key}"), value)
        .with_context(|| format!("setting {key} to {value}"))
}

/// Lazily unmounts every mount stacked on `path` (with what is mounted
/// under it), up to the first one we may not unmount: a locked mount of
/// the machine's, or none left.
fn detach_all(path: &str) {
    for _ in 0..32 {
        match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => log::debug!("sandbox: detached the caller's mount on {path}"),
            Err(_) => return,
        }
    }
}

/// Mounts the dir `dir` is open on at `dst`: its clone when there is one
/// (see `sys::clone_mount`), else a bind from its fd.
fn place(dir: &OwnedFd, tree: Option<&OwnedFd>, dst: &Path) -> Result<()> {
    match tree {
        Some(tree) => sys::move_mount_to(tree, dst).with_context(|| {
            format!(
                "mounting {} on {}",
                sys::fd_path(dir.as_fd()).display(),
                dst.display()
            )
        }),
        None => bind(&sys::fd_path(dir.as_fd()), dst),
    }
}

fn bind(src: &Path, dst: &Path) -> Result<()> {
    mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .with_context(|| format!("bind-mounting {} on {}", src.display(), dst.display()))
}

/// /var/lib/cni from the state dir. When there is no /var/lib/cni (and
/// the user cannot create it), /var/lib gets an overlay to make room.
fn mount_var_lib_cni(
    state: &StateDir,
    var_lib_cni: &OwnedFd,
    tree: Option<&OwnedFd>,
) -> Result<()> {
    let target = Path::new("/var/lib/cni");
    if !target.is_dir() {
        state.ensure_dir(state::OVERLAY_DIR)?;
        let overlay = state.open_dir(state::OVERLAY_DIR)?;
        let upper = state::dir_in(overlay.as_fd(), "upper")?;
        let work = state::dir_in(overlay.as_fd(), "work")?;
        // The overlay takes paths in a comma-separated list: /proc/self/fd/N
        // names the dirs without the state dir's path (and whatever commas
        // or colons it holds).
        let u = sys::fd_path(upper.as_fd()).display().to_string();
        let w = sys::fd_path(work.as_fd()).display().to_string();
        let opts = format!("lowerdir=/var/lib,upperdir={u},workdir={w}");
        let with_userxattr = format!("{opts},userxattr");
        mount(
            Some("overlay"),
            "/var/lib",
            Some("overlay"),
            MsFlags::empty(),
            Some(opts.as_str()),
        )
        .or_else(|_| {
            mount(
                Some("overlay"),
                "/var/lib",
                Some("overlay"),
                MsFlags::empty(),
                Some(with_userxattr.as_str()),
            )
        })
        .context("mounting an overlay on /var/lib to make room for /var/lib/cni")?;
        std::fs::create_dir_all(target).context("creating /var/lib/cni in the overlay")?;
    }
    place(var_lib_cni, tree, target)
}
