//! Our network config (stdin) and the inner conflist it delegates to.

use super::gojson;
use super::inner::{default_conf_dir, find_network};
pub use super::inner::{InnerList, InnerSource};
use super::version::CniVersion;
use crate::error::{Error, Kind, Result};
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::time::Duration;

/// The slirp4netns MTU podman uses: fastest, see the README for the trade-off.
pub const DEFAULT_MTU: u32 = 65520;

/// Far beyond any healthy plugin (bridge ADD takes tens of ms), short of
/// hanging a runtime forever.
pub const DEFAULT_PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Keys libcni injects or the spec defines for every plugin config.
pub const SPEC_KEYS: &[&str] = &[
    "cniVersion",
    "name",
    "type",
    "capabilities",
    "runtimeConfig",
    "prevResult",
    "args",
    "cni.dev/valid-attachments",
    "cni.dev/attachments",
];
/// Our own keys.
pub const OWN_KEYS: &[&str] = &[
    "delegate",
    "network",
    "confDir",
    "stateDir",
    "mtu",
    "allowHostLoopback",
    "ipv6",
    "portDriver",
    "outbound",
    "idleTimeout",
    "pluginTimeout",
    "lockTimeout",
    "logLevel",
    "maxConnections",
    "maxConnectionsPerPort",
    "maxUdpFlows",
    "maxUdpFlowsPerPort",
    "tcpIdleTimeout",
    "udpIdleTimeout",
];

/// A config without "cniVersion" is read as 0.4.0, the oldest version
/// that knows every verb a runtime before 1.0 sends (CHECK): the verbs it
/// may ask and the result it gets follow it, and so does the delegate when
/// it names no version. (An error object or VERSION reply to a stdin
/// naming no version is labelled `cni::ANSWER_DEFAULT_VERSION`: only a
/// label.)
pub const CONFIG_DEFAULT_VERSION: CniVersion = CniVersion::V0_4_0;

#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: CniVersion,
    pub name: String,
    pub inner: InnerSource,
    pub state_dir: Option<PathBuf>,
    pub mtu: u32,
    pub allow_host_loopback: bool,
    /// slirp4netns's IPv6 (fd00::100/64 on tap0, gateway fd00::2).
    pub ipv6: bool,
    pub port_driver: PortDriver,
    /// What connects the infra to the outside.
    pub outbound: Engine,
    /// None: stop the infra as soon as the last attachment leaves.
    pub idle_timeout: Option<Duration>,
    /// An inner plugin still running after this is killed and the call fails.
    pub plugin_timeout: Duration,
    /// How long a call waits for the state lock before code 11.
    pub lock_timeout: Duration,
    pub log_level: Option<log::LevelFilter>,
    /// The builtin port driver's bounds.
    pub forward_limits: crate::infra::ForwardLimits,
    /// Capability args the runtime gave us, handed on to the inner plugins
    /// that declare them.
    pub runtime_config: Map<String, Value>,
    /// GC's list of attachments to keep: (container id, ifname).
    pub valid_attachments: Option<Vec<(String, String)>>,
    /// ADD: the result of the plugins before us in the runtime's chain.
    pub prev_result: Option<Value>,
}

/// How a published port gets from the host into the infra.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortDriver {
    /// The supervisor accepts on the host and connects from inside the infra.
    #[default]
    Builtin,
    /// slirp4netns's add_hostfwd.
    Slirp4netns,
}

/// What connects the infra to the outside: both give it the same
/// addresses (tap0 10.0.2.100/24, gateway 10.0.2.2, DNS 10.0.2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// slirp4netns: a TCP/IP stack of its own in user space.
    #[default]
    Slirp4netns,
    /// pasta (passt): the infra's traffic mapped onto host sockets.
    Pasta,
}

