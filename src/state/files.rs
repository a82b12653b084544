//! The state dir's file primitives, each relative to a dir's fd and
//! never following a symlink: making and removing dirs and files, and
//! JSON files read with their format checked and written atomically.

use super::{dir_flags, io_error, FORMAT_KEY, FORMAT_VERSION};
use crate::error::{Error, Kind, Result};
use crate::sys;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;
use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Creates the dir `name` in `dir` (0700) unless it exists.
pub(super) fn ensure_dir_at(dir: BorrowedFd, name: &OsStr, path: &Path) -> Result<()> {
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
pub(super) fn remove_tree_at(dir: BorrowedFd, name: &OsStr) -> nix::Result<()> {
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
pub(super) fn remove_at(dir: BorrowedFd, name: &OsStr, path: &Path) -> Result<()> {
    match nix::unistd::unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(io_error(e, format!("removing {}", path.display()))),
    }
}

/// None when the file does not exist; an empty or truncated file is an
/// error the caller can treat as stale. A symlink or anything but a
/// regular file in its place is an error too, never followed or waited on.
pub(super) fn read_value_at(dir: BorrowedFd, name: &OsStr, path: &Path) -> Result<Option<Value>> {
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
        Kind::NewerState,
        format!(
            "{} was written by a newer rootless-cni (state format {version}; this binary reads up to {FORMAT_VERSION}): \
             left as it is; run the newer binary (check which one the runtime's CNI_PATH finds), \
             or stop what uses this state dir and remove it",
            path.display()
        ),
    ))
}

/// `read_value_at`, as a `T`.
pub(super) fn read_json_at<T: DeserializeOwned>(
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

/// Whether a write is fsynced before the rename: a rename alone already
/// survives our being killed; the sync is for the machine going down.
#[derive(PartialEq)]
pub enum Durability {
    Synced,
    Unsynced,
}

/// Where `write_json_at` writes before the rename: `.NAME.tmp`.
pub(super) fn temp_name(name: &str) -> String {
    format!(".{name}.tmp")
}

pub(super) fn temp_path(path: &Path) -> PathBuf {
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
pub(super) fn write_json_at<T: Serialize>(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_format_is_refused_an_unversioned_one_is_format_1() {
        let path = Path::new("x.json");
        assert!(check_format(&serde_json::json!({"a": 1}), path).is_ok());
        assert!(check_format(&serde_json::json!({FORMAT_KEY: FORMAT_VERSION}), path).is_ok());
        let newer = serde_json::json!({FORMAT_KEY: FORMAT_VERSION + 1});
        assert_eq!(
            check_format(&newer, path).unwrap_err().kind,
            Kind::NewerState
        );
    }
}
