//! The slirp4netns port driver: `add_hostfwd` / `remove_hostfwd` on its API
//! socket. slirp4netns's API takes IPv4 host addresses only.

use super::{Driver, PortMapping, Protocol, INFRA_ADDR};
use crate::error::{Error, Kind, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

const API_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Slirp {
    api_socket: PathBuf,
    /// Per attachment: each mapping and the id slirp4netns gave it.
    forwards: HashMap<String, Vec<(PortMapping, u64)>>,
}

impl Slirp {
    pub fn new(api_socket: PathBuf) -> Self {
        Slirp {
            api_socket,
            forwards: HashMap::new(),
        }
    }

    fn add_one(&self, m: &PortMapping) -> Result<u64> {
        let host_addr = match m.host_ip {
            None => "0.0.0.0".to_string(),
            Some(IpAddr::V4(ip)) => ip.to_string(),
            Some(IpAddr::V6(ip)) if ip.is_unspecified() => "0.0.0.0".to_string(),
            Some(IpAddr::V6(ip)) => {
                return Err(Error::config(format!(
                    "hostIP {ip}: the slirp4netns port driver takes IPv4 host addresses only; use portDriver builtin"
                )))
            }
        };
        let proto = match m.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        let reply = call(
            &self.api_socket,
            &json!({"execute": "add_hostfwd", "arguments": {
                "proto": proto, "host_addr": host_addr, "host_port": m.host_port,
                "guest_addr": INFRA_ADDR.to_string(), "guest_port": m.host_port }}),
        )?;
        if let Some(id) = reply.pointer("/return/id").and_then(Value::as_u64) {
            return Ok(id);
        }
        let desc = reply
            .pointer("/error/desc")
            .and_then(Value::as_str)
            .unwrap_or("no id in the answer");
        Err(Error::new(
            Kind::HostPort,
            format!(
                "cannot publish host port {} through slirp4netns: {desc}{}",
                m.describe(),
                why_unavailable(m)
            ),
        ))
    }

    fn remove_one(&self, id: u64) {
        let req = json!({"execute": "remove_hostfwd", "arguments": {"id": id}});
        if let Err(e) = call(&self.api_socket, &req) {
            log::warn!("slirp4netns remove_hostfwd {id}: {e}");
        }
    }
}

impl Driver for Slirp {
    fn add(&mut self, key: &str, mappings: &[PortMapping]) -> Result<()> {
        let mut added = Vec::new();
        for m in mappings {
            match self.add_one(m) {
                Ok(id) => added.push((m.clone(), id)),
                Err(e) => {
                    for (_, id) in added {
                        self.remove_one(id);
                    }
                    return Err(e);
                }
            }
        }
        for (m, id) in &added {
            log::info!("forwarding {} (slirp4netns id {id})", m.describe());
        }
        self.forwards
            .entry(key.to_string())
            .or_default()
            .extend(added);
        Ok(())
    }

    fn remove(&mut self, key: &str) {
        for (_, id) in self.forwards.remove(key).unwrap_or_default() {
            self.remove_one(id);
        }
    }

    /// slirp4netns dies with the infra, and its forwards with it.
    fn close_all(&mut self) {
        self.forwards.clear();
    }

    fn slirp_restarted(&mut self, api_socket: &Path) {
        self.api_socket = api_socket.to_path_buf();
        let keys: Vec<String> = self.forwards.keys().cloned().collect();
        for key in keys {
            let mappings: Vec<PortMapping> =
                self.forwards[&key].iter().map(|(m, _)| m.clone()).collect();
            self.forwards.remove(&key);
            match self.add(&key, &mappings) {
                Ok(()) => log::info!("re-applied {} forward(s) of {key}", mappings.len()),
                Err(e) => log::error!("re-applying the forwards of {key}: {e}"),
            }
        }
    }
}

/// slirp4netns does not say why a forward failed; a bind of our own does.
fn why_unavailable(m: &PortMapping) -> String {
    let probe = match m.protocol {
        Protocol::Tcp => std::net::TcpListener::bind(m.listen_addr()).map(drop),
        Protocol::Udp => std::net::UdpSocket::bind(m.listen_addr()).map(drop),
    };
    match probe {
        Ok(()) => String::new(),
        Err(e) => format!(" ({e})"),
    }
}

/// One request, one answer: slirp4netns closes after each.
fn call(api_socket: &Path, req: &Value) -> Result<Value> {
    let what = || format!("slirp4netns API {}", api_socket.display());
    let mut conn = UnixStream::connect(api_socket).map_err(|e| Error::from(e).context(what()))?;
    conn.set_read_timeout(Some(API_TIMEOUT))?;
    conn.write_all(req.to_string().as_bytes())?;
    conn.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    serde_json::from_str(&answer)
        .map_err(|e| Error::internal(format!("{}: bad answer {answer:?}: {e}", what())))
}