impl Engine {
    /// Its name in the config, the logs and `status`.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Slirp4netns => "slirp4netns",
            Engine::Pasta => "pasta",
        }
    }

    /// The engine of that name (as `name` gives it).
    pub fn from_name(name: &str) -> Option<Self> {
        [Engine::Slirp4netns, Engine::Pasta]
            .into_iter()
            .find(|o| o.name() == name)
    }
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            Error::new(
                Kind::Decode,
                format!("network config on stdin is not valid JSON: {e}"),
            )
        })?;
        let Value::Object(obj) = value else {
            return Err(Error::new(
                Kind::Decode,
                "network config on stdin is not a JSON object",
            ));
        };
        for key in obj.keys() {
            if !SPEC_KEYS.contains(&key.as_str()) && !OWN_KEYS.contains(&key.as_str()) {
                return Err(Error::config(format!(
                    "unknown key {key:?} in the rootless-cni config (known: {})",
                    OWN_KEYS.join(", ")
                )));
            }
        }
        let cni_version =
            string(&obj, "cniVersion")?.map_or(CONFIG_DEFAULT_VERSION, CniVersion::new);
        let name = string(&obj, "name")?.ok_or_else(|| Error::config("config has no \"name\""))?;
        crate::cni::env::validate_network_name(&name)?;

        let conf_dir = string(&obj, "confDir")?.map(PathBuf::from);
        let inner = match (obj.get("delegate"), string(&obj, "network")?) {
            (Some(_), Some(_)) => {
                return Err(Error::config(
                    "config has both \"delegate\" and \"network\"; give one",
                ))
            }
            (Some(d @ Value::Object(_)), None) => InnerSource::Delegate(d.clone()),
            (Some(_), None) => {
                return Err(Error::config(
                    "\"delegate\" must be an object: an inner conflist or one plugin config",
                ))
            }
            (None, Some(network)) => {
                crate::cni::env::validate_network_name(&network)
                    .map_err(|e| e.context("\"network\""))?;
                InnerSource::Network {
                    name: network,
                    conf_dir: conf_dir.clone(),
                }
            }
            (None, None) => {
                return Err(Error::config(
                    "config has neither \"delegate\" (an inner conflist) nor \"network\" (the name of one)",
                ))
            }
        };
        let mtu = match obj.get("mtu") {
            None => DEFAULT_MTU,
            Some(v) => v
                .as_u64()
                .filter(|m| (576..=65520).contains(m))
                .map(|m| m as u32)
                .ok_or_else(|| {
                    Error::config(format!(
                        "\"mtu\" must be a number from 576 to 65520, not {v}"
                    ))
                })?,
        };
        let allow_host_loopback = boolean(&obj, "allowHostLoopback")?;
        let ipv6 = boolean(&obj, "ipv6")?;
        let port_driver = match string(&obj, "portDriver")?.as_deref() {
            None | Some("builtin") => PortDriver::Builtin,
            Some("slirp4netns") => PortDriver::Slirp4netns,
            Some(other) => {
                return Err(Error::config(format!(
                    "\"portDriver\" {other:?} is not one of builtin, slirp4netns"
                )))
            }
        };
        let outbound = match string(&obj, "outbound")?.as_deref() {
            None => Engine::default(),
            Some(name) => Engine::from_name(name).ok_or_else(|| {
                Error::config(format!(
                    "\"outbound\" {name:?} is not one of slirp4netns, pasta"
                ))
            })?,
        };
        if outbound == Engine::Pasta && port_driver == PortDriver::Slirp4netns {
            // That driver talks to slirp4netns's API socket: with pasta
            // there is no slirp4netns to ask.
            return Err(Error::config(
                "\"portDriver\": \"slirp4netns\" needs \"outbound\": \"slirp4netns\"; with \"outbound\": \"pasta\" use \"portDriver\": \"builtin\"",
            ));
        }
        let idle_timeout = duration(&obj, "idleTimeout")?;
        let plugin_timeout = duration(&obj, "pluginTimeout")?
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_PLUGIN_TIMEOUT);
        let lock_timeout = duration(&obj, "lockTimeout")?.unwrap_or(crate::state::LOCK_TIMEOUT);
        let log_level = match string(&obj, "logLevel")? {
            None => None,
            Some(l) => Some(l.parse::<log::LevelFilter>().map_err(|_| {
                Error::config(format!(
                    "\"logLevel\" {l:?} is not one of off, error, warn, info, debug, trace"
                ))
            })?),
        };
        let forward_limits = forward_limits(&obj)?;
        let runtime_config = match obj.get("runtimeConfig") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(v) => {
                return Err(Error::config(format!(
                    "\"runtimeConfig\" must be an object, not {v}"
                )))
            }
        };
        let attachments_key = ["cni.dev/valid-attachments", "cni.dev/attachments"]
            .into_iter()
            .find(|k| !matches!(obj.get(*k), None | Some(Value::Null)));
        let valid_attachments = match attachments_key {
            None => None,
            Some(key) => Some(parse_attachments(key, &obj[key])?),
        };
        let prev_result = match obj.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v @ Value::Object(_)) => Some(v.clone()),
            Some(v) => {
                return Err(Error::config(format!(
                    "\"prevResult\" must be an object, not {v}"
                )))
            }
        };
        Ok(NetConf {
            valid_attachments,
            prev_result,
            cni_version,
            name,
            inner,
            state_dir: string(&obj, "stateDir")?.map(PathBuf::from),
            mtu,
            allow_host_loopback,
            ipv6,
            port_driver,
            outbound,
            idle_timeout,
            plugin_timeout,
            lock_timeout,
            log_level,
            forward_limits,
            runtime_config,
        })
    }

    /// The inner conflist, from `delegate` or from the file naming `network`.
    pub fn inner_list(&self) -> Result<InnerList> {
        match &self.inner {
            InnerSource::Delegate(value) => {
                InnerList::from_value(value, Some(&self.cni_version), &self.name)
                    .map_err(|e| e.context("\"delegate\""))
            }
            InnerSource::Network { name, conf_dir } => {
                let dir = match conf_dir {
                    Some(d) => d.clone(),
                    None => default_conf_dir()?,
                };
                find_network(&dir, name)
            }
        }
    }
}

