//! Finding an inner plugin in CNI_PATH, where the caller stands.

use crate::error::{Error, Kind, Result};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

/// An inner plugin as the caller found it in CNI_PATH, held open: the
/// exec happens after `setns` into the infra's mount namespace and
/// `chdir("/")`, where the path (relative, or under /run or /var/lib/cni,
/// which the infra has its own of) may name nothing or another binary.
pub struct PluginBinary {
    pub path: PathBuf,
    pub(super) fd: OwnedFd,
}

impl PluginBinary {
    pub(super) fn name(&self) -> String {
        self.path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("plugin")
            .to_string()
    }
}

/// The plugin binary for `plugin_type`, first match in CNI_PATH, opened
/// (O_PATH) where the caller stands.
pub fn find_plugin(plugin_type: &str, cni_path: &[PathBuf]) -> Result<PluginBinary> {
    for dir in cni_path {
        let candidate = dir.join(plugin_type);
        let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(&candidate)
        else {
            continue;
        };
        if let Ok(meta) = file.metadata() {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(PluginBinary {
                    path: candidate,
                    fd: OwnedFd::from(file),
                });
            }
        }
    }
    let dirs: Vec<String> = cni_path.iter().map(|d| d.display().to_string()).collect();
    Err(Error::new(
        Kind::InnerPlugin,
        format!(
            "inner plugin {plugin_type:?} not found in CNI_PATH [{}]",
            dirs.join(":")
        ),
    ))
}
