//! How an infra is set up (`Settings`, fixed by the ADD that starts it),
//! and the builtin port driver's bounds, from the network config.

use super::outbound;
use crate::cni::config::PortDriver;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// How the infra is set up; fixed by the ADD that starts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    pub mtu: u32,
    pub allow_host_loopback: bool,
    pub ipv6: bool,
    pub port_driver: PortDriver,
    /// What connects the infra to the outside (absent in a record of a
    /// version that knew slirp4netns only).
    #[serde(default)]
    pub outbound: outbound::Engine,
    pub idle_timeout_secs: Option<u64>,
    pub log_level: String,
    /// The builtin driver's bounds (absent in a record of a version that
    /// had none: the defaults).
    #[serde(default)]
    pub forward_limits: ForwardLimits,
}

/// Bounds of the builtin port driver's forwarder (config keys of the same
/// names; see the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ForwardLimits {
    pub max_connections: usize,
    pub max_connections_per_port: usize,
    pub max_udp_flows: usize,
    pub max_udp_flows_per_port: usize,
    /// 0: no idle timeout.
    pub tcp_idle_timeout_secs: u64,
    pub udp_idle_timeout_secs: u64,
}

impl Default for ForwardLimits {
    fn default() -> Self {
        ForwardLimits {
            max_connections: 32768,
            max_connections_per_port: 16384,
            max_udp_flows: 4096,
            max_udp_flows_per_port: 1024,
            // Two hours, as TCP keepalive's first probe: a connection that
            // quiet is most likely gone at the other end.
            tcp_idle_timeout_secs: 7200,
            udp_idle_timeout_secs: 60,
        }
    }
}

impl ForwardLimits {
    pub fn to_limits(self) -> crate::ports::forwarder::Limits {
        let secs = std::time::Duration::from_secs;
        crate::ports::forwarder::Limits {
            connections: self.max_connections,
            connections_per_port: self.max_connections_per_port,
            udp_flows: self.max_udp_flows,
            udp_flows_per_port: self.max_udp_flows_per_port,
            tcp_idle: Some(self.tcp_idle_timeout_secs)
                .filter(|s| *s > 0)
                .map(secs),
            udp_idle: secs(self.udp_idle_timeout_secs.max(1)),
        }
    }
}

impl Settings {
    pub fn from_conf(conf: &crate::cni::config::NetConf) -> Self {
        Settings {
            mtu: conf.mtu,
            allow_host_loopback: conf.allow_host_loopback,
            ipv6: conf.ipv6,
            port_driver: conf.port_driver,
            outbound: conf.outbound,
            idle_timeout_secs: conf.idle_timeout.map(|d| d.as_secs()),
            log_level: log::max_level().to_string().to_lowercase(),
            forward_limits: conf.forward_limits,
        }
    }

    /// Handed to the supervisor as one JSON argument (`supervisor::Args`).
    pub fn to_arg(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_arg(arg: &str) -> Result<Self> {
        serde_json::from_str(arg).map_err(|e| Error::internal(format!("bad --settings: {e}")))
    }
}
