//! Opening the state dir: where it is by default, and the checks that no
//! other user can reach it or replace anything above it.

use super::{dir_flags, io_error, DEFAULT_DIR_NAME, ROOT_STATE_DIR};
use crate::error::{Error, Kind, Result};
use crate::sys;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{FileStat, Mode, SFlag};
use std::fs;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The state dir when XDG_RUNTIME_DIR is not set, as a runtime started by
/// systemd or as root has it: real root's `/run/rootless-cni-plugin`, else
/// the user's logind dir `/run/user/UID` (UID as the machine knows us) when
/// it is there and ours, as logind makes it.
pub(super) fn default_without_runtime_dir() -> Result<PathBuf> {
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
pub(super) fn open_checked(path: &Path, create: bool) -> Result<Option<(PathBuf, OwnedFd)>> {
    let unsafe_dir = |why: String| {
        Error::new(
            Kind::UnsafeStateDir,
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
    let mut dir = sys::open(Path::new("/"), walk).map_err(|e| io_error(e, "opening /"))?;
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