pub(super) fn string(obj: &Map<String, Value>, key: &str) -> Result<Option<String>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(Error::config(format!("{key:?} must be a string, not {v}"))),
    }
}

fn parse_attachments(key: &str, v: &Value) -> Result<Vec<(String, String)>> {
    let bad = || {
        Error::config(format!(
            "{key:?} must be a list of {{\"containerID\", \"ifname\"}}"
        ))
    };
    v.as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|a| {
            let field = |k: &str| {
                let a = a.as_object()?;
                gojson::field(a, k)
                    .and_then(Value::as_str)
                    .map(String::from)
            };
            match (field("containerID"), field("ifname")) {
                (Some(id), Some(ifname)) => Ok((id, ifname)),
                _ => Err(bad()),
            }
        })
        .collect()
}

fn boolean(obj: &Map<String, Value>, key: &str) -> Result<bool> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(Error::config(format!(
            "{key:?} must be true or false, not {v}"
        ))),
    }
}

/// The forwarder's bounds: counts of at least 1, idle timeouts (0 for
/// none with TCP; UDP flows always expire).
fn forward_limits(obj: &Map<String, Value>) -> Result<crate::infra::ForwardLimits> {
    let mut l = crate::infra::ForwardLimits::default();
    let count = |key: &str, default: usize| -> Result<usize> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_u64()
                .filter(|n| (1..=1_000_000).contains(n))
                .map(|n| n as usize)
                .ok_or_else(|| {
                    Error::config(format!(
                        "{key:?} must be a number from 1 to 1000000, not {v}"
                    ))
                }),
        }
    };
    l.max_connections = count("maxConnections", l.max_connections)?;
    l.max_connections_per_port = count("maxConnectionsPerPort", l.max_connections_per_port)?;
    l.max_udp_flows = count("maxUdpFlows", l.max_udp_flows)?;
    l.max_udp_flows_per_port = count("maxUdpFlowsPerPort", l.max_udp_flows_per_port)?;
    if let Some(d) = duration(obj, "tcpIdleTimeout")? {
        l.tcp_idle_timeout_secs = d.as_secs();
    }
    if let Some(d) = duration(obj, "udpIdleTimeout")? {
        l.udp_idle_timeout_secs = d.as_secs().max(1);
    }
    Ok(l)
}

fn duration(obj: &Map<String, Value>, key: &str) -> Result<Option<Duration>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => parse_duration(v)
            .filter(|d| *d <= MAX_DURATION)
            .map(Some)
            .ok_or_else(|| {
                Error::config(format!(
                    "{key:?} must be a number of seconds or a string like \"30s\", \"5m\", at most a week, not {v}"
                ))
            }),
    }
}

