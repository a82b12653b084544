//! Spec versions: which we speak, and libcni's rules for converting a
//! result between them. The inner chain runs at the delegate's own version;
//! the runtime gets its result at the version it asked for.

use crate::error::{Error, Kind, Result};
use serde_json::Value;

/// What we answer to VERSION: everything podman, containerd, CRI-O and
/// kubelet write, old and new.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// (major, minor, patch); None when it is not a version at all.
pub fn parse(v: &str) -> Option<(u32, u32, u32)> {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    let version = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(version)
}

/// `v` is at least `min`; unparsable versions are not.
pub fn at_least(v: &str, min: &str) -> bool {
    matches!((parse(v), parse(min)), (Some(a), Some(b)) if a >= b)
}

pub fn check_supported(v: &str) -> Result<()> {
    if SUPPORTED.contains(&v) {
        return Ok(());
    }
    Err(Error::new(
        Kind::IncompatibleVersion,
        format!(
            "cniVersion {v:?} is not supported; this plugin speaks {}",
            SUPPORTED.join(", ")
        ),
    ))
}

/// Converts an ADD result from `from` to `to` as libcni does: results from
/// 0.3.0 to 1.1.0 share one shape but for `ips[].version`, which 1.0.0
/// dropped. Anything older does not convert.
pub fn convert_result(result: &Value, from: &str, to: &str) -> Result<Value> {
    check_convertible(from, to)?;
    let mut out = result.clone();
    out["cniVersion"] = Value::String(to.to_string());
    let to_old = !at_least(to, "1.0.0");
    if let Some(ips) = out.get_mut("ips").and_then(Value::as_array_mut) {
        for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
            if to_old {
                let family = match ip.get("address").and_then(Value::as_str) {
                    Some(a) if a.contains(':') => "6",
                    _ => "4",
                };
                ip.insert("version".into(), Value::String(family.into()));
            } else {
                ip.remove("version");
            }
        }
    }
    Ok(out)
}

/// Checked before an ADD touches anything.
pub fn check_convertible(from: &str, to: &str) -> Result<()> {
    let convertible = |v: &str| at_least(v, "0.3.0");
    if convertible(from) && convertible(to) {
        return Ok(());
    }
    Err(Error::new(
        Kind::IncompatibleVersion,
        format!("cannot convert a result of version {from} (the inner chain's) to version {to} (the runtime's)"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // The conversions themselves: testdata/results/, read by the chain's
    // unit tests.

    #[test]
    fn compares() {
        assert!(at_least("1.1.0", "1.0.0"));
        assert!(at_least("0.4.0", "0.4.0"));
        assert!(!at_least("0.3.1", "0.4.0"));
        assert!(!at_least("x", "0.1.0"));
        assert!(parse("1.0").is_none());
    }

    #[test]
    fn ancient_versions_do_not_convert() {
        let e = convert_result(&json!({}), "1.0.0", "0.2.0").unwrap_err();
        assert_eq!(e.code(), 1);
        assert!(e.msg.contains("0.2.0") && e.msg.contains("1.0.0"));
    }
}
