//! Spec versions: which we speak, and libcni's rules for converting a
//! result between them. The inner chain runs at the delegate's own version;
//! the runtime gets its result at the version it asked for.

use crate::error::{Error, Kind, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::borrow::Cow;
use std::fmt;

/// What we answer to VERSION: everything podman, containerd, CRI-O and
/// kubelet write, old and new.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A `cniVersion` as a config or the runtime gave it, parsed once.
/// Versions order by number; one that is not `major.minor.patch` orders
/// before every real one, so it is never "at least" anything. Two versions
/// are equal only when written alike ("1.0.0" is not "01.0.0"): the reply
/// repeats what was asked, as it was written.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CniVersion {
    // Field order is the order: by number first, then as written.
    number: Option<(u32, u32, u32)>,
    given: Cow<'static, str>,
}

impl CniVersion {
    pub const V0_1_0: CniVersion = CniVersion::known(0, 1, 0, "0.1.0");
    pub const V0_3_0: CniVersion = CniVersion::known(0, 3, 0, "0.3.0");
    pub const V0_4_0: CniVersion = CniVersion::known(0, 4, 0, "0.4.0");
    pub const V1_0_0: CniVersion = CniVersion::known(1, 0, 0, "1.0.0");
    pub const V1_1_0: CniVersion = CniVersion::known(1, 1, 0, "1.1.0");

    const fn known(major: u32, minor: u32, patch: u32, given: &'static str) -> CniVersion {
        CniVersion {
            number: Some((major, minor, patch)),
            given: Cow::Borrowed(given),
        }
    }

    /// Any string is kept (and printed back) as it is; only one of the form
    /// `major.minor.patch` compares as a version.
    pub fn new(given: impl Into<String>) -> CniVersion {
        let given = given.into();
        CniVersion {
            number: parse(&given),
            given: Cow::Owned(given),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.given
    }

    pub fn is_empty(&self) -> bool {
        self.given.is_empty()
    }
}

/// (major, minor, patch); None when it is not a version at all.
fn parse(v: &str) -> Option<(u32, u32, u32)> {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    let version = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(version)
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.given)
    }
}

impl Serialize for CniVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.given)
    }
}

impl<'de> Deserialize<'de> for CniVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d).map(CniVersion::new)
    }
}

impl PartialEq<str> for CniVersion {
    fn eq(&self, other: &str) -> bool {
        self.given == other
    }
}

impl PartialEq<&str> for CniVersion {
    fn eq(&self, other: &&str) -> bool {
        self.given == *other
    }
}

pub fn check_supported(v: &CniVersion) -> Result<()> {
    if SUPPORTED.contains(&v.as_str()) {
        return Ok(());
    }
    Err(Error::new(
        Kind::IncompatibleVersion,
        format!(
            "cniVersion {:?} is not supported; this plugin speaks {}",
            v.as_str(),
            SUPPORTED.join(", ")
        ),
    ))
}

/// Converts an ADD result from `from` to `to` as libcni does: results from
/// 0.3.0 to 1.1.0 share one shape but for `ips[].version`, which 1.0.0
/// dropped. Anything older does not convert.
pub fn convert_result(result: &Value, from: &CniVersion, to: &CniVersion) -> Result<Value> {
    check_convertible(from, to)?;
    let mut out = result.clone();
    out["cniVersion"] = Value::String(to.to_string());
    let to_old = *to < CniVersion::V1_0_0;
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
pub fn check_convertible(from: &CniVersion, to: &CniVersion) -> Result<()> {
    let convertible = |v: &CniVersion| *v >= CniVersion::V0_3_0;
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
        let v = CniVersion::new;
        assert!(v("1.1.0") >= v("1.0.0"));
        assert!(v("0.4.0") >= CniVersion::V0_4_0);
        assert!(v("0.3.1") < CniVersion::V0_4_0);
        assert!(v("0.10.0") > CniVersion::V0_4_0);
        assert!(v("x") < CniVersion::V0_1_0);
        assert!(v("1.0") < CniVersion::V0_1_0);
        assert_eq!(v("01.0.0").to_string(), "01.0.0");
        assert_ne!(v("01.0.0"), CniVersion::V1_0_0);
        assert_eq!(v("1.0.0"), CniVersion::V1_0_0);
        let json = serde_json::to_string(&v("1.1.0")).unwrap();
        assert_eq!(json, "\"1.1.0\"");
        assert_eq!(
            serde_json::from_str::<CniVersion>(&json).unwrap(),
            CniVersion::V1_1_0
        );
    }

    #[test]
    fn ancient_versions_do_not_convert() {
        let e =
            convert_result(&json!({}), &CniVersion::V1_0_0, &CniVersion::new("0.2.0")).unwrap_err();
        assert_eq!(e.code(), 1);
        assert!(e.msg.contains("0.2.0") && e.msg.contains("1.0.0"));
    }
}
