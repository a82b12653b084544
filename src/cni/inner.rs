//! The inner chain a network config delegates to: inline (`delegate`),
//! or a conflist found by name in a confDir as libcni finds it; normalised
//! to one list of plugin configs.

use super::config::string;
use super::version::CniVersion;
use crate::error::{Context, Error, Kind, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub enum InnerSource {
    Delegate(Value),
    Network {
        name: String,
        conf_dir: Option<PathBuf>,
    },
}

/// The inner chain, normalised to a conflist.
#[derive(Debug, Clone, PartialEq)]
pub struct InnerList {
    pub cni_version: CniVersion,
    pub name: String,
    pub disable_check: bool,
    pub disable_gc: bool,
    pub plugins: Vec<Map<String, Value>>,
}

pub(super) fn default_conf_dir() -> Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("cni/net.d"));
    }
    match std::env::var_os("HOME").filter(|x| !x.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".config/cni/net.d")),
        None => Err(Error::config(
            "\"network\" needs a confDir: none given and neither XDG_CONFIG_HOME nor HOME is set",
        )),
    }
}

/// libcni's rule: the first file (by name) of *.conflist, *.conf, *.json in
/// the dir whose "name" matches.
pub(super) fn find_network(dir: &Path, name: &str) -> Result<InnerList> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| {
            format!(
                "\"network\" {name:?}: cannot read confDir {}",
                dir.display()
            )
        })
        .map_err(|e| e.with_kind(Kind::InvalidConfig))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("conflist" | "conf" | "json")
            )
        })
        .collect();
    files.sort();
    for file in files {
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        let Ok(value) = serde_json::from_slice::<Value>(&bytes) else {
            continue;
        };
        if value.get("name").and_then(Value::as_str) != Some(name) {
            continue;
        }
        return InnerList::from_value(&value, None, name)
            .map_err(|e| e.context(format!("network {name:?} in {}", file.display())));
    }
    Err(Error::config(format!(
        "\"network\" {name:?}: no conflist with that name in {}",
        dir.display()
    )))
}

impl InnerList {
    /// A conflist, or a single plugin config turned into a one-plugin list
    /// the way libcni's ConfListFromConf does. Without a "cniVersion" of
    /// its own it is at `default_version` (a delegate: the config's), or
    /// refused when there is none (a conflist file must say).
    pub fn from_value(
        value: &Value,
        default_version: Option<&CniVersion>,
        default_name: &str,
    ) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| Error::config("must be a JSON object"))?;
        let cni_version = match string(obj, "cniVersion")?.filter(|v| !v.is_empty()) {
            Some(v) => CniVersion::new(v),
            None => default_version
                .filter(|v| !v.is_empty())
                .cloned()
                .ok_or_else(|| Error::config("has no \"cniVersion\""))?,
        };
        let name = string(obj, "name")?.unwrap_or_else(|| default_name.to_string());
        crate::cni::env::validate_network_name(&name)?;
        let flag = |k: &str| obj.get(k).and_then(Value::as_bool).unwrap_or(false);
        let (disable_check, disable_gc) = (flag("disableCheck"), flag("disableGC"));
        let plugins: Vec<Map<String, Value>> = match obj.get("plugins") {
            Some(Value::Array(list)) => list
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    p.as_object()
                        .cloned()
                        .ok_or_else(|| Error::config(format!("plugins[{i}] is not an object")))
                })
                .collect::<Result<_>>()?,
            Some(v) => {
                return Err(Error::config(format!(
                    "\"plugins\" must be a list, not {v}"
                )))
            }
            None if obj.contains_key("type") => vec![obj.clone()],
            None => {
                return Err(Error::config(
                    "is neither a conflist (\"plugins\") nor a plugin config (\"type\")",
                ))
            }
        };
        if plugins.is_empty() {
            return Err(Error::config("has an empty \"plugins\" list"));
        }
        for (i, p) in plugins.iter().enumerate() {
            match p.get("type").and_then(Value::as_str) {
                Some(t) if is_plugin_name(t) => {}
                Some(t) => {
                    return Err(Error::config(format!(
                        "plugins[{i}] \"type\" {t:?} is not a plugin file name"
                    )))
                }
                None => return Err(Error::config(format!("plugins[{i}] has no \"type\""))),
            }
        }
        Ok(InnerList {
            cni_version,
            name,
            disable_check,
            disable_gc,
            plugins,
        })
    }

    pub fn plugin_type(plugin: &Map<String, Value>) -> &str {
        plugin.get("type").and_then(Value::as_str).unwrap_or("")
    }

    pub fn to_value(&self) -> Value {
        serde_json::json!({
            "cniVersion": self.cni_version,
            "name": self.name,
            "disableCheck": self.disable_check,
            "disableGC": self.disable_gc,
            "plugins": self.plugins,
        })
    }
}

/// A bare file name: `type` is looked up in CNI_PATH, never a path.
fn is_plugin_name(t: &str) -> bool {
    !t.is_empty() && t != "." && t != ".." && !t.contains('/') && !t.contains('\0')
}
