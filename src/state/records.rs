//! The attachment records in the state dir: read, written (atomically;
//! synced but for progress), listed and removed.

use super::files::{read_value_at, remove_at, temp_name, temp_path, write_json_at};
use super::{dir_flags, io_error, ATTACHMENTS_DIR};
use super::{Attachment, AttachmentKey, AttachmentState, Durability, StateDir, StateLock};
use crate::error::{Error, Kind, Result};
use crate::sys;
use nix::errno::Errno;
use nix::unistd::UnlinkatFlags;
use serde_json::Value;
use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

impl StateDir {
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
                Err(e) if e.kind == Kind::NewerState => return Err(e),
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

    /// True while any record is left (false: the infra may stop). Reads the
    /// dir only, never the records.
    pub fn has_attachments(&self, _lock: &StateLock) -> Result<bool> {
        let (_, names) = self.attachment_names()?;
        Ok(names
            .iter()
            .any(|n| n.ends_with(".json") && !n.starts_with('.')))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procfs::ProcessId;
    use crate::state::{FORMAT_KEY, FORMAT_VERSION};
    use serde_json::Map;
    use std::fs;

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
}