/// The longest timeout we take: beyond it is a mistake, not a wish.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Seconds as a number, or a string with an s/m/h suffix.
fn parse_duration(v: &Value) -> Option<Duration> {
    if let Some(secs) = v.as_u64() {
        return Some(Duration::from_secs(secs));
    }
    let s = v.as_str()?.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return None,
    };
    Some(Duration::from_secs(n.checked_mul(mult)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_limits() {
        let c = NetConf::parse(conf("").as_bytes()).unwrap();
        assert_eq!(c.forward_limits, crate::infra::ForwardLimits::default());
        let c = NetConf::parse(
            conf(r#","maxConnections":10,"maxUdpFlowsPerPort":2,"tcpIdleTimeout":0,"udpIdleTimeout":"5m""#)
                .as_bytes(),
        )
        .unwrap();
        let l = c.forward_limits;
        assert_eq!((l.max_connections, l.max_udp_flows_per_port), (10, 2));
        assert_eq!((l.tcp_idle_timeout_secs, l.udp_idle_timeout_secs), (0, 300));
        assert_eq!(l.to_limits().tcp_idle, None);
        for bad in [r#","maxConnections":0"#, r#","maxUdpFlows":"many""#] {
            let e = NetConf::parse(conf(bad).as_bytes()).unwrap_err();
            assert_eq!(e.code(), 7, "{bad}: {}", e.msg);
        }
    }

    fn conf(extra: &str) -> String {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"n","type":"rootless-cni",
                "delegate":{{"plugins":[{{"type":"bridge"}}]}}{extra}}}"#
        )
    }

    #[test]
    fn defaults() {
        let c = NetConf::parse(conf("").as_bytes()).unwrap();
        assert_eq!(c.mtu, DEFAULT_MTU);
        assert!(!c.allow_host_loopback);
        assert!(c.idle_timeout.is_none());
        let inner = c.inner_list().unwrap();
        assert_eq!(inner.cni_version, "1.0.0");
        assert_eq!(inner.name, "n");
    }

    #[test]
    fn outbound_engine() {
        let c = NetConf::parse(conf("").as_bytes()).unwrap();
        assert_eq!(c.outbound, Engine::Slirp4netns);
        let c = NetConf::parse(conf(r#","outbound":"pasta""#).as_bytes()).unwrap();
        assert_eq!(
            (c.outbound, c.port_driver),
            (Engine::Pasta, PortDriver::Builtin)
        );
        // slirp4netns's port driver needs slirp4netns: both keys named.
        let e =
            NetConf::parse(conf(r#","outbound":"pasta","portDriver":"slirp4netns""#).as_bytes())
                .unwrap_err();
        assert_eq!(e.code(), 7);
        assert!(
            e.msg.contains("\"outbound\"") && e.msg.contains("\"portDriver\""),
            "{}",
            e.msg
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let e = NetConf::parse(conf(r#","bogusKey":1"#).as_bytes()).unwrap_err();
        assert_eq!(e.code(), 7);
        assert!(e.msg.contains("bogusKey"));
    }

    #[test]
    fn malformed_json_is_decode_error() {
        assert_eq!(NetConf::parse(b"{not json").unwrap_err().code(), 6);
    }

    #[test]
    fn missing_delegate() {
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"rootless-cni"}"#)
            .unwrap_err();
        assert_eq!(e.code(), 7);
        assert!(e.msg.contains("delegate"));
    }

    #[test]
    fn wrong_types_are_named() {
        for (extra, key) in [
            (r#","mtu":"big""#, "mtu"),
            (r#","allowHostLoopback":"yes""#, "allowHostLoopback"),
            (r#","idleTimeout":"soon""#, "idleTimeout"),
            (r#","pluginTimeout":[]"#, "pluginTimeout"),
            (r#","logLevel":"loud""#, "logLevel"),
            (r#","stateDir":5"#, "stateDir"),
            (r#","ipv6":1"#, "ipv6"),
            (r#","portDriver":"fast""#, "portDriver"),
            (r#","outbound":"slirp""#, "outbound"),
            (r#","outbound":true"#, "outbound"),
        ] {
            let e = NetConf::parse(conf(extra).as_bytes()).unwrap_err();
            assert_eq!(e.code(), 7, "{key}");
            assert!(e.msg.contains(key), "{key}: {}", e.msg);
        }
    }

    #[test]
    fn single_plugin_delegate_becomes_a_list() {
        let v: Value = serde_json::from_str(r#"{"type":"bridge","bridge":"b0"}"#).unwrap();
        let l = InnerList::from_value(&v, Some(&CniVersion::V0_4_0), "x").unwrap();
        assert_eq!(l.plugins.len(), 1);
        assert_eq!(l.cni_version, "0.4.0");
    }

    #[test]
    fn plugin_type_must_be_a_file_name() {
        let v: Value = serde_json::from_str(r#"{"plugins":[{"type":"../bin/sh"}]}"#).unwrap();
        assert_eq!(
            InnerList::from_value(&v, Some(&CniVersion::V1_0_0), "x")
                .unwrap_err()
                .code(),
            7
        );
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration(&serde_json::json!(5)),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            parse_duration(&serde_json::json!("2m")),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_duration(&serde_json::json!("x")), None);
        let huge = format!(r#","lockTimeout":"{}s""#, u64::MAX);
        assert_eq!(
            NetConf::parse(conf(&huge).as_bytes()).unwrap_err().code(),
            7
        );
    }
}
