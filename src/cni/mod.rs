//! The CNI contract: the environment, the network config on stdin, and what
//! goes back on stdout.

pub mod config;
pub mod env;
pub mod gojson;
pub mod version;

use crate::error::Error;
use serde_json::json;

/// Version assumed for error objects when the config could not be read.
pub const DEFAULT_VERSION: &str = "1.0.0";

pub fn version_reply(cni_version: &str) -> String {
    json!({ "cniVersion": cni_version, "supportedVersions": version::SUPPORTED }).to_string()
}

/// The spec's error object. An inner plugin's own object is passed through
/// unchanged.
pub fn error_reply(err: &Error, cni_version: &str) -> Vec<u8> {
    if let Some(raw) = &err.passthrough {
        return raw.clone();
    }
    let mut obj = json!({ "cniVersion": cni_version, "code": err.code, "msg": err.msg });
    if !err.details.is_empty() {
        obj["details"] = json!(err.details);
    }
    let mut out = serde_json::to_vec(&obj).unwrap_or_default();
    out.push(b'\n');
    out
}
