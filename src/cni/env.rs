//! The CNI_* environment, validated before anything is touched.

use super::version::CniVersion;
use crate::error::{Error, Result};
use std::path::PathBuf;

/// What a call asks for: CNI_COMMAND.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Add => "ADD",
            Verb::Del => "DEL",
            Verb::Check => "CHECK",
            Verb::Version => "VERSION",
            Verb::Gc => "GC",
            Verb::Status => "STATUS",
        }
    }

    /// The first spec version that knows the verb: a config at an older
    /// cniVersion cannot ask for it.
    pub fn min_version(self) -> CniVersion {
        match self {
            Verb::Add | Verb::Del | Verb::Version => CniVersion::V0_1_0,
            Verb::Check => CniVersion::V0_4_0,
            Verb::Gc | Verb::Status => CniVersion::V1_1_0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct CniEnv {
    pub command: Verb,
    pub container_id: String,
    /// Empty only for DEL, where the spec lets the runtime omit it.
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: String,
    pub path: Vec<PathBuf>,
}

/// Longest container id we accept: it becomes part of a file name.
const MAX_CONTAINER_ID: usize = 128;
/// Linux IFNAMSIZ less the terminating NUL.
const MAX_IFNAME: usize = 15;

impl CniEnv {
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned()))
    }

    /// Reads the environment through `get`, so it can be tested without
    /// touching the process environment.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let command = match get("CNI_COMMAND").as_deref() {
            None | Some("") => return Err(Error::env("CNI_COMMAND is not set")),
            Some("ADD") => Verb::Add,
            Some("DEL") => Verb::Del,
            Some("CHECK") => Verb::Check,
            Some("VERSION") => Verb::Version,
            Some("GC") => Verb::Gc,
            Some("STATUS") => Verb::Status,
            Some(other) => {
                return Err(Error::env(format!(
                    "CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, GC, STATUS, VERSION"
                )))
            }
        };
        let mut env = CniEnv {
            command,
            container_id: String::new(),
            netns: None,
            ifname: String::new(),
            args: get("CNI_ARGS").unwrap_or_default(),
            path: Vec::new(),
        };
        if command == Verb::Version {
            return Ok(env);
        }
        if command == Verb::Gc {
            // Verbs about the whole network: no container.
            env.path = split_path(&required(&get, "CNI_PATH")?);
            return Ok(env);
        }
        if command == Verb::Status {
            // STATUS runs no inner ADD or DEL: without CNI_PATH it answers
            // for the infra, and the inner plugins are not asked.
            env.path = split_path(&get("CNI_PATH").unwrap_or_default());
            return Ok(env);
        }
        env.container_id = required(&get, "CNI_CONTAINERID")?;
        validate_container_id(&env.container_id)?;
        env.ifname = required(&get, "CNI_IFNAME")?;
        validate_ifname(&env.ifname)?;
        env.path = split_path(&required(&get, "CNI_PATH")?);
        match get("CNI_NETNS").filter(|n| !n.is_empty()) {
            Some(netns) => {
                let netns = PathBuf::from(netns);
                if !netns.is_absolute() {
                    return Err(Error::env(format!(
                        "CNI_NETNS {:?} is not an absolute path",
                        netns.display().to_string()
                    )));
                }
                env.netns = Some(netns);
            }
            None if command != Verb::Del => {
                return Err(Error::env("CNI_NETNS is not set"));
            }
            None => {}
        }
        Ok(env)
    }

    /// The container netns, which every verb but DEL requires.
    pub fn netns(&self) -> &std::path::Path {
        self.netns.as_deref().unwrap_or(std::path::Path::new(""))
    }
}

fn split_path(path: &str) -> Vec<PathBuf> {
    path.split(':')
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .collect()
}

fn required(get: &impl Fn(&str) -> Option<String>, key: &str) -> Result<String> {
    match get(key) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(Error::env(format!("{key} is not set"))),
    }
}

/// The spec's rule, as libcni enforces it: an alphanumeric first character,
/// then alphanumerics, `_`, `.` or `-`.
pub fn validate_container_id(id: &str) -> Result<()> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !first_ok || !rest_ok {
        return Err(Error::env(format!(
            "CNI_CONTAINERID {:?} is invalid: it must start with a letter or digit followed by letters, digits, '_', '.' or '-'",
            shorten(id)
        )));
    }
    if id.len() > MAX_CONTAINER_ID {
        return Err(Error::env(format!(
            "CNI_CONTAINERID is {} characters long, more than the {MAX_CONTAINER_ID} we accept",
            id.len()
        )));
    }
    Ok(())
}

