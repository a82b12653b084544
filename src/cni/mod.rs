//! The CNI contract: the environment, the network config on stdin, and what
//! goes back on stdout.

pub mod config;
pub mod env;
pub mod gojson;
pub mod inner;
pub mod version;

use crate::error::Error;
use serde_json::json;
use version::CniVersion;

/// The version an error object or VERSION reply is labelled with when
/// stdin names none (no config, not JSON, no "cniVersion"). Both answers
/// have one shape in every version we speak, so this only labels them;
/// what a config without "cniVersion" means, and how its inner chain is
/// called, is `config::CONFIG_DEFAULT_VERSION`'s to say.
pub const ANSWER_DEFAULT_VERSION: CniVersion = CniVersion::V1_0_0;

pub fn version_reply(cni_version: &CniVersion) -> String {
    json!({ "cniVersion": cni_version, "supportedVersions": version::SUPPORTED }).to_string()
}

/// The spec's error object. An inner plugin's own object is passed through,
/// at the runtime's version: the inner chain may speak another one.
pub fn error_reply(err: &Error, cni_version: &CniVersion) -> Vec<u8> {
    if let Some(raw) = &err.passthrough {
        match serde_json::from_slice::<serde_json::Value>(raw) {
            Ok(obj) if obj["cniVersion"] == cni_version.as_str() => return raw.clone(),
            Ok(mut obj) if obj.is_object() => {
                obj["cniVersion"] = json!(cni_version);
                let mut out = serde_json::to_vec(&obj).unwrap_or_default();
                out.push(b'\n');
                return out;
            }
            _ => return raw.clone(),
        }
    }
    let mut obj = json!({ "cniVersion": cni_version, "code": err.code(), "msg": err.msg });
    if !err.details.is_empty() {
        obj["details"] = json!(err.details);
    }
    let mut out = serde_json::to_vec(&obj).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Our result appended to the `prevResult` of the plugins before us in the
/// runtime's chain, as the spec asks of a plugin that adds interfaces:
/// theirs first, ours after, `ips[].interface` shifted to match, DNS
/// merged without duplicates. Both are at the runtime's version.
pub fn merge_results(prev: &serde_json::Value, ours: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    let list = |v: &Value, key: &str| v.get(key).and_then(Value::as_array).cloned();
    let mut out = prev.clone();
    let Some(obj) = out.as_object_mut() else {
        return ours.clone();
    };
    let theirs = list(prev, "interfaces").unwrap_or_default();
    let shift = theirs.len() as u64;
    let mut interfaces = theirs;
    interfaces.extend(list(ours, "interfaces").unwrap_or_default());
    let mut ips = list(prev, "ips").unwrap_or_default();
    for mut ip in list(ours, "ips").unwrap_or_default() {
        if let Some(i) = ip.get("interface").and_then(Value::as_u64) {
            ip["interface"] = json!(i + shift);
        }
        ips.push(ip);
    }
    let mut routes = list(prev, "routes").unwrap_or_default();
    routes.extend(list(ours, "routes").unwrap_or_default());
    for (key, value) in [("interfaces", interfaces), ("ips", ips), ("routes", routes)] {
        if !value.is_empty() {
            obj.insert(key.into(), Value::Array(value));
        }
    }
    let mut dns = prev.get("dns").cloned().unwrap_or_else(|| json!({}));
    if let (Some(dns), Some(add)) = (dns.as_object_mut(), ours.get("dns")) {
        for key in ["nameservers", "search", "options"] {
            let mut merged = list(&Value::Object(dns.clone()), key).unwrap_or_default();
            for v in list(add, key).unwrap_or_default() {
                if !merged.contains(&v) {
                    merged.push(v);
                }
            }
            if !merged.is_empty() {
                dns.insert(key.into(), Value::Array(merged));
            }
        }
        if !dns.contains_key("domain") {
            if let Some(domain) = add.get("domain") {
                dns.insert("domain".into(), domain.clone());
            }
        }
    }
    if dns.as_object().is_some_and(|d| !d.is_empty()) {
        obj.insert("dns".into(), dns);
    }
    if let Some(version) = ours.get("cniVersion") {
        obj.insert("cniVersion".into(), version.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ours_follows_the_previous_result() {
        let prev = json!({"cniVersion":"1.0.0",
            "interfaces":[{"name":"dummy0"}],
            "ips":[{"address":"192.0.2.5/24","interface":0}],
            "dns":{"nameservers":["192.0.2.1"]}});
        let ours = json!({"cniVersion":"1.0.0",
            "interfaces":[{"name":"rcni0"},{"name":"eth0","sandbox":"/n"}],
            "ips":[{"address":"10.89.0.2/24","interface":1}],
            "routes":[{"dst":"0.0.0.0/0"}],
            "dns":{"nameservers":["192.0.2.1","10.89.0.1"],"search":["x"]}});
        let m = merge_results(&prev, &ours);
        assert_eq!(m["interfaces"].as_array().unwrap().len(), 3);
        assert_eq!(m["ips"][0]["interface"], 0);
        assert_eq!(m["ips"][1]["interface"], 2);
        assert_eq!(m["routes"][0]["dst"], "0.0.0.0/0");
        assert_eq!(m["dns"]["nameservers"], json!(["192.0.2.1", "10.89.0.1"]));
        assert_eq!(m["dns"]["search"], json!(["x"]));
    }

    #[test]
    fn passed_through_errors_take_the_runtime_version() {
        let mut e = Error::new(crate::error::Kind::InvalidConfig, "bad");
        e.passthrough = Some(br#"{"cniVersion":"0.3.1","code":7,"msg":"bad"}"#.to_vec());
        let out: serde_json::Value =
            serde_json::from_slice(&error_reply(&e, &CniVersion::V1_1_0)).unwrap();
        assert_eq!(out["cniVersion"], "1.1.0");
        assert_eq!(out["code"], 7);
    }
}
