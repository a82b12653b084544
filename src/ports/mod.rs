//! Published ports. The inner `portmap` plugin DNATs inside the infra; the
//! host side is a forward from the host port to the same port on the
//! infra's tap0 address, where portmap's rules catch it. Two drivers do the
//! forwarding, both run by the supervisor, which re-applies them when
//! slirp4netns restarts.

pub mod builtin;
pub mod client_addr;
pub mod forwarder;
pub mod slirp;

use crate::cni::gojson;
use crate::error::{Error, Kind, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Where every forward lands: slirp4netns's `--configure` address for tap0.
pub const INFRA_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

/// One entry of the runtime's `portMappings`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
}

impl PortMapping {
    /// The host address to listen on: `hostIP`, or every IPv4 address.
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(
            self.host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            self.host_port,
        )
    }

    /// Whether both forwards would land on the same port of the infra's
    /// address, where the inner portmap tells them apart by nothing else.
    pub fn shares_infra_port(&self, other: &PortMapping) -> bool {
        self.protocol == other.protocol && self.host_port == other.host_port
    }

    pub fn describe(&self) -> String {
        let proto = match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        format!(
            "{}/{proto} -> container port {}",
            self.listen_addr(),
            self.container_port
        )
    }
}

/// The `portMappings` capability arg, checked before anything is touched.
/// Keys are matched as Go plugins match them (`HostPort` is `hostPort`).
pub fn from_runtime_config(rc: &Map<String, Value>) -> Result<Vec<PortMapping>> {
    let Some(list) = gojson::field(rc, "portMappings") else {
        return Ok(Vec::new());
    };
    let list = list
        .as_array()
        .ok_or_else(|| Error::config("runtimeConfig \"portMappings\" must be a list"))?;
    let mappings: Vec<PortMapping> = list
        .iter()
        .enumerate()
        .map(|(i, m)| parse_one(m).map_err(|e| e.context(format!("portMappings[{i}]"))))
        .collect::<Result<_>>()?;
    for (i, m) in mappings.iter().enumerate() {
        // The same port to the same container port (0.0.0.0 and ::, say)
        // reaches the same place: only a different target is ambiguous.
        let ambiguous =
            |o: &&PortMapping| o.shares_infra_port(m) && o.container_port != m.container_port;
        if let Some(other) = mappings[..i].iter().find(ambiguous) {
            let holder = format!("this ADD's own {}", other.describe());
            return Err(shared_port(m, &holder).context(format!("portMappings[{i}]")));
        }
    }
    Ok(mappings)
}

/// The error for a mapping whose (protocol, host port) another forward
/// already lands on inside the infra (code 107, naming `holder`).
pub fn shared_port(m: &PortMapping, holder: &str) -> Error {
    Error::new(
        Kind::HostPort,
        format!(
            "{}: port {} is already published by {holder}; inside the infra both would reach the same address, so one (protocol, host port) serves one container",
            m.describe(),
            m.host_port
        ),
    )
}

fn parse_one(m: &Value) -> Result<PortMapping> {
    let m = m
        .as_object()
        .ok_or_else(|| Error::config(format!("must be an object, not {m}")))?;
    let port = |key: &str| -> Result<u16> {
        gojson::field(m, key)
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| Error::config(format!("{key:?} must be a port from 1 to 65535")))
    };
    // A string field of another type fails the Go plugins' decoding; read
    // as absent, a hostIP would open the port on every address.
    let string = |key: &str| -> Result<Option<&str>> {
        match gojson::field(m, key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(Error::config(format!(
                "{key:?} must be a string, not {other}"
            ))),
        }
    };
    let protocol = match string("protocol")?.map(str::to_ascii_lowercase).as_deref() {
        None | Some("") | Some("tcp") => Protocol::Tcp,
        Some("udp") => Protocol::Udp,
        Some(other) => {
            return Err(Error::config(format!(
                "\"protocol\" {other:?} is not tcp or udp"
            )))
        }
    };
    let host_ip = match string("hostIP")? {
        None | Some("") => None,
        Some(ip) => Some(
            ip.parse::<IpAddr>()
                .map_err(|_| Error::config(format!("\"hostIP\" {ip:?} is not an IP address")))?,
        ),
    };
    Ok(PortMapping {
        host_ip,
        host_port: port("hostPort")?,
        container_port: port("containerPort")?,
        protocol,
    })
}

/// The capability args for the inner plugins. `hostIP` means a host address
/// and is honoured by the forward; inside the infra the forward arrives at
/// tap0's address, so portmap must match any local address. Every spelling
/// of `hostIP` goes: the inner portmap reads `HostIP` as `hostIP`. The
/// protocol is spelt out (`tcp` when the runtime left it out, as we read
/// it): portmap hands iptables an empty one as it is, and fails.
pub fn inner_capability_args(rc: &Map<String, Value>) -> Map<String, Value> {
    let mut inner = rc.clone();
    for (key, value) in inner.iter_mut() {
        if !gojson::key_matches(key, "portMappings") {
            continue;
        }
        for m in value.as_array_mut().into_iter().flatten() {
            if let Some(m) = m.as_object_mut() {
                gojson::remove_field(m, "hostIP");
                let protocol = match gojson::field(m, "protocol").and_then(Value::as_str) {
                    None | Some("") => "tcp".to_string(),
                    Some(p) => p.to_ascii_lowercase(),
                };
                gojson::remove_field(m, "protocol");
                m.insert("protocol".into(), Value::String(protocol));
            }
        }
    }
    inner
}