pub fn validate_ifname(name: &str) -> Result<()> {
    if name.len() > MAX_IFNAME {
        return Err(Error::env(format!(
            "CNI_IFNAME {:?} is longer than {MAX_IFNAME} bytes",
            shorten(name)
        )));
    }
    if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
    {
        return Err(Error::env(format!(
            "CNI_IFNAME {name:?} is not a valid interface name"
        )));
    }
    Ok(())
}

/// libcni's rule for network names, which also keeps them safe in file names.
pub fn validate_network_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !first_ok || !rest_ok || name.len() > 64 {
        return Err(Error::config(format!(
            "network name {:?} is invalid: at most 64 letters, digits, '_', '.' or '-', starting with a letter or digit",
            shorten(name)
        )));
    }
    Ok(())
}

/// Keeps hostile input from flooding an error message.
pub fn shorten(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(pairs: &[(&str, &str)]) -> Result<CniEnv> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CniEnv::from_lookup(|k| map.get(k).cloned())
    }

    const FULL: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc-1"),
        ("CNI_NETNS", "/proc/1/ns/net"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
    ];

    #[test]
    fn del_does_not_need_netns() {
        let pairs: Vec<_> = FULL
            .iter()
            .filter(|(k, _)| *k != "CNI_NETNS")
            .map(|(k, v)| {
                if *k == "CNI_COMMAND" {
                    (*k, "DEL")
                } else {
                    (*k, *v)
                }
            })
            .collect();
        assert!(parse(&pairs).unwrap().netns.is_none());
    }

    /// A NUL byte, which no environment can carry (so the corpus of
    /// testdata/hostile/, also run through the binary, has no such case),
    /// but a caller of `from_lookup` may hand over.
    #[test]
    fn a_nul_byte_in_the_container_id_or_ifname_is_refused() {
        for (key, value) in [("CNI_CONTAINERID", "a\0b"), ("CNI_IFNAME", "eth\0x")] {
            for verb in ["ADD", "DEL", "CHECK"] {
                let pairs: Vec<_> = FULL
                    .iter()
                    .map(|&(k, v)| match k {
                        "CNI_COMMAND" => (k, verb),
                        k if k == key => (k, value),
                        _ => (k, v),
                    })
                    .collect();
                let err = parse(&pairs).unwrap_err();
                assert_eq!(err.code(), 4, "{verb} {key}={value:?}");
                assert!(err.msg.contains(key), "{}", err.msg);
            }
        }
    }

    /// testdata/hostile/env.json, but the cases refused only when the
    /// netns is opened: each refused with its code, naming its culprit.
    #[test]
    fn the_hostile_environments_of_testdata_are_refused() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/hostile/env.json");
        let corpus: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let cases = corpus["cases"].as_array().unwrap();
        let mut checked = 0;
        for case in cases.iter().filter(|c| c.get("when").is_none()) {
            let var = case["var"].as_str().unwrap();
            let value = match &case["value"] {
                serde_json::Value::Null => None,
                serde_json::Value::String(v) => Some(v.clone()),
                v => Some(
                    v["repeat"]
                        .as_str()
                        .unwrap()
                        .repeat(v["times"].as_u64().unwrap() as usize),
                ),
            };
            let mut pairs: HashMap<&str, String> =
                FULL.iter().map(|(k, v)| (*k, v.to_string())).collect();
            pairs.insert("CNI_COMMAND", case["verb"].as_str().unwrap().to_string());
            match &value {
                Some(v) => pairs.insert(var, v.clone()),
                None => pairs.remove(var),
            };
            let err = CniEnv::from_lookup(|k| pairs.get(k).cloned())
                .err()
                .unwrap_or_else(|| panic!("accepted: {case}"));
            assert_eq!(
                u64::from(err.code()),
                case["code"].as_u64().unwrap(),
                "{case}"
            );
            assert!(
                err.msg.contains(case["culprit"].as_str().unwrap()),
                "{case}: {err}"
            );
            checked += 1;
        }
        assert!(checked > 40, "only {checked} cases");
    }
}
