//! Published ports. The inner `portmap` plugin DNATs inside the infra; the
//! host side is a forward from the host port to the same port on the
//! infra's tap0 address, where portmap's rules catch it. Two drivers do the
//! forwarding, both run by the supervisor, which re-applies them when
//! slirp4netns restarts.

pub mod builtin;
pub mod slirp;

use crate::error::{Error, Result};
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
pub fn from_runtime_config(rc: &Map<String, Value>) -> Result<Vec<PortMapping>> {
    let Some(list) = rc.get("portMappings") else {
        return Ok(Vec::new());
    };
    let list = list
        .as_array()
        .ok_or_else(|| Error::config("runtimeConfig \"portMappings\" must be a list"))?;
    list.iter()
        .enumerate()
        .map(|(i, m)| parse_one(m).map_err(|e| e.context(format!("portMappings[{i}]"))))
        .collect()
}

fn parse_one(m: &Value) -> Result<PortMapping> {
    let port = |key: &str| -> Result<u16> {
        m.get(key)
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| Error::config(format!("{key:?} must be a port from 1 to 65535")))
    };
    let protocol = match m
        .get("protocol")
        .and_then(Value::as_str)
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("") | Some("tcp") => Protocol::Tcp,
        Some("udp") => Protocol::Udp,
        Some(other) => {
            return Err(Error::config(format!(
                "\"protocol\" {other:?} is not tcp or udp"
            )))
        }
    };
    let host_ip = match m.get("hostIP").and_then(Value::as_str) {
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
/// tap0's address, so portmap must match any local address.
pub fn inner_capability_args(rc: &Map<String, Value>) -> Map<String, Value> {
    let mut inner = rc.clone();
    if let Some(Value::Array(list)) = inner.get_mut("portMappings") {
        for m in list.iter_mut().filter_map(Value::as_object_mut) {
            m.remove("hostIP");
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
    fn bad_entries_are_named() {
        for (v, culprit) in [
            (json!([{"hostPort": 0, "containerPort": 80}]), "hostPort"),
            (
                json!([{"hostPort": 70000, "containerPort": 80}]),
                "hostPort",
            ),
            (json!([{"hostPort": 80}]), "containerPort"),
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
            assert_eq!(e.code, 7);
            assert!(
                e.msg.contains(culprit) && e.msg.contains("portMappings[0]"),
                "{}",
                e.msg
            );
        }
    }

    #[test]
    fn inner_args_drop_host_ip_only() {
        let inner = inner_capability_args(&rc(
            json!([{"hostPort": 1, "containerPort": 2, "hostIP": "127.0.0.1"}]),
        ));
        assert_eq!(
            inner["portMappings"],
            json!([{"hostPort": 1, "containerPort": 2}])
        );
    }
}