/// A host-side forwarding mechanism.
pub trait Driver: Send {
    /// Opens every forward of an attachment, or none: a failure undoes the
    /// ones already opened.
    fn add(&mut self, key: &str, mappings: &[PortMapping]) -> Result<()>;
    /// Closes an attachment's forwards; nothing to close is fine.
    fn remove(&mut self, key: &str);
    /// Closes every forward: the infra stops.
    fn close_all(&mut self);
    /// slirp4netns was restarted: its forwards must be made again.
    fn slirp_restarted(&mut self, _api_socket: &std::path::Path) {}
    /// The infra routes replies to clients' own addresses (the families
    /// set): connections may come from them (see `client_addr`).
    fn keep_client_addresses(&mut self, _kept: client_addr::Kept) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rc(v: Value) -> Map<String, Value> {
        json!({ "portMappings": v }).as_object().unwrap().clone()
    }

    #[test]
    fn parses_and_defaults() {
        let m = from_runtime_config(&rc(json!([
            {"hostPort": 8080, "containerPort": 80},
            {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"}
        ])))
        .unwrap();
        assert_eq!(m[0].protocol, Protocol::Tcp);
        assert_eq!(m[0].listen_addr().to_string(), "0.0.0.0:8080");
        assert_eq!(m[1].listen_addr().to_string(), "127.0.0.1:5353");
    }

    #[test]
    fn go_cased_keys_read_as_go_reads_them() {
        // containerd's go-cni: a struct without JSON tags.
        let m = from_runtime_config(&rc(json!([
            {"HostPort": 18080, "ContainerPort": 80, "Protocol": "tcp", "HostIP": "127.0.0.1"},
            {"hostPort": 1, "HOSTPORT": 2, "containerPort": 3, "hostIP": null, "Protocol": "UDP"}
        ])))
        .unwrap();
        assert_eq!(m[0].listen_addr().to_string(), "127.0.0.1:18080");
        assert_eq!(m[0].container_port, 80);
        // The last spelling wins, null changes nothing: Go's rules.
        assert_eq!(m[1].listen_addr().to_string(), "0.0.0.0:2");
        assert_eq!(m[1].protocol, Protocol::Udp);
        // A null list is no list, as for a Go slice.
        assert!(from_runtime_config(&rc(Value::Null)).unwrap().is_empty());
        let go_key = json!({"PortMappings": [{"HostPort": 5, "ContainerPort": 6}]});
        assert_eq!(
            from_runtime_config(go_key.as_object().unwrap()).unwrap()[0].host_port,
            5
        );
    }

    #[test]
    fn bad_entries_are_named() {
        for (v, culprit) in [
            (json!([{"hostPort": 0, "containerPort": 80}]), "hostPort"),
            (
                json!([{"hostPort": 70000, "containerPort": 80}]),
                "hostPort",
            ),
            (json!([{"hostPort": 80}]), "containerPort"),
            (json!([{"HostPort": "80", "ContainerPort": 80}]), "hostPort"),
            (json!([80]), "must be an object"),
            (
                json!([{"hostPort": 80, "containerPort": 80, "HostIP": 5}]),
                "\"hostIP\" must be a string",
            ),
            (
                json!([{"hostPort": 80, "containerPort": 80, "protocol": ["udp"]}]),
                "\"protocol\" must be a string",
            ),
            (
                json!([{"hostPort": 80, "containerPort": 80, "protocol": "sctp"}]),
                "sctp",
            ),
            (
                json!([{"hostPort": 80, "containerPort": 80, "hostIP": "nope"}]),
                "hostIP",
            ),
        ] {
            let e = from_runtime_config(&rc(v)).unwrap_err();
            assert_eq!(e.code(), 7);
            assert!(
                e.msg.contains(culprit) && e.msg.contains("portMappings[0]"),
                "{}",
                e.msg
            );
        }
    }

    #[test]
    fn inner_args_drop_every_spelling_of_host_ip() {
        let inner = inner_capability_args(&rc(json!([
            {"HostPort": 1, "ContainerPort": 2, "HostIP": "127.0.0.1", "hostip": "::1"}
        ])));
        assert_eq!(
            inner["portMappings"],
            json!([{"HostPort": 1, "ContainerPort": 2, "protocol": "tcp"}])
        );
    }

    #[test]
    fn inner_args_drop_host_ip_only() {
        let inner = inner_capability_args(&rc(json!([
            {"hostPort": 1, "containerPort": 2, "hostIP": "127.0.0.1"},
            {"hostPort": 3, "containerPort": 4, "Protocol": "UDP"}
        ])));
        assert_eq!(
            inner["portMappings"],
            json!([
                {"hostPort": 1, "containerPort": 2, "protocol": "tcp"},
                {"hostPort": 3, "containerPort": 4, "protocol": "udp"}
            ])
        );
    }
}
